"""``ehlo check-helo NAME IP``: what the greeting checks make of a HELO/EHLO name.

The same checks the server runs, on a name and an IP given on the command
line, with the policy of the configuration (file and options). Every check
runs, even those the policy switches off (their MODE says "off" and they
weigh nothing in the verdict), so the table always shows the whole picture.
The command exits 0 whatever the verdict; ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ConfigError, ServerConfig, load_config
from ._common import (
    GREETING_LABELS,
    Failure,
    greeting_options,
    greeting_overrides,
    safe,
    show_defaults,
    text_output,
)

if TYPE_CHECKING:
    from ..greeting import CheckResult, Decision, GreetingPolicy, GreetingReport

_PROBLEMS = ("fail", "temperror", "permerror")
_ANSI = {"green": "32", "red": "31", "yellow": "33", "dim": "2", "bold": "1"}
_RESULT_COLORS = {
    "pass": "green",
    "fail": "red",
    "permerror": "red",
    "temperror": "yellow",
    "none": "dim",
}
_ACTION_COLORS = {"accept": "green", "defer": "yellow", "reject": "red"}


def add_check_helo_command(commands: Any) -> None:
    """Register ``check-helo`` on the ``ehlo`` parser's subparsers."""
    check = commands.add_parser(
        "check-helo",
        help="explain what the greeting checks make of a HELO/EHLO name",
        description="Run the greeting checks for NAME sent from IP, as the server would, "
        "and explain each result and the verdict of the configured policy. "
        "Exits 0 whatever the verdict.",
    )
    check.add_argument("name", metavar="NAME", help="the HELO/EHLO name (or [address literal])")
    check.add_argument("ip", metavar="IP", help="the client's IP address")
    verb = check.add_mutually_exclusive_group()
    verb.add_argument(
        "--ehlo", dest="verb", action="store_const", const="EHLO", help="sent as EHLO (default)"
    )
    verb.add_argument("--helo", dest="verb", action="store_const", const="HELO", help="as HELO")
    check.add_argument("--config", metavar="FILE", type=Path, help="TOML configuration file")
    check.add_argument("--hostname", metavar="NAME", help="our host name (for the not_us check)")
    greeting_options(check, stage=False)
    check.add_argument("--json", action="store_true", help="one JSON object")
    check.set_defaults(func=_check_helo, verb="EHLO")
    show_defaults(check, GREETING_LABELS)


def _client_ip(text: str) -> str:
    """The IP argument, normalised; a ConfigError (exit 2) when it is not an address."""
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ConfigError(f"IP: expected an IP address such as 192.0.2.7, got {text!r}") from None


