"""The native trainer end to end, on the tiny checkpoints (both families) and real image files.

Each test trains a few steps at 64 px; the output is loaded back with ``diffusers.load_lora_weights``.
Weights are compared by tensor data: the header metadata holds timestamps and the release id, so two files
of identical weights differ in their headers (see ``VOLATILE_METADATA_KEYS``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lorakit
from lorakit.cli import main as cli_main
from lorakit.config import resolve_weights
from lorakit.errors import DatasetError, RecordError, RecordNotFoundError
from lorakit.families import get as get_family
from lorakit.loras import validation_summary
from lorakit.models import TINY_RESOLUTION, make_tiny_checkpoint
from lorakit.store import now_iso
from lorakit.train import TrainingError, plot_loss, read_loss_log, train_lora
from lorakit.train.kohya_format import (
    VOLATILE_METADATA_KEYS,
    lora_layers,
    read_lora_file,
    sshs_hashes,
    text_encoder_module_name,
    unet_module_name,
)

REPO = Path(__file__).resolve().parent.parent
FAST = {"resolution": TINY_RESOLUTION, "rank": 4, "alpha": 2, "lr": 1e-3, "batch_size": 2, "lr_scheduler": "constant"}


# ---- fixtures: one workspace per family per module, a fresh LoRA and dataset per test ----------------------
def _workspace(root: Path, mp: pytest.MonkeyPatch):
    config = root / "local.json"
    models = root / "models"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "checkpoints"),
                                            "lorasRoot": str(models / "loras")}}))
    mp.setenv("LORAKIT_DATA_ROOT", str(root / "data"))
    mp.setenv("LORAKIT_CONFIG", str(config))
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    ws = lorakit.init_data_root()
    now = now_iso()
    ws.store.write("project", {"id": "demo", "name": "Demo", "createdAt": now, "updatedAt": now})
    for family in ("sd15", "sdxl"):
        make_tiny_checkpoint(ws, f"tiny_{family}", family, asset_types=["icon"])
    return ws


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import torch

    # One intra-op thread, here and in the subprocesses: tiny models gain nothing from more, and on a busy
    # machine spinning OpenMP threads make each op ~10x slower. It also keeps in-process and subprocess
    # runs on the same kernels, which the byte-identical comparisons need.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield _workspace(tmp_path_factory.mktemp("train"), mp)
    torch.set_num_threads(threads)


def write_dataset(ws, dataset_id: str, *, n: int = 6, sizes=((64, 64), (80, 64), (64, 96)), checkpoint: str | None = None,
                  seed: int = 0, project: str = "demo") -> dict:
    """Real RGBA PNGs under files/ and a manifest for them, written through the store."""
    rng = np.random.default_rng(seed)
    items = []
    folder = ws.data_root / "files" / dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        pixels[..., 3] = np.where(pixels[..., 3] > 64, 255, 0)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels, "RGBA").save(path)
        items.append({"assetId": f"a{i}", "assetVersionId": "v1", "variantId": "v1a", "path": ws.store.relative(path),
                      "caption": f"icon, {'red' if i % 2 else 'blue'}, gem", "tags": ["icon"],
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    now = now_iso()
    manifest = {"id": dataset_id, "scope": "project", "projectId": project, "createdAt": now, "updatedAt": now,
                "selection": {"checkpoints": [checkpoint] if checkpoint else []}, "items": items,
                "manifestHash": hashlib.sha256(json.dumps(items).encode()).hexdigest()}
    ws.store.write("dataset", manifest, project=project)
    return manifest


def new_lora(ws, lora_id: str, family: str = "sd15") -> Path:
    lorakit.create_lora(ws, lora_id, name=lora_id.title(), scope="project", project="demo",
                        checkpoint=f"tiny_{family}", asset_types=["icon"])
    return ws.store.path("lora", lora_id, "demo")


def render(pipe, seed: int = 0) -> np.ndarray:
    import torch

    out = pipe("icon, red, gem", num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION,
               generator=torch.Generator().manual_seed(seed), output_type="np")
    return out.images[0]


def tensors_of(path: Path) -> dict:
    return read_lora_file(path)[0]


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_loads_into_diffusers(ws, family: str, weights: Path) -> None:
    """diffusers reads the file, every tensor lands on a module (none left over), and the output changes."""
    import torch

    from lorakit.models import load_pipeline

    pipe = load_pipeline(ws, f"tiny_{family}")
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe)
    pipe.load_lora_weights(str(weights), adapter_name="trained")
    tensors, _ = read_lora_file(weights)
    loaded = {unet_module_name(p, family, dict(pipe.unet.config)): (d, u, a)
              for p, d, u, a in lora_layers(pipe.unet, adapter="trained")}
    _, encoders = get_family(family).tokenizers_and_encoders(pipe)
    for prefix, encoder in zip(get_family(family).text_encoder_prefixes(), encoders, strict=True):
        loaded.update({text_encoder_module_name(prefix, encoder, p): (d, u, a)
                       for p, d, u, a in lora_layers(encoder, adapter="trained")})
    file_modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert set(loaded) == file_modules
    for name, (down, up, alpha) in loaded.items():
        assert torch.equal(down, tensors[f"{name}.lora_down.weight"].float())
        assert torch.equal(up, tensors[f"{name}.lora_up.weight"].float())
        assert alpha == float(tensors[f"{name}.alpha"])
    after = render(pipe)
    assert np.abs(after - before).max() > 1e-4


# ---- the whole path, both families ---------------------------------------------------------------------------
@pytest.mark.slow
def test_sd15_run_writes_kohya_file_release_log_and_caches(ws):
    record_path = new_lora(ws, "hero")
    write_dataset(ws, "gems", checkpoint="tiny_sd15")
    result = train_lora(ws, "hero", "gems", project="demo", set_active=True, notes="first try", progress=False,
                        config={**FAST, "steps": 4, "min_snr_gamma": 5, "noise_offset": 0.05,
                                "sample_prompts": ["icon, red, gem"], "sample_steps": 2},
                        overrides={"save_every_n_epochs": 1, "seed": 7})
    release_id = result.release_id
    weights = ws.config.loras_root / "hero" / release_id / "hero.safetensors"
    assert result.weights_path == weights and weights.is_file()

    # The release: appended once, validated, pointing at the file it hashed.
    record = json.loads(record_path.read_text())
    assert [r["id"] for r in record["releases"]] == [release_id] and record["activeReleaseId"] == release_id
    release = record["releases"][0]
    assert release["status"] == "candidate" and release["evaluation"] == {"status": "pending"}
    assert release["weights"] == {"kind": "config_relative", "base": "lorasRoot",
                                  "path": f"hero/{release_id}/hero.safetensors", "sha256": release["sha256"]}
    assert resolve_weights(release["weights"], ws.config) == weights
    assert release["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    training = release["training"]
    checkpoint = lorakit.models.get_checkpoint(ws, "tiny_sd15")
    assert training["datasetId"] == "gems" and training["datasetScope"] == "project" and training["datasetProjectId"] == "demo"
    assert training["manifestHash"] == ws.store.read("dataset", "gems", "demo")["manifestHash"]
    assert training["checkpointId"] == "tiny_sd15" and training["checkpointSha256"] == checkpoint["weights"]["sha256"]
    assert training["seed"] == 7 and training["config"]["seed"] == 7 and training["config"]["min_snr_gamma"] == 5.0
    assert training["steps"] == 4 and training["durationS"] > 0 and np.isfinite(training["finalLoss"])
    assert {"torch", "diffusers", "peft", "accelerate"} <= set(training["libraries"])
    assert release["notes"] == "first try"
    assert lorakit.validate_records(ws) == []

    # kohya keys and ss_* metadata.
    tensors, meta = read_lora_file(weights)
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4
    assert float(tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 2.0
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_tag_frequency"]) == {"gems": {"icon": 6, "red": 3, "blue": 3, "gem": 6}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"gems": {"n_repeats": 1, "img_count": 6}}
    assert (meta["ss_num_train_images"], meta["ss_steps"], meta["ss_epoch"], meta["ss_seed"]) == ("6", "4", "2", "7")
    assert meta["ss_output_name"] == "hero" and meta["ss_resolution"] == "(64, 64)"
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"]) <= time.time()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sshs_hashes(tensors, meta)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.resolution"] == "64x64"
    assert meta["lorakit.release_id"] == release_id and meta["lorakit.checkpoint_id"] == "tiny_sd15"
    assert meta["lorakit.dataset_id"] == "gems" and meta["lorakit.manifest_hash"] == training["manifestHash"]
    assert json.loads(meta["lorakit.config"]) == training["config"]
    check_loads_into_diffusers(ws, "sd15", weights)

    # Next to the weights: the loss log (one row per step), the epoch-1 file, samples; no state left.
    out = weights.parent
    rows = read_loss_log(out / "train_log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["epoch"] for r in rows] == [1, 1, 1, 2]
    assert all(r["lr"] == 1e-3 for r in rows)
    assert (out / "hero-000001.safetensors").is_file()
    assert read_lora_file(out / "hero-000001.safetensors")[1]["ss_epoch"] == "1"
    assert (out / "samples" / "e000001-00.png").is_file() and (out / "samples" / "e000002-00.png").is_file()
    assert not (out / "state").exists() and json.loads((out / "run.json").read_text())["status"] == "complete"
    plot_loss(out, out / "loss.png")
    assert (out / "loss.png").stat().st_size > 0

    # Latents were cached on disk once per image (all 64x64 at this resolution) and reused by the next run.
    cached = sorted((ws.data_root / ".lorakit" / "cache" / "latents").rglob("*.safetensors"))
    assert len(cached) == 6
    stamps = [p.stat().st_mtime_ns for p in cached]
    train_lora(ws, "hero", "gems", project="demo", progress=False, config={**FAST, "steps": 1})
    assert [p.stat().st_mtime_ns for p in cached] == stamps


@pytest.mark.slow
def test_sdxl_run_with_buckets_loads_into_the_sdxl_pipeline(ws):
    new_lora(ws, "xl", family="sdxl")
    write_dataset(ws, "xl_gems", sizes=((64, 64), (96, 48), (40, 100)), seed=1)
    # 16 px bucket steps at 64 px give several buckets, so SDXL's size/crop conditioning sees real crops.
    # Conv layers and both text encoders trained too: every kind of kohya key must load back.
    result = train_lora(ws, "xl", "xl_gems", project="demo", progress=False,
                        config={**FAST, "steps": 3, "bucket_step": 16, "gradient_checkpointing": True,
                                "train_conv": True, "conv_rank": 2, "conv_alpha": 1, "train_text_encoder": True})
    assert len(result.plan["buckets"]) == 3
    tensors, meta = read_lora_file(result.weights_path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # kohya's SDXL layout: the original UNet's block names, never diffusers' down_blocks/up_blocks.
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert any(k.startswith("lora_unet_middle_block_1_") for k in tensors)
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in tensors)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in tensors)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"].shape == (2, 32, 3, 3)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_self_attn_out_proj") for k in tensors)
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 2, "conv_alpha": 1.0}
    check_loads_into_diffusers(ws, "sdxl", result.weights_path)


# ---- reproducibility and resume ------------------------------------------------------------------------------
def _train_cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorakit", "lora", "train", *args], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_same_inputs_give_identical_weights_and_a_killed_run_resumes_to_them(ws):
    record_path = new_lora(ws, "det")
    write_dataset(ws, "det_gems", seed=2)
    config = {**FAST, "steps": 12, "save_state_every": 2, "shuffle_tags": True, "keep_tokens": 1, "caption_dropout": 0.2}
    first = train_lora(ws, "det", "det_gems", project="demo", config=config, progress=False)
    second = train_lora(ws, "det", "det_gems", project="demo", config=config, progress=False)
    reference = tensors_of(first.weights_path)
    assert same_tensors(reference, tensors_of(second.weights_path))
    meta_a, meta_b = read_lora_file(first.weights_path)[1], read_lora_file(second.weights_path)[1]
    assert {k for k in meta_a if meta_a[k] != meta_b.get(k)} <= set(VOLATILE_METADATA_KEYS)

    # A run killed (SIGKILL) after its first saved state records nothing and leaves a resumable state ...
    record_before = record_path.read_bytes()
    proc = _train_cli("--lora", "det", "--dataset", "det_gems", "--project", "demo", "--config", json.dumps(config),
                      "--release", "killed", "--no-progress")
    state = ws.config.loras_root / "det" / "killed" / "state" / "state.pt"
    run_file = state.parent.parent / "run.json"

    def state_saved() -> bool:
        # the state file is renamed into place first, then run.json gets its step
        try:
            return state.exists() and json.loads(run_file.read_text())["step"] >= 2
        except (OSError, ValueError, KeyError):
            return False

    deadline = time.time() + 240
    while not state_saved() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert state.exists(), "the run ended before saving a state"
    assert record_path.read_bytes() == record_before
    run = json.loads(run_file.read_text())
    assert run["status"] == "running" and run["step"] >= 2
    assert not (state.parent.parent / "det.safetensors").exists()

    # ... which --resume continues to the same weights as the uninterrupted runs.
    resumed = _train_cli("--lora", "det", "--project", "demo", "--resume", "--no-progress")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert "resuming det/killed at step" in err
    assert same_tensors(reference, tensors_of(state.parent.parent / "det.safetensors"))
    record = json.loads(record_path.read_text())
    assert [r["id"] for r in record["releases"]][-1] == "killed"
    assert [r["step"] for r in read_loss_log(state.parent.parent / "train_log.csv")] == list(range(1, 13))
    with pytest.raises(TrainingError, match="no interrupted run"):
        train_lora(ws, "det", project="demo", resume=True)


@pytest.mark.slow
def test_ctrl_c_saves_state_and_exits_130(ws):
    new_lora(ws, "intr")
    write_dataset(ws, "intr_gems", seed=3)
    config = {**FAST, "steps": 200, "save_state_every": 0}
    proc = _train_cli("--lora", "intr", "--dataset", "intr_gems", "--project", "demo", "--config", json.dumps(config),
                      "--release", "r1", "--no-progress")
    log = ws.config.loras_root / "intr" / "r1" / "train_log.csv"
    deadline = time.time() + 240
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume r1" in err
    run = json.loads((log.parent / "run.json").read_text())
    assert run["status"] == "interrupted" and run["step"] >= 2 and (log.parent / "state" / "state.pt").exists()
    assert lorakit.get_lora(ws, "intr", project="demo")["releases"] == []


class _Planted:
    """A pickle that runs a command when loaded, as a hostile run folder would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_resume_never_unpickles_a_planted_state_file(ws, tmp_path):
    import torch

    new_lora(ws, "plant")
    write_dataset(ws, "plant_gems", seed=4)
    config = {**FAST, "steps": 200, "save_state_every": 0}
    proc = _train_cli("--lora", "plant", "--dataset", "plant_gems", "--project", "demo", "--config",
                      json.dumps(config), "--release", "r1", "--no-progress")
    log = ws.config.loras_root / "plant" / "r1" / "train_log.csv"
    deadline = time.time() + 240
    while (not log.exists() or len(log.read_text().splitlines()) < 3) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    state = log.parent / "state" / "state.pt"
    assert proc.returncode == 130 and state.exists()
    marker = tmp_path / "ran"
    torch.save({"step": 1, "models": [_Planted(marker)]}, state)  # torch's own format, pickle inside
    resumed = _train_cli("--lora", "plant", "--project", "demo", "--resume", "--no-progress")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 1, err
    assert f"error: saved training state {state} cannot be read as plain tensors and numbers" in err
    assert not marker.exists()
    assert lorakit.get_lora(ws, "plant", project="demo")["releases"] == []


