"""The native LoRA trainer: one recipe, read top to bottom as named phases.

    plan_training()      the LoRA, dataset and checkpoint (resolve_run_inputs), checked images, buckets, the
                         step plan and the resume checks, as one frozen TrainingPlan; no model is loaded
    _start_run()         accelerate, dtypes, the checkpoint hash, run.json
    _setup_model()       the frozen base model and the peft LoRA adapters
    TrainingData         the latent and text-embedding caches and how a batch is assembled
    _setup_optimizer()   optimizer, learning-rate schedule, accelerate, a resumed state
    loss_step()          noise, timesteps, the objective's target and loss weighting for one micro-batch
    Validation           the validation scores: base model and LoRA on fixed (noise, timestep) draws, early stop
    _train_loop()        the steps, with the step callbacks, scores, saved states, epoch files and samples
    _save_and_record()   the kohya .safetensors file, then (and only then) the candidate release

:func:`train_lora` runs them in that order. The parts the phases use are small plain modules: ``settings``
and ``config`` (the settings and their precedence), ``data`` (files, buckets, captions, the latent cache),
``kohya_format`` (file layout and metadata) and ``progress`` (the step callbacks, CSV log, loss plot). What
differs between model families (text encoders, the denoiser's inputs, key names) is the checkpoint's family
object's (:mod:`lorakit.families`), and what the denoiser predicts is the checkpoint's objective's: the recipe
names neither.

Reproducibility: every random draw of a step (noise, timesteps, caption shuffle and dropout) comes from a
generator seeded by ``(seed, step, micro-batch, process)``, and the batch order of an epoch from
``(seed, epoch)``. So the same manifest, config and seed give the same weights, and a run resumed from a
saved state (LoRA weights, optimizer, scheduler, step) continues exactly as if it had never stopped.

Data parallel: run the same command under ``torchrun``/``accelerate launch``; each process takes every
N-th batch, gradients are averaged by DDP, and only the main process writes files and records the release.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import LorakitError, RecordError, TrainingError
from ..families import Objective
from ..ids import check_id
from ..locks import pid_alive
from ..loras import add_release, find_lora, get_release, has_release, make_release
from ..roots import Root
from ..store import now_iso
from ..workspace import Workspace, as_workspace
from .config import (
    DEFAULTS,
    RESUME_SAFE_KEYS,
    finalize_config,
    numeric_config_diff,
    requested_settings,
    resumed_config,
)
from .data import TrainItem, check_items, epoch_batches, make_buckets, padded_batches, pick_bucket, step_seed
from .inputs import RunInputs, release_dataset_fields, resolve_run_inputs, run_root
from .progress import LOG_NAME, StepCallback, StepReport, read_loss_log
from .settings import ABSENT_MEANS, MAX_STEPS
from .validation import (
    BATCH_FACTOR,
    ValidationScores,
    default_max_scores,
    draw_timesteps,
    is_score_step,
    noise_seed,
    score_batches,
    score_interval,
    split_items,
    validation_record,
)

RUN_FILE = "run.json"
STATE_FILE = "state.pt"
RESUMABLE = ("running", "interrupted")


@dataclass
class TrainResult:
    """What a run produced. ``release`` is None for a dry run and on processes other than the main one."""

    lora_id: str
    release_id: str
    output_dir: Path
    weights_path: Path | None = None
    release: dict | None = None
    steps: int = 0
    final_loss: float | None = None
    duration_s: float = 0.0
    plan: dict = field(default_factory=dict)


def train_lora(
    ws: Workspace | str | Path | None,
    lora: str,
    dataset: str | Path | None = None,
    *,
    project: str | None = None,
    scope: str | None = None,
    release_id: str | None = None,
    set_active: bool = False,
    notes: str | None = None,
    preset: str | None = None,
    config: dict | str | None = None,
    config_file: str | Path | None = None,
    overrides: dict | None = None,
    force: bool = False,
    dry_run: bool = False,
    resume: bool | str = False,
    cpu: bool = False,
    progress: bool = True,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train a LoRA release on a dataset manifest and append it to the LoRA record as a ``candidate``.

    ``lora`` is looked up in ``project`` then the shared scope (or only in ``scope``); the LoRA's checkpoint is
    the base model. ``dataset`` is a dataset id (project, then shared) or a manifest file path; a dataset
    filtered for another checkpoint is refused unless ``force``. The config is resolved from ``preset`` <
    ``config_file`` < ``config`` < ``overrides`` (see :func:`lorakit.train.resolve_config`). ``dry_run``
    checks everything and returns the plan without loading a model. ``resume=True`` continues the latest
    interrupted run of this LoRA (or ``resume="<release id>"`` that one) with its stored config and dataset.
    ``on_step`` is called with a :class:`~lorakit.train.progress.StepReport` after every optimizer step.

    >>> result = train_lora(ws, "hero", "hero_v1", project="demo", preset="sd15-style", set_active=True)  # doctest: +SKIP
    >>> result.weights_path                                                                            # doctest: +SKIP
    PosixPath('/models/loras/hero/01J.../hero.safetensors')
    """
    ws = as_workspace(ws)
    resumed = find_resumed_run(ws, lora, resume, project=project, scope=scope) if resume else None
    if resumed is not None and resumed.recorded is not None:
        return _finish_recorded_run(resumed)
    training = plan_training(ws, lora, dataset, project=project, scope=scope, release_id=release_id, set_active=set_active,
                    notes=notes, preset=preset, config=config, config_file=config_file, overrides=overrides,
                    force=force, resumed=resumed)
    if dry_run:
        return TrainResult(training.lora_id, training.release_id, training.out_dir, plan=training.describe())
    return run_plan(ws, training, cpu=cpu, progress=progress, on_step=on_step)


def run_plan(ws: Workspace | str | Path | None, training: TrainingPlan, *, cpu: bool = False, progress: bool = True,
             on_step: StepCallback | None = None, pipeline: Any = None) -> TrainResult:
    """Train what :func:`plan_training` decided: every phase after the plan, in order. ``pipeline`` is the
    checkpoint's diffusers pipeline when the caller has it built already (a notebook that loaded it, a benchmark's
    random-weight full-size model); its models are frozen, cast and given adapters in place."""
    ws = as_workspace(ws)
    run = _start_run(ws, training, cpu)
    model = _setup_model(ws, training, run, pipeline)
    data = TrainingData(ws, training, run, model)
    optim = _setup_optimizer(training, run, model)
    validation = Validation(training, run, model, data, optim.saved_validation) if training.cfg["validation"] else None
    step, loss = _train_loop(training, run, model, data, optim, validation, progress=progress, on_step=on_step)
    return _save_and_record(ws, training, run, model, optim, step, loss, validation)


# ---- phase 1: the plan ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumedRun:
    """An interrupted run to continue: its ``run.json``, and its release when that was recorded already."""

    run: dict
    out_dir: Path
    recorded: dict | None = None


@dataclass(frozen=True)
class TrainingPlan:
    """Everything decided before a model is loaded. :meth:`describe` is what ``--dry-run`` prints."""

    inputs: RunInputs
    items: tuple[TrainItem, ...]
    buckets: tuple[tuple[int, int], ...]
    world_size: int
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    out_dir: Path
    preset: str | None
    notes: str | None
    set_active: bool
    resumed: dict | None = None
    modules: dict[str, int] | None = None   # adapted modules per model, as module_counts finds them
    held_out: tuple[TrainItem, ...] = ()        # validation_split's images: scored, never trained on
    held_out_buckets: tuple[tuple[int, int], ...] = ()
    validation_every: int | None = None         # optimizer steps between scores; None without validation

    @property
    def cfg(self) -> dict:
        return self.inputs.settings

    @property
    def lora_id(self) -> str:
        return self.inputs.lora_id

    @property
    def release_id(self) -> str:
        return self.inputs.release_id

    @property
    def weights_path(self) -> Path:
        return self.out_dir / f"{self.lora_id}.safetensors"

    @property
    def micro_per_step(self) -> int:
        """Micro-batches one optimizer step takes, over all processes."""
        return self.cfg["gradient_accumulation_steps"] * self.world_size

    def describe(self) -> dict:
        i = self.inputs
        return {
            "lora": i.lora_id, "loraProject": i.lora_project, "release": i.release_id, "checkpoint": i.checkpoint["id"],
            "family": i.family.name, "objective": i.objective.record(), "dataset": i.dataset, "images": len(self.items), "buckets": _bucket_counts(self.buckets),
            "stepsPerEpoch": self.steps_per_epoch, "steps": self.total_steps, "epochs": self.num_epochs,
            "worldSize": self.world_size, "weights": str(self.weights_path), "networkType": i.settings["network_type"],
            "modules": self.modules, "config": i.settings,
            "resumeFrom": self.resumed["step"] if self.resumed else None,
            "heldOut": len(self.held_out), "validationEvery": self.validation_every,
        }


