"""The throw-away services `fastgate demo` starts next to the gateway, all on 127.0.0.1.

A development identity provider (discovery + JWKS for a :class:`fastgate.tools.devtoken.DevKey`),
an echo upstream, the gateway's listening socket (never SO_REUSEPORT) and, for ``--tls``, a
one-day CA and server certificate (:func:`write_demo_pki`, also used by tests and benchmarks).
``fastgate.tools.demo`` runs them and re-exports these names.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from fastgate.tools.devtoken import DevKey

__all__ = ["HOST", "bind_listener", "start_echo", "start_issuer", "write_demo_pki"]

HOST = "127.0.0.1"
ECHO_TOKEN_CHARS = 32  # the echo shows this much of an Authorization value


# ---------------------------------------------------------------------------------------------
# Development issuer, echo upstream, the gateway's socket
# ---------------------------------------------------------------------------------------------


async def _serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    sockname: Any = runner.addresses[0]
    return runner, int(sockname[1])


async def start_issuer(key: DevKey) -> tuple[web.AppRunner, str]:
    """The dev issuer: discovery + JWKS on an ephemeral port. Returns (runner, issuer URL)."""
    state: dict[str, str] = {}
    jwks = orjson.dumps({"keys": [key.public_jwk()]})

    async def discovery(request: web.Request) -> web.Response:
        issuer = state["issuer"]
        doc = {
            "issuer": issuer,  # OIDC Discovery 1.0 §4.3: must equal the configured issuer
            "jwks_uri": issuer + "/jwks",
            "id_token_signing_alg_values_supported": [key.alg],
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
        }
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def keys(request: web.Request) -> web.Response:
        return web.Response(body=jwks, content_type="application/jwk-set+json",
                            headers={"Cache-Control": "public, max-age=300"})

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", keys)
    runner, port = await _serve(app)
    state["issuer"] = f"http://{HOST}:{port}"
    return runner, state["issuer"]


async def start_echo() -> tuple[web.AppRunner, str]:
    """An upstream that answers with what it received (pretty JSON, for humans and tests)."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        headers: dict[str, str] = {}
        for key, value in request.headers.items():
            name = str(key)  # aiohttp's istr: orjson wants exact str keys
            if name.lower() == "authorization" and len(value) > ECHO_TOKEN_CHARS:
                # Shown shortened for readability; the upstream got it byte for byte.
                value = f"{value[:ECHO_TOKEN_CHARS]}...({len(value)} chars)"
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        doc = {"upstream": "echo", "method": request.method, "path": request.path,
               "query": request.query_string, "headers": headers, "body_bytes": len(body)}
        return web.Response(body=orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n",
                            content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner, port = await _serve(app)
    return runner, f"http://{HOST}:{port}"


def bind_listener(port: int) -> tuple[socket.socket, str | None]:
    """A listening socket on 127.0.0.1:port, or on a free port if that one is taken.

    No SO_REUSEPORT: with it, a second process would silently share a port a running gateway
    already serves, and half the demo's requests would go there."""
    note: str | None = None
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if port == 0 or exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            sock.bind((HOST, 0))
            note = f"port {port} is busy; the gateway uses {sock.getsockname()[1]} instead"
        sock.listen(2048)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, note


# ---------------------------------------------------------------------------------------------
# --tls: a throw-away PKI
# ---------------------------------------------------------------------------------------------


def write_demo_pki(directory: Path) -> tuple[Path, Path, Path]:
    """``--tls``: a throw-away CA and an ECDSA P-256 certificate for 127.0.0.1 and localhost,
    valid for a day: ``(ca.pem, gateway.crt, gateway.key)`` in ``directory`` (key 0600)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastgate demo CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            # RFC 6125 §6: clients match the name in subjectAltName, not in the CN.
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = (directory / "ca.pem", directory / "gateway.crt",
                                    directory / "gateway.key")
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return ca_path, cert_path, key_path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
