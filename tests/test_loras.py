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


# ---- the validation drop of a release ---------------------------------------------------------------------------
HELD_OUT = {
    "set": "heldOut", "split": 0.2, "seed": 0, "draws": 4, "every": 15, "images": 2,
    "baseLoss": 0.117, "finalLoss": 0.079, "drop": 0.327, "bestStep": 300, "bestLoss": 0.079, "stoppedEarly": False,
    "training": {"images": 8, "baseLoss": 0.12, "finalLoss": 0.07, "drop": 0.416667},
    "curve": [{"step": 0, "epoch": 0, "loss": 0.117, "trainingLoss": 0.12},
              {"step": 300, "epoch": 10, "loss": 0.079, "trainingLoss": 0.07}],
    "secondsPerScore": 0.21,
}
GARBAGE = {"set": "everything", "images": -3, "baseLoss": "0.117", "finalLoss": True, "drop": float("nan"),
           "bestStep": 1.5, "stoppedEarly": "yes", "training": [1], "curve": [{"step": "0", "loss": 0.1}, 7,
                                                                                {"step": 5, "loss": None}]}


def test_validation_summary_reads_the_headline_set():
    from lorakit.loras import validation_summary

    assert validation_summary(HELD_OUT) == "validation loss 0.117 → 0.079 (−32.7%) on 2 held-out images"
    on_training = {"set": "training", "images": 10, "baseLoss": 0.2, "finalLoss": 0.15, "drop": 0.25}
    assert validation_summary(on_training) == "validation loss 0.2 → 0.15 (−25.0%) on the 10 training images"
    assert validation_summary({**on_training, "images": 1}).endswith("on the 1 training image")
    # A loss that rose is shown as a rise, not hidden behind the word "drop".
    assert "(+10.0%)" in validation_summary({**on_training, "finalLoss": 0.22, "drop": -0.1})
    assert validation_summary(HELD_OUT, ascii_only=True) == "validation loss 0.117 -> 0.079 (-32.7%) on 2 held-out images"


def test_validation_summary_says_where_an_early_stop_ended():
    from lorakit.loras import validation_summary

    stopped = {**HELD_OUT, "stoppedEarly": True, "bestStep": 120,
               "curve": [{"step": s, "loss": 0.1} for s in (0, 60, 120, 180)]}
    assert validation_summary(stopped).endswith("on 2 held-out images (stopped early at step 180)")
    # An eval's copy has no curve: it keeps the step itself.
    assert validation_summary({**stopped, "curve": None, "stoppedAt": 180}).endswith("(stopped early at step 180)")
    assert validation_summary({**stopped, "curve": []}).endswith("(stopped early)")
    assert "stopped" not in validation_summary({**HELD_OUT, "stoppedAt": 50})


def test_releases_without_validation_and_garbage_values_never_raise():
    from lorakit.loras import release_validation, validation_facts, validation_summary

    for release in ({}, {"training": None}, {"training": "native"}, {"training": {"validation": [1, 2]}}, "r1"):
        assert release_validation(release) is None
    assert validation_summary(release_validation({"training": {"finalLoss": 0.1}})) == "no validation"
    assert validation_summary({}) == "validation loss ? → ? (?) on ? images"
    facts = validation_facts(GARBAGE)
    assert {k: facts[k] for k in ("set", "images", "baseLoss", "finalLoss", "drop", "bestStep", "stoppedEarly",
                                  "training")} == {
        "set": None, "images": None, "baseLoss": None, "finalLoss": None, "drop": None, "bestStep": None,
        "stoppedEarly": False, "training": None}
    assert facts["curve"] == []
    assert validation_summary(GARBAGE) == "validation loss ? → ? (?) on ? images"
    assert validation_summary({"baseLoss": float("inf"), "finalLoss": 0.1, "drop": 0.5}) \
        == "validation loss ? → 0.1 (−50.0%) on ? images"


