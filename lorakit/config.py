"""Local configuration (``config/local.json``) and resolution of weights references.

Precedence for the data root: an explicit ``data_root`` argument (the ``--data-root`` flag), then the
``LORAKIT_DATA_ROOT`` environment variable, then ``dataRoot`` in the config file, then ``<repo>/data``.
The config file is ``LORAKIT_CONFIG`` when set, else ``<repo>/config/local.json``; it may be absent.
Relative paths in the config file are relative to the repository root, so a config works from any
working directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "schemas"
ROOT_NAMES = ("modelsRoot", "checkpointsRoot", "lorasRoot")
WEIGHT_KINDS = ("repo_relative", "config_relative", "absolute", "external")


@dataclass(frozen=True)
class Config:
    """Where lorakit finds records and weights on this machine."""

    data_root: Path
    roots: dict[str, Path] = field(default_factory=dict)
    repo_root: Path = REPO_ROOT
    source: Path | None = None  # the config file read, if any

    @property
    def models_root(self) -> Path:
        return self.roots["modelsRoot"]

    @property
    def checkpoints_root(self) -> Path:
        return self.roots["checkpointsRoot"]

    @property
    def loras_root(self) -> Path:
        return self.roots["lorasRoot"]


def config_path() -> Path:
    env = os.environ.get("LORAKIT_CONFIG")
    return Path(env) if env else REPO_ROOT / "config" / "local.json"


def _read_config_file(path: Path) -> dict:
    if not path.exists():
        if os.environ.get("LORAKIT_CONFIG"):
            raise ConfigError(f"config file {path} (from LORAKIT_CONFIG) does not exist")
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    from .schemas import validation_errors

    problems = validation_errors("local-config", raw)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return raw


def load_config(data_root: str | Path | None = None) -> Config:
    """Read the local config and apply the overrides; see the module docstring for precedence."""
    path = config_path()
    raw = _read_config_file(path)

    def absolute(value: str | Path) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (REPO_ROOT / p)

    chosen = data_root or os.environ.get("LORAKIT_DATA_ROOT") or raw.get("dataRoot") or REPO_ROOT / "data"
    paths = raw.get("paths", {})
    models = absolute(paths.get("modelsRoot", REPO_ROOT / "models"))
    roots = {
        "modelsRoot": models,
        "checkpointsRoot": absolute(paths["checkpointsRoot"]) if "checkpointsRoot" in paths else models / "checkpoints",
        "lorasRoot": absolute(paths["lorasRoot"]) if "lorasRoot" in paths else models / "loras",
    }
    return Config(data_root=absolute(chosen).resolve(), roots=roots, source=path if path.exists() else None)


def resolve_weights(ref: dict, config: Config, what: str = "weights", must_exist: bool = True) -> Path:
    """The local file a weights reference points at.

    ``what`` names the owner in error messages (e.g. ``"checkpoint sdxl_base"``).

    >>> cfg = Config(data_root=Path("/d"), roots={"lorasRoot": Path("/m/loras")})
    >>> resolve_weights({"kind": "config_relative", "base": "lorasRoot", "path": "a/b.safetensors"},
    ...                 cfg, must_exist=False).as_posix()
    '/m/loras/a/b.safetensors'
    """
    kind = ref.get("kind")
    if kind not in WEIGHT_KINDS:
        raise ConfigError(f"{what}: unknown weights kind {kind!r} (expected one of {', '.join(WEIGHT_KINDS)})")
    if kind == "external":
        uri = ref.get("uri") or ref.get("path") or "(no uri)"
        raise ConfigError(
            f"{what}: weights are external ({uri}); download them and register a local path "
            "(kind config_relative with a base, or absolute)"
        )
    rel = ref.get("path")
    if not rel:
        raise ConfigError(f"{what}: weights reference of kind {kind} has no 'path'")
    if kind == "repo_relative":
        path = config.repo_root / rel
        where = f"repo_relative to {config.repo_root}"
    elif kind == "absolute":
        path = Path(rel)
        if not path.is_absolute():
            raise ConfigError(f"{what}: weights kind 'absolute' needs an absolute path, got {rel!r}")
        where = "absolute"
    else:
        base = ref.get("base")
        if base not in ROOT_NAMES:
            raise ConfigError(
                f"{what}: config_relative weights need 'base' set to one of {', '.join(ROOT_NAMES)}, got {base!r}"
            )
        root = config.roots.get(base)
        if root is None:
            raise ConfigError(f"{what}: {base} is not set (paths.{base} in {config_path()})")
        if must_exist and not root.exists():
            raise ConfigError(
                f"{what}: {base} folder {root} does not exist (set paths.{base} in {config_path()} "
                "or create the folder)"
            )
        path = root / rel
        where = f"under {base} = {root}"
    if must_exist and not path.exists():
        raise ConfigError(f"{what}: weights file not found: {path} ({where})")
    return path
