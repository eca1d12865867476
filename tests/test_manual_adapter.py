"""``lorakit lora train --adapter manual``: recording a run trained elsewhere, end to end.

Real records in a temporary data root, real weights files (kohya-format safetensors written with the
``safetensors`` library), the real command line (``lorakit.cli.main``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from lorakit.cli import main
from lorakit.datasets import manifest_hash
from lorakit.errors import ConfigError
from lorakit.loras import create_lora, get_lora
from lorakit.store import now_iso
from lorakit.train.manual import (
    dataset_reference,
    manual_config,
    read_safetensors_metadata,
    record_manual_run,
    weights_reference,
    weights_summary,
)
from lorakit.workspace import Workspace, init_data_root

SELECTION = {"project": "demo", "status": "approved", "assetTypes": ["character"], "checkpoints": [], "tags": [],
             "tagAny": False, "excludeTags": [], "caption": "tags", "noSpecTags": False, "withTokens": False}
CAPTIONS = ["hero, red cape", "hero, blue cape", None]  # the last image has no caption


@dataclass
class Studio:
    """A data root with a project, two checkpoints, a dataset of three images and two LoRAs."""

    ws: Workspace
    root: Path
    manifest: dict

    @property
    def loras_root(self) -> Path:
        return self.ws.config.loras_root

    def lora(self, lora_id: str = "hero", project: str | None = "demo") -> dict:
        return get_lora(self.ws, lora_id, project=project)


def build_studio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Studio:
    data = tmp_path / "data"
    models = tmp_path / "models"
    config = tmp_path / "local.json"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "checkpoints"),
                                            "lorasRoot": str(models / "loras")}}), encoding="utf-8")
    monkeypatch.setenv("LORAKIT_DATA_ROOT", str(data))
    monkeypatch.setenv("LORAKIT_CONFIG", str(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ws = init_data_root()
    now = now_iso()
    ws.store.write("project", {"id": "demo", "name": "Demo", "createdAt": now, "updatedAt": now})
    for ckpt, family in (("ckpt15", "sd15"), ("ckptxl", "sdxl")):
        (models / "checkpoints" / ckpt).mkdir(parents=True)
        ws.store.write("checkpoint", {
            "id": ckpt, "name": ckpt, "createdAt": now, "updatedAt": now, "supportedAssetTypes": ["character"],
            "family": family, "weights": {"kind": "config_relative", "base": "checkpointsRoot", "path": ckpt},
        })
    items = []
    for i, caption in enumerate(CAPTIONS):
        rel = f"files/demo/hero_{i}.png"
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (40 * i, 90, 200)).save(data / rel, format="PNG")
        item = {"assetId": f"a{i}", "assetVersionId": f"v{i}", "variantId": f"x{i}", "path": rel}
        if caption:
            item["caption"] = caption
        item["tags"] = ["hero"]
        item["sha256"] = hashlib.sha256((data / rel).read_bytes()).hexdigest()
        items.append(item)
    manifest = {"id": "hero_v1", "scope": "project", "projectId": "demo", "createdAt": now, "updatedAt": now,
                "selection": SELECTION, "items": items, "manifestHash": manifest_hash(items)}
    ws.store.write("dataset", manifest, project="demo")
    create_lora(ws, "hero", name="Hero", scope="project", project="demo", checkpoint="ckpt15", asset_types=["character"])
    create_lora(ws, "hero_xl", name="Hero XL", scope="project", project="demo", checkpoint="ckptxl",
                asset_types=["character"])
    return Studio(ws=ws, root=data, manifest=manifest)


def write_kohya_lora(path: Path, rank: int = 16, alpha: float = 8.0, base: str = "v1-5-pruned.safetensors") -> str:
    """A small kohya-format LoRA file with the ``ss_*`` metadata sd-scripts writes; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{module}.lora_down.weight": np.zeros((rank, 8), np.float32),
               f"{module}.lora_up.weight": np.zeros((8, rank), np.float32),
               f"{module}.alpha": np.array(alpha, np.float32)}
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                                            "ss_network_module": "networks.lora", "ss_sd_model_name": base,
                                            "ss_base_model_version": "sd_v1", "ss_output_name": path.stem})
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def studio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Studio:
    return build_studio(tmp_path, monkeypatch)


MANUAL = ["lora", "train", "--adapter", "manual", "--lora", "hero", "--dataset", "hero_v1", "--project", "demo"]


