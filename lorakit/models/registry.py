"""The checkpoint registry: checkpoint records in ``data/shared/checkpoints/`` and the tiny default checkpoint.

A checkpoint record says where a base model's weights are (a weights reference, usually ``config_relative``
to ``checkpointsRoot`` so shared JSON never holds one machine's paths) and which model family it is, which
is what the trainer and the eval-grid worker need to load it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TypedDict

from filelock import FileLock

from .. import families
from ..config import ROOT_NAMES, resolve_weights
from ..errors import ConfigError, RecordError, RecordNotFoundError
from ..families import NAMES as FAMILIES
from ..families import PREDICTIONS, Family, Objective
from ..families import get as get_family
from ..hashing import (
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    WEIGHT_SUFFIXES,
    check_safetensors,
    safetensors_header,
    weight_files,
    weights_sha256,
)
from ..ids import check_id
from ..roots import check_regular, read_regular
from ..store import now_iso
from ..workspace import Workspace, as_workspace
from .tiny import TINY_RESOLUTION, save_tiny_pipeline

# Written last into a tiny checkpoint folder: its presence means "complete", its content says what was built.
TINY_MARKER = "lorakit-tiny.json"
TINY_FORMAT = 1
DEFAULT_TINY_PARAMS = {"width": TINY_RESOLUTION, "height": TINY_RESOLUTION, "steps": 4, "cfg": 5.0}
SIDECAR_CONFIG_SUFFIX = ".config"
REMOVE = object()  # a field value in register_checkpoint's ``fields`` that deletes the field


# ---- formats and the pickle policy ---------------------------------------------------------------------
def weights_format(path: Path) -> str:
    """``"diffusers"`` (a folder), ``"safetensors"`` or ``"pickle"`` (a single file), from the path alone.

    A folder whose weights are all pickle files (``*.bin``) counts as ``"pickle"``.
    """
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
        if files and not any(p.suffix in SAFE_SUFFIXES for p in files):
            return "pickle"
        return "diffusers"
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        return "safetensors"
    if suffix in PICKLE_SUFFIXES:
        return "pickle"
    raise ConfigError(
        f"{path}: unknown weights format {suffix or '(no suffix)'!r}; expected a diffusers folder, "
        f"a single {'/'.join(SAFE_SUFFIXES)} file, or (with allow_pickle) {'/'.join(PICKLE_SUFFIXES)}"
    )


def check_pickle_allowed(path: Path, allow_pickle: bool, what: str) -> None:
    """Refuse pickle weights unless allowed: unpickling a file can run arbitrary code."""
    if weights_format(path) == "pickle" and not allow_pickle:
        raise ConfigError(
            f"{what}: {path} is a pickle-based file, which can run code when loaded; convert it to "
            ".safetensors, or opt in with --allow-pickle (allow_pickle=True, or allowPickle: true on the record) "
            "if you trust its source"
        )


def detect_family(path: Path) -> Family | None:
    """The family a checkpoint's files say they are, when they say: a diffusers folder by its pipeline class in
    ``model_index.json``, a ``.safetensors`` file by its tensor names (read from the header, nothing loaded).
    None when no family claims them (an SD3 or FLUX folder, a pickle file, an unreadable one)."""
    path = Path(path)
    if path.is_dir():
        try:
            index = json.loads(read_regular(path / "model_index.json", "model_index.json", max_bytes=1 << 20))
        except (OSError, ValueError, RecordError):
            return None
        return families.from_index_class(index.get("_class_name") if isinstance(index, dict) else None)
    header = safetensors_header(path) if path.suffix.lower() in SAFE_SUFFIXES else None
    return families.from_keys(header) if header else None


def check_weights_files(path: Path, family: str | Family | None, what: str) -> None:
    """Refuse weights that are not what they claim: a ``.safetensors`` file (or one in a diffusers folder's
    model folders) whose header does not hold up against the file (see :func:`lorakit.hashing.check_safetensors`),
    or files of another model family than the record says (``family`` None: any)."""
    path = Path(path)
    try:
        files = weight_files(path)
    except ConfigError:  # a folder without weights: the loader names what it lacks
        files = []
    for _, file in files:  # on the open handle: a FIFO or a device is refused, never read
        check_regular(file, f"{what} weights file")
    if path.is_file() and path.suffix.lower() in SAFE_SUFFIXES:
        check_safetensors(path, what)
    elif path.is_dir():
        for member in sorted(path.glob("*/*")):
            if member.suffix.lower() in SAFE_SUFFIXES and member.is_file():
                check_safetensors(member, what)
    if family is None:
        return
    told = families.get(family)
    found = detect_family(path)
    if found is not None and found is not told:
        raise ConfigError(f"{what}: {path} is an {found.label} checkpoint, registered as {told.label}; "
                          f"add it with --family {found.name}")


# ---- hashing -------------------------------------------------------------------------------------------


def detect_objective(path: Path) -> Objective | None:
    """What a checkpoint's own files say its denoiser predicts, when they say: a single ``.safetensors`` file by
    its ``v_pred`` and ``ztsnr`` keys (what ComfyUI reads), a diffusers folder by its scheduler config
    (``prediction_type``, ``rescale_betas_zero_snr``). None when the files say nothing."""
    path = Path(path)
    if path.is_dir():
        try:
            config = json.loads(read_regular(path / "scheduler" / "scheduler_config.json", "scheduler config",
                                             max_bytes=1 << 20))
        except (OSError, ValueError, RecordError):
            return None
        if not isinstance(config, dict) or "prediction_type" not in config:
            return None
        return Objective("v" if config["prediction_type"] == "v_prediction" else "epsilon",
                         config.get("rescale_betas_zero_snr") is True)
    header = safetensors_header(path) if path.suffix.lower() in SAFE_SUFFIXES else None
    # ComfyUI reads ztsnr only beside v_pred (zero terminal SNR needs v: epsilon cannot be predicted from pure
    # noise), so a lone ztsnr key says nothing.
    if header and "v_pred" in header:
        return Objective("v", "ztsnr" in header)
    return None


def objective_label(objective: Objective) -> str:
    """The short form ``checkpoint list`` and ``verify`` show.

    >>> objective_label(Objective("v", zero_terminal_snr=True)), objective_label(Objective())
    ('v+ztsnr', 'epsilon')
    """
    return objective.prediction + ("+ztsnr" if objective.zero_terminal_snr else "")


def told_objective(prediction: str, zero_terminal_snr: bool, what: str) -> Objective:
    """The objective a user asked for, refused when it cannot be trained: an unknown prediction, or zero terminal
    SNR with epsilon (at its last timestep the input is pure noise, so predicting the noise teaches nothing;
    kohya and diffusers use it only with v)."""
    if prediction not in PREDICTIONS:
        raise ConfigError(f"{what}: unknown prediction {prediction!r} (expected one of {', '.join(PREDICTIONS)})")
    if zero_terminal_snr and prediction != "v":
        raise ConfigError(f"{what}: zero terminal SNR needs v-prediction, and this would be trained with {prediction} "
                          "prediction; give --prediction v with --zero-terminal-snr, or leave --zero-terminal-snr out")
    return Objective(prediction, bool(zero_terminal_snr))


def choose_objective(path: Path, prediction: str | None, zero_terminal_snr: bool | None,
                     kept: dict | None, what: str) -> Objective:
    """The objective ``checkpoint add`` records: what it was told (``prediction``, ``zero_terminal_snr``; None:
    not told); else what the ``kept`` record said (the record being updated, when it names the same files:
    what a user told once is not undone by registering the files again); else what the files at ``path`` say
    (:func:`detect_objective`); else epsilon."""
    if kept is not None and ("prediction" in kept or "zeroTerminalSnr" in kept):
        found = Objective(kept.get("prediction", "epsilon"), kept.get("zeroTerminalSnr") is True)
    else:
        found = detect_objective(path) or Objective()
    if prediction is None and zero_terminal_snr is None:
        return found
    if prediction is None:
        prediction = found.prediction
    if zero_terminal_snr is None:
        zero_terminal_snr = found.zero_terminal_snr and prediction == "v"
    return told_objective(prediction, zero_terminal_snr, what)


def checkpoint_objective(ws: Workspace | str | Path | None, record: dict) -> Objective:
    """The objective a checkpoint trains and renders with. The record says it (``prediction``,
    ``zeroTerminalSnr``: set by ``checkpoint add`` from its flags or its files); a record from before those
    fields asks the files, and files that say nothing mean epsilon."""
    family = get_family(checkpoint_family(record))
    if "prediction" in record or "zeroTerminalSnr" in record:
        return family.objective(record.get("prediction", "epsilon"), bool(record.get("zeroTerminalSnr", False)))
    try:
        found = detect_objective(checkpoint_paths(as_workspace(ws), record)["weights"])
    except (ConfigError, RecordError, OSError):
        found = None
    return found or family.objective()


class CheckpointPaths(TypedDict):
    """The local files of a checkpoint record, as :func:`checkpoint_paths` resolves them."""

    weights: Path
    vae: Path | None
    config: Path | None


def checkpoint_paths(ws: Workspace, record: dict, config_dir: str | Path | None = None) -> CheckpointPaths:
    """The local paths of a checkpoint record: ``weights``, ``vae`` (or None) and ``config`` (or None)."""
    what = f"checkpoint {record.get('id')!r}"
    ref = record.get("weights")
    if not isinstance(ref, dict):
        raise ConfigError(f"{what} has no 'weights' reference; register its files with `lorakit checkpoint add`")
    weights = resolve_weights(ref, ws.config, what=what)
    config = Path(config_dir) if config_dir is not None else None
    if config is None and ref.get("config"):
        config = resolve_weights({**ref, "path": ref["config"]}, ws.config, what=f"{what} weights.config")
    vae_ref = record.get("vaeWeights")
    vae = resolve_weights(vae_ref, ws.config, what=f"{what} vaeWeights") if isinstance(vae_ref, dict) else None
    return {"weights": weights, "vae": vae, "config": config}


def checkpoint_family(record: dict) -> str:
    """The model family (``"sd15"`` or ``"sdxl"``) of a checkpoint record.

    >>> checkpoint_family({"id": "a", "family": "sdxl"})
    'sdxl'
    """
    family = record.get("family")
    if family not in FAMILIES:
        what = "has no 'family'" if family is None else f"has unknown family {family!r}"
        raise RecordError(
            f"checkpoint {record.get('id')!r} {what} (expected one of {', '.join(FAMILIES)}); "
            "set it with `lorakit checkpoint add ID --family ...`"
        )
    return family


def check_family(family: str) -> str:
    """Return ``family`` if lorakit can train it, else raise a :class:`ConfigError` listing the families."""
    try:
        return get_family(family).name
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def get_checkpoint(ws: Workspace | str | Path | None, checkpoint_id: str) -> dict:
    """The checkpoint record ``checkpoint_id``; a missing one raises an error that lists the known ids."""
    ws = as_workspace(ws)
    check_id(checkpoint_id, "checkpoint id")
    if not ws.store.exists("checkpoint", checkpoint_id):
        known = ws.store.list_ids("checkpoint")
        listing = ", ".join(known) if known else "none registered yet"
        raise RecordNotFoundError(
            f"checkpoint {checkpoint_id!r} not found under {ws.store.folder('checkpoint')} (known: {listing}); "
            "register one with `lorakit checkpoint add` or `lorakit checkpoint make-tiny`"
        )
    return ws.store.read("checkpoint", checkpoint_id)


def list_checkpoints(ws: Workspace | str | Path | None = None) -> list[dict]:
    """Every checkpoint record, in id order."""
    ws = as_workspace(ws)
    return [record for _, record in ws.store.iter_records("checkpoint")]


def merge_checkpoint_record(current: dict | None, fields: dict, now: str) -> dict:
    """The record after registering ``fields`` over ``current`` (None: a new record).

    Fields not named in ``fields`` (``promptTemplates``, notes, anything lorakit does not know) are kept, and
    so is ``createdAt``. A value of None means "not given, keep"; :data:`REMOVE` deletes the field.

    >>> merge_checkpoint_record({"id": "a", "name": "A", "createdAt": "t0", "updatedAt": "t0",
    ...     "supportedAssetTypes": ["icon"], "promptTemplates": {"basePositive": "x"}},
    ...     {"id": "a", "family": "sd15", "name": None}, "t1")["promptTemplates"]
    {'basePositive': 'x'}
    """
    if current is None:
        record = {"id": fields["id"], "name": fields.get("name") or fields["id"], "createdAt": now, "updatedAt": now,
                  "supportedAssetTypes": []}
    else:
        record = dict(current)
        record["updatedAt"] = now
    for key, value in fields.items():
        if value is REMOVE:
            record.pop(key, None)
        elif value is not None:
            record[key] = value
    return record


def workspace_asset_types(ws: Workspace) -> list[str]:
    """The asset type ids of every project catalog in the workspace, sorted: a new checkpoint's default support."""
    found: set[str] = set()
    for project in ws.store.list_projects():
        path = ws.store.catalog_path("asset-types", project)
        if not path.is_file():
            continue
        try:
            catalog = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # an unreadable catalog is `lorakit validate`'s business, not a reason to fail here
        for entry in catalog.get("assetTypes", []) if isinstance(catalog, dict) else []:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                found.add(entry["id"])
    return sorted(found)


