"""TLS at both ends on real sockets over 127.0.0.1 (SPEC §2 ``tls``, ``upstreams.*.tls``,
``timeouts.handshake``).

A throw-away PKI is made with ``cryptography`` once per module: an ECDSA P-256 root CA, leaf
certificates (RSA 2048 and ECDSA P-256, an expired one, one for another host, one from an
untrusted CA) and a client certificate. The gateway terminates TLS with uvloop's transport
under the same HTTP protocol; upstreams are aiohttp servers on ``web.TCPSite(ssl_context=)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

import fastgate.dataplane.tls as fastgate_tls
from fastgate.app import Gateway
from fastgate.config import (
    GatewayConfig,
    RouteConfig,
    RouteMatch,
    Timeouts,
    TlsCertificate,
    TlsConfig,
    UpstreamConfig,
    UpstreamTlsConfig,
)
from fastgate.dataplane.tls import ListenerTLS
from fastgate.errors import ConfigError
from fastgate.ops.metrics import Metrics
from tests.gateway_fixtures import (
    EchoUpstream,
    Loop,
    RawResponse,
    http_request,
    read_response,
    start_gateway,
)

UTC = datetime.UTC
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# ---------------------------------------------------------------------------------------------
# The test PKI
# ---------------------------------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path
    serial: int


@dataclass
class Pki:
    root: Path
    ca: Path  # the trusted CA bundle (PEM)
    other_ca: Path  # a CA nobody here trusts
    rsa: Issued  # rsa.test, 127.0.0.1 — RSA 2048
    ecdsa: Issued  # ec.test — ECDSA P-256
    expired: Issued  # expired.test, localhost — validity ended yesterday
    other_host: Issued  # other.test
    untrusted: Issued  # localhost, 127.0.0.1 — issued by other_ca
    upstream: Issued  # localhost, 127.0.0.1, up.test — ECDSA, for https upstreams
    client: Issued  # a client certificate (extendedKeyUsage clientAuth)
    rogue_client: Issued  # a client certificate from other_ca
    _ca_key: ec.EllipticCurvePrivateKey
    _ca_cert: x509.Certificate

    def issue(self, name: str, *, kind: str = "ec", sans: tuple[str, ...] = (),
              days: float = 1.0, expired: bool = False, client: bool = False,
              ca_key: ec.EllipticCurvePrivateKey | None = None,
              ca_cert: x509.Certificate | None = None) -> Issued:
        return _issue(self.root, name, kind=kind, sans=sans, days=days, expired=expired,
                      client=client, ca_key=ca_key or self._ca_key,
                      ca_cert=ca_cert or self._ca_cert)


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(root: Path, name: str, *, kind: str, sans: tuple[str, ...], days: float,
           expired: bool, client: bool, ca_key: ec.EllipticCurvePrivateKey,
           ca_cert: x509.Certificate) -> Issued:
    key: PrivateKey = rsa.generate_private_key(65537, 2048) if kind == "rsa" \
        else ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)
    if expired:
        start, end = now - datetime.timedelta(days=3), now - datetime.timedelta(days=1)
    import ipaddress

    alt: list[x509.GeneralName] = []
    for san in sans or (name,):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            alt.append(x509.DNSName(san))
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(serial)
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_key.public_key()), critical=False)
    )
    cert = builder.sign(ca_key, hashes.SHA256())
    stem = root / f"{name.replace('.', '_')}-{serial:x}"
    cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(_pem_key(key))
    return Issued(cert_path, key_path, serial)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _make_ca("fastgate test root")
    other_key, other_cert = _make_ca("somebody else's root")
    (root / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (root / "other-ca.pem").write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, **kw: Any) -> Issued:
        kw.setdefault("kind", "ec")
        kw.setdefault("sans", ())
        kw.setdefault("days", 1.0)
        kw.setdefault("expired", False)
        kw.setdefault("client", False)
        kw.setdefault("ca_key", ca_key)
        kw.setdefault("ca_cert", ca_cert)
        return _issue(root, name, **kw)

    return Pki(
        root=root, ca=root / "ca.pem", other_ca=root / "other-ca.pem",
        rsa=issue("rsa.test", kind="rsa", sans=("rsa.test", "127.0.0.1")),
        ecdsa=issue("ec.test"),
        expired=issue("expired.test", sans=("expired.test", "localhost", "127.0.0.1"),
                      expired=True),
        other_host=issue("other.test"),
        untrusted=issue("localhost", sans=("localhost", "127.0.0.1"), ca_key=other_key,
                        ca_cert=other_cert),
        upstream=issue("up.test", sans=("localhost", "127.0.0.1", "up.test")),
        client=issue("client-42", client=True),
        rogue_client=issue("rogue", client=True, ca_key=other_key, ca_cert=other_cert),
        _ca_key=ca_key, _ca_cert=ca_cert,
    )


# ---------------------------------------------------------------------------------------------
# Gateway and client helpers
# ---------------------------------------------------------------------------------------------


def tls_config(*certs: Issued | TlsCertificate, **kw: Any) -> TlsConfig:
    entries = tuple(c if isinstance(c, TlsCertificate) else TlsCertificate(str(c.cert),
                                                                           str(c.key))
                    for c in certs)
    return TlsConfig(certificates=entries, **kw)


def gateway_config(upstream_url: str, *, tls: TlsConfig | None,
                   upstream_tls: UpstreamTlsConfig | None = None,
                   handshake: float = 10.0, connect_timeout: float = 2.0) -> GatewayConfig:
    return GatewayConfig(
        admin=None,
        tls=tls,
        timeouts=Timeouts(handshake=handshake),
        upstreams={"app": UpstreamConfig("app", upstream_url, connect_timeout=connect_timeout,
                                         read_timeout=5.0, tls=upstream_tls)},
        routes=(RouteConfig("all", RouteMatch(path_prefix="/"), "app"),),
    )


def client_context(pki: Pki, *, cert: Issued | None = None, verify: bool = True,
                   max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols(["http/1.1"])
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


@dataclass
class TLSClient:
    """One TLS connection to the gateway (keep-alive: many requests)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def ssl_object(self) -> ssl.SSLObject:
        obj = self.writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        return obj

    def peer_certificate(self) -> x509.Certificate:
        der = self.ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    async def get(self, target: str = "/hello", *, close: bool = False) -> RawResponse:
        self.writer.write(http_request("GET", target, close=close))
        return await asyncio.wait_for(read_response(self.reader), 10)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def connect(port: int, ctx: ssl.SSLContext, server_name: str | None) -> TLSClient:
    # server_hostname=None with an IP address: no server_name extension (RFC 6066 §3).
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_name or "",
        ssl_handshake_timeout=5)
    return TLSClient(reader, writer)