def plan_training(
    ws: Workspace | str | Path | None,
    lora: str,
    dataset: str | Path | None = None,
    *,
    project: str | None = None,
    scope: str | None = None,
    release_id: str | None = None,
    set_active: bool = False,
    notes: str | None = None,
    preset: str | None = None,
    config: dict | str | None = None,
    config_file: str | Path | None = None,
    overrides: dict | None = None,
    force: bool = False,
    resume: bool | str = False,
    resumed: ResumedRun | None = None,
) -> TrainingPlan:
    """Check everything a run needs and decide its steps, without loading a model (the arguments are
    :func:`train_lora`'s). A resumed run takes its dataset, config and release id from its ``run.json``."""
    ws = as_workspace(ws)
    if resume and resumed is None:
        resumed = find_resumed_run(ws, lora, resume, project=project, scope=scope)
    if resumed is not None:
        if resumed.recorded is not None:
            raise TrainingError(f"run {resumed.run['releaseId']} is recorded already; `lorakit lora train --lora "
                                f"{lora} --resume {resumed.run['releaseId']}` finishes its bookkeeping")
        inputs = _resumed_inputs(ws, resumed.run, scope=scope, preset=preset, config=config, config_file=config_file,
                                 overrides=overrides, force=force)
        if (resumed.out_dir / LOG_NAME).exists():
            read_loss_log(resumed.out_dir / LOG_NAME)  # a damaged log is refused now, not after the models load
        notes = notes if notes is not None else resumed.run.get("notes")
        set_active = set_active or resumed.run.get("setActive", False)
        preset = resumed.run.get("preset")
    else:
        inputs = resolve_run_inputs(ws, lora, dataset, project=project, scope=scope, release_id=release_id,
                                    preset=preset, config=config, config_file=config_file, overrides=overrides,
                                    force=force)
    cfg = inputs.settings
    # Every image must exist and match the manifest before anything is loaded (the held-out ones too: they are
    # scored).
    items, held_out = split_items(check_items(ws.store, inputs.manifest["items"]),
                                  cfg["validation_split"] if cfg["validation"] else 0.0, cfg["validation_seed"],
                                  inputs.dataset["id"])
    available = make_buckets(cfg["resolution"], cfg["bucket_step"], cfg["bucket_min_side"], cfg["bucket_max_side"])
    buckets, held_out_buckets = ([pick_bucket(it.width, it.height, available, no_upscale=cfg["bucket_no_upscale"],
                                              step=cfg["bucket_step"]) for it in group] for group in (items, held_out))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    micro_per_step = cfg["gradient_accumulation_steps"] * world_size
    batches = epoch_batches(buckets, cfg["batch_size"], cfg["repeats"], cfg["seed"], 0)
    _check_batches_fit(cfg, len(items), len(batches), world_size)
    batches_per_epoch = len(padded_batches(batches, micro_per_step))
    steps_per_epoch = batches_per_epoch // micro_per_step
    total_steps = cfg["steps"] or cfg["epochs"] * steps_per_epoch
    if total_steps > MAX_STEPS:
        raise TrainingError(f"epochs {cfg['epochs']} x {steps_per_epoch} steps per epoch is {total_steps} optimizer "
                            f"steps, more than the {MAX_STEPS} a run may take; lower epochs (or set steps)")
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    return TrainingPlan(
        modules=_module_counts(ws, inputs),
        inputs=inputs, items=tuple(items), buckets=tuple(buckets), world_size=world_size,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, num_epochs=num_epochs,
        out_dir=ws.config.loras_root / inputs.lora_id / inputs.release_id, preset=preset, notes=notes,
        set_active=set_active, resumed=resumed.run if resumed else None,
        held_out=tuple(held_out), held_out_buckets=tuple(held_out_buckets),
        validation_every=_validation_every(cfg, items, held_out, steps_per_epoch, num_epochs, total_steps,
                                           micro_per_step),
    )


def _check_batches_fit(cfg: dict, images: int, batches: int, world_size: int) -> None:
    """Refuse an accumulation of more batches than an epoch holds: the epoch would be padded by cycling the same
    few batches, so a step could take thousands of copies of them (a run that only seems to hang). A batch_size
    larger than the dataset needs no check: batches are cut from the images, never padded to batch_size."""
    size = f"{images} training image(s) x repeats {cfg['repeats']}"
    micro = cfg["gradient_accumulation_steps"] * world_size
    if micro > batches:
        processes = f" x {world_size} processes" if world_size > 1 else ""
        raise TrainingError(
            f"gradient_accumulation_steps {cfg['gradient_accumulation_steps']}{processes} takes {micro} batches per "
            f"optimizer step, but an epoch has only {batches} ({size}, batch_size {cfg['batch_size']}, one bucket "
            f"shape per batch); set gradient_accumulation_steps to at most {max(1, batches // world_size)}, or lower "
            "batch_size")


def _validation_every(cfg: dict, items: Sequence[TrainItem], held_out: Sequence[TrainItem], steps_per_epoch: int,
                      num_epochs: int, total_steps: int, micro_per_step: int) -> int | None:
    """Steps between validation scores: the setting, else the default schedule within its compute budget."""
    if not cfg["validation"]:
        return None
    scored = (len(items) + len(held_out)) if held_out else len(items)
    max_scores = default_max_scores(total_steps, cfg["batch_size"] * micro_per_step, scored * cfg["validation_draws"])
    return score_interval(cfg["validation_every"], steps_per_epoch, num_epochs, max_scores)


def _module_counts(ws: Workspace, inputs: RunInputs) -> dict[str, int] | None:
    """How many modules of each model the run adapts, counted on the checkpoint's architecture built on the
    ``meta`` device (no weights are read); None when its config folder does not describe the models (loading
    the checkpoint then says what is wrong with it)."""
    from ..models import checkpoint_config_folder
    from .networks import module_counts

    folder = checkpoint_config_folder(ws, inputs.checkpoint)
    family = inputs.family
    if not all((folder / name / "config.json").is_file()
               for name in [family.denoiser, *(e.attribute for e in family.text_encoders)]):
        return None
    try:
        return module_counts(folder, inputs.family, inputs.settings)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def find_resumed_run(ws: Workspace, lora: str, resume: bool | str, *, project: str | None,
                     scope: str | None) -> ResumedRun:
    """The run ``resume`` names (a release id, or ``True``/``"latest"``: the newest interrupted one)."""
    check_id(lora, "LoRA id")
    runs_root = ws.config.loras_root / lora
    run = _find_run(runs_root, resume)
    lora_record, _ = find_lora(ws, lora, project=project or run.get("loraProject"), scope=scope)
    recorded = get_release(lora_record, run["releaseId"]) if has_release(lora_record, run["releaseId"]) else None
    # Killed after the release was recorded but before run.json said so: the file on the record is the result.
    # Training again would overwrite it and break its sha256, so only the bookkeeping is left.
    return ResumedRun(run=run, out_dir=runs_root / run["releaseId"], recorded=recorded)


def _resumed_inputs(ws: Workspace, run: dict, *, scope: str | None, preset: str | None, config: dict | str | None,
                    config_file: str | Path | None, overrides: dict | None, force: bool) -> RunInputs:
    """The inputs of a resumed run: what the interrupted one stored. Settings asked for now must match."""
    stored_path = run["dataset"]["path"]
    if stored_path:
        # A manifest path in run.json (a file anyone may have edited) must lie inside the data root.
        ws.store.file_path(stored_path, what=f"run {run['releaseId']} dataset path (run.json)")
    release = run["releaseId"]
    # A setting added since the run started is not in its stored config: what leaving it out meant then
    # (its default, or its ``absent_means`` when the default changed the numbers) fills it.
    stored = {**{k: ABSENT_MEANS.get(k, v) for k, v in DEFAULTS.items() if k not in run["config"]}, **run["config"]}
    inputs = resolve_run_inputs(ws, run["loraId"], stored_path or run["dataset"]["id"],
                                project=run["dataset"]["projectId"] or run.get("loraProject"), scope=scope,
                                release_id=release, force=force, settings=stored, resuming=True)
    # The stored config was final when written: a value that finalizing would still change (a null a default
    # fills) was edited since, and would train something else than the run started.
    try:
        final = finalize_config(inputs.settings, inputs.family)
        unsettled = [k for k in numeric_config_diff(final, inputs.settings) if k in run["config"]]
        if unsettled:
            raise TrainingError(f"{', '.join(unsettled)} not as a finished run config holds them")
    except TrainingError as exc:
        out_dir = ws.config.loras_root / run["loraId"] / release
        raise TrainingError(f"{out_dir / RUN_FILE}: its stored config cannot be used ({exc}); it is damaged or not "
                            f"lorakit's: {_start_afresh(out_dir)}") from None
    inputs = replace(inputs, settings=final)
    if run["dataset"]["manifestHash"] != inputs.dataset["manifestHash"]:
        raise TrainingError(f"cannot resume {release}: dataset {inputs.dataset['id']!r} changed since the run started")
    # Only what is asked for now is compared (and applied): the run's own preset, config and flags are in its
    # stored config, so rebuilding the request from the preset alone would blame settings nobody touched.
    requested = requested_settings(inputs.family, preset=None if preset == run.get("preset") else preset,
                                   config_file=config_file, config=config, overrides=overrides, force=force)
    if requested:
        settings, changed = resumed_config(inputs.settings, requested, inputs.family)
        if changed:
            raise TrainingError(f"cannot resume {release} with different settings ({', '.join(changed)}): they change "
                                "what the run computes; resume without them, or start a new run (a resume may "
                                f"change only {', '.join(RESUME_SAFE_KEYS)})")
        inputs = replace(inputs, settings=settings)
    return inputs


