"""The read side of a project: its record, specs, assets and catalogs, and prompt-token lookup.

Dataset builds read every asset of a project, so this module reads raw JSON (one ``open`` per file, no
``pathlib`` and no JSON Schema in the loop) and checks only the fields lorakit uses with plain Python.
When a record fails that quick check, the full schema check runs on that one record, so the error still
names the file and each failing JSON path. Catalogs are small and are schema-checked as they are read.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard, cast

import orjson

from .errors import RecordError, RecordNotFoundError
from .hashing import cache_entry, cached_value, is_racy
from .ids import check_id
from .roots import read_regular
from .store import MAX_RECORD_BYTES, Store, loads_json, parse_json, read_cache, write_cache
from .workspace import Workspace, as_workspace

VERSION_STATUSES = ("draft", "review", "approved", "rejected", "deprecated")
VARIANT_STATUSES = ("candidate", "selected", "rejected")
CATALOG_ENTRY_KEYS = {"styles": "styles", "scenarios": "scenarios", "asset-types": "assetTypes"}

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")


# ---- projects ----------------------------------------------------------------------------------------
def load_project(ws: Workspace | str | Path | None, project: str) -> dict:
    """The project record (``projects/<project>/project.json``); a missing project is a clear error."""
    ws = as_workspace(ws)
    check_id(project, "project id")
    return ws.store.read("project", project)


def require_project(store: Store, project: str) -> Path:
    """The project's folder, or :class:`RecordNotFoundError` naming the project and where it was looked for. A
    ``project.json`` that is broken or invalid is a :class:`RecordError` naming the file and the JSON path: its
    defaults and policies decide what a command does, so it is never skipped."""
    folder = store.project_dir(project)
    if not os.path.isfile(os.path.join(folder, "project.json")):
        raise RecordNotFoundError(
            f"project {project!r} does not exist (no projects/{project}/project.json under {store.root})"
        )
    record = store.read("project", project)
    if record.get("id", project) != project:
        raise RecordError(f"{store.path('project', project)}: at $.id: {record.get('id')!r} is not the project's "
                          f"folder name {project!r}")
    return folder


# ---- quick structural checks (the bulk path) ------------------------------------------------------------
def _is_id(value: object) -> bool:
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None and ".." not in value


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def asset_looks_valid(record: object) -> TypeGuard[dict]:
    """Whether ``record`` has the asset and version fields lorakit reads, with the right types (fast).

    Variants are only checked to be objects here; a build checks the variant it picks with
    :func:`variant_looks_valid`, so the cost follows what is used, not the size of the history.
    """
    if type(record) is not dict:
        return False
    if not (_is_id(record.get("id")) and _is_id(record.get("specId")) and _is_id(record.get("projectId"))):
        return False
    versions = record.get("versions")
    if type(versions) is not list:
        return False
    for version in versions:
        if type(version) is not dict or not _is_id(version.get("id")) or version.get("status") not in VERSION_STATUSES:
            return False
        if "primaryVariantId" in version and not _is_id(version["primaryVariantId"]):
            return False
        variants = version.get("variants")
        if type(variants) is not list or not all(type(v) is dict for v in variants):
            return False
    return True


def variant_looks_valid(variant: dict) -> bool:
    """Whether one variant has the fields a dataset build reads, with the right types."""
    if not _is_id(variant.get("id")):
        return False
    original = variant.get("originalPath")
    if type(original) is not str or not original:
        return False
    if "alphaPath" in variant and type(variant["alphaPath"]) is not str:
        return False
    if "tags" in variant and not _is_str_list(variant["tags"]):
        return False
    return "status" not in variant or variant["status"] in VARIANT_STATUSES


def spec_looks_valid(record: object) -> TypeGuard[dict]:
    """Whether ``record`` has the spec fields a dataset build reads, with the right types."""
    if not isinstance(record, dict) or not _is_id(record.get("id")):
        return False
    for key in ("title", "assetType", "style", "scenario"):
        if not isinstance(record.get(key), str):
            return False
    if "checkpointId" in record and not _is_id(record["checkpointId"]):
        return False
    return "tags" not in record or _is_str_list(record["tags"])


def _parse(path: str, data: bytes) -> object:
    return loads_json(data, path)


def _read_raw(path: str) -> object:
    """Parse one JSON file; errors name the file, line and column."""
    return parse_json(path)


def _read_bytes(path: str) -> bytes | OSError:
    try:
        return read_regular(path, "record file", max_bytes=MAX_RECORD_BYTES, single_link=True, no_follow=True)
    except OSError as exc:
        return exc


class FileReader:
    """Reads many small files in order, in a thread pool once reads turn out to wait on the disk.

    From the page cache a read takes microseconds and threads only add lock traffic; from a cold disk
    each read waits on I/O, and several in flight hide most of that wait. The first reads are timed
    to choose, so a warm re-build stays single-threaded and a cold one overlaps its I/O.
    """

    PROBE = 32
    COLD_READ_S = 60e-6
    WORKERS = 8

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._decided = False

    def read_many(self, paths: Sequence[str]) -> list[bytes | OSError]:
        """The bytes of each file (or the ``OSError`` reading it raised), in the order given."""
        out: list[bytes | OSError] = []
        start = 0
        if not self._decided and paths:
            probe = paths[: self.PROBE]
            t0 = time.perf_counter()
            out = [_read_bytes(p) for p in probe]
            if len(probe) == self.PROBE:
                self._decided = True
                if (time.perf_counter() - t0) / len(probe) > self.COLD_READ_S:
                    self._pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="lorakit-read")
            start = len(probe)
        rest = paths[start:]
        if self._pool is not None and len(rest) > 1:
            out.extend(self._pool.map(_read_bytes, rest))
        else:
            out.extend(_read_bytes(p) for p in rest)
        return out

    def map(self, func: Callable, items: Sequence) -> list:
        """``func`` over ``items``, in the pool when reads are slow (for work that is mostly file I/O)."""
        if self._pool is not None and len(items) > 1:
            return list(self._pool.map(func, items))
        return [func(item) for item in items]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Why: a warm dataset build otherwise opens and reads every asset and spec file (~12,500 small files for a
# 10,000-asset library), which was most of its time. One stat per file plus one read of this cache is
# cheaper. It is JSON (orjson), never pickle, so reading it cannot run code.
RECORD_CACHE_VERSION = 1  # bump when the quick checks change: cached records skip them


class RecordCache:
    """Checked records of one project's record folder (``assets`` or ``specs``), keyed by file name.

    Stored in ``<dataRoot>/.lorakit/cache/records-<project>-<kind>.json`` as ``name -> [size, mtime_ns, record
    as compact JSON text, [ctime_ns, inode, device]]``; an entry is used only while a fresh stat of the file
    gives the same :func:`~lorakit.hashing.stat_key`. Only records that passed the quick checks (and whose id
    matched the file name) are put in, so a hit needs no check. A corrupt or foreign cache file is ignored; :meth:`save` writes atomically,
    and only when something changed. Readers never save: the caller decides (a dry run does not).

    Each record stays a string until it is asked for: loading the cache then makes ten thousand strings,
    not a million objects that would all stay alive (and be walked by the garbage collector) while the
    build streams through the assets chunk by chunk. Parsing one compact string costs what parsing it as
    part of one big document would.
    """

    def __init__(self, store: Store, project: str, kind: str):
        self.path = os.path.join(os.fspath(store.root), ".lorakit", "cache", f"records-{project}-{kind}.json")
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            raw = orjson.loads(read_cache(self.path) or b"null")
            if type(raw) is dict and raw.get("version") == RECORD_CACHE_VERSION and type(raw.get("entries")) is dict:
                self.entries = raw["entries"]
        except (OSError, ValueError):
            pass  # no cache yet, or a broken one: start empty (and rewrite it on save)

    def get(self, name: str, st: os.stat_result | None) -> dict | None:
        """The cached record of file ``name`` if ``st`` (its fresh stat) still matches, else ``None``."""
        text = cached_value(self.entries.get(name), st)
        if type(text) is not str:
            return None
        try:
            record = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        return record if type(record) is dict else None

    def put(self, name: str, st: os.stat_result | None, record: dict) -> None:
        """Remember a checked ``record`` read from file ``name`` (stat taken before the read)."""
        if st is None or is_racy(st, time.time_ns()):
            self.drop(name)
            return
        self.entries[name] = cache_entry(st, orjson.dumps(record).decode("utf-8"))
        self.dirty = True

    def drop(self, name: str) -> None:
        if self.entries.pop(name, None) is not None:
            self.dirty = True

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget files that are gone (``names``: every file the folder has now)."""
        gone = self.entries.keys() - set(names)
        for name in gone:
            del self.entries[name]
        self.dirty = self.dirty or bool(gone)

    def save(self) -> None:
        if not self.dirty:
            return
        write_cache(self.path, orjson.dumps({"version": RECORD_CACHE_VERSION, "entries": self.entries}))
        self.dirty = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cycle collector while JSON is parsed: parsing makes no cycles, but each of the collector's
    passes while tens of thousands of new objects appear walks them all again (it doubled the parse time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _parse_checked(path: str, data: bytes) -> tuple[object, bool]:
    """The parsed record and whether it may be cached: only what orjson parsed survives its round trip
    (the standard library fallback also accepts NaN and Infinity, which orjson would write as null)."""
    try:
        return orjson.loads(data), True
    except orjson.JSONDecodeError:
        return _parse(path, data), False


def explain_invalid(store: Store, kind: str, record: object, path: str, fallback: str) -> RecordError:
    """The schema's own message for a record that failed the quick check (``fallback`` if the schema passes)."""
    try:
        store.check(kind, record, path)
    except RecordError as exc:
        return exc
    return RecordError(f"{path}: invalid {kind} record: {fallback}")


def check_asset(store: Store, path: str, record: object) -> dict:
    """``record`` (parsed from ``path``) if it passes the quick asset check and its id matches the file name."""
    if not asset_looks_valid(record):
        raise explain_invalid(store, "asset", record, path, "a field lorakit reads is missing or has the wrong type")
    stem = os.path.basename(path)[:-5]
    if record["id"] != stem:
        raise RecordError(f"{path}: at $.id: {record['id']!r} does not match the file name {stem}.json")
    return record


def read_asset_file(store: Store, path: str) -> dict:
    """One asset record, quickly checked; its id must match the file name."""
    return check_asset(store, path, _read_raw(path))


ASSET_CHUNK = 512


def iter_asset_chunks(ws: Workspace | str | Path | None, project: str, reader: FileReader | None = None,
                      *, records: RecordCache | None = None) -> Iterator[list[dict]]:
    """The project's asset records in id order, in lists of up to 512 (so callers can prefetch per chunk).

    Unchanged files come from ``records`` (default: the project's record cache, read but never saved
    here); the rest are read and checked, and put in ``records`` for the caller to save.
    """
    ws = as_workspace(ws)
    require_project(ws.store, project)
    folder = os.fspath(ws.store.folder("asset", project))  # refused when it leads out of the data root
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return
    if records is None:
        records = RecordCache(ws.store, project, "assets")
    records.keep_only(names)
    own = reader is None
    reader = reader or FileReader()
    try:
        for start in range(0, len(names), ASSET_CHUNK):
            chunk_names = names[start:start + ASSET_CHUNK]
            stats = [_stat(folder + os.sep + name) for name in chunk_names]
            with _gc_paused():
                chunk = [records.get(name, st) for name, st in zip(chunk_names, stats, strict=True)]
            misses = [i for i, record in enumerate(chunk) if record is None]
            paths = [folder + os.sep + chunk_names[i] for i in misses]
            for i, path, data in zip(misses, paths, reader.read_many(paths), strict=True):
                if isinstance(data, OSError):
                    raise RecordError(f"{path}: cannot be read ({data.strerror})")
                parsed, cacheable = _parse_checked(path, data)
                asset = check_asset(ws.store, path, parsed)
                chunk[i] = asset
                if cacheable:
                    records.put(chunk_names[i], stats[i], asset)
            yield cast("list[dict]", chunk)  # every miss (None) was just replaced by its record
    finally:
        if own:
            reader.close()


def iter_assets(ws: Workspace | str | Path | None, project: str) -> Iterator[dict]:
    """Every asset record of ``project``, in id order, read raw and quickly checked.

    >>> for asset in iter_assets("data", "demo"):          # doctest: +SKIP
    ...     print(asset["id"], len(asset["versions"]))
    """
    for chunk in iter_asset_chunks(ws, project):
        yield from chunk


class SpecIndex:
    """Specs of one project, read on first use (a build only reads the specs its candidates point at).

    ``get`` returns ``None`` for a spec whose file does not exist; a malformed spec is a :class:`RecordError`.
    Unchanged spec files come from ``records`` (default: the project's record cache, read but never saved
    here); the specs read are put in it for the caller to save.
    """

    def __init__(self, store: Store, project: str, *, records: RecordCache | None = None):
        self._store = store
        self._folder = os.fspath(store.folder("spec", project))
        self._cache: dict[str, dict | None] = {}
        self._records = records if records is not None else RecordCache(store, project, "specs")

    def get(self, spec_id: str) -> dict | None:
        try:
            return self._cache[spec_id]
        except KeyError:
            pass
        self.prefetch([spec_id], None)
        return self._cache[spec_id]

    def prefetch(self, spec_ids: Iterable[str], reader: FileReader | None) -> None:
        """Read the specs not read yet in one batch (so a cold disk serves them in parallel)."""
        wanted = []
        with _gc_paused():
            for spec_id in dict.fromkeys(spec_ids):
                if spec_id in self._cache:
                    continue
                path = self._path(spec_id)
                st = _stat(path)
                record = self._records.get(spec_id + ".json", st)
                if record is not None:
                    self._cache[spec_id] = record
                else:
                    wanted.append((spec_id, path, st))
        paths = [path for _, path, _ in wanted]
        datas = reader.read_many(paths) if reader is not None else [_read_bytes(p) for p in paths]
        for (spec_id, path, st), data in zip(wanted, datas, strict=True):
            if isinstance(data, FileNotFoundError):
                self._records.drop(spec_id + ".json")
                self._cache[spec_id] = None
            elif isinstance(data, OSError):
                raise RecordError(f"{path}: cannot be read ({data.strerror})")
            else:
                parsed, cacheable = _parse_checked(path, data)
                spec = self._keep(spec_id, path, parsed)
                if cacheable and spec is not None:
                    self._records.put(spec_id + ".json", st, spec)

    def _path(self, spec_id: str) -> str:
        return self._folder + os.sep + check_id(spec_id, "spec id") + ".json"

    def _keep(self, spec_id: str, path: str, record: object) -> dict | None:
        spec: dict | None = None
        if record is not None:
            if not spec_looks_valid(record):
                raise explain_invalid(self._store, "spec", record, path,
                                      "a field lorakit reads is missing or has the wrong type")
            spec = record
        self._cache[spec_id] = spec
        return spec


def load_specs(ws: Workspace | str | Path | None, project: str) -> dict[str, dict]:
    """Every spec of ``project`` by id (read raw and quickly checked, like assets; unchanged ones from the cache)."""
    ws = as_workspace(ws)
    require_project(ws.store, project)
    index = SpecIndex(ws.store, project)
    spec_ids = ws.store.list_ids("spec", project)
    index.prefetch(spec_ids, None)
    specs = {}
    for spec_id in spec_ids:
        spec = index.get(spec_id)
        if spec is not None:
            specs[spec_id] = spec
    return specs


# ---- tags ----------------------------------------------------------------------------------------------
def tag_key(tag: str) -> str:
    """The form in which tags are compared: Unicode NFC. The same tag arrives in two spellings (``é`` as one
    code point, typed; ``e`` plus a combining accent, from a macOS folder name or another tool), and every rule
    that matches, excludes, requires, removes or counts tags must see them as one.

    >>> tag_key("cafe\u0301") == tag_key("caf\u00e9") == "caf\u00e9"
    True
    """
    return unicodedata.normalize("NFC", tag)


# ---- catalogs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Catalogs:
    """A project's catalogs, with one checkpoint's overrides applied, indexed by entry id.

    ``tags`` maps a tag id to its entry; ``aliases`` maps an alias (of a style, scenario or tag) to the
    entry id it stands for, per catalog name. Tag ids and tag aliases are keyed by :func:`tag_key`.
    """

    styles: dict[str, dict] = field(default_factory=dict)
    scenarios: dict[str, dict] = field(default_factory=dict)
    tags: dict[str, dict] = field(default_factory=dict)
    asset_types: dict[str, dict] = field(default_factory=dict)
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    checkpoint: str | None = None

    def style_tokens(self, style_id: str | None) -> list[str]:
        """The prompt tokens of a style (empty for an unknown or missing style)."""
        return _entry_tokens(self.styles, self.aliases.get("styles", {}), style_id)

    def scenario_tokens(self, scenario_id: str | None) -> list[str]:
        """The prompt tokens of a scenario (empty for an unknown or missing scenario)."""
        return _entry_tokens(self.scenarios, self.aliases.get("scenarios", {}), scenario_id)

    def tag_token(self, tag: str) -> str | None:
        """The prompt token of a tag id (or alias), or ``None`` when the catalog gives none."""
        key = tag_key(tag)
        entry = self.tags.get(key)
        if entry is None:
            alias_of = self.aliases.get("tags", {}).get(key)
            entry = self.tags.get(alias_of) if alias_of else None
        token = entry.get("promptToken") if entry else None
        return token if isinstance(token, str) and token else None


def _entry_tokens(entries: dict[str, dict], aliases: dict[str, str], entry_id: str | None) -> list[str]:
    if not entry_id:
        return []
    entry = entries.get(entry_id) or entries.get(aliases.get(entry_id, ""))
    tokens = entry.get("promptTokens") if entry else None
    return [t for t in tokens if isinstance(t, str) and t] if isinstance(tokens, list) else []


def catalog_entries(name: str, record: dict | None) -> list[dict]:
    """The entries of one catalog record in file order; tag groups are flattened into their tags."""
    if not record:
        return []
    if name == "tags":
        return [tag for group in record.get("groups", []) for tag in group.get("tags", [])]
    return list(record.get(CATALOG_ENTRY_KEYS[name], []))


def merge_entries(project_entries: list[dict], checkpoint_entries: list[dict]) -> dict[str, dict]:
    """Entries by id, where a checkpoint entry replaces the project entry with the same id (whole, not merged).

    >>> merge_entries([{"id": "anime", "promptTokens": ["anime"]}], [{"id": "anime", "promptTokens": ["score_9"]}])
    {'anime': {'id': 'anime', 'promptTokens': ['score_9']}}
    """
    merged = {e["id"]: e for e in project_entries}
    merged.update({e["id"]: e for e in checkpoint_entries})
    return merged


def alias_index(entries: dict[str, dict]) -> dict[str, str]:
    """alias -> entry id; an id always wins over another entry's alias, the first alias wins among aliases."""
    index: dict[str, str] = {}
    for entry_id, entry in entries.items():
        for alias in entry.get("aliases") or []:
            if isinstance(alias, str) and alias not in entries:
                index.setdefault(alias, entry_id)
    return index


def read_catalog(store: Store, name: str, project: str, checkpoint: str | None = None) -> dict | None:
    """One catalog file (schema-checked), or ``None`` when the project has none."""
    path = store.catalog_path(name, project, checkpoint)
    if not path.is_file():
        return None
    return store.read_path(path, f"catalog:{name}")


def load_catalogs(ws: Workspace | str | Path | None, project: str, checkpoint: str | None = None) -> Catalogs:
    """The project's catalogs with ``checkpoint``'s overrides (``catalogs/checkpoints/<id>/``) applied.

    >>> cats = load_catalogs("data", "demo", checkpoint="pony_v6")   # doctest: +SKIP
    >>> cats.style_tokens("anime")                                    # doctest: +SKIP
    ['score_9', 'anime screencap']
    """
    ws = as_workspace(ws)
    require_project(ws.store, project)
    merged: dict[str, dict[str, dict]] = {}
    for name in ("styles", "scenarios", "tags", "asset-types"):
        base = catalog_entries(name, read_catalog(ws.store, name, project))
        # asset types have no per-checkpoint override in the data model
        override = (
            catalog_entries(name, read_catalog(ws.store, name, project, checkpoint))
            if checkpoint and name != "asset-types" else []
        )
        merged[name] = merge_entries(base, override)
    merged["tags"] = {tag_key(tag): entry for tag, entry in merged["tags"].items()}
    aliases = {name: alias_index(merged[name]) for name in ("styles", "scenarios", "tags")}
    aliases["tags"] = {tag_key(alias): tag for alias, tag in aliases["tags"].items()}
    return Catalogs(
        styles=merged["styles"], scenarios=merged["scenarios"], tags=merged["tags"], asset_types=merged["asset-types"],
        aliases=aliases, checkpoint=checkpoint,
    )


class CatalogsByCheckpoint:
    """Catalogs per checkpoint id, loaded once each (a build meets a handful of checkpoints)."""

    def __init__(self, ws: Workspace, project: str):
        self._ws = ws
        self._project = project
        self._loaded: dict[str | None, Catalogs] = {}

    def get(self, checkpoint: str | None) -> Catalogs:
        if checkpoint not in self._loaded:
            self._loaded[checkpoint] = load_catalogs(self._ws, self._project, checkpoint)
        return self._loaded[checkpoint]
