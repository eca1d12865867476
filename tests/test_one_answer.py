"""Each question has one answer: the decisions the restructuring made, pinned so a copy that disagrees fails.

1. weights paths: one resolver, ``localPath`` relative to the folder that holds the data root;
2. checkpoint hashes: one fingerprint over the weight files of a folder, cached until a weight file changes;
3. manifest lookup: the project's dataset, else the shared one; a missing one names both places;
4. the trainers' front halves: one ``resolve_run_inputs`` and one ``train_lora(adapter=...)``;
5. adapter names: one ``lorakit.loras.adapter_name``, the same in the picker and the worker;
6. the release finder: one ``lorakit.loras.get_release``;
7. times and processes: one ``now_iso``, one ``pid_alive``;
8. atomic writes: one ``Root.atomic``.

Real records in a temporary data root, real files, the tiny random-weight checkpoint where a model is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from test_manual_adapter import Studio, build_studio

import lorakit
import lorakit.evals
import lorakit.gate
import lorakit.locks
import lorakit.loras
import lorakit.reports
import lorakit.select
import lorakit.worker
from lorakit.config import CHECKOUT_ROOT, release_weights_path
from lorakit.errors import ConfigError, DatasetError, RecordError, RecordNotFoundError, TrainingError
from lorakit.evals import create_eval_grid
from lorakit.hashing import file_sha256, weights_sha256
from lorakit.loras import adapter_name, add_release, create_lora, get_lora, get_release, make_release
from lorakit.models.registry import checkpoint_weights_hash, get_checkpoint, register_checkpoint
from lorakit.roots import Root
from lorakit.store import now_iso
from lorakit.train import resolve_run_inputs, train_lora
from lorakit.workspace import Workspace, init_data_root

PROJECT = "proj"
ADAPTERS = ("native", "manual", "kohya_ss")
# What each adapter needs besides the shared keywords: the manual adapter a weights reference (one that is not
# on this machine, so nothing is hashed).
ADAPTER_KW = {"native": {}, "manual": {"weights_kind": "external", "weights_uri": "s3://x"}, "kohya_ss": {}}
ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def write_config(path: Path, roots: dict[str, Path]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"paths": {name: str(value) for name, value in roots.items()}}), encoding="utf-8")
    return path


def set_env(monkeypatch: pytest.MonkeyPatch, data: Path, config: Path) -> None:
    for key, value in {"LORAKIT_DATA_ROOT": str(data), "LORAKIT_CONFIG": str(config), "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)


def write_project(ws: Workspace, project: str = PROJECT) -> None:
    now = now_iso()
    ws.store.write("project", {"id": project, "name": project.title(), "createdAt": now, "updatedAt": now})


def lora_record(lora_id: str, checkpoint: str, releases: list[dict], project: str = PROJECT) -> dict:
    now = now_iso()
    return {"id": lora_id, "name": lora_id, "createdAt": now, "updatedAt": now, "scope": "project",
            "projectId": project, "checkpointId": checkpoint, "assetTypes": ["icon"], "releases": releases}


def approved(release_id: str, **fields) -> dict:
    return {"id": release_id, "createdAt": now_iso(), "status": "approved", **fields}


def grid_lora(ws: Workspace, checkpoint: str, lora_id: str = "icons") -> None:
    """Project ``proj`` and LoRA ``lora_id`` on ``checkpoint`` with releases r1 and r2 whose weights files are small
    stand-ins (planning a grid only hashes them)."""
    write_project(ws)
    create_lora(ws, lora_id, name="Icons", scope="project", project=PROJECT, checkpoint=checkpoint,
                asset_types=["icon"])
    for release_id in ("r1", "r2"):
        rel = f"{lora_id}/{release_id}/{lora_id}.safetensors"
        weights = ws.config.loras_root / rel
        weights.parent.mkdir(parents=True, exist_ok=True)
        weights.write_bytes(release_id.encode() * 100)
        add_release(ws, lora_id, make_release(release_id, weights={"kind": "config_relative", "base": "lorasRoot",
                                                                  "path": rel},
                                              sha256=file_sha256(weights), training={}), project=PROJECT)


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and ".lorakit" not in p.parts}


# ---- the tiny checkpoint and two real LoRA files, built once ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny sd15 diffusers folder and two random, non-zero peft LoRAs for it (different weights)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    from lorakit.models.registry import build_tiny_folder
    from lorakit.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_folder(root / "checkpoints" / "tiny", "sd15", 0)
    files = {"checkpoints": root / "checkpoints", "folder": root / "checkpoints" / "tiny"}
    for i, name in enumerate(("lora_a", "lora_b")):
        unet = build_tiny_pipeline("sd15").unet
        torch.manual_seed(200 + i)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False))
        folder = root / "lora_src" / name
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
        files[name] = folder / "pytorch_lora_weights.safetensors"
    return files


# ==== 1. weights paths ==============================================================================================
@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A data root in ``<tmp>/studio/data`` (not the lorakit checkout), model roots somewhere else entirely, the
    config file in a third folder and the current folder a fourth, so every wrong base gives another path."""
    studio = tmp_path / "studio"
    elsewhere = tmp_path / "elsewhere"
    config = write_config(tmp_path / "conf" / "lk.json", {
        "modelsRoot": elsewhere / "models", "checkpointsRoot": elsewhere / "models" / "checkpoints",
        "lorasRoot": elsewhere / "loras"})
    set_env(monkeypatch, studio / "data", config)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    ws = init_data_root()
    assert ws.config.repo_folder == studio.resolve()
    assert CHECKOUT_ROOT is None or not studio.resolve().is_relative_to(CHECKOUT_ROOT)
    return ws


