"""``lorakit lora create|train|presets``: LoRA records and the native trainer.

Other modules add their own ``lorakit lora ...`` sub-commands to the same group: in their ``register``,
call :func:`lora_subcommands` (idempotent: it creates the ``lora`` group the first time and returns the
existing one after that, whichever module registers first) and ``add_parser`` on what it returns::

    from .lora import lora_subcommands

    def register(subparsers, common):
        p = lora_subcommands(subparsers, common).add_parser("eval", parents=[common], help="...")
        p.set_defaults(func=cmd_eval)
"""

from __future__ import annotations

import argparse
import json
import sys

from .common import split_list, workspace


def lora_subcommands(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The sub-command group of ``lorakit lora`` (created on first use, then shared)."""
    parser = subparsers.choices.get("lora")
    if parser is None:
        parser = subparsers.add_parser("lora", help="LoRA records, training, releases, the review gate and selection")
        return parser.add_subparsers(dest="lora_command", required=True, metavar="LORA_COMMAND")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return parser.add_subparsers(dest="lora_command", required=True, metavar="LORA_COMMAND")


def register(subparsers, common) -> None:
    lora = lora_subcommands(subparsers, common)

    p = lora.add_parser("create", parents=[common], help="create a LoRA record (no releases yet)")
    p.add_argument("--lora", help="LoRA id (default: a new ULID)")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--scope", required=True, choices=("project", "baseline"))
    p.add_argument("--project", help="project id (required for --scope project)")
    p.add_argument("--checkpoint", required=True, help="checkpoint id the LoRA is trained for")
    p.add_argument("--asset-types", required=True, action="append", help="asset types it serves: a,b or repeated")
    p.set_defaults(func=cmd_create)

    p = lora.add_parser("train", parents=[common], help="train a release on a dataset (recorded as a candidate)",
                        description="Config precedence: --preset < --config-file < --config < the flags below.")
    p.add_argument("--lora", required=True, help="LoRA id")
    p.add_argument("--dataset", help="dataset id (project, then shared) or a manifest file path")
    p.add_argument("--project", help="project of the LoRA and/or the dataset")
    p.add_argument("--scope", choices=("project", "baseline"), help="where the LoRA record is (default: search)")
    p.add_argument("--release", help="release id (default: a new ULID)")
    p.add_argument("--set-active", action="store_true", help="make the new release the LoRA's active release")
    p.add_argument("--notes", help="release notes")
    p.add_argument("--preset", help="a training preset (see `lorakit lora presets`)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--config", help="training settings as a JSON object")
    group.add_argument("--config-file", help="training settings in a JSON file (kohya/diffusers names accepted)")
    flags = p.add_argument_group("settings (override the preset and config)")
    flags.add_argument("--resolution", type=int)
    flags.add_argument("--steps", type=int, help="optimizer steps (default: epochs x steps per epoch)")
    flags.add_argument("--epochs", type=int)
    flags.add_argument("--rank", type=int)
    flags.add_argument("--alpha", type=float)
    flags.add_argument("--lr", type=float)
    flags.add_argument("--batch", type=int, help="batch size per process")
    flags.add_argument("--seed", type=int)
    flags.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"))
    flags.add_argument("--save-every-n-epochs", type=int)
    flags.add_argument("--save-state-every", type=int, help="steps between resumable states")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RELEASE",
                   help="continue the latest interrupted run of this LoRA (or the named one)")
    p.add_argument("--force", action="store_true", help="train on a dataset (or preset) made for another checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; train nothing")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = lora.add_parser("presets", parents=[common], help="list the training presets")
    p.add_argument("--json", action="store_true", help="print the presets as JSON")
    p.set_defaults(func=cmd_presets)


def cmd_create(args) -> int:
    from ..loras import create_lora

    record = create_lora(workspace(args), args.lora, name=args.name, scope=args.scope, project=args.project,
                         checkpoint=args.checkpoint, asset_types=split_list(args.asset_types))
    where = f"project {args.project}" if args.scope == "project" else "shared"
    print(f"created LoRA {record['id']} ({where}, checkpoint {record['checkpointId']}, "
          f"asset types {', '.join(record['assetTypes'])})")
    return 0


def cmd_train(args) -> int:
    from ..train import train_lora

    overrides = {
        "resolution": args.resolution, "steps": args.steps, "epochs": args.epochs, "rank": args.rank,
        "alpha": args.alpha, "lr": args.lr, "batch_size": args.batch, "seed": args.seed,
        "mixed_precision": args.mixed_precision, "save_every_n_epochs": args.save_every_n_epochs,
        "save_state_every": args.save_state_every,
    }
    result = train_lora(
        workspace(args), args.lora, args.dataset, project=args.project, scope=args.scope, release=args.release,
        set_active=args.set_active, notes=args.notes, preset=args.preset, config=args.config,
        config_file=args.config_file, overrides=overrides, force=args.force, dry_run=args.dry_run,
        resume=args.resume, cpu=args.cpu, progress=not args.no_progress,
    )
    if args.dry_run:
        print(json.dumps(result.plan, indent=2))
        return 0
    if result.release is None:  # not the main process of a distributed run
        return 0
    print(f"release {result.release_id} of LoRA {result.lora_id}: {result.steps} steps, final loss "
          f"{result.final_loss:.4f}, {result.duration_s:.1f} s")
    print(f"weights {result.weights_path} (sha256 {result.release['sha256']})")
    print(f"recorded as a candidate{' and set active' if args.set_active else ''}; loss log "
          f"{result.output_dir / 'train_log.csv'}")
    return 0


def cmd_presets(args) -> int:
    from ..train import list_presets

    presets = list_presets()
    if args.json:
        json.dump(presets, sys.stdout, indent=2)
        print()
        return 0
    width = max(len(name) for name in presets)
    for name, preset in presets.items():
        print(f"{name:<{width}}  {preset.get('family') or 'any':<4}  {preset['description']}")
    return 0
