"""Training configuration: defaults, presets (JSON data files in ``presets/``) and the precedence rules.

A resolved config is a flat dict of the keys in :data:`DEFAULTS`; it is what the recipe reads and what the
release stores. Layers, later ones winning: defaults < preset < config file < ``--config`` JSON < explicit
flags. Everything here is pure (no torch), so the CLI can resolve and print a config without loading a model.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import TrainingError

PRESETS_DIR = Path(__file__).parent / "presets"


# Every key a config may set, with its default. Values of None mean "decided from the checkpoint or other keys"
# (see resolve_config).
DEFAULTS: dict[str, Any] = {
    # data
    "resolution": None,              # square side in px; buckets keep the area <= resolution**2 (default: 512 sd15, 1024 sdxl)
    "bucket_step": 64,               # bucket sides are multiples of this
    "bucket_min_side": None,         # default resolution // 2
    "bucket_max_side": None,         # default resolution * 2
    "bucket_no_upscale": False,      # small images are cropped to a bucket of their own size instead of upscaled
    "background": "#ffffff",         # alpha is composited onto this colour
    "repeats": 1,                    # each image is seen this many times per epoch
    "shuffle_tags": False,           # shuffle the comma-separated tags of each caption, every time it is used
    "keep_tokens": 0,                # ... keeping the first N tags in place (trigger words)
    "caption_dropout": 0.0,          # probability of training on the empty caption
    "clip_skip": 1,                  # sd15 only: use the output of the N-th last text encoder layer
    "cache_latents": True,           # VAE latents computed once (and kept on disk), not every step
    "cache_text_embeddings": True,   # when the text encoders are frozen and captions fixed
    "latent_cache_dir": None,        # default <dataRoot>/.lorakit/cache/latents
    # network
    "rank": 16,
    "alpha": 8.0,
    "unet_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
    "train_conv": False,             # also the 3x3 convolutions of the UNet's ResNet blocks and resamplers
    "conv_rank": None,               # default: rank
    "conv_alpha": None,              # default: alpha
    "train_text_encoder": False,
    "text_encoder_lr": None,         # default: lr
    "lora_dropout": 0.0,
    # optimisation
    "steps": None,                   # optimizer steps; default epochs * steps per epoch
    "epochs": 1,
    "batch_size": 1,                 # per process
    "gradient_accumulation_steps": 1,
    "lr": 1e-4,
    "lr_scheduler": "cosine",        # cosine | constant (both after a linear warm-up)
    "lr_warmup_steps": 0,
    "optimizer": "auto",             # auto (AdamW, 8-bit when bitsandbytes and CUDA are there) | adamw | adamw8bit
    "weight_decay": 1e-2,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,            # 0 turns clipping off
    "min_snr_gamma": None,           # e.g. 5; None turns min-SNR weighting off
    "noise_offset": 0.0,
    "mixed_precision": "auto",       # auto (bf16/fp16 on GPU, fp32 on CPU) | no | fp16 | bf16
    "gradient_checkpointing": False,
    "vae_fp32": None,                # default: True for sdxl (its VAE overflows in fp16)
    "seed": 42,
    # output
    "save_every_n_epochs": None,     # also write <lora>-<epoch>.safetensors every N epochs
    "save_state_every": 100,         # steps between resumable states (0: only on Ctrl-C)
    "sample_prompts": [],            # render these after each epoch (fixed seeds)
    "sample_every_n_epochs": 1,
    "sample_steps": 20,
    "sample_seed": 0,
    "sample_guidance_scale": 7.0,
}

# Names other trainers use, so a kohya or diffusers config file mostly just works.
ALIASES = {
    "learning_rate": "lr", "unet_lr": "lr", "train_batch_size": "batch_size", "max_train_steps": "steps",
    "max_train_epochs": "epochs", "num_train_epochs": "epochs", "network_dim": "rank", "network_alpha": "alpha",
    "lora_rank": "rank", "lora_alpha": "alpha", "lr_warmup": "lr_warmup_steps", "noise_offset_strength": "noise_offset",
    "caption_dropout_rate": "caption_dropout", "shuffle_caption": "shuffle_tags", "num_repeats": "repeats",
    "gradient_accumulation": "gradient_accumulation_steps", "bucket_reso_steps": "bucket_step",
    "min_bucket_reso": "bucket_min_side", "max_bucket_reso": "bucket_max_side", "save_every_n_steps_state": "save_state_every",
    "snr_gamma": "min_snr_gamma", "adam_weight_decay": "weight_decay", "batch": "batch_size",
}

CHOICES = {
    "lr_scheduler": ("cosine", "constant"),
    "optimizer": ("auto", "adamw", "adamw8bit"),
    "mixed_precision": ("auto", "no", "fp16", "bf16"),
}
POSITIVE_INTS = ("rank", "epochs", "batch_size", "gradient_accumulation_steps", "repeats", "bucket_step",
                 "sample_every_n_epochs", "sample_steps")
OPTIONAL_POSITIVE_INTS = ("resolution", "steps", "conv_rank", "save_every_n_epochs", "bucket_min_side", "bucket_max_side")
NON_NEGATIVE_INTS = ("lr_warmup_steps", "keep_tokens", "seed", "save_state_every", "sample_seed", "clip_skip")
POSITIVE_FLOATS = ("alpha", "lr")  # 0 would train nothing (lr) or scale the LoRA to nothing (alpha)
NON_NEGATIVE_FLOATS = ("weight_decay", "max_grad_norm", "noise_offset", "adam_epsilon", "sample_guidance_scale")
OPTIONAL_FLOATS = ("min_snr_gamma", "text_encoder_lr", "conv_alpha")
PROBABILITIES = ("caption_dropout", "lora_dropout", "adam_beta1", "adam_beta2")
BOOLS = ("bucket_no_upscale", "shuffle_tags", "cache_latents", "cache_text_embeddings", "train_conv",
         "train_text_encoder", "gradient_checkpointing")
FAMILY_RESOLUTION = {"sd15": 512, "sdxl": 1024}
MAX_RESOLUTION_FACTOR = 4  # sizes up to 4x the family's native side (2048 for SD1.5, 4096 for SDXL)
MAX_SEED = 2**32 - 1  # what kohya, A1111 and numpy take; torch's own limit is larger

# Settings that change the numbers a run computes; anything else (where samples go, how often state is saved)
# may differ between an interrupted run and its resume.
RESUME_SAFE_KEYS = ("save_state_every", "save_every_n_epochs", "sample_prompts", "sample_every_n_epochs",
                    "sample_steps", "sample_seed", "sample_guidance_scale", "latent_cache_dir")


# ---- presets -----------------------------------------------------------------------------------------------
def list_presets() -> dict[str, dict]:
    """Every shipped preset: ``{name: {"description", "family", "config"}}``, by name."""
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted(PRESETS_DIR.glob("*.json"))}


def load_preset(name: str) -> dict:
    """One preset by name; an unknown name lists the ones there are."""
    presets = list_presets()
    if name not in presets:
        raise TrainingError(f"unknown preset {name!r} (presets: {', '.join(presets)})")
    return presets[name]


# ---- layers ------------------------------------------------------------------------------------------------
def normalize_keys(layer: dict, source: str) -> dict:
    """Map aliases to canonical keys and reject unknown ones, naming the layer they came from."""
    if not isinstance(layer, dict):
        raise TrainingError(f"{source}: a training config must be a JSON object, got {type(layer).__name__}")
    out = {}
    unknown = []
    for key, value in layer.items():
        canon = ALIASES.get(key, key.replace("-", "_"))
        if canon not in DEFAULTS:
            unknown.append(key)
            continue
        out[canon] = value
    if unknown:
        raise TrainingError(
            f"{source}: unknown training setting(s) {', '.join(sorted(unknown))} "
            f"(known: {', '.join(sorted(DEFAULTS))})"
        )
    return out


def read_config_file(path: str | Path) -> dict:
    """A config file (JSON object), relative to the current folder; errors name the file as an absolute path."""
    p = Path(path).expanduser().absolute()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise TrainingError(f"config file {p} is a folder; give the JSON file of training settings") from None
    except UnicodeDecodeError as exc:
        raise TrainingError(f"config file {p}: not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON") from None
    except OSError as exc:
        raise TrainingError(f"config file {p} cannot be read: {exc.strerror}") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise TrainingError(f"config file {p}: nested too deeply to be training settings") from None
    except json.JSONDecodeError as exc:
        raise TrainingError(f"config file {p}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def parse_config_json(text: str) -> dict:
    """The ``--config`` flag's JSON object."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrainingError(f"--config: not valid JSON (column {exc.colno}: {exc.msg})") from None


