"""The LoRA picker, driven like a user would: set the dropdowns, change a release and a strength, read the
table and the selection. Runs on a temp data root; the agreement test also runs on the repo's ``data/``
(the demo data) once it holds LoRAs, or on any data root named by ``LORAKIT_PICKER_DATA``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from lorakit.select import LoraResolution, list_loras
from lorakit.widgets import LoraPicker
from lorakit.workspace import Workspace, init_data_root, open_workspace

TS = "2026-01-01T00:00:00.000Z"


def release(release_id: str, lora_id: str, status: str = "approved") -> dict:
    return {"id": release_id, "createdAt": TS, "status": status,
            "weights": {"kind": "config_relative", "base": "lorasRoot",
                        "path": f"{lora_id}/{release_id}/{lora_id}.safetensors"}}


def populate(ws: Workspace) -> None:
    """Two checkpoints, a shared and a project asset-type catalog, baseline and project LoRAs with files."""
    store = ws.store
    store.write("project", {"id": "p1", "name": "P1", "createdAt": TS, "updatedAt": TS,
                            "policies": {"loraSelection": {"maxActiveLoras": 2}}})
    store.write_catalog("asset-types", {"id": "assetTypes", "assetTypes": [
        {"id": "icon", "label": "UI icon"}, {"id": "character", "label": "Character"}]}, None)
    store.write_catalog("asset-types", {"id": "assetTypes", "assetTypes": [
        {"id": "character", "label": "Hero character"}, {"id": "tile", "label": "Tile"}]}, "p1")
    for ck, types in (("sd15a", ["icon", "character", "tile"]), ("sdxlb", ["icon"])):
        store.write("checkpoint", {"id": ck, "name": ck.upper(), "createdAt": TS, "updatedAt": TS,
                                   "supportedAssetTypes": types})
    loras = [
        ("b_icons", "baseline", "sd15a", ["icon"], ["r1", "r2"], {"activeReleaseId": "r1"}),
        ("b_icons_rec", "baseline", "sd15a", ["icon"], ["r1"], {"recommended": True, "activeReleaseId": "r1"}),
        ("b_xl", "baseline", "sdxlb", ["icon"], ["r1"], {}),
        ("p_hero", "project", "sd15a", ["character", "icon"], ["r1", "r2"], {"recommended": True}),
        ("p_tiles", "project", "sd15a", ["tile"], ["r1"], {}),
    ]
    for lora_id, scope, ck, types, releases, extra in loras:
        record = {"id": lora_id, "name": lora_id.replace("_", " ").title(), "createdAt": TS, "updatedAt": TS,
                  "scope": scope, "checkpointId": ck, "assetTypes": types,
                  "releases": [release(r, lora_id) for r in releases], **extra}
        if scope == "project":
            record["projectId"] = "p1"
        store.write("lora", record, "p1" if scope == "project" else None)
        for r in releases:
            path = ws.config.loras_root / lora_id / r / f"{lora_id}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"weights")
    # a deprecated release is never offered
    store.update("lora", "b_icons", lambda rec: rec["releases"].append({**release("r0", "b_icons"),
                                                                         "status": "deprecated"}))


def env_for(monkeypatch: pytest.MonkeyPatch, data: Path, models: Path, config: Path) -> Workspace:
    config.write_text(json.dumps({"paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "checkpoints"),
                                            "lorasRoot": str(models / "loras")}}), encoding="utf-8")
    monkeypatch.setenv("LORAKIT_DATA_ROOT", str(data))
    monkeypatch.setenv("LORAKIT_CONFIG", str(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return init_data_root()


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    workspace = env_for(monkeypatch, tmp_path / "data", tmp_path / "models", tmp_path / "local.json")
    populate(workspace)
    return workspace


def picked(picker: LoraPicker) -> list[tuple[str, str, float]]:
    return [(p["loraId"], p["releaseId"], p["strength"]) for p in picker.selection]


def test_dropdowns_come_from_the_checkpoint_and_asset_type_records(ws: Workspace) -> None:
    picker = LoraPicker(ws, "p1")
    assert list(picker.checkpoint.options) == [("SD15A", "sd15a"), ("SDXLB", "sdxlb")]
    picker.checkpoint.value = "sd15a"
    # shared catalog order, the project's label for "character", then the project's own "tile"
    assert list(picker.asset_type.options) == [("UI icon", "icon"), ("Hero character", "character"), ("Tile", "tile")]
    picker.asset_type.value = "character"
    picker.checkpoint.value = "sdxlb"
    assert list(picker.asset_type.options) == [("UI icon", "icon")]
    assert picker.asset_type.value == "icon"
    assert picked(picker) == [("b_xl", "r1", 1.0)]


def test_picker_shows_the_policy_choice_and_takes_release_and_strength_changes(ws: Workspace) -> None:
    picker = LoraPicker(ws, "p1")
    seen: list[LoraResolution] = []
    picker.observe(lambda change: seen.append(change["new"]), "value")
    picker.checkpoint.value = "sd15a"
    picker.asset_type.value = "icon"
    assert isinstance(picker.value, LoraResolution)
    assert picked(picker) == [("b_icons_rec", "r1", 1.0), ("b_icons", "r1", 1.0)]
    frame = picker.frame
    assert frame.lora_id.tolist() == ["b_icons_rec", "b_icons", "p_hero"]
    assert frame.picked.tolist() == [True, True, False]
    assert "over the cap" in frame.reason.iloc[2]
    assert "★ B Icons Rec" in picker.table.value and "★ P Hero" in picker.table.value
    assert "✓" in picker.table.value
    # every compatible LoRA gets controls; deprecated releases are not offered
    assert list(picker.controls) == ["b_icons_rec", "b_icons", "p_hero"]
    assert [v for _, v in picker.controls["b_icons"].release.options] == ["", "r1", "r2"]

    picker.controls["b_icons"].release.value = "r2"
    assert picked(picker) == [("b_icons_rec", "r1", 1.0), ("b_icons", "r2", 1.0)]
    picker.controls["b_icons_rec"].strength.value = 0.4
    assert picked(picker) == [("b_icons_rec", "r1", 0.4), ("b_icons", "r2", 1.0)]
    assert picker.selection[1]["weightsPath"] == str(ws.config.loras_root / "b_icons/r2/b_icons.safetensors")
    picker.controls["b_icons"].release.value = ""  # back to the policy's release
    assert picked(picker)[1] == ("b_icons", "r1", 1.0)
    assert seen[-1] is picker.value

    # a deleted weights file shows up as a warning after reload, and the next LoRA takes the slot
    (ws.config.loras_root / "b_icons/r1/b_icons.safetensors").unlink()
    picker.reload()
    assert [p[0] for p in picked(picker)] == ["b_icons_rec", "p_hero"]
    assert "weights file is missing" in picker.notes.value


def data_roots() -> list:
    roots = [pytest.param(None, id="temp")]
    named = os.environ.get("LORAKIT_PICKER_DATA")
    if named:  # any real data root, with the machine's own config/local.json
        roots.append(pytest.param(Path(named), id="named"))
    return roots


@pytest.mark.parametrize("data_root", data_roots())
def test_picker_agrees_with_lora_list_for_every_choice(data_root: Path | None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if data_root is None:
        ws = env_for(monkeypatch, tmp_path / "data", tmp_path / "models", tmp_path / "local.json")
        populate(ws)
    else:
        ws = open_workspace(data_root)  # the demo data with the machine's own config/local.json
    projects = ws.store.list_projects()
    project = projects[0] if projects else None
    picker = LoraPicker(ws, project)
    checked = 0
    for _, checkpoint in picker.checkpoint.options:
        picker.checkpoint.value = checkpoint
        for _, asset_type in picker.asset_type.options:
            picker.asset_type.value = asset_type
            expected = list_loras(ws, project, checkpoint, asset_type)
            assert picker.frame.lora_id.tolist() == expected.lora_id.tolist(), (checkpoint, asset_type)
            assert picker.frame.release_id.tolist() == expected.release_id.tolist(), (checkpoint, asset_type)
            assert [p["loraId"] for p in picker.selection] == expected[expected.picked].lora_id.tolist()
            checked += 1
    assert checked > 0


@pytest.mark.slow
def test_picker_on_the_demo_data_with_trained_releases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo project as a user has it after training: one approved, active LoRA per asset type."""
    import shutil

    from lorakit.datasets import build_manifest
    from lorakit.gate import activate_release, review_release
    from lorakit.loras import create_lora
    from lorakit.models import make_tiny_checkpoint
    from lorakit.train import train_lora

    shutil.copytree(REPO_ROOT / "data", tmp_path / "data", ignore=shutil.ignore_patterns(".lorakit"))
    ws = env_for(monkeypatch, tmp_path / "data", tmp_path / "models", tmp_path / "local.json")
    make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    for asset_type in ("ui_icon", "character"):
        dataset = f"demo_{asset_type}"
        build_manifest(ws, project="demo", asset_types=[asset_type], dataset_id=dataset)
        create_lora(ws, f"demo_{asset_type}s", name=asset_type, scope="project", project="demo",
                    checkpoint="tiny-sd15", asset_types=[asset_type])
        result = train_lora(ws, f"demo_{asset_type}s", dataset, project="demo", preset="tiny-demo",
                            overrides={"steps": 2}, progress=False)
        review_release(ws, f"demo_{asset_type}s", result.release_id, approve=True, project="demo", force=True,
                       notes="picker test: no eval grid rendered")
        activate_release(ws, f"demo_{asset_type}s", result.release_id, project="demo")

    picker = LoraPicker(ws, "demo", checkpoint="tiny-sd15", asset_type="ui_icon")
    assert [p["loraId"] for p in picker.selection] == ["demo_ui_icons"]
    picker.asset_type.value = "character"
    assert [p["loraId"] for p in picker.selection] == ["demo_characters"]
    picker.controls["demo_characters"].strength.value = 0.4
    assert picker.selection[0]["strength"] == pytest.approx(0.4)
    assert picker.frame.lora_id.tolist() == list_loras(ws, "demo", "tiny-sd15", "character").lora_id.tolist()
    picker.asset_type.value = "vfx"  # no LoRA serves it
    assert picker.selection == []
