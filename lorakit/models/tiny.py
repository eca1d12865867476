"""Tiny random-weight Stable Diffusion pipelines, built offline and deterministically.

They have the real architectures (UNet2DConditionModel with cross-attention, AutoencoderKL with an 8x
downscale, CLIP text encoders and tokenizers; SDXL with two encoders and size/crop conditioning), only
narrow and shallow, so training and rendering run in seconds on a CPU. ``make demo``, the tests and the
benchmarks train on them. Each family module builds its own (``Family.build_tiny``) from the parts here.
"""

from __future__ import annotations

from pathlib import Path

from .tokenizer import VOCAB_SIZE

TINY_RESOLUTION = 64  # pixels; latents are 8x8


def tiny_text_config(pad_token_id: int, hidden_act: str, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=projection_dim, hidden_act=hidden_act,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id,
    )


def tiny_vae(scaling_factor: float, force_upcast: bool):
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


# The noise schedule of the real SD1.5 and SDXL repositories, which the tiny schedulers share.
TINY_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def save_tiny_pipeline(family: str, folder: str | Path, seed: int = 0, *, prediction: str = "epsilon",
                       zero_terminal_snr: bool = False) -> Path:
    """Build the tiny pipeline and save it as a diffusers folder (safetensors weights)."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(family, seed, prediction=prediction, zero_terminal_snr=zero_terminal_snr)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