# ---- phase 2: the run's place and processes ---------------------------------------------------------------------
@dataclass
class RunContext:
    """The accelerator and what follows from it for this process, plus the run's fixed facts."""

    accelerator: Any
    weight_dtype: Any
    vae_dtype: Any
    checkpoint_hash: str
    started_at: float

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def _start_run(ws: Workspace, training: TrainingPlan, cpu: bool) -> RunContext:
    """Accelerate, the dtypes, the checkpoint's weights hash and the run folder's ``run.json``."""
    import torch

    from ..models import checkpoint_weights_hash

    cfg, inputs, resumed = training.cfg, training.inputs, training.resumed
    accelerator = _make_accelerator(cfg, cpu)
    if accelerator.num_processes != training.world_size:
        raise TrainingError(f"accelerate sees {accelerator.num_processes} processes but WORLD_SIZE is "
                            f"{training.world_size}")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if accelerator.device.type == "cuda":
        # TF32 tensor cores for what still runs in fp32 (the LoRA's own matmuls, the VAE); the CPU is unaffected.
        torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
        torch.backends.cudnn.allow_tf32 = cfg["tf32"]
    # The main process hashes the weights (and records the hash) first; the others then read the recorded one.
    if accelerator.is_main_process:
        checkpoint_hash = checkpoint_weights_hash(ws, inputs.checkpoint)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        checkpoint_hash = checkpoint_weights_hash(ws, inputs.checkpoint["id"])
    run = RunContext(accelerator, weight_dtype, torch.float32 if cfg["vae_fp32"] else weight_dtype, checkpoint_hash,
                     time.time())
    if run.is_main:
        run_root(training.out_dir).make_folder(training.out_dir)
        _write_run(training.out_dir, {
            "releaseId": inputs.release_id, "loraId": inputs.lora_id, "loraProject": inputs.lora_project,
            "status": "running", "step": resumed["step"] if resumed else 0, "config": cfg, "dataset": inputs.dataset,
            "checkpointId": inputs.checkpoint["id"], "worldSize": training.world_size, "notes": training.notes,
            "setActive": training.set_active, "preset": training.preset,
            "startedAt": resumed["startedAt"] if resumed else now_iso(),
            "host": socket.gethostname(), "pid": os.getpid(),
        })
    if resumed and resumed.get("worldSize", 1) != training.world_size:
        raise TrainingError(f"run {inputs.release_id} used {resumed['worldSize']} processes; resume it with the "
                            "same number")
    return run


# ---- phase 3: the model ---------------------------------------------------------------------------------------
@dataclass
class Model:
    """The base model's parts, frozen, with LoRA adapters on what is trained (``trained[0]`` is the denoiser,
    kept as ``unet`` after the setting names). ``noise_scheduler`` is the training schedule the checkpoint's
    ``objective`` asks for."""

    pipe: Any
    unet: Any
    vae: Any
    tokenizers: list
    text_encoders: list
    trained: list
    noise_scheduler: Any
    objective: Objective


