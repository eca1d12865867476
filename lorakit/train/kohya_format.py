"""The kohya LoRA file format: key names, header metadata and the hashes tools precompute.

kohya sd-scripts' layout is the one every consumer reads (ComfyUI, A1111/Forge, ``diffusers.load_lora_weights``):

- one entry per adapted module, named ``lora_unet_<module path with _>`` or ``lora_te_…`` (SDXL: ``lora_te1_…``
  and ``lora_te2_…`` for its two encoders), each with ``.lora_down.weight`` (rank x in), ``.lora_up.weight``
  (out x rank) and a scalar ``.alpha``; the update is ``up @ down * alpha / rank``, as in peft;
- SD1.5 module paths are the diffusers UNet's (kohya trains SD1.5 on a diffusers-layout UNet), SDXL paths are
  the original Stability (sgm) UNet's ``input_blocks.N.M`` / ``middle_block.N`` / ``output_blocks.N.M``
  (kohya trains SDXL on that UNet), so :func:`diffusers_to_sgm` maps them;
- header metadata is strings only: ``ss_*`` training facts, ``sshs_model_hash``/``sshs_legacy_hash`` (the
  hashes sd-webui-additional-networks shows, computed over the tensors plus the ``ss_*`` keys only, so editing
  other metadata keeps them), a ``modelspec.*`` block (Stability's model spec) and our own ``lorakit.*`` keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..families import Family, Objective
from ..families import get as get_family
from ..roots import Root

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Metadata keys that change from run to run even when the weights are identical.
VOLATILE_METADATA_KEYS = ("ss_training_started_at", "ss_training_finished_at", "ss_session_id", "modelspec.date",
                          "lorakit.release_id", "lorakit.duration_s")

_RESNET_TO_SGM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP_LEVEL_TO_SGM = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                     "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                     "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


# ---- names -------------------------------------------------------------------------------------------------
def diffusers_to_sgm(path: str, layers_per_block: int, up_block_has_attention: Sequence[bool]) -> str:
    """A diffusers UNet module path in the original SDXL (sgm) UNet's layout.

    Each down level has ``layers_per_block`` (resnet, attention) pairs then a downsampler, each up level one
    more pair then an upsampler; sgm numbers them all in one ``input_blocks`` / ``output_blocks`` list, with
    the resnet at ``.0`` and the attention at ``.1``.

    >>> diffusers_to_sgm("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 2, [True, True, False])
    'input_blocks.4.1.transformer_blocks.0.attn1.to_q'
    >>> diffusers_to_sgm("up_blocks.0.attentions.2.proj_out", 2, [True, True, False])
    'output_blocks.2.1.proj_out'
    >>> diffusers_to_sgm("mid_block.resnets.1.conv2", 2, [True, True, False])
    'middle_block.2.out_layers.3'
    """
    for name, sgm in _TOP_LEVEL_TO_SGM.items():
        if path == name or path.startswith(name + "."):
            return sgm + path[len(name):]
    parts = path.split(".")
    n = layers_per_block

    def resnet(rest: list[str]) -> str:
        head = _RESNET_TO_SGM.get(rest[0], rest[0])
        return ".".join([head, *rest[1:]])

    if parts[0] == "down_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "downsamplers":
            return ".".join(["input_blocks", str((block + 1) * (n + 1)), "0", "op", *rest[1:]])
        layer = 1 + block * (n + 1) + index
        if kind == "resnets":
            return f"input_blocks.{layer}.0.{resnet(rest)}"
        if kind == "attentions":
            return ".".join(["input_blocks", str(layer), "1", *rest])
    elif parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return ".".join(["middle_block", "1", *rest])
        if kind == "resnets":
            return f"middle_block.{0 if index == 0 else 2}.{resnet(rest)}"
    elif parts[0] == "up_blocks":
        block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "upsamplers":
            slot = 2 if up_block_has_attention[block] else 1
            return ".".join(["output_blocks", str(block * (n + 1) + n), str(slot), *rest])
        layer = block * (n + 1) + index
        if kind == "resnets":
            return f"output_blocks.{layer}.0.{resnet(rest)}"
        if kind == "attentions":
            return ".".join(["output_blocks", str(layer), "1", *rest])
    raise ValueError(f"no sgm name for UNet module {path!r}")


def kohya_name(prefix: str, module_path: str) -> str:
    """``("lora_unet", "down_blocks.0.attentions.0.proj_in")`` -> ``"lora_unet_down_blocks_0_attentions_0_proj_in"``."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def unet_module_name(module_path: str, family: str | Family, unet_config: dict | None = None) -> str:
    """The kohya name of a denoiser module of a ``family`` checkpoint (some families' layouts need the
    denoiser's config: see ``Family.kohya_module_name``)."""
    return get_family(family).kohya_module_name(module_path, unet_config)


def text_encoder_module_name(prefix: str, encoder: torch.nn.Module, module_path: str) -> str:
    """The kohya name of a text-encoder module: always under ``text_model.`` as in CLIP's original layout.

    transformers 5 flattened ``CLIPTextModel`` (its modules are ``encoder.layers...``, no ``text_model.``),
    but kohya files, A1111 and ComfyUI name them ``lora_te_text_model_encoder_...`` (diffusers accepts both).
    """
    if not hasattr(encoder, "text_model") and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return kohya_name(prefix, module_path)


# ---- tensors -----------------------------------------------------------------------------------------------
# LyCORIS' key suffixes per layer type (lycoris/modules/*.py ``custom_state_dict``); plain LoRA and LoCon
# share kohya's, DoRA adds its magnitude beside them.
LAYER_KEYS = {
    "lora": ("lora_down.weight", "lora_up.weight", "alpha"),
    "dora": ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"),
}


@dataclass(frozen=True)
class AdapterLayer:
    """One adapted module as the file stores it: its path in the model, its layer type (a :data:`LAYER_KEYS`
    key) and its tensors by key suffix, already in the file's scale conventions."""

    path: str
    kind: str
    tensors: dict[str, torch.Tensor]


def layer_kind(module: torch.nn.Module, adapter: str = "default") -> str | None:
    """``"lora"``, ``"dora"``, ``"loha"`` or ``"lokr"`` for a peft layer holding ``adapter``, else None."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    if isinstance(module, LoraLayer) and adapter in module.lora_A:
        return "dora" if module.use_dora.get(adapter) else "lora"
    if isinstance(module, LoHaLayer) and adapter in module.hada_w1_a:
        return "loha"
    if isinstance(module, LoKrLayer) and adapter in module._available_adapters:
        return "lokr"
    return None


def lora_file_tensors(down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """kohya's LoRA (and LoCon) tensors: the update is ``up @ down * alpha / rank`` in both peft and the file."""
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(alpha))}


