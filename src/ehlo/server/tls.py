"""TLS for the server: certificates, contexts, SNI, reloading, describing a session.

``ensure_self_signed`` makes (once, then reuses) an ECDSA P-256 certificate and
key in ``data_dir/tls`` for servers that were given none; ``server_context``
builds the server-side ``ssl.SSLContext`` from any PEM certificate and key and
turns every problem with them into a one-line ``TLSConfigError``;
``TLSContexts`` holds the default certificate and those chosen by SNI, and
reloads them all (SIGHUP) without touching sessions already running;
``describe`` reports the negotiated version and cipher of a session (for
Received headers and logs). Every context offers the same key exchange
groups (:data:`TLS_GROUPS`) and TLS 1.2 suites, whatever the certificate.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import functools
import ipaddress
import logging
import os
import secrets
import ssl
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from ..storage.base import ensure_data_dir

if TYPE_CHECKING:  # cryptography (16 MiB) is imported by the functions that need it
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "CERT_VALIDITY",
    "TLS_GROUPS",
    "TLSConfigError",
    "TLSContexts",
    "certificate_names",
    "describe",
    "ensure_self_signed",
    "server_context",
]

log = logging.getLogger(__name__)

# How long a self-signed certificate is valid.
CERT_VALIDITY = dt.timedelta(days=365)
# Tolerance for clients whose clocks are a little behind ours.
_BACKDATE = dt.timedelta(minutes=5)
# A certificate this close to expiry is replaced rather than reused.
_RENEW_MARGIN = dt.timedelta(days=1)

# TLS 1.2 suites with forward secrecy and AEAD only (Mozilla "intermediate");
# TLS 1.3 suites are all fine and are configured by OpenSSL separately. No
# DHE suites: they need Diffie-Hellman parameters, which the contexts do not
# load, so OpenSSL would never choose them (ECDHE only, and said so).
_TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)

# Key exchange groups, in the server's order of preference (Mozilla
# "intermediate"): OpenSSL's default list adds X448, P-521 and, in TLS 1.3,
# the finite-field groups.
TLS_GROUPS = ("X25519", "P-256", "P-384")
# SSL_CTRL_SET_GROUPS_LIST (ssl.h): what the SSL_CTX_set1_groups_list macro calls.
_SSL_CTRL_SET_GROUPS_LIST = 92


class TLSConfigError(ValueError):
    """A certificate or key that cannot be used; the message is one line naming the file."""


# --------------------------------------------------------------------------
# Self-signed certificate


def ensure_self_signed(
    data_dir: Path, hostname: str, *, now: dt.datetime | None = None
) -> tuple[Path, Path]:
    """Return ``(cert, key)`` in ``data_dir/tls``, creating them when needed.

    An existing pair is reused while it is valid, its key matches and it was
    made for ``hostname``; otherwise (first run, expired, another host name,
    damaged files) a new ECDSA P-256 key and a certificate valid for
    ``CERT_VALIDITY`` are written atomically, both with mode 0600 in a
    folder with mode 0700 (the data folder is made 0700 if it is missing).
    ``now`` (an aware datetime) is for tests.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    when = now or dt.datetime.now(dt.UTC)
    name = _normalize_hostname(hostname)
    tls_dir = data_dir / "tls"
    cert_path, key_path = tls_dir / "cert.pem", tls_dir / "key.pem"
    try:
        ensure_data_dir(data_dir)
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        with _locked(tls_dir / ".lock"):
            if _reusable(cert_path, key_path, name, when):
                for path in (cert_path, key_path):
                    if path.stat().st_mode & 0o077:
                        path.chmod(0o600)
                return cert_path, key_path
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _build_certificate(key, name, when)
            _write_atomically(
                key_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                mode=0o600,
            )
            # Public, but nothing in the data folder is anyone else's business.
            _write_atomically(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
    except OSError as exc:
        raise TLSConfigError(
            f"cannot create a self-signed certificate in {tls_dir}: {exc.strerror or exc}"
        ) from None
    log.info("created self-signed TLS certificate for %s in %s", name, cert_path)
    return cert_path, key_path


def _normalize_hostname(hostname: str) -> str:
    name = hostname.strip().rstrip(".").lower()
    if not name:
        raise TLSConfigError("TLS certificate: empty host name")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise TLSConfigError(f"TLS certificate: bad host name {hostname!r}") from None
    return name


def _subject_alt_names(name: str) -> list[x509.GeneralName]:
    from cryptography import x509

    try:
        return [x509.IPAddress(ipaddress.ip_address(name))]
    except ValueError:
        pass
    names: list[x509.GeneralName] = [x509.DNSName(name)]
    if name == "localhost":
        names += [
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
    return names


def _build_certificate(
    key: ec.EllipticCurvePrivateKey, name: str, when: dt.datetime
) -> x509.Certificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1)
        .not_valid_before(when - _BACKDATE)
        .not_valid_after(when + CERT_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(name)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _reusable(cert_path: Path, key_path: Path, name: str, when: dt.datetime) -> bool:
    """True when the stored pair is readable, matching, current and made for ``name``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    if cert.public_key() != key.public_key():
        return False
    if not cert.not_valid_before_utc <= when < cert.not_valid_after_utc - _RENEW_MARGIN:
        return False
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [attr.value for attr in common_names] != [name]:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return set(san) == set(_subject_alt_names(name))


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialize certificate creation between processes sharing a data folder."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Server context


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context for ``cert`` and ``key`` (PEM): TLS 1.2 or newer, AEAD
    ciphers with forward secrecy, no compression, no renegotiation.

    Raises ``TLSConfigError`` when a file is missing or unreadable, is not PEM,
    holds an encrypted key, or when the key does not match the certificate.
    """
    for path, what in ((cert, "certificate"), (key, "key")):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise TLSConfigError(f"TLS {what} {path}: {exc.strerror or exc}") from None

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_SINGLE_DH_USE
        | ssl.OP_NO_RENEGOTIATION
    )
    ctx.set_ciphers(_TLS12_CIPHERS)
    _set_groups(ctx, TLS_GROUPS)

    def no_password() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal.
        raise TLSConfigError(f"TLS key {key}: encrypted private keys are not supported")

    try:
        ctx.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        raise TLSConfigError(_diagnose(cert, key, exc)) from None
    return ctx


def _set_groups(ctx: ssl.SSLContext, groups: tuple[str, ...]) -> None:
    """Offer only ``groups`` for key exchange (TLS 1.2 ECDHE and TLS 1.3).

    Python's ``ssl`` (3.11) sets one curve at most (``set_ecdh_curve``), so
    the list goes to OpenSSL's ``SSL_CTX_set1_groups_list`` directly, in the
    ``libssl`` the ``_ssl`` module is linked with. Where that cannot be done
    safely (another Python implementation, a statically linked ``_ssl``), the
    context keeps OpenSSL's default groups and a warning says so once.
    """
    libssl = _libssl()
    pointer = _ssl_ctx_pointer(ctx, libssl) if libssl is not None else None
    if libssl is None or pointer is None:
        _warn_default_groups()
        return
    names = ":".join(groups)
    if libssl.ctrl(pointer, _SSL_CTRL_SET_GROUPS_LIST, 0, names.encode("ascii")) != 1:
        raise TLSConfigError(f"TLS: OpenSSL refuses the key exchange groups {names}")


class _LibSSL:
    """The two libssl functions :func:`_set_groups` calls."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.ctrl = library.SSL_CTX_ctrl
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
        self.get_options = library.SSL_CTX_get_options
        self.get_options.restype = ctypes.c_uint64
        self.get_options.argtypes = [ctypes.c_void_p]


@functools.cache
def _libssl() -> _LibSSL | None:
    """The libssl of Python's ``_ssl`` module, or None when it cannot be reached."""
    import _ssl

    path = getattr(_ssl, "__file__", None)
    if sys.implementation.name != "cpython" or not path:
        return None
    try:
        # The extension module's handle also finds the symbols of its libssl.
        return _LibSSL(ctypes.CDLL(path))
    except (OSError, AttributeError):
        return None


def _ssl_ctx_pointer(ctx: ssl.SSLContext, libssl: _LibSSL) -> int | None:
    """The ``SSL_CTX *`` of ``ctx``, or None when it cannot be found for sure.

    A CPython context object starts with the object header, then that
    pointer. It is trusted only when OpenSSL reads through it the very
    options Python reports, before and after one of them is flipped.
    """
    value = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not value:
        return None
    original = ctx.options
    if libssl.get_options(value) != original:
        return None
    ctx.options = original ^ ssl.OP_NO_TICKET
    try:
        if libssl.get_options(value) != ctx.options:
            return None
    finally:
        ctx.options = original
    return int(value)


@functools.cache
def _warn_default_groups() -> None:
    log.warning(
        "TLS: cannot restrict the key exchange groups to %s here: OpenSSL's defaults apply",
        ", ".join(TLS_GROUPS),
    )


def _diagnose(cert: Path, key: Path, exc: ssl.SSLError) -> str:
    """Name the file at fault after ``load_cert_chain`` failed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return f"TLS certificate {cert}: not a PEM certificate"
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except TypeError:
        return f"TLS key {key}: encrypted private keys are not supported"
    except (OSError, ValueError):
        private = None
    if "KEY_VALUES_MISMATCH" in str(exc) or (
        private is not None and private.public_key() != certificate.public_key()
    ):
        return f"TLS key {key} does not match certificate {cert}"
    if private is None:
        return f"TLS key {key}: not a PEM private key"
    return f"TLS certificate {cert} with key {key}: {exc.reason or exc}"


# --------------------------------------------------------------------------
# Several certificates (SNI) and reloading


def certificate_names(cert: Path) -> list[str]:
    """The DNS names a certificate is for (its SANs; the CN when it has none), lower case."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        certificate = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        raise TLSConfigError(f"TLS certificate {cert}: not a PEM certificate") from None
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [
            str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return [n.lower().rstrip(".") for n in names if n]


_Contexts = tuple[ssl.SSLContext, dict[str, ssl.SSLContext], dict[str, ssl.SSLContext]]


class TLSContexts:
    """The server's certificates: a default pair and more chosen by SNI.

    ``context`` is the one context every handshake starts with (listeners and
    STARTTLS use it); its SNI callback hands each handshake the context of
    the certificate for the name the client asked for (RFC 6066 section 3),
    else the default one. ``reload()`` reads every file again and swaps the
    contexts in one assignment: new handshakes get the new certificates,
    sessions already running keep theirs, and a bad file keeps the old set.
    """

    def __init__(self, default: tuple[Path, Path], sni: tuple[tuple[Path, Path], ...] = ()) -> None:
        self._default_pair = default
        self._sni_pairs = sni
        self._current = self._load()
        self.context = server_context(*default)
        self.context.sni_callback = self._choose
        self.reloads = 0

    def _load(self) -> _Contexts:
        default = server_context(*self._default_pair)
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        for cert, key in self._sni_pairs:
            ctx = server_context(cert, key)
            for name in certificate_names(cert):
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], ctx)
                else:
                    exact.setdefault(name, ctx)
        return default, exact, wildcard

    def _choose(
        self, sslobj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        default, exact, wildcard = self._current
        chosen = default
        if server_name:
            name = server_name.lower().rstrip(".")
            # RFC 6125 section 6.4.3: a wildcard stands for one whole left-most label.
            chosen = exact.get(name) or wildcard.get(name.partition(".")[2]) or default
        sslobj.context = chosen

    def names(self) -> list[str]:
        """The names served by SNI certificates."""
        _, exact, wildcard = self._current
        return sorted([*exact, *(f"*.{n}" for n in wildcard)])

    def reload(self) -> None:
        """Read every certificate and key again; TLSConfigError keeps the current set."""
        self._current = self._load()
        self.reloads += 1


# --------------------------------------------------------------------------
# Describing a session


def describe(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, str]:
    """The negotiated TLS of a session, e.g.
    ``{"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "bits": "256"}``.

    Raises ``ValueError`` before the handshake has completed.
    """
    version = ssl_object.version()
    cipher = ssl_object.cipher()
    if version is None or cipher is None:
        raise ValueError("TLS handshake not complete")
    name, _protocol, bits = cipher
    return {"version": version, "cipher": name, "bits": str(bits)}
