"""Local configuration (``config/local.json``) and resolution of weights references.

Where lorakit looks, first match wins:

- the config file: ``LORAKIT_CONFIG``, else ``./config/local.json`` in the current folder, else the
  ``config/local.json`` of the lorakit checkout this code runs from (none for an installed wheel); it may be absent;
- the data root: the ``data_root`` argument (``--data-root``), else ``LORAKIT_DATA_ROOT``, else ``dataRoot`` in the
  config file, else ``./data`` in the current folder when it exists, else the checkout's demo ``data/``, else
  ``./data``;
- the model roots: ``paths.*`` in the config file, else ``models/``, ``models/checkpoints`` and ``models/loras``
  beside the data root.

Paths typed by the user (the argument, the environment variables) are relative to the current folder, as for any
command-line tool. Relative paths inside a config file are relative to the folder it configures: for
``<dir>/config/local.json`` that is ``<dir>``, for any other file its own folder, so a config reads the same from
wherever lorakit is started.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

PACKAGE_ROOT = Path(__file__).resolve().parent
ROOT_NAMES = ("modelsRoot", "checkpointsRoot", "lorasRoot")
WEIGHT_KINDS = ("repo_relative", "config_relative", "absolute", "external")
DATA_ROOT_PARTS = ("shared", "projects")


def find_checkout(package_root: Path = PACKAGE_ROOT) -> Path | None:
    """The lorakit checkout this package runs from (a source tree with its ``pyproject.toml``), else None.

    Only fallbacks use it (the checkout's config file and demo data, its ``tools/lora``): an installed wheel
    has no checkout, and works the same without one.
    """
    candidate = package_root.parent
    pyproject = candidate / "pyproject.toml"
    try:
        text = pyproject.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return candidate if 'name = "lorakit"' in text and (candidate / "lorakit" / "__init__.py").is_file() else None


CHECKOUT_ROOT = find_checkout()


@dataclass(frozen=True)
class Config:
    """Where lorakit finds records and weights on this machine."""

    data_root: Path
    roots: dict[str, Path] = field(default_factory=dict)
    # What ``repo_relative`` weights are relative to: the folder that holds the data root, as in the original
    # tool's ``<repo>/data`` layout.
    repo_root: Path | None = None
    source: Path | None = None  # the config file read, if any
    data_root_from: str = "the argument"  # which rule chose the data root, for error messages

    def __post_init__(self) -> None:
        if self.repo_root is None:
            object.__setattr__(self, "repo_root", self.data_root.parent)

    @property
    def repo_folder(self) -> Path:
        """``repo_root`` as ``__post_init__`` set it (the field is optional only as a constructor argument)."""
        return self.repo_root if self.repo_root is not None else self.data_root.parent

    @property
    def models_root(self) -> Path:
        return self.roots["modelsRoot"]

    @property
    def checkpoints_root(self) -> Path:
        return self.roots["checkpointsRoot"]

    @property
    def loras_root(self) -> Path:
        return self.roots["lorasRoot"]


def config_path() -> Path | None:
    """The config file lorakit reads: ``LORAKIT_CONFIG``, ``./config/local.json``, the checkout's; None if none."""
    env = os.environ.get("LORAKIT_CONFIG")
    if env:
        return Path(os.path.abspath(_root_path(env, "LORAKIT_CONFIG")))
    candidates = [Path.cwd() / "config" / "local.json"]
    if CHECKOUT_ROOT is not None:
        candidates.append(CHECKOUT_ROOT / "config" / "local.json")
    return next((p for p in candidates if p.is_file()), None)


def config_location(config: Config) -> str:
    """The config file ``config`` was read from, for messages that tell the user where to set something."""
    if config.source is not None:
        return str(config.source)
    return "config/local.json (none yet; or set LORAKIT_CONFIG)"


def config_base(path: Path) -> Path:
    """The folder relative paths in config file ``path`` are relative to.

    >>> config_base(Path("/studio/config/local.json")).as_posix(), config_base(Path("/etc/lk.json")).as_posix()
    ('/studio', '/etc')
    """
    return path.parent.parent if path.parent.name == "config" else path.parent


def _read_config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    if not path.exists():
        raise ConfigError(f"config file {path} (from LORAKIT_CONFIG) does not exist; create it or unset LORAKIT_CONFIG")
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; point LORAKIT_CONFIG at a JSON file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 JSON") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"{path}: not valid JSON{where}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    from .schemas import validation_errors

    problems = validation_errors("local-config", raw)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems))
    return raw