def _setup_model(ws: Workspace, training: TrainingPlan, run: RunContext, pipeline: Any = None) -> Model:
    """The base model in the training dtypes (SDPA attention, diffusers' default in torch 2) with its LoRAs;
    ``pipeline`` is one already built for the checkpoint (else it is loaded)."""
    import torch

    from ..models import load_pipeline

    inputs = training.inputs
    pipe = pipeline or load_pipeline(ws, inputs.checkpoint, torch_dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    unet, vae = getattr(pipe, inputs.family.denoiser), pipe.vae
    tokenizers, text_encoders = inputs.family.tokenizers_and_encoders(pipe)
    for module in [unet, vae, *text_encoders]:
        module.requires_grad_(False)
    for module, dtype in [(unet, run.weight_dtype), (vae, run.vae_dtype)] + [(e, run.weight_dtype) for e in text_encoders]:
        # Only cast when the dtype changes (diffusers warns about every cast, even to the same dtype).
        module.to(run.device) if module.dtype == dtype else module.to(run.device, dtype)
    if training.cfg["channels_last"] and run.device.type == "cuda":
        unet.to(memory_format=torch.channels_last)   # the layout cuDNN's fastest convolution kernels want
    model = Model(pipe, unet, vae, tokenizers, text_encoders, [unet],
                  inputs.objective.noise_scheduler(pipe.scheduler.config), inputs.objective)
    _add_adapters(training, run, model)
    return model


def _add_adapters(training: TrainingPlan, run: RunContext, model: Model) -> None:
    """The adapters (``network_type``), initialised from the seed, on the module sets of the UNet [and text
    encoders]; trained in fp32."""
    import torch

    from .networks import add_network, text_encoder_targets, unet_targets

    cfg, unet = training.cfg, model.unet
    torch.manual_seed(cfg["seed"])
    _check_module_names(training, run, unet, "unet_target_modules", "UNet")
    add_network(unet, unet_targets(unet, cfg), cfg)
    if cfg["train_text_encoder"]:
        for encoder in model.text_encoders:
            _check_module_names(training, run, encoder, "text_encoder_target_modules", "text encoder")
            add_network(encoder, text_encoder_targets(encoder, cfg), cfg)
        model.trained += model.text_encoders
    for module in model.trained:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if cfg["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        for encoder in model.trained[1:]:
            encoder.gradient_checkpointing_enable()
    unet.train()
    for encoder in model.text_encoders:
        encoder.train(cfg["train_text_encoder"])


def _check_module_names(training: TrainingPlan, run: RunContext, module: Any, setting: str, what: str) -> None:
    """Every name of a module list the user wrote must end the path of some Linear or Conv2d module (a shipped
    module set may name layers a small model lacks, e.g. a shortcut convolution)."""
    from .networks import adaptable_leaves, unknown_names
    from .settings import is_module_set

    names = training.cfg[setting]
    unknown = [] if is_module_set(setting, names) else unknown_names(module.named_modules(), names)
    if unknown:
        if run.is_main:
            _update_run(training.out_dir, status="failed")
        leaves = adaptable_leaves(module.named_modules())
        raise TrainingError(f"{setting} {', '.join(map(repr, unknown))} match no module of this {what}; "
                            f"names end a module path, e.g. {', '.join(leaves[:12])}")


# ---- phase 4: the data ----------------------------------------------------------------------------------------
class TrainingData:
    """The run's images as the model sees them: VAE latents (cached once per run, and on disk) and text
    embeddings (cached when nothing about them changes: per caption, the dict of tensors the family's
    ``encode_text`` gives), and the pieces a micro-batch is made of.

    Positions ``0..len(training.items) - 1`` are the training images; the held-out images of a validation split
    follow them, cached and conditioned the same way, and only the validation scores ever ask for them."""

    def __init__(self, ws: Workspace, training: TrainingPlan, run: RunContext, model: Model):
        self.training, self.run, self.model = training, run, model
        self.cfg = cfg = training.cfg
        self.items = training.items + training.held_out
        self.buckets = training.buckets + training.held_out_buckets
        self.latents_in_memory: dict[int, Any] = {}
        self.text_cache: dict[str, dict[str, Any]] = {}
        self.fixed_text_cache: dict[str, dict[str, Any]] = {}
        if cfg["cache_latents"]:
            if cfg["latent_cache_dir"]:
                self._fill_latent_cache(cfg["latent_cache_dir"], None)
            else:
                self._fill_latent_cache(ws.data_root / ".lorakit" / "cache" / "latents", ws.store.fs)
        captions_fixed = not cfg["shuffle_tags"] and not cfg["train_text_encoder"]
        if cfg["cache_text_embeddings"] and captions_fixed:
            self._fill_text_cache()

    def _fill_latent_cache(self, folder: str | Path, root: Root | None) -> None:
        from .data import LatentCache, latent_cache_key, load_pixels

        training, run = self.training, self.run
        cache = LatentCache(folder, root)
        checkpoint = training.inputs.checkpoint
        keys = [latent_cache_key(it.sha256, checkpoint["id"], run.checkpoint_hash, b, self.cfg["background"],
                                 str(run.vae_dtype)) for it, b in zip(self.items, self.buckets, strict=True)]
        # One process per machine fills the disk cache, then the others read it.
        for fill in (True, False):
            if fill == run.accelerator.is_local_main_process:
                for position, (item, key) in enumerate(zip(self.items, keys, strict=True)):
                    latent = cache.get(key)
                    if latent is None:
                        # One image at a time, so a latent never depends on which others were cached already.
                        pixels = load_pixels(item, self.buckets[position], self.cfg["background"])[None]
                        latent = self.encode_pixels(pixels)[0].cpu()
                        cache.put(key, latent)
                    self.latents_in_memory[position] = self._resident(latent)
            if fill:
                run.accelerator.wait_for_everyone()

    def _resident(self, latent: Any) -> Any:
        """A cached latent as the steps read it: on a GPU it stays there, in the training dtype (kohya's and
        diffusers' trainers cast latents so too), so a step copies nothing from the host."""
        if self.run.device.type != "cuda":
            return latent
        return latent.to(self.run.device, self.run.weight_dtype)

    def _fill_text_cache(self) -> None:
        import torch

        items, cfg = self.items, self.cfg
        with torch.no_grad():
            for caption in sorted({it.caption for it in items} | ({""} if cfg["caption_dropout"] else set())):
                self.text_cache[caption] = _first(self.encode_captions([caption]))
        if not cfg["sample_prompts"]:
            for encoder in self.model.text_encoders:
                encoder.to("cpu")  # not needed on the accelerator any more

    def encode_pixels(self, pixels: Any) -> Any:
        import torch

        vae = self.model.vae
        if self.run.device.type == "cuda":
            # Page-locked host memory lets the copy run asynchronously (decoded images go to the GPU each step
            # when latents are not cached).
            pixels = pixels.pin_memory()
        with torch.no_grad():
            latents = vae.encode(pixels.to(self.run.device, self.run.vae_dtype, non_blocking=True)).latent_dist.mode()
        return latents.float() * vae.config.scaling_factor

    def encode_captions(self, captions: list[str]) -> dict[str, Any]:
        """The captions' text inputs as the family's pipeline computes them: a dict of tensors, batch first."""
        return self.training.inputs.family.encode_text(self.model.tokenizers, self.model.text_encoders, captions,
                                                       self.run.device, clip_skip=self.cfg["clip_skip"])

    def captions(self, positions: list[int], rng: random.Random) -> list[str]:
        """The captions of one micro-batch, shuffled and dropped as the settings say."""
        from .data import caption_for_step

        cfg = self.cfg
        return [caption_for_step(self.training.items[p].caption, rng, shuffle_tags=cfg["shuffle_tags"],
                                 keep_tokens=cfg["keep_tokens"], dropout=cfg["caption_dropout"]) for p in positions]

    def latents(self, positions: list[int]) -> Any:
        import torch

        from .data import load_pixels

        if self.cfg["cache_latents"]:
            return torch.stack([self.latents_in_memory[p] for p in positions]).to(self.run.device)
        items, buckets = self.items, self.buckets
        pixels = torch.stack([load_pixels(items[p], buckets[p], self.cfg["background"]) for p in positions])
        return self.encode_pixels(pixels)

    def text(self, captions: list[str]) -> dict[str, Any]:
        import torch

        if self.text_cache:
            return _stacked([self.text_cache[c] for c in captions])
        with contextlib.nullcontext() if self.cfg["train_text_encoder"] else torch.no_grad():
            return self.encode_captions(captions)

    def fixed_text(self, captions: list[str]) -> dict[str, Any]:
        """The text inputs of the manifest captions as the validation scores use them (call under no_grad): kept
        after the first score when the text encoders are frozen, since nothing can change them then."""
        if self.text_cache or self.cfg["train_text_encoder"]:
            return self.text(captions)
        for caption in captions:
            if caption not in self.fixed_text_cache:
                self.fixed_text_cache[caption] = _first(self.encode_captions([caption]))
        return _stacked([self.fixed_text_cache[c] for c in captions])

    def conditioning(self, positions: list[int], captions: list[str], text: dict[str, Any] | None = None) -> dict:
        """The denoiser's keyword arguments besides the noisy latents and timesteps, as the family builds them
        from the text inputs and each image's size and crop; ``text`` is the captions' text inputs when the
        caller has them already."""
        from .data import crop_and_size

        rows = []
        for p in positions:
            bw, bh = self.buckets[p]
            item = self.items[p]
            crop, original = crop_and_size(item.width, item.height, (bw, bh))
            rows.append([*original, *crop, bh, bw])   # (orig h, orig w, crop top, crop left, target h, target w)
        return self.training.inputs.family.denoiser_kwargs(text if text is not None else self.text(captions), rows,
                                                           self.run.weight_dtype, self.run.device)


def _first(text: dict[str, Any]) -> dict[str, Any]:
    """The first sample of a batch of text inputs (what the text cache keeps per caption)."""
    return {name: tensor[0] for name, tensor in text.items()}


def _stacked(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Cached per-caption text inputs as one batch."""
    import torch

    return {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}


# ---- phase 5: the optimizer -----------------------------------------------------------------------------------
@dataclass
class Optimization:
    """The optimizer and schedule, the models as accelerate prepared them, the step to start from and, for a
    resumed run, the validation scores its saved state holds."""

    optimizer: Any
    optimizer_name: str
    lr_scheduler: Any
    trained_models: list
    trainable: list
    start_step: int
    saved_validation: dict | None = None
    unet_forward: Any = None   # what a micro-batch calls: the prepared UNet, or its torch.compile'd form


def _setup_optimizer(training: TrainingPlan, run: RunContext, model: Model) -> Optimization:
    from diffusers.optimization import get_scheduler

    cfg = training.cfg
    param_groups = [{"params": [p for p in model.unet.parameters() if p.requires_grad], "lr": cfg["lr"]}]
    for encoder in model.trained[1:]:
        param_groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": cfg["text_encoder_lr"]})
    optimizer, optimizer_name = _make_optimizer(cfg, param_groups, run.device)
    lr_scheduler = get_scheduler("cosine" if cfg["lr_scheduler"] == "cosine" else "constant_with_warmup", optimizer,
                                 num_warmup_steps=cfg["lr_warmup_steps"], num_training_steps=training.total_steps)
    # The scheduler is stepped by hand once per optimizer step, so it is not handed to accelerate (which would
    # step it once per process).
    prepared = run.accelerator.prepare(*model.trained, optimizer)
    trained_models, optimizer = list(prepared[:-1]), prepared[-1]
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    start_step, saved_validation = 0, None
    state_path = training.out_dir / "state" / STATE_FILE
    if training.resumed and state_path.exists():
        start_step, saved_validation = _load_state(state_path, model.trained, optimizer, lr_scheduler, run.accelerator,
                                                   training.total_steps)
    unet_forward = trained_models[0]
    if cfg["compile_unet"]:
        import torch

        # Compiled on its first call (the first step pays for it; see the step times). Only the training
        # forward is compiled: saving, the state and the validation scores use the module itself.
        unet_forward = torch.compile(trained_models[0])
    return Optimization(optimizer, optimizer_name, lr_scheduler, trained_models, trainable, start_step,
                        saved_validation, unet_forward)


# ---- phase 6: one micro-batch's loss ----------------------------------------------------------------------------
def loss_step(denoiser: Any, objective: Objective, noise_scheduler: Any, latents: Any, conditioning: dict,
              generator: Any, *, noise_offset: float = 0.0, ip_noise_gamma: float = 0.0,
              min_snr_gamma: float | None = None, dtype: Any = None) -> Any:
    """The denoising loss of one micro-batch: noise and timesteps drawn from ``generator``, the noisy input and
    the target of ``objective`` (epsilon or velocity) on ``noise_scheduler`` (the schedule it made, see
    ``Objective.noise_scheduler``), and its min-SNR-gamma weighting (Hang et al. 2023) when that is set.

    ``conditioning`` holds the denoiser's keyword arguments (the family's ``denoiser_kwargs``). Returns the mean
    loss as a scalar tensor.
    """
    import torch
    import torch.nn.functional as F

    device = latents.device
    noise = torch.randn(latents.shape, generator=generator, device=device)
    if noise_offset:
        noise += noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                              device=device)
    # Input perturbation noises the input a little more than the target says, which eases exposure bias. Drawn
    # after the timesteps, so a run without it draws exactly what it always drew.
    if ip_noise_gamma:
        perturbed = noise + ip_noise_gamma * torch.randn(latents.shape, generator=generator, device=device)
        noisy = objective.noisy(noise_scheduler, latents, perturbed, timesteps)
    else:
        noisy = objective.noisy(noise_scheduler, latents, noise, timesteps)
    pred = denoiser(noisy.to(dtype or latents.dtype), timesteps, **conditioning).sample
    target = objective.target(noise_scheduler, latents, noise, timesteps)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * objective.min_snr_weight(noise_scheduler, timesteps, min_snr_gamma)
    return loss.mean()


# ---- phase 7: the validation scores -----------------------------------------------------------------------
class Validation:
    """The base model and the LoRA scored on fixed draws (see :mod:`lorakit.train.validation`): the base once at
    the start with the adapters disabled, the LoRA at the start, every ``validation_every`` steps and at the
    last step; with ``early_stop_patience``, a CPU copy of the best score's weights.

    Scoring runs under no_grad with the models in eval mode (dropout off) and draws from its own generators, so
    the training's weights are the same with validation on or off. With several processes each scores every
    N-th batch and the sums are added, so all of them see the same loss (and stop at the same step)."""

    def __init__(self, training: TrainingPlan, run: RunContext, model: Model, data: TrainingData,
                 saved: dict | None):
        cfg = training.cfg
        self.training, self.run, self.model, self.data = training, run, model, data
        self.patience: int | None = cfg["early_stop_patience"]
        self.seed, self.draws = cfg["validation_seed"], cfg["validation_draws"]
        batch = BATCH_FACTOR * cfg["batch_size"]
        n = len(training.items)
        self.training_batches = self._batches(list(range(n)), batch)
        held = list(range(n, n + len(training.held_out)))
        # The headline set: the held-out images with a split, else the training images.
        self.headline_batches = self._batches(held, batch) if held else self.training_batches
        self.scores = ValidationScores()
        self.best_models: list[dict] = []
        if saved is not None:
            self._restore(saved)

    def _batches(self, positions: list[int], batch: int) -> list[list[tuple[int, int]]]:
        buckets = [self.data.buckets[p] for p in positions]
        return [[(positions[i], k) for i, k in pairs] for pairs in score_batches(buckets, self.draws, batch)]

    def _restore(self, saved: dict) -> None:
        path = self.training.out_dir / "state" / STATE_FILE
        try:
            self.scores = ValidationScores.from_state(saved.get("scores"))
        except ValueError as exc:
            raise TrainingError(f"saved training state {path} has damaged validation scores ({exc}); delete "
                                f"{path.parent} and train again without --resume") from None
        import torch

        best = saved.get("bestModels") or []
        params = [_trained_parameters(m) for m in self.model.trained]
        if best and not (isinstance(best, list) and len(best) == len(params) and all(
                isinstance(b, dict) and set(b) == set(p) and all(
                    isinstance(b[n], torch.Tensor) and b[n].shape == p[n].shape for n in p)
                for b, p in zip(best, params, strict=False))):
            raise TrainingError(f"saved state {path} does not match this run's LoRA layers; delete {path.parent} "
                                "and train again without --resume")
        self.best_models = best

    def to_state(self) -> dict:
        """What a saved state keeps: the scores so far and the best score's weights (plain tensors)."""
        return {"scores": self.scores.to_state(), "bestModels": self.best_models}

    @property
    def keeps_best(self) -> bool:
        return self.patience is not None

    @property
    def stopped_early(self) -> bool:
        return self.scores.stopped_early

    def start(self, step: int) -> None:
        """The base model's score and the LoRA's first one; a resumed run has them in its saved state."""
        if self.scores.curve:
            return
        held_out = bool(self.training.held_out)
        with self._scoring(), _adapters_disabled(self.model.trained):
            self.scores.base = _finite(self._score(self.headline_batches), "the base model", step)
            if held_out:
                self.scores.base_training = _finite(self._score(self.training_batches), "the base model", step)
        self.score(step, math.ceil(step / self.training.steps_per_epoch))

    def score(self, step: int, epoch: int) -> None:
        """Score the LoRA after ``step`` (both sets with a split) and keep the weights when it is the best."""
        started = time.perf_counter()
        with self._scoring():
            loss = self._score(self.headline_batches)
            training_loss = self._score(self.training_batches) if self.training.held_out else None
        _finite(loss if training_loss is None else loss + training_loss, "the LoRA", step)
        best = self.scores.add(step, epoch, loss, training_loss, time.perf_counter() - started, self.patience)
        if best and self.keeps_best:
            self.best_models = [{n: p.detach().cpu().clone() for n, p in _trained_parameters(m).items()}
                                for m in self.model.trained]

    def restore_best(self) -> None:
        """Put the best score's weights back into the models (the release then holds them)."""
        import torch

        with torch.no_grad():
            for module, best in zip(self.model.trained, self.best_models, strict=True):
                for name, param in _trained_parameters(module).items():
                    param.copy_(best[name])

    def record(self) -> dict:
        training = self.training
        return validation_record(
            self.scores, held_out=bool(training.held_out), split=training.cfg["validation_split"], seed=self.seed,
            draws=self.draws, every=training.validation_every or 0,
            images=len(training.held_out) or len(training.items), training_images=len(training.items),
            keeps_best=self.keeps_best)

    @contextlib.contextmanager
    def _scoring(self):
        import torch

        modules = [self.model.unet, *self.model.text_encoders]
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)

    def _score(self, batches: list[list[tuple[int, int]]]) -> float:
        """Mean plain MSE over every (image, draw) pair of ``batches``."""
        import torch
        import torch.nn.functional as F

        run, model, data = self.run, self.model, self.data
        scheduler = model.noise_scheduler
        num_timesteps = scheduler.config.num_train_timesteps
        total = torch.zeros(2, dtype=torch.float64)
        for batch in batches[run.rank::self.training.world_size]:
            positions = [p for p, _ in batch]
            items = [data.items[p] for p in positions]
            latents = data.latents(positions)
            # The draws come from CPU generators, so a GPU run scores on exactly the draws a CPU run does.
            noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(
                noise_seed(self.seed, it.sha256, k))) for it, (_, k) in zip(items, batch, strict=True)]).to(run.device)
            timesteps = torch.tensor([draw_timesteps(self.seed, it.sha256, self.draws, num_timesteps)[k]
                                      for it, (_, k) in zip(items, batch, strict=True)], device=run.device)
            captions = [it.caption for it in items]
            conditioning = data.conditioning(positions, captions, data.fixed_text(captions))
            with run.accelerator.autocast():
                noisy = model.objective.noisy(scheduler, latents, noise, timesteps)
                pred = model.unet(noisy.to(run.weight_dtype), timesteps, **conditioning).sample
            target = model.objective.target(scheduler, latents, noise, timesteps)
            losses = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
            total += torch.stack([losses.double().sum().cpu(), torch.tensor(len(batch), dtype=torch.float64)])
        if self.training.world_size > 1:
            total = run.accelerator.reduce(total.to(run.device), reduction="sum").cpu()
        return float(total[0] / total[1])


