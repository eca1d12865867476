"""The steps the front ends share, called directly on real records in a temporary data root: the library's
``ensure_lora``, ``approve_and_activate`` and ``batch_review`` (notebooks 02 and 03, the review panel, the wizard),
and the wizard's rules in ``lorakit.widgets.steps`` (which pages may be entered, why "Next" refuses, the Advanced
page's changes, the Train page's checks and texts), without a widget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import lorakit
from lorakit.errors import GateRefusal, InvalidIdError, RecordError, WizardRefusal
from lorakit.gate import approve_and_activate, batch_review
from lorakit.loras import add_release, ensure_lora, get_lora, make_release
from lorakit.train import StepReport
from lorakit.train.settings import WIZARD_FIELDS
from lorakit.widgets import steps
from lorakit.widgets.steps import STEPS, WizardState
from lorakit.workspace import Workspace, init_data_root

TS = "2026-01-01T00:00:00.000Z"
PROJECT = "demo"
ALL_DONE = [True] * len(STEPS)


@pytest.fixture
def ws(tmp_data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A project and two sd15 checkpoint records: ``tiny`` (a random-weight demo one) and ``real``, neither with
    weights on disk yet."""
    monkeypatch.setenv("LORAKIT_USER", "tester")
    workspace = init_data_root()
    store = workspace.store
    store.write("project", {"id": PROJECT, "name": "Demo", "createdAt": TS, "updatedAt": TS})
    for checkpoint, name in (("tiny", "Tiny SD1.5 (random weights)"), ("real", "A real SD1.5 model")):
        store.write("checkpoint", {"id": checkpoint, "name": name, "createdAt": TS, "updatedAt": TS, "family": "sd15",
                                   "supportedAssetTypes": ["ui_icon"],
                                   "weights": {"kind": "config_relative", "base": "checkpointsRoot",
                                               "path": checkpoint}})
    return workspace


def place_weights(ws: Workspace, checkpoint: str) -> None:
    (ws.config.checkpoints_root / checkpoint).mkdir(parents=True)


def lora_with_release(ws: Workspace, lora_id: str = "icons", checkpoint: str = "tiny", release_id: str = "r1") -> None:
    ensure_lora(ws, lora_id, name=lora_id, scope="project", project=PROJECT, checkpoint=checkpoint,
                asset_types=["ui_icon"])
    release = make_release(release_id, weights={"kind": "absolute", "path": "/nonexistent.safetensors"},
                           sha256="0" * 64, training={})
    add_release(ws, lora_id, release, project=PROJECT)


def write_eval(ws: Workspace, eval_id: str, lora_id: str, release_id: str, status: str = "complete") -> None:
    outputs = [{"prompt": "icon", "images": [f"files/evals/{eval_id}/0.png"]}] if status == "complete" else []
    ws.store.write("eval", {"id": eval_id, "loraId": lora_id, "releaseId": release_id, "createdAt": TS,
                            "status": status, "prompts": ["icon"], "outputs": outputs}, PROJECT)


# ---- ensure_lora ---------------------------------------------------------------------------------------------------------
def test_ensure_lora_creates_once_then_returns_the_record(ws):
    record, created = ensure_lora(ws, "icons", name="Icons", scope="project", project=PROJECT, checkpoint="tiny",
                                  asset_types=["ui_icon"])
    assert created and record["checkpointId"] == "tiny" and record["releases"] == []
    assert get_lora(ws, "icons", project=PROJECT) == record
    again, created = ensure_lora(ws, "icons", name="Another name", scope="project", project=PROJECT,
                                 checkpoint="tiny", asset_types=["character"])
    assert not created and again == record  # an existing LoRA is used as it is
    assert lorakit.ensure_lora is ensure_lora


def test_ensure_lora_refuses_a_lora_of_another_checkpoint(ws):
    ensure_lora(ws, "icons", name="Icons", scope="project", project=PROJECT, checkpoint="real",
                asset_types=["ui_icon"])
    with pytest.raises(RecordError, match="LoRA icons is for checkpoint real, not tiny: choose another LoRA id"):
        ensure_lora(ws, "icons", name="Icons", scope="project", project=PROJECT, checkpoint="tiny",
                    asset_types=["ui_icon"])
    assert get_lora(ws, "icons", project=PROJECT)["checkpointId"] == "real"


