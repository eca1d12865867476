"""The throwaway workspace every benchmark starts from: a data root and models folder under ``root``, a
``local.json`` pointing at them (set as ``LORAKIT_CONFIG`` and ``LORAKIT_DATA_ROOT`` for lorakit and any worker
process it starts), and one project record."""

from __future__ import annotations

import json
import os
from pathlib import Path


def bench_workspace(root: Path, project: str, *, name: str = "Bench", paths: dict | None = None):
    """A new workspace in ``root`` with the project ``project``; ``paths`` adds to the config's ``paths``."""
    config = root / "local.json"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(root / "models"), **(paths or {})}}), encoding="utf-8")
    os.environ["LORAKIT_CONFIG"] = str(config)
    os.environ["LORAKIT_DATA_ROOT"] = str(root / "data")
    from lorakit.store import now_iso
    from lorakit.workspace import init_data_root

    ws = init_data_root()
    now = now_iso()
    ws.store.write("project", {"id": project, "name": name, "createdAt": now, "updatedAt": now})
    return ws
