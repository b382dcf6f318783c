"""What a client's text may do once it lands in headers and logs.

A real ``ehlo.Server`` on 127.0.0.1 (SQLite and Maildir stores) and real
clients (ehlo's own over DATA and BDAT, raw sockets for malformed input):

- forged Authentication-Results fields claiming our authserv-id are renamed
  or removed (RFC 8601 section 5), others stay, the envelope counts them;
- a recipient that could confuse a Received parser is left out of ``for``;
- greeting names and addresses with line separators or other non-printing
  characters are refused; a U-label greeting is written as its A-label;
- text log values are quoted logfmt-style, so no field can be forged;
- ``nul = "reject"`` refuses a message with a NUL octet (DATA and BDAT).
"""

from __future__ import annotations

import json
import logging
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trustme

from ehlo import Server
from ehlo.client import SMTPClient
from ehlo.config import ConfigError, load_config
from ehlo.log import TextFormatter
from ehlo.server.authres_filter import AuthResFilter, authserv_id

from .helpers import Client, make_config, queued_id, tool
from .test_cli import run

pytestmark = pytest.mark.timeout(60)

OURS = "mx.example.org"

FORGED = (
    b"Authentication-Results: mx.example.org; iprev=pass; spf=pass\r\n"
    b"AUTHENTICATION-RESULTS: MX.EXAMPLE.ORG; spf=pass smtp.helo=x.example\r\n"
    b"Authentication-Results:\r\n"
    b"\t(forged) mx.example.org 1;\r\n"
    b"\tiprev=pass\r\n"
    b"Authentication-Results: other.example; spf=pass smtp.helo=y.example\r\n"
    b"Subject: forged results\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.org; this is body text\r\n"
)


async def _start(tmp_path: Path, **overrides: Any) -> Server:
    # No DNS at all: the Received header's client name is not under test.
    overrides.setdefault("reverse_dns", False)
    server = Server(make_config(tmp_path / "data", hostname=OURS, **overrides))
    await server.start()
    return server


async def _send(server: Server, message: bytes, *, bdat: bool) -> str:
    host, port = server.addresses[0]
    async with SMTPClient(host, port, tls="off", chunking=bdat) as client:
        result = await client.send_message("a@example.net", ["b@example.org"], message)
    assert result.chunked is bdat
    return queued_id_text(result.reply.text)


def queued_id_text(text: str) -> str:
    found = re.search(r"queued as (\S+)", text)
    assert found, text
    return found.group(1)


def _stored(server: Server, queue_id: str) -> tuple[bytes, dict[str, Any]]:
    raw = server.store.raw(queue_id)
    stored = server.store.get(queue_id)
    assert raw is not None and stored is not None
    return raw, stored.envelope.to_json()


# ------------------------------------------------ forged Authentication-Results


@pytest.mark.parametrize("store", ["sqlite", "maildir"])
@pytest.mark.parametrize("bdat", [False, True], ids=["data", "bdat"])
async def test_forged_authentication_results_are_renamed(
    tmp_path: Path, store: str, bdat: bool
) -> None:
    server = await _start(tmp_path, store=store)
    try:
        queue_id = await _send(server, FORGED, bdat=bdat)
        raw, envelope = _stored(server, queue_id)
    finally:
        await server.stop(timeout=1.0)
    head, _, body = raw.partition(b"\r\n\r\n")
    # Ours: renamed, whatever the letter case, folding or comment before the id.
    assert b"X-Original-Authentication-Results: mx.example.org; iprev=pass; spf=pass\r\n" in head
    assert b"X-Original-Authentication-Results: MX.EXAMPLE.ORG; spf=pass" in head
    assert b"X-Original-Authentication-Results:\r\n\t(forged) mx.example.org 1;\r\n" in head
    # Another server's results and the body stay untouched.
    assert b"\r\nAuthentication-Results: other.example; spf=pass" in head
    assert re.search(rb"(?im)^authentication-results:[^\r]*mx\.example\.org", head) is None
    assert body == b"Authentication-Results: mx.example.org; this is body text\r\n"
    assert envelope["authres_forged"] == 3


