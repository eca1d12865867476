"""``lorakit assets import|tags|duplicates|set-status|tag``: bring your own images and curate them."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..assets import (
    DEFAULT_ASSET_TYPE,
    find_duplicates,
    import_assets,
    set_asset_status,
    tag_assets,
    tag_frequencies,
)
from ..catalog import VERSION_STATUSES
from ..datasets import CAPTION_STRATEGIES
from ..imagehash import DEFAULT_THRESHOLD
from .common import split_list, workspace

if TYPE_CHECKING:
    import pandas as pd


def register(subparsers, common) -> None:
    group = subparsers.add_parser("assets", help="import a folder of images as assets, and curate them")
    commands = group.add_subparsers(dest="assets_command", required=True, metavar="ACTION")

    p = commands.add_parser("import", parents=[common], help="import a folder of images into a project")
    p.add_argument("--project", required=True, help="project id (created with defaults if it does not exist)")
    p.add_argument("--dir", required=True, help="folder of images")
    p.add_argument("--asset-type", help=f"spec assetType (default: the project's defaults.assetType, else {DEFAULT_ASSET_TYPE})")
    p.add_argument("--status", choices=VERSION_STATUSES, default="draft", help="status of each new version (default draft)")
    p.add_argument("--tag", action="append", help="tag for every image; repeat or comma-separate")
    p.add_argument("--checkpoint", help="checkpoint id the specs are for")
    for name in ("source", "author", "license", "url", "notes"):
        p.add_argument(f"--{name}", help=f"provenance {name} written on every asset")
    p.add_argument("--recursive", action="store_true", help="also import sub-folders (one spec per folder)")
    p.add_argument("--folder-tags", action="store_true", help="sub-folder names become spec tags")
    p.add_argument("--in-place", action="store_true", help="reference the images where they are instead of copying")
    p.add_argument("--dry-run", action="store_true", help="report what would be imported, write nothing")
    p.add_argument("--list", action="store_true", help="list every file with its outcome")
    p.set_defaults(func=cmd_import)

    p = commands.add_parser("tags", parents=[common], help="tag frequencies and which tags reach captions")
    p.add_argument("--project", required=True)
    p.add_argument("--status", default="approved", help="version status to count (default approved; 'any': last version)")
    p.add_argument("--caption", choices=CAPTION_STRATEGIES, default="tags", help="caption strategy, as for dataset build (default tags)")
    p.add_argument("--no-spec-tags", action="store_true", help="captions leave spec tags out, as for dataset build")
    p.add_argument("--exclude-tag", action="append", help="glob of tags whose assets a dataset leaves out (e.g. 'issue:*')")
    p.set_defaults(func=cmd_tags)

    p = commands.add_parser("duplicates", parents=[common], help="exact (sha256) and near (perceptual hash) duplicates")
    p.add_argument("--project", required=True)
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD,
                   help=f"near duplicates differ in at most this many of 64 hash bits (default {DEFAULT_THRESHOLD})")
    p.add_argument("--status", default="any", help="version status to compare (default any: the last version)")
    p.set_defaults(func=cmd_duplicates)

    p = commands.add_parser("set-status", parents=[common], help="set the status of assets' last versions")
    p.add_argument("--project", required=True)
    p.add_argument("--asset", action="append", required=True, help="asset id; repeat or comma-separate")
    p.add_argument("--status", choices=VERSION_STATUSES, required=True)
    p.add_argument("--version", help="this version id instead of the last version")
    p.set_defaults(func=cmd_set_status)

    p = commands.add_parser("tag", parents=[common], help="add and remove tags on assets' chosen variants")
    p.add_argument("--project", required=True)
    p.add_argument("--asset", action="append", required=True, help="asset id; repeat or comma-separate")
    p.add_argument("--add", action="append", help="tag to add; repeat or comma-separate")
    p.add_argument("--remove", action="append", help="tag to remove; repeat or comma-separate")
    p.add_argument("--version", help="this version id instead of the last version")
    p.set_defaults(func=cmd_tag)


def _status_arg(value: str) -> str | None:
    return None if value == "any" else value


def _print_frame(frame: pd.DataFrame, empty: str) -> None:
    for problem in frame.attrs.get("problems", []):
        print(f"warning: {problem}", file=sys.stderr)
    print(empty if frame.empty else frame.to_string(index=False))


def cmd_import(args) -> int:
    from tqdm import tqdm

    bar = tqdm(unit="image", disable=None, file=sys.stderr)  # disable=None: only on a terminal
    seen = [0, 0]

    def progress(done: int, total: int) -> None:
        seen[:] = [done, total]
        bar.total = total
        bar.update(done - bar.n)

    try:
        report = import_assets(
            workspace(args), args.project, args.dir, asset_type=args.asset_type, status=args.status,
            tags=split_list(args.tag), checkpoint=args.checkpoint, source=args.source, author=args.author,
            license=args.license, url=args.url, notes=args.notes, recursive=args.recursive,
            folder_tags=args.folder_tags, in_place=args.in_place, dry_run=args.dry_run, progress=progress,
        )
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted after {seen[0]} of {seen[1]} image(s); images in flight were finished, nothing is"
              " half-imported. Run the same command again to import the rest.", file=sys.stderr)
        raise
    finally:
        bar.close()
    if args.list:
        frame = report.to_frame()
        print(frame.to_string(index=False) if not frame.empty else "no files")
    for item in report.skipped:
        print(f"skipped {item['path']}: {item['reason']}", file=sys.stderr)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(report.summary())
    return 0


def cmd_tags(args) -> int:
    frame = tag_frequencies(workspace(args), args.project, status=_status_arg(args.status), caption=args.caption,
                            no_spec_tags=args.no_spec_tags, exclude_tags=split_list(args.exclude_tag))
    _print_frame(frame, "no tags")
    return 0


def cmd_duplicates(args) -> int:
    frame = find_duplicates(workspace(args), args.project, threshold=args.threshold, status=_status_arg(args.status))
    _print_frame(frame, "no duplicates")
    return 0


def cmd_set_status(args) -> int:
    frame = set_asset_status(workspace(args), args.project, split_list(args.asset), args.status, version=args.version)
    _print_frame(frame, "nothing changed")
    return 0


def cmd_tag(args) -> int:
    frame = tag_assets(workspace(args), args.project, split_list(args.asset), add=split_list(args.add),
                       remove=split_list(args.remove), version=args.version)
    frame = frame.assign(old_tags=frame["old_tags"].map(", ".join), tags=frame["tags"].map(", ".join))
    _print_frame(frame, "nothing changed")
    return 0
