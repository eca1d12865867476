"""LoRA records and releases (lorakit/loras.py) and ``lorakit lora create``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lorakit
from lorakit.cli import main
from lorakit.errors import RecordError, RecordNotFoundError
from lorakit.loras import add_release, create_lora, find_lora, get_lora, get_release, make_release, update_release
from lorakit.store import now_iso


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = tmp_path / "data"
    config = tmp_path / "local.json"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(tmp_path / "models"), "lorasRoot": str(tmp_path / "loras")}}))
    monkeypatch.setenv("LORAKIT_DATA_ROOT", str(data))
    monkeypatch.setenv("LORAKIT_CONFIG", str(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ws = lorakit.init_data_root()
    now = now_iso()
    ws.store.write("project", {"id": "demo", "name": "Demo", "createdAt": now, "updatedAt": now})
    ws.store.write("checkpoint", {"id": "sd15_base", "name": "SD 1.5", "createdAt": now, "updatedAt": now,
                                  "supportedAssetTypes": ["icon"], "family": "sd15"})
    return ws


def test_create_project_and_baseline_loras_where_the_data_model_says(ws):
    project = create_lora(ws, "hero", name="Hero", scope="project", project="demo", checkpoint="sd15_base",
                          asset_types=["character", "icon"])
    baseline = create_lora(ws, "icons", name="Icons", scope="baseline", checkpoint="sd15_base", asset_types=["icon"])
    assert ws.store.path("lora", "hero", "demo") == ws.data_root / "projects/demo/loras/hero.json"
    assert (ws.data_root / "shared/loras/icons.json").is_file()
    assert project["releases"] == [] and project["projectId"] == "demo" and project["assetTypes"] == ["character", "icon"]
    assert "projectId" not in baseline
    assert get_lora(ws, "hero", project="demo") == project
    # Without a scope a project's LoRAs are searched first, then the shared ones.
    assert find_lora(ws, "icons", project="demo") == (baseline, None)
    assert lorakit.validate_records(ws) == []


def test_create_errors_leave_nothing_behind(ws):
    with pytest.raises(RecordError, match="needs a project"):
        create_lora(ws, "x", name="X", scope="project", checkpoint="sd15_base", asset_types=["icon"])
    with pytest.raises(RecordNotFoundError, match="checkpoint 'nope'"):
        create_lora(ws, "x", name="X", scope="baseline", checkpoint="nope", asset_types=["icon"])
    with pytest.raises(RecordNotFoundError, match="project 'ghost'"):
        create_lora(ws, "x", name="X", scope="project", project="ghost", checkpoint="sd15_base", asset_types=["icon"])
    with pytest.raises(RecordError, match="at least one asset type"):
        create_lora(ws, "x", name="X", scope="baseline", checkpoint="sd15_base", asset_types=[" "])
    with pytest.raises(lorakit.InvalidIdError):
        create_lora(ws, "../x", name="X", scope="baseline", checkpoint="sd15_base", asset_types=["icon"])
    assert ws.store.list_ids("lora") == [] and ws.store.list_ids("lora", "demo") == []
    create_lora(ws, "x", name="X", scope="baseline", checkpoint="sd15_base", asset_types=["icon"])
    before = ws.store.path("lora", "x").read_bytes()
    with pytest.raises(RecordError, match="already exists"):
        create_lora(ws, "x", name="Other", scope="baseline", checkpoint="sd15_base", asset_types=["icon"])
    assert ws.store.path("lora", "x").read_bytes() == before


def test_new_ids_are_ulids(ws):
    record = create_lora(ws, None, name="Auto", scope="baseline", checkpoint="sd15_base", asset_types=["icon"])
    assert len(record["id"]) == 26


def test_add_release_appends_a_candidate_once_and_can_set_active(ws):
    create_lora(ws, "hero", name="Hero", scope="project", project="demo", checkpoint="sd15_base", asset_types=["icon"])
    weights = {"kind": "config_relative", "base": "lorasRoot", "path": "hero/r1/hero.safetensors"}
    release = make_release("r1", weights=weights, sha256="a" * 64, training={"config": {"rank": 4}}, notes="first")
    assert release["status"] == "candidate" and release["evaluation"] == {"status": "pending"}
    record = add_release(ws, "hero", release, project="demo", set_active=True)
    assert record["activeReleaseId"] == "r1" and get_release(record, "r1")["weights"]["sha256"] == "a" * 64
    with pytest.raises(RecordError, match="already has a release 'r1'"):
        add_release(ws, "hero", release, project="demo")
    record = add_release(ws, "hero", make_release("r2", weights=weights, sha256="b" * 64, training={}), project="demo")
    assert [r["id"] for r in record["releases"]] == ["r1", "r2"] and record["activeReleaseId"] == "r1"
    record = update_release(ws, "hero", "r2", lambda r: {**r, "notes": "n"}, project="demo")
    assert get_release(record, "r2")["notes"] == "n"
    with pytest.raises(RecordNotFoundError):
        update_release(ws, "hero", "r9", lambda r: r, project="demo")
    assert lorakit.validate_records(ws) == []


def test_cli_create(ws, capsys):
    assert main(["lora", "create", "--lora", "hero", "--name", "Hero", "--scope", "project", "--project", "demo",
                 "--checkpoint", "sd15_base", "--asset-types", "character,icon", "--asset-types", "prop"]) == 0
    assert "created LoRA hero" in capsys.readouterr().out
    assert get_lora(ws, "hero", project="demo")["assetTypes"] == ["character", "icon", "prop"]
    assert main(["lora", "create", "--lora", "hero", "--name", "Hero", "--scope", "project",
                 "--checkpoint", "sd15_base", "--asset-types", "icon"]) == 1
    assert "needs a project" in capsys.readouterr().err


def test_cli_lora_group_is_shared_with_other_modules():
    import argparse

    from lorakit.cli.lora import lora_subcommands

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    common = argparse.ArgumentParser(add_help=False)
    first = lora_subcommands(sub, common)
    first.add_parser("one")
    second = lora_subcommands(sub, common)
    assert second is first and "one" in second.choices
