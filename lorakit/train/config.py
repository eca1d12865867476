"""Training configuration: defaults, presets (JSON data files in ``presets/``) and the precedence rules.

A resolved config is a flat dict of the settings declared in :mod:`lorakit.train.settings`; it is what the recipe reads and what the
release stores. Layers, later ones winning: defaults < preset < config file < ``--config`` JSON < explicit
flags. Everything here is pure (no torch), so the CLI can resolve and print a config without loading a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..families import Family
from ..families import get as get_family
from .settings import ALIASES, DEFAULTS, MAX_SEED, RESUME_SAFE_KEYS, SETTINGS, canonical_name, module_list, parse_color

__all__ = ["ALIASES", "DEFAULTS", "MAX_SEED", "RESUME_SAFE_KEYS", "TrainingError", "check_config", "finalize_config",
           "list_presets", "load_preset", "normalize_keys", "numeric_config_diff", "parse_color", "parse_config_json",
           "read_config_file", "requested_settings", "resolve_config", "resumed_config"]

PRESETS_DIR = Path(__file__).parent / "presets"


MAX_RESOLUTION_FACTOR = 4  # sizes up to 4x the family's native side (2048 for SD1.5, 4096 for SDXL)


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
        canon = canonical_name(key)
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
    family: str | Family,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    config: dict | str | None = None,
    overrides: dict | None = None,
    force: bool = False,
) -> dict:
    """The training config for a checkpoint of ``family`` (a family or its name) from its layers.

    Precedence: :data:`DEFAULTS` < ``preset`` < ``config_file`` < ``config`` (dict or JSON text) <
    ``overrides`` (the explicit flags; ``None`` values are ignored). A preset made for the other family is an
    error unless ``force``.

    >>> cfg = resolve_config("sd15", preset="sd15-style", config={"rank": 8}, overrides={"lr": 3e-4, "steps": None})
    >>> cfg["rank"], cfg["alpha"], cfg["lr"], cfg["resolution"]
    (8, 8.0, 0.0003, 512)
    """
    given = requested_settings(family, preset=preset, config_file=config_file, config=config, overrides=overrides,
                               force=force)
    return finalize_config({**DEFAULTS, **given}, family)


def requested_settings(
    family: str | Family,
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    config: dict | str | None = None,
    overrides: dict | None = None,
    force: bool = False,
) -> dict:
    """The settings the layers name, by canonical name, later layers winning, nothing filled in: what was asked
    for, as opposed to a resolved config (see :func:`resolve_config` for the layers).

    >>> requested_settings("sd15", config={"learning_rate": 1e-3}, overrides={"rank": 8, "steps": None})
    {'lr': 0.001, 'rank': 8}
    """
    given: dict = {}
    sources: list[tuple[str, dict]] = []
    family = get_family(family)
    if preset:
        data = load_preset(preset)
        if data.get("family") and data["family"] != family.name and not force:
            raise TrainingError(
                f"preset {preset!r} is for {data['family']} checkpoints, this checkpoint is {family.name} "
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
        given.update(normalize_keys(layer, source))
    return given


def finalize_config(cfg: dict, family: str | Family) -> dict:
    """Fill the family-dependent defaults (resolution, VAE dtype) and check every value; returns a new dict."""
    cfg, family = dict(cfg), get_family(family)
    if cfg["resolution"] is None:
        cfg["resolution"] = family.native_resolution
    if cfg["vae_fp32"] is None:
        cfg["vae_fp32"] = family.vae_fp32
    if cfg["train_conv"] is None:
        cfg["train_conv"] = cfg["network_type"] == "locon"
    # A module set is stored as the names it stands for, so a release says exactly what it adapted.
    for s in SETTINGS:
        if s.kind == "modules" and isinstance(cfg[s.name], str) and cfg[s.name] in s.choices:
            cfg[s.name] = module_list(s.name, cfg[s.name])
    # Settings filled from another one are not blamed for that one's bad value: the user gave the other.
    derived = set()
    for key in ("bucket_min_side", "bucket_max_side"):
        if cfg[key] is None:
            cfg[key] = max(cfg["bucket_step"], cfg["resolution"] // 2) if key == "bucket_min_side" else cfg["resolution"] * 2
            derived.add(key)
    for s in SETTINGS:
        if s.derived_from and cfg[s.name] is None:
            cfg[s.name] = cfg[s.derived_from]
            derived.add(s.name)
    check_config(cfg, derived, max_side=family.native_resolution * MAX_RESOLUTION_FACTOR)
    # Numbers from JSON may be ints where floats are meant; store one spelling so configs compare equal.
    for s in SETTINGS:
        if s.kind == "float" and _is_plain_number(cfg[s.name]):
            cfg[s.name] = float(cfg[s.name])
    return cfg


def check_config(cfg: dict, derived: set[str] | frozenset[str] = frozenset(), max_side: int | None = None) -> None:
    """Raise :class:`TrainingError` listing every bad value of a (complete) config. ``derived`` settings were
    filled from another one and are not reported; ``max_side`` bounds the image sizes."""
    problems = [p for s in SETTINGS if s.name not in derived and (p := s.problem(cfg[s.name]))]
    problems += [p for p in _cross_problems(cfg, max_side) if p.split(" ", 1)[0] not in derived]
    if problems:
        raise TrainingError("invalid training config: " + "; ".join(problems))


def _cross_problems(cfg: dict, max_side: int | None) -> list[str]:
    """The rules between settings (each setting's own bounds are in its declaration)."""
    problems = []
    step, resolution = cfg["bucket_step"], cfg["resolution"]
    if _is_int(step) and step % 8:
        problems.append(f"bucket_step must be a multiple of 8 (the VAE's downscale), got {step}")
    if _is_int(resolution) and _is_int(step) and step > 0 and resolution % step:
        problems.append(f"resolution {resolution} must be a multiple of bucket_step {step}")
    if max_side is not None:  # a bucket's long side may be twice the resolution (a 1:4 image of the same area)
        for key, limit in (("resolution", max_side), ("bucket_min_side", max_side), ("bucket_max_side", 2 * max_side)):
            if _is_int(cfg[key]) and cfg[key] > limit:
                problems.append(f"{key} must be at most {limit} for this checkpoint family, got {cfg[key]}")
    if cfg["network_type"] == "locon" and cfg["train_conv"] is False:
        problems.append("train_conv must be true for network_type locon (LoRA on the convolutions too); drop "
                        "train_conv, or use network_type lora")
    if cfg["network_type"] in ("loha", "lokr") and _is_plain_number(cfg["lora_dropout"]) and cfg["lora_dropout"] > 0:
        problems.append(f"lora_dropout must be 0 for network_type {cfg['network_type']} (LyCORIS' {cfg['network_type']} "
                        "has no dropout on its path); set it to 0, or use lora, dora or locon")
    if cfg["early_stop_patience"] is not None and not cfg["validation"]:
        problems.append("early_stop_patience needs validation true: the scores decide when to stop")
    if cfg["validation_split"] and not cfg["validation"]:
        problems.append("validation_split needs validation true (the held-out images are only scored)")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_plain_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def numeric_config_diff(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two resolved configs, ignoring :data:`RESUME_SAFE_KEYS`."""
    return sorted(k for k in set(a) | set(b) if k not in RESUME_SAFE_KEYS and a.get(k) != b.get(k))


def resumed_config(stored: dict, requested: dict, family: str | Family) -> tuple[dict, list[str]]:
    """A resumed run's config, ``stored`` with the ``requested`` settings (see :func:`requested_settings`)
    applied, and the requested settings that would change the numbers the run computes (only resume-safe ones
    may change). Settings not requested keep the run's own values, whatever a preset or default says now.

    >>> stored = resolve_config("sd15", config={"rank": 8})
    >>> cfg, changed = resumed_config(stored, {"validation_every": 3, "lr": 1e-4}, "sd15")
    >>> cfg["validation_every"], cfg["rank"], changed
    (3, 8, [])
    >>> resumed_config(stored, {"rank": 4}, "sd15")[1]
    ['rank']
    """
    asked = finalize_config({**stored, **requested}, family)
    return asked, [k for k in numeric_config_diff(asked, stored) if k in requested]
