"""``lorakit lora create|train|setup|presets``: LoRA records and training, with every adapter.

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

from ..errors import ConfigError
from ..loras import release_validation, validation_summary
from ..train.settings import add_setting_flags, flag_values
from .common import split_list, workspace

TRAIN_EPILOG = """\
adapters:
  native    train here with lorakit's trainer (default)
  manual    record weights trained elsewhere: --weights-kind K [--weights-base B] [--weights-path P]
            [--weights-uri U] [--sha256 H]; --config/--config-file (JSON) and the flags are recorded as given
  kohya_ss  train with kohya's sd-scripts (install it first: lorakit lora setup); needs --run (or --dry-run);
            --config-file is a kohya options file (TOML, or JSON), --adapter-args a JSON array of strings
            passed last, --accelerate-config runs it with `accelerate launch --config_file ...`
"""
# The lora train options only some adapters take, beyond the library's (lorakit.train.ADAPTER_OPTIONS):
# dest -> (flag, adapters).
CLI_ONLY_OPTIONS = {"run": ("--run", ("kohya_ss",)), "no_progress": ("--no-progress", ("native",))}


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

    add_train_parser(lora, common)
    add_setup_parser(lora, common)

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


# ---- lora train ----------------------------------------------------------------------------------------------
def add_train_parser(lora: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``lorakit lora train``: the options every adapter takes, the settings, then each adapter's own."""
    p = lora.add_parser("train", parents=[common], help="train a release on a dataset (recorded as a candidate)",
                        description="Config precedence: --preset < --config-file < --config < the flags below.",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=TRAIN_EPILOG)
    p.add_argument("--lora", required=True, help="LoRA id")
    p.add_argument("--dataset", help="dataset id (project, then shared) or a manifest file path")
    p.add_argument("--project", help="project of the LoRA and/or the dataset")
    p.add_argument("--scope", choices=("project", "baseline"), help="where the LoRA record is (default: search)")
    p.add_argument("--release", dest="release_id", metavar="RELEASE", help="release id (default: a new ULID)")
    p.add_argument("--set-active", action="store_true", help="make the new release the LoRA's active release")
    p.add_argument("--notes", help="release notes")
    p.add_argument("--adapter", choices=("native", "manual", "kohya_ss"), default="native",
                   help="what trains the release (default: native); see below")
    p.add_argument("--preset", help="a training preset (see `lorakit lora presets`)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--config", help="training settings as a JSON object")
    group.add_argument("--config-file", help="training settings in a JSON file (kohya/diffusers names accepted)")
    add_setting_flags(p)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="RELEASE",
                   help="continue the latest interrupted run of this LoRA (or the named one)")
    p.add_argument("--force", action="store_true", help="train on a dataset (or preset) made for another checkpoint")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; train nothing")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    manual = p.add_argument_group("--adapter manual (weights trained elsewhere)")
    manual.add_argument("--weights-kind", choices=("repo_relative", "config_relative", "absolute", "external"))
    manual.add_argument("--weights-base", choices=("modelsRoot", "checkpointsRoot", "lorasRoot"),
                        help="root of a config_relative path")
    manual.add_argument("--weights-path", help="path of the weights file (relative to the base / repo, or absolute)")
    manual.add_argument("--weights-uri", help="where external weights can be fetched")
    manual.add_argument("--sha256", help="sha256 of the weights (checked when the file is on this machine)")
    kohya = p.add_argument_group("--adapter kohya_ss")
    kohya.add_argument("--run", action="store_true", help="run kohya's training script now")
    kohya.add_argument("--adapter-args", help='extra script arguments as a JSON array of strings, e.g. '
                                              '\'["--output_name","my_lora"]\'')
    kohya.add_argument("--accelerate-config", help="accelerate config file: run with `accelerate launch`")
    p.set_defaults(func=cmd_train)


def misused_flags(args: argparse.Namespace) -> list[str]:
    """The flags given that ``--adapter`` does not take, as typed (pure)."""
    from ..train.adapters import ADAPTER_OPTIONS, misused_options
    from ..train.settings import BY_NAME

    options = {name: getattr(args, name, None) for name in ADAPTER_OPTIONS}
    wrong = [str(BY_NAME[name].flag) if name in BY_NAME else f"--{name.replace('_', '-')}"
             for name in misused_options(args.adapter, options, flag_values(args))]
    return wrong + [flag for dest, (flag, adapters) in CLI_ONLY_OPTIONS.items()
                    if args.adapter not in adapters and getattr(args, dest, False)]


