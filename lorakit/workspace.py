"""A workspace: the local config and the record store it points at, opened once and passed around."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import Config, load_config
from .store import Store


@dataclass(frozen=True)
class Workspace:
    config: Config
    store: Store

    @property
    def data_root(self) -> Path:
        return self.store.root


def open_workspace(data_root: str | Path | None = None) -> Workspace:
    """Open the workspace for ``data_root`` (else ``LORAKIT_DATA_ROOT``, ``config/local.json``, ``data/``).

    >>> import lorakit
    >>> ws = lorakit.open_workspace("data")   # doctest: +SKIP
    """
    config = load_config(data_root)
    return Workspace(config=config, store=Store(config.data_root))


def as_workspace(ws: Workspace | str | Path | None) -> Workspace:
    """Let public functions take a workspace, a data root path, or nothing (the configured default)."""
    return ws if isinstance(ws, Workspace) else open_workspace(ws)
