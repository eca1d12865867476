"""The beginner wizard: train a LoRA in six pages, and the review panel it shares with ``03_eval_grid``.

1. checkpoint, 2. asset types and filters (live count and thumbnails), 3. caption strategy (live preview of
real captions), 4. training preset (one-line description; *Advanced* shows the numbers), 5. training (a new
``candidate`` release, in a background thread with a progress bar), 6. the eval grid, rendered by the
worker, then approve: the release becomes ``activeReleaseId`` (and the LoRA recommended when the gate allows).

The wizard holds state, not logic: each page calls the functions the CLI calls (``build_manifest``,
``create_lora``, ``train_lora``, ``create_eval_grid``, ``run_worker``, ``review_release``,
``activate_release``, ``set_recommended``). What it adds is guarding a beginner: a page cannot be skipped,
"Next" refuses with a sentence when the page's choice cannot work (no weights, no matching image, captions
all empty, a bad number), buttons are disabled while work runs, and errors are shown on the page.

>>> from lorakit.widgets import Wizard          # doctest: +SKIP
>>> wizard = Wizard(ws, project="demo"); wizard  # doctest: +SKIP
"""

from __future__ import annotations

import html
import threading
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..datasets import build_manifest
from ..errors import DatasetError, LorakitError, RecordNotFoundError, WizardRefusal
from ..evals import contact_sheet, create_eval_grid
from ..gate import (
    GateRefusal,
    activate_release,
    default_actor,
    eval_scopes,
    eval_state,
    evals_of_release,
    locate_lora,
    review_release,
    review_state,
    reviews_of,
    set_recommended,
)
from ..ids import check_id, new_ulid
from ..loras import create_lora, get_lora
from ..models import checkpoint_family, get_checkpoint, list_checkpoints, make_tiny_checkpoint
from ..notebook_helpers import checkpoint_weights, figure_png, gallery_html, image_bytes, is_tiny_checkpoint
from ..select import asset_type_options, load_asset_types
from ..train import list_presets, plot_loss, resolve_config, train_lora
from ..train.progress import LOG_NAME
from ..worker import run_worker
from ..workspace import Workspace, as_workspace

STEPS = ("Checkpoint", "Dataset", "Captions", "Preset", "Train", "Evaluate")
CAPTIONS = (("Tags only", "tags"), ("Tags + spec tags", "tags+spec"), ("Tags + spec tags + title", "tags+spec+title"))
# The numbers "Advanced" shows: (config key, label, type). A steps value of 0 means "from epochs".
ADVANCED = (("steps", "steps (0: epochs)", int), ("epochs", "epochs", int), ("rank", "rank", int),
            ("alpha", "alpha", float), ("lr", "learning rate", float), ("batch_size", "batch size", int),
            ("resolution", "resolution", int))
TINY_PRESET = "tiny-demo"


@dataclass
class WizardState:
    """The choices made so far and the records the wizard created (ids), for other cells to read."""

    checkpoint: str | None = None
    asset_types: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tag_any: bool = False
    same_checkpoint_only: bool = False
    caption: str = "tags+spec"
    with_tokens: bool = True
    preset: str | None = None
    overrides: dict = field(default_factory=dict)
    config: dict | None = None  # the resolved training config
    matching: int = 0  # images that match the dataset filters now
    lora_id: str | None = None
    dataset_id: str | None = None
    release_id: str | None = None
    eval_id: str | None = None
    review: str | None = None  # approved | rejected, once reviewed here
    messages: list[str] = field(default_factory=list)  # what the gate said


def preset_options(presets: Mapping[str, Mapping], family: str, tiny: bool) -> list[tuple[str, str]]:
    """``(label, name)`` of the presets to offer for a checkpoint: those made for its family, and the tiny demo
    preset only for a tiny checkpoint (where it comes first); a real model never gets a 64 px toy run.

    >>> preset_options({"a": {"family": "sd15"}, "b": {"family": "sdxl"}, "tiny-demo": {"family": None}}, "sd15", False)
    [('a', 'a')]
    """
    names = [n for n, p in presets.items() if p.get("family") == family]
    if tiny and TINY_PRESET in presets:
        names = [TINY_PRESET] + names
    return [(n, n) for n in names]


