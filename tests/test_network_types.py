"""Network types beyond plain LoRA: DoRA, LoCon, LoHa and LoKr trained with the native recipe on the tiny
checkpoints, saved in LyCORIS' layout, read back by lycoris-lora (the reference implementation) and rendered
through ``load_lora_file``.

The file must reproduce the trained model: the delta lycoris-lora applies from the file equals the trained peft
layer's delta for a Linear, a 1x1 and a 3x3 convolution, within what the fp16 save rounds away.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from test_train import FAST, new_lora, render, write_dataset
from test_train import ws as ws  # noqa: F401  (the module-scoped workspace fixture)

from lorakit.errors import ConfigError
from lorakit.train import recipe, train_lora
from lorakit.train.kohya import network_options, plan_kohya_run
from lorakit.train.kohya_format import (
    adapter_layers,
    dora_scale,
    file_network_type,
    lokr_file_tensors,
    network_metadata,
    read_lora_file,
)

LYCORIS_ALGO = {"lora": "locon", "dora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr"}
# One module of each kind in the tiny SD1.5 UNet: a Linear, a 1x1 convolution and a 3x3 convolution.
PROBES = ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.proj_in",
          "down_blocks.0.resnets.0.conv1")
# lr 1e-2 for a few steps moves the weights far enough that a wrong scale or layout shows above fp16 rounding.
RUN = {**FAST, "lr": 1e-2, "steps": 3, "conv_rank": 8, "conv_alpha": 4}


# ---- pure decisions ------------------------------------------------------------------------------------------
def test_the_file_type_is_read_from_the_key_suffixes():
    assert file_network_type(["lora_unet_a.lora_down.weight", "lora_unet_a.alpha"]) == "lora"
    assert file_network_type(["lora_unet_a.lora_down.weight", "lora_unet_a.dora_scale"]) == "dora"
    assert file_network_type(["lora_unet_a.hada_w1_a", "lora_unet_a.alpha"]) == "loha"
    assert file_network_type(["lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2_a"]) == "lokr"
    assert file_network_type(["unet.down_blocks.0.to_q.lora_A.weight"]) == "lora"  # diffusers' own layout


@pytest.mark.parametrize("network, module, args", [
    ("lora", "networks.lora", None),
    ("locon", "lycoris.kohya", {"algo": "locon", "conv_dim": "8", "conv_alpha": "4.0"}),
    ("dora", "lycoris.kohya", {"algo": "locon", "preset": "attn-mlp", "dora_wd": "True", "wd_on_output": "True"}),
    ("loha", "lycoris.kohya", {"algo": "loha", "conv_dim": "8", "conv_alpha": "4.0"}),
    ("lokr", "lycoris.kohya", {"algo": "lokr", "preset": "attn-mlp", "factor": "4"}),
])
def test_metadata_names_the_network_as_lycoris_writes_it(network, module, args):
    cfg = {"network_type": network, "train_conv": network in ("locon", "loha"), "rank": 4, "alpha": 2.0,
           "conv_rank": 8, "conv_alpha": 4.0, "lokr_factor": 4 if network == "lokr" else None}
    assert network_metadata(cfg) == (module, args)


def test_lokr_with_two_full_factors_folds_peft_scale_into_w1():
    import torch

    w1, w2 = torch.randn(4, 4), torch.randn(8, 8)
    full = lokr_file_tensors({"lokr_w1": w1, "lokr_w2": w2}, rank=4, alpha=2.0)
    # LyCORIS scales two full factors by 1 and records alpha = rank: peft's alpha / rank must sit in w1.
    assert torch.allclose(full["lokr_w1"], w1 * 0.5) and float(full["alpha"]) == 4.0
    w2_a, w2_b = torch.randn(8, 4), torch.randn(4, 8)
    split = lokr_file_tensors({"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b}, rank=4, alpha=2.0)
    assert torch.equal(split["lokr_w1"], w1) and float(split["alpha"]) == 2.0


def test_dora_scale_has_one_value_per_output_feature():
    import torch

    assert tuple(dora_scale(torch.ones(1, 6, 1, 1), 4).shape) == (6, 1, 1, 1)
    assert tuple(dora_scale(torch.ones(6), 2).shape) == (6, 1)


def test_kohya_adapter_trains_lycoris_types_through_lycoris_kohya(tmp_path):
    def plan(options, adapter_args=()):
        return plan_kohya_run(options, list(adapter_args), family="sd15", model_path=tmp_path / "m.safetensors",
                              run_dir=tmp_path / "run", lora_id="hero", dataset_name="gems")

    assert network_options("lora") == ("networks.lora", [])
    loha = plan({"network_type": "loha", "network_args": ["conv_dim=8"]}).args
    assert loha["network_module"] == "lycoris.kohya" and loha["network_args"] == ["algo=loha", "conv_dim=8"]
    assert "network_type" not in loha  # lorakit's key, not an sd-scripts option
    dora = plan({"network_type": "dora"}).args
    assert dora["network_args"] == ["algo=locon", "dora_wd=True", "wd_on_output=True"]
    assert plan({}).args["network_module"] == "networks.lora"
    with pytest.raises(ConfigError, match="network_module"):
        plan({"network_type": "lokr", "network_module": "networks.lora"})
    with pytest.raises(ConfigError, match="algo=loha contradict"):
        plan({"network_type": "lokr", "network_args": ["algo=loha"]})
    with pytest.raises(ConfigError, match="network_type must be one of"):
        plan({"network_type": "ia3"})


# ---- training, saving, reading back ----------------------------------------------------------------------------
def train_keeping_the_model(ws, lora_id: str, family: str, config: dict, monkeypatch):
    """Train with the real recipe (``train_lora``), keeping a handle on the model its model phase built, to
    compare the saved file with what was trained."""
    kept = {}
    build_model = recipe._setup_model

    def keep_model(*args, **kwargs):
        kept["model"] = build_model(*args, **kwargs)
        return kept["model"]

    monkeypatch.setattr(recipe, "_setup_model", keep_model)
    new_lora(ws, lora_id, family)
    write_dataset(ws, f"{lora_id}_data", n=4, checkpoint=f"tiny_{family}")
    result = train_lora(ws, lora_id, f"{lora_id}_data", project="demo", config=config, progress=False)
    model = kept["model"]
    model.unet.eval()
    return result, model, result.release["training"]["config"]


def base_pipeline(ws, family: str):
    """The checkpoint as the run started from it (fp32 on the CPU, as the recipe loads it)."""
    from lorakit.models import load_pipeline

    return load_pipeline(ws, f"tiny_{family}")


def module_delta(module, base, x):
    import torch

    with torch.no_grad():
        return module(x) - base(x)


def probe_input(base):
    import torch

    generator = torch.Generator().manual_seed(0)
    if isinstance(base, torch.nn.Linear):
        return torch.randn(2, base.in_features, generator=generator)
    return torch.randn(2, base.in_channels, 8, 8, generator=generator)


def assert_same_delta(file_delta, trained_delta, base_out):
    # fp16 keeps ~3 decimal digits of each tensor; DoRA's magnitude rescales the whole weight, so its rounding
    # shows relative to the layer's output, not only to the delta.
    tolerance = 2e-3 * float(trained_delta.abs().max()) + 1e-3 * float(base_out.detach().abs().max())
    assert float(trained_delta.abs().max()) > 5 * tolerance, "the run moved the weights too little to compare"
    assert float((file_delta - trained_delta).abs().max()) <= tolerance


def check_against_lycoris(ws, weights, model, cfg) -> None:
    """lycoris-lora reads the file into a fresh copy of the base UNet: its keys and shapes are the ones it
    creates for that network type, and its delta on each probe module is the trained one."""
    from lycoris import create_lycoris, create_lycoris_from_weights

    tensors, _ = read_lora_file(weights)
    trained = dict(model.unet.named_modules())
    fresh = base_pipeline(ws, "sd15").unet
    # lycoris' own loader names SD1.5 modules "lycoris_<diffusers path with _>": kohya's names, another prefix.
    unet_file = {k.replace("lora_unet_", "lycoris_", 1): v.float() for k, v in tensors.items() if k.startswith("lora_unet_")}
    network, _ = create_lycoris_from_weights(1.0, None, fresh, weights_sd=dict(unet_file))
    loaded = {m.lora_name: m for m in network.loras}
    assert set(loaded) == {k.split(".")[0] for k in unet_file}

    reference = create_lycoris(copy.deepcopy(fresh), 1.0, cfg["rank"], cfg["alpha"], algo=LYCORIS_ALGO[cfg["network_type"]],
                               conv_dim=cfg["conv_rank"], conv_alpha=cfg["conv_alpha"],
                               dora_wd=cfg["network_type"] == "dora", factor=cfg["lokr_factor"] or -1)
    made = {m.lora_name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for m in reference.loras}
    for name in loaded:
        ours = {k.split(".", 1)[1]: tuple(v.shape) for k, v in unet_file.items() if k.split(".")[0] == name}
        assert ours == made[name], name

    base = dict(fresh.named_modules())
    for path in PROBES:
        lycoris_module = loaded["lycoris_" + path.replace(".", "_")]
        lycoris_module.eval()
        x = probe_input(base[path])
        assert_same_delta(module_delta(lycoris_module, base[path], x), module_delta(trained[path], base[path], x),
                          base[path](x))


def check_renders_through_load_lora_file(ws, family: str, weights, *, with_strength_zero: bool) -> None:
    """load_lora_file puts every layer of the file on the pipeline (it reads back as the file), the image
    changes, and set_adapters' strength reaches the layers."""
    import torch

    from lorakit.models import load_pipeline
    from lorakit.models.loading import load_lora_file

    pipe = load_pipeline(ws, f"tiny_{family}")
    pipe.set_progress_bar_config(disable=True)
    before = render(pipe)
    load_lora_file(pipe, weights, "trained")
    pipe.set_adapters(["trained"], adapter_weights=[1.0])
    tensors, _ = read_lora_file(weights)
    # Re-exported by the trainer's own rule, the pipeline's layers give back the file's tensors.
    reread = _export(family, pipe, "trained")
    assert reread.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.allclose(reread[key].float(), tensor.float(), rtol=1e-3, atol=1e-6), key
    after = render(pipe)
    assert np.abs(after - before).max() > 1e-4
    if with_strength_zero:
        pipe.set_adapters(["trained"], adapter_weights=[0.0])
        assert np.abs(render(pipe) - before).max() < 1e-5


