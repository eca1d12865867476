"""``lorakit lora review|activate|deprecate|recommend|list``: the release gate and LoRA selection."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from ..gate import GateResult, activate_release, deprecate_release, review_release, set_recommended
from ..loras import get_release, release_validation, validation_facts, validation_summary
from ..select import list_loras
from .common import split_list, workspace
from .lora import lora_subcommands

RESOLVED_TEXT_COLUMNS = ["order", "picked", "lora_id", "scope", "recommended", "release_id", "strength", "reason",
                         "validation"]
OVERVIEW_TEXT_COLUMNS = ["lora_id", "scope", "project", "checkpoint_id", "asset_types", "recommended", "release_id",
                         "release_status", "review", "active", "eval_state", "validation"]


def register(subparsers, common) -> None:
    add_gate_commands(lora_subcommands(subparsers, common), common)


def add_gate_commands(lora: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    def target(p: argparse.ArgumentParser, release: bool = True) -> None:
        p.add_argument("--lora", required=True, help="LoRA id")
        if release:
            p.add_argument("--release", required=True, help="release id")
        p.add_argument("--project", help="project the LoRA (or the evals of a baseline LoRA) belongs to")

    p = lora.add_parser("review", parents=[common], help="approve or reject a release after its eval grid")
    target(p)
    outcome = p.add_mutually_exclusive_group(required=True)
    outcome.add_argument("--approve", action="store_true", help="approve the release")
    outcome.add_argument("--reject", action="store_true", help="reject it (keeps it out of use)")
    p.add_argument("--notes", help="what the reviewer saw; required with --force")
    p.add_argument("--reviewer", help="who reviews (default: LORAKIT_USER or the login name)")
    p.add_argument("--eval", action="append", dest="evals", metavar="EVAL",
                   help="eval looked at (repeat or comma-separate; default: every complete eval of the release)")
    p.add_argument("--force", action="store_true", help="review without a complete eval (recorded with --notes)")
    p.set_defaults(func=cmd_review)

    p = lora.add_parser("activate", parents=[common], help="make a release the LoRA's active release")
    target(p)
    p.add_argument("--force", action="store_true", help="activate a release that is not approved (recorded)")
    p.add_argument("--notes", help="why (recorded with --force)")
    p.add_argument("--by", help="who (default: LORAKIT_USER or the login name)")
    p.set_defaults(func=cmd_activate)

    p = lora.add_parser("deprecate", parents=[common], help="take a release out of use for good")
    target(p)
    p.add_argument("--notes", help="why")
    p.add_argument("--by", help="who (default: LORAKIT_USER or the login name)")
    p.set_defaults(func=cmd_deprecate)

    p = lora.add_parser("recommend", parents=[common], help="mark a LoRA recommended (or --off)")
    target(p, release=False)
    p.add_argument("--off", action="store_true", help="clear the recommendation")
    p.set_defaults(func=cmd_recommend)

    p = lora.add_parser("list", parents=[common],
                        help="LoRAs and their releases, or the ones a checkpoint and asset type get")
    p.add_argument("--project", help="project whose LoRAs and policy to use (baseline LoRAs are always listed)")
    p.add_argument("--checkpoint", help="checkpoint id")
    p.add_argument("--asset-type", help="asset type id")
    p.add_argument("--pick", action="append", metavar="LORA[@RELEASE][:STRENGTH]",
                   help="explicit pick over the project's policy picks (repeatable)")
    p.add_argument("--all", action="store_true", dest="include_all",
                   help="also incompatible LoRAs (with --checkpoint and --asset-type), or every project's LoRAs")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=cmd_list)


def _print(result: GateResult) -> int:
    for message in result.messages:
        print(message)
    return 0


def cmd_review(args) -> int:
    return _print(review_release(
        workspace(args), args.lora, args.release, approve=args.approve, project=args.project, notes=args.notes,
        reviewer=args.reviewer, eval_ids=split_list(args.evals) or None, force=args.force,
    ))


def cmd_activate(args) -> int:
    return _print(activate_release(workspace(args), args.lora, args.release, project=args.project, force=args.force,
                                   notes=args.notes, actor=args.by))


def cmd_deprecate(args) -> int:
    return _print(deprecate_release(workspace(args), args.lora, args.release, project=args.project,
                                    notes=args.notes, actor=args.by))


def cmd_recommend(args) -> int:
    return _print(set_recommended(workspace(args), args.lora, not args.off, project=args.project))


def validation_columns(rows: list[dict], lora_of: Callable[[str, str | None], dict],
                       project: str | None) -> tuple[list[str | None], list[float | None]]:
    """The ``validation`` text and ``validation_drop`` of each listed row's release (None for a row without one).

    ``lora_of(lora_id, where)`` gives a listed LoRA's record, ``where`` being its project (None: shared); a row
    that names no project (the resolved view) is a LoRA of ``project``, the only project LoRAs that resolve there.
    """
    texts: list[str | None] = []
    drops: list[float | None] = []
    for row in rows:
        release_id = row.get("release_id")
        if not isinstance(release_id, str):
            texts.append(None)
            drops.append(None)
            continue
        where = (row.get("project") or project) if row.get("scope") == "project" else None
        validation = release_validation(get_release(lora_of(row["lora_id"], where), release_id))
        facts = validation_facts(validation)
        texts.append(validation_summary(validation))
        drops.append(facts["drop"] if facts else None)
    return texts, drops


def cmd_list(args) -> int:
    ws = workspace(args)
    frame = list_loras(ws, args.project, args.checkpoint, args.asset_type,
                       include_all=args.include_all, picks=args.pick)
    read: dict[tuple[str, str | None], dict] = {}

    def lora_of(lora_id: str, where: str | None) -> dict:
        if (lora_id, where) not in read:
            read[(lora_id, where)] = ws.store.read("lora", lora_id, where)
        return read[(lora_id, where)]

    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    frame["validation"], frame["validation_drop"] = validation_columns(rows, lora_of, args.project)
    if args.json:
        records = frame.astype(object).where(frame.notna(), None).to_dict("records")
        print(json.dumps(records, indent=2, ensure_ascii=False))
        return 0
    if frame.empty:
        print("no LoRAs match")
        return 0
    resolved = bool(args.checkpoint and args.asset_type)
    shown = frame[RESOLVED_TEXT_COLUMNS if resolved else OVERVIEW_TEXT_COLUMNS].astype(object)
    # Left-aligned: the validation column holds sentences, which pandas would right-align.
    shown = shown.where(shown.notna(), "-")
    width = max(len(str(text)) for text in shown["validation"])
    table = shown.to_string(index=False, justify="left", formatters={"validation": lambda text: f"{text:<{width}}"})
    print("\n".join(line.rstrip() for line in table.splitlines()))
    return 0
