"""Eval records and eval grids: canonical prompts, grid planning, linking, cleanup, normalize, contact sheets.

An eval is one review of a LoRA release: a fixed set of prompts and the images rendered for them. An eval
*grid* renders every prompt at several seeds and LoRA strengths, always including strength 0 (the base
checkpoint), so a reviewer compares base against LoRA on identical seeds. Each grid cell becomes one queued
``eval_render`` job, planned into a batch with other cells of its row; ``lorakit worker`` (``worker.py``) renders
the jobs batch by batch and appends each image to the eval.

Where things live (paths relative to dataRoot):

- eval record: ``shared/evals/<id>.json`` for a baseline LoRA, ``projects/<p>/evals/<id>.json`` for a
  project LoRA (the original tool's layout);
- jobs: ``projects/<p>/jobs/<jobId>.json`` of the project that asked for the grid (``--project``);
- images: ``files/evals/<project or "baseline">/<evalId>/<cellKey>.png``.

The decisions (prompt templates, which cells a grid has, an eval's status, the contact-sheet layout) are
pure functions; the functions that read and write records are thin wrappers around them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import release_weights_path, resolve_weights
from .errors import ConfigError, EvalError, LorakitError, RecordError, RecordNotFoundError
from .families import Family, Objective
from .families import get as get_family
from .families.objectives import DEFAULT_GUIDANCE_RESCALE
from .hashing import file_sha256
from .ids import check_id, given_or_new_id, new_ulid
from .loras import get_release, recorded_sha256, release_validation, validation_facts, validation_summary
from .store import now_iso
from .workspace import Workspace, as_workspace

CANONICAL_MIN, CANONICAL_MAX = 3, 5
EVAL_STATUSES = ("pending", "running", "complete")
JOB_TYPE = "eval_render"
DEFAULT_SEEDS = (1, 2, 3)
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0)
DEFAULT_MAX_ATTEMPTS = 3
# Cells rendered together in one pipeline call. Batching is planned with the grid, not chosen by the worker:
# a batched render is not bit-identical to a single one, so a cell's pixels must not depend on which worker
# took it or what else was in its queue.
DEFAULT_BATCH_SIZE = 4
# Used when neither the command line nor the checkpoint's defaultGenerationParams (nor, for the size, the
# checkpoint's family) say otherwise.
FALLBACK_PARAMS = {"width": 512, "height": 512, "steps": 20, "cfg": 7.0, "guidanceRescale": DEFAULT_GUIDANCE_RESCALE}
BASELINE_FOLDER = "baseline"  # files/evals/<this>/ holds images of baseline evals
# What an eval copies from its release's training.validation, so the grid shows the drop of the weights it renders.
VALIDATION_HEADLINE = ("set", "images", "baseLoss", "finalLoss", "drop", "stoppedEarly", "stoppedAt")


# ---- canonical prompts ---------------------------------------------------------------------------------
def canonical_prompt_problems(record: dict) -> list[str]:
    """``lorakit validate`` check for asset-types catalogs: each ``canonicalPrompts`` list holds 3 to 5 prompts.

    An entry without ``canonicalPrompts`` is fine: a project entry inherits the shared catalog's prompts.

    >>> canonical_prompt_problems({"assetTypes": [{"id": "ui_icon", "label": "UI", "canonicalPrompts": ["a", "b"]}]})
    ["at $.assetTypes[0].canonicalPrompts: asset type 'ui_icon' has 2 canonical prompts (expected 3 to 5)"]
    """
    problems = []
    for i, entry in enumerate(record.get("assetTypes") or []):
        if not isinstance(entry, dict) or "canonicalPrompts" not in entry:
            continue
        prompts = entry["canonicalPrompts"]
        where = f"at $.assetTypes[{i}].canonicalPrompts"
        if not isinstance(prompts, list):
            continue  # the schema reports the type
        if not CANONICAL_MIN <= len(prompts) <= CANONICAL_MAX:
            problems.append(
                f"{where}: asset type {entry.get('id')!r} has {len(prompts)} canonical prompts "
                f"(expected {CANONICAL_MIN} to {CANONICAL_MAX})"
            )
        for j, prompt in enumerate(prompts):
            if isinstance(prompt, str) and not prompt.strip():
                problems.append(f"{where}[{j}]: empty canonical prompt for asset type {entry.get('id')!r}")
        duplicates = sorted({p for p in prompts if isinstance(p, str) and prompts.count(p) > 1})
        if duplicates:
            problems.append(f"{where}: asset type {entry.get('id')!r} repeats {', '.join(map(repr, duplicates))}")
    return problems


def merge_canonical_prompts(shared: dict | None, project: dict | None) -> dict[str, list[str]]:
    """asset type -> canonical prompts, where a project entry that has prompts replaces the shared entry's.

    >>> merge_canonical_prompts({"assetTypes": [{"id": "a", "canonicalPrompts": ["x", "y", "z"]}]},
    ...                         {"assetTypes": [{"id": "a"}, {"id": "b", "canonicalPrompts": ["p", "q", "r"]}]})
    {'a': ['x', 'y', 'z'], 'b': ['p', 'q', 'r']}
    """
    merged: dict[str, list[str]] = {}
    for catalog in (shared, project):
        for entry in (catalog or {}).get("assetTypes") or []:
            prompts = entry.get("canonicalPrompts") if isinstance(entry, dict) else None
            if isinstance(prompts, list) and prompts:
                merged[entry["id"]] = [p for p in prompts if isinstance(p, str) and p.strip()]
    return merged


def load_canonical_prompts(ws: Workspace | str | Path | None, project: str | None = None) -> dict[str, list[str]]:
    """Canonical prompts per asset type: the shared catalog, overridden entry by entry by ``project``'s."""
    ws = as_workspace(ws)

    def read(p: str | None) -> dict | None:
        path = ws.store.catalog_path("asset-types", p)
        return ws.store.read_path(path, "catalog:asset-types") if path.is_file() else None

    return merge_canonical_prompts(read(None), read(project) if project else None)


def canonical_prompts(ws: Workspace | str | Path | None, asset_type: str, project: str | None = None) -> list[str]:
    """The canonical prompts of one asset type (project override, else shared default); an error when none."""
    ws = as_workspace(ws)
    prompts = load_canonical_prompts(ws, project).get(asset_type)
    if not prompts:
        raise EvalError(
            f"asset type {asset_type!r} has no canonical prompts: add 3 to 5 under 'canonicalPrompts' of its entry "
            f"in {ws.store.catalog_path('asset-types', None)}"
            + (f" or {ws.store.catalog_path('asset-types', project)}" if project else "")
            + ", or pass --prompts"
        )
    return list(prompts)


