"""The LoRA picker: which LoRAs a checkpoint and an asset type get, adjustable, as a value other cells read.

Every decision is :func:`lorakit.select.resolve_loras`'s; the widget only turns the user's release and
strength changes into picks and shows the result. Other cells read ``picker.value`` (a
:class:`~lorakit.select.LoraResolution`: pass it to :func:`~lorakit.select.apply_loras`), ``picker.selection``
(plain dicts) or ``picker.frame`` (the table as a DataFrame), or ``picker.observe(callback, "value")``.
:meth:`LoraPicker.prepare` does both halves of rendering with the choice: the LoRAs, and the scheduler and call
arguments the checkpoint's objective needs (what the eval grids render with).

>>> from lorakit.widgets import LoraPicker           # doctest: +SKIP
>>> picker = LoraPicker(project="demo"); picker       # doctest: +SKIP
>>> image = pipe("a red gem", **picker.prepare(pipe)).images[0]   # doctest: +SKIP
"""

from __future__ import annotations

import html
from dataclasses import dataclass, replace
from pathlib import Path

import ipywidgets as widgets
import traitlets

from ..families.objectives import DEFAULT_GUIDANCE_RESCALE
from ..select import (
    LoraPick,
    LoraResolution,
    apply_loras,
    asset_type_options,
    load_asset_types,
    load_loras,
    locate_weights,
    render_setup,
    resolve_loras,
)
from ..workspace import Workspace, as_workspace

POLICY_RELEASE = ""  # the release dropdown's "let the policy choose" entry


@dataclass
class LoraControls:
    """The widgets of one compatible LoRA: its release and its strength."""

    lora_id: str
    release: widgets.Dropdown
    strength: widgets.FloatSlider
    row: widgets.HBox


