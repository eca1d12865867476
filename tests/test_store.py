"""The record store: paths, validation, atomic locked writes, ids, clear errors on bad files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorakit.errors import InvalidIdError, RecordError, RecordNotFoundError
from lorakit.ids import check_id, new_ulid
from lorakit.store import Store, dump_json, now_iso
from lorakit.validate import validate_records

TS = "2026-01-01T00:00:00.000Z"


def lora(lora_id: str = "hero", **extra) -> dict:
    return {"id": lora_id, "name": "Hero", "createdAt": TS, "updatedAt": TS, "scope": "project", "projectId": "p1",
            "checkpointId": "tiny-sd15", "assetTypes": ["character"], "releases": [], **extra}


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".lorakit" not in p.parts}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "data")
    s.write("project", {"id": "p1", "name": "P1", "createdAt": TS, "updatedAt": TS})
    return s


def test_paths_follow_the_data_model(store: Store) -> None:
    root = store.root
    assert store.path("lora", "a") == root / "shared/loras/a.json"
    assert store.path("lora", "a", "p1") == root / "projects/p1/loras/a.json"
    assert store.path("dataset", "d", "p1") == root / "projects/p1/datasets/d.json"
    assert store.path("eval", "e") == root / "shared/evals/e.json"
    assert store.path("checkpoint", "c") == root / "shared/checkpoints/c.json"
    assert store.path("spec", "s", "p1") == root / "projects/p1/specs/s.json"
    assert store.path("job", "j", "p1") == root / "projects/p1/jobs/j.json"
    assert store.path("project", "p1") == root / "projects/p1/project.json"
    assert store.catalog_path("tags", "p1", "ck") == root / "projects/p1/catalogs/checkpoints/ck/tags.json"
    assert store.catalog_path("asset-types", None) == root / "shared/catalogs/asset-types.json"
    with pytest.raises(RecordError, match="belong to a project"):
        store.path("asset", "a")


def test_written_records_are_pretty_json_and_read_back(store: Store) -> None:
    path = store.write("lora", lora(note="größe"), "p1")
    text = path.read_text(encoding="utf-8")
    assert text == json.dumps(lora(note="größe"), indent=2, ensure_ascii=False) + "\n"
    assert store.read("lora", "hero", "p1")["note"] == "größe"
    assert store.list_ids("lora", "p1") == ["hero"]


@pytest.mark.parametrize("bad_id", ["a/b", "..", "a..b", "../x", "x\\y", "", ".hidden", "a b"])
def test_bad_ids_are_refused_and_never_leave_the_data_root(store: Store, bad_id: str) -> None:
    before = snapshot(store.root)
    with pytest.raises(InvalidIdError, match="invalid|non-empty"):
        store.write("lora", lora(bad_id), "p1")
    with pytest.raises(InvalidIdError):
        store.path("lora", bad_id, "p1")
    assert snapshot(store.root) == before


def test_file_paths_outside_the_data_root_are_refused(store: Store) -> None:
    with pytest.raises(RecordError, match="leaves the data root"):
        store.file_path("../../etc/passwd")
    assert store.file_path("files/p1/a.png") == store.root / "files/p1/a.png"


def test_invalid_record_is_never_written(store: Store) -> None:
    store.write("lora", lora(), "p1")
    before = snapshot(store.root)
    bad = lora(assetTypes=[])  # at least one asset type
    with pytest.raises(RecordError) as err:
        store.write("lora", bad, "p1")
    assert "loras/hero.json" in str(err.value) and "$.assetTypes" in str(err.value)
    with pytest.raises(RecordError, match=r"\$\.releases\[0\]\.status"):
        store.update("lora", "hero", lambda r: {**r, "releases": [{"id": "r1", "createdAt": TS, "status": "bogus"}]}, "p1")
    assert snapshot(store.root) == before


def test_update_keeps_unknown_fields_and_sets_updated_at(store: Store) -> None:
    store.write("lora", lora(customField={"kept": True}), "p1")
    new = store.update("lora", "hero", lambda r: r.update(recommended=False), "p1")
    assert new["customField"] == {"kept": True}
    assert new["updatedAt"] != TS
    assert store.read("lora", "hero", "p1") == new


def test_update_that_raises_changes_nothing(store: Store) -> None:
    store.write("lora", lora(), "p1")
    before = snapshot(store.root)

    def explode(record):
        record["name"] = "changed"
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update("lora", "hero", explode, "p1")
    assert snapshot(store.root) == before


def test_create_refuses_to_overwrite(store: Store) -> None:
    store.write("lora", lora(), "p1", create=True)
    with pytest.raises(RecordError, match="already exists"):
        store.write("lora", lora(name="Other"), "p1", create=True)
    assert store.read("lora", "hero", "p1")["name"] == "Hero"


def test_malformed_json_names_file_line_and_column(store: Store) -> None:
    path = store.path("lora", "broken", "p1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"id": "broken",\n  "name": }\n')
    with pytest.raises(RecordError, match=r"loras/broken\.json: malformed JSON at line 2, column 11"):
        store.read("lora", "broken", "p1")
    problems = validate_records(store.root)
    assert any("broken.json" in str(p) and "malformed JSON" in str(p) for p in problems)


def test_schema_invalid_file_names_the_json_path(store: Store) -> None:
    path = store.path("lora", "hero", "p1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_json({**lora(), "releases": [{"id": "r1", "status": "candidate"}]}))
    with pytest.raises(RecordError, match=r"\$\.releases\[0\]: 'createdAt' is a required property"):
        store.read("lora", "hero", "p1")


def test_missing_record_and_missing_project(store: Store) -> None:
    with pytest.raises(RecordNotFoundError, match="lora 'nope' not found in project 'p1'"):
        store.read("lora", "nope", "p1")
    with pytest.raises(RecordNotFoundError, match="project 'ghost' does not exist"):
        store.read("project", "ghost")


def test_validate_reports_every_problem_with_file_and_path(store: Store) -> None:
    store.write("lora", lora(), "p1")
    other = store.path("lora", "mismatch", "p1")
    other.write_text(dump_json(lora("different-id")))
    asset = store.path("asset", "a1", "p1")
    asset.parent.mkdir(parents=True)
    asset.write_text(dump_json({"id": "a1", "projectId": "p1", "specId": "s", "createdAt": TS, "updatedAt": TS,
                                "versions": [{"id": "v", "createdAt": TS, "status": "shiny", "generation": {}, "variants": []}]}))
    messages = [str(p) for p in validate_records(store.root)]
    assert any("mismatch.json" in m and "does not match the file name" in m for m in messages)
    assert any("a1.json" in m and "$.versions[0].status" in m for m in messages)
    assert len(messages) == 2


def test_validate_cli_exit_codes(store: Store, tmp_path: Path) -> None:
    env_cmd = [sys.executable, "-m", "lorakit", "validate", "--data-root", str(store.root)]
    ok = subprocess.run(env_cmd, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    store.path("lora", "bad", "p1").parent.mkdir(parents=True, exist_ok=True)
    store.path("lora", "bad", "p1").write_text("{not json")
    bad = subprocess.run(env_cmd, capture_output=True, text=True)
    assert bad.returncode == 1
    assert "bad.json: malformed JSON at line 1" in bad.stdout


def test_ids() -> None:
    assert check_id("ui_icons-v2.1") == "ui_icons-v2.1"
    ids = {new_ulid() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 26 and check_id(i) for i in ids)
    assert new_ulid(1000) < new_ulid(2000)  # sortable by time
    assert now_iso().endswith("Z") and len(now_iso()) == len(TS)


WORKER = textwrap.dedent(
    """
    import sys
    from lorakit.store import Store
    store = Store(sys.argv[1])
    name = sys.argv[2]
    for i in range(int(sys.argv[3])):
        def add(record):
            record.setdefault("counts", {}).setdefault(name, 0)
            record["counts"][name] += 1
            record["total"] = record.get("total", 0) + 1
        store.update("lora", "hero", add, "p1")
    """
)


def test_two_processes_updating_one_record_lose_no_update(store: Store, tmp_path: Path) -> None:
    store.write("lora", lora(), "p1")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    n = 150
    procs = [subprocess.Popen([sys.executable, str(script), str(store.root), name, str(n)]) for name in ("a", "b")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    record = store.read("lora", "hero", "p1")
    assert record["counts"] == {"a": n, "b": n}
    assert record["total"] == 2 * n
    # No temporary files are left beside the record.
    assert sorted(p.name for p in store.folder("lora", "p1").iterdir()) == ["hero.json"]


KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from lorakit.store import Store
    store = Store(sys.argv[1])
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        store.update("lora", "hero", lambda r: r.update(notes="x" * (i % 5000), total=i), "p1")
    """
)


