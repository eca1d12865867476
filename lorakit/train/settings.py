"""Every training setting, declared once.

A :class:`Setting` says what a setting is (its default, kind and bounds), what it means (``help``), the names
other trainers give it (kohya's, diffusers'), whether an interrupted run may be resumed with another value,
its ``lorakit lora train`` flag and whether the wizard's Advanced page shows it. Everything else is derived
from :data:`SETTINGS`: the defaults, the alias table, the validation, the CLI flags, the wizard's fields and the
resume-safe list. Adding a setting is one entry here plus its use in the recipe.

Pure: no torch, no argparse at import time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

ADAPTERS = ("native", "manual", "kohya_ss")
NETWORK_TYPES = ("lora", "dora", "locon", "loha", "lokr")
_NOT_GIVEN: Any = object()

# Module sets: which layers get an adapter, by the end of their module path. "kohya" is what kohya sd-scripts'
# LoRA adapts (every Linear and 1x1 convolution of each Transformer2DModel; of CLIP, the attention and MLP
# layers), so a preset copied from a kohya config trains what it trained there.
UNET_MODULE_SETS: dict[str, tuple[str, ...]] = {
    "kohya": ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
}
TEXT_ENCODER_MODULE_SETS: dict[str, tuple[str, ...]] = {
    "kohya": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
# kohya's conv LoRA (conv_dim) adds every Linear and Conv2d of each ResnetBlock2D, Downsample2D and Upsample2D;
# LyCORIS' full preset adds conv_in, conv_out and the time embedding to that.
_KOHYA_CONV = ("conv1", "conv2", "time_emb_proj", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv")
CONV_MODULE_SETS: dict[str, tuple[str, ...]] = {
    "kohya": _KOHYA_CONV,
    "full": _KOHYA_CONV + ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"),
    "3x3": ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"),
}
MAX_SEED = 2**32 - 1  # what kohya, A1111 and numpy take; torch's own limit is larger
# Bounds of settings whose larger values can only hang a run or exhaust its memory:
MAX_STEPS = 1_000_000      # optimizer steps of one run (a LoRA takes thousands)
MAX_TIMESTEPS = 1000       # the SD schedules' training timesteps: more draws or denoising steps than this repeat them
MAX_REPEATS = 1000         # an epoch lists every image this many times
MAX_RANK = 1024            # wider than the narrowest layer an adapter goes on (320 in SD1.5 and SDXL)


@dataclass(frozen=True)
class Setting:
    """One training setting.

    ``kind`` is ``int``, ``float``, ``bool``, ``choice``, ``modules`` (a non-empty list of module names),
    ``prompts`` (a list of strings), ``colour`` or ``path``; a ``modules`` setting also takes the name of one of its ``choices`` (a module set). ``bound`` is ``positive``, ``non_negative`` or
    ``probability`` (``[0, 1)``). ``optional`` settings may be ``null`` in a resolved config; ``derived_from``
    names the setting a ``null`` is filled from. ``flag`` is the ``lorakit lora train`` option (``adapters``
    say which trainers take it); ``kohya`` is the name sd-scripts gives it; ``wizard`` is the label on the
    wizard's Advanced page (``None``: not shown there). ``absent_means`` is what a stored config written
    before the setting existed meant by leaving it out (when that is not the default), so a resumed run
    trains what it started training.
    """

    name: str
    default: Any
    kind: str
    help: str
    group: str
    bound: str | None = None
    optional: bool = False
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    derived_from: str | None = None
    resume_safe: bool = False
    flag: str | None = None
    adapters: tuple[str, ...] = ADAPTERS
    kohya: str | None = None
    wizard: str | None = None
    absent_means: Any = _NOT_GIVEN

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` for this setting, or ``None``: the message starts with the name."""
        if value is None and self.optional:
            return None
        expected = _EXPECTED.get((self.kind, self.bound, self.optional))
        if self.kind == "choice":
            return None if value in self.choices else f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        if self.kind in ("int", "float"):
            number = _is_int(value) if self.kind == "int" else _is_number(value)
            low_ok = number and {"positive": value > 0, "non_negative": value >= 0,
                                 "probability": 0 <= value < 1, None: True}[self.bound]
            if not low_ok:
                return f"{self.name} must be {expected}, got {value!r}"
            if self.maximum is not None and value > self.maximum:
                return f"{self.name} must be at most {self.maximum}, got {value}"
            return None
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"{self.name} must be true or false, got {value!r}"
        if self.kind == "modules":
            ok = (value in self.choices if isinstance(value, str)
                  else isinstance(value, list) and value and all(isinstance(m, str) and m for m in value))
            return None if ok else (f"{self.name} must be a module set ({', '.join(self.choices)}) or a non-empty "
                                    f"list of module names, got {value!r}")
        if self.kind == "prompts":
            ok = isinstance(value, list) and all(isinstance(p, str) for p in value)
            return None if ok else f"{self.name} must be a list of strings, got {value!r}"
        if self.kind == "colour":
            ok = isinstance(value, str) and parse_color(value) is not None
            return None if ok else f"{self.name} must be a colour like '#ffffff', got {value!r}"
        if self.kind == "path":
            return None if isinstance(value, str) else f"{self.name} must be a path or null, got {value!r}"
        raise ValueError(f"setting {self.name}: unknown kind {self.kind!r}")


