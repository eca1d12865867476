"""lorakit: train LoRAs per Stable Diffusion checkpoint on a studio's curated, tagged game assets.

The Python API mirrors the command line: every ``lorakit X Y`` command is one function here, e.g.
``lorakit dataset build`` is :func:`build_manifest` and ``lorakit lora train`` is :func:`train_lora`.

    >>> import lorakit
    >>> ws = lorakit.open_workspace()                     # doctest: +SKIP
    >>> lorakit.build_manifest(ws, project="demo", asset_types=["ui_icon"])  # doctest: +SKIP

Names are imported on first use, so ``import lorakit`` (and every command that needs no model) starts
without loading torch and diffusers.
"""

from __future__ import annotations

import logging

from .lazy import lazy_exports


class _NoTorchvisionAdvice(logging.Filter):
    """Drops transformers' advice to install torchvision, printed whenever diffusers touches a CLIP image
    processor: lorakit uses the PIL processor it falls back to, and torchvision wheels replace the torch build."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionAdvice())

# public name -> the module that defines it
_EXPORTS = {
    "find_duplicates": ".assets", "import_assets": ".assets", "set_asset_status": ".assets",
    "tag_assets": ".assets", "tag_frequencies": ".assets",
    "build_manifest": ".datasets", "dataset_summary": ".datasets", "export_dataset": ".datasets",
    "load_manifest": ".datasets", "manifest_items_frame": ".datasets",
    "canonical_prompts": ".evals", "cleanup_eval": ".evals", "contact_sheet": ".evals", "create_eval": ".evals",
    "create_eval_grid": ".evals", "normalize_evals": ".evals", "save_contact_sheet": ".evals",
    "show_eval_grid": ".evals",
    "add_checkpoint": ".models", "checkpoint_family": ".models", "get_checkpoint": ".models",
    "list_checkpoints": ".models", "load_pipeline": ".models", "make_tiny_checkpoint": ".models",
    "verify_checkpoint": ".models",
    "load_catalogs": ".catalog", "load_project": ".catalog", "load_specs": ".catalog",
    "Config": ".config", "load_config": ".config", "resolve_weights": ".config",
    **{name: ".errors" for name in (
        "AssetError", "ConfigError", "DatasetError", "EvalError", "GateRefusal", "InvalidIdError",
        "KohyaSetupError", "LeaseLost", "LorakitError", "NotebookError", "RecordError", "RecordNotFoundError",
        "SelectionError", "TrainingError", "WizardRefusal")},
    "activate_release": ".gate", "approve_and_activate": ".gate", "deprecate_release": ".gate",
    "review_release": ".gate", "set_recommended": ".gate",
    "check_id": ".ids", "new_ulid": ".ids",
    "add_release": ".loras", "create_lora": ".loras", "ensure_lora": ".loras", "get_lora": ".loras",
    "export_html": ".reports", "make_report": ".reports", "release_report": ".reports", "run_notebook": ".reports",
    "apply_loras": ".select", "list_loras": ".select", "resolve_loras": ".select", "select_loras": ".select",
    "Store": ".store",
    "list_presets": ".train", "plan_training": ".train", "plot_loss": ".train", "resolve_config": ".train",
    "run_plan": ".train", "train_lora": ".train",
    "setup_kohya": ".train.kohya", "train_kohya": ".train.kohya",
    "record_manual_run": ".train.manual",
    "validate_records": ".validate",
    "run_worker": ".worker",
    "Workspace": ".workspace", "init_data_root": ".workspace", "open_workspace": ".workspace",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
