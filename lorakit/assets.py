"""Bring your own images: import a folder as a project's assets, then curate them.

Import (:func:`import_assets`, ``lorakit assets import``)
    Each folder of images is one *group* and becomes one spec; each image becomes one asset with one
    version and one variant. The spec title is the folder name (for nested folders, the names below the
    import folder joined with `` / ``); a kohya ``<repeats>_<name>`` folder gives the tag ``name``, and
    the ``<repeats>_`` prefix is not part of the title. Tags beside an image (``duck.txt`` or
    ``duck.caption``, comma- or line-separated) and ``--tag`` go on the variant; folder tags go on the
    spec, since they describe the whole group. Images are copied to ``files/<project>/<group>/<name>``
    (a free name is chosen, nothing is ever overwritten) or referenced where they are (``in_place``).
    The sha256, perceptual hash, size and format go in the variant's ``processing``, so a second import
    recognises images it already has without reading them again.

Curation (functions return pandas DataFrames)
    :func:`tag_frequencies`, :func:`find_duplicates`, :func:`set_asset_status`, :func:`tag_assets`.

Interruption: an image file is written under a hidden temporary name and hard-linked to its final
name; the asset record is written last, so a record never points at a missing or partial file. Items
are committed by a few threads; Ctrl-C reaches only the main thread, which then lets the items in
flight finish, drops the rest and deletes the specs it made that no asset uses. Every record on disk is
then whole and a re-run imports the rest. A hard kill can leave a hidden ``.*.tmp`` file or an image
file no record uses, never a record pointing at nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageFile, UnidentifiedImageError

from .catalog import VERSION_STATUSES, iter_assets, load_specs, require_project, tag_key
from .datasets import (
    CAPTION_STRATEGIES,
    PROVENANCE_KEYS,
    compile_globs,
    dedupe,
    excluded_tags,
    missing_tags,
    pick_variant,
    pick_version,
    spec_tags,
)
from .errors import AssetError, BadImage, LorakitError, RecordError, RecordNotFoundError
from .hashing import file_sha256
from .ids import check_id, new_ulid
from .imagehash import DEFAULT_THRESHOLD, dhash, has_alpha, hash_hex, near_pairs
from .locks import RecordLock, state_folder
from .roots import MAX_IMAGE_BYTES, read_regular
from .store import Store, now_iso
from .workspace import Workspace, as_workspace

if TYPE_CHECKING:
    import pandas as pd  # imported where a frame is made: it costs every command start-up 0.4 s

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CAPTION_SUFFIXES = (".txt", ".caption")
# Threads that write images and records, and how many read-ahead items may wait for them.
IMPORT_THREADS = 4
IMPORT_WINDOW = 16
# Used when neither --asset-type nor the project's defaults.assetType says what the images are.
DEFAULT_ASSET_TYPE = "sprite"
DEFAULT_LORA_SELECTION = {
    "mode": "baseline_then_project",
    "preferRecommended": True,
    "maxActiveLoras": 2,
    "releasePolicy": "active_or_latest_approved",
}
_KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


# ---- pure decisions ---------------------------------------------------------------------------------
def parse_caption(text: str) -> list[str]:
    """Tags from a caption file: comma- or line-separated, trimmed, empty and repeated ones dropped.

    >>> parse_caption("astroduck, front view,\\n pixel art ,astroduck")
    ['astroduck', 'front view', 'pixel art']
    """
    return dedupe(part.strip() for line in text.splitlines() for part in line.split(","))


def kohya_folder(name: str) -> tuple[int, str] | None:
    """``(repeats, name)`` for a kohya ``<repeats>_<name>`` folder name, else None.

    >>> kohya_folder("10_astroduck"), kohya_folder("icons")
    ((10, 'astroduck'), None)
    """
    match = _KOHYA_FOLDER.match(name)
    return (int(match.group(1)), match.group(2).strip()) if match and match.group(2).strip() else None


def group_title(parts: Sequence[str]) -> str:
    """The spec title of a group: its folder names below the import folder (the import folder's own
    name when the images sit directly in it), without kohya ``<repeats>_`` prefixes.

    >>> group_title(["art", "10_astroduck"]), group_title(["art", "icons", "small"]), group_title(["5_ui"])
    ('astroduck', 'icons / small', 'ui')
    """
    names = list(parts[1:]) or list(parts[:1])
    return " / ".join((kohya_folder(n) or (0, n))[1] for n in names)


def group_tags(parts: Sequence[str], folder_tags: bool) -> list[str]:
    """The spec tags of a group: the name of every kohya folder on the way (the import folder
    included), and with ``folder_tags`` the name of every sub-folder below the import folder.

    >>> group_tags(["train", "10_duck", "side"], folder_tags=False)
    ['duck']
    >>> group_tags(["train", "10_duck", "side"], folder_tags=True)
    ['duck', 'side']
    """
    tags = []
    for depth, name in enumerate(parts):
        kohya = kohya_folder(name)
        if kohya:
            tags.append(kohya[1])
        elif folder_tags and depth > 0:
            tags.append(name)
    return dedupe(tags)


def kohya_repeats(parts: Sequence[str]) -> int | None:
    """The repeat count of the innermost kohya folder of a group, if any."""
    for name in reversed(parts):
        kohya = kohya_folder(name)
        if kohya:
            return kohya[0]
    return None


def version_of(asset: dict, status: str | None) -> dict | None:
    """The version curation looks at: the last one with ``status`` (the dataset rule), or the last one
    when ``status`` is None."""
    if status is not None:
        return pick_version(asset, status)
    versions = asset.get("versions") or []
    return versions[-1] if versions else None


def caption_tag_list(variant_tags: Sequence[str], spec: dict | None, caption: str, no_spec_tags: bool) -> list[str]:
    """The tags a dataset caption of strategy ``caption`` is made of (see ``datasets.build_caption``;
    the title of ``tags+spec+title`` is not a tag).

    >>> caption_tag_list(["a"], {"tags": ["b", "a"]}, "tags+spec", no_spec_tags=False)
    ['a', 'b']
    """
    use_spec = caption != "tags" and not no_spec_tags
    return dedupe([*variant_tags, *(spec_tags(spec) if use_spec else [])])


@dataclass(frozen=True)
class ImageFacts:
    """What import learns from an image's bytes."""

    sha256: str
    dhash: str
    width: int
    height: int
    format: str
    mode: str
    has_alpha: bool


