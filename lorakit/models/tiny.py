"""Tiny random-weight Stable Diffusion pipelines, built offline and deterministically.

They have the real architectures (UNet2DConditionModel with cross-attention, AutoencoderKL with an 8x
downscale, CLIP text encoders and tokenizers; SDXL with two encoders and size/crop conditioning), only
narrow and shallow, so training and rendering run in seconds on a CPU. ``make demo``, the tests and the
benchmarks train on them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .tokenizer import VOCAB_SIZE, write_clip_tokenizer

TINY_RESOLUTION = 64  # pixels; latents are 8x8


def _text_config(pad_token_id: int, hidden_act: str, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=projection_dim, hidden_act=hidden_act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id,
    )


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    # Four blocks, like the real VAE, so images are downscaled 8x into 4 latent channels.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(16, 32, 32, 32), sample_size=TINY_RESOLUTION,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


def build_tiny_pipeline(family: str, seed: int = 0, *, prediction: str = "epsilon", zero_terminal_snr: bool = False):
    """The tiny pipeline of ``family`` (a family or its name) in fp32; the same ``family`` and ``seed`` always give
    the same weights, whatever the objective (``prediction``, ``zero_terminal_snr``) its scheduler config says.
    Each family module builds its own (see ``Family.build_tiny``)."""
    from ..families import Objective, get

    try:
        builder = get(family)
    except ValueError:
        raise ValueError(f"unknown model family {family!r}") from None
    return builder.build_tiny(seed, Objective(prediction, zero_terminal_snr))


_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def build_tiny_sd15(seed: int = 0):
    """A tiny ``StableDiffusionPipeline``: one CLIP text encoder, a two-level UNet, the SD1.5 VAE layout."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

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
        vae = _vae(0.18215, force_upcast=False)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(49407, "quick_gelu"))
        # The scheduler the real SD1.5 repository ships.
        scheduler = PNDMScheduler(**_BETAS, steps_offset=1, skip_prk_steps=True, set_alpha_to_one=False)
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def build_tiny_sdxl(seed: int = 0, *, prediction: str = "epsilon", zero_terminal_snr: bool = False):
    """A tiny ``StableDiffusionXLPipeline``: two CLIP text encoders, size and crop conditioning. ``prediction``
    ``"v"`` (and ``zero_terminal_snr``) gives a v-prediction checkpoint: the same weights, with a scheduler
    config that says so, as NoobAI-XL v-pred's diffusers folder does."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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
        vae = _vae(0.13025, force_upcast=True)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(49407, "quick_gelu"))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(0, "gelu"))
        # The scheduler the real SDXL repository ships; a v-prediction one says so in the same config.
        objective: dict = {}
        if prediction == "v":
            objective["prediction_type"] = "v_prediction"
        if zero_terminal_snr:
            objective |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        scheduler = EulerDiscreteScheduler(**_BETAS, steps_offset=1,
                                           **({"timestep_spacing": "leading"} | objective))
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
        )


def save_tiny_pipeline(family: str, folder: str | Path, seed: int = 0, *, prediction: str = "epsilon",
                       zero_terminal_snr: bool = False) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder (safetensors weights)."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(family, seed, prediction=prediction, zero_terminal_snr=zero_terminal_snr)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