def resolve_config(
    family: str,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    config: dict | str | None = None,
    overrides: dict | None = None,
    force: bool = False,
) -> dict:
    """The training config for a checkpoint of ``family`` (``sd15`` | ``sdxl``) from its layers.

    Precedence: :data:`DEFAULTS` < ``preset`` < ``config_file`` < ``config`` (dict or JSON text) <
    ``overrides`` (the explicit flags; ``None`` values are ignored). A preset made for the other family is an
    error unless ``force``.

    >>> cfg = resolve_config("sd15", preset="sd15-style", config={"rank": 8}, overrides={"lr": 3e-4, "steps": None})
    >>> cfg["rank"], cfg["alpha"], cfg["lr"], cfg["resolution"]
    (8, 8.0, 0.0003, 512)
    """
    resolved = dict(DEFAULTS)
    sources: list[tuple[str, dict]] = []
    if preset:
        data = load_preset(preset)
        if data.get("family") and data["family"] != family and not force:
            raise TrainingError(
                f"preset {preset!r} is for {data['family']} checkpoints, this checkpoint is {family} "
                "(pick another preset, or pass --force)"
            )
        sources.append((f"preset {preset!r}", data.get("config", {})))
    if config_file:
        sources.append((f"config file {config_file}", read_config_file(config_file)))
    if config:
        sources.append(("--config", parse_config_json(config) if isinstance(config, str) else config))
    if overrides:
        sources.append(("flags", {k: v for k, v in overrides.items() if v is not None}))
    for source, layer in sources:
        resolved.update(normalize_keys(layer, source))
    return finalize_config(resolved, family)