def register_checkpoint(ws: Workspace | str | Path | None, checkpoint_id: str, fields: dict) -> dict:
    """Create or update checkpoint ``checkpoint_id`` with ``fields`` (see :func:`merge_checkpoint_record`).

    The low-level writer behind ``add`` and ``make-tiny``: it checks the id and the schema, not the files.
    """
    ws = as_workspace(ws)
    check_id(checkpoint_id, "checkpoint id")
    fields = {**fields, "id": checkpoint_id}
    store = ws.store
    with store.claim("checkpoint", checkpoint_id) as path:
        current = store.read_path(path, "checkpoint") if path.exists() else None
        record = merge_checkpoint_record(current, fields, now_iso())
        store.write_locked("checkpoint", record, path)
    return record


def weights_reference(ws: Workspace, path: str | Path, base: str = "checkpointsRoot", absolute: bool = False) -> dict:
    """A weights reference for ``path``: ``config_relative`` to ``base`` unless ``absolute`` is asked for.

    A relative ``path`` is taken from the current folder when it exists there, as any command-line tool would,
    else as relative to ``base``. Either way the file must lie under ``base`` (it is stored relative, so shared
    JSON never holds this machine's paths) unless ``absolute=True``.
    """
    if base not in ROOT_NAMES:
        raise ConfigError(f"unknown base {base!r} (expected one of {', '.join(ROOT_NAMES)})")
    root = ws.config.roots[base].resolve()
    given = Path(path).expanduser()
    if not given.is_absolute() and (Path.cwd() / given).exists():
        given = Path.cwd() / given
    if absolute:
        return {"kind": "absolute", "path": given.resolve().as_posix()}
    if given.is_absolute():
        resolved = given.resolve()
        if resolved != root and root not in resolved.parents:
            raise ConfigError(
                f"{given} is not under {base} ({root}); move it there, register it relative to another base "
                "(--base), or store a machine-specific absolute path (--absolute)"
            )
        rel = resolved.relative_to(root).as_posix()
    else:
        if ".." in given.parts:
            raise ConfigError(f"weights path {str(path)!r} must stay under {base} (no '..')")
        rel = given.as_posix()
    return {"kind": "config_relative", "base": base, "path": rel}