def _trained_parameters(module: Any) -> dict[str, Any]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _finite(loss: float, what: str, step: int) -> float:
    """A score, or the error of one that overflowed (a curve of JSON numbers cannot hold it)."""
    if not math.isfinite(loss):
        raise TrainingError(f"validation loss of {what} is {loss} at step {step}: its predictions overflow; stopping, "
                            "nothing recorded. Lower the learning rate, use fp32/bf16 instead of fp16, or check the "
                            "images")
    return loss


@contextlib.contextmanager
def _adapters_disabled(models: list):
    """The base model: the adapters of ``models`` switched off (peft's ``disable_adapters``), then on again with
    every parameter's ``requires_grad`` as it was (peft's re-enabling sets it on its own terms)."""
    flags = [[p.requires_grad for p in m.parameters()] for m in models]
    for module in models:
        module.disable_adapters()
    try:
        yield
    finally:
        for module, module_flags in zip(models, flags, strict=True):
            module.enable_adapters()
            for param, flag in zip(module.parameters(), module_flags, strict=True):
                param.requires_grad_(flag)


# ---- phase 8: the loop ----------------------------------------------------------------------------------------
def _train_loop(training: TrainingPlan, run: RunContext, model: Model, data: TrainingData, optim: Optimization,
                validation: Validation | None, *, progress: bool, on_step: StepCallback | None) -> tuple[int, float]:
    """Every optimizer step from the start (or the resumed) step; returns the last step and its loss. Ctrl-C or
    SIGTERM stops after the current step with the state saved; anything else marks the run failed. With
    validation, the scores come first and after the steps they are due at; early stopping ends the loop."""
    from .progress import LossLog, ProgressBar

    lora_id, release_id, start = training.lora_id, training.release_id, optim.start_step
    if run.is_main and start:
        print(f"resuming {lora_id}/{release_id} at step {start} of {training.total_steps}", file=sys.stderr)
    log = LossLog(training.out_dir / LOG_NAME, resume_from_step=start, root=run_root(training.out_dir)) \
        if run.is_main else None
    bar = ProgressBar(training.total_steps, start, f"{lora_id} {release_id[-6:]}", enabled=progress and run.is_main)
    callbacks: list[StepCallback] = [c for c in (log, bar, on_step) if c is not None]
    stop = _StopRequest(training.world_size > 1)
    step, loss = start, float("nan")
    with stop.installed():
        try:
            loop_start = time.perf_counter()

            def report(done: int, epoch: int, loss: float, lr: float) -> None:
                for callback in callbacks:
                    callback(StepReport(done, training.total_steps, epoch, loss, lr, time.perf_counter() - loop_start))

            if validation is not None:
                validation.start(start)
            for epoch in range(start // training.steps_per_epoch, training.num_epochs):
                step, loss = _train_epoch(training, run, model, data, optim, validation, epoch, step, loss, stop,
                                          report)
                if validation is not None and validation.stopped_early:
                    break
                _end_of_epoch(training, run, model, optim, epoch, step)
        except BaseException as exc:
            _close(bar, log)
            if run.is_main:
                _mark_stopped(training, step, interrupted=isinstance(exc, KeyboardInterrupt))
            raise
    _close(bar, log)
    return step, loss


def _train_epoch(training: TrainingPlan, run: RunContext, model: Model, data: TrainingData, optim: Optimization,
                 validation: Validation | None, epoch: int, step: int, loss_value: float, stop: _StopRequest,
                 report) -> tuple[int, float]:
    """The steps of one epoch (from ``step``, for a resumed run); ``report(step, epoch, loss, lr)`` after each,
    then the validation score when one is due (before a saved state, which then holds it)."""
    import torch

    cfg, accumulation = training.cfg, training.cfg["gradient_accumulation_steps"]
    batches = padded_batches(epoch_batches(list(training.buckets), cfg["batch_size"], cfg["repeats"], cfg["seed"],
                                           epoch), training.micro_per_step)
    for step_in_epoch in range(step - epoch * training.steps_per_epoch, training.steps_per_epoch):
        if step >= training.total_steps:
            break
        step_loss = torch.zeros((), device=run.device)
        for micro in range(accumulation):
            positions = batches[(step_in_epoch * accumulation + micro) * training.world_size + run.rank]
            step_loss += _micro_batch(training, run, model, data, optim, positions, step, micro)
        step_loss = step_loss / accumulation
        if training.world_size > 1:
            step_loss = run.accelerator.reduce(step_loss, reduction="mean")
        loss_value = step_loss.item()
        if not math.isfinite(loss_value):
            # Checked before the optimizer step, so no NaN ever reaches the weights or a saved state.
            raise TrainingError(
                f"loss is {loss_value} at step {step + 1} (epoch {epoch + 1}); stopping, nothing recorded. "
                "Lower the learning rate, use fp32/bf16 instead of fp16, or check the images"
            )
        if cfg["max_grad_norm"]:
            run.accelerator.clip_grad_norm_(optim.trainable, cfg["max_grad_norm"])
        optim.optimizer.step()
        optim.lr_scheduler.step()
        optim.optimizer.zero_grad(set_to_none=True)
        step += 1
        report(step, epoch + 1, loss_value, optim.lr_scheduler.get_last_lr()[0])
        if validation is not None and is_score_step(step, training.total_steps, training.validation_every or 0):
            validation.score(step, epoch + 1)
            if validation.stopped_early:
                break
        if cfg["save_state_every"] and step % cfg["save_state_every"] == 0 and step < training.total_steps:
            _save_state_everywhere(training, run, model, optim, validation, step)
        if stop.requested():
            _save_state_everywhere(training, run, model, optim, validation, step)
            raise KeyboardInterrupt
    return step, loss_value


def _micro_batch(training: TrainingPlan, run: RunContext, model: Model, data: TrainingData, optim: Optimization,
                 positions: list[int], step: int, micro: int) -> Any:
    """Forward and backward of one micro-batch, its random draws seeded by (seed, step, micro-batch, process)."""
    import torch

    cfg = training.cfg
    seed = step_seed(cfg["seed"], step, micro, run.rank)
    generator = torch.Generator(device=run.device).manual_seed(seed)
    if cfg["lora_dropout"]:
        torch.manual_seed(seed)
    captions = data.captions(positions, random.Random(seed))
    # Only the last micro-batch of a step synchronises gradients across processes.
    sync = micro == cfg["gradient_accumulation_steps"] - 1
    with _no_sync(run.accelerator, optim.trained_models, not sync), run.accelerator.autocast():
        latents = data.latents(positions)
        loss = loss_step(optim.unet_forward, model.objective, model.noise_scheduler, latents,
                         data.conditioning(positions, captions), generator, noise_offset=cfg["noise_offset"], ip_noise_gamma=cfg["ip_noise_gamma"],
                         min_snr_gamma=cfg["min_snr_gamma"], dtype=run.weight_dtype)
    run.accelerator.backward(loss / cfg["gradient_accumulation_steps"])
    return loss.detach()


def _end_of_epoch(training: TrainingPlan, run: RunContext, model: Model, optim: Optimization, epoch: int,
                  step: int) -> None:
    """After a full epoch (not the last step): an intermediate weights file and sample images when asked."""
    from . import kohya_format

    cfg = training.cfg
    epoch_done = step % training.steps_per_epoch == 0 or step >= training.total_steps
    if not (epoch_done and run.is_main):
        return
    every = cfg["save_every_n_epochs"]
    if step < training.total_steps and every and (epoch + 1) % every == 0:
        tensors = _lora_tensors(training, run, optim)
        metadata = _metadata(training, run, model, optim, step, epoch + 1, time.time(), final=False)
        kohya_format.save_lora_file(training.out_dir / f"{training.lora_id}-{epoch + 1:06d}.safetensors", tensors,
                                    kohya_format.finish_metadata(tensors, metadata), run_root(training.out_dir))
    if cfg["sample_prompts"] and (epoch + 1) % cfg["sample_every_n_epochs"] == 0:
        _render_samples(model.pipe, model.objective, cfg, training.out_dir / "samples", epoch + 1, run.accelerator,
                        run_root(training.out_dir))
        model.unet.train()


def _mark_stopped(training: TrainingPlan, step: int, *, interrupted: bool) -> None:
    _update_run(training.out_dir, status="interrupted" if interrupted else "failed")
    if interrupted:
        lora_project = training.inputs.lora_project
        print(f"\ninterrupted at step {step}; nothing recorded. Continue with: lorakit lora train --lora "
              f"{training.lora_id}{' --project ' + lora_project if lora_project else ''} --resume "
              f"{training.release_id}", file=sys.stderr)


def _close(*things: Any) -> None:
    for thing in things:
        if thing is not None:
            thing.close()


def _save_state_everywhere(training: TrainingPlan, run: RunContext, model: Model, optim: Optimization,
                           validation: Validation | None, step: int) -> None:
    if run.is_main:
        _save_state(training.out_dir / "state" / STATE_FILE, step, model.trained, optim.optimizer, optim.lr_scheduler,
                    run.accelerator, None if validation is None else validation.to_state())
        _update_run(training.out_dir, step=step)
    run.accelerator.wait_for_everyone()


# ---- phase 9: the weights file, then (and only then) the release -------------------------------------------------
def _save_and_record(ws: Workspace, training: TrainingPlan, run: RunContext, model: Model, optim: Optimization,
                     step: int, loss: float, validation: Validation | None = None) -> TrainResult:
    from . import kohya_format

    inputs, out_dir = training.inputs, training.out_dir
    result = TrainResult(inputs.lora_id, inputs.release_id, out_dir, weights_path=training.weights_path, steps=step,
                         final_loss=loss, duration_s=time.time() - run.started_at, plan=training.describe())
    scores = None
    if validation is not None:
        if validation.keeps_best and validation.best_models:
            validation.restore_best()
        scores = validation.record()
    if run.is_main:
        finished_at = time.time()
        tensors = _lora_tensors(training, run, optim)
        metadata = _metadata(training, run, model, optim, step, training.num_epochs, finished_at, final=True,
                             validation=scores)
        try:
            sha256 = kohya_format.save_lora_file(training.weights_path, tensors,
                                                 kohya_format.finish_metadata(tensors, metadata), run_root(out_dir))
        except TrainingError:
            _update_run(out_dir, status="failed")
            raise
        training_block = {
            "config": training.cfg, "preset": training.preset, **release_dataset_fields(inputs.dataset),
            "checkpointId": inputs.checkpoint["id"], "checkpointFamily": inputs.family.name,
            "objective": model.objective.record(),
            "checkpointSha256": run.checkpoint_hash, "seed": training.cfg["seed"], "steps": step,
            "epochs": training.num_epochs, "images": len(training.items), "worldSize": training.world_size,
            "mixedPrecision": run.accelerator.mixed_precision, "device": str(run.device),
            "optimizer": optim.optimizer_name, "finalLoss": loss, "durationS": round(finished_at - run.started_at, 3),
            "startedAt": _read_run(out_dir)["startedAt"], "finishedAt": now_iso(), "libraries": _library_versions(),
            "lossLog": f"{inputs.lora_id}/{inputs.release_id}/{LOG_NAME}",
            **({"validation": scores} if scores is not None else {}),
        }
        weights = {"kind": "config_relative", "base": "lorasRoot",
                   "path": f"{inputs.lora_id}/{inputs.release_id}/{training.weights_path.name}"}
        release = make_release(inputs.release_id, weights=weights, sha256=sha256, training=training_block,
                               notes=training.notes)
        add_release(ws, inputs.lora_id, release, project=inputs.lora_project, set_active=training.set_active)
        _update_run(out_dir, status="complete", step=step)
        _remove_state(out_dir)
        result.release = release
    run.accelerator.wait_for_everyone()
    return result


def _lora_tensors(training: TrainingPlan, run: RunContext, optim: Optimization) -> dict:
    from . import kohya_format

    unwrap = run.accelerator.unwrap_model
    encoders = [unwrap(m) for m in optim.trained_models[1:]]
    return kohya_format.kohya_state_dict(training.inputs.family, unwrap(optim.trained_models[0]), encoders,
                                         dtype=kohya_format.SAVE_DTYPES["fp16"])


def _metadata(training: TrainingPlan, run: RunContext, model: Model, optim: Optimization, step: int, epoch: int,
              finished_at: float, *, final: bool, validation: dict | None = None) -> dict[str, str]:
    """The kohya ``ss_*`` metadata of a weights file, with lorakit's own block (and the release's validation
    numbers in the final file, so they travel with it)."""
    from . import kohya_format

    inputs, cfg, ref = training.inputs, training.cfg, training.inputs.dataset
    checkpoint_id = inputs.checkpoint["id"]
    scores = {} if validation is None else {f"validation_{key}": validation[name] for key, name in (
        ("set", "set"), ("base_loss", "baseLoss"), ("final_loss", "finalLoss"), ("drop", "drop"),
        ("best_step", "bestStep"), ("stopped_early", "stoppedEarly"))}
    return kohya_format.build_metadata(
        family=inputs.family, cfg=cfg, title=inputs.lora["name"], output_name=inputs.lora_id,
        dataset_name=ref["id"], captions=[it.caption for it in training.items], num_images=len(training.items),
        steps=step, epoch=epoch, num_epochs=training.num_epochs, batches_per_epoch=training.steps_per_epoch,
        world_size=training.world_size, optimizer_name=optim.optimizer_name,
        mixed_precision=run.accelerator.mixed_precision, started_at=run.started_at, finished_at=finished_at,
        bucket_info=_bucket_counts(training.buckets), session_id=step_seed(cfg["seed"], inputs.release_id) % 2**31,
        checkpoint_name=checkpoint_id, checkpoint_sha256=run.checkpoint_hash,
        objective=model.objective,
        lorakit={"release_id": inputs.release_id, "lora_id": inputs.lora_id, "checkpoint_id": checkpoint_id,
                 "checkpoint_sha256": run.checkpoint_hash, "dataset_id": ref["id"], "dataset_scope": ref["scope"],
                 "dataset_project": ref["projectId"], "manifest_hash": ref["manifestHash"], "config": cfg,
                 "final": "true" if final else "false", "notes": training.notes, **scores},
    )


# ---- helpers the phases use -------------------------------------------------------------------------------------
def _finish_recorded_run(resumed: ResumedRun) -> TrainResult:
    """Close a run whose release is already on the LoRA record: mark it complete and drop its state."""
    run, release, out_dir = resumed.run, resumed.recorded or {}, resumed.out_dir
    lora_id = run["loraId"]
    print(f"run {lora_id}/{run['releaseId']} was already recorded as a release; finishing its bookkeeping only",
          file=sys.stderr)
    _update_run(out_dir, status="complete")
    _remove_state(out_dir)
    return TrainResult(lora_id, run["releaseId"], out_dir, weights_path=out_dir / f"{lora_id}.safetensors",
                       release=release, steps=int(release.get("training", {}).get("steps") or run.get("step") or 0),
                       final_loss=release.get("training", {}).get("finalLoss"))


def _bucket_counts(buckets: Sequence[tuple[int, int]]) -> dict:
    counts: dict[str, int] = {}
    for w, h in buckets:
        counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
    return dict(sorted(counts.items()))


def _make_accelerator(cfg: dict, cpu: bool):
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    on_gpu = torch.cuda.is_available() and not cpu
    precision = cfg["mixed_precision"]
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if on_gpu else "no"
    elif precision != "no" and not on_gpu:
        print(f"mixed_precision {precision} needs a GPU; training in fp32 on the CPU", file=sys.stderr)
        precision = "no"
    # Several runs in one process (a notebook, the tests) each get a fresh accelerate state; the process
    # group of a distributed launch is kept.
    with contextlib.suppress(Exception):
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=not on_gpu, gradient_accumulation_steps=1)


