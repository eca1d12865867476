"""The eval-grid worker on the tiny checkpoint with real LoRA files: rendering, warm switching, several worker
processes on one queue, a worker killed mid-job, failing jobs, auto-cleanup."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from conftest import fill, mounted_tmpfs
from PIL import Image

from lorakit.evals import cleanup_eval, create_eval_grid, normalize_evals
from lorakit.loras import add_release, create_lora, make_release
from lorakit.models.registry import make_tiny_checkpoint, register_checkpoint
from lorakit.store import now_iso
from lorakit.validate import validate_records
from lorakit.worker import (
    PipelineCache,
    claim_next_job,
    lease_state,
    read_png_settings,
    render_cell,
    run_worker,
)
from lorakit.workspace import init_data_root

pytestmark = pytest.mark.slow
PROJECT = "proj"
TEMPLATES = {"basePositive": "game asset", "baseNegative": "blurry",
             "perAssetType": {"ui_icon": {"positive": "flat ui icon, {specPrompt}", "negative": "photo"}}}
PROMPTS = ["ui icon of a shield", "ui icon of a potion", "ui icon of a gear"]


@pytest.fixture(scope="session")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """The tiny sd15 checkpoint folder and two LoRA releases trained-by-hand (random, non-zero peft LoRAs on
    the UNet attention projections), saved as files ``load_lora_weights`` reads."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from lorakit.models.registry import build_tiny_folder
    from lorakit.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    build_tiny_folder(root / "checkpoints" / "tiny", "sd15", 0)
    files = {"checkpoints": root / "checkpoints"}
    for i, release in enumerate(("r1", "r2")):
        unet = build_tiny_pipeline("sd15").unet
        torch.manual_seed(100 + i)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
        folder = root / "lora_src" / release
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
        files[release] = folder / "pytorch_lora_weights.safetensors"
    return files


