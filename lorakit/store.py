"""The record store: the one place that reads and writes lorakit's JSON records.

Records live under ``dataRoot`` in the original tool's layout (see ``docs/data-model.md`` in the README).
Every write is validated against the record's JSON Schema first, serialized with a file lock and made
atomic (temporary file in the same folder, then rename), so a crash never leaves a half-written record
and two processes updating one record never lose an update. Fields lorakit does not know are kept.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from hashlib import sha1
from pathlib import Path
from typing import Any

import orjson

from .errors import RecordError, RecordNotFoundError
from .ids import check_id
from .locks import RecordLock, held_lock, state_folder
from .roots import MAX_CACHE_BYTES, Root, read_regular
from .schemas import validation_errors

# kind -> (folder under the scope root, schema name). Scoped kinds live in data/shared/ when no project is
# given (baseline) and in data/projects/<project>/ otherwise.
SCOPED_KINDS = {"lora": "loras", "dataset": "datasets", "eval": "evals"}
PROJECT_KINDS = {"spec": "specs", "asset": "assets", "job": "jobs"}
SHARED_KINDS = {"checkpoint": "checkpoints"}
CATALOG_NAMES = ("styles", "scenarios", "tags", "asset-types")
SCHEMA_OF = {
    "project": "project", "spec": "spec", "asset": "asset", "job": "job", "checkpoint": "checkpoint",
    "lora": "lora", "dataset": "dataset-manifest", "eval": "eval",
    **{f"catalog:{name}": f"catalog-{name}" for name in CATALOG_NAMES},
}
LOCK_TIMEOUT_S = 60
# The largest record file lorakit reads: far above the largest manifest (a 100,000-item dataset is ~60 MB), far
# below what a planted file could use to exhaust memory.
MAX_RECORD_BYTES = 1 << 30


def now_iso(moment: datetime | None = None) -> str:
    """The current time (or ``moment``, an aware datetime) as the data model writes it: ISO 8601 UTC with
    milliseconds and ``Z``.

    >>> now_iso(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    '2026-01-02T03:04:05.678Z'
    """
    if moment is None:
        moment = datetime.now(UTC)
    elif moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def non_finite_path(value: object) -> str | None:
    """The JSON path of the first NaN or infinite number in ``value``, else None.

    >>> non_finite_path({"a": [1.0, {"b": float("inf")}]})
    '$.a[1].b'
    """
    if not _has_non_finite(value):  # the common case, without building a path per value
        return None
    stack: list[tuple[object, str]] = [(value, "$")]
    while stack:
        item, path = stack.pop()
        if type(item) is float:
            if not math.isfinite(item):
                return path
        elif type(item) is dict:
            stack.extend((v, f"{path}.{k}") for k, v in item.items() if type(v) in (dict, list, float))
        elif type(item) is list:
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item) if type(v) in (dict, list, float))
    return None


def _has_non_finite(value: object) -> bool:
    if type(value) is float:
        return not math.isfinite(value)
    if type(value) not in (dict, list):
        return False
    stack: list[Any] = [value]  # dicts and lists only: each is checked with type() before it is pushed
    isfinite = math.isfinite
    while stack:
        container = stack.pop()
        for item in container.values() if type(container) is dict else container:
            kind = type(item)
            if kind is float:
                if not isfinite(item):
                    return True
            elif kind is dict or kind is list:
                stack.append(item)
    return False


def dump_json(record: object, where: object = "record") -> str:
    """Records are pretty-printed with 2 spaces and a trailing newline, non-ASCII kept as is.

    orjson writes the same text as ``json.dumps(indent=2, ensure_ascii=False)`` ten times faster (large
    manifests are written on every build); only small floats read differently (``0.00001``, as JavaScript's
    ``JSON.stringify`` writes them, where Python writes ``1e-05``). What orjson refuses (integers beyond
    64 bits, a :class:`VerbatimNumber`) goes through a slower path that writes them exactly. A NaN or infinite number has no
    strict-JSON form (orjson would write ``null``, the standard library ``NaN``), so such a record is refused.
    """
    bad = non_finite_path(record)
    if bad is not None:
        raise RecordError(f"{where}: the number at {bad} is NaN or too large for a double (e.g. 1e400), which "
                          "strict JSON cannot hold; lorakit will not rewrite the file: correct that value by hand")
    try:
        return orjson.dumps(record, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE).decode("utf-8")
    except TypeError:
        pass  # an integer beyond 64 bits or a VerbatimNumber, which orjson does not write
    kept: list[str] = []
    marker = f"lorakit-verbatim-{secrets.token_hex(12)}-"
    plain = _mark_verbatim(record, marker, kept)
    try:
        text = orjson.dumps(plain, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE).decode("utf-8")
    except TypeError:
        text = json.dumps(plain, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if not kept:
        return text
    return re.sub(f'"{marker}(\\d+)"', lambda m: kept[int(m[1])], text)


class VerbatimNumber(float):
    """A JSON number that no double holds exactly (``1.0000000000000001``, ``1e-400``), read as the nearest
    float but written back as its original text: a record rewrite must not change a value lorakit does not own.
    Arithmetic on it gives a plain float, so a value lorakit computes is written as usual."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> VerbatimNumber:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __reduce__(self) -> tuple:
        return VerbatimNumber, (self.text,)


def _mark_verbatim(value: object, marker: str, kept: list[str]) -> object:
    """``value`` with each VerbatimNumber replaced by a string ``marker + index`` (its text appended to
    ``kept``), for a serializer that cannot write raw number text."""
    kind = type(value)
    if kind is VerbatimNumber:
        kept.append(value.text)  # type: ignore[attr-defined]
        return f"{marker}{len(kept) - 1}"
    if kind is dict:
        return {k: _mark_verbatim(v, marker, kept) for k, v in value.items()}  # type: ignore[attr-defined]
    if kind is list:
        return [_mark_verbatim(v, marker, kept) for v in value]  # type: ignore[attr-defined]
    return value


# What orjson may read inexactly: an integer beyond 64 bits (read as a float) and a number with 16+ significant
# digits or a 3-digit exponent, which a double may not hold (1.0000000000000001 -> 1.0, 1e-400 -> 0.0). A number
# with at most 15 digits and a 2-digit exponent always survives a double. The text is first mapped to a few
# classes (d: what may precede a JSON number, 0: digit or point, e, +: sign, x: anything else), so a pattern
# with a literal first character finds long number tokens at memchr speed and skips digit runs inside strings
# (hashes, times); only the tokens it finds are checked, and only an inexact one costs a second parse.
_NUMBER_CLASSES = bytes(
    ord("0") if chr(c) in "0123456789." else ord("e") if chr(c) in "eE" else ord("+") if chr(c) in "+-"
    else ord("d") if chr(c) in " \t\n\r:,[" else ord("x")
    for c in range(256)
)
_LONG_NUMBER = re.compile(rb"d\+?0(?:0{15}|0*e\+?000)")
_NUMBER_TOKEN = re.compile(rb"-?[\d.]+(?:[eE][+-]?\d+)?")


def _long_numbers(data: bytes) -> Iterator[str]:
    """The text of each JSON number in ``data`` that a double or orjson's 64-bit integers may not hold."""
    classes = b"d" + data.translate(_NUMBER_CLASSES)  # the "d" stands for the start: a document may be a number
    for found in _LONG_NUMBER.finditer(classes):
        token = _NUMBER_TOKEN.match(data, found.start())  # classes runs one byte ahead of data
        if token:
            yield token[0].decode("ascii")


def _is_exact(token: str) -> bool:
    """Whether the JSON number ``token`` reads exactly: as a Python int (within orjson's 64 bits), or as a
    float whose shortest repr has the same decimal value (``1e-5``/``1e-05``, ``1.50``/``1.5`` are exact)."""
    if not any(c in token for c in ".eE"):
        return len(token.lstrip("-")) < 19
    try:
        value = float(token)
        shortest = repr(value)
        return shortest == token or (math.isfinite(value) and Decimal(token) == Decimal(shortest))
    except (ValueError, ArithmeticError):
        return False


def _json_float(token: str) -> float:
    value = float(token)
    if len(token) < 16 and "e" not in token and "E" not in token:
        return value  # 15 digits or fewer, no exponent: a double holds it
    if not math.isfinite(value) or _is_exact(token):
        return value  # an overflow stays infinite, so the write is refused as before
    return VerbatimNumber(token)


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def loads_json(data: bytes, where: object) -> object:
    """Parse JSON bytes; errors name ``where`` (a file), the line and the column. ``NaN`` and ``Infinity``,
    which strict JSON parsers reject, are errors too. A number no double holds exactly is read as a
    :class:`VerbatimNumber`, so writing the record back keeps its text."""
    try:
        value = orjson.loads(data)
        if all(_is_exact(token) for token in _long_numbers(data)):
            return value
    except orjson.JSONDecodeError:
        pass  # re-parsed below: the standard library words errors better
    except RecursionError:
        raise RecordError(f"{where}: nested too deeply to be a lorakit record") from None
    try:
        return json.loads(data, parse_constant=_no_constants, parse_float=_json_float)
    except UnicodeDecodeError as exc:
        raise RecordError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except ValueError as exc:
        raise RecordError(f"{where}: not strict JSON: {exc}; replace it with a number or null") from None
    except RecursionError:
        raise RecordError(f"{where}: nested too deeply to be a lorakit record") from None


def parse_json(path: str | os.PathLike) -> object:
    """Parse one record file; a syntax error names the file, line and column. A missing file raises
    :class:`FileNotFoundError` so callers can tell "absent" from "broken". The file must be a regular file of
    its own: a symbolic link, a hard link to a file elsewhere, a FIFO or a device is an error naming it."""
    try:
        data = read_regular(path, "record file", max_bytes=MAX_RECORD_BYTES, single_link=True, no_follow=True)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise RecordError(f"{path}: cannot be read ({exc.strerror})") from None
    return loads_json(data, path)


class Store:
    """Records under one data root.

    ``project=None`` addresses the shared (baseline) scope for LoRAs, datasets and evals.

    >>> store = Store("data")                                      # doctest: +SKIP
    >>> store.read("lora", "ui_icons_base")                        # doctest: +SKIP
    >>> store.update("lora", "hero", lambda r: {**r, "recommended": True}, project="demo")  # doctest: +SKIP
    """

    def __init__(self, data_root: str | Path):
        self.root = Path(data_root).resolve()
        self.fs = Root(self.root, "the data root")  # every write and delete under the root goes through it
        self._real_dirs: dict[str, str] = {}  # resolved record folders (see contained_path)

    # ---- paths -------------------------------------------------------------------------------------
    def project_dir(self, project: str) -> Path:
        return self._inside(self.root / "projects" / check_id(project, "project id"))

    def folder(self, kind: str, project: str | None = None) -> Path:
        """The folder that holds records of ``kind`` (for ``project``, or shared)."""
        if kind in SCOPED_KINDS:
            base = self.root / "shared" if project is None else self.project_dir(project)
            return self._inside(base / SCOPED_KINDS[kind])
        if kind in PROJECT_KINDS:
            if project is None:
                raise RecordError(f"{kind} records belong to a project: give a project id")
            return self._inside(self.project_dir(project) / PROJECT_KINDS[kind])
        if kind in SHARED_KINDS:
            return self._inside(self.root / "shared" / SHARED_KINDS[kind])
        raise KeyError(f"unknown record kind {kind!r}")

    def path(self, kind: str, record_id: str, project: str | None = None) -> Path:
        """The file of one record. Ids are checked, so the path never leaves the data root."""
        if kind == "project":
            return self.project_dir(record_id) / "project.json"
        if kind.startswith("catalog:"):
            return self.catalog_path(kind.split(":", 1)[1], project, checkpoint=record_id or None)
        return self._inside(self.folder(kind, project) / f"{check_id(record_id, kind + ' id')}.json")

    def catalog_path(self, name: str, project: str | None, checkpoint: str | None = None) -> Path:
        if name not in CATALOG_NAMES:
            raise RecordError(f"unknown catalog {name!r} (expected one of {', '.join(CATALOG_NAMES)})")
        # Shared catalogs (data/shared/catalogs/) hold defaults every project inherits, e.g. canonical prompts.
        base = self.root / "shared" / "catalogs" if project is None else self.project_dir(project) / "catalogs"
        if checkpoint:
            base = base / "checkpoints" / check_id(checkpoint, "checkpoint id")
        return self._inside(base / f"{name}.json")

    def file_path(self, rel: str, what: str | None = None) -> Path:
        """An image or other file referenced from a record (POSIX path relative to the data root), resolved
        with its symlinks. A path that is absolute, climbs out with ``..``, or leads out through a symlink is a
        :class:`RecordError`: a shared data folder must not make lorakit read, write or delete elsewhere."""
        problem, real = contained_path(os.fspath(self.root), rel)
        if problem:
            raise RecordError(f"{what or 'file path'} {rel!r} {problem}")
        return Path(real)

    def relative(self, path: Path) -> str:
        """The POSIX path of ``path`` relative to the data root, as records store it."""
        return Path(os.path.relpath(Path(path).resolve(), self.root)).as_posix()

    def _inside(self, path: Path, what: str | None = None) -> Path:
        """``path`` (a record file or folder) normalized, refused when it leaves the data root, in its text or
        through a symbolic link: a folder of a shared data root linked elsewhere must not take writes there."""
        resolved = Path(os.path.normpath(path))
        if resolved == self.root or self.root not in resolved.parents:
            raise RecordError(f"{what or path} leaves the data root {self.root}")
        problem, _ = contained_path(os.fspath(self.root), resolved.relative_to(self.root).as_posix(), self._real_dirs)
        if problem:
            raise RecordError(f"{what or resolved} {problem}; make it a real folder or file of the data root")
        return resolved

    def lock_path(self, path: Path) -> Path:
        # Locks live outside the record folders so they never show up as records or in Git.
        return self.root / ".lorakit" / "locks" / f"{sha1(str(path).encode()).hexdigest()[:20]}.lock"

    def lock_for(self, path: Path) -> RecordLock:
        lock = self.lock_path(path)
        state_folder(self.root, "locks")
        return RecordLock(lock, path, LOCK_TIMEOUT_S, self.fs)

    # ---- reading -----------------------------------------------------------------------------------
    def exists(self, kind: str, record_id: str, project: str | None = None) -> bool:
        return self.path(kind, record_id, project).exists()

    def read(self, kind: str, record_id: str, project: str | None = None, validate: bool = True) -> dict:
        """One record. Missing, malformed and schema-invalid files raise errors that name the file."""
        path = self.path(kind, record_id, project)
        return self.read_path(path, kind, validate=validate, missing=_missing_message(kind, record_id, project))

    def find(self, kind: str, record_id: str, project: str | None = None, *,
             hint: str = "") -> tuple[dict, str | None]:
        """A record looked up in ``project`` first, then the shared scope: ``(record, where it lives)``.

        The one lookup for records that may be a project's own or shared (LoRAs, datasets, evals). ``hint`` is
        added to the not-found message (what to do about it).
        """
        places = ([project] if project else []) + [None]
        for where in places:
            if self.exists(kind, record_id, where):
                return self.read(kind, record_id, where), where
        searched = " or ".join(f"project {p!r}" if p else "the shared scope" for p in places)
        label = {"lora": "LoRA"}.get(kind, kind)
        raise RecordNotFoundError(f"{label} {record_id!r} not found in {searched}" + (f"; {hint}" if hint else ""))

    def read_path(self, path: Path, kind: str, validate: bool = True, missing: str | None = None) -> dict:
        try:
            record = parse_json(path)
        except FileNotFoundError:
            raise RecordNotFoundError(missing or f"{path} does not exist") from None
        if validate:
            self.check(kind, record, path)  # every record schema is of type object
        if not isinstance(record, dict):
            raise RecordError(f"{path}: expected a JSON object, got {type(record).__name__}")
        return record

    def check(self, kind: str, record: object, path: Path | str) -> None:
        """Raise :class:`RecordError` naming ``path`` and each failing JSON path if ``record`` is invalid."""
        problems = validation_errors(SCHEMA_OF[kind], record)
        if problems:
            shown = problems[:5] + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
            raise RecordError(f"{path}: invalid {kind} record: " + "; ".join(shown))

    def list_ids(self, kind: str, project: str | None = None) -> list[str]:
        folder = self.folder(kind, project)
        if not folder.is_dir():
            return []
        return sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".json") and not name.startswith("."))

    def iter_records(self, kind: str, project: str | None = None, validate: bool = True) -> Iterator[tuple[Path, dict]]:
        """Every record of ``kind`` as ``(path, record)``, in id order."""
        folder = self.folder(kind, project)
        for record_id in self.list_ids(kind, project):
            path = folder / f"{record_id}.json"
            yield path, self.read_path(path, kind, validate=validate)

    def list_projects(self) -> list[str]:
        folder = self.root / "projects"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "project.json").is_file())

    # ---- writing -----------------------------------------------------------------------------------
    def write(self, kind: str, record: dict, project: str | None = None, *, create: bool = False) -> Path:
        """Validate and write one record atomically under its lock. ``create=True`` refuses to overwrite."""
        record_id = record.get("id") if isinstance(record, dict) else None
        path = self.path(kind, record_id if isinstance(record_id, str) else "", project)
        return self._write_checked(kind, record, path, create)

    def write_catalog(self, name: str, record: dict, project: str | None, checkpoint: str | None = None) -> Path:
        """Write a project catalog (or its override for one checkpoint); ``project=None`` is the shared one."""
        return self._write_checked(f"catalog:{name}", record, self.catalog_path(name, project, checkpoint), False)

    def _write_checked(self, kind: str, record: dict, path: Path, create: bool) -> Path:
        record_id = record.get("id") if isinstance(record, dict) else None
        self.check(kind, record, path)
        with self.lock_for(path):
            if create and path.exists():
                raise RecordError(f"{path}: a {kind} with id {record_id!r} already exists")
            self._atomic_write(path, record)
        return path

    def update(self, kind: str, record_id: str, change: Callable[[dict], dict | None], project: str | None = None) -> dict:
        """Read, change and write one record under its lock, so concurrent updates are never lost.

        ``change`` gets the current record and returns the new one (or mutates it and returns None).
        ``updatedAt`` is set when the record has that field in its schema. Nothing is written if
        ``change`` raises or the result is invalid.
        """
        path = self.path(kind, record_id, project)
        with self.lock_for(path):
            current = self.read_path(path, kind, missing=_missing_message(kind, record_id, project))
            changed = change(current)
            new = current if changed is None else changed
            if new.get("id", record_id) != record_id:
                raise RecordError(f"{path}: an update may not change the record id")
            if "updatedAt" in new or kind in ("lora", "dataset", "eval", "job", "spec", "asset", "project", "checkpoint"):
                new["updatedAt"] = now_iso()
            self.check(kind, new, path)
            self._atomic_write(path, new)
        return new

    def delete(self, kind: str, record_id: str, project: str | None = None) -> bool:
        path = self.path(kind, record_id, project)
        with self.lock_for(path):
            return self.fs.remove(path)

    @contextlib.contextmanager
    def claim(self, kind: str, record_id: str, project: str | None = None) -> Iterator[Path]:
        """Hold the lock of one record for a read-decide-write sequence done by the caller."""
        path = self.path(kind, record_id, project)
        with self.lock_for(path):
            yield path

    def write_locked(self, kind: str, record: dict, path: Path) -> None:
        """Write ``record`` to ``path`` while the caller holds its lock (see :meth:`claim`)."""
        self.check(kind, record, path)
        self._atomic_write(path, record)

    def _atomic_write(self, path: Path, record: object) -> None:
        lock = held_lock(self.lock_path(path))
        self.fs.write_atomic(path, dump_json(record, path).encode("utf-8"), before_replace=lock.verify if lock else None)


