#!/usr/bin/env python3
"""Write the notebooks in ``notebooks/`` from the cell sources below (no outputs, stable cell ids).

The notebooks are generated so they stay small, clean and reviewable in Git: edit this file, run it, commit
both. ``--check`` exits 1 when a notebook on disk differs from what this script writes (for CI).

Each notebook has one cell tagged ``parameters`` (papermill injects batch values after it) whose defaults
work on the demo data, and runs top to bottom by hand in JupyterLab or headless with
``lorakit notebook run NAME``. Every cell calls library functions; none holds logic of its own.

Usage: python scripts/make_notebooks.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "notebooks"

SETUP = """%matplotlib inline
import lorakit
from lorakit import notebook_helpers as nh

ws = nh.setup_notebook(data_root)
print("data root:", ws.data_root)"""


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str, tags: list[str] | None = None):
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = tags
    return cell


def params(text: str):
    return code(text, tags=["parameters"])


def notebook(name: str, cells: list, hide_code: bool = False):
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    if hide_code:
        nb.metadata["lorakit"] = {"hide_code": True}
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"
    return nb


NOTEBOOKS = {}

# ---- 00 the wizard ------------------------------------------------------------------------------------------
NOTEBOOKS["00_wizard"] = notebook("00_wizard", [
    md("""
# 00 · Train a LoRA, step by step

The beginner wizard: six pages, one per step of the workflow, with **Back** and **Next**.

1. **Checkpoint**: the base model the LoRA is for.
2. **Dataset**: asset types and filters (approved assets only, required tags), with a live count of matching images.
3. **Captions**: what the trainer reads for each image, with a preview of real captions.
4. **Preset**: simple training defaults; *Advanced* shows the numbers.
5. **Train**: builds the dataset and trains a new `candidate` release (the notebook stays usable meanwhile).
6. **Evaluate**: renders the eval grid (base against LoRA, same seeds), then approve it to make it the active release.

Every button calls the same library function as the `lorakit` command line, so what you do here is also one
command away. Run all cells (*Run → Run All Cells*), then follow the pages.
"""),
    params("""
data_root = None  # data folder (None: LORAKIT_DATA_ROOT, config/local.json, or ./data)
project = "demo"  # the project whose assets the LoRA learns from
"""),
    code(SETUP),
    code("""
from lorakit.widgets import Wizard

wizard = Wizard(ws, project=project)
wizard
"""),
    md("""
When you are done, the records the wizard made are in `wizard.state` (dataset, LoRA, release and eval ids),
and `lorakit lora list --project demo` shows the new release on the command line.
"""),
])

# ---- 01 build a dataset -----------------------------------------------------------------------------------------
NOTEBOOKS["01_build_dataset"] = notebook("01_build_dataset", [
    md("""
# 01 · Build a dataset manifest

Filters → manifest: which approved images of a project a LoRA trains on, and the caption of each.
The same as `lorakit dataset build --project demo --asset-type ui_icon --caption tags+spec --with-tokens`.
"""),
    params("""
data_root = None  # data folder (None: LORAKIT_DATA_ROOT, config/local.json, or ./data)
project = "demo"
dataset_id = "demo_ui_icons"  # None: a new ULID; an existing id is rebuilt
scope = "project"  # project | baseline
status = "approved"  # the asset version status to take
asset_types = ["ui_icon"]  # empty: every asset type
checkpoints = []  # only assets made for these checkpoints (empty: any)
tags = []  # required tags, e.g. style:cyberpunk
tag_any = False  # True: any of the tags is enough
exclude_tags = ["issue:*"]  # globs: bad-output tags never reach a caption or the dataset
caption = "tags+spec"  # tags | tags+spec | tags+spec+title
with_tokens = True  # append prompt tokens from the catalogs
sample_size = 8  # images shown below
top_tags = 15  # bars in the tag chart
"""),
    code(SETUP),
    md("## Build the manifest"),
    code("""
result = lorakit.build_manifest(
    ws, project=project, scope=scope, dataset_id=dataset_id, status=status, asset_types=asset_types,
    checkpoints=checkpoints, tags=tags, tag_any=tag_any, exclude_tags=exclude_tags, caption=caption,
    with_tokens=with_tokens,
)
manifest = result.manifest
print(f"dataset {manifest['id']}: {len(manifest['items'])} images from {result.assets_seen} assets -> {result.path}")
for warning in result.warnings:
    print("warning:", warning)
"""),
    md("## What was left out, and why"),
    code("""
