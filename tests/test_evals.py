"""Eval records and grids without rendering: canonical prompts, templates, grid planning, linking, cleanup,
normalize and the contact sheet. Rendering is in ``test_worker.py``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from lorakit.cli import main
from lorakit.errors import RecordError, RecordNotFoundError
from lorakit.evals import (
    EvalError,
    apply_prompt_templates,
    canonical_prompt_problems,
    canonical_prompts,
    cleanup_eval,
    contact_sheet,
    create_eval,
    create_eval_grid,
    eval_status,
    link_eval,
    normalize_evals,
    parse_prompts,
    plan_batches,
    plan_cells,
    sheet_heading,
    sheet_layout,
    upsert_output,
)
from lorakit.loras import add_release, create_lora, make_release
from lorakit.models.registry import register_checkpoint
from lorakit.store import Store, now_iso
from lorakit.validate import validate_records
from lorakit.workspace import open_workspace

PROJECT = "proj"
SHARED_PROMPTS = {
    "ui_icon": ["ui icon of a shield", "ui icon of a potion", "ui icon of a gear"],
    "character": ["hero sprite, front", "hero sprite, side", "hero portrait"],
}
TEMPLATES = {
    "basePositive": "game asset",
    "baseNegative": "blurry, watermark",
    "perAssetType": {"ui_icon": {"positive": "flat ui icon, {specPrompt}, centered", "negative": "photo"}},
}


def write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def asset_types_catalog(prompts: dict[str, list[str]]) -> dict:
    return {"id": "assetTypes", "createdAt": now_iso(), "updatedAt": now_iso(),
            "assetTypes": [{"id": t, "label": t, "canonicalPrompts": p} for t, p in prompts.items()]}


@pytest.fixture
def ws(tmp_path, monkeypatch, tmp_data_root):
    """A data root with a project, a shared asset-types catalog, a checkpoint record and a LoRA with two releases
    whose weights files are small stand-ins (grid planning only hashes them)."""
    data, models = tmp_data_root, tmp_path / "models"  # see conftest.py
    workspace = open_workspace()
    now = now_iso()
    workspace.store.write("project", {"id": PROJECT, "name": "Project", "createdAt": now, "updatedAt": now})
    write_json(data / "shared" / "catalogs" / "asset-types.json", asset_types_catalog(SHARED_PROMPTS))
    register_checkpoint(workspace, "ckpt", {
        "name": "ckpt", "family": "sd15", "supportedAssetTypes": ["ui_icon", "character"],
        "weights": {"kind": "config_relative", "base": "checkpointsRoot", "path": "ckpt"},
        "promptTemplates": TEMPLATES,
        "defaultGenerationParams": {"width": 64, "height": 64, "steps": 4, "cfg": 5.0},
    })
    (models / "checkpoints" / "ckpt").mkdir(parents=True)
    create_lora(workspace, "icons", name="Icons", scope="project", project=PROJECT, checkpoint="ckpt",
                asset_types=["ui_icon"])
    for release_id in ("r1", "r2"):
        rel = f"icons/{release_id}/icons.safetensors"
        weights = models / "loras" / rel
        weights.parent.mkdir(parents=True)
        weights.write_bytes(release_id.encode() * 100)
        sha = hashlib.sha256(weights.read_bytes()).hexdigest()
        add_release(workspace, "icons", make_release(release_id, weights={
            "kind": "config_relative", "base": "lorasRoot", "path": rel}, sha256=sha, training={}), project=PROJECT)
    return workspace


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``lorakit ARGS`` in this process (the same entry point as the console script); exit code and stdout."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().out


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (locks aside) with its content hash: what a dry run must leave unchanged."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".lorakit" not in p.parts}


# ---- canonical prompts ---------------------------------------------------------------------------------
def test_canonical_prompt_counts_are_checked():
    record = asset_types_catalog({"two": ["a", "b"], "three": ["a", "b", "c"], "five": list("abcde"),
                                  "six": list("abcdef")})
    record["assetTypes"].append({"id": "inherits", "label": "no prompts: inherits the shared ones"})
    problems = canonical_prompt_problems(record)
    assert len(problems) == 2
    assert "'two' has 2 canonical prompts (expected 3 to 5)" in problems[0]
    assert "'six' has 6" in problems[1]
    assert canonical_prompt_problems(asset_types_catalog({"x": ["a", "a", "b"]})) == [
        "at $.assetTypes[0].canonicalPrompts: asset type 'x' repeats 'a'"]


def test_validate_reports_a_project_catalog_with_too_few_prompts(ws, capsys):
    assert validate_records(ws) == []
    write_json(ws.store.catalog_path("asset-types", PROJECT), asset_types_catalog({"ui_icon": ["only one"]}))
    problems = [str(p) for p in validate_records(ws)]
    assert len(problems) == 1 and "asset type 'ui_icon' has 1 canonical prompts" in problems[0]
    code, out = cli(capsys, "validate")
    assert code == 1 and "has 1 canonical prompts" in out


def test_project_catalog_overrides_shared_prompts_entry_by_entry(ws):
    override = ["icon A", "icon B", "icon C", "icon D"]
    write_json(ws.store.catalog_path("asset-types", PROJECT),
               {"id": "assetTypes", "assetTypes": [{"id": "ui_icon", "label": "UI", "canonicalPrompts": override},
                                                   {"id": "character", "label": "no prompts here"}]})
    assert canonical_prompts(ws, "ui_icon", PROJECT) == override
    assert canonical_prompts(ws, "character", PROJECT) == SHARED_PROMPTS["character"]
    assert canonical_prompts(ws, "ui_icon") == SHARED_PROMPTS["ui_icon"]
    with pytest.raises(EvalError, match="no canonical prompts"):
        canonical_prompts(ws, "vfx", PROJECT)


def test_parse_prompts_splits_pipes_and_lines():
    assert parse_prompts("a| b |a", "c\r\nd|e\n\n") == ["a", "b", "c", "d", "e"]
    assert parse_prompts(None, None) == []


# ---- templates and planning ----------------------------------------------------------------------------
def test_prompt_templates_follow_the_original_tool():
    assert apply_prompt_templates("a shield", TEMPLATES, "ui_icon") == ("flat ui icon, a shield, centered", "photo")
    assert apply_prompt_templates("a hero", TEMPLATES, "character") == ("game asset, a hero", "blurry, watermark")
    assert apply_prompt_templates("a hero", None, "character") == ("a hero", "")
    assert apply_prompt_templates("x", {"perAssetType": {"vfx": "glow"}}, "vfx") == ("glow, x", "")


def test_grid_always_has_one_base_row_and_a_row_per_release_and_strength():
    cells = plan_cells([("p1", "ui_icon"), ("p2", "ui_icon")], [1, 2, 2], [0.5, 1.0, 0.5], ["r2", "r1", "r2"])
    rows = list(dict.fromkeys(c.row_key for c in cells))
    assert rows == ["base", "r2__w0.5", "r2__w1", "r1__w0.5", "r1__w1"]
    assert len(cells) == 5 * 2 * 2 and len({c.key for c in cells}) == len(cells)
    assert all(c.release_id == "r2" for c in cells if c.is_base)
    with pytest.raises(EvalError, match="out of range"):
        plan_cells([("p", None)], [1], [5.0], ["r"])
    with pytest.raises(EvalError, match="at least one prompt"):
        plan_cells([], [1], [1.0], ["r"])


def test_batches_stay_within_a_row_and_keep_negative_prompts_apart():
    cells = plan_cells([("p1", None), ("p2", None)], [1, 2, 3], [1.0], ["r1"])
    assert plan_batches(cells, ["n"] * 12, 4) == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]]
    assert plan_batches(cells, ["n"] * 12, 1) == [[i] for i in range(12)]
    negatives = ["n", "n", "n", "", "", ""] * 2  # p1 with a negative prompt, p2 without
    assert plan_batches(cells, negatives, 8) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(EvalError, match="batch size must be at least 1"):
        plan_batches(cells, ["n"] * 12, 0)


def test_status_and_upsert_count_distinct_cells():
    record = {"prompts": ["a"], "outputs": [], "grid": {"cells": [{"key": "k1"}, {"key": "k2"}]}}
    assert eval_status(record) == "pending"
    record = upsert_output(record, {"prompt": "a", "images": ["1.png"], "cellKey": "k1"})
    record = upsert_output(record, {"prompt": "a", "images": ["1b.png"], "cellKey": "k1"})  # a re-rendered job
    assert record["status"] == "running" and len(record["outputs"]) == 1
    record = upsert_output(record, {"prompt": "a", "images": ["2.png"], "cellKey": "k2"})
    assert record["status"] == "complete"
    # an eval written by the original tool: one output per prompt, no grid
    assert eval_status({"prompts": ["a", "b"], "outputs": [{"prompt": "b", "images": ["x"]}]}) == "running"
    assert eval_status({"prompts": [], "outputs": []}) == "pending"


def test_link_eval_keeps_review_state_and_history():
    block = link_eval({"status": "approved", "evalIds": ["e1"], "reviews": [{"outcome": "approved"}]}, "e2")
    assert block == {"status": "approved", "evalIds": ["e1", "e2"], "reviews": [{"outcome": "approved"}]}
    assert link_eval(None, "e1") == {"evalIds": ["e1"], "status": "pending"}
    assert link_eval({"evalIds": ["e1"]}, "e1")["evalIds"] == ["e1"]


# ---- records -------------------------------------------------------------------------------------------
def test_lora_eval_uses_canonical_prompts_and_links_the_release(ws):
    before = tree_digest(ws.data_root)
    preview = create_eval(ws, "icons", "r1", project=PROJECT, dry_run=True)
    assert tree_digest(ws.data_root) == before
    record = create_eval(ws, "icons", "r1", project=PROJECT, eval_id="ev1")
    assert record["prompts"] == preview["prompts"] == SHARED_PROMPTS["ui_icon"]
    assert record["status"] == "pending" and record["outputs"] == []
    assert ws.store.read("eval", "ev1", PROJECT)["loraId"] == "icons"
    lora = ws.store.read("lora", "icons", PROJECT)
    assert lora["releases"][0]["evaluation"] == {"status": "pending", "evalIds": ["ev1"]}
    create_eval(ws, "icons", "r1", project=PROJECT, prompts=["my prompt"], eval_id="ev2")
    assert ws.store.read("lora", "icons", PROJECT)["releases"][0]["evaluation"]["evalIds"] == ["ev1", "ev2"]
    with pytest.raises(RecordError, match="already exists"):
        create_eval(ws, "icons", "r1", project=PROJECT, eval_id="ev1")
    with pytest.raises(RecordNotFoundError):
        create_eval(ws, "icons", "nope", project=PROJECT)
    assert validate_records(ws) == []


def test_lora_eval_command(ws, capsys):
    code, out = cli(capsys, "lora", "eval", "--lora", "icons", "--release", "r2", "--project", PROJECT,
                    "--prompts", "a|b|c", "--eval", "cli1")
    assert code == 0 and "created eval cli1" in out
    assert ws.store.read("eval", "cli1", PROJECT)["prompts"] == ["a", "b", "c"]


def test_eval_grid_plans_one_job_per_cell_with_settings(ws):
    before = tree_digest(ws.data_root)
    plan = create_eval_grid(ws, PROJECT, "icons", "r2", seeds=[7, 8], strengths=[1.0], compare_release="r1",
                            eval_id="g1", dry_run=True)
    assert tree_digest(ws.data_root) == before
    assert len(plan.jobs) == 3 * 2 * 3  # 3 canonical prompts x 2 seeds x (base, r2@1, r1@1)
    plan = create_eval_grid(ws, PROJECT, "icons", "r2", seeds=[7, 8], strengths=[1.0], compare_release="r1",
                            eval_id="g1")
    record = ws.store.read("eval", "g1", PROJECT)
    assert record["status"] == "pending" and record["grid"]["releaseIds"] == ["r2", "r1"]
    assert record["grid"]["strengths"] == [0.0, 1.0] and len(record["grid"]["cells"]) == 18
    jobs = [ws.store.read("job", i, PROJECT) for i in ws.store.list_ids("job", PROJECT)]
    assert len(jobs) == 18 and {j["status"] for j in jobs} == {"queued"}
    settings = jobs[0]["input"]["settings"]
    assert set(settings) >= {"checkpointId", "checkpointWeightsHash", "releaseId", "releaseSha256", "scheduler",
                             "steps", "cfg", "width", "height", "seed", "strength", "prompt", "negativePrompt"}
    by_release = {j["input"]["settings"]["releaseId"]: j["input"]["settings"]["releaseSha256"] for j in jobs}
    lora = ws.store.read("lora", "icons", PROJECT)
    assert by_release == {r["id"]: r["sha256"] for r in lora["releases"]}
    assert settings["positivePrompt"].startswith("flat ui icon, ") and settings["negativePrompt"] == "photo"
    assert (settings["width"], settings["steps"], settings["cfg"]) == (64, 4, 5.0)
    assert lora["releases"][1]["evaluation"]["evalIds"] == ["g1"]
    assert validate_records(ws) == []


def test_every_job_lists_its_planned_batch(ws, capsys):
    plan = create_eval_grid(ws, PROJECT, "icons", "r2", prompts=["x", "y"], seeds=[1, 2, 3], strengths=[1.0],
                            compare_release="r1", batch_size=4, dry_run=True)
    assert plan.eval["grid"]["batchSize"] == 4
    batches: dict[str, list[dict]] = {}
    for job in plan.jobs:
        batches.setdefault(job["input"]["batch"]["id"], []).append(job)
    assert sorted(len(b) for b in batches.values()) == [2, 2, 2, 4, 4, 4]  # 6 cells per row: 4 + 2
    for members in batches.values():
        assert len({(j["input"]["settings"]["releaseId"], j["input"]["settings"]["strength"]) for j in members}) == 1
        assert all(j["input"]["batch"] == members[0]["input"]["batch"] for j in members)
        listed = members[0]["input"]["batch"]["cells"]
        assert [c["jobId"] for c in listed] == [j["id"] for j in members]
        assert [(c["seed"], c["positivePrompt"]) for c in listed] == \
            [(j["input"]["settings"]["seed"], j["input"]["settings"]["positivePrompt"]) for j in members]
        assert [(j["input"]["settings"]["batchSize"], j["input"]["settings"]["batchPos"]) for j in members] == \
            [(len(members), i) for i in range(len(members))]
    with pytest.raises(EvalError, match="batch size"):
        create_eval_grid(ws, PROJECT, "icons", "r2", batch_size=0)
    code, out = cli(capsys, "lora", "eval-grid", "--project", PROJECT, "--lora", "icons", "--release", "r2",
                    "--prompts", "x|y", "--seeds", "1,2,3", "--strengths", "1", "--batch-size", "2", "--dry-run")
    assert code == 0 and "6 batch(es) of up to 2" in out and "(batch base__b00)" in out


def test_eval_grid_with_explicit_prompts_and_overrides(ws):
    plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["x", "y"], asset_type="character", width=128,
                            height=96, steps=2, cfg=1.5, seeds=[1], strengths=[0.0, 0.5])
    assert [c["key"] for c in plan.cells] == ["base__p00__s1", "base__p01__s1", "r1__w0.5__p00__s1",
                                              "r1__w0.5__p01__s1"]
    settings = plan.jobs[0]["input"]["settings"]
    assert (settings["width"], settings["height"], settings["steps"], settings["cfg"]) == (128, 96, 2, 1.5)
    assert settings["positivePrompt"] == "game asset, x" and settings["assetType"] == "character"
    with pytest.raises(EvalError, match="multiple of 8"):
        create_eval_grid(ws, PROJECT, "icons", "r1", width=100)


# ---- cleanup, normalize, contact sheet -----------------------------------------------------------------
def fake_render(ws, project: str, eval_id: str, keys: list[str]) -> None:
    """Write an image and an output for some cells, as the worker would (no model needed)."""
    def change(record):
        for cell in record["grid"]["cells"]:
            if cell["key"] in keys:
                rel = f"{record['grid']['imagesDir']}/{cell['key']}.png"
                path = ws.store.file_path(rel)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (64, 64), (cell["seed"] * 40 % 255, int(cell["strength"] * 200), 90)).save(path)
                record = upsert_output(record, {"prompt": cell["prompt"], "images": [rel], "cellKey": cell["key"]})
        return record

    ws.store.update("eval", eval_id, change, project)


def test_normalize_recomputes_status_and_dry_run_changes_nothing(ws, capsys):
    plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["x"], seeds=[1], strengths=[1.0], eval_id="n1")
    keys = [c["key"] for c in plan.cells]
    fake_render(ws, PROJECT, "n1", keys)
    ws.store.update("eval", "n1", lambda r: {**r, "status": "pending"}, PROJECT)  # e.g. a crash before the update
    create_eval(ws, "icons", "r1", project=PROJECT, prompts=["a"], eval_id="plain")
    before = tree_digest(ws.data_root)
    changes = normalize_evals(ws, "project", PROJECT, dry_run=True)
    assert [(c.eval_id, c.old, c.new) for c in changes] == [("n1", "pending", "complete")]
    assert tree_digest(ws.data_root) == before
    code, out = cli(capsys, "lora", "normalize-evals", "--scope", "all")
    assert code == 0 and "pending -> complete" in out
    assert ws.store.read("eval", "n1", PROJECT)["status"] == "complete"
    assert normalize_evals(ws) == []
    assert validate_records(ws) == []


def test_cleanup_removes_jobs_specs_and_temp_files_but_keeps_eval_and_images(ws, capsys):
    plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["x", "y"], seeds=[1], strengths=[1.0], eval_id="c1")
    other = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["z"], seeds=[1], strengths=[1.0], eval_id="c2")
    fake_render(ws, PROJECT, "c1", [c["key"] for c in plan.cells])
    images = ws.store.file_path(plan.eval["grid"]["imagesDir"])
    (images / f".{plan.cells[0]['key']}.png.123.tmp").write_bytes(b"half a png")
    now = now_iso()  # a spec the original tool's eval-grid made for this eval
    ws.store.write("spec", {"id": "eval_c1_1", "projectId": PROJECT, "createdAt": now, "updatedAt": now, "title": "t",
                            "assetType": "ui_icon", "style": "default", "scenario": "default",
                            "prompt": {"positive": "x", "negative": ""}}, PROJECT)
    before = tree_digest(ws.data_root)
    report = cleanup_eval(ws, PROJECT, "c1", dry_run=True)
    assert len(report.jobs) == 4 and len(report.specs) == 1 and len(report.temp_files) == 1
    assert tree_digest(ws.data_root) == before
    code, out = cli(capsys, "lora", "cleanup-eval", "--project", PROJECT, "--eval", "c1")
    assert code == 0 and "removed 4 job(s), 1 spec(s), 1 temporary file(s)" in out
    remaining = [ws.store.read("job", i, PROJECT) for i in ws.store.list_ids("job", PROJECT)]
    assert len(remaining) == len(other.jobs) and {j["input"]["evalId"] for j in remaining} == {"c2"}
    assert ws.store.read("eval", "c1", PROJECT)["status"] == "complete"
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{c['key']}.png" for c in plan.cells)
    report = cleanup_eval(ws, PROJECT, "c1", images=True)
    assert len(report.images) == 4 and not images.exists()
    assert ws.store.read("eval", "c1", PROJECT)["status"] == "pending"
    assert validate_records(ws) == []


def test_contact_sheet_rows_are_release_strength_and_columns_prompt_seed(ws, tmp_path, capsys):
    plan = create_eval_grid(ws, PROJECT, "icons", "r2", prompts=["x", "y"], seeds=[1, 2], strengths=[0.5, 1.0],
                            compare_release="r1", eval_id="s1")
    fake_render(ws, PROJECT, "s1", [c["key"] for c in plan.cells][:-1])  # one cell missing
    layout = sheet_layout(ws.store.read("eval", "s1", PROJECT))
    assert [label for _, label in layout.rows] == ["base (strength 0)", "r2 @ 0.5", "r2 @ 1", "r1 @ 0.5", "r1 @ 1"]
    assert [label for _, label in layout.columns] == ["x | seed 1", "x | seed 2", "y | seed 1", "y | seed 2"]
    assert len(layout.images) == len(plan.cells) - 1
    sheet = contact_sheet(ws, "s1", cell_size=64)
    assert sheet.width > 4 * 64 and sheet.height > 5 * 64
    out = tmp_path / "sheet.png"
    code, _ = cli(capsys, "eval", "grid-image", "s1", "--out", str(out))
    assert code == 0
    with Image.open(out) as image:
        assert image.size[0] > 4 * 160


def test_store_is_untouched_by_failed_grid_requests(ws):
    before = tree_digest(ws.data_root)
    with pytest.raises(RecordNotFoundError):
        create_eval_grid(ws, "no_such_project", "icons", "r1")
    with pytest.raises(RecordNotFoundError):
        create_eval_grid(ws, PROJECT, "icons", "r9")
    Store(ws.data_root)  # still opens
    assert tree_digest(ws.data_root) == before


# ---- the release's validation drop beside the grid ------------------------------------------------------------
VALIDATION = {
    "set": "heldOut", "split": 0.2, "seed": 0, "draws": 4, "every": 15, "images": 2, "baseLoss": 0.117,
    "finalLoss": 0.079, "drop": 0.327, "bestStep": 180, "bestLoss": 0.079, "stoppedEarly": True,
    "training": {"images": 8, "baseLoss": 0.12, "finalLoss": 0.07, "drop": 0.416667},
    "curve": [{"step": s, "epoch": s // 60, "loss": loss, "trainingLoss": loss - 0.01}
              for s, loss in ((0, 0.117), (60, 0.09), (120, 0.085), (180, 0.079), (240, 0.08))],
    "secondsPerScore": 0.21,
}
DROP_TEXT = "validation loss 0.117 → 0.079 (−32.7%) on 2 held-out images (stopped early at step 240)"


def add_validated_release(ws, release_id: str = "r3") -> None:
    rel = f"icons/{release_id}/icons.safetensors"
    weights = ws.config.loras_root / rel
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"validated" * 10)
    add_release(ws, "icons", make_release(release_id, weights={"kind": "config_relative", "base": "lorasRoot", "path": rel},
                                          sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
                                          training={"steps": 240, "validation": VALIDATION}), project=PROJECT)


def test_evals_copy_the_releases_validation_headline(ws):
    from lorakit.loras import validation_summary

    add_validated_release(ws)
    headline = {"set": "heldOut", "images": 2, "baseLoss": 0.117, "finalLoss": 0.079, "drop": 0.327,
                "stoppedEarly": True, "stoppedAt": 240}
    plain = create_eval(ws, "icons", "r3", project=PROJECT, prompts=["a"], eval_id="v1")
    grid = create_eval_grid(ws, PROJECT, "icons", "r3", prompts=["x"], seeds=[1], strengths=[1.0], eval_id="v2",
                            compare_release="r1")
    for record in (plain, grid.eval, ws.store.read("eval", "v1", PROJECT), ws.store.read("eval", "v2", PROJECT)):
        assert record["validation"] == headline
        assert validation_summary(record["validation"]) == DROP_TEXT
    # A release trained before validation existed (or by the kohya_ss/manual adapters) gives an eval without it.
    older = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["x"], seeds=[1], strengths=[1.0], eval_id="v3")
    assert "validation" not in older.eval and "validation" not in ws.store.read("eval", "v3", PROJECT)
    assert validate_records(ws) == []


def test_contact_sheet_shows_the_drop_under_its_title(ws, tmp_path, capsys):
    from PIL import ImageDraw, ImageFont

    add_validated_release(ws)
    plan = create_eval_grid(ws, PROJECT, "icons", "r3", prompts=["x"], seeds=[1], strengths=[1.0], eval_id="d1")
    fake_render(ws, PROJECT, "d1", [c["key"] for c in plan.cells])
    record = ws.store.read("eval", "d1", PROJECT)
    ascii_text = DROP_TEXT.replace("→", "->").replace("−", "-")
    assert [text for text, _ in sheet_heading(record)] == [
        "eval d1 - LoRA icons release r3 - complete", ascii_text, "checkpoint ckpt"]
    sheet = contact_sheet(ws, "d1", cell_size=64)
    # One column of 64 px is narrower than the line: the sheet widens so the whole drop is on it.
    font = ImageFont.load_default(size=12)
    assert sheet.width >= ImageDraw.Draw(sheet).textlength(ascii_text, font=font) + 8
    line = sheet.crop((0, 4 + 14, sheet.width, 4 + 28)).convert("L")
    inked = [x for x in range(line.width) if min(line.getpixel((x, y)) for y in range(line.height)) < 128]
    assert inked and inked[-1] > 150 + 64  # drawn, and further right than the grid alone would reach
    code, out = cli(capsys, "eval", "grid-image", "d1", "--out", str(tmp_path / "d1.png"))
    assert code == 0 and out.splitlines()[-1] == DROP_TEXT


def test_contact_sheet_of_an_eval_without_or_with_broken_validation(ws, capsys, tmp_path):
    plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["x"], seeds=[1], strengths=[1.0], eval_id="b1")
    fake_render(ws, PROJECT, "b1", [c["key"] for c in plan.cells])
    assert sheet_heading(ws.store.read("eval", "b1", PROJECT))[1][0] == "no validation"
    code, out = cli(capsys, "eval", "grid-image", "b1", "--out", str(tmp_path / "b1.png"))
    assert code == 0 and out.splitlines()[-1] == "no validation"
    # An eval record comes from a shared folder: a hand-edited copy with text for numbers shows them as unknown.
    broken = {"set": "somewhere", "images": "two", "baseLoss": "0.117", "finalLoss": None, "drop": [0.3],
              "stoppedEarly": "yes"}
    ws.store.update("eval", "b1", lambda r: {**r, "validation": broken}, PROJECT)
    assert sheet_heading(ws.store.read("eval", "b1", PROJECT))[1][0] == "validation loss ? -> ? (?) on ? images"
    assert contact_sheet(ws, "b1", cell_size=64).width > 0
    assert validate_records(ws) == []


# ---- labels that fit ------------------------------------------------------------------------------------------
def add_release_with_id(ws, release_id: str) -> None:
    rel = f"icons/{release_id}/icons.safetensors"
    weights = ws.config.loras_root / rel
    weights.parent.mkdir(parents=True)
    weights.write_bytes(release_id.encode() * 10)
    add_release(ws, "icons", make_release(release_id, weights={"kind": "config_relative", "base": "lorasRoot", "path": rel},
                                          sha256=hashlib.sha256(weights.read_bytes()).hexdigest(), training={}),
                project=PROJECT)


def image_left_edge(sheet: Image.Image, colour: tuple[int, int, int]) -> tuple[int, int]:
    """The left and top edge of the first cell drawn in ``colour`` (fake_render paints each cell one colour)."""
    import numpy as np

    pixels = np.asarray(sheet.convert("RGB"))
    ys, xs = np.nonzero((pixels == colour).all(axis=2))
    return int(xs.min()), int(ys.min())


def ink_right_edge(sheet: Image.Image, box: tuple[int, int, int, int]) -> int:
    """The rightmost x (in sheet coordinates) with dark ink inside ``box``, or -1."""
    import numpy as np

    grey = np.asarray(sheet.crop(box).convert("L"))
    xs = np.nonzero((grey < 160).any(axis=0))[0]
    return box[0] + int(xs.max()) if len(xs) else -1


@pytest.mark.parametrize("release_id", ["01M8T5S2T2CF3WAEK317TK1MG2", "ICONS-V2-01M8T5S2T2CF3WAEK317TK1MG2-SD15"])
def test_contact_sheet_row_labels_fit_their_column(ws, release_id):
    from PIL import ImageDraw, ImageFont

    from lorakit.evals import MAX_ROW_LABEL_PX

    add_release_with_id(ws, release_id)
    plan = create_eval_grid(ws, PROJECT, "icons", release_id, prompts=["x"], seeds=[1], strengths=[1.0],
                            eval_id="w1")
    fake_render(ws, PROJECT, "w1", [c["key"] for c in plan.cells])
    sheet = contact_sheet(ws, "w1", cell_size=64)
    font = ImageFont.load_default(size=12)
    width_of = ImageDraw.Draw(sheet).textlength
    full = f"{release_id} @ 1"
    left, top = image_left_edge(sheet, (40, 200, 90))  # the LoRA's cell: seed 1, strength 1
    if len(release_id) == 40:
        # Too wide for a sane label column: the id keeps its last 8 characters, the column fits that.
        assert width_of(full, font=font) > MAX_ROW_LABEL_PX
        shown = f"…{release_id[-8:]} @ 1"
        assert left < 4 + width_of(full, font=font)
    else:
        # A 26-character ULID is wider than the old fixed 150 px column: the column widens to it.
        shown = full
        assert width_of(full, font=font) > 150
    assert left >= 4 + width_of(shown, font=font) + 4
    # The label's ink ends before the image starts: nothing of it runs under the image.
    assert 4 + width_of(shown, font=font) - 8 <= ink_right_edge(sheet, (0, top, left, top + 14)) < left - 2
    base_left, _ = image_left_edge(sheet, (40, 0, 90))
    assert base_left == left  # both rows' images start in the same column


def test_contact_sheet_column_labels_wrap_inside_their_cell(ws):
    from PIL import ImageDraw, ImageFont

    from lorakit.evals import wrap_to_width

    prompt = "ui icon of a shield with a supercalifragilistic emblem, flat shading, centered"
    plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=[prompt, "y"], seeds=[1], strengths=[1.0],
                            eval_id="w2")
    fake_render(ws, PROJECT, "w2", [c["key"] for c in plan.cells])
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = wrap_to_width(f"{prompt} | seed 1", lambda t: draw.textlength(t, font=font), 64)
    assert " ".join(lines).replace(" ", "") == f"{prompt} | seed 1".replace(" ", "")  # nothing dropped
    assert all(draw.textlength(line, font=font) <= 64 for line in lines)
    sheet = contact_sheet(ws, "w2", cell_size=64)
    left, top = image_left_edge(sheet, (40, 200, 90))
    # Every header line sits above the images: the header grows with the longest label instead of clipping it.
    heading_h = 4 + 3 * 14  # title, drop and checkpoint lines
    assert top >= heading_h + len(lines) * 14
