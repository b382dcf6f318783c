"""The HTTP service: where it listens, who may use it, and what every answer carries.

A real ``ehlo serve`` subprocess (the flags, the default address busy, an
explicit address busy, an address beyond loopback, ``--http-auth`` with a
user of the users file over HTTPS) and the embedded ``Server(http=...)``
(health, security headers, the origin check, the OpenAPI document), with
aiohttp as the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from ehlo import Server
from ehlo.cli import build_parser
from ehlo.cli.serve import _serve_config
from ehlo.config import HTTP_DEFAULT, ConfigError, Listen, ServerConfig, load_config

from .helpers import free_port, greets, make_config, wait_until

TIMEOUT = 60.0


def _serve(tmp_path: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "ehlo", "serve",
        "--data", str(tmp_path / "data"),
        "--hostname", "mx.test",
        "--no-reverse-dns", "--helo-policy", "off",
        *args,
    ]  # fmt: skip


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _serve(tmp_path, *args), capture_output=True, text=True, timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@contextlib.contextmanager
def _serving(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """``ehlo serve ARGS`` on a free SMTP port until it greets; (process, its log, the port)."""
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            _serve(tmp_path, "--listen", f"127.0.0.1:{port}", "--workers", "1", *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:

            def ready() -> bool:
                assert proc.poll() is None, log.read_text()
                return greets(port) and " ready on " in log.read_text()

            wait_until(ready, lambda: f"ehlo serve to start: {log.read_text()}", TIMEOUT)
            yield proc, log, port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line of stderr, an ``ehlo: error:``; no traceback."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ehlo: error: "), result.stderr
    return lines[0]


@contextlib.contextmanager
def _occupied(host: str, port: int) -> Iterator[bool]:
    """Hold ``host``:``port`` (True), or find it held by someone else already (False)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            yield False  # busy anyway (another server on this machine)
            return
        sock.listen()
        yield True
    finally:
        sock.close()


# --------------------------------------------------------------------------
# Configuration and flags


def _config(*argv: str) -> ServerConfig:
    return _serve_config(build_parser("serve").parse_args(["serve", *argv]))


def test_flags_make_the_http_keys() -> None:
    config = _config()
    assert config.http is None and config.http_enabled
    assert config.http_address == HTTP_DEFAULT == Listen("127.0.0.1", 8025)
    config = _config("--http", "127.0.0.1:9025", "--http-auth")
    assert config.http == Listen("127.0.0.1", 9025)
    assert config.http_auth and not config.http_insecure
    assert not _config("--no-http").http_enabled
    # The last of --http and --no-http counts.
    assert not _config("--http", "127.0.0.1:9025", "--no-http").http_enabled
    assert _config("--no-http", "--http", "127.0.0.1:9025").http_enabled
    assert _config("--http-insecure").http_insecure


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ('"nowhere"', "config key http:"),
        ('"127.0.0.1:8025,tls"', "config key http: listener options"),
        ("8025", "config key http: expected"),
    ],
)
def test_a_bad_http_key_is_one_line(tmp_path: Path, value: str, says: str) -> None:
    path = tmp_path / "ehlo.toml"
    path.write_text(f"http = {value}\n")
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        load_config(path)


# --------------------------------------------------------------------------
# ehlo serve: where the web UI listens


def test_serve_logs_the_url_and_answers_healthz(tmp_path: Path) -> None:
    http_port = free_port()
    with _serving(tmp_path, "--http", f"127.0.0.1:{http_port}", "--no-tls") as (_, log, _port):
        url = f"http://127.0.0.1:{http_port}/"
        assert f"web UI and API on {url}" in log.read_text()

        async def health() -> tuple[int, object]:
            async with aiohttp.ClientSession() as http, http.get(url + "healthz") as response:
                return response.status, await response.json()

        assert asyncio.run(health()) == (200, {"status": "ok"})


def test_no_http_serves_smtp_only(tmp_path: Path) -> None:
    http_port = free_port()
    with _serving(tmp_path, "--http", f"127.0.0.1:{http_port}", "--no-http", "--no-tls") as (
        _,
        log,
        _port,
    ):
        assert "web UI" not in log.read_text()
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", http_port), 2):
            pass


def test_the_default_address_busy_is_one_warning_and_smtp_serves(tmp_path: Path) -> None:
    with (
        _occupied(HTTP_DEFAULT.host, HTTP_DEFAULT.port),
        _serving(tmp_path, "--no-tls") as (_, log, port),
    ):
        text = log.read_text()
        warnings = [line for line in text.splitlines() if "web UI" in line]
        assert len(warnings) == 1, text
        assert (
            " WARNING web UI and API not started: cannot listen on 127.0.0.1:8025:" in (warnings[0])
        )
        assert "address already in use" in warnings[0]
        assert greets(port)


