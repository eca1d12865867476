"""Stable Diffusion XL (SDXL 1.0, Pony, Illustrious, NoobAI and other fine-tunes): two CLIP text encoders, a UNet
with size and crop conditioning, 1024 px.

v-prediction checkpoints (NoobAI-XL v-pred, the Illustrious v-pred models) are SDXL with another objective, not
another family: the checkpoint record's ``prediction`` and ``zeroTerminalSnr`` choose it.
"""

from __future__ import annotations

from typing import Any

from .base import Family, TextEncoder
from .objectives import Objective


class SDXL(Family):
    name = "sdxl"
    label = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    index_class_names = ("StableDiffusionXLPipeline",)
    single_file_marker = "conditioner.embedders.1."   # the original layout's second (OpenCLIP) text encoder
    text_encoders = (
        TextEncoder("text_encoder", "tokenizer", "<|endoftext|>", "CLIPTextModel", "lora_te1",
                    single_file_prefix="conditioner.embedders.0.transformer."),
        # The second encoder also projects the pooled embedding the UNet takes; OpenCLIP pads with "!".
        TextEncoder("text_encoder_2", "tokenizer_2", "!", "CLIPTextModelWithProjection", "lora_te2",
                    single_file_prefix="conditioner.embedders.1.model.", openclip=True),
    )
    native_resolution = 1024
    vae_fp32 = True    # SDXL's VAE overflows in fp16
    uses_clip_skip = False
    eval_size = (1024, 1024)
    kohya_script = "sdxl_train_network.py"
    kohya_base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"

    def build_tiny(self, seed: int = 0, objective: Objective | None = None) -> Any:
        """A tiny ``StableDiffusionXLPipeline``: two CLIP text encoders, size and crop conditioning. A v-prediction
        ``objective`` gives the same weights with a scheduler config that says so, as NoobAI-XL v-pred's diffusers
        folder does."""
        import tempfile
        from pathlib import Path

        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from ..models.tiny import TINY_BETAS, TINY_RESOLUTION, tiny_text_config, tiny_vae
        from ..models.tokenizer import write_clip_tokenizer

        objective = objective or Objective()

        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer"))
            tokenizer_2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tokenizer_2", pad_token="!"))
            torch.manual_seed(seed)
            # SDXL's layout: linear projections in the transformers, more transformer layers deeper down,
            # and pooled text + (size, crop, target size) embeddings added to the timestep embedding.
            unet = UNet2DConditionModel(
                sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                use_linear_projection=True, transformer_layers_per_block=(1, 2), cross_attention_dim=64,
                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                norm_num_groups=32,
            )
            torch.manual_seed(seed + 1)
            vae = tiny_vae(0.13025, force_upcast=True)
            torch.manual_seed(seed + 2)
            text_encoder = CLIPTextModel(tiny_text_config(49407, "quick_gelu"))
            torch.manual_seed(seed + 3)
            text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(0, "gelu"))
            # The scheduler the real SDXL repository ships; a v-prediction one says so in the same config.
            says: dict = {}
            if objective.prediction == "v":
                says["prediction_type"] = "v_prediction"
            if objective.zero_terminal_snr:
                says |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
            scheduler = EulerDiscreteScheduler(**TINY_BETAS, steps_offset=1,
                                               **({"timestep_spacing": "leading"} | says))
            return StableDiffusionXLPipeline(
                vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
            )

    def single_file_components(self, weights_file: Any, config_folder: Any, dtype: Any) -> dict[str, Any]:
        """The OpenCLIP text encoder, loaded by lorakit: diffusers' single-file loader picks its converter by
        comparing the two encoders' widths, and so takes the first encoder's weights when both are as wide (the
        tiny checkpoints)."""
        from ..models.loading import load_openclip_text_encoder

        encoder = self.text_encoders[1]
        return {encoder.attribute: load_openclip_text_encoder(weights_file, config_folder, dtype, encoder)}

    def encode_text(self, tokenizers: list, encoders: list, captions: list[str], device: Any,
                    clip_skip: int = 1) -> dict[str, Any]:
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])   # SDXL conditions on the penultimate layer of both encoders
            pooled = out[0]                        # the second encoder's projected pooled output
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def denoiser_kwargs(self, text: dict[str, Any], size_rows: list[list[int]], dtype: Any, device: Any) -> dict:
        import torch

        return {"encoder_hidden_states": text["encoder_hidden_states"].to(device, dtype),
                "added_cond_kwargs": {"text_embeds": text["text_embeds"].to(device, dtype),
                                      "time_ids": torch.tensor(size_rows, dtype=dtype, device=device)}}

    def text_inputs_like(self, batch: int, denoiser_config: dict, device: Any, dtype: Any) -> dict[str, Any]:
        import torch

        text = super().text_inputs_like(batch, denoiser_config, device, dtype)
        # The pooled embedding is what the added-condition projection takes besides the six size and crop ids.
        pooled = denoiser_config["projection_class_embeddings_input_dim"] - 6 * denoiser_config["addition_time_embed_dim"]
        return text | {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype)}

    def kohya_module_name(self, module_path: str, denoiser_config: dict | None = None) -> str:
        """kohya's SDXL names follow the original (SGM) UNet's block numbering, not diffusers'."""
        from ..train.kohya_format import diffusers_to_sgm, kohya_name

        cfg = denoiser_config or {}
        layers = cfg.get("layers_per_block", 2)
        if not isinstance(layers, int):
            raise ValueError("SDXL UNets with per-block layer counts have no kohya layout")
        has_attention = ["CrossAttn" in t for t in cfg.get("up_block_types", ())]
        return kohya_name("lora_unet", diffusers_to_sgm(module_path, layers, has_attention))


FAMILY = SDXL()
