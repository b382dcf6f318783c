"""A generated store of many messages whose fields follow the message number.

Message ``i`` (0 is the oldest) was received ``i`` seconds after
:data:`BASE`; its sender, recipients, subject, greeting, TLS, authenticated
user and greeting-check report are simple rules of ``i`` (see
:func:`envelope`), so that the messages any filter selects are known.
:func:`generate` writes ``total`` of them into a SQLite store through the
store API (the writer in a thread, a few thousand commits at a time).
``tests/test_messages_scale.py`` lists them with ``ehlo messages``, and
``bench/messages.py`` times that.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

from ehlo.ids import new_queue_id
from ehlo.storage import Envelope, open_store
from ehlo.storage.base import JSONText

# The oldest generated message was received at this time, the others a second apart.
BASE = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
PASS_REPORT = JSONText(
    json.dumps({"forward_match": {"result": "pass", "reason": "", "evidence": {}}})
)
FAIL_REPORT = JSONText(
    json.dumps({"forward_match": {"result": "fail", "reason": "no", "evidence": {}}})
)
# Messages committed together (one batch of commit futures awaited at a time).
BATCH = 5000


def when(i: int) -> dt.datetime:
    return BASE + dt.timedelta(seconds=i)


def subject(i: int) -> str:
    return f"Invoice ÄÖ {i}" if i % 997 == 0 else f"Message {i}"


def envelope(i: int) -> Envelope:
    extra: dict[str, Any] = {}
    if i % 250 == 1:
        extra["auth"] = {"user": "Alice", "mechanism": "PLAIN"}
    if i % 2 == 0:
        extra["greeting_checks"] = FAIL_REPORT if i % 333 == 5 else PASS_REPORT
    rcpts = [f"user{i % 50}@dest.example"]
    if i % 1000 == 0:
        rcpts.append("Special@Rare.example")
    return Envelope(
        queue_id=new_queue_id(),
        client_ip="127.0.0.1",
        client_port=40000 + i % 1000,
        greeting="HELO" if i % 10 == 3 else "EHLO",
        greeting_name="client.example",
        mail_from=f"sender{i % 100}@from.example",
        mail_params={},
        rcpt_to=rcpts,
        received_at=when(i),
        tls={"version": "TLSv1.3", "cipher": "X"} if i % 4 == 0 else None,
        extra=extra,
    )


def body(i: int) -> bytes:
    return f"Subject: {subject(i)}\r\n\r\nbody {i}\r\n".encode()


async def _generate(data: Path, total: int) -> None:
    store = open_store("sqlite", data, writer="thread")
    await store.start()
    try:
        for start in range(0, total, BATCH):
            futures = []
            for i in range(start, min(start + BATCH, total)):
                writer = store.begin(envelope(i))
                writer.write(body(i))
                futures.append(writer.start_commit())
            await asyncio.gather(*futures)
    finally:
        await store.close()


def generate(data: Path, total: int) -> None:
    """Write messages 0 to ``total - 1`` into a SQLite store in the folder ``data``."""
    asyncio.run(_generate(data, total))