def inspect_image(data: bytes) -> ImageFacts:
    """Hash and fully decode one image file's bytes; raise :class:`BadImage` if it is not a whole image."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # someone loosened Pillow globally; a truncated file must still fail
        raise BadImage("Pillow is set to load truncated images (ImageFile.LOAD_TRUNCATED_IMAGES); cannot check")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # checks chunk CRCs for PNG, cheaply, before decoding
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            facts = ImageFacts(
                sha256=hashlib.sha256(data).hexdigest(), dhash=hash_hex(dhash(image)),
                width=image.width, height=image.height, format=image.format or "", mode=image.mode,
                has_alpha=has_alpha(image),
            )
    except UnidentifiedImageError:
        raise BadImage("not an image (Pillow cannot identify it)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"refused: {exc}") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... for broken files
        reason = str(exc) or type(exc).__name__
        raise BadImage(("truncated image: " if "truncat" in reason.lower() else "unreadable image: ") + reason) from None
    return facts


def build_spec_record(*, spec_id: str, project: str, title: str, asset_type: str, style: str, scenario: str,
                      tags: Sequence[str], group: str, repeats: int | None, checkpoint: str | None,
                      created_at: str) -> dict:
    """A spec for one imported group. ``import.folder`` is how a later import finds it again."""
    spec = {
        "id": spec_id, "projectId": project, "createdAt": created_at, "updatedAt": created_at,
        "title": title, "assetType": asset_type, "style": style, "scenario": scenario,
        "prompt": {"positive": "", "negative": ""}, "tags": list(tags),
        "import": {"folder": group, **({"kohyaRepeats": repeats} if repeats is not None else {})},
    }
    if checkpoint:
        spec["checkpointId"] = checkpoint
    return spec


def build_asset_record(*, asset_id: str, project: str, spec_id: str, path: str, facts: ImageFacts,
                       tags: Sequence[str], status: str, provenance: dict, created_at: str) -> dict:
    """One imported image: one version with one (primary, selected) variant."""
    version_id, variant_id = new_ulid(), new_ulid()
    variant: dict[str, object] = {"id": variant_id, "originalPath": path}
    if facts.has_alpha:
        variant["alphaPath"] = path  # the file itself carries the alpha channel
    variant |= {
        "tags": list(tags), "status": "selected",
        "processing": {"sha256": facts.sha256, "dhash64": facts.dhash, "width": facts.width,
                       "height": facts.height, "format": facts.format, "mode": facts.mode},
    }
    return {
        "id": asset_id, "projectId": project, "specId": spec_id, "createdAt": created_at, "updatedAt": created_at,
        "versions": [{"id": version_id, "createdAt": created_at, "status": status,
                      "generation": {"method": "import"}, "primaryVariantId": variant_id, "variants": [variant]}],
        "provenance": provenance,
    }


# ---- scanning a folder ------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceImage:
    """An image file found by the scan, with its group and the caption files beside it."""

    path: Path
    parts: tuple[str, ...]  # the import folder's name, then the sub-folders down to the image's folder
    captions: tuple[Path, ...]

    @property
    def group(self) -> str:
        return "/".join(self.parts)

    @property
    def shown(self) -> str:
        return f"{self.group}/{self.path.name}"


def scan_folder(folder: Path, recursive: bool) -> tuple[list[SourceImage], list[tuple[str, str]], list[str]]:
    """Images under ``folder`` in a stable order, the files skipped (with why), and sub-folders not
    entered (without ``recursive``). Hidden files and folders (leading ``.``) are ignored."""
    root_name = folder.name or "import"
    images: list[SourceImage] = []
    skipped: list[tuple[str, str]] = []
    not_entered: list[str] = []
    for current, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        here = Path(current)
        rel = here.relative_to(folder).parts
        parts = (root_name, *rel)
        if not recursive:
            not_entered += ["/".join((*parts, d)) for d in dirs]
            dirs[:] = []
        names = sorted(f for f in files if not f.startswith("."))
        image_stems = {Path(n).stem for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES}
        captions: dict[str, list[Path]] = defaultdict(list)
        for name in names:
            suffix = Path(name).suffix.lower()
            shown = "/".join((*parts, name))
            if suffix in CAPTION_SUFFIXES:
                captions[Path(name).stem].append(here / name)
                if Path(name).stem not in image_stems:
                    skipped.append((shown, "caption file without an image beside it"))
            elif suffix not in IMAGE_SUFFIXES:
                skipped.append((shown, f"not an image (suffix {suffix or 'none'!r})"))
        images += [SourceImage(path=here / name, parts=parts, captions=tuple(captions[Path(name).stem]))
                   for name in names if Path(name).suffix.lower() in IMAGE_SUFFIXES]
    return images, skipped, not_entered


# ---- import -----------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    """What :func:`import_assets` did (or, with ``dry_run``, would do)."""

    project: str
    dry_run: bool = False
    project_created: bool = False
    specs_created: list[str] = field(default_factory=list)
    imported: list[dict] = field(default_factory=list)    # {path, asset_id, spec_id, file}
    duplicates: list[dict] = field(default_factory=list)  # {path, asset_id}: already in the project
    skipped: list[dict] = field(default_factory=list)     # {path, reason}
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        would = "would import" if self.dry_run else "imported"
        text = (f"{would} {len(self.imported)} image(s) into project {self.project!r}"
                f" ({len(self.specs_created)} new spec(s)); {len(self.duplicates)} already there (same sha256);"
                f" {len(self.skipped)} skipped")
        if not self.imported and self.duplicates and not self.dry_run:
            text += "; nothing new to import"
        return text

    def to_frame(self) -> pd.DataFrame:
        """One row per file seen: ``path, outcome (imported|duplicate|skipped), asset_id, detail``."""
        import pandas as pd

        rows = [{"path": r["path"], "outcome": "imported", "asset_id": r["asset_id"], "detail": r["file"]}
                for r in self.imported]
        rows += [{"path": r["path"], "outcome": "duplicate", "asset_id": r["asset_id"], "detail": "same sha256"}
                 for r in self.duplicates]
        rows += [{"path": r["path"], "outcome": "skipped", "asset_id": "", "detail": r["reason"]}
                 for r in self.skipped]
        return pd.DataFrame(rows, columns=["path", "outcome", "asset_id", "detail"])


def import_assets(
    ws: Workspace | str | Path | None,
    project: str,
    folder: str | Path,
    *,
    asset_type: str | None = None,
    status: str = "draft",
    tags: Sequence[str] = (),
    checkpoint: str | None = None,
    source: str | None = None,
    author: str | None = None,
    license: str | None = None,
    url: str | None = None,
    notes: str | None = None,
    recursive: bool = False,
    folder_tags: bool = False,
    in_place: bool = False,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import the images in ``folder`` as assets of ``project`` (created with defaults if missing).

    ``asset_type`` defaults to the project's ``defaults.assetType``, else ``"sprite"``. ``status`` is the
    status of each new version. ``tags`` go on every variant, besides the caption-file tags. Provenance
    (``source, author, license, url, notes``, and ``importedFrom``) is written on every asset. Images
    already in the project (same sha256) are reported in ``duplicates`` and not imported again; files
    that are not whole images are reported in ``skipped``. ``progress(done, total)`` is called per image.

    >>> report = import_assets("data", "demo", "art/", asset_type="character", recursive=True,
    ...                        tags=["pixel art"], license="CC-BY-4.0")   # doctest: +SKIP
    >>> print(report.summary())                                          # doctest: +SKIP
    """
    ws = as_workspace(ws)
    store = ws.store
    folder = _checked_import_request(store, project, folder, asset_type=asset_type, status=status, tags=tags,
                                     checkpoint=checkpoint, in_place=in_place)
    report = ImportReport(project=project, dry_run=dry_run)

    # One import of a project at a time, from its first look at the known images to its last record:
    # two at once would each see the other's images as new and import them twice.
    with import_lock(store, project, dry_run):
        project_record = _read_optional(store, "project", project)
        defaults = (project_record or {}).get("defaults") or {}
        asset_type = asset_type or defaults.get("assetType") or DEFAULT_ASSET_TYPE
        _warn_about_references(store, project, asset_type, checkpoint, project_record is not None, report)
        images, skipped, not_entered = scan_folder(folder, recursive)
        report.skipped += [{"path": p, "reason": r} for p, r in skipped]
        if not_entered:
            report.warnings.append(f"{len(not_entered)} sub-folder(s) not entered (use --recursive): "
                                   + ", ".join(not_entered[:5]) + (" ..." if len(not_entered) > 5 else ""))
        known = _known_images(ws, project) if project_record is not None and images else {}
        specs = _imported_specs(ws, project) if project_record is not None and images else {}
        if project_record is None and not dry_run and images:
            now = now_iso()
            store.write("project", {
                "id": project, "name": project, "createdAt": now, "updatedAt": now, "defaults": {},
                "policies": {"loraSelection": dict(DEFAULT_LORA_SELECTION)},
            }, create=True)
            report.project_created = True
        request = _ImportRequest(
            project=project, asset_type=asset_type, checkpoint=checkpoint, tags=tuple(tags), folder_tags=folder_tags,
            status=status, defaults=defaults, dry_run=dry_run,
            provenance={k: v for k, v in zip(PROVENANCE_KEYS, (source, author, license, url, notes), strict=True) if v})
        _import_images(_Importer(store, project, in_place=in_place), images, request, known, specs, report, progress)
    return report


