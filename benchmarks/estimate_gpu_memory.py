"""GPU memory a training run needs, per preset, estimated on a machine without a GPU.

    python benchmarks/estimate_gpu_memory.py [--out memory.json]             # every shipped full-size preset
    python benchmarks/estimate_gpu_memory.py --preset sdxl-style --batch 4 [--no-checkpointing] [--rank 32]
    python benchmarks/estimate_gpu_memory.py --smoke                         # the tiny checkpoints, in seconds

The full-size UNet of the preset's family is built from lorakit's shipped configs on PyTorch's ``meta`` device
(shapes only, no weights allocated), given the preset's adapters with lorakit's own ``unet_targets`` and
``add_network``, cast as the recipe casts it (frozen base in bf16, adapter weights in fp32), and trained for two
steps with the recipe's ``loss_step`` and a real AdamW, at the preset's resolution, batch size and gradient
checkpointing. Every tensor storage the steps create is counted while it is alive, so the peak is the most memory
the CUDA caching allocator would have handed out (``torch.cuda.max_memory_allocated``) for that step, give or take
the allocator's rounding and cuBLAS/cuDNN workspaces.

Two things make the meta device behave as the GPU would:
- bf16 autocast: ``torch.autocast("cuda")`` does not act on meta tensors, so the same casts are made at the same
  level (above autograd, so the graph saves what autocast's would): matmuls and convolutions in bf16, group and
  layer norms and the loss in fp32, the rest by type promotion;
- attention: SDPA on meta takes the math path, which keeps a sequence-by-sequence matrix per head; on a GPU it is
  flash attention, which keeps one value per query. Each call goes to a flash kernel instead.

The rest of a run's resident memory is counted from the models' sizes: the text encoders (in bf16; they stay on
the GPU when captions change per step, which tag shuffling does; text-encoder training is not modelled), the VAE (fp32 with ``vae_fp32``), and the cached
latents (bf16, 4 x (side / 8)^2 values per image). Not counted: the CUDA context (about 0.5 GB, outside the
allocator) and fragmentation; leave a GB or two.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GiB = 2**30
FULL_SIZE_PRESETS = ["sd15-style", "sd15-character", "sdxl-style", "sdxl-character"]
DATASET_IMAGES = 100   # the cached latents of a 100-image dataset, a typical LoRA's


@dataclass
class Estimate:
    preset: str
    family: str
    resolution: int
    batch_size: int
    gradient_checkpointing: bool
    rank: int
    trainable_params: int
    unet_step_peak_gib: float      # UNet weights, adapters, gradients, AdamW state, activations: the step's peak
    text_encoders_gib: float
    vae_gib: float
    latents_gib: float
    total_gib: float               # what the allocator hands out at the peak
    seconds: float


# ---- counting live storages -----------------------------------------------------------------------------------
def live_bytes_mode(tensors):
    """A dispatch mode that counts the bytes of every tensor storage alive (``tensors`` and whatever the ops run
    inside it create) and keeps the peak. A storage counts until its last reference is gone, views included,
    wherever the reference is held (autograd's saved tensors too)."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveBytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple] = {}
            self.now = self.peak = 0
            for t in tensors:
                self._add(t)
            self.peak = self.now

        def _add(self, tensor):
            storage = tensor.untyped_storage()
            if storage._cdata not in self.live:
                self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                self.now += storage.nbytes()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._add(t)
            # ``now`` counts freed storages too until a sweep drops them, so it is never below the true count: the
            # peak can only have risen when ``now`` passes it, and only then is a sweep (over every storage) needed.
            if self.now > self.peak:
                for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                    self.now -= self.live.pop(key)[1]
                self.peak = max(self.peak, self.now)
            return out

    return LiveBytes()


def cuda_autocast_on_meta(dtype):
    """A function mode that makes on meta tensors the casts ``torch.autocast("cuda", dtype)`` makes, and sends
    attention to the flash kernel (see the module docstring)."""
    import torch
    from torch.overrides import TorchFunctionMode

    # By name: torch.nn.functional wraps some of these, so the function a mode is handed is not always the
    # module's attribute.
    low = {"linear", "conv2d", "matmul", "bmm", "baddbmm", "addmm", "mm", "__matmul__"}
    full = {"group_norm", "layer_norm", "mse_loss", "softmax"}

    def cast(args, to):
        return tuple(a.to(to) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != to else a
                     for a in args)

    def cast_values(kwargs, to):
        return dict(zip(kwargs, cast(tuple(kwargs.values()), to), strict=True))

    class Autocast(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if name == "scaled_dot_product_attention":
                q, k, v = cast(args[:3], dtype)
                if kwargs.get("attn_mask") is not None or len(args) > 3:
                    return func(q, k, v, *args[3:], **kwargs)
                # The CPU flash kernel: its meta function allocates what the CUDA one's does (the output and one
                # fp32 log-sum-exp per query), and it also runs on real CPU tensors, for checking the count.
                return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False),
                    scale=kwargs.get("scale"))[0]
            if name in low:
                return func(*cast(args, dtype), **cast_values(kwargs, dtype))
            if name in full:
                return func(*cast(args, torch.float32), **cast_values(kwargs, torch.float32))
            return func(*args, **kwargs)

    return Autocast()


