"""The sans-IO client: ClientConnection against ServerConnection over an in-memory link.

No sockets, no event loop. ``Link`` moves the client's bytes into the server
driver of ``tests/engine.py`` (a ServerConnection answering like an accepting
session) and the server's bytes back; dialogs, reply parsing, sequencing
rules, dot-stuffing and BDAT are checked from both ends. SCRAM-SHA-256 is
checked against the test vector of RFC 7677 section 3.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehlo import ProtocolLimits
from ehlo.client._client import scram_client_final, scram_client_first
from ehlo.protocol import (
    NEED_DATA,
    ClientConnection,
    ClientState,
    Data,
    DataEnd,
    Ehlo,
    Helo,
    LocalProtocolError,
    Mail,
    Rcpt,
    RemoteProtocolError,
    Reply,
    ServerExtensions,
)

from .engine import Driver

pytestmark = pytest.mark.timeout(30)

BANNER = Reply(220, None, "test ESMTP").render()


class Link:
    """A client and a server driver joined back to back in memory."""

    def __init__(self, driver: Driver | None = None, **client: bool | int) -> None:
        self.server = driver if driver is not None else Driver()
        self.client = ClientConnection(**client)  # type: ignore[arg-type]
        self.client.receive_data(BANNER)
        banner = self.client.next_reply()
        assert isinstance(banner, Reply) and banner.code == 220

    def exchange(self) -> list[Reply]:
        """Deliver what the client queued; return every reply it can parse now."""
        out = self.client.data_to_send()
        self.client.receive_data(self.server.feed(out))
        return self.replies()

    def replies(self) -> list[Reply]:
        got: list[Reply] = []
        while True:
            reply = self.client.next_reply()
            if reply is NEED_DATA:
                return got
            assert isinstance(reply, Reply)
            got.append(reply)


def greeted(driver: Driver | None = None, verb: str = "EHLO") -> Link:
    link = Link(driver)
    (link.client.ehlo if verb == "EHLO" else link.client.helo)("client.example")
    [reply] = link.exchange()
    assert reply.code == 250
    return link


def expected_body(data: bytes) -> bytes:
    """What the server stores for a body: CR and LF made CRLF, a final CRLF."""
    text = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text


# --------------------------------------------------------------- dialogs


def test_pipelined_transaction_end_to_end() -> None:
    link = greeted()
    client = link.client
    assert client.esmtp and client.pipelining
    assert client.extensions.size == ProtocolLimits().max_message_size
    client.mail("a@example.org", {"SIZE": "30", "BODY": "8BITMIME"})
    client.rcpt("b@example.net")
    client.rcpt("c@example.net")
    client.data()
    wire = client.data_to_send()
    # RFC 2920: MAIL, every RCPT and DATA leave in one write.
    assert wire == (
        b"MAIL FROM:<a@example.org> SIZE=30 BODY=8BITMIME\r\n"
        b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    client.receive_data(link.server.feed(wire))
    replies = link.replies()
    assert [r.code for r in replies] == [250, 250, 250, 354]
    assert client.accepted_recipients == 2 and client.sending_body
    client.send_data(b"Subject: x\n\n.dot first\n")
    client.send_data(b"..two dots\nlast line without newline")
    client.end_data()
    [final] = link.exchange()
    assert final.code == 250 and final.enhanced == "2.0.0"
    assert link.server.messages == [
        b"Subject: x\r\n\r\n.dot first\r\n..two dots\r\nlast line without newline\r\n"
    ]
    events = [type(e) for e in link.server.events]
    assert events[:5] == [Ehlo, Mail, Rcpt, Rcpt, Data]
    assert not client.in_transaction and client.state is ClientState.GREETED


def test_without_pipelining_each_command_waits() -> None:
    link = greeted(Driver(ProtocolLimits(pipelining=False)))
    client = link.client
    assert not client.pipelining
    client.mail("a@example.org")
    # RFC 2920 section 3: no RCPT before MAIL was answered, without PIPELINING.
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        client.rcpt("b@example.net")
    assert [r.code for r in link.exchange()] == [250]
    client.rcpt("b@example.net")
    assert [r.code for r in link.exchange()] == [250]
    client.data()
    assert [r.code for r in link.exchange()] == [354]


def test_helo_fallback_and_no_parameters_afterwards() -> None:
    driver = Driver()
    driver.overrides["EHLO"] = Reply(502, "5.5.1", "EHLO not implemented")
    link = Link(driver)
    link.client.ehlo("client.example")
    [reply] = link.exchange()
    assert reply.code == 502 and link.client.state is ClientState.READY
    del driver.overrides["EHLO"]
    link.client.helo("client.example")
    [reply] = link.exchange()
    assert reply.code == 250 and not link.client.esmtp
    assert len(link.client.extensions) == 0
    # RFC 5321 section 4.1.1.1: no ESMTP parameters in a HELO session.
    with pytest.raises(LocalProtocolError, match="EHLO session"):
        link.client.mail("a@example.org", {"SIZE": "10"})
    link.client.mail("a@example.org")
    assert [r.code for r in link.exchange()] == [250]
    assert isinstance(link.server.events[-1], Mail)
    assert any(isinstance(e, Helo) for e in link.server.events)


def test_bdat_chunks_deliver_exact_bytes() -> None:
    link = greeted()
    client = link.client
    client.mail("a@example.org")
    client.rcpt("b@example.net")
    assert [r.code for r in link.exchange()] == [250, 250]
    client.bdat(b"Subject: x\r\n\r\n.no stuffing\r")
    client.bdat(b"\nsecond\n")  # pipelined: BDAT may be followed before its reply
    client.bdat(b"third", last=True)
    replies = link.exchange()
    assert [r.code for r in replies] == [250, 250, 250]
    assert link.server.messages == [b"Subject: x\r\n\r\n.no stuffing\r\nsecond\r\nthird\r\n"]
    assert [e.last for e in link.server.events if isinstance(e, DataEnd)] == [False, False, True]
    with pytest.raises(LocalProtocolError, match="without a MAIL"):
        client.bdat(b"x", last=True)


def test_data_and_bdat_are_not_mixed() -> None:
    link = greeted()
    link.client.mail("a@example.org")
    link.client.rcpt("b@example.net")
    link.client.bdat(b"x")
    link.exchange()
    with pytest.raises(LocalProtocolError, match="DATA after BDAT"):
        link.client.data()


def test_refused_mail_fails_the_pipelined_group() -> None:
    driver = Driver()
    driver.overrides["MAIL"] = Reply(550, "5.7.1", "sender refused")
    link = greeted(driver)
    client = link.client
    client.mail("a@example.org")
    client.rcpt("b@example.net")
    client.data()
    replies = link.exchange()
    assert [r.code for r in replies] == [550, 503, 503]
    assert not client.in_transaction
    with pytest.raises(LocalProtocolError):
        client.rcpt("c@example.net")
    del driver.overrides["MAIL"]
    client.mail("a@example.org")  # a refused transaction does not need RSET
    assert [r.code for r in link.exchange()] == [250]


def test_all_recipients_refused_blocks_data() -> None:
    driver = Driver()
    driver.overrides["RCPT"] = Reply(550, "5.1.1", "no such user")
    link = greeted(driver)
    link.client.mail("a@example.org")
    link.client.rcpt("b@example.net")
    assert [r.code for r in link.exchange()] == [250, 550]
    with pytest.raises(LocalProtocolError, match="recipient"):
        link.client.data()
    link.client.rset()
    assert [r.code for r in link.exchange()] == [250]
    assert not link.client.in_transaction


def test_starttls_discards_early_bytes_and_forgets_extensions() -> None:
    link = greeted(Driver(ProtocolLimits(starttls=True)))
    client = link.client
    assert "STARTTLS" in client.extensions
    client.starttls()
    out = client.data_to_send()
    reply_bytes = link.server.feed(out)
    # A man in the middle appends a reply to the 220 (response injection).
    client.receive_data(reply_bytes + b"250 injected\r\n")
    [reply] = link.replies()
    assert reply.code == 220 and client.state is ClientState.TLS_PENDING
    assert client.discarded_after_starttls == len(b"250 injected\r\n")
    with pytest.raises(LocalProtocolError, match="tls_started"):
        client.ehlo("client.example")
    link.server.conn.tls_started()
    client.tls_started()
    # RFC 3207 section 4.2: what was learned before TLS is forgotten.
    assert client.tls_active and not client.esmtp and len(client.extensions) == 0
    with pytest.raises(LocalProtocolError, match="HELO or EHLO"):
        client.mail("a@example.org")
    client.ehlo("client.example")
    [reply] = link.exchange()
    assert reply.code == 250 and "STARTTLS" not in client.extensions
    with pytest.raises(LocalProtocolError, match="already active"):
        client.starttls()


def test_auth_challenge_and_response() -> None:
    client = ClientConnection()
    client.receive_data(BANNER)
    client.next_reply()
    client.ehlo("client.example")
    client.data_to_send()
    client.receive_data(b"250-server\r\n250-AUTH=LOGIN\r\n250 AUTH PLAIN LOGIN\r\n")
    client.next_reply()
    assert client.extensions.auth_mechanisms == ("LOGIN", "PLAIN")
    with pytest.raises(LocalProtocolError, match="not offered"):
        client.auth("CRAM-MD5")
    client.auth("LOGIN")
    assert client.data_to_send() == b"AUTH LOGIN\r\n"
    client.receive_data(b"334 VXNlcm5hbWU6\r\n")
    challenge = client.next_reply()
    assert isinstance(challenge, Reply) and challenge.code == 334
    assert client.auth_challenge_pending
    with pytest.raises(LocalProtocolError, match="AUTH response"):
        client.mail("a@example.org")
    client.auth_response(base64.b64encode(b"user").decode())
    assert client.data_to_send() == b"dXNlcg==\r\n"
    with pytest.raises(LocalProtocolError, match="no AUTH challenge"):
        client.auth_response("dXNlcg==")
    client.receive_data(b"334 UGFzc3dvcmQ6\r\n235 2.7.0 ok\r\n")
    assert client.next_reply().code == 334  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError, match="base64"):
        client.auth_response("not base64!")
    client.auth_response(base64.b64encode(b"pw").decode())
    assert client.next_reply().code == 235  # type: ignore[union-attr]
    assert client.authenticated
    with pytest.raises(LocalProtocolError, match="already authenticated"):
        client.auth("PLAIN", "")


def test_empty_initial_response_is_an_equals_sign() -> None:
    client = ClientConnection()
    client.receive_data(BANNER)
    client.next_reply()
    client.ehlo("client.example")
    client.data_to_send()
    client.receive_data(b"250-x\r\n250 AUTH PLAIN\r\n")
    client.next_reply()
    client.auth("plain", "")
    # RFC 4954 section 4: "=" is a zero-length initial response.
    assert client.data_to_send() == b"AUTH PLAIN =\r\n"


# ------------------------------------------------------------- replies


REPLIES = [
    b"220 mail.example ESMTP\r\n",
    b"250-mail.example greets you\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n",
    b"550-5.1.1 first line\r\n550-5.1.1 second line\r\n550 5.1.1 third\r\n",
    b"250\r\n",
    b"421 4.3.2 bye\n",
]


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_any_split_of_replies_gives_the_same_replies(cuts: list[int]) -> None:
    data = b"".join(REPLIES)
    points = sorted({c % (len(data) + 1) for c in cuts})
    client = ClientConnection()
    client._awaiting.extend(["NOOP"] * (len(REPLIES) - 1))
    got: list[Reply] = []
    start = 0
    for point in [*points, len(data)]:
        client.receive_data(data[start:point])
        start = point
        while (reply := client.next_reply()) is not NEED_DATA:
            assert isinstance(reply, Reply)
            got.append(reply)
    assert [r.code for r in got] == [220, 250, 550, 250, 421]
    assert got[1].lines == ("mail.example greets you", "PIPELINING", "SIZE 1000", "8BITMIME")
    assert got[2].enhanced == "5.1.1"
    assert got[2].lines == ("first line", "second line", "third")
    assert got[3].lines == ("",)


def test_extension_list_parsing() -> None:
    reply = Reply(
        250,
        None,
        ["mx.example", "SIZE", "auth=login", "AUTH PLAIN  SCRAM-SHA-256", "X-PRIVATE a b",
         "bad! keyword", "-BAD", "8bitmime"],
    )
    ext = ServerExtensions.from_reply(reply)
    assert ext.size == 0  # RFC 1870: SIZE without a value: no fixed limit
    assert ext.auth_mechanisms == ("LOGIN", "PLAIN", "SCRAM-SHA-256")
    assert ext["x-private"] == ("a", "b")
    assert "8BITMIME" in ext and "BAD" not in ext and "-BAD" not in ext
    assert ServerExtensions(["SIZE 123"]).size == 123
    assert ServerExtensions(["SIZE lots"]).size is None
    assert ServerExtensions([]).size is None


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"2500 x\r\n", "malformed"),
        (b"abc hello\r\n", "malformed"),
        (b"199 too low\r\n", "malformed"),
        (b"600 too high\r\n", "malformed"),
        (b"250-one\r\n251 two\r\n", "changes its code"),
        (b"250 with\rcarriage return\r\n", "CR or NUL"),
        (b"250 " + b"x" * 5000, "longer than"),
        (b"250 " + b"x" * 5000 + b"\r\n", "longer than"),
        (b"250-x\r\n" * 300, "lines"),
    ],
)
def test_malformed_or_endless_replies_raise(data: bytes, match: str) -> None:
    client = ClientConnection()
    client.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        while client.next_reply() is not NEED_DATA:
            pass


def test_reply_limits_are_configurable() -> None:
    client = ClientConnection(max_line_length=600, max_lines=2)
    client.receive_data(b"220-a\r\n220-b\r\n220 c\r\n")
    with pytest.raises(RemoteProtocolError, match="2 lines"):
        client.next_reply()
    with pytest.raises(ValueError):
        ClientConnection(max_line_length=100)


def test_unsolicited_reply_and_421() -> None:
    link = greeted()
    link.client.receive_data(b"250 nobody asked\r\n")
    with pytest.raises(RemoteProtocolError, match="unexpected"):
        link.client.next_reply()
    link = greeted()
    # RFC 5321 section 3.8: a 421 may come at any time and closes the session.
    link.client.receive_data(b"421 4.4.2 timeout\r\n")
    reply = link.client.next_reply()
    assert isinstance(reply, Reply) and reply.code == 421
    assert link.client.state is ClientState.CLOSED
    with pytest.raises(LocalProtocolError, match="closed"):
        link.client.noop()


def test_eof_while_awaiting_a_reply() -> None:
    link = greeted()
    link.client.noop()
    link.client.data_to_send()
    link.client.receive_data(b"250 partial")
    link.client.receive_eof()
    with pytest.raises(RemoteProtocolError, match="closed the connection"):
        link.client.next_reply()
    assert link.client.state is ClientState.CLOSED


def test_refused_banner_allows_only_quit() -> None:
    client = ClientConnection()
    client.receive_data(b"554 5.7.1 go away\r\n")
    reply = client.next_reply()
    assert isinstance(reply, Reply) and client.state is ClientState.REFUSED
    with pytest.raises(LocalProtocolError, match="only QUIT"):
        client.ehlo("client.example")
    client.quit()
    assert client.data_to_send() == b"QUIT\r\n"
    client.receive_data(b"221 bye\r\n")
    client.next_reply()
    assert client.state is ClientState.CLOSED


# ----------------------------------------------------------- misuse


def test_sequencing_misuse() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="banner"):
        client.ehlo("client.example")
    link = Link()
    with pytest.raises(LocalProtocolError, match="HELO or EHLO"):
        link.client.mail("a@example.org")
    with pytest.raises(LocalProtocolError, match="domain name"):
        link.client.ehlo("not a name")
    with pytest.raises(LocalProtocolError, match="domain name"):
        link.client.ehlo("bücher.example")
    link.client.ehlo("[127.0.0.1]")
    link.exchange()
    with pytest.raises(LocalProtocolError, match="without a MAIL"):
        link.client.rcpt("b@example.net")
    with pytest.raises(LocalProtocolError, match="without a MAIL"):
        link.client.data()
    with pytest.raises(LocalProtocolError, match="354"):
        link.client.send_data(b"x")
    link.client.mail("a@example.org")
    with pytest.raises(LocalProtocolError, match="inside a transaction"):
        link.client.mail("a@example.org")
    with pytest.raises(LocalProtocolError, match="recipient"):
        link.client.data()
    with pytest.raises(LocalProtocolError, match="STARTTLS"):
        link.client.starttls()
    link.client.rcpt("b@example.net")
    link.client.data()
    with pytest.raises(LocalProtocolError, match="before the reply to DATA"):
        link.client.noop()
    link.exchange()
    with pytest.raises(LocalProtocolError, match="end_data"):
        link.client.quit()


def test_parameter_and_address_checks() -> None:
    link = greeted(Driver(ProtocolLimits(smtputf8=False, chunking=False, dsn=False)))
    client = link.client
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        client.mail("a@example.org", {"SMTPUTF8": None})
    with pytest.raises(LocalProtocolError, match="DSN"):
        client.mail("a@example.org", {"RET": "HDRS"})
    with pytest.raises(LocalProtocolError, match="BINARYMIME"):
        client.mail("a@example.org", {"BODY": "BINARYMIME"})
    with pytest.raises(LocalProtocolError, match="bad value"):
        client.mail("a@example.org", {"SIZE": "1 2"})
    with pytest.raises(LocalProtocolError, match="keyword"):
        client.mail("a@example.org", {"BAD KEY": None})
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        client.mail("jörg@example.org")
    with pytest.raises(LocalProtocolError, match="sender address"):
        client.mail("no-at-sign")
    with pytest.raises(LocalProtocolError, match="line is"):
        client.vrfy("x" * 600)
    client.mail("", {"X-UNKNOWN": "ok"})  # unknown parameters are the caller's business
    client.rcpt("Postmaster")
    with pytest.raises(LocalProtocolError, match="recipient address"):
        client.rcpt("bad@@example.net")
    with pytest.raises(LocalProtocolError, match="CHUNKING"):
        client.bdat(b"x", last=True)
    with pytest.raises(LocalProtocolError, match="CR, LF or NUL"):
        client.vrfy("a\r\nRSET")


def test_utf8_addresses_with_smtputf8() -> None:
    link = greeted()
    link.client.mail("jörg@bücher.example", {"SMTPUTF8": None, "BODY": "8BITMIME"})
    link.client.rcpt("zoë@example.net")
    replies = link.exchange()
    assert [r.code for r in replies] == [250, 250]
    mail = next(e for e in link.server.events if isinstance(e, Mail))
    assert mail.address == "jörg@bücher.example"


# --------------------------------------------------- the body, by property


@settings(max_examples=150, deadline=None)
@given(
    body=st.binary(max_size=300).map(
        lambda b: b.replace(b"x", b"\r").replace(b"y", b"\n").replace(b"z", b".")
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=8),
    chunked=st.booleans(),
)
def test_body_round_trip_any_chunking(body: bytes, cuts: list[int], chunked: bool) -> None:
    """Dot-stuffing and CRLF normalisation survive any chunking; DATA and BDAT agree."""
    link = greeted()
    client = link.client
    client.mail("a@example.org")
    client.rcpt("b@example.net")
    if not chunked:
        client.data()
    link.exchange()
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    for i, piece in enumerate(pieces):
        if chunked:
            client.bdat(piece, last=i == len(pieces) - 1)
        else:
            client.send_data(piece)
    if not chunked:
        client.end_data()
    replies = link.exchange()
    assert replies[-1].code == 250, replies
    assert link.server.messages == [expected_body(body)]


def test_data_chunk_boundary_cases() -> None:
    link = greeted()
    client = link.client
    client.mail("a@example.org")
    client.rcpt("b@example.net")
    client.data()
    link.exchange()
    for piece in (b".", b"\r", b"\n", b".", b".\r", b"\n.", b"\r\n", b"."):
        client.send_data(piece)
    client.end_data()
    wire = client.data_to_send()
    # The pieces make the lines ".", "..", ".", "." (the last without CRLF).
    assert wire == b"..\r\n...\r\n..\r\n..\r\n.\r\n"
    client.receive_data(link.server.feed(wire))
    assert link.replies()[-1].code == 250
    assert link.server.messages == [b".\r\n..\r\n.\r\n.\r\n"]


# ------------------------------------------------------------- SCRAM


def test_scram_sha_256_rfc7677_test_vector() -> None:
    # RFC 7677 section 3: user "user", password "pencil".
    first = scram_client_first("user", "rOprNGfwEbeRWgbNEkqO")
    assert first == "n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    final, signature = scram_client_final(first, server_first, "pencil")
    assert final == (
        "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    assert base64.b64encode(signature) == b"6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_scram_refuses_a_nonce_it_did_not_start() -> None:
    first = scram_client_first("us=er,x", "abc")
    assert first == "n,,n=us=3Der=2Cx,r=abc"
    with pytest.raises(ValueError, match="nonce"):
        scram_client_final(first, "r=xyz123,s=AAAA,i=4096", "pw")
    with pytest.raises(ValueError, match="iteration"):
        scram_client_final(first, "r=abc123,s=AAAA,i=0", "pw")