def _make_optimizer(cfg: dict, groups: list[dict], device):
    import torch

    kind = cfg["optimizer"]
    if kind == "auto":
        kind = "adamw8bit" if device.type == "cuda" and _has_bitsandbytes() else "adamw"
    kwargs = {"betas": (cfg["adam_beta1"], cfg["adam_beta2"]), "eps": cfg["adam_epsilon"],
              "weight_decay": cfg["weight_decay"]}
    if kind == "adamw8bit":
        if not _has_bitsandbytes():
            raise TrainingError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes)")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kwargs), "bitsandbytes.optim.AdamW8bit"
    if device.type == "cuda":
        # One kernel for every parameter instead of a handful per tensor: the LoRA's thousands of small tensors
        # make the per-tensor launches, not the arithmetic, what a step's optimizer part costs.
        return torch.optim.AdamW(groups, **kwargs, fused=True), "torch.optim.AdamW (fused)"
    return torch.optim.AdamW(groups, **kwargs), "torch.optim.AdamW"


def _has_bitsandbytes() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


@contextlib.contextmanager
def _no_sync(accelerator, models, skip_sync: bool):
    """Skip DDP's gradient all-reduce for the micro-batches before the last one of a step."""
    with contextlib.ExitStack() as stack:
        if skip_sync and accelerator.num_processes > 1:
            for model in models:
                stack.enter_context(accelerator.no_sync(model))
        yield


