"""``ehlo send`` and ``ehlo probe``: the client's command-line surface.

This module owns the two subcommands (their argparse definitions, registered
into the main ``ehlo`` parser by :func:`add_client_commands`), turning options
into library calls (:func:`~ehlo.client.compose.compose_message` builds the
message, :class:`~ehlo.client.SMTPClient` or MX routing sends it,
:func:`~ehlo.client.probe.run_probe` probes), the swaks-style transcript with
secrets redacted, the probe report rendered as text or JSON, and the exit
codes. Every failure reaches the user as one line ``ehlo: error: ...`` on
stderr, never a traceback. :func:`main` runs a parser with just these two
commands.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import ipaddress
import json
import os
import ssl
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, NoReturn

from .._net import format_hostport, parse_hostport
from ..protocol import Reply
from ..protocol._syntax import is_domain
from ._client import (
    TLS_MODES,
    TLS_REQUIRED,
    SMTPClient,
    Timeouts,
    TLSInfo,
    client_ssl_context,
)
from ._errors import (
    AuthFailed,
    ConnectionFailed,
    DataRefused,
    MessageNotSupported,
    NoRoute,
    OptionNotSupported,
    RecipientsRefused,
    SenderRefused,
    ServiceRefused,
    SMTPClientError,
    TLSFailed,
)
from .compose import ComposedMessage, ComposeError, UnreadableFile, compose_message
from .probe import ProbeReport, explain_extension, octets_text, reply_text, run_probe

if TYPE_CHECKING:  # routing brings dnspython: imported when a command needs it
    from .routing import DeliveryResult, MailHost

__all__ = ["EXIT_CODES", "add_client_commands", "main"]

PROG = "ehlo"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_TLS = 4
EXIT_AUTH = 5
EXIT_SENDER = 6
EXIT_RECIPIENTS = 7
EXIT_DATA = 8
EXIT_ROUTE = 9

EXIT_CODES = {
    EXIT_OK: "the message was accepted for every recipient",
    EXIT_ERROR: "a local error (a file that cannot be read, an unexpected failure)",
    EXIT_USAGE: "a usage error (bad option or address), or an option the server cannot"
    " honour, found before sending (--bdat when CHUNKING is not offered)",
    EXIT_CONNECTION: "connection: cannot connect, timeout, connection lost, protocol"
    " error, or the server refused the session (banner or greeting)",
    EXIT_TLS: "TLS: required but not offered, refused, handshake failure, or an untrusted"
    " certificate under --tls verify or implicit",
    EXIT_AUTH: "AUTH: not offered, no common mechanism, or credentials refused",
    EXIT_SENDER: "sender refused (MAIL FROM)",
    EXIT_RECIPIENTS: "recipients refused (one or more RCPT TO; the others got the message)",
    EXIT_DATA: "message refused (DATA, BDAT or the final reply), or found unsendable"
    " before sending (needs SMTPUTF8 or 8BITMIME, over SIZE, a line over 998 octets)",
    EXIT_ROUTE: "no route: null MX (RFC 7505), no such domain, no MX host with an"
    " address, or DNS failure",
}

_ERROR_EXIT: tuple[tuple[type[SMTPClientError], int], ...] = (
    (NoRoute, EXIT_ROUTE),
    (OptionNotSupported, EXIT_USAGE),
    (TLSFailed, EXIT_TLS),
    (AuthFailed, EXIT_AUTH),
    (SenderRefused, EXIT_SENDER),
    (RecipientsRefused, EXIT_RECIPIENTS),
    (DataRefused, EXIT_DATA),
    (MessageNotSupported, EXIT_DATA),
    (ServiceRefused, EXIT_CONNECTION),
    (ConnectionFailed, EXIT_CONNECTION),
)

PASSWORD_ENV = "EHLO_AUTH_PASSWORD"


class UsageError(Exception):
    """A bad option value: one line, exit status 2."""


class LocalError(Exception):
    """A local failure (a file that cannot be read): one line, exit status 1."""


def exit_code(exc: SMTPClientError) -> int:
    """The exit status for a client failure."""
    for kind, code in _ERROR_EXIT:
        if isinstance(exc, kind):
            return code
    return EXIT_ERROR


# ------------------------------------------------------------------ output

# C0 and C1 controls (but tab) in server text would drive the terminal.
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if c != 0x09}


def _safe(text: str) -> str:
    return text.translate(_CONTROLS)


def _error(message: str) -> None:
    print(f"{PROG}: error: {_safe(' '.join(message.split()))}", file=sys.stderr)


def _text_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="replace")


def _transcript_line(kind: str, text: str, tls: bool) -> None:
    """swaks's notation: ``===`` info, `` ->`` sent, ``<- `` received, ``~`` under TLS."""
    prefix = {
        "info": "===",
        "send": " ~>" if tls else " ->",
        "recv": "<~ " if tls else "<- ",
        "error": "***",
    }.get(kind, "   ")
    print(f"{prefix} {_safe(text)}", flush=True)


