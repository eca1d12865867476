"""``lorakit checkpoint add | list | verify | make-tiny``: thin wrappers over :mod:`lorakit.models`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import ROOT_NAMES, resolve_weights
from ..errors import LorakitError
from ..families import NAMES, PREDICTIONS
from ..models import add_checkpoint, checkpoint_objective, list_checkpoints, make_tiny_checkpoint, objective_label
from .common import split_list, workspace


def _objective_flags(parser, told: str) -> None:
    parser.add_argument("--prediction", choices=PREDICTIONS, default=None,
                        help="what the denoiser predicts: epsilon (most SD1.5/SDXL models) or v (NoobAI-XL v-pred, "
                             f"the Illustrious v-pred models); {told}")
    parser.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=None,
                        help="trained on a noise schedule rescaled to zero terminal SNR (v-prediction only); "
                             f"{told}")


def register(subparsers, common) -> None:
    checkpoint = subparsers.add_parser("checkpoint", help="register, list, verify and build base checkpoints")
    commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True, metavar="SUBCOMMAND")

    a = commands.add_parser("add", parents=[common], help="register a checkpoint (diffusers folder or single file)")
    a.add_argument("checkpoint_id", metavar="ID")
    a.add_argument("--family", choices=NAMES,
                   help="model family (default: what the files say: a folder's model_index.json, a single "
                        "file's tensor names)")
    a.add_argument("--path", required=True, metavar="P",
                   help="weights folder or file under --base: a path from the current folder when it exists "
                        "there, else relative to --base")
    a.add_argument("--base", choices=ROOT_NAMES, default="checkpointsRoot",
                   help="root from config/local.json that --path is relative to (default: checkpointsRoot)")
    a.add_argument("--name", help="display name (default: the id, or the current name)")
    a.add_argument("--asset-types", action="append", metavar="T[,T]",
                   help="asset types this checkpoint is meant for (repeatable; default: keep / none)")
    a.add_argument("--vae", metavar="P", help="a separate VAE (folder or single file), relative to --vae-base")
    a.add_argument("--vae-base", choices=ROOT_NAMES, help="root for --vae (default: --base)")
    a.add_argument("--config", metavar="DIR",
                   help="diffusers config folder for a single file with a non-default architecture, relative to "
                        "--base (default: <file>.config/ beside it, else the shipped SD1.5/SDXL configs)")
    a.add_argument("--allow-pickle", action="store_true",
                   help="accept .ckpt/.pt/.bin weights (pickle files can run code: only if you trust the source)")
    a.add_argument("--absolute", action="store_true",
                   help="store absolute paths (machine-specific) instead of paths relative to --base")
    _objective_flags(a, "default: the record's when it names the same files, else what the files say (a single "
                        "file's v_pred/ztsnr keys, a folder's scheduler config), else epsilon")
    a.set_defaults(func=cmd_add)

    ls = commands.add_parser("list", parents=[common], help="list registered checkpoints")
    ls.add_argument("--json", action="store_true", help="print the records as JSON")
    ls.set_defaults(func=cmd_list)

    v = commands.add_parser("verify", parents=[common],
                            help="load a checkpoint offline, report its components and record its weights hash")
    v.add_argument("checkpoint_id", metavar="ID")
    v.add_argument("--allow-pickle", action="store_true", help="accept pickle weights for this run")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)

    t = commands.add_parser("make-tiny", parents=[common],
                            help="build the tiny random-weight checkpoint offline and register it")
    t.add_argument("checkpoint_id", metavar="ID")
    t.add_argument("--family", required=True, choices=NAMES, help="model family")
    t.add_argument("--seed", type=int, default=0, help="weights seed; same seed, same bytes (default: 0)")
    t.add_argument("--name", help="display name")
    t.add_argument("--asset-types", action="append", metavar="T[,T]",
                   help="asset types (default: keep, or those of the project catalogs)")
    _objective_flags(t, "default: epsilon, no zero terminal SNR")
    t.set_defaults(func=cmd_make_tiny)


def _asset_types(args) -> list[str] | None:
    return split_list(args.asset_types) if args.asset_types else None


def cmd_add(args) -> int:
    ws = workspace(args)
    record = add_checkpoint(
        ws, args.checkpoint_id, args.family, args.path, base=args.base, name=args.name,
        asset_types=_asset_types(args), vae_path=args.vae, vae_base=args.vae_base, config_path=args.config,
        allow_pickle=args.allow_pickle, absolute=args.absolute, prediction=args.prediction,
        zero_terminal_snr=args.zero_terminal_snr,
    )
    print(f"registered checkpoint {record['id']} ({record['family']}, {_objective(ws, record)}) -> "
          f"{_where(ws, record)}")
    print(f"check it loads with: lorakit checkpoint verify {record['id']}")
    return 0


def _where(ws, record: dict) -> str:
    ref = record.get("weights")
    if not isinstance(ref, dict):
        return "(no weights)"
    try:
        return str(resolve_weights(ref, ws.config, must_exist=False))
    except LorakitError as exc:
        return f"(unresolvable: {exc})"


def _objective(ws, record: dict) -> str:
    """``epsilon``, ``v`` or ``v+ztsnr``; ``?`` for a record too broken to say (``validate`` names the problem)."""
    try:
        return objective_label(checkpoint_objective(ws, record))
    except LorakitError:
        return "?"


def cmd_list(args) -> int:
    ws = workspace(args)
    records = list_checkpoints(ws)
    if args.json:
        # The objective beside each record: what training uses, also for records from before its fields.
        print(json.dumps([{**record, "objective": _objective(ws, record)} for record in records], indent=2,
                         ensure_ascii=False))
        return 0
    if not records:
        print(f"no checkpoints under {ws.store.folder('checkpoint')}; add one with `lorakit checkpoint add` "
              "or `lorakit checkpoint make-tiny`")
        return 0
    for record in records:
        path = _where(ws, record)
        present = "ok" if not path.startswith("(") and Path(path).exists() else "MISSING"
        sha = (record.get("weights") or {}).get("sha256")
        print(f"{record['id']:<24} {record.get('family', '?'):<5} {_objective(ws, record):<9} {present:<7} {path}"
              f"{'  sha256 ' + sha[:12] if sha else ''}  {record.get('name', '')}")
    return 0


def cmd_verify(args) -> int:
    ws = workspace(args)
    from ..models import verify_checkpoint  # loads torch: only for this command

    report = verify_checkpoint(ws, args.checkpoint_id, allow_pickle=True if args.allow_pickle else None)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"checkpoint {report['id']}: {report['family']} {report['pipeline']} ({report['format']}) at {report['path']}")
    print(f"  objective {report['objective']}")
    for name, comp in report["components"].items():
        params = f"{comp['parameters']:>14,} params  {comp['dtype']}" if "parameters" in comp else ""
        print(f"  {name:<15} {comp['class']:<30} {params}")
    print(f"  total {report['parameters']:,} parameters, dtype {report['dtype']}")
    print(f"  weights sha256 {report['sha256']} (recorded on the checkpoint)")
    if "vaeSha256" in report:
        print(f"  vae {report['vaePath']} sha256 {report['vaeSha256']}")
    return 0


def cmd_make_tiny(args) -> int:
    ws = workspace(args)
    record = make_tiny_checkpoint(ws, args.checkpoint_id, args.family, seed=args.seed,
                                  asset_types=_asset_types(args), name=args.name,
                                  prediction=args.prediction or "epsilon",
                                  zero_terminal_snr=bool(args.zero_terminal_snr))
    print(f"tiny {record['family']} checkpoint {record['id']} (seed {args.seed}, {_objective(ws, record)}) at "
          f"{_where(ws, record)}")
    print(f"weights sha256 {record['weights']['sha256']}")
    return 0
