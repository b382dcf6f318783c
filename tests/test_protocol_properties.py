"""Property tests of the protocol core: arbitrary input never breaks it."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ehlo.protocol import Reply

from .engine import Driver

REPLY_LINE = re.compile(rb"^[2-5][0-9]{2}[ -][^\r\n]*$")

SMTP_WORDS = [
    b"EHLO a.example\r\n", b"HELO b.example\r\n", b"MAIL FROM:<a@b.example>\r\n",
    b"RCPT TO:<c@d.example>\r\n", b"DATA\r\n", b"BDAT 3\r\n", b"BDAT 0 LAST\r\n", b"RSET\r\n",
    b"NOOP\r\n", b"QUIT\r\n", b"STARTTLS\r\n", b".\r\n", b"\r\n", b"\n", b"\r", b".", b"..",
    b"x", b"\x00", b"\xff", b"SIZE=5", b" ", b"<", b">", b"VRFY x\r\n", b"HELP\r\n",
]

smtpish = st.lists(
    st.one_of(st.sampled_from(SMTP_WORDS), st.binary(max_size=20)), max_size=40
).map(b"".join)


def well_formed(output: bytes) -> bool:
    if not output:
        return True
    if not output.endswith(b"\r\n"):
        return False
    return all(REPLY_LINE.match(line) for line in output[:-2].split(b"\r\n"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=smtpish, cut=st.integers(min_value=1, max_value=17))
def test_arbitrary_bytes_give_well_formed_replies(data: bytes, cut: int) -> None:
    d = Driver()
    output = d.feed_split(data, cut)
    assert well_formed(output), output


@settings(max_examples=300, deadline=None)
@given(data=smtpish, cut=st.integers(min_value=1, max_value=9))
def test_splitting_never_changes_the_outcome(data: bytes, cut: int) -> None:
    whole = Driver()
    expected = whole.feed(data)
    split = Driver()
    assert split.feed_split(data, cut) == expected
    assert split.messages == whole.messages


def crlf_lines() -> st.SearchStrategy[bytes]:
    line = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    return st.lists(line, max_size=20).map(lambda lines: b"".join(x + b"\r\n" for x in lines))


def dot_stuff(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + x if x.startswith(b".") else x for x in lines)


@settings(max_examples=300, deadline=None)
@given(body=crlf_lines(), cut=st.integers(min_value=1, max_value=50))
def test_dot_stuffing_round_trips_and_data_equals_bdat(body: bytes, cut: int) -> None:
    head = b"EHLO a.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"
    via_data = Driver()
    via_data.feed_split(head + b"DATA\r\n" + dot_stuff(body) + b".\r\n", cut)
    via_bdat = Driver()
    half = len(body) // 2
    via_bdat.feed_split(
        head + b"BDAT %d\r\n" % half + body[:half]
        + b"BDAT %d LAST\r\n" % (len(body) - half) + body[half:],
        cut,
    )
    assert via_data.messages == [body]
    assert via_bdat.messages == [body]


@given(
    code=st.integers(min_value=200, max_value=599),
    lines=st.lists(st.text(st.characters(blacklist_characters="\r\n"), max_size=30),
                   min_size=1, max_size=4),
)
def test_reply_render_parse(code: int, lines: list[str]) -> None:
    reply = Reply(code, None, lines)
    rendered = reply.render()
    assert rendered.count(b"\r\n") == len(lines)
    parsed = Reply.parse(rendered)
    assert parsed.code == code
