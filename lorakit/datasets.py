"""Dataset manifests: which images of a project a LoRA trains on, with which captions, and their export.

``build_manifest`` walks a project's assets once. The decisions (which version, variant and image, whether
tags match, what the caption says) are pure functions below, following the selection rules in
``docs/data-model.md``; the build only adds the I/O at the edges: reading records, a stat per picked image,
hashing and a cheap decode check of the images actually picked, and one validated write of the manifest.

Image hashes are cached under ``<dataRoot>/.lorakit/cache/`` keyed by path, size, mtime, ctime and inode, so a re-build
of an unchanged library reads no image at all.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import stat as stat_mode
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import (
    Catalogs,
    CatalogsByCheckpoint,
    FileReader,
    RecordCache,
    SpecIndex,
    explain_invalid,
    iter_asset_chunks,
    require_project,
    tag_key,
    variant_looks_valid,
)
from .errors import DatasetError, RecordError, UnreadableImageError
from .hashing import cache_entry, cached_value, is_racy
from .ids import check_id, given_or_new_id
from .roots import MAX_IMAGE_BYTES, read_regular
from .store import Store, contained_path, now_iso, read_cache, write_cache
from .workspace import Workspace, as_workspace

if TYPE_CHECKING:
    import pandas

SCOPES = ("project", "baseline")
CAPTION_STRATEGIES = ("tags", "tags+spec", "tags+spec+title")
VERSION_STATUSES = ("draft", "review", "approved", "rejected", "deprecated")
EXPORT_FORMATS = ("kohya", "imagefolder")
PROVENANCE_KEYS = ("source", "author", "license", "url", "notes")

# Why a candidate asset was left out, in the order the build checks them (one reason per asset: the first).
WRONG_STATUS = "wrong status"
FILTERED_BY_TYPE = "filtered by type"
FILTERED_BY_CHECKPOINT = "filtered by checkpoint"
NO_VARIANT = "no variant"
EXCLUDED_TAG = "excluded tag"
FILTERED_BY_TAG = "filtered by tag"
IMAGE_MISSING = "image missing"
UNREADABLE_IMAGE = "unreadable image"
LEFT_OUT_REASONS = (
    WRONG_STATUS, FILTERED_BY_TYPE, FILTERED_BY_CHECKPOINT, NO_VARIANT, EXCLUDED_TAG, FILTERED_BY_TAG,
    IMAGE_MISSING, UNREADABLE_IMAGE,
)

HASH_CACHE_FILE = ("cache", "sha256.json")  # under <dataRoot>/.lorakit/
HASH_CACHE_VERSION = 1  # entries of the older [size, mtime, sha256] form fail the shape check: re-hashed


# ---- results -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeftOut:
    """One asset that did not make it into the manifest, and why."""

    asset_id: str
    reason: str
    detail: str = ""


@dataclass
class BuildResult:
    """What ``build_manifest`` built (or would build, on a dry run) and what it left out."""

    manifest: dict
    path: Path
    written: bool
    assets_seen: int
    left_out: list[LeftOut] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    images_hashed: int = 0  # images read this run (the rest came from the hash cache)

    @property
    def counts(self) -> dict[str, int]:
        """Left-out assets by reason, in check order, reasons with no asset omitted."""
        return left_out_counts(self.left_out)


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    image_dir: Path
    fmt: str
    images: int
    captions: int


@dataclass(frozen=True)
class Selection:
    """The filters and caption options of one build, checked; ``as_record`` is what the manifest keeps."""

    project: str
    status: str = "approved"
    asset_types: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tag_any: bool = False
    exclude_tags: tuple[str, ...] = ()
    caption: str = "tags"
    no_spec_tags: bool = False
    with_tokens: bool = False

    def as_record(self) -> dict:
        return {
            "project": self.project, "status": self.status, "assetTypes": list(self.asset_types),
            "checkpoints": list(self.checkpoints), "tags": list(self.tags), "tagAny": self.tag_any,
            "excludeTags": list(self.exclude_tags), "caption": self.caption, "noSpecTags": self.no_spec_tags,
            "withTokens": self.with_tokens,
        }


# ---- pure decisions ------------------------------------------------------------------------------------
def pick_version(asset: dict, status: str = "approved") -> dict | None:
    """The last version in ``asset["versions"]`` whose status is ``status``, else ``None``.

    >>> pick_version({"versions": [{"id": "a", "status": "approved"}, {"id": "b", "status": "approved"},
    ...                            {"id": "c", "status": "draft"}]})["id"]
    'b'
    """
    for version in reversed(asset.get("versions") or []):
        if version.get("status") == status:
            return version
    return None


def pick_variant(version: dict) -> dict | None:
    """``primaryVariantId``'s variant, else the first ``selected`` variant, else the first variant.

    A ``primaryVariantId`` that names no variant of the version falls through to the next rule.

    >>> pick_variant({"variants": [{"id": "a"}, {"id": "b", "status": "selected"}]})["id"]
    'b'
    """
    variants = version.get("variants") or []
    primary = version.get("primaryVariantId")
    if primary:
        for variant in variants:
            if variant.get("id") == primary:
                return variant
    for variant in variants:
        if variant.get("status") == "selected":
            return variant
    return variants[0] if variants else None


def pick_image(variant: dict, exists: Callable[[str], bool]) -> str | None:
    """The alpha PNG when ``alphaPath`` is set and its file exists, else the original when it exists, else None.

    ``exists`` takes a path relative to the data root.

    >>> pick_image({"originalPath": "o.png", "alphaPath": "a.png"}, lambda p: p == "o.png")
    'o.png'
    """
    alpha = variant.get("alphaPath")
    if alpha and exists(alpha):
        return alpha
    original = variant.get("originalPath")
    if original and exists(original):
        return original
    return None


def matches_tags(tags: Iterable[str], wanted: Sequence[str], any_: bool = False) -> bool:
    """All of ``wanted`` are in ``tags`` (``any_``: at least one), compared by :func:`tag_key`. No wanted tags
    always matches.

    >>> matches_tags(["a", "b"], ["a", "c"]), matches_tags(["a", "b"], ["a", "c"], any_=True)
    (False, True)
    """
    if not wanted:
        return True
    have = {tag_key(t) for t in tags}
    found = (tag_key(t) in have for t in wanted)
    return any(found) if any_ else all(found)


def missing_tags(tags: Iterable[str], wanted: Sequence[str]) -> list[str]:
    """The ``wanted`` tags that ``tags`` lacks (compared by :func:`tag_key`), in order.

    >>> missing_tags(["a", "b"], ["a", "c"])
    ['c']
    """
    have = {tag_key(t) for t in tags}
    return [t for t in wanted if tag_key(t) not in have]


def compile_globs(patterns: Sequence[str]) -> re.Pattern | None:
    """One regex for a list of fnmatch globs (case-sensitive on every OS, in :func:`tag_key` form), ``None``
    for no patterns."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(tag_key(p))})" for p in patterns))


