"""LoRA records and their releases.

A LoRA record says which checkpoint a LoRA is for and which asset types it serves; each training run that
finishes appends one *release* (status ``candidate``) that points at its weights file. Where records live
(``docs/data-model.md``): baseline LoRAs in ``data/shared/loras/<id>.json``, project LoRAs in
``data/projects/<project>/loras/<id>.json``.

This module only creates and reads records and appends releases; the review gate (approve, deprecate,
recommend, activate: ``lorakit/gate.py``) builds on :func:`get_lora` and :func:`update_release`.

>>> import lorakit                                                                  # doctest: +SKIP
>>> ws = lorakit.open_workspace()                                                   # doctest: +SKIP
>>> lorakit.create_lora(ws, "hero", name="Hero style", scope="project", project="demo",
...                     checkpoint="sd15_base", asset_types=["character"])          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import RecordError, RecordNotFoundError
from .ids import check_id, given_or_new_id
from .store import now_iso
from .workspace import Workspace, as_workspace

SCOPES = ("baseline", "project")
RELEASE_STATUSES = ("candidate", "approved", "deprecated")


def lora_location(scope: str, project: str | None) -> str | None:
    """The ``project`` argument the store needs for a LoRA of ``scope`` (``None`` = the shared folder).

    >>> lora_location("baseline", None) is None
    True
    >>> lora_location("project", "demo")
    'demo'
    """
    if scope not in SCOPES:
        raise RecordError(f"unknown LoRA scope {scope!r} (expected baseline or project)")
    if scope == "project":
        if not project:
            raise RecordError("a project LoRA needs a project: give --project")
        return check_id(project, "project id")
    return None


def create_lora(
    ws: Workspace | str | Path | None,
    lora_id: str | None,
    *,
    name: str,
    scope: str,
    checkpoint: str,
    asset_types: Sequence[str],
    project: str | None = None,
    recommended: bool | None = None,
) -> dict:
    """Create a LoRA record with no releases yet and return it.

    ``lora_id=None`` makes a new ULID. The checkpoint must exist in the registry and, for a project LoRA,
    the project must exist. An existing record with the same id is never overwritten.
    """
    ws = as_workspace(ws)
    where = lora_location(scope, project)
    lora_id = given_or_new_id(lora_id, "LoRA id")
    check_id(checkpoint, "checkpoint id")
    if not ws.store.exists("checkpoint", checkpoint):
        raise RecordNotFoundError(
            f"checkpoint {checkpoint!r} is not in the registry ({ws.store.path('checkpoint', checkpoint)})"
        )
    if where is not None and not ws.store.exists("project", where):
        raise RecordNotFoundError(f"project {where!r} does not exist")
    types = [t.strip() for t in asset_types if t and t.strip()]
    if not types:
        raise RecordError("a LoRA needs at least one asset type (--asset-types)")
    now = now_iso()
    record: dict = {
        "id": lora_id, "name": name, "createdAt": now, "updatedAt": now, "scope": scope,
        **({"projectId": where} if where else {}),
        "checkpointId": checkpoint, "assetTypes": types, "releases": [],
    }
    if recommended is not None:
        record["recommended"] = recommended
    ws.store.write("lora", record, project=where, create=True)
    return record


def find_lora(ws: Workspace | str | Path | None, lora_id: str, project: str | None = None,
              scope: str | None = None) -> tuple[dict, str | None]:
    """Find a LoRA and say where it lives: ``(record, project or None)``.

    With ``scope`` the LoRA is looked up only there; without it a project's LoRAs are searched before the
    shared (baseline) ones, so ``--project`` alone finds both kinds.
    """
    ws = as_workspace(ws)
    check_id(lora_id, "LoRA id")
    if scope is not None:
        where = lora_location(scope, project)
        return ws.store.read("lora", lora_id, project=where), where
    places = ([project] if project else []) + [None]
    for where in places:
        if ws.store.exists("lora", lora_id, project=where):
            return ws.store.read("lora", lora_id, project=where), where
    searched = " and ".join(f"project {p!r}" if p else "the shared scope" for p in places)
    raise RecordNotFoundError(f"LoRA {lora_id!r} not found in {searched}")


def get_lora(ws: Workspace | str | Path | None, lora_id: str, project: str | None = None,
             scope: str | None = None) -> dict:
    """One LoRA record (see :func:`find_lora` for where it is looked up)."""
    return find_lora(ws, lora_id, project=project, scope=scope)[0]


def checkpoint_conflict(record: dict, checkpoint: str) -> str | None:
    """Why LoRA ``record`` cannot take a release trained on ``checkpoint``, or None when it can (pure).

    >>> checkpoint_conflict({"id": "hero", "checkpointId": "sd15_base"}, "sdxl_base")
    'LoRA hero is for checkpoint sd15_base, not sdxl_base'
    """
    if record.get("checkpointId") == checkpoint:
        return None
    return f"LoRA {record.get('id')} is for checkpoint {record.get('checkpointId')}, not {checkpoint}"


def ensure_lora(
    ws: Workspace | str | Path | None,
    lora_id: str,
    *,
    name: str,
    scope: str,
    project: str | None,
    checkpoint: str,
    asset_types: Sequence[str],
) -> tuple[dict, bool]:
    """The LoRA a new release of ``checkpoint`` goes to: ``(record, created)``.

    An existing LoRA ``lora_id`` (looked up as :func:`find_lora` does) is returned as it is; one made for
    another checkpoint is refused, since a LoRA only works with the checkpoint it was trained on. Otherwise
    the LoRA is created with ``name``, ``scope`` and ``asset_types`` (see :func:`create_lora`).

    >>> record, created = ensure_lora(ws, "hero", name="Hero style", scope="project", project="demo",
    ...                               checkpoint="sd15_base", asset_types=["character"])   # doctest: +SKIP
    """
    ws = as_workspace(ws)
    try:
        record = get_lora(ws, lora_id, project=project)
    except RecordNotFoundError:
        return create_lora(ws, lora_id, name=name, scope=scope, checkpoint=checkpoint, asset_types=asset_types,
                           project=project), True
    conflict = checkpoint_conflict(record, checkpoint)
    if conflict:
        raise RecordError(f"{conflict}: choose another LoRA id")
    return record, False


def get_release(record: dict, release_id: str) -> dict:
    """The release ``release_id`` of a LoRA record (the one release finder); an unknown id lists the releases
    there are."""
    for release in record.get("releases", []):
        if release.get("id") == release_id:
            return release
    known = ", ".join(str(r.get("id", "?")) for r in record.get("releases", [])) or "none"
    raise RecordNotFoundError(f"LoRA {record.get('id')!r} has no release {release_id!r} (releases: {known})")


def has_release(record: dict, release_id: str) -> bool:
    """Whether a LoRA record has release ``release_id`` (:func:`get_release` finds it)."""
    try:
        get_release(record, release_id)
    except RecordNotFoundError:
        return False
    return True


def recorded_sha256(release: dict) -> str | None:
    """The sha256 a release records for its weights (lower-case), or None when it records none.

    >>> recorded_sha256({"weights": {"sha256": "AB" * 32}})[:4], recorded_sha256({})
    ('abab', None)
    """
    recorded = release.get("sha256") or (release.get("weights") or {}).get("sha256")
    return recorded.lower() if isinstance(recorded, str) and recorded else None


def adapter_name(lora_id: str, release_id: str, sha256: str | None) -> str:
    """The peft adapter name of a release in a pipeline: letters, digits and ``_`` only (peft module keys
    forbid ``.``), plus the start of the weights' sha256, so two releases never share a name (``a.b`` and
    ``a_b`` both sanitize to ``a_b``) and a warm pipeline loads a replaced file again instead of reusing it.

    >>> adapter_name("ui.icons", "r-1", "ab" * 32)
    'ui_icons__r_1__abababab'
    """
    short = (sha256 or hashlib.sha1(f"{lora_id}/{release_id}".encode()).hexdigest())[:8]
    return f"{_UNSAFE.sub('_', lora_id)}__{_UNSAFE.sub('_', release_id)}__{short}"


_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def make_release(release_id: str, *, weights: dict, sha256: str, training: dict, notes: str | None = None,
                 created_at: str | None = None) -> dict:
    """A new ``candidate`` release entry (pure; :func:`add_release` stores it)."""
    release = {
        "id": check_id(release_id, "release id"), "createdAt": created_at or now_iso(), "status": "candidate",
        "weights": {**weights, "sha256": sha256}, "sha256": sha256,
        "training": training, "evaluation": {"status": "pending"},
    }
    if notes:
        release["notes"] = notes
    return release


def add_release(ws: Workspace | str | Path | None, lora_id: str, release: dict, *, project: str | None = None,
                set_active: bool = False) -> dict:
    """Append ``release`` to the LoRA (under the record's lock) and return the updated record.

    ``project`` is where the LoRA lives (``None`` for a baseline LoRA). A release id that already exists is
    an error, so a retried call never records a run twice. ``set_active`` also sets ``activeReleaseId``.
    """
    ws = as_workspace(ws)

    def append(record: dict) -> dict:
        if has_release(record, release["id"]):
            raise RecordError(f"LoRA {lora_id!r} already has a release {release['id']!r}")
        record.setdefault("releases", []).append(release)
        if set_active:
            record["activeReleaseId"] = release["id"]
        return record

    return ws.store.update("lora", lora_id, append, project=project)


def update_release(ws: Workspace | str | Path | None, lora_id: str, release_id: str,
                   change: Callable[[dict], dict | None], *, project: str | None = None) -> dict:
    """Change one release in place (locked read-modify-write); returns the updated LoRA record."""
    ws = as_workspace(ws)

    def apply(record: dict) -> dict:
        release = get_release(record, release_id)
        releases = record["releases"]
        changed = change(release)
        position = next(i for i, r in enumerate(releases) if r is release)
        releases[position] = release if changed is None else changed
        return record

    return ws.store.update("lora", lora_id, apply, project=project)


# ---- a release's validation drop ------------------------------------------------------------------------------
# What a reviewer reads beside the grid. The trainer writes ``training.validation``; releases trained before it,
# and those of the kohya_ss and manual adapters, have none. Records come from a shared data folder, so every
# value is checked: a missing or non-number field is unknown (None here, "?" in the text), never an error.
VALIDATION_SETS = {"heldOut": "held-out", "training": "training"}


def _finite(value: object) -> float | None:
    # bool is an int to Python, but a loss of True is a broken record, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: object) -> int | None:
    number = _finite(value)
    return int(number) if number is not None and number >= 0 and number == int(number) else None


def release_validation(release: object) -> dict | None:
    """A release's ``training.validation`` block, or None when it has none (or the record is malformed there).

    >>> release_validation({"training": {"validation": {"drop": 0.3}}}), release_validation({"training": "x"})
    ({'drop': 0.3}, None)
    """
    training = release.get("training") if isinstance(release, dict) else None
    validation = training.get("validation") if isinstance(training, dict) else None
    return validation if isinstance(validation, dict) else None


def validation_facts(validation: object) -> dict | None:
    """The checked numbers of a ``training.validation`` block (or of an eval's copy of its headline), or None
    when there is no block.

    Keys: ``set`` (``heldOut``, ``training`` or None), ``images``, ``baseLoss``, ``finalLoss``, ``drop``,
    ``bestStep``, ``bestLoss``, ``stoppedEarly`` (True only when recorded as true), ``stoppedAt`` (the last scored
    step of a run that stopped early), ``training`` (the training set's ``images``/``baseLoss``/``finalLoss``/
    ``drop`` beside a held-out headline, else None) and ``curve`` (the points whose step and loss are numbers,
    as ``{step, epoch, loss, trainingLoss}``). A value that is missing or not a finite number is None.

    >>> validation_facts({"set": "training", "images": 8, "baseLoss": "0.1", "drop": 0.25})["baseLoss"] is None
    True
    """
    if not isinstance(validation, dict):
        return None
    points = validation.get("curve")
    curve: list[dict] = []
    for point in points if isinstance(points, list) else []:
        if not isinstance(point, dict):
            continue
        step, loss = _count(point.get("step")), _finite(point.get("loss"))
        if step is not None and loss is not None:
            curve.append({"step": step, "epoch": _count(point.get("epoch")), "loss": loss,
                          "trainingLoss": _finite(point.get("trainingLoss"))})
    stopped_early = validation.get("stoppedEarly") is True
    stopped_at = _count(validation.get("stoppedAt"))
    if stopped_at is None and stopped_early and curve:
        stopped_at = int(curve[-1]["step"])  # the trainer's block: the run stopped after its last score
    training = validation.get("training")
    return {
        "set": validation.get("set") if validation.get("set") in VALIDATION_SETS else None,
        "images": _count(validation.get("images")),
        **{key: _finite(validation.get(key)) for key in ("baseLoss", "finalLoss", "drop", "bestLoss")},
        "bestStep": _count(validation.get("bestStep")),
        "stoppedEarly": stopped_early,
        "stoppedAt": stopped_at if stopped_early else None,
        "training": ({"images": _count(training.get("images")),
                      **{key: _finite(training.get(key)) for key in ("baseLoss", "finalLoss", "drop")}}
                     if isinstance(training, dict) else None),
        "curve": curve,
    }


def validation_summary(validation: object, *, ascii_only: bool = False) -> str:
    """The one-line text every display shows for a release's validation drop (``training.validation``, or an
    eval's copy of it): ``"no validation"`` when there is none, ``?`` for each value that is unknown.
    ``ascii_only`` spells the arrow and minus sign in ASCII, for fonts without them (the contact sheet's).

    >>> validation_summary({"set": "heldOut", "images": 2, "baseLoss": 0.117, "finalLoss": 0.079, "drop": 0.327})
    'validation loss 0.117 → 0.079 (−32.7%) on 2 held-out images'
    >>> validation_summary({"set": "training", "images": 10, "baseLoss": 0.2, "finalLoss": 0.15, "drop": 0.25,
    ...                     "stoppedEarly": True, "curve": [{"step": 0, "loss": 0.2}, {"step": 90, "loss": 0.16}]})
    'validation loss 0.2 → 0.15 (−25.0%) on the 10 training images (stopped early at step 90)'
    >>> validation_summary({"set": "training", "images": 9, "baseLoss": 1.1534, "finalLoss": 1.1497, "drop": 0.0032})
    'validation loss 1.153 → 1.15 (−0.3%) on the 9 training images'
    >>> validation_summary(None), validation_summary({"baseLoss": "high"})
    ('no validation', 'validation loss ? → ? (?) on ? images')
    """
    facts = validation_facts(validation)
    if facts is None:
        return "no validation"
    arrow, minus = ("->", "-") if ascii_only else ("→", "−")

    # Three significant digits, more when base and final would read the same (a small drop on a large loss):
    # "1.15 -> 1.15 (-0.3%)" would contradict itself.
    base, final = facts["baseLoss"], facts["finalLoss"]
    digits = next((d for d in range(3, 7) if base is None or final is None or f"{base:.{d}g}" != f"{final:.{d}g}"), 6)

    def loss(value: float | None) -> str:
        return "?" if value is None else f"{value:.{digits}g}"

    # A drop is a fall in loss, shown as the loss's change: a drop of 0.327 is -32.7%, a rise is +.
    percent = None if facts["drop"] is None else _finite(-facts["drop"] * 100)
    if percent is None:
        change = "?"
    elif round(percent, 1) == 0:
        change = "0.0%"
    else:  # a diverged run can rise by orders of magnitude: keep its change short
        change = (f"{percent:+.1f}%" if abs(percent) < 1000 else f"{percent:+.3g}%").replace("-", minus)
    count = "?" if facts["images"] is None else str(facts["images"])
    noun = "image" if facts["images"] == 1 else "images"
    where = {"heldOut": f"{count} held-out {noun}", "training": f"the {count} training {noun}"}.get(
        facts["set"] or "", f"{count} {noun}")
    text = f"validation loss {loss(facts['baseLoss'])} {arrow} {loss(facts['finalLoss'])} ({change}) on {where}"
    if facts["stoppedEarly"]:
        text += f" (stopped early at step {facts['stoppedAt']})" if facts["stoppedAt"] is not None \
            else " (stopped early)"
    return text