def _checked_import_request(store: Store, project: str, folder: str | Path, *, asset_type: str | None, status: str,
                            tags: Sequence[str], checkpoint: str | None, in_place: bool) -> Path:
    """Refuse a request that cannot be carried out, before anything is read; returns the folder, resolved."""
    check_id(project, "project id")
    if checkpoint is not None:
        check_id(checkpoint, "checkpoint id")
    _check_status(status, allow_any=False)
    _check_tags(tags, "tag")
    if asset_type is not None and (not isinstance(asset_type, str) or not asset_type.strip()):
        raise AssetError(f"asset type must be a non-empty string, got {asset_type!r}")
    resolved = Path(folder).expanduser().resolve()
    if not resolved.is_dir():
        raise AssetError(f"{resolved} is not a folder")
    if in_place and store.root not in resolved.parents:
        raise AssetError(f"--in-place needs the images inside the data root {store.root}, and {resolved} is not: "
                         "records hold paths relative to the data root, so other machines find the files too. Move "
                         "the folder under the data root (e.g. files/<project>/) or import without --in-place (copies)")
    return resolved


@dataclass(frozen=True)
class _ImportRequest:
    """What every image of one import gets: its asset type, status, tags and provenance."""

    project: str
    asset_type: str
    checkpoint: str | None
    tags: tuple[str, ...]
    folder_tags: bool
    status: str
    defaults: dict
    dry_run: bool
    provenance: dict


