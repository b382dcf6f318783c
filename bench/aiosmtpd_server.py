"""Reference server for ehlo's benchmark (bench/run.py): aiosmtpd on uvloop, discarding.

Run with the bench-only venv that ``bench/setup.sh`` creates (aiosmtpd==1.4.6,
uvloop==0.23.0)::

    bench/.venv-aiosmtpd/bin/python bench/aiosmtpd_server.py --listen 127.0.0.1:PORT

What is set: the handler answers 250 to DATA and keeps nothing; no size limit
(``data_size_limit=None``: W3 sends 10 MiB messages); ``hostname`` given so
that aiosmtpd does not call ``socket.getfqdn()`` (a DNS lookup) for every
connection; no TLS, no AUTH. aiosmtpd still reads each message whole into
memory before calling the handler: that is how it works, not a choice here.
Prints one ``ready`` line on stderr naming the event loop, then serves until
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import uvloop
from aiosmtpd import __version__ as aiosmtpd_version
from aiosmtpd.smtp import SMTP, Envelope, Session


class Discard:
    """An aiosmtpd handler that accepts every message and keeps nothing."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 2.0.0 OK: discarded"


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = Discard()

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname="localhost",
            ident="aiosmtpd (bench)",
            data_size_limit=None,
            enable_SMTPUTF8=True,
            loop=loop,
        )

    server = await loop.create_server(factory, host, port, backlog=4096, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"aiosmtpd {aiosmtpd_version} ready on {host}:{port} "
        f"(event loop: uvloop {getattr(uvloop, '__version__', '?')}, {type(loop).__module__})",
        file=sys.stderr,
        flush=True,
    )
    await stop.wait()
    server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:2525", metavar="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
