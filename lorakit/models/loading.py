"""Loading a registered checkpoint as a diffusers pipeline, offline, and the formats lorakit accepts.

Checkpoints come in two forms:

* a **diffusers folder** (``model_index.json`` plus one sub-folder per component), what ``make-tiny`` writes;
* a **single file** in the original Stable Diffusion (LDM/SGM) key layout, usually ``.safetensors``: the form
  users download. Its weights carry no configs, and diffusers would fetch those from a model hub. lorakit
  instead hands diffusers a local *config folder* (a diffusers folder without weights): the one the record
  names (``weights.config``), else ``<file>.config/`` beside the file (for tiny or otherwise non-default
  architectures), else the real SD1.5 / SDXL base configs shipped in ``lorakit/models/configs/``. Tokenizer
  files are not shipped: they are built from the packaged CLIP vocabulary into
  ``<modelsRoot>/.lorakit-configs/`` at first use, because the package folder may be read-only.

Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run code when loaded, so they are refused
unless the caller (``allow_pickle=True``) or the record (``allowPickle: true``) opts in.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from .. import families
from ..errors import ConfigError, LorakitError
from ..families import Family, TextEncoder
from ..hashing import SAFE_SUFFIXES, check_safetensors
from ..roots import check_regular
from ..workspace import Workspace, as_workspace
from .registry import (
    SIDECAR_CONFIG_SUFFIX,
    check_pickle_allowed,
    check_weights_files,
    checkpoint_family,
    checkpoint_objective,
    checkpoint_paths,
    get_checkpoint,
    objective_label,
    weights_format,
)
from .tokenizer import write_clip_tokenizer

CONFIGS_DIR = Path(__file__).parent / "configs"
CONFIG_CACHE_NAME = ".lorakit-configs"


# ---- config folders for single files ---------------------------------------------------------------------
def config_cache_root(ws: Workspace) -> Path:
    return ws.config.models_root / CONFIG_CACHE_NAME


def complete_config_folder(source: Path, family: str | Family, cache_root: Path) -> Path:
    """``source`` if it is a complete diffusers config folder, else a copy with the family's CLIP tokenizers added.

    The copy lives in ``cache_root/<family>-<hash of source's files>/``, so a changed source gets a new copy,
    and is written into a temporary folder and renamed, so concurrent loaders never see half of one.
    """
    source = Path(source)
    family = families.get(family)
    if not (source / "model_index.json").is_file():
        raise ConfigError(f"{source}: not a diffusers config folder (no model_index.json)")
    missing = [encoder for encoder in family.text_encoders
               if not any((source / encoder.tokenizer / f).is_file() for f in ("vocab.json", "tokenizer.json"))]
    if not missing:
        return source
    digest = hashlib.sha256()
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(file.relative_to(source).as_posix().encode() + b"\0" + file.read_bytes())
    target = cache_root / f"{family.name}-{digest.hexdigest()[:16]}"
    if (target / "model_index.json").is_file():
        return target
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the config cache {cache_root} ({exc.strerror}); check modelsRoot") from None
    with FileLock(str(cache_root / f".{target.name}.lock")):
        if (target / "model_index.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{target.name}."))
        try:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            for encoder in missing:
                write_clip_tokenizer(tmp / encoder.tokenizer, pad_token=encoder.pad_token)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def single_file_config_source(weights_file: Path, family: str | Family, explicit: Path | None = None) -> Path:
    """Which config folder describes a single-file checkpoint: explicit, else ``<file>.config/``, else shipped."""
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise ConfigError(f"config folder {explicit} for {weights_file.name} does not exist")
        return Path(explicit)
    sidecar = weights_file.with_name(weights_file.name + SIDECAR_CONFIG_SUFFIX)
    if sidecar.is_dir():
        return sidecar
    return CONFIGS_DIR / families.get(family).name


# ---- loading ---------------------------------------------------------------------------------------------
def pipeline_class(family: str | Family) -> Any:
    """The diffusers pipeline class of a model family."""
    return families.get(family).pipeline_class()


def _read_state_dict(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a single-file checkpoint whose keys start with ``prefix`` (pickle already vetted)."""
    if weights_format(path) == "safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
    # weights_only: even an allowed pickle may only rebuild tensors and plain containers.
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {key: value for key, value in state.items() if key.startswith(prefix)}