def add_checkpoint(
    ws: Workspace | str | Path | None,
    checkpoint_id: str,
    family: str | None,
    path: str | Path,
    *,
    base: str = "checkpointsRoot",
    name: str | None = None,
    asset_types: list[str] | None = None,
    vae_path: str | Path | None = None,
    vae_base: str | None = None,
    config_path: str | Path | None = None,
    allow_pickle: bool = False,
    absolute: bool = False,
    prediction: str | None = None,
    zero_terminal_snr: bool | None = None,
) -> dict:
    """Register (or update) a checkpoint whose weights are a diffusers folder or a single file.

    ``family`` None reads it from the files (:func:`detect_family`) and refuses files that do not say.
    ``prediction`` (``epsilon`` or ``v``) and ``zero_terminal_snr`` say what the denoiser was trained to
    predict; None keeps what the record said for the same files, else reads it from the files too (a single
    file's ``v_pred`` / ``ztsnr`` keys, a folder's scheduler config), else epsilon. The record always gets
    ``prediction``, and ``zeroTerminalSnr`` when it is true.

    ``path`` is relative to ``base`` (or absolute under it). ``vae_path`` registers a separate VAE
    (``vaeWeights``, relative to ``vae_base``, default ``base``); ``config_path`` a diffusers config folder
    for a single file (``weights.config``, relative to ``base``). Every file is checked before anything is
    written, so a mistake leaves the record as it was. Pickle files need ``allow_pickle=True``, which is then
    kept on the record (``allowPickle``) so loaders honour it. ``promptTemplates`` and other fields are kept.

    >>> add_checkpoint(None, "sdxl_base", "sdxl", "sd_xl_base_1.0.safetensors")   # doctest: +SKIP
    """
    ws = as_workspace(ws)
    check_id(checkpoint_id, "checkpoint id")
    if family is not None:
        check_family(family)
    what = f"checkpoint {checkpoint_id!r}"
    weights = weights_reference(ws, path, base, absolute)
    local = resolve_weights(weights, ws.config, what=what)
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise ConfigError(f"{what}: {local} is a folder but not a diffusers pipeline (no model_index.json)")
    uses_pickle = weights_format(local) == "pickle"
    check_pickle_allowed(local, allow_pickle, what)
    check_weights_files(local, family, what)
    if family is None:
        found = detect_family(local)
        if found is None:
            raise ConfigError(f"{what}: cannot tell the model family of {local}: give --family "
                              f"{'|'.join(FAMILIES)} (family= in Python)")
        family = found.name
    if config_path is not None:
        if local.is_dir():
            raise ConfigError(f"{what}: a config folder is only needed for a single-file checkpoint")
        config_ref = weights_reference(ws, config_path, base, absolute)
        config_dir = resolve_weights(config_ref, ws.config, what=f"{what} config")
        if not (config_dir / "model_index.json").is_file():
            raise ConfigError(f"{what}: config folder {config_dir} has no model_index.json")
        weights["config"] = config_ref["path"]
    vae = REMOVE
    if vae_path is not None:
        vae = weights_reference(ws, vae_path, vae_base or base, absolute)
        vae_local = resolve_weights(vae, ws.config, what=f"{what} vaeWeights")
        uses_pickle = uses_pickle or weights_format(vae_local) == "pickle"
        check_pickle_allowed(vae_local, allow_pickle, f"{what} vaeWeights")
        check_weights_files(vae_local, None, f"{what} vaeWeights")
    current = ws.store.read("checkpoint", checkpoint_id) if ws.store.exists("checkpoint", checkpoint_id) else None
    same_files = current is not None and _same_reference(current.get("weights"), weights)
    objective = choose_objective(local, prediction, zero_terminal_snr, current if same_files else None, what)
    fields = {
        "family": family, "name": name, "weights": weights, "vaeWeights": vae,
        "prediction": objective.prediction, "zeroTerminalSnr": True if objective.zero_terminal_snr else REMOVE,
        "supportedAssetTypes": list(asset_types) if asset_types is not None else None,
        "allowPickle": True if uses_pickle else REMOVE,
    }
    return register_checkpoint(ws, checkpoint_id, fields)