def _export(family: str, pipe, adapter: str) -> dict:
    """The pipeline's adapter ``adapter`` in the file layout, by the same rule the trainer saves with."""
    from lorakit.train.kohya_format import (
        text_encoder_module_name,
        to_kohya_tensors,
        unet_module_name,
    )

    unet_config = dict(pipe.unet.config)
    entries = [(unet_module_name(layer.path, family, unet_config), layer) for layer in adapter_layers(pipe.unet, adapter)]
    from lorakit.families import get

    _, encoders = get(family).tokenizers_and_encoders(pipe)
    for prefix, encoder in zip(get(family).text_encoder_prefixes(), encoders, strict=True):
        entries += [(text_encoder_module_name(prefix, encoder, layer.path), layer)
                    for layer in adapter_layers(encoder, adapter)]
    return to_kohya_tensors(entries)


@pytest.mark.slow
@pytest.mark.parametrize("network", ["lora", "locon", "dora", "loha", "lokr"])
def test_each_network_type_trains_saves_and_reads_back_as_trained(ws, network, monkeypatch):
    config = {**RUN, "network_type": network, "train_conv": True}
    result, model, cfg = train_keeping_the_model(ws, f"net_{network}", "sd15", config, monkeypatch)
    tensors, metadata = read_lora_file(result.weights_path)
    module, args = network_metadata(cfg)
    assert metadata["ss_network_module"] == module
    assert json.loads(metadata["ss_network_args"]) == args
    assert file_network_type(tensors) == ("lora" if network in ("lora", "locon") else network)
    check_against_lycoris(ws, result.weights_path, model, cfg)
    if network in ("lora", "locon"):
        # diffusers reads kohya LoRA/LoCon files itself.
        from test_train import check_loads_into_diffusers

        check_loads_into_diffusers(ws, "sd15", result.weights_path)
    else:
        check_renders_through_load_lora_file(ws, "sd15", result.weights_path, with_strength_zero=network != "dora")