def _root_path(value: str | Path, where: str) -> Path:
    """``value`` as a path, ``~`` expanded. A name no file system can hold (a NUL byte, a lone surrogate that
    has no bytes) or a ``~user`` that names no user is refused here, naming where it was set, instead of
    failing later wherever the path is first used."""
    text = os.fspath(value)
    try:
        unusable = "\0" in text or not os.fsencode(text)
    except UnicodeEncodeError:
        unusable = True
    if unusable:
        raise ConfigError(f"{where} is {text!r}, which no folder can be named (a NUL byte or characters with no "
                          "file-name bytes): set it to the folder's path")
    expanded = os.path.expanduser(text)
    if expanded.startswith("~"):
        user = expanded.split("/", 1)[0]
        raise ConfigError(f"{where} starts with {user!r}, but this machine knows no such user's home folder; "
                          "write the folder's full path")
    return Path(expanded)


def _choose_data_root(data_root: str | Path | None, raw: dict, source: Path | None) -> tuple[Path, str]:
    """The data root and the rule that chose it (see the module docstring for the order)."""
    if data_root:
        return Path(os.path.abspath(_root_path(data_root, "--data-root"))), "the --data-root argument"
    env = os.environ.get("LORAKIT_DATA_ROOT")
    if env:
        return Path(os.path.abspath(_root_path(env, "LORAKIT_DATA_ROOT"))), "LORAKIT_DATA_ROOT"
    if raw.get("dataRoot") and source is not None:
        return config_base(source) / _root_path(raw["dataRoot"], f"dataRoot in {source}"), f"dataRoot in {source}"
    here = Path.cwd() / "data"
    if here.is_dir() or CHECKOUT_ROOT is None:
        return here, "the default ./data"
    return CHECKOUT_ROOT / "data", "the default (the demo data of the lorakit checkout)"


def load_config(data_root: str | Path | None = None) -> Config:
    """Read the local config and apply the overrides; see the module docstring for where lorakit looks."""
    path = config_path()
    raw = _read_config_file(path)
    base = config_base(path) if path is not None else None
    chosen, rule = _choose_data_root(data_root, raw, path)
    chosen = chosen.resolve()
    paths = raw.get("paths", {})

    def from_file(name: str, default: Path) -> Path:
        value = paths.get(name)
        return (base / _root_path(value, f"paths.{name} in {path}")) if value and base is not None else default

    models = from_file("modelsRoot", chosen.parent / "models")
    roots = {
        "modelsRoot": models,
        "checkpointsRoot": from_file("checkpointsRoot", models / "checkpoints"),
        "lorasRoot": from_file("lorasRoot", models / "loras"),
    }
    return Config(data_root=chosen, roots=roots, source=path, data_root_from=rule)


def data_root_problem(root: Path) -> str | None:
    """Why ``root`` is not a data root (missing, not a folder, neither ``shared/`` nor ``projects/``), else None."""
    if not root.exists():
        return "does not exist"
    if not root.is_dir():
        return "is not a folder"
    if not any((root / part).is_dir() for part in DATA_ROOT_PARTS):
        return "holds neither shared/ nor projects/"
    return None


