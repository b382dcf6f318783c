"""DNS for the server: asynchronous PTR and address lookups with a shared TTL cache.

See ``ehlo.dns.resolver``; greeting verification and Received headers build on it.
"""

from __future__ import annotations

from .resolver import (
    DEFAULT_CACHE,
    DNSCache,
    DNSTempError,
    Lookup,
    Resolver,
    loopback_name,
    peek_reverse_name,
    reverse_name,
)

__all__ = ["DEFAULT_CACHE", "DNSCache", "DNSTempError", "Lookup", "Resolver",
           "loopback_name", "peek_reverse_name", "reverse_name"]