async def fetch_once(port: int, ctx: ssl.SSLContext, server_name: str | None,
                     target: str = "/hello") -> tuple[RawResponse, x509.Certificate]:
    client = await connect(port, ctx, server_name)
    try:
        return await client.get(target, close=True), client.peer_certificate()
    finally:
        await client.close()


def metric(metrics: Metrics, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total


def cn(cert: x509.Certificate) -> str:
    value = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return value if isinstance(value, str) else value.decode()


# ---------------------------------------------------------------------------------------------
# Listener: certificates, SNI, versions, ALPN, X-Forwarded-Proto
# ---------------------------------------------------------------------------------------------


def test_rsa_and_ecdsa_certificates_chosen_by_sni(loop: Loop, echo: EchoUpstream,
                                                  pki: Pki) -> None:
    """RFC 6066 §3: the server_name picks the certificate (SAN names, explicit names and a
    one-label wildcard); no SNI or an unknown name gets the first one. ALPN says http/1.1
    (RFC 7301 §3) and TLS 1.3 is chosen when offered (RFC 8446)."""
    wild = TlsCertificate(str(pki.ecdsa.cert), str(pki.ecdsa.key),
                          ("ec.test", "*.wild.test"))
    config = gateway_config(echo.url, tls=tls_config(pki.rsa, wild))

    async def go() -> dict[str | None, tuple[int, str, type, str | None, str]]:
        gw = await start_gateway(config)
        out = {}
        try:
            for name in ("rsa.test", "ec.test", "a.wild.test", None, "unknown.test"):
                verify = name in ("rsa.test", "ec.test")  # the others: not their names
                resp, peer = await fetch_once(gw.port, client_context(pki, verify=verify),
                                              name)
                client = await connect(gw.port, client_context(pki, verify=verify), name)
                alpn, version = client.ssl_object.selected_alpn_protocol(), \
                    client.ssl_object.version() or ""
                await client.close()
                out[name] = (resp.status, cn(peer), type(peer.public_key()), alpn, version)
        finally:
            await gw.stop()
        return out

    seen = loop.run(go())
    assert seen["rsa.test"][:2] == (200, "rsa.test")
    assert issubclass(seen["rsa.test"][2], rsa.RSAPublicKey)
    assert seen["ec.test"][:2] == (200, "ec.test")
    assert issubclass(seen["ec.test"][2], ec.EllipticCurvePublicKey)
    assert seen["a.wild.test"][:2] == (200, "ec.test")
    assert seen[None][:2] == (200, "rsa.test")  # default: the first certificate
    assert seen["unknown.test"][:2] == (200, "rsa.test")
    assert {v[3] for v in seen.values()} == {"http/1.1"}
    assert {v[4] for v in seen.values()} == {"TLSv1.3"}
    # X-Forwarded-Proto: https on every forwarded request (RFC 9110 §4.3.4 / §7.2)
    assert echo.records and {tuple(r.header_values("X-Forwarded-Proto"))
                             for r in echo.records} == {("https",)}


def test_client_cannot_spoof_forwarded_proto_over_tls(loop: Loop, echo: EchoUpstream,
                                                      pki: Pki) -> None:
    config = gateway_config(echo.url, tls=tls_config(pki.ecdsa))

    async def go() -> int:
        gw = await start_gateway(config)
        try:
            client = await connect(gw.port, client_context(pki), "ec.test")
            client.writer.write(http_request("GET", "/x", [("X-Forwarded-Proto", "http")]))
            resp = await read_response(client.reader)
            await client.close()
            return resp.status
        finally:
            await gw.stop()

    assert loop.run(go()) == 200
    assert echo.records[-1].header_values("X-Forwarded-Proto") == ["https"]


def test_tls12_default_minimum_and_min_version_13(loop: Loop, echo: EchoUpstream,
                                                  pki: Pki) -> None:
    """Default: TLS 1.2 accepted (RFC 5246), 1.3 preferred; ``min_version: "1.3"`` refuses a
    TLS 1.2-only client in the handshake (RFC 8446 §4.2.1) and nothing is forwarded."""

    async def go(min_version: str) -> tuple[str, str]:
        gw = await start_gateway(gateway_config(
            echo.url, tls=tls_config(pki.ecdsa, min_version=min_version)))
        try:
            modern = await connect(gw.port, client_context(pki), "ec.test")
            v13 = modern.ssl_object.version() or ""
            await modern.close()
            try:
                old = await connect(gw.port, client_context(
                    pki, max_version=ssl.TLSVersion.TLSv1_2), "ec.test")
            except (ssl.SSLError, ConnectionError) as exc:
                # the server's protocol_version alert, or the reset that follows it
                return v13, f"refused: {type(exc).__name__}"
            v12 = old.ssl_object.version() or ""
            resp = await old.get(close=True)
            await old.close()
            return v13, f"{v12} {resp.status}"
        finally:
            await gw.stop()

    assert loop.run(go("1.2")) == ("TLSv1.3", "TLSv1.2 200")
    echo.clear()
    v13, refused = loop.run(go("1.3"))
    assert v13 == "TLSv1.3"
    assert refused.startswith("refused:")  # the same client that 1.2 accepted above
    assert echo.records == []


def _resuming_client(port: int, ctx: ssl.SSLContext, n: int,
                     session: ssl.SSLSession | None = None,
                     ) -> tuple[list[tuple[bool, bytes]], ssl.SSLSession | None]:
    """n connections, one request each, every one offering the session of the one before
    (as browsers and wrk do): (session_reused, status line) per connection, last session."""
    out: list[tuple[bool, bytes]] = []
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="ec.test", session=session) as conn:
            conn.sendall(http_request("GET", "/hello", close=True))
            data = b""
            while chunk := conn.recv(65536):  # until the gateway's close_notify
                data += chunk
            out.append((conn.session_reused, data.split(b"\r\n", 1)[0]))
            session = conn.session  # TLS 1.3: the ticket came after the handshake
    return out, session


