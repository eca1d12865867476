"""The release lifecycle of a LoRA: review, activate, deprecate, recommend.

A release is trained as a ``candidate``; an eval grid of it is rendered (``evals.py``); a person reviews the
grid and approves or rejects it; an approved release can become the LoRA's ``activeReleaseId``; a LoRA whose
active release is approved and evaluated can be ``recommended``; a release that should no longer be used is
``deprecated`` (for good: there is no way back, train or re-release instead).

Each transition is one :meth:`Store.update` of the LoRA record (locked, validated, atomic). The decisions are
pure functions (``review``, ``activate``, ``deprecate``, ``recommend``) over the LoRA record and the eval
records of the release; the ``*_release`` functions around them do the reading and writing.

What lands in ``release.evaluation`` (kept as a history, never overwritten)::

    "evaluation": {
      "status": "rejected",                        # summary: pending (set by loras.py) until the first review,
                                                   # then the latest outcome
      "evalIds": ["01J..."],                       # evals of this release (linked by evals.py and by reviews)
      "reviews": [                                 # one entry per review, oldest first, append-only
        {"outcome": "approved", "reviewer": "ana", "at": "2026-...Z", "evalIds": ["01J..."], "notes": "..."},
        {"outcome": "rejected", "reviewer": "bo", "at": "...", "evalIds": [], "notes": "why",
         "forced": true, "overrode": ["no complete eval of release r2 (evals: 01J... running)"]}
      ],
      "overrides": [                               # forced transitions other than reviews, append-only
        {"action": "activate", "by": "bo", "at": "...", "notes": "why",
         "overrode": ["release r2 is an unreviewed candidate"]}
      ]
    }

Invariants every transition keeps: ``activeReleaseId`` names an existing, non-deprecated release that was not
rejected in its latest review; ``recommended`` is true only while the active release is approved and has a
complete eval. A transition that would break one of them clears the field and says so.
"""

from __future__ import annotations

import copy
import getpass
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import GateRefusal, LorakitError, RecordNotFoundError
from .ids import check_id
from .loras import get_release, has_release
from .store import Store, now_iso
from .workspace import Workspace, as_workspace

OUTCOMES = ("approved", "rejected")


class _NoChange(Exception):
    """Raised inside a store update to leave the record untouched (the transition was a no-op)."""

    def __init__(self, messages: list[str]):
        super().__init__("no change")
        self.messages = messages


@dataclass
class GateResult:
    """The LoRA record after a transition and what happened, in sentences for the user."""

    lora: dict
    messages: list[str] = field(default_factory=list)
    changed: bool = True


# ---- reading the lifecycle state (pure) ----------------------------------------------------------------------
def reviews_of(release: dict) -> list[dict]:
    """The review history of a release, oldest first (empty when it was never reviewed)."""
    evaluation = release.get("evaluation") or {}
    reviews = evaluation.get("reviews")
    return list(reviews) if isinstance(reviews, list) else []


def latest_review(release: dict) -> dict | None:
    """The most recent review of a release, or None."""
    reviews = reviews_of(release)
    return reviews[-1] if reviews else None


def review_state(release: dict) -> str:
    """``"approved"``, ``"rejected"``, ``"unreviewed"`` or ``"deprecated"``: where a release stands in the gate.

    The status field is the source of truth for approved and deprecated (records written by other tools may
    have no review history); a candidate is "rejected" when its latest review rejected it.

    >>> review_state({"id": "r1", "status": "candidate", "evaluation": {"reviews": [{"outcome": "rejected"}]}})
    'rejected'
    """
    status = release.get("status")
    if status in ("approved", "deprecated"):
        return status
    last = latest_review(release)
    return "rejected" if last and last.get("outcome") == "rejected" else "unreviewed"


def linked_eval_ids(release: dict) -> list[str]:
    """The eval ids linked from ``release.evaluation.evalIds``, in order."""
    ids = (release.get("evaluation") or {}).get("evalIds")
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def eval_state(evals: Iterable[dict]) -> str:
    """The best state among a release's evals: ``complete`` > ``running`` > ``pending`` > ``none``.

    >>> eval_state([{"status": "pending"}, {"status": "complete"}])
    'complete'
    """
    statuses = {e.get("status") for e in evals}
    for state in ("complete", "running", "pending"):
        if state in statuses:
            return state
    return "none"


