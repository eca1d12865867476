"""Model families, one module each: the only place in lorakit that knows what differs between SD1.5, SDXL and
the families that come after them.

>>> get("sdxl").label, [f.name for f in families()]
('SDXL', ['sd15', 'sdxl'])
"""

from __future__ import annotations

from collections.abc import Iterable

from .base import Family, TextEncoder
from .objectives import PREDICTIONS, Objective
from .sd15 import FAMILY as _SD15
from .sdxl import FAMILY as _SDXL

_REGISTRY: dict[str, Family] = {f.name: f for f in (_SD15, _SDXL)}
NAMES = tuple(_REGISTRY)


def families() -> list[Family]:
    return list(_REGISTRY.values())


def get(name: object) -> Family:
    """The family called ``name`` (a family itself is returned as it is); an unknown name is a
    :class:`ValueError` listing the known ones."""
    if isinstance(name, Family):
        return name
    family = _REGISTRY.get(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(f"unknown model family {name!r} (expected one of {', '.join(NAMES)})")
    return family


def from_index_class(class_name: object) -> Family | None:
    """The family whose diffusers folders have this ``model_index.json`` class, else None."""
    return next((f for f in _REGISTRY.values() if isinstance(class_name, str) and f.matches_index(class_name)), None)


def from_pipeline(pipe: object) -> Family | None:
    """The family whose pipeline class ``pipe`` is, else None."""
    return next((f for f in _REGISTRY.values() if f.is_pipeline(pipe)), None)


def from_keys(keys: object) -> Family | None:
    """The family whose original-layout single files hold keys like these, else None."""
    names = list(keys) if isinstance(keys, Iterable) else []
    return next((f for f in _REGISTRY.values() if f.matches_keys(names)), None)


__all__ = ["NAMES", "PREDICTIONS", "Family", "Objective", "TextEncoder", "families", "from_index_class",
           "from_keys", "from_pipeline", "get"]
