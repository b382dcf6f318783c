"""The suite's guard against the machine's own DNS resolver, in every test process.

Tests ask the loopback DNS server of ``tests/dnsserver.py`` (``dns_servers``,
``--dns-server``) or turn lookups off; they never ask the resolver named in
/etc/resolv.conf. ``install`` makes dnspython refuse to read that file: a
resolver built from the system configuration (ehlo's ``Resolver()`` without
nameservers, a router without a resolver, ``dns.resolver.resolve``...) raises
``SystemResolverRefused`` before any query is sent, and the offence is
reported with the stack that led to it, so that a caller that swallows the
error (reverse DNS never fails a session) still fails the test.

``tests/conftest.py`` installs it in the pytest process and puts this folder
first on ``PYTHONPATH``, so that Python runs this file at the start of every
subprocess the tests spawn (``python -m ehlo serve``...). There it is active
only when ``EHLO_TEST_DNS_GUARD_LOG`` names a file, to which each offence is
appended as one line; conftest fails the test during which lines appeared.
A ``sitecustomize`` that this file shadows (a distribution's) still runs.
dnspython is patched when it is first imported, not imported here: a process
that never resolves stays as small as without the guard.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

GUARD_LOG_ENV = "EHLO_TEST_DNS_GUARD_LOG"
SYSTEM_RESOLV_CONF = "/etc/resolv.conf"
_PATCHED = "_ehlo_test_dns_guard"


class SystemResolverRefused(RuntimeError):
    """A resolver was built from the machine's configuration in a test process."""


def _is_system_conf(source: object) -> bool:
    if not isinstance(source, str | os.PathLike):
        return False  # a file object: the caller's own configuration
    path = os.fspath(source)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    return os.path.realpath(path) == os.path.realpath(SYSTEM_RESOLV_CONF)


def _where(skip: str) -> str:
    """The innermost frames outside this file and the folder ``skip``, as one line."""
    frames = [
        frame
        for frame in traceback.extract_stack()
        if frame.filename != __file__ and not frame.filename.startswith(skip)
    ]
    return " <- ".join(f"{f.filename}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))


def _patch(module: ModuleType, report: Callable[[str], None]) -> None:
    base = module.BaseResolver
    if getattr(base.read_resolv_conf, _PATCHED, False):
        return
    original = base.read_resolv_conf
    dnspython = os.path.dirname(module.__file__ or "") + os.sep

    def read_resolv_conf(self: Any, f: Any) -> None:
        if _is_system_conf(f):
            message = (
                f"the machine's DNS resolver ({SYSTEM_RESOLV_CONF}) was configured in "
                f"pid {os.getpid()} ({' '.join(sys.argv)[:200]}): {_where(dnspython)}"
            )
            report(message)
            raise SystemResolverRefused(message)
        original(self, f)

    setattr(read_resolv_conf, _PATCHED, True)
    base.read_resolv_conf = read_resolv_conf


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``dns.resolver`` through the other finders and patches it once executed."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self._spec: importlib.machinery.ModuleSpec | None = None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "dns.resolver":
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None and spec.loader is not None:
                self._spec = spec
                return importlib.machinery.ModuleSpec(
                    fullname, self, origin=spec.origin, is_package=False
                )
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        assert self._spec is not None and self._spec.loader is not None
        return self._spec.loader.create_module(self._spec)

    def exec_module(self, module: ModuleType) -> None:
        assert self._spec is not None and self._spec.loader is not None
        module.__spec__ = self._spec
        module.__loader__ = self._spec.loader
        if self._spec.origin is not None:
            module.__file__ = self._spec.origin
        self._spec.loader.exec_module(module)
        _patch(module, self.report)


def install(report: Callable[[str], None]) -> None:
    """Refuse /etc/resolv.conf to dnspython in this process, calling ``report`` on each try."""
    module = sys.modules.get("dns.resolver")
    if module is not None:
        _patch(module, report)
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(report))


def _append(path: str) -> Callable[[str], None]:
    def report(message: str) -> None:
        with open(path, "a", encoding="utf-8") as log:
            log.write(message.replace("\n", " ") + "\n")

    return report


def _chain() -> None:
    """Run the ``sitecustomize`` this file shadows (a distribution's), if there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None and spec.origin != __file__:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if __name__ == "sitecustomize":
    _chain()
    if os.environ.get(GUARD_LOG_ENV):
        install(_append(os.environ[GUARD_LOG_ENV]))
