"""Probing a server as library code: what it offers, and what to act on.

This module owns :func:`run_probe`: connect, greet with EHLO, try STARTTLS
(verified, then again unverified to show the certificate when verification
fails), greet with HELO in a second session, and gather it all in a
:class:`ProbeReport`: the banner, the EHLO reply as sent, each extension explained
(:func:`explain_extension`), the TLS session and certificate, the AUTH
mechanisms before and after TLS, and :meth:`ProbeReport.findings`.
``ProbeReport.to_json`` gives the keys of ``ehlo probe --json``; rendering as
text is the command line's.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ssl
from collections.abc import Sequence
from typing import Any

from .._net import format_hostport
from ..protocol import Reply
from ._client import SMTPClient, Timeouts, TLSInfo, client_ssl_context
from ._errors import ConnectionFailed, ServiceRefused, SMTPClientError, TLSFailed

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXTENSION_HELP",
    "ProbeReport",
    "explain_extension",
    "octets_text",
    "reply_text",
    "run_probe",
]

# Without a timeout given: every step of a probe waits at most this long.
DEFAULT_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class _Options:
    """What every session of one probe shares."""

    helo_name: str | None
    timeouts: Timeouts


EXTENSION_HELP = {
    "PIPELINING": "commands may be sent in groups without waiting for each reply (RFC 2920)",
    "SIZE": "declares the largest message accepted; MAIL takes SIZE= (RFC 1870)",
    "STARTTLS": "the session can be upgraded to TLS (RFC 3207)",
    "AUTH": "SASL authentication with the listed mechanisms (RFC 4954)",
    "8BITMIME": "8-bit message bodies with MAIL BODY=8BITMIME (RFC 6152)",
    "SMTPUTF8": "UTF-8 addresses and headers (RFC 6531)",
    "CHUNKING": "BDAT: the message in counted chunks, no dot-stuffing (RFC 3030)",
    "BINARYMIME": "binary message bodies with BDAT (RFC 3030)",
    "ENHANCEDSTATUSCODES": "replies carry enhanced status codes like 2.1.0 (RFC 2034, 3463)",
    "DSN": "delivery status notifications: RET, ENVID, NOTIFY, ORCPT (RFC 3461)",
    "ETRN": "remote queue start for a domain (RFC 1985)",
    "ATRN": "authenticated turn: the roles swap to fetch queued mail (RFC 2645)",
    "VRFY": "verify a mailbox name (RFC 5321 section 3.5)",
    "EXPN": "expand a mailing list (RFC 5321 section 3.5)",
    "HELP": "help text on request (RFC 5321 section 4.1.1.8)",
    "DELIVERBY": "deliver within a time limit: MAIL BY= (RFC 2852)",
    "MT-PRIORITY": "message priorities: MAIL MT-PRIORITY= (RFC 6710)",
    "REQUIRETLS": "the message must travel over TLS all the way: MAIL REQUIRETLS (RFC 8689)",
    "FUTURERELEASE": "hold the message until later: MAIL HOLDFOR=/HOLDUNTIL= (RFC 4865)",
    "LIMITS": "declares limits on recipients and transactions (RFC 9422)",
    "RRVS": "require recipient valid since a date (RFC 7293)",
    "NO-SOLICITING": "the server does not want solicitations (RFC 3865)",
    "MTRK": "message tracking (RFC 3885)",
    "BURL": "the body fetched by URL from an IMAP server (RFC 4468)",
    "CHECKPOINT": "restart of interrupted transactions (RFC 1845)",
    "CONNEG": "content negotiation (RFC 4141)",
    "SUBMITTER": "the responsible submitter: MAIL SUBMITTER= (RFC 4405)",
    "XCLIENT": "Postfix: a trusted proxy passes on the real client's details",
    "XFORWARD": "Postfix: a trusted filter passes on the original client's details",
    "TURN": "role reversal (RFC 821, obsolete and unsafe)",
    "SEND": "deliver to a terminal (RFC 821, obsolete)",
    "SOML": "send or mail (RFC 821, obsolete)",
    "SAML": "send and mail (RFC 821, obsolete)",
}


def explain_extension(keyword: str, params: Sequence[str]) -> str:
    """One line about an EHLO keyword and its parameters."""
    key = keyword.upper()
    if key == "SIZE":
        if not params or params[0] == "0":
            return "no fixed message size limit declared (RFC 1870)"
        if params[0].isdigit():
            return f"messages up to {octets_text(int(params[0]))} (RFC 1870)"
    if key == "AUTH":
        return f"SASL authentication: {' '.join(params) or 'no mechanism listed'} (RFC 4954)"
    text = EXTENSION_HELP.get(key)
    if text is None:
        return "not known to ehlo (a private or newer extension)"
    return text


def octets_text(n: int) -> str:
    """A size in octets, with KiB or MiB when large."""
    if n >= 1 << 20:
        return f"{n} octets ({n / (1 << 20):.1f} MiB)"
    if n >= 1 << 10:
        return f"{n} octets ({n / 1024:.1f} KiB)"
    return f"{n} octets"


@dataclasses.dataclass
class ProbeReport:
    """What ``ehlo probe`` found; ``to_json`` has the keys of ``--json``."""

    server: str
    banner: Reply | None = None
    ehlo: Reply | None = None
    extensions: list[tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=list)
    helo: Reply | None = None
    helo_error: str | None = None
    tls_offered: bool = False
    implicit_tls: bool = False
    tls: TLSInfo | None = None
    tls_reply: Reply | None = None
    tls_error: str | None = None
    verify_error: str | None = None
    extensions_after_tls: list[tuple[str, tuple[str, ...]]] | None = None
    auth_before: list[str] | None = None
    auth_after: list[str] | None = None
    error: str | None = None

    @property
    def helo_ok(self) -> bool | None:
        if self.helo is None:
            return None
        return self.helo.code == 250

    def to_json(self) -> dict[str, Any]:
        def ext_json(items: list[tuple[str, tuple[str, ...]]]) -> list[dict[str, Any]]:
            return [
                {"keyword": k, "params": list(p), "description": explain_extension(k, p)}
                for k, p in items
            ]

        tls: dict[str, Any] = {
            "offered": self.tls_offered or self.implicit_tls,
            "implicit": self.implicit_tls,
            "started": self.tls is not None,
        }
        if self.tls is not None:
            tls.update(self.tls.to_json())
            tls["days_left"] = self.days_left()
        tls["verify_error"] = self.verify_error
        tls["reply"] = reply_text(self.tls_reply)
        tls["error"] = self.tls_error
        tls["extensions"] = (
            ext_json(self.extensions_after_tls) if self.extensions_after_tls is not None else None
        )
        return {
            "banner": reply_text(self.banner),
            "ehlo": reply_text(self.ehlo),
            "extensions": ext_json(self.extensions),
            "helo_ok": self.helo_ok,
            "tls": tls,
            "auth": {"before_tls": self.auth_before, "after_tls": self.auth_after},
        }

    def days_left(self) -> int | None:
        """Whole days until the certificate expires (negative: expired), or None."""
        if self.tls is None or self.tls.not_after is None:
            return None
        return (self.tls.not_after - dt.datetime.now(dt.UTC)).days

    def findings(self) -> list[str]:
        """What an administrator may want to act on, most important first."""
        out: list[str] = []
        if self.banner is not None and self.banner.code != 220:
            out.append(f"the banner is {self.banner.code}, not 220: clients cannot send mail")
        if self.ehlo is not None and self.ehlo.code != 250:
            out.append(f"EHLO is refused ({self.ehlo.code}): no ESMTP extensions, no STARTTLS")
        if self.helo_ok is False:
            out.append("HELO is refused: RFC 5321 section 4.1.1.1 requires servers to accept it")
        if (
            self.ehlo is not None
            and self.ehlo.code == 250
            and not (self.tls_offered or self.implicit_tls)
        ):
            out.append("STARTTLS is not offered: mail to this server travels in clear")
        if self.tls_error:
            out.append(f"TLS fails: {self.tls_error}")
        if self.verify_error:
            out.append(f"the certificate is not trusted: {self.verify_error}")
        days = self.days_left()
        if days is not None and days < 0:
            out.append("the certificate has expired")
        elif days is not None and days < 21:
            out.append(f"the certificate expires in {days} days")
        if self.tls is not None and self.tls.version in ("SSLv3", "TLSv1", "TLSv1.1"):
            out.append(f"{self.tls.version} is obsolete (RFC 8996): allow TLS 1.2 or later only")
        plain = {"PLAIN", "LOGIN"} & set(self.auth_before or [])
        if plain and not self.implicit_tls:
            out.append(
                f"AUTH {' '.join(sorted(plain))} is offered before TLS: passwords can travel"
                " in clear"
            )
        keywords = {k for k, _ in self.extensions}
        if self.ehlo is not None and self.ehlo.code == 250:
            if "SIZE" not in keywords:
                out.append("no SIZE declared: clients learn the limit only after sending")
            if "PIPELINING" not in keywords:
                out.append("PIPELINING is not offered: every command costs a round trip")
            if "8BITMIME" not in keywords:
                out.append("8BITMIME is not offered: 8-bit mail must be converted first")
        return out


def reply_text(reply: Reply | None) -> str | None:
    """A reply as the server sent it, lines joined by newlines (None stays None)."""
    if reply is None:
        return None
    return "\n".join(reply.render(True).decode("utf-8", "replace").split("\r\n")[:-1])


def _probe_client(
    host: str, port: int, options: _Options, context: ssl.SSLContext, tls: str
) -> SMTPClient:
    return SMTPClient(
        host,
        port,
        helo_name=options.helo_name,
        tls="implicit" if tls == "implicit" else "off",
        ssl_context=context,
        tls_server_name=host,
        timeouts=options.timeouts,
    )


async def run_probe(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    helo_name: str | None = None,
    implicit_tls: bool = False,
    timeout: float | None = None,
) -> ProbeReport:
    """Connect, greet, try STARTTLS (verified, then unverified for the details), and HELO.

    ``ssl_context`` verifies the certificate (default: the system's CAs);
    ``implicit_tls`` speaks TLS from the first byte; ``timeout`` limits every
    step (default: 30 seconds). A server that refuses the session gives a
    report with ``error`` set; failing to connect raises
    :class:`ConnectionFailed` (or :class:`TLSFailed` for an implicit-TLS
    handshake that fails for another reason than verification).
    """
    context = ssl_context if ssl_context is not None else client_ssl_context(verify=True)
    options = _Options(helo_name, Timeouts.uniform(timeout or DEFAULT_TIMEOUT))
    report = ProbeReport(format_hostport(host, port))
    implicit = implicit_tls
    report.implicit_tls = implicit
    unverified = client_ssl_context(verify=False)
    client = _probe_client(host, port, options, context, "implicit" if implicit else "off")
    try:
        try:
            report.banner = await client.open()
        except ConnectionFailed as exc:
            if implicit or not exc.no_banner:
                raise
            # A server that waits silently may be waiting for a TLS handshake.
            raise ConnectionFailed(
                f"{exc.message} (an implicit-TLS port? probe it with --tls implicit)"
            ) from None
        except TLSFailed as exc:
            if not implicit or exc.verify_error is None:
                raise
            report.verify_error = exc.verify_error
            client = _probe_client(host, port, options, unverified, "implicit")
            report.banner = await client.open()
        if implicit:
            report.tls = client.tls
            if report.tls is not None and report.verify_error:
                report.tls = dataclasses.replace(report.tls, verified=False)
        report.ehlo = await client.ehlo()
        if report.ehlo.code == 250:
            report.extensions = list(client.extensions.items())
            report.auth_before = list(client.extensions.auth_mechanisms)
            report.tls_offered = "STARTTLS" in client.extensions
        if report.tls_offered:
            await _probe_starttls(client, report, host, port, options, unverified)
    except ServiceRefused as exc:
        report.banner = report.banner or exc.reply
        report.error = str(exc)
    finally:
        await client.quit()
        client.close()
    if report.banner is not None and report.banner.code == 220:
        await _probe_helo(host, port, options, context, unverified, report)
    return report


async def _probe_starttls(
    client: SMTPClient,
    report: ProbeReport,
    host: str,
    port: int,
    options: _Options,
    unverified: ssl.SSLContext,
) -> None:
    try:
        reply = await client.starttls()
    except TLSFailed as exc:
        report.tls_reply = exc.reply
        if exc.reply is not None:
            report.tls_error = f"STARTTLS refused: {exc.reply}"
            return
        if exc.verify_error is None:
            report.tls_error = exc.message
            return
        report.verify_error = exc.verify_error
        # Again without verification, to show the certificate and what follows.
        second = _probe_client(host, port, options, unverified, "off")
        try:
            await second.open()
            if (await second.ehlo()).code != 250 or "STARTTLS" not in second.extensions:
                report.tls_error = "the second connection did not offer STARTTLS"
                return
            reply = await second.starttls()
            _after_tls(second, report, reply)
            if report.tls is not None:
                report.tls = dataclasses.replace(report.tls, verified=False)
        except SMTPClientError as exc2:
            report.tls_error = str(exc2)
        finally:
            await second.quit()
            second.close()
        return
    _after_tls(client, report, reply)


def _after_tls(client: SMTPClient, report: ProbeReport, reply: Reply) -> None:
    report.tls = client.tls
    if reply.code == 250:
        report.extensions_after_tls = list(client.extensions.items())
        report.auth_after = list(client.extensions.auth_mechanisms)


async def _probe_helo(
    host: str,
    port: int,
    options: _Options,
    context: ssl.SSLContext,
    unverified: ssl.SSLContext,
    report: ProbeReport,
) -> None:
    """A separate session greeting with HELO only, as a plain SMTP client would."""
    implicit = report.implicit_tls
    ctx = unverified if implicit else context
    client = _probe_client(host, port, options, ctx, "implicit" if implicit else "off")
    try:
        await client.open()
        report.helo = await client.helo()
    except SMTPClientError as exc:
        report.helo_error = str(exc)
    finally:
        await client.quit()
        client.close()