@pytest.mark.parametrize("version", ["1.3", "1.2"])
def test_returning_client_resumes_from_the_server_session_cache(
        loop: Loop, echo: EchoUpstream, pki: Pki, served: tuple[Path, Path],
        version: str) -> None:
    """RFC 8446 §2.2 (PSK from a NewSessionTicket) / RFC 5246 §7.4.1.2 (session id): a
    returning client skips the certificate and signature. No tickets are issued
    (``OP_NO_TICKET``): sessions live in the listener's own cache, which a certificate
    reload keeps, as the ticket key was kept before."""
    cert, key = served
    config = gateway_config(echo.url, tls=tls_config(TlsCertificate(str(cert), str(key))))
    ctx = client_context(pki, max_version=ssl.TLSVersion.TLSv1_2 if version == "1.2" else None)

    async def go() -> tuple[list[tuple[bool, bytes]], int, list[tuple[bool, bytes]]]:
        gw = await start_gateway(config)
        try:
            assert gw.tls is not None
            first, session = await asyncio.to_thread(_resuming_client, gw.port, ctx, 3)
            cached = gw.tls.context.session_stats()["number"]
            _install(pki.issue("ec.test"), cert, key)
            assert gw.tls.check() is True
            after, _ = await asyncio.to_thread(_resuming_client, gw.port, ctx, 1, session)
            return first, cached, after
        finally:
            await gw.stop()

    first, cached, after_reload = loop.run(go())
    ok = b"HTTP/1.1 200 OK"
    assert first == [(False, ok), (True, ok), (True, ok)]
    assert cached >= 1  # server-side sessions (with tickets this cache stays empty in 1.3)
    assert after_reload == [(True, ok)]  # a session from before the reload


def test_bodies_of_many_records_cross_the_listener_intact(loop: Loop, echo: EchoUpstream,
                                                          pki: Pki) -> None:
    """uvloop drives the listener's connections through ``TransportSSLObject`` (the ``_ssl``
    read/write/pending themselves): a 300 KB request body (about 19 TLS records, several per
    socket read) reaches the upstream byte for byte, and a 1 MB response arrives whole."""
    body = bytes(range(251)) * 1200  # 301,200 bytes, no period that lines up with a record
    config = gateway_config(echo.url, tls=tls_config(pki.ecdsa))

    async def go() -> tuple[RawResponse, RawResponse]:
        gw = await start_gateway(config)
        try:
            assert gw.tls is not None
            assert gw.tls.context.sslobject_class is fastgate_tls.TransportSSLObject
            client = await connect(gw.port, client_context(pki), "ec.test")
            client.writer.write(http_request("POST", "/upload", body=body, close=False))
            posted = await asyncio.wait_for(read_response(client.reader), 10)
            big = await client.get("/big/1000000", close=True)
            await client.close()
            return posted, big
        finally:
            await gw.stop()

    posted, big = loop.run(go())
    assert posted.status == 200
    assert posted.json()["body_len"] == len(body)
    assert posted.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert big.status == 200 and len(big.body) == 1_000_000
    assert big.body[:512] == bytes(range(256)) * 2


# ---------------------------------------------------------------------------------------------
# Client certificates (mTLS)
# ---------------------------------------------------------------------------------------------