def excluded_tags(tags: Iterable[str], patterns: Sequence[str] | re.Pattern | None) -> list[str]:
    """The tags that match any exclude glob (``issue:*`` matches ``issue:blurry``), in order.

    >>> excluded_tags(["issue:blurry", "color:neon"], ["issue:*"])
    ['issue:blurry']
    """
    regex = compile_globs(patterns) if isinstance(patterns, Sequence) else patterns
    if regex is None:
        return []
    return [t for t in tags if regex.match(tag_key(t))]


def dedupe(parts: Iterable[str]) -> list[str]:
    """Non-empty parts, first occurrence kept; two spellings of one text (see :func:`tag_key`) are one part."""
    seen: set[str] = set()
    out = []
    for part in parts:
        key = tag_key(part) if isinstance(part, str) else part
        if part and key not in seen:
            seen.add(key)
            out.append(part)
    return out


def prompt_tokens(spec: dict | None, tags: Iterable[str], catalogs: Catalogs) -> list[str]:
    """The style's tokens, the scenario's tokens, then each tag's token, from ``catalogs`` (de-duplicated).

    Pass the catalogs of the spec's checkpoint (see :func:`lorakit.catalog.load_catalogs`) so its entries
    replace the project's.
    """
    spec = spec or {}
    parts = catalogs.style_tokens(spec.get("style")) + catalogs.scenario_tokens(spec.get("scenario"))
    for tag in tags:
        token = catalogs.tag_token(tag)
        if token:
            parts.append(token)
    return dedupe(parts)


def spec_tags(spec: dict | None) -> list[str]:
    tags = (spec or {}).get("tags")
    return list(tags) if isinstance(tags, list) else []


def build_caption(
    variant_tags: Sequence[str],
    spec: dict | None,
    strategy: str = "tags",
    *,
    no_spec_tags: bool = False,
    tokens: Sequence[str] = (),
    exclude: Sequence[str] | re.Pattern | None = None,
) -> str | None:
    """The caption for one item, or ``None`` when it would be empty.

    ``tags``: variant tags; ``tags+spec``: + spec tags; ``tags+spec+title``: + spec title
    (``no_spec_tags`` drops the spec tags). ``tokens`` (from :func:`prompt_tokens`) come last. Tags that
    match an ``exclude`` glob never reach the caption. Parts are de-duplicated and joined with ", ".

    >>> build_caption(["pose:front"], {"tags": ["style:anime"], "title": "Hero"}, "tags+spec+title",
    ...               tokens=["anime style"])
    'pose:front, style:anime, Hero, anime style'
    """
    if strategy not in CAPTION_STRATEGIES:
        raise DatasetError(f"unknown caption strategy {strategy!r} (expected one of {', '.join(CAPTION_STRATEGIES)})")
    tags = list(variant_tags)
    if strategy != "tags" and not no_spec_tags:
        tags += spec_tags(spec)
    if exclude:
        dropped = set(excluded_tags(tags, exclude))
        tags = [t for t in tags if t not in dropped]
    parts = tags
    if strategy == "tags+spec+title":
        title = (spec or {}).get("title")
        if isinstance(title, str) and title.strip():
            parts.append(title.strip())
    parts += tokens
    parts = dedupe(parts)
    return ", ".join(parts) if parts else None