def check_data_root(config: Config) -> None:
    """Refuse a data root that is not one, naming the rule that chose it and the fix."""
    problem = data_root_problem(config.data_root)
    if problem:
        raise ConfigError(
            f"data root {config.data_root} {problem} (from {config.data_root_from}); pass --data-root with the folder "
            "that holds shared/ and projects/ (or set LORAKIT_DATA_ROOT), or start a new one with "
            f"`lorakit init --data-root {config.data_root}`"
        )


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
        path = _inside(config.repo_folder, rel, what, "the folder that holds the data root")
        where = f"repo_relative to {config.repo_folder}"
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
            raise ConfigError(f"{what}: {base} is not set (paths.{base} in {config_location(config)})")
        if must_exist and not root.exists():
            raise ConfigError(
                f"{what}: {base} folder {root} does not exist (set paths.{base} in {config_location(config)} "
                "or create the folder)"
            )
        path = _inside(root, rel, what, base)
        where = f"under {base} = {root}"
    if must_exist and not path.exists():
        raise ConfigError(f"{what}: weights file not found: {path} ({where})")
    return path


def _inside(root: Path, rel: str, what: str, root_name: str, noun: str = "weights path",
            fix: str | None = None) -> Path:
    """``root / rel``, refused when ``rel`` is absolute or leads out of ``root`` (``..`` or a symlink): a
    relative path in a shared record must not point lorakit at any other file on the machine. ``fix`` is the
    advice the refusal ends with (by default, a weights reference's)."""
    if Path(rel).is_absolute() or re.match(r"^([/\\]|[A-Za-z]:)", rel):
        raise ConfigError(f"{what}: {noun} {rel!r} is absolute; a relative reference is relative to "
                          f"{root_name} ({root}); " + (fix or "use kind 'absolute' for a machine's own path"))
    path = root / rel
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise ConfigError(f"{what}: {noun} {rel!r} leads out of {root_name} ({root}) to {real}; " + (
            fix or f"keep weights under {root_name}, or register them with kind 'absolute'"))
    return path


def resolve_root_path(root_name: str, rel: str, config: Config, what: str, must_exist: bool = False) -> Path:
    """A file a record names relative to one of the model roots (``ROOT_NAMES``), e.g. a release's
    ``training.lossLog`` under ``lorasRoot``: refused when absolute or leading out of the root (``..`` or a
    symlink), as a weights reference is.

    >>> cfg = Config(data_root=Path("/d"), roots={"lorasRoot": Path("/m/loras")})
    >>> resolve_root_path("lorasRoot", "icons/r1/train_log.csv", cfg, "release r1").as_posix()
    '/m/loras/icons/r1/train_log.csv'
    """
    root = config.roots.get(root_name)
    if root is None:
        raise ConfigError(f"{what}: {root_name} is not set (paths.{root_name} in {config_location(config)})")
    path = _inside(root, rel, what, root_name, noun="path",
                   fix=f"records name files under {root_name} by a relative path; correct the record "
                       "(`lorakit validate` lists every such path)")
    if must_exist and not path.exists():
        raise ConfigError(f"{what}: file not found: {path} (under {root_name} = {root})")
    return path


def resolve_local_path(local_path: str, config: Config, what: str, must_exist: bool = True) -> Path:
    """The file of a release's deprecated ``localPath``: relative to the folder that holds the data root, and
    inside it."""
    path = _inside(config.repo_folder, local_path, what, "the folder that holds the data root")
    if must_exist and not path.exists():
        raise ConfigError(f"{what}: weights file not found: {path} (localPath)")
    return path


def release_weights_path(release: dict, config: Config, what: str, must_exist: bool = True) -> Path:
    """The local ``.safetensors`` file of a LoRA release: its ``weights`` reference (:func:`resolve_weights`),
    else its deprecated ``localPath`` (:func:`resolve_local_path`). The one answer the picker, the worker, the
    eval grid and the reports all use, so they never disagree about which file a release is."""
    if release.get("weights"):
        return resolve_weights(release["weights"], config, what=what, must_exist=must_exist)
    if release.get("localPath"):
        return resolve_local_path(release["localPath"], config, what, must_exist)
    raise ConfigError(f"{what} has no 'weights' reference (nor a localPath)")
