"""Queue ids: shape, uniqueness, time order, and no shared sequence across forked workers."""

from __future__ import annotations

import base64
import os
import random
import time

import pytest

from ehlo import ids
from ehlo.ids import is_queue_id, new_queue_id


def test_shape_uniqueness_and_order() -> None:
    ids = [new_queue_id() for _ in range(20_000)]
    assert all(is_queue_id(i) for i in ids)
    assert len(set(ids)) == len(ids)
    earlier = new_queue_id()
    time.sleep(0.002)  # time itself is under test: a later id has a later time part
    assert new_queue_id()[:10] > earlier[:10]  # the time part sorts as text


def test_forked_workers_do_not_repeat_each_other() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker: its ids go to the parent
        os.close(read)
        os.write(write, ",".join(new_queue_id() for _ in range(200)).encode())
        os._exit(0)
    os.close(write)
    mine = {new_queue_id() for _ in range(200)}
    chunks = []
    while data := os.read(read, 65536):
        chunks.append(data)
    os.close(read)
    os.waitpid(pid, 0)
    theirs = set(b"".join(chunks).decode().split(","))
    assert len(theirs) == 200
    # Same milliseconds, different random parts: the generator was reseeded.
    assert not mine & theirs
    assert {i[10:] for i in mine}.isdisjoint({i[10:] for i in theirs})


def test_id_is_base32_of_milliseconds_and_random_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    # The 80 bits, most significant first, as RFC 4648 base32 would write
    # them, in Crockford's alphabet (which keeps the order).
    crockford = bytes.maketrans(
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    )
    rng = random.Random(7)
    for _ in range(2000):
        millis, low = rng.getrandbits(48), rng.getrandbits(32)
        monkeypatch.setattr(ids.time, "time_ns", lambda m=millis: m * 1_000_000 + 999_999)
        monkeypatch.setattr(ids.random, "getrandbits", lambda bits, v=low: v)
        expected = base64.b32encode((millis << 32 | low).to_bytes(10, "big")).translate(crockford)
        assert ids.new_queue_id() == expected.decode()