@pytest.mark.slow
def test_loha_with_the_text_encoder_renders_through_load_lora_file(ws, monkeypatch):
    config = {**RUN, "network_type": "loha", "train_text_encoder": True, "text_encoder_lr": 1e-2}
    result, _, _ = train_keeping_the_model(ws, "net_loha_te", "sd15", config, monkeypatch)
    tensors, _ = read_lora_file(result.weights_path)
    assert any(k.startswith("lora_te_text_model_") for k in tensors)
    check_renders_through_load_lora_file(ws, "sd15", result.weights_path, with_strength_zero=True)


@pytest.mark.slow
def test_sdxl_lokr_saves_sgm_names_lycoris_reads(ws, monkeypatch):
    """SDXL files name the sgm UNet's modules; lycoris-lora's per-module loader (what create_lycoris_from_weights
    runs for each name) on the diffusers module each name maps back to gives the trained delta."""
    from lycoris.modules import get_module, make_module

    from lorakit.models.loading import pipeline_module_names

    config = {**RUN, "network_type": "lokr", "train_conv": True, "train_text_encoder": True, "text_encoder_lr": 1e-2}
    result, model, _ = train_keeping_the_model(ws, "net_lokr_xl", "sdxl", config, monkeypatch)
    tensors, _ = read_lora_file(result.weights_path)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)
    assert any(k.startswith("lora_te2_") for k in tensors)
    fresh = base_pipeline(ws, "sdxl")
    names = {path: name for name, (component, path) in pipeline_module_names(fresh).items() if component == "unet"}
    trained, base = dict(model.unet.named_modules()), dict(fresh.unet.named_modules())
    file = {k: v.float() for k, v in tensors.items()}
    probes = [next(p for p in trained if p.endswith(end)) for end in ("attn1.to_q", "proj_in", "resnets.0.conv1")]
    for path in probes:
        kind, params = get_module(file, names[path])
        lycoris_module = make_module(kind, params, names[path], base[path])
        lycoris_module.eval()
        x = probe_input(base[path])
        assert_same_delta(module_delta(lycoris_module, base[path], x), module_delta(trained[path], base[path], x),
                          base[path](x))
    check_renders_through_load_lora_file(ws, "sdxl", result.weights_path, with_strength_zero=True)


