"""Every field of a record that holds a file path is marked ``x-lorakit-path`` in its schema, so ``lorakit validate``
checks it and its readers resolve it inside its root.

Two walks find the path fields: one through the schemas (a field whose name or description says path, file, log,
dir or folder), one through the records lorakit itself writes on a real run (a key that says so). A field either
walk finds must be marked, unless :data:`NOT_PATHS` says why it holds no path. Then a release's
``training.lossLog`` planted with escapes: ``lorakit report`` refuses it before reading anything, and
``lorakit validate`` names the record file and the JSON path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import copy_demo_data

import lorakit
from lorakit.loras import make_release
from lorakit.schemas import PATH_KEYWORD, SCHEMA_NAMES, _schemas, path_fields
from lorakit.store import SCHEMA_OF
from lorakit.validate import record_files

PATH_WORDS = {"path", "paths", "file", "files", "log", "logs", "dir", "dirs", "directory", "folder", "folders"}
# (schema, field pattern) -> why the field holds no path. Keep it to fields that are not paths at all.
NOT_PATHS: dict[tuple[str, str], str] = {}
# Schemas that are a path themselves (data-path, weights-ref, ...): what marked fields point at.
PATH_SCHEMAS = {name for name in SCHEMA_NAMES if PATH_KEYWORD in _schemas()[name]}


def says_path(text: str) -> bool:
    """Whether a field name (camelCase or snake_case) or a description names a path word."""
    words = re.findall(r"[a-z]+|[A-Z][a-z]*", text or "")
    return any(w.lower() in PATH_WORDS for w in words)


def unmarked_path_fields(schema: dict, schemas: dict[str, dict], name: str = "") -> Iterator[str]:
    """The fields of ``schema`` whose name or description says path but that carry no ``x-lorakit-path``, as
    ``items[].path`` patterns (``[]``: each item, ``*``: each value of a map). Follows ``$ref``, ``allOf``,
    ``anyOf``, ``oneOf``, ``if``/``then``/``else``, ``properties``, ``items``, ``additionalProperties`` and
    ``patternProperties``; a marked field is a path as a whole, so what is inside it is not walked."""
    by_id = {s["$id"]: s for s in schemas.values()}

    def marked(node: object, seen: frozenset[str]) -> bool:
        """Marked itself, through ``$ref``, or in a part of ``allOf``/``anyOf``/``oneOf`` (a path or null)."""
        if not isinstance(node, dict):
            return False
        ref = node.get("$ref")
        parts = [*node.get("allOf", []), *node.get("anyOf", []), *node.get("oneOf", [])]
        return (PATH_KEYWORD in node or any(marked(part, seen) for part in parts)
                or (isinstance(ref, str) and ref not in seen and marked(by_id[ref], seen | {ref})))

    def walk(node: object, where: str, key: str, seen: frozenset[str]) -> Iterator[str]:
        if not isinstance(node, dict) or marked(node, seen):
            return
        ref = node.get("$ref")
        target = by_id.get(ref, {}) if isinstance(ref, str) and ref not in seen else {}
        types = node.get("type", target.get("type"))
        holds_text = types is None or types == "string" or (isinstance(types, list) and "string" in types)
        if where and holds_text and (says_path(key) or says_path(node.get("description", ""))):
            yield where
        if target:
            yield from walk({k: v for k, v in target.items() if k != "description"}, where, key, seen | {ref})
        for part in [*node.get("allOf", []), *node.get("anyOf", []), *node.get("oneOf", []),
                     *(node.get(k) for k in ("if", "then", "else"))]:
            yield from walk(part, where, key, seen)
        for sub_key, sub in (node.get("properties") or {}).items():
            yield from walk(sub, f"{where}.{sub_key}" if where else sub_key, sub_key, seen)
        items = node.get("items")
        for sub in items if isinstance(items, list) else [items]:
            yield from walk(sub, f"{where}[]", key, seen)
        for sub in [node.get("additionalProperties"), *(node.get("patternProperties") or {}).values()]:
            yield from walk(sub, f"{where}.*" if where else "*", key, seen)

    yield from dict.fromkeys(walk(schema, "", name, frozenset()))


def test_every_path_field_of_the_schemas_is_marked() -> None:
    schemas = _schemas()
    found = [(name, where) for name in SCHEMA_NAMES if name not in PATH_SCHEMAS
             for where in unmarked_path_fields(schemas[name], schemas)]
    unmarked = [f"{name}: {where}" for name, where in found if (name, where) not in NOT_PATHS]
    assert not unmarked, (f"schema fields that say they hold a path carry no {PATH_KEYWORD} (mark them with their "
                          f"root, or add them to NOT_PATHS with the reason they are no path): {unmarked}")
    stale = sorted(set(NOT_PATHS) - set(found))
    assert not stale, f"NOT_PATHS names fields the walk does not find (any more): {stale}"


def test_the_schema_walk_looks_everywhere() -> None:
    """The walk finds an unmarked path at every place a schema can hold one, and passes over a marked one."""
    schemas = {"ref": {"$id": "urn:t:ref", "type": "object", "properties": {"reportFile": {"type": "string"}}},
               "path": {"$id": "urn:t:path", "type": "string", PATH_KEYWORD: "dataRoot"}}
    schema = {"type": "object", "properties": {
        "lossLog": {"type": "string"},
        "count": {"type": "integer", "description": "number of files"},
        "notes": {"type": "string", "description": "the folder the images came from"},
        "byName": {"type": "object", "additionalProperties": {"type": "string", "description": "a file path"}},
        "steps": {"type": "array", "items": {"type": "object", "properties": {"imageDir": {"type": "string"}}}},
        "either": {"allOf": [{"properties": {"cache_path": {}}}]},
        "nested": {"$ref": "urn:t:ref"},
        "marked": {"$ref": "urn:t:path", "description": "a file path"},
        "logs": {"type": "array", "items": {"type": "string"}},
        "alsoMarked": {"anyOf": [{"$ref": "urn:t:path"}, {"type": "null"}]},
    }}
    found = set(unmarked_path_fields(schema, schemas))
    assert found == {"lossLog", "notes", "byName.*", "steps[].imageDir", "either.cache_path", "nested.reportFile",
                     "logs[]"}


# ---- the records lorakit writes on a real run ----------------------------------------------------------------
def path_keys(value: object, where: str = "$") -> Iterator[str]:
    """JSON paths of every key in ``value`` whose name says path."""
    if isinstance(value, dict):
        for key, sub in value.items():
            if says_path(key):
                yield f"{where}.{key}"
            yield from path_keys(sub, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from path_keys(item, f"{where}[{index}]")


def inside_marked(where: str, marked: list[str]) -> bool:
    return any(where == m or where.startswith(m + ".") or where.startswith(m + "[") for m in marked)


# (schema, field pattern) of record parts that hold paths lorakit never opens from the record -> why.
NEVER_OPENED = {
    ("lora", "releases[].training.config"): "the settings a run was given, kept as provenance (latent_cache_dir is "
                                             "a folder of the machine that trained); a run resumes from its run.json",
}


def never_opened(schema: str, where: str) -> bool:
    pattern = re.sub(r"\[\d+\]", "[]", where[2:])
    return any(schema == s and (pattern == p or pattern.startswith(p + ".")) for s, p in NEVER_OPENED)


@pytest.mark.slow
def test_every_path_a_real_run_records_is_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Build a dataset, train a release (1 step, tiny checkpoint) and queue an eval grid, then walk every record:
    each key that says path lies in a field the schema marks."""
    data, config = copy_demo_data(tmp_path, tmp_path / "models")
    for key, value in {"LORAKIT_DATA_ROOT": str(data), "LORAKIT_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    ws = lorakit.open_workspace()
    lorakit.make_tiny_checkpoint(ws, "tiny-sd15", "sd15")
    lorakit.build_manifest(ws, project="demo", asset_types=["ui_icon"], dataset_id="icons")
    lorakit.create_lora(ws, "icons", name="Icons", scope="project", project="demo", checkpoint="tiny-sd15",
                        asset_types=["ui_icon"])
    result = lorakit.train_lora(ws, "icons", "icons", project="demo", preset="tiny-demo", progress=False,
                                config={"steps": 1, "resolution": 64})
    lorakit.create_eval_grid(ws, "demo", "icons", result.release_id, prompts=["ui icon of a shield"], seeds=[1],
                             strengths=[1.0])
    unmarked = []
    for kind, path in record_files(ws.store):
        record = json.loads(path.read_text(encoding="utf-8"))
        marked = [where for where, _, _ in path_fields(SCHEMA_OF[kind], record)]
        unmarked += [f"{path.relative_to(data)}: {where}" for where in path_keys(record)
                     if not inside_marked(where, marked) and not never_opened(SCHEMA_OF[kind], where)]
    assert "lossLog" in json.dumps(ws.store.read("lora", "icons", "demo"))
    assert not unmarked, f"paths lorakit records in fields no schema marks: {unmarked}"


# ---- training.lossLog planted with escapes ------------------------------------------------------------------
CSV = "step,epoch,loss,lr\n1,0,0.5,0.001\n2,0,0.25,0.001\n"


@pytest.fixture
def studio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The demo data, LoRA ``icons`` with release ``r1`` whose loss log is a well-formed CSV under lorasRoot,
    and a CSV outside every root."""
    data, config = copy_demo_data(tmp_path / "studio", tmp_path / "studio" / "models")
    for key, value in {"LORAKIT_DATA_ROOT": str(data), "LORAKIT_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    ws = lorakit.open_workspace()
    loras = ws.config.loras_root
    (loras / "icons" / "r1").mkdir(parents=True)
    (loras / "icons" / "r1" / "train_log.csv").write_text(CSV, encoding="utf-8")
    lorakit.create_lora(ws, "icons", name="Icons", scope="project", project="demo", checkpoint="tiny-sd15",
                        asset_types=["ui_icon"])
    lorakit.add_release(ws, "icons", make_release("r1", weights={
        "kind": "config_relative", "base": "lorasRoot", "path": "icons/r1/icons.safetensors"}, sha256="0" * 64,
        training={"lossLog": "icons/r1/train_log.csv"}), project="demo")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.csv").write_text(CSV, encoding="utf-8")
    return {"ws": ws, "loras": loras, "outside": outside, "tmp": tmp_path,
            "record": ws.store.path("lora", "icons", "demo")}


def plant_loss_log(studio: dict, variant: str) -> str:
    loras, outside = studio["loras"], studio["outside"]
    if variant == "etc-passwd":
        value = "/etc/passwd"
    elif variant == "absolute":
        value = str(outside / "x.csv")
    elif variant == "climb":
        value = "icons/" + os.path.relpath(outside / "x.csv", loras / "icons")
    elif variant == "link":
        os.symlink(outside / "x.csv", loras / "icons" / "r1" / "linked.csv")
        value = "icons/r1/linked.csv"
    else:
        os.symlink(outside, loras / "icons" / "elsewhere")
        value = "icons/elsewhere/x.csv"
    record = json.loads(studio["record"].read_text(encoding="utf-8"))
    record["releases"][0]["training"]["lossLog"] = value
    studio["record"].write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return value


def cli(studio: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *argv], cwd=studio["tmp"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRANSFORMERS_OFFLINE": "1"})


@pytest.mark.parametrize("variant", ["etc-passwd", "absolute", "climb", "link", "dir-link"])
def test_an_escaping_loss_log_is_refused_by_report_and_named_by_validate(studio: dict, variant: str) -> None:
    value = plant_loss_log(studio, variant)
    out = studio["tmp"] / "reports"
    report = cli(studio, "report", "--lora", "icons", "--project", "demo", "--out", str(out))
    assert "Traceback" not in report.stderr
    assert report.returncode == 1 and report.stderr.startswith("error: ") and value in report.stderr, report.stderr
    assert not out.exists() or not list(out.iterdir()), "a report was written"
    validate = cli(studio, "validate")
    lines = (validate.stdout + validate.stderr).splitlines()
    assert validate.returncode == 1, validate.stdout + validate.stderr
    assert any(str(studio["record"]) in line and "at $.releases[0].training.lossLog:" in line for line in lines), (
        validate.stdout + validate.stderr)


def test_a_loss_log_inside_lorasroot_is_read(studio: dict) -> None:
    """The control: the planted release without an escape validates, and the report finds its loss log."""
    from lorakit.reports import release_report

    assert lorakit.validate_records(studio["ws"]) == []
    report = release_report(studio["ws"], "icons", "r1", project="demo")
    assert report.loss_log is not None and report.loss_log.read_text(encoding="utf-8") == CSV


def test_the_report_shows_no_sample_image_from_outside_the_release_folder(studio: dict) -> None:
    """The samples beside a release's weights are embedded in the report: one linked out of the release's folder,
    or a samples folder linked elsewhere, is left out."""
    from lorakit.reports import release_report

    folder = studio["loras"] / "icons" / "r1"
    (studio["outside"] / "secret.png").write_bytes(b"\x89PNG outside")
    (folder / "samples").mkdir()
    (folder / "samples" / "own.png").write_bytes(b"\x89PNG own")
    os.symlink(studio["outside"] / "secret.png", folder / "samples" / "linked.png")
    report = release_report(studio["ws"], "icons", "r1", project="demo")
    assert [p.name for p in report.samples] == ["own.png"]
    shutil.rmtree(folder / "samples")
    os.symlink(studio["outside"], folder / "samples")
    assert release_report(studio["ws"], "icons", "r1", project="demo").samples == []
