"""What the beginner wizard decides, without a widget: its pages, the checks that guard them, and the texts it shows.

:class:`~lorakit.widgets.wizard.Wizard` reads its widgets into a :class:`WizardState`, calls these functions and
shows what they return (a refusal, a value, a sentence). Nothing here imports ipywidgets, so every rule of the
wizard can be called (and tested) on its own, on real records.

>>> from lorakit.widgets.steps import check_reachable, WizardState
>>> check_reachable(1, [True, False, False, False, False, False])
>>> check_reachable(3, [True, False, False, False, False, False])
Traceback (most recent call last):
lorakit.errors.WizardRefusal: finish step 2 (Dataset) first: steps cannot be skipped
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..catalog import tag_key
from ..errors import LorakitError, RecordNotFoundError, WizardRefusal
from ..gate import review_state
from ..ids import check_id
from ..loras import checkpoint_conflict, get_lora, get_release
from ..models import checkpoint_family, get_checkpoint
from ..notebook_helpers import checkpoint_weights, is_tiny_checkpoint
from ..train import StepReport, resolve_config
from ..train.settings import WIZARD_FIELDS
from ..workspace import Workspace

STEPS = ("Checkpoint", "Dataset", "Captions", "Preset", "Train", "Evaluate")
TRAIN_STEP = STEPS.index("Train")
CAPTIONS = (("Tags only", "tags"), ("Tags + spec tags", "tags+spec"), ("Tags + spec tags + title", "tags+spec+title"))
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


# ---- moving between pages ------------------------------------------------------------------------------------------
def first_unfinished(done: Sequence[bool], before: int) -> int | None:
    """The first page before page ``before`` (0-based) that is not done, or None.

    >>> first_unfinished([True, False, True], 3), first_unfinished([True, False], 1)
    (1, None)
    """
    return next((j for j in range(before) if not done[j]), None)


def check_reachable(step: int, done: Sequence[bool]) -> None:
    """Refuse to show page ``step`` (0-based) unless every earlier page is done: pages cannot be skipped."""
    if not 0 <= step < len(STEPS):
        raise WizardRefusal(f"there is no step {step + 1}")
    j = first_unfinished(done, step)
    if j is not None:
        raise WizardRefusal(f"finish step {j + 1} ({STEPS[j]}) first: steps cannot be skipped")


# ---- why "Next" refuses ----------------------------------------------------------------------------------------------
def check_page(ws: Workspace, step: int, state: WizardState, preview_items: Sequence[Mapping] = ()) -> None:
    """Refuse to leave page ``step`` when its choice cannot work; ``preview_items`` are the manifest items of
    the latest dry-run build (the captions page checks them)."""
    if step == 0:
        check_checkpoint_ready(ws, state.checkpoint)
    elif step == 1:
        check_dataset_choice(state)
    elif step == 2:
        check_captions(preview_items)
    elif step == 3 and state.config is None:
        raise WizardRefusal("the training settings are not valid (see above)")
    elif step == TRAIN_STEP and not state.release_id:
        raise WizardRefusal("train first: click 'Train'")


def check_checkpoint_ready(ws: Workspace, checkpoint: str | None) -> None:
    """A checkpoint is chosen and its weights are on this machine (the hint says how to get them there)."""
    if not checkpoint:
        raise WizardRefusal("choose a checkpoint")
    record = get_checkpoint(ws, checkpoint)
    path, present = checkpoint_weights(ws, record)
    if not present:
        hint = (" Click 'Build tiny demo weights'." if is_tiny_checkpoint(record)
                else " Register its weights with `lorakit checkpoint add`.")
        raise WizardRefusal(f"the weights of checkpoint {checkpoint} are not on this machine ({path}).{hint}")


def check_dataset_choice(state: WizardState) -> None:
    """At least one asset type, and at least one approved image matching the filters."""
    if not state.asset_types:
        raise WizardRefusal("pick at least one asset type")
    if state.matching == 0:
        raise WizardRefusal("no approved image matches these filters; remove a required tag or pick another asset "
                            "type")


def check_captions(items: Sequence[Mapping]) -> None:
    """Some image gets a caption with the chosen strategy (an empty preview has nothing to judge)."""
    if items and not any(i.get("caption") for i in items):
        raise WizardRefusal("none of the images would get a caption with this strategy; choose one with spec "
                            "tags, or add prompt tokens")


# ---- the dataset and the training settings ---------------------------------------------------------------------------
def dataset_filters(state: WizardState, project: str) -> dict:
    """The :func:`~lorakit.datasets.build_manifest` arguments of the choices on pages 1 to 3."""
    return {"project": project, "status": "approved", "asset_types": list(state.asset_types),
            "checkpoints": [state.checkpoint] if state.same_checkpoint_only else [], "tags": list(state.tags),
            "tag_any": state.tag_any, "caption": state.caption, "with_tokens": state.with_tokens}


def training_config(overrides: Mapping[str, Any]) -> dict | None:
    """The Advanced page's changes as the ``config`` of a run.

    Passed as ``config``, not ``overrides``: steps=None ("from epochs") must replace a preset's steps, and
    ``overrides`` treats None as "not given".
    """
    return dict(overrides) or None


def preset_config(ws: Workspace, checkpoint: str | None, preset: str | None) -> dict:
    """The settings ``preset`` resolves to for ``checkpoint``'s family (empty without a preset or checkpoint)."""
    if not preset or not checkpoint:
        return {}
    return resolve_config(checkpoint_family(get_checkpoint(ws, checkpoint)), preset=preset)