# ----------------------------------------------------------------- parsing


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def parse_server(text: str, default_port: int) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or a bare IPv6 address."""
    try:
        host, port = parse_hostport(text, default_port)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not host:
        raise UsageError(f"expected HOST[:PORT], got {text!r}")
    return host, port


def _check_address(option: str, address: str, *, sender: bool) -> None:
    from ..protocol import SyntaxProblem, parse_path

    if not sender and address.lower() == "postmaster":
        return
    try:
        parse_path(f"<{address}>", sender=sender, utf8=not address.isascii())
    except SyntaxProblem as problem:
        raise UsageError(f"{option} {address!r}: {problem.reply.text}") from None


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    name = name.strip()
    # RFC 5322 section 2.2: field-name = 1*(%d33-57 / %d59-126)
    if not sep or not name or any(not 33 <= ord(c) <= 126 or c == ":" for c in name):
        raise UsageError(f"--header: expected 'Name: value', got {text!r}")
    if any(c in value for c in "\r\n\0"):
        raise UsageError("--header: the value must be one line")
    return name, value.strip()


# -------------------------------------------------------------------- send


def _compose(args: argparse.Namespace) -> ComposedMessage:
    """The message from the options: headers, the body (a file or stdin), attachments."""
    body: str | IO[bytes] | None = args.body
    if body == "-":
        body = sys.stdin.buffer
    try:
        return compose_message(
            sender=args.sender,
            to=args.to,
            subject=args.subject,
            headers=[_header(text) for text in args.header or ()],
            body_file=body,
            attachments=args.attach or (),
        )
    except UnreadableFile as exc:
        option = "--body" if exc.role == "body" else "--attach"
        raise LocalError(f"{option} {exc.name}: {exc.reason}") from None
    except ComposeError as exc:
        raise UsageError(f"--header: {exc}") from None


def _password(args: argparse.Namespace) -> str:
    password = os.environ.get(PASSWORD_ENV)
    if password is not None:
        return password
    if not sys.stdin.isatty():
        raise UsageError(f"--auth {args.auth}: set {PASSWORD_ENV} (no terminal to ask on)")
    return getpass.getpass(f"Password for {args.auth}: ")


def _timeouts(args: argparse.Namespace) -> Timeouts:
    return Timeouts.uniform(args.timeout) if args.timeout else Timeouts()


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext:
    try:
        return client_ssl_context(verify=not args.insecure, cafile=args.cafile)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise LocalError(f"--cafile {args.cafile}: {reason}") from None


def _helo_name(args: argparse.Namespace) -> str | None:
    name: str | None = args.helo
    if name is None:
        return None
    if not name.isascii() or not (is_domain(name) or _is_literal(name)):
        raise UsageError(f"--helo: expected a domain name or address literal, got {name!r}")
    return name


def _is_literal(name: str) -> bool:
    from ..protocol import is_address_literal

    return is_address_literal(name)


def _source_ip(args: argparse.Namespace) -> str | None:
    if args.source_ip is None:
        return None
    try:
        return str(ipaddress.ip_address(args.source_ip))
    except ValueError:
        raise UsageError(f"--source-ip: expected an IP address, got {args.source_ip!r}") from None


def _client_factory(
    args: argparse.Namespace, context: ssl.SSLContext
) -> Callable[[str, int, str], SMTPClient]:
    helo = _helo_name(args)
    source = _source_ip(args)
    timeouts = _timeouts(args)
    transcript = _transcript_line if args.transcript else None
    chunking = {"bdat": True, "no-bdat": False}.get(args.bdat or "")

    def make(host: str, port: int, server_name: str) -> SMTPClient:
        return SMTPClient(
            host,
            port,
            helo_name=helo,
            tls=args.tls,
            ssl_context=context,
            tls_server_name=server_name,
            timeouts=timeouts,
            source_address=source,
            pipelining=not args.no_pipelining,
            chunking=chunking,
            helo_only=args.helo_only,
            allow_plaintext_auth=args.insecure,
            transcript=transcript,
        )

    return make


def _send(args: argparse.Namespace) -> int:
    _text_output()
    try:
        return _send_checked(args)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except LocalError as exc:
        _error(str(exc))
        return EXIT_ERROR
    except SMTPClientError as exc:
        _error(str(exc))
        return exit_code(exc)


def _send_checked(args: argparse.Namespace) -> int:
    from .routing import SMTP_PORT, SUBMISSIONS_PORT

    _check_address("--from", args.sender, sender=True)
    for rcpt in args.to:
        _check_address("--to", rcpt, sender=False)
    if args.helo_only and args.tls in TLS_REQUIRED and args.tls != "implicit":
        raise UsageError(
            f"--helo-only cannot be combined with --tls {args.tls} (STARTTLS needs EHLO)"
        )
    if args.auth is not None and args.helo_only:
        raise UsageError("--helo-only cannot be combined with --auth (AUTH needs EHLO)")
    default_port = args.port or (SUBMISSIONS_PORT if args.tls == "implicit" else SMTP_PORT)
    server = parse_server(args.server, default_port) if args.server else None
    context = _ssl_context(args)
    make = _client_factory(args, context)
    login = (args.auth, _password(args)) if args.auth is not None else None
    with _compose(args) as message:
        if server is not None:
            outcomes = [asyncio.run(_send_direct(server, args, message, make, login))]
        else:
            outcomes = asyncio.run(_send_routed(args, message, make, login, default_port))
    return _report(outcomes)


async def _send_direct(
    server: tuple[str, int],
    args: argparse.Namespace,
    message: ComposedMessage,
    make: Callable[[str, int, str], SMTPClient],
    login: tuple[str, str] | None,
) -> DeliveryResult:
    from .routing import DeliveryResult

    host, port = server
    outcome = DeliveryResult("", list(args.to))
    where = format_hostport(host, port)
    client = make(host, port, host)
    try:
        async with client:
            if login is not None:
                await client.login(*login, mechanism=args.auth_mechanism)
            outcome.result = await client.send_message(
                args.sender,
                args.to,
                message.chunks(),
                size=message.size,
                eight_bit=message.eight_bit,
                smtputf8=message.smtputf8,
            )
            outcome.host = where
    except SMTPClientError as exc:
        outcome.error = exc
        outcome.attempts.append((where, exc))
        if args.transcript and not isinstance(exc, OptionNotSupported):
            _transcript_line("error", f"{where}: {exc}", False)
    return outcome


async def _send_routed(
    args: argparse.Namespace,
    message: ComposedMessage,
    make: Callable[[str, int, str], SMTPClient],
    login: tuple[str, str] | None,
    port: int,
) -> list[DeliveryResult]:
    from ..dns import Resolver
    from .routing import Router, deliver, recipient_domain

    try:
        resolver = Resolver(args.dns_server, timeout=args.timeout or 5.0)
    except ValueError as exc:
        raise UsageError(f"--dns-server: {exc}") from None
    router = Router(resolver, port=port)
    by_domain: dict[str, list[str]] = {}
    for rcpt in args.to:
        by_domain.setdefault(recipient_domain(rcpt), []).append(rcpt)
    outcomes: list[DeliveryResult] = []

    def attempt(host: MailHost, address: str) -> None:
        if args.transcript:
            _transcript_line("info", f"Route: {host} -> {address} port {host.port}", False)

    def failure(where: str, exc: SMTPClientError) -> None:
        if args.transcript and not isinstance(exc, OptionNotSupported):
            _transcript_line("error", f"{where}: {exc}", False)

    for _domain, rcpts in by_domain.items():
        outcomes.append(
            await deliver(
                router,
                args.sender,
                rcpts,
                _MessageFactory(message),
                client=make,
                login=login,
                mechanism=args.auth_mechanism,
                on_attempt=attempt,
                on_failure=failure,
                size=message.size,
                eight_bit=message.eight_bit,
                smtputf8=message.smtputf8,
            )
        )
    return outcomes


class _MessageFactory:
    """A fresh chunk iterator per attempt, with the facts MAIL declares."""

    def __init__(self, message: ComposedMessage) -> None:
        self.message = message

    def __call__(self) -> Iterator[bytes]:
        return self.message.chunks()


def _report(outcomes: Sequence[DeliveryResult]) -> int:
    """Print one line per recipient on stdout; one error line on stderr; the exit status."""
    code = EXIT_OK
    failures: list[str] = []
    for outcome in outcomes:
        result = outcome.result
        earlier = outcome.attempts if result is not None else outcome.attempts[:-1]
        for where, exc in earlier:
            print(f"attempt via {where} failed: {_safe(str(exc))}")
        if result is not None:
            for rcpt in result.accepted:
                print(f"delivered <{rcpt}> via {outcome.host}: {_safe(str(result.reply))}")
            print(f"tls via {outcome.host}: {_safe(_tls_line(result.tls))}")
            for rcpt, reply in result.refused.items():
                print(f"refused <{rcpt}> by {outcome.host}: {_safe(str(reply))}")
                failures.append(f"<{rcpt}> refused: {reply}")
                if code == EXIT_OK:
                    code = EXIT_RECIPIENTS
            continue
        error = outcome.error
        if error is None:
            continue
        if isinstance(error, OptionNotSupported):
            # Nothing was sent: the one error line says it all.
            pass
        elif isinstance(error, RecipientsRefused):
            for rcpt, reply in error.refused.items():
                print(f"refused <{rcpt}>: {_safe(str(reply))}")
        else:
            for rcpt in outcome.recipients:
                print(f"not delivered <{rcpt}>: {_safe(str(error))}")
        failures.append(str(error))
        if code == EXIT_OK:
            code = exit_code(error)
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        _error(failures[0] + more)
    return code


def _tls_line(info: TLSInfo | None) -> str:
    """The session's TLS in one line: protocol, cipher, certificate and its verdict."""
    if info is None:
        return "none (the session was not encrypted)"
    return (
        f"{info.version}, {info.cipher} ({info.bits} bits); certificate"
        f" {info.subject or '-'}: {info.verdict}"
    )


