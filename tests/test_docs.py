"""The documentation keeps up with the code: the README names every command, every public name has a docstring,
``docs/data-model.md`` covers every schema, and every ``docs/*.md`` the code cites exists."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest

import lorakit
from lorakit.cli import build_parser
from lorakit.schemas import PATH_KEYWORD, SCHEMA_NAMES

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
DATA_MODEL = REPO_ROOT / "docs" / "data-model.md"
SCHEMA_DIR = REPO_ROOT / "lorakit" / "schemas"
PACKAGE_DIR = REPO_ROOT / "lorakit"
DOC_CITATION = re.compile(r"docs/[A-Za-z0-9_./-]+?\.md\b")


# ---- the command line in the README ------------------------------------------------------------------------
def cli_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ("lorakit",)) -> list[str]:
    """Every runnable command of ``parser`` as typed (``lorakit lora train``), found by walking the sub-parsers
    recursively. A group (``lorakit lora``) counts only through its commands; aliases are left out."""
    commands: list[str] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a command already listed
                continue
            seen.add(id(sub))
            nested = cli_commands(sub, (*prefix, name))
            commands += nested or [" ".join((*prefix, name))]
    return commands


def mentioned(command: str, text: str) -> bool:
    """``command`` appears in ``text`` as a whole command: ``lorakit lora eval`` is not found in
    ``lorakit lora eval-grid``."""
    return re.search(re.escape(command) + r"(?![\w-])", text) is not None


def test_cli_walk_finds_nested_and_top_level_commands():
    commands = cli_commands(build_parser())
    for expected in ("lorakit lora train", "lorakit dataset build", "lorakit checkpoint make-tiny",
                     "lorakit notebook run", "lorakit worker", "lorakit validate"):
        assert expected in commands, f"{expected} not found by the walk: {commands}"
    assert "lorakit lora" not in commands, "a group with sub-commands is not a command itself"
    assert len(commands) == len(set(commands))


def test_mentioned_matches_whole_commands_only():
    assert mentioned("lorakit lora eval", "run `lorakit lora eval --lora x`")
    assert not mentioned("lorakit lora eval", "run `lorakit lora eval-grid --lora x`")
    assert not mentioned("lorakit assets tag", "`lorakit assets tags --project p`")


def test_readme_names_every_cli_command():
    text = README.read_text(encoding="utf-8")
    missing = [command for command in cli_commands(build_parser()) if not mentioned(command, text)]
    assert not missing, "README.md does not mention: " + ", ".join(missing)


# ---- the public API ----------------------------------------------------------------------------------------
def written_docstring(obj: object) -> str | None:
    """The docstring someone wrote for ``obj`` (``inspect.getdoc``), or None.

    ``inspect.getdoc`` also returns a class's inherited docstring (an error class would show its base's) and the
    signature a dataclass makes up when it has none; neither counts here."""
    doc = inspect.getdoc(obj)
    if inspect.isclass(obj):
        own = obj.__dict__.get("__doc__")
        if not (own and own.strip()):
            return None
        if dataclasses.is_dataclass(obj) and own.startswith(f"{obj.__name__}("):
            return None
    return doc if doc and doc.strip() else None


def test_written_docstring_rejects_inherited_and_generated_ones():
    class Base:
        """Documented."""

    class Child(Base):
        pass

    @dataclasses.dataclass
    class Plain:
        x: int

    assert written_docstring(Base) == "Documented."
    assert written_docstring(Child) is None
    assert written_docstring(Plain) is None
    assert written_docstring(lambda: None) is None


def test_every_public_name_imports():
    broken = []
    for name in lorakit.__all__:
        try:
            getattr(lorakit, name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is what this test reports
            broken.append(f"{name} ({type(exc).__name__}: {exc})")
    assert not broken, "lorakit.__all__ names that do not import: " + "; ".join(broken)


def test_every_public_name_has_a_docstring():
    undocumented = []
    for name in lorakit.__all__:
        try:
            obj = getattr(lorakit, name)
        except Exception:  # noqa: BLE001 - reported by test_every_public_name_imports
            continue
        if written_docstring(obj) is None:
            undocumented.append(name)
    assert not undocumented, "lorakit.__all__ names without a docstring: " + ", ".join(undocumented)


# ---- docs/data-model.md --------------------------------------------------------------------------------------
def schema_files() -> list[Path]:
    return sorted(SCHEMA_DIR.glob("*.schema.json"))


def test_schema_names_match_the_schema_files():
    on_disk = {p.name.removesuffix(".schema.json") for p in schema_files()}
    assert on_disk == set(SCHEMA_NAMES)


def test_data_model_doc_exists():
    assert DATA_MODEL.is_file(), f"{DATA_MODEL.relative_to(REPO_ROOT)} is missing"
    assert DATA_MODEL.read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("schema", schema_files(), ids=lambda p: p.name)
def test_data_model_doc_covers_schema(schema: Path):
    """Each record kind with a schema is in the doc by its schema file name, and so is each top-level field, in
    backticks (``versions[]`` and ``policies.loraSelection`` count for ``versions`` and ``policies``)."""
    text = DATA_MODEL.read_text(encoding="utf-8")
    assert schema.name in text, f"docs/data-model.md does not name {schema.name}"
    fields = json.loads(schema.read_text(encoding="utf-8")).get("properties", {})
    missing = [field for field in fields if not re.search(rf"`{re.escape(field)}(`|\[\]|\.)", text)]
    assert not missing, f"docs/data-model.md lacks these {schema.name} fields: " + ", ".join(missing)


def test_data_model_doc_explains_the_path_keyword():
    text = DATA_MODEL.read_text(encoding="utf-8")
    roots = {json.loads(p.read_text(encoding="utf-8")).get(PATH_KEYWORD) for p in schema_files()} - {None}
    assert roots, f"no schema uses {PATH_KEYWORD}"
    assert f"`{PATH_KEYWORD}`" in text
    missing = sorted(root for root in roots if f"`{root}`" not in text)
    assert not missing, f"docs/data-model.md does not explain {PATH_KEYWORD} roots: " + ", ".join(missing)


def test_data_model_doc_links_resolve():
    text = DATA_MODEL.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)\)", text) if "://" not in t]
    broken = [t for t in targets if not (DATA_MODEL.parent / t).exists()]
    assert not broken, "docs/data-model.md links to missing files: " + ", ".join(broken)


# ---- docs the code cites -----------------------------------------------------------------------------------
def cited_docs() -> dict[str, list[str]]:
    """``docs/....md`` paths written anywhere in the package, each with the files that cite it."""
    cited: dict[str, list[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary data files cite nothing
        for doc in DOC_CITATION.findall(text):
            cited.setdefault(doc, []).append(path.relative_to(REPO_ROOT).as_posix())
    return cited


def test_docs_cited_by_the_code_exist():
    cited = cited_docs()
    assert "docs/data-model.md" in cited, "the scan found no citation at all (lorakit/store.py cites docs/data-model.md)"
    missing = [f"{doc} (cited by {', '.join(sorted(set(where)))})" for doc, where in sorted(cited.items())
               if not (REPO_ROOT / doc).is_file()]
    assert not missing, "docs cited in lorakit/ that do not exist: " + "; ".join(missing)
