"""Stable Diffusion 1.x (SD1.5 and its fine-tunes): one CLIP text encoder, a UNet, 512 px.

The worked example of ``docs/families.md``: every attribute and hook a family answers, at its simplest.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Family, TextEncoder
from .objectives import Objective


class SD15(Family):
    name = "sd15"
    label = "SD1.5"
    pipeline_class_name = "StableDiffusionPipeline"
    index_class_names = ("StableDiffusionPipeline",)
    # The original layout's CLIP text encoder; SD2 files hold an OpenCLIP one under cond_stage_model.model.
    single_file_marker = "cond_stage_model.transformer."
    text_encoders = (TextEncoder("text_encoder", "tokenizer", "<|endoftext|>", "CLIPTextModel", "lora_te",
                                 single_file_prefix="cond_stage_model.transformer."),)
    native_resolution = 512
    vae_fp32 = False
    uses_clip_skip = True
    eval_size = (512, 512)
    kohya_script = "train_network.py"
    kohya_base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    modelspec_implementation = "diffusers"

    def build_tiny(self, seed: int = 0, objective: Objective | None = None) -> Any:
        """A tiny ``StableDiffusionPipeline``: one CLIP text encoder, a two-level UNet, the SD1.5 VAE layout."""
        import tempfile
        from pathlib import Path

        import torch
        from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from ..models.tiny import TINY_BETAS, TINY_RESOLUTION, tiny_text_config, tiny_vae
        from ..models.tokenizer import write_clip_tokenizer

        if objective is not None and objective != Objective():
            # A v-prediction SD-architecture model (SD2-768-v style) is a valid checkpoint, but the tiny builder
            # only ships SD1.5's epsilon scheduler.
            raise ConfigError(f"the tiny {self.label} checkpoint is built for epsilon prediction only, not "
                              f"{objective.describe()}; leave out --prediction/--zero-terminal-snr, or build a "
                              "tiny v-prediction SDXL checkpoint (--family sdxl)")
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer"))
            torch.manual_seed(seed)
            unet = UNet2DConditionModel(
                sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                norm_num_groups=32,
            )
            torch.manual_seed(seed + 1)
            vae = tiny_vae(0.18215, force_upcast=False)
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(tiny_text_config(49407, "quick_gelu"))
            # The scheduler the real SD1.5 repository ships.
            scheduler = PNDMScheduler(**TINY_BETAS, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
            return StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )

    def encode_text(self, tokenizers: list, encoders: list, captions: list[str], device: Any,
                    clip_skip: int = 1) -> dict[str, Any]:
        (tokenizer,), (encoder,) = tokenizers, encoders
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        out = encoder(ids, output_hidden_states=True)
        if clip_skip > 1:   # an earlier layer, through the final norm, as A1111 and kohya do
            hidden = encoder.text_model.final_layer_norm(out.hidden_states[-clip_skip])
        else:
            hidden = out.last_hidden_state
        return {"encoder_hidden_states": hidden}


FAMILY = SD15()
