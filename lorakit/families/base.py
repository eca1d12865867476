"""What every model family answers: the :class:`Family` base class and its small parts.

A family module (``sd15.py``, ``sdxl.py``) subclasses :class:`Family`, sets its plain attributes and overrides
the hooks whose answer differs. Everything else in lorakit asks a family object and never names a family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .objectives import Objective


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a pipeline: its attribute, its tokenizer's attribute and the padding token a
    tokenizer folder written for it uses, its model class in transformers, its key prefix in kohya files, and
    where its weights sit in an original-layout single file (``openclip``: under OpenCLIP's names, with fused
    q/k/v, rather than transformers' CLIP names)."""

    attribute: str
    tokenizer: str
    pad_token: str
    model_class: str
    kohya_prefix: str
    single_file_prefix: str = ""
    openclip: bool = False


class Family(ABC):
    """A model family: a kind of checkpoint, with everything that differs between kinds.

    Attributes are data; methods are the hooks. A new family sets the attributes and overrides the hooks it
    needs (see ``docs/families.md``).
    """

    name: str = ""
    label: str = ""
    pipeline_class_name: str = ""
    index_class_names: tuple[str, ...] = ()   # model_index.json _class_name values of its diffusers folders
    single_file_marker: str = ""              # a key prefix only this family's original-layout files have
    denoiser: str = "unet"
    denoiser_class_name: str = "UNet2DConditionModel"
    text_encoders: tuple[TextEncoder, ...] = ()
    native_resolution: int = 512
    vae_fp32: bool = False                    # decode and encode the VAE in fp32 by default (fp16 overflows)
    uses_clip_skip: bool = False
    eval_size: tuple[int, int] = (512, 512)
    kohya_script: str = "train_network.py"
    kohya_base_model_version: str = ""
    modelspec_architecture: str = ""
    modelspec_implementation: str = ""

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ---- identity ----------------------------------------------------------------------------------------
    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def is_pipeline(self, pipe: Any) -> bool:
        """Whether ``pipe`` is this family's pipeline (by its class, never by which components it happens to have)."""
        return type(pipe).__name__ == self.pipeline_class_name

    def tokenizers_and_encoders(self, pipe: Any) -> tuple[list, list]:
        """The pipeline's tokenizers and text encoders, in the family's order."""
        return ([getattr(pipe, e.tokenizer) for e in self.text_encoders],
                [getattr(pipe, e.attribute) for e in self.text_encoders])

    # ---- detection -------------------------------------------------------------------------------------------
    def matches_index(self, class_name: str) -> bool:
        return class_name in self.index_class_names

    def matches_keys(self, keys: Any) -> bool:
        return bool(self.single_file_marker) and any(k.startswith(self.single_file_marker) for k in keys)

    # ---- models ------------------------------------------------------------------------------------------------
    @abstractmethod
    def build_tiny(self, seed: int = 0, objective: Objective | None = None) -> Any:
        """A tiny random-weight pipeline of this family in fp32; the same seed gives the same weights.
        ``objective`` (default epsilon) is what its scheduler config says the denoiser predicts."""

    def single_file_components(self, weights_file: Path, config_folder: Path, dtype: Any) -> dict[str, Any]:
        """Pipeline components lorakit loads itself from an original-layout single file, to hand to diffusers'
        ``from_single_file`` instead of letting it convert them; none by default."""
        return {}

    def models_from_config(self, folder: Path) -> dict[str, Any]:
        """The denoiser and text encoders of a diffusers config folder, built from their configs (the caller picks
        the device, e.g. ``meta``)."""
        import diffusers
        import transformers

        denoiser_cls = getattr(diffusers, self.denoiser_class_name)
        models: dict[str, Any] = {self.denoiser: denoiser_cls.from_config(denoiser_cls.load_config(folder / self.denoiser))}
        for encoder in self.text_encoders:
            model_cls = getattr(transformers, encoder.model_class)
            config_cls = model_cls.config_class
            models[encoder.attribute] = model_cls(config_cls.from_pretrained(folder / encoder.attribute))
        return models

    # ---- the training step -------------------------------------------------------------------------------
    @abstractmethod
    def encode_text(self, tokenizers: list, encoders: list, captions: list[str], device: Any,
                    clip_skip: int = 1) -> dict[str, Any]:
        """Captions as the denoiser's text inputs: a dict of tensors with the batch first."""

    def denoiser_kwargs(self, text: dict[str, Any], size_rows: list[list[int]], dtype: Any, device: Any) -> dict:
        """The denoiser's keyword arguments besides the noisy latents and timesteps: the text inputs and any
        extra conditioning. ``size_rows`` holds, per sample, (original h, w, crop top, left, target h, w)."""
        return {"encoder_hidden_states": text["encoder_hidden_states"].to(device, dtype)}

    def text_inputs_like(self, batch: int, denoiser_config: dict, device: Any, dtype: Any) -> dict[str, Any]:
        """Random text inputs of the shapes :meth:`encode_text` gives, for sizing a training step (memory
        estimates) without tokenizers or text encoders."""
        import torch

        width = denoiser_config["cross_attention_dim"]
        return {"encoder_hidden_states": torch.randn(batch, 77, width, device=device, dtype=dtype)}

    def objective(self, prediction: str = "epsilon", zero_terminal_snr: bool = False) -> Objective:
        return Objective(prediction, zero_terminal_snr)

    # ---- LoRA files --------------------------------------------------------------------------------------------
    def kohya_module_name(self, module_path: str, denoiser_config: dict | None = None) -> str:
        """The key prefix UIs read for a denoiser module (``lora_unet_...``)."""
        from ..train.kohya_format import kohya_name

        return kohya_name("lora_unet", module_path)

    def text_encoder_prefixes(self) -> tuple[str, ...]:
        return tuple(e.kohya_prefix for e in self.text_encoders)
