#!/usr/bin/env python3
"""``make demo``: the whole chain on the tiny checkpoint, as batch notebook runs, on a scratch copy of ``data/``.

build dataset (01) -> train (02) -> eval grid rendered by the worker, review, activate, recommend (03) -> report (04)

The Git-tracked ``data/`` is never written: it is copied to ``build/demo/data`` (fresh each run), with a
config ``build/demo/local.json`` whose ``modelsRoot`` is ``<repo>/models`` (the tiny checkpoint is built once
and reused) and whose ``lorasRoot`` is ``build/demo/loras``. Each notebook runs through the same function as
``lorakit notebook run`` and writes its executed notebook and HTML under ``reports/`` (not in Git); the last
line printed is the path of the HTML report. Small settings keep it to a couple of minutes on 2 CPU cores.

Usage: python scripts/demo.py [--build DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROJECT = "demo"
LORA = "demo_ui_icons"
DATASET = "demo_ui_icons"
ASSET_TYPES = ["ui_icon"]
CHECKPOINT = "tiny-sd15"


def prepare(build: Path) -> tuple[Path, Path]:
    """A fresh scratch data root and its config; returns (data root, config path)."""
    data = build / "data"
    if data.exists():
        shutil.rmtree(data)
    shutil.copytree(REPO / "data", data, ignore=shutil.ignore_patterns(".lorakit"))
    loras = build / "loras"
    if loras.exists():
        shutil.rmtree(loras)
    config = build / "local.json"
    models = REPO / "models"
    config.write_text(json.dumps({
        "dataRoot": str(data),
        "paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "checkpoints"), "lorasRoot": str(loras)},
    }, indent=2) + "\n", encoding="utf-8")
    return data, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", default=str(REPO / "build" / "demo"), help="scratch folder (default: build/demo)")
    parser.add_argument("--out", help="where the executed notebooks and HTML go (default: reports/)")
    args = parser.parse_args(argv)

    build = Path(args.build).resolve()
    build.mkdir(parents=True, exist_ok=True)
    data, config = prepare(build)
    os.environ["LORAKIT_DATA_ROOT"] = str(data)
    os.environ["LORAKIT_CONFIG"] = str(config)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("LORAKIT_USER", "demo")

    import lorakit
    from lorakit.ids import new_ulid
    from lorakit.loras import get_release, release_validation, validation_summary
    from lorakit.reports import NotebookError, make_report, run_notebook

    out = Path(args.out).resolve() if args.out else REPO / "reports"
    release = new_ulid()  # chosen here so each report's file name says which release it is about
    steps = [
        ("01_build_dataset", "build the dataset", {"project": PROJECT, "dataset_id": DATASET, "asset_types": ASSET_TYPES,
                                                   "caption": "tags+spec", "with_tokens": True, "sample_size": 8}),
        ("02_train_lora", "train a release", {"project": PROJECT, "lora": LORA, "lora_name": "Demo UI icons",
                                              "checkpoint": CHECKPOINT, "asset_types": ASSET_TYPES, "dataset": DATASET,
                                              "release": release, "preset": "tiny-demo", "config": {"steps": 60},
                                              "sample_steps": 4}),
        ("03_eval_grid", "render the eval grid and review it", {
            "project": PROJECT, "lora": LORA, "release": release, "seeds": [1, 2], "strengths": [1.0],
            "review": "approve", "reviewer": "demo", "notes": "make demo: approved in a batch run",
            "activate": True, "recommend": True}),
        ("04_eval_report", "write the release report (lorakit report)", None),
    ]
    print(f"lorakit demo: scratch data {data}, weights under {REPO / 'models'}, reports in {out}")
    start = time.perf_counter()
    html = None
    for name, what, params in steps:
        print(f"\n== {name}: {what}")
        try:
            if params is None:  # the report: run 04 and record its path on the release
                run = make_report(data, LORA, release, project=PROJECT, out_dir=out)
            else:
                run = run_notebook(name, params, out_dir=out, data_root=data, config=config)
        except NotebookError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"   done in {run.duration_s:.0f} s -> {run.html}")
        print("   " + summarize(name, lorakit, data, release).replace("\n", "\n   "))
        html = run.html
    print("\n== what the LoRA picker offers now (lorakit.select.select_loras)")
    for asset_type in ("ui_icon", "character"):
        res = lorakit.select_loras(data, PROJECT, CHECKPOINT, asset_type)
        picked = ", ".join(f"{p.lora_id}@{p.release_id} x{p.strength:g}" for p in res) or "nothing"
        print(f"   {CHECKPOINT} / {asset_type}: {picked}")
        for p in res.not_picked:
            print(f"      not picked: {p.lora_id} ({p.reason})")
    lora = lorakit.get_lora(data, LORA, project=PROJECT)
    print(f"\n== release {release}: {validation_summary(release_validation(get_release(lora, release)))}")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; the release report (with the drop):")
    print(html)
    return 0


def summarize(name: str, lorakit, data: Path, release: str) -> str:
    """One or two lines on what a step produced, read back from the records."""
    from lorakit.loras import release_validation, validation_summary

    if name == "01_build_dataset":
        manifest = lorakit.load_manifest(data, DATASET, PROJECT)
        s = lorakit.dataset_summary(manifest, top_tags=3)
        return f"dataset {s['id']}: {s['items']} images, {s['captioned']} captioned, top tags {s['topTags']}"
    lora = lorakit.get_lora(data, LORA, project=PROJECT)
    rel = next(r for r in lora["releases"] if r["id"] == release)
    if name == "02_train_lora":
        t = rel["training"]
        return (f"LoRA {LORA} release {release} ({rel['status']}): {t['steps']} steps on {t['images']} images, "
                f"final loss {t['finalLoss']:.4f}\n{validation_summary(release_validation(rel))}")
    if name == "03_eval_grid":
        evaluation = rel.get("evaluation") or {}
        return (f"evals {evaluation.get('evalIds')}; review {evaluation.get('status')}; "
                f"active {lora.get('activeReleaseId') == release}; recommended {lora.get('recommended', False)}")
    report = (rel.get("evaluation") or {}).get("report") or {}
    return f"recorded on the release: evaluation.report.html = {report.get('html')}"


if __name__ == "__main__":
    sys.exit(main())
