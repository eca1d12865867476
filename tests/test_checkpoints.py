"""Checkpoint registry and offline loading: real files in a temp workspace, the real diffusers stack, no mocks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from lorakit.cli import main
from lorakit.errors import ConfigError, InvalidIdError, RecordError, RecordNotFoundError
from lorakit.models import (
    add_checkpoint,
    build_tiny_pipeline,
    checkpoint_family,
    checkpoint_weights_hash,
    export_single_file,
    get_checkpoint,
    list_checkpoints,
    load_pipeline,
    make_tiny_checkpoint,
    verify_checkpoint,
    weights_sha256,
)
from lorakit.models.loading import CONFIGS_DIR, complete_config_folder
from lorakit.models.single_file import pipeline_to_ldm_state_dict, vae_to_ldm
from lorakit.workspace import init_data_root


@pytest.fixture
def ws(tmp_path, monkeypatch):
    models = tmp_path / "models"
    config = tmp_path / "local.json"
    config.write_text(json.dumps({"paths": {"modelsRoot": str(models), "checkpointsRoot": str(models / "ckpt"),
                                            "lorasRoot": str(models / "loras")}}))
    monkeypatch.setenv("LORAKIT_CONFIG", str(config))
    monkeypatch.setenv("LORAKIT_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    workspace = init_data_root()
    workspace.config.checkpoints_root.mkdir(parents=True)
    return workspace


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly, so "offline" means no request was even tried."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def weight_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def assert_same_weights(expected, actual) -> None:
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def record_bytes(ws, checkpoint_id: str) -> bytes:
    return ws.store.path("checkpoint", checkpoint_id).read_bytes()


# ---- make-tiny -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_make_tiny_is_deterministic_and_registered(ws, family):
    record = make_tiny_checkpoint(ws, "tiny_a", family, seed=3)
    make_tiny_checkpoint(ws, "tiny_b", family, seed=3)
    folder_a, folder_b = ws.config.checkpoints_root / "tiny_a", ws.config.checkpoints_root / "tiny_b"
    files_a = weight_files(folder_a)
    assert len(files_a) == (3 if family == "sd15" else 4)  # unet, vae, text encoder(s)
    assert files_a == weight_files(folder_b)  # byte-identical weights for the same family and seed

    assert record["family"] == family
    assert record["weights"] == {"kind": "config_relative", "base": "checkpointsRoot", "path": "tiny_a",
                                 "sha256": weights_sha256(folder_a), "hashOf": "folder"}
    assert record["defaultGenerationParams"]["width"] == 64
    assert get_checkpoint(ws, "tiny_a") == record
    assert checkpoint_family(record) == family

    # Same family and seed: the folder is reused, not rebuilt. Another seed: rebuilt, other weights.
    stamp = (folder_a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    make_tiny_checkpoint(ws, "tiny_a", family, seed=3)
    assert (folder_a / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    changed = make_tiny_checkpoint(ws, "tiny_a", family, seed=4)
    assert weight_files(folder_a) != files_a
    assert changed["weights"]["sha256"] != record["weights"]["sha256"]
    assert changed["createdAt"] == record["createdAt"]


def test_make_tiny_refuses_a_foreign_folder_and_bad_input(ws):
    foreign = ws.config.checkpoints_root / "mine"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"precious")
    with pytest.raises(ConfigError, match="not a lorakit tiny checkpoint"):
        make_tiny_checkpoint(ws, "mine", "sd15")
    assert (foreign / "model.safetensors").read_bytes() == b"precious"
    with pytest.raises(ConfigError, match="unknown model family 'sd3'"):
        make_tiny_checkpoint(ws, "t", "sd3")
    with pytest.raises(InvalidIdError):
        make_tiny_checkpoint(ws, "../t", "sd15")
    assert list_checkpoints(ws) == []


# ---- verify, add, list -----------------------------------------------------------------------------------
def test_verify_reports_components_and_records_the_hash(ws, no_network, capsys):
    make_tiny_checkpoint(ws, "tiny", "sd15")
    ws.store.update("checkpoint", "tiny", lambda r: {**r, "weights": {k: v for k, v in r["weights"].items()
                                                                     if k not in ("sha256", "hashOf")}})
    report = verify_checkpoint(ws, "tiny")
    assert report["family"] == "sd15" and report["format"] == "diffusers"
    assert report["pipeline"] == "StableDiffusionPipeline"
    assert set(report["components"]) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    reference = build_tiny_pipeline("sd15", 0)
    assert report["components"]["unet"]["parameters"] == sum(p.numel() for p in reference.unet.parameters())
    assert report["dtype"] == "float32"
    assert report["sha256"] == weights_sha256(ws.config.checkpoints_root / "tiny")
    assert get_checkpoint(ws, "tiny")["weights"]["sha256"] == report["sha256"]
    assert checkpoint_weights_hash(ws, "tiny") == report["sha256"]

    assert main(["checkpoint", "verify", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "UNet2DConditionModel" in out and report["sha256"] in out


def test_add_and_list_keep_prompt_templates(ws, capsys):
    folder = ws.config.checkpoints_root / "styles" / "base15"
    build_tiny_pipeline("sd15", 0).save_pretrained(folder)
    assert main(["checkpoint", "add", "base15", "--family", "sd15", "--path", "styles/base15", "--name", "Base",
                 "--asset-types", "icon,tile", "--asset-types", "sprite"]) == 0
    record = get_checkpoint(ws, "base15")
    assert record["weights"] == {"kind": "config_relative", "base": "checkpointsRoot", "path": "styles/base15"}
    assert record["supportedAssetTypes"] == ["icon", "tile", "sprite"] and record["name"] == "Base"

    templates = {"basePositive": "game asset", "baseNegative": "blurry", "perAssetType": {"icon": {"positive": "icon"}}}
    ws.store.update("checkpoint", "base15", lambda r: {**r, "promptTemplates": templates, "notes": "keep me"})
    # An absolute path under the root is stored relative; the update keeps what it was not asked to change.
    add_checkpoint(ws, "base15", "sd15", folder)
    updated = get_checkpoint(ws, "base15")
    assert updated["promptTemplates"] == templates and updated["notes"] == "keep me"
    assert updated["weights"]["path"] == "styles/base15" and updated["name"] == "Base"
    assert updated["supportedAssetTypes"] == ["icon", "tile", "sprite"]
    assert updated["createdAt"] == record["createdAt"]

    # A downloaded folder with only fp16 variant files loads too.
    build_tiny_pipeline("sd15", 0).save_pretrained(ws.config.checkpoints_root / "half", variant="fp16")
    add_checkpoint(ws, "half", "sd15", "half")
    assert_same_weights(build_tiny_pipeline("sd15", 0).unet, load_pipeline(ws, "half").unet)

    capsys.readouterr()
    assert main(["checkpoint", "list"]) == 0
    out = capsys.readouterr().out
    assert "base15" in out and "sd15" in out and "ok" in out
    assert main(["checkpoint", "list", "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == ["base15", "half"]


# ---- single files, offline -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_loads_offline(ws, no_network, family):
    reference = build_tiny_pipeline(family, 7)
    export_single_file(reference, ws.config.checkpoints_root / "dl" / f"tiny_{family}.safetensors")
    add_checkpoint(ws, "single", family, f"dl/tiny_{family}.safetensors")
    pipe = load_pipeline(ws, "single")
    assert type(pipe) is type(reference)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(reference, name, None) is not None:
            assert_same_weights(getattr(reference, name), getattr(pipe, name))
    assert type(pipe.scheduler) is type(reference.scheduler)
    if family == "sdxl":
        assert pipe.tokenizer_2.pad_token == "!"
    if family == "sd15":  # rendering and verify work the same for both; once keeps the suite fast
        image = pipe("a red potion", num_inference_steps=2, height=64, width=64, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert image.shape == (64, 64, 3)
        report = verify_checkpoint(ws, "single")
        assert report["format"] == "safetensors"
        assert get_checkpoint(ws, "single")["weights"]["sha256"] == weights_sha256(
            ws.config.checkpoints_root / "dl" / f"tiny_{family}.safetensors")


def test_single_file_with_config_folder_named_on_the_record(ws, no_network):
    reference = build_tiny_pipeline("sd15", 2)
    file = export_single_file(reference, ws.config.checkpoints_root / "m.safetensors")
    file.with_name("m.safetensors.config").rename(ws.config.checkpoints_root / "m-config")
    add_checkpoint(ws, "m", "sd15", "m.safetensors")
    # Without its own config the tiny file is read with the full-size SD1.5 config, which it does not fit.
    with pytest.raises(ConfigError, match=r"does not fit the config folder .*configs/sd15.*--config"):
        load_pipeline(ws, "m")
    record = add_checkpoint(ws, "m", "sd15", "m.safetensors", config_path="m-config")
    assert record["weights"]["config"] == "m-config"
    assert_same_weights(reference.unet, load_pipeline(ws, "m").unet)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_shipped_configs_are_the_full_size_architectures(tmp_path, no_network, family):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = complete_config_folder(CONFIGS_DIR / family, family, tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" and (folder / "model_index.json").is_file()
    assert complete_config_folder(CONFIGS_DIR / family, family, tmp_path / "cache") == folder
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
        if family == "sdxl":
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
            counts.append(sum(p.numel() for p in text_2.parameters()))
    # The published parameter counts of SD1.5 and SDXL base 1.0.
    expected = {"sd15": [859_520_964, 83_653_863, 123_060_480],
                "sdxl": [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]}
    assert counts == expected[family]
    ids = CLIPTokenizer.from_pretrained(folder / "tokenizer")("a red potion").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    if family == "sdxl":
        assert CLIPTokenizer.from_pretrained(folder / "tokenizer_2").pad_token == "!"


# ---- separate VAE ----------------------------------------------------------------------------------------
def test_separate_vae_folder_and_single_file_are_honoured(ws, no_network):
    make_tiny_checkpoint(ws, "tiny", "sd15", seed=0)
    other = build_tiny_pipeline("sd15", 5).vae
    other.save_pretrained(ws.config.checkpoints_root / "vae-folder")
    from safetensors.torch import load_file, save_file

    save_file({"first_stage_model." + k: v.contiguous() for k, v in vae_to_ldm(other.state_dict(), dict(other.config)).items()},
              str(ws.config.checkpoints_root / "vae.safetensors"))
    default = load_file(ws.config.checkpoints_root / "tiny" / "vae" / "diffusion_pytorch_model.safetensors")
    for vae_path in ("vae-folder", "vae.safetensors"):
        record = add_checkpoint(ws, "tiny", "sd15", "tiny", vae_path=vae_path)
        assert record["vaeWeights"]["path"] == vae_path
        vae = load_pipeline(ws, "tiny").vae
        assert_same_weights(other, vae)
        assert not torch.equal(vae.decoder.conv_out.weight, default["decoder.conv_out.weight"])
    report = verify_checkpoint(ws, "tiny")
    assert get_checkpoint(ws, "tiny")["vaeWeights"]["sha256"] == report["vaeSha256"]
    # Re-adding without --vae drops it again.
    assert "vaeWeights" not in add_checkpoint(ws, "tiny", "sd15", "tiny")


# ---- pickle ----------------------------------------------------------------------------------------------
def test_pickle_is_refused_unless_allowed(ws, no_network, capsys):
    reference = build_tiny_pipeline("sd15", 1)
    file = export_single_file(reference, ws.config.checkpoints_root / "old.safetensors")
    ckpt = ws.config.checkpoints_root / "old.ckpt"
    torch.save({"state_dict": pipeline_to_ldm_state_dict(reference)}, ckpt)
    file.with_name("old.safetensors.config").rename(ws.config.checkpoints_root / "old.ckpt.config")
    file.unlink()

    with pytest.raises(ConfigError, match="pickle"):
        add_checkpoint(ws, "old", "sd15", "old.ckpt")
    assert main(["checkpoint", "add", "old", "--family", "sd15", "--path", "old.ckpt"]) == 1
    assert "--allow-pickle" in capsys.readouterr().err
    assert not ws.store.exists("checkpoint", "old")

    assert main(["checkpoint", "add", "old", "--family", "sd15", "--path", "old.ckpt", "--allow-pickle"]) == 0
    assert get_checkpoint(ws, "old")["allowPickle"] is True
    assert_same_weights(reference.unet, load_pipeline(ws, "old").unet)
    with pytest.raises(ConfigError, match="pickle"):
        load_pipeline(ws, "old", allow_pickle=False)


# ---- errors leave records untouched ----------------------------------------------------------------------
def test_errors_are_clear_and_leave_records_untouched(ws, capsys):
    make_tiny_checkpoint(ws, "tiny", "sd15")
    before = record_bytes(ws, "tiny")
    (ws.config.checkpoints_root / "not-a-pipeline").mkdir()
    (ws.config.checkpoints_root / "weights.onnx").write_bytes(b"x")
    bad_calls = [
        (lambda: add_checkpoint(ws, "tiny", "sd15", "missing.safetensors"), ConfigError, "not found"),
        (lambda: add_checkpoint(ws, "tiny", "sd3", "tiny"), ConfigError, "unknown model family"),
        (lambda: add_checkpoint(ws, "tiny", "sd15", "not-a-pipeline"), ConfigError, "model_index.json"),
        (lambda: add_checkpoint(ws, "tiny", "sd15", "weights.onnx"), ConfigError, "unknown weights format"),
        (lambda: add_checkpoint(ws, "tiny", "sd15", "../escape"), ConfigError, "no '..'"),
        (lambda: add_checkpoint(ws, "tiny", "sd15", "/somewhere/else.safetensors"), ConfigError, "not under"),
        (lambda: add_checkpoint(ws, "tiny", "sd15", "tiny", vae_path="no-vae"), ConfigError, "not found"),
        (lambda: add_checkpoint(ws, "tiny", "sd15", "tiny", base="dataRoot"), ConfigError, "unknown base"),
        (lambda: add_checkpoint(ws, "ti/ny", "sd15", "tiny"), InvalidIdError, "invalid checkpoint id"),
    ]
    for call, error, message in bad_calls:
        with pytest.raises(error, match=message):
            call()
        assert record_bytes(ws, "tiny") == before

    with pytest.raises(SystemExit) as exc:
        main(["checkpoint", "add", "tiny", "--family", "sd3", "--path", "tiny"])
    assert exc.value.code == 2
    assert main(["checkpoint", "add", "tiny", "--family", "sd15", "--path", "gone"]) == 1
    assert "weights file not found" in capsys.readouterr().err
    assert record_bytes(ws, "tiny") == before
    assert ws.store.list_ids("checkpoint") == ["tiny"]

    with pytest.raises(RecordNotFoundError, match=r"'nope' not found.*known: tiny"):
        get_checkpoint(ws, "nope")
    assert main(["checkpoint", "verify", "nope"]) == 1
    assert "known: tiny" in capsys.readouterr().err
    with pytest.raises(RecordError, match="has no 'family'"):
        checkpoint_family({"id": "x"})
    with pytest.raises(RecordError, match="unknown family 'sd2'"):
        checkpoint_family({"id": "x", "family": "sd2"})

    # Weights deleted after registration: loading names the missing path.
    record = get_checkpoint(ws, "tiny")
    import shutil

    shutil.rmtree(ws.config.checkpoints_root / "tiny")
    with pytest.raises(ConfigError, match="weights file not found"):
        load_pipeline(ws, record)
    assert record_bytes(ws, "tiny") == before


def test_weights_that_are_not_what_they_claim_are_refused_at_add_and_verify(ws, no_network, capsys):
    root = ws.config.checkpoints_root
    (root / "empty.safetensors").write_bytes(b"")
    torch.save({"state_dict": {}}, root / "renamed.safetensors")  # a pickle under a safetensors name
    for name in ("empty", "renamed"):
        assert main(["checkpoint", "add", name, "--family", "sd15", "--path", f"{name}.safetensors"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: checkpoint '{name}': ") and "is not a safetensors file" in err
        assert not ws.store.exists("checkpoint", name)

    make_tiny_checkpoint(ws, "t15", "sd15")
    folder = root / "t15"
    export_single_file(build_tiny_pipeline("sd15", 2), root / "single15.safetensors")
    for path in ("t15", "single15.safetensors"):
        assert main(["checkpoint", "add", "wrong", "--family", "sdxl", "--path", path]) == 1
        err = capsys.readouterr().err
        assert "is an SD1.5 checkpoint, registered as SDXL; add it with --family sd15" in err, err
    assert not ws.store.exists("checkpoint", "wrong")

    # Records from a shared data folder can say anything: verify (and every loader) checks again.
    for name, ref in (("edited", {"kind": "config_relative", "base": "checkpointsRoot", "path": "t15"}),
                      ("hollow", {"kind": "config_relative", "base": "checkpointsRoot", "path": "empty.safetensors"})):
        record = {**get_checkpoint(ws, "t15"), "id": name, "family": "sdxl" if name == "edited" else "sd15",
                  "weights": ref}
        ws.store.write("checkpoint", record)
        assert main(["checkpoint", "verify", name]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith(f"error: checkpoint '{name}': ")
    assert folder.is_dir()


def test_a_pickle_that_is_not_a_checkpoint_fails_verify_with_an_error(ws, no_network, capsys):
    torch.save({"state_dict": {}}, ws.config.checkpoints_root / "bare.ckpt")
    assert main(["checkpoint", "add", "bare", "--family", "sd15", "--path", "bare.ckpt", "--allow-pickle"]) == 0
    capsys.readouterr()
    assert main(["checkpoint", "verify", "bare"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: checkpoint 'bare': " in err and "does not load as an SD1.5 checkpoint" in err