def _same_reference(old: object, new: dict) -> bool:
    return isinstance(old, dict) and all(old.get(k) == new.get(k) for k in ("kind", "base", "path", "config"))


def record_weights_hash(ws: Workspace, checkpoint_id: str, field: str, ref: dict, sha256: str, hash_of: str) -> dict:
    """Store ``sha256`` on the record's ``field`` reference, unless that reference changed meanwhile."""

    def change(record: dict) -> dict:
        current = record.get(field)
        if not isinstance(current, dict) or any(current.get(k) != ref.get(k) for k in ("kind", "base", "path")):
            return record  # re-registered elsewhere while we hashed: our hash would describe other files
        record[field] = {**current, "sha256": sha256, "hashOf": hash_of}
        return record

    return ws.store.update("checkpoint", checkpoint_id, change)


def checkpoint_weights_hash(ws: Workspace | str | Path | None, checkpoint: str | dict, *, recompute: bool = False,
                            record: bool = True, missing_ok: bool = False) -> str | None:
    """The weights fingerprint of a checkpoint (:func:`lorakit.hashing.weights_sha256`): the recorded one, else
    computed (and, with ``record``, stored on the checkpoint record).

    What the trainer stores next to the checkpoint id and an eval keeps with each image. ``recompute=True``
    hashes the files again (a full SDXL file takes tens of seconds). ``missing_ok`` returns ``None`` for a
    checkpoint whose weights are not on this machine instead of raising.
    """
    ws = as_workspace(ws)
    checkpoint_record = get_checkpoint(ws, checkpoint) if isinstance(checkpoint, str) else checkpoint
    ref = checkpoint_record.get("weights")
    if not isinstance(ref, dict):
        if missing_ok:
            return None
        raise ConfigError(f"checkpoint {checkpoint_record.get('id')!r} has no 'weights' reference")
    if ref.get("sha256") and not recompute:
        return ref["sha256"].lower()
    try:
        local = resolve_weights(ref, ws.config, what=f"checkpoint {checkpoint_record.get('id')!r}")
    except ConfigError:
        if missing_ok:
            return None
        raise
    try:
        sha = weights_sha256(local, ws.data_root / ".lorakit" / "hashes")
    except ConfigError:  # a folder that holds no weight files (yet)
        if missing_ok:
            return None
        raise
    if record and ws.store.exists("checkpoint", checkpoint_record["id"]):
        record_weights_hash(ws, checkpoint_record["id"], "weights", ref, sha, "folder" if local.is_dir() else "file")
    return sha


