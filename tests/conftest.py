"""Fixtures shared by every test file: an isolated data root and config, offline model hubs."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def tmp_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data root (an empty ``shared/``) under ``tmp_path``, made the default for library calls and subprocesses.

    Sets ``LORAKIT_DATA_ROOT`` and ``LORAKIT_CONFIG`` (a config whose model roots are under ``tmp_path``),
    and ``HF_HUB_OFFLINE=1`` so nothing reaches the network.
    """
    data_root = tmp_path / "data"
    (data_root / "shared").mkdir(parents=True)  # what makes a folder a data root; projects/ comes with the first one
    models = tmp_path / "models"
    config = tmp_path / "local.json"
    config.write_text(json.dumps({
        "dataRoot": str(data_root),
        "paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "checkpoints"),
                  "lorasRoot": str(models / "loras")},
    }, indent=2) + "\n", encoding="utf-8")
    monkeypatch.setenv("LORAKIT_DATA_ROOT", str(data_root))
    monkeypatch.setenv("LORAKIT_CONFIG", str(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return data_root


def copy_demo_data(root: Path, models: Path) -> tuple[Path, Path]:
    """A copy of the repository's demo data under ``root`` and a config for it: ``(data_root, config_path)``.

    Weights go under ``models`` (checkpoints) and ``root/loras`` (LoRAs), never into the repository. Callers set
    ``LORAKIT_DATA_ROOT``/``LORAKIT_CONFIG`` themselves (for this process or for a subprocess they start).
    """
    data = root / "data"
    shutil.copytree(REPO_ROOT / "data", data, ignore=shutil.ignore_patterns(".lorakit"))
    config = root / "local.json"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "checkpoints"),
                                            "lorasRoot": str(root / "loras")}}), encoding="utf-8")
    return data, config


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, size: str, *, read_only: bool = False):
    """A real tmpfs mounted over ``folder`` (which must exist), unmounted afterwards. Skips where the test may
    not mount (not root, or no mount namespace rights)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> None:
    """Write to ``folder`` until its file system has no space left."""
    with open(folder / "filler", "wb") as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
