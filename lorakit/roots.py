"""The one way lorakit writes, deletes and opens files inside a root it owns (the data root, a models root).

A root's folders come from a shared data folder, so any of them may be a symbolic link, and may become one
between a check and the write that follows it. Checking a path and then opening it by name is a race; so every
write here walks from the root's own directory handle, one component at a time, with ``O_NOFOLLOW``: a link
anywhere below the root is refused instead of followed, whenever it was planted. Files are created exclusively
where they must be new, replaced by rename within the same folder handle, and a record or lock file with more
than one hard link (a name for a file elsewhere) is refused, as is anything that is not a regular file.

Reads of files named by records go through :func:`open_regular`: the check that a path is a regular file of
bounded size is made on the open handle, so a FIFO, a device or a socket is an error and never a hang.

>>> import tempfile
>>> root = Root(tempfile.mkdtemp())
>>> root.write_atomic(root.path / "a" / "b.json", b"{}")
>>> (root.path / "a" / "b.json").read_bytes()
b'{}'
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import RecordError

# The largest image lorakit reads (a 16k x 16k RGBA PNG stored raw is 1 GiB; real art is far smaller).
MAX_IMAGE_BYTES = 1 << 30
# The largest cache file lorakit reads back (hashes and record caches of a large library are tens of MB).
MAX_CACHE_BYTES = 1 << 30
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LINK_ERRNOS = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


def _read_umask() -> int:
    # os.umask can only be read by setting it, so it is set straight back; done once, at import, before any
    # thread of ours could create a file in between.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def kind_of(mode: int) -> str:
    """A file type in words, for error messages.

    >>> kind_of(stat.S_IFIFO), kind_of(stat.S_IFREG)
    ('a FIFO (named pipe)', 'a regular file')
    """
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a folder"),
                        (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"


class Root:
    """A folder lorakit writes inside, and everything below it reached without following a link.

    ``what`` names the root in error messages ("the data root", "lorasRoot"). The root folder itself is
    resolved once, when the object is made: it comes from the user's own configuration, not from the shared
    folder. Paths given to the methods are absolute paths inside the root (as the store and the config build
    them) or paths relative to it.
    """

    def __init__(self, path: str | os.PathLike, what: str = "the data root"):
        self.path = Path(os.path.realpath(os.fspath(path)))
        self.what = what

    # ---- paths -----------------------------------------------------------------------------------------
    def parts(self, path: str | os.PathLike) -> list[str]:
        """``path``'s components below the root; a path that is not lexically inside the root is refused."""
        text = os.fspath(path)
        if "\0" in text:
            raise RecordError(f"{text!r} is not a path (it holds a NUL byte)")
        full = os.path.normpath(os.path.join(self.path, text))
        rel = os.path.relpath(full, self.path)
        if rel == "." or rel == ".." or rel.startswith(".." + os.sep) or os.path.isabs(rel):
            raise RecordError(f"{text} leaves {self.what} {self.path}; lorakit writes only inside it")
        return rel.split(os.sep)

    def _refusal(self, where: Path, exc: OSError | None = None, found: str | None = None) -> RecordError:
        if found is None and (exc is None or exc.errno in _LINK_ERRNOS):
            try:
                found = f"{kind_of(os.lstat(where).st_mode)} where a folder belongs"
            except OSError:
                found = "a symbolic link or not a folder"
        what = found or (exc.strerror if exc is not None and exc.strerror else str(exc))
        return RecordError(f"{where} is {what}; lorakit writes inside {self.what} {self.path} only through real "
                           "folders and files: replace it with a real folder (or remove it) and run the command "
                           "again")

    @contextlib.contextmanager
    def folder(self, parts: list[str], create: bool = True) -> Iterator[int]:
        """A directory handle on the folder ``parts`` below the root, each component opened relative to the one
        before with no-follow flags (made when missing and ``create``). Yields the file descriptor."""
        if create:  # the root itself is the user's own choice (a new data root is made on first use)
            os.makedirs(self.path, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            where = self.path
            for name in parts:
                where = where / name
                try:
                    child = self._open_folder(fd, name, where)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o777, dir_fd=fd)
                    child = self._open_folder(fd, name, where)
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)

    def _open_folder(self, parent_fd: int, name: str, where: Path) -> int:
        """A directory handle on ``name`` in the folder ``parent_fd``; a link or a file there is refused."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in _LINK_ERRNOS:
                raise self._refusal(where, exc) from None
            raise

    def make_folder(self, path: str | os.PathLike) -> Path:
        """Create the folder ``path`` (and its parents) inside the root, refusing links on the way."""
        if os.path.normpath(os.path.join(self.path, os.fspath(path))) == os.fspath(self.path):
            return self.path
        parts = self.parts(path)
        with self.folder(parts):
            pass
        return self.path.joinpath(*parts)

    def _check_target(self, dir_fd: int, name: str, where: Path, *, single_link: bool) -> os.stat_result | None:
        """What is at ``name`` now: None when nothing is; a link, a special file or (for ``single_link``) a
        file with more than one hard link is refused."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode):
            raise self._refusal(where, found=kind_of(st.st_mode))
        if single_link and st.st_nlink > 1:
            raise self._refusal(where, found=f"a file with {st.st_nlink} hard links (a name for a file elsewhere)")
        return st

    # ---- writing -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def atomic(self, path: str | os.PathLike, *, durable: bool = True, exclusive: bool = False,
               before_replace: Callable[[], None] | None = None) -> Iterator[IO[bytes]]:
        """Write ``path`` all at once: yields a binary file (a new temporary file in the same folder) to write by
        any means (bytes, ``torch.save``, Pillow), then renames it over ``path``; on an error it is removed.

        Readers see the old file or the new one, never half of one, even if the writer is killed. ``durable``
        also syncs the data before the rename (records, weights); caches that can be rebuilt skip that cost.
        The file keeps its permission bits (a new one gets what the umask allows). ``exclusive`` refuses to
        replace a file that is there. ``before_replace`` is the last moment to refuse (e.g. the record's lock was
        taken away). What is at ``path`` is never followed: a link or special file there is refused, and so is
        a file with more than one hard link.
        """
        *parents, name = self.parts(path)
        where = self.path.joinpath(*parents, name)
        with self.folder(parents) as dir_fd:
            current = self._check_target(dir_fd, name, where, single_link=True)
            if exclusive and current is not None:
                raise FileExistsError(errno.EEXIST, "File exists", str(where))
            mode = stat.S_IMODE(current.st_mode) if current is not None else 0o666 & ~_UMASK
            tmp = self._new_temporary(dir_fd, name, mode)
            try:
                with os.fdopen(tmp[1], "wb") as handle:
                    yield handle
                    handle.flush()
                    if durable:
                        os.fsync(handle.fileno())
                if before_replace is not None:
                    before_replace()
                # Checked again right before the rename: the folder handle is fixed, but the name in it is not.
                self._check_target(dir_fd, name, where, single_link=True)
                if exclusive:
                    os.link(tmp[0], name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                    os.unlink(tmp[0], dir_fd=dir_fd)
                else:
                    os.replace(tmp[0], name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp[0], dir_fd=dir_fd)
                raise

    def _new_temporary(self, dir_fd: int, name: str, mode: int) -> tuple[str, int]:
        for _ in range(100):
            tmp = f".{name}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=dir_fd)
            except FileExistsError:
                continue
            os.fchmod(fd, mode)
            return tmp, fd
        raise FileExistsError(errno.EEXIST, "no free temporary name", name)  # pragma: no cover

    def write_atomic(self, path: str | os.PathLike, data: bytes, *, durable: bool = True, exclusive: bool = False,
                     before_replace: Callable[[], None] | None = None) -> None:
        """Replace ``path`` with ``data`` all at once (see :meth:`atomic`)."""
        with self.atomic(path, durable=durable, exclusive=exclusive, before_replace=before_replace) as handle:
            handle.write(data)

    def create_free(self, folder: str | os.PathLike, name: str, data: bytes) -> Path:
        """Write ``data`` as a new file in ``folder`` under ``name``, else the first free ``stem-N.suffix``:
        an existing file is never replaced, so two imports never clobber each other's files. The file appears
        whole (written under a temporary name, then linked in)."""
        parts = self.parts(folder)
        stem, suffix = os.path.splitext(name)
        with self.folder(parts) as dir_fd:
            tmp, fd = self._new_temporary(dir_fd, name, 0o666 & ~_UMASK)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                for n in range(100_000):
                    final = name if n == 0 else f"{stem}-{n}{suffix}"
                    try:
                        os.link(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                    except FileExistsError:
                        continue
                    except OSError as exc:
                        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EMLINK, errno.EXDEV):
                            raise
                        # No hard links on this file system: an exclusive create still never replaces a file.
                        try:
                            out = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                          0o666 & ~_UMASK, dir_fd=dir_fd)
                        except FileExistsError:
                            continue
                        try:
                            with os.fdopen(out, "wb") as handle:
                                handle.write(data)
                        except BaseException:
                            os.unlink(final, dir_fd=dir_fd)
                            raise
                    return self.path.joinpath(*parts, final)
                raise RecordError(f"no free file name for {name} in {self.path.joinpath(*parts)}")
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=dir_fd)

    def open_file(self, path: str | os.PathLike) -> IO[str]:
        """A text file at ``path`` (created when missing) opened to read and rewrite in place, such as a log that
        grows as a run goes; the caller closes it. A link, a special file or a file with more than one hard link
        there is refused, never read or written through."""
        return os.fdopen(self.open_lock(path, mode=0o666 & ~_UMASK), "r+", encoding="utf-8", errors="surrogateescape",
                         newline="")

    def open_log(self, path: str | os.PathLike) -> IO[bytes]:
        """A binary file at ``path`` opened to write from empty (a tool's output log), refusing what
        :meth:`open_file` refuses; the caller closes it."""
        fd = self.open_lock(path, mode=0o666 & ~_UMASK)
        os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")

    def open_lock(self, path: str | os.PathLike, mode: int = 0o644) -> int:
        """The file descriptor of a lock file (created when missing), opened to read and write without following
        a link; a link, a special file or a lock file with more than one hard link is refused."""
        return self._open_file(path, os.O_RDWR | os.O_CREAT, mode, create=True)

    def _open_file(self, path: str | os.PathLike, flags: int, mode: int = 0o644, *, create: bool,
                   what: str = "file", max_bytes: int | None = None) -> int:
        """A file descriptor on ``path``, reached through directory handles with no link followed, then checked
        on the handle: a regular file with one link, no larger than ``max_bytes``."""
        *parents, name = self.parts(path)
        where = self.path.joinpath(*parents, name)
        with self.folder(parents, create=create) as dir_fd:
            try:
                fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in _LINK_ERRNOS:
                    raise self._refusal(where, found="a symbolic link") from None
                raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._refusal(where, found=kind_of(st.st_mode))
            if st.st_nlink > 1:
                raise self._refusal(where, found=f"a file with {st.st_nlink} hard links (a name for a file elsewhere)")
            if max_bytes is not None and st.st_size > max_bytes:
                raise RecordError(f"{what} {where} is {st.st_size} bytes, more than the {max_bytes} lorakit reads "
                                  "for it")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ---- reading what lorakit wrote itself -----------------------------------------------------------------
    @contextlib.contextmanager
    def open_read(self, path: str | os.PathLike, what: str = "file", *,
                  max_bytes: int | None = None) -> Iterator[IO[bytes]]:
        """A file lorakit wrote inside the root (run state, a run's own files), opened for reading the way it was
        written: through directory handles, with no link followed on the way or at the end; a special file or a
        file with more than one hard link is refused (see :func:`open_regular`)."""
        fd = self._open_file(path, os.O_RDONLY, create=False, what=what, max_bytes=max_bytes)
        handle = os.fdopen(fd, "rb")
        with handle:
            yield handle

    def names(self, path: str | os.PathLike) -> list[str]:
        """The names in the folder ``path`` inside the root (empty when it does not exist), listed through a
        directory handle: a link on the way is refused, not listed through."""
        parts = [] if os.path.normpath(os.path.join(self.path, os.fspath(path))) == os.fspath(self.path) \
            else self.parts(path)
        try:
            with self.folder(parts, create=False) as dir_fd, os.scandir(dir_fd) as entries:
                return sorted(entry.name for entry in entries)
        except FileNotFoundError:
            return []

    # ---- deleting ----------------------------------------------------------------------------------------
    def remove(self, path: str | os.PathLike, *, missing_ok: bool = True) -> bool:
        """Delete the file ``path`` inside the root. A link is removed itself (never what it points at); a file
        with more than one hard link is refused, since removing the name would change the file elsewhere.
        Returns whether something was removed."""
        *parents, name = self.parts(path)
        where = self.path.joinpath(*parents, name)
        try:
            with self.folder(parents, create=False) as dir_fd:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    if missing_ok:
                        return False
                    raise
                if stat.S_ISDIR(st.st_mode):
                    raise self._refusal(where, found="a folder where a file was expected")
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    raise self._refusal(where, found=f"a file with {st.st_nlink} hard links (a name for a file "
                                                     "elsewhere)")
                os.unlink(name, dir_fd=dir_fd)
                return True
        except FileNotFoundError:
            if missing_ok:
                return False
            raise

    def remove_folder(self, path: str | os.PathLike, *, only_empty: bool = False) -> bool:
        """Delete the folder ``path`` and what it holds, walking it by directory handles: a link inside is
        removed itself and never followed, a hard-linked file is refused. ``only_empty`` removes it only when it
        is empty. Returns whether it was removed."""
        *parents, name = self.parts(path)
        try:
            with self.folder(parents, create=False) as dir_fd:
                try:
                    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    return False
                where = self.path.joinpath(*parents, name)
                if not stat.S_ISDIR(st.st_mode):
                    raise self._refusal(where, found=f"{kind_of(st.st_mode)} where a folder was expected")
                if only_empty:
                    try:
                        os.rmdir(name, dir_fd=dir_fd)
                    except OSError as exc:
                        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                            return False
                        raise
                    return True
                self._empty(dir_fd, name, where)
                os.rmdir(name, dir_fd=dir_fd)
                return True
        except FileNotFoundError:
            return False

    def _empty(self, parent_fd: int, name: str, where: Path) -> None:
        fd = self._open_folder(parent_fd, name, where)
        try:
            with os.scandir(fd) as entries:
                names = [entry.name for entry in entries]
            for child in names:
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    self._empty(fd, child, where / child)
                    os.rmdir(child, dir_fd=fd)
                elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    raise self._refusal(where / child, found=f"a file with {st.st_nlink} hard links (a name for a "
                                                             "file elsewhere)")
                else:
                    os.unlink(child, dir_fd=fd)
        finally:
            os.close(fd)