def _import_images(importer: _Importer, images: list[SourceImage], request: _ImportRequest, known: dict[str, str],
                   specs: dict, report: ImportReport, progress: Callable[[int, int], None] | None) -> None:
    """Read, check and de-duplicate each image here, in order, and commit the new ones on a few threads: most of
    an item's time is spent waiting for fsync and file creation, which overlap well."""
    pool = ThreadPoolExecutor(max_workers=IMPORT_THREADS, thread_name_prefix="lorakit-import")
    pending: deque[Future] = deque()
    try:
        for done, image in enumerate(images, 1):
            if progress:
                progress(done - 1, len(images))
            item = _new_item(importer, image, request, known, specs, report)
            if item is None:
                continue
            pending.append(pool.submit(importer.commit, *item))
            while pending and (len(pending) > IMPORT_WINDOW or pending[0].done()):
                report.imported.append(pending.popleft().result())
        while pending:
            report.imported.append(pending.popleft().result())
    except BaseException:
        # Interrupted, or an item failed: items already running finish whole (or roll themselves back),
        # the rest are dropped, and so are the specs made for groups none of whose images got in.
        pool.shutdown(wait=True, cancel_futures=True)
        importer.drop_unused_specs()
        raise
    finally:
        pool.shutdown(wait=True)
    if progress:
        progress(len(images), len(images))


