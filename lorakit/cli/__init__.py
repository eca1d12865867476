"""The ``lorakit`` command line: one sub-command per workflow step, each a thin wrapper over a library call.

Every command takes ``--data-root``. Errors the user can fix print ``error: ...`` and exit 1; bad flags
exit 2 (argparse); Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import errno
import sys
from importlib import import_module

from ..errors import LorakitError

# Each module registers its sub-commands with ``register(subparsers, common)``.
COMMAND_MODULES = ["records", "dataset", "assets", "gate", "checkpoint", "evals", "lora", "notebooks"]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", help="data folder, relative to the current folder (default: LORAKIT_DATA_ROOT, "
                        "dataRoot in config/local.json, or ./data)")
    parser = argparse.ArgumentParser(prog="lorakit", description="Train LoRAs per checkpoint on curated game assets.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        import_module(f"{__name__}.{name}").register(subparsers, common)
    return parser


_DISK_HINTS = {
    errno.ENOSPC: "the disk is full: free some space and run the command again",
    errno.EDQUOT: "the disk quota is used up: free some space and run the command again",
    errno.EROFS: "the file system is read-only: run where it can be written, or remount it read-write",
    errno.EACCES: "no permission: check the folder's owner and mode",
    errno.EPERM: "not permitted: check the folder's owner and mode",
}


def disk_error_message(exc: OSError) -> str:
    """An ``OSError`` from the machine (full disk, read-only mount, permissions) in words a user can act on.
    Records are replaced atomically, so a failed write leaves the old record as it was.

    >>> disk_error_message(OSError(errno.ENOSPC, "No space left on device", "/data/x.json"))
    '/data/x.json: No space left on device; the disk is full: free some space and run the command again (records are written whole or not at all)'
    """
    where = f"{exc.filename}: " if exc.filename else ""
    hint = _DISK_HINTS.get(exc.errno, "") if exc.errno is not None else ""
    return f"{where}{exc.strerror or exc}" + (f"; {hint}" if hint else "") + \
        " (records are written whole or not at all)"


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
    except OSError as exc:  # the machine, not the user's input: a full or read-only disk, permissions
        print(f"error: {disk_error_message(exc)}", file=sys.stderr)
        return 1