def load_openclip_text_encoder(weights_file: Path, config_dir: Path, torch_dtype: torch.dtype, encoder: TextEncoder):
    """A text encoder stored under OpenCLIP's names in a single file (``encoder.single_file_prefix``), as the
    transformers model ``encoder.model_class`` that ``config_dir/<encoder.attribute>`` describes."""
    import transformers
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    prefix, where = encoder.single_file_prefix, config_dir / encoder.attribute
    state = _read_state_dict(weights_file, prefix)
    if not state:
        raise ConfigError(f"{weights_file}: no OpenCLIP text encoder ({prefix}*) for {encoder.attribute} in this file")
    model_class = getattr(transformers, encoder.model_class)
    model = model_class(model_class.config_class.from_pretrained(where))
    converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    try:
        missing, unexpected = model.load_state_dict(converted, strict=False)
    except RuntimeError as exc:  # shape mismatches: the file is another architecture than the config
        raise ConfigError(
            f"{weights_file}: {encoder.attribute} does not fit the config folder {config_dir} ({str(exc)[:300]}); "
            f"a non-default architecture needs its config folder as {weights_file.name}{SIDECAR_CONFIG_SUFFIX}/"
        ) from exc
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConfigError(
            f"{weights_file}: {encoder.attribute} does not match its config {where} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(torch_dtype)


def load_vae(path: Path, config_dir: Path | None, torch_dtype: torch.dtype):
    """A VAE from a diffusers folder (``config.json`` or a ``vae/`` sub-folder) or a single file.

    A single file's config is ``<file>.config/`` (a VAE folder with ``config.json``), else ``config_dir/vae``
    (the checkpoint's own VAE config).
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ConfigError(f"{path}: not a diffusers VAE folder (no config.json, no vae/config.json)")
        return AutoencoderKL.from_pretrained(folder, torch_dtype=torch_dtype, local_files_only=True,
                                             use_safetensors=weights_format(folder) != "pickle")
    sidecar = path.with_name(path.name + SIDECAR_CONFIG_SUFFIX)
    if (sidecar / "config.json").is_file():
        config, subfolder = sidecar, None
    elif config_dir is not None and (config_dir / "vae" / "config.json").is_file():
        config, subfolder = config_dir, "vae"
    else:
        raise ConfigError(f"{path}: no VAE config (put a config.json in {sidecar}/)")
    state = _read_state_dict(path)
    return AutoencoderKL.from_single_file(state, config=str(config), subfolder=subfolder,
                                          torch_dtype=torch_dtype, local_files_only=True)


def load_pipeline(
    ws: Workspace | str | Path | None,
    checkpoint: str | dict,
    *,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_pickle: bool | None = None,
    config_dir: str | Path | None = None,
):
    """The diffusers pipeline of ``checkpoint`` (an id or a checkpoint record), from local files only.

    Never contacts a model hub: folders load with ``local_files_only``, single files with a local config
    folder (see the module docstring). ``allow_pickle`` (default: the record's ``allowPickle``) permits
    ``.ckpt``/``.bin``-style weights. A record's ``vaeWeights`` replaces the checkpoint's VAE.

    >>> pipe = load_pipeline(None, "tiny_sd15")                       # doctest: +SKIP
    >>> pipe("a red potion", num_inference_steps=4, height=64, width=64).images[0]   # doctest: +SKIP
    """
    ws = as_workspace(ws)
    record = get_checkpoint(ws, checkpoint) if isinstance(checkpoint, str) else checkpoint
    what = f"checkpoint {record.get('id')!r}"
    family = families.get(checkpoint_family(record))
    allow = bool(record.get("allowPickle", False)) if allow_pickle is None else allow_pickle
    paths = checkpoint_paths(ws, record, config_dir)
    weights = paths["weights"]
    check_pickle_allowed(weights, allow, what)
    check_weights_files(weights, family, what)  # a record from Git may name the wrong family or a broken file
    vae = paths["vae"]
    if vae is not None:
        check_pickle_allowed(vae, allow, f"{what} vaeWeights")
        check_weights_files(vae, None, f"{what} vaeWeights")
    cls = family.pipeline_class()
    extra: dict[str, Any] = {}
    config_folder = None
    with warnings.catch_warnings():
        # diffusers >=0.36 renamed torch_dtype to dtype; the old name keeps older diffusers working.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        if weights.is_dir():
            if not (weights / "model_index.json").is_file():
                raise ConfigError(f"{what}: {weights} is a folder but not a diffusers pipeline (no model_index.json)")
            config_folder = weights
        else:
            source = single_file_config_source(weights, family, paths["config"])
            config_folder = complete_config_folder(source, family, config_cache_root(ws))
            extra |= family.single_file_components(weights, config_folder, torch_dtype)
        if vae is not None:
            extra["vae"] = load_vae(vae, config_folder, torch_dtype)
        if weights.is_dir():
            pipe = cls.from_pretrained(weights, torch_dtype=torch_dtype, local_files_only=True,
                                       use_safetensors=weights_format(weights) != "pickle",
                                       variant=folder_variant(weights), **extra)
        else:
            try:
                pipe = cls.from_single_file(str(weights), config=str(config_folder), torch_dtype=torch_dtype,
                                            local_files_only=True, **extra)
            except (ValueError, RuntimeError, KeyError) as exc:
                # Usually a shape mismatch: the file is not the architecture its config folder describes.
                raise ConfigError(
                    f"{what}: {weights.name} does not fit the config folder {source} ({str(exc)[:300]}). "
                    f"A non-default architecture needs its diffusers config folder as "
                    f"{weights.name}{SIDECAR_CONFIG_SUFFIX}/ beside the file, or registered with --config"
                ) from exc
    # Moving to the CPU they are already on only makes diffusers warn about fp32 modules.
    return pipe if str(device) == "cpu" else pipe.to(device)


def load_lora_file(pipe, path: str | Path, adapter_name: str, *, family: str | Family | None = None) -> None:
    """Load a LoRA ``.safetensors`` file into ``pipe`` as adapter ``adapter_name``, so ``pipe.set_adapters``
    weighs it like any other.

    Plain LoRA and LoCon files go through ``diffusers.load_lora_weights``, given as folder plus ``weight_name``
    (the form every diffusers release since 0.35 reads offline; 0.36 refuses a bare file path when
    ``HF_HUB_OFFLINE`` is set). diffusers reads no LoHa or LoKr file of an SD1.5/SDXL pipeline and drops a DoRA
    file's ``dora_scale`` (it would render as plain LoRA), so those are put on the pipeline's UNet and text
    encoders as peft adapters of their type, the file's kohya names mapped back to the pipeline's modules.
    A plain file cannot go on top of a LoHa/LoKr one (see :func:`needs_unload_before`). ``family`` is the
    checkpoint's (default: the family of the pipeline's class).
    """
    path = Path(path)
    check_regular(path, "LoRA weights file")  # on the open handle: a FIFO or a device is refused, never read
    network = lora_file_network(path)  # checks the file's header first
    if network in LORA_LAYER_TYPES and has_lycoris_layers(pipe):
        raise LorakitError(f"cannot load the {network} file {path} after a LoHa or LoKr file into the same pipeline "
                           "(peft cannot put a LoRA layer over theirs); load LoRA, LoCon and DoRA files first")
    if network == "lora":
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
        return
    from safetensors.torch import load_file

    add_file_adapter(pipe, load_file(str(path)), network, adapter_name, what=str(path), family=family)


# The file types peft puts on a model as LoRA layers (DoRA is a LoRA layer with a magnitude).
LORA_LAYER_TYPES = ("lora", "dora")


def lora_file_network(path: str | Path) -> str:
    """``lora`` (LoRA and LoCon), ``dora``, ``loha`` or ``lokr``: what a LoRA file holds, from its keys."""
    from ..train.kohya_format import file_network_type

    path = Path(path)
    if path.suffix.lower() not in SAFE_SUFFIXES:
        return "lora"
    # A release's file comes from a shared folder: its header is held to the file before any loader reads it.
    header = check_safetensors(path, "LoRA weights")
    return file_network_type(key for key in header if key != "__metadata__")


def has_lycoris_layers(pipe) -> bool:
    """Whether a LoHa or LoKr adapter is on any of the pipeline's models."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return any(isinstance(m, LycorisLayer) for model in pipe.components.values()
               if isinstance(model, torch.nn.Module) for m in model.modules())