# ---- one estimate ---------------------------------------------------------------------------------------------
def model_config_folder(family: str, smoke: bool, scratch: Path) -> Path:
    """The shipped full-size configs of ``family``, or with ``smoke`` the tiny checkpoint's (saved in ``scratch``)."""
    from lorakit.models.loading import CONFIGS_DIR
    from lorakit.models.tiny import save_tiny_pipeline

    if not smoke:
        return CONFIGS_DIR / family
    folder = scratch / f"tiny-{family}"
    if not folder.is_dir():
        save_tiny_pipeline(family, folder)
    return folder


def parameter_bytes(model, dtype_bytes: int) -> int:
    """The bytes of ``model``'s parameters held in a dtype of ``dtype_bytes`` bytes (as the run casts it)."""
    return sum(p.numel() for p in model.parameters()) * dtype_bytes


def estimate(preset: str, *, batch: int | None = None, checkpointing: bool | None = None, rank: int | None = None,
             smoke: bool = False, scratch: Path | None = None, device: str = "meta",
             settings: dict | None = None, family: str | None = None) -> Estimate:
    """The estimate for ``preset`` with the given changes (``settings``: any other training settings).
    ``device="cpu"`` runs the same steps on real tensors (for the tiny checkpoints: it checks that the meta count
    is what real tensors allocate). ``family`` is for a preset made for any family (tiny-demo); default the
    first lorakit knows."""
    import torch

    from lorakit import families
    from lorakit.models.loading import models_from_config
    from lorakit.train.config import load_preset, resolve_config
    from lorakit.train.networks import add_network, unet_targets
    from lorakit.train.recipe import loss_step

    started = time.perf_counter()
    family = load_preset(preset).get("family") or family or families.NAMES[0]
    model_family = families.get(family)
    overrides = dict(settings or {}) | {k: v for k, v in {"batch_size": batch, "gradient_checkpointing": checkpointing, "rank": rank,
                                   "conv_rank": rank}.items() if v is not None}
    if smoke:
        overrides.setdefault("resolution", 64)
    cfg = resolve_config(family, preset=preset, overrides=overrides)
    if cfg["train_text_encoder"]:
        raise SystemExit(f"error: {preset} trains the text encoders, which this estimate does not model; "
                         "estimate with train_text_encoder off and add their adapters' share")
    folder = model_config_folder(family, smoke, scratch or Path(tempfile.mkdtemp()))
    bf16 = torch.bfloat16

    models = models_from_config(folder, family, device, vae=True)
    unet, vae = models.pop("unet"), models.pop("vae")
    encoders = list(models.values())
    # As the recipe's _setup_model and _add_adapters: the frozen base in the training dtype, adapters in fp32.
    unet.requires_grad_(False)
    unet.to(bf16)
    add_network(unet, unet_targets(unet, cfg), cfg)
    trained = [p for p in unet.parameters() if p.requires_grad]
    for param in trained:
        param.data = param.data.float()
    if cfg["gradient_checkpointing"]:
        # diffusers' own checkpointing call, with the recomputation run under the same casts as the forward (what
        # torch.utils.checkpoint does for a real autocast).
        def checkpointed(module, *args):
            return torch.utils.checkpoint.checkpoint(
                module.__call__, *args, use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), cuda_autocast_on_meta(bf16)))

        unet.enable_gradient_checkpointing(checkpointed)
    unet.train()
    optimizer = torch.optim.AdamW(trained, lr=cfg["lr"], foreach=True)
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    objective = model_family.objective()   # the shipped configs are epsilon; v-prediction costs the same memory
    noise_scheduler = objective.noise_scheduler(scheduler_config)

    b, side = cfg["batch_size"], cfg["resolution"] // 8
    counter = live_bytes_mode([*unet.parameters(), *unet.buffers()])
    with counter, cuda_autocast_on_meta(bf16):
        # Two steps: the second runs with the optimizer's state already allocated, as every later one does.
        for _ in range(2):
            latents = torch.randn(b, unet.config.in_channels, side, side, device=device, dtype=bf16)
            text = model_family.text_inputs_like(b, dict(unet.config), device, bf16)
            size = cfg["resolution"]
            conditioning = model_family.denoiser_kwargs(text, [[size, size, 0, 0, size, size]] * b, bf16, device)
            loss = loss_step(unet, objective, noise_scheduler, latents, conditioning, None,
                             noise_offset=cfg["noise_offset"], min_snr_gamma=cfg["min_snr_gamma"], dtype=bf16)
            (loss / cfg["gradient_accumulation_steps"]).backward()
            del loss, latents, conditioning
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # As the recipe's TrainingData: the text encoders leave the GPU once fixed captions' embeddings are cached.
    captions_cached = cfg["cache_text_embeddings"] and not cfg["shuffle_tags"] and not cfg["sample_prompts"]
    text_encoders = 0 if captions_cached else sum(parameter_bytes(e, 2) for e in encoders)
    vae_bytes = parameter_bytes(vae, 4 if cfg["vae_fp32"] else 2)
    latents_bytes = DATASET_IMAGES * unet.config.in_channels * side * side * 2
    total = counter.peak + text_encoders + vae_bytes + latents_bytes
    return Estimate(preset, family, cfg["resolution"], b, bool(cfg["gradient_checkpointing"]), cfg["rank"],
                    sum(p.numel() for p in trained), counter.peak / GiB, text_encoders / GiB, vae_bytes / GiB,
                    latents_bytes / GiB, total / GiB, time.perf_counter() - started)


