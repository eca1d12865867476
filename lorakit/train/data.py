"""The data side of training: manifest items -> checked files -> images -> buckets -> batches, and the caches.

Decisions are pure functions (bucket choice, crop, caption for a step, batch order) so tests pin them down
without a model; the I/O (reading images, the on-disk latent cache) stays in small helpers.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..hashing import file_sha256
from ..roots import MAX_CACHE_BYTES, Root
from ..store import Store
from .config import TrainingError, parse_color

if TYPE_CHECKING:  # torch is imported where it is used, so planning a run (and the CLI) stays light
    import torch


@dataclass(frozen=True)
class TrainItem:
    """One manifest item whose file exists and matches its recorded sha256."""

    index: int        # position in the manifest
    path: Path        # absolute
    rel_path: str     # as the manifest stores it
    sha256: str       # of the file as read now
    caption: str
    width: int
    height: int
    asset_id: str = ""  # the manifest item's asset: a held-out split takes every item of an asset


# ---- checking the files ------------------------------------------------------------------------------------


def check_items(store: Store, items: list[dict]) -> list[TrainItem]:
    """Resolve and verify every item's image before any training.

    Missing files, files whose sha256 differs from the manifest, and files that are not readable images are
    all collected and reported in one :class:`TrainingError`, so one run shows every problem.
    """
    problems: list[str] = []
    checked: list[TrainItem] = []
    for index, item in enumerate(items):
        rel = item.get("path", "")
        label = f"item {index} ({item.get('assetId')}/{item.get('variantId')}, {rel})"
        try:
            path = store.file_path(rel)
        except Exception as exc:  # a path leaving the data root
            problems.append(f"{label}: {exc}")
            continue
        if not path.is_file():
            problems.append(f"{label}: missing file {path}")
            continue
        digest = file_sha256(path)
        if item.get("sha256") and item["sha256"] != digest:
            problems.append(f"{label}: changed since the manifest was built (sha256 {digest[:12]}…, manifest says "
                            f"{item['sha256'][:12]}…)")
            continue
        try:
            with Image.open(path) as img:
                img.load()  # decoded now: pixel data can be garbage while every checksum passes
                width, height = img.size
        except Exception as exc:  # Pillow raises many kinds for broken files
            problems.append(f"{label}: not a readable image ({type(exc).__name__}: {exc})")
            continue
        checked.append(TrainItem(index, path, rel, digest, item.get("caption") or "", width, height,
                                 str(item.get("assetId") or "")))
    if problems:
        raise TrainingError(
            f"{len(problems)} dataset image(s) cannot be used; rebuild the dataset or restore the files:\n  "
            + "\n  ".join(problems)
        )
    return checked


# ---- images ------------------------------------------------------------------------------------------------
def load_rgb(path: Path, background: str) -> Image.Image:
    """The image as RGB, with any transparency composited onto ``background`` (``'#rrggbb'``)."""
    with Image.open(path) as img:
        img.load()
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        if not has_alpha:
            return img.convert("RGB")
        rgba = img.convert("RGBA")
    colour = parse_color(background)
    if colour is None:  # resolve_config checks it: only a config that skipped the checks gets here
        raise TrainingError(f"background must be a colour like '#ffffff', got {background!r}")
    base = Image.new("RGBA", rgba.size, (*colour, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def make_buckets(resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None) -> list[tuple[int, int]]:
    """All ``(width, height)`` buckets: sides multiples of ``step`` within [min_side, max_side] and the
    largest height that keeps the area <= ``resolution``² for each width (kohya's rule), plus the square.

    >>> make_buckets(512, 64, 256, 1024)[-3:]
    [(896, 256), (960, 256), (1024, 256)]
    >>> (512, 512) in make_buckets(512)
    True
    """
    max_area = resolution * resolution
    min_side = min_side or max(step, resolution // 2)
    max_side = max_side or resolution * 2
    side = int(math.sqrt(max_area) // step) * step
    buckets = {(side, side)}
    width = min_side
    while width <= max_side:
        height = min(max_side, int(max_area // width // step) * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def pick_bucket(width: int, height: int, buckets: list[tuple[int, int]], *, no_upscale: bool = False,
                step: int = 64) -> tuple[int, int]:
    """The bucket for an image: the one with the nearest aspect ratio (log scale; ties go to the larger area).

    With ``no_upscale``, an image smaller than its bucket gets a bucket of its own size, rounded down to
    ``step`` (it is cropped, never enlarged).

    >>> buckets = make_buckets(512)
    >>> pick_bucket(1000, 1000, buckets), pick_bucket(600, 1200, buckets)
    ((512, 512), (320, 704))
    >>> pick_bucket(200, 130, buckets, no_upscale=True)
    (192, 128)
    """
    ratio = math.log(width / height)
    best = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    if no_upscale and (width < best[0] or height < best[1]):
        own = (max(step, width - width % step), max(step, height - height % step))
        return own
    return best


def resized_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image is resized to before its centre crop: the smallest that covers the bucket.

    >>> resized_size(1000, 500, (768, 320))
    (768, 384)
    """
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    if scale == 1:
        return width, height
    return max(bw, round(width * scale)), max(bh, round(height * scale))


def crop_and_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """SDXL's size and crop conditioning for an image: ``((crop_top, crop_left), (original_height, original_width))``,
    the crop being in the resized image's pixels (as the SDXL paper and diffusers' script do)."""
    nw, nh = resized_size(width, height, bucket)
    return ((nh - bucket[1]) // 2, (nw - bucket[0]) // 2), (height, width)


def fit_to_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize ``img`` to cover ``bucket`` (Lanczos) and centre-crop it to exactly the bucket."""
    nw, nh = resized_size(img.width, img.height, bucket)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bucket[0]) // 2, (nh - bucket[1]) // 2
    return img.crop((left, top, left + bucket[0], top + bucket[1]))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a ``(3, H, W)`` float tensor in [-1, 1], the VAE's input range."""
    import torch

    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def load_pixels(item: TrainItem, bucket: tuple[int, int], background: str) -> torch.Tensor:
    """An item's image, composited, fitted to its bucket, as VAE input."""
    return to_tensor(fit_to_bucket(load_rgb(item.path, background), bucket))


# ---- captions ----------------------------------------------------------------------------------------------
def caption_for_step(caption: str, rng: random.Random, *, shuffle_tags: bool, keep_tokens: int,
                     dropout: float) -> str:
    """The caption used for one sighting of an image: maybe dropped, maybe with its tags shuffled.

    >>> caption_for_step("hero, red cape, sword", random.Random(1), shuffle_tags=True, keep_tokens=1, dropout=0.0)
    'hero, sword, red cape'
    """
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle_tags:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(rest)
    return ", ".join(kept + rest)


def step_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from ``parts`` (seed, step, micro-batch, rank, ...), the same on every machine.

    Drawing every step's randomness from its own seed is what makes a resumed run identical to an
    uninterrupted one without saving any RNG state.
    """
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ---- batches -----------------------------------------------------------------------------------------------
def epoch_batches(buckets: list[tuple[int, int]], batch_size: int, repeats: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, as lists of item positions; ``buckets[i]`` is item i's bucket.

    Items of one bucket are shuffled and cut into batches (the last one may be smaller), then all batches
    are shuffled, all from ``(seed, epoch)`` only.

    >>> epoch_batches([(64, 64)] * 5, 2, 1, 0, 0)
    [[3, 1], [2, 4], [0]]
    """
    rng = random.Random(step_seed(seed, epoch, "batches"))
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for position, bucket in enumerate(buckets):
        by_bucket.setdefault(bucket, []).extend([position] * repeats)
    batches: list[list[int]] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


def padded_batches(batches: list[list[int]], multiple: int) -> list[list[int]]:
    """Cycle batches from the start until their count is a multiple of ``multiple`` (processes x accumulation),
    so every process runs the same number of optimizer steps per epoch.

    >>> padded_batches([[0], [1], [2]], 2)
    [[0], [1], [2], [0]]
    """
    need = -len(batches) % multiple
    return batches + [batches[i % len(batches)] for i in range(need)]


# ---- the on-disk latent cache ------------------------------------------------------------------------------
def latent_cache_key(image_sha256: str, checkpoint_id: str, checkpoint_hash: str | None, bucket: tuple[int, int],
                     background: str, vae_dtype: str) -> str:
    """The cache key of one latent: the image bytes, the checkpoint (id and weights hash), the bucket and the
    things that change the pixels or the encoder's numbers (background colour, VAE dtype)."""
    text = "|".join(["v1", image_sha256, checkpoint_id, checkpoint_hash or "", f"{bucket[0]}x{bucket[1]}",
                     background.lower(), vae_dtype])
    return hashlib.sha256(text.encode()).hexdigest()


class LatentCache:
    """Latents on disk, one safetensors file per key, shared by all runs (and processes) on a machine."""

    def __init__(self, folder: str | Path, root: Root | None = None):
        # Written through ``root`` (the data root for the default folder), so a cache folder that is a link is
        # refused; a folder the user named is its own root.
        self.folder = Path(folder)
        if root is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            root = Root(self.folder, "the latent cache folder")
        self.root = root

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        from safetensors.torch import load

        path = self.path(key)
        if not path.exists():
            return None
        # Read the way it was written, through the root's handles: a cached latent that is a link is refused.
        with self.root.open_read(path, "cached latent", max_bytes=MAX_CACHE_BYTES) as handle:
            data = handle.read()
        try:
            return load(data)["latent"]
        except Exception:  # a damaged entry is recomputed
            return None

    def put(self, key: str, latent: torch.Tensor) -> None:
        from safetensors.torch import save

        # Atomic, and not synced (a cache): concurrent writers of one key write the same bytes.
        self.root.write_atomic(self.path(key), save({"latent": latent.detach().to("cpu").contiguous()}), durable=False)
