"""``benchmarks/estimate_gpu_memory.py``: the per-preset GPU memory estimate made on the ``meta`` device. On the tiny
checkpoints the same steps also run on real CPU tensors, so the meta count can be checked against what real
kernels allocate; the script itself runs with ``--smoke``, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from estimate_gpu_memory import estimate, live_bytes_mode  # noqa: E402

GiB = 2**30


@pytest.mark.parametrize(("preset", "changes"), [("sd15-style", {}), ("sdxl-style", {}),
                                                 ("sdxl-style", {"checkpointing": False, "batch": 3})])
def test_the_meta_count_is_what_real_tensors_allocate(tmp_path, preset, changes):
    meta = estimate(preset, smoke=True, scratch=tmp_path, device="meta", **changes)
    cpu = estimate(preset, smoke=True, scratch=tmp_path, device="cpu", **changes)
    # One difference, and it is the GPU's side: the loss moves the scheduler's alphas_cumprod (1000 fp32 values) to
    # the latents' device, a copy on meta (as on a GPU) but the same tensor on the CPU.
    assert round((meta.unet_step_peak_gib - cpu.unet_step_peak_gib) * GiB) == 1000 * 4
    assert meta.trainable_params == cpu.trainable_params > 0
    assert (meta.text_encoders_gib, meta.vae_gib, meta.latents_gib) == (cpu.text_encoders_gib, cpu.vae_gib,
                                                                         cpu.latents_gib)


def test_the_count_follows_storages_not_tensors():
    import torch

    weight = torch.zeros(256, 256, device="meta")          # 256 KiB
    with live_bytes_mode([weight]) as counter:
        a = torch.ones(1024, 256, device="meta")            # 1 MiB
        view = a[:512]                                      # a view: no new storage
        b = a * 2                                           # 1 MiB more
        del a, b                                            # the view keeps a's storage alive
        c = torch.ones(256, 256, device="meta")             # 256 KiB, after b's MiB was freed
        assert counter.peak == 256 * 1024 + 2 * 2**20
    assert view.shape == (512, 256) and c.shape == (256, 256)


def test_checkpointing_batch_and_text_caching_move_the_estimate(tmp_path):
    # At 256 px, where the tiny model's activations outweigh its weights and optimizer state.
    at_256 = {"resolution": 256}
    base = estimate("sdxl-style", smoke=True, scratch=tmp_path, settings=at_256)
    assert base.gradient_checkpointing and base.batch_size == 1 and base.resolution == 256
    without = estimate("sdxl-style", smoke=True, scratch=tmp_path, checkpointing=False, settings=at_256)
    bigger = estimate("sdxl-style", smoke=True, scratch=tmp_path, batch=4, settings=at_256)
    assert without.unet_step_peak_gib > base.unet_step_peak_gib
    assert bigger.unet_step_peak_gib > base.unet_step_peak_gib
    assert base.total_gib == pytest.approx(base.unet_step_peak_gib + base.text_encoders_gib + base.vae_gib
                                           + base.latents_gib)
    # The preset shuffles tags, so the text encoders stay on the GPU; tiny-demo's fixed captions are cached first.
    assert base.text_encoders_gib > 0
    assert estimate("tiny-demo", smoke=True, scratch=tmp_path).text_encoders_gib == 0


@pytest.mark.slow
def test_the_script_runs_its_smoke_rows(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "benchmarks/estimate_gpu_memory.py", "--smoke", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    assert [(r["preset"], r["gradient_checkpointing"]) for r in report["rows"]] == [
        ("sd15-style", False), ("sdxl-style", True), ("sdxl-style", False)]
    assert all(r["total_gib"] > 0 for r in report["rows"])
    assert "sdxl-style" in proc.stdout and "total" in proc.stdout


def test_text_encoder_training_is_refused_not_misreported(tmp_path):
    with pytest.raises(SystemExit, match="error: .*trains the text encoders"):
        estimate("sd15-style", smoke=True, scratch=tmp_path, settings={"train_text_encoder": True})