def parse_prompts(text: str | None = None, file_text: str | None = None) -> list[str]:
    """Prompts from ``"p1|p2"`` and from a file (one per line, ``|`` also splits); trimmed, de-duplicated.

    >>> parse_prompts("ui icon, neon| sprite |ui icon, neon", "a\\n\\nb")
    ['ui icon, neon', 'sprite', 'a', 'b']
    """
    parts: list[str] = []
    for raw in (text, file_text):
        if raw:
            parts += raw.replace("\r\n", "\n").replace("\n", "|").split("|")
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


# ---- prompt templates ----------------------------------------------------------------------------------
def render_template(template: str, text: str) -> str:
    """The original tool's rule: ``{specPrompt}`` in the template is replaced by ``text``, else they are joined.

    >>> render_template("masterpiece, {specPrompt}, 4k", "a shield")
    'masterpiece, a shield, 4k'
    >>> render_template("game asset", "a shield")
    'game asset, a shield'
    """
    if not template:
        return text
    if "{specPrompt}" in template:
        return template.replace("{specPrompt}", text, 1)
    return ", ".join(part for part in (template, text) if part)


def apply_prompt_templates(prompt: str, templates: dict | None, asset_type: str | None, negative: str = "") -> tuple[str, str]:
    """The positive and negative prompt a checkpoint's ``promptTemplates`` make of ``prompt``.

    As in the original tool, a ``perAssetType`` template (``{"positive": ..., "negative": ...}``, or a plain
    string for the positive side) replaces the base template of that side; it is not added to it.

    >>> t = {"basePositive": "game asset", "baseNegative": "blurry",
    ...      "perAssetType": {"ui_icon": {"positive": "flat ui icon, {specPrompt}"}}}
    >>> apply_prompt_templates("a shield", t, "ui_icon")
    ('flat ui icon, a shield', 'blurry')
    >>> apply_prompt_templates("a hero", t, "character")
    ('game asset, a hero', 'blurry')
    """
    templates = templates or {}
    per = (templates.get("perAssetType") or {}).get(asset_type or "") or {}
    if isinstance(per, str):
        per = {"positive": per}
    positive_t = str(per.get("positive") or templates.get("basePositive") or "")
    negative_t = str(per.get("negative") or templates.get("baseNegative") or "")
    return render_template(positive_t, prompt), render_template(negative_t, negative)


# ---- grid planning (pure) ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GridCell:
    """One image of a grid: a prompt (of an asset type) at a seed, rendered with a release at a strength."""

    prompt: str
    asset_type: str | None
    seed: int
    strength: float
    release_id: str
    prompt_index: int

    @property
    def is_base(self) -> bool:
        return self.strength == 0

    @property
    def row_key(self) -> str:
        return "base" if self.is_base else f"{self.release_id}__w{self.strength:g}"

    @property
    def key(self) -> str:
        """A file-name-safe id of the cell, unique in its grid (also the image's file name)."""
        return f"{self.row_key}__p{self.prompt_index:02d}__s{self.seed}"

    def as_record(self) -> dict:
        return {"key": self.key, "prompt": self.prompt, "assetType": self.asset_type, "seed": self.seed,
                "strength": self.strength, "releaseId": self.release_id}


def plan_cells(
    prompts: Sequence[tuple[str, str | None]],
    seeds: Sequence[int],
    strengths: Sequence[float],
    release_ids: Sequence[str],
) -> list[GridCell]:
    """Every cell of a grid, rows (base, then release x strength) before columns (prompt x seed).

    Strength 0 renders the base checkpoint, so it is always in the grid and appears once, whatever the
    number of releases: the base row is the same image for every release.

    >>> cells = plan_cells([("a shield", "ui_icon")], [1, 2], [1.0], ["r1", "r2"])
    >>> [c.key for c in cells]
    ['base__p00__s1', 'base__p00__s2', 'r1__w1__p00__s1', 'r1__w1__p00__s2', 'r2__w1__p00__s1', 'r2__w1__p00__s2']
    """
    if not prompts:
        raise EvalError("an eval grid needs at least one prompt")
    if not seeds:
        raise EvalError("an eval grid needs at least one seed")
    if not release_ids:
        raise EvalError("an eval grid needs a release")
    for s in strengths:
        if not 0 <= s <= 4:
            raise EvalError(f"LoRA strength {s:g} is out of range (0 to 4)")
    lora_strengths = sorted({float(s) for s in strengths if s != 0})
    rows = [(release_ids[0], 0.0)] + [(r, s) for r in dict.fromkeys(release_ids) for s in lora_strengths]
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    cells = []
    for release_id, strength in rows:
        for index, (prompt, asset_type) in enumerate(prompts):
            for seed in seeds:
                cells.append(GridCell(prompt, asset_type, seed, strength, release_id, index))
    return cells


def cell_settings(cell: GridCell, *, checkpoint: dict, checkpoint_hash: str | None, lora_id: str,
                  release_sha256: str | None, params: dict) -> dict:
    """The settings that produce one cell's image, stored on its job, its eval output and in its PNG: the
    grid's ``params`` (with the checkpoint's ``objective`` the worker renders for, and ``guidanceRescale``
    where that objective uses one) and the cell's own."""
    positive, negative = apply_prompt_templates(cell.prompt, checkpoint.get("promptTemplates"), cell.asset_type)
    return {
        "prompt": cell.prompt,
        "positivePrompt": positive,
        "negativePrompt": negative,
        "assetType": cell.asset_type,
        "seed": cell.seed,
        "strength": cell.strength,
        "checkpointId": checkpoint["id"],
        "checkpointWeightsHash": checkpoint_hash,
        "loraId": lora_id,
        "releaseId": cell.release_id,
        "releaseSha256": release_sha256,
        "scheduler": params["scheduler"],
        "steps": params["steps"],
        "cfg": params["cfg"],
        "width": params["width"],
        "height": params["height"],
        **{key: params[key] for key in ("objective", "guidanceRescale") if key in params},
    }


