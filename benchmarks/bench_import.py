"""Benchmark ``lorakit assets import``: import N small images (default 5,000) into a fresh data root.

Usage: python benchmarks/bench_import.py [--images N] [--size PX] [--limit SECONDS] [--keep]

The folder mimics a real drop: kohya ``<repeats>_<name>`` folders of 500 images each, a third RGBA PNG,
a third RGB PNG, a third JPEG, every other image with a ``.txt`` caption. Prints the time of the first
import (the figure that counts), of a re-import (everything recognised by sha256) and of the
duplicate scan, and exits 1 when the first import takes longer than ``--limit`` seconds (default 60).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lorakit.assets import find_duplicates, import_assets  # noqa: E402
from lorakit.workspace import init_data_root  # noqa: E402


def make_folder(root: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(7)
    for i in range(count):
        folder = root / f"{10 + i // 500}_group{i // 500}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
        kind = i % 3
        if kind == 0:
            Image.fromarray(pixels, "RGBA").save(folder / f"img{i:05d}.png", compress_level=1)
        elif kind == 1:
            Image.fromarray(pixels[:, :, :3], "RGB").save(folder / f"img{i:05d}.png", compress_level=1)
        else:
            Image.fromarray(pixels[:, :, :3], "RGB").save(folder / f"img{i:05d}.jpg", quality=90)
        if i % 2 == 0:
            (folder / f"img{i:05d}.txt").write_text(f"tag{i % 7}, color:{('red', 'blue')[i % 2]}", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--limit", type=float, default=60.0, help="fail above this many seconds (default 60)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder and print its path")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lorakit-bench-import-"))
    try:
        source, data_root = work / "drop", work / "data"
        config = work / "local.json"
        config.write_text(json.dumps({"paths": {"modelsRoot": str(work / "models")}}), encoding="utf-8")
        os.environ["LORAKIT_CONFIG"] = str(config)
        started = time.perf_counter()
        make_folder(source, args.images, args.size)
        print(f"made {args.images} images of {args.size}x{args.size} px in {time.perf_counter() - started:.1f} s")
        ws = init_data_root(data_root)

        started = time.perf_counter()
        report = import_assets(ws, "bench", source, asset_type="sprite", recursive=True, license="CC0")
        first = time.perf_counter() - started
        print(f"import: {report.summary()}")
        print(f"imported {len(report.imported)} images in {first:.1f} s ({len(report.imported) / first:.0f} images/s)")

        started = time.perf_counter()
        again = import_assets(ws, "bench", source, asset_type="sprite", recursive=True)
        print(f"re-import: {again.summary()} in {time.perf_counter() - started:.1f} s")

        started = time.perf_counter()
        pairs = find_duplicates(ws, "bench")
        print(f"duplicates: {len(pairs)} pair(s) among {args.images} images in {time.perf_counter() - started:.1f} s")
        if len(report.imported) != args.images or again.imported:
            print("FAIL: not every image was imported exactly once")
            return 1
        if first > args.limit:
            print(f"FAIL: import took {first:.1f} s, over the {args.limit:.0f} s limit")
            return 1
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
