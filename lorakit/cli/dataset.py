"""``lorakit dataset build | show | export``: thin wrappers over :mod:`lorakit.datasets`."""

from __future__ import annotations

import argparse
import json

from ..datasets import (
    CAPTION_STRATEGIES,
    EXPORT_FORMATS,
    SCOPES,
    VERSION_STATUSES,
    build_manifest,
    dataset_summary,
    export_dataset,
    load_manifest,
)
from .common import split_list, workspace


def register(subparsers, common) -> None:
    dataset = subparsers.add_parser("dataset", help="build, show and export dataset manifests")
    commands = dataset.add_subparsers(dest="dataset_command", required=True, metavar="SUBCOMMAND")

    b = commands.add_parser("build", parents=[common], help="select approved, tagged images into a dataset manifest")
    b.add_argument("--project", required=True, help="project whose assets to select from")
    b.add_argument("--scope", choices=SCOPES, default="project",
                   help="project: projects/<P>/datasets/; baseline: shared/datasets/ (default: project)")
    b.add_argument("--id", dest="dataset_id", help="dataset id (default: a new ULID); an existing one is replaced")
    b.add_argument("--status", choices=VERSION_STATUSES, default="approved", help="version status (default: approved)")
    b.add_argument("--asset-type", action="append", metavar="T[,T]", help="only these spec asset types (repeatable)")
    b.add_argument("--checkpoint", action="append", metavar="C[,C]", help="only specs for these checkpoints (repeatable)")
    b.add_argument("--tag", action="append", metavar="T[,T]", help="required tags, all of them by default (repeatable)")
    b.add_argument("--tag-any", action="store_true", help="keep an asset with at least one of the --tag tags")
    b.add_argument("--exclude-tag", action="append", metavar="T[,T]",
                   help="leave out assets with a matching variant or spec tag; globs allowed, e.g. 'issue:*'")
    b.add_argument("--caption", choices=CAPTION_STRATEGIES, default="tags", help="caption strategy (default: tags)")
    b.add_argument("--no-spec-tags", action="store_true", help="ignore spec tags for tag matching and captions")
    b.add_argument("--with-tokens", action="store_true",
                   help="append prompt tokens from the style/scenario/tag catalogs (checkpoint overrides applied)")
    for field in ("source", "author", "license", "url", "notes"):
        b.add_argument(f"--provenance-{field}", metavar="TEXT", help=f"provenance {field} recorded in the manifest")
    b.add_argument("--dry-run", action="store_true", help="select, hash and report, but write nothing")
    b.add_argument("--explain", action="store_true", help="list every left-out asset with its reason")
    b.set_defaults(func=cmd_build)

    s = commands.add_parser("show", parents=[common], help="summarize a dataset manifest")
    s.add_argument("dataset_id", metavar="ID")
    s.add_argument("--project", help="the manifest's project (default: the shared/baseline scope)")
    s.add_argument("--items", action="store_true", help="also list every item")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_show)

    e = commands.add_parser("export", parents=[common], help="copy a dataset's images and captions for a trainer")
    e.add_argument("dataset_id", metavar="ID")
    e.add_argument("--project", help="the manifest's project (default: the shared/baseline scope)")
    e.add_argument("--format", dest="fmt", choices=EXPORT_FORMATS, default="kohya", help="folder layout (default: kohya)")
    e.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty unless --overwrite)")
    e.add_argument("--repeats", type=int, default=10, help="kohya repeats, the N in N_name/ (default: 10)")
    e.add_argument("--name", help="kohya concept folder name (default: the dataset id)")
    e.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out folder")
    e.set_defaults(func=cmd_export)


def cmd_build(args: argparse.Namespace) -> int:
    provenance = {f: getattr(args, f"provenance_{f}") for f in ("source", "author", "license", "url", "notes")}
    result = build_manifest(
        workspace(args), project=args.project, scope=args.scope, dataset_id=args.dataset_id, status=args.status,
        asset_types=split_list(args.asset_type), checkpoints=split_list(args.checkpoint), tags=split_list(args.tag),
        tag_any=args.tag_any, exclude_tags=split_list(args.exclude_tag), caption=args.caption,
        no_spec_tags=args.no_spec_tags, with_tokens=args.with_tokens, provenance=provenance, dry_run=args.dry_run,
    )
    manifest = result.manifest
    verb = "would write" if args.dry_run else "wrote"
    print(f"dataset {manifest['id']} ({manifest['scope']}): {len(manifest['items'])} item(s) "
          f"from {result.assets_seen} asset(s)")
    print(f"  {verb} {result.path}")
    print(f"  manifest hash {manifest['manifestHash']}")
    if result.counts:
        print("  left out: " + ", ".join(f"{reason} {n}" for reason, n in result.counts.items()))
    for warning in result.warnings:
        print(f"warning: {warning}")
    if args.explain:
        for entry in result.left_out:
            print(f"  - {entry.asset_id}: {entry.reason}" + (f" ({entry.detail})" if entry.detail else ""))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    manifest = load_manifest(workspace(args), args.dataset_id, args.project)
    summary = dataset_summary(manifest)
    if args.json:
        if args.items:
            summary["itemList"] = manifest["items"]
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    print(f"dataset {summary['id']} ({summary['scope']}" + (f", project {summary['projectId']})" if summary["projectId"] else ")"))
    print(f"  created {summary['createdAt']}, updated {summary['updatedAt']}")
    print(f"  {summary['items']} item(s) from {summary['assets']} asset(s), {summary['captioned']} captioned, "
          f"{summary['alphaImages']} alpha image(s)")
    state = {True: "matches items", False: "DOES NOT match items (edited by hand?)", None: "missing"}[summary["hashMatches"]]
    print(f"  manifest hash {summary['manifestHash']} ({state})")
    print("  selection: " + json.dumps(summary["selection"], ensure_ascii=False))
    if summary["provenance"]:
        print("  provenance: " + json.dumps(summary["provenance"], ensure_ascii=False))
    if summary["topTags"]:
        print("  top tags: " + ", ".join(f"{tag} ({n})" for tag, n in summary["topTags"]))
    if args.items:
        for item in manifest["items"]:
            print(f"  {item['assetId']}/{item['assetVersionId']}/{item['variantId']}  {item['path']}  "
                  f"{item.get('caption', '')}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    result = export_dataset(workspace(args), args.dataset_id, args.project, out_dir=args.out, fmt=args.fmt,
                            repeats=args.repeats, name=args.name, overwrite=args.overwrite)
    print(f"exported {result.images} image(s), {result.captions} caption(s) as {result.fmt} to {result.image_dir}")
    return 0
