"""Running a command under strace and reading back the system calls it made.

The durability tests need the order of events that a killed process cannot
show: when a file was synced, when a name was linked or renamed, when a
reply was written to a client. ``strace -f -ttt -T -yy`` records each call
of every process and thread with its start time, its duration and, for file
descriptors, the file or socket behind them. :func:`parse` turns that output
into :class:`Call` records, joining the halves of a call that another
process interrupted (``<unfinished ...>`` and ``<... name resumed>``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

# Calls that write data, sync it, or place a name.
TRACED = (
    "write",
    "writev",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "sendto",
    "sendmsg",
    "fsync",
    "fdatasync",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
)
WRITES = frozenset({"write", "writev", "pwrite64", "pwritev", "pwritev2", "sendto", "sendmsg"})
SYNCS = frozenset({"fsync", "fdatasync"})

_LINE = re.compile(r"^(\d+) +(\d+\.\d+) (.*)$")
_WHOLE = re.compile(r"^(\w+)\((.*)\) += (-?\d+|\?)(?: [A-Z]\w*(?: \(.*?\))?)? <(\d+\.\d+)>$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\) += (-?\d+|\?)(?: .*?)? <(\d+\.\d+)>$")
# The first argument as strace -y shows it: "5</path/to/file>" ("->" may occur inside).
_FD = re.compile(r"^\d+<(.*?)>(?:, |$)")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Call:
    """One completed system call."""

    pid: int
    name: str
    start: float  # seconds since the epoch, when the call was entered
    end: float  # when it returned (start + duration)
    args: str  # as strace printed them
    result: int | None

    @property
    def target(self) -> str | None:
        """The file or socket behind the first argument (strace -y), if it is a descriptor."""
        found = _FD.match(self.args)
        return found.group(1) if found else None

    @property
    def paths(self) -> list[str]:
        """The quoted strings among the arguments (the paths of rename and link)."""
        return _QUOTED.findall(self.args)


def parse(text: str) -> list[Call]:
    """The completed calls of a trace, in the order they were entered."""
    calls: list[Call] = []
    open_calls: dict[int, tuple[str, float, str]] = {}
    for line in text.splitlines():
        found = _LINE.match(line)
        if found is None:
            continue
        pid, stamp, rest = int(found.group(1)), float(found.group(2)), found.group(3)
        if whole := _WHOLE.match(rest):
            name, args, result, took = whole.groups()
            calls.append(Call(pid, name, stamp, stamp + float(took), args, _int(result)))
        elif half := _UNFINISHED.match(rest):
            open_calls[pid] = (half.group(1), stamp, half.group(2))
        elif resumed := _RESUMED.match(rest):
            name, tail, result, took = resumed.groups()
            begun = open_calls.pop(pid, None)
            if begun is None or begun[0] != name:
                continue
            calls.append(Call(pid, name, begun[1], begun[1] + float(took), begun[2] + tail,
                              _int(result)))  # fmt: skip
    calls.sort(key=lambda call: call.start)
    return calls


def _int(text: str) -> int | None:
    return None if text == "?" else int(text)


def strace_command(output: str) -> list[str]:
    """The strace prefix that records :data:`TRACED` calls of a command into ``output``.

    Strings are cut at 80 characters: enough for an SMTP reply line.
    """
    return [
        strace(), "-f", "-qq", "-ttt", "-T", "-yy", "-s", "80",
        "-e", "trace=" + ",".join(TRACED), "-o", output,
    ]  # fmt: skip


def strace() -> str:
    """The path of strace, able to trace here; skip without it, or fail under CI."""
    path = shutil.which("strace") or shutil.which("strace", path="/usr/bin:/bin")
    reason = "strace is not installed (make test-deps installs it)"
    if path is not None:
        probe = subprocess.run(
            [path, "-f", "-qq", "-e", "trace=fsync", "-o", os.devnull, "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return path
        reason = f"strace cannot trace here: {probe.stderr.strip()[-300:]}"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, but CI is set")
    pytest.skip(reason)