display(nh.left_out_table(result.counts, len(manifest["items"])))
nh.key_values({f"{x.asset_id}": f"{x.reason}: {x.detail}" for x in result.left_out}, name="why")
"""),
    md("## A sample of the images, with their captions"),
    code("""
nh.thumbnails(ws, manifest["items"], limit=sample_size)
"""),
    md("## Tag frequency"),
    code("""
summary = lorakit.dataset_summary(manifest, top_tags=top_tags)
nh.tag_chart(summary["topTags"], title=f"tags in dataset {manifest['id']}")
"""),
    md("## The manifest"),
    code("""
nh.key_values({k: v for k, v in summary.items() if k != "topTags"})
"""),
])

# ---- 02 train a LoRA ----------------------------------------------------------------------------------------------
NOTEBOOKS["02_train_lora"] = notebook("02_train_lora", [
    md("""
# 02 · Train a LoRA release

Dataset + preset/config → a new `candidate` release of the LoRA. The same as
`lorakit lora train --lora demo_ui_icons --dataset demo_ui_icons --project demo --preset tiny-demo`.
"""),
    params("""
data_root = None  # data folder (None: LORAKIT_DATA_ROOT, config/local.json, or ./data)
project = "demo"
lora = "demo_ui_icons"  # created below when it does not exist yet
lora_name = "Demo UI icons"  # used when the LoRA is created
scope = "project"  # used when the LoRA is created: project | baseline
checkpoint = "tiny-sd15"  # the LoRA's checkpoint (an existing LoRA made for another one is refused)
asset_types = ["ui_icon"]  # used when the LoRA is created
dataset = "demo_ui_icons"  # dataset id (built by 01_build_dataset) or a manifest path
release = None  # release id (None: a new ULID)
preset = "tiny-demo"  # see `lorakit lora presets`
config = {}  # settings over the preset, e.g. steps 40, rank 8
set_active = False  # make the new release the active one (normally done after review, in 03)
notes = None  # release notes
sample_prompts = None  # prompts rendered after each epoch (None: the first canonical prompt of each asset type)
sample_steps = 4  # denoising steps of the sample images
build_tiny_checkpoint = True  # demo: build the tiny random-weight checkpoint when its weights are missing
"""),
    code(SETUP),
    md("## The LoRA and its checkpoint"),
    code("""
lora_record, created = lorakit.ensure_lora(ws, lora, name=lora_name, scope=scope, project=project,
                                           checkpoint=checkpoint, asset_types=asset_types)
print(f"created LoRA {lora!r} for checkpoint {checkpoint}" if created else
      f"LoRA {lora!r} exists: {len(lora_record['releases'])} release(s), checkpoint {lora_record['checkpointId']}")
print(nh.ensure_demo_checkpoint(ws, lora_record["checkpointId"], build_tiny=build_tiny_checkpoint))
"""),
    md("## The resolved training config and the plan"),
    code("""
if sample_prompts is None:
    sample_prompts = [lorakit.canonical_prompts(ws, t, project=project)[0] for t in lora_record["assetTypes"]]
settings = {**config, "sample_prompts": sample_prompts, "sample_steps": sample_steps}
plan = lorakit.plan_training(ws, lora, dataset, project=project, preset=preset, config=settings, release_id=release,
                             set_active=set_active, notes=notes)
print(f"{len(plan.items)} images, {plan.total_steps} steps ({plan.num_epochs} epochs), "
      f"buckets {plan.describe()['buckets']}")
nh.key_values(plan.cfg)
"""),
    md("## Train"),
    code("""
result = lorakit.train_lora(ws, lora, dataset, project=project, preset=preset, config=settings, release_id=release,
                            set_active=set_active, notes=notes)
print(f"release {result.release_id}: {result.steps} steps in {result.duration_s:.0f} s, final loss {result.final_loss:.4f}")
print("weights:", result.weights_path)
"""),
    md("""
## Loss curve and validation drop

The top axis is the training loss of each step. The lower one, when the run scored validation, is the loss on
fixed (noise, timestep) draws of the validation images at each score; the dashed line is the base model's loss
on the same draws, and the drop is how far the LoRA fell below it.
"""),
    code("""
from lorakit.loras import release_validation, validation_summary

validation = release_validation(result.release)
print(validation_summary(validation))
lorakit.plot_loss(result.output_dir, validation=validation)
"""),
    md("## Sample images (fixed prompts and seeds, after each epoch)"),
    code("""
