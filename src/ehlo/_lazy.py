"""Package attributes loaded on first use (PEP 562).

A package whose public names pull in heavy imports (the server, TLS,
dnspython) names, for each, the submodule it lives in; :func:`lazy_loader`
makes the package's ``__getattr__`` from that table, so that ``import
ehlo.config`` or ``ehlo messages list`` loads none of them until asked.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_loader"]


def lazy_loader(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps a name to its submodule."""

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{home}", package), name)
        setattr(sys.modules[package], name, value)  # asked once: a plain attribute from now on
        return value

    return __getattr__