def _describe_evals(evals: Sequence[dict]) -> str:
    return ", ".join(f"{e.get('id')} {e.get('status')}" for e in evals) if evals else "none found"


def recommendation_problems(lora: dict, active_evals: Sequence[dict]) -> list[str]:
    """Why ``lora`` cannot be recommended (empty when it can), given the evals of its active release."""
    active_id = lora.get("activeReleaseId")
    if not active_id:
        return [f"LoRA {lora.get('id')!r} has no active release (activate an approved release first)"]
    if not has_release(lora, active_id):
        return [f"active release {active_id!r} does not exist in LoRA {lora.get('id')!r}"]
    release = get_release(lora, active_id)
    problems = []
    state = review_state(release)
    if state != "approved":
        problems.append(f"active release {active_id!r} is not approved (it is {state})")
    if eval_state(active_evals) != "complete":
        problems.append(f"active release {active_id!r} has no complete eval (evals: {_describe_evals(active_evals)})")
    return problems


# ---- transitions (pure: record in, new record and messages out) ------------------------------------------------
def _evaluation(release: dict) -> dict:
    evaluation = release.get("evaluation")
    if not isinstance(evaluation, dict):
        evaluation = release["evaluation"] = {}
    return evaluation


def _drop_active(lora: dict, why: str, messages: list[str]) -> None:
    """Clear ``activeReleaseId`` (and ``recommended``, which depends on it), saying so."""
    active = lora.pop("activeReleaseId", None)
    messages.append(f"{why}: activeReleaseId {active!r} cleared; LoRA {lora['id']!r} has no active release now")
    if lora.get("recommended"):
        lora["recommended"] = False
        messages.append(f"LoRA {lora['id']!r} is no longer recommended (it has no active release)")


def _check_eval_refs(lora_id: str, release_id: str, evals: Sequence[dict]) -> None:
    for ev in evals:
        if ev.get("loraId") != lora_id or ev.get("releaseId") != release_id:
            raise GateRefusal(
                f"eval {ev.get('id')!r} is of LoRA {ev.get('loraId')!r} release {ev.get('releaseId')!r}, "
                f"not of LoRA {lora_id!r} release {release_id!r}"
            )


