"""``lorakit init`` and ``lorakit validate``."""

from __future__ import annotations

from ..validate import validate_records
from ..workspace import init_data_root
from .common import workspace


def register(subparsers, common) -> None:
    p = subparsers.add_parser("init", parents=[common], help="start a new data root (shared/ and projects/)")
    p.set_defaults(func=cmd_init)
    p = subparsers.add_parser("validate", parents=[common], help="check every record against its schema")
    p.add_argument("--project", help="only this project (and the shared records)")
    p.set_defaults(func=cmd_validate)


def cmd_init(args) -> int:
    ws = init_data_root(getattr(args, "data_root", None))
    print(f"data root ready: {ws.data_root} (shared/, projects/)")
    return 0


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