def the_three(ws: Workspace, lora: dict, release: dict) -> dict[str, Path]:
    """The file each place that needs a release's weights decides on."""
    found = lorakit.select.locate_weights(ws)(lora, release)
    assert found.exists, found
    job_lora = {"id": lora["id"], "releaseId": release["id"], "weights": release.get("weights"),
                "localPath": release.get("localPath")}
    return {"select.locate_weights": Path(found.path),
            "worker.lora_weights_path": lorakit.worker.lora_weights_path(ws, job_lora),
            "config.release_weights_path": release_weights_path(release, ws.config, "LoRA x release r1")}


def test_local_path_is_relative_to_the_folder_that_holds_the_data_root_everywhere(outside: Workspace) -> None:
    ws = outside
    right = ws.data_root.parent / "models" / "x.safetensors"
    right.parent.mkdir(parents=True)
    right.write_bytes(b"the right file")
    # The same relative path under each wrong base, so a resolver using one finds a file there, not an error.
    wrong = [ws.data_root / "models" / "x.safetensors", Path.cwd() / "models" / "x.safetensors",
             ws.config.models_root / "models" / "x.safetensors", ws.config.models_root / "x.safetensors",
             ws.config.source.parent / "models" / "x.safetensors"]
    for decoy in wrong:
        decoy.parent.mkdir(parents=True, exist_ok=True)
        decoy.write_bytes(b"a decoy")
    release = {"id": "r1", "localPath": "models/x.safetensors"}
    paths = the_three(ws, {"id": "hero"}, release)
    assert paths == {name: right for name in paths}


def test_a_weights_reference_resolves_the_same_everywhere(outside: Workspace) -> None:
    ws = outside
    right = ws.config.loras_root / "hero" / "r1" / "hero.safetensors"
    right.parent.mkdir(parents=True)
    right.write_bytes(b"weights")
    release = {"id": "r1", "weights": {"kind": "config_relative", "base": "lorasRoot",
                                       "path": "hero/r1/hero.safetensors"}}
    paths = the_three(ws, {"id": "hero"}, release)
    assert paths == {name: right for name in paths}
    # A reference wins over a localPath the same release still carries.
    (ws.data_root.parent / "old.safetensors").write_bytes(b"old")
    paths = the_three(ws, {"id": "hero"}, {**release, "localPath": "old.safetensors"})
    assert paths == {name: right for name in paths}


@pytest.mark.parametrize("local_path", ["../outside.safetensors", "models/../../outside.safetensors"])
def test_a_local_path_leaving_the_folder_is_refused_everywhere(outside: Workspace, local_path: str) -> None:
    ws = outside
    target = ws.data_root.parent.parent / "outside.safetensors"
    target.write_bytes(b"not ours to read")  # it exists: the refusal is about where it is
    lora, release = {"id": "hero"}, {"id": "r1", "localPath": local_path}
    job_lora = {"id": "hero", "releaseId": "r1", "weights": None, "localPath": local_path}
    for name, call in {
        "config.release_weights_path": lambda: release_weights_path(release, ws.config, "LoRA hero release r1"),
        "worker.lora_weights_path": lambda: lorakit.worker.lora_weights_path(ws, job_lora),
        "evals.release_sha256": lambda: lorakit.evals.release_sha256(ws, lora, release),
        "config.release_weights_path(must_exist=False)":
            lambda: release_weights_path(release, ws.config, "LoRA hero release r1", must_exist=False),
    }.items():
        with pytest.raises(ConfigError, match="leads out of the folder that holds the data root"):
            call()
            pytest.fail(f"{name} accepted {local_path!r}")
    # The picker reports it (it never raises for one release): not there, with the resolver's reason.
    found = lorakit.select.locate_weights(ws)(lora, release)
    assert found.exists is False
    assert "leads out of the folder that holds the data root" in (found.problem or "")


