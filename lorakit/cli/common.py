"""Helpers shared by the sub-command modules."""

from __future__ import annotations

import argparse

from ..workspace import Workspace, open_workspace


def workspace(args: argparse.Namespace) -> Workspace:
    return open_workspace(getattr(args, "data_root", None))


def split_list(values: list[str] | str | None) -> list[str]:
    """``--tag a,b --tag c`` -> ``["a", "b", "c"]``: comma lists and repeats both add values."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [part.strip() for value in values for part in value.split(",") if part.strip()]
