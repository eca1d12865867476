"""What gets trained, at full size: the module sets on SD1.5 and SDXL built on the ``meta`` device.

The counts are kohya sd-scripts' (``networks/lora.py``: every Linear and 1x1 Conv2d of each
``Transformer2DModel``; with ``conv_dim``, every Linear and Conv2d of each ``ResnetBlock2D``, ``Downsample2D``
and ``Upsample2D``; of CLIP, ``CLIPAttention`` and ``CLIPMLP``), counted from the architectures' block
structure below, so a change to a module set that drifts from kohya's fails here.
"""

from __future__ import annotations

import pytest

from lorakit.models.loading import CONFIGS_DIR, models_from_config
from lorakit.train.config import resolve_config
from lorakit.train.kohya_format import text_encoder_module_name, unet_module_name
from lorakit.train.networks import matches, module_counts, text_encoder_targets, unet_targets
from lorakit.train.settings import UNET_MODULE_SETS

# (transformer blocks, Transformer2DModels, ResnetBlock2Ds, of which with a 1x1 shortcut, resamplers)
ARCHITECTURE = {"sd15": (16, 16, 22, 14, 6), "sdxl": (70, 11, 17, 11, 4)}
TEXT_LAYERS = {"sd15": {"text_encoder": 12}, "sdxl": {"text_encoder": 12, "text_encoder_2": 32}}


def kohya_counts(family: str) -> dict[str, int]:
    blocks, transformers, resnets, shortcuts, resamplers = ARCHITECTURE[family]
    lora = blocks * (4 + 4 + 2) + transformers * 2          # attn1 + attn2 q/k/v/out, ff in/out; proj_in/out
    conv = resnets * 3 + shortcuts + resamplers              # conv1, conv2, time_emb_proj; shortcuts; resamplers
    return {"lora": lora, "conv": conv}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def full_size(request):
    family = request.param
    return family, models_from_config(CONFIGS_DIR / family, family)


def test_the_full_size_models_are_built_without_weights(full_size):
    _, models = full_size
    unet = models["unet"]
    assert all(p.device.type == "meta" for p in unet.parameters())


def test_the_default_unet_set_is_kohyas(full_size):
    family, models = full_size
    cfg = resolve_config(family)
    targets = unet_targets(models["unet"], cfg)
    assert len(targets) == kohya_counts(family)["lora"] == {"sd15": 192, "sdxl": 722}[family]
    blocks, transformers = ARCHITECTURE[family][:2]
    per_name = {name: sum(matches(t.path, [name]) for t in targets) for name in UNET_MODULE_SETS["kohya"]}
    assert per_name == {"to_q": 2 * blocks, "to_k": 2 * blocks, "to_v": 2 * blocks, "to_out.0": 2 * blocks,
                        "proj_in": transformers, "proj_out": transformers, "ff.net.0.proj": blocks, "ff.net.2": blocks}
    # Every module gets the network's own rank: none of kohya's default set is a spatial convolution.
    assert {(t.rank, t.alpha, t.spatial_conv) for t in targets} == {(cfg["rank"], cfg["alpha"], False)}


def test_the_attention_only_set_is_what_lorakit_used_to_train(full_size):
    family, models = full_size
    targets = unet_targets(models["unet"], resolve_config(family, config={"unet_target_modules": "attention"}))
    assert len(targets) == {"sd15": 128, "sdxl": 560}[family]


def test_train_conv_adds_kohyas_conv_set_with_its_rank_rule(full_size):
    family, models = full_size
    cfg = resolve_config(family, config={"train_conv": True, "rank": 8, "alpha": 4, "conv_rank": 2, "conv_alpha": 1})
    targets = unet_targets(models["unet"], cfg)
    counts = kohya_counts(family)
    assert len(targets) == counts["lora"] + counts["conv"] == {"sd15": 278, "sdxl": 788}[family]
    by_leaf = {}
    for t in targets:
        by_leaf.setdefault(t.path.rsplit(".", 1)[-1], set()).add((t.rank, t.alpha))
    # 3x3 convolutions take conv_rank/conv_alpha; Linear layers and 1x1 shortcuts take rank/alpha (kohya's rule).
    assert by_leaf["conv1"] == by_leaf["conv2"] == by_leaf["conv"] == {(2, 1.0)}
    assert by_leaf["time_emb_proj"] == by_leaf["conv_shortcut"] == {(8, 4.0)}
    full = unet_targets(models["unet"], {**cfg, "conv_target_modules": ["conv_in", "conv_out"] + list(
        resolve_config(family, config={"conv_target_modules": "full"})["conv_target_modules"])})
    assert len(full) == len(targets) + 4   # conv_in, conv_out, the time embedding's two Linear layers


