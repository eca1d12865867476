"""Writing a diffusers pipeline as one ``.safetensors`` file in the original Stable Diffusion key layout.

This is the inverse of diffusers' single-file loaders (``from_single_file``): UNet keys under
``model.diffusion_model.``, VAE under ``first_stage_model.``, each text encoder where its family puts it
(``TextEncoder.single_file_prefix``: ``cond_stage_model.transformer.`` for SD1.5's CLIP,
``conditioner.embedders.0.transformer.`` and, in OpenCLIP's names, ``conditioner.embedders.1.model.`` for SDXL's
two). The mapping is derived from each component's config, so it works for the tiny checkpoints as well as
full-size ones. lorakit uses it to test single-file loading offline, and it lets a tiny checkpoint be handed to
tools that only read single files.

A v-prediction checkpoint carries what ComfyUI reads to know it: empty tensors named ``v_pred`` (and ``ztsnr``
for a zero-terminal-SNR schedule) beside the weights, as ComfyUI's own checkpoint saver and NoobAI-XL v-pred's
file have them, and ``modelspec.predict_key: v`` in the metadata.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..families import Family, Objective

UNET_KEY = "model.diffusion_model."
VAE_KEY = "first_stage_model."
RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTENTION_NAMES = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                       ("to_out.0.", "proj_out.")]
OPENCLIP_NAMES = [("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"),
                  ("layer_norm2", "ln_2"), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."),
                  (".self_attn.out_proj.", ".attn.out_proj."), ("text_model.final_layer_norm.", "ln_final.")]


def _rename_by_prefix(state: dict, prefixes: dict[str, str], inner=None) -> dict:
    """Rename each key by its longest matching prefix; ``inner(suffix, ldm_prefix)`` renames what follows it."""
    ordered = sorted(prefixes, key=len, reverse=True)
    out = {}
    for key, value in state.items():
        for prefix in ordered:
            if key.startswith(prefix):
                suffix = key[len(prefix):]
                out[prefixes[prefix] + (inner(suffix, prefix) if inner else suffix)] = value
                break
        else:
            raise ValueError(f"no original-layout name for {key!r}")
    return out


def unet_to_ldm(state: dict, config: dict) -> dict:
    """UNet2DConditionModel weights -> the original ``openaimodel.UNetModel`` names."""
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("per-block layers_per_block has no original-layout equivalent")
    blocks = len(config["block_out_channels"])
    has_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    prefixes = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
                "time_embedding.linear_2.": "time_embed.2.", "add_embedding.linear_1.": "label_emb.0.0.",
                "add_embedding.linear_2.": "label_emb.0.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
                "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                "mid_block.resnets.1.": "middle_block.2."}
    n = 1
    for i in range(blocks):
        for j in range(layers):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{n}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{n}.1."
            n += 1
        if i < blocks - 1:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{n}.0.op."
            n += 1
    m = 0
    for i in range(blocks):
        for j in range(layers + 1):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{m}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{m}.1."
            if j == layers and i < blocks - 1:
                prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = f"output_blocks.{m}.{2 if has_attention[i] else 1}.conv."
            m += 1

    def inner(suffix: str, prefix: str) -> str:
        if ".resnets." in prefix:
            for new, old in RESNET_NAMES:
                if suffix.startswith(new + "."):
                    return old + suffix[len(new):]
        return suffix

    return _rename_by_prefix(state, prefixes, inner)


def vae_to_ldm(state: dict, config: dict) -> dict:
    """AutoencoderKL weights -> the original ``first_stage_model`` names (attention as 1x1 convolutions)."""
    blocks = len(config["block_out_channels"])
    prefixes = {f"{side}.{name}.": f"{side}.{name}." for side in ("encoder", "decoder") for name in ("conv_in", "conv_out")}
    prefixes |= {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
                 "quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        prefixes[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        prefixes[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
    for i in range(blocks):
        prefixes[f"encoder.down_blocks.{i}.resnets."] = f"encoder.down.{i}.block."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        # The original decoder numbers its up blocks from the lowest resolution.
        prefixes[f"decoder.up_blocks.{i}.resnets."] = f"decoder.up.{blocks - 1 - i}.block."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{blocks - 1 - i}.upsample."

    def inner(suffix: str, prefix: str) -> str:
        if prefix.endswith("attentions.0."):
            for new, old in VAE_ATTENTION_NAMES:
                if suffix.startswith(new):
                    return old + suffix[len(new):]
        return suffix.replace("conv_shortcut", "nin_shortcut")

    out = _rename_by_prefix(state, prefixes, inner)
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            out[key] = value.reshape(*value.shape, 1, 1)
    return out


def clip_to_ldm(state: dict) -> dict:
    """CLIPTextModel weights under the ``text_model.`` names original checkpoints use (transformers >=5.6 drops them)."""
    flattened = ("embeddings.", "encoder.", "final_layer_norm.")
    return {("text_model." + key if key.startswith(flattened) else key): value
            for key, value in state.items() if not key.endswith("position_ids")}


def openclip_to_ldm(state: dict) -> dict:
    """CLIPTextModelWithProjection weights -> OpenCLIP names (fused q/k/v, transposed text projection)."""
    out: dict = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in clip_to_ldm(state).items():
        match = re.match(r"(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if match:
            fused.setdefault(f"{match[1]}.attn.in_proj_{match[3]}", {})[match[2]] = value
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
            continue
        if key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
            continue
        if key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
            continue
        for new, old in OPENCLIP_NAMES:
            key = key.replace(new, old)
        out[key] = value
    for key, parts in fused.items():
        for new, old in OPENCLIP_NAMES:
            key = key.replace(new, old)
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def pipeline_to_ldm_state_dict(pipe, *, family: str | Family | None = None) -> dict[str, torch.Tensor]:
    """All weights of a StableDiffusion(XL)Pipeline, keyed as an original single-file checkpoint. ``family``
    is the checkpoint's (default: the family of the pipeline's class)."""
    from .loading import pipeline_family

    family = pipeline_family(pipe, family)
    state = {UNET_KEY + k: v for k, v in unet_to_ldm(pipe.unet.state_dict(), dict(pipe.unet.config)).items()}
    state |= {VAE_KEY + k: v for k, v in vae_to_ldm(pipe.vae.state_dict(), dict(pipe.vae.config)).items()}
    for encoder in family.text_encoders:
        weights = getattr(pipe, encoder.attribute).state_dict()
        converted = openclip_to_ldm(weights) if encoder.openclip else clip_to_ldm(weights)
        state |= {encoder.single_file_prefix + k: v for k, v in converted.items()}
    return {key: value.detach().contiguous() for key, value in state.items()}


def objective_keys(objective: Objective) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The marker tensors and metadata a single file of this objective carries (none for epsilon, which is what
    a file without them means)."""
    if objective.prediction != "v":
        return {}, {}
    keys = {"v_pred": torch.tensor([])}
    if objective.zero_terminal_snr:
        keys["ztsnr"] = torch.tensor([])
    return keys, {"modelspec.predict_key": "v"}


