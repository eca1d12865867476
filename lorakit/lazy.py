"""Packages whose public names are imported on first use (PEP 562), so importing them loads no heavy library."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module


def lazy_exports(package: str, exports: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """The module-level ``__getattr__`` and ``__dir__`` of ``package``, whose public names map to the submodules
    that define them (``{"load_pipeline": ".loading"}``); ``namespace`` is the package's ``globals()``.

    >>> namespace = {}
    >>> getattr_, dir_ = lazy_exports("json", {"JSONDecoder": ".decoder"}, namespace)
    >>> getattr_("JSONDecoder").__name__, "JSONDecoder" in namespace, dir_()
    ('JSONDecoder', True, ['JSONDecoder'])
    """

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(module, package), name)
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
