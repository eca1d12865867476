"""Hostile local configs, lock notes and run folders: each is an ``error:`` line naming the file and the fix,
never a traceback; settings that could only hang a run are refused at planning; an eval cleaned up while
workers render ends up consistent.

Run folders and lock files sit in folders other people share, so every case plants a damaged file for real
and runs the command a user would run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lorakit
from lorakit.cli import main
from lorakit.errors import RecordError, TrainingError
from lorakit.locks import RecordLock
from lorakit.models import TINY_RESOLUTION, make_tiny_checkpoint
from lorakit.roots import Root
from lorakit.store import now_iso
from lorakit.train import read_loss_log, train_lora
from lorakit.train.progress import LOG_NAME

REPO = Path(__file__).resolve().parent.parent
FAST = {"resolution": TINY_RESOLUTION, "rank": 4, "alpha": 2, "lr": 1e-3, "batch_size": 2, "lr_scheduler": "constant"}


def error_line(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run the command line in this process; it must exit 1 with one ``error:`` line and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1, err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith("error: ") and "Traceback" not in err, err  # progress bars may come before it
    return last


# ---- 1a: roots that no folder can be -----------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["dataRoot", "modelsRoot", "checkpointsRoot", "lorasRoot"])
@pytest.mark.parametrize("bad", ["da\0ta", "\ud800x", "~no-such-user-here/data"])
def test_a_config_root_no_folder_can_be_is_an_error_naming_the_setting(tmp_path, monkeypatch, capsys, where, bad):
    data = tmp_path / "data"
    (data / "shared").mkdir(parents=True)
    config = {"dataRoot": str(data), "paths": {}}
    if where == "dataRoot":
        config["dataRoot"] = bad
        monkeypatch.delenv("LORAKIT_DATA_ROOT", raising=False)
    else:
        config["paths"][where] = bad
        monkeypatch.setenv("LORAKIT_DATA_ROOT", str(data))
    path = tmp_path / "local.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.setenv("LORAKIT_CONFIG", str(path))
    err = error_line(capsys, ["lora", "list"])
    assert (f"{where} in {path}" if where == "dataRoot" else f"paths.{where} in {path}") in err


def test_a_data_root_argument_with_a_nul_is_an_error(tmp_data_root, capsys):
    assert "--data-root" in error_line(capsys, ["validate", "--data-root", "da\0ta"])
    assert "--data-root" in error_line(capsys, ["lora", "list", "--data-root", "da\0ta"])


# ---- 1b: the note in a lock file -------------------------------------------------------------------------------
HOSTILE_NOTES = {
    "deeply nested": b"[" * 200_000 + b"]" * 200_000,
    "nested object": b'{"pid": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    "huge": b'{"pid": 5, "host": "' + b"h" * 5_000_000 + b'"}',
    "a list": b"[1, 2, 3]",
    "pid a list": b'{"pid": [1], "host": "x"}',
    "pid a bool": b'{"pid": true, "host": "x"}',
    "pid huge": b'{"pid": 1' + b"0" * 400 + b', "host": "x"}',
    "pid negative": b'{"pid": -1, "host": "x"}',
    "host an object": b'{"pid": 5, "host": {"a": [1]}, "since": ["x"]}',
    "not UTF-8": b'{"pid": 5, "host": "\xff\xfe"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_NOTES))
def test_a_hostile_lock_note_still_gives_a_plain_timeout_message(tmp_path, name):
    path = tmp_path / "x.lock"
    path.write_bytes(HOSTILE_NOTES[name])
    holder = os.open(path, os.O_RDWR)  # another open file holds the flock, as another process would
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(RecordError) as caught, RecordLock(path, "lora m", timeout=0.05, root=Root(tmp_path)):
            pass
    finally:
        os.close(holder)
    message = str(caught.value)
    assert message.startswith("lora m is locked by ") and f"delete {path}" in message
    assert len(message) < 600 and "{" not in message and "[" not in message


def test_a_well_formed_lock_note_names_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"pid": 4242, "host": "studio-7\n\x1b[2J", "since": "2026-01-01T00:00:00+00:00"}))
    holder = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(RecordError, match=r"locked by process 4242 on studio-7\?\?\[2J since 2026-01-01"), \
                RecordLock(path, "lora m", timeout=0.05, root=Root(tmp_path)):
            pass
    finally:
        os.close(holder)


# ---- 1c: a run folder's loss log -------------------------------------------------------------------------------
GOOD_LOG = "step,epoch,loss,lr,elapsed_s\n1,1,0.25,0.001,0.5\n2,1,0.2,0.001,1.0\n"
BAD_LOGS = {
    "other columns": ("a,b,c\n1,2,3\n", "line 1 has the columns 'a,b,c'"),
    "an extra column": ("step,epoch,loss,lr,elapsed_s,x\n1,1,0.2,0.001,0.5,9\n", "line 1 has the columns"),
    "a missing column": ("step,epoch,loss,lr\n1,1,0.2,0.001\n", "line 1 has the columns"),
    "a short row": (GOOD_LOG + "3,1\n", "line 4 has 2 cells"),
    "a word for a loss": (GOOD_LOG + "3,1,low,0.001,1.5\n", "line 4: loss is 'low'"),
    "a float step": (GOOD_LOG + "3.5,1,0.2,0.001,1.5\n", "line 4: step is '3.5'"),
    "a huge step": (GOOD_LOG + "1" + "0" * 400 + ",1,0.2,0.001,1.5\n", "line 4: step is"),
    "an infinite lr": (GOOD_LOG + "3,1,0.2,inf,1.5\n", "line 4: lr is 'inf'"),
    "a NaN loss": (GOOD_LOG + "3,1,nan,0.001,1.5\n", "line 4: loss is 'nan'"),
    "steps going back": (GOOD_LOG + "2,1,0.2,0.001,1.5\n", "line 4: step 2 does not follow step 2"),
    "a giant cell": (GOOD_LOG + "3,1," + "9" * 200_000 + ",0.001,1.5\n", "not CSV"),
    "not UTF-8": (b"step,epoch,loss,lr,elapsed_s\n1,1,0.2,\xff,0.5\n", "not UTF-8"),
}


@pytest.mark.parametrize("name", sorted(BAD_LOGS))
def test_a_damaged_loss_log_is_an_error_naming_the_file_and_line(tmp_path, name):
    text, expected = BAD_LOGS[name]
    path = tmp_path / LOG_NAME
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(TrainingError) as caught:
        read_loss_log(path)
    assert str(caught.value).startswith(f"loss log {path}") and expected in str(caught.value)
    assert "delete it" in str(caught.value)


def test_a_loss_log_larger_than_any_run_writes_is_refused_without_reading_it_all(tmp_path):
    from lorakit.train.progress import MAX_LOG_BYTES

    path = tmp_path / LOG_NAME
    with open(path, "wb") as handle:
        handle.write(GOOD_LOG.encode())
        handle.truncate(MAX_LOG_BYTES + 10)  # sparse: no disk used
    with pytest.raises(TrainingError, match="larger than"):
        read_loss_log(path)


def test_a_loss_log_cut_short_keeps_its_whole_rows(tmp_path):
    path = tmp_path / LOG_NAME
    path.write_text(GOOD_LOG + "3,1,0.1")  # a run killed mid-write
    assert [r["step"] for r in read_loss_log(path)] == [1, 2]
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(TrainingError, match="not a regular file"):
        read_loss_log(fifo)


# ---- 1d: run.json on --resume ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A data root with the tiny SD1.5 checkpoint, a LoRA, a six-image dataset and one finished 2-step run."""
    import torch

    root = tmp_path_factory.mktemp("hardening")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        models = root / "models"
        config = root / "local.json"
        config.write_text(json.dumps({"paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "checkpoints"),
                                                "lorasRoot": str(models / "loras")}}))
        for key, value in {"LORAKIT_DATA_ROOT": str(root / "data"), "LORAKIT_CONFIG": str(config),
                           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
            mp.setenv(key, value)
        ws = lorakit.init_data_root()
        now = now_iso()
        ws.store.write("project", {"id": "demo", "name": "Demo", "createdAt": now, "updatedAt": now})
        make_tiny_checkpoint(ws, "tiny_sd15", "sd15", asset_types=["icon"])
        lorakit.create_lora(ws, "hero", name="Hero", scope="project", project="demo", checkpoint="tiny_sd15",
                            asset_types=["icon"])
        write_dataset(ws, "gems")
        train_lora(ws, "hero", "gems", project="demo", config={**FAST, "steps": 2}, release_id="done",
                   progress=False)
        yield ws
    torch.set_num_threads(threads)


def write_dataset(ws, dataset_id: str, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    folder = ws.data_root / "files" / dataset_id
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(path)
        items.append({"assetId": f"a{i}", "assetVersionId": "v1", "variantId": "v1a", "path": ws.store.relative(path),
                      "caption": "icon, gem", "tags": ["icon"], "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    now = now_iso()
    ws.store.write("dataset", {"id": dataset_id, "scope": "project", "projectId": "demo", "createdAt": now,
                               "updatedAt": now, "selection": {"checkpoints": []}, "items": items,
                               "manifestHash": hashlib.sha256(json.dumps(items).encode()).hexdigest()}, project="demo")


def interrupted_copy(ws, release: str) -> tuple[Path, dict]:
    """A copy of the finished run as an interrupted one, in the folder ``release``; returns it and its run.json."""
    runs = ws.config.loras_root / "hero"
    for old in runs.iterdir():
        if old.name != "done":
            shutil.rmtree(old)
    folder = runs / release
    shutil.copytree(runs / "done", folder)
    run = json.loads((folder / "run.json").read_text())
    run.update(releaseId=release, status="interrupted", pid=999_999)
    (folder / "run.json").write_text(json.dumps(run))
    return folder, run


BAD_RUNS = {
    "truncated": lambda text, run: text[: len(text) // 2],
    "empty": lambda text, run: "",
    "a list": lambda text, run: "[1, 2]",
    "a string": lambda text, run: '"run"',
    "deeply nested": lambda text, run: "[" * 100_000 + "]" * 100_000,
    "pid a string": lambda text, run: json.dumps({**run, "status": "running", "host": os.uname().nodename,
                                                   "pid": "12"}),
    "pid a bool": lambda text, run: json.dumps({**run, "status": "running", "host": os.uname().nodename,
                                                 "pid": True}),
    "pid huge": lambda text, run: json.dumps({**run, "status": "running", "host": os.uname().nodename,
                                               "pid": 10**30}),
    "pid negative": lambda text, run: json.dumps({**run, "status": "running", "host": os.uname().nodename,
                                                   "pid": -1}),
    "status a list": lambda text, run: json.dumps({**run, "status": ["interrupted"]}),
    "status unknown": lambda text, run: json.dumps({**run, "status": "paused"}),
    "startedAt a number": lambda text, run: json.dumps({**run, "startedAt": 17}),
    "step a string": lambda text, run: json.dumps({**run, "step": "2"}),
    "step negative": lambda text, run: json.dumps({**run, "step": -3}),
    "worldSize a string": lambda text, run: json.dumps({**run, "worldSize": "1"}),
    "worldSize zero": lambda text, run: json.dumps({**run, "worldSize": 0}),
    "config a list": lambda text, run: json.dumps({**run, "config": [1]}),
    "config an unknown key": lambda text, run: json.dumps({**run, "config": {**run["config"], "evil": 1}}),
    "config rank a string": lambda text, run: json.dumps({**run, "config": {**run["config"], "rank": "4"}}),
    "config resolution null": lambda text, run: json.dumps({**run, "config": {**run["config"], "resolution": None}}),
    "dataset a string": lambda text, run: json.dumps({**run, "dataset": "gems"}),
    "dataset hash a number": lambda text, run: json.dumps({**run, "dataset": {**run["dataset"], "manifestHash": 1}}),
    "releaseId another folder": lambda text, run: json.dumps({**run, "releaseId": "done"}),
    "loraId another LoRA": lambda text, run: json.dumps({**run, "loraId": "other"}),
    "notes a number": lambda text, run: json.dumps({**run, "notes": 5}),
    "setActive a string": lambda text, run: json.dumps({**run, "setActive": "yes"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_RUNS))
@pytest.mark.parametrize("how", ["latest", "named"])
def test_a_damaged_run_json_is_an_error_saying_how_to_start_afresh(ws, capsys, name, how):
    folder, run = interrupted_copy(ws, "r2")
    path = folder / "run.json"
    path.write_text(BAD_RUNS[name](path.read_text(), run))
    before = path.read_bytes()
    err = error_line(capsys, ["lora", "train", "--lora", "hero", "--project", "demo", "--no-progress", "--resume",
                              *(["r2"] if how == "named" else [])])
    assert str(path) in err and f"delete the run folder {folder}" in err and "without --resume" in err
    assert path.read_bytes() == before  # the damaged file is left for the user to look at
    assert [r["id"] for r in lorakit.get_lora(ws, "hero", project="demo")["releases"]] == ["done"]


@pytest.mark.slow
def test_a_damaged_loss_log_is_refused_on_resume_before_any_model_loads(ws, capsys):
    folder, _ = interrupted_copy(ws, "r3")
    (folder / LOG_NAME).write_text("step,epoch,loss\n1,1,x\n")
    err = error_line(capsys, ["lora", "train", "--lora", "hero", "--project", "demo", "--no-progress", "--resume"])
    assert f"loss log {folder / LOG_NAME}: line 1 has the columns" in err
    assert json.loads((folder / "run.json").read_text())["status"] == "interrupted"


@pytest.mark.slow
def test_a_damaged_run_json_in_a_subprocess_is_one_error_line(ws):
    folder, _ = interrupted_copy(ws, "r4")
    (folder / "run.json").write_text('{"releaseId": "r4", "status": "interr')
    done = subprocess.run([sys.executable, "-m", "lorakit", "lora", "train", "--lora", "hero", "--project", "demo",
                           "--resume", "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {folder / 'run.json'}: not valid JSON"), done.stderr


# ---- 2: settings whose values could only hang a run -----------------------------------------------------------
HANGING_SETTINGS = {
    "validation_draws": ({"validation_draws": 100_000_000}, "validation_draws must be at most 1000"),
    "sample_steps": ({"sample_steps": 10**9}, "sample_steps must be at most 1000"),
    "repeats": ({"repeats": 10**9}, "repeats must be at most 1000"),
    "steps": ({"steps": 10**12}, "steps must be at most 1000000"),
    "epochs": ({"epochs": 10**12}, "epochs must be at most 1000000"),
    "epochs x steps per epoch": ({"epochs": 999_999, "batch_size": 1}, "more than the 1000000 a run may take"),
    "rank": ({"rank": 10**9}, "rank must be at most 1024"),
    "conv_rank": ({"conv_rank": 10**9}, "conv_rank must be at most 1024"),
    "gradient_accumulation_steps": ({"gradient_accumulation_steps": 10_000},
                                    "gradient_accumulation_steps 10000 takes 10000 batches per optimizer step, but an "
                                    "epoch has only 3"),
    "gradient_accumulation_steps x repeats": ({"gradient_accumulation_steps": 7, "repeats": 2, "batch_size": 2},
                                              "set gradient_accumulation_steps to at most 6"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HANGING_SETTINGS))
def test_a_setting_that_could_only_hang_is_refused_at_planning(ws, capsys, name):
    settings, expected = HANGING_SETTINGS[name]
    err = error_line(capsys, ["lora", "train", "--lora", "hero", "--dataset", "gems", "--project", "demo",
                              "--dry-run", "--release", "plan", "--config", json.dumps({**FAST, **settings})])
    assert expected in err


@pytest.mark.slow
def test_the_largest_accumulation_the_dataset_holds_is_planned(ws, capsys):
    assert main(["lora", "train", "--lora", "hero", "--dataset", "gems", "--project", "demo", "--dry-run",
                 "--release", "plan", "--config", json.dumps({**FAST, "gradient_accumulation_steps": 3})]) == 0
    assert json.loads(capsys.readouterr().out)["stepsPerEpoch"] == 1


# ---- 3: cleanup-eval --images racing workers -------------------------------------------------------------------
def start_worker() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorakit", "worker", "--project", "demo", "--once",
                             "--poll-seconds", "0.1", "--lease-seconds", "600"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())


def wait_for(predicate, timeout: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def grid_jobs(ws, eval_id: str) -> list[dict]:
    jobs = [ws.store.read("job", i, "demo", validate=False) for i in ws.store.list_ids("job", "demo")]
    return [j for j in jobs if j["input"]["evalId"] == eval_id]


@pytest.mark.slow
def test_cleanup_with_images_while_two_workers_render_leaves_no_image_and_a_settled_eval(ws):
    from lorakit.evals import cleanup_eval, create_eval_grid, normalize_evals

    plan = create_eval_grid(ws, "demo", "hero", "done", prompts=["icon, gem", "icon, sword"], seeds=[1, 2, 3],
                            strengths=[1.0], steps=25, batch_size=1, eval_id="race")
    assert len(plan.jobs) == 12
    workers = [start_worker() for _ in range(2)]
    try:
        # Both workers warm (one image is on the eval) and each in the middle of a render.
        wait_for(lambda: ws.store.read("eval", "race", "demo")["outputs"]
                 and sum(j["status"] == "running" for j in grid_jobs(ws, "race")) == 2, 240, "two busy workers")
        report = cleanup_eval(ws, "demo", "race", images=True)
        assert report.running_jobs
        for worker in workers:
            out, _ = worker.communicate(timeout=240)
            assert worker.returncode == 0, out
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    record = ws.store.read("eval", "race", "demo")
    folder = ws.store.file_path(record["grid"]["imagesDir"])
    assert not folder.exists() or list(folder.iterdir()) == []  # nothing written after the cleanup
    assert grid_jobs(ws, "race") == []
    assert all(o["images"] == [] for o in record["outputs"]) and record["status"] == "pending"
    assert normalize_evals(ws, "project", "demo") == []


@pytest.mark.slow
def test_normalize_settles_an_eval_left_running_with_no_jobs(ws, capsys):
    from lorakit.evals import create_eval_grid
    from lorakit.worker import run_worker

    plan = create_eval_grid(ws, "demo", "hero", "done", prompts=["icon, gem"], seeds=[1, 2], strengths=[1.0],
                            steps=2, batch_size=1, eval_id="left")
    run_worker(ws, "demo", max_jobs=2, once=True, log=lambda _m: None)
    assert ws.store.read("eval", "left", "demo")["status"] == "running"
    for job in plan.jobs:  # removed by hand, or by a cleanup that raced a worker before it took the eval's lock
        ws.store.delete("job", job["id"], "demo")
    assert main(["lora", "normalize-evals", "--project", "demo", "--scope", "project"]) == 0
    assert "left" in capsys.readouterr().out
    record = ws.store.read("eval", "left", "demo")
    assert record["status"] == "pending" and sum(bool(o["images"]) for o in record["outputs"]) == 2
    assert main(["lora", "normalize-evals", "--project", "demo", "--scope", "project"]) == 0
    assert "left" not in capsys.readouterr().out


# ---- run state: the saved state/ of an interrupted run --------------------------------------------------------
_INTERRUPTED: dict[str, Path] = {}


def interrupted_run(ws) -> Path:
    """A run of LoRA ``hero`` stopped with Ctrl-C (SIGINT) after a few steps, so it left a real saved state; made
    once and copied by each test."""
    import time

    if "folder" not in _INTERRUPTED:
        config = {**FAST, "steps": 500, "save_state_every": 0}
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", "lora", "train", "--lora", "hero", "--dataset",
                                 "gems", "--project", "demo", "--config", json.dumps(config), "--release", "ctrlc",
                                 "--no-progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        log = ws.config.loras_root / "hero" / "ctrlc" / LOG_NAME
        deadline = time.monotonic() + 240
        while (not log.exists() or len(log.read_text().splitlines()) < 3) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(2)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, err
        _INTERRUPTED["folder"] = shutil.move(log.parent, ws.config.loras_root.parent / "ctrlc-saved")
    return Path(_INTERRUPTED["folder"])


BAD_STATES = {
    "step a word": lambda state: {**state, "step": "two"},
    "step a bool": lambda state: {**state, "step": True},
    "step negative": lambda state: {**state, "step": -1},
    "step past the run": lambda state: {**state, "step": 10**9},
    "optimizer junk": lambda state: {**state, "optimizer": {"state": {}, "param_groups": [{"params": "x"}]}},
    "scheduler a list": lambda state: {**state, "lr_scheduler": [1, 2]},
    "a weight of another shape": lambda state: {**state, "models": [
        {k: v[:1] if i == 0 else v for i, (k, v) in enumerate(state["models"][0].items())}]},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_STATES))
def test_a_damaged_saved_state_is_an_error_naming_it(ws, capsys, name):
    import torch

    saved = interrupted_run(ws)
    folder = ws.config.loras_root / "hero" / "ctrlc"
    for old in (ws.config.loras_root / "hero").iterdir():
        if old.name != "done":
            shutil.rmtree(old)
    shutil.copytree(saved, folder)
    state_file = folder / "state" / "state.pt"
    torch.save(BAD_STATES[name](torch.load(state_file, weights_only=True)), state_file)
    err = error_line(capsys, ["lora", "train", "--lora", "hero", "--project", "demo", "--no-progress", "--resume"])
    assert f"saved training state {state_file}" in err or f"saved state {state_file}" in err
    assert f"delete {folder / 'state'}" in err