def export_single_file(pipe, path: str | Path, *, with_config: bool = True, family: str | Family | None = None,
                       prediction: str = "epsilon", zero_terminal_snr: bool = False) -> Path:
    """Save ``pipe`` as one ``.safetensors`` file; ``with_config`` also writes ``<file>.config/`` beside it.

    The config folder (configs and tokenizers, no weights) lets lorakit load a non-default architecture,
    such as the tiny checkpoints, from the single file without a model hub. ``prediction="v"`` (and
    ``zero_terminal_snr``) adds the ``v_pred`` (and ``ztsnr``) keys v-prediction files carry; the config folder
    is written as the pipeline has it, as a v-prediction file's downloaded configs usually are.

    >>> export_single_file(build_tiny_pipeline("sdxl"), "vpred.safetensors", prediction="v",
    ...                    zero_terminal_snr=True)   # doctest: +SKIP
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    markers, metadata = objective_keys(Objective(prediction, zero_terminal_snr))
    state = pipeline_to_ldm_state_dict(pipe, family=family) | markers
    save_file(state, str(path), metadata={"format": "pt", **metadata})
    if with_config:
        config_dir = path.with_name(path.name + ".config")
        if config_dir.exists():
            shutil.rmtree(config_dir)
        pipe.save_config(config_dir)  # model_index.json
        for name, component in pipe.components.items():
            if component is None:
                continue
            if hasattr(component, "save_pretrained") and name.startswith("tokenizer"):
                component.save_pretrained(config_dir / name)
            elif hasattr(component, "save_config"):  # diffusers models and schedulers
                component.save_config(config_dir / name)
            elif hasattr(component, "config") and hasattr(component.config, "to_json_file"):  # transformers models
                (config_dir / name).mkdir(parents=True, exist_ok=True)
                component.config.to_json_file(config_dir / name / "config.json")
        index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
        (config_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path
