"""DSN (RFC 3461) on the server, the recipients' parameters, and the hop limit.

- The xtext codec and NOTIFY parsing of ``ehlo.extensions.dsn``, with
  examples and property tests.
- The protocol core keeps each accepted recipient's parameters in
  ``Transaction.rcpt_params`` (in memory, no sockets).
- Over TCP: DSN switched off by ``[limits] dsn = false``; smtplib sending
  with every DSN parameter; the hop limit (RFC 5321 section 6.3) over DATA
  and BDAT, with the store checked.

The dialogs ``tests/dialogs/dsn*.dialog`` hold the parameters' replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import smtplib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ehlo import Server
from ehlo.config import ConfigError, ServerConfig, load_config
from ehlo.extensions.dsn import parse_notify, xtext_decode, xtext_encode
from ehlo.protocol import ProtocolLimits, Reply
from ehlo.server.authres_filter import AuthResFilter

from .engine import codes, greeted
from .helpers import Client, make_config, queued_id
from .helpers import Reply as Answer

pytestmark = pytest.mark.timeout(60)

# RFC 3461 section 4: xtext, written here apart from the module's own.
XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")

# ------------------------------------------------------------------ xtext


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("", ""),
        ("abc", "abc"),
        ("abc+", "abc+2B"),
        ("a=b", "a+3Db"),
        ("a b\tc", "a+20b+09c"),
        ("~!", "~!"),
        ("jörg", "j+C3+B6rg"),
        ("\x7f", "+7F"),
    ],
)
def test_xtext_examples(text: str, encoded: str) -> None:
    assert xtext_encode(text) == encoded
    assert xtext_decode(encoded) == text


def test_xtext_decodes_needless_escapes() -> None:
    # RFC 3461 section 4: any octet may be written as "+XX".
    assert xtext_decode("+41+42c") == "ABc"


@pytest.mark.parametrize(
    "bad",
    [
        "+",  # "+" alone
        "a+2",  # one hex digit
        "a+2b",  # lower case hex
        "a+ZZ",  # not hex
        "a+b",  # a plain "+"
        "a=b",  # a plain "="
        "a b",  # space (32)
        "a\x7fb",  # DEL (127)
        "\x00",
        "é",  # outside 33..126
        "+FF",  # octets that are not UTF-8
    ],
)
def test_xtext_decode_refuses_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(bad)


@given(st.text())
def test_xtext_round_trip(text: str) -> None:
    encoded = xtext_encode(text)
    # RFC 3461 section 4: printable ASCII but "=", "+" only before two upper case hex digits.
    assert XTEXT.fullmatch(encoded), encoded
    assert xtext_decode(encoded) == text


@given(st.from_regex(XTEXT, fullmatch=True))
def test_valid_xtext_decodes_or_is_not_utf8(text: str) -> None:
    try:
        decoded = xtext_decode(text)
    except ValueError:
        return  # octets that are not UTF-8
    assert xtext_decode(xtext_encode(decoded)) == decoded


@given(st.text(max_size=30))
def test_xtext_decode_raises_nothing_but_value_error(text: str) -> None:
    with contextlib.suppress(ValueError):
        xtext_decode(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("NEVER", {"NEVER"}),
        ("never", {"NEVER"}),
        ("SUCCESS", {"SUCCESS"}),
        ("success,Failure,DELAY", {"SUCCESS", "FAILURE", "DELAY"}),
        ("DELAY,DELAY", {"DELAY"}),
    ],
)
def test_parse_notify(value: str, expected: set[str]) -> None:
    assert parse_notify(value) == expected


@pytest.mark.parametrize(
    "bad",
    ["", "NEVER,SUCCESS", "FAILURE,NEVER", "SOMETIMES", "SUCCESS,", ",DELAY", "SUCCESS FAILURE"],
)
def test_parse_notify_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_notify(bad)


# ------------------------------------------------------ the protocol core


def test_accepted_recipients_keep_their_parameters() -> None:
    d = greeted()
    assert codes(d.say("MAIL FROM:<a@example.org> RET=HDRS ENVID=x+2By")) == ["250"]
    tx = d.conn.transaction
    assert tx is not None
    assert tx.params == {"RET": "HDRS", "ENVID": "x+2By"}
    assert codes(
        d.say("RCPT TO:<b@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.net")
    ) == ["250"]
    assert codes(d.say("RCPT TO:<c@example.net>")) == ["250"]
    assert codes(d.say("RCPT TO:<d@example.net> NOTIFY=never")) == ["250"]
    assert tx.rcpts == ["b@example.net", "c@example.net", "d@example.net"]
    assert tx.rcpt_params == [
        {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;b@example.net"},
        {},
        {"NOTIFY": "never"},
    ]


def test_refused_recipients_leave_no_parameters() -> None:
    d = greeted(ProtocolLimits(max_recipients=2))
    d.say("MAIL FROM:<a@example.org>")
    tx = d.conn.transaction
    assert tx is not None
    # Refused by the core: a bad value.
    assert codes(d.say("RCPT TO:<x@example.net> NOTIFY=NEVER,DELAY")) == ["501"]
    # Refused by the session (policy): the reply decides, not the command.
    d.overrides["RCPT"] = Reply(550, "5.1.1", "no such user")
    assert codes(d.say("RCPT TO:<y@example.net> NOTIFY=DELAY")) == ["550"]
    d.overrides["RCPT"] = Reply(450, "4.2.0", "try later")
    assert codes(d.say("RCPT TO:<y@example.net> NOTIFY=FAILURE")) == ["450"]
    del d.overrides["RCPT"]
    assert codes(d.say("RCPT TO:<b@example.net> NOTIFY=SUCCESS")) == ["250"]
    assert codes(d.say("RCPT TO:<c@example.net> ORCPT=rfc822;c@example.net")) == ["250"]
    # Refused by the core: the recipient limit.
    assert codes(d.say("RCPT TO:<z@example.net> NOTIFY=DELAY")) == ["452"]
    assert tx.rcpts == ["b@example.net", "c@example.net"]
    assert tx.rcpt_params == [{"NOTIFY": "SUCCESS"}, {"ORCPT": "rfc822;c@example.net"}]


@pytest.mark.parametrize("clear", ["RSET", "EHLO again.example"])
def test_rset_and_greeting_clear_the_parameters(clear: str) -> None:
    d = greeted()
    d.say("MAIL FROM:<a@example.org>")
    d.say("RCPT TO:<b@example.net> NOTIFY=SUCCESS")
    first = d.conn.transaction
    assert first is not None and len(first.rcpt_params) == 1
    assert codes(d.say(clear)) == ["250"]
    assert d.conn.transaction is None
    d.say("MAIL FROM:<a@example.org>")
    tx = d.conn.transaction
    assert tx is not None and tx.rcpts == [] and tx.rcpt_params == []
    d.say("RCPT TO:<c@example.net>")
    assert tx.rcpt_params == [{}]


def test_a_finished_message_starts_the_next_with_no_parameters() -> None:
    d = greeted()
    out = d.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net> NOTIFY=DELAY\r\nDATA\r\n")
    assert codes(out) == ["250", "250", "354"]
    d.feed(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    d.say("MAIL FROM:<a@example.org>")
    tx = d.conn.transaction
    assert tx is not None and tx.rcpt_params == []


def test_dsn_switched_off_in_memory() -> None:
    d = greeted(ProtocolLimits(dsn=False))
    assert "DSN" not in d.conn.extension_lines()
    # RFC 5321 section 4.1.1.11: 555 for parameters of an extension not offered.
    assert codes(d.say("MAIL FROM:<a@example.org> RET=FULL")) == ["555"]
    assert codes(d.say("MAIL FROM:<a@example.org>")) == ["250"]
    assert codes(d.say("RCPT TO:<b@example.net> NOTIFY=NEVER")) == ["555"]
    tx = d.conn.transaction
    assert tx is not None and tx.rcpt_params == []


# ------------------------------------------------------------- over TCP


async def test_dsn_switched_off_by_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "ehlo.toml"
    path.write_text("[limits]\ndsn = false\n", "utf-8")
    limits = load_config(path).limits
    assert limits.dsn is False
    async with Server(make_config(tmp_path / "data", limits=limits)) as server:
        c = await Client.connect(server)
        try:
            r = await c.cmd("EHLO client.example")
            assert r.code == 250 and "DSN" not in r.lines
            for line in ("MAIL FROM:<a@example.org> RET=HDRS", "MAIL FROM:<a@example.org> ENVID=x"):
                r = await c.cmd(line)
                assert (r.code, r.enhanced) == (555, "5.5.4"), r
            assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
            for line in (
                "RCPT TO:<b@example.net> NOTIFY=SUCCESS",
                "RCPT TO:<b@example.net> ORCPT=rfc822;b@example.net",
            ):
                r = await c.cmd(line)
                assert (r.code, r.enhanced) == (555, "5.5.4"), r
        finally:
            c.close()


async def test_smtplib_sends_dsn_parameters(tmp_path: Path) -> None:
    body = b"Subject: dsn\r\nFrom: a@example.org\r\n\r\nhello\r\n"
    async with Server(make_config(tmp_path / "data")) as server:
        host, port = server.addresses[0]

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP(host, port, timeout=10) as s:
                s.ehlo("client.example")
                assert s.has_extn("dsn")
                return s.sendmail(
                    "a@example.org",
                    ["bob@example.org", "carol@example.org"],
                    body,
                    mail_options=["RET=HDRS", "ENVID=abc+2B"],
                    rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@example.org"],
                )

        assert await asyncio.to_thread(send) == {}
        stored = server.store.list()
        assert len(stored) == 1
        envelope = stored[0].envelope
        assert envelope.mail_params == {"SIZE": str(len(body)), "RET": "HDRS", "ENVID": "abc+2B"}
        assert envelope.rcpt_to == ["bob@example.org", "carol@example.org"]


# ------------------------------------------------------------ hop limit


def received_fields(count: int) -> bytes:
    return b"".join(
        b"Received: from h%d.example.org (h%d.example.org [192.0.2.1])\r\n"
        b"\tby mx%d.example.net; Mon, 7 Dec 2026 10:00:00 +0000\r\n" % (i, i, i)
        for i in range(count)
    )


def message(count: int) -> bytes:
    return received_fields(count) + b"Subject: hops\r\nFrom: a@example.org\r\n\r\nbody\r\n"


async def send_message(c: Client, verb: str, data: bytes) -> Answer:
    assert (await c.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await c.cmd("RCPT TO:<b@example.net>")).code == 250
    if verb == "DATA":
        assert (await c.cmd("DATA")).code == 354
        c.send(data + b".\r\n")
    else:
        # Two chunks, the first ending inside the header section.
        cut = len(data) // 3
        c.send(b"BDAT %d\r\n" % cut + data[:cut])
        r = await c.reply()
        assert r.code == 250, r
        c.send(b"BDAT %d LAST\r\n" % (len(data) - cut) + data[cut:])
    return await c.reply()


@pytest.mark.parametrize("verb", ["DATA", "BDAT"])
async def test_hop_limit(tmp_path: Path, verb: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ehlo.session")
    assert ServerConfig().max_hops == 100
    async with Server(make_config(tmp_path / "data")) as server:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            # RFC 5321 section 6.3: 100 hops pass...
            r = await send_message(c, verb, message(100))
            assert r.code == 250, r
            raw = server.store.raw(queued_id(r))
            assert raw is not None
            head = raw.split(b"\r\n\r\n", 1)[0]
            # ...our own Received on top (not counted) and the client's 100.
            assert head.lower().count(b"\r\nreceived:") + head.startswith(b"Received:") == 101
            assert raw.endswith(message(100))
            # ...one more is a loop: refused and not stored.
            r = await send_message(c, verb, message(101))
            assert (r.code, r.enhanced) == (554, "5.4.6"), r
            assert r.last == "554 5.4.6 Too many hops (101 Received fields): mail loop?"
            assert len(server.store.list()) == 1
            # The session goes on.
            r = await send_message(c, verb, message(0))
            assert r.code == 250, r
            assert len(server.store.list()) == 2
        finally:
            c.close()
    refusals = [
        rec.getMessage()
        for rec in caplog.records
        if rec.name == "ehlo.session" and " refused " in rec.getMessage()
    ]
    assert len(refusals) == 1 and refusals[0].endswith("reply=554"), refusals


@pytest.mark.parametrize("verb", ["DATA", "BDAT"])
async def test_hop_count_reads_field_names_only(tmp_path: Path, verb: str) -> None:
    head = (
        b"RECEIVED: from a\r\n"  # any letter case
        b"received : from b\r\n"  # white space before the colon (RFC 5322 obs-syntax)
        b"Received:\r\n from c\r\n Received: folded, not a field\r\n"
        b"Received-SPF: pass\r\n"
        b"X-Received: from d\r\n"
        b"Subject: Received: in a subject\r\n"
    )
    body = b"Received: in the body\r\nReceived: again\r\n"
    async with Server(make_config(tmp_path / "data", max_hops=2)) as server:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            r = await send_message(c, verb, head + b"\r\n" + body)
            assert r.last == "554 5.4.6 Too many hops (3 Received fields): mail loop?"
            # Without the third, two are allowed; the body's do not count.
            r = await send_message(c, verb, head[18:] + b"\r\n" + body)
            assert r.code == 250, r
            assert len(server.store.list()) == 1
        finally:
            c.close()


def test_filter_counts_received_fields_however_the_header_is_split() -> None:
    data = b"X-A: 1\r\n" + received_fields(3) + b"received\t: x\r\n\r\nReceived: body\r\n"
    for cut in range(1, len(data)):
        filt = AuthResFilter(frozenset({"mx.example.org"}))
        out = filt.feed(data[:cut]) + filt.feed(data[cut:]) + filt.finish()
        assert out == data
        assert filt.received == 4, cut
    # A header section without a body (no empty line) is counted at the end.
    filt = AuthResFilter(frozenset())
    assert filt.feed(b"Received: a\r\nReceived: b") == b""
    filt.finish()
    assert filt.received == 2


@pytest.mark.parametrize("bad", [0, -1, "100", 1.5, True])
def test_max_hops_is_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigError, match="max_hops"):
        load_config(None, {"max_hops": bad})
    assert load_config(None, {"max_hops": 1}).max_hops == 1
