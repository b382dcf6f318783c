"""Pure syntax helpers and reply rendering (RFC 5321 sections 4.1.2, 4.2; RFC 2034)."""

from __future__ import annotations

import ipaddress
import random

import pytest

from ehlo.protocol import (
    Reply,
    SyntaxProblem,
    is_address_literal,
    is_domain,
    parse_address_literal,
    parse_params,
    parse_path,
)
from ehlo.protocol._syntax import split_path


def test_reply_single_and_multi_line() -> None:
    assert Reply(250, "2.0.0", "OK").render() == b"250 2.0.0 OK\r\n"
    assert Reply(250, "2.0.0", "OK").render(False) == b"250 OK\r\n"
    multi = Reply(214, "2.0.0", ["one", "two", "three"])
    assert multi.render() == b"214-2.0.0 one\r\n214-2.0.0 two\r\n214 2.0.0 three\r\n"


def test_reply_validation() -> None:
    with pytest.raises(ValueError):
        Reply(199, None, "x")
    with pytest.raises(ValueError):
        Reply(250, "5.0.0", "class mismatch")
    with pytest.raises(ValueError):
        Reply(250, None, "bad\r\ninjection")
    with pytest.raises(AttributeError):
        Reply(250, None, "x").code = 251  # type: ignore[misc]


def test_reply_parse_round_trip() -> None:
    for reply in (
        Reply(250, "2.1.0", "Sender OK"),
        Reply(550, "5.7.1", ["first line", "second line"]),
        Reply(220, None, "banner text"),
    ):
        assert Reply.parse(reply.render()) == reply


def test_reply_properties() -> None:
    assert Reply(250, None, "x").is_positive
    assert Reply(451, None, "x").is_transient
    assert Reply(550, None, "x").is_permanent
    assert Reply(550, "5.7.1", ["a", "b"]).text == "a b"


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("example.org", True),
        ("a-b.example", True),
        ("x", True),
        ("-a.example", False),
        ("a-.example", False),
        ("a..example", False),
        ("", False),
        ("under_score.example", False),
        ("a" * 64 + ".example", True),  # label length is a policy check, not syntax here
        ("." + "a" * 10, False),
    ],
)
def test_is_domain(text: str, ok: bool) -> None:
    assert is_domain(text) is ok


def test_domain_utf8_only_when_allowed() -> None:
    assert not is_domain("例子.测试")
    assert is_domain("例子.测试", utf8=True)


def test_address_literals() -> None:
    assert parse_address_literal("[192.0.2.1]") == ipaddress.IPv4Address("192.0.2.1")
    assert parse_address_literal("[IPv6:::1]") == ipaddress.IPv6Address("::1")
    assert parse_address_literal("[ipv6:2001:db8::5]") == ipaddress.IPv6Address("2001:db8::5")
    assert parse_address_literal("[tag:abc]") == "tag:abc"
    for bad in ("[256.1.1.1]", "[1.2.3]", "[IPv6:zz::]", "1.2.3.4", "[]", "[1.2.3.4.5]"):
        assert not is_address_literal(bad), bad


def test_parse_path_variants() -> None:
    assert parse_path("<>", sender=True, utf8=False) == ""
    assert parse_path("<a@b.example>", sender=True, utf8=False) == "a@b.example"
    assert parse_path("<@x.example,@y.example:a@b.example>", sender=False, utf8=False) == (
        "a@b.example"
    )
    assert parse_path("<postmaster>", sender=False, utf8=False) == "postmaster"
    with pytest.raises(SyntaxProblem):
        parse_path("<postmaster>", sender=True, utf8=False)
    with pytest.raises(SyntaxProblem):
        parse_path("<>", sender=False, utf8=False)
    with pytest.raises(SyntaxProblem):
        parse_path("<@x.example a@b.example>", sender=False, utf8=False)


def test_path_length_limits() -> None:
    local = "l" * 64
    assert parse_path(f"<{local}@b.example>", sender=True, utf8=False)
    with pytest.raises(SyntaxProblem) as info:
        parse_path(f"<{local}x@b.example>", sender=True, utf8=False)
    assert info.value.reply.enhanced == "5.1.7"
    long_domain = ".".join(["d" * 60] * 5)
    with pytest.raises(SyntaxProblem):
        parse_path(f"<a@{long_domain}>", sender=False, utf8=False)


def test_params() -> None:
    assert parse_params("") == {}
    assert parse_params("size=10 body=8BITMIME SMTPUTF8") == {
        "SIZE": "10",
        "BODY": "8BITMIME",
        "SMTPUTF8": None,
    }
    for bad in ("=1", "-X=1", "K=", "K=a=b", "K_1=2", "A=1 A=2"):
        with pytest.raises(SyntaxProblem):
            parse_params(bad)


@pytest.mark.parametrize(
    ("arg", "prefix", "expected"),
    [
        ("FROM:<a@b.example>", "FROM:", ("<a@b.example>", "")),
        ("from:<a@b.example>", "FROM:", ("<a@b.example>", "")),
        ("FROM: <a@b.example>  SIZE=10 BODY=8BITMIME ", "FROM:",
         ("<a@b.example>", "SIZE=10 BODY=8BITMIME")),
        ('TO:<"x>y"@b.example> NOTIFY=NEVER', "TO:", ('<"x>y"@b.example>', "NOTIFY=NEVER")),
        ('TO:<"x\\">"@b.example>', "TO:", ('<"x\\">"@b.example>', "")),
        ("FROM:a@b.example SIZE=1", "FROM:", ("a@b.example", "SIZE=1")),
    ],
)
def test_split_path(arg: str, prefix: str, expected: tuple[str, str]) -> None:
    assert split_path(arg, prefix) == expected


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("FROM:<a@b.example", "missing '>'"),
        ('FROM:<"a>b@c', "missing '>'"),
        ("FROM:<a@b.example>SIZE=1", "space before parameters"),
        ("FRM:<a@b.example>", "expected FROM:"),
    ],
)
def test_split_path_refusals(arg: str, message: str) -> None:
    with pytest.raises(SyntaxProblem) as caught:
        split_path(arg, "FROM:")
    assert caught.value.reply.code == 501 and message in caught.value.reply.text


def _split_path_by_characters(arg: str, prefix: str) -> tuple[str, str] | None:
    """A character-by-character reference: None where split_path must refuse."""
    if arg[: len(prefix)].upper() != prefix:
        return None
    rest = arg[len(prefix) :].lstrip(" ")
    if not rest.startswith("<"):
        path, _, params = rest.partition(" ")
        return path, params.strip(" ")
    i, in_quotes = 1, False
    while i < len(rest):
        ch = rest[i]
        if in_quotes and ch == "\\":
            i += 2
            continue
        if ch == '"':
            in_quotes = not in_quotes
        elif ch == ">" and not in_quotes:
            path, params = rest[: i + 1], rest[i + 1 :]
            if params and not params.startswith(" "):
                return None
            return path, params.strip(" ")
        i += 1
    return None


def test_split_path_matches_a_character_by_character_reference() -> None:
    rng = random.Random(5321)
    alphabet = 'ab@.<>" \\='
    for _ in range(5000):
        arg = "FROM:<" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        expected = _split_path_by_characters(arg, "FROM:")
        if expected is None:
            with pytest.raises(SyntaxProblem):
                split_path(arg, "FROM:")
        else:
            assert split_path(arg, "FROM:") == expected, arg