_ABSOLUTE = re.compile(r"^([/\\]|[A-Za-z]:)")


def contained_path(root: str, rel: object, real_dirs: dict[str, str] | None = None) -> tuple[str | None, str]:
    """Resolve ``rel`` (a record's POSIX path, relative to ``root``) with its symlinks: ``(problem, real path)``.

    ``problem`` is None when the path stays inside ``root`` (which must itself be resolved), else why not, in
    words for an error message. ``real_dirs`` caches resolved folders across calls, so checking the images of a
    large library costs one ``realpath`` per folder and one ``lstat`` per file.

    >>> contained_path("/d", "files/a.png")[0] is None, contained_path("/d", "../etc/passwd")[0]
    (True, 'leaves the data root /d')
    >>> contained_path("/d", "/etc/passwd")[0]
    'is absolute; records hold paths relative to the data root /d'
    """
    if not isinstance(rel, str) or not rel or "\0" in rel:
        return "is not a path", ""
    if _ABSOLUTE.match(rel):
        return f"is absolute; records hold paths relative to the data root {root}", ""
    full = os.path.normpath(os.path.join(root, rel.replace("\\", "/")))
    prefix = root.rstrip(os.sep) + os.sep
    if not full.startswith(prefix):
        return f"leaves the data root {root}", ""
    folder, name = os.path.split(full)
    real_folder = real_dirs.get(folder) if real_dirs is not None else None
    if real_folder is None:
        real_folder = os.path.realpath(folder)
        if real_dirs is not None:
            real_dirs[folder] = real_folder
    real = os.path.join(real_folder, name)
    if os.path.islink(real):
        real = os.path.realpath(real)
    if real != root and not real.startswith(prefix):
        return f"leads out of the data root {root} through a symbolic link (to {real})", ""
    return None, real


