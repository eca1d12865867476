"""Which LoRAs apply to a (checkpoint, asset type) under a project's policy, and applying them to a pipeline.

:func:`resolve_loras` is the decision, a pure function over records: the project (its
``policies.loraSelection``), the LoRA records, where each release's weights file is, and explicit picks. It
returns the LoRAs to apply, in order, each with its release, weights path, strength and the reason, plus
every other compatible LoRA with why it was not picked. :func:`select_loras` loads those inputs from the
store; :func:`list_loras` turns either view into a DataFrame; :func:`apply_loras` loads a resolved stack
into a diffusers pipeline, and :func:`render_setup` gives it the scheduler and call arguments its checkpoint's
objective renders with.

The rules (``docs/data-model.md``, "Release for use", and the policy defaults there):

- compatible: same ``checkpointId``, the asset type in ``assetTypes``, and a project LoRA only for its project;
- mode orders the compatible LoRAs: ``baseline_then_project`` (default), ``project_then_baseline``,
  ``baseline_only``, ``project_only``, or ``manual``: the explicit picks first, in pick order, then the
  rest as in ``baseline_then_project``;
- ``preferRecommended`` (default true) puts recommended LoRAs first within each group; otherwise LoRAs are in
  id order;
- release: the pick's release, else ``activeReleaseId``, else (``releasePolicy`` ``active_or_latest_approved``,
  the default) the newest approved release; deprecated and rejected releases are never picked;
- a release whose weights file is missing is reported (not picked, and a warning), and the next LoRA fills
  its slot;
- ``maxActiveLoras`` (default 2) caps the list; the LoRAs past the cap are reported as such.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import release_weights_path
from .errors import ConfigError, SelectionError
from .families.objectives import DEFAULT_GUIDANCE_RESCALE
from .gate import eval_state, evals_of_release, latest_review, review_state
from .loras import adapter_name, recorded_sha256
from .workspace import Workspace, as_workspace

if TYPE_CHECKING:
    import pandas as pd

MODES = ("baseline_then_project", "project_then_baseline", "baseline_only", "project_only", "manual")
RELEASE_POLICIES = ("active_or_latest_approved", "active_only")
DEFAULT_STRENGTH = 1.0


# ---- inputs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraPick:
    """An explicit choice of a LoRA, optionally of its release and strength.

    Parsed from ``"hero"``, ``"hero@r2"``, ``"hero@r2:0.8"``, ``"hero:0.8"`` or a policy entry
    ``{"loraId": "hero", "releaseId": "r2", "strength": 0.8}``.

    >>> LoraPick.parse("hero@r2:0.8")
    LoraPick(lora_id='hero', release_id='r2', strength=0.8)
    """

    lora_id: str
    release_id: str | None = None
    strength: float | None = None

    @classmethod
    def parse(cls, value: LoraPick | Mapping | str) -> LoraPick:
        if isinstance(value, LoraPick):
            return value
        if isinstance(value, Mapping):
            strength = value.get("strength")
            return cls(str(value["loraId"]), value.get("releaseId"), None if strength is None else float(strength))
        match = re.fullmatch(r"([A-Za-z0-9._-]+?)(?:@([A-Za-z0-9._-]+?))?(?::(-?[0-9.]+))?", value.strip())
        if not match:
            raise SelectionError(f"cannot read the pick {value!r} (expected LORA[@RELEASE][:STRENGTH])")
        lora_id, release_id, strength = match.groups()
        return cls(lora_id, release_id, float(strength) if strength else None)


def merge_picks(base: Iterable[LoraPick | Mapping | str], changes: Iterable[LoraPick | Mapping | str]) -> list[LoraPick]:
    """``base`` picks with ``changes`` applied: a change to a picked LoRA sets the fields it gives, in place;
    a change to another LoRA is appended.

    >>> merge_picks(["a@r1", "b"], ["b:0.5", "c"])
    [LoraPick(lora_id='a', release_id='r1', strength=None), LoraPick(lora_id='b', release_id=None, strength=0.5), \
LoraPick(lora_id='c', release_id=None, strength=None)]
    """
    merged: dict[str, LoraPick] = {}
    for pick in map(LoraPick.parse, base):
        merged[pick.lora_id] = pick
    for change in map(LoraPick.parse, changes):
        old = merged.get(change.lora_id)
        merged[change.lora_id] = change if old is None else LoraPick(
            change.lora_id, change.release_id or old.release_id,
            change.strength if change.strength is not None else old.strength,
        )
    return list(merged.values())


@dataclass(frozen=True)
class SelectionPolicy:
    """A project's ``policies.loraSelection`` with the defaults of the data model filled in."""

    mode: str = "baseline_then_project"
    prefer_recommended: bool = True
    max_active_loras: int = 2
    release_policy: str = "active_or_latest_approved"
    picks: tuple[LoraPick, ...] = ()

    @classmethod
    def from_project(cls, project: Mapping | None) -> SelectionPolicy:
        """The policy of a project record (None: no project, the defaults)."""
        raw = ((project or {}).get("policies") or {}).get("loraSelection") or {}
        policy = cls(
            mode=raw.get("mode", cls.mode),
            prefer_recommended=bool(raw.get("preferRecommended", cls.prefer_recommended)),
            max_active_loras=raw.get("maxActiveLoras", cls.max_active_loras),
            release_policy=raw.get("releasePolicy", cls.release_policy),
            picks=tuple(LoraPick.parse(p) for p in raw.get("picks") or []),
        )
        where = f"project {(project or {}).get('id')!r} policies.loraSelection"
        if policy.mode not in MODES:
            raise SelectionError(f"{where}: unknown mode {policy.mode!r} (expected one of {', '.join(MODES)})")
        if policy.release_policy not in RELEASE_POLICIES:
            raise SelectionError(f"{where}: unknown releasePolicy {policy.release_policy!r} "
                                 f"(expected one of {', '.join(RELEASE_POLICIES)})")
        if not isinstance(policy.max_active_loras, int) or policy.max_active_loras < 0:
            raise SelectionError(f"{where}: maxActiveLoras must be a whole number >= 0, got {policy.max_active_loras!r}")
        return policy


