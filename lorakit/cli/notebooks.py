"""``lorakit notebook run|list`` and ``lorakit report``: batch runs of the notebooks (``lorakit.reports``)."""

from __future__ import annotations

import argparse
import re
import sys

from ..reports import NotebookError, NotebookRun, list_notebooks, make_report, parse_parameter, run_notebook
from .common import workspace

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("notebook", help="run the notebooks headless (papermill) and write HTML reports")
    notebook = p.add_subparsers(dest="notebook_command", required=True, metavar="NOTEBOOK_COMMAND")

    p = notebook.add_parser("run", parents=[common], help="execute a notebook; write the executed .ipynb and HTML",
                            description="Execute a notebook of notebooks/ with papermill and write the executed "
                                        ".ipynb and a standalone HTML file under ./reports/ (or --out).")
    p.add_argument("name", metavar="NAME", help="notebook name or unique prefix (01, 02_train_lora, ...)")
    p.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="set a parameter; VALUE is JSON when it parses (3, true, [1,2]), else text; repeatable")
    p.add_argument("--out", help="folder for the executed notebook and the HTML (default: ./reports/)")
    p.add_argument("--timeout", type=float, help="seconds a cell may run (default: no limit)")
    p.add_argument("--no-html", action="store_true", help="write only the executed notebook")
    p.add_argument("--log-output", action="store_true", help="also print the cells' output while running")
    p.set_defaults(func=cmd_run)

    p = notebook.add_parser("list", help="list the notebooks a batch run can execute")
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser("report", parents=[common], help="write the HTML report of one release (04_eval_report)",
                              description="Run 04_eval_report for one release, write it under ./reports/ (or --out) "
                                          "and record its path on the release's evaluation.report.")
    p.add_argument("--lora", required=True, help="LoRA id")
    p.add_argument("--release", help="release id (default: the active release, else the newest)")
    p.add_argument("--project", help="project of the LoRA (or whose evals a baseline LoRA uses)")
    p.add_argument("--out", help="folder for the report (default: ./reports/)")
    p.add_argument("--timeout", type=float, help="seconds a cell may run (default: no limit)")
    p.set_defaults(func=cmd_report)


def _print_run(run: NotebookRun) -> None:
    print(f"{run.notebook}: {'ok' if run.ok else 'FAILED'} in {run.duration_s:.0f} s")
    print(f"  notebook: {run.executed}")
    if run.html:
        print(f"  html:     {run.html}")


def _print_failure(error: NotebookError) -> int:
    run = error.run
    print(f"error: {error}", file=sys.stderr)
    if run.traceback:
        print("--- traceback ---", file=sys.stderr)
        print(_ANSI.sub("", "\n".join(run.traceback)), file=sys.stderr)
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    params = {key: parse_parameter(value) for key, value in args.parameter}
    data_root = workspace(args).data_root  # checked here, so a wrong --data-root fails before a kernel starts
    try:
        run = run_notebook(args.name, params, out_dir=args.out, data_root=data_root, html=not args.no_html,
                           timeout=args.timeout, log_output=args.log_output)
    except NotebookError as exc:
        return _print_failure(exc)
    _print_run(run)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in list_notebooks():
        print(name)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    try:
        run = make_report(workspace(args), args.lora, args.release, project=args.project, out_dir=args.out,
                          timeout=args.timeout)
    except NotebookError as exc:
        return _print_failure(exc)
    _print_run(run)
    print(f"recorded on LoRA {args.lora} release {run.parameters['release']} (evaluation.report)")
    return 0
