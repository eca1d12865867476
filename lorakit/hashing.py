"""The hashes records keep: a file's sha256 (images, weights) and a checkpoint's weights fingerprint."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from pathlib import Path

from .errors import ConfigError, RecordError
from .roots import open_regular
from .store import read_cache, write_cache


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks so large weights files never sit in memory."""
    with open_regular(path, "weights file") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()  # type: ignore[arg-type]  # a BufferedReader


SAFE_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WEIGHT_SUFFIXES = SAFE_SUFFIXES + PICKLE_SUFFIXES + (".gguf",)
RACY_WINDOW_NS = 2_000_000_000
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts
# Bits per element of every dtype the safetensors format names.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}


class SafetensorsHeaderError(ValueError):
    """What is wrong with a safetensors file, in words (see :func:`read_safetensors_header`)."""


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor names to dtype/shape/offsets, plus ``__metadata__``),
    checked against the file it heads; :class:`SafetensorsHeaderError` says what is wrong otherwise.

    A weights file from a shared folder may lie in its header, and lorakit records such files (checkpoints,
    releases) long before anything loads them, so the header is held to the format here: its length within
    the file and a sane cap, strict JSON, ``__metadata__`` a map of strings to strings, every tensor a known
    dtype, a shape of non-negative integers and ``data_offsets`` inside the data section whose size is exactly
    the shape's, the tensors packed back to back from offset 0 to the end of the file. Only the header is read
    (no tensors, no torch).
    """
    try:
        # Checked on the open handle, opened without blocking: a FIFO under a weights name must not hang the reader.
        with open_regular(path, "weights file") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(8)
            if len(head) < 8:
                raise SafetensorsHeaderError(f"it has {size} bytes, fewer than the 8 of a header length")
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                raise SafetensorsHeaderError(f"its header length {length} is larger than the file ({size} bytes)")
            if length > _MAX_SAFETENSORS_HEADER:
                raise SafetensorsHeaderError(f"its header length {length} is over the {_MAX_SAFETENSORS_HEADER}-byte cap")
            raw = handle.read(length)
    except RecordError:
        raise SafetensorsHeaderError("it is not a regular file") from None
    except OSError as exc:
        raise SafetensorsHeaderError(f"it cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw, parse_constant=_no_json_constant)
    except (ValueError, RecursionError):
        raise SafetensorsHeaderError("its header is not JSON (another format renamed, or a damaged file)") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsHeaderError("its __metadata__ is not a map of strings to strings")
    data_size = size - 8 - length
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name[:200]!r}"
        if not isinstance(info, dict):
            raise SafetensorsHeaderError(f"{where} is not {{dtype, shape, data_offsets}}")
        dtype = info.get("dtype")
        bits = SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        if bits is None:
            raise SafetensorsHeaderError(f"{where} has unknown dtype {str(info.get('dtype'))[:40]!r}")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise SafetensorsHeaderError(f"{where} has shape {str(shape)[:80]}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1] <= data_size):
            raise SafetensorsHeaderError(f"{where} has data_offsets {str(offsets)[:80]} outside the {data_size} bytes "
                                         "of data the file holds")
        elements = 1
        for dim in shape:
            elements *= dim
        if elements * bits % 8 or elements * bits // 8 != offsets[1] - offsets[0]:
            raise SafetensorsHeaderError(f"{where}: {info['dtype']} of shape {shape} is {elements * bits / 8:g} bytes, "
                                         f"but its data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], where))
    end = 0
    for begin, stop, where in sorted(spans):
        if begin != end:
            raise SafetensorsHeaderError(f"{where} starts at byte {begin} of the data, where {end} was expected "
                                         "(tensors overlap or leave a gap)")
        end = stop
    if end != data_size:
        raise SafetensorsHeaderError(f"its tensors take {end} bytes but the file holds {data_size} bytes of data")
    return header


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


def _no_json_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def safetensors_header(path: str | os.PathLike) -> dict | None:
    """The checked header of a safetensors file (:func:`read_safetensors_header`), or ``None`` when the file is
    not a valid one."""
    try:
        return read_safetensors_header(path)
    except SafetensorsHeaderError:
        return None


def check_safetensors(path: str | os.PathLike, what: str) -> dict:
    """The checked header of a weights file lorakit is asked to accept or load; a :class:`ConfigError` naming
    ``what``, the file and what is wrong with it otherwise."""
    try:
        return read_safetensors_header(path)
    except SafetensorsHeaderError as exc:
        raise ConfigError(f"{what}: {path} is not a safetensors file that holds what its header says ({exc}); "
                          "download it again, or give the real file") from None


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
