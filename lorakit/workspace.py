"""A workspace: the local config and the record store it points at, opened once and passed around."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .config import DATA_ROOT_PARTS, Config, check_data_root, load_config
from .errors import ConfigError
from .store import Store


@dataclass(frozen=True)
class Workspace:
    """An opened data root: the resolved local config (where the roots are) and the record store on it.

    Every library function takes one (or a data root path, or ``None`` for the default) as its first argument.
    """

    config: Config
    store: Store

    @property
    def data_root(self) -> Path:
        return self.store.root


def open_workspace(data_root: str | Path | None = None) -> Workspace:
    """Open the workspace for ``data_root`` (else ``LORAKIT_DATA_ROOT``, ``config/local.json``, ``./data``).

    A data root that does not exist, or holds neither ``shared/`` nor ``projects/``, is a :class:`ConfigError`
    (start a new one with :func:`init_data_root`).

    >>> import lorakit
    >>> ws = lorakit.open_workspace("data")   # doctest: +SKIP
    """
    config = load_config(data_root)
    check_data_root(config)
    return Workspace(config=config, store=Store(config.data_root))


def init_data_root(data_root: str | Path | None = None) -> Workspace:
    """Start a data root (``lorakit init``): create it with empty ``shared/`` and ``projects/``, then open it.

    An existing data root is left as it is; a path that is a file is refused.
    """
    config = load_config(data_root)
    root = config.data_root
    if root.exists() and not root.is_dir():
        raise ConfigError(f"data root {root} is a file, not a folder; choose another --data-root")
    try:
        for part in DATA_ROOT_PARTS:
            (root / part).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create data root {root}: {exc.strerror}") from None
    return open_workspace(root)


def as_workspace(ws: Workspace | str | Path | None) -> Workspace:
    """Let public functions take a workspace, a data root path, or nothing (the configured default)."""
    return ws if isinstance(ws, Workspace) else open_workspace(ws)