def test_ensure_lora_finds_a_baseline_lora_from_a_project(ws):
    ensure_lora(ws, "shared_icons", name="Shared", scope="baseline", project=None, checkpoint="tiny",
                asset_types=["ui_icon"])
    record, created = ensure_lora(ws, "shared_icons", name="Shared", scope="project", project=PROJECT,
                                  checkpoint="tiny", asset_types=["ui_icon"])
    assert not created and record["scope"] == "baseline"


# ---- approve_and_activate and the batch review ---------------------------------------------------------------------------
def test_approve_and_activate_approves_activates_and_recommends(ws):
    lora_with_release(ws)
    write_eval(ws, "e1", "icons", "r1")
    result = approve_and_activate(ws, "icons", "r1", project=PROJECT, notes="crisp", reviewer="ana", eval_ids=["e1"])
    assert result.recommended and result.not_recommended is None
    assert result.messages == ["release 'r1' of LoRA 'icons' approved by ana",
                               "release 'r1' is now the active release of LoRA 'icons'",
                               "LoRA 'icons' is recommended (active release 'r1')"]
    lora = get_lora(ws, "icons", project=PROJECT)
    assert result.lora == lora and lora["activeReleaseId"] == "r1" and lora["recommended"] is True
    assert lora["releases"][0]["evaluation"]["reviews"][-1]["notes"] == "crisp"
    assert lorakit.approve_and_activate is approve_and_activate


def test_approve_and_activate_without_recommending(ws):
    lora_with_release(ws)
    write_eval(ws, "e1", "icons", "r1")
    result = approve_and_activate(ws, "icons", "r1", project=PROJECT, reviewer="ana", recommend=False)
    assert not result.recommended and result.not_recommended is None and len(result.messages) == 2
    lora = get_lora(ws, "icons", project=PROJECT)
    assert lora["activeReleaseId"] == "r1" and not lora.get("recommended")


def test_approve_and_activate_raises_a_refused_review_and_writes_nothing(ws):
    lora_with_release(ws)
    write_eval(ws, "e1", "icons", "r1", status="running")
    with pytest.raises(GateRefusal, match="cannot review"):
        approve_and_activate(ws, "icons", "r1", project=PROJECT)
    lora = get_lora(ws, "icons", project=PROJECT)
    assert lora["releases"][0]["status"] == "candidate" and "activeReleaseId" not in lora


def test_batch_review_does_what_the_notebook_parameters_ask(ws):
    lora_with_release(ws)
    lora_with_release(ws, "other")
    write_eval(ws, "e1", "icons", "r1")
    write_eval(ws, "e2", "other", "r1")
    with pytest.raises(ValueError, match="review must be None, 'approve' or 'reject'"):
        batch_review(ws, "icons", "r1", review="yes")
    assert batch_review(ws, "icons", "r1") == []
    messages = batch_review(ws, "icons", "r1", review="approve", activate=True, recommend=True, project=PROJECT,
                            reviewer="ana", eval_ids=["e1"])
    assert messages[-1] == "LoRA 'icons' is recommended (active release 'r1')"
    # Asked to recommend a LoRA with no active release: a batch run fails instead of going on quietly.
    with pytest.raises(GateRefusal, match="no active release"):
        batch_review(ws, "other", "r1", review="approve", recommend=True, project=PROJECT, eval_ids=["e2"])
    assert get_lora(ws, "other", project=PROJECT)["releases"][0]["status"] == "approved"
    assert batch_review(ws, "other", "r1", review="reject", project=PROJECT, notes="blurry") == [
        "release 'r1' of LoRA 'other' rejected by tester; it was approved and is now out of use"]


# ---- the wizard: pages ---------------------------------------------------------------------------------------------------
def test_the_rules_load_without_ipywidgets():
    code = "import sys, lorakit.widgets.steps; print('ipywidgets' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_pages_are_entered_in_order():
    done = [True, True, False, False, False, False]
    steps.check_reachable(0, done)
    steps.check_reachable(2, done)
    with pytest.raises(WizardRefusal, match=r"^finish step 3 \(Captions\) first: steps cannot be skipped$"):
        steps.check_reachable(4, done)
    with pytest.raises(WizardRefusal, match="there is no step 7"):
        steps.check_reachable(6, ALL_DONE)
    assert steps.first_unfinished(done, 2) is None and steps.first_unfinished(done, 5) == 2


