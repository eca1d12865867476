"""The front half every trainer shares: find the LoRA, the dataset and the checkpoint, check they fit, pick the
release id and resolve the settings.

:func:`resolve_run_inputs` returns one frozen :class:`RunInputs`; the native recipe, the kohya_ss adapter and
the manual adapter all start from it, so a LoRA, a dataset or a mismatch is found and reported the same way
whichever trainer runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError, RecordError, TrainingError
from ..families import Family, Objective, get
from ..ids import check_id, given_or_new_id
from ..loras import find_lora, has_release
from ..roots import Root
from ..workspace import Workspace
from .settings import ADAPTERS


@dataclass(frozen=True)
class RunInputs:
    """What a training run starts from.

    ``dataset`` is the reference a release keeps: ``{id, scope, projectId, manifestHash, path}`` (``path`` is
    the manifest file when one was given instead of an id). ``settings`` are the adapter's resolved settings:
    the full native config, kohya's options, or a manual run's settings as given. ``family`` is the checkpoint's
    model family and ``objective`` what its denoiser predicts (from the checkpoint record, else its files).
    """

    lora: dict
    lora_project: str | None
    manifest: dict
    dataset: dict
    checkpoint: dict
    family: Family
    release_id: str
    settings: dict
    objective: Objective

    @property
    def lora_id(self) -> str:
        return self.lora["id"]


def resolve_run_inputs(
    ws: Workspace,
    lora: str,
    dataset: str | Path | None,
    *,
    adapter: str = "native",
    project: str | None = None,
    scope: str | None = None,
    release_id: str | None = None,
    preset: str | None = None,
    config: dict | str | None = None,
    config_file: str | Path | None = None,
    overrides: dict | None = None,
    force: bool = False,
    settings: dict | None = None,
    resuming: bool = False,
) -> RunInputs:
    """Find and check everything a run of ``adapter`` needs; nothing is written.

    ``lora`` is looked up in ``project`` then the shared scope (or only in ``scope``); its checkpoint is the
    base model. ``dataset`` is a dataset id (project, then shared) or a manifest file path; one built for
    another checkpoint is refused unless ``force``. ``release_id`` must not be taken yet (a new ULID when
    ``None``), except when ``resuming`` a run that has not been recorded. The settings are resolved from
    ``preset`` < ``config_file`` < ``config`` < ``overrides`` the adapter's way, unless ``settings`` gives them
    already resolved (a resumed run's stored config).
    """
    from ..models import checkpoint_family, get_checkpoint
    from ..models.registry import checkpoint_objective

    if adapter not in ADAPTERS:
        raise TrainingError(f"unknown adapter {adapter!r} (adapters: {', '.join(ADAPTERS)})")
    check_id(lora, "LoRA id")
    lora_record, lora_project = find_lora(ws, lora, project=project, scope=scope)
    if dataset is None:
        raise TrainingError("give a dataset (--dataset ID or a manifest path)")
    manifest, dataset_ref = find_dataset(ws, dataset, project)
    checkpoint = get_checkpoint(ws, lora_record["checkpointId"])
    family = get(checkpoint_family(checkpoint))
    check_dataset_checkpoint(manifest, checkpoint["id"], force)
    rid = new_release_id(lora_record, release_id, resuming=resuming)
    if settings is None:
        settings = adapter_settings(adapter, family, preset=preset, config=config, config_file=config_file,
                                    overrides=overrides, force=force)
    return RunInputs(lora=lora_record, lora_project=lora_project, manifest=manifest, dataset=dataset_ref,
                     checkpoint=checkpoint, family=family, release_id=rid, settings=settings,
                     objective=checkpoint_objective(ws, checkpoint))


def adapter_settings(adapter: str, family: Family | str, *, preset: str | None, config: dict | str | None,
                     config_file: str | Path | None, overrides: dict | None, force: bool) -> dict:
    """The settings of a run, each adapter its own way (``overrides`` are by setting name)."""
    if adapter == "native":
        from .config import resolve_config

        return resolve_config(family, preset=preset, config_file=config_file, config=config, overrides=overrides,
                              force=force)
    if preset is not None:
        raise TrainingError(f"--preset is for the native trainer; --adapter {adapter} takes --config/--config-file")
    if adapter == "manual":
        from .config import parse_config_json, read_config_file
        from .manual import manual_config

        return manual_config(read_config_file(config_file) if config_file else None,
                             parse_config_json(config) if isinstance(config, str) else config, overrides)
    from .kohya import kohya_options

    return kohya_options(config_file, config, overrides)


# ---- the dataset --------------------------------------------------------------------------------------------
def is_manifest_path(dataset: str | Path) -> bool:
    """A ``--dataset`` value that names a manifest file rather than a dataset id (as the original tool allowed).

    >>> is_manifest_path("hero_v1"), is_manifest_path("exports/hero.json")
    (False, True)
    """
    text = str(dataset)
    return text.endswith(".json") or "/" in text or os.sep in text


def find_dataset(ws: Workspace, dataset: str | Path, project: str | None) -> tuple[dict, dict]:
    """The manifest ``dataset`` and the reference a release keeps (see :class:`RunInputs`).

    An id is looked up in ``project`` first, then the shared scope. A relative manifest path is tried against
    the data root (how a run stores it), then the working directory.
    """
    text = str(dataset)
    if not is_manifest_path(text):
        from ..datasets import load_manifest

        manifest = load_manifest(ws, text, project)
        return manifest, dataset_reference(manifest, None)
    path = Path(text)
    if not path.is_absolute():
        path = ws.data_root / text if (ws.data_root / text).exists() else Path.cwd() / text
    manifest = ws.store.read_path(path, "dataset", missing=f"dataset manifest file {text} does not exist")
    rel = os.path.relpath(path.resolve(), ws.data_root)
    return manifest, dataset_reference(manifest, rel.replace(os.sep, "/") if not rel.startswith("..")
                                       else str(path.resolve()))


def dataset_reference(manifest: dict, path: str | None) -> dict:
    """``{id, scope, projectId, manifestHash, path}`` of a manifest (its hash computed when it has none).

    >>> dataset_reference({"id": "d1", "scope": "project", "projectId": "demo", "manifestHash": "ab"}, None)
    {'id': 'd1', 'scope': 'project', 'projectId': 'demo', 'manifestHash': 'ab', 'path': None}
    """
    from ..datasets import manifest_hash

    return {"id": manifest["id"], "scope": manifest.get("scope", "project"), "projectId": manifest.get("projectId"),
            "manifestHash": manifest.get("manifestHash") or manifest_hash(manifest.get("items", [])), "path": path}


def release_dataset_fields(ref: dict) -> dict:
    """How a release's ``training`` block names its dataset.

    >>> release_dataset_fields({"id": "d1", "scope": "shared", "projectId": None, "manifestHash": "ab", "path": None})
    {'datasetId': 'd1', 'datasetScope': 'shared', 'datasetProjectId': None, 'manifestHash': 'ab'}
    """
    return {"datasetId": ref["id"], "datasetScope": ref["scope"], "datasetProjectId": ref["projectId"],
            "manifestHash": ref["manifestHash"]}


def dataset_checkpoints(manifest: dict) -> list[str]:
    """The checkpoints a dataset was filtered for: ``selection.checkpoints``, and the single ``checkpoint`` /
    ``checkpointId`` some manifests (the original tool's) carry instead.

    >>> dataset_checkpoints({"selection": {"checkpoints": ["a"], "checkpointId": "b"}})
    ['a', 'b']
    """
    selection = manifest.get("selection") or {}
    listed = [c for c in selection.get("checkpoints") or [] if isinstance(c, str)]
    single = [c for c in (selection.get("checkpoint"), selection.get("checkpointId")) if isinstance(c, str)]
    return list(dict.fromkeys(listed + single))


def check_dataset_checkpoint(manifest: dict, checkpoint_id: str, force: bool = False) -> None:
    """A dataset filtered for other checkpoints was curated for another base model: refuse it unless forced.

    >>> check_dataset_checkpoint({"id": "d", "selection": {"checkpoints": ["sd15_base"]}}, "sd15_base")
    """
    wanted = dataset_checkpoints(manifest)
    if wanted and checkpoint_id not in wanted and not force:
        raise DatasetError(
            f"dataset {manifest['id']!r} was built for checkpoint(s) {', '.join(wanted)}, but this LoRA trains on "
            f"{checkpoint_id!r}; build a dataset for {checkpoint_id!r}, or pass --force to train on it anyway"
        )


def new_release_id(lora: dict, release_id: str | None, *, resuming: bool = False) -> str:
    """``release_id`` (checked, and not taken yet unless ``resuming``) or a new ULID."""
    rid = given_or_new_id(release_id, "release id")
    if not resuming and has_release(lora, rid):
        raise RecordError(f"LoRA {lora['id']!r} already has a release {rid!r}; pick another --release")
    return rid


def run_root(out_dir: Path) -> Root:
    """The root every write of a run folder (``<lorasRoot>/<lora>/<release>/``) goes through: ``lorasRoot``
    itself. A LoRA's folder, the run folder, ``state/`` or a log there that is a link is refused, not followed."""
    return Root(out_dir.parent.parent, "lorasRoot")