def test_resume_of_a_run_already_recorded_finishes_only_its_bookkeeping(ws):
    record_path = new_lora(ws, "rec")
    write_dataset(ws, "rec_gems", seed=5)
    done = train_lora(ws, "rec", "rec_gems", project="demo", config={**FAST, "steps": 2}, release_id="r1", progress=False)
    weights = done.weights_path
    before = (weights.read_bytes(), weights.stat().st_mtime_ns, record_path.read_bytes())
    # As if killed between recording the release and marking run.json complete.
    run_file = weights.parent / "run.json"
    run = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({**run, "status": "interrupted"}))
    again = train_lora(ws, "rec", project="demo", resume=True, progress=False)
    assert again.release == done.release
    assert (weights.read_bytes(), weights.stat().st_mtime_ns, record_path.read_bytes()) == before
    assert json.loads(run_file.read_text())["status"] == "complete"
    with pytest.raises(TrainingError, match="no interrupted run"):
        train_lora(ws, "rec", project="demo", resume=True)


def test_a_run_json_naming_a_manifest_outside_the_data_root_is_refused(ws, tmp_path):
    new_lora(ws, "esc")
    write_dataset(ws, "esc_gems", seed=6)
    done = train_lora(ws, "esc", "esc_gems", project="demo", config={**FAST, "steps": 2}, release_id="r1", progress=False)
    outside = tmp_path / "elsewhere.json"
    outside.write_text(ws.store.path("dataset", "esc_gems", "demo").read_text())
    run_file = done.weights_path.parent / "run.json"
    run = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({**run, "status": "interrupted", "releaseId": "r2",
                                    "dataset": {**run["dataset"], "path": str(outside)}}))
    (done.weights_path.parent.parent / "r2").mkdir()
    (done.weights_path.parent.parent / "r2" / "run.json").write_text(run_file.read_text())
    with pytest.raises(RecordError, match=r"run r2 dataset path \(run\.json\) .* is absolute"):
        train_lora(ws, "esc", project="demo", resume="r2", progress=False)