def test_an_eval_grid_plans_and_renders_the_local_path_file(outside: Workspace) -> None:
    """A release with only a localPath, planned into a grid: the hash the grid plans is the right file's, and the
    job's ``input.lora`` resolves to that file in the worker."""
    ws = outside
    right = ws.data_root.parent / "models" / "x.safetensors"
    right.parent.mkdir(parents=True)
    right.write_bytes(b"the right file")
    for decoy in (ws.data_root / "models" / "x.safetensors", Path.cwd() / "models" / "x.safetensors"):
        decoy.parent.mkdir(parents=True)
        decoy.write_bytes(b"a decoy")
    write_project(ws)
    register_checkpoint(ws, "ckpt", {"name": "ckpt", "family": "sd15", "supportedAssetTypes": ["icon"],
                                     "weights": {"kind": "config_relative", "base": "checkpointsRoot",
                                                 "path": "ckpt"}})
    ws.store.write("lora", lora_record("old", "ckpt", [approved("r1", localPath="models/x.safetensors")]), PROJECT)
    plan = create_eval_grid(ws, PROJECT, "old", "r1", prompts=["x"], seeds=[1], strengths=[1.0], dry_run=True)
    job = next(j for j in plan.jobs if j["input"]["settings"]["strength"] == 1.0)
    assert job["input"]["settings"]["releaseSha256"] == file_sha256(right)
    assert lorakit.worker.lora_weights_path(ws, job["input"]["lora"]) == right


# ==== 2. checkpoint hashes ==========================================================================================
@pytest.fixture
def ckpt_ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny: dict[str, Path]) -> Workspace:
    """A copy of the tiny diffusers folder as checkpoint ``ck`` with no recorded ``weights.sha256``, and a LoRA on
    it for eval grids."""
    models = tmp_path / "models"
    config = write_config(tmp_path / "local.json", {"modelsRoot": models, "checkpointsRoot": models / "checkpoints",
                                                    "lorasRoot": models / "loras"})
    set_env(monkeypatch, tmp_path / "data", config)
    ws = init_data_root()
    shutil.copytree(tiny["folder"], ws.config.checkpoints_root / "ck")
    register_checkpoint(ws, "ck", {"name": "ck", "family": "sd15", "supportedAssetTypes": ["icon"],
                                   "weights": {"kind": "config_relative", "base": "checkpointsRoot", "path": "ck"}})
    assert "sha256" not in get_checkpoint(ws, "ck")["weights"]
    grid_lora(ws, "ck")
    return ws


def planned_hash(ws: Workspace) -> str:
    plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["x"], seeds=[1], strengths=[1.0], dry_run=True)
    hashes = {job["input"]["settings"]["checkpointWeightsHash"] for job in plan.jobs}
    assert len(hashes) == 1 and plan.eval["grid"]["checkpointWeightsHash"] in hashes
    return hashes.pop()


def three_hashes(ws: Workspace, folder: Path) -> dict[str, str]:
    return {"weights_sha256": weights_sha256(folder),
            "checkpoint_weights_hash": checkpoint_weights_hash(ws, "ck", record=False),
            "eval grid": planned_hash(ws)}


