"""``ehlo.client.probe``: probing as a library call, against ehlo's own server.

:func:`run_probe` returns a :class:`ProbeReport`; checked are its fields (the
banner, the extensions before and after STARTTLS, the TLS session and the
certificate, HELO, AUTH), what ``to_json`` gives, and the findings, for a
trusted and an untrusted certificate, a server without TLS, a server that
refuses the session and one that is not there.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from ehlo import Verdict
from ehlo.client import ConnectionFailed, client_ssl_context
from ehlo.client.probe import ProbeReport, explain_extension, reply_text, run_probe
from ehlo.protocol import Reply

from .conftest import ThreadedServer, free_port
from .test_client_e2e import Pki, make_pki

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def test_report_over_verified_starttls(
    threaded_server: Callable[..., ThreadedServer], pki: Pki
) -> None:
    srv = threaded_server(reverse_dns=False, tls_cert=pki.cert_file, tls_key=pki.key_file)
    context = client_ssl_context(cafile=str(pki.ca_file))
    report = await run_probe(
        "localhost", srv.port, ssl_context=context, helo_name="probe.example", timeout=20
    )
    assert isinstance(report, ProbeReport)
    assert report.server == f"localhost:{srv.port}" and report.error is None
    assert report.banner is not None and report.banner.code == 220
    assert report.ehlo is not None and report.ehlo.code == 250
    keywords = [k for k, _ in report.extensions]
    assert "STARTTLS" in keywords and "PIPELINING" in keywords
    assert report.tls_offered and not report.implicit_tls
    assert report.tls is not None and report.tls.verified and report.verify_error is None
    assert report.tls.version.startswith("TLSv1.") and "localhost" in report.tls.names
    days = report.days_left()
    assert days is not None and days > 21
    assert report.extensions_after_tls is not None
    assert "STARTTLS" not in [k for k, _ in report.extensions_after_tls]
    assert report.helo_ok is True
    assert report.auth_before == [] and report.auth_after == []
    assert report.findings() == []
    data = json.loads(json.dumps(report.to_json()))
    assert set(data) == {"banner", "ehlo", "extensions", "helo_ok", "tls", "auth"}
    assert data["tls"]["verified"] and data["tls"]["days_left"] == days


async def test_report_untrusted_certificate(
    threaded_server: Callable[..., ThreadedServer],
) -> None:
    srv = threaded_server(reverse_dns=False)  # a self-signed certificate
    report = await run_probe("127.0.0.1", srv.port, timeout=20)
    assert report.verify_error
    # The second, unverified session shows the certificate all the same.
    assert report.tls is not None and not report.tls.verified
    assert report.tls.subject == "CN=localhost"
    assert any("not trusted" in finding for finding in report.findings())


async def test_report_without_tls_and_refused(
    threaded_server: Callable[..., ThreadedServer],
) -> None:
    srv = threaded_server(reverse_dns=False, tls=False)
    report = await run_probe("127.0.0.1", srv.port, timeout=20)
    assert report.tls is None and not report.tls_offered and report.tls_error is None
    assert "STARTTLS is not offered: mail to this server travels in clear" in report.findings()

    async def refuse(ctx: object) -> Verdict:
        return Verdict.reject("Go away", 554, "5.7.1")

    srv = threaded_server(reverse_dns=False, tls=False, hooks={"connect": [refuse]})
    report = await run_probe("127.0.0.1", srv.port, timeout=20)
    assert report.error is not None
    assert report.banner is not None and report.banner.code == 554
    assert report.helo_ok is None  # no second session after a refusal
    assert report.findings()[0].startswith("the banner is 554, not 220")

    with pytest.raises(ConnectionFailed):
        await run_probe("127.0.0.1", free_port(), timeout=5)


def test_report_findings_and_helpers() -> None:
    report = ProbeReport(
        "mx.example:25",
        banner=Reply(220, None, "mx.example ESMTP"),
        ehlo=Reply(250, None, "mx.example"),
        extensions=[("AUTH", ("PLAIN", "LOGIN")), ("X-PRIVATE", ())],
        helo=Reply(502, None, "no HELO"),
        auth_before=["PLAIN", "LOGIN"],
    )
    findings = report.findings()
    assert "HELO is refused: RFC 5321 section 4.1.1.1 requires servers to accept it" in findings
    assert "AUTH LOGIN PLAIN is offered before TLS: passwords can travel in clear" in findings
    assert "no SIZE declared: clients learn the limit only after sending" in findings
    assert report.helo_ok is False and report.days_left() is None
    assert (
        explain_extension("SIZE", ("1048576",))
        == "messages up to 1048576 octets (1.0 MiB) (RFC 1870)"
    )
    assert "not known" in explain_extension("X-PRIVATE", ())
    assert reply_text(Reply(250, None, ("one", "two"))) == "250-one\n250 two"
    assert reply_text(None) is None
