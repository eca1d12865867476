"""Benchmark: a 12-image eval grid on the tiny checkpoint, warm worker vs a fresh pipeline per job.

    python benchmarks/bench_eval_grid.py [--family sd15|sdxl] [--device cpu|cuda] [--steps N] [--threads N] [--keep DIR]

Both runs go through the same worker code (claim, render, PNG, eval update, job update) on two identical
grids (2 prompts x 2 seeds x strengths 0, 0.5, 1 = 12 images, one LoRA release):

- warm: one ``run_worker`` call renders the whole grid with one pipeline, loaded once, the LoRA loaded once;
- fresh: one ``run_worker(max_jobs=1)`` call per job, each with a new pipeline cache, so every job loads the
  checkpoint and the LoRA again (what a worker without a cache does).

It prints both times, the ratio (target: warm >= 5x faster) and checks the two grids' images are identical.
Import time is outside both timings. Everything is built offline in a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROJECT = "bench"
PROMPTS = ["ui icon of a shield", "ui icon of a potion"]


def make_lora_file(family: str, folder: Path) -> Path:
    """A random, non-zero peft LoRA on the tiny UNet's attention projections, saved as diffusers writes it."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from lorakit.models.tiny import build_tiny_pipeline

    unet = build_tiny_pipeline(family).unet
    torch.manual_seed(7)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def setup(root: Path, family: str):
    config = root / "local.json"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(root / "models"),
                                            "checkpointsRoot": str(root / "models" / "checkpoints"),
                                            "lorasRoot": str(root / "models" / "loras")}}), encoding="utf-8")
    os.environ["LORAKIT_CONFIG"] = str(config)
    os.environ["LORAKIT_DATA_ROOT"] = str(root / "data")
    from lorakit.loras import add_release, create_lora, make_release
    from lorakit.models.registry import make_tiny_checkpoint
    from lorakit.store import now_iso
    from lorakit.workspace import open_workspace

    ws = open_workspace()
    now = now_iso()
    ws.store.write("project", {"id": PROJECT, "name": "Benchmark", "createdAt": now, "updatedAt": now})
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sd15", "sdxl", "both"], default="both")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--steps", type=int, help="inference steps (default: the tiny checkpoint's, 4)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--keep", help="build in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    ok = True
    for family in (["sd15", "sdxl"] if args.family == "both" else [args.family]):
        ok = run_one(args, family) and ok
    return 0 if ok else 1


def run_one(args, family: str) -> bool:
    import numpy as np
    import torch
    from PIL import Image

    from lorakit.evals import create_eval_grid
    from lorakit.worker import PipelineCache, run_worker

    root = Path(args.keep) / family if args.keep else Path(tempfile.mkdtemp(prefix="lorakit-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        ws = setup(root, family)
        grids = {}
        for name in ("warm", "fresh"):
            plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=PROMPTS, seeds=[1, 2],
                                    strengths=[0.5, 1.0], steps=args.steps, eval_id=f"bench_{name}")
            grids[name] = plan
        assert len(grids["warm"].jobs) == 12
        quiet = lambda message: None  # noqa: E731

        # Only the warm grid's jobs are queued while it runs: the fresh grid's jobs are held back below.
        held = {job["id"]: job for job in grids["fresh"].jobs}
        for job_id in held:
            ws.store.delete("job", job_id, PROJECT)
        start = time.perf_counter()
        warm_cache = PipelineCache(ws, device=args.device)
        stats = run_worker(ws, PROJECT, once=True, cache=warm_cache, log=quiet)
        warm_s = time.perf_counter() - start
        assert len(stats.rendered) == 12 and not stats.failed, stats

        for job in held.values():
            ws.store.write("job", job, PROJECT)
        start = time.perf_counter()
        fresh_loads, fresh_load_s = 0, 0.0
        while True:
            cache = PipelineCache(ws, device=args.device)
            stats = run_worker(ws, PROJECT, max_jobs=1, once=True, cache=cache, log=quiet)
            fresh_loads += cache.loads
            fresh_load_s += cache.load_seconds
            if stats.processed == 0:
                break
            assert not stats.failed, stats
            del cache
        fresh_s = time.perf_counter() - start

        warm_eval = ws.store.read("eval", "bench_warm", PROJECT)
        fresh_eval = ws.store.read("eval", "bench_fresh", PROJECT)
        assert warm_eval["status"] == fresh_eval["status"] == "complete"
        fresh_by_cell = {o["cellKey"]: o for o in fresh_eval["outputs"]}
        identical = all(
            np.array_equal(np.asarray(Image.open(ws.store.file_path(o["images"][0]))),
                           np.asarray(Image.open(ws.store.file_path(fresh_by_cell[o["cellKey"]]["images"][0]))))
            for o in warm_eval["outputs"])
        grid = warm_eval["grid"]
        print(f"eval grid: 12 images, tiny {family} {grid['width']}x{grid['height']}, {grid['steps']} steps, "
              f"device {warm_cache.device}, torch threads {torch.get_num_threads()}")
        print(f"warm worker (1 pipeline load, LoRA loaded once): {warm_s:7.2f}s  ({warm_s / 12:.3f}s/image; "
              f"loading {warm_cache.load_seconds:.2f}s)")
        print(f"fresh pipeline per job ({fresh_loads} loads):           {fresh_s:7.2f}s  ({fresh_s / 12:.3f}s/image; "
              f"loading {fresh_load_s:.2f}s)")
        print(f"ratio fresh/warm: {fresh_s / warm_s:.1f}x  (target >= 5x: {'met' if fresh_s / warm_s >= 5 else 'NOT met'})")
        print(f"images identical between the two runs: {identical}")
        return identical
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
