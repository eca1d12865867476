"""The trainer's pure parts: config precedence and presets, buckets, captions, batches, the kohya format."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorakit.train import DEFAULTS, TrainingError, list_presets, resolve_config
from lorakit.train.config import finalize_config, numeric_config_diff
from lorakit.train.data import (
    caption_for_step,
    crop_and_size,
    epoch_batches,
    fit_to_bucket,
    latent_cache_key,
    load_rgb,
    make_buckets,
    padded_batches,
    pick_bucket,
    step_seed,
)
from lorakit.train.kohya_format import diffusers_to_sgm, sshs_hashes, tag_frequency, unet_module_name


# ---- config ------------------------------------------------------------------------------------------------
def test_presets_are_data_with_descriptions_and_resolve_for_their_family():
    presets = list_presets()
    assert {"tiny-demo", "sd15-style", "sd15-character", "sdxl-style", "sdxl-character"} <= set(presets)
    for name, preset in presets.items():
        assert preset["description"] and "\n" not in preset["description"]
        family = preset["family"] or "sd15"
        cfg = resolve_config(family, preset=name)
        assert set(cfg) == set(DEFAULTS)
    sd15, sdxl = resolve_config("sd15", preset="sd15-style"), resolve_config("sdxl", preset="sdxl-style")
    assert (sd15["resolution"], sd15["rank"], sd15["alpha"], sd15["min_snr_gamma"]) == (512, 16, 8.0, 5.0)
    assert 1e-4 <= sd15["lr"] <= 5e-4
    assert (sdxl["resolution"], sdxl["lr"], sdxl["gradient_checkpointing"], sdxl["vae_fp32"]) == (1024, 1e-4, True, True)
    assert 8 <= sdxl["rank"] <= 16


def test_config_precedence_preset_file_json_flags(tmp_path: Path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"rank": 32, "lr": 2e-4, "network_alpha": 3, "steps": 7}))
    cfg = resolve_config("sd15", preset="sd15-style", config_file=config_file, config='{"lr": 3e-4, "steps": 9}',
                         overrides={"steps": 11, "seed": None, "batch_size": 4})
    assert cfg["rank"] == 32          # file over preset
    assert cfg["alpha"] == 3.0        # kohya's name accepted
    assert cfg["lr"] == 3e-4          # --config over file
    assert cfg["steps"] == 11         # flags over everything; None flags are ignored
    assert cfg["seed"] == DEFAULTS["seed"] and cfg["batch_size"] == 4
    assert resolve_config("sdxl")["resolution"] == 1024 and resolve_config("sd15")["resolution"] == 512
    assert resolve_config("sdxl")["vae_fp32"] is True


@pytest.mark.parametrize("kwargs, message", [
    ({"preset": "nope"}, "unknown preset 'nope'"),
    ({"preset": "sdxl-style"}, "is for sdxl checkpoints"),
    ({"config": "{not json"}, "--config: not valid JSON"),
    ({"config": {"rnak": 4}}, "unknown training setting"),
    ({"config": {"rank": 0}}, "rank must be a positive integer"),
    ({"config": {"lr": "fast"}}, "lr must be a number"),
    ({"config": {"lr_scheduler": "linear"}}, "lr_scheduler must be one of cosine, constant"),
    ({"config": {"caption_dropout": 1.5}}, "caption_dropout must be a number in"),
    ({"config": {"background": "pink"}}, "background must be a colour"),
    ({"config": {"resolution": 100}}, "must be a multiple of bucket_step"),
    ({"config_file": "/no/such/file.json"}, "does not exist"),
])
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises(TrainingError, match=message):
        resolve_config("sd15", **kwargs)


def test_preset_for_other_family_is_allowed_when_forced_and_resume_diff_ignores_output_settings():
    assert resolve_config("sd15", preset="sdxl-style", force=True)["resolution"] == 1024
    a = finalize_config(dict(DEFAULTS), "sd15")
    assert numeric_config_diff(a, {**a, "save_state_every": 5, "sample_prompts": ["x"]}) == []
    assert numeric_config_diff(a, {**a, "lr": 1.0}) == ["lr"]


# ---- buckets, images, captions, batches ----------------------------------------------------------------------
def test_buckets_keep_the_area_and_step():
    for resolution in (512, 1024):
        buckets = make_buckets(resolution)
        assert (resolution, resolution) in buckets
        for w, h in buckets:
            assert w % 64 == 0 and h % 64 == 0 and w * h <= resolution**2
            assert resolution // 2 <= min(w, h) and max(w, h) <= resolution * 2
    buckets = make_buckets(1024)
    assert pick_bucket(1024, 1024, buckets) == (1024, 1024)
    assert pick_bucket(1920, 1080, buckets) in ((1344, 768), (1344, 704))
    w, h = pick_bucket(300, 900, buckets)
    assert h > w
    # No upscaling: a small image keeps its own size, rounded down to the step.
    assert pick_bucket(300, 200, buckets, no_upscale=True) == (256, 192)
    assert pick_bucket(2000, 2000, buckets, no_upscale=True) == (1024, 1024)


def test_fit_to_bucket_and_sdxl_conditioning_agree(tmp_path: Path):
    img = Image.new("RGB", (1000, 500))
    out = fit_to_bucket(img, (768, 320))
    assert out.size == (768, 320)
    crop, original = crop_and_size(1000, 500, (768, 320))
    assert original == (500, 1000) and crop == ((384 - 320) // 2, 0)
    assert fit_to_bucket(Image.new("RGB", (64, 64)), (64, 64)).size == (64, 64)


def test_alpha_is_composited_onto_the_background(tmp_path: Path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255          # red, but fully transparent on the left half
    rgba[:, 4:, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    white = np.asarray(load_rgb(path, "#ffffff"))
    black = np.asarray(load_rgb(path, "#000"))
    assert tuple(white[0, 0]) == (255, 255, 255) and tuple(black[0, 0]) == (0, 0, 0)
    assert tuple(white[0, 7]) == (255, 0, 0) == tuple(black[0, 7])


def test_captions_shuffle_keeps_tokens_and_drops_out():
    caption = "hero, red cape, sword, shield, boots"
    seen = {caption_for_step(caption, random.Random(i), shuffle_tags=True, keep_tokens=1, dropout=0.0) for i in range(20)}
    assert len(seen) > 1 and all(c.startswith("hero, ") for c in seen)
    assert all(sorted(c.split(", ")) == sorted(caption.split(", ")) for c in seen)
    assert caption_for_step(caption, random.Random(0), shuffle_tags=False, keep_tokens=0, dropout=0.0) == caption
    drops = [caption_for_step(caption, random.Random(i), shuffle_tags=False, keep_tokens=0, dropout=0.5) for i in range(200)]
    assert 50 < drops.count("") < 150


def test_batches_are_per_bucket_deterministic_and_padded():
    buckets = [(64, 64)] * 5 + [(64, 128)] * 3
    a = epoch_batches(buckets, 2, 1, seed=1, epoch=0)
    assert a == epoch_batches(buckets, 2, 1, seed=1, epoch=0)
    assert a != epoch_batches(buckets, 2, 1, seed=1, epoch=1)
    assert sorted(p for b in a for p in b) == list(range(8))
    assert all(len({buckets[p] for p in b}) == 1 for b in a)
    assert sum(len(b) for b in epoch_batches(buckets, 2, 3, 1, 0)) == 24
    assert len(padded_batches(a, 4)) % 4 == 0
    assert step_seed(1, 2, 3) == step_seed(1, 2, 3) != step_seed(1, 2, 4)


def test_latent_cache_key_depends_on_everything_that_changes_a_latent():
    base = ("a" * 64, "ckpt", "h", (64, 64), "#ffffff", "torch.float32")
    key = latent_cache_key(*base)
    for i, other in enumerate(["b" * 64, "ckpt2", "h2", (64, 128), "#000000", "torch.float16"]):
        changed = list(base)
        changed[i] = other
        assert latent_cache_key(*changed) != key


# ---- kohya format ------------------------------------------------------------------------------------------
SDXL_UNET = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


@pytest.mark.parametrize("path, sgm", [
    # The real SDXL UNet (kohya's names as found in published SDXL LoRAs).
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k", "input_blocks.5.1.transformer_blocks.1.attn2.to_k"),
    ("down_blocks.2.attentions.1.proj_in", "input_blocks.8.1.proj_in"),
    ("mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0", "middle_block.1.transformer_blocks.9.attn1.to_out.0"),
    ("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "output_blocks.0.1.transformer_blocks.0.attn1.to_v"),
    ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2", "output_blocks.5.1.transformer_blocks.0.ff.net.2"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.2.resnets.2.conv_shortcut", "output_blocks.8.0.skip_connection"),
    ("mid_block.resnets.1.time_emb_proj", "middle_block.2.emb_layers.1"),
])
def test_sdxl_names_follow_the_sgm_layout(path, sgm):
    assert diffusers_to_sgm(path, 2, [True, True, False]) == sgm
    assert unet_module_name(path, "sdxl", SDXL_UNET) == "lora_unet_" + sgm.replace(".", "_")


def test_sd15_names_are_the_diffusers_paths():
    assert (unet_module_name("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0", "sd15")
            == "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_out_0")


def test_sshs_hashes_cover_the_tensors_and_tag_frequency():
    import torch

    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3, dtype=torch.float16)}
    a = sshs_hashes(tensors, {"ss_seed": "1", "lorakit.release_id": "r1"})
    # The model hash covers the tensor bytes after the header, so no metadata edit changes it.
    assert a == sshs_hashes(tensors, {"ss_seed": "1", "lorakit.release_id": "r2"}) == sshs_hashes(tensors, {})
    assert a != sshs_hashes({k: v * 2 for k, v in tensors.items()}, {"ss_seed": "1"})
    assert len(a[0]) == 64 and len(a[1]) == 8
    assert tag_frequency(["a, b", " b ,c"]) == {"a": 1, "b": 2, "c": 1}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_kind_of_layer_round_trips_through_diffusers(family, monkeypatch):
    """UNet attention + conv + text-encoder LoRA layers, converted to kohya keys, load back into diffusers
    with every tensor landing on the module it came from (no key left over, none missing)."""
    import torch
    from peft import LoraConfig

    from lorakit.models import build_tiny_pipeline
    from lorakit.train.kohya_format import kohya_state_dict, lora_layers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = build_tiny_pipeline(family)
    torch.manual_seed(0)
    conv = r".*(to_q|to_k|to_v|to_out\.0|resnets\.\d+\.conv1|resnets\.\d+\.conv2|samplers\.0\.conv)$"
    source.unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=conv, rank_pattern={".*conv1": 2},
                                       alpha_pattern={".*conv1": 1}))
    encoders = [source.text_encoder] + ([source.text_encoder_2] if family == "sdxl" else [])
    for encoder in encoders:
        encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    for model in [source.unet, *encoders]:
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
    tensors = kohya_state_dict(family, source.unet, encoders, dtype=torch.float32)
    assert all(k.startswith(("lora_unet_", "lora_te_" if family == "sd15" else "lora_te1_", "lora_te2_")) for k in tensors)
    # Text encoders keep CLIP's text_model. prefix (what A1111/ComfyUI expect) even where transformers dropped it.
    te_keys = [k for k in tensors if k.startswith("lora_te")]
    assert te_keys and all(k.split("_", 2)[2].startswith("text_model_encoder_layers_") for k in te_keys)
    if family == "sdxl":
        assert any("_input_blocks_" in k for k in tensors) and not any("down_blocks" in k for k in tensors)

    target = build_tiny_pipeline(family)
    target.load_lora_weights(dict(tensors), adapter_name="x")
    targets = [target.unet, target.text_encoder] + ([target.text_encoder_2] if family == "sdxl" else [])
    loaded = 0
    for src_model, dst_model in zip([source.unet, *encoders], targets, strict=True):
        src = {p: (d, u, a) for p, d, u, a in lora_layers(src_model)}
        dst = {p: (d, u, a) for p, d, u, a in lora_layers(dst_model, adapter="x")}
        assert src.keys() == dst.keys()
        for path, (down, up, alpha) in src.items():
            assert torch.equal(down, dst[path][0]) and torch.equal(up, dst[path][1]) and alpha == dst[path][2], path
        loaded += len(dst)
    assert loaded * 3 == len(tensors)   # down, up and alpha of every layer were used