# ------------------------------------------------------------------- probe


def format_report(report: ProbeReport) -> str:
    """The plain-text probe report."""
    lines = [f"ehlo probe {report.server}", ""]

    def reply_lines(label: str, reply: Reply | None) -> None:
        text = reply_text(reply)
        if text is None:
            return
        first, *rest = text.split("\n")
        lines.append(f"{label:<13}{first}")
        lines.extend(f"{'':<13}{line}" for line in rest)

    reply_lines("Banner:", report.banner)
    reply_lines("EHLO:", report.ehlo)
    if report.extensions:
        lines.append("")
        lines.append("Extensions:" + (" (before TLS)" if report.tls_offered else ""))
        lines.extend(_extension_lines(report.extensions))
    lines.append("")
    if report.helo_ok is None:
        helo = f"not tested{': ' + report.helo_error if report.helo_error else ''}"
    else:
        helo = ("works" if report.helo_ok else "REFUSED") + f" ({report.helo})"
    lines.append(f"{'HELO:':<13}{helo}")
    lines.append(f"{'TLS:':<13}{_tls_summary(report)}")
    info = report.tls
    if info is not None:
        lines.append(f"{'':<13}subject   {info.subject or '-'}")
        lines.append(f"{'':<13}names     {', '.join(info.names) or '-'}")
        lines.append(f"{'':<13}issuer    {info.issuer or '-'}")
        if info.not_after is not None:
            days = report.days_left()
            lines.append(
                f"{'':<13}expires   {info.not_after:%Y-%m-%d %H:%M:%S} UTC ({days} days left)"
            )
        chain = "verified" if info.verified and not report.verify_error else (
            f"NOT verified: {report.verify_error}" if report.verify_error else "not verified"
        )
        lines.append(f"{'':<13}chain     {chain}")
    if report.extensions_after_tls is not None:
        lines.append("")
        lines.append("Extensions after TLS:")
        lines.extend(_extension_lines(report.extensions_after_tls))
    lines.append("")
    lines.append(f"{'AUTH:':<13}before TLS: {_mechs(report.auth_before)}")
    if report.tls_offered:
        lines.append(f"{'':<13}after TLS:  {_mechs(report.auth_after)}")
    size = dict(report.extensions_after_tls or report.extensions).get("SIZE")
    if size is None:
        limit = "none declared (no SIZE)"
    elif not size or size[0] == "0":
        limit = "SIZE 0: no fixed message size limit"
    elif size[0].isdigit():
        limit = f"SIZE: messages up to {octets_text(int(size[0]))}"
    else:
        limit = f"SIZE {' '.join(size)} (not a number)"
    lines.append(f"{'Limits:':<13}{limit}")
    findings = report.findings()
    lines.append("")
    lines.append("Findings:" if findings else "Findings:    none")
    lines.extend(f"  - {finding}" for finding in findings)
    return "\n".join(_safe(line) for line in lines)


