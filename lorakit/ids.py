"""Record ids: validation and new ULIDs."""

from __future__ import annotations

import os
import re
import threading
import time

from .errors import InvalidIdError

_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_MAX = (1 << 80) - 1
_lock = threading.Lock()
_last: tuple[int, int] | None = None  # (ms, random part) of the latest ULID made here


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe record id, else raise :class:`InvalidIdError`.

    Ids are file names: letters, digits, ``_``, ``-`` and ``.`` only, never ``..``.

    >>> check_id("ui_icons-v2")
    'ui_icons-v2'
    """
    if not isinstance(value, str) or not value:
        raise InvalidIdError(f"{what} must be a non-empty string, got {value!r}")
    if not _ID_RE.match(value) or ".." in value or value.startswith("."):
        raise InvalidIdError(
            f"invalid {what} {value!r}: use letters, digits, '_', '-' and '.' only "
            "(no '/', '\\', '..' and no leading '.')"
        )
    return value


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