@pytest.mark.slow
def test_a_picker_stack_mixing_lora_and_loha_loads_in_any_order(ws):
    """peft cannot put a LoRA layer over a LoHa one: apply_loras loads plain files first, and a plain file new to
    a pipeline that holds LoHa layers reloads the stack, so the order a user stacks them in never matters."""
    from lorakit.models import load_pipeline
    from lorakit.select import ResolvedLora, apply_loras

    files = {}
    for network in ("loha", "lora", "dora"):
        lora_id = f"stack_{network}"
        new_lora(ws, lora_id)
        write_dataset(ws, f"{lora_id}_data", n=2, checkpoint="tiny_sd15")
        result = train_lora(ws, lora_id, f"{lora_id}_data", project="demo", progress=False,
                            config={**RUN, "network_type": network, "validation": False})
        files[network] = result

    def resolved(network: str, strength: float = 1.0) -> ResolvedLora:
        r = files[network]
        return ResolvedLora(r.lora_id, r.lora_id, "project", r.release_id, "candidate", str(r.weights_path),
                            strength, "test", sha256=r.release["sha256"])

    pipe = load_pipeline(ws, "tiny_sd15")
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    names = apply_loras(pipe, [resolved("loha"), resolved("lora")])
    both = render(pipe)
    assert len(names) == 2 and np.abs(both - base).max() > 1e-4
    # A LoRA-layer file (DoRA) new to a pipeline that holds the LoHa already: the stack is loaded again.
    names = apply_loras(pipe, [resolved("loha"), resolved("dora")])
    assert len(names) == 2 and np.abs(render(pipe) - base).max() > 1e-4
    # And back: the same stack as at first renders what it rendered then.
    apply_loras(pipe, [resolved("loha"), resolved("lora")])
    assert np.abs(render(pipe) - both).max() < 1e-5
