"""JSON Schemas of every record kind, loaded from ``schemas/`` and checked with draft 2020-12."""

from __future__ import annotations

import json
from functools import cache

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from .config import SCHEMA_DIR

SCHEMA_NAMES = (
    "weights-ref", "local-config", "project", "spec", "asset", "catalog-styles", "catalog-scenarios",
    "catalog-tags", "catalog-asset-types", "checkpoint", "dataset-manifest", "lora", "eval", "job",
)


@cache
def _registry() -> tuple[Registry, dict[str, dict]]:
    schemas = {}
    for name in SCHEMA_NAMES:
        schemas[name] = json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas.values())
    return registry, schemas


@cache
def validator(schema_name: str) -> Draft202012Validator:
    registry, schemas = _registry()
    if schema_name not in schemas:
        raise KeyError(f"no schema named {schema_name!r}")
    return Draft202012Validator(schemas[schema_name], registry=registry)


def validation_errors(schema_name: str, record: object) -> list[str]:
    """Every schema violation of ``record`` as ``"at $.json.path: message"``, most specific first."""
    errors = sorted(validator(schema_name).iter_errors(record), key=lambda e: (list(e.absolute_path), e.message))
    return [f"at {e.json_path}: {_short(e.message)}" for e in errors]


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."