def plan_batches(cells: Sequence[GridCell], negatives: Sequence[str], batch_size: int) -> list[list[int]]:
    """Which cells render together: indexes into ``cells``, in plan order, at most ``batch_size`` per batch.

    A batch is one pipeline call, so its cells share release and strength (one adapter setting) and differ only
    in prompt and seed. Cells with and without a negative prompt are kept apart: SDXL checkpoints render an
    absent negative prompt as zeros, which a list that mixes both cannot express.

    >>> cells = plan_cells([("a", None), ("b", None)], [1, 2], [1.0], ["r1"])
    >>> plan_batches(cells, ["n"] * 8, 3)
    [[0, 1, 2], [3], [4, 5, 6], [7]]
    """
    if batch_size < 1:
        raise EvalError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[tuple, list[int]] = {}
    for index, (cell, negative) in enumerate(zip(cells, negatives, strict=True)):
        groups.setdefault((cell.row_key, bool(negative)), []).append(index)
    return [members[i:i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def grid_params(checkpoint: dict, family: str | Family | None, overrides: dict) -> dict:
    """Size, steps, cfg, guidance rescale and scheduler of a grid: the given values, else the checkpoint's
    defaults, else the family's (its ``eval_size``), else :data:`FALLBACK_PARAMS`.

    >>> grid_params({"defaultGenerationParams": {"steps": 4}}, "sd15", {"cfg": 3.0, "width": None})["steps"]
    4
    """
    size = {} if family is None else dict(zip(("width", "height"), get_family(family).eval_size, strict=True))
    defaults = {**FALLBACK_PARAMS, **size,
                **{k: v for k, v in (checkpoint.get("defaultGenerationParams") or {}).items() if v is not None}}
    params: dict[str, Any] = {k: (overrides.get(k) if overrides.get(k) is not None else defaults.get(k))
              for k in ("width", "height", "steps", "cfg", "guidanceRescale", "scheduler")}
    for key in ("width", "height"):
        params[key] = int(params[key])
        if params[key] <= 0 or params[key] % 8:
            raise EvalError(f"{key} must be a positive multiple of 8, got {params[key]}")
    params["steps"] = int(params["steps"])
    if params["steps"] < 1:
        raise EvalError(f"steps must be at least 1, got {params['steps']}")
    params["cfg"] = float(params["cfg"])
    params["guidanceRescale"] = float(params["guidanceRescale"])
    if not 0 <= params["guidanceRescale"] <= 1:
        raise EvalError(f"guidance rescale must be between 0 and 1, got {params['guidanceRescale']:g}")
    params["scheduler"] = params["scheduler"] or "default"
    return params


def objective_params(params: dict, objective: Objective, asked_rescale: bool) -> dict:
    """A grid's ``params`` for a checkpoint with ``objective``: the objective recorded (the worker renders with
    its scheduler), and the guidance rescale kept only when the objective renders with one. A rescale asked for
    a checkpoint whose objective has no use for it (``asked_rescale``) is an :class:`EvalError`.

    >>> objective_params({"cfg": 7.0, "guidanceRescale": 0.7}, Objective("v", True), False)
    {'cfg': 7.0, 'guidanceRescale': 0.7, 'objective': {'prediction': 'v', 'zeroTerminalSnr': True}}
    >>> objective_params({"cfg": 7.0, "guidanceRescale": 0.7}, Objective(), False)
    {'cfg': 7.0, 'objective': {'prediction': 'epsilon', 'zeroTerminalSnr': False}}
    """
    params = {**params, "objective": objective.record()}
    if not objective.render_kwargs(params["guidanceRescale"]):
        if asked_rescale:
            raise EvalError(f"a guidance rescale is for zero-terminal-SNR checkpoints; this one renders with "
                            f"{objective.describe()}")
        del params["guidanceRescale"]
    return params


def expected_cells(eval_record: dict) -> list[str]:
    """What a complete eval has an output for: its grid's cell keys, or (a plain eval) its prompts."""
    grid = eval_record.get("grid")
    if isinstance(grid, dict) and isinstance(grid.get("cells"), list):
        return [c["key"] for c in grid["cells"] if isinstance(c, dict) and "key" in c]
    return list(dict.fromkeys(p for p in eval_record.get("prompts") or [] if isinstance(p, str)))


def eval_status(eval_record: dict) -> str:
    """``complete`` when every grid cell (every prompt, for a plain eval) has its output, ``running`` when some
    have, ``pending`` when none.

    >>> eval_status({"prompts": ["a", "b"], "outputs": [{"prompt": "a", "images": ["x.png"]}]})
    'running'
    """
    expected = expected_cells(eval_record)
    outputs = [o for o in eval_record.get("outputs") or [] if isinstance(o, dict) and o.get("images")]
    field_name = "cellKey" if isinstance(eval_record.get("grid"), dict) else "prompt"
    done = {o.get(field_name) for o in outputs} & set(expected)
    if expected and len(done) == len(expected):
        return "complete"
    return "running" if done else "pending"


def settled_status(eval_record: dict, jobs: Sequence[dict]) -> str:
    """:func:`eval_status`, knowing the eval's ``jobs``: a grid eval whose missing cells no queued or running
    job will render, and no failure accounts for, is ``pending`` (its rendering stopped: its jobs were cleaned
    up or removed), not ``running`` forever.

    >>> grid = {"grid": {"cells": [{"key": "a"}, {"key": "b"}]}, "outputs": [{"cellKey": "a", "images": ["x.png"]}]}
    >>> settled_status(grid, []), settled_status(grid, [{"status": "queued", "input": {"cellKey": "b"}}])
    ('pending', 'running')
    """
    status = eval_status(eval_record)
    if status != "running" or not isinstance(eval_record.get("grid"), dict):
        return status
    done = {o.get("cellKey") for o in eval_record.get("outputs") or [] if isinstance(o, dict) and o.get("images")}
    accounted = {f.get("cellKey") for f in eval_record.get("failures") or [] if isinstance(f, dict)}
    accounted |= {(j.get("input") or {}).get("cellKey") for j in jobs
                  if isinstance(j, dict) and j.get("status") in ("queued", "running", "failed")}
    missing = set(expected_cells(eval_record)) - done
    return "running" if missing <= accounted else "pending"


def upsert_output(eval_record: dict, output: dict) -> dict:
    """The eval with ``output`` added, replacing an earlier output of the same cell (a re-rendered job)."""
    key = output.get("cellKey")
    outputs = [o for o in eval_record.get("outputs") or [] if key is None or o.get("cellKey") != key]
    failures = [f for f in eval_record.get("failures") or [] if f.get("cellKey") != key]
    new = {**eval_record, "outputs": outputs + [output]}
    if failures or "failures" in eval_record:
        new["failures"] = failures
    new["status"] = eval_status(new)
    return new


# ---- finding records -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraRef:
    record: dict
    project: str | None  # None: a baseline LoRA in data/shared/loras/

    @property
    def scope(self) -> str:
        return "baseline" if self.project is None else "project"


def find_lora(ws: Workspace, lora_id: str, project: str | None = None, scope: str | None = None) -> LoraRef:
    """A LoRA by id (``loras.find_lora``: with ``scope`` only there, else the project's first, then shared)."""
    from .loras import find_lora as locate

    record, where = locate(ws, lora_id, project=project, scope=scope)
    return LoraRef(record, where)


def find_eval(ws: Workspace | str | Path | None, eval_id: str, project: str | None = None) -> tuple[dict, str | None]:
    """An eval record and the project it lives in (None: shared). With ``project``, that project and the
    shared scope are searched; without, the shared scope and then every project."""
    ws = as_workspace(ws)
    check_id(eval_id, "eval id")
    places = [project, None] if project else [None, *ws.store.list_projects()]
    for place in places:
        if ws.store.exists("eval", eval_id, place):
            return ws.store.read("eval", eval_id, place), place
    raise RecordNotFoundError(f"eval {eval_id!r} not found ({'project ' + repr(project) + ' or ' if project else ''}"
                              "shared scope" + ("" if project else " or any project") + ")")


# ---- hashes --------------------------------------------------------------------------------------------


def release_sha256(ws: Workspace, lora: dict, release: dict) -> str:
    """The release's recorded sha256, else the sha256 of its weights file (which must exist)."""
    path = release_weights_path(release, ws.config, f"LoRA {lora.get('id')} release {release.get('id')}")
    return recorded_sha256(release) or file_sha256(path)


def scheduler_name(ws: Workspace, checkpoint: dict) -> str:
    """The scheduler class a checkpoint renders with: its ``defaultGenerationParams.scheduler`` when that names
    a diffusers class, else the one in its folder's ``scheduler/scheduler_config.json``."""
    wanted = (checkpoint.get("defaultGenerationParams") or {}).get("scheduler")
    if isinstance(wanted, str) and wanted.endswith("Scheduler"):
        return wanted
    try:
        folder = resolve_weights(checkpoint.get("weights") or {}, ws.config, what="checkpoint")
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        return str(config["_class_name"])
    except (ConfigError, OSError, ValueError, KeyError, TypeError):
        return "default"


# ---- linking evals from releases -------------------------------------------------------------------------
def link_eval(evaluation: dict | None, eval_id: str) -> dict:
    """A release's ``evaluation`` block after linking eval ``eval_id``: appended to ``evalIds`` (once);
    ``status`` is the review state the gate (``gate.py``) keeps, so it is only set, to ``pending``, when absent.

    >>> link_eval({"evalIds": ["a"], "status": "approved", "reviews": []}, "b")
    {'evalIds': ['a', 'b'], 'status': 'approved', 'reviews': []}
    """
    block = dict(evaluation or {})
    ids = [i for i in block.get("evalIds") or [] if isinstance(i, str)]
    block["evalIds"] = ids + ([eval_id] if eval_id not in ids else [])
    block.setdefault("status", "pending")
    return block


def _link_release(ws: Workspace, lora: LoraRef, release_id: str, eval_id: str) -> None:
    def change(record: dict) -> None:
        release = get_release(record, release_id)
        release["evaluation"] = link_eval(release.get("evaluation"), eval_id)

    ws.store.update("lora", lora.record["id"], change, lora.project)


# ---- creating evals ------------------------------------------------------------------------------------
def validation_headline(release: dict) -> dict | None:
    """What an eval record keeps of its release's validation drop (:data:`VALIDATION_HEADLINE`, each value checked
    as :func:`~lorakit.loras.validation_facts` does), or None when the release was trained without validation.

    >>> validation_headline({"training": {"validation": {"set": "training", "images": 4, "drop": "?", "curve": []}}})
    {'set': 'training', 'images': 4, 'baseLoss': None, 'finalLoss': None, 'drop': None, 'stoppedEarly': False, 'stoppedAt': None}
    >>> validation_headline({"training": {}}) is None
    True
    """
    facts = validation_facts(release_validation(release))
    return None if facts is None else {key: facts[key] for key in VALIDATION_HEADLINE}


def _lora_prompts(ws: Workspace, lora: dict, project: str | None, asset_type: str | None) -> list[tuple[str, str]]:
    types = [asset_type] if asset_type else list(lora.get("assetTypes") or [])
    catalog = load_canonical_prompts(ws, project)
    pairs: list[tuple[str, str]] = []
    for t in types:
        if not catalog.get(t):
            canonical_prompts(ws, t, project)  # raises the explanatory error
        pairs += [(p, t) for p in catalog[t]]
    firsts: dict[str, tuple[str, str]] = {}
    for p, t in pairs:
        firsts.setdefault(p, (p, t))  # the first asset type of a prompt listed by several
    return list(firsts.values())


def new_eval_record(eval_id: str, lora: LoraRef, release_id: str, prompts: list[str], now: str, **extra) -> dict:
    record = {
        "id": eval_id, "loraId": lora.record["id"], "releaseId": release_id, "createdAt": now, "updatedAt": now,
        "status": "pending", "prompts": prompts, "outputs": [], "loraScope": lora.scope,
    }
    if lora.project:
        record["loraProjectId"] = lora.project
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def create_eval(
    ws: Workspace | str | Path | None,
    lora_id: str,
    release_id: str,
    *,
    project: str | None = None,
    scope: str | None = None,
    prompts: Sequence[str] | None = None,
    eval_id: str | None = None,
    notes: str | None = None,
    dry_run: bool = False,
) -> dict:
    """Create a pending eval record for a release and link it from the release's ``evaluation`` block.

    Without ``prompts``, the canonical prompts of the LoRA's asset types. The eval is stored in the LoRA's
    scope (``shared/evals`` for a baseline LoRA). Returns the eval record (not written with ``dry_run``).

    >>> create_eval("data", "ui_icons", "r1", project="demo")["status"]   # doctest: +SKIP
    'pending'
    """
    ws = as_workspace(ws)
    lora = find_lora(ws, lora_id, project, scope)
    release = get_release(lora.record, release_id)
    prompt_list = list(dict.fromkeys(p.strip() for p in prompts or [] if p.strip())) or \
        [p for p, _ in _lora_prompts(ws, lora.record, project or lora.project, None)]
    eval_id = given_or_new_id(eval_id, "eval id")
    record = new_eval_record(eval_id, lora, release_id, prompt_list, now_iso(), notes=notes,
                             assetTypes=list(lora.record.get("assetTypes") or []),
                             validation=validation_headline(release))
    if not dry_run:
        ws.store.write("eval", record, lora.project, create=True)
        _link_release(ws, lora, release_id, eval_id)
    return record


@dataclass
class GridPlan:
    """What ``create_eval_grid`` wrote (or, with ``dry_run``, would write)."""

    eval: dict
    eval_project: str | None
    jobs: list[dict] = field(default_factory=list)
    jobs_project: str = ""
    eval_path: Path | None = None
    dry_run: bool = False

    @property
    def cells(self) -> list[dict]:
        return self.eval["grid"]["cells"]


def images_dir(eval_id: str, eval_project: str | None) -> str:
    """The folder (relative to dataRoot) that holds an eval's images."""
    return f"files/evals/{eval_project or BASELINE_FOLDER}/{eval_id}"


def eval_images_folder(ws: Workspace, eval_record: dict | None, eval_id: str, eval_project: str | None) -> Path:
    """The one folder an eval's images may be written to and deleted from. A record whose ``grid.imagesDir``
    names another folder (a hand edit, or a hostile one) is refused rather than followed."""
    check_id(eval_id, "eval id")
    if eval_project is not None:
        check_id(eval_project, "project id")
    expected = images_dir(eval_id, eval_project)
    grid = eval_record.get("grid") if isinstance(eval_record, dict) else None
    named = grid.get("imagesDir") if isinstance(grid, dict) else None
    if named is not None and named != expected:
        raise EvalError(f"eval {eval_id}: grid.imagesDir is {named!r}, not its image folder {expected!r}; lorakit "
                        "writes and deletes eval images only there (fix the record, or run `lorakit validate`)")
    return ws.store.file_path(expected, what=f"eval {eval_id} image folder")


def cell_image_path(ws: Workspace, job_input: dict) -> Path:
    """Where a grid job's image goes: ``<its eval's image folder>/<cell key>.png``, and only there."""
    eval_id, eval_project = job_input.get("evalId"), job_input.get("evalProjectId")
    cell_key = check_id(job_input.get("cellKey"), "cell key")
    expected = f"{images_dir(check_id(eval_id, 'eval id'), eval_project)}/{cell_key}.png"
    if job_input.get("imagePath") != expected:
        raise EvalError(f"job for eval {eval_id} cell {cell_key}: input.imagePath is {job_input.get('imagePath')!r}, "
                        f"not {expected!r}; a grid job writes only into its eval's image folder")
    if eval_project is not None:
        check_id(eval_project, "project id")
    return ws.store.file_path(expected, what=f"eval {eval_id} image")


def create_eval_grid(
    ws: Workspace | str | Path | None,
    project: str,
    lora_id: str,
    release_id: str,
    *,
    prompts: Sequence[str] | None = None,
    checkpoint_id: str | None = None,
    asset_type: str | None = None,
    width: int | None = None,
    height: int | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    strengths: Sequence[float] = DEFAULT_STRENGTHS,
    compare_release: str | None = None,
    steps: int | None = None,
    cfg: float | None = None,
    guidance_rescale: float | None = None,
    scope: str | None = None,
    eval_id: str | None = None,
    auto_cleanup: bool = False,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
) -> GridPlan:
    """Create an eval grid: the eval record (pending) and one queued ``eval_render`` job per grid cell.

    Cells are prompt x seed x strength x release, where strength 0 (the base checkpoint) is always included
    and ``compare_release`` (e.g. the active release) adds its own rows. Prompts default to the canonical
    prompts of ``asset_type`` (else of each of the LoRA's asset types); the checkpoint's prompt templates
    are applied per cell. Every job carries the full settings of its image.

    Cells of one row (release x strength) are planned into batches of up to ``batch_size`` that a worker
    renders in one pipeline call; every job lists its batch, so whichever worker takes it renders the same
    batch and the same pixels. ``batch_size=1`` renders every cell alone.

    The grid renders with the scheduler the checkpoint's objective needs (v-prediction, zero terminal SNR:
    see ``Objective.render_scheduler``) and, for zero terminal SNR, ``guidance_rescale`` (default
    :data:`~lorakit.families.objectives.DEFAULT_GUIDANCE_RESCALE`, or the checkpoint's
    ``defaultGenerationParams.guidanceRescale``); both are in every job's settings.

    >>> plan = create_eval_grid("data", "demo", "ui_icons", "r2", compare_release="r1", seeds=[1, 2])  # doctest: +SKIP
    >>> len(plan.jobs)                                                                                # doctest: +SKIP
    """
    from .models.registry import checkpoint_family, checkpoint_objective, checkpoint_weights_hash, get_checkpoint

    ws = as_workspace(ws)
    store = ws.store
    if not store.path("project", project).is_file():
        raise RecordNotFoundError(f"project {project!r} does not exist (jobs of an eval grid live in a project)")
    lora = find_lora(ws, lora_id, project, scope)
    releases = [get_release(lora.record, release_id)]
    if compare_release and compare_release != release_id:
        releases.append(get_release(lora.record, compare_release))
    checkpoint = get_checkpoint(ws, checkpoint_id or lora.record["checkpointId"])
    try:
        family = checkpoint_family(checkpoint)
    except LorakitError:
        family = None
    params = grid_params(checkpoint, family, {"width": width, "height": height, "steps": steps, "cfg": cfg,
                                             "guidanceRescale": guidance_rescale})
    objective = checkpoint_objective(ws, checkpoint) if family is not None else Objective()
    params = objective_params(params, objective, guidance_rescale is not None)
    if params["scheduler"] == "default":
        params["scheduler"] = scheduler_name(ws, checkpoint)

    prompt_pairs = _grid_prompts(ws, lora.record, project, prompts, asset_type)
    cells = plan_cells(prompt_pairs, list(seeds), [0.0, *strengths], [r["id"] for r in releases])

    eval_id = given_or_new_id(eval_id, "eval id")
    if store.exists("eval", eval_id, lora.project):
        raise RecordError(f"eval {eval_id!r} already exists ({store.path('eval', eval_id, lora.project)})")
    ckpt_hash = checkpoint_weights_hash(ws, checkpoint, record=False, missing_ok=True)
    sha256_of = {r["id"]: release_sha256(ws, lora.record, r) for r in releases}
    folder = images_dir(eval_id, lora.project)
    now = now_iso()
    grid = {
        "projectId": project, "checkpointId": checkpoint["id"], "checkpointWeightsHash": ckpt_hash,
        "releaseIds": [r["id"] for r in releases], "seeds": list(dict.fromkeys(int(s) for s in seeds)),
        "strengths": sorted({0.0, *map(float, strengths)}), **params, "batchSize": int(batch_size),
        "imagesDir": folder, "cells": [c.as_record() for c in cells],
    }
    record = new_eval_record(
        eval_id, lora, release_id, list(dict.fromkeys(p for p, _ in prompt_pairs)), now,
        autoCleanup=bool(auto_cleanup), checkpointId=checkpoint["id"], grid=grid,
        assetTypes=list(dict.fromkeys(t for _, t in prompt_pairs if t)), validation=validation_headline(releases[0]),
    )
    all_settings = [cell_settings(cell, checkpoint=checkpoint, checkpoint_hash=ckpt_hash, lora_id=lora_id,
                                  release_sha256=sha256_of[cell.release_id], params=params) for cell in cells]
    batches = plan_batches(cells, [st["negativePrompt"] for st in all_settings], batch_size)
    jobs = _grid_jobs(cells, all_settings, batches, releases, lora, project=project, eval_id=eval_id, folder=folder,
                      now=now, max_attempts=max_attempts)
    eval_path = store.path("eval", eval_id, lora.project)
    store.check("eval", record, eval_path)
    for job in jobs:
        store.check("job", job, store.path("job", job["id"], project))
    plan = GridPlan(record, lora.project, jobs, project, eval_path, dry_run)
    if dry_run:
        return plan
    store.write("eval", record, lora.project, create=True)
    for job in jobs:
        store.write("job", job, project, create=True)
    _link_release(ws, lora, release_id, eval_id)
    return plan


def _grid_prompts(ws: Workspace, lora: dict, project: str, prompts: Sequence[str] | None,
                  asset_type: str | None) -> Sequence[tuple[str, str | None]]:
    """``(prompt, asset type)`` of each grid column: the prompts given (for ``asset_type``, else the LoRA's
    first), else the canonical prompts of the LoRA's asset types."""
    given = list(dict.fromkeys(p.strip() for p in prompts or [] if p.strip()))
    if given:
        default_type = asset_type or next(iter(lora.get("assetTypes") or []), None)
        return [(p, default_type) for p in given]
    return _lora_prompts(ws, lora, project, asset_type)


def _grid_jobs(cells: Sequence[GridCell], all_settings: list[dict], batches: list[list[int]], releases: list[dict],
               lora: LoraRef, *, project: str, eval_id: str, folder: str, now: str, max_attempts: int) -> list[dict]:
    """One queued job per cell, in cell order; each lists the batch it renders in."""
    by_id = {r["id"]: r for r in releases}
    job_ids = [new_ulid() for _ in cells]
    job_at: dict[int, dict] = {}  # cell index -> its job; every cell is in exactly one batch
    for number, members in enumerate(batches):
        batch_id = f"{cells[members[0]].row_key}__b{number:02d}"
        batch_cells = [{"cellKey": cells[i].key, "jobId": job_ids[i], "seed": cells[i].seed,
                        "positivePrompt": all_settings[i]["positivePrompt"],
                        "negativePrompt": all_settings[i]["negativePrompt"]} for i in members]
        for position, i in enumerate(members):
            cell = cells[i]
            settings = {**all_settings[i], "batchSize": len(members), "batchPos": position}
            release = by_id[cell.release_id]
            job_at[i] = {
                "id": job_ids[i], "projectId": project, "type": JOB_TYPE, "status": "queued",
                "createdAt": now, "updatedAt": now, "attempt": 0, "maxAttempts": int(max_attempts),
                "input": {
                    "evalId": eval_id, "evalProjectId": lora.project, "cellKey": cell.key,
                    "imagePath": f"{folder}/{cell.key}.png",
                    "lora": {"id": lora.record["id"], "scope": lora.scope, "projectId": lora.project,
                             "releaseId": release["id"], "weights": release.get("weights"),
                             "localPath": release.get("localPath")},
                    "settings": settings,
                    "batch": {"id": batch_id, "cells": batch_cells},
                },
            }
    return [job_at[i] for i in range(len(cells))]


# ---- worker-side updates ---------------------------------------------------------------------------------
def record_outputs(ws: Workspace, eval_id: str, eval_project: str | None, outputs: Sequence[dict]) -> dict:
    """Add rendered cells to their eval in one update under the eval's lock; the status moves
    pending -> running -> complete."""

    def change(record: dict) -> dict:
        for output in outputs:
            record = upsert_output(record, output)
        return record

    return ws.store.update("eval", eval_id, change, eval_project)


def record_failures(ws: Workspace, eval_id: str, eval_project: str | None, failures: Sequence[dict]) -> dict:
    """Note cells whose jobs failed on their eval (replacing earlier failures of the same cells)."""
    keys = {f.get("cellKey") for f in failures}

    def change(record: dict) -> None:
        record["failures"] = [f for f in record.get("failures") or [] if f.get("cellKey") not in keys] + list(failures)

    return ws.store.update("eval", eval_id, change, eval_project)


def record_failure(ws: Workspace, eval_id: str, eval_project: str | None, failure: dict) -> dict:
    """Note a cell whose job failed on its eval (see ``record_failures``)."""
    return record_failures(ws, eval_id, eval_project, [failure])


# ---- cleanup -------------------------------------------------------------------------------------------
def job_eval_id(job: dict) -> str | None:
    """The eval a job renders for: lorakit's ``input.evalId`` or the original tool's ``input.eval.evalId``."""
    data = job.get("input") or {}
    nested = data.get("eval")
    if not isinstance(nested, dict):
        nested = {}
    value = data.get("evalId") or nested.get("evalId")
    return value if isinstance(value, str) else None


@dataclass
class CleanupReport:
    eval_id: str
    jobs: list[Path] = field(default_factory=list)
    specs: list[Path] = field(default_factory=list)
    temp_files: list[Path] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    running_jobs: list[str] = field(default_factory=list)
    dry_run: bool = False

    @property
    def removed(self) -> list[Path]:
        return self.jobs + self.specs + self.temp_files + self.images


def cleanup_eval(
    ws: Workspace | str | Path | None,
    project: str,
    eval_id: str,
    *,
    images: bool = False,
    dry_run: bool = False,
) -> CleanupReport:
    """Remove what an eval grid created besides the eval record and its images: its jobs, the original tool's
    ``eval_<evalId>_*`` specs and half-written temporary images. ``images=True`` also removes the images; the
    eval keeps its outputs (the settings) with empty ``images`` lists, so its status goes back to ``pending``."""
    ws = as_workspace(ws)
    store = ws.store
    check_id(eval_id, "eval id")
    report = CleanupReport(eval_id, dry_run=dry_run)
    try:
        eval_record, eval_project = find_eval(ws, eval_id, project)
    except RecordNotFoundError:
        eval_record, eval_project = None, project
    # Under the eval's lock, which a worker holds while it writes a batch's images and outputs (and checks
    # it still holds their jobs): a cleanup never interleaves with a worker's writes.
    with contextlib.nullcontext() if dry_run else store.claim("eval", eval_id, eval_project):
        return _cleanup_eval_locked(ws, project, eval_id, eval_record, eval_project, report, images)


def _cleanup_eval_locked(ws: Workspace, project: str, eval_id: str, eval_record: dict | None,
                         eval_project: str | None, report: CleanupReport, images: bool) -> CleanupReport:
    store, dry_run = ws.store, report.dry_run
    for path, job in store.iter_records("job", project, validate=False):
        if job_eval_id(job) == eval_id:
            report.jobs.append(path)
            if job.get("status") == "running":
                report.running_jobs.append(job.get("id", path.stem))
    for path, spec in store.iter_records("spec", project, validate=False):
        if str(spec.get("id", "")).startswith(f"eval_{eval_id}_"):
            report.specs.append(path)
    folder = eval_images_folder(ws, eval_record, eval_id, eval_project)
    if folder.is_dir():
        report.temp_files = sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
        if images:
            report.images = sorted(p for p in folder.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
    if dry_run:
        return report
    for path in report.jobs:
        store.delete("job", path.stem, project)
    for path in report.specs:
        store.delete("spec", path.stem, project)
    for path in report.temp_files + report.images:
        store.fs.remove(path)
    if images and eval_record is not None:
        def drop_images(record: dict) -> None:
            for output in record.get("outputs") or []:
                output["images"] = []
            record["status"] = eval_status(record)

        store.update("eval", eval_id, drop_images, eval_project)
        store.fs.remove_folder(folder, only_empty=True)
    return report


# ---- normalize -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StatusChange:
    path: Path
    eval_id: str
    old: str | None
    new: str
    failures_added: int = 0  # failed jobs whose failure the eval had missed


def missed_failures(eval_record: dict, jobs: Sequence[dict]) -> list[dict]:
    """Failures of ``eval_record``'s failed jobs that it has neither as an output nor as a failure (a worker that
    could not write to the eval, e.g. on a full disk).

    >>> missed_failures({"outputs": [], "failures": []},
    ...                 [{"id": "j1", "status": "failed", "error": "E", "finishedAt": "t", "input": {"cellKey": "c"}}])
    [{'cellKey': 'c', 'jobId': 'j1', 'error': 'E', 'at': 't'}]
    """
    known = {o.get("cellKey") for o in eval_record.get("outputs") or [] if isinstance(o, dict)}
    known |= {f.get("cellKey") for f in eval_record.get("failures") or [] if isinstance(f, dict)}
    missed = []
    for job in jobs:
        cell = (job.get("input") or {}).get("cellKey")
        if job.get("status") == "failed" and cell and cell not in known:
            missed.append({"cellKey": cell, "jobId": job.get("id"), "error": job.get("error") or "failed",
                           "at": job.get("finishedAt") or job.get("updatedAt")})
            known.add(cell)
    return missed


def normalize_evals(
    ws: Workspace | str | Path | None,
    scope: str = "all",
    project: str | None = None,
    *,
    dry_run: bool = False,
) -> list[StatusChange]:
    """Recompute each eval's status from its grid cells (or prompts) against its outputs and its jobs
    (:func:`settled_status`), and note the failures of failed jobs an eval missed; return the changes.

    ``scope``: ``all`` (shared and every project, or only ``project``'s with one), ``baseline`` or ``project``.
    """
    ws = as_workspace(ws)
    if scope not in ("all", "baseline", "project"):
        raise EvalError(f"--scope must be all, baseline or project, got {scope!r}")
    places: list[str | None] = []
    if scope in ("all", "baseline"):
        places.append(None)
    if scope in ("all", "project"):
        places += [project] if project else ws.store.list_projects()
    jobs_by_eval: dict[str, list[dict]] = {}
    for pid in ws.store.list_projects():
        for _, job in ws.store.iter_records("job", pid, validate=False):
            jobs_by_eval.setdefault(job_eval_id(job) or "", []).append(job)
    changes = []
    for place in places:
        for path, record in ws.store.iter_records("eval", place):
            jobs = jobs_by_eval.get(record["id"], [])
            status = settled_status(record, jobs)
            missed = missed_failures(record, jobs)
            if status == record.get("status") and record.get("updatedAt") and not missed:
                continue
            changes.append(StatusChange(path, record["id"], record.get("status"), status, len(missed)))
            if not dry_run:
                def repair(r: dict, jobs=jobs) -> dict:
                    added = missed_failures(r, jobs)
                    if added:
                        r = {**r, "failures": [*(r.get("failures") or []), *added]}
                    return {**r, "status": settled_status(r, jobs)}

                ws.store.update("eval", record["id"], repair, place)
    return changes


# ---- contact sheet -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SheetLayout:
    """Rows (release x strength, base first) and columns (prompt x seed) of an eval's contact sheet."""

    rows: list[tuple[str, str]]          # (row key, label)
    columns: list[tuple[tuple, str]]     # ((prompt index or prompt, seed), label)
    images: dict[tuple[str, tuple], str]  # (row key, column key) -> image path


def sheet_layout(eval_record: dict) -> SheetLayout:
    """Where each output of an eval goes on its contact sheet. Plain evals get one row and a column per prompt."""
    grid = eval_record.get("grid")
    outputs = [o for o in eval_record.get("outputs") or [] if isinstance(o, dict) and o.get("images")]
    if isinstance(grid, dict) and isinstance(grid.get("cells"), list):
        cells = grid["cells"]
        rows: dict[str, str] = {}
        columns: dict[tuple, str] = {}
        for c in cells:
            cell = GridCell(c["prompt"], c.get("assetType"), c["seed"], c["strength"], c["releaseId"], 0)
            rows.setdefault(cell.row_key, "base (strength 0)" if cell.is_base else f"{c['releaseId']} @ {c['strength']:g}")
            columns.setdefault((c["prompt"], c["seed"]), f"{c['prompt']} | seed {c['seed']}")
        by_key = {c["key"]: c for c in cells}
        images = {}
        for o in outputs:
            c = by_key.get(o.get("cellKey"))
            if c:
                row_key = GridCell(c["prompt"], None, c["seed"], c["strength"], c["releaseId"], 0).row_key
                images[(row_key, (c["prompt"], c["seed"]))] = o["images"][0]
        return SheetLayout(list(rows.items()), list(columns.items()), images)
    prompts = list(dict.fromkeys([*(eval_record.get("prompts") or []), *(o["prompt"] for o in outputs)]))
    row = (eval_record.get("releaseId", "release"), str(eval_record.get("releaseId", "release")))
    images = {(row[0], (p, None)): o["images"][0] for p in prompts for o in outputs if o["prompt"] == p}
    return SheetLayout([row], [((p, None), p) for p in prompts], images)


def sheet_heading(eval_record: dict) -> list[tuple[str, str]]:
    """The lines above an eval's contact sheet, each with its colour: what the eval is, its release's validation
    drop (the number a reviewer reads beside the grid) and the checkpoint.

    >>> [text for text, _ in sheet_heading({"id": "e1", "loraId": "icons", "releaseId": "r1", "status": "complete"})]
    ['eval e1 - LoRA icons release r1 - complete', 'no validation']
    """
    title = (f"eval {eval_record.get('id')} - LoRA {eval_record.get('loraId')} release {eval_record.get('releaseId')}"
             f" - {eval_record.get('status')}")
    # The sheet's default font has no arrow or minus sign, hence ASCII.
    heading = [(title, "black"), (validation_summary(eval_record.get("validation"), ascii_only=True), "black")]
    if eval_record.get("checkpointId"):
        heading.append((f"checkpoint {eval_record['checkpointId']}", "dimgray"))
    return heading


# A row label wider than this (in pixels, at the sheet's 12 px font) has its long ids shortened: a 26-character
# ULID with its strength fits, a 40-character release id does not.
MAX_ROW_LABEL_PX = 260


def fit_row_label(label: str, width_of: Callable[[str], float], max_px: int = MAX_ROW_LABEL_PX) -> str:
    """``label`` as a contact-sheet row shows it: whole when it is at most ``max_px`` wide, else with each long
    word (a release id) cut to "…" and its last 8 characters.

    >>> fit_row_label("a" * 40 + " @ 1", len, max_px=30)
    '…aaaaaaaa @ 1'
    >>> fit_row_label("r2 @ 0.5", len, max_px=30)
    'r2 @ 0.5'
    """
    if width_of(label) <= max_px:
        return label
    return " ".join("…" + word[-8:] if len(word) > 9 else word for word in label.split(" "))


def wrap_to_width(text: str, width_of: Callable[[str], float], max_px: float) -> list[str]:
    """``text`` in lines at most ``max_px`` wide (a word wider than that is broken), so a column label stays
    over its own image and nothing is cut off.

    >>> wrap_to_width("ui icon of a shield | seed 1", len, 10)
    ['ui icon of', 'a shield |', 'seed 1']
    >>> wrap_to_width("abcdefghijkl", len, 5)
    ['abcde', 'fghij', 'kl']
    """
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if width_of(candidate) <= max_px:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        while width_of(word) > max_px and len(word) > 1:
            cut = max((k for k in range(1, len(word)) if width_of(word[:k]) <= max_px), default=1)
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line or not lines:
        lines.append(line)
    return lines


def contact_sheet(
    ws: Workspace | str | Path | None,
    eval_id: str,
    project: str | None = None,
    *,
    cell_size: int | None = None,
):
    """Compose an eval's images into one labelled ``PIL.Image``: rows release x strength (base first),
    columns prompt x seed. Missing cells are grey. Small images are scaled up (nearest) to ``cell_size``."""
    from PIL import Image, ImageDraw, ImageFont

    ws = as_workspace(ws)
    record, _ = find_eval(ws, eval_id, project)
    layout = sheet_layout(record)
    if not layout.columns:
        raise EvalError(f"eval {eval_id!r} has no prompts to show")
    loaded = {}
    for key, rel in layout.images.items():
        try:
            with Image.open(ws.store.file_path(rel)) as im:
                loaded[key] = im.convert("RGB")
        except OSError:
            continue
    native = max((im.width for im in loaded.values()), default=128)
    size = cell_size or max(native, 160)
    font = ImageFont.load_default(size=12) if hasattr(ImageFont, "load_default") else None
    pad, line_h = 4, 14
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def width_of(text: str) -> float:
        return measure.textlength(text, font=font)

    # The label column is as wide as its longest label (measured in the font), so no label runs under an image.
    row_labels = [fit_row_label(label, width_of) for _, label in layout.rows]
    label_w = int(max(width_of(label) for label in row_labels)) + 3 * pad
    column_lines = [wrap_to_width(label, width_of, size) for _, label in layout.columns]
    header_h = pad + max(len(lines) for lines in column_lines) * line_h
    heading = sheet_heading(record)
    title_h = len(heading) * line_h + pad
    # A one-column grid is narrower than its heading: widen the sheet so the validation drop is never cut off.
    width = max(label_w + len(layout.columns) * (size + pad) + pad,
                *(int(width_of(text)) + 2 * pad for text, _ in heading))
    height = title_h + header_h + len(layout.rows) * (size + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (text, colour) in enumerate(heading):
        draw.text((pad, pad + k * line_h), text, fill=colour, font=font)
    for j, lines in enumerate(column_lines):
        x = label_w + pad + j * (size + pad)
        for k, line in enumerate(lines):
            draw.text((x, title_h + k * line_h), line, fill="black", font=font)
    for i, ((row_key, _), label) in enumerate(zip(layout.rows, row_labels, strict=True)):
        y = title_h + header_h + i * (size + pad)
        draw.text((pad, y), label, fill="black", font=font)
        for j, (col_key, _) in enumerate(layout.columns):
            x = label_w + pad + j * (size + pad)
            image = loaded.get((row_key, col_key))
            if image is None:
                draw.rectangle([x, y, x + size - 1, y + size - 1], fill=(200, 200, 200))
                draw.text((x + pad, y + pad), "missing", fill="black", font=font)
            else:
                resample = Image.Resampling.NEAREST if image.width < size else Image.Resampling.LANCZOS
                sheet.paste(image.resize((size, size), resample), (x, y))
    return sheet


def save_contact_sheet(ws: Workspace | str | Path | None, eval_id: str, out: str | Path,
                       project: str | None = None, *, cell_size: int | None = None) -> Path:
    """Write :func:`contact_sheet` to ``out`` (PNG); returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(ws, eval_id, project, cell_size=cell_size).save(out, format="PNG")
    return out


def show_eval_grid(ws: Workspace | str | Path | None, eval_id: str, project: str | None = None, **kwargs):
    """Display an eval's contact sheet inline in a notebook (and return it as a ``PIL.Image``)."""
    image = contact_sheet(ws, eval_id, project, **kwargs)
    try:
        from IPython.display import display

        display(image)
    except ImportError:
        pass
    return image
