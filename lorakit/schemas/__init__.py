"""JSON Schemas of every record kind, shipped beside this module (``lorakit/schemas/*.schema.json``; the
checkout's top-level ``schemas/`` is a link to this folder).

The schemas are draft 2020-12 and jsonschema is the authority that words every error. Checking is done
first by a validator compiled with fastjsonschema, which is ~5x faster on large manifests; only a record
that fails it goes through jsonschema for the message. Our schemas use no keyword whose meaning differs
between draft 7 (what fastjsonschema implements) and 2020-12, and jsonschema has the last word on failures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import fastjsonschema

SCHEMA_DIR = Path(__file__).resolve().parent

SCHEMA_NAMES = (
    "data-path", "repo-path", "loras-path", "weights-ref", "local-config", "project", "spec", "asset", "catalog-styles",
    "catalog-scenarios", "catalog-tags", "catalog-asset-types", "checkpoint", "dataset-manifest", "lora", "eval", "job",
)
# Schemas mark every field that holds a file path with this keyword; its value names the root the path is
# relative to: "dataRoot", "repoRoot" (the folder holding the data root), "lorasRoot" (where training runs write)
# or "weights" (a weights reference).
PATH_KEYWORD = "x-lorakit-path"
_PATH_MESSAGES = {
    "dataRoot": "is absolute or climbs out with '..'; records hold paths relative to the data root",
    "repoRoot": "is absolute or climbs out with '..'; it must be relative to the folder that holds the data root",
    "lorasRoot": "is absolute or climbs out with '..'; it must be relative to lorasRoot",
}
_DRAFT7 = "http://json-schema.org/draft-07/schema#"


@cache
def _schemas() -> dict[str, dict]:
    return {name: json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8")) for name in SCHEMA_NAMES}


@cache
def _fast_validator(schema_name: str) -> Callable[[object], object]:
    by_id = {s["$id"]: {**s, "$schema": _DRAFT7} for s in _schemas().values()}
    schema = {**_schemas()[schema_name], "$schema": _DRAFT7}
    return fastjsonschema.compile(schema, handlers={"urn": lambda uri: by_id[uri]})


@cache
def validator(schema_name: str):
    """The jsonschema (draft 2020-12) validator of one schema, with cross-references resolved."""
    from jsonschema import Draft202012Validator  # imported only when an error needs wording
    from referencing import Registry, Resource

    schemas = _schemas()
    if schema_name not in schemas:
        raise KeyError(f"no schema named {schema_name!r}")
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    return Draft202012Validator(schemas[schema_name], registry=registry)


def validation_errors(schema_name: str, record: object) -> list[str]:
    """Every schema violation of ``record`` as ``"at $.json.path: message"``; empty when valid."""
    try:
        _fast_validator(schema_name)(record)
        return []
    except fastjsonschema.JsonSchemaException:
        pass
    errors = sorted(validator(schema_name).iter_errors(record), key=lambda e: (list(e.absolute_path), e.message))
    return [f"at {e.json_path}: {_message(e)}" for e in errors]


def _message(error) -> str:
    root = error.schema.get(PATH_KEYWORD) if isinstance(error.schema, dict) else None
    if error.validator == "pattern" and root in _PATH_MESSAGES:
        return f"path {_short(repr(error.instance), 120)} {_PATH_MESSAGES[root]}"
    return _short(error.message)


def path_fields(schema_name: str, record: object) -> list[tuple[str, str, object]]:
    """Every value of ``record`` that its schema marks as a file path: ``(JSON path, root name, value)``.

    >>> path_fields("job", {"input": {"imagePath": "files/evals/p/e/c.png"}})
    [('$.input.imagePath', 'dataRoot', 'files/evals/p/e/c.png')]
    """
    by_id = {s["$id"]: s for s in _schemas().values()}
    found: list[tuple[str, str, object]] = []

    def walk(schema: dict, value: object, where: str) -> None:
        if "$ref" in schema:
            walk(by_id[schema["$ref"]], value, where)
        for part in [*schema.get("allOf", []), *schema.get("anyOf", []), *schema.get("oneOf", [])]:
            walk(part, value, where)
        if PATH_KEYWORD in schema:
            found.append((where, schema[PATH_KEYWORD], value))
        if isinstance(value, dict):
            properties = schema.get("properties", {})
            for key, sub in properties.items():
                if key in value:
                    walk(sub, value[key], f"{where}.{key}")
            others = schema.get("additionalProperties")
            for key in value.keys() - properties.keys():
                subs = [sub for pattern, sub in schema.get("patternProperties", {}).items() if re.search(pattern, key)]
                for sub in subs or ([others] if isinstance(others, dict) else []):
                    walk(sub, value[key], f"{where}.{key}")
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for index, item in enumerate(value):
                walk(schema["items"], item, f"{where}[{index}]")

    walk(_schemas()[schema_name], record, "$")
    return found


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