@pytest.mark.parametrize("store", ["sqlite", "maildir"])
@pytest.mark.parametrize("bdat", [False, True], ids=["data", "bdat"])
async def test_forged_authentication_results_can_be_removed(
    tmp_path: Path, store: str, bdat: bool
) -> None:
    server = await _start(tmp_path, store=store, authres_forged="remove")
    try:
        queue_id = await _send(server, FORGED, bdat=bdat)
        raw, envelope = _stored(server, queue_id)
    finally:
        await server.stop(timeout=1.0)
    sent = raw[len(_received(raw)) + 2 :]
    assert sent == (
        b"Authentication-Results: other.example; spf=pass smtp.helo=y.example\r\n"
        b"Subject: forged results\r\n"
        b"\r\n"
        b"Authentication-Results: mx.example.org; this is body text\r\n"
    )
    assert envelope["authres_forged"] == 3


def test_swaks_forged_authentication_results(threaded_server: Any, tmp_path: Path) -> None:
    swaks = tool("swaks")  # under CI a missing tool fails, never skips
    server = threaded_server(hostname=OURS, reverse_dns=False)
    data = tmp_path / "forged.eml"
    data.write_bytes(FORGED.replace(b"\r\n", b"\n"))  # swaks sends CRLF
    proc = subprocess.run(
        [
            swaks,
            "--server",
            server.host,
            "--port",
            str(server.port),
            "--timeout",
            "20",
            "--from",
            "a@example.net",
            "--to",
            "b@example.org",
            "--data",
            str(data),
        ],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout
    found = re.search(rb"queued as (\S+)", proc.stdout)
    assert found, proc.stdout
    queue_id = found.group(1).decode()
    raw = server.call(lambda: server.server.store.raw(queue_id))
    stored = server.call(lambda: server.server.store.get(queue_id))
    assert raw.count(b"\r\nX-Original-Authentication-Results:") == 3, raw
    assert b"\r\nAuthentication-Results: other.example; spf=pass" in raw
    assert stored.envelope.to_json()["authres_forged"] == 3


async def test_sni_names_are_ours_too_and_the_cli_shows_the_count(tmp_path: Path) -> None:
    leaf = trustme.CA().issue_cert("alias.example.test", "*.wild.example.test")
    cert, key = tmp_path / "alias.pem", tmp_path / "alias.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    message = (
        b"Authentication-Results: Alias.Example.Test.; spf=pass\r\n"
        b"Authentication-Results: x.wild.example.test; spf=pass\r\n"
        b"Subject: sni\r\n\r\nbody\r\n"
    )
    server = await _start(tmp_path, sni_certificates=((cert, key),))
    try:
        queue_id = await _send(server, message, bdat=False)
        raw, _ = _stored(server, queue_id)
    finally:
        await server.stop(timeout=1.0)
    assert b"\r\nX-Original-Authentication-Results: Alias.Example.Test.; spf=pass\r\n" in raw
    # A wildcard certificate names no single host: not an authserv-id of ours.
    assert b"\r\nAuthentication-Results: x.wild.example.test; spf=pass\r\n" in raw
    shown = run("messages", "show", queue_id, "--json", "--data", str(tmp_path / "data"))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["authres_forged"] == 1


async def test_clean_message_is_stored_unchanged_and_uncounted(tmp_path: Path) -> None:
    message = b"Authentication-Results: other.example; none\r\nSubject: x\r\n\r\nbody\r\n"
    server = await _start(tmp_path)
    try:
        queue_id = await _send(server, message, bdat=False)
        raw, envelope = _stored(server, queue_id)
    finally:
        await server.stop(timeout=1.0)
    assert raw.endswith(b"\r\n" + message)
    assert "authres_forged" not in envelope


