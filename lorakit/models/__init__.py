"""Checkpoints: the registry, offline loading, and the tiny random-weight pipelines.

Names are imported on first use so that commands which only read checkpoint records do not load torch.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    "checkpoint_config_folder": ".loading", "describe_pipeline": ".loading", "load_lora_file": ".loading", "load_pipeline": ".loading", "verify_checkpoint": ".loading",
    "add_checkpoint": ".registry", "checkpoint_family": ".registry", "checkpoint_objective": ".registry", "checkpoint_weights_hash": ".registry",
    "detect_family": ".registry", "detect_objective": ".registry", "objective_label": ".registry",
    "get_checkpoint": ".registry", "list_checkpoints": ".registry", "make_tiny_checkpoint": ".registry",
    "rebuild_tiny_checkpoint": ".registry",
    "weights_sha256": ".registry",
    "export_single_file": ".single_file",
    "FAMILIES": ".registry", "TINY_RESOLUTION": ".tiny", "build_tiny_pipeline": ".tiny", "save_tiny_pipeline": ".tiny",
    "write_clip_tokenizer": ".tokenizer",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