def _check_helo(args: argparse.Namespace) -> int:
    """``ehlo check-helo NAME IP``: run every check, print the table or JSON; exit 0."""
    from ..dns import Resolver
    from ..greeting import CHECKS, Decision, GreetingVerifier, run_checks

    ip = _client_ip(args.ip)
    overrides, labels = greeting_overrides(args)
    overrides["hostname"] = args.hostname
    config = load_config(args.config, overrides, labels=labels)
    policy = config.greeting.to_policy()
    try:
        resolver = Resolver(list(config.dns_servers) or None, timeout=config.dns_timeout)
    except ValueError as exc:
        raise ConfigError(f"--dns-server: {exc}") from None
    verifier = GreetingVerifier(policy, resolver, our_names=(config.hostname,))
    greeting = verifier.greeting(args.verb, args.name, ip)

    async def explain() -> GreetingReport:
        # Every check, also those the policy switches off: this is an explanation.
        return await run_checks(
            greeting,
            verifier.resolver,
            checks=CHECKS,
            max_queries=policy.max_queries,
            timeout=policy.timeout,
        )

    try:
        report = asyncio.run(explain())
    except OSError as exc:
        raise Failure(f"cannot run the checks: {exc.strerror or exc}") from None
    decision = verifier.decide(report)
    if not verifier.applies_to(ip):  # the server would not check this client at all
        decision = Decision("accept")
    text_output()
    if args.json:
        print(
            json.dumps(
                {
                    "name": args.name,
                    "ip": ip,
                    "verb": args.verb,
                    "checks": report.to_json(),
                    "verdict": decision.to_json(),
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    color = _use_color()
    print(_explain(report, policy, decision, config, color=color))
    return 0


def _use_color() -> bool:
    """Color only for a terminal, and never when NO_COLOR is set (no-color.org)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _paint(text: str, color: str | None, enabled: bool) -> str:
    if not enabled or color is None:
        return text
    return f"\x1b[{_ANSI[color]}m{text}\x1b[0m"


def _explain(
    report: GreetingReport,
    policy: GreetingPolicy,
    decision: Decision,
    config: ServerConfig,
    *,
    color: bool,
) -> str:
    """The table ``check-helo`` prints: a heading, one row per check, the verdict."""
    greeting = report.greeting
    dns = ", ".join(config.dns_servers) or "the system's"
    lines = [
        _paint(safe(f"{greeting.verb} {greeting.name} from {greeting.client_ip}"), "bold", color)
        + f"  (policy {config.greeting.policy}, verdict at {policy.stage.upper()}, DNS {dns})",
        "",
    ]
    header = ("CHECK", "RESULT", "MODE", "REASON")
    widths = (max(len(c) for c in (*report.results, header[0])), len("TEMPERROR"), len("reject"))
    lines.append(
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + "  " + header[3]
    )
    shown_evidence: set[str] = set()  # a lookup shown once is not repeated below
    for result in report.results.values():
        shown = result.result.upper() if result.result in _PROBLEMS else result.result
        cells = [
            result.name.ljust(widths[0]),
            _paint(shown.ljust(widths[1]), _RESULT_COLORS.get(result.result), color),
            policy.mode(result.name).ljust(widths[2]),
            safe(result.reason),
        ]
        lines.append("  ".join(cells).rstrip())
        if result.result in _PROBLEMS:
            for line in _evidence_lines(result):
                if line not in shown_evidence:
                    shown_evidence.add(line)
                    lines.append(f"  {safe(line)}")
    lines.append("")
    lines.append(_verdict_line(report, policy, decision, config, color=color))
    return "\n".join(lines)


def _verdict_line(
    report: GreetingReport,
    policy: GreetingPolicy,
    decision: Decision,
    config: ServerConfig,
    *,
    color: bool,
) -> str:
    """``verdict: accept (why)`` or ``verdict: reject -> 550 5.7.1 ...``."""
    action = _paint(decision.action, _ACTION_COLORS[decision.action], color)
    ip = report.greeting.client_ip
    if decision.action != "accept":
        return f"verdict: {action} -> {safe(str(decision.reply))}"
    preset = config.greeting.policy
    network = _trusted_network(policy, ip)
    if network is not None:
        why = f"{ip} is in the trusted network {network}: the server skips the checks"
    elif not policy.enabled_checks:
        why = f"policy {preset}: no check runs"
    elif not policy.enforcing:
        why = f"policy {preset}: nothing is refused"
    else:
        why = f"policy {preset}: no check that can refuse failed"
    return f"verdict: {action} ({why})"


def _trusted_network(policy: GreetingPolicy, ip: str) -> str | None:
    """The first trusted network holding ``ip``, or None."""
    address = ipaddress.ip_address(ip)
    for network in policy.trusted_networks:
        if network.version == address.version and address in network:
            return str(network)
    return None


def _lookup_line(lookup: dict[str, Any]) -> str:
    """``A mail.example.org -> 198.51.100.4 (via CNAME a.example -> b.example)``."""
    answers = lookup.get("answers") or []
    if answers:
        found = ", ".join(str(a) for a in answers)
    elif lookup.get("nxdomain"):
        found = "NXDOMAIN"
    else:
        found = "no records"
    line = f"{lookup.get('type', '?')} {lookup.get('name', '?')} -> {found}"
    cnames = lookup.get("cnames") or []
    if cnames:
        line += f" (via CNAME {' -> '.join(str(c) for c in cnames)})"
    return line


def _evidence_lines(result: CheckResult) -> list[str]:
    """The evidence of a failed check, one short line per fact."""
    lines: list[str] = []
    for key, value in result.evidence.items():
        if key in ("client_ip", "spf") or value in (None, [], {}, ""):
            continue  # the reason says these already
        if key == "lookups" and isinstance(value, list):
            for item in value:
                lines.append(_lookup_line(item) if isinstance(item, dict) else str(item))
        elif key == "checks" and isinstance(value, list):  # iprev: each PTR name's addresses
            for item in value:
                if not isinstance(item, dict):
                    lines.append(str(item))
                elif "error" in item:
                    lines.append(f"A/AAAA {item.get('name')} -> {item['error']}")
                else:
                    found = ", ".join(item.get("addresses") or []) or "no addresses"
                    mark = "confirmed" if item.get("confirmed") else "does not match"
                    lines.append(f"A/AAAA {item.get('name')} -> {found} ({mark})")
        elif key == "ptr" and isinstance(value, list):  # iprev, ptr_match: the PTR names
            names = ", ".join(str(v) for v in value)
            client = result.evidence.get("client_ip")
            lines.append(f"PTR {client} -> {names}" if client else f"confirmed PTR: {names}")
        elif isinstance(value, list):
            lines.append(f"{key}: {', '.join(str(v) for v in value)}")
        elif isinstance(value, dict):
            lines.append(f"{key}: {json.dumps(value, ensure_ascii=False, default=str)}")
        else:
            lines.append(f"{key}: {value}")
    return lines
