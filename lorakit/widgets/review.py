"""The review panel of ``03_eval_grid`` and the wizard's last page: approve or reject a release after looking at
its eval grid, activate it, recommend its LoRA.

Each button is one gate call (:func:`~lorakit.gate.review_release`, :func:`~lorakit.gate.activate_release`,
:func:`~lorakit.gate.set_recommended`, or for a beginner :func:`~lorakit.gate.approve_and_activate`); the panel
shows what the gate said and the release's state, read back from the records.

>>> from lorakit.widgets import ReviewPanel                                   # doctest: +SKIP
>>> ReviewPanel(ws, "demo_ui_icons", release_id, project="demo", eval_ids=[eval_id])  # doctest: +SKIP
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..errors import LorakitError, WizardRefusal
from ..gate import (
    activate_release,
    approve_and_activate,
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
from ..loras import get_release, release_validation, validation_summary
from ..workspace import Workspace, as_workspace
from .messages import message_box

NEW_NOTES = "write new notes for the new decision"
# The history table's cells: without padding its columns run into each other.
CELL = 'style="padding:2px 12px 2px 0;text-align:left;vertical-align:top"'


# ---- what the panel decides (pure) -----------------------------------------------------------------------------
def decision_controls(state: str, changing: bool) -> tuple[bool, bool]:
    """``(approve and reject enabled, "Change decision" shown)`` for a release in review ``state``.

    Once a decision is recorded the two buttons are off, so a second click cannot add a duplicate review;
    "Change decision" turns them back on for one new decision. A deprecated release takes no review at all.

    >>> decision_controls("unreviewed", False), decision_controls("approved", False), decision_controls("rejected", True)
    ((True, False), (False, True), (True, False))
    """
    if state == "deprecated":
        return False, False
    if state in ("approved", "rejected"):
        return changing, not changing
    return True, False


def check_new_notes(notes: str | None, previous: str | None) -> None:
    """A changed decision needs notes of its own: empty notes, or the notes of the decision it replaces, are
    refused (the history would not say why the decision changed).

    >>> check_new_notes("the edges are soft after all", "crisp")
    >>> check_new_notes(" crisp ", "crisp")
    Traceback (most recent call last):
    lorakit.errors.WizardRefusal: write new notes for the new decision
    """
    text = (notes or "").strip()
    if not text or text == (previous or "").strip():
        raise WizardRefusal(NEW_NOTES)


def cleared_by(before: Mapping, after: Mapping) -> list[str]:
    """What a transition took away from the LoRA: its active release, its recommendation.

    >>> cleared_by({"id": "x", "activeReleaseId": "r1", "recommended": True}, {"id": "x"})
    ['the active release r1', 'the recommendation of LoRA x']
    """
    cleared = []
    if before.get("activeReleaseId") and not after.get("activeReleaseId"):
        cleared.append(f"the active release {before['activeReleaseId']}")
    if before.get("recommended") and not after.get("recommended"):
        cleared.append(f"the recommendation of LoRA {after.get('id') or before.get('id')}")
    return cleared


def change_confirmation(lora: Mapping, release_id: str, approve: bool, replaced: Mapping | None, *, button: str,
                        activates: bool) -> str:
    """What a changed decision will do, asked before it is recorded: the decision it replaces and what it
    takes away from the LoRA (or, when the approval ``activates`` the release, gives to it); ``button`` is the
    label of the button that records it.

    >>> lora = {"id": "x", "activeReleaseId": "r1", "recommended": True}
    >>> print(change_confirmation(lora, "r1", False, {"outcome": "approved", "reviewer": "ana"}, button="Reject",
    ...                           activates=True))  # doctest: +NORMALIZE_WHITESPACE
    Reject release r1, replacing the decision 'approved' by ana? It clears the active release r1 and the
    recommendation of LoRA x. Click 'Reject' again to record it.
    """
    text = f"{'Approve' if approve else 'Reject'} release {release_id}"
    if replaced:
        by = f" by {replaced['reviewer']}" if replaced.get("reviewer") else ""
        text += f", replacing the decision '{replaced.get('outcome')}'{by}"
    text += "?"
    if not approve and lora.get("activeReleaseId") == release_id:
        cleared = cleared_by(lora, {"id": lora.get("id")})
        text += f" It clears {' and '.join(cleared)}."
    elif approve and activates and lora.get("activeReleaseId") != release_id:
        text += f" It makes it the active release of LoRA {lora.get('id')}."
    return text + f" Click '{button}' again to record it."


class _AskFirst(Exception):
    """A changed decision is asked about once before it is recorded (the message says what it will do)."""


class ReviewPanel(widgets.VBox):
    """Review one release after looking at its eval grid: approve or reject (with notes), activate, recommend.

    Above the buttons: the release's validation drop (:func:`~lorakit.loras.validation_summary`), the number a
    reviewer reads beside the grid.

    A refusal of the gate is shown, not raised. ``beginner=True`` (the wizard) shows two buttons: *Approve and
    make active* (:func:`~lorakit.gate.approve_and_activate`: approve, activate, then recommend when the gate
    allows) and *Reject*. ``on_change(result_messages)`` is called after each change.

    One decision at a time: once the release is approved or rejected, Approve and Reject are disabled and
    *Change decision* appears; it clears the notes and turns them back on. The new decision needs new notes,
    and its first click only says what it will do (:func:`change_confirmation`); the second records it. A
    decision that cleared the active release or the recommendation is shown as a warning saying so.
    """

    def __init__(self, ws: Workspace | str | Path | None, lora_id: str, release_id: str, *,
                 project: str | None = None, eval_ids: Sequence[str] | None = None, beginner: bool = False,
                 on_change: Callable[[list[str]], None] | None = None):
        super().__init__()
        self.ws = as_workspace(ws)
        self.lora_id, self.release_id, self.project = lora_id, release_id, project
        self.eval_ids = list(eval_ids or [])
        self.on_change = on_change
        self.beginner = beginner
        self.notes = widgets.Textarea(placeholder="what you saw in the grid (kept in the review history)",
                                      description="Notes", layout=widgets.Layout(width="36em", height="4em"))
        self.reviewer = widgets.Text(value=default_actor(), description="Reviewer")
        self.approve_button = widgets.Button(description="Approve and make active" if beginner else "Approve",
                                             button_style="success", icon="check",
                                             layout=widgets.Layout(width="auto"))
        self.reject_button = widgets.Button(description="Reject", button_style="danger", icon="times")
        self.change_button = widgets.Button(description="Change decision", icon="undo",
                                            tooltip="make a new decision about this release, with new notes",
                                            layout=widgets.Layout(width="auto"))
        self.changing = False
        self._replaced: dict | None = None      # the review whose decision is being changed
        self._asked: str | None = None          # the changed decision ("approve"/"reject") already asked about
        # Asked about one decision with one set of notes: new notes are a new decision to ask about.
        self.notes.observe(lambda _change: setattr(self, "_asked", None), names="value")
        self.activate_button = widgets.Button(description="Activate", icon="play")
        self.recommend_button = widgets.Button(description="Recommend", icon="star")
        self.validation = widgets.HTML()
        self.status = widgets.HTML()
        self.history = widgets.HTML()
        self.result = widgets.HTML()
        self.approve_button.on_click(lambda _b: self.approve())
        self.reject_button.on_click(lambda _b: self.reject())
        self.change_button.on_click(lambda _b: self.change_decision())
        self.activate_button.on_click(lambda _b: self.activate())
        self.recommend_button.on_click(lambda _b: self.recommend())
        buttons = [self.approve_button, self.reject_button, self.change_button]
        if not beginner:
            buttons += [self.activate_button, self.recommend_button]
        # The validation drop comes first, right under the grid it is read beside.
        self.children = [self.validation, widgets.HBox([self.reviewer]), self.notes, widgets.HBox(buttons),
                         self.result, self.status, self.history]
        self.refresh()

    def _notes(self) -> str | None:
        return self.notes.value.strip() or None

    def _review_args(self) -> dict[str, Any]:
        return {"project": self.project, "notes": self._notes(),
                "reviewer": self.reviewer.value.strip() or None, "eval_ids": self.eval_ids or None}

    def _lora(self) -> dict | None:
        try:
            location = locate_lora(self.ws.store, self.lora_id, self.project)
            return self.ws.store.read("lora", self.lora_id, location.project)
        except LorakitError:
            return None

    def _do(self, call: Callable[[], Any], decision: str | None = None) -> list[str]:
        """Run one gate call and show its messages: a refusal in red, with what was done before it; a LoRA the
        gate would not recommend yet, or one that lost its active release or recommendation, in amber."""
        before = self._lora() or {}
        lead = ""
        try:
            if decision:
                self._check_decision(decision, before)
            outcome = call()
        except _AskFirst as question:
            messages, kind = [str(question)], "warn"
        except LorakitError as exc:
            messages, kind = [*getattr(exc, "__notes__", ()), str(exc)], "error"
        else:
            messages = outcome.messages
            kind = "warn" if getattr(outcome, "not_recommended", None) else "ok"
            cleared = cleared_by(before, outcome.lora)
            if cleared:
                kind = "warn"
                lead = f"<b>Note:</b> this cleared {html.escape(' and '.join(cleared))}.<br>"
            if decision:
                self.changing, self._asked = False, None
        self.result.value = message_box(lead + "<br>".join(html.escape(m) for m in messages), kind)
        self.refresh()
        if self.on_change:
            self.on_change(messages)
        return messages

    def _check_decision(self, decision: str, lora: dict) -> None:
        """Refuse a second decision made without "Change decision", and a changed one without new notes; ask
        about a changed one once before it is recorded (``lora``: the record as it is now)."""
        enabled, _ = decision_controls(self._state(lora), self.changing)
        if not enabled:
            raise WizardRefusal("a decision about this release is recorded: click 'Change decision' to make "
                                "a new one")
        if self.changing:
            check_new_notes(self._notes(), (self._replaced or {}).get("notes"))
            if self._asked != decision:
                approve = decision == "approve"
                button = self.approve_button if approve else self.reject_button
                # A beginner's approval is approve_and_activate: it also makes the release active.
                question = change_confirmation(lora, self.release_id, approve, self._replaced,
                                               button=button.description, activates=self.beginner)
                self._asked = decision
                raise _AskFirst(question)

    def _state(self, lora: dict | None) -> str:
        """The release's review state in ``lora`` (a record, or None when it cannot be read)."""
        try:
            return review_state(get_release(lora, self.release_id)) if lora else "unreviewed"
        except LorakitError:
            return "unreviewed"

    def approve(self) -> list[str]:
        """Approve (and, for a beginner, activate and recommend when allowed)."""
        if self.beginner:
            return self._do(lambda: approve_and_activate(self.ws, self.lora_id, self.release_id,
                                                         **self._review_args()), decision="approve")
        return self._do(lambda: review_release(self.ws, self.lora_id, self.release_id, approve=True,
                                               **self._review_args()), decision="approve")

    def reject(self) -> list[str]:
        return self._do(lambda: review_release(self.ws, self.lora_id, self.release_id, approve=False,
                                               **self._review_args()), decision="reject")

    def change_decision(self) -> None:
        """Turn Approve and Reject back on for a new decision: the notes box is cleared for its own notes."""
        lora = self._lora()
        latest = None
        if lora:
            try:
                reviews = reviews_of(get_release(lora, self.release_id))
                latest = reviews[-1] if reviews else None
            except LorakitError:
                pass
        self._replaced = dict(latest or {"notes": self.notes.value})
        self.changing = True
        self.notes.value = ""
        self._asked = None
        self.result.value = message_box("Write new notes, then approve or reject again (the panel asks once "
                                        "before it records the new decision).", "info")
        self.refresh()

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
            release = get_release(lora, self.release_id)
            evals = evals_of_release(self.ws.store, self.lora_id, release, eval_scopes(location, self.project))
        except LorakitError as exc:
            self.status.value = message_box(html.escape(f"cannot read release {self.release_id}: {exc}"), "error")
            self.validation.value = ""
            self._show_controls("unreviewed")
            return
        self._show_controls(review_state(release))
        self.validation.value = "<b>Validation:</b> " + html.escape(validation_summary(release_validation(release)))
        facts = {"release": self.release_id, "status": release.get("status"), "review": review_state(release),
                 "active": "yes" if lora.get("activeReleaseId") == self.release_id else "no",
                 "LoRA recommended": "yes" if lora.get("recommended") else "no", "evals": eval_state(evals)}
        self.status.value = "<b>Now:</b> " + ", ".join(f"{k} <b>{html.escape(str(v))}</b>" for k, v in facts.items())
        rows = "".join(
            "<tr>" + "".join(f"<td {CELL}>{html.escape(str(v))}</td>"
                             for v in (r.get("at", ""), r.get("outcome"), r.get("reviewer", ""), r.get("notes") or ""))
            + "</tr>" for r in reviews_of(release))
        head = "".join(f"<th {CELL}>{h}</th>" for h in ("at", "outcome", "reviewer", "notes"))
        self.history.value = (f'<b>Review history</b><table class="lorakit-history" style="border-collapse:collapse">'
                              f"<tr>{head}</tr>{rows}</table>" if rows else "<i>not reviewed yet</i>")

    def _show_controls(self, state: str) -> None:
        enabled, show_change = decision_controls(state, self.changing)
        self.approve_button.disabled = self.reject_button.disabled = not enabled
        self.change_button.layout.display = None if show_change else "none"


__all__ = ["ReviewPanel"]