def _extension_lines(items: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    out = []
    for keyword, params in items:
        label = " ".join((keyword, *params))
        if len(label) > 24:
            label = label[:23] + "…"
        out.append(f"  {label:<25}{explain_extension(keyword, params)}")
    return out


def _mechs(mechs: list[str] | None) -> str:
    if mechs is None:
        return "unknown"
    return " ".join(mechs) if mechs else "none offered"


def _tls_summary(report: ProbeReport) -> str:
    if report.tls is not None:
        how = "implicit TLS" if report.implicit_tls else "STARTTLS"
        info = report.tls
        return f"{how}: {info.version}, {info.cipher} ({info.bits} bits)"
    if report.tls_error:
        return f"FAILED: {report.tls_error}"
    if report.implicit_tls:
        return "implicit TLS failed"
    return "STARTTLS not offered" if report.ehlo is not None else "unknown"


def _probe(args: argparse.Namespace) -> int:
    from .routing import SMTP_PORT, SUBMISSIONS_PORT

    _text_output()
    try:
        implicit = args.tls == "implicit"
        host, port = parse_server(args.target, SUBMISSIONS_PORT if implicit else SMTP_PORT)
        if args.tls is None:
            # RFC 8314 section 3.3: port 465 is implicit TLS (submissions).
            implicit = port == SUBMISSIONS_PORT
        _helo_name(args)
        context = client_ssl_context(verify=True, cafile=args.cafile)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except (OSError, ssl.SSLError) as exc:
        _error(f"--cafile {args.cafile}: {getattr(exc, 'strerror', None) or exc}")
        return EXIT_ERROR
    try:
        report = asyncio.run(
            run_probe(
                host,
                port,
                ssl_context=context,
                helo_name=_helo_name(args),
                implicit_tls=implicit,
                timeout=args.timeout,
            )
        )
    except SMTPClientError as exc:
        _error(str(exc))
        return exit_code(exc)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    if report.error is not None:
        _error(report.error)
        return EXIT_CONNECTION
    return EXIT_OK


# ------------------------------------------------------------------ parsers


def _epilog(codes: dict[int, str]) -> str:
    lines = ["exit status:"]
    for code, text in codes.items():
        lines.append(
            textwrap.fill(text, 78, initial_indent=f"  {code}  ", subsequent_indent="     ")
        )
    return "\n".join(lines)


PROBE_EXIT_CODES = {
    EXIT_OK: "the report was made",
    EXIT_ERROR: "a local error (a --cafile that cannot be read, an unexpected failure)",
    EXIT_USAGE: "a usage error",
    EXIT_CONNECTION: "connection: cannot connect, timeout, or the server refused the session",
    EXIT_TLS: "--tls implicit: no TLS handshake (not only a failed verification)",
}


def add_client_commands(subparsers: Any) -> None:
    """Register ``send`` and ``probe`` on the ``ehlo`` parser's subparsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    send = subparsers.add_parser(
        "send",
        help="send a message (to --server, or by MX lookup)",
        description=textwrap.fill(
            "Send one message: EHLO (HELO when the server speaks only plain SMTP),"
            " STARTTLS, AUTH, PIPELINING, BDAT, per-recipient results. Without"
            " --server, each recipient domain's MX hosts are tried in order of"
            " preference (RFC 5321 section 5.1). The AUTH password is read from"
            f" ${PASSWORD_ENV}, or asked on the terminal.",
            78,
        ),
        epilog=_epilog(EXIT_CODES),
        formatter_class=formatter,
    )
    send.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                      help="envelope sender and From header ('' for the null sender)")
    send.add_argument("--to", action="append", required=True, metavar="ADDRESS",
                      help="a recipient, repeatable")
    send.add_argument("--server", metavar="HOST[:PORT]",
                      help="the server to send to (default: MX lookup per recipient domain)")
    send.add_argument("--port", type=_port, metavar="PORT",
                      help="port for MX hosts and for --server without one"
                           " (default: 25; 465 with --tls implicit)")
    send.add_argument("--helo", metavar="NAME", help="the name to greet with (default: FQDN"
                      " or the local address literal)")
    send.add_argument("--helo-only", action="store_true",
                      help="greet with HELO: plain SMTP, no extensions")
    send.add_argument("--tls", choices=TLS_MODES, default="opportunistic", metavar="POLICY",
                      help="opportunistic (default): STARTTLS when offered, certificate not"
                           " verified (reported); encrypt: require STARTTLS, not verified;"
                           " verify (or required): require STARTTLS and a certificate trusted"
                           " for the server name; implicit: TLS from the first byte (RFC 8314),"
                           " verified; off: no TLS")
    send.add_argument("--insecure", action="store_true",
                      help="do not verify TLS certificates (verify and implicit then only"
                           " encrypt); allow AUTH PLAIN/LOGIN without TLS")
    send.add_argument("--cafile", metavar="FILE",
                      help="trust the CA certificates in FILE too (a self-signed server"
                           " certificate, e.g. ehlo serve's DATA/tls/cert.pem, works)")
    send.add_argument("--auth", metavar="USER",
                      help=f"authenticate as USER (password: ${PASSWORD_ENV})")
    send.add_argument("--auth-mechanism", type=str.upper, metavar="MECH",
                      choices=("SCRAM-SHA-256", "PLAIN", "LOGIN"),
                      help="SCRAM-SHA-256, PLAIN or LOGIN (default: the best offered)")
    send.add_argument("--header", action="append", metavar="'NAME: VALUE'",
                      help="add a header (or replace a default one), repeatable")
    send.add_argument("--subject", metavar="TEXT", help="the Subject (default: 'test DATE')")
    send.add_argument("--body", metavar="FILE|-", help="the body text from FILE or stdin (-)")
    send.add_argument("--attach", action="append", metavar="FILE",
                      help="attach a file (base64), repeatable")
    send.add_argument("--no-pipelining", action="store_true",
                      help="wait for each reply even when PIPELINING is offered")
    bdat = send.add_mutually_exclusive_group()
    bdat.add_argument("--bdat", dest="bdat", action="store_const", const="bdat",
                      help="send the body with BDAT (fail when CHUNKING is not offered)")
    bdat.add_argument("--no-bdat", dest="bdat", action="store_const", const="no-bdat",
                      help="send the body with DATA even when CHUNKING is offered")
    send.add_argument("--source-ip", metavar="IP", help="the local address to connect from")
    send.add_argument("--transcript", action="store_true",
                      help="show every command and reply (AUTH secrets redacted)")
    send.add_argument("--dns-server", action="append", metavar="IP[:PORT]",
                      help="nameserver for MX lookups, repeatable (default: resolv.conf)")
    send.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                      help="limit for every step (default: RFC 5321 section 4.5.3.2 values)")
    send.set_defaults(func=_send)

    probe = subparsers.add_parser(
        "probe",
        help="report what an SMTP server offers",
        description=textwrap.fill(
            "Connect and report: the banner, the EHLO reply with each extension explained, whether"
            " HELO works, the STARTTLS result (protocol, cipher, certificate subject,"
            " names, expiry, chain verification), AUTH mechanisms before and after"
            " TLS, the declared limits, and findings to act on.",
            78,
        ),
        epilog=_epilog(PROBE_EXIT_CODES),
        formatter_class=formatter,
    )
    probe.add_argument("target", metavar="HOST[:PORT]",
                       help="the server (default port 25; 465 with --tls implicit)")
    probe.add_argument("--helo", metavar="NAME", help="the name to greet with")
    probe.add_argument("--json", action="store_true",
                       help="one JSON object: banner, ehlo, extensions, helo_ok, tls, auth")
    probe.add_argument("--tls", choices=("starttls", "implicit"), default=None,
                       help="starttls: plain SMTP, then STARTTLS when offered; implicit: TLS"
                            " from the first byte, RFC 8314 (default: implicit on port 465,"
                            " starttls elsewhere)")
    probe.add_argument("--implicit-tls", dest="tls", action="store_const", const="implicit",
                       help="the same as --tls implicit")
    probe.add_argument("--cafile", metavar="FILE", help="trust the CA certificates in FILE too")
    probe.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                       help="limit for every step (default: 30)")
    probe.set_defaults(func=_probe)


class _Parser(argparse.ArgumentParser):
    """argparse with the usage error kept to the usage line and one message."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """A parser with only ``send`` and ``probe`` (for tests before cli.py wires them)."""
    parser = _Parser(prog=PROG, description="The ehlo SMTP client.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    add_client_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ehlo send`` or ``ehlo probe``; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_usage(sys.stderr)
        _error("choose a command: send, probe")
        return EXIT_USAGE
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except Exception as exc:
        if os.environ.get("EHLO_DEBUG"):
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (EHLO_DEBUG=1 shows the traceback)")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
