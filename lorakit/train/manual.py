"""Recording a run trained elsewhere: ``lorakit lora train --adapter manual`` (the original tool's default).

Someone trained a LoRA with another tool; this appends a ``candidate`` release to the LoRA that says where
the weights are, which dataset (and manifest hash) and which settings produced them, with
``evaluation: {status: pending}`` -- the same release the native trainer and the kohya adapter record, so the
review gate treats them all alike.

When the weights file is reachable from this machine lorakit hashes it itself (a ``--sha256`` that disagrees
is refused) and reads the rank, alpha and base model from the kohya ``ss_*`` metadata in its header.

The pieces the kohya adapter shares live here too: reading a safetensors header and turning a weights file
into a release. Finding the LoRA, the dataset and the checkpoint is :func:`lorakit.train.inputs.resolve_run_inputs`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..config import ROOT_NAMES, WEIGHT_KINDS, Config, resolve_weights
from ..errors import ConfigError, TrainingError
from ..hashing import check_safetensors, file_sha256, safetensors_header
from ..loras import add_release, make_release
from ..workspace import Workspace, as_workspace
from .inputs import RunInputs, release_dataset_fields, resolve_run_inputs
from .inputs import dataset_reference as _dataset_reference
from .settings import canonical_name

ADAPTER_KIND = "manual"
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# A safetensors header is JSON of a few KB to a few MB; anything far larger is not a safetensors file.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass
class RecordedRun:
    """What a training adapter recorded: the LoRA after the change, the new release and any warnings."""

    lora: dict
    release: dict
    lora_project: str | None
    weights_path: Path | None = None
    warnings: list[str] = field(default_factory=list)


# ---- pure decisions ------------------------------------------------------------------------------------
def weights_reference(kind: str, *, base: str | None = None, path: str | None = None, uri: str | None = None) -> dict:
    """A weights reference from the ``--weights-*`` flags, checked the way the schema and resolver need it.

    >>> weights_reference("config_relative", base="lorasRoot", path="hero/v1.safetensors")
    {'kind': 'config_relative', 'base': 'lorasRoot', 'path': 'hero/v1.safetensors'}
    """
    if kind not in WEIGHT_KINDS:
        raise ConfigError(f"--weights-kind must be one of {', '.join(WEIGHT_KINDS)}, got {kind!r}")
    if base is not None and base not in ROOT_NAMES:
        raise ConfigError(f"--weights-base must be one of {', '.join(ROOT_NAMES)}, got {base!r}")
    if kind == "config_relative":
        if not base or not path:
            raise ConfigError("--weights-kind config_relative needs --weights-base and --weights-path")
    elif kind in ("repo_relative", "absolute") and not path:
        raise ConfigError(f"--weights-kind {kind} needs --weights-path")
    elif kind == "external" and not (uri or path):
        raise ConfigError("--weights-kind external needs --weights-uri (or --weights-path)")
    if path and kind in ("config_relative", "repo_relative"):
        # Records hold POSIX paths that stay under their root, so a shared record means the same on every machine.
        posix = PurePosixPath(path.replace("\\", "/"))
        if posix.is_absolute() or ".." in posix.parts or re.match(r"^[A-Za-z]:", path):
            raise ConfigError(f"--weights-path for kind {kind} must be relative and stay under its root, got {path!r}")
        path = posix.as_posix()
    if kind == "absolute" and path and not Path(path).is_absolute():
        raise ConfigError(f"--weights-kind absolute needs an absolute --weights-path, got {path!r}")
    ref: dict = {"kind": kind}
    if base is not None and kind == "config_relative":
        ref["base"] = base
    if path:
        ref["path"] = path
    if uri:
        ref["uri"] = uri
    return ref


def check_sha256(value: str | None, what: str = "--sha256") -> str | None:
    """A sha256 given by hand, lower-cased; ``None`` stays ``None``."""
    if value is None:
        return None
    if not _SHA256_RE.match(value.strip()):
        raise ConfigError(f"{what} must be 64 hex digits, got {value!r}")
    return value.strip().lower()


def manual_config(config_file: dict | None = None, config: dict | None = None, overrides: dict | None = None) -> dict:
    """The config a manual release records: the config file, then ``--config``, then the flags, later winning.

    Kept as given (no defaults filled in): lorakit did not run the training, so it only records what it was told.
    Flags are stored under the setting's name (``--batch`` as ``batch_size``).

    >>> manual_config({"rank": 8, "optimizer": "prodigy"}, None, {"rank": 16, "lr": None, "batch": 2})
    {'rank': 16, 'optimizer': 'prodigy', 'batch_size': 2}
    """
    merged: dict = {}
    for layer, source in ((config_file, "config file"), (config, "--config")):
        if layer is None:
            continue
        if not isinstance(layer, dict):
            raise TrainingError(f"{source}: a training config must be a JSON object, got {type(layer).__name__}")
        merged.update(layer)
    for flag, value in (overrides or {}).items():
        if value is not None:
            merged[canonical_name(flag)] = value
    return merged


def dataset_reference(manifest: dict) -> dict:
    """The release's pointer to its dataset, in the native trainer's field names (manifest hash computed if missing).

    >>> dataset_reference({"id": "d1", "scope": "project", "projectId": "demo", "manifestHash": "ab", "items": []})
    {'datasetId': 'd1', 'datasetScope': 'project', 'datasetProjectId': 'demo', 'manifestHash': 'ab'}
    """
    return release_dataset_fields(_dataset_reference(manifest, None))


def weights_summary(metadata: dict[str, str]) -> dict:
    """Rank, alpha, network module and base model from kohya ``ss_*`` metadata (keys absent when unknown).

    >>> weights_summary({"ss_network_dim": "16", "ss_network_alpha": "8.0", "ss_base_model_version": "sd_v1",
    ...                  "ss_sd_model_name": "v1-5-pruned.safetensors"})
    {'rank': 16, 'alpha': 8.0, 'baseModel': 'v1-5-pruned.safetensors', 'baseModelVersion': 'sd_v1'}
    """
    summary: dict = {}

    def number(key: str, kind: type) -> int | float | None:
        raw = metadata.get(key)
        if raw in (None, "", "None"):
            return None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return None
        return int(value) if kind is int and value.is_integer() else (value if kind is float else None)

    rank = number("ss_network_dim", int)
    if rank is not None:
        summary["rank"] = rank
    alpha = number("ss_network_alpha", float)
    if alpha is not None:
        summary["alpha"] = alpha
    for key, name in (("ss_network_module", "networkModule"), ("ss_sd_model_name", "baseModel"),
                      ("ss_base_model_version", "baseModelVersion")):
        if metadata.get(key) not in (None, "", "None"):
            summary[name] = metadata[key]
    return summary


def training_block(adapter: dict, inputs: RunInputs, config: dict, *, weights_metadata: dict | None = None) -> dict:
    """The ``training`` object of a release: adapter, dataset reference, the dataset's selection, the config.

    Field names follow the native trainer's releases (``datasetId``, ``manifestHash``, ``config`` ...), so the
    review gate and reports read every release the same way; ``adapter.kind`` says what trained it.
    """
    block = {"adapter": adapter, **release_dataset_fields(inputs.dataset),
             "selection": inputs.manifest.get("selection", {}), "checkpointId": inputs.checkpoint["id"],
             "config": config}
    if weights_metadata:
        block["weightsMetadata"] = weights_metadata
    return block


def release_entry(release_id: str, *, weights: dict, sha256: str | None, training: dict,
                  notes: str | None = None) -> dict:
    """A ``candidate`` release like every trainer writes (:func:`lorakit.loras.make_release`).

    A manual release may have no hash (weights elsewhere, no ``--sha256``): then it has no ``sha256`` keys.
    """
    release = make_release(release_id, weights=weights, sha256=sha256 or "", training=training, notes=notes)
    if not sha256:
        del release["sha256"]
        del release["weights"]["sha256"]
    return release


# ---- I/O -----------------------------------------------------------------------------------------------


def read_safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file, or ``None`` when the file is not one."""
    header = safetensors_header(path)
    if header is None:
        return None
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else None