# ---- reading: regular files only, checked on the open handle -------------------------------------------------
@contextlib.contextmanager
def open_regular(path: str | os.PathLike, what: str = "file", *, max_bytes: int | None = None,
                 single_link: bool = False, no_follow: bool = False) -> Iterator[IO[bytes]]:
    """``path`` opened for reading as a binary file, after its open handle shows a regular file no larger than
    ``max_bytes``. A FIFO, a device, a socket or a folder is a :class:`RecordError` naming it: opening a FIFO
    does not block (``O_NONBLOCK``), so a planted one is refused instead of hanging the command.
    ``single_link`` refuses a file with more than one hard link (a record must not be a name for a file
    elsewhere); ``no_follow`` refuses a file that is itself a symbolic link (a record must be a real file of
    its folder)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if no_follow else 0))
    except IsADirectoryError:
        raise RecordError(f"{what} {path} is a folder, not a file") from None
    except OSError as exc:
        if no_follow and exc.errno == errno.ELOOP:
            raise RecordError(f"{what} {path} is a symbolic link; lorakit reads only real files there: replace it "
                              "with the file itself") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordError(f"{what} {path} is {kind_of(st.st_mode)}, not a regular file: replace it with the "
                              "file it should be")
        if single_link and st.st_nlink > 1:
            raise RecordError(f"{what} {path} has {st.st_nlink} hard links (it is a name for a file elsewhere); "
                              "replace it with a copy of its own")
        if max_bytes is not None and st.st_size > max_bytes:
            raise RecordError(f"{what} {path} is {st.st_size} bytes, more than the {max_bytes} lorakit reads for "
                              "it")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def read_regular(path: str | os.PathLike, what: str = "file", *, max_bytes: int | None = None,
                 single_link: bool = False, no_follow: bool = False) -> bytes:
    """The bytes of ``path``, a regular file (see :func:`open_regular`). The read stops at the size the handle
    showed (plus one byte, to see a file that grew), so a file that grows while read cannot exhaust memory."""
    with open_regular(path, what, max_bytes=max_bytes, single_link=single_link, no_follow=no_follow) as handle:
        size = os.fstat(handle.fileno()).st_size
        data = handle.read(size + 1 if max_bytes is None else min(size + 1, max_bytes + 1))
    if max_bytes is not None and len(data) > max_bytes:
        raise RecordError(f"{what} {path} grew past the {max_bytes} bytes lorakit reads for it while it was read")
    return data


def check_regular(path: str | os.PathLike, what: str = "file") -> int:
    """The size of ``path`` when it is a regular file (checked on an open handle, so a FIFO never blocks);
    else a :class:`RecordError` naming it. For files a library then opens by name (safetensors, torch)."""
    with open_regular(path, what) as handle:
        return os.fstat(handle.fileno()).st_size
