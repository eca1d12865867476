"""The sha256 of a file, as every record stores it (images, weights, checkpoints)."""

from __future__ import annotations

import hashlib
import json
import os
import struct


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks so large weights files never sit in memory."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


RACY_WINDOW_NS = 2_000_000_000
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def safetensors_header(path: str | os.PathLike) -> dict | None:
    """The JSON header of a safetensors file (tensor names to dtype/shape/offsets, plus ``__metadata__``), or
    ``None`` when the file is not one: empty, truncated, or another format under a ``.safetensors`` name.

    Only the header is read (no tensors, no torch): 8 bytes of little-endian length, then that much JSON.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_SAFETENSORS_HEADER or length > os.fstat(handle.fileno()).st_size - 8:
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def stat_key(st: os.stat_result) -> list[int]:
    """What a cache entry of a file is keyed by: size, mtime, ctime, inode and device.

    Size and mtime alone miss a rewrite that keeps both (an editor, ``git checkout``, ``touch -r``); the ctime
    changes on every write and rename and cannot be set back, and a replaced file has a new inode. All come
    from the one ``stat`` the caller already made.
    """
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def cache_entry(st: os.stat_result, value: object) -> list:
    """A cache entry for a file: ``[size, mtime_ns, value, [ctime_ns, inode, device]]``."""
    key = stat_key(st)
    return [key[0], key[1], value, key[2:]]


def cached_value(entry: object, st: os.stat_result | None) -> object | None:
    """The value of ``entry`` while ``st`` (a fresh stat of its file) still has the key it was made with."""
    if st is None or type(entry) is not list or len(entry) != 4:
        return None
    key = stat_key(st)
    return entry[2] if entry[0] == key[0] and entry[1] == key[1] and entry[3] == key[2:] else None


def is_racy(st: os.stat_result, now_ns: int) -> bool:
    """Modified so recently that it could change again within the same mtime tick and keep its size ("racily
    clean", as git calls it): such a file is not cached yet. The ctime in the key still catches a later rewrite
    whose mtime was set back."""
    return now_ns - st.st_mtime_ns < RACY_WINDOW_NS