def test_the_checkpoint_page_needs_weights_on_this_machine(ws):
    with pytest.raises(WizardRefusal, match="choose a checkpoint"):
        steps.check_page(ws, 0, WizardState())
    with pytest.raises(WizardRefusal, match=r"not on this machine \(.*tiny\)\. Click 'Build tiny demo weights'"):
        steps.check_page(ws, 0, WizardState(checkpoint="tiny"))
    with pytest.raises(WizardRefusal, match="Register its weights with `lorakit checkpoint add`"):
        steps.check_page(ws, 0, WizardState(checkpoint="real"))
    place_weights(ws, "tiny")
    steps.check_page(ws, 0, WizardState(checkpoint="tiny"))


def test_the_dataset_captions_preset_and_train_pages_refuse_what_cannot_work(ws):
    with pytest.raises(WizardRefusal, match="pick at least one asset type"):
        steps.check_page(ws, 1, WizardState())
    with pytest.raises(WizardRefusal, match="no approved image matches these filters"):
        steps.check_page(ws, 1, WizardState(asset_types=("ui_icon",), matching=0))
    steps.check_page(ws, 1, WizardState(asset_types=("ui_icon",), matching=3))
    with pytest.raises(WizardRefusal, match="none of the images would get a caption"):
        steps.check_page(ws, 2, WizardState(), [{"caption": ""}, {"caption": None}])
    steps.check_page(ws, 2, WizardState(), [{"caption": ""}, {"caption": "icon, neon"}])
    steps.check_page(ws, 2, WizardState(), [])  # nothing to preview: nothing to judge
    with pytest.raises(WizardRefusal, match="the training settings are not valid"):
        steps.check_page(ws, 3, WizardState(config=None))
    steps.check_page(ws, 3, WizardState(config={"rank": 4}))
    with pytest.raises(WizardRefusal, match="train first"):
        steps.check_page(ws, 4, WizardState())
    steps.check_page(ws, 4, WizardState(release_id="r1"))


def test_dataset_filters_follow_the_choices():
    state = WizardState(checkpoint="tiny", asset_types=("ui_icon", "vfx"), tags=("color:neon",), tag_any=True,
                        caption="tags", with_tokens=False)
    assert steps.dataset_filters(state, PROJECT) == {
        "project": PROJECT, "status": "approved", "asset_types": ["ui_icon", "vfx"], "checkpoints": [],
        "tags": ["color:neon"], "tag_any": True, "caption": "tags", "with_tokens": False}
    state.same_checkpoint_only = True
    assert steps.dataset_filters(state, PROJECT)["checkpoints"] == ["tiny"]


# ---- the wizard: the Advanced page ----------------------------------------------------------------------------------------
def test_advanced_values_show_the_preset_and_zero_for_unset(ws):
    base = steps.preset_config(ws, "tiny", "tiny-demo")
    shown = steps.advanced_values(base)
    assert list(shown) == [s.name for s in WIZARD_FIELDS]
    assert shown["rank"] == 4 and shown["steps"] == 20 and shown["resolution"] == 64
    assert steps.advanced_values({**base, "steps": None})["steps"] == 0
    assert steps.preset_config(ws, "tiny", None) == {}


def test_advanced_overrides_are_the_fields_that_differ_from_the_preset(ws):
    base = steps.preset_config(ws, "tiny", "tiny-demo")
    shown = steps.advanced_values(base)
    assert steps.advanced_overrides(shown, base) == {}
    assert steps.advanced_overrides({**shown, "steps": 3}, base) == {"steps": 3}
    # 0 in an optional setting's field is "not set": steps from epochs, the family's resolution.
    assert steps.advanced_overrides({**shown, "steps": 0, "resolution": 0}, base) == {"steps": None,
                                                                                    "resolution": None}
    assert steps.advanced_overrides({**shown, "rank": 0}, base) == {"rank": 0}  # rank is not optional
    assert steps.advanced_overrides({"rank": 4}, {}) == {"rank": 4}  # no preset: every value is a change
    assert steps.overrides_text({"steps": None, "rank": 8}) == "steps None, rank 8"


