"""The beginner wizard: train a LoRA in six pages.

1. checkpoint, 2. asset types and filters (live count and thumbnails), 3. caption strategy (live preview of
real captions), 4. training preset (one-line description; *Advanced* shows the numbers), 5. training (a new
``candidate`` release, in a background thread with a progress bar), 6. the eval grid, rendered by the
worker, then approve (:class:`~lorakit.widgets.review.ReviewPanel`): the release becomes ``activeReleaseId``
(and the LoRA recommended when the gate allows).

The wizard holds state, not logic: each page calls the functions the CLI calls (``build_manifest``,
``ensure_lora``, ``plan_training``, ``run_plan``, ``create_eval_grid``, ``run_worker``, ``approve_and_activate``),
and what guards a beginner lives in :mod:`lorakit.widgets.steps`: a page cannot be skipped, "Next" refuses with
a sentence when the page's choice cannot work (no weights, no matching image, captions all empty, a bad
number). The wizard adds the widgets: buttons are disabled while work runs, and errors are shown on the page.

>>> from lorakit.widgets import Wizard          # doctest: +SKIP
>>> wizard = Wizard(ws, project="demo"); wizard  # doctest: +SKIP
"""

from __future__ import annotations

import html
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import traitlets

from ..datasets import BuildResult, build_manifest
from ..errors import DatasetError, LorakitError, WizardRefusal
from ..evals import contact_sheet, create_eval_grid
from ..families import get as get_family
from ..loras import ensure_lora, get_lora, get_release
from ..models import (
    checkpoint_family,
    checkpoint_objective,
    get_checkpoint,
    list_checkpoints,
    objective_label,
    rebuild_tiny_checkpoint,
)
from ..notebook_helpers import checkpoint_weights, figure_png, gallery_html, image_bytes, is_tiny_checkpoint
from ..select import asset_type_options, load_asset_types
from ..train import StepReport, list_presets, plan_training, plot_loss, run_plan
from ..train.settings import WIZARD_FIELDS
from ..worker import run_worker
from ..workspace import Workspace, as_workspace
from .messages import message_box as _box
from .review import ReviewPanel
from .steps import (
    CAPTIONS,
    STEPS,
    WizardState,
    add_required_tag,
    advanced_overrides,
    advanced_values,
    check_page,
    check_reachable,
    check_training_start,
    closing_text,
    dataset_filters,
    dropdown_width,
    lora_choice,
    overrides_text,
    preset_config,
    preset_options,
    review_outcome,
    run_config,
    step_text,
    suggest_lora_id,
    suggest_lora_name,
    trained_text,
    training_config,
    training_summary,
)


def _AUTO() -> widgets.Layout:  # noqa: N802 - reads like the constant it stands for
    return widgets.Layout(width="auto")


def _hidden(widget: widgets.Widget, hidden: bool) -> None:
    widget.layout.display = "none" if hidden else None


