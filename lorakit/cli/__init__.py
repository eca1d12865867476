"""The ``lorakit`` command line: one sub-command per workflow step, each a thin wrapper over a library call.

Every command takes ``--data-root``. Errors the user can fix print ``error: ...`` and exit 1; bad flags
exit 2 (argparse); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from ..errors import LorakitError

# Each module registers its sub-commands with ``register(subparsers, common)``.
COMMAND_MODULES = ["records", "dataset", "assets", "gate", "checkpoint", "evals", "lora", "adapters", "notebooks"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", help="data folder, relative to the current folder (default: LORAKIT_DATA_ROOT, "
                        "dataRoot in config/local.json, or ./data)")
    parser = argparse.ArgumentParser(prog="lorakit", description="Train LoRAs per checkpoint on curated game assets.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        import_module(f"{__name__}.{name}").register(subparsers, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `lorakit ... | head` closed the pipe: not an error. Point stdout at devnull so the interpreter's
        # final flush does not raise again.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
