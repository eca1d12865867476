"""Records stay valid and exact through every rewrite: values lorakit does not own, ids, file modes, caches."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, fill, mounted_tmpfs
from PIL import Image

from lorakit.assets import import_assets
from lorakit.cli import main
from lorakit.errors import InvalidIdError, RecordError
from lorakit.ids import check_id
from lorakit.store import dump_json, loads_json
from lorakit.workspace import open_workspace


@pytest.fixture
def asset(tmp_data_root: Path, tmp_path: Path) -> tuple[object, Path]:
    """One imported asset in project ``game``: (workspace, its record file)."""
    ws = open_workspace()
    drop = tmp_path / "drop"
    drop.mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(drop / "hero.png")
    report = import_assets(ws, "game", drop)
    (imported,) = report.imported
    return ws, ws.store.path("asset", imported["asset_id"], "game")


def add_field(path: Path, text: str) -> str:
    """Put a field lorakit does not own, written as raw JSON text, into a record file; returns the new text."""
    raw = path.read_text(encoding="utf-8")
    changed = raw.replace("{\n", "{\n  " + text + ",\n", 1)
    path.write_text(changed, encoding="utf-8")
    return changed


def tag(path: Path, *extra: str) -> int:
    return main(["assets", "tag", "--project", "game", "--asset", path.stem, "--add", "pose:front", *extra])


def test_big_integers_survive_a_rewrite_exactly(asset, capsys) -> None:
    _, path = asset
    add_field(path, '"studioCounter": 18446744073709551617, "small": 12345678901234567890123')
    assert tag(path) == 0
    text = path.read_text(encoding="utf-8")
    assert '"studioCounter": 18446744073709551617' in text and '"small": 12345678901234567890123' in text
    assert "pose:front" in text
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} written"))


@pytest.mark.parametrize("value", ["1e400", "-1e400"])
def test_a_number_no_double_holds_refuses_the_rewrite(asset, capsys, value: str) -> None:
    _, path = asset
    before = add_field(path, f'"exposure": {value}')
    assert tag(path) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and path.name in err and "$.exposure" in err and "by hand" in err
    assert path.read_text(encoding="utf-8") == before  # nothing written, and never "Infinity"


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_json_constants_are_an_error_naming_the_file(asset, capsys, value: str) -> None:
    _, path = asset
    before = add_field(path, f'"exposure": {value}')
    assert tag(path) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: not strict JSON: {value} is not a JSON number")
    assert path.read_text(encoding="utf-8") == before
    assert main(["validate"]) == 1
    assert value.lstrip("-") in capsys.readouterr().out


def test_no_writer_emits_text_strict_parsers_reject() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(RecordError, match=r"the number at \$\.a\[1\]\.b is NaN or too large"):
            dump_json({"a": [1, {"b": bad}]}, "r.json")
    assert loads_json(dump_json({"n": 2**70, "f": 0.5}).encode(), "r") == {"n": 2**70, "f": 0.5}


def test_deep_nesting_is_an_error_not_a_traceback(tmp_data_root: Path, capsys) -> None:
    project = tmp_data_root / "projects" / "deep"
    project.mkdir(parents=True)
    (project / "project.json").write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    assert main(["validate"]) == 1
    assert "nested too deeply" in capsys.readouterr().out
    with pytest.raises(RecordError, match="nested too deeply"):
        loads_json(b"[" * 100_000, "x.json")


@pytest.mark.parametrize("bad", ["x\n", "x\r", "a" * 129, "", "../x", ".hidden", "a/b"])
def test_ids_are_checked_against_the_whole_string(bad: str) -> None:
    with pytest.raises(InvalidIdError):
        check_id(bad)
    assert check_id("a" * 128) == "a" * 128


@pytest.fixture
def checkpoint(tmp_data_root: Path) -> None:
    """The demo's tiny-sd15 checkpoint record (no weights: creating a LoRA needs only the record)."""
    folder = tmp_data_root / "shared" / "checkpoints"
    folder.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "data" / "shared" / "checkpoints" / "tiny-sd15.json", folder)