def finalize_config(cfg: dict, family: str) -> dict:
    """Fill the family-dependent defaults and check every value; returns a new dict."""
    cfg = dict(cfg)
    if cfg["resolution"] is None:
        cfg["resolution"] = FAMILY_RESOLUTION.get(family, 512)
    if cfg["vae_fp32"] is None:
        cfg["vae_fp32"] = family == "sdxl"
    # Settings filled from another one are not blamed for that one's bad value: the user gave the other.
    derived = set()
    for key in ("bucket_min_side", "bucket_max_side"):
        if cfg[key] is None:
            cfg[key] = max(cfg["bucket_step"], cfg["resolution"] // 2) if key == "bucket_min_side" else cfg["resolution"] * 2
            derived.add(key)
    for key, source in (("conv_rank", "rank"), ("conv_alpha", "alpha"), ("text_encoder_lr", "lr")):
        if cfg[key] is None:
            cfg[key] = cfg[source]
            derived.add(key)
    check_config(cfg, derived, max_side=FAMILY_RESOLUTION.get(family, 1024) * MAX_RESOLUTION_FACTOR)
    # Numbers from JSON may be ints where floats are meant; store one spelling so configs compare equal.
    for key in POSITIVE_FLOATS + NON_NEGATIVE_FLOATS + OPTIONAL_FLOATS + PROBABILITIES:
        if cfg[key] is not None:
            cfg[key] = float(cfg[key])
    return cfg


def check_config(cfg: dict, derived: set[str] | frozenset[str] = frozenset(), max_side: int | None = None) -> None:
    """Raise :class:`TrainingError` listing every bad value of a (complete) config. ``derived`` settings were
    filled from another one and are not reported; ``max_side`` bounds the image sizes."""
    problems = []

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    for key in POSITIVE_INTS:
        if not (is_int(cfg[key]) and cfg[key] > 0):
            problems.append(f"{key} must be a positive integer, got {cfg[key]!r}")
    for key in OPTIONAL_POSITIVE_INTS:
        if cfg[key] is not None and not (is_int(cfg[key]) and cfg[key] > 0):
            problems.append(f"{key} must be a positive integer or null, got {cfg[key]!r}")
    for key in NON_NEGATIVE_INTS:
        if not (is_int(cfg[key]) and cfg[key] >= 0):
            problems.append(f"{key} must be an integer >= 0, got {cfg[key]!r}")
    for key in POSITIVE_FLOATS:
        if not (is_num(cfg[key]) and cfg[key] > 0):
            problems.append(f"{key} must be a number > 0, got {cfg[key]!r}")
    for key in NON_NEGATIVE_FLOATS:
        if not (is_num(cfg[key]) and cfg[key] >= 0):
            problems.append(f"{key} must be a number >= 0, got {cfg[key]!r}")
    for key in OPTIONAL_FLOATS:
        if cfg[key] is not None and not (is_num(cfg[key]) and cfg[key] > 0):
            problems.append(f"{key} must be a positive number or null, got {cfg[key]!r}")
    for key in PROBABILITIES:
        if not (is_num(cfg[key]) and 0 <= cfg[key] < 1):
            problems.append(f"{key} must be a number in [0, 1), got {cfg[key]!r}")
    for key in BOOLS + ("vae_fp32",):
        if not isinstance(cfg[key], bool):
            problems.append(f"{key} must be true or false, got {cfg[key]!r}")
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            problems.append(f"{key} must be one of {', '.join(choices)}, got {cfg[key]!r}")
    if is_int(cfg["bucket_step"]) and cfg["bucket_step"] % 8:
        problems.append(f"bucket_step must be a multiple of 8 (the VAE's downscale), got {cfg['bucket_step']}")
    if is_int(cfg["resolution"]) and is_int(cfg["bucket_step"]) and cfg["resolution"] % cfg["bucket_step"]:
        problems.append(f"resolution {cfg['resolution']} must be a multiple of bucket_step {cfg['bucket_step']}")
    for key in ("seed", "sample_seed"):
        if is_int(cfg[key]) and cfg[key] > MAX_SEED:
            problems.append(f"{key} must be at most {MAX_SEED}, got {cfg[key]}")
    if max_side is not None:  # a bucket's long side may be twice the resolution (a 1:4 image of the same area)
        for key, limit in (("resolution", max_side), ("bucket_min_side", max_side), ("bucket_max_side", 2 * max_side)):
            if is_int(cfg[key]) and cfg[key] > limit:
                problems.append(f"{key} must be at most {limit} for this checkpoint family, got {cfg[key]}")
    if cfg["clip_skip"] == 0:
        problems.append("clip_skip must be >= 1")
    if not (isinstance(cfg["unet_target_modules"], list) and cfg["unet_target_modules"]
            and all(isinstance(m, str) and m for m in cfg["unet_target_modules"])):
        problems.append(f"unet_target_modules must be a non-empty list of module names, got {cfg['unet_target_modules']!r}")
    if not (isinstance(cfg["sample_prompts"], list) and all(isinstance(p, str) for p in cfg["sample_prompts"])):
        problems.append(f"sample_prompts must be a list of strings, got {cfg['sample_prompts']!r}")
    if not isinstance(cfg["background"], str) or parse_color(cfg["background"]) is None:
        problems.append(f"background must be a colour like '#ffffff', got {cfg['background']!r}")
    if cfg["latent_cache_dir"] is not None and not isinstance(cfg["latent_cache_dir"], str):
        problems.append(f"latent_cache_dir must be a path or null, got {cfg['latent_cache_dir']!r}")
    problems = [p for p in problems if p.split(" ", 1)[0] not in derived]
    if problems:
        raise TrainingError("invalid training config: " + "; ".join(problems))


def parse_color(value: str) -> tuple[int, int, int] | None:
    """``'#rrggbb'`` or ``'#rgb'`` -> ``(r, g, b)``; anything else -> None.

    >>> parse_color("#0f0"), parse_color("#808080"), parse_color("grey")
    ((0, 255, 0), (128, 128, 128), None)
    """
    m = re.fullmatch(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})", value.strip()) if isinstance(value, str) else None
    if not m:
        return None
    digits = m.group(1)
    if len(digits) == 3:
        digits = "".join(c * 2 for c in digits)
    return tuple(int(digits[i : i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def numeric_config_diff(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring :data:`RESUME_SAFE_KEYS`."""
    return sorted(k for k in set(a) | set(b) if k not in RESUME_SAFE_KEYS and a.get(k) != b.get(k))