def review(
    lora: dict, release_id: str, outcome: str, evals: Sequence[dict], *, reviewer: str, at: str,
    notes: str | None = None, chosen_evals: bool = False, force: bool = False,
) -> tuple[dict, list[str]]:
    """Record a review of ``release_id`` and move the release to ``approved`` or out of use.

    ``evals`` are the evals the reviewer looked at (``chosen_evals=True``: named by the reviewer, each must be
    complete) or every eval of the release (at least one must be complete; the complete ones are recorded).
    ``force`` with ``notes`` records the review although that condition fails; a deprecated release, an
    unknown release or an eval of another release are refused even then.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    lora = copy.deepcopy(lora)
    release = get_release(lora, release_id)
    if release.get("status") == "deprecated":
        raise GateRefusal(f"release {release_id!r} of LoRA {lora['id']!r} is deprecated; it cannot be reviewed")
    _check_eval_refs(lora["id"], release_id, evals)
    complete = [e for e in evals if e.get("status") == "complete"]
    missing: list[str] = []
    if chosen_evals:
        missing += [f"eval {e.get('id')!r} of release {release_id!r} is {e.get('status')}, not complete"
                    for e in evals if e.get("status") != "complete"]
    elif not complete:
        missing.append(f"no complete eval of release {release_id!r} (evals: {_describe_evals(evals)})")
    if missing and not force:
        raise GateRefusal(
            "cannot review: " + "; ".join(missing) + ". Render and finish an eval grid of the release first, "
            "or pass --force with --notes saying why"
        )
    if missing and not (notes and notes.strip()):
        raise GateRefusal("--force needs --notes saying why the review goes ahead without a complete eval")

    looked_at = [e["id"] for e in (evals if chosen_evals else complete)]
    entry: dict = {"outcome": outcome, "reviewer": reviewer, "at": at, "evalIds": looked_at}
    if notes:
        entry["notes"] = notes
    if missing:
        entry["forced"] = True
        entry["overrode"] = missing
    evaluation = _evaluation(release)
    evaluation["reviews"] = [*reviews_of(release), entry]
    # ``status`` is the summary loras.py starts at "pending"; the history above is the record of truth.
    evaluation["status"] = outcome
    # Evals found by scanning (not yet linked by evals.py) become linked once someone has reviewed them.
    evaluation["evalIds"] = linked_eval_ids(release) + [i for i in looked_at if i not in linked_eval_ids(release)]

    messages = []
    if missing:
        messages.append(f"override recorded: {'; '.join(missing)} (notes: {notes})")
    was = release["status"]
    if outcome == "approved":
        release["status"] = "approved"
        messages.append(f"release {release_id!r} of LoRA {lora['id']!r} approved by {reviewer}"
                        + (" (was already approved; review added to the history)" if was == "approved" else ""))
    else:
        # The data model has no "rejected" status: a rejected release is a candidate whose latest review
        # rejected it, which keeps it out of every automatic pick (only approved releases are picked).
        release["status"] = "candidate"
        messages.append(f"release {release_id!r} of LoRA {lora['id']!r} rejected by {reviewer}"
                        + ("; it was approved and is now out of use" if was == "approved" else ""))
        if lora.get("activeReleaseId") == release_id:
            _drop_active(lora, f"release {release_id!r} was rejected", messages)
    return lora, messages


def activate(
    lora: dict, release_id: str, *, at: str, actor: str, force: bool = False, notes: str | None = None,
) -> tuple[dict, list[str]]:
    """Make ``release_id`` the active release. Only approved releases, unless ``force`` (recorded)."""
    lora = copy.deepcopy(lora)
    release = get_release(lora, release_id)
    state = review_state(release)
    if state == "deprecated":
        raise GateRefusal(f"release {release_id!r} of LoRA {lora['id']!r} is deprecated; it cannot be activated")
    if lora.get("activeReleaseId") == release_id:
        raise _NoChange([f"release {release_id!r} is already the active release of LoRA {lora['id']!r}"])
    messages = []
    if state != "approved":
        why = (f"release {release_id!r} is an unreviewed candidate" if state == "unreviewed"
               else f"release {release_id!r} was rejected in its latest review")
        if not force:
            raise GateRefusal(f"cannot activate: {why}; approve it with `lorakit lora review` first, "
                              "or pass --force (recorded)")
        override = {"action": "activate", "by": actor, "at": at, "overrode": [why]}
        if notes:
            override["notes"] = notes
        evaluation = _evaluation(release)
        evaluation["overrides"] = [*(evaluation.get("overrides") or []), override]
        messages.append(f"override recorded: {why}")
    previous = lora.get("activeReleaseId")
    lora["activeReleaseId"] = release_id
    messages.append(f"release {release_id!r} is now the active release of LoRA {lora['id']!r}"
                    + (f" (was {previous!r})" if previous else ""))
    return lora, messages


def deprecate(
    lora: dict, release_id: str, *, at: str, actor: str, notes: str | None = None,
) -> tuple[dict, list[str]]:
    """Mark ``release_id`` deprecated (never picked again); deprecating the active release clears it."""
    lora = copy.deepcopy(lora)
    release = get_release(lora, release_id)
    if release.get("status") == "deprecated":
        raise _NoChange([f"release {release_id!r} of LoRA {lora['id']!r} is already deprecated"])
    release["status"] = "deprecated"
    release["deprecation"] = {"at": at, "by": actor, **({"notes": notes} if notes else {})}
    messages = [f"release {release_id!r} of LoRA {lora['id']!r} deprecated"]
    if lora.get("activeReleaseId") == release_id:
        _drop_active(lora, f"release {release_id!r} was the active release", messages)
    return lora, messages


def recommend(lora: dict, on: bool, active_evals: Sequence[dict]) -> tuple[dict, list[str]]:
    """Set or clear ``recommended``. Setting needs an approved active release with a complete eval."""
    lora = copy.deepcopy(lora)
    if not on:
        if not lora.get("recommended"):
            raise _NoChange([f"LoRA {lora['id']!r} is not recommended"])
        lora["recommended"] = False
        return lora, [f"LoRA {lora['id']!r} is no longer recommended"]
    problems = recommendation_problems(lora, active_evals)
    if problems:
        raise GateRefusal(f"cannot recommend LoRA {lora['id']!r}: " + "; ".join(problems))
    if lora.get("recommended"):
        raise _NoChange([f"LoRA {lora['id']!r} is already recommended"])
    lora["recommended"] = True
    return lora, [f"LoRA {lora['id']!r} is recommended (active release {lora['activeReleaseId']!r})"]


def _keep_recommendation_valid(lora: dict, active_evals: Sequence[dict], messages: list[str]) -> None:
    if lora.get("recommended") and recommendation_problems(lora, active_evals):
        lora["recommended"] = False
        messages.append(f"LoRA {lora['id']!r} is no longer recommended: "
                        + "; ".join(recommendation_problems(lora, active_evals)))


# ---- locating records (I/O) ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraLocation:
    """Where a LoRA record lives: ``project`` is the store scope (None: shared, i.e. a baseline LoRA)."""

    lora_id: str
    project: str | None


def check_lora_scope(lora: dict, folder_project: str | None) -> None:
    """Refuse a LoRA record whose ``scope``/``projectId`` contradict the folder it was read from."""
    lora_id, scope = lora.get("id"), lora.get("scope")
    if folder_project is None and scope != "baseline":
        raise GateRefusal(f"LoRA {lora_id!r} is in the shared folder but has scope {scope!r} (expected baseline)")
    if folder_project is not None:
        if scope != "project":
            raise GateRefusal(f"LoRA {lora_id!r} is in project {folder_project!r} but has scope {scope!r} "
                              "(expected project; baseline LoRAs live in data/shared/loras)")
        if lora.get("projectId", folder_project) != folder_project:
            raise GateRefusal(f"LoRA {lora_id!r} is in project {folder_project!r} but names projectId "
                              f"{lora.get('projectId')!r}")


def locate_lora(store: Store, lora_id: str, project: str | None = None) -> LoraLocation:
    """Find LoRA ``lora_id``: in ``project`` first, then among the baseline (shared) LoRAs.

    A LoRA that is only in another project is refused with the project it belongs to.
    """
    check_id(lora_id, "LoRA id")
    if project is not None:
        check_id(project, "project id")
        if store.exists("lora", lora_id, project):
            return LoraLocation(lora_id, project)
    if store.exists("lora", lora_id):
        return LoraLocation(lora_id, None)
    owners = [p for p in store.list_projects() if p != project and store.exists("lora", lora_id, p)]
    if owners:
        hint = f"pass --project {owners[0]}" if project is None else f"it is not shared with project {project!r}"
        raise GateRefusal(f"LoRA {lora_id!r} belongs to project {', '.join(owners)} ({hint})")
    where = f"project {project!r} or the shared LoRAs" if project else "the shared LoRAs (pass --project?)"
    raise RecordNotFoundError(f"LoRA {lora_id!r} not found in {where}")


def eval_scopes(location: LoraLocation, project: str | None) -> list[str | None]:
    """Where the evals of a LoRA live: its own scope, then (for a baseline LoRA used by a project) the project."""
    scopes: list[str | None] = [location.project]
    if project is not None and project != location.project:
        scopes.append(project)
    return scopes


def read_eval(store: Store, eval_id: str, scopes: Sequence[str | None]) -> dict:
    """Eval ``eval_id`` from the first scope that has it."""
    check_id(eval_id, "eval id")
    for scope in scopes:
        if store.exists("eval", eval_id, scope):
            return store.read("eval", eval_id, scope)
    where = " or ".join("the shared evals" if s is None else f"project {s!r}" for s in scopes)
    raise RecordNotFoundError(f"eval {eval_id!r} not found in {where}")


def evals_of_release(store: Store, lora_id: str, release: dict, scopes: Sequence[str | None]) -> list[dict]:
    """Every eval of one release: those linked from ``evaluation.evalIds`` and any eval record naming it.

    A linked eval whose file is gone is left out here (``lorakit validate`` reports dangling links).
    """
    found: dict[str, dict] = {}
    for eval_id in linked_eval_ids(release):
        try:
            found[eval_id] = read_eval(store, eval_id, scopes)
        except RecordNotFoundError:
            continue
    for scope in scopes:
        for _, ev in store.iter_records("eval", scope):
            if ev.get("loraId") == lora_id and ev.get("releaseId") == release.get("id"):
                found.setdefault(ev["id"], ev)
    return list(found.values())


def default_actor() -> str:
    """Who is doing this, when no ``--reviewer`` is given: ``LORAKIT_USER``, else the login name."""
    try:
        return os.environ.get("LORAKIT_USER") or getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


# ---- transitions on the store (I/O edges) ----------------------------------------------------------------------
def _transition(
    ws: Workspace, lora_id: str, project: str | None, step: Callable[[dict, LoraLocation], tuple[dict, list[str]]],
) -> GateResult:
    """Run ``step`` on the current LoRA record under its lock and write the result (or nothing on a no-op)."""
    location = locate_lora(ws.store, lora_id, project)
    outcome: list[str] = []

    def change(current: dict) -> dict:
        check_lora_scope(current, location.project)
        new, messages = step(current, location)
        outcome.extend(messages)
        return new

    try:
        record = ws.store.update("lora", lora_id, change, location.project)
    except _NoChange as same:
        return GateResult(ws.store.read("lora", lora_id, location.project), same.messages, changed=False)
    return GateResult(record, outcome)


def review_release(
    ws: Workspace | str | Path | None, lora_id: str, release_id: str, *, approve: bool,
    project: str | None = None, notes: str | None = None, reviewer: str | None = None,
    eval_ids: Sequence[str] | None = None, force: bool = False,
) -> GateResult:
    """Approve or reject a release after looking at its eval grid (``lorakit lora review``).

    >>> review_release("data", "ui_icons", "r2", approve=True, reviewer="ana", notes="crisp")  # doctest: +SKIP
    """
    ws = as_workspace(ws)
    check_id(release_id, "release id")
    reviewer = reviewer or default_actor()
    at = now_iso()

    def step(lora: dict, location: LoraLocation) -> tuple[dict, list[str]]:
        release = get_release(lora, release_id)
        scopes = eval_scopes(location, project)
        if eval_ids:
            evals = [read_eval(ws.store, e, scopes) for e in dict.fromkeys(eval_ids)]
        else:
            evals = evals_of_release(ws.store, lora_id, release, scopes)
        new, messages = review(lora, release_id, "approved" if approve else "rejected", evals, reviewer=reviewer,
                               at=at, notes=notes, chosen_evals=bool(eval_ids), force=force)
        if new.get("activeReleaseId") == release_id:
            _keep_recommendation_valid(new, evals, messages)
        return new, messages

    return _transition(ws, lora_id, project, step)


def activate_release(
    ws: Workspace | str | Path | None, lora_id: str, release_id: str, *, project: str | None = None,
    force: bool = False, notes: str | None = None, actor: str | None = None,
) -> GateResult:
    """Set the LoRA's ``activeReleaseId`` (``lorakit lora activate``); a candidate only with ``force``."""
    ws = as_workspace(ws)
    check_id(release_id, "release id")
    actor = actor or default_actor()
    at = now_iso()

    def step(lora: dict, location: LoraLocation) -> tuple[dict, list[str]]:
        new, messages = activate(lora, release_id, at=at, actor=actor, force=force, notes=notes)
        if new.get("recommended"):
            evals = evals_of_release(ws.store, lora_id, get_release(new, release_id), eval_scopes(location, project))
            _keep_recommendation_valid(new, evals, messages)
        return new, messages

    return _transition(ws, lora_id, project, step)