@pytest.fixture
def ws(tmp_path, monkeypatch, model_files):
    """A data root with project ``proj``, the tiny checkpoint (with prompt templates) and LoRA ``icons`` with
    releases r1 and r2 whose files are copies this test may delete."""
    data, loras = tmp_path / "data", tmp_path / "loras"
    config = tmp_path / "local.json"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(tmp_path), "checkpointsRoot": str(model_files["checkpoints"]),
                                            "lorasRoot": str(loras)}}), encoding="utf-8")
    for key, value in {"LORAKIT_DATA_ROOT": str(data), "LORAKIT_CONFIG": str(config), "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    workspace = init_data_root()
    now = now_iso()
    workspace.store.write("project", {"id": PROJECT, "name": "Project", "createdAt": now, "updatedAt": now})
    workspace.store.write_catalog("asset-types", {"id": "assetTypes", "assetTypes": [
        {"id": "ui_icon", "label": "UI icon", "canonicalPrompts": PROMPTS}]}, None)
    make_tiny_checkpoint(workspace, "tiny", "sd15", asset_types=["ui_icon"])
    register_checkpoint(workspace, "tiny", {"promptTemplates": TEMPLATES})
    create_lora(workspace, "icons", name="Icons", scope="project", project=PROJECT, checkpoint="tiny",
                asset_types=["ui_icon"])
    for release in ("r1", "r2"):
        rel = f"icons/{release}/icons.safetensors"
        (loras / rel).parent.mkdir(parents=True)
        shutil.copy(model_files[release], loras / rel)
        sha = hashlib.sha256((loras / rel).read_bytes()).hexdigest()
        add_release(workspace, "icons", make_release(release, weights={
            "kind": "config_relative", "base": "lorasRoot", "path": rel}, sha256=sha, training={}), project=PROJECT)
    return workspace


def jobs_of(ws) -> list[dict]:
    return [ws.store.read("job", i, PROJECT) for i in ws.store.list_ids("job", PROJECT)]


def pixels(ws, rel: str) -> np.ndarray:
    with Image.open(ws.store.file_path(rel)) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def outputs_by_cell(ws, eval_id: str) -> dict[str, dict]:
    outputs = ws.store.read("eval", eval_id, PROJECT)["outputs"]
    by_cell = {o["cellKey"]: o for o in outputs}
    assert len(by_cell) == len(outputs), "a cell has two outputs"
    return by_cell


def quiet(_message: str) -> None:
    pass


def test_worker_renders_every_cell_once_with_warm_switching(ws):
    plan = create_eval_grid(ws, PROJECT, "icons", "r2", prompts=PROMPTS[:1], seeds=[1, 2], strengths=[1.0],
                            compare_release="r1", eval_id="g1")
    assert len(plan.jobs) == 6  # 1 prompt x 2 seeds x (base, r2@1, r1@1)
    cache = PipelineCache(ws)
    stats = run_worker(ws, PROJECT, once=True, cache=cache, log=quiet)
    assert len(stats.rendered) == 6 and stats.failed == [] and stats.pipeline_loads == 1
    warm = cache.get("tiny")
    assert len(warm.adapters) == 2  # r1 and r2, each loaded once under its own adapter name

    jobs = jobs_of(ws)
    assert {j["status"] for j in jobs} == {"succeeded"} and {j["attempt"] for j in jobs} == {1}
    assert all("lease" not in j for j in jobs)
    record = ws.store.read("eval", "g1", PROJECT)
    assert record["status"] == "complete"
    by_cell = outputs_by_cell(ws, "g1")
    assert sorted(by_cell) == sorted(c["key"] for c in plan.cells)
    for job in jobs:
        output = by_cell[job["input"]["cellKey"]]
        planned = job["input"]["settings"]
        assert {k: output[k] for k in planned} == planned  # every setting is on the output ...
        assert read_png_settings(ws.store.file_path(output["images"][0])) == planned  # ... and in the PNG
        assert output["scheduler"] == "PNDMScheduler" and output["checkpointWeightsHash"]

    base = pixels(ws, by_cell["base__p00__s1"]["images"][0])
    lora = pixels(ws, by_cell["r2__w1__p00__s1"]["images"][0])
    other = pixels(ws, by_cell["r1__w1__p00__s1"]["images"][0])
    assert np.abs(base - lora).mean() > 0.5 and np.abs(lora - other).mean() > 0.5
    assert not np.array_equal(pixels(ws, by_cell["base__p00__s1"]["images"][0]),
                              pixels(ws, by_cell["base__p00__s2"]["images"][0]))

    # Same settings again, on the same warm pipeline (both adapters loaded, r1 last active): identical images,
    # so strength 0 after LoRAs were loaded equals the base rendered before any was.
    create_eval_grid(ws, PROJECT, "icons", "r2", prompts=PROMPTS[:1], seeds=[1, 2], strengths=[1.0],
                     compare_release="r1", eval_id="g2")
    run_worker(ws, PROJECT, once=True, cache=cache, log=quiet)
    again = outputs_by_cell(ws, "g2")
    for key, output in by_cell.items():
        assert np.array_equal(pixels(ws, output["images"][0]), pixels(ws, again[key]["images"][0])), key

    # ... and equals a pipeline that never saw a LoRA.
    fresh = PipelineCache(ws)
    image, _ = render_cell(fresh, next(j for j in jobs if j["input"]["cellKey"] == "base__p00__s2"))
    assert not fresh.get("tiny").adapters
    assert np.array_equal(np.asarray(image).astype(np.int16), pixels(ws, by_cell["base__p00__s2"]["images"][0]))

    changes = normalize_evals(ws, dry_run=True)
    assert changes == []
    assert validate_records(ws) == []


def test_planned_batches_give_the_same_pixels_whoever_renders_them(ws):
    # Rows of 4 cells in batches of 3 and 1. One warm worker renders each batch in one pipeline call.
    grid = dict(prompts=PROMPTS[:2], seeds=[1, 2], strengths=[1.0], batch_size=3)
    create_eval_grid(ws, PROJECT, "icons", "r1", eval_id="whole", **grid)
    stats = run_worker(ws, PROJECT, once=True, log=quiet)
    assert len(stats.rendered) == 8 and stats.pipeline_loads == 1
    whole = outputs_by_cell(ws, "whole")
    assert sorted((o["batchSize"], o["batchPos"]) for o in whole.values()) == sorted([(1, 0)] * 2 + [(3, 0), (3, 1), (3, 2)] * 2)
    assert read_png_settings(ws.store.file_path(whole["r1__w1__p00__s2"]["images"][0]))["batchPos"] == 1

    # The same grid again, while another worker holds one cell of a batch, rendered one job per fresh
    # pipeline: each job renders its whole planned batch and writes only its own cell.
    plan = create_eval_grid(ws, PROJECT, "icons", "r1", eval_id="split", **grid)
    held = next(j for j in plan.jobs if j["input"]["cellKey"] == "base__p00__s2")
    future = (datetime.now(UTC) + timedelta(seconds=600)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    ws.store.update("job", held["id"], lambda j: {**j, "status": "running", "attempt": 1,
                    "lease": {"owner": "another-host:42", "expiresAt": future}}, PROJECT)
    rendered = []
    while True:
        stats = run_worker(ws, PROJECT, max_jobs=1, once=True, cache=PipelineCache(ws), log=quiet)
        if not stats.processed:
            break
        assert len(stats.rendered) == 1 and stats.pipeline_loads == 1
        rendered += stats.rendered
    assert len(rendered) == 7 and held["id"] not in rendered
    assert ws.store.read("job", held["id"], PROJECT)["status"] == "running"  # left to its owner
    split = outputs_by_cell(ws, "split")
    assert len(split) == 7 and ws.store.read("eval", "split", PROJECT)["status"] == "running"
    for key, output in split.items():
        assert np.array_equal(pixels(ws, output["images"][0]), pixels(ws, whole[key]["images"][0])), key
    assert validate_records(ws) == []


def test_auto_cleanup_removes_the_grid_jobs_when_complete(ws):
    create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["a"], seeds=[3], strengths=[1.0], eval_id="ac",
                     auto_cleanup=True)
    other = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["b"], seeds=[3], strengths=[1.0], eval_id="keep")
    stats = run_worker(ws, PROJECT, max_jobs=2, log=quiet)
    assert len(stats.rendered) == 2
    record = ws.store.read("eval", "ac", PROJECT)
    assert record["status"] == "complete" and record["autoCleanup"] is True
    assert sorted(j["input"]["evalId"] for j in jobs_of(ws)) == ["keep", "keep"]
    assert len(other.jobs) == 2
    assert validate_records(ws) == []