samples = sorted((result.output_dir / "samples").glob("*.png"))
nh.image_files(samples, size=96) if samples else print("no sample prompts were set")
"""),
    md("## The new release"),
    code("""
release_record = result.release
nh.key_values({k: v for k, v in release_record.items() if k != "training"})
"""),
])

# ---- 03 eval grid and review ------------------------------------------------------------------------------------
NOTEBOOKS["03_eval_grid"] = notebook("03_eval_grid", [
    md("""
# 03 · Eval grid and review

Release → eval grid (one queued job per image, rendered by the worker) → contact sheet → review.
Rows are the base checkpoint (strength 0) and the LoRA at each strength; columns are prompt × seed, so
base and LoRA are compared on the same seeds. The same as `lorakit lora eval-grid ...`, `lorakit worker --once`,
`lorakit eval grid-image` and `lorakit lora review|activate|recommend`.
"""),
    params("""
data_root = None  # data folder (None: LORAKIT_DATA_ROOT, config/local.json, or ./data)
project = "demo"  # the project whose job queue renders the grid
lora = "demo_ui_icons"
release = None  # None: the LoRA's newest release
prompts = None  # None: the canonical prompts of the LoRA's asset types
seeds = [1, 2]
strengths = [1.0]  # strength 0 (the base checkpoint) is always added
steps = None  # denoising steps (None: the checkpoint's default)
cell_size = 128  # pixels per image on the contact sheet
contact_sheet_out = None  # also save the contact sheet PNG here
# batch review (the buttons below do the same by hand; approve + activate is the wizard's one-click approval)
review = None  # None | "approve" | "reject"
reviewer = None  # None: LORAKIT_USER or the login name
notes = None
activate = False  # make the release the LoRA's active release
recommend = False  # mark the LoRA recommended (the gate checks it is approved, active and evaluated)
"""),
    code(SETUP),
    md("## Create the grid"),
    code("""
lora_record = lorakit.get_lora(ws, lora, project=project)
release_id = release or lora_record["releases"][-1]["id"]
plan = lorakit.create_eval_grid(ws, project, lora, release_id, prompts=prompts, seeds=seeds, strengths=strengths,
                                steps=steps)
eval_id = plan.eval["id"]
print(f"eval {eval_id}: {len(plan.jobs)} images queued for release {release_id}")
"""),
    md("## Render it with the worker"),
    code("""
stats = lorakit.run_worker(ws, project, once=True)
print(f"rendered {len(stats.rendered)}, failed {len(stats.failed)} in {stats.seconds:.0f} s")
"""),
    md("## Contact sheet, with the release's validation drop"),
    code("""
from lorakit.loras import validation_summary

print(validation_summary(plan.eval.get("validation")))
sheet = lorakit.show_eval_grid(ws, eval_id, project=project, cell_size=cell_size)
if contact_sheet_out:
    print("saved", lorakit.save_contact_sheet(ws, eval_id, contact_sheet_out, project=project, cell_size=cell_size))
"""),
    md("## Review"),
    code("""
from lorakit.gate import batch_review

for message in batch_review(ws, lora, release_id, review=review, activate=activate, recommend=recommend,
                            project=project, notes=notes, reviewer=reviewer, eval_ids=[eval_id]):
    print(message)
"""),
    md("Approve or reject with notes, then activate and recommend; each button is one gate call."),
    code("""
from lorakit.widgets import ReviewPanel

ReviewPanel(ws, lora, release_id, project=project, eval_ids=[eval_id])
"""),
    md("## Where the LoRA stands"),
    code("""
overview = lorakit.list_loras(ws, project=project)
overview[overview["lora_id"] == lora]
"""),
])

# ---- 04 the report ------------------------------------------------------------------------------------------------
NOTEBOOKS["04_eval_report"] = notebook("04_eval_report", [
    md("""
# 04 · Release report

The shareable report of one LoRA release: the checkpoint, the dataset (summary and samples), provenance,
the training config and loss curve, the validation drop, the eval grid (base against LoRA, same seeds), the review history and
the current status. `lorakit report --lora L --release R` writes it as standalone HTML.
"""),
    params("""
data_root = None  # data folder (None: LORAKIT_DATA_ROOT, config/local.json, or ./data)
project = "demo"
lora = "demo_ui_icons"
release = None  # None: the active release, else the newest
sample_size = 8  # dataset images shown
cell_size = 128  # pixels per image on the eval grid
"""),
    code(SETUP + """
