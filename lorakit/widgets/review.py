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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets

from ..errors import LorakitError
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


class ReviewPanel(widgets.VBox):
    """Review one release after looking at its eval grid: approve or reject (with notes), activate, recommend.

    Above the buttons: the release's validation drop (:func:`~lorakit.loras.validation_summary`), the number a
    reviewer reads beside the grid.

    A refusal of the gate is shown, not raised. ``beginner=True`` (the wizard) shows two buttons: *Approve and
    make active* (:func:`~lorakit.gate.approve_and_activate`: approve, activate, then recommend when the gate
    allows) and *Reject*. ``on_change(result_messages)`` is called after each change.
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
        self.activate_button = widgets.Button(description="Activate", icon="play")
        self.recommend_button = widgets.Button(description="Recommend", icon="star")
        self.validation = widgets.HTML()
        self.status = widgets.HTML()
        self.history = widgets.HTML()
        self.result = widgets.HTML()
        self.approve_button.on_click(lambda _b: self.approve())
        self.reject_button.on_click(lambda _b: self.reject())
        self.activate_button.on_click(lambda _b: self.activate())
        self.recommend_button.on_click(lambda _b: self.recommend())
        buttons = [self.approve_button, self.reject_button]
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

    def _do(self, call: Callable[[], Any]) -> list[str]:
        """Run one gate call and show its messages: a refusal in red, with what was done before it; a LoRA the
        gate would not recommend yet in amber."""
        try:
            outcome = call()
        except LorakitError as exc:
            messages, kind = [*getattr(exc, "__notes__", ()), str(exc)], "error"
        else:
            messages = outcome.messages
            kind = "warn" if getattr(outcome, "not_recommended", None) else "ok"
        self.result.value = message_box("<br>".join(html.escape(m) for m in messages), kind)
        self.refresh()
        if self.on_change:
            self.on_change(messages)
        return messages

    def approve(self) -> list[str]:
        """Approve (and, for a beginner, activate and recommend when allowed)."""
        if self.beginner:
            return self._do(lambda: approve_and_activate(self.ws, self.lora_id, self.release_id,
                                                         **self._review_args()))
        return self._do(lambda: review_release(self.ws, self.lora_id, self.release_id, approve=True,
                                               **self._review_args()))

    def reject(self) -> list[str]:
        return self._do(lambda: review_release(self.ws, self.lora_id, self.release_id, approve=False,
                                               **self._review_args()))

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
            return
        self.validation.value = "<b>Validation:</b> " + html.escape(validation_summary(release_validation(release)))
        facts = {"release": self.release_id, "status": release.get("status"), "review": review_state(release),
                 "active": "yes" if lora.get("activeReleaseId") == self.release_id else "no",
                 "LoRA recommended": "yes" if lora.get("recommended") else "no", "evals": eval_state(evals)}
        self.status.value = "<b>Now:</b> " + ", ".join(f"{k} <b>{html.escape(str(v))}</b>" for k, v in facts.items())
        rows = "".join(f"<tr><td>{html.escape(str(r.get('at', '')))}</td><td>{html.escape(str(r.get('outcome')))}</td>"
                       f"<td>{html.escape(str(r.get('reviewer', '')))}</td><td>{html.escape(str(r.get('notes') or ''))}</td></tr>"
                       for r in reviews_of(release))
        self.history.value = ("<b>Review history</b><table><tr><th>at</th><th>outcome</th><th>reviewer</th>"
                              f"<th>notes</th></tr>{rows}</table>" if rows else "<i>not reviewed yet</i>")


__all__ = ["ReviewPanel"]
