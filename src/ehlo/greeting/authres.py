"""The Authentication-Results header (RFC 8601) for greeting checks.

Three methods are reported:

- ``iprev`` (RFC 8601 section 3): the client IP's PTR name confirmed by a
  forward lookup, with ``policy.iprev=<IP>`` and the name as a comment;
- ``spf`` (RFC 7208 section 9.1 via RFC 8601 section 2.7.2) for the HELO
  identity, with ``smtp.helo=<name>``;
- ``x-ehlo-helo``: whether the HELO/EHLO name resolves to the client IP
  (``forward_match``, or ``literal_match`` for an address literal), with
  ``smtp.helo=<name>``. RFC 8601 registers no method for this. The name is
  ours: the ``x-`` prefix keeps it out of the IANA namespace, and RFC 8601
  section 2.7 tells consumers to ignore methods they do not know, so the
  field stays valid for every reader.

The header is built as raw bytes and prepended, like the Received header.
"""

from __future__ import annotations

from ..protocol import is_domain
from ._checks import GreetingReport

# RFC 8601 section 2.7.3: the results iprev can have.
_IPREV = {"pass", "fail", "temperror", "permerror"}


_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')


def _pvalue(value: str) -> str:
    # RFC 8601 section 2.2: pvalue is a value (RFC 2045 token or quoted-string)
    # or a domain name; an address literal or an IPv6 address must be quoted.
    if is_domain(value, utf8=not value.isascii()):
        return value
    if value and all(32 < ord(c) < 127 and c not in _TSPECIALS for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if 32 <= ord(c) < 127 or ord(c) >= 128 else "?" for c in escaped) + '"'


def _comment(text: str) -> str:
    # RFC 5322 section 3.2.2: no unescaped parentheses or backslashes in a comment.
    cleaned = "".join(c for c in text.replace("(", "[").replace(")", "]")
                      if c not in "\\\r\n")
    return f" ({cleaned})" if cleaned else ""


def authentication_results(report: GreetingReport, authserv_id: str) -> bytes:
    """One Authentication-Results header for ``report``, folded, CRLF-terminated.

    The header is a function of the report and ``authserv_id`` only, so it is
    rendered once per report and authserv-id and kept on the report.
    """
    return report.header(authserv_id, _render)


def _render(report: GreetingReport, authserv_id: str) -> bytes:
    greeting = report.greeting
    helo = _pvalue(greeting.name)
    parts: list[str] = []
    iprev = report.results.get("iprev")
    if iprev is not None:
        result = iprev.result if iprev.result in _IPREV else "permerror"
        name = report.verified_ptr
        parts.append(
            f"iprev={result} "
            f"policy.iprev={_pvalue(str(iprev.evidence.get('client_ip', greeting.client_ip)))}"
            + _comment(name or "")
        )
    spf = report.results.get("spf_helo")
    if spf is not None:
        raw = str(spf.evidence.get("spf") or spf.result)
        parts.append(f"spf={raw} smtp.helo={helo}")
    match = report.results.get("literal_match") if greeting.name.startswith("[") else None
    if match is None or match.result == "none":
        match = report.results.get("forward_match")
    if match is not None:
        parts.append(f"x-ehlo-helo={match.result} smtp.helo={helo}" + _comment(match.reason))
    if not parts:
        # RFC 8601 section 2.2: "none" when no method was applied.
        parts.append("none")
    lines = [f"Authentication-Results: {authserv_id};"]
    for i, part in enumerate(parts):
        lines.append("\t" + part + (";" if i < len(parts) - 1 else ""))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")
