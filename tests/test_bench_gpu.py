"""``benchmarks/bench_gpu.py --smoke``: the GPU benchmark's code path, run on the tiny checkpoints on the CPU, so
the script cannot rot while no GPU is at hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_smoke_rows(tmp_path):
    out = tmp_path / "bench_gpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--smoke", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["environment"]["smoke"] is True and report["environment"]["device"] == "cpu"
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {"sd15-64", "sdxl-64", "sdxl-64-gc-b1"}
    for row in rows.values():
        # Every row trained through the recipe: a step time, throughput, the adapted modules and the FLOPs.
        assert row["note"] == "" and row["images_per_s"] > 0 and row["step_s"] > 0
        assert row["modules"]["unet"] > 0 and row["gflop_per_image"] > 0 and row["optimizer"] == "torch.optim.AdamW"
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s"], rel=0.01)
    assert rows["sdxl-64-gc-b1"]["gradient_checkpointing"] is True
    (grid,) = report["grids"]
    assert grid["cells"] == 8 and grid["processed"] == 8 and grid["images_per_s"] > 0
    assert "sdxl-64" in proc.stdout and "images/s" in proc.stdout
