"""Training: the native LoRA trainer (diffusers + peft + accelerate), the kohya_ss and manual adapters, and what
they share: the settings, presets, data, the kohya format and the step callbacks.

Importing this package is cheap; torch and the model stack load when a run starts.

>>> from lorakit.train import train_lora, plan_training, resolve_config, list_presets, plot_loss   # doctest: +SKIP
"""

from ..errors import TrainingError
from .adapters import ADAPTER_OPTIONS, train_lora
from .config import DEFAULTS, list_presets, load_preset, resolve_config
from .inputs import RunInputs, resolve_run_inputs
from .progress import StepCallback, StepReport, plot_loss, read_loss_log
from .recipe import TrainingPlan, TrainResult, plan_training, run_plan
from .settings import SETTINGS, Setting

__all__ = ["ADAPTER_OPTIONS", "DEFAULTS", "SETTINGS", "RunInputs", "Setting", "StepCallback", "StepReport",
           "TrainResult", "TrainingError", "TrainingPlan", "list_presets", "load_preset", "plan_training", "plot_loss",
           "read_loss_log", "resolve_config", "resolve_run_inputs", "run_plan", "train_lora"]
