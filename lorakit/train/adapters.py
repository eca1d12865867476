"""``train_lora(..., adapter=...)``: one entry point for the three trainers.

- ``native``: lorakit's own recipe (:mod:`lorakit.train.recipe`), diffusers + peft + accelerate;
- ``kohya_ss``: kohya's sd-scripts, installed by ``lorakit lora setup`` (:mod:`lorakit.train.kohya`);
- ``manual``: weights trained elsewhere, recorded with their dataset and settings (:mod:`lorakit.train.manual`).

All three start from :func:`lorakit.train.inputs.resolve_run_inputs` and record the same kind of ``candidate``
release. The options only some adapters take are listed in :data:`ADAPTER_OPTIONS`; giving one to another
adapter is an error, not silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..workspace import Workspace
from .settings import ADAPTERS, BY_NAME, canonical_name

# The options only some adapters take, by keyword (the CLI flag is the keyword with dashes).
ADAPTER_OPTIONS: dict[str, tuple[str, ...]] = {
    "preset": ("native",), "resume": ("native",), "cpu": ("native",), "progress": ("native",),
    "on_step": ("native",),
    **{name: ("manual",) for name in ("weights_kind", "weights_base", "weights_path", "weights_uri", "sha256")},
    **{name: ("kohya_ss",) for name in ("adapter_args", "accelerate_config", "root", "echo")},
}
# What an option is when not given (a given option differs from it).
_NOT_GIVEN: dict[str, Any] = {"resume": False, "cpu": False, "progress": True}


def misused_options(adapter: str, options: dict[str, Any], overrides: dict | None = None) -> list[str]:
    """The options (and settings) given that ``adapter`` does not take, by keyword (pure).

    >>> misused_options("manual", {"resume": True, "cpu": False, "weights_kind": "external"})
    ['resume']
    >>> misused_options("kohya_ss", {}, {"save_state_every": 10, "rank": 4})
    ['save_state_every']
    """
    wrong = [name for name, value in options.items()
             if adapter not in ADAPTER_OPTIONS.get(name, ADAPTERS) and value not in (None, _NOT_GIVEN.get(name))]
    for key, value in (overrides or {}).items():
        setting = BY_NAME.get(canonical_name(key))
        if value is not None and setting is not None and adapter not in setting.adapters:
            wrong.append(setting.name)
    return wrong


def train_lora(
    ws: Workspace | str | Path | None,
    lora: str,
    dataset: str | Path | None = None,
    *,
    adapter: str = "native",
    **options: Any,
) -> Any:
    """Train (or, for ``manual``, record) a release of LoRA ``lora`` on ``dataset`` with ``adapter``.

    The options every adapter takes: ``project``, ``scope``, ``release_id``, ``set_active``, ``notes``,
    ``config``, ``config_file``, ``overrides`` (settings by name), ``force`` and ``dry_run``; the others are in
    :data:`ADAPTER_OPTIONS`. Returns the adapter's result: a :class:`~lorakit.train.recipe.TrainResult`
    (native), a :class:`~lorakit.train.kohya.KohyaRunResult` or a :class:`~lorakit.train.manual.RecordedRun`.

    >>> train_lora(ws, "hero", "hero_v1", project="demo", preset="sd15-style")               # doctest: +SKIP
    >>> train_lora(ws, "hero", "hero_v1", project="demo", adapter="manual", weights_kind="external",
    ...            weights_uri="s3://studio/hero.safetensors")                                # doctest: +SKIP
    """
    if adapter not in ADAPTERS:
        raise TrainingError(f"unknown adapter {adapter!r} (adapters: {', '.join(ADAPTERS)})")
    wrong = misused_options(adapter, options, options.get("overrides"))
    if wrong:
        raise TrainingError(f"{', '.join(wrong)} cannot be used with adapter {adapter}")
    if adapter == "native":
        from .recipe import train_lora as train_native

        return train_native(ws, lora, dataset, **options)
    if dataset is None:
        raise TrainingError(f"adapter {adapter} needs a dataset (the one the weights are trained on)")
    if adapter == "manual":
        from .manual import record_manual_run

        if options.get("weights_kind") is None:
            raise TrainingError("adapter manual needs weights_kind (--weights-kind) and a path or uri")
        return record_manual_run(ws, lora, dataset, **options)
    from .kohya import train_kohya

    return train_kohya(ws, lora, str(dataset), **options)
