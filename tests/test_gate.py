"""The release gate on real records: review, activate, deprecate, recommend, and their refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.errors import RecordNotFoundError
from lorakit.gate import (
    GateRefusal,
    activate_release,
    deprecate_release,
    review_release,
    review_state,
    set_recommended,
)
from lorakit.validate import validate_records
from lorakit.workspace import Workspace, open_workspace

TS = "2026-01-01T00:00:00.000Z"


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_data_root: Path) -> Workspace:
    monkeypatch.setenv("LORAKIT_USER", "tester")
    workspace = open_workspace()
    store = workspace.store
    for project in ("p1", "p2"):
        store.write("project", {"id": project, "name": project, "createdAt": TS, "updatedAt": TS})
    store.write("checkpoint", {"id": "sd15a", "name": "SD", "createdAt": TS, "updatedAt": TS,
                               "supportedAssetTypes": ["icon"], "family": "sd15"})
    releases = [{"id": r, "createdAt": TS, "status": "candidate", "evaluation": {"status": "pending"},
                 "weights": {"kind": "config_relative", "base": "lorasRoot", "path": f"hero/{r}/hero.safetensors"}}
                for r in ("r1", "r2", "r3")]
    store.write("lora", {"id": "hero", "name": "Hero", "createdAt": TS, "updatedAt": TS, "scope": "project",
                         "projectId": "p1", "checkpointId": "sd15a", "assetTypes": ["icon"], "releases": releases},
                "p1")
    store.write("lora", {"id": "icons", "name": "Icons", "createdAt": TS, "updatedAt": TS, "scope": "baseline",
                         "checkpointId": "sd15a", "assetTypes": ["icon"],
                         "releases": [{"id": "r1", "createdAt": TS, "status": "candidate"}]})
    # r1: one complete eval (linked) and one pending; r2: only a running eval (not linked yet)
    write_eval(workspace, "e1", "hero", "r1", "complete", "p1")
    write_eval(workspace, "e1b", "hero", "r1", "pending", "p1")
    write_eval(workspace, "e2", "hero", "r2", "running", "p1")
    store.update("lora", "hero", lambda rec: rec["releases"][0]["evaluation"].update(evalIds=["e1", "e1b"]), "p1")
    return workspace


def write_eval(ws: Workspace, eval_id: str, lora_id: str, release_id: str, status: str, project: str | None) -> None:
    outputs = [{"prompt": "icon", "images": [f"files/evals/{eval_id}/0.png"]}] if status == "complete" else []
    ws.store.write("eval", {"id": eval_id, "loraId": lora_id, "releaseId": release_id, "createdAt": TS,
                            "status": status, "prompts": ["icon"], "outputs": outputs}, project)


def hero(ws: Workspace) -> dict:
    return ws.store.read("lora", "hero", "p1")


def rel(record: dict, release_id: str) -> dict:
    return next(r for r in record["releases"] if r["id"] == release_id)


def test_review_needs_a_complete_eval_and_keeps_a_history(ws: Workspace) -> None:
    with pytest.raises(GateRefusal, match=r"no complete eval of release 'r2' \(evals: e2 running\).*--force"):
        review_release(ws, "hero", "r2", approve=True, project="p1")
    with pytest.raises(GateRefusal, match=r"no complete eval of release 'r3' \(evals: none found\)"):
        review_release(ws, "hero", "r3", approve=False, project="p1")
    assert hero(ws)["releases"][1]["status"] == "candidate"  # refusals write nothing

    result = review_release(ws, "hero", "r1", approve=True, project="p1", reviewer="ana", notes="crisp edges")
    assert result.messages == ["release 'r1' of LoRA 'hero' approved by ana"]
    r1 = rel(hero(ws), "r1")
    assert r1["status"] == "approved"
    first = r1["evaluation"]["reviews"][0]
    assert first["outcome"] == "approved" and first["reviewer"] == "ana" and first["notes"] == "crisp edges"
    assert first["evalIds"] == ["e1"]  # the complete evals looked at; the pending one is not
    assert first["at"].endswith("Z") and "forced" not in first
    assert r1["evaluation"]["status"] == "approved"

    # a second review is appended, the first is kept as it was
    result = review_release(ws, "hero", "r1", approve=False, project="p1", reviewer="bo", eval_ids=["e1"],
                            notes="banding in the dark icons")
    r1 = rel(hero(ws), "r1")
    assert [r["outcome"] for r in r1["evaluation"]["reviews"]] == ["approved", "rejected"]
    assert r1["evaluation"]["reviews"][0] == first
    assert r1["status"] == "candidate" and review_state(r1) == "rejected"
    assert r1["evaluation"]["status"] == "rejected"
    assert "it was approved and is now out of use" in result.messages[0]


def test_forced_review_records_the_override_and_why(ws: Workspace) -> None:
    with pytest.raises(GateRefusal, match="--force needs --notes"):
        review_release(ws, "hero", "r2", approve=True, project="p1", force=True)
    result = review_release(ws, "hero", "r2", approve=True, project="p1", force=True,
                            notes="grid reviewed on the render farm; eval record stuck")
    assert result.messages[0].startswith("override recorded: no complete eval of release 'r2' (evals: e2 running)")
    entry = rel(hero(ws), "r2")["evaluation"]["reviews"][-1]
    assert entry["forced"] is True
    assert entry["overrode"] == ["no complete eval of release 'r2' (evals: e2 running)"]
    assert entry["notes"] == "grid reviewed on the render farm; eval record stuck"
    assert entry["reviewer"] == "tester" and entry["evalIds"] == []
    assert rel(hero(ws), "r2")["status"] == "approved"


def test_review_refusals_that_force_does_not_lift(ws: Workspace) -> None:
    with pytest.raises(GateRefusal, match=r"eval 'e2' is of LoRA 'hero' release 'r2', not of LoRA 'hero' release 'r1'"):
        review_release(ws, "hero", "r1", approve=True, project="p1", eval_ids=["e2"], force=True, notes="x")
    with pytest.raises(GateRefusal, match=r"eval 'e1b' of release 'r1' is pending, not complete"):
        review_release(ws, "hero", "r1", approve=True, project="p1", eval_ids=["e1", "e1b"])
    with pytest.raises(RecordNotFoundError, match="eval 'nope' not found"):
        review_release(ws, "hero", "r1", approve=True, project="p1", eval_ids=["nope"])
    with pytest.raises(RecordNotFoundError, match=r"LoRA 'hero' has no release 'r9' \(releases: r1, r2, r3\)"):
        review_release(ws, "hero", "r9", approve=True, project="p1")
    deprecate_release(ws, "hero", "r1", project="p1")
    with pytest.raises(GateRefusal, match="'r1' of LoRA 'hero' is deprecated; it cannot be reviewed"):
        review_release(ws, "hero", "r1", approve=True, project="p1", force=True, notes="please")


def test_activate_only_approved_unless_forced(ws: Workspace) -> None:
    with pytest.raises(GateRefusal, match="cannot activate: release 'r1' is an unreviewed candidate"):
        activate_release(ws, "hero", "r1", project="p1")
    review_release(ws, "hero", "r1", approve=True, project="p1")
    result = activate_release(ws, "hero", "r1", project="p1")
    assert result.messages == ["release 'r1' is now the active release of LoRA 'hero'"]
    assert hero(ws)["activeReleaseId"] == "r1"
    again = activate_release(ws, "hero", "r1", project="p1")
    assert not again.changed and "already the active release" in again.messages[0]

    result = activate_release(ws, "hero", "r3", project="p1", force=True, notes="try on the demo build", actor="bo")
    assert result.messages == ["override recorded: release 'r3' is an unreviewed candidate",
                               "release 'r3' is now the active release of LoRA 'hero' (was 'r1')"]
    override = rel(hero(ws), "r3")["evaluation"]["overrides"][0]
    assert override["action"] == "activate" and override["by"] == "bo"
    assert override["overrode"] == ["release 'r3' is an unreviewed candidate"]
    assert override["notes"] == "try on the demo build"

    deprecate_release(ws, "hero", "r2", project="p1")
    with pytest.raises(GateRefusal, match="'r2' of LoRA 'hero' is deprecated; it cannot be activated"):
        activate_release(ws, "hero", "r2", project="p1", force=True)
    review_release(ws, "hero", "r1", approve=False, project="p1", force=False)
    with pytest.raises(GateRefusal, match="'r1' was rejected in its latest review"):
        activate_release(ws, "hero", "r1", project="p1")


def test_deprecating_or_rejecting_the_active_release_clears_it_and_the_recommendation(ws: Workspace) -> None:
    review_release(ws, "hero", "r1", approve=True, project="p1")
    activate_release(ws, "hero", "r1", project="p1")
    set_recommended(ws, "hero", project="p1")
    assert hero(ws)["recommended"] is True
    result = deprecate_release(ws, "hero", "r1", project="p1", notes="superseded")
    assert result.messages == [
        "release 'r1' of LoRA 'hero' deprecated",
        "release 'r1' was the active release: activeReleaseId 'r1' cleared; LoRA 'hero' has no active release now",
        "LoRA 'hero' is no longer recommended (it has no active release)",
    ]
    record = hero(ws)
    assert "activeReleaseId" not in record and record["recommended"] is False
    assert rel(record, "r1")["status"] == "deprecated"
    assert rel(record, "r1")["deprecation"]["notes"] == "superseded"
    assert not deprecate_release(ws, "hero", "r1", project="p1").changed

    review_release(ws, "hero", "r2", approve=True, project="p1", force=True, notes="ok")
    activate_release(ws, "hero", "r2", project="p1")
    result = review_release(ws, "hero", "r2", approve=False, project="p1", force=True, notes="artifacts")
    assert any("activeReleaseId 'r2' cleared" in m for m in result.messages)
    assert "activeReleaseId" not in hero(ws)


def test_recommend_says_which_condition_fails(ws: Workspace) -> None:
    with pytest.raises(GateRefusal, match="cannot recommend LoRA 'hero': LoRA 'hero' has no active release"):
        set_recommended(ws, "hero", project="p1")
    activate_release(ws, "hero", "r2", project="p1", force=True)
    with pytest.raises(GateRefusal) as refused:
        set_recommended(ws, "hero", project="p1")
    assert "active release 'r2' is not approved (it is unreviewed)" in str(refused.value)
    assert "active release 'r2' has no complete eval (evals: e2 running)" in str(refused.value)
    review_release(ws, "hero", "r2", approve=True, project="p1", force=True, notes="eval stuck")
    with pytest.raises(GateRefusal, match=r"cannot recommend LoRA 'hero': active release 'r2' has no complete eval"):
        set_recommended(ws, "hero", project="p1")
    ws.store.update("eval", "e2", lambda ev: ev.update(status="complete"), "p1")
    assert set_recommended(ws, "hero", project="p1").messages == [
        "LoRA 'hero' is recommended (active release 'r2')"]
    assert not set_recommended(ws, "hero", project="p1").changed
    assert set_recommended(ws, "hero", False, project="p1").messages == ["LoRA 'hero' is no longer recommended"]
    assert hero(ws)["recommended"] is False

    # activating a release without a complete eval keeps the invariant by dropping the recommendation
    set_recommended(ws, "hero", project="p1")
    review_release(ws, "hero", "r3", approve=True, project="p1", force=True, notes="hotfix")
    result = activate_release(ws, "hero", "r3", project="p1")
    assert any(m.startswith("LoRA 'hero' is no longer recommended: active release 'r3' has no complete eval")
               for m in result.messages)


def test_scope_and_project_mismatches_are_refused(ws: Workspace) -> None:
    with pytest.raises(GateRefusal, match="LoRA 'hero' belongs to project p1 \\(pass --project p1\\)"):
        review_release(ws, "hero", "r1", approve=True)
    with pytest.raises(GateRefusal, match="belongs to project p1 \\(it is not shared with project 'p2'\\)"):
        activate_release(ws, "hero", "r1", project="p2")
    with pytest.raises(RecordNotFoundError, match="LoRA 'ghost' not found"):
        deprecate_release(ws, "ghost", "r1", project="p1")
    # a record whose scope contradicts its folder
    path = ws.store.path("lora", "icons")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "scope": "project", "projectId": "p1"}))
    with pytest.raises(GateRefusal, match="'icons' is in the shared folder but has scope 'project'"):
        deprecate_release(ws, "icons", "r1")
    path.write_text(json.dumps(record))
    moved = {**hero(ws), "projectId": "p2"}
    ws.store.write("lora", moved, "p1")
    with pytest.raises(GateRefusal, match="'hero' is in project 'p1' but names projectId 'p2'"):
        deprecate_release(ws, "hero", "r3", project="p1")


def test_baseline_lora_found_from_a_project_and_its_project_evals_count(ws: Workspace) -> None:
    # a baseline LoRA reviewed from a project: the eval can live in the project's evals
    write_eval(ws, "eb", "icons", "r1", "complete", "p2")
    with pytest.raises(GateRefusal, match="no complete eval"):
        review_release(ws, "icons", "r1", approve=True)
    review_release(ws, "icons", "r1", approve=True, project="p2")
    record = ws.store.read("lora", "icons")
    assert record["releases"][0]["evaluation"]["evalIds"] == ["eb"]
    activate_release(ws, "icons", "r1", project="p2")
    set_recommended(ws, "icons", project="p2")
    assert ws.store.read("lora", "icons")["recommended"] is True


def test_every_transition_leaves_valid_records(ws: Workspace) -> None:
    review_release(ws, "hero", "r1", approve=True, project="p1")
    activate_release(ws, "hero", "r1", project="p1")
    activate_release(ws, "hero", "r3", project="p1", force=True)
    deprecate_release(ws, "hero", "r3", project="p1")
    review_release(ws, "hero", "r2", approve=False, project="p1", force=True, notes="n")
    assert validate_records(ws) == []


def test_cli_gate_commands(ws: Workspace, capsys: pytest.CaptureFixture) -> None:
    assert main(["lora", "review", "--lora", "hero", "--release", "r2", "--approve", "--project", "p1"]) == 1
    assert "error: cannot review: no complete eval of release 'r2'" in capsys.readouterr().err
    assert main(["lora", "review", "--lora", "hero", "--release", "r1", "--approve", "--project", "p1",
                 "--reviewer", "ana", "--notes", "good", "--eval", "e1"]) == 0
    assert "approved by ana" in capsys.readouterr().out
    assert main(["lora", "activate", "--lora", "hero", "--release", "r1", "--project", "p1"]) == 0
    assert main(["lora", "recommend", "--lora", "hero", "--project", "p1"]) == 0
    assert "is recommended" in capsys.readouterr().out
    assert main(["lora", "list", "--project", "p1", "--json"]) == 0
    rows = {r["release_id"]: r for r in json.loads(capsys.readouterr().out) if r["lora_id"] == "hero"}
    assert rows["r1"]["active"] is True and rows["r1"]["review"] == "approved by ana"
    assert rows["r1"]["eval_state"] == "complete" and rows["r1"]["eval_ids"] == "e1,e1b"
    assert rows["r2"]["eval_state"] == "running" and rows["r3"]["eval_state"] == "none"
    assert main(["lora", "deprecate", "--lora", "hero", "--release", "r1", "--project", "p1"]) == 0
    out = capsys.readouterr().out
    assert "activeReleaseId 'r1' cleared" in out and "no longer recommended" in out
    assert main(["lora", "recommend", "--lora", "hero", "--project", "p1", "--off"]) == 0
    assert main(["lora", "activate", "--lora", "hero", "--release", "r3", "--project", "p1", "--force",
                 "--notes", "demo"]) == 0
    assert "override recorded" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["lora", "review", "--lora", "hero", "--release", "r1", "--approve", "--reject"])
