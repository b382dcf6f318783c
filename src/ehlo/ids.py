"""Queue ids: short, unique across processes and nodes, sortable by time.

An id is 16 characters of Crockford base32: 48 bits of milliseconds since the
epoch followed by 32 random bits. Ids made in the same millisecond differ in
their random part; ids sort by receipt time as text.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_queue_id() -> str:
    """A fresh queue id, e.g. ``01JDQ3V9X2M7K4PA``."""
    value = (time.time_ns() // 1_000_000) << 32 | int.from_bytes(os.urandom(4), "big")
    chars = []
    for _ in range(16):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_queue_id(text: str) -> bool:
    """True when ``text`` has the shape of a queue id (safe as a file name)."""
    return len(text) == 16 and all(c in _ALPHABET for c in text)
