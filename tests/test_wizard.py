"""The beginner wizard, driven like a user would in pytest: set the page widgets, click the buttons, wait for the
background work, on a temporary copy of the demo data; then the records it produced, and its refusals."""

from __future__ import annotations

from pathlib import Path

import ipywidgets as widgets
import pytest
from conftest import copy_demo_data

import lorakit
from lorakit.datasets import build_manifest
from lorakit.train.settings import WIZARD_FIELDS
from lorakit.validate import validate_records
from lorakit.widgets import Wizard
from lorakit.widgets.review import NEW_NOTES
from lorakit.widgets.wizard import STEPS, ReviewPanel, preset_options, suggest_lora_id
from lorakit.workspace import open_workspace

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
PROJECT = "demo"


def demo_copy(root: Path, mp: pytest.MonkeyPatch, models: Path):
    data, config = copy_demo_data(root, models)
    for key, value in {"LORAKIT_DATA_ROOT": str(data), "LORAKIT_CONFIG": str(config), "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "LORAKIT_USER": "tester"}.items():
        mp.setenv(key, value)
    return open_workspace()


@pytest.fixture
def ws(tmp_path, monkeypatch):
    return demo_copy(tmp_path, monkeypatch, tmp_path / "models")


def press_enter(box: widgets.Text) -> None:
    """What the browser sends when Enter is pressed in a text box (its keypress handler's submit message),
    delivered the way the kernel delivers a widget's custom message."""
    box._handle_custom_msg({"event": "submit"}, [])


def type_tag(w: Wizard, text: str) -> None:
    w.required_tags.entry.value = text  # continuous_update: each keystroke reaches Python before Enter
    press_enter(w.required_tags.entry)


def small_wizard(ws) -> Wizard:
    return Wizard(ws, project=PROJECT, eval_seeds=[1], eval_prompts=["ui icon of a shield"], eval_steps=2,
                  poll_seconds=0.1)


def test_six_steps_make_a_trained_evaluated_active_release(ws):
    w = small_wizard(ws)
    assert w.step == 0 and w.checkpoint.value == "tiny-sd15"  # the project's default checkpoint
    # The dropdown is wide enough for its longest label beside its description.
    longest = max(len(label) for label, _ in w.checkpoint.options)
    assert int(w.checkpoint.layout.width.removesuffix("ch")) >= longest + len("Checkpoint") + 2
    assert w.checkpoint.style.description_width == "initial"

    # 1. checkpoint: its weights are not built yet, so Next refuses until the build button has run.
    assert not w.next() and "not on this machine" in w.refusal and w.step == 0
    assert w.build_button.layout.display != "none"
    w.build_button.click()
    assert w.busy and w.next_button.disabled and w.build_button.disabled
    assert w.wait() is None and not w.busy
    assert "weights found" in w.checkpoint_info.value and w.build_button.layout.display == "none"
    w.next_button.click()
    assert w.step == 1

    # 2. dataset: pick an asset type; the live count and thumbnails follow the filters.
    assert list(w.type_boxes) == ["ui_icon", "character", "vfx", "texture"]
    assert w.approved_only.value and w.approved_only.disabled
    w.type_boxes["ui_icon"].value = True
    expected = build_manifest(ws, project=PROJECT, asset_types=["ui_icon"], caption="tags+spec", with_tokens=True,
                              dry_run=True).manifest["items"]
    assert w.state.matching == len(expected) > 0
    assert f">{len(expected)}</b> matching images" in w.match_count.value
    assert w.match_preview.value.count("<img") == min(6, len(expected))
    # The thumbnails wrap on a narrow page (1024 px) instead of cutting off the sixth.
    assert "display:flex;flex-wrap:wrap" in w.match_preview.value
    assert "grid-template-columns" not in w.match_preview.value
    # A tag typed and Enter pressed is added at once, and the count follows; its button removes it.
    type_tag(w, "color:neon")
    neon = [i for i in expected if "color:neon" in (i.get("tags") or [])]
    assert w.required_tags.value == ["color:neon"] and w.required_tags.entry.value == ""
    assert w.state.matching == len(neon) < len(expected)
    assert f">{len(neon)}</b> matching images" in w.match_count.value
    (chip,) = w.required_tags.chips.children
    assert chip.description == "color:neon"
    chip.click()
    assert w.required_tags.value == [] and w.state.matching == len(expected)
    w.next_button.click()
    assert w.step == 2

    # 3. captions: the preview shows the real captions of the strategy chosen.
    w.caption.value = "tags+spec+title"
    w.with_tokens.value = False
    first = build_manifest(ws, project=PROJECT, asset_types=["ui_icon"], caption="tags+spec+title",
                           dry_run=True).manifest["items"][0]["caption"]
    assert first in w.caption_preview.value.replace("&#x27;", "'")
    w.next_button.click()
    assert w.step == 3

    # 4. preset: only the tiny preset and the sd15 ones for a tiny sd15 checkpoint; advanced shows the numbers.
    assert [n for _, n in w.preset.options] == ["tiny-demo", "sd15-character", "sd15-style"]
    assert "Seconds on a CPU" in w.preset_info.value
    assert w.advanced_box.layout.display == "none"
    w.advanced.value = True
    assert w.advanced_box.layout.display != "none" and w.advanced_fields["rank"].value == 4
    w.advanced_fields["steps"].value = 3
    assert w.state.overrides == {"steps": 3} and w.state.config["steps"] == 3
    w.next_button.click()
    assert w.step == 4

    # 5. train: Next refuses before a release exists; Train runs in the background with the buttons disabled.
    assert not w.next() and "train first" in w.refusal
    assert w.lora_id.value == suggest_lora_id(PROJECT, ["ui_icon"], "tiny-sd15")
    w.lora_id.value = "wiz_icons"
    w.notes.value = "made by the wizard test"
    w.train_button.click()
    assert w.busy and w.next_button.disabled and w.back_button.disabled and w.train_button.disabled
    assert w.checkpoint.disabled and w.type_boxes["ui_icon"].disabled
    assert not w.go_to(0) and "wait" in w.refusal
    assert w.wait() is None, w.message.value
    assert w.train_progress.value == w.train_progress.max == 3
    assert "3 steps" in w.train_status.value and w.loss_image.value
    # The loss chart's title names the LoRA and a readable release, not the raw id; the constant learning rate of
    # tiny-demo gets a label instead of an axis of meaningless ticks.
    title = w.loss_figure._suptitle.get_text()
    assert title.startswith("LoRA demo ui_icon (wiz_icons) - release 1 of 1 (…") and "candidate" in title
    assert w.state.release_id not in title
    assert len(w.loss_figure.axes) == 1 and "(constant)" in w.loss_figure.axes[0].get_legend_handles_labels()[1][-1]
    # The page says what happened, not what would happen.
    assert "a new LoRA record is created" not in w.train_summary.value
    assert "The result is a new" not in w.train_summary.value
    assert f"release {w.state.release_id} of LoRA wiz_icons trained: candidate" in w.train_summary.value
    assert w.train_button.disabled and w.checkpoint.disabled  # locked: the release was trained on these choices
    lora = lorakit.get_lora(ws, "wiz_icons", project=PROJECT)
    (release,) = lora["releases"]
    assert release["id"] == w.state.release_id and release["status"] == "candidate"
    assert release["notes"] == "made by the wizard test" and release["training"]["steps"] == 3
    assert release["training"]["preset"] == "tiny-demo"
    manifest = lorakit.load_manifest(ws, w.state.dataset_id, PROJECT)
    assert manifest["selection"]["caption"] == "tags+spec+title" and manifest["selection"]["assetTypes"] == ["ui_icon"]
    assert lora["checkpointId"] == "tiny-sd15" and lora["assetTypes"] == ["ui_icon"]
    w.next_button.click()

    # 6. evaluate: the grid starts by itself; approve makes the release active and (gate allowing) recommended.
    assert w.step == 5 and w.busy
    assert w.wait() is None, w.message.value
    assert w.grid_image.value and w.grid_progress.value == 2  # base and LoRA, one prompt, one seed
    record = ws.store.read("eval", w.state.eval_id, PROJECT)
    assert record["status"] == "complete" and record["releaseId"] == w.state.release_id
    assert isinstance(w.review, ReviewPanel) and w.review.approve_button.description == "Approve and make active"
    # The grid is fitted to the page; "Full size" shows its own pixels in a scrollable box, and back.
    sheet = lorakit.contact_sheet(ws, w.state.eval_id, PROJECT)
    assert w.grid_size_button.description == "Full size" and w.grid_size_button.layout.display != "none"
    assert w.grid_image.layout.max_width == "100%" and w.grid_image.layout.height == "auto"
    w.grid_size_button.click()
    assert w.grid_size_button.description == "Fit to page"
    assert (w.grid_image.layout.width, w.grid_image.layout.height) == (f"{sheet.width}px", f"{sheet.height}px")
    assert w.grid_image.layout.max_width == "none" and w.grid_box.layout.overflow == "auto"
    w.grid_size_button.click()
    assert w.grid_size_button.description == "Full size" and w.grid_image.layout.max_width == "100%"
    # The validation drop stays beside the grid: the review panel under it starts with it.
    page = w.pages[5].children
    assert page.index(w.grid_box) + 1 == page.index(w.review_box) and w.review.children[0] is w.review.validation
    assert w.review.validation.value.startswith("<b>Validation:</b> ")
    w.review.notes.value = "crisp enough"
    w.review.approve_button.click()
    lora = lorakit.get_lora(ws, "wiz_icons", project=PROJECT)
    assert lora["activeReleaseId"] == w.state.release_id and lora["recommended"] is True
    assert lora["releases"][0]["status"] == "approved"
    assert lora["releases"][0]["evaluation"]["reviews"][-1]["notes"] == "crisp enough"
    assert w.state.review == "approved" and all(w.done)
    assert "recommended" in w.review.result.value
    assert w.review.approve_button.disabled and w.review.reject_button.disabled
    assert w.review.change_button.layout.display != "none"
    # The closing box: what was made, and what to do next.
    release_id = w.state.release_id
    assert "lorakit-ok" in w.closing.value and "approved and active, LoRA recommended" in w.closing.value
    for command in ("lorakit lora list --project demo", f"lorakit report --lora wiz_icons --release {release_id} "
                    "--project demo", 'LoraPicker(project="demo")', "lorakit.resolve_loras"):
        assert command in w.closing.value
    assert w.go_to(4)
    assert f"release {release_id} of LoRA wiz_icons trained: approved and active" in w.train_summary.value
    assert "Click Next" not in w.train_summary.value
    assert not validate_records(ws)


def test_refusals_no_matching_images_and_skipped_steps(ws):
    lorakit.make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    w = small_wizard(ws)
    # A later page cannot be reached before the earlier ones are done: by the step buttons or by code.
    w.crumbs.value = 3
    assert w.step == 0 and w.crumbs.value == 0 and "finish step 1 (Checkpoint) first" in w.refusal
    assert "steps cannot be skipped" in w.message.value
    assert not w.go_to(4) and w.step == 0
    assert not w.start_training() and "finish step 1" in w.refusal
    assert w.next() and w.step == 1
    # No asset type, then filters no approved image matches: Next refuses and says why, in plain words.
    assert not w.next() and "at least one asset type" in w.refusal
    assert "<b>Stop:</b> pick at least one asset type" in w.message.value and "✋" not in w.message.value
    w.type_boxes["ui_icon"].value = True
    # The refusal was about the asset types: ticking one takes it away at once.
    assert w.refusal is None and w.message.value == ""
    w.required_tags.value = ["character:astroduck"]
    assert w.state.matching == 0 and ">0</b> matching images" in w.match_count.value
    assert "filtered by tag" in w.match_count.value
    assert not w.next() and "no approved image matches" in w.refusal and w.step == 1
    w.required_tags.value = []
    assert w.message.value == ""
    # A tag no asset has is refused as it is typed (it could only match nothing); typing again clears that.
    type_tag(w, "no-such-tag")
    assert "no asset of this project has the tag 'no-such-tag'" in w.refusal and w.required_tags.value == []
    w.required_tags.entry.value = "color:neo"
    assert w.refusal is None
    assert w.next() and w.step == 2
    # Going back and changing a choice makes the later pages be confirmed again.
    assert w.back() and w.step == 1
    w.type_boxes["vfx"].value = True
    w.crumbs.value = 2
    assert w.step == 1 and "finish step 2 (Dataset) first" in w.refusal
    # A bad number in the advanced settings.
    assert w.next() and w.next() and w.step == 3
    w.advanced.value = True
    w.advanced_fields["rank"].value = 0
    assert "rank must be a positive integer" in w.config_error.value
    assert not w.next() and "not valid" in w.refusal
    w.advanced_fields["rank"].value = 4
    assert w.next() and w.step == 4
    # A LoRA id that belongs to another checkpoint.
    lorakit.make_tiny_checkpoint(ws, "tiny-other", "sd15", asset_types=["ui_icon"])
    lorakit.create_lora(ws, "taken", name="Taken", scope="project", project=PROJECT, checkpoint="tiny-other",
                        asset_types=["ui_icon"])
    w.lora_id.value = "taken"
    assert "choose another id" in w.train_summary.value
    assert not w.start_training() and "is for checkpoint tiny-other" in w.refusal
    assert not w.busy and lorakit.get_lora(ws, "taken", project=PROJECT)["releases"] == []


def test_the_advanced_page_shows_the_declared_settings(ws):
    w = small_wizard(ws)
    assert list(w.advanced_fields) == [s.name for s in WIZARD_FIELDS]
    for setting in WIZARD_FIELDS:
        field = w.advanced_fields[setting.name]
        assert isinstance(field, widgets.FloatText if setting.kind == "float" else widgets.IntText)
        assert field.description == setting.wizard and field.tooltip.startswith(setting.help)
    assert w.advanced_fields["resolution"].value == 64 and w.advanced_fields["lr"].value == 0.001
    w.advanced_fields["resolution"].value = 0  # an optional setting: 0 is "not set", the family's size
    assert w.state.overrides == {"resolution": None} and w.state.config["resolution"] == 512
    assert "your changes: resolution None" in w.config_error.value


def test_training_progress_follows_the_step_reports(ws):
    lorakit.make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    w = small_wizard(ws)
    w.next()
    w.type_boxes["ui_icon"].value = True
    assert w.next() and w.next()
    w.advanced_fields["steps"].value = 2
    assert w.next() and w.step == 4
    shown = []  # the status line, as each optimizer step reports itself
    w.train_status.observe(lambda change: shown.append(change["new"]), "value")
    w.train_button.click()
    assert w.wait() is None, w.message.value
    assert [t.split(",")[0] for t in shown if t.startswith("step ")] == ["step 1 of 2", "step 2 of 2"]
    assert w.train_progress.value == w.train_progress.max == 2


def test_an_error_in_background_work_is_shown_on_the_page(ws):
    lorakit.make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    w = small_wizard(ws)
    w.next()
    w.type_boxes["texture"].value = True
    assert w.next() and w.next() and w.next() and w.step == 4
    # The images go away between the preview and the run: the dataset build inside the thread fails.
    for path in (ws.data_root / "files" / "demo" / "texture").glob("*.png"):
        path.unlink()
    w.train_button.click()
    error = w.wait()
    assert isinstance(error, lorakit.DatasetError)
    assert "training failed" in w.message.value and "DatasetError" in w.message.value
    assert not w.busy and not w.train_button.disabled and not w.next_button.disabled  # can fix and retry
    assert w.state.release_id is None and not w.checkpoint.disabled


def test_review_panel_buttons_call_the_gate(ws):
    """The panel 03_eval_grid shows: reject with notes, and the gate's refusals shown instead of raised."""
    lorakit.make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    lorakit.create_lora(ws, "panel", name="Panel", scope="project", project=PROJECT, checkpoint="tiny-sd15",
                        asset_types=["ui_icon"])
    release = lorakit.loras.make_release("r1", weights={"kind": "absolute", "path": "/nonexistent.safetensors"},
                                         sha256="0" * 64, training={})
    lorakit.add_release(ws, "panel", release, project=PROJECT)
    panel = ReviewPanel(ws, "panel", "r1", project=PROJECT)
    assert [b.description for b in panel.children[3].children] == ["Approve", "Reject", "Change decision", "Activate",
                                                                   "Recommend"]
    assert panel.change_button.layout.display == "none"  # nothing decided yet
    assert panel.children[0] is panel.validation and panel.validation.value == "<b>Validation:</b> no validation"
    panel.approve_button.click()  # no complete eval: the gate refuses, the panel says so
    assert "cannot review" in panel.result.value and "lorakit-error" in panel.result.value
    panel.recommend_button.click()
    assert "no active release" in panel.result.value
    panel.notes.value = "not reviewable"
    panel.activate_button.click()
    assert "candidate" in panel.result.value
    assert lorakit.get_lora(ws, "panel", project=PROJECT)["releases"][0]["status"] == "candidate"
    assert "not reviewed yet" in panel.history.value and "review <b>unreviewed</b>" in panel.status.value


def reviewable_release(ws, lora_id: str = "panel", release_id: str = "r1") -> None:
    """A LoRA with one candidate release and a complete eval of it, as the worker leaves it."""
    lorakit.make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    lorakit.create_lora(ws, lora_id, name="Panel", scope="project", project=PROJECT, checkpoint="tiny-sd15",
                        asset_types=["ui_icon"])
    release = lorakit.loras.make_release(release_id, weights={"kind": "absolute", "path": "/nonexistent.safetensors"},
                                         sha256="0" * 64, training={})
    lorakit.add_release(ws, lora_id, release, project=PROJECT)
    ws.store.write("eval", {"id": "e1", "loraId": lora_id, "releaseId": release_id, "createdAt": "2026-01-01T00:00:00.000Z",
                            "status": "complete", "prompts": ["icon"],
                            "outputs": [{"prompt": "icon", "images": ["files/evals/e1/0.png"]}]}, PROJECT)


def reviews(ws) -> list[dict]:
    return lorakit.get_lora(ws, "panel", project=PROJECT)["releases"][0]["evaluation"].get("reviews") or []


def test_one_decision_at_a_time_and_a_changed_one_needs_new_notes(ws):
    reviewable_release(ws)
    panel = ReviewPanel(ws, "panel", "r1", project=PROJECT, eval_ids=["e1"], beginner=True)
    assert not panel.approve_button.disabled and panel.change_button.layout.display == "none"
    panel.notes.value = "crisp"
    panel.approve_button.click()
    lora = lorakit.get_lora(ws, "panel", project=PROJECT)
    assert lora["activeReleaseId"] == "r1" and lora["recommended"] is True and len(reviews(ws)) == 1
    # Decided: both buttons are off and a second approval (even from code) adds no duplicate review.
    assert panel.approve_button.disabled and panel.reject_button.disabled
    assert panel.change_button.layout.display != "none" and panel.change_button.description == "Change decision"
    panel.approve()
    assert len(reviews(ws)) == 1 and "Change decision" in panel.result.value
    # Change decision: the notes are cleared and the buttons are on again; the new decision needs new notes.
    panel.change_button.click()
    assert panel.notes.value == "" and not panel.approve_button.disabled and not panel.reject_button.disabled
    assert panel.change_button.layout.display == "none"
    panel.reject_button.click()
    assert NEW_NOTES == "write new notes for the new decision" and NEW_NOTES in panel.result.value
    panel.notes.value = " crisp "
    panel.reject_button.click()
    assert NEW_NOTES in panel.result.value and len(reviews(ws)) == 1
    panel.notes.value = "the edges are soft after all"
    # The first click with new notes only says what the new decision will do; nothing is recorded yet.
    panel.reject_button.click()
    assert len(reviews(ws)) == 1 and "lorakit-warn" in panel.result.value
    assert ("Reject release r1, replacing the decision &#x27;approved&#x27;" in panel.result.value
            and "It clears the active release r1 and the recommendation of LoRA panel" in panel.result.value
            and "Click &#x27;Reject&#x27; again to record it" in panel.result.value)
    # Asked about the rejection, so approving instead is asked about in its turn, and so are edited notes.
    panel.approve_button.click()
    assert len(reviews(ws)) == 1 and "Approve release r1" in panel.result.value
    panel.notes.value = "the edges are soft after all, on every icon"
    panel.reject_button.click()
    assert len(reviews(ws)) == 1 and "Click &#x27;Reject&#x27; again" in panel.result.value
    panel.notes.value = "the edges are soft after all"
    panel.reject_button.click()
    panel.reject_button.click()
    (first, second) = reviews(ws)
    assert (first["outcome"], second["outcome"]) == ("approved", "rejected")
    assert second["notes"] == "the edges are soft after all" and second["reviewer"] == first["reviewer"]
    # The rejection took away the active release and the recommendation: a warning that says so.
    lora = lorakit.get_lora(ws, "panel", project=PROJECT)
    assert "activeReleaseId" not in lora and lora["recommended"] is False
    assert "lorakit-warn" in panel.result.value and "lorakit-ok" not in panel.result.value
    assert "<b>Note:</b> this cleared the active release r1 and the recommendation of LoRA panel" in panel.result.value
    assert panel.approve_button.disabled and panel.change_button.layout.display != "none"
    # The history's columns have room between them.
    assert panel.history.value.count("padding:2px 12px 2px 0") == 4 * 3  # header and two reviews, four cells each


def test_a_panel_on_an_already_decided_release_starts_with_change_decision(ws):
    reviewable_release(ws)
    lorakit.gate.review_release(ws, "panel", "r1", approve=True, project=PROJECT, notes="ok", eval_ids=["e1"])
    panel = ReviewPanel(ws, "panel", "r1", project=PROJECT, eval_ids=["e1"])
    assert panel.approve_button.disabled and panel.reject_button.disabled
    assert panel.change_button.layout.display != "none"
    assert not panel.activate_button.disabled  # activating an approved release is not a new decision


def test_review_panel_shows_the_releases_validation_drop_first(ws):
    lorakit.make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    lorakit.create_lora(ws, "panel", name="Panel", scope="project", project=PROJECT, checkpoint="tiny-sd15",
                        asset_types=["ui_icon"])
    validation = {"set": "training", "split": 0.0, "seed": 0, "draws": 4, "every": 2, "images": 10, "baseLoss": 0.2,
                  "finalLoss": 0.15, "drop": 0.25, "bestStep": 4, "bestLoss": 0.15, "stoppedEarly": True,
                  "curve": [{"step": s, "epoch": s // 2, "loss": 0.2 - s / 100} for s in (0, 2, 4, 6)],
                  "secondsPerScore": 0.1}
    odd = {**validation, "images": 0, "baseLoss": 1e300, "finalLoss": 0.0, "drop": 1.0, "curve": []}
    for release_id, block in (("r1", validation), ("r2", odd)):
        release = lorakit.loras.make_release(release_id, weights={"kind": "absolute", "path": "/nonexistent.safetensors"},
                                             sha256="0" * 64, training={"validation": block})
        lorakit.add_release(ws, "panel", release, project=PROJECT)
    panel = ReviewPanel(ws, "panel", "r1", project=PROJECT, beginner=True)
    assert panel.children[0] is panel.validation
    assert panel.validation.value == ("<b>Validation:</b> validation loss 0.2 → 0.15 (−25.0%) on the 10 training "
                                      "images (stopped early at step 6)")
    panel.reject_button.click()  # refused (no complete eval); the drop is still shown after the refresh
    assert "−25.0%" in panel.validation.value
    odd_panel = ReviewPanel(ws, "panel", "r2", project=PROJECT)
    assert odd_panel.validation.value == ("<b>Validation:</b> validation loss 1e+300 → 0 (−100.0%) on the 0 training "
                                          "images (stopped early)")
    missing = ReviewPanel(ws, "panel", "r9", project=PROJECT)
    assert missing.validation.value == "" and "cannot read release r9" in missing.status.value


def test_preset_options_and_ids():
    presets = lorakit.list_presets()
    assert [n for _, n in preset_options(presets, "sdxl", tiny=False)] == ["sdxl-character", "sdxl-style"]
    assert "tiny-demo" not in [n for _, n in preset_options(presets, "sd15", tiny=False)]
    assert suggest_lora_id("p", ["a b", "c"], "x..y") == "p_a_b_c_x_y"
    assert len(STEPS) == 6