def suggest_lora_id(project: str, asset_types: Sequence[str], checkpoint: str) -> str:
    """A readable LoRA id from the choices (letters, digits, ``_``, ``-``, ``.`` only).

    >>> suggest_lora_id("demo", ["ui_icon"], "tiny-sd15")
    'demo_ui_icon_tiny-sd15'
    """
    text = "_".join([project, *asset_types, checkpoint])
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in text).replace("..", "_")


def _box(html_text: str, kind: str = "info") -> str:
    colors = {"info": ("#e8f1fb", "#1f5fa8"), "error": ("#fdecea", "#a61b1b"), "ok": ("#e9f7ef", "#1e7b3c"),
              "warn": ("#fff6e0", "#8a5a00")}
    bg, fg = colors[kind]
    return (f'<div class="lorakit-{kind}" style="background:{bg};color:{fg};padding:6px 10px;border-radius:4px;'
            f'margin:4px 0">{html_text}</div>')


def _AUTO() -> widgets.Layout:  # noqa: N802 - reads like the constant it stands for
    return widgets.Layout(width="auto")


def _hidden(widget: widgets.Widget, hidden: bool) -> None:
    widget.layout.display = "none" if hidden else None


class ReviewPanel(widgets.VBox):
    """Review one release after looking at its eval grid: approve or reject (with notes), activate, recommend.

    Each button is one gate call (``review_release``, ``activate_release``, ``set_recommended``); a refusal of the
    gate is shown, not raised. ``beginner=True`` (the wizard) shows two buttons: *Approve and make active*
    (approve, activate, then recommend when the gate allows) and *Reject*. ``on_change(result_messages)`` is
    called after each change.
    """

    def __init__(self, ws: Workspace | str | Path | None, lora_id: str, release_id: str, *,
                 project: str | None = None, eval_ids: Sequence[str] | None = None, beginner: bool = False,
                 on_change: Callable[[list[str]], None] | None = None):
        super().__init__()
        self.ws = as_workspace(ws)
        self.lora_id, self.release_id, self.project = lora_id, release_id, project
        self.eval_ids = list(eval_ids or [])
        self.on_change = on_change
        self.notes = widgets.Textarea(placeholder="what you saw in the grid (kept in the review history)",
                                      description="Notes", layout=widgets.Layout(width="36em", height="4em"))
        self.reviewer = widgets.Text(value=default_actor(), description="Reviewer")
        self.approve_button = widgets.Button(description="Approve and make active" if beginner else "Approve",
                                             button_style="success", icon="check",
                                             layout=widgets.Layout(width="auto"))
        self.reject_button = widgets.Button(description="Reject", button_style="danger", icon="times")
        self.activate_button = widgets.Button(description="Activate", icon="play")
        self.recommend_button = widgets.Button(description="Recommend", icon="star")
        self.status = widgets.HTML()
        self.history = widgets.HTML()
        self.result = widgets.HTML()
        self.beginner = beginner
        self.approve_button.on_click(lambda _b: self.approve())
        self.reject_button.on_click(lambda _b: self.reject())
        self.activate_button.on_click(lambda _b: self.activate())
        self.recommend_button.on_click(lambda _b: self.recommend())
        buttons = [self.approve_button, self.reject_button]
        if not beginner:
            buttons += [self.activate_button, self.recommend_button]
        self.children = [widgets.HBox([self.reviewer]), self.notes, widgets.HBox(buttons), self.result, self.status,
                         self.history]
        self.refresh()

    def _notes(self) -> str | None:
        return self.notes.value.strip() or None

    def _do(self, *calls: Callable[[], Any], optional_last: bool = False) -> list[str]:
        messages: list[str] = []
        kind = "ok"
        for i, call in enumerate(calls):
            try:
                messages += call().messages
            except GateRefusal as exc:
                last = i == len(calls) - 1
                messages.append(("not recommended yet: " if optional_last and last else "") + str(exc))
                kind = "warn" if optional_last and last else "error"
                if not (optional_last and last):
                    break
            except LorakitError as exc:
                messages.append(str(exc))
                kind = "error"
                break
        self.result.value = _box("<br>".join(html.escape(m) for m in messages), kind)
        self.refresh()
        if self.on_change:
            self.on_change(messages)
        return messages

    def approve(self) -> list[str]:
        """Approve (and, for a beginner, activate and recommend when allowed)."""
        review = lambda: review_release(self.ws, self.lora_id, self.release_id, approve=True,  # noqa: E731
                                        project=self.project, notes=self._notes(),
                                        reviewer=self.reviewer.value.strip() or None, eval_ids=self.eval_ids or None)
        if not self.beginner:
            return self._do(review)
        return self._do(review, lambda: activate_release(self.ws, self.lora_id, self.release_id, project=self.project),
                        lambda: set_recommended(self.ws, self.lora_id, project=self.project), optional_last=True)

    def reject(self) -> list[str]:
        return self._do(lambda: review_release(self.ws, self.lora_id, self.release_id, approve=False,
                                               project=self.project, notes=self._notes(),
                                               reviewer=self.reviewer.value.strip() or None,
                                               eval_ids=self.eval_ids or None))

    def activate(self) -> list[str]:
        return self._do(lambda: activate_release(self.ws, self.lora_id, self.release_id, project=self.project,
                                                 notes=self._notes()))

    def recommend(self) -> list[str]:
        return self._do(lambda: set_recommended(self.ws, self.lora_id, project=self.project))

    def refresh(self) -> None:
        """Show the release's current state and review history, read from the records."""
        try:
            location = locate_lora(self.ws.store, self.lora_id, self.project)
            lora = self.ws.store.read("lora", self.lora_id, location.project)
            release = next(r for r in lora.get("releases", []) if r.get("id") == self.release_id)
            evals = evals_of_release(self.ws.store, self.lora_id, release, eval_scopes(location, self.project))
        except (LorakitError, StopIteration) as exc:
            self.status.value = _box(html.escape(f"cannot read release {self.release_id}: {exc}"), "error")
            return
        facts = {"release": self.release_id, "status": release.get("status"), "review": review_state(release),
                 "active": "yes" if lora.get("activeReleaseId") == self.release_id else "no",
                 "LoRA recommended": "yes" if lora.get("recommended") else "no", "evals": eval_state(evals)}
        self.status.value = "<b>Now:</b> " + ", ".join(f"{k} <b>{html.escape(str(v))}</b>" for k, v in facts.items())
        rows = "".join(f"<tr><td>{html.escape(str(r.get('at', '')))}</td><td>{html.escape(str(r.get('outcome')))}</td>"
                       f"<td>{html.escape(str(r.get('reviewer', '')))}</td><td>{html.escape(str(r.get('notes') or ''))}</td></tr>"
                       for r in reviews_of(release))
        self.history.value = ("<b>Review history</b><table><tr><th>at</th><th>outcome</th><th>reviewer</th>"
                              f"<th>notes</th></tr>{rows}</table>" if rows else "<i>not reviewed yet</i>")


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
        self._preview = None  # the latest dry-run BuildResult
        self._progress: dict = {}
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
            if not 0 <= step < len(STEPS):
                raise WizardRefusal(f"there is no step {step + 1}")
            for j in range(step):
                if not self.done[j]:
                    raise WizardRefusal(f"finish step {j + 1} ({STEPS[j]}) first: steps cannot be skipped")
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
        self.message.value = _box("✋ " + html.escape(text), "warn")

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
        s = self.state
        if step == 0:
            if not s.checkpoint:
                raise WizardRefusal("choose a checkpoint")
            path, present = checkpoint_weights(self.ws, get_checkpoint(self.ws, s.checkpoint))
            if not present:
                hint = (" Click 'Build tiny demo weights'." if self.build_button.layout.display != "none"
                        else " Register its weights with `lorakit checkpoint add`.")
                raise WizardRefusal(f"the weights of checkpoint {s.checkpoint} are not on this machine ({path}).{hint}")
        elif step == 1:
            self._refresh_matches()
            if not s.asset_types:
                raise WizardRefusal("pick at least one asset type")
            if s.matching == 0:
                raise WizardRefusal("no approved image matches these filters; remove a required tag or pick "
                                    "another asset type")
        elif step == 2:
            self._refresh_matches()
            items = self._preview.manifest["items"] if self._preview else []
            if items and not any(i.get("caption") for i in items):
                raise WizardRefusal("none of the images would get a caption with this strategy; choose one with "
                                    "spec tags, or add prompt tokens")
        elif step == 3:
            self._refresh_config()
            if s.config is None:
                raise WizardRefusal("the training settings are not valid (see above)")
        elif step == 4:
            if not s.release_id:
                raise WizardRefusal("train first: click 'Train'")

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
        self.checkpoint = widgets.Dropdown(options=options, value=default if default in ids else (ids or [None])[0],
                                           description="Checkpoint", layout=widgets.Layout(width="36em"))
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
        if not s.checkpoint:
            self.checkpoint_info.value = _box("No checkpoint is registered (see `lorakit checkpoint add`).", "error")
            _hidden(self.build_button, True)
            return
        record = get_checkpoint(self.ws, s.checkpoint)
        path, present = checkpoint_weights(self.ws, record)
        family = checkpoint_family(record)
        types = ", ".join(record.get("supportedAssetTypes") or []) or "any"
        weights = (f"weights found at <code>{html.escape(str(path))}</code>" if present
                   else f"<b>weights missing</b> (looked at <code>{html.escape(str(path))}</code>)")
        self.checkpoint_info.value = _box(f"family <b>{family}</b>; asset types: {html.escape(types)}; {weights}",
                                          "info" if present else "warn")
        _hidden(self.build_button, present or not is_tiny_checkpoint(record))
        self._offer_asset_types()
        self._offer_presets()

    def build_tiny_weights(self) -> None:
        """Build the tiny random-weight demo checkpoint (seconds), in the background."""
        record = get_checkpoint(self.ws, self.state.checkpoint)
        self._run("building the tiny weights",
                  lambda: make_tiny_checkpoint(self.ws, record["id"], checkpoint_family(record)),
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
        self.required_tags = widgets.TagsInput(value=[], allowed_tags=known, allow_duplicates=False,
                                               placeholder="required tag")
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
            widgets.HTML("<b>Required tags</b> (type to pick from the project's tags)"), self.required_tags,
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
        if self.step in (1, 2):
            self._refresh_matches()

    def _build_args(self) -> dict:
        s = self.state
        return {"project": self.project, "status": "approved", "asset_types": list(s.asset_types),
                "checkpoints": [s.checkpoint] if s.same_checkpoint_only else [], "tags": list(s.tags),
                "tag_any": s.tag_any, "caption": s.caption, "with_tokens": s.with_tokens}

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
            result = build_manifest(self.ws, **self._build_args(), dry_run=True)
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
                                                size=64, columns=self.preview_images)
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
        if self.step in (1, 2):
            self._refresh_matches()

    # ---- page 4: preset ----------------------------------------------------------------------------------------
    def _preset_page(self) -> widgets.Widget:
        self._presets = list_presets()
        self.preset = widgets.Dropdown(description="Preset", layout=widgets.Layout(width="28em"))
        self.preset_info = widgets.HTML()
        self.advanced = widgets.ToggleButton(value=False, description="Advanced", icon="sliders")
        self.advanced_fields: dict[str, widgets.Widget] = {}
        for key, label, kind in ADVANCED:
            cls = widgets.FloatText if kind is float else widgets.IntText
            field_widget = cls(description=label, style={"description_width": "10em"})
            field_widget.observe(lambda _c: self._on_advanced(), "value")
            self.advanced_fields[key] = field_widget
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
            self.preset.value = keep if keep in names else (names or [None])[0]
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
        if not s.preset:
            self.preset_info.value = _box("No preset fits this checkpoint.", "error")
            s.config = None
            return
        self.preset_info.value = _box(html.escape(self._presets[s.preset].get("description", "")), "info")
        family = checkpoint_family(get_checkpoint(self.ws, s.checkpoint))
        base = resolve_config(family, preset=s.preset)
        self._quiet = True
        try:
            for key, field_widget in self.advanced_fields.items():
                field_widget.value = base[key] if base[key] is not None else 0
        finally:
            self._quiet = False
        self._refresh_config()

    def _on_advanced(self) -> None:
        if self._quiet:
            return
        s = self.state
        family = checkpoint_family(get_checkpoint(self.ws, s.checkpoint))
        base = resolve_config(family, preset=s.preset) if s.preset else {}
        overrides = {}
        for key, field_widget in self.advanced_fields.items():
            value = field_widget.value
            if key == "steps" and value == 0:
                value = None
            if value != base.get(key):
                overrides[key] = value
        s.overrides = overrides
        self._invalidate(3)
        self._refresh_config()

    def _refresh_config(self) -> None:
        s = self.state
        s.config = None
        if not s.preset or not s.checkpoint:
            return
        family = checkpoint_family(get_checkpoint(self.ws, s.checkpoint))
        try:
            s.config = resolve_config(family, preset=s.preset, config=self._train_config())
        except LorakitError as exc:
            self.config_error.value = _box(html.escape(str(exc)), "error")
            return
        changed = ", ".join(f"{k} {v}" for k, v in s.overrides.items())
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
        return widgets.VBox([self.lora_id, self.lora_name, self.notes, self.train_summary, self.train_button,
                             self.train_progress, self.train_status, self.loss_image])

    def _describe_training(self) -> None:
        s = self.state
        if not self.lora_id.value and s.asset_types and s.checkpoint:
            self.lora_id.value = suggest_lora_id(self.project, s.asset_types, s.checkpoint)
        if not self.lora_name.value and s.asset_types:
            self.lora_name.value = f"{self.project} {', '.join(s.asset_types)}"
        if s.release_id:
            return
        lora_note = ""
        try:
            lora_id = check_id(self.lora_id.value.strip(), "LoRA id")
            existing = get_lora(self.ws, lora_id, project=self.project)
            if existing["checkpointId"] != s.checkpoint:
                lora_note = _box(f"LoRA {html.escape(lora_id)} exists for checkpoint "
                                 f"{html.escape(existing['checkpointId'])}: choose another id", "error")
            else:
                lora_note = _box(f"LoRA {html.escape(lora_id)} exists: a new release is added to its "
                                 f"{len(existing['releases'])} release(s)", "info")
        except RecordNotFoundError:
            lora_note = _box("a new LoRA record is created", "info")
        except LorakitError as exc:
            lora_note = _box(html.escape(str(exc)), "error")
        cfg = s.config or {}
        steps = cfg.get("steps") or f"{cfg.get('epochs')} epoch(s)"
        self.train_summary.value = (
            f"<p>Trains on <b>{s.matching}</b> images of {html.escape(', '.join(s.asset_types))} "
            f"(captions: {html.escape(s.caption)}{' + tokens' if s.with_tokens else ''}) with preset "
            f"<b>{html.escape(str(s.preset))}</b> ({steps} steps, rank {cfg.get('rank')}, {cfg.get('resolution')} px) "
            f"on <b>{html.escape(str(s.checkpoint))}</b>. The result is a new <i>candidate</i> release.</p>{lora_note}"
        )

    def start_training(self) -> bool:
        """Build the dataset, create the LoRA when new, and train a release, in the background."""
        s = self.state
        try:
            self._refuse_if_busy()
            for j in range(4):
                if not self.done[j]:
                    raise WizardRefusal(f"finish step {j + 1} ({STEPS[j]}) first")
            if s.release_id:
                raise WizardRefusal(f"release {s.release_id} is trained; run the cell again to train another")
            lora_id = check_id(self.lora_id.value.strip(), "LoRA id")
            try:
                existing = get_lora(self.ws, lora_id, project=self.project)
                if existing["checkpointId"] != s.checkpoint:
                    raise WizardRefusal(f"LoRA {lora_id} is for checkpoint {existing['checkpointId']}, not "
                                        f"{s.checkpoint}: choose another LoRA id")
            except RecordNotFoundError:
                pass
        except LorakitError as exc:
            self._refuse(str(exc))
            return False
        s.lora_id = lora_id
        self.train_progress.value = 0
        self.train_status.value = "building the dataset…"
        return self._run("training", self._train, poll=self._train_poll, done=self._trained)

    def _train(self):
        s = self.state
        result = build_manifest(self.ws, **self._build_args())
        s.dataset_id = result.manifest["id"]
        try:
            get_lora(self.ws, s.lora_id, project=self.project)
        except RecordNotFoundError:
            create_lora(self.ws, s.lora_id, name=self.lora_name.value.strip() or s.lora_id, scope="project",
                        project=self.project, checkpoint=s.checkpoint, asset_types=list(s.asset_types))
        release_id = new_ulid()
        kwargs = {"project": self.project, "preset": s.preset, "config": self._train_config(), "release_id": release_id}
        plan = train_lora(self.ws, s.lora_id, s.dataset_id, dry_run=True, **kwargs).plan
        self._progress = {"total": plan["steps"], "log": self.ws.config.loras_root / s.lora_id / release_id / LOG_NAME}
        self.train_progress.max = plan["steps"]
        return train_lora(self.ws, s.lora_id, s.dataset_id, notes=self.notes.value.strip() or None, progress=False,
                          **kwargs)

    def _train_config(self) -> dict | None:
        # Passed as ``config``, not ``overrides``: steps=None ("from epochs") must replace a preset's steps, and
        # ``overrides`` treats None as "not given".
        return dict(self.state.overrides) or None

    def _train_poll(self) -> None:
        log = self._progress.get("log")
        if not log or not log.exists():
            return
        lines = log.read_text(encoding="utf-8").strip().splitlines()[1:]
        if lines:
            step, _epoch, loss, *_ = lines[-1].split(",")
            self.train_progress.value = min(int(step), self.train_progress.max)
            self.train_status.value = f"step {step} of {self._progress['total']}, loss {float(loss):.4f}"

    def _trained(self, result) -> None:
        s = self.state
        s.release_id = result.release_id
        self.done[4] = True
        self.train_progress.value = self.train_progress.max
        self.train_status.value = _box(
            f"release <b>{html.escape(result.release_id)}</b> of LoRA <b>{html.escape(s.lora_id)}</b> trained: "
            f"{result.steps} steps in {result.duration_s:.0f} s, final loss {result.final_loss:.4f} "
            f"(dataset {html.escape(str(s.dataset_id))}). Click Next to evaluate it.", "ok")
        self.loss_image.value = figure_png(plot_loss(result.output_dir))
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
        _hidden(self.grid_image, True)
        self.review_box = widgets.VBox()
        return widgets.VBox([
            widgets.HTML("<p>The eval grid: the base checkpoint (strength 0) against your LoRA, on the same prompts "
                         "and seeds. Approve it to make the release active.</p>"),
            self.grid_progress, self.grid_status, self.grid_image, self.review_box, self.grid_button,
        ])

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
        self._progress = {"total": len(plan.jobs), "eval": (s.eval_id, plan.eval_project)}
        self.grid_progress.max = len(plan.jobs)
        stats = run_worker(self.ws, self.project, once=True, log=lambda _line: None)
        if stats.failed:
            raise WizardRefusal(f"{len(stats.failed)} image(s) of the grid failed to render "
                                f"(see `lorakit lora list --project {self.project}` and the eval's failures)")
        return contact_sheet(self.ws, s.eval_id, plan.eval_project)

    def _grid_poll(self) -> None:
        eval_id, where = self._progress.get("eval", (None, None))
        if not eval_id:
            return
        try:
            record = self.ws.store.read("eval", eval_id, where, validate=False)
        except (LorakitError, OSError, ValueError):
            return
        done = sum(1 for o in record.get("outputs") or [] if o.get("images"))
        self.grid_progress.value = min(done, self.grid_progress.max)
        self.grid_status.value = f"{done} of {self._progress['total']} images rendered"

    def _grid_done(self, sheet) -> None:
        s = self.state
        self._grid_poll()
        self.grid_status.value = _box(f"eval <b>{html.escape(str(s.eval_id))}</b>: "
                                      f"{self._progress.get('total')} images rendered", "ok")
        self.grid_image.value = image_bytes(sheet)
        _hidden(self.grid_image, False)
        self.review = ReviewPanel(self.ws, s.lora_id, s.release_id, project=self.project, eval_ids=[s.eval_id],
                                  beginner=True, on_change=self._reviewed)
        self.review_box.children = [self.review]

    def _reviewed(self, messages: list[str]) -> None:
        s = self.state
        s.messages = messages
        lora = get_lora(self.ws, s.lora_id, project=self.project)
        release = next(r for r in lora["releases"] if r["id"] == s.release_id)
        s.review = review_state(release)
        self.done[5] = s.review == "approved" and lora.get("activeReleaseId") == s.release_id

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


__all__ = ["ReviewPanel", "STEPS", "Wizard", "WizardRefusal", "WizardState", "preset_options", "suggest_lora_id"]
