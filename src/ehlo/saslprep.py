"""SASLprep (RFC 4013), the stringprep profile for user names and passwords.

Shared by the server's user database and the client's SASL mechanisms.
"""

from __future__ import annotations

import stringprep
import unicodedata

__all__ = ["saslprep"]


def _prohibited(ch: str) -> bool:
    # RFC 4013 section 2.3: C.1.2, C.2.1, C.2.2, C.3, C.4, C.5, C.6, C.7, C.8, C.9.
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
    )


def saslprep(text: str, *, query: bool = False) -> str:
    """``text`` prepared with SASLprep; ValueError (saying what is wrong) if it fails.

    ``query=False`` prepares a stored string (unassigned code points are
    refused); ``query=True`` prepares a string to compare with a stored one
    (unassigned code points are let through, RFC 3454 section 7).
    """
    if text.isascii() and all(32 <= ord(c) < 127 for c in text):
        return text  # printable ASCII is left as it is by every step below
    mapped: list[str] = []
    for ch in text:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")  # RFC 4013 section 2.1: non-ASCII space to SPACE
        elif not stringprep.in_table_b1(ch):  # RFC 4013 section 2.1: B.1 to nothing
            mapped.append(ch)
    # RFC 4013 section 2.2: Unicode normalization form KC (of Unicode 3.2, as stringprep).
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", "".join(mapped))
    for ch in prepared:
        if _prohibited(ch):
            raise ValueError(f"contains a prohibited character U+{ord(ch):04X}")
        # RFC 4013 section 2.5: A.1 unassigned code points, refused in stored strings.
        if not query and stringprep.in_table_a1(ch):
            raise ValueError(f"contains an unassigned code point U+{ord(ch):04X}")
    # RFC 4013 section 2.4 / RFC 3454 section 6: bidirectional characters.
    if any(stringprep.in_table_d1(ch) for ch in prepared):
        if any(stringprep.in_table_d2(ch) for ch in prepared):
            raise ValueError("mixes right-to-left and left-to-right characters")
        if not (stringprep.in_table_d1(prepared[0]) and stringprep.in_table_d1(prepared[-1])):
            raise ValueError("with right-to-left text must start and end with it")
    return prepared
