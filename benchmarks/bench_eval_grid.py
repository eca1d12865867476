"""Benchmark: a 12-image eval grid on the tiny checkpoint, warm worker vs a fresh pipeline per job.

    python benchmarks/bench_eval_grid.py [--family sd15|sdxl|both] [--device cpu|cuda] [--steps N] [--threads N]
                                         [--repeat N] [--keep DIR]

Every run goes through the same worker code (claim, render, PNG, eval update, job update) on its own copy of one
grid (2 prompts x 2 seeds x strengths 0, 0.5, 1 = 12 images, one LoRA release), queued alone:

- warm: one ``run_worker`` call renders the whole grid with one pipeline, loaded once, the LoRA loaded once,
  rendering each planned batch (the cells of a row, up to 4) in one pipeline call;
- fresh: one ``run_worker(max_jobs=1)`` call per job, each with a new pipeline cache, so every job loads the
  checkpoint and the LoRA again (what a worker without a cache does). Its grid is planned with batch size 1,
  each cell rendered alone: the cheapest a fresh pipeline per job can be. The target ratio is against this run.

Two more runs say where the gain comes from and check the images: the warm worker on the batch-size-1 grid
(caching alone), and fresh pipelines per job on the batched grid (each job renders its planned batch and keeps
its own cell), whose images must be identical to the warm run's.

Before the timed runs, one untimed render loads the pipeline and the LoRA once, so that the lazy imports and
first-call set-up a process pays once are outside every timing. The four runs repeat ``--repeat`` times
(interleaved; median and range printed). Everything is built offline in a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench_workspace import bench_workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROJECT = "bench"
PROMPTS = ["ui icon of a shield", "ui icon of a potion"]


def make_lora_file(family: str, folder: Path) -> Path:
    """A random, non-zero peft LoRA on the tiny UNet's attention projections, saved as diffusers writes it."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    from lorakit.families import get
    from lorakit.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(family).unet
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    get(family).pipeline_class().save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def setup(root: Path, family: str):
    from lorakit.loras import add_release, create_lora, make_release
    from lorakit.models.registry import make_tiny_checkpoint

    ws = bench_workspace(root, PROJECT, name="Benchmark", paths={
        "checkpointsRoot": str(root / "models" / "checkpoints"), "lorasRoot": str(root / "models" / "loras")})
    make_tiny_checkpoint(ws, "tiny", family, asset_types=["ui_icon"])
    create_lora(ws, "icons", name="Icons", scope="project", project=PROJECT, checkpoint="tiny", asset_types=["ui_icon"])
    rel = "icons/r1/icons.safetensors"
    target = root / "models" / "loras" / rel
    target.parent.mkdir(parents=True)
    shutil.move(make_lora_file(family, root / "lora_src"), target)
    sha = hashlib.sha256(target.read_bytes()).hexdigest()
    add_release(ws, "icons", make_release("r1", weights={"kind": "config_relative", "base": "lorasRoot", "path": rel},
                                          sha256=sha, training={}), project=PROJECT)
    return ws


def main() -> int:
    from lorakit.families import NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=[*NAMES, "both"], default="both")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--steps", type=int, help="inference steps (default: the tiny checkpoint's, 4)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the four runs (default 3)")
    parser.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()

    import diffusers
    import torch
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)

    ok = True
    for family in (NAMES if args.family == "both" else [args.family]):
        ok = run_one(args, family) and ok
    return 0 if ok else 1


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def run_grid(ws, name: str, batch_size: int, steps: int | None, device: str | None, fresh: bool):
    """Queue one copy of the grid alone and render it; returns ``(seconds, loads, load seconds, eval record)``.
    Its jobs are removed afterwards, so the next run's queue holds only its own."""
    from lorakit.evals import cleanup_eval, create_eval_grid
    from lorakit.worker import PipelineCache, run_worker

    plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=PROMPTS, seeds=[1, 2], strengths=[0.5, 1.0],
                            steps=steps, eval_id=f"bench_{name}", batch_size=batch_size)
    assert len(plan.jobs) == 12
    quiet = lambda message: None  # noqa: E731
    loads, load_s = 0, 0.0
    start = time.perf_counter()
    while True:
        cache = PipelineCache(ws, device=device)
        stats = run_worker(ws, PROJECT, max_jobs=1 if fresh else None, once=True, cache=cache, log=quiet)
        loads += cache.loads
        load_s += cache.load_seconds
        assert not stats.failed, stats
        if not fresh or stats.processed == 0:
            break
        del cache
    seconds = time.perf_counter() - start
    record = ws.store.read("eval", f"bench_{name}", PROJECT)
    assert record["status"] == "complete" and len(record["outputs"]) == 12, record["status"]
    cleanup_eval(ws, PROJECT, f"bench_{name}")
    return seconds, loads, load_s, record