def deprecate_release(
    ws: Workspace | str | Path | None, lora_id: str, release_id: str, *, project: str | None = None,
    notes: str | None = None, actor: str | None = None,
) -> GateResult:
    """Mark a release ``deprecated`` (``lorakit lora deprecate``); the active one is cleared, with a message."""
    ws = as_workspace(ws)
    check_id(release_id, "release id")
    actor = actor or default_actor()
    at = now_iso()
    return _transition(ws, lora_id, project,
                       lambda lora, _loc: deprecate(lora, release_id, at=at, actor=actor, notes=notes))


def set_recommended(
    ws: Workspace | str | Path | None, lora_id: str, on: bool = True, *, project: str | None = None,
) -> GateResult:
    """Set (or with ``on=False`` clear) ``recommended`` (``lorakit lora recommend [--off]``)."""
    ws = as_workspace(ws)

    def step(lora: dict, location: LoraLocation) -> tuple[dict, list[str]]:
        active_evals: list[dict] = []
        active_id = lora.get("activeReleaseId")
        if on and active_id:
            if has_release(lora, active_id):
                release = get_release(lora, active_id)
                active_evals = evals_of_release(ws.store, lora_id, release, eval_scopes(location, project))
        return recommend(lora, on, active_evals)

    return _transition(ws, lora_id, project, step)


