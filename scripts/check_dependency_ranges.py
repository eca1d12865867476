#!/usr/bin/env python3
"""Check the lower bounds in ``pyproject.toml``: each model-stack package at another version, the rest as pinned.

For every ``package==version`` given (default: the lower bound of each range below, and the releases known to
break; several joined by commas go in together, for packages that move as a set), that version is installed with ``pip --target`` into a scratch folder put first on ``PYTHONPATH``,
and ``--smoke`` runs in a subprocess on top of the pinned environment:

1. the SD1.5 and SDXL diffusers pipelines import;
2. a tiny random-weight SD1.5 checkpoint is built offline and a LoRA with mixed ranks (rank 4 on attention, 2 on
   the convolutions) trains for 2 steps on the demo ``ui_icon`` images, through ``lorakit.train_lora``;
3. diffusers loads the file; at strength 0.5 every adapted module's scale is 0.5 x alpha / its own rank (older
   diffusers applied one rank's scale to all), and one image renders.

The installs need the package registry. Usage:
    python scripts/check_dependency_ranges.py                      # the default list
    python scripts/check_dependency_ranges.py diffusers==0.36.0    # chosen versions
    python scripts/check_dependency_ranges.py --smoke              # the check alone, in this environment
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VERSIONS = [
    "diffusers==0.35.1", "diffusers==0.35.2", "diffusers==0.36.0",
    "peft==0.17.1", "peft==0.18.0",
    "accelerate==1.0.0",
    "transformers==5.20.2",
]


def smoke() -> None:
    """The check itself, in this interpreter: raises on any failure."""
    work = Path(tempfile.mkdtemp(prefix="lorakit-ranges-"))
    try:
        data = work / "data"
        shutil.copytree(REPO / "data", data, ignore=shutil.ignore_patterns(".lorakit"))
        config = work / "local.json"
        config.write_text(json.dumps({"paths": {"modelsRoot": str(work / "models")}}), encoding="utf-8")
        os.environ.update(LORAKIT_DATA_ROOT=str(data), LORAKIT_CONFIG=str(config), HF_HUB_OFFLINE="1",
                          TRANSFORMERS_OFFLINE="1")
        import diffusers
        import peft
        import torch
        import transformers
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401

        import lorakit

        print(f"diffusers {diffusers.__version__}, peft {peft.__version__}, transformers {transformers.__version__}, "
              f"torch {torch.__version__}", flush=True)
        ws = lorakit.open_workspace()
        lorakit.make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
        manifest = lorakit.build_manifest(ws, project="demo", asset_types=["ui_icon"], dataset_id="ranges")
        lorakit.create_lora(ws, "ranges", name="Ranges", scope="project", project="demo", checkpoint="tiny-sd15",
                            asset_types=["ui_icon"])
        result = lorakit.train_lora(ws, "ranges", manifest.manifest["id"], project="demo", preset="tiny-demo",
                                    overrides={"steps": 2, "rank": 4, "alpha": 4, "train_conv": True, "conv_rank": 2,
                                               "conv_alpha": 1}, progress=False)
        weights = result.weights_path
        pipe = lorakit.load_pipeline(ws, "tiny-sd15")
        from lorakit.models.loading import load_lora_file

        load_lora_file(pipe, weights, "ranges")
        pipe.set_adapters(["ranges"], adapter_weights=[0.5])
        from peft.tuners.lora import LoraLayer

        scales = {}
        for name, module in pipe.unet.named_modules():
            if isinstance(module, LoraLayer) and "ranges" in module.r:
                rank, alpha = module.r["ranges"], module.lora_alpha["ranges"]
                expected = 0.5 * (4 / 4 if rank == 4 else 1 / 2)
                scales[name] = (rank, module.scaling["ranges"])
                assert abs(module.scaling["ranges"] - expected) < 1e-6, (name, rank, alpha, module.scaling["ranges"])
        ranks = {rank for rank, _ in scales.values()}
        assert ranks == {4, 2}, f"expected modules of rank 4 and 2, got {ranks}"
        image = pipe("a test icon", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.size == (64, 64)
        print(f"ok: {len(scales)} LoRA modules (ranks {sorted(ranks)}) at the right strength; one image rendered")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check(version: str) -> tuple[bool, float, str]:
    """Run the smoke check with ``version`` installed over the pinned environment: (passed, seconds, last line)."""
    with tempfile.TemporaryDirectory(prefix="lorakit-pkg-") as target:
        install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target,
                                  *version.split(",")],
                                 capture_output=True, text=True)
        if install.returncode != 0:
            return False, 0.0, "install failed: " + install.stderr.strip().splitlines()[-1]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([target, str(REPO)])}
        start = time.perf_counter()
        run = subprocess.run([sys.executable, __file__, "--smoke"], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        lines = (run.stdout + run.stderr).strip().splitlines()
        last = next((line for line in reversed(lines) if line.strip()), "")
        return run.returncode == 0, seconds, last


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="*", help="package==version to check (default: the built-in list)")
    parser.add_argument("--smoke", action="store_true", help="run the check in this environment and exit")
    args = parser.parse_args()
    if args.smoke:
        smoke()
        return 0
    failed = 0
    for version in args.versions or DEFAULT_VERSIONS:
        ok, seconds, last = check(version)
        failed += not ok
        print(f"{version:40} {'pass' if ok else 'FAIL'}  {seconds:5.0f} s  {last[:160]}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
