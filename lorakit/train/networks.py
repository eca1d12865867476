"""What gets trained: which modules of the UNet and text encoders get an adapter, with which rank.

The module sets themselves are data in :mod:`lorakit.train.settings` (``unet_target_modules``,
``text_encoder_target_modules``, ``conv_target_modules``). Here they meet a model: :func:`select_targets` is the
one answer to "which modules, at which rank", used by the recipe on the real model and by :func:`module_counts`
on a model built on the ``meta`` device (no weights allocated), which is what ``--dry-run`` prints.

kohya's rank rule: Linear layers and 1x1 convolutions take ``rank``/``alpha``; convolutions with a larger
kernel take ``conv_rank``/``conv_alpha``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..families import Family
from .settings import TEXT_ENCODER_MODULE_SETS, UNET_MODULE_SETS


@dataclass(frozen=True)
class Target:
    """One module that gets an adapter: its path in the model, its rank and alpha, and whether it is a
    convolution with a kernel larger than 1x1."""

    path: str
    rank: int
    alpha: float
    spatial_conv: bool = False


def matches(path: str, names: Iterable[str]) -> bool:
    """Whether a module path ends with one of ``names`` (whole dotted parts).

    >>> matches("down_blocks.0.attentions.0.proj_in", ["proj_in"]), matches("x.to_out.0", ["out.0"])
    (True, False)
    """
    return any(path == n or path.endswith("." + n) for n in names)


def select_targets(named_modules: Iterable[tuple[str, Any]], names: Iterable[str], cfg: dict, *,
                   conv_names: Iterable[str] = ()) -> list[Target]:
    """The Linear and Conv2d modules whose path ends with one of ``names`` (or of ``conv_names``, the
    convolution side ``train_conv`` adds), in module order, with kohya's rank rule."""
    import torch

    names, conv_names = list(names), list(conv_names)
    targets = []
    for path, module in named_modules:
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        if not (matches(path, names) or (conv_names and matches(path, conv_names))):
            continue
        spatial = isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)
        if spatial:
            targets.append(Target(path, cfg["conv_rank"], float(cfg["conv_alpha"]), True))
        else:
            targets.append(Target(path, cfg["rank"], float(cfg["alpha"])))
    return targets


def unknown_names(named_modules: Iterable[tuple[str, Any]], names: Iterable[str]) -> list[str]:
    """The ``names`` that end the path of no Linear or Conv2d module (a typo, or another architecture's name)."""
    import torch

    paths = [p for p, m in named_modules if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    return [n for n in names if not any(matches(p, [n]) for p in paths)]


def adaptable_leaves(named_modules: Iterable[tuple[str, Any]]) -> list[str]:
    """Short names of the Linear and Conv2d modules, for an error message that says what there is: the
    attention and feed-forward names first (what a module list usually names), then the rest."""
    import torch

    paths = [p for p, m in named_modules if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    common = [n for n in (*UNET_MODULE_SETS["kohya"], *TEXT_ENCODER_MODULE_SETS["kohya"])
              if any(matches(p, [n]) for p in paths)]
    rest = set()
    for path in paths:
        if not matches(path, common):
            parts = path.split(".")
            rest.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return common + sorted(rest)


def unet_targets(unet: Any, cfg: dict) -> list[Target]:
    """The UNet modules a run adapts: ``unet_target_modules``, plus ``conv_target_modules`` with ``train_conv``."""
    conv = cfg["conv_target_modules"] if cfg["train_conv"] else []
    return select_targets(unet.named_modules(), cfg["unet_target_modules"], cfg, conv_names=conv)


def text_encoder_targets(encoder: Any, cfg: dict) -> list[Target]:
    """The text-encoder modules a run adapts (``text_encoder_target_modules``)."""
    return select_targets(encoder.named_modules(), cfg["text_encoder_target_modules"], cfg)


def module_counts(config_folder: str | Path, family: str | Family, cfg: dict) -> dict[str, int]:
    """How many modules of each model a run with ``cfg`` adapts (the text encoders only when they are trained),
    counted on the architecture built on the ``meta`` device."""
    from ..families import get as get_family
    from ..models.loading import models_from_config

    family = get_family(family)
    models = models_from_config(config_folder, family.name)
    counts = {family.denoiser: len(unet_targets(models.pop(family.denoiser), cfg))}
    if cfg["train_text_encoder"]:
        counts.update({name: len(text_encoder_targets(encoder, cfg)) for name, encoder in models.items()})
    return counts


def network_config(targets: list[Target], cfg: dict) -> Any:
    """The peft config that puts ``network_type``'s adapters on ``targets``, in LyCORIS' layout for the
    LyCORIS types: LoHa and LoKr flatten a convolution's kernel into its matrices (``use_effective_conv2d``
    off is LyCORIS' default, no Tucker core), and LoKr keeps its first factor a full matrix
    (``decompose_both`` off) and splits dimensions by ``lokr_factor`` (LyCORIS' ``factor``, -1 when unset)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    paths = [t.path for t in targets]
    # peft takes one rank and alpha plus per-module exceptions: the exceptions are kohya's conv rank rule.
    shape = {"r": cfg["rank"], "target_modules": paths,
             "rank_pattern": {t.path: t.rank for t in targets if t.rank != cfg["rank"]},
             "alpha_pattern": {t.path: t.alpha for t in targets if t.alpha != float(cfg["alpha"])}}
    network = cfg["network_type"]
    if network == "loha":
        return LoHaConfig(alpha=cfg["alpha"], use_effective_conv2d=False, **shape)
    if network == "lokr":
        factor = cfg.get("lokr_factor")
        # init_weights="lycoris": the first factor random, the second zero, as LyCORIS starts a LoKr.
        return LoKrConfig(alpha=cfg["alpha"], use_effective_conv2d=False, decompose_both=False,
                          decompose_factor=-1 if factor is None else int(factor), init_weights="lycoris", **shape)
    return LoraConfig(lora_alpha=cfg["alpha"], lora_dropout=cfg["lora_dropout"], use_dora=network == "dora", **shape)


def add_network(model: Any, targets: list[Target], cfg: dict) -> None:
    """Put the run's adapters (``network_type``) on ``targets`` of ``model``, as peft layers."""
    from ..errors import TrainingError

    if not targets:
        raise TrainingError("the module sets match no Linear or Conv2d module of this model; check "
                            "unet_target_modules / text_encoder_target_modules")
    if cfg["network_type"] in ("loha", "lokr") and cfg["lora_dropout"]:
        # LyCORIS has no dropout for these either; silently training without it would misreport the run.
        raise TrainingError(f"lora_dropout {cfg['lora_dropout']} has no meaning for network_type "
                            f"{cfg['network_type']} (LyCORIS' LoHa and LoKr have no dropout); set lora_dropout 0")
    model.add_adapter(network_config(targets, cfg))
