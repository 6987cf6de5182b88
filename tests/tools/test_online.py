"""``fastgate check --online`` against real loopback servers, run as a user runs it.

tests/idp.py serves discovery and JWKS (breakable); aiohttp servers stand in for the upstreams,
one of them over TLS with a certificate from a throw-away CA. Every check is shown failing too:
the trailing-slash issuer mismatch, a JWKS with no usable key, a closed upstream port and an
https upstream whose certificate the system trust store does not know.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from pathlib import Path

from aiohttp import web

from tests.factory import generate, jwks_of
from tests.idp import IdP, free_port, run

ROOT = Path(__file__).resolve().parents[2]


def _pki(root: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server cert, server key): a CA and a certificate for 127.0.0.1 / localhost
    (the demo's throw-away PKI)."""
    from fastgate.tools.demo import write_demo_pki

    return write_demo_pki(root)


async def _upstream(cert: Path | None = None, key: Path | None = None,
                    ) -> tuple[web.AppRunner, int]:
    """An upstream answering ``ok``; over TLS with ``cert`` and ``key``."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    ssl_ctx = None
    if cert is not None:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def _check(config: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fastgate", "check", "--online", "-c", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _config(path: Path, upstreams: dict[str, str], providers: dict[str, str],
            upstream: str) -> Path:
    """A gateway.yaml at ``path``: the given upstreams and providers (name -> flow mapping)
    and one route ``r`` for ``/`` to ``upstream`` with every provider."""
    path.write_text(
        "upstreams:\n" + "".join(f"  {n}: {v}\n" for n, v in upstreams.items())
        + "providers:\n" + "".join(f"  {n}: {v}\n" for n, v in providers.items())
        + "routes:\n"
        f"  - {{name: r, match: {{path_prefix: /}}, upstream: {upstream},"
        f" auth: {{providers: [{', '.join(providers)}]}}}}\n")
    return path


def _line(out: str, what: str) -> str:
    (line,) = [x for x in out.splitlines() if what in x]
    return line


def test_online_check_passes_and_lists_every_item(tmp_path: Path) -> None:
    ca, cert, key = _pki(tmp_path)
    good, weak = generate("ES256", "good"), generate("RS256", "weak", rsa_bits=1024)
    enc = dict(jwks_of(generate("ES256", "enc"))["keys"][0], use="enc")

    async def main() -> None:
        plain, plain_port = await _upstream()
        secure, secure_port = await _upstream(cert, key)
        try:
            async with IdP(keys=jwks_of(good)) as disc, IdP() as direct:
                direct.set_keys(good, weak, enc)
                cfg = _config(tmp_path / "gateway.yaml", {
                    "plain": f"{{url: 'http://127.0.0.1:{plain_port}'}}",
                    "secure": f"{{url: 'https://127.0.0.1:{secure_port}', tls: {{ca_file: {ca}}}}}",
                }, {
                    "disc": f"{{issuer: '{disc.issuer}', discovery: true}}",
                    "direct": "{issuer: 'https://direct.example/',"
                              f" jwks_uri: '{direct.jwks_url}'}}",
                }, "plain")
                code, out, err = await _check(cfg)
                assert code == 0, out + err
                line = _line(out, "providers.disc discovery")
                assert line.startswith("OK") and f"issuer matches '{disc.issuer}'" in line
                assert _line(out, "providers.disc jwks").startswith("OK")
                line = _line(out, "providers.direct jwks")
                assert line.startswith("OK") and "1 usable key (kid good)" in line
                assert "2 skipped" in line and "kid weak:" in line and "kid enc:" in line
                assert _line(out, "upstreams.plain").startswith("OK")
                assert "TCP connect OK" in _line(out, "upstreams.plain")
                line = _line(out, "upstreams.secure")
                assert line.startswith("OK") and "TLS handshake OK" in line
                assert out.splitlines()[-1] == (f"{cfg}: OK (1 route, 2 providers, 2 upstreams;"
                                                " 5 online checks passed)")
                assert disc.hits["/.well-known/openid-configuration"] == 1
                assert direct.hits["/jwks"] == 1
        finally:
            await plain.cleanup()
            await secure.cleanup()

    run(main(), timeout=60)


def test_online_check_catches_a_trailing_slash_issuer_and_dead_parts(tmp_path: Path) -> None:
    _, cert, key = _pki(tmp_path)

    async def main() -> None:
        secure, secure_port = await _upstream(cert, key)
        try:
            async with IdP(keys=jwks_of(generate("ES256", "k"))) as idp, IdP() as empty:
                empty.fault = "empty_keys"
                dead = free_port()
                # The provider publishes "http://127.0.0.1:PORT"; the config says ".../".
                cfg = _config(tmp_path / "gateway.yaml", {
                    "dead": f"{{url: 'http://127.0.0.1:{dead}', connect_timeout: 2s}}",
                    "untrusted": f"{{url: 'https://127.0.0.1:{secure_port}'}}",
                }, {
                    "slash": f"{{issuer: '{idp.issuer}/', discovery: true}}",
                    "nokeys": f"{{issuer: 'https://n.example/', jwks_uri: '{empty.jwks_url}'}}",
                }, "dead")
                code, out, err = await _check(cfg)
                assert code == 1, out + err
                assert "Traceback" not in err
                line = _line(out, "providers.slash discovery")
                assert line.startswith("FAIL") and "issuer mismatch" in line
                assert "differ only by a trailing '/'" in line
                assert f"set issuer to '{idp.issuer}'" in line
                line = _line(out, "providers.nokeys jwks")
                assert line.startswith("FAIL") and "no usable key" in line
                line = _line(out, "upstreams.dead")
                assert line.startswith("FAIL") and "connect" in line
                line = _line(out, "upstreams.untrusted")
                assert line.startswith("FAIL") and "certificate" in line
                assert out.splitlines()[-1].startswith(f"{cfg}: 4 of 4 online checks failed")
        finally:
            await secure.cleanup()

    run(main(), timeout=60)


def test_online_check_reports_a_provider_that_is_down_and_a_bad_config(tmp_path: Path) -> None:
    async def main() -> None:
        down = free_port()
        cfg = tmp_path / "gateway.yaml"
        cfg.write_text(
            f"upstreams: {{u: {{url: 'http://127.0.0.1:{down}'}}}}\n"
            f"providers: {{p: {{issuer: 'http://127.0.0.1:{down}', discovery: true}}}}\n"
            "routes: [{name: r, match: {path_prefix: /}, upstream: u, auth: {providers: [p]}}]\n")
        code, out, err = await _check(cfg)
        assert code == 1 and "Traceback" not in err
        assert _line(out, "providers.p discovery").startswith("FAIL")
        assert "connection error" in _line(out, "providers.p discovery")
        broken = tmp_path / "broken.yaml"
        broken.write_text("routes: []\n")
        code, out, err = await _check(broken)
        assert code == 1 and out == "" and "error(s)" in err  # offline errors come first

    run(main(), timeout=60)
