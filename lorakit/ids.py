"""Record ids: validation and new ULIDs."""

from __future__ import annotations

import os
import re
import threading
import time

from .errors import InvalidIdError

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")  # matched against the whole string: "$" would let "x\n" in
MAX_ID_LENGTH = 128  # ids are file names; with ".json" and a temporary-file prefix this stays under 255 bytes
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_MAX = (1 << 80) - 1
_lock = threading.Lock()
_last: tuple[int, int] | None = None  # (ms, random part) of the latest ULID made here


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` if it is a safe record id, else raise :class:`InvalidIdError`.

    Ids are file names: letters, digits, ``_``, ``-`` and ``.`` only, never ``..``, at most 128 characters.

    >>> check_id("ui_icons-v2")
    'ui_icons-v2'
    """
    if not isinstance(value, str) or not value:
        raise InvalidIdError(f"{what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidIdError(f"{what} {value[:40]!r}... is {len(value)} characters long; use at most {MAX_ID_LENGTH}")
    if not _ID_RE.fullmatch(value) or ".." in value or value.startswith("."):
        raise InvalidIdError(
            f"invalid {what} {value!r}: use letters, digits, '_', '-' and '.' only "
            "(no '/', '\\', '..' and no leading '.')"
        )
    return value


def given_or_new_id(value: str | None, what: str = "id") -> str:
    """The id the user gave (checked), or a new ULID when none was given. An empty string is a given id, and
    an invalid one: it never silently becomes a new id.

    >>> given_or_new_id("hero", "LoRA id"), len(given_or_new_id(None))
    ('hero', 26)
    """
    return new_ulid() if value is None else check_id(value, what)


def new_ulid(timestamp_ms: int | None = None) -> str:
    """A new ULID: 48 bits of milliseconds then 80 random bits, Crockford base32, sortable by time.

    Ids made by one process within one millisecond keep their order (the ULID spec's monotonic mode: the
    random part counts up), so records listed by id come back in the order they were made, e.g. the jobs of
    an eval grid in plan order.

    >>> ids = [new_ulid(1000) for _ in range(3)]
    >>> ids == sorted(ids) and len(set(ids)) == 3
    True
    """
    global _last
    ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    with _lock:
        if _last is not None and ms == _last[0] and _last[1] < _RANDOM_MAX:
            random = _last[1] + 1
        else:
            random = int.from_bytes(os.urandom(10), "big") >> 1  # headroom to count up from
        _last = (ms, random)
    value = (ms << 80) | random
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))