from IPython.display import Markdown
from lorakit.reports import release_report

report = release_report(ws, lora, release, project=project)
training = report.release.get("training") or {}
Markdown(f"## LoRA `{report.lora['id']}` ({report.lora['name']}), release `{report.release['id']}`\\n\\n"
         f"created {report.release['createdAt']}, status **{report.release['status']}**")
"""),
    md("## Checkpoint"),
    code("""
ckpt = report.checkpoint or {"id": report.lora["checkpointId"], "problem": "not in the registry"}
nh.key_values({k: ckpt.get(k) for k in ("id", "name", "family", "supportedAssetTypes", "weights",
                                          "promptTemplates", "defaultGenerationParams") if k in ckpt})
"""),
    md("## Dataset"),
    code("""
if report.manifest_problem:
    print("note:", report.manifest_problem)
if report.manifest:
    summary = lorakit.dataset_summary(report.manifest)
    display(nh.key_values({k: v for k, v in summary.items() if k not in ("topTags", "provenance")}))
    display(nh.thumbnails(ws, report.manifest["items"], limit=sample_size))
    display(nh.tag_chart(summary["topTags"], title=f"tags in dataset {report.manifest['id']}"))
"""),
    md("## Provenance"),
    code("""
provenance = {
    "dataset": training.get("datasetId"), "dataset scope": training.get("datasetScope"),
    "manifest hash": training.get("manifestHash"),
    "dataset provenance": (report.manifest or {}).get("provenance"),
    "checkpoint": training.get("checkpointId"), "checkpoint sha256": training.get("checkpointSha256"),
    "weights sha256": report.release.get("sha256"), "weights": report.release.get("weights"),
    "seed": training.get("seed"), "device": training.get("device"), "started": training.get("startedAt"),
    "finished": training.get("finishedAt"), "libraries": training.get("libraries"),
    "notes": report.release.get("notes"),
}
nh.key_values(provenance)
"""),
    md("## Training config and loss curve"),
    code("""
display(nh.key_values({"preset": training.get("preset"), "steps": training.get("steps"),
                       "images": training.get("images"), "final loss": training.get("finalLoss"),
                       "validation": report.validation_text, "duration (s)": training.get("durationS"),
                       **(training.get("config") or {})}))
if report.loss_log or report.has_validation_curve:
    display(lorakit.plot_loss(report.loss_log, validation=report.validation))
if not report.loss_log:
    print("no loss log on this machine")
if report.samples:
    display(nh.image_files(report.samples, size=96))
"""),
    md("""
## Validation drop

The loss of the base model and of the LoRA on fixed (noise, timestep) draws of the validation images: the
held-out images when the run held some out, else the training images. The curve is on the loss chart above.
"""),
    code("""
display(Markdown(f"**{report.validation_text}**"))
if report.validation:
    display(nh.key_values(report.validation_details))
"""),
    md("## Eval grid: base (strength 0) against the LoRA, same prompts and seeds"),
    code("""
if report.grid_eval:
    print(report.validation_text)
    grid = report.grid_eval.get("grid") or {}
    print(f"eval {report.grid_eval['id']} ({report.grid_eval['status']}): seeds {grid.get('seeds')}, "
          f"strengths {grid.get('strengths')}, {grid.get('steps')} steps, cfg {grid.get('cfg')}, "
          f"{grid.get('width')}x{grid.get('height')}, scheduler {grid.get('scheduler')}")
    sheet = lorakit.show_eval_grid(ws, report.grid_eval["id"], project=project, cell_size=cell_size)
else:
    print("no eval of this release yet: run 03_eval_grid")
"""),
    md("## Review history"),
    code("""
import pandas as pd

columns = ["at", "outcome", "reviewer", "notes", "evalIds", "forced"]
pd.DataFrame([{c: r.get(c) for c in columns} for r in report.reviews], columns=columns)
"""),
    md("## Current status"),
    code("""
nh.key_values(report.status)
"""),
], hide_code=True)


def render(nb) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a notebook on disk is not up to date")
    args = parser.parse_args(argv)
    stale = []
    OUT.mkdir(exist_ok=True)
    for name, nb in NOTEBOOKS.items():
        nbformat.validate(nb)
        path = OUT / f"{name}.ipynb"
        text = render(nb)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
        else:
            path.write_text(text, encoding="utf-8")
            print("wrote", path.relative_to(REPO))
    if stale:
        print("out of date (run scripts/make_notebooks.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