def cmd_train(args: argparse.Namespace) -> int:
    from ..train import train_lora

    wrong = misused_flags(args)
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} cannot be used with --adapter {args.adapter}")
    common = {"project": args.project, "scope": args.scope, "release_id": args.release_id,
              "set_active": args.set_active, "notes": args.notes, "config": args.config,
              "config_file": args.config_file, "overrides": flag_values(args), "force": args.force,
              "dry_run": args.dry_run}
    if args.adapter == "native":
        result = train_lora(workspace(args), args.lora, args.dataset, preset=args.preset, resume=args.resume,
                            cpu=args.cpu, progress=not args.no_progress, **common)
        return _print_native(result, args)
    if args.dataset is None:
        raise ConfigError(f"--adapter {args.adapter} needs --dataset (the dataset the weights are trained on)")
    if args.adapter == "manual":
        if args.weights_kind is None:
            raise ConfigError("--adapter manual needs --weights-kind (and --weights-path / --weights-uri)")
        run = train_lora(workspace(args), args.lora, args.dataset, adapter="manual", weights_kind=args.weights_kind,
                         weights_base=args.weights_base, weights_path=args.weights_path,
                         weights_uri=args.weights_uri, sha256=args.sha256, **common)
        for warning in run.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if args.dry_run:
            print(json.dumps(run.release, indent=2))
            print("dry run: nothing recorded")
            return 0
        _print_recorded(run, args.set_active)
        return 0
    if not (args.run or args.dry_run):
        raise ConfigError("--adapter kohya_ss trains only with --run (or shows what it would run with --dry-run)")
    result = train_lora(workspace(args), args.lora, args.dataset, adapter="kohya_ss", adapter_args=args.adapter_args,
                        accelerate_config=args.accelerate_config, **common)
    if result.dry_run:
        print(result.description, end="")
        return 0
    _print_recorded(result.recorded, args.set_active)
    return 0


def _print_native(result, args: argparse.Namespace) -> int:
    if args.dry_run:
        print(json.dumps(result.plan, indent=2))
        return 0
    if result.release is None:  # not the main process of a distributed run
        return 0
    print(f"release {result.release_id} of LoRA {result.lora_id}: {result.steps} steps, final loss "
          f"{result.final_loss:.4f}, {result.duration_s:.1f} s")
    print(f"weights {result.weights_path} (sha256 {result.release['sha256']})")
    validation = release_validation(result.release)
    if validation is not None:
        print(validation_summary(validation))
    print(f"recorded as a candidate{' and set active' if args.set_active else ''}; loss log "
          f"{result.output_dir / 'train_log.csv'}")
    return 0


def _print_recorded(run, set_active: bool) -> None:
    release = run.release
    where = f"project {run.lora_project}" if run.lora_project else "shared"
    print(f"recorded release {release['id']} of LoRA {run.lora['id']} ({where}) as a candidate"
          f"{' and set it active' if set_active else ''}")
    weights = release.get("weights", {})
    shown = run.weights_path or weights.get("path") or weights.get("uri")
    print(f"weights {shown}" + (f" (sha256 {release['sha256']})" if release.get("sha256") else " (no sha256)"))
    meta = release["training"].get("weightsMetadata")
    if meta:
        print("from the file's metadata: " + ", ".join(f"{k} {v}" for k, v in meta.items()))


# ---- lora setup ----------------------------------------------------------------------------------------------
def add_setup_parser(lora: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = lora.add_parser("setup", parents=[common], help="install kohya's sd-scripts into tools/lora/kohya_ss/",
                        description="Clone kohya's sd-scripts at a pinned ref into tools/lora/kohya_ss/ (or "
                                    "LORAKIT_TOOLS_ROOT/kohya_ss/) with its own virtual environment and requirements. "
                                    "Needs network access. A second run changes nothing unless the ref changed.")
    p.add_argument("--repo", help="Git URL of sd-scripts (default: kohya-ss/sd-scripts on GitHub)")
    p.add_argument("--ref", help="tag, branch or commit to install (default: the release lorakit pins)")
    p.add_argument("--python", help="interpreter for the venv (default: the one running lorakit)")
    p.add_argument("--torch", dest="torch_packages", default=None,
                   help="what to pip-install before the requirements, as pip arguments "
                        "(default: the torch and torchvision versions the pinned release asks for; '' for none); "
                        "e.g. \"torch==2.1.2 torchvision==0.16.2 --index-url https://download.pytorch.org/whl/cu118\"")
    p.add_argument("--force", action="store_true", help="reinstall even when the install is current")
    p.set_defaults(func=cmd_setup)


def cmd_setup(args: argparse.Namespace) -> int:
    import shlex

    from ..train.kohya import DEFAULT_REF, DEFAULT_REPO, DEFAULT_TORCH_PACKAGES, setup_kohya

    packages = DEFAULT_TORCH_PACKAGES if args.torch_packages is None else tuple(shlex.split(args.torch_packages))
    result = setup_kohya(args.repo or DEFAULT_REPO, args.ref or DEFAULT_REF, python=args.python,
                         torch_packages=packages, force=args.force)
    if result.changed:
        print(f"log: {result.log}")
    return 0
