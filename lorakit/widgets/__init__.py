"""ipywidgets front ends (notebooks): they call library functions and hold no decisions of their own.

Imported lazily, so ``import lorakit.widgets`` stays cheap and ipywidgets loads only when a widget is made.

>>> from lorakit.widgets import LoraPicker      # doctest: +SKIP
>>> picker = LoraPicker(project="demo"); picker  # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module

# public name -> module that defines it; add a line here for each new widget
_LAZY = {
    "LoraPicker": ".picker",
    "Wizard": ".wizard",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