@dataclass(frozen=True)
class WeightsFile:
    """Where a release's weights file is and whether it is there (``problem`` says why not)."""

    path: str | None
    exists: bool
    problem: str | None = None


# (lora, release) -> WeightsFile, or a mapping (lora id, release id) -> path of a file that exists.
WeightsLookup = Callable[[dict, dict], WeightsFile] | Mapping[tuple[str, str], "str | Path | WeightsFile | None"]


def _ref_path(release: dict) -> str | None:
    weights = release.get("weights") or {}
    return weights.get("path") or weights.get("uri") or release.get("localPath")


def weights_file(weights: WeightsLookup | None, lora: dict, release: dict) -> WeightsFile:
    """Look up one release's weights file. ``weights=None`` trusts the records: a referenced file is there."""
    if weights is None:
        path = _ref_path(release)
        return WeightsFile(path, path is not None, None if path else "the release has no weights reference")
    if callable(weights):
        return weights(lora, release)
    found = weights.get((lora["id"], release["id"]))
    if isinstance(found, WeightsFile):
        return found
    if found is None:
        return WeightsFile(_ref_path(release), False, "weights file missing")
    return WeightsFile(str(found), True)


# ---- outputs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedLora:
    """One LoRA to apply: its release, weights file, strength, and why it was picked."""

    lora_id: str
    name: str
    scope: str
    release_id: str
    release_status: str
    weights_path: str
    strength: float
    reason: str
    recommended: bool = False
    picked_by: str = "policy"  # "policy" or "pick"
    sha256: str | None = None  # of the weights, as the release records it