# How each (kind, bound, optional) is described in a message.
_EXPECTED: dict[tuple[str, str | None, bool], str] = {
    ("int", "positive", False): "a positive integer",
    ("int", "positive", True): "a positive integer or null",
    ("int", "non_negative", False): "an integer >= 0",
    ("float", "positive", False): "a number > 0",
    ("float", "positive", True): "a positive number or null",
    ("float", "non_negative", False): "a number >= 0",
    ("float", "probability", False): "a number in [0, 1)",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
    return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


S = Setting
SETTINGS: tuple[Setting, ...] = (
    # ---- data ----
    S("resolution", None, "int", "square side in px; buckets keep the area <= resolution**2 "
      "(default: 512 for SD1.5, 1024 for SDXL)", "data", bound="positive", optional=True,
      flag="--resolution", kohya="resolution", wizard="resolution"),
    S("bucket_step", 64, "int", "bucket sides are multiples of this", "data", bound="positive",
      aliases=("bucket_reso_steps",)),
    S("bucket_min_side", None, "int", "shortest bucket side (default: resolution // 2)", "data", bound="positive",
      optional=True, aliases=("min_bucket_reso",)),
    S("bucket_max_side", None, "int", "longest bucket side (default: resolution * 2)", "data", bound="positive",
      optional=True, aliases=("max_bucket_reso",)),
    S("bucket_no_upscale", False, "bool", "small images are cropped to a bucket of their own size instead of "
      "upscaled", "data"),
    S("background", "#ffffff", "colour", "alpha is composited onto this colour", "data"),
    S("repeats", 1, "int", "each image is seen this many times per epoch", "data", bound="positive",
      maximum=MAX_REPEATS, aliases=("num_repeats",)),
    S("shuffle_tags", False, "bool", "shuffle the comma-separated tags of each caption, every time it is used",
      "data", aliases=("shuffle_caption",)),
    S("keep_tokens", 0, "int", "... keeping the first N tags in place (trigger words)", "data", bound="non_negative"),
    S("caption_dropout", 0.0, "float", "probability of training on the empty caption", "data", bound="probability",
      aliases=("caption_dropout_rate",)),
    S("clip_skip", 1, "int", "SD1.5 only: use the output of the N-th last text encoder layer", "data",
      bound="positive"),
    S("cache_latents", True, "bool", "VAE latents computed once (and kept on disk), not every step", "data"),
    S("cache_text_embeddings", True, "bool", "when the text encoders are frozen and captions fixed", "data"),
    S("latent_cache_dir", None, "path", "where latents are cached (default: <dataRoot>/.lorakit/cache/latents)",
      "data", optional=True, resume_safe=True),
    # ---- network ----
    S("rank", 16, "int", "LoRA rank (network dim)", "network", bound="positive", maximum=MAX_RANK,
      aliases=("network_dim", "lora_rank"), flag="--rank", kohya="network_dim", wizard="rank"),
    S("alpha", 8.0, "float", "LoRA alpha; the update is scaled by alpha / rank", "network", bound="positive",
      aliases=("network_alpha", "lora_alpha"), flag="--alpha", kohya="network_alpha", wizard="alpha"),
    S("network_type", "lora", "choice", "lora; dora (LoRA with weight decomposition); locon (LoRA on the "
      "convolutions too); loha; lokr", "network", choices=NETWORK_TYPES, flag="--network-type",
      adapters=("native", "kohya_ss")),
    S("unet_target_modules", "kohya", "modules", "UNet modules that get an adapter: a module set (kohya: attention, "
      "proj_in/proj_out and feed-forward of every transformer block; attention: to_q/to_k/to_v/to_out.0 only) "
      "or a list of names, each the end of a module path", "network", choices=tuple(UNET_MODULE_SETS)),
    S("train_conv", None, "bool", "also the UNet's ResNet blocks and resamplers (conv_target_modules) "
      "(default: true for locon, false otherwise)", "network", optional=True),
    S("conv_target_modules", "kohya", "modules", "the convolution-side modules train_conv adds: a module set "
      "(kohya: conv1/conv2, time_emb_proj and conv_shortcut of every ResNet block, and the resamplers; full: "
      "those plus conv_in, conv_out and the time embedding; 3x3: only the 3x3 convolutions) or a list of names",
      "network", choices=tuple(CONV_MODULE_SETS), absent_means=list(CONV_MODULE_SETS["3x3"])),
    S("conv_rank", None, "int", "rank of the convolution adapters with a kernel larger than 1x1 (default: rank)",
      "network", bound="positive", optional=True, maximum=MAX_RANK, derived_from="rank", aliases=("conv_dim",)),
    S("conv_alpha", None, "float", "alpha of those convolution adapters (default: alpha)", "network",
      bound="positive", optional=True, derived_from="alpha"),
    S("lokr_factor", None, "int", "lokr only: the Kronecker factor of each dimension (default: the most balanced "
      "split, LyCORIS' factor -1)", "network", bound="positive", optional=True, aliases=("factor",)),
    S("train_text_encoder", False, "bool", "also train LoRAs on the text encoder(s)", "network"),
    S("text_encoder_target_modules", "kohya", "modules", "text-encoder modules that get an adapter: a module set "
      "(kohya: q/k/v/out_proj and mlp fc1/fc2; attention: q/k/v/out_proj only) or a list of names", "network",
      choices=tuple(TEXT_ENCODER_MODULE_SETS), absent_means=list(TEXT_ENCODER_MODULE_SETS["attention"])),
    S("text_encoder_lr", None, "float", "learning rate of the text encoder LoRAs (default: lr)", "network",
      bound="positive", optional=True, derived_from="lr"),
    S("lora_dropout", 0.0, "float", "dropout on the LoRA path", "network", bound="probability"),
    # ---- optimisation ----
    S("steps", None, "int", "optimizer steps (default: epochs x steps per epoch)", "optimisation", bound="positive",
      optional=True, maximum=MAX_STEPS, aliases=("max_train_steps",), flag="--steps", kohya="max_train_steps",
      wizard="steps (0: epochs)"),
    S("epochs", 1, "int", "passes over the dataset (when steps is not set)", "optimisation", bound="positive",
      maximum=MAX_STEPS, aliases=("max_train_epochs", "num_train_epochs"), flag="--epochs", kohya="max_train_epochs",
      wizard="epochs"),
    S("batch_size", 1, "int", "batch size per process", "optimisation", bound="positive",
      aliases=("train_batch_size", "batch"), flag="--batch", kohya="train_batch_size", wizard="batch size"),
    S("gradient_accumulation_steps", 1, "int", "micro-batches per optimizer step", "optimisation",
      bound="positive", aliases=("gradient_accumulation",)),
    S("lr", 1e-4, "float", "learning rate of the UNet LoRAs", "optimisation", bound="positive",
      aliases=("learning_rate", "unet_lr"), flag="--lr", kohya="learning_rate", wizard="learning rate"),
    S("lr_scheduler", "cosine", "choice", "learning-rate schedule after a linear warm-up", "optimisation",
      choices=("cosine", "constant")),
    S("lr_warmup_steps", 0, "int", "steps of linear warm-up", "optimisation", bound="non_negative",
      aliases=("lr_warmup",)),
    S("optimizer", "auto", "choice", "auto: AdamW, 8-bit when bitsandbytes and CUDA are there", "optimisation",
      choices=("auto", "adamw", "adamw8bit")),
    S("weight_decay", 1e-2, "float", "AdamW weight decay", "optimisation", bound="non_negative",
      aliases=("adam_weight_decay",)),
    S("adam_beta1", 0.9, "float", "AdamW beta1", "optimisation", bound="probability"),
    S("adam_beta2", 0.999, "float", "AdamW beta2", "optimisation", bound="probability"),
    S("adam_epsilon", 1e-8, "float", "AdamW epsilon", "optimisation", bound="non_negative"),
    S("max_grad_norm", 1.0, "float", "gradient clipping norm (0 turns clipping off)", "optimisation",
      bound="non_negative"),
    S("min_snr_gamma", None, "float", "min-SNR weighting gamma, e.g. 5 (null turns it off)", "optimisation",
      bound="positive", optional=True, aliases=("snr_gamma",)),
    S("noise_offset", 0.0, "float", "noise offset strength", "optimisation", bound="non_negative",
      aliases=("noise_offset_strength",)),
    S("ip_noise_gamma", 0.0, "float", "input perturbation (Ning et al. 2023): extra noise on the noisy latents "
      "only, e.g. 0.1 (0 turns it off)", "optimisation", bound="non_negative", kohya="ip_noise_gamma"),
    S("mixed_precision", "auto", "choice", "auto: bf16/fp16 on a GPU, fp32 on the CPU", "optimisation",
      choices=("auto", "no", "fp16", "bf16"), flag="--mixed-precision", kohya="mixed_precision"),
    S("gradient_checkpointing", False, "bool", "trade compute for memory", "optimisation"),
    S("vae_fp32", None, "bool", "keep the VAE in fp32 (default: true for SDXL, whose VAE overflows in fp16)",
      "optimisation"),
    S("tf32", True, "bool", "TF32 tensor cores for fp32 matmuls and convolutions on NVIDIA GPUs (no effect on a "
      "CPU)", "optimisation", absent_means=False),
    S("channels_last", False, "bool", "channels-last memory layout for the UNet on a GPU", "optimisation",
      resume_safe=True),
    S("compile_unet", False, "bool", "torch.compile the UNet's training forward (the first step pays the compile "
      "time)", "optimisation", resume_safe=True),
    S("seed", 42, "int", "seed of every random draw of the run", "optimisation", bound="non_negative",
      maximum=MAX_SEED, flag="--seed", kohya="seed"),
    # ---- validation ----
    S("validation", True, "bool", "score base model and LoRA on fixed (noise, timestep) draws at the start and "
      "during training; the release records the drop", "validation", absent_means=False),
    S("validation_split", 0.0, "float", "hold out this fraction of the assets (by asset, seeded by "
      "validation_seed) and score them; 0 scores the training images", "validation", bound="probability",
      flag="--validation-split", adapters=("native",)),
    S("validation_draws", 4, "int", "seeded (noise, timestep) draws per image, the timesteps spread evenly over the "
      "schedule", "validation", bound="positive", maximum=MAX_TIMESTEPS),
    S("validation_every", None, "int", "optimizer steps between scores (default: every epoch, or every k-th epoch "
      "so that a run has at most 10 scores and they cost at most 10% of its training compute)", "validation", bound="positive", optional=True, resume_safe=True),
    S("validation_seed", 0, "int", "seed of the hold-out and the draws; keep it to compare releases of one LoRA",
      "validation", bound="non_negative", maximum=MAX_SEED),
    S("early_stop_patience", None, "int", "stop after this many scores without a lower loss, and keep the best "
      "score's weights (null: train every step)", "validation", bound="positive", optional=True),
    # ---- output ----
    S("save_every_n_epochs", None, "int", "also write <lora>-<epoch>.safetensors every N epochs", "output",
      bound="positive", optional=True, resume_safe=True, flag="--save-every-n-epochs", kohya="save_every_n_epochs"),
    S("save_state_every", 100, "int", "steps between resumable states (0: only on Ctrl-C)", "output",
      bound="non_negative", aliases=("save_every_n_steps_state",), resume_safe=True, flag="--save-state-every",
      adapters=("native",)),
    S("sample_prompts", [], "prompts", "render these after each epoch (fixed seeds)", "output", resume_safe=True),
    S("sample_every_n_epochs", 1, "int", "epochs between sample renders", "output", bound="positive",
      resume_safe=True),
    S("sample_steps", 20, "int", "denoising steps of a sample", "output", bound="positive", maximum=MAX_TIMESTEPS,
      resume_safe=True),
    S("sample_seed", 0, "int", "seed of the first sample prompt (the next ones count up)", "output",
      bound="non_negative", maximum=MAX_SEED, resume_safe=True),
    S("sample_guidance_scale", 7.0, "float", "classifier-free guidance of the samples", "output",
      bound="non_negative", resume_safe=True),
)
del S

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
# Every key a config may set, with its default. None means "decided from the checkpoint or another setting".
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}
# Names other trainers use, so a kohya or diffusers config file mostly just works.
ALIASES: dict[str, str] = {alias: s.name for s in SETTINGS for alias in s.aliases}
# Settings that do not change the numbers a run computes: they may differ between a run and its resume.
RESUME_SAFE_KEYS: tuple[str, ...] = tuple(s.name for s in SETTINGS if s.resume_safe)
# What a stored config that lacks a key (written before the setting existed) meant by it.
ABSENT_MEANS: dict[str, Any] = {s.name: s.absent_means for s in SETTINGS if s.absent_means is not _NOT_GIVEN}
FLAGGED: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.flag)
WIZARD_FIELDS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.wizard)