def test_authserv_id_parsing() -> None:
    # RFC 8601 section 2.2: [CFWS] authserv-id [CFWS authres-version] ...
    assert authserv_id(" mx.example.org; spf=pass") == "mx.example.org"
    assert authserv_id(" (a (nested) comment)\r\n\tMX.example.org 1; none") == "MX.example.org"
    assert authserv_id(' "mx.example.org"; none') == "mx.example.org"
    assert authserv_id(' "mx.\\example.org"; none') == "mx.example.org"
    assert authserv_id(" (never closed mx.example.org; none") is None
    assert authserv_id("   ") is None


def test_filter_gives_the_same_bytes_however_the_message_is_split() -> None:
    whole = AuthResFilter(frozenset({OURS}))
    expected = whole.feed(FORGED) + whole.finish()
    assert whole.forged == 3
    rng = random.Random(5)
    for _ in range(50):
        parts, pos = [], 0
        while pos < len(FORGED):
            step = rng.randint(1, 40)
            parts.append(FORGED[pos : pos + step])
            pos += step
        split = AuthResFilter(frozenset({OURS}))
        out = b"".join(split.feed(p) for p in parts) + split.finish()
        assert out == expected
        assert split.forged == 3


@pytest.mark.parametrize("split", [1, 3, 1000])
def test_filter_finds_the_end_of_a_header_section_with_bare_lf(split: int) -> None:
    # BDAT carries octets untransformed: LF-only lines end the header section too.
    message = (
        b"Authentication-Results: mx.example.org; spf=pass\n"
        b"\n\r\nAuthentication-Results: mx.example.org; body\n"
    )
    filt = AuthResFilter(frozenset({OURS}))
    parts = [message[i : i + split] for i in range(0, len(message), split)]
    out = b"".join(filt.feed(p) for p in parts) + filt.finish()
    assert out == b"X-Original-" + message
    assert filt.forged == 1


