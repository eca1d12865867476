"""The native LoRA trainer: one recipe, read top to bottom.

    dataset manifest -> checked images -> aspect-ratio buckets -> VAE latents (cached in memory and on disk)
    -> text embeddings (cached when nothing about them changes) -> LoRA (peft) on the UNet's attention
    projections [+ text encoders, + convolutions] -> accelerate loop -> kohya .safetensors -> candidate release

:func:`train_lora` is the whole recipe; the steps it takes are the numbered sections below. The parts it
uses are small plain modules: ``config`` (presets and precedence), ``data`` (files, buckets, captions, the
latent cache), ``kohya_format`` (file layout and metadata) and ``progress`` (CSV log, loss plot).

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
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError, RecordError
from ..ids import check_id, given_or_new_id
from ..loras import add_release, find_lora, make_release
from ..store import now_iso, write_atomic
from ..workspace import Workspace, as_workspace
from .config import TrainingError, numeric_config_diff, resolve_config
from .data import check_items, epoch_batches, make_buckets, padded_batches, pick_bucket
from .progress import LOG_NAME

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
    release: str | None = None,
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
) -> TrainResult:
    """Train a LoRA release on a dataset manifest and append it to the LoRA record as a ``candidate``.

    ``lora`` is looked up in ``project`` then the shared scope (or only in ``scope``); the LoRA's checkpoint is
    the base model. ``dataset`` is a dataset id (project, then shared) or a manifest file path; a dataset
    filtered for another checkpoint is refused unless ``force``. The config is resolved from ``preset`` <
    ``config_file`` < ``config`` < ``overrides`` (see :func:`lorakit.train.resolve_config`). ``dry_run``
    checks everything and returns the plan without loading a model. ``resume=True`` continues the latest
    interrupted run of this LoRA (or ``resume="<release id>"`` that one) with its stored config and dataset.

    >>> result = train_lora(ws, "hero", "hero_v1", project="demo", preset="sd15-style", set_active=True)  # doctest: +SKIP
    >>> result.weights_path                                                                            # doctest: +SKIP
    PosixPath('/models/loras/hero/01J.../hero.safetensors')
    """
    ws = as_workspace(ws)

    # ---- 1. Records: the LoRA, its checkpoint, the dataset, the config -----------------------------------
    from ..models import checkpoint_family, get_checkpoint

    check_id(lora, "LoRA id")
    runs_root = ws.config.loras_root / lora
    previous_run = _find_run(runs_root, resume) if resume else None
    if previous_run and project is None and scope is None:
        project = previous_run.get("loraProject")
    lora_record, lora_project = find_lora(ws, lora, project=project, scope=scope)
    lora_id = lora_record["id"]
    if previous_run:
        recorded = next((r for r in lora_record.get("releases", []) if r.get("id") == previous_run["releaseId"]), None)
        if recorded is not None:
            # Killed after the release was recorded but before run.json said so: the file on the record is the
            # result. Training again would overwrite it and break its sha256, so only the bookkeeping is left.
            return _finish_recorded_run(runs_root / previous_run["releaseId"], lora_id, previous_run, recorded)
    checkpoint = get_checkpoint(ws, lora_record["checkpointId"])
    family = checkpoint_family(checkpoint)
    if previous_run:
        # A resumed run uses what the interrupted one stored: same dataset, config and release id. A manifest
        # path in run.json (a file anyone may have edited) must lie inside the data root.
        stored_path = previous_run["dataset"]["path"]
        if stored_path:
            ws.store.file_path(stored_path, what=f"run {previous_run['releaseId']} dataset path (run.json)")
        dataset = stored_path or previous_run["dataset"]["id"]
        project = previous_run["dataset"]["projectId"] or project
        release = previous_run["releaseId"]
        notes = notes if notes is not None else previous_run.get("notes")
        set_active = set_active or previous_run.get("setActive", False)
        preset = previous_run.get("preset")
    if dataset is None:
        raise TrainingError("give a dataset (--dataset ID or a manifest path)")
    manifest, dataset_ref = _load_manifest(ws, dataset, project)
    _check_dataset_checkpoint(manifest, lora_record["checkpointId"], force)
    if previous_run:
        cfg = previous_run["config"]
        if previous_run["dataset"]["manifestHash"] != dataset_ref["manifestHash"]:
            raise TrainingError(f"cannot resume {release}: dataset {dataset_ref['id']!r} changed since the run started")
        if any(v is not None for v in (config, config_file)) or any(v is not None for v in (overrides or {}).values()):
            asked = resolve_config(family, preset=preset, config_file=config_file, config=config,
                                   overrides=overrides, force=force)
            changed = numeric_config_diff(asked, cfg)
            if changed:
                raise TrainingError(f"cannot resume {release} with different settings ({', '.join(changed)}); "
                                    "resume without them, or start a new run")
    else:
        cfg = resolve_config(family, preset=preset, config_file=config_file, config=config, overrides=overrides,
                             force=force)
    release_id = given_or_new_id(release, "release id")
    if not previous_run and any(r.get("id") == release_id for r in lora_record.get("releases", [])):
        raise RecordError(f"LoRA {lora_id!r} already has a release {release_id!r}")
    out_dir = runs_root / release_id
    weights_path = out_dir / f"{lora_id}.safetensors"

    # ---- 2. Data: every image must exist and match the manifest, before anything is loaded -------------------
    items = check_items(ws.store, manifest["items"])
    buckets_available = make_buckets(cfg["resolution"], cfg["bucket_step"], cfg["bucket_min_side"], cfg["bucket_max_side"])
    item_buckets = [pick_bucket(it.width, it.height, buckets_available, no_upscale=cfg["bucket_no_upscale"],
                                step=cfg["bucket_step"]) for it in items]

    # ---- 3. The distributed setup and the step plan -----------------------------------------------------------
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    micro_per_step = cfg["gradient_accumulation_steps"] * world_size
    batches_per_epoch = len(padded_batches(epoch_batches(item_buckets, cfg["batch_size"], cfg["repeats"], cfg["seed"], 0),
                                           micro_per_step))
    steps_per_epoch = batches_per_epoch // micro_per_step
    total_steps = cfg["steps"] or cfg["epochs"] * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    plan = {
        "lora": lora_id, "loraProject": lora_project, "release": release_id, "checkpoint": checkpoint["id"],
        "family": family, "dataset": dataset_ref, "images": len(items),
        "buckets": _bucket_counts(item_buckets), "stepsPerEpoch": steps_per_epoch, "steps": total_steps,
        "epochs": num_epochs, "worldSize": world_size, "weights": str(weights_path), "config": cfg,
        "resumeFrom": previous_run["step"] if previous_run else None,
    }
    if dry_run:
        return TrainResult(lora_id, release_id, out_dir, plan=plan)

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from peft import LoraConfig
    from tqdm.auto import tqdm

    from ..models import checkpoint_weights_hash, load_pipeline
    from . import kohya_format
    from .data import LatentCache, caption_for_step, latent_cache_key, load_pixels, step_seed
    from .progress import LossLog

    accelerator = _make_accelerator(cfg, cpu)
    device, rank, is_main = accelerator.device, accelerator.process_index, accelerator.is_main_process
    if accelerator.num_processes != world_size:
        raise TrainingError(f"accelerate sees {accelerator.num_processes} processes but WORLD_SIZE is {world_size}")
    mixed_precision = accelerator.mixed_precision
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    vae_dtype = torch.float32 if cfg["vae_fp32"] else weight_dtype
    # The main process hashes the weights (and records the hash) first; the others then read the recorded one.
    if is_main:
        checkpoint_hash = checkpoint_weights_hash(ws, checkpoint)
    accelerator.wait_for_everyone()
    if not is_main:
        checkpoint_hash = checkpoint_weights_hash(ws, checkpoint["id"])
    started_at = time.time()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_run(out_dir, {
            "releaseId": release_id, "loraId": lora_id, "loraProject": lora_project, "status": "running",
            "step": previous_run["step"] if previous_run else 0, "config": cfg, "dataset": dataset_ref,
            "checkpointId": checkpoint["id"], "worldSize": world_size, "notes": notes, "setActive": set_active,
            "preset": preset,
            "startedAt": previous_run["startedAt"] if previous_run else now_iso(),
            "host": socket.gethostname(), "pid": os.getpid(),
        })
    if previous_run and previous_run.get("worldSize", 1) != world_size:
        raise TrainingError(f"run {release_id} used {previous_run['worldSize']} processes; resume it with the same number")

    # ---- 4. The base model: frozen, in the training dtype, SDPA attention (diffusers' default in torch 2) ----
    pipe = load_pipeline(ws, checkpoint, torch_dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    unet, vae = pipe.unet, pipe.vae
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    for module in [unet, vae, *text_encoders]:
        module.requires_grad_(False)
    for module, dtype in [(unet, weight_dtype), (vae, vae_dtype)] + [(e, weight_dtype) for e in text_encoders]:
        # Only cast when the dtype changes (diffusers warns about every cast, even to the same dtype).
        module.to(device) if module.dtype == dtype else module.to(device, dtype)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type

    # ---- 5. LoRA adapters (peft), initialised from the seed; trained weights stay in fp32 -------------------
    torch.manual_seed(cfg["seed"])
    unet_targets = list(cfg["unet_target_modules"])
    module_names = [n for n, _ in unet.named_modules()]
    unknown = [t for t in unet_targets if not any(_matches(n, [t]) for n in module_names)]
    if unknown:
        if is_main:
            _update_run(out_dir, status="failed")
        leaves = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                         for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)})
        raise TrainingError(f"unet_target_modules {', '.join(map(repr, unknown))} match no module of this UNet; "
                            f"names end a module path, e.g. {', '.join(leaves[:12])}")
    rank_pattern, alpha_pattern = {}, {}
    if cfg["train_conv"]:
        conv_modules = r".*(resnets\.\d+\.conv1|resnets\.\d+\.conv2|downsamplers\.0\.conv|upsamplers\.0\.conv)$"
        names = [n for n, _ in unet.named_modules() if _matches(n, unet_targets) or _regex_match(conv_modules, n)]
        rank_pattern = {n: cfg["conv_rank"] for n in names if _regex_match(conv_modules, n)}
        alpha_pattern = {n: cfg["conv_alpha"] for n in rank_pattern}
        unet_targets = names
    unet.add_adapter(LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["lora_dropout"],
                                target_modules=unet_targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
    trained = [unet]
    if cfg["train_text_encoder"]:
        for encoder in text_encoders:
            encoder.add_adapter(LoraConfig(r=cfg["rank"], lora_alpha=cfg["alpha"], lora_dropout=cfg["lora_dropout"],
                                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        trained += text_encoders
    for module in trained:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if cfg["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        for encoder in trained[1:]:
            encoder.gradient_checkpointing_enable()
    unet.train()
    for encoder in text_encoders:
        encoder.train(cfg["train_text_encoder"])

    # ---- 6. Caches: latents once per run (and on disk), text embeddings when captions are fixed -------------
    def encode_pixels(pixels):
        with torch.no_grad():
            latents = vae.encode(pixels.to(device, vae_dtype)).latent_dist.mode()
        return latents.float() * vae.config.scaling_factor

    latents_in_memory: dict[int, torch.Tensor] = {}
    if cfg["cache_latents"]:
        cache = LatentCache(cfg["latent_cache_dir"] or ws.data_root / ".lorakit" / "cache" / "latents")
        keys = [latent_cache_key(it.sha256, checkpoint["id"], checkpoint_hash, b, cfg["background"], str(vae_dtype))
                for it, b in zip(items, item_buckets, strict=True)]
        # One process per machine fills the disk cache, then the others read it.
        for fill in (True, False):
            if fill == accelerator.is_local_main_process:
                for position, (item, key) in enumerate(zip(items, keys, strict=True)):
                    latent = cache.get(key)
                    if latent is None:
                        # One image at a time, so a latent never depends on which others were cached already.
                        pixels = load_pixels(item, item_buckets[position], cfg["background"])[None]
                        latent = encode_pixels(pixels)[0].cpu()
                        cache.put(key, latent)
                    latents_in_memory[position] = latent
            if fill:
                accelerator.wait_for_everyone()

    def batch_latents(positions: list[int]):
        if cfg["cache_latents"]:
            return torch.stack([latents_in_memory[p] for p in positions]).to(device)
        pixels = torch.stack([load_pixels(items[p], item_buckets[p], cfg["background"]) for p in positions])
        return encode_pixels(pixels)

    def encode_captions(captions: list[str]):
        """Prompt embeddings (and SDXL's pooled embedding) as the family's pipeline computes them."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            out = encoder(ids, output_hidden_states=True)
            if family == "sdxl":
                hidden.append(out.hidden_states[-2])   # SDXL conditions on the penultimate layer of both encoders
                pooled = out[0]                        # the second encoder's projected pooled output
            elif cfg["clip_skip"] > 1:
                hidden.append(encoder.text_model.final_layer_norm(out.hidden_states[-cfg["clip_skip"]]))
            else:
                hidden.append(out.last_hidden_state)
        return torch.cat(hidden, dim=-1), pooled

    captions_fixed = not cfg["shuffle_tags"] and not cfg["train_text_encoder"]
    text_cache: dict[str, tuple] = {}
    if cfg["cache_text_embeddings"] and captions_fixed:
        with torch.no_grad():
            for caption in sorted({it.caption for it in items} | ({""} if cfg["caption_dropout"] else set())):
                embeds, pooled = encode_captions([caption])
                text_cache[caption] = (embeds[0], None if pooled is None else pooled[0])
        if not cfg["sample_prompts"]:
            for encoder in text_encoders:
                encoder.to("cpu")  # not needed on the accelerator any more

    def batch_text(captions: list[str]):
        if text_cache:
            embeds = torch.stack([text_cache[c][0] for c in captions])
            pooled = torch.stack([text_cache[c][1] for c in captions]) if family == "sdxl" else None
            return embeds, pooled
        with contextlib.nullcontext() if cfg["train_text_encoder"] else torch.no_grad():
            return encode_captions(captions)

    def sdxl_time_ids(positions: list[int]):
        from .data import crop_and_size

        rows = []
        for p in positions:
            bw, bh = item_buckets[p]
            crop, original = crop_and_size(items[p].width, items[p].height, item_buckets[p])
            rows.append([*original, *crop, bh, bw])   # (orig h, orig w, crop top, crop left, target h, target w)
        return torch.tensor(rows, dtype=weight_dtype, device=device)

    # ---- 7. Optimizer, learning-rate schedule, accelerate ---------------------------------------------------
    param_groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg["lr"]}]
    for encoder in trained[1:]:
        param_groups.append({"params": [p for p in encoder.parameters() if p.requires_grad], "lr": cfg["text_encoder_lr"]})
    optimizer, optimizer_name = _make_optimizer(cfg, param_groups, device)
    lr_scheduler = get_scheduler("cosine" if cfg["lr_scheduler"] == "cosine" else "constant_with_warmup", optimizer,
                                 num_warmup_steps=cfg["lr_warmup_steps"], num_training_steps=total_steps)
    # The scheduler is stepped by hand once per optimizer step, so it is not handed to accelerate (which would
    # step it once per process).
    prepared = accelerator.prepare(*trained, optimizer)
    trained_models, optimizer = list(prepared[:-1]), prepared[-1]
    unet_for_training = trained_models[0]
    trainable = [p for group in optimizer.param_groups for p in group["params"]]

    start_step = 0
    state_path = out_dir / "state" / STATE_FILE
    if previous_run and state_path.exists():
        start_step = _load_state(state_path, trained, optimizer, lr_scheduler, accelerator)
    log = LossLog(out_dir / LOG_NAME, resume_from_step=start_step) if is_main else None

    def save_state(step: int) -> None:
        if is_main:
            _save_state(state_path, step, trained, optimizer, lr_scheduler, accelerator)
            _update_run(out_dir, step=step)
        accelerator.wait_for_everyone()

    def lora_tensors():
        encoders = [accelerator.unwrap_model(m) for m in trained_models[1:]]
        return kohya_format.kohya_state_dict(family, accelerator.unwrap_model(unet_for_training), encoders,
                                             dtype=kohya_format.SAVE_DTYPES["fp16"])

    def metadata(step: int, epoch: int, finished_at: float, final: bool) -> dict[str, str]:
        return kohya_format.build_metadata(
            family=family, cfg=cfg, title=lora_record["name"], output_name=lora_id,
            dataset_name=dataset_ref["id"], captions=[it.caption for it in items], num_images=len(items), steps=step,
            epoch=epoch, num_epochs=num_epochs, batches_per_epoch=steps_per_epoch, world_size=world_size,
            optimizer_name=optimizer_name, mixed_precision=mixed_precision, started_at=started_at,
            finished_at=finished_at, bucket_info=plan["buckets"], session_id=step_seed(cfg["seed"], release_id) % 2**31,
            checkpoint_name=checkpoint["id"], checkpoint_sha256=checkpoint_hash, prediction_type=prediction_type,
            lorakit={"release_id": release_id, "lora_id": lora_id, "checkpoint_id": checkpoint["id"],
                     "checkpoint_sha256": checkpoint_hash, "dataset_id": dataset_ref["id"],
                     "dataset_scope": dataset_ref["scope"], "dataset_project": dataset_ref["projectId"],
                     "manifest_hash": dataset_ref["manifestHash"], "config": cfg, "final": "true" if final else "false",
                     "notes": notes},
        )

    # ---- 8. The loop --------------------------------------------------------------------------------------
    if is_main and start_step:
        print(f"resuming {lora_id}/{release_id} at step {start_step} of {total_steps}", file=sys.stderr)
    bar = tqdm(total=total_steps, initial=start_step, desc=f"{lora_id} {release_id[-6:]}", unit="step",
               disable=not (progress and is_main), dynamic_ncols=True)
    stop = _StopRequest(world_size > 1)
    step, loss_value, loop_start = start_step, float("nan"), time.perf_counter()
    snr_gamma = cfg["min_snr_gamma"]
    with stop.installed():
        try:
            for epoch in range(start_step // steps_per_epoch, num_epochs):
                batches = padded_batches(epoch_batches(item_buckets, cfg["batch_size"], cfg["repeats"], cfg["seed"], epoch),
                                         micro_per_step)
                for step_in_epoch in range(step - epoch * steps_per_epoch, steps_per_epoch):
                    if step >= total_steps:
                        break
                    step_loss = torch.zeros((), device=device)
                    for micro in range(cfg["gradient_accumulation_steps"]):
                        positions = batches[(step_in_epoch * cfg["gradient_accumulation_steps"] + micro) * world_size + rank]
                        seed = step_seed(cfg["seed"], step, micro, rank)
                        generator = torch.Generator(device=device).manual_seed(seed)
                        if cfg["lora_dropout"]:
                            torch.manual_seed(seed)
                        caption_rng = random.Random(seed)
                        captions = [caption_for_step(items[p].caption, caption_rng, shuffle_tags=cfg["shuffle_tags"],
                                                     keep_tokens=cfg["keep_tokens"], dropout=cfg["caption_dropout"])
                                    for p in positions]
                        # Only the last micro-batch of a step synchronises gradients across processes.
                        sync = micro == cfg["gradient_accumulation_steps"] - 1
                        with _no_sync(accelerator, trained_models, not sync), accelerator.autocast():
                            latents = batch_latents(positions)
                            noise = torch.randn(latents.shape, generator=generator, device=device)
                            if cfg["noise_offset"]:
                                noise += cfg["noise_offset"] * torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                                                                           device=device)
                            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(positions),),
                                                      generator=generator, device=device)
                            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                            embeds, pooled = batch_text(captions)
                            extra = ({"added_cond_kwargs": {"text_embeds": pooled.to(device, weight_dtype),
                                                            "time_ids": sdxl_time_ids(positions)}}
                                     if family == "sdxl" else {})
                            pred = unet_for_training(noisy.to(weight_dtype), timesteps, embeds.to(device, weight_dtype),
                                                     **extra).sample
                            target = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)
                            loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                            if snr_gamma:
                                # min-SNR-gamma (Hang et al. 2023): cap each timestep's weight at gamma / SNR.
                                snr = compute_snr(noise_scheduler, timesteps)
                                weight = torch.clamp(snr, max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
                                loss = loss * weight
                            loss = loss.mean()
                        accelerator.backward(loss / cfg["gradient_accumulation_steps"])
                        step_loss += loss.detach()
                    step_loss = step_loss / cfg["gradient_accumulation_steps"]
                    if world_size > 1:
                        step_loss = accelerator.reduce(step_loss, reduction="mean")
                    loss_value = step_loss.item()
                    if not math.isfinite(loss_value):
                        # Checked before the optimizer step, so no NaN ever reaches the weights or a saved state.
                        raise TrainingError(
                            f"loss is {loss_value} at step {step + 1} (epoch {epoch + 1}); stopping, nothing recorded. "
                            "Lower the learning rate, use fp32/bf16 instead of fp16, or check the images"
                        )
                    if cfg["max_grad_norm"]:
                        accelerator.clip_grad_norm_(trainable, cfg["max_grad_norm"])
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    lr = lr_scheduler.get_last_lr()[0]
                    if log:
                        log.write(step, epoch + 1, loss_value, lr, time.perf_counter() - loop_start)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
                    if cfg["save_state_every"] and step % cfg["save_state_every"] == 0 and step < total_steps:
                        save_state(step)
                    if stop.requested():
                        save_state(step)
                        raise KeyboardInterrupt
                # End of an epoch: optional intermediate file and sample images.
                epoch_done = step % steps_per_epoch == 0 or step >= total_steps
                if epoch_done and is_main and step < total_steps:
                    every = cfg["save_every_n_epochs"]
                    if every and (epoch + 1) % every == 0:
                        tensors = lora_tensors()
                        kohya_format.save_lora_file(out_dir / f"{lora_id}-{epoch + 1:06d}.safetensors", tensors,
                                                    kohya_format.finish_metadata(tensors, metadata(step, epoch + 1, time.time(), False)))
                if epoch_done and is_main and cfg["sample_prompts"] and (epoch + 1) % cfg["sample_every_n_epochs"] == 0:
                    _render_samples(pipe, cfg, out_dir / "samples", epoch + 1, accelerator)
                    unet.train()
        except BaseException as exc:
            bar.close()
            if log:
                log.close()
            interrupted = isinstance(exc, KeyboardInterrupt)
            if is_main:
                _update_run(out_dir, status="interrupted" if interrupted else "failed")
                if interrupted:
                    print(f"\ninterrupted at step {step}; nothing recorded. Continue with: lorakit lora train --lora "
                          f"{lora_id}{' --project ' + lora_project if lora_project else ''} --resume {release_id}",
                          file=sys.stderr)
            raise
    bar.close()
    if log:
        log.close()

    # ---- 9. The weights file, then (and only then) the release ---------------------------------------------
    result = TrainResult(lora_id, release_id, out_dir, weights_path=weights_path, steps=step, final_loss=loss_value,
                         duration_s=time.time() - started_at, plan=plan)
    if is_main:
        finished_at = time.time()
        tensors = lora_tensors()
        try:
            sha256 = kohya_format.save_lora_file(
                weights_path, tensors, kohya_format.finish_metadata(tensors, metadata(step, num_epochs, finished_at, True)))
        except TrainingError:
            _update_run(out_dir, status="failed")
            raise
        training = {
            "config": cfg, "preset": preset, "datasetId": dataset_ref["id"],
            "datasetScope": dataset_ref["scope"], "datasetProjectId": dataset_ref["projectId"],
            "manifestHash": dataset_ref["manifestHash"], "checkpointId": checkpoint["id"], "checkpointFamily": family,
            "checkpointSha256": checkpoint_hash, "seed": cfg["seed"], "steps": step, "epochs": num_epochs,
            "images": len(items), "worldSize": world_size, "mixedPrecision": mixed_precision, "device": str(device),
            "optimizer": optimizer_name, "finalLoss": loss_value, "durationS": round(finished_at - started_at, 3),
            "startedAt": _read_run(out_dir)["startedAt"], "finishedAt": now_iso(), "libraries": _library_versions(),
            "lossLog": f"{lora_id}/{release_id}/{LOG_NAME}",
        }
        weights = {"kind": "config_relative", "base": "lorasRoot", "path": f"{lora_id}/{release_id}/{weights_path.name}"}
        release_entry = make_release(release_id, weights=weights, sha256=sha256, training=training, notes=notes)
        add_release(ws, lora_id, release_entry, project=lora_project, set_active=set_active)
        _update_run(out_dir, status="complete", step=step)
        _remove_state(out_dir)
        result.release = release_entry
    accelerator.wait_for_everyone()
    return result


# ---- helpers the recipe uses ---------------------------------------------------------------------------------
def _finish_recorded_run(out_dir: Path, lora_id: str, run: dict, release: dict) -> TrainResult:
    """Close a run whose release is already on the LoRA record: mark it complete and drop its state."""
    print(f"run {lora_id}/{run['releaseId']} was already recorded as a release; finishing its bookkeeping only",
          file=sys.stderr)
    _update_run(out_dir, status="complete")
    _remove_state(out_dir)
    return TrainResult(lora_id, run["releaseId"], out_dir, weights_path=out_dir / f"{lora_id}.safetensors",
                       release=release, steps=int(release.get("training", {}).get("steps") or run.get("step") or 0),
                       final_loss=release.get("training", {}).get("finalLoss"))



def _load_manifest(ws: Workspace, dataset: str | Path, project: str | None) -> tuple[dict, dict]:
    """The manifest and the reference the release keeps: ``{id, scope, projectId, manifestHash, path}``."""
    from ..datasets import manifest_hash

    text = str(dataset)
    if text.endswith(".json") or os.sep in text or "/" in text:
        path = Path(text)
        if not path.is_absolute():
            # Relative paths are tried against the data root (how a run stores them) and then the cwd.
            path = ws.data_root / text if (ws.data_root / text).exists() else Path.cwd() / text
        manifest = ws.store.read_path(path, "dataset", missing=f"dataset manifest file {text} does not exist")
        rel = os.path.relpath(path.resolve(), ws.data_root)
        path_ref = rel.replace(os.sep, "/") if not rel.startswith("..") else str(path.resolve())
    else:
        check_id(text, "dataset id")
        places = ([project] if project else []) + [None]
        for where in places:
            if ws.store.exists("dataset", text, project=where):
                manifest = ws.store.read("dataset", text, project=where)
                break
        else:
            searched = " and ".join(f"project {p!r}" if p else "the shared scope" for p in places)
            raise DatasetError(f"dataset {text!r} not found in {searched}")
        path_ref = None
    ref = {"id": manifest["id"], "scope": manifest["scope"], "projectId": manifest.get("projectId"),
           "manifestHash": manifest.get("manifestHash") or manifest_hash(manifest["items"]), "path": path_ref}
    return manifest, ref


def _check_dataset_checkpoint(manifest: dict, checkpoint_id: str, force: bool) -> None:
    """A dataset filtered for other checkpoints is for another base model: refuse it unless forced."""
    selection = manifest.get("selection") or {}
    wanted = list(selection.get("checkpoints") or []) + [c for c in (selection.get("checkpoint"), selection.get("checkpointId"))
                                                         if isinstance(c, str)]
    if wanted and checkpoint_id not in wanted and not force:
        raise DatasetError(
            f"dataset {manifest['id']!r} was built for checkpoint(s) {', '.join(wanted)}, but this LoRA trains on "
            f"{checkpoint_id!r}; build a dataset for {checkpoint_id!r}, or pass --force to train on it anyway"
        )


def _bucket_counts(buckets: list[tuple[int, int]]) -> dict:
    counts: dict[str, int] = {}
    for w, h in buckets:
        counts[f"{w}x{h}"] = counts.get(f"{w}x{h}", 0) + 1
    return dict(sorted(counts.items()))


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _regex_match(pattern: str, name: str) -> bool:
    import re

    return re.fullmatch(pattern, name) is not None


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


def _render_samples(pipe, cfg: dict, folder: Path, epoch: int, accelerator) -> None:
    """Sample images with fixed prompts and seeds, written as ``samples/e000001-00.png``."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    pipe.unet.eval()
    with torch.no_grad(), accelerator.autocast():
        for i, prompt in enumerate(cfg["sample_prompts"]):
            generator = torch.Generator(device=accelerator.device).manual_seed(cfg["sample_seed"] + i)
            image = pipe(prompt, num_inference_steps=cfg["sample_steps"], guidance_scale=cfg["sample_guidance_scale"],
                         height=cfg["resolution"], width=cfg["resolution"], generator=generator).images[0]
            image.save(folder / f"e{epoch:06d}-{i:02d}.png")


# ---- run folder: run.json and the resumable state ----------------------------------------------------------
def _write_run(out_dir: Path, run: dict) -> None:
    write_atomic(out_dir / RUN_FILE, (json.dumps(run, indent=2) + "\n").encode("utf-8"))


def _read_run(out_dir: Path) -> dict:
    return json.loads((out_dir / RUN_FILE).read_text(encoding="utf-8"))


def _update_run(out_dir: Path, **changes) -> None:
    _write_run(out_dir, {**_read_run(out_dir), **changes, "updatedAt": now_iso()})


def _find_run(runs_root: Path, resume: bool | str) -> dict:
    """The run to resume: the named release, else the most recently started unfinished run of the LoRA."""
    if isinstance(resume, str) and resume not in ("", "latest"):
        check_id(resume, "release id")
        path = runs_root / resume / RUN_FILE
        if not path.exists():
            raise TrainingError(f"no run {resume!r} to resume under {runs_root}")
        run = json.loads(path.read_text(encoding="utf-8"))
        if run["status"] not in RESUMABLE:
            raise TrainingError(f"run {resume!r} is {run['status']}; only interrupted runs can be resumed")
        if _still_running(run):
            raise TrainingError(f"run {resume!r} is still running (process {run['pid']} on this machine)")
        return run
    runs = []
    for path in runs_root.glob(f"*/{RUN_FILE}"):
        run = json.loads(path.read_text(encoding="utf-8"))
        if run.get("status") in RESUMABLE and not _still_running(run):
            runs.append(run)
    if not runs:
        raise TrainingError(f"no interrupted run to resume under {runs_root}")
    return max(runs, key=lambda r: r["startedAt"])


def _still_running(run: dict) -> bool:
    """A "running" run whose process is alive on this machine is not interrupted: never resume it twice."""
    if run.get("status") != "running" or run.get("host") != socket.gethostname() or not run.get("pid"):
        return False
    try:
        os.kill(run["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return run["pid"] != os.getpid()


def _save_state(path: Path, step: int, models, optimizer, lr_scheduler, accelerator) -> None:
    """The resumable state, written atomically: trained LoRA weights (fp32), optimizer, scheduler, step."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "models": [{n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(m).named_parameters() if p.requires_grad}
                   for m in models],
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) else None,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, models, optimizer, lr_scheduler, accelerator) -> int:
    import torch

    # The run folder can come from someone else (a shared drive, a copied data folder): a state file is read
    # as tensors, numbers and containers only, so a planted pickle cannot run code.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch wraps the refused global in a pickle.UnpicklingError, other damage varies
        raise TrainingError(
            f"saved training state {path} cannot be read as plain tensors and numbers ({type(exc).__name__}); it "
            f"is damaged or was not written by lorakit: delete {path.parent} and train again without --resume"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("models"), list) or "step" not in state:
        raise TrainingError(f"saved training state {path} is not lorakit's; delete {path.parent} and train again")
    for model, saved in zip(models, state["models"], strict=True):
        params = {n: p for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}
        if set(params) != set(saved):
            raise TrainingError(f"saved state {path} does not match this run's LoRA layers")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if state.get("scaler") and getattr(accelerator, "scaler", None):
        accelerator.scaler.load_state_dict(state["scaler"])
    return int(state["step"])


def _remove_state(out_dir: Path) -> None:
    state_dir = out_dir / "state"
    for child in state_dir.glob("*"):
        child.unlink()
    with contextlib.suppress(OSError):
        state_dir.rmdir()


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for name in ("lorakit", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "bitsandbytes"):
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions
