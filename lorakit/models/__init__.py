"""Checkpoints: the registry, offline loading, and the tiny random-weight pipelines."""

from .loading import describe_pipeline, load_pipeline, verify_checkpoint
from .registry import (
    add_checkpoint,
    checkpoint_family,
    checkpoint_weights_hash,
    get_checkpoint,
    list_checkpoints,
    make_tiny_checkpoint,
    weights_sha256,
)
from .single_file import export_single_file
from .tiny import FAMILIES, TINY_RESOLUTION, build_tiny_pipeline, save_tiny_pipeline
from .tokenizer import write_clip_tokenizer

__all__ = [
    "FAMILIES", "TINY_RESOLUTION", "add_checkpoint", "build_tiny_pipeline", "checkpoint_family",
    "checkpoint_weights_hash", "describe_pipeline", "export_single_file", "get_checkpoint", "list_checkpoints",
    "load_pipeline", "make_tiny_checkpoint", "save_tiny_pipeline", "verify_checkpoint", "weights_sha256",
    "write_clip_tokenizer",
]