def tiny_folder_state(folder: Path) -> dict | None:
    """The marker of a complete tiny checkpoint folder, or None when the folder is absent or incomplete."""
    marker = folder / TINY_MARKER
    if not marker.is_file() or not (folder / "model_index.json").is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_tiny_folder(folder: Path, family: str, seed: int, objective: Objective | None = None) -> bool:
    """Make ``folder`` hold the tiny ``family`` pipeline for ``seed`` and ``objective`` (default epsilon); False
    when it already did.

    The pipeline is saved into a temporary sibling and renamed into place, under a lock, so a trainer and a
    worker asking at the same time never see a half-written folder. The marker file is written last; it names
    the objective too, since a v-prediction folder has the same weights but another scheduler config.
    """
    objective = objective or Objective()
    wanted = {"family": family, "seed": seed, "format": TINY_FORMAT, **objective.record()}
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if tiny_folder_state(folder) == wanted:
            return False
        if folder.exists() and not (folder / TINY_MARKER).is_file() and any(folder.iterdir()):
            # Not built by make-tiny (folders are renamed into place complete, marker included): never
            # delete a user's files to make room for random weights.
            raise ConfigError(f"{folder} exists and is not a lorakit tiny checkpoint; choose another id")
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.building."))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint folder is not
            save_tiny_pipeline(family, tmp, seed=seed, prediction=objective.prediction,
                               zero_terminal_snr=objective.zero_terminal_snr)
            (tmp / TINY_MARKER).write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def _objective_words(objective: Objective) -> str:
    return "" if objective == Objective() else f" {objective.describe()}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_tiny_checkpoint(
    ws: Workspace | str | Path | None,
    checkpoint_id: str,
    family: str,
    seed: int = 0,
    asset_types: list[str] | None = None,
    name: str | None = None,
    *,
    prediction: str = "epsilon",
    zero_terminal_snr: bool = False,
) -> dict:
    """Build the tiny random-weight ``family`` pipeline under ``checkpointsRoot/<id>/`` and register it.

    Offline and deterministic: the same family and seed give byte-identical weights files. A folder already
    built with the same family, seed and objective is reused (a marker file, ``lorakit-tiny.json``, records
    them). ``prediction="v"`` (with ``zero_terminal_snr``) builds a v-prediction checkpoint: the same weights,
    a scheduler config that says so, and the record's ``prediction`` / ``zeroTerminalSnr``.
    ``asset_types`` defaults to the record's current list, else the asset types of the workspace's project
    catalogs (empty when there are none yet). The weights hash is recorded on ``weights.sha256``.

    >>> make_tiny_checkpoint(None, "tiny_sd15", "sd15")["weights"]["path"]    # doctest: +SKIP
    'tiny_sd15'
    """
    ws = as_workspace(ws)
    check_id(checkpoint_id, "checkpoint id")
    check_family(family)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    objective = told_objective(prediction, zero_terminal_snr, f"tiny checkpoint {checkpoint_id!r}")
    folder = ws.config.checkpoints_root / checkpoint_id
    build_tiny_folder(folder, family, seed, objective)
    exists = ws.store.exists("checkpoint", checkpoint_id)
    if asset_types is None and not exists:
        asset_types = workspace_asset_types(ws)
    fields = {
        "family": family,
        "name": name or (None if exists else f"Tiny {family}{_objective_words(objective)} (random weights, seed {seed})"),
        "weights": {"kind": "config_relative", "base": "checkpointsRoot", "path": checkpoint_id,
                    "sha256": weights_sha256(folder), "hashOf": "folder"},
        "vaeWeights": REMOVE,
        "allowPickle": REMOVE,
        "prediction": objective.prediction,
        "zeroTerminalSnr": True if objective.zero_terminal_snr else REMOVE,
        "supportedAssetTypes": list(asset_types) if asset_types is not None else None,
        "defaultGenerationParams": None if exists else dict(DEFAULT_TINY_PARAMS),
    }
    return register_checkpoint(ws, checkpoint_id, fields)


def rebuild_tiny_checkpoint(ws: Workspace | str | Path | None, checkpoint_id: str) -> dict:
    """Build a registered tiny checkpoint's weights again (after a fresh clone, say), as its record describes
    it: its family and its objective (a v-prediction tiny checkpoint stays one)."""
    ws = as_workspace(ws)
    record = get_checkpoint(ws, checkpoint_id)
    objective = checkpoint_objective(ws, record)
    return make_tiny_checkpoint(ws, checkpoint_id, checkpoint_family(record), prediction=objective.prediction,
                                zero_terminal_snr=objective.zero_terminal_snr)