def dora_scale(magnitude: torch.Tensor, weight_dims: int) -> torch.Tensor:
    """peft's DoRA magnitude (one per output feature: ``(out,)`` for Linear, ``(1, out, 1, 1)`` for a conv) as
    LyCORIS' ``dora_scale`` with ``wd_on_output`` (its default): ``(out, 1)`` / ``(out, 1, 1, 1)``, the norm
    taken over each output row of the weight. ComfyUI tells that axis from ``dora_scale.shape[0] == out``.

    >>> tuple(dora_scale(torch.ones(1, 8, 1, 1), 4).shape), tuple(dora_scale(torch.ones(8), 2).shape)
    ((8, 1, 1, 1), (8, 1))
    """
    return magnitude.reshape(-1, *[1] * (weight_dims - 1))


def loha_file_tensors(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
                      alpha: float) -> dict[str, torch.Tensor]:
    """LyCORIS' LoHa tensors. peft and LyCORIS agree: ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``, a
    convolution's kernel flattened into ``w*_b``'s columns."""
    return {"hada_w1_a": w1_a, "hada_w1_b": w1_b, "hada_w2_a": w2_a, "hada_w2_b": w2_b,
            "alpha": torch.tensor(float(alpha))}


def lokr_file_tensors(factors: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """LyCORIS' LoKr tensors from peft's factors (``lokr_w1`` or ``lokr_w1_a``/``_b``, ``lokr_w2`` or
    ``lokr_w2_a``/``_b``): the update is ``kron(w1, w2) * scale``.

    peft always scales by ``alpha / rank``. LyCORIS does too while a factor is rank-decomposed, but when both
    factors are full matrices it scales by 1 and writes ``alpha = rank`` (lycoris/modules/lokr.py, and ComfyUI
    reads it so), so peft's scale is folded into ``lokr_w1`` then.
    """
    full = "lokr_w1" in factors and "lokr_w2" in factors
    tensors = dict(factors)
    if full:
        tensors["lokr_w1"] = factors["lokr_w1"] * (float(alpha) / rank)
    tensors["alpha"] = torch.tensor(float(rank) if full else float(alpha))
    return tensors


def _layer_tensors(kind: str, module: Any, adapter: str) -> dict[str, torch.Tensor]:
    if kind in ("lora", "dora"):
        tensors = lora_file_tensors(module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                                    module.lora_alpha[adapter])
        if kind == "dora":
            magnitude = module.lora_magnitude_vector[adapter].weight
            tensors["dora_scale"] = dora_scale(magnitude, module.get_base_layer().weight.dim())
        return tensors
    if kind == "loha":
        return loha_file_tensors(module.hada_w1_a[adapter], module.hada_w1_b[adapter], module.hada_w2_a[adapter],
                                 module.hada_w2_b[adapter], module.alpha[adapter])
    factors = {key: getattr(module, key)[adapter] for key in LAYER_KEYS["lokr"][:-1]
               if adapter in getattr(module, key)}
    return lokr_file_tensors(factors, module.r[adapter], module.alpha[adapter])


def _model_path(path: str) -> str:
    # peft may wrap the model (PeftModel, DDP): keep the path relative to the original model.
    for wrapper in ("module.", "base_model.model."):
        if path.startswith(wrapper):
            path = path[len(wrapper):]
    return path


def adapter_layers(model: torch.nn.Module, adapter: str = "default") -> Iterable[AdapterLayer]:
    """Every peft adapter layer of ``model`` (any :data:`LAYER_KEYS` type), in module order, with its file tensors;
    the type is read from the peft layer itself."""
    for path, module in model.named_modules():
        kind = layer_kind(module, adapter)
        if kind is not None:
            yield AdapterLayer(_model_path(path), kind, _layer_tensors(kind, module, adapter))


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> Iterable[tuple[str, torch.Tensor, torch.Tensor, float]]:
    """``(module path, down weight, up weight, alpha)`` for every peft LoRA layer of ``model``, in module order."""
    for path, module in model.named_modules():
        if layer_kind(module, adapter) in ("lora", "dora"):
            yield (_model_path(path), module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                   float(module.lora_alpha[adapter]))


def to_kohya_tensors(named_layers: Iterable[tuple[str, AdapterLayer]],
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The file's tensors from ``(kohya name, layer)`` entries, cast to ``dtype`` on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in named_layers:
        for suffix, tensor in layer.tensors.items():
            tensors[f"{name}.{suffix}"] = tensor.detach().to("cpu", dtype).contiguous()
    return tensors


def kohya_state_dict(family: str | Family, denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module] = (),
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors of a peft-adapted denoiser (and text encoders, when they were trained)."""
    family = get_family(family)
    config = dict(getattr(denoiser, "config", {}) or {})
    entries = [(family.kohya_module_name(layer.path, config), layer) for layer in adapter_layers(denoiser)]
    for prefix, encoder in zip(family.text_encoder_prefixes(), text_encoders, strict=False):
        entries += [(text_encoder_module_name(prefix, encoder, layer.path), layer) for layer in adapter_layers(encoder)]
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("two LoRA modules map to the same kohya name")
    return to_kohya_tensors(entries, dtype)


def file_network_type(keys: Iterable[str]) -> str:
    """Which layer type a kohya/LyCORIS file holds, from its key suffixes: ``"lokr"``, ``"loha"``, ``"dora"``
    (LoRA keys plus ``dora_scale``) or ``"lora"`` (anything else, diffusers' own layout included).

    >>> file_network_type(["lora_unet_x.hada_w1_a", "lora_unet_x.alpha"])
    'loha'
    """
    suffixes = {key.split(".", 1)[1] for key in keys if "." in key}
    if any(s.startswith("lokr_") for s in suffixes):
        return "lokr"
    if any(s.startswith("hada_") for s in suffixes):
        return "loha"
    return "dora" if "dora_scale" in suffixes else "lora"


# ---- hashes ------------------------------------------------------------------------------------------------
def addnet_hash_safetensors(data: bytes) -> str:
    """sha256 of everything after the safetensors header (sd-webui-additional-networks' "new" hash)."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def addnet_hash_legacy(data: bytes) -> str:
    """First 8 hex digits of sha256 of the 64 KiB at offset 1 MiB (A1111's old model hash)."""
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def sshs_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as kohya's ``precalculate_safetensors_hashes`` computes them:
    over the file the tensors make with only the ``ss_*`` metadata, so other keys can change freely."""
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    return addnet_hash_safetensors(data), addnet_hash_legacy(data)


def modelspec_hash(tensors: dict[str, torch.Tensor]) -> str:
    """``modelspec.hash_sha256``: sha256 over each tensor's bytes, in key order (kohya's way), ``0x``-prefixed."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(_tensor_bytes(save({"tensor": tensors[name]})))
    return "0x" + digest.hexdigest()


def _tensor_bytes(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return data[8 + n:]




# ---- metadata ----------------------------------------------------------------------------------------------
# LyCORIS' algo names for the network types it implements (DoRA is its LoCon with ``dora_wd``).
LYCORIS_ALGOS = {"dora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr"}


def network_metadata(cfg: dict) -> tuple[str, dict | None]:
    """``(ss_network_module, ss_network_args)`` as sd-scripts records a run of this network type: kohya's
    ``networks.lora`` for plain LoRA (``conv_dim``/``conv_alpha`` when it trains convolutions), LyCORIS'
    ``lycoris.kohya`` with its ``--network_args`` (strings, as sd-scripts parses them) for the others.

    >>> network_metadata({"network_type": "loha", "train_conv": False, "rank": 8, "alpha": 4.0})
    ('lycoris.kohya', {'algo': 'loha', 'preset': 'attn-mlp'})
    """
    network, conv = cfg["network_type"], cfg["train_conv"]
    if network == "lora":
        return "networks.lora", ({"conv_dim": cfg["conv_rank"], "conv_alpha": cfg["conv_alpha"]} if conv else None)
    args: dict[str, str] = {"algo": LYCORIS_ALGOS[network]}
    if conv:
        args.update(conv_dim=str(cfg["conv_rank"]), conv_alpha=str(cfg["conv_alpha"]))
    else:
        # LyCORIS' default preset ("full") adapts the ResNet convolutions too; these runs left them alone.
        args["preset"] = "attn-mlp"
    if network == "dora":
        # The magnitude is per output feature (peft's axis); LyCORIS' older default was per input feature.
        args.update(dora_wd="True", wd_on_output="True")
    if network == "lokr":
        args["factor"] = str(-1 if cfg.get("lokr_factor") is None else cfg["lokr_factor"])
    return "lycoris.kohya", args


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How often each comma-separated tag occurs in ``captions`` (kohya's ``ss_tag_frequency`` counts).

    >>> tag_frequency(["a, b", "b,c", ""])
    {'a': 1, 'b': 2, 'c': 1}
    """
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def build_metadata(*, family: str | Family, cfg: dict, title: str, output_name: str, dataset_name: str, captions: Sequence[str],
                   num_images: int, steps: int, epoch: int, num_epochs: int, batches_per_epoch: int, world_size: int,
                   optimizer_name: str, mixed_precision: str, started_at: float, finished_at: float,
                   bucket_info: dict, session_id: int, checkpoint_name: str, checkpoint_sha256: str | None,
                   objective: Objective, lorakit: dict[str, object]) -> dict[str, str]:
    """All header metadata of a LoRA file except the hashes (see :func:`finish_metadata`); every value a string.
    The family gives the base model's names, ``objective`` what the LoRA was trained to predict."""
    family = get_family(family)
    resolution = cfg["resolution"]
    network_module, network_args = network_metadata(cfg)
    ss: dict[str, object] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_training_finished_at": finished_at,
        "ss_output_name": output_name,
        "ss_learning_rate": cfg["lr"],
        "ss_unet_lr": cfg["lr"],
        "ss_text_encoder_lr": cfg["text_encoder_lr"] if cfg["train_text_encoder"] else None,
        "ss_num_train_images": num_images * cfg["repeats"],
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        "ss_batch_size_per_device": cfg["batch_size"],
        "ss_total_batch_size": cfg["batch_size"] * cfg["gradient_accumulation_steps"] * world_size,
        "ss_gradient_checkpointing": cfg["gradient_checkpointing"],
        "ss_gradient_accumulation_steps": cfg["gradient_accumulation_steps"],
        "ss_lr_warmup_steps": cfg["lr_warmup_steps"],
        "ss_lr_scheduler": cfg["lr_scheduler"],
        "ss_network_module": network_module,
        "ss_network_dim": cfg["rank"],
        "ss_network_alpha": cfg["alpha"],
        "ss_network_dropout": cfg["lora_dropout"],
        "ss_mixed_precision": mixed_precision,
        "ss_v2": False,
        "ss_base_model_version": family.kohya_base_model_version,
        "ss_clip_skip": cfg["clip_skip"] if family.uses_clip_skip else None,
        "ss_cache_latents": cfg["cache_latents"],
        "ss_seed": cfg["seed"],
        "ss_noise_offset": cfg["noise_offset"] or None,
        "ss_min_snr_gamma": cfg["min_snr_gamma"],
        "ss_optimizer": optimizer_name,
        "ss_max_grad_norm": cfg["max_grad_norm"],
        "ss_caption_dropout_rate": cfg["caption_dropout"],
        "ss_shuffle_caption": cfg["shuffle_tags"],
        "ss_keep_tokens": cfg["keep_tokens"],
        "ss_resolution": (resolution, resolution),
        "ss_enable_bucket": True,
        "ss_bucket_no_upscale": cfg["bucket_no_upscale"],
        "ss_min_bucket_reso": cfg["bucket_min_side"],
        "ss_max_bucket_reso": cfg["bucket_max_side"],
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_dataset_dirs": json.dumps({dataset_name: {"n_repeats": cfg["repeats"], "img_count": num_images}}),
        "ss_tag_frequency": json.dumps({dataset_name: tag_frequency(captions)}),
        "ss_sd_model_name": checkpoint_name,
        "ss_new_sd_model_hash": checkpoint_sha256,
        "ss_training_comment": lorakit.get("notes") or None,
    }
    if network_args:
        ss["ss_network_args"] = json.dumps(network_args)
    # kohya stores str(value) for everything, so None is "None" and booleans are "True"/"False".
    metadata = {k: str(v) for k, v in ss.items()}
    metadata.update({
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": _iso_seconds(finished_at),
    })
    metadata.update(objective.kohya_metadata())
    for key, value in lorakit.items():
        if value is not None:
            metadata[f"lorakit.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return metadata


def finish_metadata(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` plus the hashes computed from the tensors (and its ``ss_*`` keys)."""
    model_hash, legacy_hash = sshs_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash,
            "modelspec.hash_sha256": modelspec_hash(tensors)}


def _iso_seconds(timestamp: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(int(timestamp), UTC).isoformat()


# ---- files -------------------------------------------------------------------------------------------------
def non_finite_values(tensors: dict[str, torch.Tensor]) -> tuple[int, int, str | None]:
    """``(inf/NaN values, all values, first key holding one)`` of the tensors as they would be saved."""
    bad, total, first = 0, 0, None
    for key, tensor in tensors.items():
        count = int((~torch.isfinite(tensor)).sum()) if tensor.is_floating_point() else 0
        total += tensor.numel()
        if count:
            bad += count
            first = first or key
    return bad, total, first


def save_lora_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                   root: Root | None = None) -> str:
    """Write the file atomically (a temporary file renamed into place) inside ``root`` (default: the folder it is
    in) and return its sha256. A link on the way from ``root`` is refused, never written through.

    Tensors with inf or NaN values (a learning rate far too high, or fp16 overflowing on the cast to the saved
    dtype while the loss still looked finite) are refused: such a file renders black or noise in every UI.
    """
    from .config import TrainingError

    bad, total, first = non_finite_values(tensors)
    if bad:
        raise TrainingError(f"the trained LoRA has {bad:,} of {total:,} values inf or NaN (first in {first}); "
                            f"{Path(path).name} was not written and nothing is recorded. Lower the learning rate (the "
                            "file is saved in fp16, whose largest value is 65504)")
    data = save(tensors, metadata=metadata)
    (root or Root(Path(path).parent, "the output folder")).write_atomic(path, data)
    return hashlib.sha256(data).hexdigest()


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and header metadata of a LoRA file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return tensors, metadata


def read_lora_bytes_hashes(path: str | Path) -> tuple[str, str]:
    """Recompute the sshs hashes of a written file from its tensors and ``ss_*`` keys (for checks)."""
    tensors, metadata = read_lora_file(path)
    return sshs_hashes(tensors, metadata)


__all__ = [
    "LAYER_KEYS", "VOLATILE_METADATA_KEYS", "AdapterLayer", "adapter_layers", "build_metadata",
    "diffusers_to_sgm", "file_network_type", "finish_metadata", "kohya_name", "kohya_state_dict", "layer_kind",
    "lora_layers", "network_metadata", "read_lora_file", "save_lora_file",
    "sshs_hashes", "tag_frequency", "text_encoder_module_name", "unet_module_name",
]