# ---- the steps a reviewer takes together -----------------------------------------------------------------------
@dataclass
class ApprovalResult:
    """What :func:`approve_and_activate` did: the LoRA record after it, its messages in order, whether the LoRA
    is recommended now, and (when it is not) why the gate would not recommend it."""

    lora: dict
    messages: list[str] = field(default_factory=list)
    recommended: bool = False
    not_recommended: str | None = None


def approve_and_activate(
    ws: Workspace | str | Path | None, lora_id: str, release_id: str, *, project: str | None = None,
    notes: str | None = None, reviewer: str | None = None, eval_ids: Sequence[str] | None = None,
    recommend: bool = True,
) -> ApprovalResult:
    """Approve a release, make it the active one and, with ``recommend``, recommend the LoRA when the gate allows.

    The one-click approval of the wizard and the batch review of ``03_eval_grid``. A refusal of the review or
    of the activation is raised, with the messages of the steps already taken as its notes (they happened);
    a refusal to recommend is only reported (``not_recommended``): the release is approved and active anyway.

    >>> approve_and_activate("data", "ui_icons", "r2", project="demo", reviewer="ana").messages  # doctest: +SKIP
    """
    ws = as_workspace(ws)
    messages: list[str] = []
    steps = [lambda: review_release(ws, lora_id, release_id, approve=True, project=project, notes=notes,
                                    reviewer=reviewer, eval_ids=eval_ids),
             lambda: activate_release(ws, lora_id, release_id, project=project)]
    for step in steps:
        try:
            result = step()
        except LorakitError as exc:
            for message in messages:
                exc.add_note(message)
            raise
        messages += result.messages
    if not recommend:
        return ApprovalResult(result.lora, messages, bool(result.lora.get("recommended")))
    try:
        result = set_recommended(ws, lora_id, project=project)
    except GateRefusal as exc:
        messages.append(f"not recommended yet: {exc}")
        return ApprovalResult(result.lora, messages, False, not_recommended=str(exc))
    return ApprovalResult(result.lora, messages + result.messages, True)


