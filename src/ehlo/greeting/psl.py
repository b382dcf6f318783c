"""Registered domains from the Public Suffix List, offline.

This module owns the answer to "which domain did someone register for this
host name?", used by the ``ptr_match`` greeting check to accept a PTR name
that is not the greeting name but belongs to the same registrant
(``mx1.example.co.uk`` and ``mail.example.co.uk``).

It uses ``tldextract`` with the Public Suffix List snapshot bundled in the
package and nothing else: no suffix list URL is fetched and no cache
directory is written, so a lookup never touches the network or the disk.
The extractor is built once, on first use, under a lock.

PSL private-section entries (``github.io``, ``blogspot.com`` ...) count as
public suffixes: names under them are owned by different people, so
``a.github.io`` and ``b.github.io`` do not share a registered domain.
"""

from __future__ import annotations

import ipaddress
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when first needed: it is large (requests, idna)
    import tldextract

__all__ = ["registered_domain", "same_registered_domain"]

_lock = threading.Lock()
_extractor: tldextract.TLDExtract | None = None


def _get_extractor() -> tldextract.TLDExtract:
    """The shared extractor: bundled snapshot only, no HTTP, no disk cache."""
    global _extractor
    extractor = _extractor
    if extractor is not None:
        return extractor
    with _lock:
        if _extractor is None:
            import tldextract

            built = tldextract.TLDExtract(
                cache_dir=None,  # never read or write ~/.cache/python-tldextract
                suffix_list_urls=(),  # never fetch the list over HTTP
                fallback_to_snapshot=True,  # the list shipped inside the package
                include_psl_private_domains=True,
            )
            # Parse the snapshot now, under the lock: tldextract builds its
            # suffix trie lazily without a lock of its own.
            built("example.com")
            _extractor = built
        return _extractor


def _normalise(name: str) -> str | None:
    """``name`` lowercase without its trailing dot; None when it cannot be a host name."""
    text = name.strip().lower()
    if text.endswith("."):
        text = text[:-1]
    if not text or text.startswith("[") or len(text) > 253:
        return None
    labels = text.split(".")
    # RFC 1035 section 2.3.4: labels of 1 to 63 octets.
    if any(not label or len(label) > 63 for label in labels):
        return None
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return text
    return None  # an IP address has no registered domain


def registered_domain(name: str) -> str | None:
    """The domain registered under a public suffix that ``name`` belongs to, lowercase.

    ``"mail.example.co.uk"`` gives ``"example.co.uk"``. None for a bare public
    suffix (``"co.uk"``), an IP address or address literal, a single label
    (``"localhost"``) and anything that is not a host name.
    """
    text = _normalise(name)
    if text is None or "." not in text:
        return None
    parts = _get_extractor()(text)
    if parts.suffix:
        return f"{parts.domain}.{parts.suffix}" if parts.domain else None
    # PSL algorithm (publicsuffix.org/list): when no rule matches, the
    # prevailing rule is "*", i.e. the last label is the public suffix.
    # tldextract reports no suffix instead; ".test" and ".internal" names
    # then still get a registered domain.
    labels = text.split(".")
    return ".".join(labels[-2:])


def same_registered_domain(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` share a registered domain (case and trailing dot ignored).

    False when either has none.
    """
    first = registered_domain(a)
    return first is not None and first == registered_domain(b)