@pytest.mark.parametrize("where", ["flag", "file"])
def test_an_explicit_address_busy_is_an_error(tmp_path: Path, where: str) -> None:
    port = free_port()
    args = ["--listen", f"127.0.0.1:{free_port()}", "--no-tls"]
    if where == "flag":
        args += ["--http", f"127.0.0.1:{port}"]
    else:
        config = tmp_path / "ehlo.toml"
        config.write_text(f'http = "127.0.0.1:{port}"\n')
        args += ["--config", str(config)]
    with _occupied("127.0.0.1", port):
        result = _run(tmp_path, *args)
    assert _error_line(result) == (
        f"ehlo: error: web UI: cannot listen on 127.0.0.1:{port}: address already in use"
    )


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_beyond_loopback_without_auth_is_refused(tmp_path: Path, host: str) -> None:
    result = _run(
        tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--http", f"{host}:0", "--no-tls"
    )
    line = _error_line(result)
    assert line.startswith(f"ehlo: error: web UI on {host}:0 is reachable beyond loopback")
    assert "--http-auth" in line and "--http-insecure" in line
    assert not (tmp_path / "data").exists()  # refused before anything was written


def test_http_auth_needs_tls(tmp_path: Path) -> None:
    result = _run(
        tmp_path, "--listen", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
        "--http-auth", "--no-tls",
    )  # fmt: skip
    assert "--http-auth needs TLS" in _error_line(result)


