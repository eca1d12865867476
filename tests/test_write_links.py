"""No write follows a link out of its root, special files never hang, and run state is checked before use.

A shared data folder (and a run folder under ``lorasRoot``) can carry symbolic links, hard links and FIFOs, and a
collaborator's process can swap a folder for a link while lorakit runs. Every case here uses the real thing: real
links, ``os.mkfifo``, ``os.link``, ``/dev/zero``, and a thread that swaps a folder for a link while a command
writes into it. The files outside the roots must come out as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_demo_data
from PIL import Image

import lorakit
from lorakit.errors import RecordError
from lorakit.roots import Root, open_regular, read_regular
from lorakit.store import Store

PROJECT = "demo"
ASSET = "asset_ui_icon_00_0"


def outside_state(folder: Path) -> dict[str, tuple]:
    """Everything under ``folder``: each entry's type, size, modification time and link count."""
    found = {}
    for top, dirs, files in os.walk(folder):
        for name in dirs + files:
            st = os.lstat(Path(top) / name)
            found[str(Path(top, name).relative_to(folder))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_nlink)
    return found


@pytest.fixture
def studio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The demo data in ``tmp_path/studio`` (environment pointed at it) and an ``outside`` folder beside it."""
    data, config = copy_demo_data(tmp_path / "studio", tmp_path / "studio" / "models")
    monkeypatch.setenv("LORAKIT_DATA_ROOT", str(data))
    monkeypatch.setenv("LORAKIT_CONFIG", str(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outside = tmp_path / "outside"
    outside.mkdir()
    return data, outside


def cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m lorakit`` as a real subprocess, bounded in time so a hang fails instead of stalling."""
    return subprocess.run([sys.executable, "-m", "lorakit", *argv], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def image_folder(folder: Path, *values: int) -> Path:
    """``folder`` with one small PNG per value (each a different grey, so each is a new image)."""
    folder.mkdir()
    for value in values:
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / f"img{value:02d}.png")
    return folder