def manifest_hash(items: Sequence[dict]) -> str:
    """sha256 over each item's ids, path, caption and image hash, in a canonical form.

    Stable while nothing that a trainer sees changes; any caption or image change changes it.
    Item tags and the manifest's own id and timestamps are not part of it.
    """
    canonical = [
        [i["assetId"], i["assetVersionId"], i["variantId"], i["path"], i.get("caption", ""), i.get("sha256", "")]
        for i in items
    ]
    data = json.dumps(canonical, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def left_out_counts(left_out: Iterable[LeftOut]) -> dict[str, int]:
    counts = Counter(entry.reason for entry in left_out)
    return {reason: counts[reason] for reason in LEFT_OUT_REASONS if counts[reason]}


def screen_candidate(version: dict, spec: dict | None, selection: Selection,
                     exclude: re.Pattern | None = None) -> tuple[dict | None, str | None, str]:
    """Apply the type, checkpoint, variant, exclude and tag rules to one asset's picked version.

    Returns ``(variant, None, "")`` for a candidate that stays, else ``(None, reason, detail)``.
    An asset without a spec has no type, checkpoint or spec tags.
    """
    if selection.asset_types:
        asset_type = (spec or {}).get("assetType")
        if asset_type not in selection.asset_types:
            return None, FILTERED_BY_TYPE, f"asset type {asset_type!r}" if spec else "no spec, so no asset type"
    if selection.checkpoints:
        checkpoint = (spec or {}).get("checkpointId")
        if checkpoint not in selection.checkpoints:
            detail = f"checkpoint {checkpoint!r}" if checkpoint else "spec has no checkpointId"
            return None, FILTERED_BY_CHECKPOINT, detail if spec else "no spec, so no checkpoint"
    variant = pick_variant(version)
    if variant is None:
        return None, NO_VARIANT, f"version {version.get('id')!r} has no variants"
    variant_tags = variant.get("tags") or []
    all_tags = variant_tags + spec_tags(spec)
    # Excluded tags are looked for on the spec even with no_spec_tags: an exclude is a safety net.
    hits = excluded_tags(all_tags, exclude if exclude is not None else compile_globs(selection.exclude_tags))
    if hits:
        return None, EXCLUDED_TAG, ", ".join(dedupe(hits))
    match_tags = variant_tags if selection.no_spec_tags else all_tags
    if not matches_tags(match_tags, selection.tags, selection.tag_any):
        missing = missing_tags(match_tags, selection.tags)
        return None, FILTERED_BY_TAG, ("none of " if selection.tag_any else "missing ") + ", ".join(missing)
    return variant, None, ""


def check_selection(
    project: str, *, scope: str, status: str, asset_types: Iterable[str], checkpoints: Iterable[str],
    tags: Iterable[str], tag_any: bool, exclude_tags: Iterable[str], caption: str, no_spec_tags: bool,
    with_tokens: bool,
) -> Selection:
    """Check the options of a build and return them as a :class:`Selection`; bad values are clear errors."""
    check_id(project, "project id")
    if scope not in SCOPES:
        raise DatasetError(f"unknown scope {scope!r} (expected one of {', '.join(SCOPES)})")
    if status not in VERSION_STATUSES:
        raise DatasetError(f"unknown status {status!r} (expected one of {', '.join(VERSION_STATUSES)})")
    if caption not in CAPTION_STRATEGIES:
        raise DatasetError(f"unknown caption strategy {caption!r} (expected one of {', '.join(CAPTION_STRATEGIES)})")

    def listed(values: Iterable[str], what: str) -> tuple[str, ...]:
        if isinstance(values, str):
            values = [values]
        out = tuple(dedupe(str(v).strip() for v in values))
        for value in out:
            if not value:
                raise DatasetError(f"empty {what}")
        return out

    return Selection(
        project=project, status=status, asset_types=listed(asset_types, "asset type"),
        checkpoints=listed(checkpoints, "checkpoint"), tags=listed(tags, "tag"), tag_any=bool(tag_any),
        exclude_tags=listed(exclude_tags, "exclude tag"), caption=caption, no_spec_tags=bool(no_spec_tags),
        with_tokens=bool(with_tokens),
    )


def clean_provenance(provenance: dict | None) -> dict | None:
    """The given provenance fields (non-empty strings only), or ``None`` when none is given."""
    if not provenance:
        return None
    unknown = sorted(set(provenance) - set(PROVENANCE_KEYS))
    if unknown:
        raise DatasetError(f"unknown provenance field(s) {', '.join(unknown)} (expected {', '.join(PROVENANCE_KEYS)})")
    kept = {k: str(provenance[k]) for k in PROVENANCE_KEYS if provenance.get(k) not in (None, "")}
    return kept or None


# ---- image hashing (I/O) -------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_problem(data: bytes) -> str | None:
    """Why ``data`` is not an intact PNG (bad signature, IHDR, chunk, CRC or no IEND), or ``None``.

    The same structural check Pillow's ``verify`` does -- every chunk's length and CRC, up to IEND -- but
    without building an image object; pixels are not decompressed. Cost is one CRC pass over the bytes.
    """
    if data[:8] != PNG_SIGNATURE:
        return "not a PNG (bad signature)"
    view = memoryview(data)
    n = len(data)
    pos = 8
    first = True
    while pos + 12 <= n:
        length = int.from_bytes(view[pos:pos + 4], "big")
        kind = bytes(view[pos + 4:pos + 8])
        end = pos + 12 + length
        if end > n:
            return f"truncated in a {kind.decode('latin-1')} chunk"
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return f"CRC error in a {kind.decode('latin-1')} chunk"
        if first:
            if kind != b"IHDR" or length != 13:
                return "first chunk is not IHDR"
            if int.from_bytes(view[pos + 8:pos + 12], "big") == 0 or int.from_bytes(view[pos + 12:pos + 16], "big") == 0:
                return "zero width or height"
            first = False
        if kind == b"IEND":
            return None
        pos = end
    return "truncated (no IEND chunk)"


def hash_and_verify(path: str) -> str:
    """The sha256 of an image file, after checking that it decodes.

    One read per file: the bytes are hashed and checked in memory. PNGs first get :func:`png_problem` (every
    chunk and CRC), which words a broken file best; then every image is decoded in full, because pixel data can
    be garbage while every checksum passes, and the trainer must not be the first to find out. Only images not
    in the hash cache get here, so a warm build decodes nothing.
    """
    data = read_regular(path, "image", max_bytes=MAX_IMAGE_BYTES)
    digest = hashlib.sha256(data).hexdigest()
    if data[:8] == PNG_SIGNATURE:
        problem = png_problem(data)
        if problem:
            raise UnreadableImageError(f"broken PNG: {problem}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError:
        raise UnreadableImageError("not an image Pillow can identify") from None
    except Exception as exc:  # Pillow raises many kinds (SyntaxError, OSError, struct.error...) for broken files
        raise UnreadableImageError(f"broken image ({type(exc).__name__}: {exc})") from None
    return digest


def _hash_job(path: str) -> str | UnreadableImageError:
    try:
        return hash_and_verify(path)
    except UnreadableImageError as exc:
        return exc
    except RecordError as exc:  # a FIFO, a device or a socket under an image's name
        return UnreadableImageError(str(exc))
    except OSError as exc:
        return UnreadableImageError(f"cannot be read ({exc.strerror or exc})")


class HashCache:
    """sha256 of image files keyed by path and :func:`~lorakit.hashing.stat_key`; a corrupt or foreign cache
    file is ignored.

    Only images that verified are cached, so a cached hash also means "this file decodes".
    """

    def __init__(self, data_root: str):
        self.path = os.path.join(data_root, ".lorakit", *HASH_CACHE_FILE)
        self.entries: dict[str, list] = {}
        self.dirty = False
        try:
            raw = json.loads(read_cache(self.path) or b"null")
            if isinstance(raw, dict) and raw.get("version") == HASH_CACHE_VERSION and isinstance(raw.get("entries"), dict):
                self.entries = raw["entries"]
        except (OSError, ValueError):
            pass  # no cache yet, or a broken one: start empty and rewrite it

    def get(self, rel: str, st: os.stat_result) -> str | None:
        digest = cached_value(self.entries.get(rel), st)
        return digest if isinstance(digest, str) and len(digest) == 64 else None

    def put(self, rel: str, st: os.stat_result, digest: str) -> None:
        if is_racy(st, time.time_ns()):
            return
        self.entries[rel] = cache_entry(st, digest)
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        data = json.dumps({"version": HASH_CACHE_VERSION, "entries": self.entries}, ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")
        write_cache(self.path, data)
        self.dirty = False


class _FileStats:
    """A stat per relative path, done at most once (the existence check and the cache key share it)."""

    def __init__(self, root: str):
        self.root = root + os.sep
        self.seen: dict[str, os.stat_result | None] = {}

    def __call__(self, rel: str) -> os.stat_result | None:
        try:
            return self.seen[rel]
        except KeyError:
            pass
        try:
            st = os.stat(self.root + rel)
            result = st if stat_mode.S_ISREG(st.st_mode) else None
        except (OSError, ValueError):
            result = None
        self.seen[rel] = result
        return result

    def exists(self, rel: str) -> bool:
        return self(rel) is not None


def _safe_rel(root: str, rel: str) -> str | None:
    """``rel`` as a normalized POSIX path inside the data root, or ``None`` when it leaves the data root."""
    if not (rel.startswith(("/", "\\", "./")) or ".." in rel or "\\" in rel or "//" in rel):
        return rel
    full = os.path.normpath(os.path.join(root, rel.replace("\\", "/")))
    if full == root or not full.startswith(root + os.sep):
        return None
    return Path(os.path.relpath(full, root)).as_posix()


def _where(assets_dir: str, asset: dict, version: dict, variant: dict, key: str) -> str:
    v = next(i for i, x in enumerate(asset["versions"]) if x is version)
    k = next(i for i, x in enumerate(version["variants"]) if x is variant)
    return f"{assets_dir}{os.sep}{asset['id']}.json: at $.versions[{v}].variants[{k}].{key}"


# ---- building ------------------------------------------------------------------------------------------
def build_manifest(
    ws: Workspace | str | Path | None,
    *,
    project: str,
    scope: str = "project",
    dataset_id: str | None = None,
    status: str = "approved",
    asset_types: Iterable[str] = (),
    checkpoints: Iterable[str] = (),
    tags: Iterable[str] = (),
    tag_any: bool = False,
    exclude_tags: Iterable[str] = (),
    caption: str = "tags",
    no_spec_tags: bool = False,
    with_tokens: bool = False,
    provenance: dict | None = None,
    dry_run: bool = False,
) -> BuildResult:
    """Select images from ``project``'s assets and write a dataset manifest (``lorakit dataset build``).

    ``scope="project"`` writes ``projects/<project>/datasets/<id>.json``; ``scope="baseline"`` writes
    ``shared/datasets/<id>.json`` (the source project is kept in ``selection.project``). ``dry_run``
    computes everything, hashes included, and writes nothing (not even the hash cache).
    An empty selection raises :class:`DatasetError` with the counts of left-out assets by reason.

    >>> result = build_manifest("data", project="demo", asset_types=["ui_icon"], tags=["style:cyberpunk"],
    ...                         caption="tags+spec", with_tokens=True)          # doctest: +SKIP
    >>> result.manifest["id"], len(result.manifest["items"]), result.counts     # doctest: +SKIP
    """
    ws = as_workspace(ws)
    store = ws.store
    selection = check_selection(
        project, scope=scope, status=status, asset_types=asset_types, checkpoints=checkpoints, tags=tags,
        tag_any=tag_any, exclude_tags=exclude_tags, caption=caption, no_spec_tags=no_spec_tags,
        with_tokens=with_tokens,
    )
    manifest_id = given_or_new_id(dataset_id, "dataset id")
    kept_provenance = clean_provenance(provenance)
    require_project(store, project)
    target_project = project if scope == "project" else None
    target = store.path("dataset", manifest_id, target_project)

    picker = _ItemPicker(ws, project, selection)
    with FileReader() as reader:
        for chunk in iter_asset_chunks(ws, project, reader, records=picker.asset_records):
            picker.specs.prefetch((a["specId"] for a in chunk), reader)
            for asset in chunk:
                picker.consider(asset)
        # Only the images picked and not in the cache are read: hashed and checked, in parallel on a cold disk.
        digests = reader.map(_hash_job, [picker.stats.root + rel for _, rel, _ in picker.to_hash])
    items = picker.hashed_items(digests)
    if not items:
        raise DatasetError(_empty_message(project, picker.seen, picker.left_out))

    manifest = _manifest_record(store, manifest_id, scope, project, selection, items, kept_provenance,
                                keep_created_from=target if dataset_id is not None else None)
    if dry_run:
        store.check("dataset", manifest, target)
    else:
        target = store.write("dataset", manifest, project=target_project)
        picker.save_caches()
    return BuildResult(manifest=manifest, path=target, written=not dry_run, assets_seen=picker.seen,
                       left_out=picker.left_out, warnings=_build_warnings(picker.missing_specs, picker.alpha_fallbacks),
                       images_hashed=len(picker.to_hash))


class _ItemPicker:
    """One build's walk over the assets: which image of each asset goes in, with which caption, and why each
    one left out was left out. The caches it reads are saved only when the manifest is written."""

    def __init__(self, ws: Workspace, project: str, selection: Selection):
        store = ws.store
        self.store, self.selection = store, selection
        self.root = os.fspath(store.root)
        self.assets_dir = os.path.join(os.fspath(store.project_dir(project)), "assets")
        self.asset_records = RecordCache(store, project, "assets")  # parsed records, saved unless a dry run
        self.spec_records = RecordCache(store, project, "specs")
        self.specs = SpecIndex(store, project, records=self.spec_records)
        self.catalogs = CatalogsByCheckpoint(ws, project) if selection.with_tokens else None
        self.exclude = compile_globs(selection.exclude_tags)
        self.stats = _FileStats(self.root)
        self.real_dirs: dict[str, str] = {}  # resolved image folders, for the symlink check
        self.cache = HashCache(self.root)
        self.items: list[dict] = []
        self.left_out: list[LeftOut] = []
        self.missing_specs: list[tuple[str, str]] = []
        self.alpha_fallbacks: list[str] = []
        self.to_hash: list[tuple[int, str, os.stat_result]] = []  # (item index, path, stat) of images not cached
        self.seen = 0

    def consider(self, asset: dict) -> None:
        """Add ``asset``'s image to the items, or record why it is left out."""
        self.seen += 1
        asset_id, selection = asset["id"], self.selection
        version = pick_version(asset, selection.status)
        if version is None:
            self.left_out.append(LeftOut(asset_id, WRONG_STATUS, f"no version with status {selection.status!r}"))
            return
        spec = self.specs.get(asset["specId"])
        if spec is None:
            self.missing_specs.append((asset_id, asset["specId"]))
        variant, reason, detail = screen_candidate(version, spec, selection, self.exclude)
        if variant is None:
            self.left_out.append(LeftOut(asset_id, reason or "", detail))
            return
        if not variant_looks_valid(variant):
            raise explain_invalid(self.store, "asset", asset, f"{self.assets_dir}{os.sep}{asset_id}.json",
                                  f"variant {variant.get('id')!r} lacks a field lorakit reads")
        rel = self._image(asset, version, variant)
        if rel is None:
            return
        st = self.stats(rel)
        if st is None:  # cannot happen: pick_image only returns a path that stats.exists() found
            raise DatasetError(f"{rel}: the image file picked for asset {asset_id} is gone")
        digest = self.cache.get(rel, st)
        if digest is None:
            self.to_hash.append((len(self.items), rel, st))
        item = {"assetId": asset_id, "assetVersionId": version["id"], "variantId": variant["id"], "path": rel}
        text = self._caption(variant, spec)
        if text:
            item["caption"] = text
        if "tags" in variant:
            item["tags"] = list(variant["tags"])
        item["sha256"] = digest
        self.items.append(item)

    def _image(self, asset: dict, version: dict, variant: dict) -> str | None:
        """The variant's image (alpha first) as a safe path inside the data root, or None (left out: no file).
        Paths are made safe (inside the data root, normalized) before anything touches the disk."""
        paths = {}
        for key in ("alphaPath", "originalPath"):
            if variant.get(key):
                safe = _safe_rel(self.root, variant[key])
                if safe is None:
                    raise RecordError(f"{_where(self.assets_dir, asset, version, variant, key)}: image path "
                                      f"{variant[key]!r} leaves the data root {self.root}")
                paths[key] = safe
        rel = pick_image(paths, self.stats.exists)
        if rel is None:
            declared = [p for p in (variant.get("alphaPath"), variant.get("originalPath")) if p]
            self.left_out.append(LeftOut(asset["id"], IMAGE_MISSING, "no file at " + " nor ".join(declared)))
            return None
        escape, _ = contained_path(self.root, rel, self.real_dirs)
        if escape:
            key = "alphaPath" if rel == paths.get("alphaPath") else "originalPath"
            raise RecordError(f"{_where(self.assets_dir, asset, version, variant, key)}: image path {rel!r} "
                              f"{escape}; replace the link with the file itself")
        if "alphaPath" in paths and rel != paths["alphaPath"]:
            self.alpha_fallbacks.append(asset["id"])
        return rel

    def _caption(self, variant: dict, spec: dict | None) -> str | None:
        selection = self.selection
        variant_tags = variant.get("tags") or []
        tokens: list[str] = []
        if self.catalogs is not None:
            token_tags = variant_tags if selection.no_spec_tags else variant_tags + spec_tags(spec)
            tokens = prompt_tokens(spec, token_tags, self.catalogs.get((spec or {}).get("checkpointId")))
        return build_caption(variant_tags, spec, selection.caption, no_spec_tags=selection.no_spec_tags,
                             tokens=tokens, exclude=self.exclude)

    def hashed_items(self, digests: Iterable[str | UnreadableImageError]) -> list[dict]:
        """The items with the hashes of the images read now; an image that cannot be decoded is left out."""
        unreadable: set[int] = set()
        for (index, rel, st), digest in zip(self.to_hash, digests, strict=True):
            if isinstance(digest, UnreadableImageError):
                unreadable.add(index)
                self.left_out.append(LeftOut(self.items[index]["assetId"], UNREADABLE_IMAGE, f"{rel}: {digest}"))
            else:
                self.items[index]["sha256"] = digest
                self.cache.put(rel, st, digest)
        return [item for i, item in enumerate(self.items) if i not in unreadable] if unreadable else self.items

    def save_caches(self) -> None:
        self.cache.save()
        self.asset_records.save()
        self.spec_records.save()


def _manifest_record(store: Store, manifest_id: str, scope: str, project: str, selection: Selection,
                     items: list[dict], provenance: dict | None, keep_created_from: Path | None) -> dict:
    """The manifest record, in the field order the original tool writes. Re-building a named dataset keeps
    its creation time; a broken old file is simply replaced."""
    now = now_iso()
    created = now
    if keep_created_from is not None and os.path.isfile(keep_created_from):
        with contextlib.suppress(RecordError, OSError, ValueError):
            old = store.read_path(keep_created_from, "dataset", validate=False)
            if isinstance(old.get("createdAt"), str) and old["createdAt"]:
                created = old["createdAt"]
    manifest: dict = {"id": manifest_id, "scope": scope}
    if scope == "project":
        manifest["projectId"] = project
    manifest["createdAt"] = created
    manifest["updatedAt"] = now
    if provenance:
        manifest["provenance"] = provenance
    manifest["selection"] = selection.as_record()
    manifest["items"] = items
    manifest["manifestHash"] = manifest_hash(items)
    return manifest


def _build_warnings(missing_specs: list[tuple[str, str]], alpha_fallbacks: list[str]) -> list[str]:
    warnings = []
    if missing_specs:
        shown = ", ".join(f"{a} -> {s}" for a, s in missing_specs[:5])
        more = f" and {len(missing_specs) - 5} more" if len(missing_specs) > 5 else ""
        warnings.append(
            f"{len(missing_specs)} asset(s) point at a missing spec and have no asset type, checkpoint, spec tags, "
            f"title, style or scenario: {shown}{more}"
        )
    if alpha_fallbacks:
        shown = ", ".join(alpha_fallbacks[:5])
        more = f" and {len(alpha_fallbacks) - 5} more" if len(alpha_fallbacks) > 5 else ""
        warnings.append(f"{len(alpha_fallbacks)} item(s) use the original image because the alpha file is missing: "
                        f"{shown}{more}")
    return warnings


def _empty_message(project: str, seen: int, left_out: list[LeftOut]) -> str:
    if seen == 0:
        return f"no items selected: project {project!r} has no assets"
    counts = left_out_counts(left_out)
    return (f"no items selected from {seen} asset(s) of project {project!r}; left out: "
            + ", ".join(f"{reason} {n}" for reason, n in counts.items()))


# ---- reading manifests ---------------------------------------------------------------------------------
def load_manifest(ws: Workspace | str | Path | None, dataset_id: str, project: str | None = None) -> dict:
    """A dataset manifest: the project's own when ``project`` is given and has one, else the shared one (the
    same lookup training uses, :meth:`lorakit.store.Store.find`)."""
    ws = as_workspace(ws)
    check_id(dataset_id, "dataset id")
    if project is not None:
        require_project(ws.store, project)
    return ws.store.find("dataset", dataset_id, project, hint="build it with `lorakit dataset build`")[0]


def manifest_items_frame(manifest: dict) -> pandas.DataFrame:
    """The manifest's items as a pandas DataFrame (one row per image; ``tags`` as lists) for notebooks."""
    import pandas as pd

    columns = ["assetId", "assetVersionId", "variantId", "path", "caption", "tags", "sha256"]
    rows = [{c: item.get(c) for c in columns} for item in manifest.get("items", [])]
    return pd.DataFrame(rows, columns=columns)


def dataset_summary(manifest: dict, top_tags: int = 10) -> dict:
    """Counts and settings of a manifest, for ``lorakit dataset show`` and notebooks.

    ``hashMatches`` says whether the stored ``manifestHash`` still matches the items (a hand edit breaks it).
    """
    items = manifest.get("items", [])
    tag_counts = Counter(tag_key(t) for item in items for t in dedupe(item.get("tags") or []))
    stored = manifest.get("manifestHash")
    return {
        "id": manifest.get("id"), "scope": manifest.get("scope"), "projectId": manifest.get("projectId"),
        "createdAt": manifest.get("createdAt"), "updatedAt": manifest.get("updatedAt"),
        "items": len(items), "assets": len({i["assetId"] for i in items}),
        "captioned": sum(1 for i in items if i.get("caption")),
        "alphaImages": sum(1 for i in items if "_alpha" in os.path.basename(i["path"])),
        "manifestHash": stored, "hashMatches": stored == manifest_hash(items) if stored else None,
        "selection": manifest.get("selection", {}), "provenance": manifest.get("provenance"),
        "topTags": tag_counts.most_common(top_tags),
    }


# ---- export --------------------------------------------------------------------------------------------
def export_file_names(paths: Sequence[str]) -> list[str]:
    """A unique file name per item path: the source file name, with ``_2``, ``_3``... on a clash.

    Clashes are found ignoring case (so an export is safe on macOS and Windows); items keep their order,
    so the names are the same on every run.

    >>> export_file_names(["a/x.png", "b/x.png", "c/X.PNG"])
    ['x.png', 'x_2.png', 'X_3.PNG']
    """
    taken: set[str] = set()
    names = []
    for path in paths:
        base = path.rsplit("/", 1)[-1]
        stem, ext = os.path.splitext(base)
        candidate, n = base, 1
        while candidate.lower() in taken or os.path.splitext(candidate)[0].lower() + ".txt" in taken:
            n += 1
            candidate = f"{stem}_{n}{ext}"
        taken.add(candidate.lower())
        taken.add(os.path.splitext(candidate)[0].lower() + ".txt")  # the caption file shares the stem
        names.append(candidate)
    return names


def export_dataset(
    ws: Workspace | str | Path | None,
    dataset_id: str,
    project: str | None = None,
    *,
    out_dir: str | Path,
    fmt: str = "kohya",
    repeats: int = 10,
    name: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Copy a manifest's images (and captions) into a trainer's folder layout (``lorakit dataset export``).

    ``kohya``: ``<out_dir>/<repeats>_<name>/`` with each image and a same-stem ``.txt`` caption (no ``.txt``
    for an uncaptioned item: kohya then uses the folder's class name). ``imagefolder``: images plus
    ``metadata.jsonl`` with ``file_name`` and ``text`` (Hugging Face ``datasets``). Alpha images are copied as
    they are. Each image's sha256 is checked against the manifest while copying; any mismatch or missing file
    fails the export. The export is built in a temporary folder and moved into place, so a failure leaves
    ``out_dir`` untouched; a non-empty ``out_dir`` is refused unless ``overwrite`` (which replaces it).
    """
    ws = as_workspace(ws)
    if fmt not in EXPORT_FORMATS:
        raise DatasetError(f"unknown export format {fmt!r} (expected one of {', '.join(EXPORT_FORMATS)})")
    if not isinstance(repeats, int) or repeats < 1:
        raise DatasetError(f"repeats must be a positive integer, got {repeats!r}")
    manifest = load_manifest(ws, dataset_id, project)
    name = check_id(name or manifest["id"], "export name")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"{out} is not empty; choose an empty folder or pass overwrite=True (--overwrite)")

    items = manifest["items"]
    names = export_file_names([item["path"] for item in items])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.export-"))
    try:
        image_rel = f"{repeats}_{name}" if fmt == "kohya" else "."
        image_dir = staging / image_rel
        image_dir.mkdir(parents=True, exist_ok=True)
        problems = []
        captions = 0
        metadata = []
        for item, file_name in zip(items, names, strict=True):
            source = ws.store.file_path(item["path"])
            try:
                data = read_regular(source, "image", max_bytes=MAX_IMAGE_BYTES)
            except OSError as exc:
                problems.append(f"{item['path']}: {exc.strerror or exc}")
                continue
            except RecordError as exc:
                problems.append(f"{item['path']}: {exc}")
                continue
            if item.get("sha256") and hashlib.sha256(data).hexdigest() != item["sha256"]:
                problems.append(f"{item['path']}: changed since the manifest was built (sha256 differs)")
                continue
            (image_dir / file_name).write_bytes(data)
            text = item.get("caption")
            if fmt == "kohya":
                if text:
                    (image_dir / (os.path.splitext(file_name)[0] + ".txt")).write_text(text + "\n", encoding="utf-8")
                    captions += 1
            else:
                metadata.append(json.dumps({"file_name": file_name, "text": text or ""}, ensure_ascii=False))
                captions += 1 if text else 0
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise DatasetError(f"cannot export dataset {manifest['id']!r}: {len(problems)} image(s) unusable: {shown}")
        if fmt == "imagefolder":
            (image_dir / "metadata.jsonl").write_text("\n".join(metadata) + "\n", encoding="utf-8")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out_dir=out, image_dir=(out / image_rel).resolve(), fmt=fmt, images=len(items), captions=captions)


def _move_into_place(staging: Path, out: Path) -> None:
    """Swap the finished export in: an old ``out`` is moved aside first and deleted only after the swap."""
    old = None
    if out.exists():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "previous")
        else:
            out.rmdir()
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
