"""The kohya_ss adapter: train a release with kohya's sd-scripts, installed repo-locally, and record it.

Two parts, as in the original tool:

- :func:`setup_kohya` (``lorakit lora setup``) clones sd-scripts at a pinned ref into
  ``tools/lora/kohya_ss/`` (not in Git), gives it its own virtual environment and installs its requirements
  there, so its pinned torch/diffusers never meet lorakit's.
- :func:`train_kohya` (``lorakit lora train --adapter kohya_ss --run``) exports the dataset manifest into the
  folder layout kohya reads, writes kohya's dataset TOML and an arguments TOML, runs ``train_network.py`` (or
  ``sdxl_train_network.py``) from that environment, streams its output live into a log, and on success
  records a ``candidate`` release from the ``.safetensors`` it produced.

Install layout. A virtual environment cannot be moved after it is made (its scripts name their interpreter by
absolute path, and sd-scripts' ``-e .`` install names the clone's path), so an install cannot be built in a
temporary folder and renamed into place. Instead every install goes into a new *slot* folder at its final
path, and the marker ``install.json`` -- written last, atomically -- names the slot in use::

    tools/lora/kohya_ss/
      install.json                  {"repo", "ref", "commit", "python", "slot", ...}
      slot-<ulid>/sd-scripts/       the clone, checked out (detached) at the pinned commit
      slot-<ulid>/venv/             its virtual environment
      logs/setup-<time>.log

A failed or interrupted setup leaves at most a slot no marker names: it never looks installed, the previous
install (if any) keeps working, and the next setup deletes the leftover.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from filelock import FileLock

from ..config import CHECKOUT_ROOT, resolve_weights
from ..datasets import export_dataset
from ..errors import ConfigError, KohyaSetupError, TrainingError
from ..families import Family, Objective
from ..families import get as get_family
from ..ids import check_id, new_ulid
from ..loras import add_release
from ..roots import Root
from ..store import dump_json, now_iso
from ..workspace import Workspace, as_workspace
from .config import parse_config_json
from .inputs import RunInputs, is_manifest_path, resolve_run_inputs, run_root
from .manual import RecordedRun, inspect_weights, release_entry, training_block
from .settings import BY_NAME, NETWORK_TYPES, canonical_name

ADAPTER_KIND = "kohya_ss"
DEFAULT_REPO = "https://github.com/kohya-ss/sd-scripts.git"
# The sd-scripts release lorakit's kohya adapter was written against; torch is pinned to what its README asks.
DEFAULT_REF = "v0.8.4"
DEFAULT_TORCH_PACKAGES = ("torch==2.1.2", "torchvision==0.16.2")
TOOLS_ROOT_ENV = "LORAKIT_TOOLS_ROOT"
MARKER_NAME = "install.json"
MARKER_FORMAT = 1
SLOT_PREFIX = "slot-"
# The ``sdxl`` option, a user's override of the script the checkpoint's family names.
SCRIPTS = {False: "train_network.py", True: "sdxl_train_network.py"}

# Our exported captions are .txt files; kohya's default caption_extension is ".caption", with which it would
# find no caption at all and silently train on the folder's class tokens instead.
CAPTION_EXTENSION = ".txt"
DEFAULT_REPEATS = 10
# Keys of a kohya config that lorakit consumes itself rather than passing to the script (which rejects them).
LORAKIT_KEYS = ("sdxl", "num_repeats", "class_tokens", "caption_extension", "network_type")
KOHYA_MIXED_PRECISION = ("no", "fp16", "bf16")
# kohya options lorakit fills in when neither the config nor --adapter-args sets them.
NETWORK_MODULE = "networks.lora"
# The network types other than plain LoRA run through LyCORIS' sd-scripts module (lycoris-lora in the kohya
# environment), with its algo names; DoRA is its LoCon with weight decomposition on the output axis.
LYCORIS_NETWORK_MODULE = "lycoris.kohya"
LYCORIS_NETWORK_ARGS = {"dora": ("algo=locon", "dora_wd=True", "wd_on_output=True"), "locon": ("algo=locon",),
                        "loha": ("algo=loha",), "lokr": ("algo=lokr",)}


# ---- install location and marker --------------------------------------------------------------------------
def tools_root(explicit: str | Path | None = None) -> Path:
    """Where training tools are installed: ``explicit``, else ``LORAKIT_TOOLS_ROOT``, else ``tools/lora`` of the
    lorakit checkout, else (an installed lorakit) ``$XDG_DATA_HOME/lorakit/tools/lora`` (``~/.local/share/...``)."""
    chosen = explicit or os.environ.get(TOOLS_ROOT_ENV)
    if not chosen and CHECKOUT_ROOT is not None:
        chosen = CHECKOUT_ROOT / "tools" / "lora"
    if not chosen:
        data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
        chosen = Path(data_home) / "lorakit" / "tools" / "lora"
    return Path(chosen).expanduser().resolve()


def kohya_home(root: str | Path | None = None) -> Path:
    return tools_root(root) / "kohya_ss"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def venv_accelerate(venv: Path) -> Path:
    return venv / ("Scripts/accelerate.exe" if os.name == "nt" else "bin/accelerate")


@dataclass(frozen=True)
class KohyaInstall:
    """One complete install of sd-scripts, as its marker describes it."""

    home: Path
    slot: Path
    repo: str
    ref: str
    commit: str
    packages: tuple[str, ...] = ()
    base_python: str = ""
    python_version: str = ""
    installed_at: str = ""

    @property
    def repo_dir(self) -> Path:
        return self.slot / "sd-scripts"

    @property
    def venv(self) -> Path:
        return self.slot / "venv"

    @property
    def python(self) -> Path:
        return venv_python(self.venv)

    @property
    def accelerate(self) -> Path:
        return venv_accelerate(self.venv)

    def marker(self) -> dict:
        return {
            "format": MARKER_FORMAT, "repo": self.repo, "ref": self.ref, "commit": self.commit,
            "slot": self.slot.name, "python": str(self.python), "basePython": self.base_python,
            "pythonVersion": self.python_version, "packages": list(self.packages), "installedAt": self.installed_at,
        }


def read_install(root: str | Path | None = None) -> KohyaInstall | None:
    """The current install, or ``None`` when there is none (no marker, a broken marker, or its slot is gone)."""
    home = kohya_home(root)
    try:
        raw = json.loads((home / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("format") != MARKER_FORMAT:
        return None
    slot_name = raw.get("slot")
    if not isinstance(slot_name, str) or not slot_name.startswith(SLOT_PREFIX) or "/" in slot_name or "\\" in slot_name:
        return None
    try:
        install = KohyaInstall(
            home=home, slot=home / slot_name, repo=str(raw["repo"]), ref=str(raw["ref"]), commit=str(raw["commit"]),
            packages=tuple(str(p) for p in raw.get("packages", [])), base_python=str(raw.get("basePython", "")),
            python_version=str(raw.get("pythonVersion", "")), installed_at=str(raw.get("installedAt", "")),
        )
    except KeyError:
        return None
    if not (install.python.exists() and install.repo_dir.is_dir()):
        return None
    return install


def require_install(root: str | Path | None = None) -> KohyaInstall:
    install = read_install(root)
    if install is None:
        raise TrainingError(f"kohya sd-scripts is not installed under {kohya_home(root)}; run `lorakit lora setup` "
                            "(it needs network access to fetch sd-scripts and its requirements)")
    return install


def install_is_current(install: KohyaInstall | None, repo: str, ref: str, packages: Sequence[str],
                       python: str | None = None) -> bool:
    """Whether ``install`` is what a setup with these arguments would make (so setup has nothing to do).

    >>> inst = KohyaInstall(Path("/t"), Path("/t/slot-a"), "https://x/sd.git", "v1", "abc", ("torch",), "/usr/bin/python3")
    >>> install_is_current(inst, "https://x/sd.git", "v1", ["torch"]), install_is_current(inst, "https://x/sd.git", "v2", ["torch"])
    (True, False)
    """
    if install is None:
        return False
    same = install.repo == repo and install.ref == ref and list(install.packages) == list(packages)
    return same and (python is None or os.path.abspath(python) == os.path.abspath(install.base_python))


# ---- running commands -----------------------------------------------------------------------------------
def tool_env(venv: Path | None = None) -> dict[str, str]:
    """The environment for git, pip and kohya's scripts.

    The kohya venv must not see lorakit's own environment: ``PYTHONPATH``/``PYTHONHOME`` would put lorakit's
    packages (other torch, diffusers) in front of sd-scripts' pinned ones. Git never prompts for credentials
    (a wrong URL fails instead of hanging), and Python output is unbuffered so the log is live.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = str(venv_python(venv).parent) + os.pathsep + env.get("PATH", "")
    return env


