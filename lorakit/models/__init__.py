"""Checkpoints: the registry, offline loading, and the tiny random-weight pipelines.

Names are imported on first use so that commands which only read checkpoint records do not load torch.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "describe_pipeline": ".loading", "load_pipeline": ".loading", "verify_checkpoint": ".loading",
    "add_checkpoint": ".registry", "checkpoint_family": ".registry", "checkpoint_weights_hash": ".registry",
    "get_checkpoint": ".registry", "list_checkpoints": ".registry", "make_tiny_checkpoint": ".registry",
    "weights_sha256": ".registry",
    "export_single_file": ".single_file",
    "FAMILIES": ".tiny", "TINY_RESOLUTION": ".tiny", "build_tiny_pipeline": ".tiny", "save_tiny_pipeline": ".tiny",
    "write_clip_tokenizer": ".tokenizer",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit.models' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