# ---- end to end through the command line ---------------------------------------------------------------
def test_manual_run_is_recorded_like_the_original_tool(studio: Studio, capsys: pytest.CaptureFixture) -> None:
    sha = write_kohya_lora(studio.loras_root / "hero" / "ext" / "hero_ext.safetensors", rank=16, alpha=8.0)
    code = main(MANUAL + ["--scope", "project", "--release", "r1", "--set-active", "--notes", "trained on a 4090",
                          "--weights-kind", "config_relative", "--weights-base", "lorasRoot",
                          "--weights-path", "hero/ext/hero_ext.safetensors",
                          "--config", '{"optimizer": "prodigy", "rank": 8}', "--rank", "16", "--steps", "2000",
                          "--batch", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recorded release r1 of LoRA hero (project demo) as a candidate and set it active" in out
    assert f"sha256 {sha}" in out and "rank 16" in out

    lora = studio.lora()
    assert lora["activeReleaseId"] == "r1"
    (release,) = lora["releases"]
    assert release["id"] == "r1" and release["status"] == "candidate" and release["notes"] == "trained on a 4090"
    assert release["weights"] == {"kind": "config_relative", "base": "lorasRoot",
                                  "path": "hero/ext/hero_ext.safetensors", "sha256": sha}
    assert release["sha256"] == sha
    assert release["evaluation"] == {"status": "pending"}
    training = release["training"]
    assert training["adapter"] == {"kind": "manual"}
    assert training["datasetId"] == "hero_v1" and training["datasetScope"] == "project"
    assert training["datasetProjectId"] == "demo"
    assert training["manifestHash"] == studio.manifest["manifestHash"]
    assert training["selection"] == SELECTION
    assert training["checkpointId"] == "ckpt15"
    # --config, then the flags on top; kept as given, no defaults added.
    assert training["config"] == {"optimizer": "prodigy", "rank": 16, "steps": 2000, "batch_size": 2}
    assert training["weightsMetadata"] == {"rank": 16, "alpha": 8.0, "networkModule": "networks.lora",
                                           "baseModel": "v1-5-pruned.safetensors", "baseModelVersion": "sd_v1"}


def test_config_file_and_absolute_weights(studio: Studio, tmp_path: Path) -> None:
    weights = tmp_path / "elsewhere" / "hero.safetensors"
    sha = write_kohya_lora(weights, rank=4, alpha=1.0)
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps({"resolution": 768, "epochs": 10}), encoding="utf-8")
    assert main(MANUAL + ["--weights-kind", "absolute", "--weights-path", str(weights), "--config-file",
                          str(config_file), "--epochs", "12", "--sha256", sha.upper()]) == 0
    (release,) = studio.lora()["releases"]
    assert release["weights"]["kind"] == "absolute" and release["sha256"] == sha
    assert release["training"]["config"] == {"resolution": 768, "epochs": 12}
    assert release["training"]["weightsMetadata"]["rank"] == 4
    assert "activeReleaseId" not in studio.lora()


def test_a_sha256_that_disagrees_with_the_file_is_refused(studio: Studio, capsys: pytest.CaptureFixture) -> None:
    write_kohya_lora(studio.loras_root / "hero" / "x.safetensors")
    code = main(MANUAL + ["--weights-kind", "config_relative", "--weights-base", "lorasRoot",
                          "--weights-path", "hero/x.safetensors", "--sha256", "0" * 64])
    err = capsys.readouterr().err
    assert code == 1
    assert "does not match" in err and "its sha256 is" in err
    assert studio.lora()["releases"] == []


def test_unreachable_weights_are_recorded_as_given(studio: Studio, capsys: pytest.CaptureFixture) -> None:
    sha = "ab" * 32
    assert main(MANUAL + ["--weights-kind", "external", "--weights-uri", "https://models.example/hero.safetensors",
                          "--sha256", sha]) == 0
    assert "not on this machine" in capsys.readouterr().err
    (release,) = studio.lora()["releases"]
    assert release["weights"] == {"kind": "external", "uri": "https://models.example/hero.safetensors", "sha256": sha}
    assert "weightsMetadata" not in release["training"]

    # No file and no --sha256: recorded without a hash at all (the release schema allows it).
    assert main(MANUAL + ["--weights-kind", "config_relative", "--weights-base", "lorasRoot",
                          "--weights-path", "hero/later.safetensors"]) == 0
    second = studio.lora()["releases"][1]
    assert "sha256" not in second and "sha256" not in second["weights"]


def test_dry_run_and_manifest_path(studio: Studio, capsys: pytest.CaptureFixture) -> None:
    write_kohya_lora(studio.loras_root / "hero" / "x.safetensors")
    manifest_path = studio.root / "projects" / "demo" / "datasets" / "hero_v1.json"
    args = ["lora", "train", "--adapter", "manual", "--lora", "hero", "--project", "demo", "--dataset",
            str(manifest_path), "--weights-kind", "config_relative", "--weights-base", "lorasRoot",
            "--weights-path", "hero/x.safetensors"]
    assert main(args + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "dry run: nothing recorded" in printed and '"kind": "manual"' in printed
    assert studio.lora()["releases"] == []
    assert main(args) == 0
    assert studio.lora()["releases"][0]["training"]["datasetId"] == "hero_v1"


@pytest.mark.parametrize("extra, message", [
    ([], "needs --weights-kind"),
    (["--weights-kind", "config_relative", "--weights-path", "a.safetensors"], "needs --weights-base and --weights-path"),
    (["--weights-kind", "config_relative", "--weights-base", "lorasRoot", "--weights-path", "../a.safetensors"],
     "must be relative and stay under its root"),
    (["--weights-kind", "absolute", "--weights-path", "rel.safetensors"], "needs an absolute --weights-path"),
    (["--weights-kind", "external"], "needs --weights-uri"),
    (["--weights-kind", "external", "--weights-uri", "u", "--sha256", "xyz"], "--sha256 must be 64 hex digits"),
    (["--weights-kind", "external", "--weights-uri", "u", "--run"], "--run cannot be used with --adapter manual"),
    (["--weights-kind", "external", "--weights-uri", "u", "--preset", "sd15-style"], "--preset cannot be used"),
    (["--weights-kind", "external", "--weights-uri", "u", "--config", "[1]"], "must be a JSON object"),
])
def test_bad_manual_arguments_are_clear_errors(studio: Studio, capsys: pytest.CaptureFixture, extra, message) -> None:
    assert main(MANUAL + extra) == 1
    assert message in capsys.readouterr().err
    assert studio.lora()["releases"] == []


def test_weights_flags_need_the_manual_adapter(studio: Studio, capsys: pytest.CaptureFixture) -> None:
    assert main(["lora", "train", "--lora", "hero", "--dataset", "hero_v1", "--project", "demo",
                 "--weights-kind", "external", "--weights-uri", "u"]) == 1
    assert "--weights-kind, --weights-uri cannot be used with --adapter native" in capsys.readouterr().err


def test_the_native_trainer_stays_the_default(studio: Studio, capsys: pytest.CaptureFixture) -> None:
    # No --adapter: lora train is the native trainer's, unchanged (its dry run prints its plan as JSON).
    assert main(["lora", "train", "--lora", "hero", "--dataset", "hero_v1", "--project", "demo", "--dry-run",
                 "--steps", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["lora"] == "hero" and plan["steps"] == 2
    assert studio.lora()["releases"] == []


def test_missing_records_and_taken_release_ids(studio: Studio) -> None:
    common = {"weights_kind": "external", "weights_uri": "u", "project": "demo"}
    with pytest.raises(Exception, match="dataset 'nope' not found"):
        record_manual_run(studio.ws, "hero", "nope", **common)
    with pytest.raises(Exception, match="LoRA 'nobody' not found"):
        record_manual_run(studio.ws, "nobody", "hero_v1", **common)
    record_manual_run(studio.ws, "hero", "hero_v1", release_id="r1", **common)
    with pytest.raises(Exception, match="already has a release 'r1'"):
        record_manual_run(studio.ws, "hero", "hero_v1", release_id="r1", **common)


# ---- the pure parts --------------------------------------------------------------------------------------
def test_pure_helpers() -> None:
    assert manual_config({"rank": 8}, {"rank": 4, "lr": 1e-4}, {"rank": None, "batch": 2}) == \
        {"rank": 4, "lr": 1e-4, "batch_size": 2}
    assert weights_reference("config_relative", base="lorasRoot", path="a\\b.safetensors")["path"] == "a/b.safetensors"
    with pytest.raises(ConfigError):
        weights_reference("somewhere")
    assert weights_summary({"ss_network_dim": "None", "ss_network_alpha": "x"}) == {}
    assert dataset_reference({"id": "d", "scope": "baseline", "items": [{"assetId": "a", "assetVersionId": "v",
                                                                          "variantId": "x", "path": "p"}]})["manifestHash"]


def test_safetensors_header_reader(tmp_path: Path) -> None:
    path = tmp_path / "l.safetensors"
    write_kohya_lora(path, rank=2)
    assert read_safetensors_metadata(path)["ss_network_dim"] == "2"
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    assert read_safetensors_metadata(tmp_path / "junk.safetensors") is None
    (tmp_path / "short").write_bytes(b"12")
    assert read_safetensors_metadata(tmp_path / "short") is None