def stream_command(cmd: Sequence[str], *, cwd: Path | None, env: dict[str, str], log: IO[bytes],
                   echo: IO[str] | None) -> int:
    """Run ``cmd`` (a list, never through a shell), copying its output live to ``echo`` and ``log``.

    Output is passed on as it arrives, not per line, so progress bars that redraw with ``\\r`` stay live.
    Ctrl-C stops the child too (it gets the signal from the terminal; we wait for it, then kill if needed).
    """
    log.write(f"$ {shlex.join(cmd)}\n".encode())
    log.flush()
    try:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
    except OSError as exc:
        message = f"cannot run {cmd[0]}: {exc.strerror or exc}\n"
        log.write(message.encode())
        if echo is not None:
            echo.write(message)
        return 127
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    assert proc.stdout is not None
    try:
        fd = proc.stdout.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            if echo is not None:
                echo.write(decoder.decode(chunk))
                echo.flush()
        return proc.wait()
    except BaseException:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        proc.stdout.close()


def _capture(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    return proc.returncode, (proc.stdout or "").strip()


# ---- setup ----------------------------------------------------------------------------------------------
@dataclass
class SetupResult:
    """What :func:`setup_kohya` did: ``changed`` is False when the install was already what was asked for."""

    install: KohyaInstall
    changed: bool
    log: Path | None = None
    replaced: KohyaInstall | None = None


def setup_kohya(
    repo: str = DEFAULT_REPO,
    ref: str = DEFAULT_REF,
    *,
    root: str | Path | None = None,
    python: str | None = None,
    torch_packages: Sequence[str] = DEFAULT_TORCH_PACKAGES,
    force: bool = False,
    echo: IO[str] | None = None,
) -> SetupResult:
    """Install kohya's sd-scripts at ``ref`` with its own virtual environment (``lorakit lora setup``).

    Steps: clone ``repo``, check out ``ref`` (tag, branch or commit; detached), create a venv with ``python``
    (default: the one running lorakit), ``pip install`` ``torch_packages`` (sd-scripts' requirements leave
    torch out; pip options such as ``--index-url URL`` may be included), then ``pip install -r
    requirements.txt`` from the clone (which installs sd-scripts itself with ``-e .``).

    Idempotent: when the current install has the same repo, ref and packages nothing is touched (``force``
    reinstalls). Another ref installs next to the current one and replaces it only when complete. A failure
    raises :class:`KohyaSetupError` naming the step and the log, and leaves the previous install as it was.
    Output goes to ``echo`` (default: stdout) and to ``logs/setup-<time>.log``.

    >>> setup_kohya(ref="v0.8.4").install.commit      # doctest: +SKIP
    """
    echo = sys.stdout if echo is None else echo
    packages = [p for p in torch_packages if p]
    if python is not None:
        python = shutil.which(python) or python  # "python3.10" means the one on PATH
    home = kohya_home(root)
    home.mkdir(parents=True, exist_ok=True)
    # Two setups at once would both clone and install; the second waits, then finds the install current.
    with FileLock(str(home / ".setup.lock")):
        current = read_install(root)
        if not force and install_is_current(current, repo, ref, packages, python):
            assert current is not None
            _remove_stale_slots(home, keep=current.slot)
            echo.write(f"kohya sd-scripts {current.ref} ({current.commit[:12]}) is already installed in {current.slot}\n")
            return SetupResult(current, changed=False)
        _remove_stale_slots(home, keep=current.slot if current else None)
        slot = home / f"{SLOT_PREFIX}{new_ulid().lower()}"
        logs = home / "logs"
        logs.mkdir(exist_ok=True)
        log_path = logs / f"setup-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{slot.name[-6:]}.log"
        try:
            with open(log_path, "wb") as log:
                install = _install_into(slot, repo, ref, packages, python or sys.executable, log, echo, home,
                                        current, log_path)
            _write_marker(home, install)
        except BaseException:
            shutil.rmtree(slot, ignore_errors=True)
            raise
        if current is not None and current.slot != install.slot:
            shutil.rmtree(current.slot, ignore_errors=True)
        echo.write(f"installed kohya sd-scripts {ref} ({install.commit[:12]}) in {install.slot}\n")
        return SetupResult(install, changed=True, log=log_path, replaced=current)


def _install_into(slot: Path, repo: str, ref: str, packages: list[str], python: str, log: IO[bytes],
                  echo: IO[str], home: Path, current: KohyaInstall | None, log_path: Path) -> KohyaInstall:
    clone = slot / "sd-scripts"
    venv = slot / "venv"
    steps = ["clone", "check out", "create venv", "install torch", "install requirements"]
    if not packages:
        steps.remove("install torch")

    def fail(step: str, detail: str) -> KohyaSetupError:
        kept = (f"; the previous install ({current.ref}, {current.commit[:12]}) is still in place" if current
                else "; nothing was installed")
        number = steps.index(step) + 1
        log.write(f"\nFAILED at step {number}/{len(steps)} ({step}): {detail}\n".encode())
        return KohyaSetupError(f"kohya setup failed at step {number}/{len(steps)} ({step}): {detail}{kept}; "
                               f"log: {log_path}")

    def run(step: str, cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        echo.write(f"==> {step}: {shlex.join(cmd)}\n")
        code = stream_command(cmd, cwd=cwd, env=env or tool_env(), log=log, echo=echo)
        if code != 0:
            raise fail(step, f"`{shlex.join(cmd)}` exited with status {code}")

    slot.mkdir(parents=True)
    run("clone", ["git", "clone", "--no-checkout", repo, str(clone)])
    commit = None
    for candidate in (ref, f"origin/{ref}"):
        code, out = _capture(["git", "rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"], cwd=clone,
                             env=tool_env())
        if code == 0 and out:
            commit = out
            break
    if commit is None:
        raise fail("check out", f"ref {ref!r} is not a tag, branch or commit of {repo}")
    run("check out", ["git", "-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit], cwd=clone)
    if not (clone / "train_network.py").is_file():
        raise fail("check out", f"{repo} at {ref} has no train_network.py: is it kohya's sd-scripts?")
    if not (clone / "requirements.txt").is_file():
        raise fail("check out", f"{repo} at {ref} has no requirements.txt")
    run("create venv", [python, "-m", "venv", str(venv)])
    env = tool_env(venv)
    if packages:
        run("install torch", [str(venv_python(venv)), "-m", "pip", "install", *packages], env=env)
    # sd-scripts' requirements end with "-e .", which pip resolves against the working directory: the clone.
    run("install requirements", [str(venv_python(venv)), "-m", "pip", "install", "-r", "requirements.txt"],
        cwd=clone, env=env)
    code, version = _capture([str(venv_python(venv)), "-c", "import platform; print(platform.python_version())"],
                             env=env)
    return KohyaInstall(home=home, slot=slot, repo=repo, ref=ref, commit=commit, packages=tuple(packages),
                        base_python=os.path.abspath(python), python_version=version if code == 0 else "",
                        installed_at=now_iso())


def _write_marker(home: Path, install: KohyaInstall) -> None:
    Root(home, "the kohya tools folder").write_atomic(home / MARKER_NAME, dump_json(install.marker()).encode("utf-8"))


def _remove_stale_slots(home: Path, keep: Path | None) -> None:
    """Delete slots no marker names: what a failed or killed setup left behind."""
    for child in home.iterdir():
        if child.is_dir() and child.name.startswith(SLOT_PREFIX) and child != keep:
            shutil.rmtree(child, ignore_errors=True)


# ---- TOML ---------------------------------------------------------------------------------------------------
def toml_value(value: Any, where: str) -> str:
    """One TOML value (string, integer, float, boolean, or an array of those)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} cannot be written to a kohya config")
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes; DEL is the one control TOML also forbids raw.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v, where) for v in value) + "]"
    raise ConfigError(f"{where}: a {type(value).__name__} cannot be written to a kohya config")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def dump_toml(data: dict, header: str = "") -> str:
    """A TOML document for ``data``: top-level keys, ``[tables]`` and ``[[arrays of tables]]`` (nested too).

    >>> print(dump_toml({"general": {"shuffle_caption": False}, "datasets": [{"subsets": [{"num_repeats": 2}]}]}), end="")
    [general]
    shuffle_caption = false
    <BLANKLINE>
    [[datasets]]
    <BLANKLINE>
    [[datasets.subsets]]
    num_repeats = 2
    """
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def table(prefix: str, body: dict) -> None:
        for key, value in body.items():
            if value is None or isinstance(value, dict) or _is_table_array(value):
                continue
            lines.append(f"{_toml_key(key)} = {toml_value(value, prefix + key)}")
        for key, value in body.items():
            name = f"{prefix}{_toml_key(key)}"
            if isinstance(value, dict):
                lines.extend(["", f"[{name}]"])
                table(name + ".", value)
            elif _is_table_array(value):
                for item in value:
                    lines.extend(["", f"[[{name}]]"])
                    table(name + ".", item)

    table("", data)
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines) + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def read_kohya_config(path: str | Path) -> dict:
    """A kohya arguments file, flattened the way sd-scripts reads ``--config_file``: TOML (or JSON) whose
    top-level tables are merged into one set of options."""
    p = Path(path)
    try:
        raw_bytes = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"kohya config file {p} does not exist") from None
    try:
        raw = json.loads(raw_bytes) if p.suffix.lower() == ".json" else tomllib.loads(raw_bytes.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"kohya config file {p}: not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'} ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"kohya config file {p}: expected a table of options")
    return flatten_sections(raw)


def flatten_sections(config: dict) -> dict:
    """sd-scripts' rule: the keys of every top-level table join the top-level keys (later ones win).

    >>> flatten_sections({"model": {"network_dim": 8}, "seed": 1})
    {'network_dim': 8, 'seed': 1}
    """
    flat: dict = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


# ---- the plan (pure) ----------------------------------------------------------------------------------------
def parse_adapter_args(value: str | Sequence[str] | None) -> list[str]:
    """``--adapter-args``: a JSON array of strings, passed to the kohya script after everything else.

    >>> parse_adapter_args('["--output_name", "my_lora"]')
    ['--output_name', 'my_lora']
    """
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--adapter-args must be a JSON array of strings, e.g. '[\"--output_name\", \"my_lora\"]' "
                              f"(not valid JSON: {exc.msg} at column {exc.colno})") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"--adapter-args must be a JSON array of strings, e.g. '[\"--output_name\", \"my_lora\"]', "
                          f"got {json.dumps(value)}")
    return list(value)


def adapter_arg_value(args: Sequence[str], name: str) -> str | None:
    """The value ``--name`` gets in ``args`` (``--name v`` or ``--name=v``; the last one wins, as in argparse).

    >>> adapter_arg_value(["--output_name", "a", "--seed=3", "--output_name=b"], "output_name")
    'b'
    """
    found = None
    flag = f"--{name}"
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg[len(flag) + 1:]
    return found


def kohya_flag_values(overrides: dict | None) -> dict:
    """Settings given as flags (by setting name or alias) as kohya options, under the names sd-scripts uses.

    >>> kohya_flag_values({"resolution": 512, "rank": 8, "lr": None})
    {'resolution': '512,512', 'network_dim': 8}
    """
    out = {}
    for flag, value in (overrides or {}).items():
        if value is None:
            continue
        setting = BY_NAME.get(canonical_name(flag))
        if setting is not None and setting.name in LORAKIT_KEYS:
            out[setting.name] = value  # lorakit's own key: plan_kohya_run turns it into kohya options
            continue
        if setting is None or setting.kohya is None:
            known = ", ".join(s.name for s in BY_NAME.values() if s.kohya)
            raise ConfigError(f"unknown training flag {flag!r} for kohya_ss (known: {known})")
        if setting.name == "mixed_precision" and value not in KOHYA_MIXED_PRECISION:
            raise ConfigError(f"kohya's mixed_precision is one of {', '.join(KOHYA_MIXED_PRECISION)}, got {value!r}")
        if setting.name == "resolution" and isinstance(value, int):
            value = f"{value},{value}"  # kohya reads "W,H" (or a single side) from a string
        out[setting.kohya] = value
    return out


def kohya_options(config_file: str | Path | None, config: dict | str | None, overrides: dict | None) -> dict:
    """The kohya options of a run: the kohya config file < ``config`` (a dict or JSON text) < the flags."""
    options = read_kohya_config(config_file) if config_file else {}
    if config is not None:
        layer = parse_config_json(config) if isinstance(config, str) else config
        if not isinstance(layer, dict):
            raise ConfigError("--config must be a JSON object of kohya options")
        options.update(flatten_sections(layer))
    options.update(kohya_flag_values(overrides))
    return options


@dataclass(frozen=True)
class KohyaPlan:
    """Everything a kohya run needs, decided before anything is written."""

    script: str
    args: dict              # the options written to the --config_file TOML
    adapter_args: tuple[str, ...]
    dataset_toml: dict
    run_dir: Path
    dataset_dir: Path       # what the export writes: <run_dir>/dataset/<repeats>_<name>/
    image_dir: Path
    output_dir: Path
    output_name: str

    @property
    def args_toml_path(self) -> Path:
        return self.run_dir / "kohya-args.toml"

    @property
    def dataset_toml_path(self) -> Path:
        return self.run_dir / "kohya-dataset.toml"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.log"

    @property
    def weights_path(self) -> Path:
        return self.output_dir / f"{self.output_name}.safetensors"


def plan_kohya_run(
    options: dict,
    adapter_args: Sequence[str],
    *,
    family: str | Family,
    objective: Objective | None = None,
    model_path: Path | None,
    run_dir: Path,
    lora_id: str,
    dataset_name: str,
) -> KohyaPlan:
    """Decide the script, the kohya options and the dataset TOML of one run (pure).

    ``options`` are the user's kohya options (config file < ``--config`` < flags). lorakit fills
    ``pretrained_model_name_or_path`` (the LoRA's checkpoint), ``output_dir`` (``run_dir``, under lorasRoot),
    ``output_name`` (the LoRA id), ``network_module``, ``save_model_as`` and the options that train the
    checkpoint's ``objective`` (``v_parameterization``, ``zero_terminal_snr``) only where neither ``options``
    nor ``adapter_args`` set them, and the script from the checkpoint family unless ``options`` has ``sdxl``.
    ``dataset_config`` is always lorakit's: the release records the dataset it trained on. No ``objective`` is
    an epsilon checkpoint's.
    """
    family, objective = get_family(family), objective or Objective()
    opts = dict(options)
    own = {key: opts.pop(key) for key in LORAKIT_KEYS if key in opts}
    for key in ("dataset_config",):
        if key in opts or adapter_arg_value(adapter_args, key) is not None:
            raise ConfigError(f"{key} is set by lorakit from --dataset (the release records that dataset); "
                              "remove it from the kohya config / --adapter-args")
    if adapter_arg_value(adapter_args, "config_file") is not None:
        raise ConfigError("config_file in --adapter-args: give the kohya config with --config-file instead")
    sdxl = own.get("sdxl")
    if sdxl is not None and not isinstance(sdxl, bool):
        raise ConfigError(f"sdxl must be true or false, got {sdxl!r}")
    script = family.kohya_script if sdxl is None else SCRIPTS[sdxl]
    repeats = own.get("num_repeats", DEFAULT_REPEATS)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ConfigError(f"num_repeats must be a positive integer, got {repeats!r}")
    extension = own.get("caption_extension", CAPTION_EXTENSION)
    if extension != CAPTION_EXTENSION or adapter_arg_value(adapter_args, "caption_extension") not in (None, CAPTION_EXTENSION):
        raise ConfigError(f"caption_extension must be {CAPTION_EXTENSION!r}: lorakit exports captions as .txt files")
    class_tokens = own.get("class_tokens", dataset_name)
    if not isinstance(class_tokens, str) or not class_tokens.strip():
        raise ConfigError(f"class_tokens must be a non-empty string, got {class_tokens!r}")

    def effective(key: str, fill: Any) -> Any:
        from_args = adapter_arg_value(adapter_args, key)
        if from_args is not None:
            return from_args
        if key not in opts:
            opts[key] = fill
        return opts[key]

    if model_path is None and "pretrained_model_name_or_path" not in opts and \
            adapter_arg_value(adapter_args, "pretrained_model_name_or_path") is None:
        raise ConfigError("no base model: the checkpoint has no local weights and the config sets no "
                          "pretrained_model_name_or_path")
    effective("pretrained_model_name_or_path", str(model_path))
    output_dir = Path(effective("output_dir", str(run_dir))).expanduser()
    if not output_dir.is_absolute():
        # kohya would resolve it against its own folder (the script's working directory): say so instead.
        raise ConfigError(f"output_dir must be an absolute path, got {str(output_dir)!r} (leave it out to write "
                          f"into the run folder {run_dir})")
    output_name = str(effective("output_name", lora_id))
    _fill_network(own.get("network_type", "lora"), opts, adapter_args, effective)
    save_as = effective("save_model_as", "safetensors")
    if save_as != "safetensors":
        raise ConfigError(f"save_model_as must be safetensors (lorakit records .safetensors releases), got {save_as!r}")
    if not output_name or "/" in output_name or "\\" in output_name:
        raise ConfigError(f"output_name must be a file name without folders, got {output_name!r}")
    for key, value in objective.kohya_options().items():
        # store_true flags: a given flag (with or without a value) is the user's choice.
        if key not in opts and not any(a == f"--{key}" or a.startswith(f"--{key}=") for a in adapter_args):
            opts[key] = value

    dataset_dir = run_dir / "dataset"
    image_dir = dataset_dir / f"{repeats}_{dataset_name}"
    opts["dataset_config"] = str(run_dir / "kohya-dataset.toml")
    dataset_toml = {"datasets": [{"subsets": [{
        "image_dir": str(image_dir), "num_repeats": repeats, "class_tokens": class_tokens,
        "caption_extension": CAPTION_EXTENSION,
    }]}]}
    return KohyaPlan(script=script, args=opts, adapter_args=tuple(adapter_args), dataset_toml=dataset_toml,
                     run_dir=run_dir, dataset_dir=dataset_dir, image_dir=image_dir, output_dir=output_dir,
                     output_name=output_name)


def network_options(network_type: str) -> tuple[str, list[str]]:
    """``(network_module, network_args)`` that make sd-scripts train ``network_type`` (pure).

    >>> network_options("dora")
    ('lycoris.kohya', ['algo=locon', 'dora_wd=True', 'wd_on_output=True'])
    """
    if network_type not in NETWORK_TYPES:
        raise ConfigError(f"network_type must be one of {', '.join(NETWORK_TYPES)}, got {network_type!r}")
    if network_type == "lora":
        return NETWORK_MODULE, []
    return LYCORIS_NETWORK_MODULE, list(LYCORIS_NETWORK_ARGS[network_type])


# lorakit's network settings that kohya's networks.lora and LyCORIS read from network_args, under these names. As
# top-level options sd-scripts' config reader would drop them without a word and train something else.
NETWORK_ARG_SETTINGS = {"conv_rank": "conv_dim", "conv_alpha": "conv_alpha", "lokr_factor": "factor"}
# Network settings of the native trainer that sd-scripts has no option for: refused rather than ignored.
NATIVE_ONLY_NETWORK_SETTINGS = ("unet_target_modules", "conv_target_modules", "text_encoder_target_modules",
                                "lora_dropout")


def _network_settings(network_type: str, opts: dict) -> list[str]:
    """Take lorakit's network settings out of ``opts`` (by name or alias) and return them as the ``network_args``
    kohya/LyCORIS read; ``rank``/``alpha`` and ``train_text_encoder`` become the sd-scripts options they are."""
    given: dict[str, Any] = {}
    for key in list(opts):
        name = canonical_name(key)
        if name not in NETWORK_ARG_SETTINGS and name not in NATIVE_ONLY_NETWORK_SETTINGS and \
                name not in ("train_conv", "train_text_encoder", "rank", "alpha"):
            continue
        if name in ("rank", "alpha") and key == BY_NAME[name].kohya:
            continue  # already sd-scripts' own option
        value = opts.pop(key)
        if name in given and given[name] != value:
            raise ConfigError(f"the kohya options set {name} twice with different values ({given[name]!r} and "
                              f"{value!r}, one under another name); keep one")
        problem = BY_NAME[name].problem(value)
        if problem:
            raise ConfigError(problem)
        given[name] = value
    for name in NATIVE_ONLY_NETWORK_SETTINGS:
        if name in given:
            raise ConfigError(f"{name} is a setting of lorakit's native trainer; kohya sd-scripts has no such option "
                              "and would ignore it: drop it, or train with --adapter native")
    for name in ("rank", "alpha"):
        if name in given:
            kohya_name = BY_NAME[name].kohya
            if kohya_name in opts and opts[kohya_name] != given[name]:
                raise ConfigError(f"the kohya options set {name} {given[name]!r} and {kohya_name} {opts[kohya_name]!r}; "
                                  "keep one")
            opts[kohya_name] = given[name]
    if given.get("train_text_encoder") is not None:
        opts["network_train_unet_only"] = not given["train_text_encoder"]
    if given.get("lokr_factor") is not None and network_type != "lokr":
        raise ConfigError(f"lokr_factor is for network_type lokr, but this run trains {network_type}; drop it")
    args = [f"{NETWORK_ARG_SETTINGS[name]}={given[name]}" for name in NETWORK_ARG_SETTINGS if given.get(name) is not None]
    train_conv = given.get("train_conv")
    if train_conv is False:
        if any(given.get(name) is not None for name in ("conv_rank", "conv_alpha")):
            raise ConfigError("train_conv is false but the kohya options set conv_dim/conv_alpha; drop one of them")
        if network_type == "locon":
            raise ConfigError("train_conv must be true for network_type locon (LoRA on the convolutions too); drop "
                              "train_conv, or use network_type lora")
        if network_type != "lora":
            args.append("preset=attn-mlp")  # LyCORIS' default preset ("full") adapts the convolutions too
    elif train_conv and given.get("conv_rank") is None and network_type == "lora":
        # kohya's LoRA adapts convolutions only with a conv_dim; lorakit's conv rank defaults to the rank.
        if opts.get("network_dim") is None:
            raise ConfigError("train_conv with network_type lora needs a rank for the convolutions: set conv_dim "
                              "(or network_dim / --rank)")
        args.append(f"conv_dim={opts['network_dim']}")
    if network_type == "lora" and train_conv and given.get("conv_alpha") is None and opts.get("network_alpha") is not None:
        args.append(f"conv_alpha={opts['network_alpha']}")  # kohya's own default is 1, lorakit's the alpha
    return args


def _fill_network(network_type: str, opts: dict, adapter_args: Sequence[str], effective: Any) -> None:
    """``network_module`` and ``network_args`` for ``network_type`` and lorakit's network settings; a module or
    argument the user set that says otherwise is refused rather than silently training another network."""
    module, args = network_options(network_type)
    args = args + _network_settings(network_type, opts)
    chosen = effective("network_module", module)
    if network_type != "lora" and chosen != module:
        raise ConfigError(f"network_type {network_type} trains through network_module {module}, but the kohya "
                          f"options set network_module {chosen!r}; drop one of them")
    if not args:
        return
    if adapter_arg_value(adapter_args, "network_args") is not None:
        raise ConfigError(f"network_type {network_type} and the network settings set network_args ({' '.join(args)}); "
                          "give further arguments as a network_args list in the kohya config instead of --adapter-args")
    given = opts.get("network_args", [])
    if isinstance(given, str):
        given = [given]
    if not isinstance(given, list) or not all(isinstance(a, str) for a in given):
        raise ConfigError(f"network_args must be a list of key=value strings, got {given!r}")
    mine = {a.split("=", 1)[0] for a in args}
    clash = [a for a in given if a.split("=", 1)[0] in mine and a not in args]
    if clash:
        raise ConfigError(f"network_args {', '.join(clash)} contradict network_type {network_type} and the network "
                          f"settings ({' '.join(args)}); drop one of them")
    opts["network_args"] = args + [a for a in given if a not in args]


def kohya_command(plan: KohyaPlan, install: KohyaInstall, accelerate_config: Path | None = None) -> list[str]:
    """The command line of a run: the script from the kohya venv, via ``accelerate launch`` with a config.

    Options travel in the ``--config_file`` TOML; ``--adapter-args`` come last, so they win (kohya lets the
    command line override its config file).
    """
    script = [str(install.repo_dir / plan.script), "--config_file", str(plan.args_toml_path), *plan.adapter_args]
    if accelerate_config is not None:
        return [str(install.accelerate), "launch", "--config_file", str(accelerate_config), *script]
    return [str(install.python), *script]


def weights_reference_for(path: Path, loras_root: Path) -> dict:
    """``config_relative`` to lorasRoot when the file is under it (portable), else ``absolute``."""
    resolved = path.resolve()
    with contextlib.suppress(ValueError):
        rel = resolved.relative_to(loras_root.resolve())
        return {"kind": "config_relative", "base": "lorasRoot", "path": rel.as_posix()}
    return {"kind": "absolute", "path": str(resolved)}


def describe_plan(plan: KohyaPlan, command: Sequence[str], *, installed: bool = True) -> str:
    """What ``--dry-run`` prints: the command, both TOML files and the dataset folder."""
    parts = []
    if not installed:
        parts.append("note: kohya sd-scripts is not installed yet (run `lorakit lora setup`); paths below are placeholders")
    parts += [
        "command:", "  " + shlex.join(command), "",
        f"dataset folder: {plan.image_dir} (images with .txt captions)", "",
        f"{plan.dataset_toml_path}:", dump_toml(plan.dataset_toml).rstrip(), "",
        f"{plan.args_toml_path}:", dump_toml(plan.args).rstrip(), "",
        f"log: {plan.log_path}", f"weights: {plan.weights_path}",
    ]
    return "\n".join(parts) + "\n"


# ---- a run --------------------------------------------------------------------------------------------------
@dataclass
class KohyaRunResult:
    plan: KohyaPlan
    command: list[str]
    recorded: RecordedRun | None = None
    dry_run: bool = False
    description: str = ""


def train_kohya(
    ws: Workspace | str | Path | None,
    lora_id: str,
    dataset: str,
    *,
    project: str | None = None,
    scope: str | None = None,
    release_id: str | None = None,
    set_active: bool = False,
    notes: str | None = None,
    config_file: str | Path | None = None,
    config: dict | str | None = None,
    overrides: dict | None = None,
    adapter_args: str | Sequence[str] | None = None,
    accelerate_config: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    root: str | Path | None = None,
    echo: IO[str] | None = None,
) -> KohyaRunResult:
    """Train a release with kohya sd-scripts and record it (``lorakit lora train --adapter kohya_ss --run``).

    ``config_file`` is a kohya options file (TOML like sd-scripts' ``--config_file``, or JSON); ``config`` (a
    dict or JSON text) and ``overrides`` (settings given as flags, by setting name) override it, and
    ``adapter_args`` (a JSON array of strings, or a list) are passed last on the command line. lorakit-only
    keys in the config: ``sdxl`` (script choice), ``num_repeats`` (default 10), ``class_tokens``.

    The run folder is ``<lorasRoot>/<lora>/<release>/``: the exported dataset, both TOML files, ``train.log``
    and (unless the config says otherwise) the weights. A failed run records nothing and names the log.
    A dataset built for another checkpoint is refused unless ``force`` (as the native trainer does).
    ``dry_run`` decides everything, writes nothing and returns the description of the run.

    >>> result = train_kohya(ws, "hero", "hero_v1", project="demo", config_file="kohya.toml",
    ...                      adapter_args='["--output_name", "hero_kohya"]')         # doctest: +SKIP
    >>> result.recorded.release["training"]["adapter"]["commit"]                    # doctest: +SKIP
    """
    ws = as_workspace(ws)
    extra_args = parse_adapter_args(adapter_args)
    if is_manifest_path(dataset):
        raise ConfigError("--adapter kohya_ss needs a dataset id (it exports the dataset with `lorakit dataset "
                          f"export`), not a manifest file: {dataset}")
    inputs = resolve_run_inputs(ws, lora_id, dataset, adapter=ADAPTER_KIND, project=project, scope=scope,
                                release_id=release_id, config=config, config_file=config_file, overrides=overrides,
                                force=force)
    accel = Path(accelerate_config).expanduser().resolve() if accelerate_config else None
    if accel is not None and not accel.is_file():
        raise ConfigError(f"accelerate config {accel} does not exist")
    plan = _plan(ws, inputs, extra_args)
    install = read_install(root)
    if dry_run:
        shown = install or _placeholder_install(root)
        command = kohya_command(plan, shown, accel)
        return KohyaRunResult(plan, command, dry_run=True,
                              description=describe_plan(plan, command, installed=install is not None))
    install = install or require_install(root)
    _check_network_module(plan, install)
    command = kohya_command(plan, install, accel)
    _write_run_folder(ws, inputs, plan)
    started = time.time()
    _run_script(plan, install, command, started, what=f"{inputs.lora_id}/{inputs.release_id}",
                echo=sys.stdout if echo is None else echo)
    recorded = _record_run(ws, inputs, plan, install, accel, started, set_active=set_active, notes=notes)
    return KohyaRunResult(plan, command, recorded=recorded)


def _plan(ws: Workspace, inputs: RunInputs, extra_args: list[str]) -> KohyaPlan:
    """The run's plan: the base model is the checkpoint's weights unless the options name another (a file or a
    Hub id)."""
    checkpoint = inputs.checkpoint
    model_path = None
    if "pretrained_model_name_or_path" not in inputs.settings and \
            adapter_arg_value(extra_args, "pretrained_model_name_or_path") is None:
        if "weights" not in checkpoint:
            raise ConfigError(f"checkpoint {checkpoint['id']!r} has no weights reference to train on")
        model_path = resolve_weights(checkpoint["weights"], ws.config, what=f"checkpoint {checkpoint['id']}")
    run_dir = ws.config.loras_root / inputs.lora_id / inputs.release_id
    return plan_kohya_run(inputs.settings, extra_args, family=inputs.family, objective=inputs.objective,
                          model_path=model_path, run_dir=run_dir,
                          lora_id=inputs.lora_id, dataset_name=check_id(inputs.manifest["id"], "dataset id"))


def _check_network_module(plan: KohyaPlan, install: KohyaInstall) -> None:
    """LyCORIS' module is not one of sd-scripts' requirements: say how to add it before anything is written."""
    if plan.args.get("network_module") != LYCORIS_NETWORK_MODULE:
        return
    code, _ = _capture([str(install.python), "-c", f"import {LYCORIS_NETWORK_MODULE}"], env=tool_env(install.venv))
    if code != 0:
        raise KohyaSetupError(
            f"network module {LYCORIS_NETWORK_MODULE} (for the LyCORIS network types) is not installed in kohya's "
            f"environment {install.venv}; install it with `{install.python} -m pip install lycoris-lora==4.1.3`, "
            "or train network_type lora")


def _write_run_folder(ws: Workspace, inputs: RunInputs, plan: KohyaPlan) -> None:
    """The exported dataset and both TOML files, in a run folder that must not hold an earlier run."""
    run_dir, rid, manifest = plan.run_dir, inputs.release_id, inputs.manifest
    if run_dir.exists() and any(run_dir.iterdir()):
        raise TrainingError(f"run folder {run_dir} already exists (an earlier run of release {rid}?); "
                            "remove it or pick another --release")
    root = run_root(run_dir)
    root.make_folder(run_dir)
    export_dataset(ws, manifest["id"], manifest.get("projectId") if manifest.get("scope") == "project" else None,
                   out_dir=plan.dataset_dir, fmt="kohya", repeats=plan.dataset_toml["datasets"][0]["subsets"][0]["num_repeats"],
                   name=manifest["id"])
    header = (f"kohya dataset config written by lorakit for dataset {manifest['id']} "
              f"(manifest {manifest.get('manifestHash', '')[:12]}), release {rid}")
    root.write_atomic(plan.dataset_toml_path, dump_toml(plan.dataset_toml, header).encode("utf-8"))
    root.write_atomic(plan.args_toml_path,
                      dump_toml(plan.args, f"kohya options written by lorakit for {inputs.lora_id}/{rid}").encode("utf-8"))


def _run_script(plan: KohyaPlan, install: KohyaInstall, command: list[str], started: float, *, what: str,
                echo: IO[str]) -> None:
    """Run kohya's script with its output in the log (and on ``echo``); a failure or a missing file records nothing."""
    echo.write(f"training {what} with kohya sd-scripts {install.ref} ({install.commit[:12]}); "
               f"log: {plan.log_path}\n$ {shlex.join(command)}\n")
    echo.flush()
    with run_root(plan.run_dir).open_log(plan.log_path) as log:
        code = stream_command(command, cwd=install.repo_dir, env=tool_env(install.venv), log=log, echo=echo)
    if code != 0:
        raise TrainingError(f"kohya {plan.script} exited with status {code}; nothing was recorded; log: {plan.log_path}")
    weights = plan.weights_path
    if not weights.is_file() or weights.stat().st_mtime < started - 1:
        raise TrainingError(f"kohya {plan.script} finished but did not write {weights}; nothing was recorded; "
                            f"log: {plan.log_path}")


def _record_run(ws: Workspace, inputs: RunInputs, plan: KohyaPlan, install: KohyaInstall, accel: Path | None,
                started: float, *, set_active: bool, notes: str | None) -> RecordedRun:
    """The candidate release of a finished kohya run."""
    weights = plan.weights_path
    digest, summary = inspect_weights(weights, None)
    adapter = {"kind": ADAPTER_KIND, "repo": install.repo, "ref": install.ref, "commit": install.commit,
               "script": plan.script, "adapterArgs": list(plan.adapter_args)}
    if accel is not None:
        adapter["accelerateConfig"] = str(accel)
    training = training_block(adapter, inputs, plan.args, weights_metadata=summary)
    training["checkpointFamily"] = inputs.family.name
    training["objective"] = inputs.objective.record()
    training["durationS"] = round(time.time() - started, 3)
    training["log"] = f"{inputs.lora_id}/{inputs.release_id}/{plan.log_path.name}"
    release = release_entry(inputs.release_id, weights=weights_reference_for(weights, ws.config.loras_root),
                            sha256=digest, training=training, notes=notes)
    updated = add_release(ws, inputs.lora_id, release, project=inputs.lora_project, set_active=set_active)
    return RecordedRun(lora=updated, release=release, lora_project=inputs.lora_project, weights_path=weights)


def _placeholder_install(root: str | Path | None) -> KohyaInstall:
    home = kohya_home(root)
    return KohyaInstall(home=home, slot=home / f"{SLOT_PREFIX}<not installed>", repo=DEFAULT_REPO, ref=DEFAULT_REF,
                        commit="")