def test_an_id_ending_in_a_newline_is_refused_everywhere(tmp_data_root: Path, checkpoint, capsys) -> None:
    assert main(["lora", "create", "--lora", "x\n", "--name", "X", "--scope", "baseline", "--checkpoint", "tiny-sd15",
                 "--asset-types", "ui_icon"]) == 1
    assert capsys.readouterr().err.startswith("error: invalid ")
    assert not list((tmp_data_root / "shared").rglob("x*"))
    # A record planted with such an id (the file name cannot end in a newline on every system, so the id
    # field carries it): the schema refuses it too.
    loras = tmp_data_root / "shared" / "loras"
    loras.mkdir(parents=True)
    (loras / "x.json").write_text(json.dumps({
        "id": "x\n", "name": "X", "createdAt": "2026-01-01T00:00:00.000Z", "updatedAt": "2026-01-01T00:00:00.000Z",
        "scope": "baseline", "checkpointId": "c", "assetTypes": ["ui_icon"], "releases": []}), encoding="utf-8")
    assert main(["validate"]) == 1
    out = capsys.readouterr().out
    assert "x.json" in out and "$.id" in out


def test_an_empty_lora_id_is_refused_not_replaced(tmp_data_root: Path, checkpoint, capsys) -> None:
    assert main(["lora", "create", "--lora", "", "--name", "X", "--scope", "baseline", "--checkpoint", "tiny-sd15",
                 "--asset-types", "ui_icon"]) == 1
    assert capsys.readouterr().err.startswith("error: LoRA id must be a non-empty string")
    assert not (tmp_data_root / "shared" / "loras").exists()


def test_a_rewrite_keeps_the_file_mode(asset) -> None:
    _, path = asset
    for mode in (0o644, 0o664, 0o640):
        os.chmod(path, mode)
        assert tag(path) == 0
        assert stat.S_IMODE(path.stat().st_mode) == mode


def test_a_new_record_gets_the_mode_the_umask_allows(tmp_data_root: Path, checkpoint) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    assert main(["lora", "create", "--lora", "m", "--name", "M", "--scope", "baseline", "--checkpoint", "tiny-sd15",
                 "--asset-types", "ui_icon"]) == 0
    path = tmp_data_root / "shared" / "loras" / "m.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_a_changed_record_with_the_same_size_and_mtime_is_read_again(tmp_data_root: Path, tmp_path: Path) -> None:
    """The record cache: approved -> rejected with size and mtime kept (as a checkout or ``touch -r`` does)."""
    ws = open_workspace()
    drop = tmp_path / "drop"
    drop.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 + i, dtype=np.uint8)).save(drop / f"icon{i}.png")
    report = import_assets(ws, "game", drop, asset_type="ui_icon")
    ids = [r["asset_id"] for r in report.imported]
    assert main(["assets", "set-status", "--project", "game", "--asset", ",".join(ids), "--status", "approved"]) == 0
    old = 1_700_000_000
    for asset_id in ids:
        os.utime(ws.store.path("asset", asset_id, "game"), (old, old))
    assert main(["dataset", "build", "--project", "game", "--id", "d1"]) == 0  # fills the cache
    assert len(ws.store.read("dataset", "d1", "game")["items"]) == 2

    path = ws.store.path("asset", ids[0], "game")
    text = path.read_text(encoding="utf-8")
    rejected = text.replace('"status": "approved"', '"status": "rejected"')
    assert len(rejected.encode()) == len(text.encode())  # "approved" and "rejected": 8 letters each
    path.write_text(rejected, encoding="utf-8")
    os.utime(path, (old, old))
    assert main(["dataset", "build", "--project", "game", "--id", "d2"]) == 0
    assert [i["assetId"] for i in ws.store.read("dataset", "d2", "game")["items"]] == [ids[1]]