def test_non_finite_weights_are_never_recorded(ws):
    record_path = new_lora(ws, "hot")
    write_dataset(ws, "hot_gems", seed=7)
    before = record_path.read_bytes()
    # Without validation the weights file's own check refuses them; with it, the score after the step sees the
    # overflowing predictions first.
    for release, validation, message in (("r1", False, r"values inf or NaN .*was not written and nothing is recorded"),
                                         ("r2", True, r"validation loss of the LoRA is nan at step 1: .*nothing recorded")):
        with pytest.raises(TrainingError, match=message):
            train_lora(ws, "hot", "hot_gems", project="demo", config={**FAST, "lr": 1e5, "steps": 1,
                                                                      "validation": validation},
                       release_id=release, progress=False)
        assert record_path.read_bytes() == before
        out = ws.config.loras_root / "hot" / release
        assert not (out / "hot.safetensors").exists()
        assert json.loads((out / "run.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(("case", "flags", "blamed", "not_blamed"), [
    ("lr", ["--lr", "0"], "lr must be a number > 0", "text_encoder_lr"),
    ("alpha", ["--alpha", "0"], "alpha must be a number > 0", "conv_alpha"),
    ("rank", ["--rank", "0"], "rank must be a positive integer", "conv_rank"),
    ("res", ["--resolution", "65536"], "resolution must be at most 2048 for this checkpoint family", "bucket_"),
    ("seed", ["--seed", "18446744073709551616"], "seed must be at most 4294967295", "Traceback"),
])
def test_bad_settings_name_the_setting_the_user_gave(ws, capsys, case, flags, blamed, not_blamed):
    from lorakit.cli import main

    lora = f"flags_{case}"
    record_path = new_lora(ws, lora)
    write_dataset(ws, f"{lora}_gems", n=1, seed=9)
    before = record_path.read_bytes()
    assert main(["lora", "train", "--lora", lora, "--dataset", f"{lora}_gems", "--project", "demo",
                 "--preset", "tiny-demo", *flags, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid training config: ") and blamed in err and not_blamed not in err, err
    assert record_path.read_bytes() == before
    assert not (ws.config.loras_root / lora).exists()


def test_an_unknown_target_module_is_named_before_training(ws, capsys):
    from lorakit.cli import main

    record_path = new_lora(ws, "targets")
    write_dataset(ws, "targets_gems", n=1, seed=10)
    before = record_path.read_bytes()
    assert main(["lora", "train", "--lora", "targets", "--dataset", "targets_gems", "--project", "demo",
                 "--preset", "tiny-demo", "--config", json.dumps({"unet_target_modules": ["to_q", "to_qq"]}),
                 "--release", "r1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "error: unet_target_modules 'to_qq' match no module of this UNet" in err and "to_out.0" in err, err
    assert "Traceback" not in err
    assert record_path.read_bytes() == before
    assert json.loads((ws.config.loras_root / "targets" / "r1" / "run.json").read_text())["status"] == "failed"


# ---- bad inputs: a clear error before training, records untouched -----------------------------------------------
def test_bad_inputs_are_clear_errors_and_leave_records_untouched(ws):
    record_path = new_lora(ws, "bad")
    write_dataset(ws, "for_xl", checkpoint="tiny_sdxl", n=2)
    write_dataset(ws, "fine", n=1, seed=8)
    manifest = write_dataset(ws, "broken", n=4, seed=4)
    before = record_path.read_bytes()
    kwargs = {"project": "demo", "progress": False, "config": {**FAST, "steps": 2}}

    with pytest.raises(DatasetError, match="built for checkpoint.*tiny_sdxl.*--force"):
        train_lora(ws, "bad", "for_xl", **kwargs)
    assert train_lora(ws, "bad", "for_xl", force=True, dry_run=True, **kwargs).plan["images"] == 2

    images = [ws.data_root / item["path"] for item in manifest["items"]]
    images[1].unlink()
    Image.new("RGB", (64, 64), "white").save(images[2])
    with pytest.raises(TrainingError) as error:
        train_lora(ws, "bad", "broken", **kwargs)
    message = str(error.value)
    assert "2 dataset image(s)" in message and "img1.png" in message and "missing file" in message
    assert "img2.png" in message and "changed since the manifest was built" in message

    with pytest.raises(TrainingError, match="unknown preset 'huge'.*tiny-demo"):
        train_lora(ws, "bad", "fine", preset="huge", **kwargs)
    with pytest.raises(TrainingError, match="is for sdxl checkpoints"):
        train_lora(ws, "bad", "fine", preset="sdxl-style", project="demo")
    with pytest.raises(TrainingError, match="rank must be a positive integer"):
        train_lora(ws, "bad", "fine", project="demo", overrides={"rank": -1})
    with pytest.raises(RecordNotFoundError, match="LoRA 'ghost'"):
        train_lora(ws, "ghost", "for_xl", **kwargs)
    with pytest.raises(RecordNotFoundError, match="dataset 'nope' not found"):
        train_lora(ws, "bad", "nope", **kwargs)
    with pytest.raises(TrainingError, match="no interrupted run"):
        train_lora(ws, "bad", project="demo", resume=True)
    assert record_path.read_bytes() == before
    assert not (ws.config.loras_root / "bad").exists()


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_records_nothing(ws):
    record_path = new_lora(ws, "nan")
    write_dataset(ws, "nan_gems", n=2, seed=5)
    before = record_path.read_bytes()
    # A noise offset beyond float32's range turns the first step's noise, and so its loss, into inf/NaN.
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step 1.*nothing recorded"):
        train_lora(ws, "nan", "nan_gems", project="demo", progress=False,
                   config={**FAST, "steps": 3, "noise_offset": 1e39}, release_id="r1")
    assert record_path.read_bytes() == before
    out = ws.config.loras_root / "nan" / "r1"
    assert not (out / "nan.safetensors").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_cli_dry_run_prints_the_plan_and_trains_nothing(ws, capsys):
    new_lora(ws, "dry")
    write_dataset(ws, "dry_gems", n=5, seed=6)
    code = cli_main(["lora", "train", "--lora", "dry", "--dataset", "dry_gems", "--project", "demo",
                             "--preset", "tiny-demo", "--steps", "9", "--rank", "8", "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["steps"] == 9 and plan["config"]["rank"] == 8 and plan["images"] == 5
    assert plan["stepsPerEpoch"] == 3 and plan["epochs"] == 3
    assert not (ws.config.loras_root / "dry").exists()
    assert cli_main(["lora", "train", "--lora", "dry", "--dataset", "dry_gems", "--project", "demo",
                             "--preset", "nope", "--dry-run"]) == 1
    assert "unknown preset" in capsys.readouterr().err


# ---- data parallel ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_cpu_processes_train_data_parallel_and_record_once(ws):
    record_path = new_lora(ws, "ddp")
    write_dataset(ws, "ddp_gems", n=4, seed=7)
    config = {**FAST, "steps": 3, "batch_size": 1}
    # torchrun gives accelerate its MULTI_CPU state (gloo); each process takes every other batch.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "lorakit", "lora", "train", "--lora", "ddp", "--dataset", "ddp_gems", "--project", "demo",
           "--config", json.dumps(config), "--no-progress", "--cpu"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(record_path.read_text())
    assert len(record["releases"]) == 1
    release = record["releases"][0]
    assert release["training"]["worldSize"] == 2 and release["training"]["steps"] == 3
    weights = resolve_weights(release["weights"], ws.config)
    meta = read_lora_file(weights)[1]
    assert meta["ss_total_batch_size"] == "2"
    assert proc.stdout.count("recorded as a candidate") == 1
    # Validation: each process scores every other batch of draws and the sums are reduced, so the base model's
    # score is the one a single process computes on the same draws.
    validation = release["training"]["validation"]
    assert validation["images"] == 4 and validation["set"] == "training"
    assert proc.stdout.count(validation_summary(validation)) == 1
    single = train_lora(ws, "ddp", "ddp_gems", project="demo", progress=False, config=config)
    assert single.release["training"]["validation"]["baseLoss"] == pytest.approx(validation["baseLoss"], rel=1e-5)
