"""CHUNKING (RFC 3030): the BDAT verb. The chunk reader lives in the protocol core."""

from __future__ import annotations

from ..protocol import Extension


class Chunking(Extension):
    """Advertise CHUNKING and enable BDAT."""

    keyword = "CHUNKING"
    verbs = frozenset({"BDAT"})
