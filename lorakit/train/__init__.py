"""The native LoRA trainer (diffusers + peft + accelerate) and what it needs: presets, data, the kohya format.

Importing this package is cheap; torch and the model stack load when a run starts.

>>> from lorakit.train import train_lora, resolve_config, list_presets, plot_loss   # doctest: +SKIP
"""

from .config import DEFAULTS, TrainingError, list_presets, load_preset, resolve_config
from .progress import plot_loss, read_loss_log
from .recipe import TrainResult, train_lora

__all__ = ["DEFAULTS", "TrainResult", "TrainingError", "list_presets", "load_preset", "plot_loss", "read_loss_log",
           "resolve_config", "train_lora"]