def _new_item(importer: _Importer, image: SourceImage, request: _ImportRequest, known: dict[str, str], specs: dict,
              report: ImportReport) -> tuple | None:
    """The arguments of ``importer.commit`` for a new image, or None when it is skipped, a duplicate, or (in a
    dry run) only reported."""
    try:
        data = read_regular(image.path, "image", max_bytes=MAX_IMAGE_BYTES)
    except OSError as exc:
        report.skipped.append({"path": image.shown, "reason": f"cannot be read: {exc.strerror or exc}"})
        return None
    except RecordError as exc:  # a FIFO, a device or a socket under an image's name
        report.skipped.append({"path": image.shown, "reason": str(exc)})
        return None
    try:
        facts = inspect_image(data)
    except BadImage as exc:
        report.skipped.append({"path": image.shown, "reason": str(exc)})
        return None
    if facts.sha256 in known:
        report.duplicates.append({"path": image.shown, "asset_id": known[facts.sha256]})
        return None
    variant_tags = dedupe([*request.tags, *_caption_file_tags(image, report)])
    folder_tag_list = group_tags(image.parts, request.folder_tags)
    key = (image.group, request.asset_type, request.checkpoint or "")
    spec_id = specs.get(key)
    if request.dry_run:
        if spec_id is None:
            spec_id = specs[key] = f"(new spec {group_title(image.parts)!r})"
            report.specs_created.append(spec_id)
        known[facts.sha256] = "(new)"
        report.imported.append({"path": image.shown, "asset_id": "(new)", "spec_id": spec_id, "file": ""})
        return None
    if spec_id is None:
        defaults = request.defaults
        spec_id = specs[key] = importer.create_spec(build_spec_record(
            spec_id=new_ulid(), project=request.project, title=group_title(image.parts),
            asset_type=request.asset_type, style=str(defaults.get("style") or ""),
            scenario=str(defaults.get("scenario") or ""), tags=folder_tag_list, group=image.group,
            repeats=kohya_repeats(image.parts), checkpoint=request.checkpoint, created_at=now_iso()))
        report.specs_created.append(spec_id)
    else:
        importer.add_spec_tags(spec_id, folder_tag_list)
    known[facts.sha256] = asset_id = new_ulid()
    return asset_id, image, data, facts, spec_id, variant_tags, request.status, request.provenance


IMPORT_LOCK_TIMEOUT_S = 3600  # a second import waits for the first, which may take many minutes


def import_lock(store: Store, project: str, dry_run: bool):
    """The lock that serializes imports into ``project`` (none for a dry run, which writes nothing)."""
    if dry_run:
        return contextlib.nullcontext()
    state_folder(store.root, "locks")
    return RecordLock(store.root / ".lorakit" / "locks" / f"import-{project}.lock", f"importing into project {project!r}",
                      IMPORT_LOCK_TIMEOUT_S, store.fs)


class _Importer:
    """Writes the specs (main thread) and the items (worker threads) of one import, and undoes what an
    unfinished import must not leave behind."""

    def __init__(self, store: Store, project: str, in_place: bool):
        self.store, self.project, self.in_place = store, project, in_place
        self.files_root = store.root / "files" / project
        self.created_specs: list[str] = []
        self.used_specs: set[str] = set()
        self.tagged_specs: set[str] = set()

    def create_spec(self, spec: dict) -> str:
        self.created_specs.append(spec["id"])  # noted first: an interrupt may land during the write
        self.store.write("spec", spec, self.project, create=True)
        return spec["id"]

    def add_spec_tags(self, spec_id: str, folder_tags: list[str]) -> None:
        """An earlier import made this spec, perhaps without ``folder_tags``: add the ones asked for now."""
        if not folder_tags or spec_id in self.tagged_specs:
            return
        self.tagged_specs.add(spec_id)
        current = _read_optional(self.store, "spec", spec_id, self.project) or {}
        if missing_tags(current.get("tags") or [], folder_tags):
            self.store.update("spec", spec_id, lambda s: {**s, "tags": dedupe([*(s.get("tags") or []), *folder_tags])},
                              self.project)

    def drop_unused_specs(self) -> None:
        for spec_id in self.created_specs:
            if spec_id not in self.used_specs:
                self.store.delete("spec", spec_id, self.project)

    def commit(self, asset_id: str, image: SourceImage, data: bytes, facts: ImageFacts, spec_id: str,
               variant_tags: list[str], status: str, provenance: dict) -> dict:
        """Import one image: its file, then its asset record. Returns the report entry. On any exception
        the file is removed again, unless the record got written (then the item is whole)."""
        store, project = self.store, self.project
        final = None
        try:
            if self.in_place:
                path = _record_path(store, image.path)
            else:
                # Through the data root's directory handle: a project folder that is (or becomes) a link to
                # somewhere else is refused, never copied into.
                final = store.fs.create_free(self.files_root / image.group, image.path.name, data)
                path = store.relative(final)
            record = build_asset_record(
                asset_id=asset_id, project=project, spec_id=spec_id, path=path, facts=facts, tags=variant_tags,
                status=status, provenance={**provenance, "importedFrom": image.shown}, created_at=now_iso())
            store.write("asset", record, project, create=True)
            self.used_specs.add(spec_id)
        except BaseException:
            if final is not None and not store.exists("asset", asset_id, project):
                store.fs.remove(final)
            raise
        return {"path": image.shown, "asset_id": asset_id, "spec_id": spec_id, "file": path}


