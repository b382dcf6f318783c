"""The sans-IO server connection: every command, reply code and state, no sockets."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest

from ehlo import ProtocolLimits
from ehlo.protocol import (
    NEED_DATA,
    PAUSED,
    Bdat,
    DataChunk,
    DataEnd,
    Ehlo,
    Fault,
    Helo,
    LocalProtocolError,
    Mail,
    Rcpt,
    Reply,
    ServerConnection,
    State,
)

from .engine import Driver, codes, greeted

TX = "MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"


def limits(**kw: object) -> ProtocolLimits:
    return dataclasses.replace(ProtocolLimits(), **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- greetings


def test_banner_then_connected() -> None:
    conn = ServerConnection()
    assert conn.state is State.START
    assert conn.next_event() is PAUSED
    conn.send(Reply(220, None, "hi"))
    assert conn.data_to_send() == b"220 hi\r\n"
    assert conn.state is State.CONNECTED
    assert conn.next_event() is NEED_DATA


def test_ehlo_lists_extensions_and_helo_is_one_line() -> None:
    d = Driver()
    out = d.say("EHLO client.example")
    assert out.startswith("250-test\r\n")
    assert "250-PIPELINING\r\n" in out and "250 CHUNKING\r\n" in out
    assert "SIZE 26214400" in out and "8BITMIME" in out and "SMTPUTF8" in out
    assert d.conn.greeting == "EHLO" and d.conn.esmtp
    d2 = Driver()
    assert d2.say("helo old.example") == "250 test\r\n"
    assert d2.conn.greeting == "HELO" and not d2.conn.esmtp


@pytest.mark.parametrize(
    ("verb", "name", "code"),
    [
        ("EHLO", "mx.example", "250"),
        ("EHLO", "[192.0.2.1]", "250"),
        ("EHLO", "mx\x01.example", "501"),
        ("EHLO", "mx.example\x7f", "501"),
        ("HELO", "\x1bmx.example", "501"),
        ("EHLO", "b\u00fccher.example", "250"),  # SMTPUTF8 is offered
        ("EHLO", "b\u00fccher\x01.example", "501"),
        ("EHLO", "b\u00fccher\x7f.example", "501"),
        ("EHLO", "b\u00fccher\u0085.example", "501"),  # a Unicode line break (NEL)
        ("EHLO", "b\u00fccher\u2028.example", "501"),  # LINE SEPARATOR
        ("EHLO", "b\u00fccher\u200b.example", "501"),  # a format character
        ("HELO", "b\u00fccher.example", "501"),  # HELO names are ASCII
    ],
)
def test_greeting_name_with_a_control_character_is_501(verb: str, name: str, code: str) -> None:
    out = Driver().feed(f"{verb} {name}\r\n".encode())
    assert codes(out) == [code]
    if any(c in name for c in "\x01\x1b\x7f"):
        assert b"control characters" in out


def test_verbs_are_case_insensitive() -> None:
    d = Driver()
    assert codes(d.say("eHlO x.example")) == ["250"]
    assert codes(d.say("mail from:<a@b.example>")) == ["250"]
    assert codes(d.say("rCpT To:<c@d.example>")) == ["250"]
    assert codes(d.say("data")) == ["354"]


@pytest.mark.parametrize("line", ["HELO", "EHLO", "EHLO ", "HELO two words"])
def test_greeting_without_single_argument_is_501(line: str) -> None:
    assert Driver().say(line).startswith("501 ")


def test_failed_greeting_leaves_state() -> None:
    d = Driver()
    d.overrides["EHLO"] = Reply(550, "5.7.1", "go away")
    assert codes(d.say("EHLO bad.example")) == ["550"]
    assert d.conn.state is State.CONNECTED and d.conn.greeting is None
    assert d.say("MAIL FROM:<a@b.example>").startswith("503 ")


def test_new_greeting_clears_transaction() -> None:
    d = greeted()
    d.feed(TX.encode())
    assert d.conn.state is State.RCPT
    assert codes(d.say("EHLO again.example")) == ["250"]
    assert d.conn.transaction is None and d.conn.state is State.GREETED
    assert d.say("RCPT TO:<b@example.net>").startswith("503 5.5.1")


# ----------------------------------------------------------------- sequence


@pytest.mark.parametrize(
    ("setup", "line"),
    [
        ("", "MAIL FROM:<a@b.example>"),
        ("", "RCPT TO:<a@b.example>"),
        ("", "DATA"),
        ("EHLO x.example\r\n", "RCPT TO:<a@b.example>"),
        ("EHLO x.example\r\n", "DATA"),
        ("EHLO x.example\r\nMAIL FROM:<a@b.example>\r\n", "DATA"),
        ("EHLO x.example\r\nMAIL FROM:<a@b.example>\r\n", "MAIL FROM:<c@b.example>"),
    ],
)
def test_out_of_sequence_is_503(setup: str, line: str) -> None:
    d = Driver()
    d.feed(setup.encode())
    out = d.say(line)
    assert out.startswith("503 "), out


def test_enhanced_codes_only_after_ehlo() -> None:
    d = Driver()
    d.say("HELO x.example")
    assert d.say("RCPT TO:<a@b.example>") == "503 Need MAIL before RCPT\r\n"
    d2 = greeted()
    assert d2.say("RCPT TO:<a@b.example>") == "503 5.5.1 Need MAIL before RCPT\r\n"


def test_enhanced_codes_can_be_switched_off() -> None:
    d = greeted(limits(enhancedstatuscodes=False))
    assert d.say("RCPT TO:<a@b.example>") == "503 Need MAIL before RCPT\r\n"


def test_rset_clears_transaction_and_keeps_greeting() -> None:
    d = greeted()
    d.feed(TX.encode())
    assert codes(d.say("RSET")) == ["250"]
    assert d.conn.transaction is None and d.conn.state is State.GREETED
    assert codes(d.say("MAIL FROM:<a@b.example>")) == ["250"]
    assert d.say("RSET now").startswith("501 ")


def test_rset_before_greeting_stays_connected() -> None:
    d = Driver()
    assert codes(d.say("RSET")) == ["250"]
    assert d.conn.state is State.CONNECTED


def test_noop_vrfy_help_quit() -> None:
    d = greeted()
    assert codes(d.say("NOOP")) == ["250"]
    assert codes(d.say("NOOP with an argument")) == ["250"]
    assert d.say("VRFY").startswith("501 ")
    events_before = len(d.events)
    d.say("VRFY someone")
    assert type(d.events[events_before]).__name__ == "Vrfy"
    d.say("HELP")
    assert type(d.events[-1]).__name__ == "Help"
    assert d.say("QUIT x").startswith("501 ")
    assert codes(d.say("QUIT")) == ["221"]
    assert d.conn.closing
    assert d.conn.next_event() is PAUSED


def test_unknown_and_unimplemented_verbs() -> None:
    d = greeted()
    assert d.say("FOO bar").startswith("500 5.5.2")
    assert d.say("EXPN list").startswith("502 5.5.1")
    assert d.say("AUTH PLAIN x").startswith("502 5.5.1")
    assert d.say("").startswith("500 ")


def test_send_without_pending_command_is_local_error() -> None:
    d = greeted()
    with pytest.raises(LocalProtocolError):
        d.conn.send(Reply(250, None, "stray"))


def test_state_advances_on_reply_not_on_command() -> None:
    d = greeted()
    d.overrides["MAIL"] = Reply(550, "5.7.1", "no")
    assert codes(d.say("MAIL FROM:<a@b.example>")) == ["550"]
    assert d.conn.state is State.GREETED
    d.overrides.pop("MAIL")
    d.say("MAIL FROM:<a@b.example>")
    d.overrides["RCPT"] = Reply(550, "5.1.1", "unknown")
    d.say("RCPT TO:<x@y.example>")
    assert d.conn.state is State.MAIL
    assert d.say("DATA").startswith("503 ")
    d.overrides["DATA"] = Reply(554, "5.7.1", "no data")
    d.overrides.pop("RCPT")
    d.say("RCPT TO:<x@y.example>")
    assert codes(d.say("DATA")) == ["554"]
    assert d.conn.state is State.RCPT


def test_421_closes() -> None:
    d = greeted()
    d.overrides["MAIL"] = Reply(421, "4.3.2", "shutting down")
    assert codes(d.say("MAIL FROM:<a@b.example>")) == ["421"]
    assert d.conn.closing


def test_554_banner_only_quit_accepted() -> None:
    conn = ServerConnection()
    conn.send(Reply(554, None, "no service"))
    d = Driver()
    d.conn = conn
    conn.data_to_send()
    assert d.say("EHLO x.example").startswith("503 ")
    assert d.say("FOO").startswith("503 ")
    assert codes(d.say("QUIT")) == ["221"]


# ---------------------------------------------------------------- MAIL/RCPT


def test_mail_and_rcpt_events_carry_addresses_and_params() -> None:
    d = greeted()
    d.say("MAIL FROM:<@relay.example:a@b.example> SIZE=100 BODY=8BITMIME")
    mail = d.events[-1]
    assert isinstance(mail, Mail)
    assert mail.address == "a@b.example"  # source route dropped
    assert mail.params == {"SIZE": "100", "BODY": "8BITMIME"}
    assert d.conn.transaction is not None
    assert d.conn.transaction.declared_size == 100
    assert d.conn.transaction.body == "8BITMIME"
    d.say("RCPT TO:<@h1.example,@h2.example:c@d.example>")
    rcpt = d.events[-1]
    assert isinstance(rcpt, Rcpt) and rcpt.address == "c@d.example"
    assert d.conn.transaction.rcpts == ["c@d.example"]


def test_null_reverse_path_and_postmaster() -> None:
    d = greeted()
    assert codes(d.say("MAIL FROM:<>")) == ["250"]
    assert isinstance(d.events[-1], Mail) and d.events[-1].address == ""
    assert codes(d.say("RCPT TO:<Postmaster>")) == ["250"]
    assert d.say("RCPT TO:<>").startswith("501 ")


def test_space_after_colon_is_tolerated() -> None:
    d = greeted()
    assert codes(d.say("MAIL FROM: <a@b.example>")) == ["250"]


@pytest.mark.parametrize(
    "arg",
    [
        "FROM:a@b.example",
        "FROM:<a@b.example",
        "FROM:<a b@c.example>",
        "FROM:<a@>",
        "FROM:<@b.example>",
        "FROM:<a..b@c.example>",
        "FROM:<a@-b.example>",
        "FROM:<a@[300.1.1.1]>",
        "FROM:<a@b.example>SIZE=1",
        "TO:<a@b.example>",
        "FROM:<" + "x" * 65 + "@b.example>",
    ],
)
def test_bad_mail_syntax_is_501(arg: str) -> None:
    out = greeted().say("MAIL " + arg)
    assert out.startswith("501 "), out


@pytest.mark.parametrize(
    "address",
    [
        '"quoted local"@example.org',
        '"with\\"escape"@example.org',
        "user@[192.0.2.1]",
        "user@[IPv6:2001:db8::1]",
        "user@[x-tag:content]",
        "a.b+c@sub.example.org",
    ],
)
def test_valid_mailboxes(address: str) -> None:
    d = greeted()
    assert codes(d.say(f"MAIL FROM:<{address}>")) == ["250"]
    assert codes(d.say(f"RCPT TO:<{address}>")) == ["250"]


def test_unknown_parameter_is_555_and_helo_session_accepts_none() -> None:
    d = greeted()
    assert d.say("MAIL FROM:<a@b.example> XFOO=1").startswith("555 5.5.4")
    h = greeted(verb="HELO")
    assert h.say("MAIL FROM:<a@b.example> SIZE=10").startswith("555 ")
    assert h.say("MAIL FROM:<a@b.example> BODY=8BITMIME").startswith("555 ")
    h.say("MAIL FROM:<a@b.example>")
    assert h.say("RCPT TO:<c@d.example> NOTIFY=NEVER").startswith("555 ")


def test_size_parameter() -> None:
    d = greeted(limits(max_message_size=1000))
    assert d.say("MAIL FROM:<a@b.example> SIZE=1001").startswith("552 5.3.4")
    assert d.say("MAIL FROM:<a@b.example> SIZE=abc").startswith("501 ")
    assert codes(d.say("MAIL FROM:<a@b.example> SIZE=1000")) == ["250"]


def test_body_parameter_values() -> None:
    d = greeted()
    assert d.say("MAIL FROM:<a@b.example> BODY=BINARYMIME").startswith("501 ")
    assert codes(d.say("MAIL FROM:<a@b.example> BODY=7bit")) == ["250"]


def test_duplicate_parameter_is_501() -> None:
    assert greeted().say("MAIL FROM:<a@b.example> SIZE=1 SIZE=2").startswith("501 ")


def test_smtputf8_addresses() -> None:
    d = greeted()
    assert d.say("MAIL FROM:<用户@例子.测试>").startswith("553 5.6.7")
    assert codes(d.say("MAIL FROM:<用户@例子.测试> SMTPUTF8")) == ["250"]
    assert codes(d.say("RCPT TO:<pelé@exemplo.br>")) == ["250"]
    assert d.conn.transaction is not None and d.conn.transaction.smtputf8
    h = greeted(verb="HELO")
    assert h.say("MAIL FROM:<用户@例子.测试> SMTPUTF8").startswith("555 ")


def test_smtputf8_off_means_no_utf8() -> None:
    d = greeted(limits(smtputf8=False))
    assert "SMTPUTF8" not in "".join(d.conn.extension_lines())
    assert d.say("MAIL FROM:<用户@例子.测试> SMTPUTF8").startswith("555 ")


def test_recipient_limit_gives_452() -> None:
    d = greeted(limits(max_recipients=3))
    d.say("MAIL FROM:<a@b.example>")
    for i in range(3):
        assert codes(d.say(f"RCPT TO:<r{i}@b.example>")) == ["250"]
    assert d.say("RCPT TO:<r4@b.example>").startswith("452 4.5.3")
    assert codes(d.say("DATA")) == ["354"]


# -------------------------------------------------------------------- lines


def test_command_line_limit() -> None:
    d = greeted(limits(max_command_line=64))
    assert d.say("NOOP " + "x" * 57).startswith("250")  # 62 + CRLF = 64
    assert d.say("NOOP " + "x" * 58).startswith("500 5.5.2")
    # MAIL may carry parameters beyond the base limit in an ESMTP session.
    assert codes(d.say("MAIL FROM:<" + "a" * 40 + "@b.example> SIZE=10")) == ["250"]


def test_overlong_line_answered_once_and_swallowed() -> None:
    d = greeted()
    out = d.feed_split(b"X" * 100_000, 4096)
    assert codes(out) == ["500"]
    assert d.conn.buffered < 5000  # never buffered whole
    out = d.feed(b"YYY\r\nNOOP\r\n")
    assert codes(out) == ["250"]


def test_bare_lf_ends_a_command_but_cr_nul_and_bad_utf8_do_not_pass() -> None:
    d = greeted()
    assert codes(d.feed(b"NOOP\n")) == ["250"]
    assert d.feed(b"NO\rOP\r\n").startswith(b"500 ")
    assert d.feed(b"NOOP \x00\r\n").startswith(b"500 ")
    assert d.feed(b"NOOP \xff\xfe\r\n").startswith(b"500 ")


def test_too_many_errors_closes_with_421() -> None:
    d = greeted(limits(max_errors=3))
    out = d.feed(b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n")
    assert codes(out) == ["500", "500", "500", "421"]
    assert d.conn.closing


# --------------------------------------------------------------------- DATA


def data_session(lim: ProtocolLimits | None = None) -> Driver:
    d = greeted(lim)
    d.feed(TX.encode())
    assert codes(d.say("DATA")) == ["354"]
    return d


def test_data_dot_unstuffing_and_end() -> None:
    d = data_session()
    out = d.feed(b"Subject: t\r\n\r\n..leading dot\r\n.\r\n")
    assert codes(out) == ["250"]
    assert d.messages == [b"Subject: t\r\n\r\n.leading dot\r\n"]
    assert d.conn.state is State.GREETED and d.conn.transaction is None


def test_empty_message() -> None:
    d = data_session()
    d.feed(b".\r\n")
    assert d.messages == [b""]


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"])
def test_only_crlf_dot_crlf_ends_data(fake_end: bytes) -> None:
    d = data_session()
    smuggled = b"line" + fake_end + b"MAIL FROM:<evil@x.example>\r\n"
    out = d.feed(smuggled)
    assert codes(out) == []  # still in DATA
    assert d.conn.state is State.DATA
    out = d.feed(b"tail\r\n.\r\n")
    assert codes(out) == ["250"]
    assert len(d.messages) == 1
    assert b"MAIL FROM:<evil@x.example>" in d.messages[0]


def test_bare_newlines_normalised_by_default() -> None:
    d = data_session()
    d.feed(b"a\nb\rc\r\n\n\r\r\n.\r\n")
    assert d.messages == [b"a\r\nb\r\nc\r\n\r\n\r\n\r\n"]


def test_bare_newlines_rejected_when_configured() -> None:
    d = data_session(limits(bare_newline="reject"))
    out = d.feed(b"a\nb\r\n.\r\n")
    assert out.startswith(b"554 5.6.0")
    assert d.messages == []
    fault = [e for e in d.events if isinstance(e, Fault)][-1]
    assert fault.aborted and fault.verb == "DATA"
    assert d.conn.state is State.GREETED
    assert codes(d.say("MAIL FROM:<a@b.example>")) == ["250"]


@pytest.mark.parametrize("seed", range(60))
def test_bare_newline_detection_matches_a_regular_expression(seed: int) -> None:
    # Bodies of CRs, LFs and CRLFs in random places, fed in random pieces:
    # refused (or rewritten) exactly when a CR or LF travels alone.
    rng = random.Random(seed)
    tokens = [b"ab", b"\r", b"\n", b"\r\n", b"\r\n", b"\n\r", b"\r\r\n", b"x" * 300]
    weights = [6, 1, 1, 12, 12, 1, 1, 1] if seed % 2 else [1, 0, 0, 1, 1, 0, 0, 1]
    body = b"".join(rng.choices(tokens, weights, k=rng.randrange(1, 400))) + b"\r\n"
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", body) is not None
    for policy in ("reject", "normalize"):
        d = data_session(limits(bare_newline=policy, max_text_line=0))
        out = d.feed_split(body + b".\r\n", rng.randrange(1, 700))
        if policy == "reject" and bare:
            assert out.startswith(b"554 5.6.0") and d.messages == []
        else:
            assert codes(out) == ["250"]
            assert d.messages == [re.sub(rb"\r\n|\r|\n", b"\r\n", body)]


def test_text_line_limit() -> None:
    d = data_session(limits(max_text_line=100))
    d.feed(b"x" * 98 + b"\r\n")
    out = d.feed(b"y" * 99 + b"\r\n.\r\n")
    assert out.startswith(b"554 5.6.0")
    assert d.messages == []


def test_text_line_limit_across_reads() -> None:
    d = data_session(limits(max_text_line=100))
    out = d.feed_split(b"z" * 150 + b"\r\n.\r\n", 7)
    assert out.startswith(b"554 ")


@pytest.mark.parametrize("seed", range(40))
def test_text_line_limit_matches_a_line_by_line_reading(seed: int) -> None:
    # Bodies of many lines near the limit, some dot-stuffed, fed in random
    # pieces: accepted exactly when no wire line (dot included) exceeds 98
    # octets, and unstuffed exactly.
    rng = random.Random(seed)
    lines = [  # as sent: a line starting with a dot gets one more (RFC 5321 4.5.2)
        (b".." if rng.random() < 0.2 else b"") + b"w" * rng.choice([0, 1, 40, 95, 96, 97, 98])
        for _ in range(rng.randrange(1, 60))
    ]
    if seed % 3 == 0:
        lines[rng.randrange(len(lines))] = b"v" * 99
    wire = b"".join(line + b"\r\n" for line in lines)
    d = data_session(limits(max_text_line=100))
    stream, pos, out = wire + b".\r\n", 0, b""
    while pos < len(stream):
        step = rng.randrange(1, 400)
        out += d.feed(stream[pos : pos + step])
        pos += step
    if max(map(len, lines)) > 98:
        assert out.startswith(b"554 5.6.0")
        assert d.messages == []
    else:
        assert codes(out) == ["250"]
        assert d.messages == [b"".join(line.removeprefix(b".") + b"\r\n" for line in lines)]


def test_text_line_limit_off() -> None:
    d = data_session(limits(max_text_line=0))
    d.feed(b"z" * 200_000 + b"\r\n.\r\n")
    assert d.messages == [b"z" * 200_000 + b"\r\n"]


def test_long_line_streams_without_buffering() -> None:
    d = data_session(limits(max_text_line=0))
    for _ in range(20):
        d.feed(b"q" * 50_000)
        assert d.conn.buffered < 70_000
    d.feed(b"\r\n.\r\n")
    assert d.messages == [b"q" * 1_000_000 + b"\r\n"]


def test_body_over_size_limit_is_swallowed_then_552() -> None:
    d = data_session(limits(max_message_size=1000))
    out = d.feed_split(b"a" * 50 + b"\r\n" + (b"b" * 78 + b"\r\n") * 100, 333)
    assert out == b""
    out = d.feed(b".\r\n")
    assert out.startswith(b"552 5.3.4")
    assert d.messages == []
    chunks = sum(len(e.data) for e in d.events if isinstance(e, DataChunk))
    assert chunks <= 1000
    assert codes(d.say("NOOP")) == ["250"]


def test_data_with_argument_is_501() -> None:
    d = greeted()
    d.feed(TX.encode())
    assert d.say("DATA now").startswith("501 ")


def test_data_end_reply_failure_clears_transaction() -> None:
    d = data_session()
    d.overrides["DATA-END"] = Reply(451, "4.3.0", "try later")
    assert codes(d.feed(b"x\r\n.\r\n")) == ["451"]
    assert d.conn.transaction is None and d.conn.state is State.GREETED


# --------------------------------------------------------------------- BDAT


def test_bdat_chunks() -> None:
    d = greeted()
    d.feed(TX.encode())
    out = d.feed(b"BDAT 5\r\nHelloBDAT 7 LAST\r\n, world")
    assert codes(out) == ["250", "250"]
    assert d.messages == [b"Hello, world"]
    bdats = [e for e in d.events if isinstance(e, Bdat)]
    assert [(b.size, b.last, b.first) for b in bdats] == [(5, False, True), (7, True, False)]
    ends = [e for e in d.events if isinstance(e, DataEnd)]
    assert [(e.last, e.size) for e in ends] == [(False, 5), (True, 12)]


def test_bdat_zero_last_and_binary_bytes_untouched() -> None:
    d = greeted()
    d.feed(TX.encode())
    body = b"a\nb\r.\r\n.\r\n\x00\xff"
    d.feed(b"BDAT %d\r\n" % len(body) + body + b"BDAT 0 LAST\r\n")
    assert d.messages == [body]


def test_data_after_bdat_is_503_and_mail_during_bdat_is_503() -> None:
    d = greeted()
    d.feed(TX.encode())
    d.feed(b"BDAT 2\r\nhi")
    assert d.say("DATA").startswith("503 ")
    assert d.say("MAIL FROM:<a@b.example>").startswith("503 ")
    assert codes(d.say("RSET")) == ["250"]
    assert d.conn.state is State.GREETED


def test_bdat_out_of_sequence_swallows_the_chunk() -> None:
    d = greeted()
    out = d.feed(b"BDAT 12\r\nNOOP\r\nNOOP\r\nNOOP\r\n")
    assert codes(out) == ["503", "250"]  # 12 octets swallowed, the last NOOP runs


def test_bdat_not_offered_after_helo_or_when_disabled() -> None:
    assert greeted(verb="HELO").say("BDAT 1 LAST").startswith("502 ")
    assert "CHUNKING" not in greeted(limits(chunking=False)).conn.extension_lines()
    assert greeted(limits(chunking=False)).say("BDAT 1 LAST").startswith("502 ")


def test_bdat_bad_syntax() -> None:
    d = greeted()
    d.feed(TX.encode())
    assert d.say("BDAT x").startswith("501 ")
    assert d.say("BDAT 1 LASTX").startswith("501 ")
    assert d.say("BDAT").startswith("501 ")


def test_bdat_over_size_limit() -> None:
    d = greeted(limits(max_message_size=10))
    d.feed(TX.encode())
    out = d.feed(b"BDAT 8\r\n12345678BDAT 8 LAST\r\n12345678")
    assert codes(out) == ["250", "552"]
    assert d.messages == []
    assert d.conn.state is State.GREETED


# ----------------------------------------------------------------- STARTTLS


def test_starttls_discards_pipelined_plaintext() -> None:
    d = Driver(limits(starttls=True))
    d.say("EHLO x.example")
    assert "STARTTLS" in d.conn.extension_lines()
    out = d.feed(b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n")
    assert codes(out) == ["220"]
    assert d.conn.state is State.TLS_PENDING
    assert d.conn.discarded_after_starttls == len(b"MAIL FROM:<evil@x.example>\r\n")
    d.conn.receive_data(b"RSET\r\n")  # still before the handshake: dropped
    assert d.conn.next_event() is PAUSED
    d.conn.tls_started()
    assert d.conn.greeting is None and d.conn.state is State.CONNECTED
    assert "STARTTLS" not in d.conn.extension_lines()
    assert d.say("MAIL FROM:<a@b.example>").startswith("503 ")
    d.say("EHLO x.example")
    assert d.say("STARTTLS").startswith("503 ")


def test_starttls_requires_ehlo_and_offer() -> None:
    d = Driver(limits(starttls=True))
    assert d.say("STARTTLS").startswith("503 ")
    assert greeted().say("STARTTLS").startswith("502 ")
    d2 = Driver(limits(starttls=True))
    d2.say("EHLO x.example")
    assert d2.say("STARTTLS now").startswith("501 ")


def test_tls_started_out_of_order_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        greeted().conn.tls_started()


# ---------------------------------------------------------------- pipelining


def test_pipelined_commands_answered_in_order() -> None:
    d = Driver()
    out = d.feed(
        b"EHLO x.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
        b"RCPT TO:<bad>\r\nRCPT TO:<e@f.example>\r\nDATA\r\nbody\r\n.\r\nQUIT\r\n"
    )
    assert codes(out) == ["250", "250", "250", "501", "250", "354", "250", "221"]
    assert d.messages == [b"body\r\n"]


def test_pending_command_pauses_the_rest() -> None:
    conn = ServerConnection()
    conn.send(Reply(220, None, "hi"))
    conn.receive_data(b"EHLO a.example\r\nNOOP\r\n")
    event = conn.next_event()
    assert isinstance(event, Ehlo)
    assert conn.next_event() is PAUSED
    assert conn.awaiting_reply is event
    conn.send(Reply(250, None, "ok"))
    assert type(conn.next_event()).__name__ == "Noop"


EXCHANGE = (
    b"EHLO client.example\r\nMAIL FROM:<a@b.example> SIZE=40\r\nRCPT TO:<c@d.example>\r\n"
    b"DATA\r\nSubject: split\r\n\r\n..x\r\nline\n.\n\r\n.\r\n"
    b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 6\r\nchunk1BDAT 3 LAST\r\nend"
    b"HELO again.example\r\nNOOP\r\nQUIT\r\n"
)


def test_every_split_gives_same_result() -> None:
    whole = Driver()
    expected = whole.feed(EXCHANGE)
    assert codes(expected) == ["250"] * 3 + ["354"] + ["250"] * 7 + ["221"]
    for size in range(1, 40):
        d = Driver()
        assert d.feed_split(EXCHANGE, size) == expected, size
        assert d.messages == whole.messages


def test_every_single_cut_point_gives_same_result() -> None:
    whole = Driver()
    expected = whole.feed(EXCHANGE)
    for cut in range(1, len(EXCHANGE)):
        d = Driver()
        out = d.feed(EXCHANGE[:cut]) + d.feed(EXCHANGE[cut:])
        assert out == expected, cut
        assert d.messages == whole.messages, cut


def test_helo_event_types() -> None:
    d = Driver()
    d.say("HELO a.example")
    assert isinstance(d.events[0], Helo) and d.events[0].name == "a.example"