def test_http_auth_is_https_with_a_user_of_the_users_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    added = subprocess.run(
        [sys.executable, "-m", "ehlo", "users", "add", "alice", "--data", str(data)],
        input="s3cret\n", capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    http_port = free_port()
    with _serving(tmp_path, "--http", f"127.0.0.1:{http_port}", "--http-auth") as (_, log, _p):
        url = f"https://127.0.0.1:{http_port}"
        assert f"web UI and API on {url}/" in log.read_text()
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE

        async def check() -> None:
            connector = aiohttp.TCPConnector(ssl=tls)
            async with aiohttp.ClientSession(connector=connector) as http:
                api = f"{url}/api/v1/openapi.json"
                async with http.get(api) as response:
                    assert response.status == 401
                    assert response.headers["WWW-Authenticate"].startswith('Basic realm="ehlo"')
                    assert (await response.json())["error"]["status"] == 401
                wrong = {"Authorization": aiohttp.encode_basic_auth("alice", "wrong")}
                async with http.get(api, headers=wrong) as response:
                    assert response.status == 401
                nobody = {"Authorization": aiohttp.encode_basic_auth("mallory", "s3cret")}
                async with http.get(api, headers=nobody) as response:
                    assert response.status == 401
                right = {"Authorization": aiohttp.encode_basic_auth("alice", "s3cret")}
                for _ in range(3):  # the page's many requests: one hash, then remembered
                    async with http.get(api, headers=right) as response:
                        assert response.status == 200
                        assert (await response.json())["openapi"] == "3.1.0"
                async with http.get(f"{url}/healthz") as response:
                    assert response.status == 200  # open: tells only "ok"
            # Plain HTTP gets no answer from an HTTPS port.
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{http_port}/healthz") as response:
                        await response.read()

        asyncio.run(check())


# --------------------------------------------------------------------------
# The embedded server: Server(http=...)


@pytest.fixture
async def web(tmp_path: Path) -> AsyncIterator[tuple[Server, str]]:
    server = Server(make_config(tmp_path / "data", tls=False), http=("127.0.0.1", 0))
    await server.start()
    assert server.http is not None
    try:
        yield server, server.http.url.rstrip("/")
    finally:
        await server.stop(timeout=1.0)
    assert server.http is None


async def test_embedded_healthz_and_security_headers(web: tuple[Server, str]) -> None:
    _, url = web
    async with aiohttp.ClientSession() as http:
        for path in ("/healthz", "/api/v1/healthz", "/api/v1/no-such-thing"):
            async with http.get(url + path) as response:
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert response.headers["Referrer-Policy"] == "no-referrer"
                assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
                body = await response.json()
                if path.endswith("healthz"):
                    assert (response.status, body) == (200, {"status": "ok"})
                else:
                    assert response.status == 404 and body["error"]["status"] == 404


async def test_a_state_changing_request_from_another_origin_is_refused(
    web: tuple[Server, str],
) -> None:
    _, url = web
    api = f"{url}/api/v1/messages"
    async with aiohttp.ClientSession() as http:
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": url.replace("127.0.0.1", "localhost")},
            {"Origin": "null"},
            {"Sec-Fetch-Site": "cross-site"},
        ):
            for method in ("DELETE", "POST", "PUT", "PATCH"):
                async with http.request(method, api, headers=headers) as response:
                    assert response.status == 403, (method, headers)
                    body = await response.json()
                    assert body["error"]["status"] == 403
                    assert response.headers["X-Content-Type-Options"] == "nosniff"
        # The page itself, and a reading request from anywhere, pass the check.
        for headers in ({"Origin": url}, {"Sec-Fetch-Site": "same-origin"}, {}):
            async with http.delete(api, headers=headers) as response:
                assert response.status != 403, headers
        async with http.get(f"{url}/healthz", headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 200


# Every endpoint of the API contract (all of it, whichever module serves it).
CONTRACT = {
    "/api/v1/messages": {"get", "delete"},
    "/api/v1/messages/{id}": {"get", "delete"},
    "/api/v1/messages/{id}/raw": {"get"},
    "/api/v1/messages/{id}/parts/{n}": {"get"},
    "/api/v1/messages/{id}/html": {"get"},
    "/api/v1/messages/{id}/text": {"get"},
    "/api/v1/wait": {"get"},
    "/api/v1/events": {"get"},
    "/api/v1/sessions": {"get"},
    "/api/v1/overview": {"get"},
    "/api/v1/metrics": {"get"},
    "/metrics": {"get"},
    "/healthz": {"get"},
    "/api/v1/healthz": {"get"},
    "/api/v1/openapi.json": {"get"},
    "/": {"get"},
}


async def test_the_openapi_document_describes_every_endpoint(web: tuple[Server, str]) -> None:
    _, url = web
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{url}/api/v1/openapi.json") as response,
    ):
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/json")
        doc = json.loads(await response.read())
    assert doc["openapi"] == "3.1.0"
    assert {path: set(ops) for path, ops in doc["paths"].items()} == CONTRACT
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and op["responses"], (method, path)
            for parameter in op.get("parameters", []):
                assert parameter["in"] in ("query", "path", "header")
                if parameter["in"] == "path":
                    assert "{" + parameter["name"] + "}" in path
            # Every reference names a schema of the document.
            for ref in _refs(op):
                assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert set(schemas["ListItem"]["required"]) >= {"id", "received_at", "subject", "rcpt_to"}
    wait = doc["paths"]["/api/v1/wait"]["get"]
    assert {"200", "400", "408"} <= set(wait["responses"])


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_beyond_loopback_is_refused_by_the_embedded_server_too(tmp_path: Path) -> None:
    server = Server(make_config(tmp_path / "data", tls=False), http=("0.0.0.0", 0))
    with pytest.raises(ValueError, match="reachable beyond loopback"):
        await server.start()
    assert server.http is None


async def test_a_good_login_is_hashed_once_then_remembered(tmp_path: Path) -> None:
    from ehlo.auth import UserStore
    from ehlo.storage import open_store
    from ehlo.web import WebContext
    from ehlo.web._service import HTTPService

    class Counted(UserStore):
        checks = 0

        def verify(self, name: str, password: str) -> bool:
            Counted.checks += 1
            return super().verify(name, password)

    users = Counted(tmp_path / "data")
    assert users.add("alice", "s3cret")
    store = open_store("sqlite", tmp_path / "data")
    await store.start()
    service = HTTPService(WebContext(store=store, users=users), host="127.0.0.1", port=0)
    await service.start()
    try:
        api = f"{service.url}api/v1/openapi.json"
        right = {"Authorization": aiohttp.encode_basic_auth("alice", "s3cret")}
        wrong = {"Authorization": aiohttp.encode_basic_auth("alice", "nope")}
        async with aiohttp.ClientSession() as http:
            for _ in range(5):
                async with http.get(api, headers=right) as response:
                    assert response.status == 200
            assert Counted.checks == 1
            for _ in range(2):  # a wrong password is checked every time
                async with http.get(api, headers=wrong) as response:
                    assert response.status == 401
            assert Counted.checks == 3
            for header in ("Basic", "Basic !!!", "Bearer x", "Basic " + "YWxpY2U="):
                async with http.get(api, headers={"Authorization": header}) as response:
                    assert response.status == 401, header
            assert Counted.checks == 3  # malformed: refused without a hash
    finally:
        await service.stop()
        await store.close()