def test_failing_job_ends_failed_with_its_error_and_the_queue_goes_on(ws, tmp_path):
    plan = create_eval_grid(ws, PROJECT, "icons", "r2", prompts=["a", "b"], seeds=[1], strengths=[1.0],
                            compare_release="r1", eval_id="f1")
    (tmp_path / "loras" / "icons" / "r1" / "icons.safetensors").unlink()
    stats = run_worker(ws, PROJECT, once=True, log=quiet)
    assert len(stats.rendered) == 4 and len(stats.failed) == 2
    for job in jobs_of(ws):
        if job["input"]["settings"]["releaseId"] == "r1" and job["input"]["settings"]["strength"] > 0:
            assert job["status"] == "failed" and job["attempt"] == 1 and "lease" not in job
            assert "weights file not found" in job["error"] and "icons.safetensors" in job["error"]
        else:
            assert job["status"] == "succeeded"
    record = ws.store.read("eval", "f1", PROJECT)
    assert record["status"] == "running" and len(record["outputs"]) == 4
    assert sorted(f["cellKey"] for f in record["failures"]) == ["r1__w1__p00__s1", "r1__w1__p01__s1"]
    assert run_worker(ws, PROJECT, once=True, log=quiet).processed == 0  # failed jobs are not retried
    assert len(plan.jobs) == 6
    assert validate_records(ws) == []