def batch_review(
    ws: Workspace | str | Path | None, lora_id: str, release_id: str, *, review: str | None = None,
    activate: bool = False, recommend: bool = False, project: str | None = None, notes: str | None = None,
    reviewer: str | None = None, eval_ids: Sequence[str] | None = None,
) -> list[str]:
    """The review a batch run asks for (``03_eval_grid``'s parameters): ``review`` ``"approve"``, ``"reject"`` or
    None, then activate and recommend when asked. Returns the messages; every refusal is raised, a recommendation
    too, so a batch run that asked for one fails when the gate refuses it."""
    if review not in (None, "approve", "reject"):
        raise ValueError(f"review must be None, 'approve' or 'reject', got {review!r}")
    if review == "approve" and activate:
        approval = approve_and_activate(ws, lora_id, release_id, project=project, notes=notes, reviewer=reviewer,
                                        eval_ids=eval_ids, recommend=recommend)
        if approval.not_recommended:
            raise GateRefusal(approval.not_recommended)
        return approval.messages
    messages: list[str] = []
    if review:
        messages += review_release(ws, lora_id, release_id, approve=review == "approve", project=project,
                                   notes=notes, reviewer=reviewer, eval_ids=eval_ids).messages
    if activate:
        messages += activate_release(ws, lora_id, release_id, project=project).messages
    if recommend:
        messages += set_recommended(ws, lora_id, project=project).messages
    return messages


__all__ = [
    "ApprovalResult", "GateRefusal", "GateResult", "LoraLocation", "activate", "activate_release",
    "approve_and_activate", "batch_review", "check_lora_scope", "deprecate", "deprecate_release", "eval_state",
    "evals_of_release", "latest_review", "linked_eval_ids", "locate_lora", "recommend",
    "recommendation_problems", "review", "review_release", "review_state", "reviews_of", "set_recommended",
]