def test_filter_scans_a_bounded_header_section_and_passes_the_rest() -> None:
    from ehlo.server.authres_filter import HEADER_SCAN_LIMIT

    filt = AuthResFilter(frozenset({OURS}))
    filler = b"X-Filler: " + b"a" * 900 + b"\r\n"
    first = b"Authentication-Results: mx.example.org; spf=pass\r\n"
    head = first + filler * (HEADER_SCAN_LIMIT // len(filler) + 2)
    out = filt.feed(head)
    # The header section outgrew the limit: released without waiting for its end.
    assert out.startswith(b"X-Original-Authentication-Results: mx.example.org;")
    late = b"Authentication-Results: mx.example.org; late\r\n\r\nbody\r\n"
    assert filt.feed(late) == late
    assert filt.forged == 1


# ------------------------------------------------- Received header "for" clause


async def _raw_transaction(server: Server, rcpt: str, ehlo: str = "client.example") -> bytes:
    c = await Client.connect(server)
    try:
        assert (await c.cmd(f"EHLO {ehlo}")).code == 250
        assert (await c.cmd("MAIL FROM:<a@example.net>")).code == 250
        r = await c.cmd(f"RCPT TO:{rcpt}")
        assert r.code == 250, r
        assert (await c.cmd("DATA")).code == 354
        queue_id = queued_id(await c.cmd("Subject: t\r\n\r\nhello\r\n."))
    finally:
        c.close()
    raw = server.store.raw(queue_id)
    assert raw is not None
    return raw


def _received(raw: bytes) -> str:
    assert raw.startswith(b"Received: ")
    end = raw.index(b"\r\n", 0)
    while raw[end + 2 : end + 3] == b"\t":
        end = raw.index(b"\r\n", end + 2)
    return raw[:end].decode("utf-8")


async def test_received_for_clause_left_out_for_a_quoted_local_part(tmp_path: Path) -> None:
    server = await _start(tmp_path)
    try:
        forged = '<"v>; Mon, 1 Jan 2026 00:00:00 +0000 (forged) by"@example.org>'
        header = _received(await _raw_transaction(server, forged))
        plain = _received(await _raw_transaction(server, "<b@example.org>"))
    finally:
        await server.stop(timeout=1.0)
    assert " for " not in header and "forged" not in header, header
    assert header.count(";") == 1, header  # only the one before the date
    # A plain address keeps its clause.
    assert "\tfor <b@example.org>; " in plain, plain


# --------------------------------------------------- greeting names, addresses


@pytest.mark.parametrize(
    "name",
    [
        "bad\u0085name.example",
        "bad\u2028name.example",
        "bad\u2029name.example",
        "bad\x01name.example",
        "bad\u200bname.example",  # a format character (Cf)
        "bad\u00a0name.example",  # a non-ASCII space
    ],
    ids=["nel", "line-sep", "para-sep", "control", "zero-width", "nbsp"],
)
async def test_greeting_name_with_non_printing_characters_is_501(tmp_path: Path, name: str) -> None:
    server = await _start(tmp_path)
    try:
        c = await Client.connect(server)
        try:
            r = await c.cmd(f"EHLO {name}")
            assert r.code == 501 and "non-printing" in r.text, r
            r = await c.cmd(f"HELO {name}")
            assert r.code == 501, r
            assert (await c.cmd("EHLO good.example")).code == 250
        finally:
            c.close()
    finally:
        await server.stop(timeout=1.0)


async def test_u_label_greeting_is_written_as_its_a_label(tmp_path: Path) -> None:
    server = await _start(tmp_path)
    try:
        raw = await _raw_transaction(server, "<b@example.org>", ehlo="m\u00fcnchen.example")
    finally:
        await server.stop(timeout=1.0)
    header = _received(raw)
    # RFC 6531 section 3.7.1: the A-label, never raw UTF-8 in a 7-bit message's trace.
    assert header.startswith("Received: from xn--mnchen-3ya.example ("), header
    assert header.isascii(), header


@pytest.mark.parametrize(
    ("command", "enhanced"),
    [
        ("MAIL FROM:<a\u2028b@example.net> SMTPUTF8", "5.1.7"),
        ('MAIL FROM:<"a\u0085b"@example.net> SMTPUTF8', "5.1.7"),
        ("MAIL FROM:<a@exa\u2029mple.net> SMTPUTF8", "5.1.7"),
    ],
)
async def test_address_with_line_separator_is_501(
    tmp_path: Path, command: str, enhanced: str
) -> None:
    server = await _start(tmp_path)
    try:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            r = await c.cmd(command)
            assert (r.code, r.enhanced) == (501, enhanced), r
            assert (await c.cmd("MAIL FROM:<a@example.net> SMTPUTF8")).code == 250
            r = await c.cmd("RCPT TO:<b\u2028c@example.org>")
            assert (r.code, r.enhanced) == (501, "5.1.3"), r
            # A printable UTF-8 address stays allowed under SMTPUTF8.
            assert (await c.cmd("RCPT TO:<j\u00f6rg@example.org>")).code == 250
        finally:
            c.close()
    finally:
        await server.stop(timeout=1.0)


# -------------------------------------------------------------------- text log


def logfmt_pairs(text: str) -> list[tuple[str, str]]:
    """``key=value`` pairs of a logfmt line (values may be double-quoted)."""
    pairs = []
    for match in re.finditer(r'(\S+?)=("(?:[^"\\]|\\.)*"|\S*)', text):
        key, value = match.group(1), match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs.append((key.rsplit(" ", 1)[-1], value))
    return pairs


async def test_text_log_values_cannot_forge_fields(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ehlo.session")
    caplog.handler.setFormatter(TextFormatter())
    sender = '"x rcpts=99 size=1 reply=250"@b.example'
    server = await _start(tmp_path)
    try:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            assert (await c.cmd(f"MAIL FROM:<{sender}>")).code == 250
            assert (await c.cmd("RCPT TO:<b@example.org>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            queued_id(await c.cmd("Subject: t\r\n\r\nhi\r\n."))
        finally:
            c.close()
    finally:
        await server.stop(timeout=1.0)
    lines = [line for line in caplog.text.splitlines() if " INFO message " in line]
    assert len(lines) == 1, caplog.text
    pairs = logfmt_pairs(lines[0])
    keys = [key for key, _ in pairs]
    assert keys == [
        "session", "from", "to", "rcpts", "size", "tls", "auth",
        "helo", "verdict", "checks", "reply",
    ], lines[0]  # fmt: skip
    fields = dict(pairs)
    assert fields["from"] == f"<{sender}>"
    assert fields["rcpts"] == "1" and fields["reply"] == "250"


def test_text_log_escapes_line_separators() -> None:
    record = logging.makeLogRecord(
        {
            "name": "ehlo.session",
            "levelname": "INFO",
            "msg": "greeting %s EHLO %s",
            "args": ("127.0.0.1:1", 'a\u2028b\u0085c\nd\re "q" \\ x=1 m\u00fcnchen'),
        }
    )
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1
    assert "\u2028" not in line and "\u0085" not in line
    assert line.endswith('EHLO "a\\u2028b\\u0085c\\nd\\re \\"q\\" \\\\ x=1 m\u00fcnchen"'), line
    plain = logging.makeLogRecord(
        {"name": "ehlo.session", "msg": "greeting %s", "args": ("plain.example",)}
    )
    assert TextFormatter().format(plain).endswith(" greeting plain.example")
    # The operator's own text (other loggers) is written as it is.
    ready = logging.makeLogRecord(
        {"name": "ehlo.cli", "msg": "ready (event loop: %s)", "args": ("uvloop 1, worker 0",)}
    )
    assert TextFormatter().format(ready).endswith(" ready (event loop: uvloop 1, worker 0)")


# ------------------------------------------------------------------ NUL octets


@pytest.mark.parametrize("store", ["sqlite", "maildir"])
async def test_nul_reject_refuses_data_and_bdat(tmp_path: Path, store: str) -> None:
    server = await _start(tmp_path, store=store, nul="reject")
    try:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            assert (await c.cmd("MAIL FROM:<a@example.net>")).code == 250
            assert (await c.cmd("RCPT TO:<b@example.org>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            r = await c.cmd(b"Subject: t\r\n\r\nnul \x00 here\r\n.")
            assert (r.code, r.enhanced) == (554, "5.6.0"), r
            assert (await c.cmd("MAIL FROM:<a@example.net>")).code == 250
            assert (await c.cmd("RCPT TO:<b@example.org>")).code == 250
            body = b"Subject: t\r\n\r\nnul \x00 here\r\n"
            r = await c.cmd(b"BDAT %d LAST\r\n" % len(body) + body[:-2])
            assert (r.code, r.enhanced) == (554, "5.6.0"), r
            assert (await c.cmd("NOOP")).code == 250
        finally:
            c.close()
        assert list(server.store.list()) == []
    finally:
        await server.stop(timeout=1.0)


async def test_nul_keep_stores_as_sent(tmp_path: Path) -> None:
    server = await _start(tmp_path)
    try:
        c = await Client.connect(server)
        try:
            await c.ehlo()
            assert (await c.cmd("MAIL FROM:<a@example.net>")).code == 250
            assert (await c.cmd("RCPT TO:<b@example.org>")).code == 250
            assert (await c.cmd("DATA")).code == 354
            queue_id = queued_id(await c.cmd(b"Subject: t\r\n\r\nnul \x00 here\r\n."))
        finally:
            c.close()
        raw = server.store.raw(queue_id)
    finally:
        await server.stop(timeout=1.0)
    assert raw is not None and raw.endswith(b"\r\n\r\nnul \x00 here\r\n")


def test_config_keys(tmp_path: Path) -> None:
    path = tmp_path / "ehlo.toml"
    path.write_text('authres_forged = "remove"\n[limits]\nnul = "reject"\n')
    config = load_config(path)
    assert config.authres_forged == "remove" and config.limits.nul == "reject"
    default = load_config(None)
    assert default.authres_forged == "rename" and default.limits.nul == "keep"
    path.write_text('authres_forged = "keep"\n')
    with pytest.raises(ConfigError, match="authres_forged"):
        load_config(path)
    path.write_text('[limits]\nnul = "strip"\n')
    with pytest.raises(ConfigError, match="nul"):
        load_config(path)
