"""The hashes records keep: a file's sha256 (images, weights) and a checkpoint's weights fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from pathlib import Path

from .errors import ConfigError
from .roots import open_regular
from .store import read_cache, write_cache


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks so large weights files never sit in memory."""
    with open_regular(path, "weights file") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


SAFE_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES + (".gguf",)
RACY_WINDOW_NS = 2_000_000_000
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def safetensors_header(path: str | os.PathLike) -> dict | None:
    """The JSON header of a safetensors file (tensor names to dtype/shape/offsets, plus ``__metadata__``), or
    ``None`` when the file is not one: empty, truncated, or another format under a ``.safetensors`` name.

    Only the header is read (no tensors, no torch): 8 bytes of little-endian length, then that much JSON.
    """
    try:
        with open_regular(path, "weights file") as handle:
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


def weight_files(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """The weight files of a checkpoint as ``(relative POSIX path, path)``: the file itself, or every
    ``*.safetensors``, ``*.bin``, ... below a folder (hidden ones skipped), sorted. Anything under such a name that
    is not a folder counts, so a FIFO or a device there is refused when it is read instead of passed over."""
    path = Path(path)
    if not path.is_dir():
        return [(path.name, path)]
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*")
                   if p.suffix in WEIGHT_SUFFIXES and not p.is_dir()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise ConfigError(f"{path}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in this folder")
    return files


def weights_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The fingerprint of a checkpoint's weights: a file's sha256, or for a folder a stable hash over its weight
    files, the one hash every record and every eval keeps for a checkpoint.

    The folder hash is the sha256 of one ``<relative posix path>\\0<file sha256>\\n`` line per weight file
    (``*.safetensors``, ``*.bin``, ...; hidden files skipped), sorted by path, so it depends neither on the machine
    nor on files that hold no weights (configs, tokenizers, a README). Real checkpoints are gigabytes: with a
    ``cache_dir`` (a folder under ``<dataRoot>/.lorakit``) the result is kept there and reused while every file keeps its :func:`stat_key`.
    """
    path = Path(path)
    files = weight_files(path)
    stats = [p.stat() for _, p in files]
    stamp = [[rel, *stat_key(st)] for (rel, _), st in zip(files, stats, strict=True)]
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / (hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20] + ".json")
        try:
            cached = json.loads(read_cache(cache_file) or b"null")
            if cached.get("stamp") == stamp and isinstance(cached.get("sha256"), str):
                return cached["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
    if path.is_file():
        value = file_sha256(path)
    else:
        digest = hashlib.sha256()
        for rel, p in files:
            digest.update(f"{rel}\0{file_sha256(p)}\n".encode())
        value = digest.hexdigest()
    now_ns = time.time_ns()
    if cache_file is not None and not any(is_racy(st, now_ns) for st in stats):  # see is_racy
        with contextlib.suppress(OSError):  # a cache: a full or read-only disk only costs the next run a rehash
            write_cache(cache_file, json.dumps({"path": str(path), "stamp": stamp, "sha256": value}).encode("utf-8"))
    return value