def test_the_run_config_takes_the_changes_and_refuses_bad_numbers(ws):
    state = WizardState(checkpoint="tiny", preset="tiny-demo", overrides={"steps": None, "epochs": 2})
    config = steps.run_config(ws, state)
    assert config["steps"] is None and config["epochs"] == 2 and config["rank"] == 4
    assert steps.training_config({}) is None and steps.training_config({"steps": None}) == {"steps": None}
    with pytest.raises(lorakit.TrainingError, match="rank must be a positive integer"):
        steps.run_config(ws, WizardState(checkpoint="tiny", preset="tiny-demo", overrides={"rank": 0}))


# ---- the wizard: the Train page -------------------------------------------------------------------------------------------
def test_training_starts_once_the_earlier_pages_are_done(ws):
    state = WizardState(checkpoint="tiny")
    with pytest.raises(WizardRefusal, match=r"^finish step 2 \(Dataset\) first$"):
        steps.check_training_start(ws, state, [True, False, True, True, False, False], "icons", PROJECT)
    assert steps.check_training_start(ws, state, ALL_DONE, "  icons ", PROJECT) == "icons"
    with pytest.raises(InvalidIdError):
        steps.check_training_start(ws, state, ALL_DONE, "not an id!", PROJECT)
    with pytest.raises(WizardRefusal, match="release r9 is trained; run the cell again"):
        steps.check_training_start(ws, WizardState(checkpoint="tiny", release_id="r9"), ALL_DONE, "icons", PROJECT)


def test_training_refuses_a_lora_of_another_checkpoint(ws):
    lora_with_release(ws, "taken", checkpoint="real")
    with pytest.raises(WizardRefusal, match="^LoRA taken is for checkpoint real, not tiny: choose another LoRA id$"):
        steps.check_training_start(ws, WizardState(checkpoint="tiny"), ALL_DONE, "taken", PROJECT)
    assert steps.check_training_start(ws, WizardState(checkpoint="real"), ALL_DONE, "taken", PROJECT) == "taken"


def test_the_lora_choice_says_what_training_does_with_the_id(ws):
    lora_with_release(ws, "taken", checkpoint="real")
    assert steps.lora_choice(ws, "fresh", PROJECT, "tiny") == ("info", "a new LoRA record is created")
    assert steps.lora_choice(ws, "taken", PROJECT, "real") == (
        "info", "LoRA taken exists: a new release is added to its 1 release(s)")
    assert steps.lora_choice(ws, "taken", PROJECT, "tiny") == (
        "error", "LoRA taken exists for checkpoint real: choose another id")
    kind, sentence = steps.lora_choice(ws, "", PROJECT, "tiny")
    assert kind == "error" and "LoRA id" in sentence


def test_the_training_summary_and_the_suggestions():
    state = WizardState(checkpoint="tiny", asset_types=("ui_icon",), caption="tags+spec", with_tokens=True,
                        preset="tiny-demo", config={"steps": None, "epochs": 2, "rank": 4, "resolution": 64},
                        matching=7)
    summary = steps.training_summary(state)
    assert "<b>7</b> images of ui_icon (captions: tags+spec + tokens)" in summary
    assert "(2 epoch(s) steps, rank 4, 64 px) on <b>tiny</b>" in summary and "<i>candidate</i>" in summary
    state.config = {"steps": 3, "rank": 4, "resolution": 64}
    assert "(3 steps, rank 4, 64 px)" in steps.training_summary(state)
    assert steps.suggest_lora_id(PROJECT, ["ui icon"], "tiny") == "demo_ui_icon_tiny"
    assert steps.suggest_lora_name(PROJECT, ["ui_icon"]) == "demo ui_icon"
    report = StepReport(step=3, total=20, epoch=1, loss=0.5, lr=1e-3, elapsed_s=1.0)
    assert steps.step_text(report) == "step 3 of 20, loss 0.5000"