async def _attempt(port: int, ctx: ssl.SSLContext) -> str:
    """'200 <cn>' or 'failed' — with TLS 1.3 a refused client certificate shows after the
    client's side of the handshake (RFC 8446 §4.4.2.4): on the first read."""
    try:
        client = await connect(port, ctx, "ec.test")
        try:
            resp = await client.get(close=True)
        finally:
            await client.close()
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return "failed"
    return f"{resp.status}"


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2],
                         ids=["tls13", "tls12"])
def test_client_auth_required_optional_none(loop: Loop, echo: EchoUpstream, pki: Pki,
                                            tls_max: ssl.TLSVersion) -> None:
    async def go(mode: str) -> dict[str, str]:
        gw = await start_gateway(gateway_config(
            echo.url, tls=tls_config(pki.ecdsa, client_ca=str(pki.ca), client_auth=mode)))
        try:
            return {
                "with": await _attempt(gw.port, client_context(pki, cert=pki.client,
                                                               max_version=tls_max)),
                "without": await _attempt(gw.port, client_context(pki, max_version=tls_max)),
                "rogue": await _attempt(gw.port, client_context(pki, cert=pki.rogue_client,
                                                                max_version=tls_max)),
            }
        finally:
            await gw.stop()

    required = loop.run(go("required"))
    assert required == {"with": "200", "without": "failed", "rogue": "failed"}
    assert len(echo.records) == 1  # only the verified client got through
    assert loop.run(go("optional")) == {"with": "200", "without": "200", "rogue": "failed"}
    # none: no certificate is requested, so even the rogue one is never looked at
    assert loop.run(go("none")) == {"with": "200", "without": "200", "rogue": "200"}


# ---------------------------------------------------------------------------------------------
# Reload: SIGHUP (Gateway.swap) and file changes
# ---------------------------------------------------------------------------------------------


def _install(pair: Issued, cert: Path, key: Path) -> None:
    """Replace the served files the way a renewal does: write aside, then rename."""
    for src, dst in ((pair.cert, cert), (pair.key, key)):
        tmp = dst.with_suffix(".new")
        shutil.copyfile(src, tmp)
        tmp.replace(dst)


