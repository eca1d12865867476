"""``lorakit lora eval|eval-grid|cleanup-eval|normalize-evals``, ``lorakit worker`` and ``lorakit eval grid-image``.

Each command is a thin wrapper over the function of the same name in ``lorakit.evals`` / ``lorakit.worker``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import LorakitError
from ..evals import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_SEEDS,
    DEFAULT_STRENGTHS,
    cleanup_eval,
    create_eval,
    create_eval_grid,
    find_eval,
    normalize_evals,
    parse_prompts,
    save_contact_sheet,
)
from ..loras import validation_summary
from .common import split_list, workspace
from .lora import lora_subcommands


def register(subparsers, common) -> None:
    lora = lora_subcommands(subparsers, common)
    add_lora_eval_commands(lora, common)

    p = subparsers.add_parser("worker", parents=[common], help="render queued eval-grid jobs (warm pipelines)")
    p.add_argument("--project", help="only this project's jobs (default: every project)")
    p.add_argument("--once", action="store_true", help="stop when no job is left to claim (default: keep polling)")
    p.add_argument("--max-jobs", type=int, help="stop after this many jobs")
    p.add_argument("--lease-seconds", type=float, default=120.0,
                   help="how long a claim holds without a heartbeat before another worker may take the job (120)")
    p.add_argument("--poll-seconds", type=float, default=2.0, help="wait between queue scans when idle (2)")
    p.add_argument("--device", help="torch device (default: cuda:<LOCAL_RANK> when a GPU is there, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on CUDA, float32 elsewhere)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's, or cores / local processes under torchrun)")
    p.set_defaults(func=cmd_worker)

    p = subparsers.add_parser("eval", help="look at eval grids")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    p = evals.add_parser("grid-image", parents=[common], help="compose an eval's images into one labelled PNG")
    p.add_argument("eval_id", metavar="EVAL", help="eval id")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--project", help="project of the eval (default: search shared, then every project)")
    p.add_argument("--cell-size", type=int, help="pixels per image on the sheet (default: max(image size, 160))")
    p.set_defaults(func=cmd_grid_image)


def add_lora_eval_commands(lora: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    def prompts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--prompts", help='prompts separated by "|" (default: canonical prompts of the asset types)')
        p.add_argument("--prompts-file", help="a file of prompts, one per line")

    p = lora.add_parser("eval", parents=[common], help="create an eval record for a release and link it")
    p.add_argument("--lora", required=True, help="LoRA id")
    p.add_argument("--release", required=True, help="release id")
    p.add_argument("--project", help="project of the LoRA (a project LoRA), or whose catalog overrides prompts")
    p.add_argument("--scope", choices=["project", "baseline"], help="where the LoRA is (default: project, then shared)")
    prompts(p)
    p.add_argument("--eval", dest="eval_id", help="eval id (default: a new ULID)")
    p.add_argument("--notes", help="notes stored on the eval")
    p.add_argument("--dry-run", action="store_true", help="print the eval without writing anything")
    p.set_defaults(func=cmd_eval)

    p = lora.add_parser("eval-grid", parents=[common], help="create an eval grid: eval record + one job per image")
    p.add_argument("--project", required=True, help="project whose job queue renders the grid")
    p.add_argument("--lora", required=True, help="LoRA id")
    p.add_argument("--release", required=True, help="release id")
    p.add_argument("--scope", choices=["project", "baseline"], help="where the LoRA is (default: project, then shared)")
    prompts(p)
    p.add_argument("--checkpoint", help="checkpoint id (default: the LoRA's)")
    p.add_argument("--asset-type", help="asset type for prompt templates and canonical prompts")
    p.add_argument("--width", type=int, help="image width (default: the checkpoint's)")
    p.add_argument("--height", type=int, help="image height (default: the checkpoint's)")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)), help="comma-separated seeds (1,2,3)")
    p.add_argument("--strengths", default=",".join(f"{s:g}" for s in DEFAULT_STRENGTHS),
                   help="comma-separated LoRA strengths; 0 (the base checkpoint) is always added (0,0.5,1)")
    p.add_argument("--compare-release", help="another release (e.g. the active one) rendered as extra rows")
    p.add_argument("--steps", type=int, help="inference steps (default: the checkpoint's)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the checkpoint's)")
    p.add_argument("--guidance-rescale", type=float,
                   help="guidance rescale, 0 to 1, for zero-terminal-SNR (v-prediction) checkpoints (default: the "
                        "checkpoint's, else 0.7)")
    p.add_argument("--eval", dest="eval_id", help="eval id (default: a new ULID)")
    p.add_argument("--max-attempts", type=int, default=3, help="claims per job before it fails (3)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"cells of a row rendered in one pipeline call ({DEFAULT_BATCH_SIZE}; 1: each alone, "
                        "for small GPUs)")
    p.add_argument("--auto-cleanup", action="store_true", help="remove the grid's jobs once the eval is complete")
    p.add_argument("--dry-run", action="store_true", help="print the plan without writing anything")
    p.set_defaults(func=cmd_eval_grid)

    p = lora.add_parser("cleanup-eval", parents=[common], help="remove an eval grid's jobs and temporary files")
    p.add_argument("--project", required=True, help="project whose queue holds the grid's jobs")
    p.add_argument("--eval", dest="eval_id", required=True, help="eval id")
    p.add_argument("--images", action="store_true", help="also remove the eval's images")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.set_defaults(func=cmd_cleanup_eval)

    p = lora.add_parser("normalize-evals", parents=[common], help="recompute eval statuses from their outputs")
    p.add_argument("--scope", choices=["all", "project", "baseline"], default="all", help="which evals (all)")
    p.add_argument("--project", help="only this project's evals")
    p.add_argument("--dry-run", action="store_true", help="report without writing")
    p.set_defaults(func=cmd_normalize_evals)


def _prompts(args) -> list[str]:
    file_text = None
    if args.prompts_file:
        try:
            file_text = Path(args.prompts_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise LorakitError(f"--prompts-file {args.prompts_file}: {exc.strerror}") from None
    return parse_prompts(args.prompts, file_text)


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(part) for part in split_list(text)]
    except ValueError:
        raise LorakitError(f"{flag}: expected comma-separated numbers, got {text!r}") from None


def cmd_eval(args) -> int:
    ws = workspace(args)
    record = create_eval(ws, args.lora, args.release, project=args.project, scope=args.scope, prompts=_prompts(args),
                         eval_id=args.eval_id, notes=args.notes, dry_run=args.dry_run)
    verb = "would create" if args.dry_run else "created"
    print(f"{verb} eval {record['id']} ({record['status']}) for LoRA {record['loraId']} release "
          f"{record['releaseId']} with {len(record['prompts'])} prompt(s)")
    for prompt in record["prompts"]:
        print(f"  - {prompt}")
    return 0


def cmd_eval_grid(args) -> int:
    ws = workspace(args)
    plan = create_eval_grid(
        ws, args.project, args.lora, args.release, prompts=_prompts(args), checkpoint_id=args.checkpoint,
        asset_type=args.asset_type, width=args.width, height=args.height,
        seeds=_numbers(args.seeds, int, "--seeds"), strengths=_numbers(args.strengths, float, "--strengths"),
        compare_release=args.compare_release, steps=args.steps, cfg=args.cfg,
        guidance_rescale=args.guidance_rescale, scope=args.scope,
        eval_id=args.eval_id, auto_cleanup=args.auto_cleanup, max_attempts=args.max_attempts,
        batch_size=args.batch_size, dry_run=args.dry_run,
    )
    grid = plan.eval["grid"]
    verb = "would create" if plan.dry_run else "created"
    rescale = f", guidance rescale {grid['guidanceRescale']:g}" if "guidanceRescale" in grid else ""
    print(f"{verb} eval {plan.eval['id']} at {plan.eval_path} and {len(plan.jobs)} queued job(s) in project "
          f"{plan.jobs_project}: {len(plan.eval['prompts'])} prompt(s) x {len(grid['seeds'])} seed(s) x "
          f"{len(plan.jobs) // max(1, len(plan.eval['prompts']) * len(grid['seeds']))} row(s) "
          f"(releases {', '.join(grid['releaseIds'])}; strengths {', '.join(f'{s:g}' for s in grid['strengths'])}); "
          f"{grid['width']}x{grid['height']}, {grid['steps']} steps, cfg {grid['cfg']:g}{rescale}, {grid['scheduler']}; "
          f"{len({j['input']['batch']['id'] for j in plan.jobs})} batch(es) of up to {grid['batchSize']}")
    if plan.dry_run:
        for job in plan.jobs:
            s = job["input"]["settings"]
            print(f"  {job['input']['cellKey']}: {s['positivePrompt']!r} seed {s['seed']} strength {s['strength']:g} "
                  f"(batch {job['input']['batch']['id']})")
    else:
        print(f"render with: lorakit worker --project {plan.jobs_project}")
    return 0


def cmd_cleanup_eval(args) -> int:
    ws = workspace(args)
    report = cleanup_eval(ws, args.project, args.eval_id, images=args.images, dry_run=args.dry_run)
    verb = "would remove" if report.dry_run else "removed"
    print(f"{verb} {len(report.jobs)} job(s), {len(report.specs)} spec(s), {len(report.temp_files)} temporary "
          f"file(s) and {len(report.images)} image(s) of eval {args.eval_id}")
    for path in report.removed:
        print(f"  {path}")
    if report.running_jobs:
        print(f"warning: {len(report.running_jobs)} of them were running ({', '.join(report.running_jobs)}); "
              "their workers will find them gone")
    return 0


def cmd_normalize_evals(args) -> int:
    ws = workspace(args)
    changes = normalize_evals(ws, args.scope, args.project, dry_run=args.dry_run)
    verb = "would change" if args.dry_run else "changed"
    for change in changes:
        added = f", {change.failures_added} missed failure(s) noted" if change.failures_added else ""
        print(f"{change.path}: {change.old} -> {change.new}{added}")
    print(f"{verb} {len(changes)} eval(s)")
    return 0


def cmd_worker(args) -> int:
    from diffusers.utils import logging as diffusers_logging

    from ..worker import run_worker

    diffusers_logging.disable_progress_bar()  # one bar per pipeline load would drown the job log
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ws = workspace(args)
    stats = run_worker(ws, args.project, once=args.once, max_jobs=args.max_jobs, lease_seconds=args.lease_seconds,
                       poll_seconds=args.poll_seconds, device=args.device, dtype=args.dtype,
                       log=lambda message: print(message, flush=True))
    print(f"[{stats.owner}] done: {len(stats.rendered)} rendered, {len(stats.failed)} failed, "
          f"{len(stats.expired)} expired, {stats.pipeline_loads} pipeline load(s), {stats.seconds:.1f}s", flush=True)
    return 0


def cmd_grid_image(args) -> int:
    ws = workspace(args)
    out = save_contact_sheet(ws, args.eval_id, args.out, args.project, cell_size=args.cell_size)
    print(f"wrote {out}")
    print(validation_summary(find_eval(ws, args.eval_id, args.project)[0].get("validation")))
    return 0