# ---- locks ---------------------------------------------------------------------------------------------------
HOLD = """
import sys, time
from lorakit.store import Store
store = Store(sys.argv[1])
def change(record):
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    record["name"] = "from the child"
try:
    store.update("lora", "m", change)
except Exception as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(1)
"""


def start_holder(data_root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(data_root), str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_lock_held_too_long_names_its_holder_and_the_fix(tmp_data_root: Path, checkpoint, monkeypatch) -> None:
    assert main(["lora", "create", "--lora", "m", "--name", "M", "--scope", "baseline", "--checkpoint", "tiny-sd15",
                 "--asset-types", "ui_icon"]) == 0
    proc = start_holder(tmp_data_root, 5)
    try:
        monkeypatch.setattr("lorakit.store.LOCK_TIMEOUT_S", 0.3)
        store = open_workspace().store
        with pytest.raises(RecordError) as caught:
            store.update("lora", "m", lambda r: r)
        message = str(caught.value)
        assert f"is locked by process {proc.pid} on {socket.gethostname()} since 20" in message
        assert "waited 0.3 s" in message and f"delete {tmp_data_root / '.lorakit' / 'locks'}" in message
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_file_removed_while_held_refuses_the_write_instead_of_losing_one(tmp_data_root: Path,
                                                                                  checkpoint) -> None:
    assert main(["lora", "create", "--lora", "m", "--name", "M", "--scope", "baseline", "--checkpoint", "tiny-sd15",
                 "--asset-types", "ui_icon"]) == 0
    proc = start_holder(tmp_data_root, 1.5)
    shutil.rmtree(tmp_data_root / ".lorakit" / "locks")  # someone "cleans up" while the child holds the lock
    store = open_workspace().store
    store.update("lora", "m", lambda r: {**r, "name": "from the test"})  # gets in: the lock file is a new one
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "was removed while this command held it" in err and "nothing was written" in err
    assert store.read("lora", "m")["name"] == "from the test"  # the one write that was made is there


@pytest.mark.parametrize("shape", ["file", "dangling-link", "locks-file"])
def test_a_broken_lorakit_folder_is_a_clear_error(tmp_data_root: Path, checkpoint, capsys, shape: str) -> None:
    state = tmp_data_root / ".lorakit"
    if shape == "file":
        state.write_text("x")
    elif shape == "dangling-link":
        state.symlink_to(tmp_data_root / "gone")
    else:
        state.mkdir()
        (state / "locks").write_text("x")
    assert main(["lora", "create", "--lora", "m", "--name", "M", "--scope", "baseline", "--checkpoint", "tiny-sd15",
                 "--asset-types", "ui_icon"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert ("broken symbolic link" if shape == "dangling-link" else "is not a folder") in err
    assert "remove it" in err
    assert not (tmp_data_root / "shared" / "loras").exists()


def garbage_pixels_png(path: Path) -> None:
    """Rewrite a PNG so its pixel data is garbage while every chunk's CRC still passes."""
    data = path.read_bytes()
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = bytes((b * 7 + 3) % 256 for b in body)
        out += length.to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")
        pos += 12 + length
    path.write_bytes(bytes(out))


def test_an_image_whose_pixels_do_not_decode_is_left_out_at_build(tmp_data_root: Path, tmp_path: Path, capsys) -> None:
    ws = open_workspace()
    drop = tmp_path / "drop"
    drop.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 60 + i, dtype=np.uint8)).save(drop / f"icon{i}.png")
    report = import_assets(ws, "game", drop, asset_type="ui_icon", status="approved")
    bad, good = sorted(report.imported, key=lambda r: r["path"])
    path = ws.store.file_path(variant_path(ws, bad["asset_id"]))
    garbage_pixels_png(path)
    assert main(["dataset", "build", "--project", "game", "--id", "d", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and bad["asset_id"] in out
    assert [i["assetId"] for i in ws.store.read("dataset", "d", "game")["items"]] == [good["asset_id"]]


def variant_path(ws, asset_id: str) -> str:
    return ws.store.read("asset", asset_id, "game")["versions"][0]["variants"][0]["originalPath"]


@pytest.mark.parametrize("failure", ["full", "read-only"])
def test_a_full_or_read_only_disk_is_an_error_and_the_record_stays(tmp_path: Path, monkeypatch, capsys,
                                                                   failure: str) -> None:
    disk = tmp_path / "disk"
    with mounted_tmpfs(disk, "2m"):
        data = disk / "data"
        (data / "shared" / "checkpoints").mkdir(parents=True)
        shutil.copy(REPO_ROOT / "data" / "shared" / "checkpoints" / "tiny-sd15.json", data / "shared" / "checkpoints")
        monkeypatch.setenv("LORAKIT_DATA_ROOT", str(data))
        monkeypatch.setenv("LORAKIT_CONFIG", str(tmp_path / "none.json"))
        (tmp_path / "none.json").write_text("{}")
        create = ["lora", "create", "--lora", "m", "--name", "M", "--scope", "baseline", "--checkpoint",
                  "tiny-sd15", "--asset-types", "ui_icon"]
        assert main(create) == 0
        record = data / "shared" / "loras" / "m.json"
        before = record.read_bytes()
        if failure == "full":
            fill(disk)
        else:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert main(["lora", "create", "--lora", "n", "--name", "N", "--scope", "baseline", "--checkpoint",
                     "tiny-sd15", "--asset-types", "ui_icon"]) == 1
        err = capsys.readouterr().err
        expected = "the disk is full" if failure == "full" else "the file system is read-only"
        assert "error: " in err and expected in err and "Traceback" not in err, err
        assert record.read_bytes() == before
        assert not (data / "shared" / "loras" / "n.json").exists()
        if failure == "read-only":
            subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)


@pytest.mark.parametrize(("text", "expected"), [
    ('{"id": "demo", oops', "malformed JSON at line 1"),
    ('{"id": "demo", "name": 5}', "at $.name: 5 is not of type 'string'"),
    ("[1]", "is not of type 'object'"),
])
def test_a_broken_project_json_is_never_skipped(tmp_path: Path, capsys, text: str, expected: str) -> None:
    data = tmp_path / "data"
    shutil.copytree(REPO_ROOT / "data", data, ignore=shutil.ignore_patterns(".lorakit"))
    project = data / "projects" / "demo" / "project.json"
    project.write_text(text, encoding="utf-8")
    assert main(["dataset", "build", "--data-root", str(data), "--project", "demo", "--asset-type", "ui_icon",
                 "--id", "d"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {project}: ") and expected in err, err
    assert not (data / "projects" / "demo" / "datasets").exists()


@pytest.mark.parametrize("shape", ["folder", "latin-1", "deep"])
def test_a_config_file_that_is_no_json_text_is_an_error(tmp_data_root: Path, tmp_path: Path, monkeypatch, capsys,
                                                        shape: str) -> None:
    bad = tmp_path / "settings.json"
    if shape == "folder":
        bad.mkdir()
    elif shape == "latin-1":
        bad.write_bytes('{"notes": "café"}'.encode("latin-1"))
    else:
        bad.write_text("[" * 100_000 + "]" * 100_000)
    expected = {"folder": "is a folder", "latin-1": "not UTF-8 text", "deep": "not valid JSON"}[shape]
    # As the training settings (--config-file) ...
    from lorakit.train.config import TrainingError, read_config_file

    train_expected = {"folder": "is a folder", "latin-1": "not UTF-8 text", "deep": "nested too deeply"}[shape]
    with pytest.raises(TrainingError, match=f"config file {re.escape(str(bad))}.*{train_expected}"):
        read_config_file(bad)
    # ... and as lorakit's own config (LORAKIT_CONFIG).
    monkeypatch.setenv("LORAKIT_CONFIG", str(bad))
    assert main(["validate"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and expected in err and "Traceback" not in err, err