def _record_path(store: Store, path: Path) -> str:
    """How a record refers to a file used in place: relative to the data root (the import checked it is inside;
    a symlink leading out is refused here)."""
    resolved = path.resolve()
    if store.root not in resolved.parents:
        raise AssetError(f"{path} leads out of the data root {store.root} (a symbolic link?); copy the file instead")
    return store.relative(resolved)


def _caption_file_tags(image: SourceImage, report: ImportReport) -> list[str]:
    tags: list[str] = []
    for caption in image.captions:
        try:
            tags += parse_caption(caption.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as exc:
            report.warnings.append(f"{image.group}/{caption.name}: caption not read ({exc}); image imported without it")
    return tags


def _read_optional(store: Store, kind: str, record_id: str, project: str | None = None) -> dict | None:
    try:
        return store.read(kind, record_id, project, validate=False)
    except RecordNotFoundError:
        return None


def _known_images(ws: Workspace, project: str) -> dict[str, str]:
    """sha256 -> asset id for every image the project already has, read once per run. Variants that
    came from elsewhere have no stored sha256, so their files are hashed here."""
    known: dict[str, str] = {}
    for asset in iter_assets(ws, project):
        for version in asset["versions"]:
            for variant in version["variants"]:
                sha = (variant.get("processing") or {}).get("sha256") or _file_sha256(ws.store, variant["originalPath"])
                if sha:
                    known.setdefault(sha, asset["id"])
    return known


def _file_sha256(store: Store, rel: str) -> str | None:
    try:
        return file_sha256(store.file_path(rel))
    except (OSError, LorakitError):
        return None


def _imported_specs(ws: Workspace, project: str) -> dict[tuple[str, str, str], str]:
    """(group folder, asset type, checkpoint) -> spec id, for specs earlier imports made."""
    specs: dict[tuple[str, str, str], str] = {}
    for spec_id, spec in load_specs(ws, project).items():
        folder = (spec.get("import") or {}).get("folder") if isinstance(spec.get("import"), dict) else None
        if folder:
            specs.setdefault((folder, spec["assetType"], spec.get("checkpointId", "")), spec_id)
    return specs


def _warn_about_references(store: Store, project: str, asset_type: str, checkpoint: str | None,
                           project_exists: bool, report: ImportReport) -> None:
    if checkpoint and not store.exists("checkpoint", checkpoint):
        report.warnings.append(f"checkpoint {checkpoint!r} is not registered (no shared/checkpoints/{checkpoint}.json)")
    if project_exists:
        catalog = store.catalog_path("asset-types", project)
        if catalog.exists():
            try:
                known = {t.get("id") for t in store.read_path(catalog, "catalog:asset-types").get("assetTypes", [])}
            except LorakitError as exc:
                report.warnings.append(str(exc))
                return
            if asset_type not in known:
                report.warnings.append(f"asset type {asset_type!r} is not in {catalog.name} of project {project!r}")


# ---- curation ---------------------------------------------------------------------------------------
def _chosen_images(ws: Workspace, project: str, status: str | None) -> Iterable[tuple[dict, dict, dict]]:
    """``(asset, version, variant)`` per asset: the picked variant of the version ``status`` selects;
    assets without one are passed over."""
    for asset in iter_assets(ws, project):
        version = version_of(asset, status)
        if not version:
            continue
        variant = pick_variant(version)
        if variant:
            yield asset, version, variant


def _check_tags(tags: Sequence[str], what: str) -> None:
    # A bad tag would otherwise surface as a schema error half-way through a bulk change.
    if isinstance(tags, str) or any(not isinstance(t, str) or not t.strip() for t in tags):
        raise AssetError(f"each {what} must be a non-empty string (give a list of tags), got {tags!r}")


def _check_status(status: str | None, allow_any: bool) -> None:
    if status not in VERSION_STATUSES and not (allow_any and status is None):
        raise AssetError(f"unknown status {status!r} (expected one of {', '.join(VERSION_STATUSES)})")


def tag_frequencies(
    ws: Workspace | str | Path | None,
    project: str,
    *,
    status: str | None = "approved",
    caption: str = "tags",
    no_spec_tags: bool = False,
    exclude_tags: Sequence[str] = (),
) -> pd.DataFrame:
    """How often each tag is used, and whether it would end up in the captions of a dataset.

    One image per asset, chosen as ``lorakit dataset build`` does: the last version with ``status``
    (None: the last version), then its primary, selected or first variant. ``caption``, ``no_spec_tags``
    and ``exclude_tags`` mean what they mean to a dataset build: an asset with an excluded tag (on its
    variant or spec) is left out, so its tags reach no caption. Columns: ``tag``, ``count`` (assets with
    the tag on the variant or the spec), ``in_variant``, ``in_spec``, ``captions`` (captions that would
    contain it), ``caption`` (``captions > 0``) and ``excluded`` (it matches an exclude glob). Sorted by
    count, then tag. ``frame.attrs["problems"]`` names assets whose spec is missing.

    >>> tag_frequencies("data", "demo", caption="tags+spec", exclude_tags=["issue:*"]).head()  # doctest: +SKIP
    """
    ws = as_workspace(ws)
    _check_status(status, allow_any=True)
    if caption not in CAPTION_STRATEGIES:
        raise AssetError(f"unknown caption strategy {caption!r} (expected one of {', '.join(CAPTION_STRATEGIES)})")
    exclude = compile_globs(list(exclude_tags))
    specs = load_specs(ws, project)
    problems: list[str] = []
    counts: dict[str, Counter] = defaultdict(Counter)
    for asset, _version, variant in _chosen_images(ws, project, status):
        spec = specs.get(asset["specId"])
        if spec is None:
            problems.append(f"asset {asset['id']}: spec {asset['specId']!r} is missing (no spec tags)")
        # Counted by tag_key: two spellings of one tag are one row.
        on_variant = [tag_key(t) for t in dedupe(variant.get("tags") or [])]
        on_spec = [tag_key(t) for t in dedupe(spec_tags(spec))]
        for tag in dedupe([*on_variant, *on_spec]):
            counts[tag]["count"] += 1
        for tag in on_variant:
            counts[tag]["in_variant"] += 1
        for tag in on_spec:
            counts[tag]["in_spec"] += 1
        if not excluded_tags([*on_variant, *on_spec], exclude):
            for tag in caption_tag_list(on_variant, spec, caption, no_spec_tags):
                counts[tag_key(tag)]["captions"] += 1
    import pandas as pd

    columns = ["tag", "count", "in_variant", "in_spec", "captions"]
    frame = pd.DataFrame([[tag, *(c[k] for k in columns[1:])] for tag, c in counts.items()], columns=columns)
    frame["caption"] = frame["captions"] > 0
    frame["excluded"] = [bool(excluded_tags([tag], exclude)) for tag in frame["tag"]]
    frame = frame.sort_values(["count", "tag"], ascending=[False, True], ignore_index=True)
    frame.attrs["problems"] = problems
    return frame


def find_duplicates(
    ws: Workspace | str | Path | None,
    project: str,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    status: str | None = None,
) -> pd.DataFrame:
    """Pairs of assets whose images are the same file (``kind="exact"``, equal sha256) or look alike
    (``kind="near"``, perceptual hashes at most ``threshold`` of 64 bits apart).

    One image per asset, picked like :func:`tag_frequencies` (``status`` None: the last version).
    Hashes recorded at import are used; other images are read and hashed. Exact duplicates are listed
    against the first asset (by id) that has the image; near pairs are all pairs within the threshold,
    compared in vectorised blocks (n² / 2 comparisons; about a second for 20,000 images). ``group``
    numbers connected sets of duplicates, so keeping one asset per group removes them all.
    Columns: ``group, kind, distance, asset_a, asset_b, path_a, path_b``.
    """
    ws = as_workspace(ws)
    store = ws.store
    _check_status(status, allow_any=True)
    if threshold < 0 or threshold > 64:
        raise AssetError(f"threshold must be between 0 and 64 bits, got {threshold}")
    problems: list[str] = []
    entries: list[tuple[str, str, str, int]] = []  # asset id, path, sha256, dhash
    for asset, _version, variant in _chosen_images(ws, project, status):
        processing = variant.get("processing") or {}
        sha, perceptual = processing.get("sha256"), processing.get("dhash64")
        if not (sha and perceptual):
            try:
                facts = inspect_image(read_regular(store.file_path(variant.get("originalPath", "")), "image",
                                                   max_bytes=MAX_IMAGE_BYTES))
            except (OSError, BadImage, LorakitError) as exc:
                problems.append(f"asset {asset.get('id')}: {variant.get('originalPath')}: {exc}")
                continue
            sha, perceptual = facts.sha256, facts.dhash
        entries.append((asset["id"], variant["originalPath"], sha, int(perceptual, 16)))

    rows = []
    first_with: dict[str, int] = {}
    for i, (_asset, _path, sha, _h) in enumerate(entries):
        if sha in first_with:
            rows.append(("exact", 0, first_with[sha], i))
        else:
            first_with[sha] = i
    for i, j, distance in near_pairs([e[3] for e in entries], threshold):
        if entries[i][2] != entries[j][2]:
            rows.append(("near", distance, i, j))

    groups = _connected_groups(len(entries), [(i, j) for _, _, i, j in rows])
    import pandas as pd

    frame = pd.DataFrame(
        [(groups[i], kind, distance, entries[i][0], entries[j][0], entries[i][1], entries[j][1])
         for kind, distance, i, j in rows],
        columns=["group", "kind", "distance", "asset_a", "asset_b", "path_a", "path_b"],
    )
    frame = frame.sort_values(["group", "distance", "asset_a", "asset_b"], ignore_index=True)
    frame.attrs["problems"] = problems
    return frame


def _connected_groups(n: int, pairs: Sequence[tuple[int, int]]) -> dict[int, int]:
    """Group number (1, 2, ... in order of first appearance) of every item that is in a pair."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    numbers: dict[int, int] = {}
    result = {}
    for i in sorted({k for pair in pairs for k in pair}):
        result[i] = numbers.setdefault(root(i), len(numbers) + 1)
    return result


def _target_version(asset: dict, version_id: str | None) -> dict | None:
    """The version a bulk edit changes: version ``version_id``, or the last one."""
    if version_id is None:
        return version_of(asset, None)
    return next((v for v in asset.get("versions") or [] if v.get("id") == version_id), None)


def _check_targets(store: Store, project: str, asset_ids: Sequence[str], version_id: str | None,
                   need_variant: bool) -> list[str]:
    """Check every asset (and version) exists before anything changes; raise one error naming all misses."""
    ids = dedupe(asset_ids)
    if not ids:
        raise AssetError("no asset ids given")
    require_project(store, project)
    missing = []
    for asset_id in ids:
        check_id(asset_id, "asset id")
        asset = _read_optional(store, "asset", asset_id, project)
        version = _target_version(asset, version_id) if asset else None
        if asset is None:
            missing.append(f"asset {asset_id!r} not found")
        elif version is None:
            missing.append(f"asset {asset_id!r} has no version {version_id!r}" if version_id
                           else f"asset {asset_id!r} has no versions")
        elif need_variant and pick_variant(version) is None:
            missing.append(f"asset {asset_id!r} version {version['id']!r} has no variants")
    if missing:
        raise AssetError(f"nothing changed in project {project!r}: " + "; ".join(missing))
    return ids


def set_asset_status(
    ws: Workspace | str | Path | None,
    project: str,
    asset_ids: Sequence[str],
    status: str,
    *,
    version: str | None = None,
) -> pd.DataFrame:
    """Set the status of each asset's last version (or of version ``version``).

    Every id is checked before anything is written; then each asset is one locked, validated, atomic
    update. Returns ``asset_id, version_id, old_status, status`` per asset.

    >>> set_asset_status("data", "demo", ["01J...", "01K..."], "approved")   # doctest: +SKIP
    """
    ws = as_workspace(ws)
    _check_status(status, allow_any=False)
    rows = []
    for asset_id in _check_targets(ws.store, project, asset_ids, version, need_variant=False):
        seen: dict = {}

        def change(asset: dict, seen: dict = seen) -> dict:
            target = _target_version(asset, version)
            if target is None:
                raise AssetError(f"asset {asset['id']!r}: version {version!r} disappeared")
            seen.update(version_id=target["id"], old_status=target.get("status"))
            target["status"] = status
            return asset

        ws.store.update("asset", asset_id, change, project)
        rows.append({"asset_id": asset_id, **seen, "status": status})
    import pandas as pd

    return pd.DataFrame(rows, columns=["asset_id", "version_id", "old_status", "status"])


def tag_assets(
    ws: Workspace | str | Path | None,
    project: str,
    asset_ids: Sequence[str],
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    version: str | None = None,
) -> pd.DataFrame:
    """Add and remove variant tags on many assets: the primary, selected or first variant of each
    asset's last version (or of version ``version``), the variant a dataset would use.

    Tags are added at the end in the order given (existing ones kept in place), then ``remove`` is
    applied, so a tag both added and removed ends up absent. Spec tags are not touched. Every id is
    checked first; each asset is one locked, validated, atomic update. Returns
    ``asset_id, version_id, variant_id, old_tags, tags`` per asset.

    >>> tag_assets("data", "demo", ["01J..."], add=["pose:front"], remove=["issue:blurry"])  # doctest: +SKIP
    """
    ws = as_workspace(ws)
    _check_tags(add, "tag to add")
    _check_tags(remove, "tag to remove")
    add, removed = dedupe(add), {tag_key(t) for t in remove}
    if not add and not removed:
        raise AssetError("give tags to add or remove")
    rows = []
    for asset_id in _check_targets(ws.store, project, asset_ids, version, need_variant=True):
        seen: dict = {}

        def change(asset: dict, seen: dict = seen) -> dict:
            target = _target_version(asset, version)
            variant = pick_variant(target) if target else None
            if target is None or variant is None:
                raise AssetError(f"asset {asset['id']!r}: its version or variant disappeared")
            old = list(variant.get("tags") or [])
            variant["tags"] = [t for t in dedupe([*old, *add]) if tag_key(t) not in removed]
            seen.update(version_id=target["id"], variant_id=variant["id"], old_tags=old, tags=variant["tags"])
            return asset

        ws.store.update("asset", asset_id, change, project)
        rows.append({"asset_id": asset_id, **seen})
    import pandas as pd

    return pd.DataFrame(rows, columns=["asset_id", "version_id", "variant_id", "old_tags", "tags"])
