"""Fixtures shared by every test file: an isolated data root and config, offline model hubs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture
def tmp_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data root under ``tmp_path``, made the default for library calls and subprocesses.

    Sets ``LORAKIT_DATA_ROOT`` and ``LORAKIT_CONFIG`` (a config whose model roots are under ``tmp_path``),
    and ``HF_HUB_OFFLINE=1`` so nothing reaches the network.
    """
    data_root = tmp_path / "data"
    data_root.mkdir()
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