@dataclass(frozen=True)
class PassedOverLora:
    """A LoRA that was not picked, and why (``compatible=False``: wrong checkpoint, asset type or project)."""

    lora_id: str
    name: str
    scope: str
    reason: str
    release_id: str | None = None
    recommended: bool = False
    compatible: bool = True


@dataclass(frozen=True)
class LoraResolution:
    """The result of :func:`resolve_loras`. Iterating it gives the picked LoRAs, in order."""

    checkpoint_id: str
    asset_type: str
    policy: SelectionPolicy
    picked: tuple[ResolvedLora, ...] = ()
    passed_over: tuple[PassedOverLora, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    def __iter__(self) -> Iterator[ResolvedLora]:
        return iter(self.picked)

    def __len__(self) -> int:
        return len(self.picked)

    def __getitem__(self, index: int) -> ResolvedLora:
        return self.picked[index]

    @property
    def not_picked(self) -> tuple[PassedOverLora, ...]:
        """The compatible LoRAs that were not picked."""
        return tuple(p for p in self.passed_over if p.compatible)

    def with_strengths(self, strengths: float | Mapping[str, float]) -> LoraResolution:
        """The same stack with other strengths: one number for all, or LoRA id -> strength."""
        def strength(lora: ResolvedLora) -> float:
            if isinstance(strengths, Mapping):
                return float(strengths.get(lora.lora_id, lora.strength))
            return float(strengths)

        return replace(self, picked=tuple(replace(lora, strength=strength(lora)) for lora in self.picked))

    def to_frame(self, include_incompatible: bool = False) -> pd.DataFrame:
        """One row per LoRA: the picked ones in order, then the others with why they were not picked."""
        import pandas as pd

        rows = [{"order": i, "picked": True, "lora_id": p.lora_id, "name": p.name, "scope": p.scope,
                 "recommended": p.recommended, "release_id": p.release_id, "release_status": p.release_status,
                 "strength": p.strength, "weights_path": p.weights_path, "reason": p.reason}
                for i, p in enumerate(self.picked, start=1)]
        rows += [{"order": None, "picked": False, "lora_id": p.lora_id, "name": p.name, "scope": p.scope,
                  "recommended": p.recommended, "release_id": p.release_id, "release_status": None,
                  "strength": None, "weights_path": None, "reason": p.reason}
                 for p in self.passed_over if p.compatible or include_incompatible]
        return pd.DataFrame(rows, columns=SELECTION_COLUMNS)


SELECTION_COLUMNS = ["order", "picked", "lora_id", "name", "scope", "recommended", "release_id", "release_status",
                     "strength", "weights_path", "reason"]


# ---- the decision (pure) ----------------------------------------------------------------------------------
def compatibility_problem(lora: dict, project_id: str | None, checkpoint_id: str, asset_type: str) -> str | None:
    """Why ``lora`` does not fit (checkpoint, asset type, project), or None when it does."""
    if lora.get("checkpointId") != checkpoint_id:
        return f"for checkpoint {lora.get('checkpointId')!r}, not {checkpoint_id!r}"
    if asset_type not in (lora.get("assetTypes") or []):
        return f"asset types {', '.join(lora.get('assetTypes') or [])} do not include {asset_type!r}"
    if lora.get("scope") == "project":
        owner = lora.get("projectId")
        if project_id is None:
            return f"a LoRA of project {owner!r}, and no project was given"
        if owner is not None and owner != project_id:
            return f"a LoRA of project {owner!r}, not {project_id!r}"
    elif lora.get("scope") != "baseline":
        return f"unknown scope {lora.get('scope')!r}"
    return None


def _newest(releases: list[dict]) -> dict:
    # createdAt is ISO 8601 UTC, so strings sort in time order; list position breaks ties (later = newer).
    return max(enumerate(releases), key=lambda item: (str(item[1].get("createdAt", "")), item[0]))[1]


def pick_release(lora: dict, release_policy: str, wanted: str | None = None) -> tuple[dict | None, str]:
    """The release of ``lora`` to use and why, or ``(None, why none)``.

    ``wanted`` (a pick's release) first, else ``activeReleaseId``, else for ``active_or_latest_approved`` the
    newest approved release. Deprecated and rejected releases are never used; an explicitly wanted
    unreviewed candidate is (that is how a candidate is tried out), and the reason says so.

    >>> lora = {"id": "a", "activeReleaseId": "r1", "releases": [
    ...     {"id": "r1", "status": "deprecated", "createdAt": "1"}, {"id": "r2", "status": "approved", "createdAt": "2"}]}
    >>> pick_release(lora, "active_or_latest_approved")
    ({'id': 'r2', 'status': 'approved', 'createdAt': '2'}, 'newest approved release r2 (active release r1 is deprecated)')
    >>> pick_release(lora, "active_only")
    (None, 'active release r1 is deprecated (policy active_only)')
    """
    by_id = {r.get("id"): r for r in lora.get("releases", [])}

    def unusable(release: dict | None, what: str, release_id: str) -> str | None:
        if release is None:
            return f"{what} {release_id} does not exist"
        state = review_state(release)
        if state == "deprecated":
            return f"{what} {release_id} is deprecated"
        if state == "rejected":
            return f"{what} {release_id} was rejected in review"
        return None

    if wanted:
        problem = unusable(by_id.get(wanted), "picked release", wanted)
        if problem:
            return None, problem
        release = by_id[wanted]
        note = "" if review_state(release) == "approved" else " (unreviewed candidate)"
        return release, f"picked release {wanted}{note}"
    active_id = lora.get("activeReleaseId")
    problem = None
    if active_id:
        problem = unusable(by_id.get(active_id), "active release", active_id)
        if problem is None:
            release = by_id[active_id]
            note = "" if review_state(release) == "approved" else " (activated without approval)"
            return release, f"active release {active_id}{note}"
    if release_policy == "active_only":
        return None, f"{problem or 'no active release'} (policy active_only)"
    approved = [r for r in lora.get("releases", []) if r.get("status") == "approved"]
    if approved:
        newest = _newest(approved)
        return newest, f"newest approved release {newest['id']} ({problem or 'no active release'})"
    return None, f"{problem + '; ' if problem else ''}no active and no approved release"


def _scope_group(lora: dict, mode: str) -> int:
    baseline = lora.get("scope") == "baseline"
    return (0 if baseline else 1) if mode != "project_then_baseline" else (1 if baseline else 0)


def resolve_loras(
    project: Mapping | None,
    checkpoint_id: str,
    asset_type: str,
    loras: Iterable[dict],
    *,
    weights: WeightsLookup | None = None,
    picks: Sequence[LoraPick | Mapping | str] | None = None,
    default_strength: float = DEFAULT_STRENGTH,
) -> LoraResolution:
    """The LoRAs to apply for ``checkpoint_id`` and ``asset_type`` under ``project``'s policy, in order.

    ``project`` is the project record (None: the default policy, baseline LoRAs only); ``loras`` are the
    baseline and project LoRA records to choose from; ``weights`` says where each release's file is (see
    :func:`weights_file`; the I/O wrapper :func:`select_loras` passes a lookup that checks the disk).
    ``picks`` are merged over the policy's ``picks`` (:func:`merge_picks`): a pick's release and strength apply
    in every mode; in ``manual`` mode the picks also go first, in pick order. A LoRA's strength is its pick's,
    else the record's ``defaultStrength``, else ``default_strength``.

    >>> res = resolve_loras(None, "sd15", "icon", [{"id": "icons", "name": "Icons", "scope": "baseline",
    ...     "checkpointId": "sd15", "assetTypes": ["icon"], "releases": [
    ...     {"id": "r1", "status": "approved", "createdAt": "2026-01-01T00:00:00.000Z",
    ...      "weights": {"kind": "absolute", "path": "/w/icons.safetensors"}}]}])
    >>> [(p.lora_id, p.release_id, p.strength) for p in res]
    [('icons', 'r1', 1.0)]
    """
    policy = SelectionPolicy.from_project(project)
    project_id = (project or {}).get("id")
    all_picks = merge_picks(policy.picks, picks or [])
    pick_of = {p.lora_id: p for p in all_picks}
    passed_over: list[PassedOverLora] = []
    warnings: list[str] = []

    def pass_over(lora: dict, reason: str, release_id: str | None = None, compatible: bool = True) -> None:
        passed_over.append(PassedOverLora(
            lora_id=lora["id"], name=lora.get("name", lora["id"]), scope=lora.get("scope", "?"), reason=reason,
            release_id=release_id, recommended=bool(lora.get("recommended")), compatible=compatible,
        ))

    records = {lora["id"]: lora for lora in loras}
    compatible: list[dict] = []
    for lora in records.values():
        problem = compatibility_problem(lora, project_id, checkpoint_id, asset_type)
        if problem:
            pass_over(lora, ("picked, but " if lora["id"] in pick_of else "") + problem, compatible=False)
            continue
        if policy.mode == "baseline_only" and lora.get("scope") != "baseline":
            pass_over(lora, "mode baseline_only leaves out project LoRAs")
            continue
        if policy.mode == "project_only" and lora.get("scope") != "project":
            pass_over(lora, "mode project_only leaves out baseline LoRAs")
            continue
        compatible.append(lora)
    for each in all_picks:
        if each.lora_id not in records:
            warnings.append(f"picked LoRA {each.lora_id!r} does not exist for this project or the shared LoRAs")

    def order_key(lora: dict) -> tuple:
        recommended_first = 0 if (policy.prefer_recommended and lora.get("recommended")) else 1
        return (_scope_group(lora, policy.mode), recommended_first, lora["id"])

    ordered = sorted(compatible, key=order_key)
    if policy.mode == "manual":
        usable = {lora["id"] for lora in compatible}
        chosen = [records[p.lora_id] for p in all_picks if p.lora_id in usable]
        ordered = chosen + [lora for lora in ordered if lora["id"] not in pick_of]

    cap = policy.max_active_loras
    picked: list[ResolvedLora] = []
    for lora in ordered:
        pick = pick_of.get(lora["id"])
        release, why = pick_release(lora, policy.release_policy, pick.release_id if pick else None)
        if release is None:
            pass_over(lora, why)
            continue
        found = weights_file(weights, lora, release)
        if not found.exists:
            reason = f"{why}, but its weights file is missing: {found.path or '(no path)'}"
            reason += f" ({found.problem})" if found.problem and found.problem != "weights file missing" else ""
            pass_over(lora, reason, release["id"])
            warnings.append(f"LoRA {lora['id']!r} release {release['id']!r}: {reason}")
            continue
        if len(picked) >= cap:
            pass_over(lora, f"over the cap: maxActiveLoras is {cap} ({why})", release["id"])
            continue
        picked.append(_resolved(lora, release, found, pick, why, policy, len(picked) + 1, default_strength))
    return LoraResolution(checkpoint_id=checkpoint_id, asset_type=asset_type, policy=policy, picked=tuple(picked),
                          passed_over=tuple(passed_over), warnings=tuple(warnings))


def _resolved(lora: dict, release: dict, found: WeightsFile, pick: LoraPick | None, why: str, policy: SelectionPolicy,
              slot: int, default_strength: float) -> ResolvedLora:
    """A picked LoRA with its strength (the pick's, else the record's ``defaultStrength``) and why it is there."""
    by_pick = policy.mode == "manual" and pick is not None
    parts = ["manual pick" if by_pick else f"{lora.get('scope')} LoRA ({policy.mode})"]
    if lora.get("recommended") and policy.prefer_recommended:
        parts.append("recommended")
    parts.append(why)
    parts.append(f"slot {slot} of {policy.max_active_loras}")
    if pick is not None and pick.strength is not None:
        strength = pick.strength
    else:
        strength = float(lora.get("defaultStrength", default_strength))
    return ResolvedLora(
        lora_id=lora["id"], name=lora.get("name", lora["id"]), scope=lora.get("scope", "?"),
        release_id=release["id"], release_status=review_state(release), weights_path=str(found.path),
        strength=float(strength), reason="; ".join(parts), recommended=bool(lora.get("recommended")),
        picked_by="pick" if by_pick else "policy",
        sha256=recorded_sha256(release),
    )


# ---- loading the inputs (I/O) ----------------------------------------------------------------------------
def load_loras(ws: Workspace | str | Path | None, project: str | None = None, all_projects: bool = False) -> list[dict]:
    """The baseline LoRAs and ``project``'s LoRAs (every project's with ``all_projects``), baseline first."""
    ws = as_workspace(ws)
    records = [record for _, record in ws.store.iter_records("lora")]
    projects = ws.store.list_projects() if all_projects else ([project] if project else [])
    for name in projects:
        records += [record for _, record in ws.store.iter_records("lora", name)]
    return records


def locate_weights(ws: Workspace | str | Path | None) -> Callable[[dict, dict], WeightsFile]:
    """A weights lookup for :func:`resolve_loras` that resolves references with the local config and checks
    the file is there. ``localPath`` (deprecated) is relative to the folder that holds the data root."""
    ws = as_workspace(ws)

    def lookup(lora: dict, release: dict) -> WeightsFile:
        try:
            path = release_weights_path(release, ws.config, f"LoRA {lora.get('id')} release {release.get('id')}",
                                        must_exist=False)
        except ConfigError as exc:
            shown = _ref_path(release)
            reason = "the release has no weights reference" if shown is None else str(exc)
            return WeightsFile(shown, False, reason)
        return WeightsFile(str(path), path.is_file())

    return lookup


def select_loras(
    ws: Workspace | str | Path | None, project: str | None, checkpoint_id: str, asset_type: str, *,
    picks: Sequence[LoraPick | Mapping | str] | None = None, all_projects: bool = False,
) -> LoraResolution:
    """:func:`resolve_loras` on the records in the store (the project, its LoRAs and the baseline ones).

    ``all_projects`` also reads other projects' LoRAs, so they are reported (as incompatible) too.

    >>> res = select_loras("data", "demo", "tiny_sd15", "character")    # doctest: +SKIP
    >>> res.to_frame()                                                   # doctest: +SKIP
    """
    ws = as_workspace(ws)
    record = ws.store.read("project", project) if project else None
    return resolve_loras(record, checkpoint_id, asset_type, load_loras(ws, project, all_projects),
                         weights=locate_weights(ws), picks=picks)


OVERVIEW_COLUMNS = ["lora_id", "name", "scope", "project", "checkpoint_id", "asset_types", "recommended",
                    "active_release_id", "release_id", "release_status", "review", "active", "eval_state",
                    "eval_ids", "created_at"]


def lora_overview_rows(lora: dict, evals_by_release: Mapping[str, Sequence[dict]]) -> list[dict]:
    """One row per release of ``lora`` (one row with no release when it has none): the ``lora list`` overview."""
    base = {"lora_id": lora["id"], "name": lora.get("name"), "scope": lora.get("scope"),
            "project": lora.get("projectId"), "checkpoint_id": lora.get("checkpointId"),
            "asset_types": ",".join(lora.get("assetTypes") or []), "recommended": bool(lora.get("recommended")),
            "active_release_id": lora.get("activeReleaseId")}
    releases = lora.get("releases") or []
    if not releases:
        return [{**base, "release_id": None, "release_status": None, "review": None, "active": False,
                 "eval_state": None, "eval_ids": "", "created_at": None}]
    rows = []
    for release in releases:
        evals = evals_by_release.get(release["id"], [])
        last = latest_review(release)
        rows.append({**base, "release_id": release["id"], "release_status": release.get("status"),
                     "review": review_state(release) + (f" by {last.get('reviewer')}" if last else ""),
                     "active": release["id"] == lora.get("activeReleaseId"), "eval_state": eval_state(evals),
                     "eval_ids": ",".join(e["id"] for e in evals), "created_at": release.get("createdAt")})
    return rows


def list_loras(
    ws: Workspace | str | Path | None = None, project: str | None = None, checkpoint: str | None = None,
    asset_type: str | None = None, *, include_all: bool = False,
    picks: Sequence[LoraPick | Mapping | str] | None = None,
) -> pd.DataFrame:
    """``lorakit lora list`` as a DataFrame.

    With ``checkpoint`` and ``asset_type``: the resolved stack (``picked`` rows in order) and the other
    compatible LoRAs with why they were not picked (``include_all``: also the incompatible ones and why).
    Otherwise: every baseline LoRA and ``project``'s (every project's when no project is given, or with
    ``include_all``), one row per release with its status, review, whether it is active, and its eval state;
    ``checkpoint`` or ``asset_type`` alone filter that list.
    """
    import pandas as pd

    ws = as_workspace(ws)
    if checkpoint and asset_type:
        resolution = select_loras(ws, project, checkpoint, asset_type, picks=picks, all_projects=include_all)
        return resolution.to_frame(include_incompatible=include_all)
    rows = []
    for lora in load_loras(ws, project, all_projects=include_all or project is None):
        if checkpoint and lora.get("checkpointId") != checkpoint:
            continue
        if asset_type and asset_type not in (lora.get("assetTypes") or []):
            continue
        scope_project = lora.get("projectId") if lora.get("scope") == "project" else None
        scopes = [scope_project] + ([project] if project and project != scope_project else [])
        evals = {r["id"]: evals_of_release(ws.store, lora["id"], r, scopes) for r in lora.get("releases") or []}
        rows += lora_overview_rows(lora, evals)
    return pd.DataFrame(rows, columns=OVERVIEW_COLUMNS)


# ---- what a UI offers ----------------------------------------------------------------------------------------
def asset_type_options(checkpoint: Mapping | None, asset_types: Sequence[Mapping]) -> list[tuple[str, str]]:
    """``(label, id)`` of the asset types to offer for ``checkpoint``: the catalog's, in catalog order, kept to
    the checkpoint's ``supportedAssetTypes`` when it lists any; supported types the catalog lacks come last.

    >>> asset_type_options({"supportedAssetTypes": ["icon", "vfx"]}, [{"id": "char", "label": "Character"},
    ...                    {"id": "icon", "label": "UI icon"}])
    [('UI icon', 'icon'), ('vfx', 'vfx')]
    """
    supported = list((checkpoint or {}).get("supportedAssetTypes") or [])
    catalog = {entry["id"]: entry.get("label") or entry["id"] for entry in asset_types}
    if not supported:
        return [(label, type_id) for type_id, label in catalog.items()]
    return ([(label, type_id) for type_id, label in catalog.items() if type_id in supported]
            + [(type_id, type_id) for type_id in supported if type_id not in catalog])


def load_asset_types(ws: Workspace | str | Path | None, project: str | None = None) -> list[dict]:
    """The asset-type catalog entries: the shared catalog's, with ``project``'s entries replacing same ids."""
    from .catalog import catalog_entries, merge_entries

    ws = as_workspace(ws)
    entries: list[list[dict]] = []
    for scope in [None] + ([project] if project else []):
        path = ws.store.catalog_path("asset-types", scope)
        entries.append(catalog_entries("asset-types", ws.store.read_path(path, "catalog:asset-types"))
                       if path.is_file() else [])
    return list(merge_entries(*entries).values()) if len(entries) == 2 else entries[0]


# ---- applying (the model edge) -----------------------------------------------------------------------------
def apply_loras(pipeline: Any, resolved: Iterable[ResolvedLora]) -> list[str]:
    """Load a resolved stack into a diffusers pipeline with its strengths; returns the adapter names.

    Adapters already loaded (same LoRA and release) are reused, so calling this again with other strengths
    or another stack is cheap; adapters not in ``resolved`` are switched off. An empty stack disables LoRAs.

    >>> res = select_loras(ws, "demo", "tiny_sd15", "character")   # doctest: +SKIP
    >>> apply_loras(pipe, res)                                      # doctest: +SKIP
    ['hero__r2', 'ui_base__r1']
    """
    from .models.loading import LORA_LAYER_TYPES, load_lora_file, lora_file_network, needs_unload_before

    stack = list(resolved)
    loaded = _loaded_adapters(pipeline)
    names = [adapter_name(lora.lora_id, lora.release_id, lora.sha256) for lora in stack]
    missing = [(name, lora) for name, lora in zip(names, stack, strict=True) if name not in loaded]
    for _, lora in missing:
        if not lora.weights_path or not Path(lora.weights_path).exists():
            raise SelectionError(f"LoRA {lora.lora_id!r} release {lora.release_id!r}: weights file not found: "
                                 f"{lora.weights_path}")
    # LoRA and DoRA files load before LoHa/LoKr ones (peft cannot wrap theirs in a LoRA layer); such a file new
    # to a pipeline that holds LoHa/LoKr layers already means loading the whole stack again, in that order.
    if any(needs_unload_before(pipeline, lora.weights_path) for _, lora in missing):
        pipeline.unload_lora_weights()
        loaded = set()
        missing = list(zip(names, stack, strict=True))
    for name, lora in sorted(missing, key=lambda pair: lora_file_network(pair[1].weights_path) not in LORA_LAYER_TYPES):
        load_lora_file(pipeline, lora.weights_path, name)
        loaded.add(name)
    if names:
        pipeline.enable_lora()  # undo an earlier disable_lora() from an empty stack
        pipeline.set_adapters(names, adapter_weights=[float(lora.strength) for lora in stack])
    elif loaded:
        pipeline.disable_lora()
    return names


def render_setup(ws: Workspace | str | Path | None, checkpoint_id: str, pipeline: Any, *,
                 guidance_rescale: float = DEFAULT_GUIDANCE_RESCALE) -> dict[str, Any]:
    """Give ``pipeline`` (a pipeline of checkpoint ``checkpoint_id``) the scheduler the checkpoint's objective
    samples with, as the eval grids do (v-prediction, zero terminal SNR with trailing timesteps), and return the
    keyword arguments its calls need (``guidance_rescale`` for zero terminal SNR; nothing for epsilon).

    >>> kwargs = render_setup(ws, "noob_vpred", pipe)                          # doctest: +SKIP
    >>> pipe("a red gem", **kwargs)                                            # doctest: +SKIP
    """
    from .models.registry import checkpoint_objective, get_checkpoint

    ws = as_workspace(ws)
    objective = checkpoint_objective(ws, get_checkpoint(ws, checkpoint_id))
    if not 0 <= guidance_rescale <= 1:
        raise SelectionError(f"guidance rescale must be between 0 and 1, got {guidance_rescale:g}")
    try:
        pipeline.scheduler = objective.render_scheduler(pipeline.scheduler)
    except ValueError as exc:
        raise SelectionError(f"checkpoint {checkpoint_id}: {exc}") from None
    return objective.render_kwargs(guidance_rescale)


def _loaded_adapters(pipeline: Any) -> set[str]:
    try:
        return {name for names in pipeline.get_list_adapters().values() for name in names}
    except (AttributeError, ValueError):  # no LoRA support or nothing loaded yet
        return set()


__all__ = [
    "asset_type_options", "load_asset_types", "LoraPick", "LoraResolution", "PassedOverLora", "ResolvedLora", "SelectionError", "SelectionPolicy",
    "WeightsFile", "apply_loras", "compatibility_problem", "list_loras", "load_loras",
    "locate_weights", "merge_picks", "pick_release", "render_setup", "resolve_loras", "select_loras",
    "weights_file",
]
