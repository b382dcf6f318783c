"""The HTTPS fetch of an MTA-STS policy body (RFC 8461 section 3.3), over aiohttp.

``Fetcher.fetch(host)`` gets ``https://HOST[:PORT]/.well-known/mta-sts.txt``
and returns its text, or raises ``PolicyFetchError`` with a one-line reason:
the certificate does not verify for ``host``, a redirect (never followed), a
status other than 200, a media type other than ``text/plain``, a body over
64 KiB, no answer within the timeout, or any connection failure. Names are
resolved by ``ResolverAdapter``, which answers aiohttp's lookups with
``ehlo.dns.Resolver``: the system resolver is never asked. No HTTP cache, no
cookies, no proxy from the environment.

Only ``ehlo.delivery.mtasts`` imports this module, when it first fetches a
policy, so that importing ehlo never loads aiohttp.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl

import aiohttp
import aiohttp.abc

from ..dns import DNSTempError, Resolver
from .mtasts import MAX_POLICY_SIZE, WELL_KNOWN_PATH, PolicyFetchError

__all__ = ["Fetcher", "ResolverAdapter"]

_FAMILY_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}
_READ_CHUNK = 16 * 1024


class ResolverAdapter(aiohttp.abc.AbstractResolver):
    """aiohttp's host name lookups, answered by ehlo's resolver (its servers, its cache)."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            try:
                addresses = await self._resolver.addresses(
                    host, version=_FAMILY_VERSION.get(family)
                )
            except DNSTempError as exc:
                raise OSError(str(exc)) from None
        if not addresses:
            raise OSError(f"{host} has no address")
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
            }
            for address in addresses
        ]

    async def close(self) -> None:
        """Nothing to release: the resolver belongs to the caller."""


def _describe(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
        if isinstance(cause, ssl.SSLCertVerificationError) and cause.verify_message:
            why = cause.verify_message.rstrip(".")
            return f"certificate does not verify for {exc.host}: {why}"
        return f"certificate does not verify for {exc.host}: {cause}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    return f"{type(exc).__name__}: {exc}"


class Fetcher:
    """Policy bodies over HTTPS; one connection pool, made on first use in the running loop."""

    def __init__(
        self,
        resolver: Resolver,
        *,
        port: int,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
    ) -> None:
        self.resolver = resolver
        self.port = port
        self.ssl_context = ssl_context
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=ResolverAdapter(self.resolver),
                use_dns_cache=False,  # the resolver keeps its own TTL cache
                # RFC 8461 section 3.3: the certificate must verify for the policy host.
                ssl=self.ssl_context if self.ssl_context is not None else True,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        return self._session

    def url(self, host: str) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://{host}{port}{WELL_KNOWN_PATH}"

    async def fetch(self, host: str) -> str:
        """The policy text served for ``host``; ``PolicyFetchError`` with the reason if none."""
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._get(host)
        except TimeoutError:
            raise PolicyFetchError(f"no answer within {self.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise PolicyFetchError(_describe(exc)) from None
        except OSError as exc:
            raise PolicyFetchError(f"{host}: {exc.strerror or exc}") from None
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise PolicyFetchError("the policy is not UTF-8 text") from None

    async def _get(self, host: str) -> bytes:
        # RFC 8461 section 3.3: redirects are not followed, and no HTTP cache is used.
        async with self._client().get(
            self.url(host), allow_redirects=False, headers={"Accept": "text/plain"}
        ) as response:
            if 300 <= response.status < 400:
                where = response.headers.get("Location", "nowhere")
                raise PolicyFetchError(f"HTTP {response.status} redirect to {where} not followed")
            if response.status != 200:
                raise PolicyFetchError(f"HTTP status {response.status}, not 200")
            # RFC 8461 section 3.3: the policy is served as text/plain.
            if response.content_type != "text/plain":
                raise PolicyFetchError(f"media type {response.content_type}, not text/plain")
            too_big = f"the policy is larger than {MAX_POLICY_SIZE // 1024} KiB"
            if (response.content_length or 0) > MAX_POLICY_SIZE:
                raise PolicyFetchError(too_big)
            body = bytearray()
            async for chunk in response.content.iter_chunked(_READ_CHUNK):
                body += chunk
                if len(body) > MAX_POLICY_SIZE:
                    raise PolicyFetchError(too_big)
            return bytes(body)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