# ---- the table ------------------------------------------------------------------------------------------------
def default_rows(smoke: bool) -> list[dict]:
    if smoke:
        return [{"preset": "sd15-style"}, {"preset": "sdxl-style"}, {"preset": "sdxl-style", "checkpointing": False}]
    rows: list[dict] = [{"preset": p} for p in FULL_SIZE_PRESETS]
    # The same SDXL style run at the batch sizes people try, with and without gradient checkpointing.
    rows += [{"preset": "sdxl-style", "batch": 4}, {"preset": "sdxl-style", "checkpointing": False},
             {"preset": "sdxl-style", "batch": 4, "checkpointing": False}]
    return rows


def print_table(estimates: list[Estimate]) -> None:
    print(f"{'preset':<16}{'px':>6}{'batch':>6}{'ckpt':>6}{'rank':>6}{'adapter':>10}{'UNet step':>11}"
          f"{'TEs':>7}{'VAE':>7}{'total':>8}")
    for e in estimates:
        print(f"{e.preset:<16}{e.resolution:>6}{e.batch_size:>6}{'yes' if e.gradient_checkpointing else 'no':>6}"
              f"{e.rank:>6}{e.trainable_params / 1e6:>9.1f}M{e.unet_step_peak_gib:>10.2f}G{e.text_encoders_gib:>6.2f}G"
              f"{e.vae_gib:>6.2f}G{e.total_gib:>7.2f}G")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", help="one preset (default: every full-size preset, and SDXL variations)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false", default=None)
    parser.add_argument("--checkpointing", dest="checkpointing", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="the tiny checkpoints' architectures at 64 px")
    parser.add_argument("--out", type=Path, help="also write the table as JSON")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()   # its advice on casting a model with .to() is about loading weights

    rows = ([{"preset": args.preset, "batch": args.batch, "checkpointing": args.checkpointing, "rank": args.rank}]
            if args.preset else default_rows(args.smoke))
    with tempfile.TemporaryDirectory() as scratch:
        estimates = [estimate(**row, smoke=args.smoke, scratch=Path(scratch)) for row in rows]
    print_table(estimates)
    if args.out:
        args.out.write_text(json.dumps({"rows": [asdict(e) for e in estimates], "smoke": args.smoke,
                                        "datasetImages": DATASET_IMAGES}, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
