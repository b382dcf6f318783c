"""The sans-IO core's side of AUTH (RFC 4954) and of pipelining discipline (RFC 2920).

No sockets: the AUTH command's sequencing, the 334 continuation state, line
lengths, and which command groups count as pipelining violations.
"""

from __future__ import annotations

import dataclasses

import pytest

from ehlo import ProtocolLimits
from ehlo.protocol import Auth, AuthResponse, Command, Mail, Reply, State

from .engine import Driver, codes


class AuthDriver(Driver):
    """Answers AUTH with one 334, then 235 for "good" and 535 otherwise."""

    def reply_for(self, event: Command) -> Reply:
        if isinstance(event, Auth):
            if event.initial is None:
                return Reply(334, None, "")
            return Reply(235, "2.7.0", "ok") if event.initial == "good" else Reply(
                535, "5.7.8", "no")
        if isinstance(event, AuthResponse):
            if event.line == "*":
                return Reply(501, "5.0.0", "cancelled")
            return Reply(235, "2.7.0", "ok") if event.line == "good" else Reply(
                535, "5.7.8", "no")
        return super().reply_for(event)


def auth_limits(**kw: object) -> ProtocolLimits:
    base = ProtocolLimits(auth_mechanisms=("PLAIN", "LOGIN"), starttls=True)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def tls_greeted(**kw: object) -> AuthDriver:
    d = AuthDriver(auth_limits(**kw))
    d.conn.tls_active = True
    d.say("EHLO client.example")
    return d


def test_auth_offered_only_with_tls_unless_plaintext_allowed() -> None:
    d = AuthDriver(auth_limits())
    assert "AUTH" not in d.say("EHLO c.example")
    # RFC 4954 section 6: 538 5.7.11 for AUTH over a clear channel.
    assert d.say("AUTH PLAIN good").startswith("538 5.7.11")
    assert "250-AUTH PLAIN LOGIN" in tls_greeted().feed(b"EHLO again.example\r\n").decode()
    plain = AuthDriver(auth_limits(auth_plaintext=True))
    assert "250-AUTH PLAIN LOGIN" in plain.say("EHLO c.example")
    assert plain.say("AUTH PLAIN good").startswith("235")


def test_continuation_lines_are_responses_not_commands() -> None:
    d = tls_greeted()
    assert d.say("AUTH LOGIN") == "334 \r\n"
    assert d.conn.state is State.AUTH
    # "QUIT" here is a SASL response (bad credentials), not a command.
    assert codes(d.say("QUIT")) == ["535"]
    assert d.events[-1] == AuthResponse("QUIT")
    assert d.conn.state is State.GREETED and not d.conn.authenticated
    assert d.say("AUTH LOGIN") == "334 \r\n"
    assert codes(d.say("good")) == ["235"]
    assert d.conn.authenticated
    # RFC 4954 section 4: one successful AUTH per session.
    assert d.say("AUTH PLAIN good").startswith("503 5.5.1")


def test_cancel_and_unknown_mechanism() -> None:
    d = tls_greeted()
    assert d.say("AUTH PLAIN") == "334 \r\n"
    assert d.say("*").startswith("501 5.0.0")
    assert d.say("AUTH CRAM-MD5").startswith("504 5.5.4")
    assert d.say("AUTH").startswith("501 5.5.4")
    assert d.say("AUTH PLAIN a b").startswith("501 5.5.4")
    assert d.say("auth plain good").startswith("235")


def test_auth_refused_in_a_transaction_and_before_ehlo() -> None:
    d = AuthDriver(auth_limits())
    d.conn.tls_active = True
    assert d.say("AUTH PLAIN good").startswith("503")
    d.say("EHLO c.example")
    d.say("MAIL FROM:<a@example.org>")
    assert d.say("AUTH PLAIN good").startswith("503 5.5.1")
    d.say("RSET")
    assert d.say("AUTH PLAIN good").startswith("235")


def test_auth_lines_may_be_12288_octets_and_no_more() -> None:
    d = tls_greeted()
    initial = "A" * (12288 - len("AUTH PLAIN \r\n"))
    assert codes(d.say(f"AUTH PLAIN {initial}")) == ["535"]
    assert codes(d.say(f"AUTH PLAIN {initial}A")) == ["500"]
    assert d.say("AUTH LOGIN") == "334 \r\n"
    assert codes(d.say("B" * 12286)) == ["535"]
    assert d.say("AUTH LOGIN") == "334 \r\n"
    assert codes(d.say("B" * 12287)) == ["500"]
    assert d.conn.state is State.GREETED
    # A response line without end is dropped as it arrives, not buffered.
    assert d.say("AUTH LOGIN") == "334 \r\n"
    out = d.feed(b"C" * 20000)
    assert codes(out) == ["500"] and d.conn.buffered == 0
    d.feed(b"C" * 20000 + b"\r\n")
    assert codes(d.say("NOOP")) == ["250"]


def test_auth_mail_parameter_syntax() -> None:
    d = tls_greeted()
    assert codes(d.say("MAIL FROM:<a@example.org> AUTH=<>")) == ["250"]
    d.say("RSET")
    assert codes(d.say("MAIL FROM:<a@example.org> AUTH=a+2Bb@example.org")) == ["250"]
    mail = [e for e in d.events if isinstance(e, Mail)][-1]
    assert mail.params == {"AUTH": "a+2Bb@example.org"}
    d.say("RSET")
    # RFC 3461 section 4: "+" must start a hex escape, "=" is not an xchar.
    assert d.say("MAIL FROM:<a@example.org> AUTH=a+b").startswith("501 5.5.4")
    assert d.say("MAIL FROM:<a@example.org> AUTH=a=b").startswith("501 5.5.4")
    assert d.say("MAIL FROM:<a@example.org> AUTH").startswith("501 5.5.4")


@pytest.mark.parametrize(
    ("first", "group", "violation"),
    [
        # EHLO must end its group (RFC 2920 section 3.1).
        (b"", b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n", "EHLO"),
        (b"", b"HELO c.example\r\nMAIL FROM:<a@example.org>\r\n", "HELO"),
        # No PIPELINING offered after HELO: any group is a violation.
        (b"HELO c.example\r\n", b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n",
         "MAIL"),
        # NOOP must end its group too, even with PIPELINING.
        (b"EHLO c.example\r\n", b"NOOP\r\nMAIL FROM:<a@example.org>\r\n", "NOOP"),
        # One command at a time is always fine.
        (b"EHLO c.example\r\n", b"MAIL FROM:<a@example.org>\r\n", None),
        # QUIT may be followed by anything: nothing after it is read.
        (b"EHLO c.example\r\n", b"QUIT\r\nNOOP\r\n", None),
    ],
)
def test_pipelining_violations(first: bytes, group: bytes, violation: str | None) -> None:
    d = Driver()
    if first:
        d.feed(first)
    d.feed(group)
    assert d.conn.pipelining_violation == violation


def test_allowed_groups_are_not_violations() -> None:
    d = Driver()
    d.feed(b"EHLO c.example\r\n")
    d.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>"
           b"\r\nDATA\r\n")
    d.feed(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert d.conn.pipelining_violation is None
    assert d.messages == [b"Subject: x\r\n\r\nbody\r\n"]
    d2 = Driver()
    d2.feed(b"EHLO c.example\r\n")
    d2.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\nSubject: x\r\n")
    assert d2.conn.pipelining_violation == "DATA"
