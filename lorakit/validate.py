"""``lorakit validate``: check every record under the data root against its schema."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import ROOT_NAMES, resolve_local_path, resolve_root_path, resolve_weights
from .errors import ConfigError, LorakitError
from .evals import canonical_prompt_problems
from .schemas import path_fields
from .store import CATALOG_NAMES, PROJECT_KINDS, SCHEMA_OF, SCOPED_KINDS, SHARED_KINDS, Store, contained_path
from .workspace import Workspace, as_workspace


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str

    def __str__(self) -> str:
        return self.message if self.message.startswith(str(self.path)) else f"{self.path}: {self.message}"


def path_problems(ws: Workspace, kind: str, record: dict) -> list[str]:
    """Every file path in ``record`` (found from its schema) that leads out of its root, through ``..``, an
    absolute path or a symbolic link, as ``"at $.json.path: ..."``. The schema already refuses the first two
    in text; this also follows the links on this machine's disk."""
    messages = []
    root = os.fspath(ws.store.root)
    real_dirs: dict[str, str] = {}
    for where, root_name, value in path_fields(SCHEMA_OF[kind], record):
        try:
            if root_name == "dataRoot" and isinstance(value, str) and value:
                problem, _ = contained_path(root, value, real_dirs)
                if problem:
                    messages.append(f"at {where}: path {value!r} {problem}")
            elif root_name == "repoRoot" and isinstance(value, str) and value:
                resolve_local_path(value, ws.config, f"at {where}", must_exist=False)
            elif root_name in ROOT_NAMES and isinstance(value, str) and value:
                resolve_root_path(root_name, value, ws.config, f"at {where}")
            elif root_name == "weights" and isinstance(value, dict) and value.get("kind") in ("config_relative",
                                                                                              "repo_relative"):
                resolve_weights(value, ws.config, what=f"at {where}", must_exist=False)
                if isinstance(value.get("config"), str):  # a single file's config folder, beside it
                    resolve_weights({**value, "path": value["config"]}, ws.config, what=f"at {where}.config",
                                    must_exist=False)
        except ConfigError as exc:
            messages.append(str(exc))
    return messages


def _check_file(ws: Workspace, kind: str, path: Path, extra_checks) -> list[Problem]:
    store = ws.store
    try:
        record = store.read_path(path, kind)
    except LorakitError as exc:
        return [Problem(path, str(exc))]
    problems = [Problem(path, message) for message in path_problems(ws, kind, record)]
    expected_id = None if kind == "project" or kind.startswith("catalog:") else path.stem
    if expected_id is not None and record.get("id") != expected_id:
        problems.append(Problem(path, f"at $.id: {record.get('id')!r} does not match the file name {path.name}"))
    for check in extra_checks.get(kind, ()):
        problems.extend(Problem(path, message) for message in check(record))
    return problems


def record_files(store: Store, project: str | None = None) -> list[tuple[str, Path]]:
    """Every record file under the data root (or of one project and the shared scope) with its kind."""
    files: list[tuple[str, Path]] = []
    for kind in [*SHARED_KINDS, *SCOPED_KINDS]:
        folder = store.folder(kind, None)
        files += [(kind, folder / f"{i}.json") for i in store.list_ids(kind, None)]
    shared_catalogs = store.root / "shared" / "catalogs"
    for name in CATALOG_NAMES:
        files += [(f"catalog:{name}", p) for p in sorted(shared_catalogs.glob(f"{name}.json"))]
    projects_dir = store.root / "projects"
    projects = [project] if project else (sorted(p.name for p in projects_dir.iterdir() if p.is_dir()) if projects_dir.is_dir() else [])
    for pid in projects:
        files.append(("project", store.path("project", pid)))
        for kind in [*PROJECT_KINDS, *SCOPED_KINDS]:
            folder = store.folder(kind, pid)
            files += [(kind, folder / f"{i}.json") for i in store.list_ids(kind, pid)]
        catalogs = store.project_dir(pid) / "catalogs"
        for name in CATALOG_NAMES:
            files += [(f"catalog:{name}", p) for p in sorted(catalogs.glob(f"{name}.json"))]
            files += [(f"catalog:{name}", p) for p in sorted(catalogs.glob(f"checkpoints/*/{name}.json"))]
    return files


# Checks beyond the schemas, keyed by record kind; each returns a list of messages with JSON paths.
EXTRA_CHECKS: dict = {}
EXTRA_CHECKS.setdefault("catalog:asset-types", []).append(canonical_prompt_problems)  # 3-5 prompts per type


def validate_records(ws: Workspace | str | Path | None = None, project: str | None = None) -> list[Problem]:
    """Check every record (of ``project`` and the shared scope, or all) and return the problems found."""
    ws = as_workspace(ws)
    if project and not ws.store.path("project", project).exists():
        return [Problem(ws.store.path("project", project), f"project {project!r} does not exist")]
    problems: list[Problem] = []
    for kind, path in record_files(ws.store, project):
        problems += _check_file(ws, kind, path, EXTRA_CHECKS)
    return problems
