"""``lorakit validate``."""

from __future__ import annotations

from ..validate import validate_records
from .common import workspace


def register(subparsers, common) -> None:
    p = subparsers.add_parser("validate", parents=[common], help="check every record against its schema")
    p.add_argument("--project", help="only this project (and the shared records)")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    ws = workspace(args)
    problems = validate_records(ws, project=args.project)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) under {ws.data_root}")
        return 1
    print(f"all records valid under {ws.data_root}")
    return 0