def test_one_checkpoint_fingerprint_over_weight_files_only(ckpt_ws: Workspace) -> None:
    ws = ckpt_ws
    folder = ws.config.checkpoints_root / "ck"
    weight_files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))
    assert weight_files == ["text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                            "vae/diffusion_pytorch_model.safetensors"]
    first = three_hashes(ws, folder)
    # The documented fingerprint: sha256 over "<path>\0<file sha256>\n", sorted by path.
    expected = hashlib.sha256("".join(f"{rel}\0{file_sha256(folder / rel)}\n" for rel in weight_files).encode())
    assert first == {name: expected.hexdigest() for name in first}

    # Files that hold no weights change nothing.
    (folder / "README.md").write_text("# the tiny checkpoint\n", encoding="utf-8")
    (folder / "unet" / "config.json").write_text(json.dumps({"edited": True}), encoding="utf-8")
    (folder / "extra.json").write_text("{}", encoding="utf-8")
    assert three_hashes(ws, folder) == first

    # A weight file's bytes do: same size, one byte in the tensor data flipped.
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    second = three_hashes(ws, folder)
    assert len(set(second.values())) == 1 and second["weights_sha256"] != first["weights_sha256"]

    # Asked without record=False, it is computed the same way and recorded on the checkpoint.
    assert checkpoint_weights_hash(ws, "ck") == second["weights_sha256"]
    assert get_checkpoint(ws, "ck")["weights"]["sha256"] == second["weights_sha256"]


def test_the_cached_fingerprint_goes_when_a_weight_file_is_rewritten(ckpt_ws: Workspace, tmp_path: Path) -> None:
    folder = ckpt_ws.config.checkpoints_root / "ck"
    cache = tmp_path / "hash-cache"
    # Files written in the last moments are not cached (they could change again within one mtime tick); stamped
    # now, so the check does not hang on how long ago the fixture wrote them.
    now = time.time_ns()
    for file in folder.rglob("*"):
        os.utime(file, ns=(now, now))
    assert weights_sha256(folder, cache) and not list(cache.glob("*.json"))
    old = time.time_ns() - 10 * 10**9
    for file in folder.rglob("*"):
        os.utime(file, ns=(old, old))
    value = weights_sha256(folder, cache)
    assert value == weights_sha256(folder)
    (entry,) = cache.glob("*.json")
    # Prove the cache is read: a planted value comes back while the files are unchanged.
    planted = json.loads(entry.read_text(encoding="utf-8"))
    entry.write_text(json.dumps({**planted, "sha256": "f" * 64}), encoding="utf-8")
    assert weights_sha256(folder, cache) == "f" * 64

    # Rewritten in place with the same size and its mtime set back: the cache must not answer.
    vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    before = vae.stat()
    data = bytearray(vae.read_bytes())
    data[-1] ^= 0xFF
    with open(vae, "r+b") as handle:
        handle.write(bytes(data))
    os.utime(vae, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert vae.stat().st_size == before.st_size and vae.stat().st_mtime_ns == before.st_mtime_ns
    fresh = weights_sha256(folder)
    assert fresh != value
    assert weights_sha256(folder, cache) == fresh

    # Replaced by another file (a new inode), same size again.
    planted = json.loads(entry.read_text(encoding="utf-8"))
    entry.write_text(json.dumps({**planted, "sha256": "e" * 64}), encoding="utf-8")
    data[-2] ^= 0xFF
    replacement = vae.with_name("new.tmp")
    replacement.write_bytes(bytes(data))
    os.replace(replacement, vae)
    assert weights_sha256(folder, cache) == weights_sha256(folder) not in (fresh, "e" * 64)


# ==== 3. manifest lookup ============================================================================================
@pytest.fixture
def studio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Studio:
    """test_manual_adapter's studio (project demo, checkpoints ckpt15/ckptxl, dataset hero_v1 of three real images,
    LoRAs hero and hero_xl), with an empty tools root so kohya dry runs never look at a real install."""
    monkeypatch.setenv("LORAKIT_TOOLS_ROOT", str(tmp_path / "tools"))
    return build_studio(tmp_path, monkeypatch)


def test_manifest_lookup_takes_the_project_then_the_shared_scope(studio: Studio) -> None:
    ws = studio.ws
    shared = {**studio.manifest, "id": "only_shared", "scope": "baseline"}
    del shared["projectId"]
    ws.store.write("dataset", shared)
    both = {**studio.manifest, "id": "both"}
    ws.store.write("dataset", both, project="demo")
    ws.store.write("dataset", {**shared, "id": "both", "items": shared["items"][:1]})

    found = lorakit.load_manifest(ws, "only_shared", "demo")
    assert found == ws.store.read("dataset", "only_shared") and found["scope"] == "baseline"
    inputs = resolve_run_inputs(ws, "hero", "only_shared", project="demo")
    assert inputs.manifest == found
    assert inputs.dataset["scope"] == "baseline" and inputs.dataset["id"] == "only_shared"

    mine = lorakit.load_manifest(ws, "both", "demo")
    assert mine == ws.store.read("dataset", "both", "demo") and len(mine["items"]) == 3
    assert resolve_run_inputs(ws, "hero", "both", project="demo").manifest == mine
    assert len(lorakit.load_manifest(ws, "both")["items"]) == 1  # no project: the shared one


def test_a_missing_dataset_names_both_places(studio: Studio) -> None:
    ws = studio.ws
    with pytest.raises(RecordNotFoundError) as error:
        lorakit.load_manifest(ws, "nope", "demo")
    message = str(error.value)
    assert "dataset 'nope' not found" in message and "project 'demo'" in message and "the shared scope" in message
    before = tree_digest(ws.data_root)
    for adapter in ADAPTERS:
        with pytest.raises(RecordNotFoundError) as error:
            train_lora(ws, "hero", "nope", adapter=adapter, project="demo", dry_run=True, **ADAPTER_KW[adapter])
        assert str(error.value).startswith(message.split(";")[0]), (adapter, str(error.value))
    assert tree_digest(ws.data_root) == before


# ==== 4. the trainers' front halves =================================================================================
def dry_run(ws: Workspace, adapter: str, dataset: str = "hero_v1", **options):
    return train_lora(ws, "hero", dataset, adapter=adapter, project="demo", dry_run=True,
                      **ADAPTER_KW[adapter], **options)


def release_of(adapter: str, result) -> str:
    """The release id a dry run of ``adapter`` decided on."""
    if adapter == "native":
        assert result.plan["release"] == result.release_id
        return result.release_id
    if adapter == "manual":
        return result.release["id"]
    assert result.dry_run
    return result.plan.run_dir.name


@pytest.mark.parametrize("selection", [{"checkpoints": ["ckptxl"]}, {"checkpoint": "ckptxl"},
                                       {"checkpointId": "ckptxl"}], ids=["checkpoints", "checkpoint", "checkpointId"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_dataset_for_another_checkpoint_is_refused_unless_forced(studio: Studio, adapter: str,
                                                                   selection: dict) -> None:
    ws = studio.ws
    ws.store.write("dataset", {**studio.manifest, "id": "for_xl", "selection": {**studio.manifest["selection"],
                                                                                  "checkpoints": [], **selection}},
                   project="demo")
    before = tree_digest(ws.data_root)
    with pytest.raises(DatasetError, match=r"'for_xl' was built for checkpoint\(s\) ckptxl.*'ckpt15'"):
        dry_run(ws, adapter, "for_xl")
    with pytest.raises(DatasetError, match="was built for checkpoint"):
        resolve_run_inputs(ws, "hero", "for_xl", adapter=adapter, project="demo")
    result = dry_run(ws, adapter, "for_xl", force=True, release_id="forced")
    assert release_of(adapter, result) == "forced"
    assert tree_digest(ws.data_root) == before
    # The dataset's own checkpoint is no mismatch.
    assert release_of(adapter, train_lora(ws, "hero_xl", "for_xl", adapter=adapter, project="demo", dry_run=True,
                                          release_id="fits", **ADAPTER_KW[adapter])) == "fits"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_a_taken_release_id_is_refused(studio: Studio, adapter: str) -> None:
    ws = studio.ws
    add_release(ws, "hero", make_release("taken", weights={"kind": "external", "uri": "s3://old"}, sha256="ab" * 32,
                                         training={}), project="demo")
    before = tree_digest(ws.data_root)
    with pytest.raises(RecordError, match="'hero' already has a release 'taken'"):
        dry_run(ws, adapter, release_id="taken")
    with pytest.raises(RecordError, match="already has a release"):  # and not only in a dry run
        train_lora(ws, "hero", "hero_v1", adapter=adapter, project="demo", release_id="taken", **ADAPTER_KW[adapter],
                   **({"progress": False} if adapter == "native" else {}))
    assert tree_digest(ws.data_root) == before
    assert [r["id"] for r in get_lora(ws, "hero", project="demo")["releases"]] == ["taken"]


def test_every_adapter_takes_release_id_and_overrides_by_setting_name(studio: Studio) -> None:
    ws = studio.ws
    overrides = {"rank": 8, "batch_size": 2}
    native = dry_run(ws, "native", release_id="n1", overrides=overrides)
    assert native.release_id == "n1" and native.output_dir == ws.config.loras_root / "hero" / "n1"
    assert (native.plan["config"]["rank"], native.plan["config"]["batch_size"]) == (8, 2)

    manual = dry_run(ws, "manual", release_id="m1", overrides=overrides)
    assert manual.release["id"] == "m1"
    assert manual.release["training"]["config"] == {"rank": 8, "batch_size": 2}
    assert get_lora(ws, "hero", project="demo")["releases"] == []  # a dry run records nothing

    kohya = dry_run(ws, "kohya_ss", release_id="k1", overrides=overrides)
    assert kohya.plan.run_dir == ws.config.loras_root / "hero" / "k1"
    assert (kohya.plan.args["network_dim"], kohya.plan.args["train_batch_size"]) == (8, 2)
    assert "rank" not in kohya.plan.args and "batch_size" not in kohya.plan.args
    assert not kohya.plan.run_dir.exists()

    # The same front half under each of them: one RunInputs for one request.
    for adapter in ADAPTERS:
        inputs = resolve_run_inputs(ws, "hero", "hero_v1", adapter=adapter, project="demo", release_id="x1",
                                    overrides=overrides)
        assert (inputs.lora_id, inputs.release_id, inputs.checkpoint["id"], inputs.family.name) == \
            ("hero", "x1", "ckpt15", "sd15")
        assert inputs.manifest == studio.manifest and inputs.dataset["id"] == "hero_v1"


@pytest.mark.parametrize("adapter, options, wrong", [
    ("manual", {"resume": True}, "resume"),
    ("manual", {"preset": "sd15-style"}, "preset"),
    ("native", {"weights_kind": "external"}, "weights_kind"),
    ("native", {"adapter_args": ["--x"]}, "adapter_args"),
    ("kohya_ss", {"overrides": {"save_state_every": 5}}, "save_state_every"),
    ("kohya_ss", {"resume": True}, "resume"),
    ("kohya_ss", {"sha256": "ab" * 32}, "sha256"),
])
def test_an_option_the_adapter_does_not_take_is_an_error(studio: Studio, adapter: str, options: dict,
                                                         wrong: str) -> None:
    ws = studio.ws
    before = tree_digest(ws.data_root)
    extra = {k: v for k, v in ADAPTER_KW[adapter].items() if k not in options}
    with pytest.raises(TrainingError, match=rf"^{wrong} cannot be used with adapter {adapter}$"):
        train_lora(ws, "hero", "hero_v1", adapter=adapter, project="demo", dry_run=True, **extra, **options)
    assert tree_digest(ws.data_root) == before


# ==== 5. adapter names ==============================================================================================
def test_adapter_name_is_defined_once() -> None:
    for module in (lorakit.select, lorakit.evals, lorakit.worker):
        assert getattr(module, "adapter_name", adapter_name) is adapter_name, module.__name__
    assert adapter_name.__module__ == "lorakit.loras"
    sha_a, sha_b = "1" * 64, "2" * 64
    assert adapter_name("a.b", "r1", sha_a) != adapter_name("a_b", "r1", sha_b)
    assert adapter_name("a.b", "r1", sha_a).startswith("a_b__r1__")
    assert re.fullmatch(r"[A-Za-z0-9_]+", adapter_name("ui.icons-x", "r-1.2", sha_a))
    assert adapter_name("a", "r1", sha_a) != adapter_name("a", "r1", sha_b)  # a replaced file is a new adapter


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_the_picker_and_the_worker_load_a_release_under_one_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 tiny: dict[str, Path]) -> None:
    from lorakit.models.registry import make_tiny_checkpoint
    from lorakit.worker import PipelineCache, render_cell

    loras = tmp_path / "loras"
    config = write_config(tmp_path / "local.json", {"modelsRoot": tmp_path / "models",
                                                    "checkpointsRoot": tiny["checkpoints"], "lorasRoot": loras})
    set_env(monkeypatch, tmp_path / "data", config)
    ws = init_data_root()
    now = now_iso()
    ws.store.write("project", {"id": PROJECT, "name": "P", "createdAt": now, "updatedAt": now,
                               "policies": {"loraSelection": {"maxActiveLoras": 5}}})
    make_tiny_checkpoint(ws, "tiny", "sd15", asset_types=["icon"])
    shas = {}
    for lora_id, source in (("a.b", tiny["lora_a"]), ("a_b", tiny["lora_b"])):  # ids that sanitize alike
        rel = f"{lora_id}/r1/{lora_id}.safetensors"
        (loras / rel).parent.mkdir(parents=True)
        shutil.copy(source, loras / rel)
        shas[lora_id] = file_sha256(loras / rel)
        ref = {"kind": "config_relative", "base": "lorasRoot", "path": rel, "sha256": shas[lora_id]}
        ws.store.write("lora", lora_record(lora_id, "tiny", [approved("r1", weights=ref, sha256=shas[lora_id])]),
                       PROJECT)
    assert shas["a.b"] != shas["a_b"]

    cache = PipelineCache(ws)
    worker_names = {}
    for lora_id in shas:
        plan = create_eval_grid(ws, PROJECT, lora_id, "r1", prompts=["x"], seeds=[1], strengths=[1.0], width=64,
                                height=64, steps=1, dry_run=True)
        job = next(j for j in plan.jobs if j["input"]["settings"]["strength"] == 1.0)
        assert job["input"]["settings"]["releaseSha256"] == shas[lora_id]
        before = set(cache.get("tiny").adapters)
        render_cell(cache, job)
        (worker_names[lora_id],) = set(cache.get("tiny").adapters) - before
    assert worker_names == {i: adapter_name(i, "r1", shas[i]) for i in shas}
    assert len(set(worker_names.values())) == 2

    picked = lorakit.select.select_loras(ws, PROJECT, "tiny", "icon")
    assert sorted(p.lora_id for p in picked) == ["a.b", "a_b"]
    warm = cache.get("tiny")
    names = lorakit.select.apply_loras(warm.pipe, picked)
    assert names == [worker_names[p.lora_id] for p in picked]
    # The worker's adapters were reused, none loaded a second time under another name.
    loaded = [n for listed in warm.pipe.get_list_adapters().values() for n in listed]
    assert set(loaded) == set(worker_names.values())


# ==== 6. the release finder =========================================================================================
@pytest.fixture
def grid_ws(tmp_data_root: Path, tmp_path: Path) -> Workspace:
    ws = lorakit.open_workspace()
    register_checkpoint(ws, "ckpt", {"name": "ckpt", "family": "sd15", "supportedAssetTypes": ["icon"],
                                     "weights": {"kind": "config_relative", "base": "checkpointsRoot",
                                                 "path": "ckpt"}})
    (ws.config.checkpoints_root / "ckpt").mkdir(parents=True)
    grid_lora(ws, "ckpt")
    return ws


def test_an_unknown_release_lists_the_releases_there_are_everywhere(grid_ws: Workspace) -> None:
    ws = grid_ws
    assert not hasattr(lorakit.gate, "find_release")
    assert get_release(get_lora(ws, "icons", project=PROJECT), "r2")["id"] == "r2"
    expected = r"^LoRA 'icons' has no release 'r9' \(releases: r1, r2\)$"
    before = tree_digest(ws.data_root)
    with pytest.raises(RecordNotFoundError, match=expected):
        get_release(get_lora(ws, "icons", project=PROJECT), "r9")
    with pytest.raises(RecordNotFoundError, match=expected):
        lorakit.gate.review_release(ws, "icons", "r9", approve=True, project=PROJECT, reviewer="ana")
    with pytest.raises(RecordNotFoundError, match=expected):
        lorakit.reports.release_report(ws, "icons", "r9", project=PROJECT)
    with pytest.raises(RecordNotFoundError, match=expected):
        create_eval_grid(ws, PROJECT, "icons", "r9", prompts=["x"])
    with pytest.raises(RecordNotFoundError, match=expected):
        create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["x"], compare_release="r9")
    assert tree_digest(ws.data_root) == before
    # and a known one is found by each
    assert lorakit.reports.release_report(ws, "icons", "r2", project=PROJECT).release["id"] == "r2"
    assert create_eval_grid(ws, PROJECT, "icons", "r2", prompts=["x"], seeds=[1], strengths=[1.0],
                            dry_run=True).eval["grid"]["releaseIds"] == ["r2"]


# ==== 7. times and processes ========================================================================================
def test_now_iso_formats_a_given_moment() -> None:
    assert now_iso(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"
    plus_two = timezone(timedelta(hours=2))
    assert now_iso(datetime(2026, 1, 2, 5, 4, 5, 678901, tzinfo=plus_two)) == "2026-01-02T03:04:05.678Z"
    assert now_iso(datetime(2026, 1, 1, 1, 0, 0, 5000, tzinfo=plus_two)) == "2025-12-31T23:00:00.005Z"
    assert now_iso(datetime(2026, 1, 2, 3, 4, 5, 678901)) == "2026-01-02T03:04:05.678Z"  # naive: as it is
    assert now_iso(datetime(2026, 1, 2, 3, 4, 5)) == "2026-01-02T03:04:05.000Z"
    before = datetime.now(UTC).replace(microsecond=0)
    current = now_iso()
    assert ISO_MS_Z.match(current)
    assert before <= datetime.fromisoformat(current.replace("Z", "+00:00")) <= datetime.now(UTC)


def test_the_worker_stamps_jobs_with_now_iso(grid_ws: Workspace) -> None:
    ws = grid_ws
    assert not hasattr(lorakit.worker, "iso")
    assert lorakit.worker.now_iso is now_iso
    plan = create_eval_grid(ws, PROJECT, "icons", "r1", prompts=["x"], seeds=[1], strengths=[1.0], eval_id="t1")
    assert all(ISO_MS_Z.match(job["createdAt"]) for job in plan.jobs)
    claim = lorakit.worker.claim_next_job(ws, [PROJECT], "host:1", 90.0)
    assert claim is not None
    job = ws.store.read("job", claim.job["id"], PROJECT)
    lease = job["lease"]
    stamps = [job["updatedAt"], job["startedAt"], lease["claimedAt"], lease["expiresAt"]]
    assert all(ISO_MS_Z.match(s) for s in stamps), stamps
    assert job["updatedAt"] == job["startedAt"] == lease["claimedAt"]  # one moment, formatted once each
    parse = lorakit.worker.parse_time
    assert parse(lease["expiresAt"]) - parse(lease["claimedAt"]) == timedelta(seconds=90)
    claimed_at = parse(lease["claimedAt"])
    assert now_iso(claimed_at) == lease["claimedAt"]


def test_one_liveness_check_for_processes() -> None:
    assert lorakit.worker.pid_alive is lorakit.locks.pid_alive
    assert lorakit.locks.pid_alive(os.getpid()) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert lorakit.locks.pid_alive(child.pid) is False
    # The worker's lease check asks it: a lease of a dead process on this host is free before it runs out.
    host = socket.gethostname()
    now = datetime.now(UTC)
    future = now_iso(now + timedelta(seconds=600))
    job = {"status": "running", "attempt": 1, "maxAttempts": 3, "lease": {"owner": f"{host}:{child.pid}",
                                                                          "expiresAt": future}}
    assert lorakit.worker.lease_state(job, now, host) == "claimable"
    job["lease"]["owner"] = f"{host}:{os.getpid()}"
    assert lorakit.worker.lease_state(job, now, host) == "busy"


# ==== 8. atomic writes ==============================================================================================
def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_writes_replace_whole_and_keep_the_mode(tmp_path: Path) -> None:
    root = Root(tmp_path)
    target = tmp_path / "out" / "record.json"
    target.parent.mkdir()
    target.write_bytes(b"old contents")
    target.chmod(0o640)
    with root.atomic(target) as handle:
        handle.write(b"new contents")
        assert target.read_bytes() == b"old contents"  # not visible before the block ends
        assert len(leftovers(target.parent, {"record.json"})) == 1  # the temporary file, in the same folder
    assert target.read_bytes() == b"new contents"
    assert target.stat().st_mode & 0o777 == 0o640
    assert leftovers(target.parent, {"record.json"}) == []

    target.chmod(0o604)
    root.write_atomic(target, b"third", durable=False)
    assert target.read_bytes() == b"third" and target.stat().st_mode & 0o777 == 0o604

    # A new file gets what the umask allows, as open() gives it.
    fresh = target.parent / "fresh.json"
    root.write_atomic(fresh, b"{}")
    plain = target.parent / "plain.json"
    plain.write_bytes(b"{}")
    assert fresh.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert leftovers(target.parent, {"record.json", "fresh.json", "plain.json"}) == []


def test_an_atomic_write_leaves_the_old_file_on_an_error(tmp_path: Path) -> None:
    root = Root(tmp_path)
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old weights")
    target.chmod(0o640)
    with pytest.raises(RuntimeError, match="writer failed"):
        with root.atomic(target) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old weights" and target.stat().st_mode & 0o777 == 0o640
    assert leftovers(tmp_path, {"weights.safetensors"}) == []
    # and for a file that did not exist: still none
    with pytest.raises(KeyboardInterrupt):
        with root.atomic(tmp_path / "new.bin") as handle:
            handle.write(b"x")
            raise KeyboardInterrupt
    assert leftovers(tmp_path, {"weights.safetensors"}) == []


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past ``limit`` bytes fail with EFBIG (a real failure of the write in the middle of the file)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_save_lora_file_never_leaves_a_partial_file(tmp_path: Path) -> None:
    import torch

    from lorakit.train.kohya_format import read_lora_file, save_lora_file

    folder = tmp_path / "hero" / "r1"
    path = folder / "hero.safetensors"
    small = {"lora_unet_x.lora_down.weight": torch.ones(4, 8), "lora_unet_x.alpha": torch.tensor(4.0)}
    sha = save_lora_file(path, small, {"ss_network_dim": "4"})
    assert sha == file_sha256(path)
    old = path.read_bytes()
    assert read_lora_file(path)[1] == {"ss_network_dim": "4"}

    large = {"lora_unet_x.lora_down.weight": torch.randn(512, 512)}  # 1 MiB: fails a quarter of the way in
    with file_size_limit(256 * 1024), pytest.raises(OSError, match="File too large"):
        save_lora_file(path, large, {"ss_network_dim": "512"})
    assert path.read_bytes() == old
    assert leftovers(folder, {"hero.safetensors"}) == []

    fresh = folder / "other.safetensors"
    with file_size_limit(256 * 1024), pytest.raises(OSError, match="File too large"):
        save_lora_file(fresh, large, {})
    assert not fresh.exists()
    assert leftovers(folder, {"hero.safetensors"}) == []
    # The same write without the limit succeeds: the limit was the failure.
    assert save_lora_file(fresh, large, {}) == file_sha256(fresh)
    assert torch.equal(read_lora_file(fresh)[0]["lora_unet_x.lora_down.weight"], large["lora_unet_x.lora_down.weight"])


def test_a_dangling_active_release_is_a_recommendation_problem_not_a_crash() -> None:
    from lorakit.gate import recommendation_problems

    lora = {"id": "icons", "activeReleaseId": "gone", "releases": [{"id": "r1", "status": "approved"}]}
    assert recommendation_problems(lora, []) == ["active release 'gone' does not exist in LoRA 'icons'"]


def test_the_picker_and_the_eval_grid_read_a_release_hash_alike() -> None:
    from lorakit.loras import recorded_sha256
    from lorakit.select import resolve_loras

    upper = "AB" * 32  # the weights-ref schema accepts upper-case hex
    lora = {"id": "icons", "name": "Icons", "scope": "baseline", "checkpointId": "sd15", "assetTypes": ["icon"],
            "releases": [{"id": "r1", "status": "approved", "createdAt": "2026-01-01T00:00:00.000Z",
                          "weights": {"kind": "absolute", "path": "/w/icons.safetensors", "sha256": upper}}]}
    (picked,) = resolve_loras(None, "sd15", "icon", [lora])
    assert picked.sha256 == recorded_sha256(lora["releases"][0]) == upper.lower()
    assert recorded_sha256({"id": "r2"}) is None
