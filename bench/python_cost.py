"""The Python cost of a message in ehlo's server, without sockets or a store.

Drives the real ``SMTPServerProtocol`` (protocol core, session, transport
logic) through a stand-in transport that keeps what it is given, with the
null store, on uvloop when it is installed. It prints the microseconds of
Python per message:

- ``W1``: a whole connection per message (banner, EHLO, MAIL, RCPT, DATA,
  a 4 KiB body, QUIT);
- ``W2``: one more message on an open connection.

The figure leaves out the system calls and the event loop's own work, which
``make bench`` measures with the rest. ``python bench/python_cost.py W2``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from typing import Any

from ehlo.config import ServerConfig
from ehlo.policy import Hooks
from ehlo.server._server import ServerContext
from ehlo.server._transport import SMTPServerProtocol
from ehlo.storage.null import NullStore

# About 4 KiB, as smtp-source -l 4096 sends.
_BODY = (
    b"From: a@b.example\r\nTo: c@d.example\r\nSubject: bench\r\n\r\n"
    + (b"x" * 70 + b"\r\n") * 56
    + b".\r\n"
)


class _Transport:
    """Keeps the replies; enough of asyncio.Transport for the server."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def close(self) -> None:
        self.closed = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed


async def _session(ctx: ServerContext, messages: int) -> list[bytes]:
    proto = SMTPServerProtocol(ctx)
    transport = _Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(b"EHLO client.example\r\n")
    for _ in range(messages):
        for line in (b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n", b"DATA\r\n"):
            proto.data_received(line)
        proto.data_received(_BODY)
        await asyncio.sleep(0)  # a store that needs a turn of the loop gets it
    proto.data_received(b"QUIT\r\n")
    proto.connection_lost(None)
    return transport.out


async def measure(workload: str, count: int) -> float:
    """Microseconds of Python per message for ``workload`` (W1 or W2)."""
    config = ServerConfig(reverse_dns=False, hostname="mx.example")
    greeting = dataclasses.replace(config.greeting, policy="off")
    config = dataclasses.replace(config, greeting=greeting)
    ctx = ServerContext(config, NullStore(), Hooks(), None)
    started = time.perf_counter()
    if workload == "W2":
        replies = [await _session(ctx, count)]
    else:
        replies = [await _session(ctx, 1) for _ in range(count)]
    elapsed = time.perf_counter() - started
    accepted = sum(reply.startswith(b"250 2.0.0 OK: queued") for out in replies for reply in out)
    if accepted != count:
        raise SystemExit(f"{workload}: {accepted} of {count} messages were accepted")
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=("W1", "W2"))
    parser.add_argument("-n", "--count", type=int, default=20000, help="messages (default 20000)")
    args = parser.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    run(measure(args.workload, min(args.count, 2000)))  # warm up
    cost = run(measure(args.workload, args.count))
    print(f"{args.workload}: {cost:.1f} us of Python per message")


if __name__ == "__main__":
    main()