def reachable_weights(ref: dict, config: Config) -> Path | None:
    """The local file of a weights reference when it exists on this machine, else ``None``. A reference that
    is wrong in itself (a relative path leading out of its root, an unknown base) is an error, not "elsewhere"."""
    if ref["kind"] == "external":
        return None
    path = resolve_weights(ref, config, must_exist=False)
    return path if path.is_file() else None


def inspect_weights(path: Path, given_sha256: str | None) -> tuple[str, dict]:
    """Hash a weights file (refusing a given hash that differs, and any file that is not a safetensors file) and
    summarize its kohya metadata."""
    header = check_safetensors(path, "release weights (a release's weights must be the LoRA's .safetensors file)")
    metadata = header.get("__metadata__") or {}
    actual = file_sha256(path)
    if given_sha256 is not None and given_sha256 != actual:
        raise ConfigError(f"--sha256 {given_sha256} does not match {path} (its sha256 is {actual}); "
                          "check that this is the file you meant, or leave --sha256 out")
    return actual, weights_summary(metadata)


def record_manual_run(
    ws: Workspace | str | Path | None,
    lora_id: str,
    dataset: str | Path,
    *,
    weights_kind: str,
    weights_base: str | None = None,
    weights_path: str | None = None,
    weights_uri: str | None = None,
    sha256: str | None = None,
    project: str | None = None,
    scope: str | None = None,
    release_id: str | None = None,
    set_active: bool = False,
    notes: str | None = None,
    config: dict | str | None = None,
    config_file: str | Path | None = None,
    overrides: dict | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> RecordedRun:
    """Append a ``candidate`` release for weights trained elsewhere (``lorakit lora train --adapter manual``).

    ``dataset`` is a dataset id or a manifest file path; one built for another checkpoint is refused unless
    ``force``. ``overrides`` holds settings given as flags, by setting name (``None`` = not given); they win
    over ``config`` (a dict or JSON text), which wins over ``config_file`` (a JSON file). ``dry_run`` checks
    and hashes everything and returns the release without recording it.

    >>> run = record_manual_run(ws, "hero", "hero_v1", project="demo", weights_kind="config_relative",
    ...                         weights_base="lorasRoot", weights_path="hero/hero_v1.safetensors",
    ...                         overrides={"rank": 16, "steps": 2000})            # doctest: +SKIP
    >>> run.release["training"]["weightsMetadata"]                                # doctest: +SKIP
    {'rank': 16, 'alpha': 8.0, 'baseModel': 'v1-5-pruned.safetensors', 'baseModelVersion': 'sd_v1'}
    """
    ws = as_workspace(ws)
    ref = weights_reference(weights_kind, base=weights_base, path=weights_path, uri=weights_uri)
    given = check_sha256(sha256)
    inputs = resolve_run_inputs(ws, lora_id, dataset, adapter=ADAPTER_KIND, project=project, scope=scope,
                                release_id=release_id, config=config, config_file=config_file, overrides=overrides,
                                force=force)
    return record_weights(ws, inputs, ref, given, set_active=set_active, notes=notes, dry_run=dry_run)


def record_weights(ws: Workspace, inputs: RunInputs, ref: dict, given_sha256: str | None, *, set_active: bool,
                   notes: str | None, dry_run: bool) -> RecordedRun:
    """Hash and inspect the weights when they are on this machine, then append the release (unless ``dry_run``)."""
    cfg = inputs.settings
    warnings = []
    digest: str | None
    path = reachable_weights(ref, ws.config)
    summary: dict = {}
    if path is not None:
        digest, summary = inspect_weights(path, given_sha256)
        if summary.get("rank") is not None and cfg.get("rank") not in (None, summary["rank"]):
            warnings.append(f"config says rank {cfg['rank']} but {path.name} was trained with rank {summary['rank']}")
    else:
        digest = given_sha256
        shown = ref.get("uri") or ref.get("path")
        warnings.append(f"weights {shown} are not on this machine: recorded without checking "
                        + ("the given sha256" if given_sha256 else "a hash (pass --sha256 to record one)"))

    training = training_block({"kind": ADAPTER_KIND}, inputs, cfg, weights_metadata=summary)
    release = release_entry(inputs.release_id, weights=ref, sha256=digest, training=training, notes=notes)
    lora = inputs.lora if dry_run else add_release(ws, inputs.lora_id, release, project=inputs.lora_project,
                                                   set_active=set_active)
    return RecordedRun(lora=lora, release=release, lora_project=inputs.lora_project, weights_path=path,
                       warnings=warnings)