def test_the_text_encoder_set_is_kohyas(full_size):
    family, models = full_size
    cfg = resolve_config(family, config={"train_text_encoder": True})
    for name, layers in TEXT_LAYERS[family].items():
        targets = text_encoder_targets(models[name], cfg)
        assert len(targets) == layers * 6
        assert {t.path.rsplit(".", 1)[-1] for t in targets} == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}


def test_module_counts_is_what_the_dry_run_prints(full_size):
    family, _ = full_size
    cfg = resolve_config(family, config={"train_text_encoder": True})
    expected = {"sd15": {"unet": 192, "text_encoder": 72},
                "sdxl": {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}}[family]
    assert module_counts(CONFIGS_DIR / family, family, cfg) == expected
    assert module_counts(CONFIGS_DIR / family, family, resolve_config(family)) == {"unet": expected["unet"]}


def test_kohya_names_of_the_full_size_sets(full_size):
    """The names the file gets are kohya's: diffusers paths for SD1.5, the original UNet's blocks for SDXL."""
    family, models = full_size
    unet = models["unet"]
    cfg = resolve_config(family, config={"train_conv": True})
    names = {unet_module_name(t.path, family, dict(unet.config)) for t in unet_targets(unet, cfg)}
    assert len(names) == len(unet_targets(unet, cfg))
    expected = {
        "sd15": ["lora_unet_down_blocks_0_attentions_0_proj_in",
                 "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_up_blocks_3_attentions_2_proj_out",
                 "lora_unet_down_blocks_1_resnets_0_conv_shortcut", "lora_unet_up_blocks_0_upsamplers_0_conv",
                 "lora_unet_down_blocks_0_downsamplers_0_conv", "lora_unet_mid_block_resnets_1_time_emb_proj"],
        "sdxl": ["lora_unet_input_blocks_4_1_proj_in",
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
                 "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
                 "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_k",
                 "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_1_0_emb_layers_1",
                 "lora_unet_middle_block_2_in_layers_2"],
    }[family]
    assert set(expected) <= names, sorted(set(expected) - names)
    encoder = models["text_encoder"]
    prefix = "lora_te1" if family == "sdxl" else "lora_te"
    te_names = {text_encoder_module_name(prefix, encoder, t.path)
                for t in text_encoder_targets(encoder, resolve_config(family))}
    assert f"{prefix}_text_model_encoder_layers_11_mlp_fc2" in te_names
    assert f"{prefix}_text_model_encoder_layers_0_self_attn_out_proj" in te_names


# ---- on a real (tiny) checkpoint: the plan's counts are what the file holds -------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_dry_run_counts_are_the_modules_the_file_holds(family, tmp_path_factory):
    from test_train import FAST, _workspace, new_lora, write_dataset

    from lorakit.train import train_lora
    from lorakit.train.kohya_format import read_lora_file

    with pytest.MonkeyPatch.context() as mp:
        ws = _workspace(tmp_path_factory.mktemp(f"counts_{family}"), mp)
        new_lora(ws, "counted", family=family)
        write_dataset(ws, "counted_set", n=2, sizes=((64, 64),))
        config = {**FAST, "steps": 1, "train_conv": True, "conv_rank": 2, "train_text_encoder": True,
                  "validation": False}
        plan = train_lora(ws, "counted", "counted_set", project="demo", config=config, dry_run=True).plan
        result = train_lora(ws, "counted", "counted_set", project="demo", config=config, progress=False)
    tensors, _ = read_lora_file(result.weights_path)
    prefixes = {"unet": ("lora_unet_",), "text_encoder": ("lora_te_", "lora_te1_"), "text_encoder_2": ("lora_te2_",)}
    held = {model: sum(k.startswith(p) and k.endswith(".alpha") for k in tensors for p in prefixes[model])
            for model in plan["modules"]}
    assert held == plan["modules"]
    assert set(plan["modules"]) == ({"unet", "text_encoder"} | ({"text_encoder_2"} if family == "sdxl" else set()))
