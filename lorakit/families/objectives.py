"""What a denoiser is trained to predict, and how: the one definition the training step and validation share.

An :class:`Objective` says how noise levels are drawn, what the noisy input is, what the target is and how each
sample's loss is weighed. Epsilon prediction and v-prediction (optionally on a schedule rescaled to zero
terminal SNR, as NoobAI-XL v-pred and the Illustrious v-pred models are trained) are here now; the schedule is
diffusers' DDPM schedule of the checkpoint, with its prediction type and rescaling set from the objective.

>>> Objective("v", zero_terminal_snr=True).describe()
'v-prediction, zero terminal SNR'
>>> Objective("epsilon").diffusers_prediction_type
'epsilon'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PREDICTIONS = ("epsilon", "v")
DIFFUSERS_PREDICTION = {"epsilon": "epsilon", "v": "v_prediction"}
# What zero-terminal-SNR checkpoints render with unless the user sets another (Lin et al. 2023 use 0.7).
DEFAULT_GUIDANCE_RESCALE = 0.7


@dataclass(frozen=True)
class Objective:
    """``prediction``: ``epsilon`` (the noise) or ``v`` (the velocity ``alpha * noise - sigma * x0``);
    ``zero_terminal_snr``: the betas rescaled so that the last timestep is pure noise (only meaningful with v)."""

    prediction: str = "epsilon"
    zero_terminal_snr: bool = False

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r} (expected one of {', '.join(PREDICTIONS)})")

    @property
    def diffusers_prediction_type(self) -> str:
        return DIFFUSERS_PREDICTION[self.prediction]

    def describe(self) -> str:
        words = "v-prediction" if self.prediction == "v" else "epsilon prediction"
        return words + (", zero terminal SNR" if self.zero_terminal_snr else "")

    def record(self) -> dict[str, Any]:
        """How a release's training block records it."""
        return {"prediction": self.prediction, "zeroTerminalSnr": self.zero_terminal_snr}

    @classmethod
    def from_record(cls, value: Any) -> Objective:
        """The objective a :meth:`record` holds; anything else is a :class:`ValueError` saying what is wrong.

        >>> Objective.from_record({"prediction": "v", "zeroTerminalSnr": True}).describe()
        'v-prediction, zero terminal SNR'
        """
        if not isinstance(value, dict) or set(value) - {"prediction", "zeroTerminalSnr"}:
            raise ValueError(f"{value!r} is not an objective (an object with prediction and zeroTerminalSnr)")
        zero_terminal_snr = value.get("zeroTerminalSnr", False)
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(f"zeroTerminalSnr must be true or false, got {zero_terminal_snr!r}")
        return cls(value.get("prediction", "epsilon"), zero_terminal_snr)

    # ---- LoRA files and kohya ----------------------------------------------------------------------------
    def kohya_metadata(self) -> dict[str, str]:
        """The header keys kohya's trainers write about the objective (``str(bool)``, as kohya does)."""
        return {"ss_v_parameterization": str(self.prediction == "v"),
                "ss_zero_terminal_snr": str(self.zero_terminal_snr),
                "modelspec.prediction_type": self.prediction}

    def kohya_options(self) -> dict[str, bool]:
        """The sd-scripts options that train this objective (``--v_parameterization``, ``--zero_terminal_snr``)."""
        options = {"v_parameterization": True} if self.prediction == "v" else {}
        return options | ({"zero_terminal_snr": True} if self.zero_terminal_snr else {})

    # ---- training ------------------------------------------------------------------------------------------
    def noise_scheduler(self, scheduler_config: Any) -> Any:
        """The DDPM schedule the checkpoint was trained on, predicting what this objective predicts.

        An epsilon checkpoint keeps its scheduler config as it is (so runs give the weights they always gave);
        for v the prediction type is set, and with zero terminal SNR the betas are rescaled (diffusers'
        ``rescale_betas_zero_snr``, Lin et al. 2023), which makes the last ``alphas_cumprod`` exactly 0."""
        from diffusers import DDPMScheduler

        overrides: dict[str, Any] = {}
        if self.prediction != "epsilon" or dict(scheduler_config).get("prediction_type", "epsilon") != "epsilon":
            overrides["prediction_type"] = self.diffusers_prediction_type
        if self.zero_terminal_snr:
            overrides["rescale_betas_zero_snr"] = True
        return DDPMScheduler.from_config(scheduler_config, **overrides)

    def noisy(self, scheduler: Any, latents: Any, noise: Any, timesteps: Any) -> Any:
        return scheduler.add_noise(latents, noise, timesteps)

    def target(self, scheduler: Any, latents: Any, noise: Any, timesteps: Any) -> Any:
        if self.prediction == "epsilon":
            return noise
        return scheduler.get_velocity(latents, noise, timesteps)

    def min_snr_weight(self, scheduler: Any, timesteps: Any, gamma: float) -> Any:
        """Min-SNR-gamma weights (Hang et al. 2023): each timestep's loss capped at ``gamma / SNR``. v's target
        already carries an ``SNR + 1`` factor, so its form divides by ``SNR + 1``; at a zero-SNR timestep that
        is ``0 / 1``, where the epsilon form would divide by zero."""
        import torch
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        capped = torch.clamp(snr, max=gamma)
        return capped / (snr + 1) if self.prediction == "v" else capped / snr

    # ---- rendering -----------------------------------------------------------------------------------------
    def render_scheduler_overrides(self) -> dict[str, Any]:
        """What a render scheduler needs set to sample this objective's checkpoints: the prediction type, and
        for zero terminal SNR the rescaled betas with trailing timestep spacing (so sampling starts from the
        pure-noise step the model was trained on)."""
        if self.prediction == "epsilon" and not self.zero_terminal_snr:
            return {}
        overrides: dict[str, Any] = {"prediction_type": self.diffusers_prediction_type}
        if self.zero_terminal_snr:
            overrides |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        return overrides

    def render_scheduler(self, scheduler: Any) -> Any:
        """``scheduler`` set up to sample this objective's checkpoints: itself when nothing needs changing, else a
        scheduler of its class from its config with :meth:`render_scheduler_overrides`. A class that has no such
        setting (it would silently sample the wrong schedule) is a :class:`ValueError`."""
        overrides = self.render_scheduler_overrides()
        if all(scheduler.config.get(k) == v for k, v in overrides.items()):
            return scheduler
        built = type(scheduler).from_config(scheduler.config, **overrides)
        missing = [k for k, v in overrides.items() if built.config.get(k) != v]
        if missing:
            raise ValueError(f"{type(scheduler).__name__} has no {', '.join(missing)}, which {self.describe()} "
                             "checkpoints need to render; use EulerDiscreteScheduler or DDIMScheduler")
        return built

    def render_kwargs(self, guidance_rescale: float) -> dict[str, Any]:
        """Keyword arguments of the pipeline call: a guidance rescale for zero terminal SNR (it keeps strong
        guidance from over-exposing), nothing otherwise."""
        return {"guidance_rescale": guidance_rescale} if self.zero_terminal_snr else {}

