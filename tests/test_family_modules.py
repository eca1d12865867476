"""One module per model family: outside ``lorakit/families/`` no code compares a family name or keys a dict by
one. Everything that differs between families is asked of the family object (``lorakit.families.get(name)``),
so a new family is a new module, not a branch in a dozen files (``docs/families.md``).

Docstrings, doctests and help texts may still mention a family by name: only comparisons (``family ==
"sdxl"``, ``family in ("sd15", ...)``), dict displays keyed by a name (``{"sd15": ...}``) and subscripts by a
name (``table["sdxl"]``) are flagged.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lorakit.families

PACKAGE = Path(lorakit.families.__file__).resolve().parent.parent
FAMILIES_DIR = PACKAGE / "families"
FAMILY_NAMES = frozenset({"sd15", "sdxl", *lorakit.families.NAMES})


def _is_name(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value in FAMILY_NAMES


def _names_in(node: ast.AST) -> bool:
    """A family name constant, alone or in a tuple, list or set display."""
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_is_name(e) for e in node.elts)
    return _is_name(node)


def family_name_uses(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` of every comparison with, dict key of and subscript by a family-name constant (a dict
    looked up with ``.get("sdxl")`` is found where it is written down)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(_names_in(n) for n in [node.left, *node.comparators]):
            found.append((node.lineno, "compares with a family name"))
        elif isinstance(node, ast.Dict) and any(_is_name(k) for k in node.keys):
            found.append((node.lineno, "keys a dict by a family name"))
        elif isinstance(node, ast.Subscript) and _is_name(node.slice):
            found.append((node.lineno, "subscripts by a family name"))
    return sorted(found)


def offenders() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if FAMILIES_DIR in path.parents:
            continue
        for line, what in family_name_uses(path.read_text(encoding="utf-8")):
            out.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {what}")
    return out


def test_the_check_sees_the_branches_it_is_for() -> None:
    source = ('if family == "sdxl": pass\n'
              'if "sd15" != family: pass\n'
              'if family in ("sd15", "sdxl"): pass\n'
              'RES = {"sd15": 512}\n'
              'x = RES["sdxl"]\n')
    assert [line for line, _ in family_name_uses(source)] == [1, 2, 3, 4, 5]
    # What may name a family: docstrings, help texts, messages, and calls that take a name.
    allowed = ('"""Trains sd15 and sdxl checkpoints."""\n'
               'HELP = "--family sd15|sdxl"\n'
               'family = lorakit.families.get("sdxl")\n'
               'make_tiny_checkpoint(ws, "tiny_sd15", "sd15")\n')
    assert family_name_uses(allowed) == []


def test_only_lorakit_families_names_a_family() -> None:
    found = offenders()
    assert not found, "family names compared or used as dict keys outside lorakit/families/ (ask the family " \
                      "object instead):\n" + "\n".join(found)