@pytest.fixture
def served(pki: Pki, tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "api.crt", tmp_path / "api.key"
    _install(pki.ecdsa, cert, key)
    return cert, key


@pytest.mark.parametrize("how", ["file-change", "sighup"])
def test_reload_new_certificate_keepalive_client_keeps_working(
        loop: Loop, echo: EchoUpstream, pki: Pki, served: tuple[Path, Path], how: str) -> None:
    cert, key = served
    renewed = pki.issue("ec.test")  # same name, new key and serial
    config = gateway_config(echo.url, tls=tls_config(TlsCertificate(str(cert), str(key))))
    metrics = Metrics(routes=["all"], providers=[], upstreams=["app"])

    async def go() -> list[Any]:
        gw = await start_gateway(config, metrics=metrics)
        try:
            kept = await connect(gw.port, client_context(pki), "ec.test")
            first = await kept.get()
            _install(renewed, cert, key)
            if how == "sighup":
                await gw.swap(gw.config)  # what the supervisor does on SIGHUP
            else:
                assert gw.tls is not None and gw.tls.check() is True
            again = await kept.get()  # the keep-alive connection is not touched
            _, fresh = await fetch_once(gw.port, client_context(pki), "ec.test")
            third = await kept.get(close=True)
            await kept.close()
            return [first.status, kept.peer_certificate().serial_number, again.status,
                    fresh.serial_number, third.status, len(echo.connections())]
        finally:
            await gw.stop()

    first, kept_serial, again, fresh_serial, third, _ = loop.run(go())
    assert (first, again, third) == (200, 200, 200)
    assert kept_serial == pki.ecdsa.serial
    assert fresh_serial == renewed.serial
    # A file change counts as a successful reload; a SIGHUP is counted by the supervisor.
    expected = 1 if how == "file-change" else 0
    assert metric(metrics, "fastgate_config_reloads_total", result="success") == expected


def test_file_poller_picks_up_a_renewal(loop: Loop, echo: EchoUpstream, pki: Pki,
                                        served: tuple[Path, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastgate_tls, "CERT_POLL_INTERVAL", 0.05)
    cert, key = served
    renewed = pki.issue("ec.test")
    config = gateway_config(echo.url, tls=tls_config(TlsCertificate(str(cert), str(key))))

    async def go() -> tuple[int, int, float]:
        gw = await start_gateway(config)
        try:
            _, before = await fetch_once(gw.port, client_context(pki), "ec.test")
            _install(renewed, cert, key)
            started = time.monotonic()
            while True:
                _, now = await fetch_once(gw.port, client_context(pki), "ec.test")
                if now.serial_number != before.serial_number or \
                        time.monotonic() - started > 5:
                    return before.serial_number, now.serial_number, time.monotonic() - started
                await asyncio.sleep(0.05)
        finally:
            await gw.stop()

    before, after, took = loop.run(go())
    assert (before, after) == (pki.ecdsa.serial, renewed.serial)
    assert took < 2


def test_broken_new_certificate_keeps_the_old_one(loop: Loop, echo: EchoUpstream, pki: Pki,
                                                  served: tuple[Path, Path],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    cert, key = served
    config = gateway_config(echo.url, tls=tls_config(TlsCertificate(str(cert), str(key))))
    metrics = Metrics(routes=["all"], providers=[], upstreams=["app"])
    caplog.set_level(logging.INFO, logger="fastgate.tls")

    async def go() -> list[Any]:
        gw = await start_gateway(config, metrics=metrics)
        assert gw.tls is not None
        try:
            out: list[Any] = []
            kept = await connect(gw.port, client_context(pki), "ec.test")
            # 1. A half-written renewal (new certificate, old key): not reported at once.
            shutil.copyfile(pki.other_host.cert, cert)
            out.append(gw.tls.check())
            # 2. Still broken at the next poll: reported once, the old certificate stays.
            out.append(gw.tls.check())
            out.append(gw.tls.check())  # the same broken files: not reported again
            _, peer = await fetch_once(gw.port, client_context(pki), "ec.test")
            out.append(peer.serial_number)
            out.append((await kept.get()).status)
            # 3. SIGHUP with broken files: a failed reload (ConfigError), nothing changes.
            cert.write_text("not a certificate\n")
            try:
                await gw.swap(gw.config)
                out.append("swapped")
            except ConfigError as exc:
                out.append(exc.errors)
            _, peer = await fetch_once(gw.port, client_context(pki), "ec.test")
            out.append(peer.serial_number)
            # 4. Repaired: the next check loads it.
            _install(pki.ecdsa, cert, key)
            out.append(gw.tls.check())
            out.append((await kept.get(close=True)).status)
            await kept.close()
            return out
        finally:
            await gw.stop()

    (pending, failed, quiet, serial, kept_status, swap_errors, serial_after_swap, repaired,
     kept_final) = loop.run(go())
    assert (pending, failed, quiet) == (None, False, None)
    assert serial == serial_after_swap == pki.ecdsa.serial
    assert kept_status == kept_final == 200
    assert isinstance(swap_errors, list) and len(swap_errors) == 1
    assert swap_errors[0].startswith("tls: ") and str(cert) in swap_errors[0]
    assert "no PEM certificate" in swap_errors[0]
    assert repaired is True
    assert metric(metrics, "fastgate_config_reloads_total", result="failure") == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "keeping the running certificates" in errors[0].getMessage()
    assert "does not match the certificate" in errors[0].getMessage()


# ---------------------------------------------------------------------------------------------
# Bounded cost: plain HTTP on the TLS port, stalled handshakes
# ---------------------------------------------------------------------------------------------


async def _raw_until_closed(port: int, data: bytes, limit: float) -> tuple[bytes, float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    got = b""
    try:
        if data:
            writer.write(data)
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), limit):
                got += chunk
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return got, time.monotonic() - started


def test_plain_http_on_the_tls_port_gets_nothing_through(
        loop: Loop, echo: EchoUpstream, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    config = gateway_config(echo.url, tls=tls_config(pki.ecdsa), handshake=5.0)
    caplog.set_level(logging.INFO)

    async def go() -> tuple[bytes, float]:
        gw = await start_gateway(config)
        try:
            return await _raw_until_closed(gw.port, http_request("GET", "/x"), 10)
        finally:
            await gw.stop()

    got, took = loop.run(go())
    assert b"HTTP/" not in got  # at most a TLS alert record
    assert took < 2  # not a valid TLS record: refused at once, not at the handshake timeout
    assert echo.records == []
    # a scanner speaking plain HTTP cannot flood the log: nothing above debug level
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("sent", [
    b"",  # connects and says nothing
    # A TLS record header announcing a 512-byte ClientHello (RFC 8446 §5.1), then silence.
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 16,
], ids=["silent", "mid-hello"])
def test_stalled_handshake_is_cut_at_the_handshake_timeout(
        loop: Loop, echo: EchoUpstream, pki: Pki, sent: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    config = gateway_config(echo.url, tls=tls_config(pki.ecdsa), handshake=0.5)
    caplog.set_level(logging.INFO)

    async def go() -> tuple[bytes, float]:
        gw = await start_gateway(config)
        try:
            return await _raw_until_closed(gw.port, sent, 10)
        finally:
            await gw.stop()

    got, took = loop.run(go())
    assert 0.4 <= took < 3, took
    assert b"HTTP/" not in got
    assert echo.records == []
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_alpn_h2_only_client_gets_no_alpn_and_http11(loop: Loop, echo: EchoUpstream,
                                                     pki: Pki) -> None:
    """RFC 7301 §3.2: no protocol in common -> the server answers without ALPN (OpenSSL's
    no-ack); the connection still speaks HTTP/1.1."""
    config = gateway_config(echo.url, tls=tls_config(pki.ecdsa))

    async def go() -> tuple[str | None, str | None, int]:
        gw = await start_gateway(config)
        try:
            both = await connect(gw.port, _alpn(pki, ["h2", "http/1.1"]), "ec.test")
            chosen = both.ssl_object.selected_alpn_protocol()
            await both.close()
            h2 = await connect(gw.port, _alpn(pki, ["h2"]), "ec.test")
            none = h2.ssl_object.selected_alpn_protocol()
            resp = await h2.get(close=True)
            await h2.close()
            return chosen, none, resp.status
        finally:
            await gw.stop()

    assert loop.run(go()) == ("http/1.1", None, 200)


def _alpn(pki: Pki, protocols: list[str]) -> ssl.SSLContext:
    ctx = client_context(pki)
    ctx.set_alpn_protocols(protocols)
    return ctx


def test_listener_tls_refuses_broken_files_at_build(pki: Pki, tmp_path: Path) -> None:
    """Files broken after the config was loaded (a race with a renewal): Gateway.build
    raises ConfigError naming the file, before anything listens."""
    bad = tmp_path / "bad.crt"
    bad.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    config = gateway_config("http://127.0.0.1:1",
                            tls=tls_config(TlsCertificate(str(bad), str(pki.ecdsa.key))))
    with pytest.raises(ConfigError) as info:
        Gateway.build(config)
    assert len(info.value.errors) == 1 and str(bad) in info.value.errors[0]


def test_sni_selection_rules(pki: Pki) -> None:
    listener = ListenerTLS(tls_config(
        pki.rsa, TlsCertificate(str(pki.ecdsa.cert), str(pki.ecdsa.key), ("*.example.com",))))
    rsa_ctx, ec_ctx = listener.context_for("rsa.test"), listener.context_for("a.example.com")
    assert rsa_ctx is not ec_ctx
    assert listener.server_names == (("rsa.test",), ("*.example.com",))
    assert listener.context_for("RSA.Test.") is rsa_ctx  # case and a trailing dot ignored
    assert listener.context_for("a.b.example.com") is rsa_ctx  # a wildcard is one label
    assert listener.context_for("example.com") is rsa_ctx
    assert listener.context_for(None) is rsa_ctx


# ---------------------------------------------------------------------------------------------
# https upstreams
# ---------------------------------------------------------------------------------------------


@dataclass
class TLSUpstream:
    runner: web.AppRunner
    port: int
    server_names: list[str | None]
    client_certs: list[str | None]


@contextlib.asynccontextmanager
async def tls_upstream(pair: Issued, *, client_ca: Path | None = None
                       ) -> AsyncIterator[TLSUpstream]:
    """An aiohttp https server answering JSON with the Host and X-Forwarded-Proto it got."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    if client_ca is not None:
        ctx.load_verify_locations(str(client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    names: list[str | None] = []
    clients: list[str | None] = []

    def on_hello(_obj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    ctx.sni_callback = on_hello

    async def handler(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in peer["subject"]) if peer else None
        clients.append(subject.get("commonName") if subject else None)
        return web.json_response({"host": request.headers.get("Host"),
                                  "peer": request.transport.get_extra_info("peername")[1]
                                  if request.transport else None})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server = site._server
    assert server is not None
    port = cast(asyncio.Server, server).sockets[0].getsockname()[1]
    try:
        yield TLSUpstream(runner, port, names, clients)
    finally:
        await runner.cleanup()


async def _through_gateway(config: GatewayConfig, metrics: Metrics, n: int = 1
                           ) -> list[RawResponse]:
    gw = await start_gateway(config, metrics=metrics)
    try:
        out = []
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        for i in range(n):
            writer.write(http_request("GET", f"/r{i}", close=i == n - 1))
            out.append(await asyncio.wait_for(read_response(reader), 10))
        writer.close()
        return out
    finally:
        await gw.stop()


def _metrics() -> Metrics:
    return Metrics(routes=["all"], providers=[], upstreams=["app"])


def test_https_upstream_verified_with_sni_and_pooled(loop: Loop, pki: Pki) -> None:
    """RFC 9110 §4.3.4: chain against ca_file, name from the URL (also the SNI); three
    requests share one pooled TLS connection; the client's Host is forwarded as it is."""
    metrics = _metrics()

    async def go() -> tuple[list[RawResponse], list[str | None]]:
        async with tls_upstream(pki.upstream) as up:
            config = gateway_config(f"https://localhost:{up.port}", tls=None,
                                    upstream_tls=UpstreamTlsConfig(ca_file=str(pki.ca)))
            return await _through_gateway(config, metrics, n=3), up.server_names

    responses, names = loop.run(go())
    assert [r.status for r in responses] == [200, 200, 200]
    bodies = [r.json() for r in responses]
    assert {b["host"] for b in bodies} == {"gw.test"}
    assert len({b["peer"] for b in bodies}) == 1  # keep-alive over TLS: one connection
    assert names == ["localhost"]  # one handshake, SNI from the URL (RFC 6066 §3)
    assert metric(metrics, "fastgate_upstream_errors_total") == 0


def test_https_upstream_server_name_override(loop: Loop, pki: Pki) -> None:
    metrics = _metrics()

    async def go() -> tuple[int, list[str | None]]:
        async with tls_upstream(pki.upstream) as up:
            config = gateway_config(
                f"https://127.0.0.1:{up.port}", tls=None,
                upstream_tls=UpstreamTlsConfig(ca_file=str(pki.ca), server_name="up.test"))
            return (await _through_gateway(config, metrics))[0].status, up.server_names

    assert loop.run(go()) == (200, ["up.test"])


@pytest.mark.parametrize(("case", "expect"), [
    ("bad-ca", "unable to get local issuer certificate"),
    ("wrong-host", "Hostname mismatch"),
    ("expired", "certificate has expired"),
])
def test_https_upstream_certificate_failures_are_502_tls(
        loop: Loop, pki: Pki, case: str, expect: str,
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = _metrics()
    pair = {"bad-ca": pki.untrusted, "wrong-host": pki.other_host,
            "expired": pki.expired}[case]

    async def go() -> RawResponse:
        async with tls_upstream(pair) as up:
            config = gateway_config(f"https://localhost:{up.port}", tls=None,
                                    upstream_tls=UpstreamTlsConfig(ca_file=str(pki.ca)))
            return (await _through_gateway(config, metrics))[0]

    caplog.set_level(logging.DEBUG)
    resp = loop.run(go())
    assert resp.status == 502
    assert resp.json() == {"error": "bad_gateway"}
    assert metric(metrics, "fastgate_upstream_errors_total", upstream="app", kind="tls") == 1
    assert metric(metrics, "fastgate_upstream_errors_total") == 1
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    # the reason is in the gateway's log line for the failed exchange
    assert any("upstream tls error" in r.getMessage() and expect in r.getMessage()
               for r in caplog.records)


def test_https_upstream_system_store_refuses_a_private_ca(loop: Loop, pki: Pki) -> None:
    """No ca_file: the system trust store, which does not know the test CA."""
    metrics = _metrics()

    async def go() -> int:
        async with tls_upstream(pki.upstream) as up:
            config = gateway_config(f"https://localhost:{up.port}", tls=None)
            return (await _through_gateway(config, metrics))[0].status

    assert loop.run(go()) == 502
    assert metric(metrics, "fastgate_upstream_errors_total", upstream="app", kind="tls") == 1


def test_https_upstream_verify_false_warns_at_start(loop: Loop, pki: Pki,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    metrics = _metrics()
    caplog.set_level(logging.WARNING, logger="fastgate.upstream")

    async def go() -> int:
        async with tls_upstream(pki.untrusted) as up:
            config = gateway_config(f"https://localhost:{up.port}", tls=None,
                                    upstream_tls=UpstreamTlsConfig(verify=False))
            return (await _through_gateway(config, metrics))[0].status

    assert loop.run(go()) == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("TLS VERIFICATION IS OFF" in w and "upstream app" in w for w in warnings)


@pytest.mark.parametrize("with_cert", [True, False], ids=["client-cert", "no-client-cert"])
def test_https_upstream_mtls(loop: Loop, pki: Pki, with_cert: bool,
                            caplog: pytest.LogCaptureFixture) -> None:
    metrics = _metrics()
    caplog.set_level(logging.INFO)

    async def go() -> tuple[int, list[str | None]]:
        async with tls_upstream(pki.upstream, client_ca=pki.ca) as up:
            cert, key = (str(pki.client.cert), str(pki.client.key)) if with_cert else \
                (None, None)
            config = gateway_config(
                f"https://localhost:{up.port}", tls=None,
                upstream_tls=UpstreamTlsConfig(ca_file=str(pki.ca), cert=cert, key=key))
            return (await _through_gateway(config, metrics))[0].status, up.client_certs

    status, seen = loop.run(go())
    if with_cert:
        assert (status, seen) == (200, ["client-42"])
    else:
        # TLS 1.3: the upstream refuses the missing certificate after the client finished
        # its handshake (RFC 8446 §4.4.2.4), so the relay sees the connection close.
        assert (status, seen) == (502, [])
        assert metric(metrics, "fastgate_upstream_errors_total", upstream="app") == 1
        # uvloop reports that alert as a plain close (connection_lost without an exception),
        # so the relay counts it as a reset, not as kind "tls" (docs/security.md).
        assert metric(metrics, "fastgate_upstream_errors_total", upstream="app",
                      kind="reset") == 1
        assert any("upstream reset error: connection closed before the response head"
                   in r.getMessage() for r in caplog.records)


def test_tls_listener_and_https_upstream_together(loop: Loop, pki: Pki) -> None:
    metrics = _metrics()

    async def go() -> RawResponse:
        async with tls_upstream(pki.upstream) as up:
            config = gateway_config(
                f"https://localhost:{up.port}", tls=tls_config(pki.ecdsa),
                upstream_tls=UpstreamTlsConfig(ca_file=str(pki.ca)))
            gw = await start_gateway(config, metrics=metrics)
            try:
                resp, _ = await fetch_once(gw.port, client_context(pki), "ec.test")
                return resp
            finally:
                await gw.stop()

    resp = loop.run(go())
    assert resp.status == 200 and orjson.loads(resp.body)["host"] == "gw.test"


def test_reload_rebuilds_an_upstream_pool_when_its_tls_files_change(
        loop: Loop, pki: Pki, tmp_path: Path) -> None:
    """SIGHUP with the same config but a renewed client certificate: a new pool (new
    handshakes with the new certificate) instead of the old pool's warm connections."""
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    _install(pki.client, cert, key)
    renewed = pki.issue("client-43", client=True)

    async def go() -> list[str | None]:
        async with tls_upstream(pki.upstream, client_ca=pki.ca) as up:
            config = gateway_config(
                f"https://localhost:{up.port}", tls=None,
                upstream_tls=UpstreamTlsConfig(ca_file=str(pki.ca), cert=str(cert),
                                               key=str(key)))
            gw = await start_gateway(config)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                writer.write(http_request("GET", "/a", close=False))
                assert (await read_response(reader)).status == 200
                await gw.swap(gw.config)  # unchanged files: pool and connection stay
                writer.write(http_request("GET", "/b", close=False))
                assert (await read_response(reader)).status == 200
                _install(renewed, cert, key)
                await gw.swap(gw.config)
                writer.write(http_request("GET", "/c"))
                assert (await read_response(reader)).status == 200
                writer.close()
            finally:
                await gw.stop()
            return up.client_certs

    assert loop.run(go()) == ["client-42", "client-42", "client-43"]


def test_gateway_without_tls_still_says_http(loop: Loop, echo: EchoUpstream) -> None:
    async def go() -> int:
        gw = await start_gateway(gateway_config(echo.url, tls=None))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(http_request("GET", "/x"))
            resp = await read_response(reader)
            writer.close()
            assert gw.tls is None
            return resp.status
        finally:
            await gw.stop()

    assert loop.run(go()) == 200
    assert echo.records[-1].header_values("X-Forwarded-Proto") == ["http"]


def test_the_test_client_verifies_names(pki: Pki) -> None:
    """The test client refuses the gateway's certificate for a name it does not carry: the
    client side of these tests verifies for real."""
    async def go(port: int) -> str:
        ctx = client_context(pki)
        try:
            await connect(port, ctx, "wrong.test")
        except ssl.SSLCertVerificationError as exc:
            return str(exc.verify_message)
        return "accepted"

    lp = Loop()
    try:
        gw = lp.run(start_gateway(gateway_config("http://127.0.0.1:1",
                                                 tls=tls_config(pki.ecdsa))))
        try:
            assert "Hostname mismatch" in lp.run(go(gw.port))
        finally:
            lp.run(gw.stop())
    finally:
        lp.close()


# ---------------------------------------------------------------------------------------------
# Certificate-bound access tokens (RFC 8705 §3)
# ---------------------------------------------------------------------------------------------


def _thumbprint(cert_path: Path) -> str:
    """RFC 8705 §3.1: base64url(SHA-256(DER of the certificate)), no padding."""
    import base64
    import hashlib

    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _bound_gateway_config(echo: EchoUpstream, pki: Pki, *, bound: bool = True) -> GatewayConfig:
    from fastgate.config import AuthConfig, ProviderConfig
    from tests.factory import AUDIENCE, ISSUER, jwks_of, key_for

    base = gateway_config(echo.url, tls=tls_config(pki.ecdsa, client_ca=str(pki.ca),
                                                   client_auth="optional"))
    provider = ProviderConfig("main", ISSUER, "jwks", jwks=jwks_of(key_for("RS256")),
                              audiences=(AUDIENCE,), algorithms=("RS256",))
    route = RouteConfig("bound", RouteMatch(path_prefix="/"), "app",
                        auth=AuthConfig(providers=("main",), certificate_bound=bound))
    return replace(base, providers={"main": provider}, routes=(route,))


def _bound_token(thumbprint: str | None) -> str:
    from tests.factory import default_claims, key_for, make_token

    claims = default_claims(now=time.time())
    if thumbprint is not None:
        claims["cnf"] = {"x5t#S256": thumbprint}
    return make_token(key_for("RS256"), claims)


def test_certificate_bound_token_only_over_its_certificate(loop: Loop, echo: EchoUpstream,
                                                           pki: Pki) -> None:
    """auth.certificate_bound: accepted over the TLS connection whose client certificate the
    token names (cnf x5t#S256); another certificate, none, or a token without cnf is
    401 certificate_mismatch -- also when the token is already in the verified-token cache."""
    from fastgate.token.reasons import Reason

    token = _bound_token(_thumbprint(pki.client.cert))
    other = pki.issue("client-7", client=True)

    async def get(gw: Gateway, cert: Issued | None, tok: str) -> RawResponse:
        client = await connect(gw.port, client_context(pki, cert=cert), "ec.test")
        try:
            client.writer.write(http_request("GET", "/bound",
                                             [("Authorization", f"Bearer {tok}")]))
            return await asyncio.wait_for(read_response(client.reader), 10)
        finally:
            await client.close()

    async def go() -> list[RawResponse]:
        gw = await start_gateway(_bound_gateway_config(echo, pki))
        try:
            return [await get(gw, pki.client, token),  # its certificate: admitted (cached)
                    await get(gw, other, token),  # the same token, another certificate
                    await get(gw, None, token),  # no client certificate
                    await get(gw, pki.client, _bound_token(None)),  # a token without cnf
                    await get(gw, pki.client, token)]  # its certificate again
        finally:
            await gw.stop()

    before = len(echo.records)
    ok, wrong, none, unbound, again = loop.run(go())
    assert ok.status == 200 and again.status == 200
    for resp in (wrong, none, unbound):
        assert resp.status == 401
        assert resp.json() == {"error": "invalid_token", "reason": "certificate_mismatch"}
        assert resp.header("WWW-Authenticate") == \
            Reason.CERTIFICATE_MISMATCH.www_authenticate(None)
    assert len(echo.records) - before == 2  # only the two requests over the right certificate


def test_certificate_bound_needs_client_certificates(echo: EchoUpstream, pki: Pki) -> None:
    config = _bound_gateway_config(echo, pki)
    config = replace(config, tls=tls_config(pki.ecdsa))  # client_auth: none
    with pytest.raises(ConfigError) as info:
        Gateway.build(config)
    assert any(e.startswith("routes[0].auth.certificate_bound: needs tls with client_ca")
               for e in info.value.errors)