class _StopRequest:
    """Ctrl-C / SIGTERM ask the loop to stop at the end of the current step (then the state is saved), so a
    saved state is never half-updated. A second Ctrl-C interrupts at once. With several processes the flag
    is agreed on by all of them, so they stop at the same step."""

    def __init__(self, distributed: bool):
        self.flag = False
        self.distributed = distributed

    def _handle(self, signum, frame):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def requested(self) -> bool:
        if not self.distributed:
            return self.flag
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.flag else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _render_samples(pipe, objective: Objective, cfg: dict, folder: Path, epoch: int, accelerator, root: Root) -> None:
    """Sample images with fixed prompts and seeds, written as ``samples/e000001-00.png``, sampled the way the
    checkpoint's objective needs (as the eval grids are)."""
    import torch

    from ..families.objectives import DEFAULT_GUIDANCE_RESCALE

    root.make_folder(folder)
    pipe.unet.eval()
    pipe.scheduler = objective.render_scheduler(pipe.scheduler)
    with torch.no_grad(), accelerator.autocast():
        for i, prompt in enumerate(cfg["sample_prompts"]):
            generator = torch.Generator(device=accelerator.device).manual_seed(cfg["sample_seed"] + i)
            image = pipe(prompt, num_inference_steps=cfg["sample_steps"], guidance_scale=cfg["sample_guidance_scale"],
                         height=cfg["resolution"], width=cfg["resolution"], generator=generator,
                         **objective.render_kwargs(DEFAULT_GUIDANCE_RESCALE)).images[0]
            with root.atomic(folder / f"e{epoch:06d}-{i:02d}.png", durable=False) as handle:
                image.save(handle, format="PNG")


# ---- run folder: run.json and the resumable state ----------------------------------------------------------
def _write_run(out_dir: Path, run: dict) -> None:
    run_root(out_dir).write_atomic(out_dir / RUN_FILE, (json.dumps(run, indent=2) + "\n").encode("utf-8"))


def _read_run(out_dir: Path) -> dict:
    """The run folder's ``run.json``, checked (see :func:`_checked_run`)."""
    path = out_dir / RUN_FILE
    fresh = _start_afresh(out_dir)
    try:
        # Through lorasRoot's directory handles, as it was written: a run.json (or a folder above it) that is a
        # link, a FIFO or a hard link to a file elsewhere is refused, never read.
        with run_root(out_dir).open_read(path, "run file", max_bytes=_MAX_RUN_BYTES) as handle:
            raw = handle.read()
    except (FileNotFoundError, NotADirectoryError):
        raise
    except RecordError as exc:
        raise TrainingError(f"{exc}; {fresh}") from None
    except OSError as exc:
        raise TrainingError(f"{path} cannot be read ({exc.strerror or exc}); {fresh}") from None
    try:
        run = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise TrainingError(f"{path}: not UTF-8 text (byte {exc.start}); {fresh}") from None
    except json.JSONDecodeError as exc:
        raise TrainingError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); it is "
                            f"damaged (cut short?); {fresh}") from None
    except RecursionError:
        raise TrainingError(f"{path}: nested too deeply to be a run's file; {fresh}") from None
    problem = _run_problem(run, out_dir)
    if problem:
        raise TrainingError(f"{path}: {problem}; it is damaged or not lorakit's: {fresh}")
    return run


