"""Training throughput at full size on a GPU: SDXL at 1024 px and SD1.5 at 512 px, through the real recipe.

    python benchmarks/bench_gpu.py [--out bench_gpu.json] [--steps 10] [--warmup 3] [--compile] [--peak-tflops 790]
    python benchmarks/bench_gpu.py --smoke        # the same code path on the tiny checkpoints, on the CPU, in seconds

Each row plans a run with ``lorakit.plan_training`` and trains it with ``lorakit.run_plan`` (every phase of the
native recipe: accelerate, the module sets, the latent cache, the loss, the optimizer) on a full-size model built
from lorakit's shipped SD1.5/SDXL configs with random weights, directly on the GPU and passed as ``pipeline``, so
nothing is downloaded or read from disk. The run's record names the tiny checkpoint of the same family (its id and
weights hash go in a throwaway release); the images are synthetic, at the row's resolution.

Rows: SD1.5 512 px; SDXL 1024 px at the largest batch that fits (``--sdxl-batch``, tried downwards on an
out-of-memory error); SDXL with gradient checkpointing at batch 1 and 4 (for 24 GB cards); optionally SDXL with
``compile_unet`` (its compile time reported apart); then an SDXL eval grid (20 steps, 1024 px) through the worker
path (eval record, jobs, ``run_worker`` with the pipeline put in its cache), batched as planned.

For each training row: images/s and step time (median of the timed steps, after ``--warmup`` steps), peak memory,
FLOPs of one training step per image (torch's FlopCounterMode on the adapted UNet, forward and backward, without
gradient checkpointing's recompute), the TFLOP/s that makes and its fraction of ``--peak-tflops`` (dense bf16 the
GPU sustains; 790 for an H200). The table is printed and written as JSON (``--out``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_workspace import bench_workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECT = "bench"
PROMPTS = ["a game icon of a red potion, white background", "a knight character sprite, side view"]


@dataclass
class Row:
    name: str
    family: str
    resolution: int
    batch: int
    gradient_checkpointing: bool = False
    compile_unet: bool = False


@dataclass
class Result:
    name: str
    family: str
    resolution: int
    batch: int
    gradient_checkpointing: bool
    compile_unet: bool
    images_per_s: float | None = None
    step_s: float | None = None
    first_step_s: float | None = None
    peak_memory_gib: float | None = None
    gflop_per_image: float | None = None
    achieved_tflops: float | None = None
    fraction_of_peak: float | None = None
    optimizer: str | None = None
    mixed_precision: str | None = None
    modules: dict = field(default_factory=dict)
    note: str = ""


# ---- the workspace ------------------------------------------------------------------------------------------
def make_workspace(root: Path):
    import lorakit
    from lorakit.families import NAMES
    from lorakit.models import make_tiny_checkpoint

    ws = bench_workspace(root, PROJECT)
    for family in NAMES:
        make_tiny_checkpoint(ws, f"tiny_{family}", family, asset_types=["icon"])
        lorakit.create_lora(ws, f"bench_{family}", name=f"Bench {family}", scope="project", project=PROJECT,
                            checkpoint=f"tiny_{family}", asset_types=["icon"])
    return ws


def write_dataset(ws, dataset_id: str, size: int, count: int) -> None:
    """``count`` synthetic ``size`` px images (smooth colour fields: quick to encode, not all alike)."""
    import numpy as np
    from PIL import Image

    from lorakit.store import now_iso

    folder = ws.data_root / "files" / dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    items = []
    for i in range(count):
        r = (ramp[None, :] * (i + 1) / count).repeat(size, 0)
        g = (ramp[:, None] * (count - i) / count).repeat(size, 1)
        b = np.full((size, size), 40 * (i % 6), np.float32)
        path = folder / f"{i}.png"
        Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), "RGB").save(path, compress_level=1)
        items.append({"assetId": f"a{i}", "assetVersionId": "v", "variantId": "v",
                      "path": f"files/{dataset_id}/{i}.png", "caption": "icon, gem, red",
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    now = now_iso()
    ws.store.write("dataset", {"id": dataset_id, "scope": "project", "projectId": PROJECT, "createdAt": now,
                               "updatedAt": now, "selection": {}, "items": items}, project=PROJECT)


# ---- the models ---------------------------------------------------------------------------------------------
def full_size_pipeline(ws, family: str, device: str, dtype):
    """A full-size pipeline of ``family`` from the shipped configs, random weights, built on ``device``."""
    import inspect

    import diffusers
    from transformers import CLIPTokenizer

    from lorakit.families import get
    from lorakit.models.loading import CONFIGS_DIR, complete_config_folder, config_cache_root, models_from_config

    model_family = get(family)
    folder = complete_config_folder(CONFIGS_DIR / family, family, config_cache_root(ws))  # adds the tokenizers
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    models = models_from_config(folder, family, device, vae=True)
    for name, model in models.items():
        if name != "vae":
            model.to(dtype)
    tokenizers = {e.tokenizer: CLIPTokenizer.from_pretrained(folder / e.tokenizer) for e in model_family.text_encoders}
    cls = model_family.pipeline_class()
    # SD1.5's pipeline also asks for its safety checker, which a benchmark leaves out.
    optional = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    accepted = inspect.signature(cls.__init__).parameters
    return cls(**models, **tokenizers, scheduler=scheduler, **{k: v for k, v in optional.items() if k in accepted})


def strip_adapters(pipe) -> None:
    """Back to the base UNet after a row (the recipe adds its adapters to the pipeline it is given)."""
    if getattr(pipe.unet, "peft_config", None):
        pipe.unet.unload_lora()
    pipe.unet.disable_gradient_checkpointing()
    pipe.unet.zero_grad(set_to_none=True)


def step_flops_per_image(pipe, family: str, resolution: int, device: str, dtype) -> float:
    """FLOPs of one training step of one image: forward and backward of the adapted UNet (no recompute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lorakit.families import get

    unet = pipe.unet
    side = resolution // 8
    latents = torch.randn(1, unet.config.in_channels, side, side, device=device, dtype=dtype)
    model_family = get(family)
    text = model_family.text_inputs_like(1, dict(unet.config), device, dtype)
    conditioning = model_family.denoiser_kwargs(text, [[resolution, resolution, 0, 0, resolution, resolution]],
                                                dtype, device)
    checkpointing = unet.is_gradient_checkpointing
    unet.disable_gradient_checkpointing()
    with FlopCounterMode(display=False) as counter:
        out = unet(latents, torch.tensor([500], device=device), **conditioning).sample
        out.float().square().mean().backward()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# ---- one training row ---------------------------------------------------------------------------------------
def train_row(ws, row: Row, pipe, *, smoke: bool, steps: int, warmup: int, device: str, dtype,
              peak_tflops: float, cache_dir: Path) -> Result:
    import torch

    import lorakit
    from lorakit.families import get

    result = Result(row.name, row.family, row.resolution, row.batch, row.gradient_checkpointing, row.compile_unet)
    dataset = f"ds_{row.family}_{row.resolution}_{row.batch}"
    if not ws.store.path("dataset", dataset, project=PROJECT).exists():
        write_dataset(ws, dataset, row.resolution, max(4, 2 * row.batch))
    config = {
        "resolution": row.resolution, "batch_size": row.batch, "steps": warmup + steps, "rank": 16, "alpha": 8,
        "lr": 1e-4, "lr_scheduler": "constant", "mixed_precision": "no" if smoke else "bf16",
        "gradient_checkpointing": row.gradient_checkpointing, "compile_unet": row.compile_unet,
        "vae_fp32": get(row.family).vae_fp32, "validation": False, "save_state_every": 0,
        "latent_cache_dir": str(cache_dir), "bucket_min_side": row.resolution, "bucket_max_side": row.resolution,
    }
    plan = lorakit.plan_training(ws, f"bench_{row.family}", dataset, project=PROJECT, config=config)
    result.modules = plan.modules or {}
    elapsed: list[float] = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        trained = lorakit.run_plan(ws, plan, cpu=device == "cpu", progress=False, pipeline=pipe,
                                   on_step=lambda report: elapsed.append(report.elapsed_s))
    except torch.OutOfMemoryError:
        strip_adapters(pipe)
        result.note = "out of memory"
        return result
    times = [b - a for a, b in zip([0.0, *elapsed], elapsed, strict=False)]
    result.first_step_s = round(times[0], 4)
    result.step_s = statistics.median(times[warmup:]) if len(times) > warmup else statistics.median(times)
    result.images_per_s = round(row.batch / result.step_s, 3)
    result.step_s = round(result.step_s, 4)
    release = trained.release or {}
    result.optimizer = release.get("training", {}).get("optimizer")
    result.mixed_precision = release.get("training", {}).get("mixedPrecision")
    if device == "cuda":
        result.peak_memory_gib = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    flops = step_flops_per_image(pipe, row.family, row.resolution, device, dtype if not smoke else torch.float32)
    result.gflop_per_image = round(flops / 1e9, 3)
    result.achieved_tflops = round(flops * result.images_per_s / 1e12, 4)
    result.fraction_of_peak = round(result.achieved_tflops / peak_tflops, 4) if not smoke else None
    strip_adapters(pipe)
    return result


# ---- the eval grid row --------------------------------------------------------------------------------------
def grid_row(ws, family: str, pipe, *, smoke: bool, device: str) -> dict:
    """An eval grid of the last trained release, rendered through the worker path."""
    import torch

    from lorakit.evals import create_eval_grid
    from lorakit.loras import find_lora
    from lorakit.worker import PipelineCache, run_worker

    lora, _ = find_lora(ws, f"bench_{family}", project=PROJECT)
    release = lora["releases"][-1]["id"]
    size, steps = (64, 2) if smoke else (1024, 20)
    plan = create_eval_grid(ws, PROJECT, lora["id"], release, prompts=PROMPTS, seeds=[1, 2], strengths=[0.0, 1.0],
                            width=size, height=size, steps=steps, batch_size=4)
    if not smoke:
        pipe.to(torch.bfloat16)   # the worker's GPU dtype; SDXL's VAE holds in bf16 (it overflows in fp16)
    cache = PipelineCache(ws, device=device, dtype="float32" if smoke else "bfloat16")
    cache.put(f"tiny_{family}", pipe)
    start = time.perf_counter()
    stats = run_worker(ws, PROJECT, once=True, cache=cache, log=lambda message: None)
    wall = time.perf_counter() - start
    cells = len(plan.jobs)
    return {"name": f"{family}-grid-{size}", "cells": cells, "steps": steps, "processed": stats.processed,
            "seconds": round(wall, 3), "images_per_s": round(cells / wall, 3),
            "lora_load_s": round(cache.load_seconds, 3)}


# ---- the run ------------------------------------------------------------------------------------------------
def rows_for(args) -> list[Row]:
    if args.smoke:
        return [Row("sd15-64", "sd15", 64, 2), Row("sdxl-64", "sdxl", 64, 2),
                Row("sdxl-64-gc-b1", "sdxl", 64, 1, gradient_checkpointing=True)]
    rows = [Row("sd15-512", "sd15", 512, args.sd15_batch)]
    rows += [Row(f"sdxl-1024-b{b}", "sdxl", 1024, b) for b in args.sdxl_batch]
    rows += [Row("sdxl-1024-gc-b1", "sdxl", 1024, 1, gradient_checkpointing=True),
             Row("sdxl-1024-gc-b4", "sdxl", 1024, 4, gradient_checkpointing=True)]
    if args.compile:
        rows.append(Row("sdxl-1024-compiled", "sdxl", 1024, args.sdxl_batch[-1], compile_unet=True))
    return rows


def print_table(results: list[Result], grids: list[dict]) -> None:
    print(f"{'row':22} {'batch':>5} {'img/s':>8} {'step s':>8} {'1st s':>7} {'peak GiB':>9} {'GFLOP/img':>10} "
          f"{'TFLOP/s':>8} {'of peak':>8}  note")
    for r in results:
        cells = [f"{r.name:22}", f"{r.batch:>5}", _fmt(r.images_per_s, 8, 2), _fmt(r.step_s, 8, 3),
                 _fmt(r.first_step_s, 7, 2), _fmt(r.peak_memory_gib, 9, 1), _fmt(r.gflop_per_image, 10, 1),
                 _fmt(r.achieved_tflops, 8, 1),
                 f"{r.fraction_of_peak:>8.1%}" if r.fraction_of_peak is not None else f"{'-':>8}"]
        print(" ".join(cells) + f"  {r.note or r.optimizer or ''}")
    for g in grids:
        print(f"{g['name']:22} {g['cells']} cells x {g['steps']} steps: {g['images_per_s']:.2f} images/s "
              f"({g['seconds']:.1f} s, LoRA load {g['lora_load_s']:.1f} s)")


def _fmt(value, width: int, digits: int) -> str:
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny checkpoints on the CPU, in seconds")
    parser.add_argument("--out", default="bench_gpu.json", help="where the table is written as JSON")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 3; smoke 1)")
    parser.add_argument("--sd15-batch", type=int, default=16)
    # 16 would not fit an H200: estimate_gpu_memory.py puts that step at 138 GiB, 12 at 105 GiB.
    parser.add_argument("--sdxl-batch", type=int, nargs="+", default=[12, 8],
                        help="SDXL 1024 px batches to try, largest first (each that fits is a row)")
    parser.add_argument("--compile", action="store_true", help="add an SDXL row with compile_unet")
    parser.add_argument("--no-grid", action="store_true", help="skip the eval grid row")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 TFLOP/s the GPU sustains")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)

    import torch

    if args.smoke:
        device, dtype = "cpu", torch.float32
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    else:
        print("no CUDA GPU: run with --smoke for the CPU check of this script", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results: list[Result] = []
    grids: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-gpu-") as tmp:
        root = Path(tmp)
        ws = make_workspace(root)
        pipes: dict[str, object] = {}
        for row in rows_for(args):
            if row.family not in pipes:
                for other in list(pipes):   # one full-size model on the GPU at a time
                    del pipes[other]
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                if args.smoke:
                    from lorakit.models import load_pipeline

                    pipes[row.family] = load_pipeline(ws, f"tiny_{row.family}")
                else:
                    pipes[row.family] = full_size_pipeline(ws, row.family, device, dtype)
            result = train_row(ws, row, pipes[row.family], smoke=args.smoke, steps=steps, warmup=warmup,
                               device=device, dtype=dtype, peak_tflops=args.peak_tflops, cache_dir=root / "latents")
            results.append(result)
            print(f"{row.name}: {result.images_per_s} images/s{' (' + result.note + ')' if result.note else ''}",
                  file=sys.stderr, flush=True)
        # The grid renders with the pipeline still loaded: the last row's family (SDXL in the default rows).
        for family, pipe in ([] if args.no_grid else pipes.items()):
            grids.append(grid_row(ws, family, pipe, smoke=args.smoke, device=device))
    environment = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "smoke": args.smoke, "steps": steps, "warmup": warmup, "peak_tflops": args.peak_tflops,
                   "seconds": round(time.perf_counter() - started, 1)}
    print_table(results, grids)
    print(f"{environment['device']}, torch {environment['torch']}, {environment['seconds']} s in all")
    Path(args.out).write_text(json.dumps({"environment": environment, "rows": [asdict(r) for r in results],
                                          "grids": grids}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