def run_config(ws: Workspace, state: WizardState) -> dict:
    """The resolved config a run with the current choices gets (a bad setting raises)."""
    family = checkpoint_family(get_checkpoint(ws, state.checkpoint))
    return resolve_config(family, preset=state.preset, config=training_config(state.overrides))


def advanced_values(base: Mapping[str, Any]) -> dict[str, Any]:
    """The value of each Advanced field, by setting name, for the preset's resolved config ``base``: an unset
    optional setting shows 0."""
    return {s.name: 0 if base.get(s.name) is None else base[s.name] for s in WIZARD_FIELDS}


def advanced_overrides(values: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The Advanced fields that differ from the preset's resolved config, by setting name.

    A 0 in an optional setting's field means "not set" (None): for steps, "from epochs".

    >>> advanced_overrides({"steps": 0, "rank": 8}, {"steps": 20, "rank": 8})
    {'steps': None}
    """
    overrides = {}
    for setting in WIZARD_FIELDS:
        if setting.name not in values:
            continue
        value = values[setting.name]
        if setting.optional and value == 0:
            value = None
        if value != base.get(setting.name):
            overrides[setting.name] = value
    return overrides


def overrides_text(overrides: Mapping[str, Any]) -> str:
    """The Advanced page's changes in one line (empty when there are none).

    >>> overrides_text({"steps": 3, "rank": 8})
    'steps 3, rank 8'
    """
    return ", ".join(f"{k} {v}" for k, v in overrides.items())


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


# ---- the LoRA a release goes to ----------------------------------------------------------------------------------------
def suggest_lora_id(project: str, asset_types: Sequence[str], checkpoint: str) -> str:
    """A readable LoRA id from the choices (letters, digits, ``_``, ``-``, ``.`` only).

    >>> suggest_lora_id("demo", ["ui_icon"], "tiny-sd15")
    'demo_ui_icon_tiny-sd15'
    """
    text = "_".join([project, *asset_types, checkpoint])
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in text).replace("..", "_")


def suggest_lora_name(project: str, asset_types: Sequence[str]) -> str:
    """A LoRA name from the choices.

    >>> suggest_lora_name("demo", ["ui_icon", "vfx"])
    'demo ui_icon, vfx'
    """
    return f"{project} {', '.join(asset_types)}"


def existing_lora(ws: Workspace, lora_id: str, project: str) -> dict | None:
    """LoRA ``lora_id`` as :func:`~lorakit.loras.ensure_lora` would find it, or None when it would create it."""
    try:
        return get_lora(ws, lora_id, project=project)
    except RecordNotFoundError:
        return None


def lora_choice(ws: Workspace, lora_id_text: str, project: str, checkpoint: str | None) -> tuple[str, str]:
    """``(kind, sentence)`` about the LoRA id typed on the Train page: ``"error"`` when training cannot use it,
    else ``"info"`` saying whether a LoRA is created or a release added to an existing one."""
    try:
        lora_id = check_id(lora_id_text.strip(), "LoRA id")
        existing = existing_lora(ws, lora_id, project)
    except LorakitError as exc:
        return "error", str(exc)
    if existing is None:
        return "info", "a new LoRA record is created"
    if checkpoint_conflict(existing, checkpoint or ""):
        return "error", f"LoRA {lora_id} exists for checkpoint {existing['checkpointId']}: choose another id"
    return "info", f"LoRA {lora_id} exists: a new release is added to its {len(existing['releases'])} release(s)"


def check_training_start(ws: Workspace, state: WizardState, done: Sequence[bool], lora_id_text: str,
                         project: str) -> str:
    """The LoRA id to train under, once pages 1 to 4 are done, nothing was trained yet and the id can take a
    release of the chosen checkpoint."""
    j = first_unfinished(done, TRAIN_STEP)
    if j is not None:
        raise WizardRefusal(f"finish step {j + 1} ({STEPS[j]}) first")
    if state.release_id:
        raise WizardRefusal(f"release {state.release_id} is trained; run the cell again to train another")
    lora_id = check_id(lora_id_text.strip(), "LoRA id")
    existing = existing_lora(ws, lora_id, project)
    conflict = checkpoint_conflict(existing, state.checkpoint or "") if existing else None
    if conflict:
        raise WizardRefusal(f"{conflict}: choose another LoRA id")
    return lora_id


def training_summary(state: WizardState) -> str:
    """What Train will do with the current choices, as HTML (before anything was trained)."""
    cfg = state.config or {}
    steps = cfg.get("steps") or f"{cfg.get('epochs')} epoch(s)"
    return (
        f"<p>Trains on <b>{state.matching}</b> images of {html.escape(', '.join(state.asset_types))} "
        f"(captions: {html.escape(state.caption)}{' + tokens' if state.with_tokens else ''}) with preset "
        f"<b>{html.escape(str(state.preset))}</b> ({steps} steps, rank {cfg.get('rank')}, {cfg.get('resolution')} px) "
        f"on <b>{html.escape(str(state.checkpoint))}</b>. The result is a new <i>candidate</i> release.</p>"
    )


def release_standing(lora: Mapping, release_id: str) -> str:
    """Where a release stands now, in the words the wizard uses: ``candidate``, ``approved``, ``approved and
    active``, ``rejected`` or ``deprecated``, with ``, LoRA recommended`` when the LoRA is.

    >>> release_standing({"releases": [{"id": "r1", "status": "candidate"}]}, "r1")
    'candidate'
    >>> release_standing({"activeReleaseId": "r1", "recommended": True,
    ...                   "releases": [{"id": "r1", "status": "approved"}]}, "r1")
    'approved and active, LoRA recommended'
    """
    state = review_state(get_release(dict(lora), release_id))
    words = {"unreviewed": "candidate"}.get(state, state)
    if lora.get("activeReleaseId") == release_id:
        words += " and active"
        if lora.get("recommended"):
            words += ", LoRA recommended"
    return words


def trained_text(lora: Mapping, release_id: str) -> str:
    """What the Train page says once its release exists: what happened, never what would happen.

    >>> trained_text({"id": "icons", "releases": [{"id": "r1", "status": "candidate"}]}, "r1")
    'release r1 of LoRA icons trained: candidate'
    """
    return f"release {release_id} of LoRA {lora.get('id')} trained: {release_standing(lora, release_id)}"


def dropdown_width(labels: Sequence[str], description_chars: int = 12, minimum_chars: int = 36) -> str:
    """A CSS width that shows the longest of ``labels`` whole beside a description of ``description_chars``
    characters (and the dropdown's arrow).

    >>> dropdown_width(["Tiny SD1.5 (random weights) (tiny-sd15)"])
    '55ch'
    """
    longest = max((len(label) for label in labels), default=0)
    return f"{max(minimum_chars, longest + description_chars + 4)}ch"


def add_required_tag(tags: Sequence[str], typed: str, known: Sequence[str]) -> tuple[str, ...]:
    """The required tags after the user typed ``typed`` and pressed Enter: added once, spelled as the project
    spells it (case aside); a tag no asset of the project has is refused, since it could only match nothing.

    >>> add_required_tag(["a"], " Color:Neon ", ["a", "color:neon"])
    ('a', 'color:neon')
    """
    text = typed.strip()
    if not text:
        return tuple(tags)
    if known:
        key = tag_key(text)
        spelled = next((k for k in known if tag_key(k) == key), None) or next(
            (k for k in known if tag_key(k).lower() == key.lower()), None)
        if spelled is None:
            raise WizardRefusal(f"no asset of this project has the tag {text!r}: pick one from the list as you type")
        text = spelled
    return tuple(tags) if tag_key(text) in {tag_key(t) for t in tags} else (*tags, text)


def next_steps_html(project: str, lora_id: str, release_id: str) -> str:
    """The closing page's "what now": list the LoRAs, write the release's report, pick the LoRA in a notebook."""
    p, lo, r = (html.escape(v) for v in (project, lora_id, release_id))
    return (
        '<p style="margin:0.6em 0 0"><b>What to do next</b></p><ul>'
        f"<li>See your LoRAs: <code>lorakit lora list --project {p}</code></li>"
        f"<li>Write the release's HTML report: <code>lorakit report --lora {lo} --release {r} --project {p}</code></li>"
        "<li>Use it in a notebook: the LoRA picker, <code>from lorakit.widgets import LoraPicker; "
        f"LoraPicker(project=\"{p}\")</code>, or <code>lorakit.resolve_loras</code> (<code>lorakit.select</code>) "
        "from code</li></ul>"
    )


def closing_text(lora: Mapping, release_id: str, project: str) -> tuple[str, str]:
    """``(kind, html)`` of the wizard's closing box once a decision is recorded: what was made and where it
    stands, then what to do next (``ok`` when the release is approved and active, else ``warn``)."""
    standing = release_standing(lora, release_id)
    name = lora.get("name") or lora.get("id")
    made = (f"<b>Done.</b> LoRA <b>{html.escape(str(name))}</b> ({html.escape(str(lora.get('id')))}), release "
            f"<b>{html.escape(release_id)}</b>: {html.escape(standing)}.")
    active = lora.get("activeReleaseId") == release_id
    if not active:
        made += (" It is not active: nothing picks it until it is approved. Train again with new settings or data, "
                 "or click 'Change decision'.")
    return ("ok" if active else "warn"), made + next_steps_html(project, str(lora.get("id")), release_id)


def step_text(report: StepReport) -> str:
    """One training step as the progress line shows it.

    >>> step_text(StepReport(step=2, total=3, epoch=1, loss=0.12345, lr=1e-4, elapsed_s=0.5))
    'step 2 of 3, loss 0.1235'
    """
    return f"step {report.step} of {report.total}, loss {report.loss:.4f}"


# ---- after the review ----------------------------------------------------------------------------------------------------
def review_outcome(lora: dict, release_id: str) -> tuple[str, bool]:
    """``(review state, done)`` of the wizard's release: the last page is done once the release is approved
    and active."""
    state = review_state(get_release(lora, release_id))
    return state, state == "approved" and lora.get("activeReleaseId") == release_id


__all__ = [
    "CAPTIONS", "STEPS", "TINY_PRESET", "TRAIN_STEP", "WizardState", "advanced_overrides", "advanced_values",
    "add_required_tag", "check_captions", "check_checkpoint_ready", "check_dataset_choice", "check_page",
    "check_reachable", "check_training_start", "closing_text", "dataset_filters", "dropdown_width", "existing_lora",
    "first_unfinished", "lora_choice", "next_steps_html", "overrides_text", "preset_config", "preset_options",
    "release_standing", "review_outcome", "run_config", "step_text", "suggest_lora_id", "suggest_lora_name",
    "trained_text", "training_config", "training_summary",
]
