"""``GET /api/v1/overview`` and ``Store.overview``: what came in lately, counted.

The messages are generated through the store API by :mod:`tests.messages_data`
(message ``i`` received ``i`` seconds after ``BASE``; HELO when ``i % 10 == 3``,
TLS when ``i % 4 == 0``, a greeting report on even ``i``, failing
``forward_match`` when ``i % 333 == 5``), so every count is known. The SQLite
store counts in SQL; the generic count over ``search`` (what a store
without SQL does) must agree with it. The endpoint is asked over HTTP with
aiohttp's client, its clock set at a known time.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ehlo.storage import Overview, SQLiteStore, Store, open_store
from ehlo.web import WebContext, build_app

from .messages_data import BASE, envelope, generate, when

TOTAL = 3000


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("overview") / "data"
    generate(data, TOTAL)
    return data


def expected(first: int, last: int) -> Overview:
    """The counts of messages ``first`` to ``last - 1``, from the rules of messages_data."""
    found = Overview()
    for i in range(first, last):
        env = envelope(i)
        found.total += 1
        minute = when(i).strftime("%Y-%m-%dT%H:%M")
        found.per_minute[minute] = found.per_minute.get(minute, 0) + 1
        found.greetings[env.greeting] = found.greetings.get(env.greeting, 0) + 1
        found.tls["yes" if env.tls else "no"] += 1
        if i % 2 == 0:
            found.add_check("forward_match", "fail" if i % 333 == 5 else "pass")
    found.top_names = [("client.example", last - first)] if last > first else []
    return found


def sqlite(data: Path) -> SQLiteStore:
    store = open_store("sqlite", data)
    assert isinstance(store, SQLiteStore)
    return store


@pytest.mark.parametrize("first", [0, 1234, TOTAL - 1, TOTAL])
def test_sqlite_counts_in_sql_what_the_generic_count_finds(store_dir: Path, first: int) -> None:
    store = sqlite(store_dir)
    since = when(first)
    in_sql = store.overview(since)
    generic = Store.overview(store, since)  # the default: over search(Query(since=...))
    assert in_sql == generic == expected(first, TOTAL)
    if first == 0:
        assert in_sql.greetings == {"EHLO": 2700, "HELO": 300}
        assert in_sql.tls == {"yes": 750, "no": 2250}
        assert in_sql.checks == {"forward_match": {"pass": 1496, "fail": 4}}
        assert len(in_sql.per_minute) == 50 and set(in_sql.per_minute.values()) == {60}


def test_client_names_counted_whatever_their_case(tmp_path: Path) -> None:
    async def write() -> None:
        store = open_store("sqlite", tmp_path / "data", writer="thread")
        await store.start()
        try:
            for i, name in enumerate(["MX.Example.ORG", "mx.example.org", "other.test"] * 2):
                env = envelope(i)
                env.greeting_name = name
                writer = store.begin(env)
                writer.write(b"Subject: x\r\n\r\nx\r\n")
                await writer.commit()
        finally:
            await store.close()

    asyncio.run(write())
    store = sqlite(tmp_path / "data")
    found = store.overview(BASE)
    assert found.top_names == [("mx.example.org", 4), ("other.test", 2)]
    assert Store.overview(store, BASE).top_names == found.top_names
    # Nothing stored yet: all zero.
    assert sqlite(tmp_path / "empty").overview(BASE) == Overview()


@pytest.fixture
async def api(store_dir: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    """The app over the generated store, its clock at message 2999 + 30 s."""
    now = (when(TOTAL - 1) + dt.timedelta(seconds=30)).timestamp()
    app = build_app(WebContext(store=sqlite(store_dir), clock=lambda: now))
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            yield session, f"http://127.0.0.1:{port}/api/v1/overview"
    finally:
        await runner.cleanup()


async def get(api: tuple[aiohttp.ClientSession, str], query: str) -> tuple[int, Any]:
    session, url = api
    async with session.get(url + query) as answer:
        return answer.status, await answer.json()


async def test_endpoint_lists_every_minute_of_the_window(
    api: tuple[aiohttp.ClientSession, str],
) -> None:
    # Message 2999 is at 00:49:59; the clock at 00:50:29: the window of 10
    # minutes is 00:41 to 00:50 (the current minute last, empty).
    status, data = await get(api, "?minutes=10")
    assert status == 200
    minutes = [minute for minute, _ in data["per_minute"]]
    assert minutes == [(BASE + dt.timedelta(minutes=m)).isoformat() for m in range(41, 51)]
    counts = [count for _, count in data["per_minute"]]
    assert counts == [60] * 9 + [0]
    first = 41 * 60
    want = expected(first, TOTAL)
    assert data["total"] == want.total == 540
    assert data["minutes"] == 10 and data["since"] == (BASE + dt.timedelta(minutes=41)).isoformat()
    assert data["greetings"] == {"HELO": want.greetings["HELO"], "EHLO": want.greetings["EHLO"]}
    assert data["tls"] == want.tls
    assert data["checks"] == want.checks
    assert data["top_names"] == [["client.example", 540]]
    # The default window is an hour: every message since 23:51 the day before.
    status, data = await get(api, "")
    assert status == 200 and len(data["per_minute"]) == 60 and data["total"] == TOTAL


async def test_endpoint_counts_only_the_window(
    api: tuple[aiohttp.ClientSession, str],
) -> None:
    status, data = await get(api, "?minutes=1")
    assert status == 200
    assert data["total"] == 0 and data["per_minute"][0][1] == 0
    assert data["greetings"] == {"HELO": 0, "EHLO": 0} and data["tls"] == {"yes": 0, "no": 0}
    assert data["checks"] == {} and data["top_names"] == []
    status, data = await get(api, "?minutes=2")
    assert data["total"] == 60
    assert Counter(c for _, c in data["per_minute"]) == Counter([60, 0])


@pytest.mark.parametrize("minutes", ["0", "1441", "-5", "ten", "1.5"])
async def test_bad_window_is_a_400_naming_it(
    api: tuple[aiohttp.ClientSession, str], minutes: str
) -> None:
    status, data = await get(api, f"?minutes={minutes}")
    assert status == 400
    assert data["error"]["status"] == 400 and "minutes" in data["error"]["message"]