def test_a_killed_writer_never_leaves_a_half_written_record(store: Store, tmp_path: Path) -> None:
    import signal
    import time

    store.write("lora", lora(), "p1")
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WRITER)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, str(script), str(store.root)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        record = store.read("lora", "hero", "p1")  # parses and validates
        assert record["total"] >= 0
    # The lock of a killed process is released by the OS, so the next update goes through.
    store.update("lora", "hero", lambda r: r.update(total=-1), "p1")
    assert store.read("lora", "hero", "p1")["total"] == -1


def test_schemas_are_valid_2020_12_and_the_fast_check_agrees_with_jsonschema() -> None:
    from jsonschema import Draft202012Validator

    from lorakit.schemas import SCHEMA_NAMES, _fast_validator, _schemas, validator

    for name in SCHEMA_NAMES:
        Draft202012Validator.check_schema(_schemas()[name])
    samples = [lora(), lora(assetTypes=[]), lora(id="a..b"), lora(scope="team"),
               lora(releases=[{"id": "r", "createdAt": TS, "status": "candidate",
                               "weights": {"kind": "config_relative", "path": "x"}}]),
               lora(releases=[{"id": "r", "createdAt": TS, "status": "approved",
                               "weights": {"kind": "external", "uri": "https://x"}}])]
    for record in samples:
        try:
            _fast_validator("lora")(record)
            fast_ok = True
        except Exception:
            fast_ok = False
        assert fast_ok == validator("lora").is_valid(record), record