class LoraPicker(widgets.VBox):
    """Checkpoint and asset-type dropdowns, the LoRAs the project's policy picks for them, and per-LoRA
    release and strength controls. ``value`` is the current :class:`LoraResolution` (None before a choice)."""

    value = traitlets.Instance(LoraResolution, allow_none=True)

    def __init__(self, ws: Workspace | str | Path | None = None, project: str | None = None, *,
                 checkpoint: str | None = None, asset_type: str | None = None):
        super().__init__()
        self.ws = as_workspace(ws)
        self.project = project
        self.checkpoint = widgets.Dropdown(description="Checkpoint")
        self.asset_type = widgets.Dropdown(description="Asset type")
        self.table = widgets.HTML()
        self.rows = widgets.VBox()
        self.notes = widgets.HTML()
        self.controls: dict[str, LoraControls] = {}
        self._edits: dict[str, LoraPick] = {}
        self._quiet = False
        self.checkpoint.observe(self._on_checkpoint, "value")
        self.asset_type.observe(lambda _change: self._show(rebuild=True), "value")
        self.children = [widgets.HBox([self.checkpoint, self.asset_type]), self.table, self.rows, self.notes]
        self.reload(checkpoint=checkpoint, asset_type=asset_type)

    # ---- reading the records ---------------------------------------------------------------------------------
    def reload(self, checkpoint: str | None = None, asset_type: str | None = None) -> None:
        """Read the records again (after a review or a new release) and show the choice anew."""
        store = self.ws.store
        self._project_record = store.read("project", self.project) if self.project else None
        self._loras = load_loras(self.ws, self.project)
        self._weights = locate_weights(self.ws)
        self._checkpoints = {record["id"]: record for _, record in store.iter_records("checkpoint")}
        self._asset_types = load_asset_types(self.ws, self.project)
        keep_checkpoint = checkpoint or self.checkpoint.value
        keep_type = asset_type or self.asset_type.value
        self._quiet = True
        try:
            self.checkpoint.options = [(r.get("name") or i, i) for i, r in self._checkpoints.items()]
            if keep_checkpoint in self._checkpoints:
                self.checkpoint.value = keep_checkpoint
        finally:
            self._quiet = False
        self._offer_asset_types(keep_type)

    def _offer_asset_types(self, keep: str | None) -> None:
        options = asset_type_options(self._checkpoints.get(self.checkpoint.value), self._asset_types)
        self._quiet = True
        try:
            self.asset_type.options = options
            if keep in [type_id for _, type_id in options]:
                self.asset_type.value = keep
        finally:
            self._quiet = False
        self._show(rebuild=True)

    def _on_checkpoint(self, _change) -> None:
        if not self._quiet:
            self._offer_asset_types(self.asset_type.value)

    # ---- the choice ------------------------------------------------------------------------------------------
    def _show(self, rebuild: bool) -> None:
        if self._quiet:
            return
        if self.checkpoint.value is None or self.asset_type.value is None:
            self.value = None
            self.table.value = "<i>choose a checkpoint and an asset type</i>"
            self.rows.children = []
            self.controls = {}
            self.notes.value = ""
            return
        resolution = resolve_loras(self._project_record, self.checkpoint.value, self.asset_type.value, self._loras,
                                   weights=self._weights, picks=list(self._edits.values()))
        self.table.value = _table_html(resolution)
        self.notes.value = "".join(f"<div>⚠ {html.escape(w)}</div>" for w in resolution.warnings)
        if rebuild:
            self._build_controls(resolution)
        self.value = resolution

    def _build_controls(self, resolution: LoraResolution) -> None:
        by_id = {lora["id"]: lora for lora in self._loras}
        strengths = {p.lora_id: p.strength for p in resolution}
        self.controls = {}
        for lora_id in [p.lora_id for p in resolution] + [p.lora_id for p in resolution.not_picked]:
            record = by_id[lora_id]
            edit = self._edits.get(lora_id)
            options = [("policy", POLICY_RELEASE)] + [
                (f"{r['id']} ({r.get('status')})", r["id"]) for r in record.get("releases", [])
                if r.get("status") != "deprecated"
            ]
            release = widgets.Dropdown(options=options, description="release",
                                       value=edit.release_id if edit and edit.release_id else POLICY_RELEASE)
            strength = widgets.FloatSlider(value=strengths.get(lora_id, float(record.get("defaultStrength", 1.0))),
                                           min=0.0, max=2.0, step=0.05, description="strength")
            mark = ("★ " if record.get("recommended") else "") + record.get("name", lora_id)
            row = widgets.HBox([widgets.Label(mark, layout=widgets.Layout(width="14em")), release, strength])
            release.observe(lambda change, i=lora_id: self._edit(i, release_id=change["new"] or None), "value")
            strength.observe(lambda change, i=lora_id: self._edit(i, strength=change["new"]), "value")
            self.controls[lora_id] = LoraControls(lora_id, release, strength, row)
        self.rows.children = [c.row for c in self.controls.values()]

    def _edit(self, lora_id: str, **change) -> None:
        self._edits[lora_id] = replace(self._edits.get(lora_id) or LoraPick(lora_id), **change)
        self._show(rebuild=False)

    # ---- what other cells read ---------------------------------------------------------------------------------
    def prepare(self, pipe, guidance_rescale: float = DEFAULT_GUIDANCE_RESCALE) -> dict:
        """Load the chosen LoRAs into ``pipe`` (a pipeline of the chosen checkpoint), give it the scheduler its
        objective renders with, and return the keyword arguments for ``pipe(...)`` (see
        :func:`~lorakit.select.render_setup`)."""
        from ..errors import SelectionError

        if self.value is None:
            raise SelectionError("choose a checkpoint and an asset type first")
        apply_loras(pipe, self.value)
        return render_setup(self.ws, self.value.checkpoint_id, pipe, guidance_rescale=guidance_rescale)

    @property
    def frame(self):
        """The table shown, as a DataFrame (picked LoRAs in order, then the others and why)."""
        import pandas as pd

        from ..select import SELECTION_COLUMNS

        return self.value.to_frame() if self.value is not None else pd.DataFrame(columns=SELECTION_COLUMNS)

    @property
    def selection(self) -> list[dict]:
        """The picked LoRAs as plain dicts: ``loraId``, ``releaseId``, ``weightsPath``, ``strength``."""
        return [{"loraId": p.lora_id, "releaseId": p.release_id, "weightsPath": p.weights_path,
                 "strength": p.strength} for p in (self.value or [])]


def _table_html(resolution: LoraResolution) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("#", "", "LoRA", "scope", "release", "strength", "why"))
    rows = []
    for i, p in enumerate(resolution, start=1):
        rows.append(_row(str(i), "✓", p.recommended, p.name, p.scope, p.release_id, f"{p.strength:g}", p.reason))
    for left in resolution.not_picked:
        rows.append(_row("", "", left.recommended, left.name, left.scope, left.release_id or "", "", left.reason))
    if not rows:
        return "<i>no LoRA for this checkpoint and asset type</i>"
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _row(order: str, picked: str, recommended: bool, *cells: str) -> str:
    name = ("★ " if recommended else "") + cells[0]
    values = [order, picked, name, *cells[1:]]
    return "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>"
