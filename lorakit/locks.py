"""Record locks: one lock file per record under ``<dataRoot>/.lorakit/locks/``, held with ``flock``.

A lock file says who holds it (pid, host, since when), so a writer that waits too long can name the holder and
how to clear a stale lock. A lock file deleted while held (someone cleaning ``.lorakit/``) would let a second
writer in with a new file of the same name; the holder checks, right before it replaces the record, that its
lock is still the file at that path, and refuses the write when it is not, so no update is lost silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from .errors import RecordError
from .roots import Root, open_regular

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: filelock's own locking, without the holder checks
    fcntl = None  # type: ignore[assignment]  # the module or None; mypy types the name as the module

_POLL_S = 0.01
_NOTE_BYTES = 512  # a holder note is ~90 bytes; more than this is not lorakit's note
_NOTE_FIELD_CHARS = 80
_held = threading.local()  # lock path -> [RecordLock, depth] of this thread: a nested lock of one record is free


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one we may not signal exists too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state_folder(root: Path, *parts: str) -> Path:
    """A folder under ``<dataRoot>/.lorakit`` (locks, caches), created when missing. ``.lorakit`` or one of its
    folders being a file or a broken symbolic link (a bad checkout, a stray copy) is a clear error."""
    folder = root.joinpath(".lorakit", *parts)
    real, real_root = os.path.realpath(folder), os.path.realpath(root)  # checked before anything is created
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise RecordError(f"{folder} leads out of the data root to {real} through a symbolic link; make "
                          f"{root / '.lorakit'} a real folder (it holds only locks and caches)")
    try:
        # Made through the root's directory handle: a link planted after the check above is refused, not followed.
        Root(root).make_folder(folder)
        return folder
    except (FileExistsError, NotADirectoryError, RecordError):
        pass
    except OSError as exc:
        raise RecordError(f"cannot create {folder}: {exc.strerror}") from None
    bad = next((p for p in [root / ".lorakit", *[root.joinpath(".lorakit", *parts[:i + 1]) for i in range(len(parts))]]
                if p.is_symlink() or (p.exists() and not p.is_dir())), folder)
    what = "a broken symbolic link" if bad.is_symlink() and not bad.exists() else "not a folder"
    raise RecordError(f"{bad} is {what}; lorakit keeps its locks and caches there: remove it "
                      "(it holds nothing that cannot be rebuilt) and run the command again")


class RecordLock:
    """An exclusive lock on one record, from every process and thread. Use as a context manager.

    The lock file is opened through ``root`` (the data root): a lock file that is a link, a special file or a
    name for a file elsewhere (more than one hard link) is refused, so a planted one never takes the holder's
    note outside the root."""

    def __init__(self, lock_path: Path, what: object, timeout: float, root: Root):
        self.path, self.what, self.timeout, self.root = Path(lock_path), what, timeout, root
        self._fd: int | None = None
        self._inode: int | None = None

    def __enter__(self) -> RecordLock:
        table = _table()
        entry = table.get(self.path)
        if entry is not None:
            entry[1] += 1
            return entry[0]
        if fcntl is None:  # pragma: no cover
            from filelock import FileLock

            self._fallback = FileLock(str(self.path), timeout=self.timeout)
            self._fallback.acquire()
        else:
            self._acquire()
        table[self.path] = [self, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        entry = _table()[self.path]
        entry[1] -= 1
        if entry[1]:
            return
        del _table()[self.path]
        owner = entry[0]
        if fcntl is None:  # pragma: no cover
            owner._fallback.release()
            return
        fd, owner._fd = owner._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            fd = self.root.open_lock(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise RecordError(self._timeout_message()) from None
                time.sleep(_POLL_S)
                continue
            except BaseException:
                os.close(fd)
                raise
            # The file may have been deleted (and re-created by someone else) between open and flock: only a
            # lock on the file that is at the path now counts.
            inode = os.fstat(fd).st_ino
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current != inode:
                os.close(fd)
                continue
            self._fd, self._inode = fd, inode
            holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.now(UTC).isoformat(timespec="seconds")}).encode()
            with contextlib.suppress(OSError):  # the note is for people; a full disk must not stop the lock
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder + b"\n", 0)
            return

    def verify(self) -> None:
        """Refuse to go on when the lock file was removed or replaced while held."""
        if fcntl is None or self._inode is None:  # pragma: no cover
            return
        try:
            current = os.stat(self.path).st_ino
        except FileNotFoundError:
            current = None
        if current != self._inode:
            raise RecordError(f"{self.what}: its lock file {self.path} was removed while this command held it, so "
                              "another writer may have changed the record meanwhile; nothing was written: run the "
                              "command again (and do not delete .lorakit/locks while lorakit runs)")

    def _timeout_message(self) -> str:
        return (f"{self.what} is locked by {lock_holder(self.path)}; waited {self.timeout:g} s. If that process is still working, wait "
                f"and try again; if it is gone (killed, another machine's stale lock), delete {self.path}")


def lock_holder(lock_path: Path) -> str:
    """Who holds a lock, as its note says ("process 12 on host since ..."), else "another process".

    The note sits in the shared data folder, so anyone may have written it: only its first bytes are read, from
    a regular file only, and only a small object of plain values counts.
    """
    try:
        with open_regular(lock_path, "lock file", no_follow=True) as handle:
            raw = handle.read(_NOTE_BYTES)
    except (OSError, RecordError):
        return "another process"
    try:
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (ValueError, RecursionError):
        holder = None
    if not isinstance(holder, dict):
        return "another process"
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        return "another process"
    return f"process {pid} on {_note_text(holder.get('host'))} since {_note_text(holder.get('since'))}"


def _note_text(value: object) -> str:
    """A string from a lock note as it may go into a message: printable, and short."""
    if not isinstance(value, str) or not value:
        return "?"
    text = "".join(c if c.isprintable() else "?" for c in value[:_NOTE_FIELD_CHARS])
    return text + ("..." if len(value) > _NOTE_FIELD_CHARS else "")


def held_lock(lock_path: Path) -> RecordLock | None:
    """The lock this thread holds on ``lock_path``, if any."""
    entry = _table().get(Path(lock_path))
    return entry[0] if entry else None


def _table() -> dict[Path, list]:
    table = getattr(_held, "table", None)
    if table is None:
        table = _held.table = {}
    return table

