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