class RequiredTags(widgets.VBox):
    """The Required tags box: type a tag and press Enter to add it (at once, not when the box loses focus);
    each chosen tag is a button that removes it. ``value`` is the list of tags, observed like any widget's."""

    value = traitlets.List(traitlets.Unicode())
    disabled = traitlets.Bool(False)

    def __init__(self, known: Sequence[str]):
        super().__init__()
        self.known = list(known)
        # continuous_update: the typed text is in Python before the Enter key's submit message arrives.
        self.entry = widgets.Combobox(placeholder="required tag", options=self.known, ensure_option=False,
                                      continuous_update=True, layout=widgets.Layout(width="20em"))
        # The browser sends {"event": "submit"} on the Enter keypress (Text.on_submit listens for the same message
        # but is deprecated); a 'change' of the value would wait for the box to lose focus.
        self.entry.on_msg(lambda _w, content, _buffers: self.add(self.entry.value)
                          if isinstance(content, dict) and content.get("event") == "submit" else None)
        self.chips = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self._refused: Callable[[str], None] | None = None
        self.children = [self.entry, self.chips]
        # Classes a browser test (or a stylesheet) finds the parts by.
        self.add_class("lorakit-required-tags")
        self.entry.add_class("lorakit-tag-entry")
        self.observe(lambda _c: self._show_chips(), "value")
        self.observe(lambda _c: self._show_chips(), "disabled")

    def on_refusal(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(sentence)`` when a typed tag is refused."""
        self._refused = callback

    def add(self, typed: str) -> bool:
        """Add the typed tag (what Enter does); a tag the project does not have is refused with a sentence."""
        try:
            tags = add_required_tag(self.value, typed, self.known)
        except WizardRefusal as exc:
            if self._refused:
                self._refused(str(exc))
            return False
        self.entry.value = ""
        self.value = list(tags)
        return True

    def _show_chips(self) -> None:
        self.entry.disabled = self.disabled
        chips = []
        for tag in self.value:
            chip = widgets.Button(description=tag, icon="times", tooltip=f"remove {tag}", disabled=self.disabled,
                                  layout=widgets.Layout(width="auto"))
            chip.add_class("lorakit-tag")
            chip.on_click(lambda _b, tag=tag: setattr(self, "value", [t for t in self.value if t != tag]))
            chips.append(chip)
        self.chips.children = chips


class Wizard(widgets.VBox):
    """The six-page beginner wizard (see the module docstring). ``state`` holds the choices and created ids.

    Drive it by clicking, or from code (tests): set the page widgets' values, then ``next_button.click()``;
    ``wait()`` returns when background work (building weights, training, rendering) has finished.
    """

    def __init__(self, ws: Workspace | str | Path | None = None, project: str = "demo", *,
                 eval_seeds: Sequence[int] = (1, 2), eval_strengths: Sequence[float] = (1.0,),
                 eval_prompts: Sequence[str] | None = None, eval_steps: int | None = None,
                 preview_images: int = 6, poll_seconds: float = 0.5):
        super().__init__()
        self.ws = as_workspace(ws)
        self.project = project
        self.state = WizardState()
        self.eval_seeds, self.eval_strengths = list(eval_seeds), list(eval_strengths)
        self.eval_prompts, self.eval_steps = eval_prompts, eval_steps
        self.preview_images = preview_images
        self.poll_seconds = poll_seconds
        self.step = 0
        self.done = [False] * len(STEPS)
        self.busy = False
        self.error: BaseException | None = None
        self.refusal: str | None = None
        self._thread: threading.Thread | None = None
        self._quiet = False
        self._preview: BuildResult | None = None  # the latest dry-run build
        self._grid: dict = {}  # the eval being rendered: its id and scope, and how many images it has
        self.review: ReviewPanel | None = None

        self.title = widgets.HTML()
        self.crumbs = widgets.ToggleButtons(options=[(f"{i + 1}. {t}", i) for i, t in enumerate(STEPS)], value=0,
                                            style={"button_width": "auto"})
        self.crumbs.observe(self._on_crumb, "value")
        self.body = widgets.Box(layout=widgets.Layout(min_height="18em", flex_flow="column"))
        self.message = widgets.HTML()
        self.back_button = widgets.Button(description="Back", icon="arrow-left")
        self.next_button = widgets.Button(description="Next", icon="arrow-right", button_style="primary")
        self.back_button.on_click(lambda _b: self.back())
        self.next_button.on_click(lambda _b: self.next())
        self.pages = [self._checkpoint_page(), self._dataset_page(), self._captions_page(), self._preset_page(),
                      self._train_page(), self._evaluate_page()]
        self.children = [self.title, self.crumbs, self.body, self.message,
                         widgets.HBox([self.back_button, self.next_button])]
        self.add_class("lorakit-wizard")
        self._on_checkpoint()
        self._show(0)

    # ---- navigation ------------------------------------------------------------------------------------------
    def next(self) -> bool:
        """Check the current page and go to the next one; a refusal is shown (and returned as False)."""
        try:
            self._refuse_if_busy()
            self._check(self.step)
        except WizardRefusal as exc:
            self._refuse(str(exc))
            return False
        self.done[self.step] = True
        if self.step + 1 < len(STEPS):
            self._show(self.step + 1)
        return True

    def back(self) -> bool:
        return self.go_to(self.step - 1) if self.step > 0 else False

    def go_to(self, step: int) -> bool:
        """Show page ``step`` (0-based): any earlier page, or a later one whose earlier pages are all done."""
        try:
            self._refuse_if_busy()
            check_reachable(step, self.done)
        except WizardRefusal as exc:
            self._refuse(str(exc))
            return False
        self._show(step)
        return True

    def wait(self, timeout: float | None = None) -> BaseException | None:
        """Wait for background work to end; returns its error (None when it went well)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.error

    def _show(self, step: int) -> None:
        self.step = step
        self.title.value = f"<h3>Step {step + 1} of {len(STEPS)}: {STEPS[step]}</h3>"
        self.body.children = [self.pages[step]]
        self._quiet = True
        try:
            self.crumbs.value = step
        finally:
            self._quiet = False
        self.message.value = ""
        self.refusal = None
        if step == 1:
            self._refresh_matches()
        elif step == 2:
            self._refresh_matches()
        elif step == 3:
            self._refresh_config()
        elif step == 4:
            self._describe_training()
        elif step == 5 and self.state.eval_id is None and self.state.release_id and not self.busy:
            self.start_eval_grid()
        self._sync_buttons()

    def _on_crumb(self, change) -> None:
        if self._quiet or change["new"] == self.step:
            return
        if not self.go_to(change["new"]):
            self._quiet = True
            try:
                self.crumbs.value = self.step
            finally:
                self._quiet = False

    def _refuse_if_busy(self) -> None:
        if self.busy:
            raise WizardRefusal("wait until the running work has finished")

    def _refuse(self, text: str) -> None:
        self.refusal = text
        # A plain word, not an emoji: without an emoji font a hand shows as an empty box.
        self.message.value = _box("<b>Stop:</b> " + html.escape(text), "warn")

    def _input_changed(self) -> None:
        """A choice changed: a refusal about the old choice is no longer true, so it goes."""
        if self.refusal is not None:
            self.refusal = None
            self.message.value = ""

    def _invalidate(self, step: int) -> None:
        """A choice on page ``step`` changed: it and every later page must be confirmed again."""
        for j in range(step, len(STEPS)):
            self.done[j] = False

    def _sync_buttons(self) -> None:
        trained = self.state.release_id is not None
        self.back_button.disabled = self.busy or self.step == 0
        self.next_button.disabled = self.busy or self.step == len(STEPS) - 1
        self.crumbs.disabled = self.busy
        self.train_button.disabled = self.busy or trained
        self.build_button.disabled = self.busy
        self.grid_button.disabled = self.busy or not trained
        locked = self.busy or trained  # what a release was trained on cannot change under it
        for w in [self.checkpoint, self.required_tags, self.tag_any, self.same_checkpoint, self.caption,
                  self.with_tokens, self.preset, self.advanced, self.lora_id, self.lora_name, self.notes,
                  *self.type_boxes.values(), *self.advanced_fields.values()]:
            w.disabled = locked

    # ---- checks: why "Next" refuses --------------------------------------------------------------------------
    def _check(self, step: int) -> None:
        if step in (1, 2):
            self._refresh_matches()
        elif step == 3:
            self._refresh_config()
        items: list[dict] = self._preview.manifest["items"] if self._preview else []
        check_page(self.ws, step, self.state, items)

    # ---- page 1: checkpoint ------------------------------------------------------------------------------------
    def _checkpoint_page(self) -> widgets.Widget:
        records = list_checkpoints(self.ws)
        options = [(f"{r.get('name') or r['id']} ({r['id']})", r["id"]) for r in records]
        default = None
        try:
            default = ((self.ws.store.read("project", self.project).get("defaults") or {}).get("checkpointId"))
        except LorakitError:
            pass
        ids = [i for _, i in options]
        # Wide enough for the longest label: a cut-off name hides which model the LoRA is for.
        self.checkpoint = widgets.Dropdown(options=options, value=default if default in ids else (ids or [None])[0],
                                           description="Checkpoint", style={"description_width": "initial"},
                                           layout=widgets.Layout(width=dropdown_width([label for label, _ in options]),
                                                                 max_width="100%"))
        self.checkpoint_info = widgets.HTML()
        self.build_button = widgets.Button(description="Build tiny demo weights", icon="wrench",
                                           layout=widgets.Layout(width="auto"))
        self.build_button.on_click(lambda _b: self.build_tiny_weights())
        self.checkpoint.observe(lambda _c: self._on_checkpoint(), "value")
        intro = widgets.HTML("<p>The base model your LoRA is for. A LoRA only works with the checkpoint it was "
                             "trained on.</p>")
        return widgets.VBox([intro, self.checkpoint, self.checkpoint_info, self.build_button])

    def _on_checkpoint(self) -> None:
        s = self.state
        s.checkpoint = self.checkpoint.value
        self._invalidate(0)
        self._input_changed()
        if not s.checkpoint:
            self.checkpoint_info.value = _box("No checkpoint is registered (see `lorakit checkpoint add`).", "error")
            _hidden(self.build_button, True)
            return
        record = get_checkpoint(self.ws, s.checkpoint)
        path, present = checkpoint_weights(self.ws, record)
        family = get_family(checkpoint_family(record)).label
        objective = objective_label(checkpoint_objective(self.ws, record))
        types = ", ".join(record.get("supportedAssetTypes") or []) or "any"
        weights = (f"weights found at <code>{html.escape(str(path))}</code>" if present
                   else f"<b>weights missing</b> (looked at <code>{html.escape(str(path))}</code>)")
        self.checkpoint_info.value = _box(f"family <b>{family}</b> ({objective}); asset types: {html.escape(types)}; "
                                          f"{weights}",
                                          "info" if present else "warn")
        _hidden(self.build_button, present or not is_tiny_checkpoint(record))
        self._offer_asset_types()
        self._offer_presets()

    def build_tiny_weights(self) -> None:
        """Build the tiny random-weight demo checkpoint (seconds), in the background."""
        record = get_checkpoint(self.ws, self.state.checkpoint)
        self._run("building the tiny weights",
                  lambda: rebuild_tiny_checkpoint(self.ws, record["id"]),
                  done=lambda _r: self._on_checkpoint())

    # ---- page 2: dataset ---------------------------------------------------------------------------------------
    def _dataset_page(self) -> widgets.Widget:
        self.type_boxes: dict[str, widgets.Checkbox] = {}
        self.types_box = widgets.VBox()
        self.approved_only = widgets.Checkbox(value=True, disabled=True, indent=False, layout=_AUTO(),
                                              description="Approved assets only (always, for training)")
        try:
            from ..assets import tag_frequencies

            known = list(tag_frequencies(self.ws, self.project)["tag"])
        except LorakitError:
            known = []
        self.required_tags = RequiredTags(known)
        self.required_tags.on_refusal(self._refuse)
        self.required_tags.entry.observe(lambda _c: self._input_changed(), "value")
        self.tag_any = widgets.Checkbox(value=False, indent=False, layout=_AUTO(),
                                        description="Any one of these tags is enough")
        self.same_checkpoint = widgets.Checkbox(value=False, indent=False, layout=_AUTO(),
                                                description="Only assets made for this checkpoint")
        self.match_count = widgets.HTML()
        self.match_preview = widgets.HTML()
        for w in (self.required_tags, self.tag_any, self.same_checkpoint):
            w.observe(lambda _c: self._on_filters(), "value")
        return widgets.VBox([
            widgets.HTML("<b>Asset types</b> the LoRA is for"), self.types_box, self.approved_only,
            widgets.HTML("<b>Required tags</b> (type a tag from the project's tags and press Enter)"),
            self.required_tags,
            self.tag_any, self.same_checkpoint, self.match_count, self.match_preview,
        ])

    def _offer_asset_types(self) -> None:
        record = get_checkpoint(self.ws, self.state.checkpoint)
        options = asset_type_options(record, load_asset_types(self.ws, self.project))
        keep = {t for t, box in self.type_boxes.items() if box.value}
        self.type_boxes = {}
        for label, type_id in options:
            box = widgets.Checkbox(value=type_id in keep, description=f"{label} ({type_id})", indent=False,
                                   layout=_AUTO())
            box.observe(lambda _c: self._on_filters(), "value")
            self.type_boxes[type_id] = box
        self.types_box.children = list(self.type_boxes.values())
        self._on_filters()

    def _on_filters(self) -> None:
        s = self.state
        s.asset_types = tuple(t for t, box in self.type_boxes.items() if box.value)
        s.tags = tuple(self.required_tags.value)
        s.tag_any = self.tag_any.value
        s.same_checkpoint_only = self.same_checkpoint.value
        self._invalidate(1)
        self._input_changed()
        if self.step in (1, 2):
            self._refresh_matches()

    def _refresh_matches(self) -> None:
        """The live count: a dry-run ``build_manifest`` with the current filters and caption options."""
        s = self.state
        self._preview = None
        s.matching = 0
        if not s.asset_types:
            self.match_count.value = _box("Pick at least one asset type to see the matching images.", "info")
            self.match_preview.value = ""
            self.caption_preview.value = ""
            return
        try:
            result = build_manifest(self.ws, **dataset_filters(s, self.project), dry_run=True)
        except DatasetError as exc:
            self.match_count.value = _box(f"<b>0</b> matching images: {html.escape(str(exc))}", "error")
            self.match_preview.value = ""
            self.caption_preview.value = ""
            return
        except LorakitError as exc:
            self.match_count.value = _box(html.escape(str(exc)), "error")
            return
        self._preview = result
        items = result.manifest["items"]
        s.matching = len(items)
        left = ", ".join(f"{reason} {n}" for reason, n in result.counts.items()) or "none"
        self.match_count.value = _box(f"<b class='lorakit-count'>{len(items)}</b> matching images "
                                      f"(of {result.assets_seen} assets; left out: {html.escape(left)})", "ok")
        shown = items[: self.preview_images]
        self.match_preview.value = gallery_html([(self.ws.store.file_path(i["path"]), i["assetId"]) for i in shown],
                                                size=64, wrap=True)
        self.caption_preview.value = gallery_html(
            [(self.ws.store.file_path(i["path"]), i.get("caption") or "(no caption)") for i in shown],
            size=64, columns=3)

    # ---- page 3: captions --------------------------------------------------------------------------------------
    def _captions_page(self) -> widgets.Widget:
        self.caption = widgets.RadioButtons(options=list(CAPTIONS), value=self.state.caption,
                                            layout=widgets.Layout(width="auto"))
        self.with_tokens = widgets.Checkbox(value=self.state.with_tokens, indent=False, layout=_AUTO(),
                                            description="Add prompt tokens (style, scenario and tag tokens from the catalogs)")
        self.caption_preview = widgets.HTML()
        self.caption.observe(lambda _c: self._on_captions(), "value")
        self.with_tokens.observe(lambda _c: self._on_captions(), "value")
        return widgets.VBox([
            widgets.HTML("<p>The caption is the text the trainer pairs with each image.</p>"),
            self.caption, self.with_tokens, widgets.HTML("<b>Preview</b> (real captions of matching images)"),
            self.caption_preview,
        ])

    def _on_captions(self) -> None:
        self.state.caption = self.caption.value
        self.state.with_tokens = self.with_tokens.value
        self._invalidate(2)
        self._input_changed()
        if self.step in (1, 2):
            self._refresh_matches()

    # ---- page 4: preset ----------------------------------------------------------------------------------------
    def _preset_page(self) -> widgets.Widget:
        self._presets = list_presets()
        self.preset = widgets.Dropdown(description="Preset", layout=widgets.Layout(width="28em"))
        self.preset_info = widgets.HTML()
        self.advanced = widgets.ToggleButton(value=False, description="Advanced", icon="sliders")
        self.advanced_fields: dict[str, widgets.Widget] = {}
        for setting in WIZARD_FIELDS:
            cls = widgets.FloatText if setting.kind == "float" else widgets.IntText
            help_text = setting.help + (" (0: the default)" if setting.optional else "")
            field_widget = cls(description=setting.wizard, tooltip=help_text, style={"description_width": "10em"})
            field_widget.observe(lambda _c: self._on_advanced(), "value")
            self.advanced_fields[setting.name] = field_widget
        self.advanced_box = widgets.VBox(list(self.advanced_fields.values()))
        self.config_error = widgets.HTML()
        self.preset.observe(lambda _c: self._on_preset(), "value")
        self.advanced.observe(lambda c: _hidden(self.advanced_box, not c["new"]), "value")
        _hidden(self.advanced_box, True)
        return widgets.VBox([self.preset, self.preset_info, self.advanced, self.advanced_box, self.config_error])

    def _offer_presets(self) -> None:
        record = get_checkpoint(self.ws, self.state.checkpoint)
        options = preset_options(self._presets, checkpoint_family(record), is_tiny_checkpoint(record))
        keep = self.preset.value
        self._quiet = True
        try:
            self.preset.options = options
            names = [n for _, n in options]
            self.preset.value = keep if keep in names else (names[0] if names else None)
        finally:
            self._quiet = False
        self._on_preset()

    def _on_preset(self) -> None:
        if self._quiet:
            return
        s = self.state
        s.preset = self.preset.value
        s.overrides = {}
        self._invalidate(3)
        self._input_changed()
        if not s.preset:
            self.preset_info.value = _box("No preset fits this checkpoint.", "error")
            s.config = None
            return
        self.preset_info.value = _box(html.escape(self._presets[s.preset].get("description", "")), "info")
        shown = advanced_values(preset_config(self.ws, s.checkpoint, s.preset))
        self._quiet = True
        try:
            for name, field_widget in self.advanced_fields.items():
                field_widget.value = shown[name]
        finally:
            self._quiet = False
        self._refresh_config()

    def _on_advanced(self) -> None:
        if self._quiet:
            return
        s = self.state
        values = {name: field_widget.value for name, field_widget in self.advanced_fields.items()}
        s.overrides = advanced_overrides(values, preset_config(self.ws, s.checkpoint, s.preset))
        self._invalidate(3)
        self._input_changed()
        self._refresh_config()

    def _refresh_config(self) -> None:
        s = self.state
        s.config = None
        if not s.preset or not s.checkpoint:
            return
        try:
            s.config = run_config(self.ws, s)
        except LorakitError as exc:
            self.config_error.value = _box(html.escape(str(exc)), "error")
            return
        changed = overrides_text(s.overrides)
        self.config_error.value = _box(f"your changes: {html.escape(changed)}", "info") if changed else ""

    # ---- page 5: train -----------------------------------------------------------------------------------------
    def _train_page(self) -> widgets.Widget:
        self.lora_id = widgets.Text(description="LoRA id", layout=widgets.Layout(width="30em"))
        self.lora_name = widgets.Text(description="Name", layout=widgets.Layout(width="30em"))
        self.notes = widgets.Textarea(description="Notes", placeholder="what this release is for",
                                      layout=widgets.Layout(width="30em", height="3em"))
        self.train_summary = widgets.HTML()
        self.train_button = widgets.Button(description="Train", icon="play", button_style="primary")
        self.train_button.on_click(lambda _b: self.start_training())
        self.train_progress = widgets.IntProgress(value=0, min=0, max=1, description="Training",
                                                  layout=widgets.Layout(width="36em"))
        self.train_status = widgets.HTML()
        self.loss_image = widgets.Image(format="png", layout=widgets.Layout(width="32em"))
        _hidden(self.loss_image, True)
        self.lora_id.observe(lambda _c: self._describe_training(), "value")
        for w in (self.lora_id, self.lora_name, self.notes):
            w.observe(lambda _c: self._input_changed(), "value")
        return widgets.VBox([self.lora_id, self.lora_name, self.notes, self.train_summary, self.train_button,
                             self.train_progress, self.train_status, self.loss_image])

    def _describe_training(self) -> None:
        s = self.state
        if not self.lora_id.value and s.asset_types and s.checkpoint:
            self.lora_id.value = suggest_lora_id(self.project, s.asset_types, s.checkpoint)
        if not self.lora_name.value and s.asset_types:
            self.lora_name.value = suggest_lora_name(self.project, s.asset_types)
        if s.release_id:
            # What happened, read back from the record: the plan's "a new LoRA is created" is no longer true.
            lora = get_lora(self.ws, str(s.lora_id), project=self.project)
            text = html.escape(trained_text(lora, s.release_id))
            if s.review is None:
                text += ". Click Next to evaluate it."
            self.train_summary.value = _box(text, "warn" if s.review == "rejected" else "ok")
            return
        kind, sentence = lora_choice(self.ws, self.lora_id.value, self.project, s.checkpoint)
        self.train_summary.value = training_summary(s) + _box(html.escape(sentence), kind)

    def start_training(self) -> bool:
        """Build the dataset, create the LoRA when new, and train a release, in the background."""
        try:
            self._refuse_if_busy()
            lora_id = check_training_start(self.ws, self.state, self.done, self.lora_id.value, self.project)
        except LorakitError as exc:
            self._refuse(str(exc))
            return False
        self.state.lora_id = lora_id
        self.train_progress.value = 0
        self.train_status.value = "building the dataset…"
        return self._run("training", self._train, done=self._trained)

    def _train(self):
        s = self.state
        result = build_manifest(self.ws, **dataset_filters(s, self.project))
        s.dataset_id = result.manifest["id"]
        ensure_lora(self.ws, s.lora_id, name=self.lora_name.value.strip() or s.lora_id, scope="project",
                    project=self.project, checkpoint=s.checkpoint, asset_types=list(s.asset_types))
        training = plan_training(self.ws, s.lora_id, s.dataset_id, project=self.project, preset=s.preset,
                                 config=training_config(s.overrides), notes=self.notes.value.strip() or None)
        self.train_progress.max = training.total_steps
        return run_plan(self.ws, training, progress=False, on_step=self._on_train_step)

    def _on_train_step(self, report: StepReport) -> None:
        # Called on the training thread; ipywidgets send value changes from any thread.
        self.train_progress.value = min(report.step, self.train_progress.max)
        self.train_status.value = step_text(report)

    def _trained(self, result) -> None:
        s = self.state
        s.release_id = result.release_id
        self.done[4] = True
        self.train_progress.value = self.train_progress.max
        self.train_status.value = (
            f"{result.steps} steps in {result.duration_s:.0f} s, final loss {result.final_loss:.4f} "
            f"(dataset {html.escape(str(s.dataset_id))})")
        self._describe_training()
        lora = get_lora(self.ws, str(s.lora_id), project=self.project)
        # Kept for the notebook (``wizard.loss_figure.savefig(...)``), beside the PNG the page shows.
        self.loss_figure = plot_loss(result.output_dir, lora=lora, release=get_release(lora, result.release_id))
        self.loss_image.value = figure_png(self.loss_figure)
        _hidden(self.loss_image, False)

    # ---- page 6: evaluate --------------------------------------------------------------------------------------
    def _evaluate_page(self) -> widgets.Widget:
        self.grid_button = widgets.Button(description="Render the eval grid again", icon="refresh",
                                          layout=widgets.Layout(width="auto"))
        self.grid_button.on_click(lambda _b: self.start_eval_grid())
        self.grid_progress = widgets.IntProgress(value=0, min=0, max=1, description="Rendering",
                                                 layout=widgets.Layout(width="36em"))
        self.grid_status = widgets.HTML()
        self.grid_image = widgets.Image(format="png")
        self.grid_full_size = False
        self.grid_size_button = widgets.Button(description="Full size", icon="search-plus",
                                               tooltip="show the grid at its own pixel size, scrollable",
                                               layout=widgets.Layout(width="auto"))
        self.grid_size_button.on_click(lambda _b: self.show_grid_full_size(not self.grid_full_size))
        self.grid_box = widgets.Box([self.grid_image])
        self.show_grid_full_size(False)
        _hidden(self.grid_image, True)
        _hidden(self.grid_size_button, True)
        self.review_box = widgets.VBox()
        self.closing = widgets.HTML()
        return widgets.VBox([
            widgets.HTML("<p>The eval grid: the base checkpoint (strength 0) against your LoRA, on the same prompts "
                         "and seeds. Approve it to make the release active.</p>"),
            self.grid_progress, self.grid_status, self.grid_size_button, self.grid_box, self.review_box,
            self.closing, self.grid_button,
        ])

    def show_grid_full_size(self, full: bool) -> None:
        """Show the contact sheet at its natural pixel size in a scrollable box (``full``), or fitted to the page
        (the default: a wide grid would otherwise push the review buttons out of sight)."""
        self.grid_full_size = full
        self.grid_size_button.description = "Fit to page" if full else "Full size"
        self.grid_size_button.icon = "search-minus" if full else "search-plus"
        natural = self._grid.get("size")
        if full and natural:
            width, height = natural
            self.grid_image.layout = widgets.Layout(width=f"{width}px", height=f"{height}px", max_width="none",
                                                    min_width=f"{width}px", flex="0 0 auto")
            self.grid_box.layout = widgets.Layout(overflow="auto", max_width="100%", max_height="80vh",
                                                  border="1px solid #ddd")
        else:
            self.grid_image.layout = widgets.Layout(width="auto", height="auto", max_width="100%",
                                                    display=self.grid_image.layout.display)
            self.grid_box.layout = widgets.Layout(overflow="visible", max_width="100%")

    def start_eval_grid(self) -> bool:
        """Queue the eval grid of the trained release and render it with the worker, in the background."""
        s = self.state
        try:
            self._refuse_if_busy()
            if not s.release_id:
                raise WizardRefusal("train a release first (step 5)")
        except WizardRefusal as exc:
            self._refuse(str(exc))
            return False
        self.grid_progress.value = 0
        self.grid_status.value = "queueing the grid…"
        self.review_box.children = []
        return self._run("rendering the eval grid", self._render_grid, poll=self._grid_poll, done=self._grid_done)

    def _render_grid(self):
        s = self.state
        plan = create_eval_grid(self.ws, self.project, s.lora_id, s.release_id, prompts=self.eval_prompts,
                                seeds=self.eval_seeds, strengths=self.eval_strengths, steps=self.eval_steps)
        s.eval_id = plan.eval["id"]
        self._grid = {"total": len(plan.jobs), "eval": (s.eval_id, plan.eval_project)}
        self.grid_progress.max = len(plan.jobs)
        stats = run_worker(self.ws, self.project, once=True, log=lambda _line: None)
        if stats.failed:
            raise WizardRefusal(f"{len(stats.failed)} image(s) of the grid failed to render "
                                f"(see `lorakit lora list --project {self.project}` and the eval's failures)")
        return contact_sheet(self.ws, s.eval_id, plan.eval_project)

    def _grid_poll(self) -> None:
        eval_id, where = self._grid.get("eval", (None, None))
        if not eval_id:
            return
        try:
            record = self.ws.store.read("eval", eval_id, where, validate=False)
        except (LorakitError, OSError, ValueError):
            return
        done = sum(1 for o in record.get("outputs") or [] if o.get("images"))
        self.grid_progress.value = min(done, self.grid_progress.max)
        self.grid_status.value = f"{done} of {self._grid['total']} images rendered"

    def _grid_done(self, sheet) -> None:
        s = self.state
        self._grid_poll()
        self.grid_status.value = _box(f"eval <b>{html.escape(str(s.eval_id))}</b>: "
                                      f"{self._grid.get('total')} images rendered", "ok")
        self.grid_image.value = image_bytes(sheet)
        self._grid["size"] = sheet.size
        self.show_grid_full_size(self.grid_full_size)
        _hidden(self.grid_image, False)
        _hidden(self.grid_size_button, False)
        lora_id, release_id, eval_id = _trained_ids(s)
        # The panel's first line is the release's validation drop, right under the grid it is read beside.
        self.review = ReviewPanel(self.ws, lora_id, release_id, project=self.project, eval_ids=[eval_id],
                                  beginner=True, on_change=self._reviewed)
        self.review_box.children = [self.review]
        self.closing.value = ""

    def _reviewed(self, messages: list[str]) -> None:
        s = self.state
        s.messages = messages
        lora_id, release_id, _ = _trained_ids(s)
        lora = get_lora(self.ws, lora_id, project=self.project)
        s.review, self.done[5] = review_outcome(lora, release_id)
        if s.review in ("approved", "rejected"):
            kind, text = closing_text(lora, release_id, self.project)
            self.closing.value = _box(text, kind)
        else:
            self.closing.value = ""
        self._describe_training()

    # ---- background work ---------------------------------------------------------------------------------------
    def _run(self, what: str, job: Callable[[], Any], *, poll: Callable[[], None] | None = None,
             done: Callable[[Any], None] | None = None) -> bool:
        """Run ``job`` in a thread (the notebook stays usable); buttons are disabled until it ends; its error is
        shown on the page and kept in ``self.error``."""
        self.busy = True
        self.error = None
        self.message.value = _box(html.escape(what) + "…", "info")
        self._sync_buttons()
        finished = threading.Event()

        def watch() -> None:
            while not finished.wait(self.poll_seconds):
                try:
                    if poll:
                        poll()
                except Exception:  # a progress read must never stop the work
                    pass

        def target() -> None:
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                result = job()
                finished.set()
                watcher.join()
                if done:
                    done(result)
                self.message.value = ""
            except BaseException as exc:  # shown on the page: nothing else would see it
                finished.set()
                self.error = exc
                detail = "" if isinstance(exc, LorakitError) else (
                    "<details><summary>details</summary><pre>"
                    + html.escape("".join(traceback.format_exception(exc))[-3000:]) + "</pre></details>")
                self.message.value = _box(f"<b>{html.escape(what)} failed:</b> "
                                          f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}{detail}", "error")
            finally:
                self.busy = False
                self._sync_buttons()

        self._thread = threading.Thread(target=target, name=f"lorakit-wizard: {what}", daemon=True)
        self._thread.start()
        return True


__all__ = ["CAPTIONS", "ReviewPanel", "STEPS", "Wizard", "WizardRefusal", "WizardState", "preset_options",
           "suggest_lora_id"]


def _trained_ids(state: WizardState) -> tuple[str, str, str]:
    """The LoRA, release and eval the Evaluate page reviews (set once the grid is rendered)."""
    if not (state.lora_id and state.release_id and state.eval_id):
        raise WizardRefusal("train a release and render its eval grid first")
    return state.lora_id, state.release_id, state.eval_id