def test_expired_lease_is_reclaimed_and_retries_are_bounded(ws):
    create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["a"], seeds=[1, 2], strengths=[], eval_id="l1")
    first, second = jobs_of(ws)
    past = (datetime.now(UTC) - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    future = (datetime.now(UTC) + timedelta(seconds=60)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    for job, attempt in ((first, 1), (second, 3)):
        ws.store.update("job", job["id"], lambda j, a=attempt: {**j, "status": "running", "attempt": a,
                        "lease": {"owner": "another-host:42", "expiresAt": past}}, PROJECT)
    claim = claim_next_job(ws, [PROJECT], "me:1", 30)
    assert claim.job["id"] == first["id"] and claim.job["attempt"] == 2 and claim.job["lease"]["owner"] == "me:1"
    assert claim_next_job(ws, [PROJECT], "other:2", 30) is None  # a live lease is left alone ...
    failed = ws.store.read("job", second["id"], PROJECT)  # ... and a lease run out on the last attempt fails
    assert failed["status"] == "failed" and "ran out on attempt 3 of 3" in failed["error"]
    now = datetime.now(UTC)
    live = {"status": "running", "attempt": 1, "maxAttempts": 3, "lease": {"owner": "h:1", "expiresAt": future}}
    assert lease_state(live, now, "elsewhere") == "busy"
    assert lease_state(live, now, "h", alive=lambda pid: False) == "claimable"  # its process is gone
    assert lease_state({"status": "succeeded"}, now, "h") == "done"


def start_worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorakit", "worker", "--project", PROJECT, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_three_worker_processes_render_each_job_exactly_once(ws, tmp_path):
    # The workers start first and poll, so all three are warm when the jobs appear and compete for them.
    workers = [start_worker("--poll-seconds", "0.1") for _ in range(3)]
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    try:
        lines: list[list[str]] = [[] for _ in workers]

        def started() -> bool:
            for i, proc in enumerate(workers):
                assert proc.poll() is None, f"worker {i} exited: {proc.stdout.read()}"
            return all(any("worker started" in line for line in lines[i]) for i in range(3))

        def pump(i: int) -> None:
            for line in workers[i].stdout:
                lines[i].append(line)

        threads = [threading.Thread(target=pump, args=(i,), daemon=True) for i in range(3)]
        for thread in threads:
            thread.start()
        wait_for(started, 120, "three workers to start")
        plan = create_eval_grid(ws, PROJECT, "icons", "r2", prompts=PROMPTS[:2], seeds=[1, 2], strengths=[0.5, 1.0],
                                eval_id="m1")
        assert len(plan.jobs) == 12
        wait_for(lambda: ws.store.read("eval", "m1", PROJECT)["status"] == "complete"
                 and {j["status"] for j in jobs_of(ws)} == {"succeeded"}, 240, "the eval to complete")
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            proc.wait(timeout=60)
        for thread in threads:
            thread.join(timeout=10)
        for i, log in enumerate(logs):
            log.write_text("".join(lines[i]))
    rendered = [line.split()[2] for ls in lines for line in ls if " rendered in " in line]
    assert sorted(rendered) == sorted(j["id"] for j in plan.jobs)  # every job once, across all processes
    jobs = jobs_of(ws)
    assert {j["status"] for j in jobs} == {"succeeded"} and {j["attempt"] for j in jobs} == {1}
    by_cell = outputs_by_cell(ws, "m1")
    assert len(by_cell) == 12
    owners = {o["worker"] for o in by_cell.values()}
    assert len(owners) >= 2, f"only {owners} rendered (see {logs})"
    assert validate_records(ws) == []


def test_worker_stopped_after_recording_a_batch_finishes_its_jobs(ws):
    # Ctrl-C lands after the batch's images are on the eval, while its jobs are being marked succeeded: they are
    # finished, not queued again; a batch not yet rendered stays queued.
    create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["a"], seeds=[1, 2, 3], strengths=[1.0], eval_id="s1")

    def stop_at_first_render(message: str) -> None:
        if " rendered in " in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_worker(ws, PROJECT, once=True, log=stop_at_first_render)
    outputs = outputs_by_cell(ws, "s1")
    assert sorted(outputs) == ["base__p00__s1", "base__p00__s2", "base__p00__s3"]
    status = {j["input"]["cellKey"]: j["status"] for j in jobs_of(ws)}
    assert {k for k, v in status.items() if v == "succeeded"} == set(outputs)
    assert {k for k, v in status.items() if v == "queued"} == {"r1__w1__p00__s1", "r1__w1__p00__s2", "r1__w1__p00__s3"}
    assert all("lease" not in j for j in jobs_of(ws))
    assert validate_records(ws) == []


def test_worker_killed_mid_job_loses_nothing(ws):
    plan = create_eval_grid(ws, PROJECT, "icons", "r2", prompts=["a"], seeds=[1, 2], strengths=[1.0],
                            steps=12, eval_id="k1")
    proc = start_worker("--once", "--lease-seconds", "600")

    def mid_job() -> bool:
        # Past the first job (the pipeline is loaded) and just after the next claim: the render has only begun.
        assert proc.poll() is None, proc.stdout.read()
        if not ws.store.read("eval", "k1", PROJECT)["outputs"]:
            return False
        now = datetime.now(UTC)
        return any(j["status"] == "running"
                   and now - datetime.fromisoformat(j["lease"]["claimedAt"].replace("Z", "+00:00")) < timedelta(seconds=0.3)
                   for j in jobs_of(ws))

    wait_for(mid_job, 240, "the worker to be in the middle of a job")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    victim = next(j for j in jobs_of(ws) if j["status"] == "running")
    assert victim["lease"]["owner"].endswith(f":{proc.pid}")
    # Its lease has ten minutes to run, but its process is gone: a worker on this host takes the job at once.
    stats = run_worker(ws, PROJECT, once=True, log=quiet)
    assert victim["id"] in stats.rendered
    jobs = {j["id"]: j for j in jobs_of(ws)}
    assert {j["status"] for j in jobs.values()} == {"succeeded"}
    assert jobs[victim["id"]]["attempt"] == 2
    record = ws.store.read("eval", "k1", PROJECT)
    assert record["status"] == "complete" and len(outputs_by_cell(ws, "k1")) == len(plan.jobs)
    folder = ws.store.file_path(record["grid"]["imagesDir"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c['key']}.png" for c in plan.cells)
    for output in record["outputs"]:
        assert read_png_settings(ws.store.file_path(output["images"][0]))["seed"] == output["seed"]
    assert not [p for p in folder.iterdir() if p.suffix == ".tmp"]  # no half-written image
    assert validate_records(ws) == []

    before = sorted(p.name for p in folder.iterdir())
    report = cleanup_eval(ws, PROJECT, "k1", dry_run=True)
    assert len(report.jobs) == len(plan.jobs) and len(jobs_of(ws)) == len(plan.jobs)
    cleanup_eval(ws, PROJECT, "k1")
    assert jobs_of(ws) == [] and sorted(p.name for p in folder.iterdir()) == before
    assert validate_records(ws) == []


def test_grid_of_a_release_trained_by_the_native_trainer(ws):
    from lorakit.train import train_lora

    rng = np.random.default_rng(0)
    folder = ws.data_root / "files" / "ds"
    folder.mkdir(parents=True)
    items = []
    for i in range(4):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        items.append({"assetId": f"a{i}", "assetVersionId": "v1", "variantId": "v1a", "path": ws.store.relative(path),
                      "caption": "ui icon, gem"})
    now = now_iso()
    ws.store.write("dataset", {"id": "ds", "scope": "project", "projectId": PROJECT, "createdAt": now,
                               "updatedAt": now, "selection": {}, "items": items}, project=PROJECT)
    # A few steps at a high learning rate: enough for the LoRA to visibly change the tiny model's output.
    train_lora(ws, "icons", "ds", project=PROJECT, release_id="t1", preset="tiny-demo",
               overrides={"steps": 4, "lr": 5e-2}, progress=False)
    create_eval_grid(ws, PROJECT, "icons", "t1", prompts=["ui icon, gem"], seeds=[1], strengths=[1.0], eval_id="t")
    stats = run_worker(ws, PROJECT, once=True, log=quiet)
    assert len(stats.rendered) == 2 and not stats.failed
    by_cell = outputs_by_cell(ws, "t")
    assert np.abs(pixels(ws, by_cell["base__p00__s1"]["images"][0])
                  - pixels(ws, by_cell["t1__w1__p00__s1"]["images"][0])).mean() > 0.5
    release = next(r for r in ws.store.read("lora", "icons", PROJECT)["releases"] if r["id"] == "t1")
    assert by_cell["t1__w1__p00__s1"]["releaseSha256"] == release["sha256"]
    assert release["evaluation"]["evalIds"] == ["t"]
    assert validate_records(ws) == []


# ---- a full or read-only disk: jobs stay retryable, evals stay consistent ---------------------------------------
def test_a_full_image_disk_leaves_the_jobs_retryable(ws):
    create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["a"], seeds=[1], strengths=[], eval_id="full1",
                     batch_size=1, max_attempts=3)
    folder = ws.data_root / "files" / "evals" / PROJECT / "full1"
    with mounted_tmpfs(folder, "64k") as disk:
        fill(disk)
        messages: list[str] = []
        stats = run_worker(ws, PROJECT, max_jobs=1, log=messages.append)
        assert stats.rendered == [] and stats.failed
        (job,) = [j for j in jobs_of(ws) if j["id"] in stats.failed]
        assert job["status"] == "queued" and job["attempt"] == 1 and "No space left" in job["error"]
        assert any("back in the queue" in m for m in messages)
        record = ws.store.read("eval", "full1", PROJECT)
        assert not record.get("failures") and record["status"] == "pending"
        (disk / "filler").unlink()
        stats = run_worker(ws, PROJECT, once=True, log=quiet)
        assert stats.failed == []
        record = ws.store.read("eval", "full1", PROJECT)
        assert record["status"] == "complete" and not record.get("failures")
        assert all(j["status"] == "succeeded" for j in jobs_of(ws))
    assert validate_records(ws) == []


def test_a_read_only_eval_folder_fails_the_jobs_and_normalize_repairs_the_eval(ws):
    create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["a"], seeds=[1], strengths=[], eval_id="ro1",
                     batch_size=1, max_attempts=2)
    evals = ws.data_root / "projects" / PROJECT / "evals"
    saved = {p.name: p.read_bytes() for p in evals.iterdir()}
    messages: list[str] = []
    with mounted_tmpfs(evals, "1m") as disk:
        for name, data in saved.items():
            (disk / name).write_bytes(data)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        stats = run_worker(ws, PROJECT, once=True, log=messages.append)  # returns: no crash on EROFS
        assert stats.rendered == [] and len(stats.failed) == 2  # each job tried max_attempts times
        assert all(j["status"] == "failed" and j["attempt"] == 2 for j in jobs_of(ws))
        assert any("normalize-evals" in m for m in messages)
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        record = ws.store.read("eval", "ro1", PROJECT)
        assert not record.get("failures")  # the worker could not note them
        changes = normalize_evals(ws, "project", PROJECT)
        assert [(c.eval_id, c.failures_added) for c in changes] == [("ro1", 1)]
        record = ws.store.read("eval", "ro1", PROJECT)
        assert [f["cellKey"] for f in record["failures"]] == ["base__p00__s1"] and "Read-only" in record["failures"][0]["error"]
        saved = {p.name: p.read_bytes() for p in disk.iterdir()}
    for name, data in saved.items():
        (evals / name).write_bytes(data)
    assert normalize_evals(ws, "project", PROJECT) == []
    assert validate_records(ws) == []
