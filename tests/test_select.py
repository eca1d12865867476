"""Choosing LoRAs: resolve_loras pinned down table-driven, the store wrapper, lora list, and apply_loras."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main
from lorakit.select import (
    LoraPick,
    SelectionError,
    SelectionPolicy,
    WeightsFile,
    list_loras,
    merge_picks,
    pick_release,
    resolve_loras,
    select_loras,
)
from lorakit.workspace import Workspace, open_workspace

T1, T2, T3 = "2026-01-01T00:00:00.000Z", "2026-02-01T00:00:00.000Z", "2026-03-01T00:00:00.000Z"


def release(release_id: str, status: str = "approved", created: str = T1, **extra) -> dict:
    return {"id": release_id, "createdAt": created, "status": status, **extra}


def lora(lora_id: str, scope: str, checkpoint: str, asset_types: list[str], releases: list[dict], **extra) -> dict:
    record = {"id": lora_id, "name": lora_id.replace("_", " ").title(), "createdAt": T1, "updatedAt": T1,
              "scope": scope, "checkpointId": checkpoint, "assetTypes": asset_types, "releases": releases, **extra}
    if scope == "project":
        record.setdefault("projectId", "p1")
    return record


# Baseline and project LoRAs for two checkpoints and three asset types; each one exercises a rule.
LORAS = [
    lora("b_icons", "baseline", "sd15a", ["icon", "tile"], [release("r1"), release("r2", created=T2)],
         activeReleaseId="r1"),
    lora("b_icons_rec", "baseline", "sd15a", ["icon"], [release("r1")], recommended=True),
    lora("b_chars", "baseline", "sd15a", ["character"], [release("r1")], activeReleaseId="r1"),
    lora("b_xl_icons", "baseline", "sdxlb", ["icon"], [release("r1")], activeReleaseId="r1"),
    # active release deprecated: falls back to the newest approved one (never the deprecated one)
    lora("b_deprecated", "baseline", "sd15a", ["icon"],
         [release("r1"), release("r2", "deprecated", created=T2)], activeReleaseId="r2"),
    lora("b_candidate_only", "baseline", "sd15a", ["icon"], [release("r1", "candidate")]),
    lora("p_hero", "project", "sd15a", ["character", "icon"],
         [release("r1"), release("r2", created=T3), release("r3", "candidate", created=T3)], recommended=True),
    lora("p_icons", "project", "sd15a", ["icon"], [release("r1")], activeReleaseId="r1"),
    lora("p_other_project", "project", "sd15a", ["icon"], [release("r1")], activeReleaseId="r1", projectId="p2"),
    lora("p_missing", "project", "sd15a", ["icon"], [release("r1")], activeReleaseId="r1"),
]
# Every release's weights file exists except p_missing's.
WEIGHTS = {(rec["id"], rel["id"]): f"/loras/{rec['id']}/{rel['id']}.safetensors"
           for rec in LORAS for rel in rec["releases"] if rec["id"] != "p_missing"}


def all_there(lo: dict, rel: dict) -> WeightsFile:
    return WeightsFile(f"/w/{lo['id']}/{rel['id']}.safetensors", True)


def project(**policy) -> dict:
    record = {"id": "p1", "name": "P1", "createdAt": T1, "updatedAt": T1}
    if policy:
        record["policies"] = {"loraSelection": policy}
    return record


CASES = [
    # (policy, checkpoint, asset type, picks, expected [(lora, release)])
    pytest.param({}, "sd15a", "icon", None, [("b_icons_rec", "r1"), ("b_deprecated", "r1")],
                 id="defaults:baseline-first,recommended-first,cap2"),
    pytest.param({"maxActiveLoras": 10}, "sd15a", "icon", None,
                 [("b_icons_rec", "r1"), ("b_deprecated", "r1"), ("b_icons", "r1"), ("p_hero", "r2"),
                  ("p_icons", "r1")], id="baseline_then_project,no-cap"),
    pytest.param({"maxActiveLoras": 10, "preferRecommended": False}, "sd15a", "icon", None,
                 [("b_deprecated", "r1"), ("b_icons", "r1"), ("b_icons_rec", "r1"), ("p_hero", "r2"),
                  ("p_icons", "r1")], id="no-recommended-preference:id-order"),
    pytest.param({"maxActiveLoras": 1}, "sd15a", "icon", None, [("b_icons_rec", "r1")], id="cap1"),
    pytest.param({"maxActiveLoras": 0}, "sd15a", "icon", None, [], id="cap0"),
    pytest.param({"mode": "project_then_baseline"}, "sd15a", "icon", None, [("p_hero", "r2"), ("p_icons", "r1")],
                 id="project_then_baseline"),
    pytest.param({"mode": "project_then_baseline", "maxActiveLoras": 3, "preferRecommended": False}, "sd15a", "icon",
                 None, [("p_hero", "r2"), ("p_icons", "r1"), ("b_deprecated", "r1")],
                 id="project_then_baseline:missing-file-slot-refilled"),
    pytest.param({"mode": "baseline_only", "maxActiveLoras": 10}, "sd15a", "icon", None,
                 [("b_icons_rec", "r1"), ("b_deprecated", "r1"), ("b_icons", "r1")], id="baseline_only"),
    pytest.param({"mode": "project_only", "maxActiveLoras": 10}, "sd15a", "icon", None,
                 [("p_hero", "r2"), ("p_icons", "r1")], id="project_only"),
    pytest.param({"releasePolicy": "active_only", "maxActiveLoras": 10}, "sd15a", "icon", None,
                 [("b_icons", "r1"), ("p_icons", "r1")], id="active_only"),
    pytest.param({"mode": "manual"}, "sd15a", "icon", ["p_icons", "b_icons@r2"],
                 [("p_icons", "r1"), ("b_icons", "r2")], id="manual:picks-first-in-order"),
    pytest.param({"mode": "manual"}, "sd15a", "icon", ["p_icons"], [("p_icons", "r1"), ("b_icons_rec", "r1")],
                 id="manual:rest-fills-the-cap"),
    pytest.param({"mode": "manual", "picks": [{"loraId": "p_hero", "releaseId": "r1"}]}, "sd15a", "icon", None,
                 [("p_hero", "r1"), ("b_icons_rec", "r1")], id="manual:picks-from-policy"),
    pytest.param({"mode": "manual"}, "sd15a", "icon", ["b_deprecated@r2", "p_icons"],
                 [("p_icons", "r1"), ("b_icons_rec", "r1")], id="manual:deprecated-pick-never-used"),
    pytest.param({"mode": "manual"}, "sd15a", "icon", ["p_hero@r3"], [("p_hero", "r3"), ("b_icons_rec", "r1")],
                 id="manual:candidate-pick-is-tried"),
    pytest.param({"mode": "manual", "maxActiveLoras": 1}, "sd15a", "icon", ["p_icons", "p_hero"],
                 [("p_icons", "r1")], id="manual:picks-capped"),
    pytest.param({"mode": "manual"}, "sd15a", "icon", ["b_xl_icons", "p_other_project"],
                 [("b_icons_rec", "r1"), ("b_deprecated", "r1")], id="manual:incompatible-picks-ignored"),
    pytest.param({}, "sd15a", "icon", ["b_icons_rec@r1:0.5"], [("b_icons_rec", "r1"), ("b_deprecated", "r1")],
                 id="auto-mode:pick-sets-strength-not-order"),
    pytest.param({"maxActiveLoras": 10}, "sdxlb", "icon", None, [("b_xl_icons", "r1")], id="other-checkpoint"),
    pytest.param({"maxActiveLoras": 10}, "sd15a", "character", None, [("b_chars", "r1"), ("p_hero", "r2")],
                 id="other-asset-type"),
    pytest.param({"maxActiveLoras": 10}, "sd15a", "tile", None, [("b_icons", "r1")], id="third-asset-type"),
    pytest.param({"maxActiveLoras": 10}, "sdxlb", "character", None, [], id="nothing-compatible"),
]


@pytest.mark.parametrize(("policy", "checkpoint", "asset_type", "picks", "expected"), CASES)
def test_resolve_loras(policy: dict, checkpoint: str, asset_type: str, picks, expected) -> None:
    res = resolve_loras(project(**policy), checkpoint, asset_type, LORAS, weights=WEIGHTS, picks=picks)
    assert [(p.lora_id, p.release_id) for p in res] == expected
    for p in res:
        assert p.weights_path == WEIGHTS[(p.lora_id, p.release_id)]
        assert p.reason
    # Every compatible LoRA is either picked or reported with a reason; no release is ever deprecated.
    compatible = {rec["id"] for rec in LORAS if rec["checkpointId"] == checkpoint and asset_type in rec["assetTypes"]
                  and rec.get("projectId", "p1") == "p1"}
    assert {p.lora_id for p in res} | {p.lora_id for p in res.not_picked} == compatible
    assert all(p.reason for p in res.not_picked)
    assert all(p.release_status != "deprecated" for p in res)


def reasons(res) -> dict[str, str]:
    return {p.lora_id: p.reason for p in res.passed_over}


def test_reasons_name_the_rule_that_decided() -> None:
    res = resolve_loras(project(), "sd15a", "icon", LORAS, weights=WEIGHTS)
    why = reasons(res)
    assert "over the cap: maxActiveLoras is 2" in why["b_icons"]
    assert "no active and no approved release" in why["b_candidate_only"]
    assert "weights file is missing: /loras" not in why["p_missing"]  # no path known: mapping gave none
    assert "weights file is missing" in why["p_missing"]
    assert any("p_missing" in w for w in res.warnings)
    assert "a LoRA of project 'p2', not 'p1'" in why["p_other_project"]
    assert "for checkpoint 'sdxlb'" in why["b_xl_icons"]
    assert res[0].reason.startswith("baseline LoRA (baseline_then_project); recommended; newest approved release r1")
    assert "active release r2 is deprecated" in res[1].reason
    assert "slot 2 of 2" in res[1].reason

    only = resolve_loras(project(mode="baseline_only"), "sd15a", "icon", LORAS, weights=WEIGHTS)
    assert reasons(only)["p_hero"] == "mode baseline_only leaves out project LoRAs"
    active = resolve_loras(project(releasePolicy="active_only"), "sd15a", "icon", LORAS, weights=WEIGHTS)
    assert reasons(active)["b_deprecated"] == "active release r2 is deprecated (policy active_only)"
    assert reasons(active)["b_icons_rec"] == "no active release (policy active_only)"
    manual = resolve_loras(project(mode="manual"), "sd15a", "icon", LORAS, weights=WEIGHTS,
                           picks=["b_deprecated@r2", "nope"])
    assert reasons(manual)["b_deprecated"] == "picked release r2 is deprecated"
    assert any("'nope' does not exist" in w for w in manual.warnings)
    assert manual[0].picked_by == "policy"
    assert resolve_loras(project(mode="manual"), "sd15a", "icon", LORAS, weights=WEIGHTS,
                         picks=["p_icons"])[0].reason.startswith("manual pick; active release r1")


def test_strengths_come_from_picks_then_the_record_then_the_default() -> None:
    loras = [lora("a", "baseline", "c", ["t"], [release("r1")], defaultStrength=0.7),
             lora("b", "baseline", "c", ["t"], [release("r1")])]
    res = resolve_loras(None, "c", "t", loras, weights=all_there)
    assert [(p.lora_id, p.strength) for p in res] == [("a", 0.7), ("b", 1.0)]
    res = resolve_loras(None, "c", "t", loras, weights=all_there, picks=[LoraPick("b", strength=0.25)],
                        default_strength=0.9)
    assert [(p.lora_id, p.strength) for p in res] == [("a", 0.7), ("b", 0.25)]
    assert [p.strength for p in res.with_strengths(0)] == [0.0, 0.0]


def test_rejected_releases_are_never_picked_and_project_loras_need_a_project() -> None:
    rejected = release("r2", "candidate", created=T2, evaluation={"reviews": [{"outcome": "rejected"}]})
    loras = [lora("a", "baseline", "c", ["t"], [release("r1"), rejected], activeReleaseId="r2"),
             lora("p", "project", "c", ["t"], [release("r1")])]
    res = resolve_loras(None, "c", "t", loras, weights=all_there, picks=["a@r2"])
    assert [p.lora_id for p in res] == []
    assert reasons(res)["a"] == "picked release r2 was rejected in review"
    assert "no project was given" in reasons(res)["p"]
    res = resolve_loras(None, "c", "t", loras, weights=all_there)
    assert [(p.lora_id, p.release_id) for p in res] == [("a", "r1")]
    assert "active release r2 was rejected in review" in res[0].reason


def test_weights_lookup_forms() -> None:
    loras = [lora("a", "baseline", "c", ["t"], [release("r1", weights={"kind": "absolute", "path": "/w/a.st"})]),
             lora("b", "baseline", "c", ["t"], [release("r1")])]
    # None: trust the records; a release with no weights reference is reported
    res = resolve_loras(None, "c", "t", loras)
    assert [p.weights_path for p in res] == ["/w/a.st"]
    assert "has no weights reference" in reasons(res)["b"]
    # a function: full control, its problem is reported
    res = resolve_loras(None, "c", "t", loras, weights=lambda lo, rel: WeightsFile(f"/x/{lo['id']}", lo["id"] == "b",
                                                                                  "not synced"))
    assert [p.lora_id for p in res] == ["b"]
    assert reasons(res)["a"] == "newest approved release r1 (no active release), but its weights file is missing: " \
                                "/x/a (not synced)"


def test_policy_defaults_and_bad_policies() -> None:
    assert SelectionPolicy.from_project(None) == SelectionPolicy(
        "baseline_then_project", True, 2, "active_or_latest_approved", ())
    assert SelectionPolicy.from_project(project(mode="manual", picks=[{"loraId": "a", "strength": 1}])).picks == (
        LoraPick("a", None, 1.0),)
    with pytest.raises(SelectionError, match="unknown mode 'random'"):
        resolve_loras(project(mode="random"), "c", "t", [])
    with pytest.raises(SelectionError, match="releasePolicy"):
        SelectionPolicy.from_project(project(releasePolicy="newest"))
    with pytest.raises(SelectionError, match="LORA"):
        LoraPick.parse("a b")
    assert merge_picks(["a@r1:0.5"], ["a:0.8", "b@r2"]) == [LoraPick("a", "r1", 0.8), LoraPick("b", "r2")]


def test_pick_release_newest_approved_uses_created_at_then_list_order() -> None:
    rec = lora("a", "baseline", "c", ["t"], [release("r3", created=T2), release("r1", created=T3),
                                              release("r2", created=T3), release("r4", "candidate", created=T3)])
    assert pick_release(rec, "active_or_latest_approved")[0]["id"] == "r2"


# ---- on real records and files ------------------------------------------------------------------------------
@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tmp_data_root: Path) -> Workspace:
    workspace = open_workspace()
    workspace.store.write("project", project(maxActiveLoras=3))
    return workspace


def weights_ref(lora_id: str, release_id: str) -> dict:
    return {"kind": "config_relative", "base": "lorasRoot", "path": f"{lora_id}/{release_id}/{lora_id}.safetensors"}


def store_loras(ws: Workspace, with_files: bool = True) -> None:
    """LORAS with weights references, written to the store; files for all but p_missing (if ``with_files``)."""
    for rec in LORAS:
        rec = json.loads(json.dumps(rec))
        for rel in rec["releases"]:
            rel["weights"] = weights_ref(rec["id"], rel["id"])
            path = ws.config.loras_root / rel["weights"]["path"]
            if with_files and rec["id"] != "p_missing":
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"not really safetensors")
        project_id = rec.get("projectId")
        if project_id and not ws.store.exists("project", project_id):
            ws.store.write("project", {**project(), "id": project_id, "name": project_id})
        ws.store.write("lora", rec, project_id)


def test_select_loras_reads_the_store_and_checks_files(ws: Workspace) -> None:
    store_loras(ws)
    res = select_loras(ws, "p1", "sd15a", "icon")
    assert [(p.lora_id, p.release_id) for p in res] == [("b_icons_rec", "r1"), ("b_deprecated", "r1"),
                                                        ("b_icons", "r1")]
    assert res[0].weights_path == str(ws.config.loras_root / "b_icons_rec/r1/b_icons_rec.safetensors")
    missing = str(ws.config.loras_root / "p_missing/r1/p_missing.safetensors")
    assert reasons(res)["p_missing"] == f"active release r1, but its weights file is missing: {missing}"
    # no project: baseline LoRAs only, default policy
    assert [p.lora_id for p in select_loras(ws, None, "sd15a", "icon")] == ["b_icons_rec", "b_deprecated"]


def test_list_loras_frames_and_cli(ws: Workspace, capsys: pytest.CaptureFixture) -> None:
    store_loras(ws)
    frame = list_loras(ws, "p1", "sd15a", "icon")
    assert frame[frame.picked]["lora_id"].tolist() == ["b_icons_rec", "b_deprecated", "b_icons"]
    assert frame[frame.picked]["order"].tolist() == [1, 2, 3]
    assert set(frame[~frame.picked]["lora_id"]) == {"b_candidate_only", "p_hero", "p_icons", "p_missing"}
    assert "p_other_project" not in set(frame.lora_id)
    assert "p_other_project" in set(list_loras(ws, "p1", "sd15a", "icon", include_all=True).lora_id)

    overview = list_loras(ws, "p1")
    assert set(overview.lora_id) == {r["id"] for r in LORAS if r.get("projectId", "p1") == "p1"}
    hero = overview[overview.lora_id == "p_hero"]
    assert hero.release_id.tolist() == ["r1", "r2", "r3"]
    assert hero.release_status.tolist() == ["approved", "approved", "candidate"]
    assert hero.eval_state.tolist() == ["none"] * 3
    assert set(list_loras(ws).lora_id) == {r["id"] for r in LORAS}  # no project: every LoRA
    assert set(list_loras(ws, "p1", checkpoint="sdxlb").lora_id) == {"b_xl_icons"}

    assert main(["lora", "list", "--project", "p1", "--checkpoint", "sd15a", "--asset-type", "icon", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["lora_id"] for r in rows if r["picked"]] == ["b_icons_rec", "b_deprecated", "b_icons"]
    assert main(["lora", "list", "--project", "p1", "--checkpoint", "sd15a", "--asset-type", "icon",
                 "--pick", "b_icons@r2:0.4"]) == 0
    out = capsys.readouterr().out
    assert "picked release r2" in out and "weights file is missing" in out
    assert main(["lora", "list", "--project", "p1"]) == 0
    assert "b_candidate_only" in capsys.readouterr().out


# ---- applying to the tiny pipeline ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_apply_loras_changes_the_output_and_strength_zero_is_the_base(ws: Workspace) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from lorakit.loras import adapter_name
    from lorakit.models.tiny import build_tiny_pipeline
    from lorakit.select import apply_loras

    donor = build_tiny_pipeline("sd15").unet  # two random LoRAs, as training would leave them
    for seed, (lora_id, scope) in enumerate([("style_base", "baseline"), ("hero", "project")], start=1):
        torch.manual_seed(seed)
        donor.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), adapter_name=lora_id)
        ref = weights_ref(lora_id, "r1")
        folder = ws.config.loras_root / lora_id / "r1"
        layers = get_peft_model_state_dict(donor, adapter_name=lora_id)
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"{lora_id}.safetensors")
        ws.store.write("lora", lora(lora_id, scope, "tiny", ["icon"], [release("r1", weights=ref)],
                                    activeReleaseId="r1"), "p1" if scope == "project" else None)
    res = select_loras(ws, "p1", "tiny", "icon")
    assert [p.lora_id for p in res] == ["style_base", "hero"]

    pipe = build_tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)

    def render():
        return pipe("a shield icon", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np", height=64, width=64).images

    base = render()
    assert apply_loras(pipe, res) == [adapter_name(p.lora_id, p.release_id, p.sha256) for p in res]
    assert [n.split("__")[:2] for n in apply_loras(pipe, res)] == [["style_base", "r1"], ["hero", "r1"]]
    with_loras = render()
    assert abs(with_loras - base).max() > 1e-3
    apply_loras(pipe, res.with_strengths(0.0))
    assert abs(render() - base).max() == 0
    apply_loras(pipe, [])  # an empty stack switches LoRAs off
    assert abs(render() - base).max() == 0
    apply_loras(pipe, res)  # and back on, reusing the loaded adapters
    assert abs(render() - with_loras).max() < 1e-6
