"""Queue ids: short, unique across processes and nodes, sortable by time.

An id is 16 characters of Crockford base32: 48 bits of milliseconds since the
epoch followed by 32 random bits. Ids made in the same millisecond differ in
their random part; ids sort by receipt time as text. The random bits come
from the ``random`` module's generator (seeded from the OS, and again in each
forked worker), not a system call per id: ids need to be unique, not secret.
"""

from __future__ import annotations

import base64
import random
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


# RFC 4648 base32 encodes 5-bit groups with "A..Z2..7"; mapping that alphabet
# index for index onto Crockford's keeps the order (both are ascending).
_FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def new_queue_id() -> str:
    """A fresh queue id, e.g. ``01JDQ3V9X2M7K4PA``."""
    raw = ((time.time_ns() // 1_000_000) << 32 | random.getrandbits(32)).to_bytes(10, "big")
    return base64.b32encode(raw).translate(_FROM_RFC4648).decode("ascii")


def is_queue_id(text: str) -> bool:
    """True when ``text`` has the shape of a queue id (safe as a file name)."""
    return len(text) == 16 and all(c in _ALPHABET for c in text)
