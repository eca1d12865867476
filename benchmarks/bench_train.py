"""Trainer overhead and latent-cache benefit on the tiny checkpoint (CPU by default).

Prints:
1. steady-state seconds per step of ``train_lora`` against a bare hand-written loop on the same model, LoRA
   and batch size (pre-encoded latents and text embeddings, no logging, no scheduler, no clipping);
   target: trainer <= 1.10x the bare loop;
2. epoch time with the latent cache (latents encoded once, before the loop) and without it (every step
   decodes the PNGs and runs the VAE); target: cached >= 1.5x faster.

    python benchmarks/bench_train.py [--family sd15|sdxl] [--steps 60] [--batch 4] [--threads 1] [--repeats 3]

One intra-op thread by default: the tiny model gains nothing from more, and on a shared machine spinning
OpenMP threads make the numbers meaningless. Trainer step times come from its own ``train_log.csv``
(``elapsed_s`` per step); the first ``--warmup`` steps are dropped and the median is reported (mean too).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_workspace import bench_workspace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def setup(root: Path, family: str, n_images: int, source_size: int = 512):
    from PIL import Image

    import lorakit
    from lorakit.models import make_tiny_checkpoint
    from lorakit.store import now_iso

    ws = bench_workspace(root, "bench")
    now = now_iso()
    make_tiny_checkpoint(ws, f"tiny_{family}", family, asset_types=["icon"])
    rng = np.random.default_rng(0)
    folder = ws.data_root / "files"
    folder.mkdir(parents=True)
    items = []
    for i in range(n_images):
        # Asset-sized sources with alpha (game art is stored far above 64 px): the uncached path pays for
        # decoding, compositing and resizing them every step, as it would in real use.
        pixels = rng.integers(0, 256, (source_size, source_size, 4), dtype=np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(pixels, "RGBA").save(path)
        items.append({"assetId": f"a{i}", "assetVersionId": "v", "variantId": "v", "path": f"files/{i}.png",
                      "caption": "icon, gem, red", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    ws.store.write("dataset", {"id": "ds", "scope": "project", "projectId": "bench", "createdAt": now, "updatedAt": now,
                               "selection": {}, "items": items}, project="bench")
    lorakit.create_lora(ws, "bench", name="Bench", scope="project", project="bench", checkpoint=f"tiny_{family}",
                        asset_types=["icon"])
    return ws


def trainer_step_times(ws, config: dict) -> tuple[list[float], list[dict]]:
    from lorakit.train import read_loss_log, train_lora

    result = train_lora(ws, "bench", "ds", project="bench", config=config, progress=False, cpu=True)
    rows = read_loss_log(result.output_dir / "train_log.csv")
    elapsed = [0.0] + [r["elapsed_s"] for r in rows]
    return [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)], rows


def bare_loop_step_times(ws, family: str, steps: int, batch: int, rank: int, alpha: float) -> list[float]:
    """The least a LoRA step can do: the same UNet and adapters, one fixed pre-encoded batch."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from lorakit.families import get as get_family
    from lorakit.models import load_pipeline
    from lorakit.train.config import resolve_config
    from lorakit.train.networks import add_network, unet_targets

    pipe = load_pipeline(ws, f"tiny_{family}")
    unet = pipe.unet
    unet.requires_grad_(False)
    torch.manual_seed(0)
    # The trainer's own module selection (kohya's default set), so both loops train the same layers.
    cfg = resolve_config(family, config={"rank": rank, "alpha": alpha})
    add_network(unet, unet_targets(unet, cfg), cfg)
    unet.train()
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    latents = torch.randn(batch, 4, 8, 8)
    model_family = get_family(family)
    with torch.no_grad():
        tokenizers, encoders = model_family.tokenizers_and_encoders(pipe)
        text = model_family.encode_text(tokenizers, encoders, ["icon, gem, red"] * batch, "cpu")
        # What the denoiser takes besides latents and timesteps (SDXL adds its size and crop ids).
        conditioning = model_family.denoiser_kwargs(text, [[64, 64, 0, 0, 64, 64]] * batch, torch.float32, "cpu")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, **conditioning).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], warmup: int) -> tuple[float, float]:
    steady = times[warmup:]
    return statistics.median(steady), statistics.fmean(steady)


def main() -> int:
    from lorakit.families import NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", default="sd15", choices=NAMES)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--source-size", type=int, default=512, help="side of the source PNGs in px")
    parser.add_argument("--repeats", type=int, default=3, help="trainer/bare pairs; the best of each is kept")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    # Validation off: its scores run between steps and would count in the logged step times.
    base = {"resolution": 64, "rank": 4, "alpha": 4, "batch_size": args.batch, "save_state_every": 0,
            "validation": False}
    with tempfile.TemporaryDirectory() as tmp:
        ws = setup(Path(tmp), args.family, args.images, args.source_size)
        print(f"tiny {args.family}, 64 px, batch {args.batch}, rank 4, {args.images} images of {args.source_size} px, "
              f"{args.threads} thread(s), "
              f"torch {torch.__version__}, CPU")

        # 1. Trainer vs bare loop, per steady-state step (interleaved, best of --repeats, to even out machine noise).
        results = {"trainer": [], "bare": []}
        for _ in range(args.repeats):
            trainer, _ = trainer_step_times(ws, {**base, "steps": args.steps})
            results["trainer"].append(summary(trainer, args.warmup))
            bare = bare_loop_step_times(ws, args.family, args.steps, args.batch, 4, 4)
            results["bare"].append(summary(bare, args.warmup))
        t_med = min(m for m, _ in results["trainer"])
        b_med = min(m for m, _ in results["bare"])
        t_mean = min(m for _, m in results["trainer"])
        b_mean = min(m for _, m in results["bare"])
        print(f"trainer    : {t_med * 1000:7.2f} ms/step median, {t_mean * 1000:7.2f} mean (steps {args.warmup + 1}-{args.steps})")
        print(f"bare loop  : {b_med * 1000:7.2f} ms/step median, {b_mean * 1000:7.2f} mean")
        ratio = t_med / b_med
        print(f"ratio      : {ratio:.3f}x median, {t_mean / b_mean:.3f}x mean (target <= 1.10) "
              f"{'OK' if ratio <= 1.10 else 'MISSED'}")

        # 2. Epoch time with and without the latent cache (two epochs; the second is the steady one).
        epochs = {True: [], False: []}
        for _ in range(args.repeats):
            for cached in (True, False):
                _, rows = trainer_step_times(ws, {**base, "epochs": 2, "cache_latents": cached})
                last = [r for r in rows if r["epoch"] == 2]
                first_of_last = rows[rows.index(last[0]) - 1]["elapsed_s"]
                epochs[cached].append(last[-1]["elapsed_s"] - first_of_last)
        epochs = {k: min(v) for k, v in epochs.items()}
        speedup = epochs[False] / epochs[True]
        print(f"epoch ({args.images} images): cached {epochs[True]:.3f} s, uncached {epochs[False]:.3f} s -> "
              f"{speedup:.2f}x (target >= 1.5) {'OK' if speedup >= 1.5 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