# ---- the wizard: the Evaluate page ----------------------------------------------------------------------------------------
def test_the_last_page_is_done_when_the_release_is_approved_and_active(ws):
    lora_with_release(ws)
    write_eval(ws, "e1", "icons", "r1")
    assert steps.review_outcome(get_lora(ws, "icons", project=PROJECT), "r1") == ("unreviewed", False)
    lorakit.review_release(ws, "icons", "r1", approve=True, project=PROJECT)
    assert steps.review_outcome(get_lora(ws, "icons", project=PROJECT), "r1") == ("approved", False)
    approve_and_activate(ws, "icons", "r1", project=PROJECT)
    assert steps.review_outcome(get_lora(ws, "icons", project=PROJECT), "r1") == ("approved", True)
    with pytest.raises(lorakit.RecordNotFoundError, match="no release 'r2'"):
        steps.review_outcome(get_lora(ws, "icons", project=PROJECT), "r2")


def test_the_train_page_says_what_happened_once_the_release_exists(ws):
    lora_with_release(ws)
    write_eval(ws, "e1", "icons", "r1")
    lora = get_lora(ws, "icons", project=PROJECT)
    assert steps.trained_text(lora, "r1") == "release r1 of LoRA icons trained: candidate"
    approve_and_activate(ws, "icons", "r1", project=PROJECT)
    lora = get_lora(ws, "icons", project=PROJECT)
    assert steps.trained_text(lora, "r1") == "release r1 of LoRA icons trained: approved and active, LoRA recommended"
    lorakit.review_release(ws, "icons", "r1", approve=False, project=PROJECT, notes="soft edges")
    assert steps.release_standing(get_lora(ws, "icons", project=PROJECT), "r1") == "rejected"


def test_the_closing_box_says_what_was_made_and_what_to_do_next(ws):
    lora_with_release(ws)
    write_eval(ws, "e1", "icons", "r1")
    approve_and_activate(ws, "icons", "r1", project=PROJECT)
    kind, text = steps.closing_text(get_lora(ws, "icons", project=PROJECT), "r1", PROJECT)
    assert kind == "ok" and "LoRA <b>icons</b> (icons), release <b>r1</b>: approved and active, LoRA recommended." in text
    assert "<code>lorakit lora list --project demo</code>" in text
    assert "<code>lorakit report --lora icons --release r1 --project demo</code>" in text
    assert "LoraPicker" in text and "lorakit.select" in text
    lorakit.review_release(ws, "icons", "r1", approve=False, project=PROJECT, notes="soft edges")
    kind, text = steps.closing_text(get_lora(ws, "icons", project=PROJECT), "r1", PROJECT)
    assert kind == "warn" and ": rejected. It is not active" in text and "Change decision" in text


def test_a_typed_tag_is_added_once_as_the_project_spells_it():
    known = ["color:neon", "style:flat"]
    assert steps.add_required_tag((), "color:neon", known) == ("color:neon",)
    assert steps.add_required_tag(("color:neon",), " COLOR:NEON ", known) == ("color:neon",)  # no duplicate
    assert steps.add_required_tag(("color:neon",), "", known) == ("color:neon",)
    assert steps.add_required_tag((), "anything", []) == ("anything",)  # a project without tags: nothing to check
    with pytest.raises(WizardRefusal, match="no asset of this project has the tag 'neon'"):
        steps.add_required_tag((), "neon", known)


def test_the_checkpoint_dropdown_is_as_wide_as_its_longest_label():
    label = "A checkpoint with a rather long name, v2 (sd15-long-name-v2)"
    assert steps.dropdown_width([label]) == f"{len(label) + 16}ch"
    assert steps.dropdown_width(["x"]) == "36ch" and steps.dropdown_width([]) == "36ch"


def test_the_review_panels_rules():
    from lorakit.widgets.review import check_new_notes, cleared_by, decision_controls

    assert decision_controls("unreviewed", changing=False) == (True, False)
    assert decision_controls("approved", changing=False) == (False, True)
    assert decision_controls("rejected", changing=True) == (True, False)
    assert decision_controls("deprecated", changing=True) == (False, False)
    for notes in (None, "", "  ", "crisp", " crisp "):
        with pytest.raises(WizardRefusal, match="^write new notes for the new decision$"):
            check_new_notes(notes, "crisp")
    check_new_notes("soft after all", "crisp")
    check_new_notes("first notes", None)
    assert cleared_by({"id": "x", "activeReleaseId": "r1"}, {"id": "x", "activeReleaseId": "r2"}) == []
    assert cleared_by({"id": "x", "recommended": True, "activeReleaseId": "r1"},
                      {"id": "x", "recommended": False, "activeReleaseId": "r1"}) == ["the recommendation of LoRA x"]
