"""``lorakit lora train --adapter manual|kohya_ss|native`` and ``lorakit lora setup``.

``lora train`` belongs to :mod:`lorakit.cli.lora` (the native trainer). This module adds the adapter options
to that parser and puts a dispatcher in front of its command: ``--adapter native`` (the default) runs the
native trainer exactly as before, ``manual`` records a run trained elsewhere, ``kohya_ss`` trains with kohya's
sd-scripts. It must be registered after ``lora`` (``COMMAND_MODULES`` order), because it extends that parser.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable

from ..errors import ConfigError
from .common import workspace
from .lora import lora_subcommands

ADAPTERS = ("native", "manual", "kohya_ss")
# The lora train options that only some adapters take: dest -> (flag, adapters that take it).
ADAPTER_OPTIONS = {
    "preset": ("--preset", ("native",)), "resume": ("--resume", ("native",)), "cpu": ("--cpu", ("native",)),
    "no_progress": ("--no-progress", ("native",)), "save_state_every": ("--save-state-every", ("native",)),
    "force": ("--force", ("native", "kohya_ss")),
    **{dest: (flag, ("manual",)) for dest, flag in (
        ("weights_kind", "--weights-kind"), ("weights_base", "--weights-base"), ("weights_path", "--weights-path"),
        ("weights_uri", "--weights-uri"), ("sha256", "--sha256"))},
    **{dest: (flag, ("kohya_ss",)) for dest, flag in (
        ("run", "--run"), ("adapter_args", "--adapter-args"), ("accelerate_config", "--accelerate-config"))},
}
# The setting flags lora train has, by the names the adapters take them.
SETTING_FLAGS = ("resolution", "steps", "epochs", "rank", "alpha", "lr", "batch", "seed", "mixed_precision",
                 "save_every_n_epochs")

TRAIN_EPILOG = """\
adapters:
  native    train here with lorakit's trainer (default)
  manual    record weights trained elsewhere: --weights-kind K [--weights-base B] [--weights-path P]
            [--weights-uri U] [--sha256 H]; --config/--config-file (JSON) and the flags are recorded as given
  kohya_ss  train with kohya's sd-scripts (install it first: lorakit lora setup); needs --run (or --dry-run);
            --config-file is a kohya options file (TOML, or JSON), --adapter-args a JSON array of strings
            passed last, --accelerate-config runs it with `accelerate launch --config_file ...`
"""


def register(subparsers, common) -> None:
    lora = lora_subcommands(subparsers, common)

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

    train = lora.choices.get("train")
    if train is None:
        raise RuntimeError("lorakit.cli.adapters extends `lora train`: register it after lorakit.cli.lora")
    add_adapter_arguments(train)
    train.set_defaults(func=adapter_dispatch(train.get_default("func")))


def add_adapter_arguments(train: argparse.ArgumentParser) -> None:
    """The adapter options of ``lora train``."""
    train.formatter_class = argparse.RawDescriptionHelpFormatter
    train.epilog = (train.epilog + "\n" if train.epilog else "") + TRAIN_EPILOG
    train.add_argument("--adapter", choices=ADAPTERS, default="native",
                       help="what trains the release (default: native); see below")
    manual = train.add_argument_group("--adapter manual (weights trained elsewhere)")
    manual.add_argument("--weights-kind", choices=("repo_relative", "config_relative", "absolute", "external"))
    manual.add_argument("--weights-base", choices=("modelsRoot", "checkpointsRoot", "lorasRoot"),
                        help="root of a config_relative path")
    manual.add_argument("--weights-path", help="path of the weights file (relative to the base / repo, or absolute)")
    manual.add_argument("--weights-uri", help="where external weights can be fetched")
    manual.add_argument("--sha256", help="sha256 of the weights (checked when the file is on this machine)")
    kohya = train.add_argument_group("--adapter kohya_ss")
    kohya.add_argument("--run", action="store_true", help="run kohya's training script now")
    kohya.add_argument("--adapter-args", help='extra script arguments as a JSON array of strings, e.g. '
                                              '\'["--output_name","my_lora"]\'')
    kohya.add_argument("--accelerate-config", help="accelerate config file: run with `accelerate launch`")


def misused_options(args: argparse.Namespace) -> list[str]:
    """The options given that the chosen adapter does not take (pure; the names as typed)."""
    return [flag for dest, (flag, adapters) in ADAPTER_OPTIONS.items()
            if args.adapter not in adapters and getattr(args, dest, None) not in (None, False)]


def adapter_dispatch(native: Callable[[argparse.Namespace], int] | None) -> Callable[[argparse.Namespace], int]:
    """The ``lora train`` command: ``native`` for ``--adapter native``, the adapters here otherwise."""

    def cmd_train(args: argparse.Namespace) -> int:
        wrong = misused_options(args)
        if wrong:
            raise ConfigError(f"{', '.join(wrong)} cannot be used with --adapter {args.adapter}")
        if args.adapter == "manual":
            return cmd_train_manual(args)
        if args.adapter == "kohya_ss":
            return cmd_train_kohya(args)
        if native is None:
            raise ConfigError("the native trainer is not available in this build")
        return native(args)

    return cmd_train


def setting_flags(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name, None) for name in SETTING_FLAGS}


def cmd_train_manual(args: argparse.Namespace) -> int:
    from ..train.manual import record_manual_run

    if args.dataset is None:
        raise ConfigError("--adapter manual needs --dataset (the dataset the weights were trained on)")
    if args.weights_kind is None:
        raise ConfigError("--adapter manual needs --weights-kind (and --weights-path / --weights-uri)")
    run = record_manual_run(
        workspace(args), args.lora, args.dataset, weights_kind=args.weights_kind, weights_base=args.weights_base,
        weights_path=args.weights_path, weights_uri=args.weights_uri, sha256=args.sha256, project=args.project,
        scope=args.scope, release_id=args.release, set_active=args.set_active, notes=args.notes,
        config=args.config, config_file=args.config_file, flags=setting_flags(args), dry_run=args.dry_run,
    )
    for warning in run.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        print(json.dumps(run.release, indent=2))
        print("dry run: nothing recorded")
        return 0
    _print_recorded(run, args.set_active)
    return 0


def cmd_train_kohya(args: argparse.Namespace) -> int:
    from ..train.kohya import train_kohya

    if args.dataset is None:
        raise ConfigError("--adapter kohya_ss needs --dataset")
    if not (args.run or args.dry_run):
        raise ConfigError("--adapter kohya_ss trains only with --run (or shows what it would run with --dry-run)")
    result = train_kohya(
        workspace(args), args.lora, args.dataset, project=args.project, scope=args.scope, release_id=args.release,
        set_active=args.set_active, notes=args.notes, config_file=args.config_file, config=args.config,
        flags=setting_flags(args), adapter_args=args.adapter_args, accelerate_config=args.accelerate_config,
        force=args.force, dry_run=args.dry_run,
    )
    if result.dry_run:
        print(result.description, end="")
        return 0
    assert result.recorded is not None
    _print_recorded(result.recorded, args.set_active)
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


def cmd_setup(args: argparse.Namespace) -> int:
    from ..train.kohya import DEFAULT_REF, DEFAULT_REPO, DEFAULT_TORCH_PACKAGES, setup_kohya

    packages = DEFAULT_TORCH_PACKAGES if args.torch_packages is None else tuple(shlex.split(args.torch_packages))
    result = setup_kohya(args.repo or DEFAULT_REPO, args.ref or DEFAULT_REF, python=args.python,
                         torch_packages=packages, force=args.force)
    if result.changed:
        print(f"log: {result.log}")
    return 0
