"""Queue ids: short, unique across processes and nodes, sortable by time.

An id is 16 characters of Crockford base32: 48 bits of milliseconds since the
epoch followed by 32 random bits. Ids made in the same millisecond differ in
their random part; ids sort by receipt time as text. The random bits come
from the ``random`` module's generator (seeded from the OS, and again in each
forked worker), not a system call per id: ids need to be unique, not secret.
"""

from __future__ import annotations

import random
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# The 80 bits as 16 five-bit groups, most significant first (what base32 of
# the 10 big-endian octets gives, in this alphabet): two table lookups per
# 10 bits instead of the pure-Python base64.b32encode.
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def new_queue_id() -> str:
    """A fresh queue id, e.g. ``01JDQ3V9X2M7K4PA``."""
    n = (time.time_ns() // 1_000_000) << 32 | random.getrandbits(32)
    pairs = _PAIRS
    return (
        pairs[n >> 70 & 1023] + pairs[n >> 60 & 1023] + pairs[n >> 50 & 1023]
        + pairs[n >> 40 & 1023] + pairs[n >> 30 & 1023] + pairs[n >> 20 & 1023]
        + pairs[n >> 10 & 1023] + pairs[n & 1023]
    )  # fmt: skip


def is_queue_id(text: str) -> bool:
    """True when ``text`` has the shape of a queue id (safe as a file name)."""
    return len(text) == 16 and all(c in _ALPHABET for c in text)
