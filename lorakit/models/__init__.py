"""Checkpoints: the registry, offline loading, and the tiny random-weight pipelines."""

from .tiny import FAMILIES, TINY_RESOLUTION, build_tiny_pipeline, save_tiny_pipeline
from .tokenizer import write_clip_tokenizer

__all__ = ["FAMILIES", "TINY_RESOLUTION", "build_tiny_pipeline", "save_tiny_pipeline", "write_clip_tokenizer"]