_MAX_RUN_BYTES = 16 * 2**20
_RUN_STATUSES = ("running", "interrupted", "failed", "complete")
_MAX_PID = 2**31 - 1  # pid_t; os.kill refuses more, and 0 or less would signal a process group
_MAX_COUNT = 2**53


def _start_afresh(out_dir: Path) -> str:
    return (f"to start the run afresh, delete the run folder {out_dir} (or train without --resume, which starts a "
            "new run)")


def _run_problem(run: Any, out_dir: Path) -> str | None:
    """What makes ``run`` (a parsed ``run.json``) unusable, as ``at $.field: ...``, else None. The fields the
    resume reads must have the types lorakit writes: the file sits in a folder anyone may have edited."""
    if not isinstance(run, dict):
        return f"not a JSON object (a {type(run).__name__})"

    def is_text(value: Any) -> bool:
        return isinstance(value, str)

    def is_count(low: int, high: int) -> Any:
        return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    def maybe(check: Any) -> Any:
        return lambda v: v is None or check(v)

    required = {
        "releaseId": (lambda v: v == out_dir.name, f"the run folder's name, {out_dir.name!r}"),
        "loraId": (lambda v: v == out_dir.parent.name, f"the LoRA folder's name, {out_dir.parent.name!r}"),
        "status": (lambda v: v in _RUN_STATUSES, f"one of {', '.join(_RUN_STATUSES)}"),
        "step": (is_count(0, _MAX_COUNT), "an integer >= 0"),
        "startedAt": (is_text, "a time (a string)"),
        "config": (lambda v: isinstance(v, dict), "an object of training settings"),
        "dataset": (lambda v: isinstance(v, dict), "an object"),
    }
    optional = {
        "loraProject": (maybe(is_text), "a project id or null"),
        "worldSize": (is_count(1, 2**16), "a positive integer (processes)"),
        "host": (is_text, "a host name (a string)"),
        "pid": (is_count(1, _MAX_PID), f"a process id (an integer from 1 to {_MAX_PID})"),
        "notes": (maybe(is_text), "a string or null"),
        "setActive": (lambda v: isinstance(v, bool), "true or false"),
        "preset": (maybe(is_text), "a preset name or null"),
    }
    for key, (check, expected) in (required | optional).items():
        if key not in run:
            if key in required:
                return f"at $.{key}: missing (expected {expected})"
            continue
        if not check(run[key]):
            return f"at $.{key}: {_shown(run[key])} is not {expected}"
    dataset = {"id": (is_text, "a dataset id"), "manifestHash": (is_text, "a hash (a string)"),
               "path": (maybe(is_text), "a manifest path or null"), "projectId": (maybe(is_text), "a project id or null")}
    for key, (check, expected) in dataset.items():
        if not check(run["dataset"].get(key)):
            return f"at $.dataset.{key}: {_shown(run['dataset'].get(key))} is not {expected}"
    unknown = sorted(k for k in run["config"] if k not in DEFAULTS)
    if unknown:
        return f"at $.config: unknown training setting(s) {_shown(', '.join(map(str, unknown)))}"
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _update_run(out_dir: Path, **changes) -> None:
    _write_run(out_dir, {**_read_run(out_dir), **changes, "updatedAt": now_iso()})


def _find_run(runs_root: Path, resume: bool | str) -> dict:
    """The run to resume: the named release, else the most recently started unfinished run of the LoRA."""
    # The LoRA's folder and its run folders are listed and read through lorasRoot's directory handles: a folder
    # or a run.json there that is a link is refused, never read through.
    if isinstance(resume, str) and resume not in ("", "latest"):
        check_id(resume, "release id")
        try:
            run = _read_run(runs_root / resume)
        except (FileNotFoundError, NotADirectoryError):
            raise TrainingError(f"no run {resume!r} to resume under {runs_root}") from None
        if run["status"] not in RESUMABLE:
            raise TrainingError(f"run {resume!r} is {run['status']}; only interrupted runs can be resumed")
        if _still_running(run):
            raise TrainingError(f"run {resume!r} is still running (process {run['pid']} on this machine)")
        return run
    runs = []
    for name in Root(runs_root.parent, "lorasRoot").names(runs_root):  # runs_root is <lorasRoot>/<lora>
        out_dir = runs_root / name
        try:
            run = _read_run(out_dir)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if run.get("status") in RESUMABLE and not _still_running(run):
            runs.append(run)
    if not runs:
        raise TrainingError(f"no interrupted run to resume under {runs_root}")
    return max(runs, key=lambda r: r["startedAt"])


def _still_running(run: dict) -> bool:
    """A "running" run whose process is alive on this machine is not interrupted: never resume it twice."""
    if run.get("status") != "running" or run.get("host") != socket.gethostname() or not run.get("pid"):
        return False
    return run["pid"] != os.getpid() and pid_alive(run["pid"])


def _save_state(path: Path, step: int, models, optimizer, lr_scheduler, accelerator, validation: dict | None = None) -> None:
    """The resumable state, written atomically: trained LoRA weights (fp32), optimizer, scheduler, step and the
    validation scores so far (with the best score's weights)."""
    import torch

    state = {
        "step": step,
        "models": [{n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(m).named_parameters() if p.requires_grad}
                   for m in models],
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) else None,
        "validation": validation,
    }
    with run_root(path.parent.parent).atomic(path) as handle:
        torch.save(state, handle)


def _load_state(path: Path, models, optimizer, lr_scheduler, accelerator, total_steps: int) -> tuple[int, dict | None]:
    """Load a saved state into the models, optimizer and scheduler; returns its step and validation scores.

    Everything in it is checked before anything is loaded (the step, every number and tensor finite, the
    validation scores, the tensors' shapes): a damaged or planted state must stop the resume here, naming the
    file, not train on NaN to a release that cannot be recorded."""
    import torch

    fresh = f"delete {path.parent} and train again without --resume (the run then starts afresh)"

    # The run folder can come from someone else (a shared drive, a copied data folder): a state file is read
    # as tensors, numbers and containers only, so a planted pickle cannot run code.
    try:
        with run_root(path.parent.parent).open_read(path, "saved training state") as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except LorakitError:
        raise
    except Exception as exc:  # torch wraps the refused global in a pickle.UnpicklingError, other damage varies
        raise TrainingError(
            f"saved training state {path} cannot be read as plain tensors and numbers ({type(exc).__name__}); it "
            f"is damaged or was not written by lorakit: delete {path.parent} and train again without --resume"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("models"), list) or "step" not in state:
        raise TrainingError(f"saved training state {path} is not lorakit's; {fresh}")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total_steps:
        raise TrainingError(f"saved training state {path}: step {step!r} is not a step of this run (0 to "
                            f"{total_steps}); {fresh}")
    validation = state.get("validation")
    if validation is not None and not isinstance(validation, dict):
        raise TrainingError(f"saved training state {path}: its validation block is not lorakit's; {fresh}")
    scores = (validation or {}).get("scores")
    if scores is not None:
        try:
            ValidationScores.from_state(scores, last_step=step)
        except ValueError as exc:
            raise TrainingError(f"saved training state {path} has damaged validation scores ({exc}); {fresh}") from None
    bad = _non_finite_at({k: v for k, v in state.items() if k != "validation"}) or \
        _non_finite_at((validation or {}).get("bestModels"), "validation.bestModels")
    if bad:
        raise TrainingError(f"saved training state {path}: the value at {bad} is NaN or infinite; {fresh}")
    if len(state["models"]) != len(models):
        raise TrainingError(f"saved training state {path} does not match this run's models; {fresh}")
    loaded = []
    for model, saved in zip(models, state["models"], strict=True):
        params = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        if not isinstance(saved, dict) or set(params) != set(saved) or any(
                not isinstance(saved[n], torch.Tensor) or saved[n].shape != p.shape for n, p in params.items()):
            raise TrainingError(f"saved state {path} does not match this run's LoRA layers; {fresh}")
        loaded.append((params, saved))
    with torch.no_grad():
        for params, saved in loaded:
            for name, param in params.items():
                param.copy_(saved[name])
    try:
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state.get("scaler") and getattr(accelerator, "scaler", None):
            accelerator.scaler.load_state_dict(state["scaler"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise TrainingError(f"saved training state {path}: its optimizer or schedule does not fit this run "
                            f"({type(exc).__name__}); {fresh}") from None
    return step, validation


def _non_finite_at(value: Any, where: str = "") -> str | None:
    """The path of the first NaN or infinite number or tensor element in ``value`` (nested dicts, lists,
    tuples), else None."""
    import torch

    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, at = stack.pop()
        if isinstance(item, torch.Tensor):
            if (item.is_floating_point() or item.is_complex()) and not bool(torch.isfinite(item).all()):
                return at or "the state"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return at or "the state"
        elif isinstance(item, dict):
            stack.extend((v, f"{at}.{k}" if at else str(k)) for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(item))
    return None


def _remove_state(out_dir: Path) -> None:
    run_root(out_dir).remove_folder(out_dir / "state")


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for name in ("lorakit", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions
