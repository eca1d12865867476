"""Perceptual hashes for finding near-duplicate images, with Pillow and numpy only.

The hash is a 64-bit difference hash (dHash): the image is flattened onto white (so transparent pixels,
whose colour is arbitrary, do not count), turned to grayscale, shrunk to 9x8 pixels, and each bit says
whether a pixel is brighter than its right-hand neighbour. Re-encoding, resizing, small colour shifts and
light compression change few bits; a different picture changes about half of them. Two images whose
hashes differ in at most ``threshold`` bits (the Hamming distance; 6 of 64 by default) are near duplicates.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

HASH_BITS = 64
DEFAULT_THRESHOLD = 6
# Pairwise comparison runs in row blocks of at most this many hash pairs, to bound memory (8 bytes each).
_PAIRS_PER_BLOCK = 4_000_000


def has_alpha(image: Image.Image) -> bool:
    """Whether ``image`` has an alpha channel (or, for palette and grey images, a transparent colour)."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def dhash(image: Image.Image) -> int:
    """The 64-bit difference hash of ``image`` as an int.

    >>> from PIL import Image
    >>> dhash(Image.new("RGB", (32, 32), "red"))  # a flat image has no brighter-than-neighbour pixels
    0
    """
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS, reducing_gap=2.0)
    pixels = np.asarray(small, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hash_hex(value: int) -> str:
    """The form records store a hash in: 16 lower-case hex digits."""
    return f"{value:016x}"


def hamming(a: int, b: int) -> int:
    """How many of the 64 bits differ between two hashes."""
    return (a ^ b).bit_count()


def near_pairs(hashes: Sequence[int], threshold: int = DEFAULT_THRESHOLD) -> list[tuple[int, int, int]]:
    """Every pair ``(i, j, distance)`` with ``i < j`` whose hashes differ in at most ``threshold`` bits.

    All pairs are compared, n*(n-1)/2 of them, but vectorised in blocks with numpy: about a second for
    20,000 hashes on a laptop core, with memory bounded by the block size rather than n².

    >>> near_pairs([0b1111, 0b0111, 0xFFFF0000], threshold=1)
    [(0, 1, 1)]
    """
    if threshold < 0:
        raise ValueError(f"threshold must be 0 or more, got {threshold}")
    values = np.asarray([h & 0xFFFF_FFFF_FFFF_FFFF for h in hashes], dtype=np.uint64)
    n = len(values)
    found: list[tuple[int, int, int]] = []
    block = max(1, _PAIRS_PER_BLOCK // max(n, 1))
    for start in range(0, n, block):
        rows = np.arange(start, min(start + block, n))
        # Only columns from ``start`` on: pairs with an earlier row were found in an earlier block.
        columns = np.arange(start, n)
        distances = np.bitwise_count(values[rows, None] ^ values[None, start:])
        close = (distances <= threshold) & (columns[None, :] > rows[:, None])
        for r, c in zip(*np.nonzero(close), strict=True):
            found.append((int(rows[r]), int(columns[c]), int(distances[r, c])))
    return found
