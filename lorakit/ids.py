"""Record ids: validation and new ULIDs."""

from __future__ import annotations

import os
import re
import time

from .errors import InvalidIdError

_ID_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


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
    """A new ULID: 48 bits of milliseconds then 80 random bits, Crockford base32, sortable by time."""
    ms = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))