def run_one(args, family: str) -> bool:
    import numpy as np
    import torch
    from PIL import Image

    from lorakit.evals import DEFAULT_BATCH_SIZE
    from lorakit.worker import default_device

    root = Path(args.keep) / family if args.keep else Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        ws = setup(root, family)
        run_grid(ws, "warmup", 1, args.steps, args.device, fresh=False)
        arms = {"warm": (DEFAULT_BATCH_SIZE, False), "fresh": (1, True), "warm_single": (1, False),
                "fresh_batched": (DEFAULT_BATCH_SIZE, True)}
        rounds = [{name: run_grid(ws, f"{name}{i}", size, args.steps, args.device, fresh=fresh)
                   for name, (size, fresh) in arms.items()} for i in range(max(1, args.repeat))]
        runs = {name: rounds[-1][name] for name in arms}  # the images compared below

        def images(name: str) -> dict:
            return {o["cellKey"]: np.asarray(Image.open(ws.store.file_path(o["images"][0])).convert("RGB"), dtype=np.int16)
                    for o in runs[name][3]["outputs"]}

        def identical(a: str, b: str) -> bool:
            first, second = images(a), images(b)
            return first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)

        batched, single = images("warm"), images("warm_single")
        batch_diff = max(int(np.abs(batched[k] - single[k]).max()) for k in batched)
        grid = runs["warm"][3]["grid"]
        print(f"eval grid: 12 images, tiny {family} {grid['width']}x{grid['height']}, {grid['steps']} steps, "
              f"device {args.device or default_device()}, torch threads {torch.get_num_threads()}, "
              f"{len(rounds)} round(s): median [min-max]")
        labels = {"warm": f"warm worker, batches of up to {DEFAULT_BATCH_SIZE}",
                  "fresh": "fresh pipeline per job, each cell alone",
                  "warm_single": "warm worker, each cell alone",
                  "fresh_batched": "fresh pipeline per job, planned batches"}
        seconds = {name: [r[name][0] for r in rounds] for name in arms}
        for name in arms:
            load_s = statistics.median(r[name][2] for r in rounds)
            print(f"{labels[name]:42s} {spread(seconds[name])} s  ({statistics.median(seconds[name]) / 12:.3f} s/image; "
                  f"{runs[name][1]} load(s), {load_s:.2f} s loading)")

        def ratios(slow: str, fast: str) -> list[float]:
            return [r[slow][0] / r[fast][0] for r in rounds]

        ratio = statistics.median(ratios("fresh", "warm"))
        print(f"ratio fresh/warm: {spread(ratios('fresh', 'warm'))}x  "
              f"(target >= 5x: {'met' if ratio >= 5 else 'NOT met'} by the median)")
        print(f"  caching alone (each cell alone, warm vs fresh): {spread(ratios('fresh', 'warm_single'))}x; "
              f"on the batched grid (warm vs fresh): {spread(ratios('fresh_batched', 'warm'))}x")
        same_batched = identical("warm", "fresh_batched")
        same_single = identical("warm_single", "fresh")
        print(f"images identical, warm vs fresh: batched grid {same_batched}, single-cell grid {same_single}")
        print(f"largest pixel difference, batched vs single-cell grid: {batch_diff} of 255")
        return same_batched and same_single
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