def test_validation_facts_keep_the_usable_curve_points_and_the_training_set():
    from lorakit.loras import validation_facts

    facts = validation_facts({**HELD_OUT, "curve": [*HELD_OUT["curve"], {"step": 400}, {"loss": 0.1}, "x"]})
    assert facts["curve"] == [{"step": 0, "epoch": 0, "loss": 0.117, "trainingLoss": 0.12},
                              {"step": 300, "epoch": 10, "loss": 0.079, "trainingLoss": 0.07}]
    assert facts["training"] == {"images": 8, "baseLoss": 0.12, "finalLoss": 0.07, "drop": 0.416667}
    assert facts["bestStep"] == 300 and facts["bestLoss"] == 0.079 and facts["stoppedAt"] is None


# Values the LoRA schema lets through that no sane run writes: a display must still show them, not fail.
ODD = {**HELD_OUT, "images": 0, "baseLoss": 0.0, "finalLoss": 1e300, "drop": -1e300, "stoppedEarly": True, "curve": []}
ODD_TEXT = "validation loss 0 → 1e+300 (+1e+302%) on 0 held-out images (stopped early)"


def lora_with_validated_releases(ws, tmp_path: Path) -> None:
    """LoRA ``hero`` (project demo) with a held-out release, one trained before validation existed and one with
    odd values, each with a weights file so the resolved view can pick them."""
    create_lora(ws, "hero", name="Hero", scope="project", project="demo", checkpoint="sd15_base", asset_types=["icon"])
    for release_id, validation in (("r1", HELD_OUT), ("r2", None), ("r3", ODD)):
        weights = tmp_path / f"{release_id}.safetensors"
        weights.write_bytes(b"weights")
        training = {"steps": 300} | ({"validation": validation} if validation else {})
        release = make_release(release_id, weights={"kind": "absolute", "path": str(weights)}, sha256="a" * 64,
                               training=training, created_at=f"2026-01-0{release_id[1]}T00:00:00.000Z")
        add_release(ws, "hero", release, project="demo")


def test_lora_list_shows_each_releases_validation_drop(ws, tmp_path, capsys):
    lora_with_validated_releases(ws, tmp_path)
    assert main(["lora", "list", "--project", "demo"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[-1] == "validation"
    by_release = {next(r for r in ("r1", "r2", "r3") if f" {r} " in row): row.rstrip() for row in rows}
    assert by_release["r1"].endswith("validation loss 0.117 → 0.079 (−32.7%) on 2 held-out images")
    assert by_release["r2"].endswith("no validation")
    assert by_release["r3"].endswith(ODD_TEXT)

    assert main(["lora", "list", "--project", "demo", "--json"]) == 0
    records = {r["release_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["r1"]["validation_drop"] == 0.327 and records["r1"]["validation"].startswith("validation loss 0.117")
    assert records["r2"]["validation"] == "no validation" and records["r2"]["validation_drop"] is None
    assert records["r3"]["validation"] == ODD_TEXT


def test_lora_list_for_a_checkpoint_and_asset_type_shows_the_picked_releases_drop(ws, tmp_path, capsys):
    lora_with_validated_releases(ws, tmp_path)
    picked = ["lora", "list", "--project", "demo", "--checkpoint", "sd15_base", "--asset-type", "icon", "--pick"]
    assert main([*picked, "hero@r1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["release_id"] == "r1" and row["validation"] == "validation loss 0.117 → 0.079 (−32.7%) on 2 held-out images"
    assert main([*picked, "hero@r2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].rstrip().endswith("no validation")


def test_lora_list_names_the_file_of_a_validation_block_the_schema_refuses(ws, tmp_path, capsys):
    lora_with_validated_releases(ws, tmp_path)
    path = ws.store.path("lora", "hero", "demo")
    record = json.loads(path.read_text(encoding="utf-8"))
    record["releases"][0]["training"]["validation"]["baseLoss"] = "0.117"
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    assert main(["lora", "list", "--project", "demo"]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "baseLoss" in err and "Traceback" not in err