def assert_error_line(done: subprocess.CompletedProcess, *words: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert lines, done.stderr
    assert all(word in done.stderr for word in words), done.stderr


# ---- the one way to write inside a root ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["symlink", "dangling", "hard-link", "fifo", "dir-link"])
def test_an_atomic_write_refuses_what_is_planted_at_its_path(tmp_path: Path, variant: str) -> None:
    root, outside = Root(tmp_path / "root"), tmp_path / "outside"
    (tmp_path / "root" / "records").mkdir(parents=True)
    outside.mkdir()
    (outside / "target.json").write_text("outside\n")
    target = tmp_path / "root" / "records" / "r.json"
    if variant == "symlink":
        target.symlink_to(outside / "target.json")
    elif variant == "dangling":
        target.symlink_to(outside / "created.json")
    elif variant == "hard-link":
        os.link(outside / "target.json", target)
    elif variant == "fifo":
        os.mkfifo(target)
    else:
        shutil.rmtree(tmp_path / "root" / "records")
        (tmp_path / "root" / "records").symlink_to(outside)
    before = outside_state(outside)
    with pytest.raises(RecordError, match="lorakit writes inside"):
        root.write_atomic(target, b"{}")
    assert outside_state(outside) == before
    assert (outside / "target.json").read_text() == "outside\n"
    assert not (outside / "created.json").exists() and not (outside / "r.json").exists()


def test_deletes_stay_inside_the_root(tmp_path: Path) -> None:
    root, outside = Root(tmp_path / "root"), tmp_path / "outside"
    folder = tmp_path / "root" / "run" / "state"
    folder.mkdir(parents=True)
    outside.mkdir()
    (outside / "kept.pt").write_bytes(b"outside")
    (outside / "inner").mkdir()
    (outside / "inner" / "x").write_bytes(b"x")
    (folder / "own.pt").write_bytes(b"own")
    (folder / "link.pt").symlink_to(outside / "kept.pt")
    (folder / "dirlink").symlink_to(outside / "inner")
    before = outside_state(outside)
    assert root.remove_folder(folder)  # links inside are removed themselves, never followed
    assert not folder.exists() and outside_state(outside) == before

    # A state folder that is itself a link is refused, not emptied.
    (tmp_path / "root" / "run" / "state").symlink_to(outside)
    with pytest.raises(RecordError, match="symbolic link"):
        root.remove_folder(folder)
    assert outside_state(outside) == before

    # A hard link to a file elsewhere is refused: removing the name would change that file's link count.
    os.unlink(folder)
    folder.mkdir()
    os.link(outside / "kept.pt", folder / "hard.pt")
    before = outside_state(outside)
    with pytest.raises(RecordError, match="hard links"):
        root.remove(folder / "hard.pt")
    with pytest.raises(RecordError, match="hard links"):
        root.remove_folder(folder)
    assert outside_state(outside) == before


@contextlib.contextmanager
def swapping(folder: Path, outside: Path) -> Iterator[list[int]]:
    """A thread that keeps swapping ``folder`` for a symbolic link to ``outside`` and back until the block ends.
    A writer may make the folder anew in the moment it is missing; its files are then moved back into it, which
    can take a writer's temporary file from under it (that write then ends in an OSError, as it would for a user)."""
    stop, swaps = threading.Event(), [0]
    aside = folder.with_name(folder.name + ".real")

    def run() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                os.rename(folder, aside)
            with contextlib.suppress(FileExistsError):
                os.symlink(outside, folder)
            time.sleep(0.0005)
            if folder.is_symlink():
                os.unlink(folder)
            if aside.exists():
                try:
                    os.rename(aside, folder)
                except OSError:
                    for child in aside.iterdir():
                        os.replace(child, folder / child.name)
                    aside.rmdir()
            swaps[0] += 1
            time.sleep(0.0005)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield swaps
    finally:
        stop.set()
        thread.join()


def test_a_folder_swapped_for_a_link_while_writing_never_takes_a_write(tmp_path: Path) -> None:
    """A real concurrent swap: a thread keeps replacing the folder with a link to outside and back while the
    main thread writes into it. Every write lands inside or is refused; none lands outside."""
    root, outside = Root(tmp_path / "root"), tmp_path / "outside"
    folder = tmp_path / "root" / "files" / "proj"
    folder.mkdir(parents=True)
    outside.mkdir()
    written = refused = 0
    with swapping(folder, outside) as swaps:
        for i in range(400):
            try:
                root.write_atomic(folder / f"{i}.bin", b"data", durable=False)
                written += 1
            except (RecordError, FileNotFoundError):
                refused += 1
            with contextlib.suppress(RecordError, FileNotFoundError):
                root.create_free(folder, f"c{i}.png", b"png")
    assert swaps[0] > 10 and refused > 0 and written > 0, (swaps, written, refused)
    assert os.listdir(outside) == []


# ---- locks -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["symlink", "hard-link", "dangling"])
@pytest.mark.parametrize("command", ["assets tag", "dataset build", "assets import"])
def test_a_lock_file_planted_as_a_link_gets_no_note(studio: tuple[Path, Path], tmp_path: Path, command: str,
                                                   variant: str) -> None:
    data, outside = studio
    store = Store(data)
    if command == "assets tag":
        lock = store.lock_path(store.path("asset", ASSET, PROJECT))
        argv = ["assets", "tag", "--project", PROJECT, "--asset", ASSET, "--add", "x"]
    elif command == "dataset build":
        lock = store.lock_path(store.path("dataset", "built", PROJECT))
        argv = ["dataset", "build", "--project", PROJECT, "--asset-type", "ui_icon", "--id", "built"]
    else:
        lock = data / ".lorakit" / "locks" / f"import-{PROJECT}.lock"
        argv = ["assets", "import", "--project", PROJECT, "--dir", str(image_folder(tmp_path / "drop", 7))]
    lock.parent.mkdir(parents=True, exist_ok=True)
    victim = outside / "victim.txt"
    victim.write_text("precious\n")
    if variant == "symlink":
        lock.symlink_to(victim)
    elif variant == "hard-link":
        os.link(victim, lock)
    else:
        lock.symlink_to(outside / "created.txt")
    before = outside_state(outside)
    done = cli(*argv)
    assert_error_line(done, str(lock))
    assert outside_state(outside) == before and victim.read_text() == "precious\n"
    assert not (outside / "created.txt").exists()


# ---- folders swapped for links ---------------------------------------------------------------------------------
def test_assets_import_copies_nothing_into_a_project_folder_linked_outside(studio: tuple[Path, Path],
                                                                        tmp_path: Path) -> None:
    data, outside = studio
    drop = image_folder(tmp_path / "drop", 9)
    files = data / "files" / PROJECT
    if files.exists():
        shutil.rmtree(files)
    files.parent.mkdir(parents=True, exist_ok=True)
    files.symlink_to(outside)
    done = cli("assets", "import", "--project", PROJECT, "--dir", str(drop))
    assert_error_line(done, str(files))
    assert list(outside.iterdir()) == []


def test_an_import_racing_a_folder_swap_writes_nothing_outside(studio: tuple[Path, Path], tmp_path: Path) -> None:
    data, outside = studio
    ws = lorakit.open_workspace()
    drop = image_folder(tmp_path / "drop", *range(60))
    folder = data / "files" / PROJECT / "drop"
    folder.mkdir(parents=True)
    with swapping(folder, outside) as swaps:
        with contextlib.suppress(lorakit.LorakitError, OSError):
            lorakit.import_assets(ws, PROJECT, drop)
    assert swaps[0] > 0
    assert list(outside.iterdir()) == []


def test_a_dataset_build_racing_a_swap_of_its_records_folder_writes_no_manifest_outside(
        studio: tuple[Path, Path]) -> None:
    data, outside = studio
    ws = lorakit.open_workspace()
    folder = data / "projects" / PROJECT / "datasets"
    folder.mkdir(parents=True, exist_ok=True)
    with swapping(folder, outside) as swaps:
        for i in range(15):
            with contextlib.suppress(lorakit.LorakitError, OSError):
                lorakit.build_manifest(ws, project=PROJECT, asset_types=["ui_icon"], dataset_id=f"race{i}")
    assert swaps[0] > 0
    assert list(outside.iterdir()) == []


# ---- special files never hang ------------------------------------------------------------------------------------
def test_a_fifo_or_a_device_named_like_an_image_is_passed_over_not_read(studio: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    data, _ = studio
    drop = image_folder(tmp_path / "drop", 3)
    os.mkfifo(drop / "pipe.png")
    (drop / "zero.png").symlink_to("/dev/zero")
    done = cli("assets", "import", "--project", PROJECT, "--dir", str(drop), timeout=90)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "FIFO" in done.stdout + done.stderr and "character device" in done.stdout + done.stderr
    # ... and a FIFO planted where a library image should be is an error line for duplicates, not a hang.
    ws = lorakit.open_workspace()
    asset = ws.store.read("asset", ASSET, PROJECT)
    image = data / asset["versions"][0]["variants"][0]["originalPath"]
    image.unlink()
    os.mkfifo(image)
    done = cli("assets", "duplicates", "--project", PROJECT, timeout=90)
    assert "Traceback" not in done.stderr and "FIFO" in done.stdout + done.stderr, (done.stdout, done.stderr)


def test_regular_file_reads_refuse_fifos_devices_and_oversized_files(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(RecordError, match="FIFO"):
        read_regular(tmp_path / "pipe", "image")
    with pytest.raises(RecordError, match="character device"):
        read_regular("/dev/zero", "weights")
    (tmp_path / "big").write_bytes(b"x" * 100)
    with pytest.raises(RecordError, match="more than the 10"):
        read_regular(tmp_path / "big", "record", max_bytes=10)
    with open_regular(tmp_path / "big") as handle:
        assert handle.read() == b"x" * 100


# ---- the run folder on --resume ----------------------------------------------------------------------------------
FAST = {"resolution": 64, "rank": 4, "alpha": 2, "lr": 1e-3, "batch_size": 2, "lr_scheduler": "constant",
        "steps": 50, "save_state_every": 0}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A workspace holding LoRA ``intr`` with an interrupted run ``r1`` (a saved state, a loss log), stopped by a
    real SIGINT after its second step."""
    import torch

    from lorakit.models import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("interrupted")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        data, config = copy_demo_data(root, root / "models")
        mp.setenv("LORAKIT_DATA_ROOT", str(data))
        mp.setenv("LORAKIT_CONFIG", str(config))
        mp.setenv("HF_HUB_OFFLINE", "1")
        ws = lorakit.open_workspace()
        make_tiny_checkpoint(ws, "tiny", "sd15", asset_types=["ui_icon"])
        lorakit.create_lora(ws, "intr", name="Intr", scope="project", project=PROJECT, checkpoint="tiny",
                            asset_types=["ui_icon"])
        lorakit.build_manifest(ws, project=PROJECT, asset_types=["ui_icon"], dataset_id="icons")

        def stop_at_two(report) -> None:
            if report.step == 2:
                signal.raise_signal(signal.SIGINT)

        with pytest.raises(KeyboardInterrupt):
            lorakit.train_lora(ws, "intr", "icons", project=PROJECT, config=FAST, release_id="r1", progress=False,
                               on_step=stop_at_two)
    torch.set_num_threads(threads)
    run = root / "loras" / "intr" / "r1"
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"
    assert (run / "state" / "state.pt").exists() and (run / "train_log.csv").exists()
    return root


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["log-symlink", "log-hard-link", "state-dir-link", "lora-dir-link",
                                     "run-json-symlink", "state-fifo"])
def test_resume_never_writes_reads_or_deletes_through_a_planted_link(interrupted: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     variant: str) -> None:
    root = tmp_path / "studio"
    shutil.copytree(interrupted, root, symlinks=True)
    (root / "local.json").write_text((root / "local.json").read_text().replace(str(interrupted), str(root)))
    monkeypatch.setenv("LORAKIT_DATA_ROOT", str(root / "data"))
    monkeypatch.setenv("LORAKIT_CONFIG", str(root / "local.json"))
    outside = tmp_path / "outside"
    outside.mkdir()
    run = root / "loras" / "intr" / "r1"
    if variant in ("log-symlink", "log-hard-link"):
        shutil.copy2(run / "train_log.csv", outside / "log.csv")
        (run / "train_log.csv").unlink()
        if variant == "log-symlink":
            (run / "train_log.csv").symlink_to(outside / "log.csv")
        else:
            os.link(outside / "log.csv", run / "train_log.csv")
    elif variant == "state-dir-link":
        shutil.move(run / "state", outside / "state")
        (run / "state").symlink_to(outside / "state")
    elif variant == "lora-dir-link":
        shutil.move(root / "loras" / "intr", outside / "intr")
        (root / "loras" / "intr").symlink_to(outside / "intr")
    elif variant == "run-json-symlink":
        shutil.move(run / "run.json", outside / "run.json")
        (run / "run.json").symlink_to(outside / "run.json")
    else:
        (run / "state" / "state.pt").unlink()
        os.mkfifo(run / "state" / "state.pt")
    before = outside_state(outside)
    done = cli("lora", "train", "--lora", "intr", "--project", PROJECT, "--resume", "r1", "--no-progress", "--cpu",
               timeout=300)
    assert_error_line(done)
    assert outside_state(outside) == before
