"""ipywidgets front ends (notebooks): they call library functions and hold no decisions of their own.

Imported lazily, so ``import lorakit.widgets`` stays cheap and ipywidgets loads only when a widget is made.

>>> from lorakit.widgets import LoraPicker      # doctest: +SKIP
>>> picker = LoraPicker(project="demo"); picker  # doctest: +SKIP
"""

from __future__ import annotations

from ..lazy import lazy_exports

# public name -> module that defines it; add a line here for each new widget
_LAZY = {
    "LoraPicker": ".picker",
    "ReviewPanel": ".review",
    "Wizard": ".wizard",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
