"""Golden runs: the same manifest, config and seed give bit-identical LoRA weights, for each family, run straight
through or killed and resumed.

The reference files under ``tests/fixtures/golden/`` are the weights these runs wrote at the commit named in
their metadata (``golden.commit``). A change that moves model-family code around must leave every tensor equal;
one that is meant to change the numbers regenerates them with ``LORAKIT_UPDATE_GOLDEN=1`` and says why.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train import _workspace

import lorakit
from lorakit.store import now_iso

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
UPDATE = os.environ.get("LORAKIT_UPDATE_GOLDEN") == "1"
FAMILIES = ("sd15", "sdxl")
CONFIG = {"resolution": 64, "rank": 4, "alpha": 2, "lr": 1e-3, "batch_size": 2, "lr_scheduler": "constant",
          "steps": 6, "save_state_every": 2, "seed": 1234, "shuffle_tags": True, "keep_tokens": 1,
          "caption_dropout": 0.2, "validation_split": 0.25}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the golden values were made on one thread; more could reorder reductions
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        ws = _workspace(tmp_path_factory.mktemp("golden"), mp)  # tiny_sd15 and tiny_sdxl, project demo
        for family in FAMILIES:
            _dataset(ws, f"gems_{family}")
        yield ws
    torch.set_num_threads(threads)


def _dataset(ws, dataset_id: str) -> None:
    """Eight RGBA PNGs of three sizes (two buckets at 64 px) and their manifest, the same bytes on every run."""
    rng = np.random.default_rng(7)
    folder = ws.data_root / "files" / dataset_id
    folder.mkdir(parents=True)
    items = []
    for i in range(8):
        w, h = ((64, 64), (80, 64), (64, 96))[i % 3]
        pixels = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        pixels[..., 3] = np.where(pixels[..., 3] > 64, 255, 0)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels, "RGBA").save(path)
        items.append({"assetId": f"a{i}", "assetVersionId": "v1", "variantId": "v1a", "path": ws.store.relative(path),
                      "caption": f"icon, {'red' if i % 2 else 'blue'}, gem, shiny", "tags": ["icon"],
                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    now = now_iso()
    ws.store.write("dataset", {"id": dataset_id, "scope": "project", "projectId": "demo", "createdAt": now,
                               "updatedAt": now, "selection": {"checkpoints": []}, "items": items,
                               "manifestHash": hashlib.sha256(json.dumps(items).encode()).hexdigest()},
                   project="demo")


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def _check(family: str, path: Path) -> None:
    golden = GOLDEN / f"{family}.safetensors"
    tensors = load_file(path)
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        save_file(tensors, golden, metadata={"golden.commit": _commit(), "golden.config": json.dumps(CONFIG)})
        return
    expected = load_file(golden)
    assert sorted(tensors) == sorted(expected), "the LoRA file holds other modules than the golden run's"
    different = [k for k in expected if not (tensors[k].dtype == expected[k].dtype and
                                             tensors[k].shape == expected[k].shape and
                                             tensors[k].view(-1).eq(expected[k].view(-1)).all())]
    assert not different, f"{len(different)} of {len(expected)} tensors differ from the golden run, e.g. {different[:3]}"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_run_gives_the_golden_weights(ws, family: str) -> None:
    lora = f"straight_{family}"
    lorakit.create_lora(ws, lora, name=lora, scope="project", project="demo", checkpoint=f"tiny_{family}",
                        asset_types=["icon"])
    result = lorakit.train_lora(ws, lora, f"gems_{family}", project="demo", config=CONFIG, release_id="r1",
                                progress=False)
    _check(family, result.weights_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_killed_and_resumed_run_gives_the_golden_weights(ws, family: str) -> None:
    if UPDATE:
        pytest.skip("the golden files come from the straight runs")
    lora = f"resumed_{family}"
    lorakit.create_lora(ws, lora, name=lora, scope="project", project="demo", checkpoint=f"tiny_{family}",
                        asset_types=["icon"])

    def stop_after_the_second_saved_state(report) -> None:
        if report.step == 4:
            signal.raise_signal(signal.SIGINT)  # the run stops at the end of this step, with its state saved

    with pytest.raises(KeyboardInterrupt):
        lorakit.train_lora(ws, lora, f"gems_{family}", project="demo", config=CONFIG, release_id="r1", progress=False,
                           on_step=stop_after_the_second_saved_state)
    result = lorakit.train_lora(ws, lora, project="demo", resume="r1", progress=False)
    _check(family, result.weights_path)