def needs_unload_before(pipe, path: str | Path) -> bool:
    """Whether loading ``path`` needs the pipeline's adapters unloaded first: peft wraps a LoHa/LoKr layer in a
    LoRA layer badly (it fails deep inside), though the other order works. A caller that keeps adapters loaded
    (the eval worker, the picker) then unloads them all and loads what it needs again, plain files first."""
    return lora_file_network(path) in LORA_LAYER_TYPES and has_lycoris_layers(pipe)


def pipeline_family(pipe: Any, family: str | Family | None = None) -> Family:
    """The family of a loaded pipeline: the one the caller names, else the one whose pipeline class it is (a
    pipeline of a class no family claims is an error, never a guess from the components it has)."""
    if family is not None:
        return families.get(family)
    found = families.from_pipeline(pipe)
    if found is None:
        raise LorakitError(f"a {type(pipe).__name__} is not the pipeline of any model family lorakit knows "
                           f"({', '.join(families.NAMES)}); load the checkpoint with lorakit.load_pipeline")
    return found


def pipeline_module_names(pipe: Any, *, family: str | Family | None = None) -> dict[str, tuple[str, str]]:
    """``kohya name -> (pipeline component, module path)`` for every Linear and Conv2d of the pipeline's denoiser
    and text encoders (a module that already carries adapters counts by its own path), computed with the names
    the trainer writes, so the two agree by construction. ``family`` is the checkpoint's (default: the family
    of the pipeline's class)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..train.kohya_format import text_encoder_module_name

    family = pipeline_family(pipe, family)
    denoiser = getattr(pipe, family.denoiser)
    denoiser_config = dict(denoiser.config)
    components = [(family.denoiser, denoiser, None)] + [
        (encoder.attribute, getattr(pipe, encoder.attribute, None), encoder.kohya_prefix)
        for encoder in family.text_encoders]
    names: dict[str, tuple[str, str]] = {}
    for attr, model, prefix in components:
        if model is None:
            continue
        tuned: list[str] = []
        for path, module in model.named_modules():
            # The Linear layers inside an adapter (and the wrapped base layer) are not modules of the model.
            if any(path.startswith(t + ".") for t in tuned):
                continue
            if isinstance(module, BaseTunerLayer):
                tuned.append(path)
            elif not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                continue
            try:
                name = (family.kohya_module_name(path, denoiser_config) if prefix is None
                        else text_encoder_module_name(prefix, model, path))
            except ValueError:  # a module with no place in the original layout gets no kohya name
                continue
            names[name] = (attr, path)
    return names


def add_file_adapter(pipe, tensors: dict[str, torch.Tensor], network: str, adapter_name: str, *,
                     what: str = "the LoRA file", family: str | Family | None = None) -> None:
    """Put the DoRA, LoHa or LoKr layers of a kohya/LyCORIS state dict on ``pipe`` as peft adapter
    ``adapter_name`` (one peft config per component, every layer's tensors as the file has them)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        layers.setdefault(name, {})[suffix] = tensor
    modules = pipeline_module_names(pipe, family=family)
    unknown = sorted(n for n in layers if n not in modules)
    if unknown:
        raise LorakitError(f"{what} adapts {len(unknown)} module(s) this pipeline does not have (e.g. {unknown[0]}); "
                           "it was trained for another model family or architecture: use it with a checkpoint of "
                           "that family")
    by_component: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, parts in layers.items():
        _check_layer(network, name, parts, what)
        component, path = modules[name]
        by_component.setdefault(component, {})[path] = parts
    for component, component_layers in by_component.items():
        model = getattr(pipe, component)
        model.add_adapter(_file_peft_config(network, component_layers), adapter_name=adapter_name)
        for path, parts in component_layers.items():
            _set_layer_tensors(network, model.get_submodule(path), adapter_name, parts)


def _check_layer(network: str, name: str, parts: dict[str, torch.Tensor], what: str) -> None:
    if any(k in parts for k in ("hada_t1", "hada_t2", "lokr_t2")):
        raise LorakitError(f"{what}: {name} is Tucker-decomposed (use_tucker / conv CP), which lorakit does not "
                           "render; retrain it without use_tucker, or render it in ComfyUI or A1111")
    if network == "dora" and "dora_scale" in parts and parts["dora_scale"].shape[0] != parts["lora_up.weight"].shape[0]:
        raise LorakitError(f"{what}: {name}'s dora_scale has one value per input feature (LyCORIS' old "
                           "wd_on_output=False); lorakit renders DoRA with one per output feature: retrain it with "
                           "wd_on_output=True")


def _file_rank_alpha(network: str, parts: dict[str, torch.Tensor]) -> tuple[int, float]:
    """The rank and alpha peft's ``alpha / rank`` scale needs to reproduce LyCORIS' scale for this layer."""
    alpha = parts.get("alpha")
    if network == "dora":
        rank = parts["lora_down.weight"].shape[0]
    elif network == "loha":
        rank = parts["hada_w1_b"].shape[0]
    else:
        # LoKr scales by alpha / rank only while a factor is rank-decomposed; two full factors take scale 1.
        decomposed = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        if decomposed is None:  # rank = alpha = the file's alpha: scale 1, and the layer reads back as the file
            same = 1.0 if alpha is None else float(alpha.item())
            return max(1, round(same)), float(max(1, round(same)))
        rank = decomposed.shape[0]
    return rank, float(rank if alpha is None else alpha.item())


def _file_peft_config(network: str, layers: dict[str, dict[str, torch.Tensor]]) -> Any:
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    paths = list(layers)
    ranks = {p: _file_rank_alpha(network, parts) for p, parts in layers.items()}
    shape: dict[str, Any] = {"r": 1, "target_modules": paths, "rank_pattern": {p: r for p, (r, _) in ranks.items()},
             "alpha_pattern": {p: a for p, (_, a) in ranks.items()}}
    if network == "dora":
        return LoraConfig(lora_alpha=1, use_dora=True, **shape)
    if network == "loha":
        return LoHaConfig(alpha=1, use_effective_conv2d=False, **shape)
    return LoKrConfig(alpha=1, use_effective_conv2d=False, **shape)


def _set_layer_tensors(network: str, layer: Any, adapter: str, parts: dict[str, torch.Tensor]) -> None:
    """Replace the freshly made adapter weights of one peft layer by the file's (in the base layer's dtype)."""
    base = layer.get_base_layer().weight

    def param(t: torch.Tensor) -> torch.nn.Parameter:
        return torch.nn.Parameter(t.to(base.device, base.dtype), requires_grad=False)

    with torch.no_grad():
        if network == "dora":
            layer.lora_A[adapter].weight.copy_(parts["lora_down.weight"])
            layer.lora_B[adapter].weight.copy_(parts["lora_up.weight"])
            magnitude = layer.lora_magnitude_vector[adapter].weight
            magnitude.copy_(parts["dora_scale"].reshape(magnitude.shape))
            return
        # peft decided its own factor shapes from a rank and a factor; the file's shapes are the ones that count.
        keys = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if network == "loha" else \
            ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
        for key in keys:
            slots = getattr(layer, key)
            if adapter in slots:
                del slots[adapter]
            if key in parts:
                slots[adapter] = param(parts[key])


def folder_variant(folder: Path) -> str | None:
    """``"fp16"`` when a diffusers folder holds only ``*.fp16.*`` UNet weights (a common download), else None."""
    unet = folder / "unet"
    if not unet.is_dir() or any(p.name.startswith("diffusion_pytorch_model.") and p.name.count(".") == 1
                                for p in unet.iterdir()):
        return None
    return "fp16" if any(".fp16." in p.name for p in unet.iterdir()) else None


def models_from_config(config_folder: str | Path, family: str | Family, device: str = "meta", *,
                       vae: bool = False) -> dict[str, Any]:
    """The denoiser, the text encoder(s) and, with ``vae``, the VAE of a diffusers config folder, with random
    weights, built on ``device``. On ``meta`` (the default) that is every module and shape with no weights
    allocated (a full-size SDXL UNet in under a second), which is what counting modules or memory needs."""
    import diffusers

    folder = Path(config_folder)
    with torch.device(device):
        models = families.get(family).models_from_config(folder)
        if vae:
            models["vae"] = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae"))
    return models


def checkpoint_config_folder(ws: Workspace, record: dict) -> Path:
    """The diffusers config folder that describes a checkpoint's architecture: the folder itself, or for a
    single file the one :func:`single_file_config_source` picks."""
    paths = checkpoint_paths(ws, record)
    weights = paths["weights"]
    if weights.is_dir():
        return weights
    return single_file_config_source(weights, checkpoint_family(record), paths["config"])


def describe_pipeline(pipe) -> dict:
    """Components of a loaded pipeline: class, parameter count and dtype of each model, and the totals."""
    components = {}
    for name, component in pipe.components.items():
        if component is None:
            continue
        entry: dict[str, Any] = {"class": type(component).__name__}
        if isinstance(component, torch.nn.Module):
            params = list(component.parameters())
            entry["parameters"] = sum(p.numel() for p in params)
            entry["dtype"] = str(params[0].dtype).removeprefix("torch.") if params else None
        components[name] = entry
    dtypes = sorted({c["dtype"] for c in components.values() if c.get("dtype")})
    return {
        "pipeline": type(pipe).__name__,
        "components": components,
        "parameters": sum(c.get("parameters", 0) for c in components.values()),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
    }


def verify_checkpoint(
    ws: Workspace | str | Path | None,
    checkpoint_id: str,
    *,
    allow_pickle: bool | None = None,
    torch_dtype: torch.dtype = torch.float32,
) -> dict:
    """Load checkpoint ``checkpoint_id`` offline, hash its weights and record the hash; return what was found.

    The report has ``id, family, format, path, objective`` (``epsilon``, ``v`` or ``v+ztsnr``: what it trains
    and renders with, see :func:`lorakit.models.checkpoint_objective`) ``, prediction, zeroTerminalSnr, pipeline,
    components{name: {class, parameters, dtype}}, parameters, dtype, sha256`` (and ``vaeSha256`` with a separate
    VAE). The hashes are stored on the
    record as ``weights.sha256`` / ``vaeWeights.sha256`` with ``hashOf`` (``file`` or ``folder``).
    """
    from .registry import record_weights_hash, weights_sha256

    ws = as_workspace(ws)
    record = get_checkpoint(ws, checkpoint_id)
    paths = checkpoint_paths(ws, record)
    what = f"checkpoint {checkpoint_id!r}"
    family = families.get(checkpoint_family(record))
    try:
        pipe = load_pipeline(ws, record, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    except LorakitError:
        raise
    except Exception as exc:  # diffusers, safetensors and torch raise many kinds for a file they cannot read
        raise ConfigError(f"{what}: {paths['weights']} does not load as an {family.label} checkpoint "
                          f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}); "
                          f"check that it is a complete {family.label} checkpoint, or register it again with the right "
                          "--family") from None
    objective = checkpoint_objective(ws, record)
    report = {"id": checkpoint_id, "family": family.name, "format": weights_format(paths["weights"]),
              "path": str(paths["weights"]), "objective": objective_label(objective), **objective.record(),
              **describe_pipeline(pipe)}
    del pipe
    report["sha256"] = weights_sha256(paths["weights"])
    record_weights_hash(ws, checkpoint_id, "weights", record["weights"], report["sha256"],
                        "folder" if paths["weights"].is_dir() else "file")
    if paths["vae"] is not None:
        report["vaePath"] = str(paths["vae"])
        report["vaeSha256"] = weights_sha256(paths["vae"])
        record_weights_hash(ws, checkpoint_id, "vaeWeights", record["vaeWeights"], report["vaeSha256"],
                            "folder" if paths["vae"].is_dir() else "file")
    return report