def module_list(setting: str, value: str | list[str]) -> list[str]:
    """The module names a ``modules`` setting's value stands for (a set name, or the list itself).

    >>> module_list("text_encoder_target_modules", "attention")
    ['q_proj', 'k_proj', 'v_proj', 'out_proj']
    >>> module_list("unet_target_modules", ["to_q", "ff.net.2"])
    ['to_q', 'ff.net.2']
    """
    sets = {"unet_target_modules": UNET_MODULE_SETS, "text_encoder_target_modules": TEXT_ENCODER_MODULE_SETS,
            "conv_target_modules": CONV_MODULE_SETS}[setting]
    return list(sets[value]) if isinstance(value, str) else list(value)


def is_module_set(setting: str, value: Any) -> bool:
    """Whether a (resolved) ``modules`` value is one of the shipped sets rather than a list someone wrote.

    >>> is_module_set("unet_target_modules", ["to_q", "to_k", "to_v", "to_out.0"]), is_module_set("unet_target_modules", ["to_q"])
    (True, False)
    """
    return any(module_list(setting, name) == value for name in BY_NAME[setting].choices) or value in BY_NAME[setting].choices


def canonical_name(key: str) -> str:
    """The setting a config key names: an alias (kohya, diffusers) or a dashed spelling maps to the setting.

    >>> canonical_name("learning_rate"), canonical_name("batch"), canonical_name("save-state-every")
    ('lr', 'batch_size', 'save_state_every')
    """
    return ALIASES.get(key, key.replace("-", "_"))


def add_setting_flags(parser: Any) -> None:
    """The settings' flags on an argparse parser (``lorakit lora train``), as one argument group."""
    group = parser.add_argument_group("settings (override the preset and config)")
    for s in FLAGGED:
        assert s.flag is not None
        kwargs: dict[str, Any] = {"dest": s.name, "help": s.help + _only_for(s),
                                  "metavar": s.flag.lstrip("-").upper().replace("-", "_")}
        if s.kind == "choice":
            kwargs["choices"], kwargs["metavar"] = s.choices, None
        else:
            kwargs["type"] = int if s.kind == "int" else float
        group.add_argument(s.flag, **kwargs)


def _only_for(s: Setting) -> str:
    return "" if s.adapters == ADAPTERS else f" ({', '.join(s.adapters)} only)"


def flag_values(args: Any) -> dict[str, Any]:
    """The settings given as flags (an argparse namespace), by setting name; ``None``: not given."""
    return {s.name: getattr(args, s.name, None) for s in FLAGGED}
