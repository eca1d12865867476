"""Does a LoRA learn, and what does measuring it cost? The validation drop of the demo ``ui_icon`` LoRA.

Trains the demo's ``ui_icon`` dataset (the embedded demo data, built as ``make demo`` builds it: captions
``tags+spec`` with prompt tokens) on the tiny SD1.5 checkpoint for 300 steps with the ``sd15-style`` preset
(the default style preset), three times:

1. scoring the training images (``validation_split`` 0), the default;
2. with a held-out split (``--split``, 0.2: whole assets held out, scored beside the training images);
3. without validation, the reference for the cost.

Prints the validation drop ``(base - final) / base`` on the training set and on the held-out split, and the
cost of validation per epoch: seconds per score (both sets), the epoch's training time (run 3's median
epoch, from its ``train_log.csv``, per step times the run's steps per epoch), the scores per epoch of the default schedule and the overhead in
% (seconds per score x scores per epoch / epoch time), plus the whole run's wall time against run 3.
Targets: drop >= 25 % on the training set; validation adds at most 10 % to an epoch.

    python benchmarks/bench_learning.py [--steps 300] [--split 0.2] [--threads 1]

Settings against the preset: ``resolution`` 64 (the tiny checkpoint's side; the demo images are 64 px, so every
image lands in the one 64x64 bucket), ``steps`` (the preset counts 10 epochs of a real dataset; 300 steps is
the benchmark's budget) and ``lr`` 1e-3 instead of 1e-4: the tiny checkpoint has random weights, so the adapter
has to learn a denoiser rather than nudge a pretrained one, and at 1e-4 the 300 steps move the training-set
loss by about 3 % (``--lr 1e-4`` shows it). Everything else (rank 16 / alpha 8, the cosine schedule with 50
warm-up steps, min-SNR 5, noise offset 0.05, tag shuffling, caption dropout, batch size 2, kohya module sets)
is the preset's: nothing in it depends on the image size. ``mixed_precision`` "auto" trains in fp32 on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROJECT = "demo"
CHECKPOINT = "tiny-sd15"
DATASET = "demo_ui_icons"
PRESET = "sd15-style"


def setup(root: Path):
    """A copy of the demo data with the tiny checkpoint built under ``root``, the ui_icon dataset and a LoRA."""
    data = root / "data"
    shutil.copytree(REPO / "data", data, ignore=shutil.ignore_patterns(".lorakit"))
    models = root / "models"
    config = root / "local.json"
    config.write_text(json.dumps({"dataRoot": str(data), "paths": {
        "modelsRoot": str(models), "checkpointsRoot": str(models / "checkpoints"), "lorasRoot": str(root / "loras")}}))
    os.environ["LORAKIT_DATA_ROOT"] = str(data)
    os.environ["LORAKIT_CONFIG"] = str(config)
    import lorakit
    from lorakit.notebook_helpers import ensure_demo_checkpoint

    ws = lorakit.open_workspace(data)
    ensure_demo_checkpoint(ws, CHECKPOINT)
    lorakit.build_manifest(ws, project=PROJECT, dataset_id=DATASET, asset_types=["ui_icon"], caption="tags+spec",
                           with_tokens=True)
    lorakit.create_lora(ws, "bench_ui_icons", name="Bench UI icons", scope="project", project=PROJECT,
                        checkpoint=CHECKPOINT, asset_types=["ui_icon"])
    return ws


def train(ws, overrides: dict):
    from lorakit.train import read_loss_log, train_lora

    started = time.perf_counter()
    result = train_lora(ws, "bench_ui_icons", DATASET, project=PROJECT, preset=PRESET, overrides=overrides,
                        progress=False, cpu=True)
    wall = time.perf_counter() - started
    return result, read_loss_log(result.output_dir / "train_log.csv"), wall


def epoch_times(rows: list[dict]) -> list[float]:
    """Seconds of each full epoch, from the log's cumulative ``elapsed_s`` (the first epoch, with its warm-up,
    left out)."""
    ends: dict[int, float] = {}
    for row in rows:
        ends[row["epoch"]] = row["elapsed_s"]
    epochs = sorted(ends)
    return [ends[e] - ends[e - 1] for e in epochs[1:] if e - 1 in ends]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--split", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (the preset's is 1e-4)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    base = {"resolution": 64, "steps": args.steps, "save_state_every": 0, "lr": args.lr}
    with tempfile.TemporaryDirectory() as tmp:
        ws = setup(Path(tmp))
        print(f"demo ui_icon LoRA, tiny sd15, preset {PRESET} at 64 px, lr {args.lr:g}, "
              f"{args.steps} steps, {args.threads} thread(s), "
              f"torch {torch.__version__}, CPU")
        on, _, on_wall = train(ws, base)
        held, _, held_wall = train(ws, {**base, "validation_split": args.split})
        off, off_rows, off_wall = train(ws, {**base, "validation": False})

        plan, record, split_record = on.plan, on.release["training"]["validation"], held.release["training"]["validation"]
        print(f"dataset: {plan['images']} images, {plan['stepsPerEpoch']} steps per epoch, {plan['epochs']} epochs; "
              f"scores every {record['every']} steps ({len(record['curve']) - 1} LoRA scores + the base model), "
              f"{record['draws']} draws per image")
        drop = record["drop"]
        print(f"training set : base {record['baseLoss']:.5f} -> final {record['finalLoss']:.5f}, drop {drop:.1%} "
              f"(target >= 25%) {'OK' if drop >= 0.25 else 'MISSED'}")
        print(f"held-out {args.split:g}: {split_record['images']} images of held-out assets, base "
              f"{split_record['baseLoss']:.5f} -> final {split_record['finalLoss']:.5f}, drop {split_record['drop']:.1%}; "
              f"its {split_record['training']['images']} training images: drop {split_record['training']['drop']:.1%}")

        # A step costs the same in every run (batch size 2, one bucket), so an epoch of the split run, which has
        # fewer training images, is that many steps of run 3's.
        step_s = statistics.median(epoch_times(off_rows)) / off.plan["stepsPerEpoch"]
        for name, rec, wall, run in (("training set", record, on_wall, on), ("held-out split", split_record, held_wall,
                                                                              held)):
            epoch_s = step_s * run.plan["stepsPerEpoch"]
            scores_per_epoch = (len(rec["curve"]) - 1) / run.plan["epochs"]
            overhead = rec["secondsPerScore"] * scores_per_epoch / epoch_s
            print(f"cost, {name:14s}: {rec['secondsPerScore']:.3f} s per score, epoch {epoch_s:.3f} s, "
                  f"{scores_per_epoch:.2f} scores per epoch -> {overhead:.1%} per epoch (target <= 10%) "
                  f"{'OK' if overhead <= 0.10 else 'MISSED'}; one score = {rec['secondsPerScore'] / epoch_s:.0%} of an "
                  f"epoch; whole run {wall:.1f} s vs {off_wall:.1f} s without validation "
                  f"({wall / off_wall - 1:+.1%}, base score and model load included)")
        print("curve (training set): " + ", ".join(f"{p['step']}:{p['loss']:.4f}" for p in record["curve"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