def read_cache(path: str | os.PathLike) -> bytes | None:
    """A cache file under ``<dataRoot>/.lorakit/`` written by :func:`write_cache`, read the way it was written
    (through directory handles, no link followed); None when there is none or it cannot be read. A link, a
    special file or a hard-linked file there is an error naming it."""
    path = Path(path)
    try:
        with Root(path.parent.parent.parent).open_read(path, "cache file", max_bytes=MAX_CACHE_BYTES) as handle:
            return handle.read()
    except OSError:
        return None


def write_cache(path: str | os.PathLike, data: bytes) -> None:
    """Save a cache file under ``<dataRoot>/.lorakit/cache/`` (no fsync: it can be rebuilt). A full or read-only
    disk skips the save, so the next run rebuilds what it lacks; a ``.lorakit`` that is not a folder, or a link
    on the way, is an error."""
    path = Path(path)
    root = path.parent.parent.parent
    state_folder(root, path.parent.name)
    with contextlib.suppress(OSError):
        Root(root).write_atomic(path, data, durable=False)


def _missing_message(kind: str, record_id: str, project: str | None) -> str:
    where = f"project {project!r}" if project else "the shared scope"
    if kind == "project":
        return f"project {record_id!r} does not exist (no projects/{record_id}/project.json under the data root)"
    return f"{kind} {record_id!r} not found in {where}"
