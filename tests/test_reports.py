"""What the release report (``04_eval_report``) reads about a release's validation drop, from hand-made records:
:func:`lorakit.reports.release_report` on a release with a held-out validation block, one trained before
validation existed, and one with values no sane run writes. The notebook itself runs in ``test_notebooks.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

import lorakit
from lorakit.loras import add_release, create_lora, make_release
from lorakit.models.registry import register_checkpoint
from lorakit.reports import release_report
from lorakit.store import now_iso

PROJECT = "proj"
HELD_OUT = {
    "set": "heldOut", "split": 0.2, "seed": 0, "draws": 4, "every": 15, "images": 2, "baseLoss": 0.117,
    "finalLoss": 0.079, "drop": 0.327, "bestStep": 300, "bestLoss": 0.079, "stoppedEarly": False,
    "training": {"images": 8, "baseLoss": 0.12, "finalLoss": 0.07, "drop": 0.416667},
    "curve": [{"step": 0, "epoch": 0, "loss": 0.117, "trainingLoss": 0.12},
              {"step": 300, "epoch": 10, "loss": 0.079, "trainingLoss": 0.07}],
    "secondsPerScore": 0.21,
}
ODD = {**HELD_OUT, "images": 0, "baseLoss": 0.0, "drop": 0.0, "curve": [], "stoppedEarly": True}


@pytest.fixture
def ws(tmp_data_root: Path):
    ws = lorakit.open_workspace()
    now = now_iso()
    ws.store.write("project", {"id": PROJECT, "name": "Project", "createdAt": now, "updatedAt": now})
    register_checkpoint(ws, "ckpt", {"name": "ckpt", "family": "sd15", "supportedAssetTypes": ["icon"],
                                     "weights": {"kind": "config_relative", "base": "checkpointsRoot", "path": "ckpt"}})
    create_lora(ws, "icons", name="Icons", scope="project", project=PROJECT, checkpoint="ckpt", asset_types=["icon"])
    for release_id, validation in (("held", HELD_OUT), ("older", None), ("odd", ODD)):
        training = {"checkpointId": "ckpt", "steps": 300} | ({"validation": validation} if validation else {})
        add_release(ws, "icons", make_release(release_id, weights={"kind": "config_relative", "base": "lorasRoot",
                                                                   "path": f"icons/{release_id}/icons.safetensors"},
                                              sha256="a" * 64, training=training), project=PROJECT)
    return ws


def test_the_report_reads_the_validation_block_and_its_drop(ws):
    report = release_report(ws, "icons", "held", project=PROJECT)
    assert report.validation == HELD_OUT
    assert report.validation_text == "validation loss 0.117 → 0.079 (−32.7%) on 2 held-out images"
    assert "curve" not in report.validation_details  # drawn on the loss chart instead
    assert report.validation_details["training"] == HELD_OUT["training"]
    assert report.validation_details["secondsPerScore"] == 0.21
    assert report.has_validation_curve


def test_a_release_trained_without_validation_reports_none(ws):
    report = release_report(ws, "icons", "older", project=PROJECT)
    assert report.validation is None and report.validation_details == {}
    assert report.validation_text == "no validation" and not report.has_validation_curve


def test_odd_values_are_reported_without_failing(ws):
    report = release_report(ws, "icons", "odd", project=PROJECT)
    assert report.validation_text == "validation loss 0 → 0.079 (0.0%) on 0 held-out images (stopped early)"
    assert not report.has_validation_curve
