"""The `fastgate` command line: `check` and `token`, run as subprocesses.

Minted tokens are checked with the compiled verifier against the public key, not by decoding
them: what `fastgate token` prints must be a token fastgate itself accepts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from fastgate import Reason, Verifier
from tests.factory import b64u, public_jwk
from tests.gateway_fixtures import dead_port

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "tests" / "configs"
ISS = "https://idp.example.test/"


def fastgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastgate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env=env)


# -- check -----------------------------------------------------------------------------------


def test_check_valid_config_exits_0() -> None:
    p = fastgate("check", "-c", str(CONFIGS / "minimal.yaml"))
    assert p.returncode == 0, p.stderr
    assert "OK (1 route, 0 providers, 1 upstream)" in p.stdout
    assert p.stderr == ""


def test_check_broken_config_lists_every_error_with_its_path(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "listen: 0.0.0.0:99999\n"
        "upstreams:\n"
        "  app: {url: 'ftp://example.com'}\n"
        "providers:\n"
        "  okta: {issuer: https://idp.example.test/, discovery: true, clock_skew: soon}\n"
        "routes:\n"
        "  - name: r\n"
        "    match: {path_prefix: /}\n"
        "    upstream: app\n"
        "    auth: {providers: [okat]}\n"
        "bogus_key: 1\n"
    )
    p = fastgate("check", "-c", str(broken))
    assert p.returncode == 1
    assert p.stdout == ""
    err = p.stderr
    for expected in ("listen", "upstreams.app.url", "providers.okta.clock_skew",
                     "routes[0].auth.providers[0]: unknown provider 'okat'", "bogus_key"):
        assert expected in err, (expected, err)
    # One line per error, all at once, under a header line naming the count.
    lines = [line for line in err.splitlines() if line.startswith("  ")]
    assert len(lines) >= 5
    assert f"{broken}: {len(lines)} error(s)" in err


def test_check_missing_file_exits_1(tmp_path: Path) -> None:
    p = fastgate("check", "-c", str(tmp_path / "nope.yaml"))
    assert p.returncode == 1
    assert "nope.yaml" in p.stderr


# -- token -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_file(tmp_path: Path, key: rsa.RSAPrivateKey) -> Path:
    path = tmp_path / "key.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def ec_private_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk = public_jwk(key, kid)
    jwk["d"] = b64u(key.private_numbers().private_value.to_bytes(32, "big"))
    return jwk


def verify(token: str, jwk: dict[str, Any], *, aud: str | None = None) -> dict[str, Any]:
    v = Verifier(ISS, audiences=[aud] if aud else None, jwks={"keys": [jwk]}, cache_size=0)
    r = v.verify(token)
    assert r.ok, (r.reason, r.detail)
    assert r.reason is Reason.OK
    assert r.claims is not None
    return r.claims


def test_token_from_pem_with_typed_pairs(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    before = int(time.time())
    p = fastgate("token", "--key", str(pem_file(tmp_path, rsa_key)), "--kid", "k1",
                 "--iss", ISS, "--aud", "api://orders", "--sub", "alice",
                 "--scope", "orders:read orders:write", "--exp", "90s",
                 "admin=true", "level=3", "ratio=0.5", "roles=[\"a\",\"b\"]",
                 "tenant={\"id\":\"acme\"}", "name=Alice Smith", "zip=01234", "nothing=null")
    after = int(time.time())
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    assert token.count(".") == 2 and "\n" not in token
    claims = verify(token, public_jwk(rsa_key, "k1"), aud="api://orders")
    assert claims["iss"] == ISS and claims["sub"] == "alice" and claims["aud"] == "api://orders"
    assert claims["scope"] == "orders:read orders:write"
    # key=value: JSON when it parses (typed), else a plain string.
    assert claims["admin"] is True and claims["level"] == 3 and claims["ratio"] == 0.5
    assert claims["roles"] == ["a", "b"] and claims["tenant"] == {"id": "acme"}
    assert claims["name"] == "Alice Smith"
    assert claims["zip"] == "01234"  # not valid JSON (leading zero): kept as the string
    assert claims["nothing"] is None
    assert before <= claims["iat"] <= after
    assert claims["exp"] - claims["iat"] == 90


def test_token_from_jwk_with_claims_json_and_exp(tmp_path: Path,
                                                 ec_key: ec.EllipticCurvePrivateKey) -> None:
    jwk_path = tmp_path / "key.jwk"
    jwk_path.write_text(json.dumps(ec_private_jwk(ec_key, "ec-1")))
    claims_json = json.dumps({"iss": ISS, "sub": "svc", "aud": ["a1", "a2"],
                              "tenant": {"region": "eu-west-1"}, "n": 7})
    p = fastgate("token", "--key", str(jwk_path), "--claims", claims_json, "--exp", "2h",
                 "n=8")
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    header = json.loads(_b64decode(token.split(".")[0]))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": "ec-1"}  # alg and kid from the JWK
    claims = verify(token, public_jwk(ec_key, "ec-1"), aud="a2")
    assert claims["sub"] == "svc" and claims["aud"] == ["a1", "a2"]
    assert claims["tenant"] == {"region": "eu-west-1"}
    assert claims["n"] == 8  # a pair overrides --claims
    assert claims["exp"] - claims["iat"] == 7200


def test_token_explicit_exp_claim_wins_and_expired_is_rejected(
        tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    p = fastgate("token", "--key", str(pem_file(tmp_path, rsa_key)), "--kid", "k1",
                 "--iss", ISS, "exp=1000", "iat=900")
    assert p.returncode == 0, p.stderr
    v = Verifier(ISS, jwks={"keys": [public_jwk(rsa_key, "k1")]}, cache_size=0)
    r = v.verify(p.stdout.strip())
    assert r.reason is Reason.TOKEN_EXPIRED  # correctly signed, exp as asked


def test_token_without_key_prints_the_public_jwk() -> None:
    p = fastgate("token", "--iss", ISS, "sub=x")
    assert p.returncode == 0, p.stderr
    jwk = json.loads(p.stderr.strip().splitlines()[-1])
    claims = verify(p.stdout.strip(), jwk)
    assert claims["sub"] == "x"


def test_token_usage_errors(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key = str(pem_file(tmp_path, rsa_key))
    p = fastgate("token", "--key", key, "novalue")
    assert p.returncode == 2 and "key=value" in p.stderr
    p = fastgate("token", "--key", key, "--claims", "[1, 2]")
    assert p.returncode == 2 and "JSON object" in p.stderr
    p = fastgate("token", "--key", key, "--exp", "soon")
    assert p.returncode == 2 and "--exp" in p.stderr
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello")
    p = fastgate("token", "--key", str(garbage))
    assert p.returncode == 1 and "PEM" in p.stderr


def _b64decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def test_token_refuses_an_alg_the_key_cannot_make(tmp_path: Path, rsa_key: rsa.RSAPrivateKey,
                                                  ec_key: ec.EllipticCurvePrivateKey) -> None:
    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    rsa_pem = str(pem_file(tmp_path, rsa_key))
    jwk_path = tmp_path / "ec.jwk"
    jwk_path.write_text(json.dumps({**ec_private_jwk(ec_key, "e1"), "alg": "ES384"}))
    public_only = tmp_path / "public.jwk"
    public_only.write_text(json.dumps(public_jwk(ec_key, "e1")))
    for args, needle in [
        (["--key", str(ec_pem), "--alg", "RS256"], "alg RS256 cannot be made with an EC P-256"),
        (["--key", str(ec_pem), "--alg", "ES384"], "use ES256"),
        (["--key", rsa_pem, "--alg", "ES256"], "use RS256 or RS384"),
        (["--key", rsa_pem, "--alg", "HS256"], "cannot be made with an RSA 2048-bit key"),
        (["--key", str(jwk_path)], "alg ES384 cannot be made"),  # the JWK's own alg
        (["--key", str(public_only)], "a public JWK cannot sign"),
    ]:
        p = fastgate("token", *args, "sub=x")
        assert p.returncode == 1, (args, p.stdout)
        assert p.stdout == "", args  # no token at all
        assert needle in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    # Every alg the key can make still works, and verifies.
    p = fastgate("token", "--key", rsa_pem, "--kid", "k1", "--alg", "PS384", "--iss", ISS,
                 "--exp", "1h30m")
    assert p.returncode == 0, p.stderr
    claims = verify(p.stdout.strip(), public_jwk(rsa_key, "k1"))
    assert claims["exp"] - claims["iat"] == 5400


def test_check_warns_about_a_prefix_like_path_regex(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "upstreams: {app: {url: 'http://127.0.0.1:1'}}\n"
        "routes:\n"
        "  - {name: slash, match: {path_regex: '^/mobile/v[0-9]+/'}, upstream: app, auth: none}\n"
        "  - {name: anchored, match: {path_regex: '^/api/v[0-9]+'}, upstream: app, auth: none}\n"
        "  - {name: fine, match: {path_regex: '/v[0-9]+/items/.*'}, upstream: app, auth: none}\n"
        "  - {name: exact, match: {path_regex: '^/v[0-9]+/items$'}, upstream: app, auth: none}\n")
    p = fastgate("check", "-c", str(cfg))
    assert p.returncode == 0, p.stderr  # a warning, not an error
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, p.stderr
    assert "routes[0].match.path_regex (slash)" in warnings[0]
    assert "only matches paths ending in '/'" in warnings[0]
    assert "'^/mobile/v[0-9]+/.*'" in warnings[0]  # the fix, spelled out
    assert "routes[1].match.path_regex (anchored)" in warnings[1]


def test_verify_into_a_closed_pipe_prints_no_error(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "upstreams: {app: {url: 'http://127.0.0.1:1'}}\n"
        "providers: {p: {issuer: 'https://idp.example.test/', secret: '" + "k" * 32 + "'}}\n"
        "routes: [{name: r, match: {path: /}, upstream: app, auth: {providers: [p]}}]\n")
    # `fastgate verify ... | head -0`: the reader is gone before anything is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        p = subprocess.run([sys.executable, "-m", "fastgate", "verify", "-c", str(cfg),
                            "not-a-jwt"], cwd=ROOT, stdout=write_end, stderr=subprocess.PIPE,
                           text=True, timeout=60)
    finally:
        os.close(write_end)
    assert p.stderr == "", p.stderr
    assert p.returncode == 141  # 128 + SIGPIPE, as a shell reports a writer cut off


def test_run_log_level_is_checked(tmp_path: Path) -> None:
    cfg = str(CONFIGS / "minimal.yaml")
    p = fastgate("run", "-c", cfg, "--log-level", "loud")
    assert p.returncode == 2 and "--log-level" in p.stderr and "Traceback" not in p.stderr
    env = {**os.environ, "FASTGATE_LOG_LEVEL": "loud"}
    p = fastgate("run", "-c", cfg, env=env)
    assert p.returncode == 2
    assert p.stderr.strip() == ("fastgate run: FASTGATE_LOG_LEVEL: expected one of debug, "
                                "info, warning, error, got 'loud'")



def test_workers_import_what_the_master_runs_not_the_working_directory(tmp_path: Path) -> None:
    """cwd = a source checkout whose ./fastgate cannot import (no compiled extension there):
    the workers must still import the package the master runs, and become ready."""
    shadow = tmp_path / "checkout"
    (shadow / "fastgate").mkdir(parents=True)
    (shadow / "fastgate" / "__init__.py").write_text(
        "raise ImportError('the ./fastgate of the working directory was imported')\n")
    port, admin = dead_port(), dead_port()
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: 127.0.0.1:{admin}\nworkers: 2\n"
        "upstreams: {app: {url: 'http://127.0.0.1:1'}}\n"
        "routes: [{name: r, match: {path: /}, upstream: app, auth: none}]\n")
    # The master imports fastgate from the repository (as an installed `fastgate` script
    # would import site-packages), whatever the working directory holds.
    master = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
              "from fastgate.cli import main; sys.exit(main())")
    err = tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTGATE_LOG_LEVEL")}
    with open(err, "wb") as errf:
        proc = subprocess.Popen([sys.executable, "-c", master, "run", "-c", str(cfg),
                                 "--log-level", "debug"], cwd=shadow, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=errf, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=2)
                try:
                    conn.request("GET", "/readyz")
                    status = conn.getresponse().status
                finally:
                    conn.close()
                if status == 200:
                    break
            time.sleep(0.1)
        log = err.read_text(errors="replace")
        assert status == 200, log[-3000:]
        assert "working directory was imported" not in log
        # --log-level reaches the workers: each logs its level and where fastgate came from.
        for index in (0, 1):
            assert re.search(rf"worker {index} DEBUG fastgate.supervisor: log level debug; "
                             rf"fastgate from {re.escape(str(ROOT / 'fastgate'))}", log), log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


# -- check: summary, shadowed routes; --version; token argument order -------------------------


def test_check_summary_counts_in_the_right_number(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "upstreams: {a: {url: 'http://127.0.0.1:1'}, b: {url: 'http://127.0.0.1:2'}}\n"
        f"providers: {{p: {{issuer: '{ISS}', jwks: {{keys: []}}}}}}\n"
        "routes:\n"
        "  - {name: one, match: {path_prefix: /one/}, upstream: a, auth: none}\n"
        "  - {name: two, match: {path_prefix: /two/}, upstream: b, auth: none}\n")
    p = fastgate("check", "-c", str(cfg))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"{cfg}: OK (2 routes, 1 provider, 2 upstreams)"
    assert p.stderr == ""  # distinct prefixes: nothing shadowed


def test_check_warns_about_shadowed_routes(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "upstreams: {app: {url: 'http://127.0.0.1:1'}}\n"
        "routes:\n"
        "  - {name: api, match: {path_prefix: /api/, methods: [GET, POST]}, upstream: app,"
        " auth: none}\n"
        "  - {name: orders, match: {path_prefix: /api/orders, methods: [GET]}, upstream: app,"
        " auth: none}\n"                                           # shadowed by api
        "  - {name: writes, match: {path_prefix: /api/orders, methods: [DELETE]}, upstream: app,"
        " auth: none}\n"                                           # DELETE: not shadowed
        "  - {name: hosted, match: {path_prefix: /api/, host: a.example}, upstream: app,"
        " auth: none}\n"                                           # any method: not shadowed
        "  - {name: all, match: {path_prefix: /}, upstream: app, auth: none}\n"
        "  - {name: health, match: {path: /healthz}, upstream: app, auth: none}\n"  # shadowed
        "  - {name: v1, match: {path_regex: '/v1/.*'}, upstream: app, auth: none}\n")  # too
    p = fastgate("check", "-c", str(cfg))
    assert p.returncode == 0, p.stderr  # a warning, not an error
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, p.stderr
    assert warnings[0].startswith("warning: routes[1] (orders) is never used: routes[0] (api)")
    assert warnings[1].startswith("warning: routes[5] (health) is never used: routes[4] (all)")
    assert warnings[2].startswith("warning: routes[6] (v1) is never used: routes[4] (all)")
    assert "OK (7 routes, 0 providers, 1 upstream)" in p.stdout


def test_check_warns_about_the_same_match_twice(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        "upstreams: {app: {url: 'http://127.0.0.1:1'}}\n"
        "routes:\n"
        "  - {name: a, match: {path_regex: '/x/.*', methods: [get]}, upstream: app, auth: none}\n"
        "  - {name: b, match: {path_regex: '/x/.*', methods: [GET]}, upstream: app, auth: none}\n"
        "  - {name: c, match: {path_regex: '/x/[0-9]+'}, upstream: app, auth: none}\n")
    p = fastgate("check", "-c", str(cfg))
    warnings = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert [w.split(":")[1].strip() for w in warnings] == ["routes[1] (b) is never used"]


def test_version_prints_version_and_build_info() -> None:
    import platform

    from cryptography.hazmat.backends.openssl.backend import backend

    import fastgate as package

    p = fastgate("--version")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == f"fastgate {package.__version__}"
    text = p.stdout
    for ext in ("_verify", "_http", "_routes"):
        assert ext in text
    assert "MISSING" not in text
    assert backend.openssl_version_text() in text
    assert platform.python_version() in text


def test_token_checks_every_argument_before_printing_anything(tmp_path: Path) -> None:
    # Without --key a throw-away key's JWK is printed; a bad argument must come first.
    for args in (["--exp", "soon"], ["--claims", "{not json"], ["--claims", "[1]"],
                 ["novalue"], ["--alg", "XX999"]):
        p = fastgate("token", "--iss", ISS, *args)
        assert p.returncode in (1, 2), args
        assert p.stdout == "", args
        assert len(p.stderr.strip().splitlines()) == 1, (args, p.stderr)
        assert "JWK" not in p.stderr and "Traceback" not in p.stderr, args


def test_run_log_format_is_checked() -> None:
    p = fastgate("run", "-c", str(CONFIGS / "minimal.yaml"), "--log-format", "xml")
    assert p.returncode == 2 and "--log-format" in p.stderr and "Traceback" not in p.stderr


# -- token --dpop: RFC 7638 thumbprints, RFC 9449 proofs ----------------------------------------

# RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSo"
         "c_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQ"
         "R0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFT"
         "WhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_jwk_thumbprint_rfc7638_example_and_members() -> None:
    import hashlib

    from fastgate.tools.devtoken import b64url, jwk_thumbprint

    assert jwk_thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    # Only the required members count: kid/alg/use and private members change nothing, nor
    # does the order the members come in.
    bare = {k: RFC7638_JWK[k] for k in ("n", "kty", "e")}
    assert jwk_thumbprint(bare) == RFC7638_THUMBPRINT
    assert jwk_thumbprint({**bare, "use": "sig", "d": "AAAA"}) == RFC7638_THUMBPRINT
    # EC and OKP: crv,kty,x,y and crv,kty,x, lexicographic, no whitespace (§3.2, RFC 8037 §2).
    ec_jwk = {"y": "Y-val", "x": "X-val", "kty": "EC", "crv": "P-256", "kid": "k"}
    expected = b'{"crv":"P-256","kty":"EC","x":"X-val","y":"Y-val"}'
    assert jwk_thumbprint(ec_jwk) == b64url(hashlib.sha256(expected).digest())
    okp = {"x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kty": "OKP", "crv": "Ed25519"}
    expected = (b'{"crv":"Ed25519","kty":"OKP","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}')
    assert jwk_thumbprint(okp) == b64url(hashlib.sha256(expected).digest())
    # RFC 8037 Appendix A.3: that key's thumbprint.
    assert jwk_thumbprint(okp) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    for bad in ({"kty": "EC", "crv": "P-256", "x": "a"}, {"kty": "XYZ"}, {},
                {"kty": "RSA", "n": "a", "e": 3}):
        with pytest.raises(ValueError):
            jwk_thumbprint(bad)  # type: ignore[arg-type]


def _jwk_public_key(jwk: dict[str, Any]) -> Any:
    """The public key a proof's ``jwk`` header names, built from the JWK alone."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    def num(name: str) -> int:
        return int.from_bytes(_b64decode(jwk[name]), "big")

    if jwk["kty"] == "EC":
        curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(),
                 "P-521": ec.SECP521R1()}[jwk["crv"]]
        return ec.EllipticCurvePublicNumbers(num("x"), num("y"), curve).public_key()
    if jwk["kty"] == "RSA":
        return rsa.RSAPublicNumbers(num("e"), num("n")).public_key()
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519"
    return ed25519.Ed25519PublicKey.from_public_bytes(_b64decode(jwk["x"]))


def verify_proof(proof: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a DPoP proof whose signature verifies with its own ``jwk``
    header (RFC 9449 §4.3 items 5-6); raises InvalidSignature otherwise."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    head_b64, claims_b64, sig_b64 = proof.split(".")
    header = json.loads(_b64decode(head_b64))
    claims = json.loads(_b64decode(claims_b64))
    signing_input = f"{head_b64}.{claims_b64}".encode()
    sig = _b64decode(sig_b64)
    alg = header["alg"]
    key = _jwk_public_key(header["jwk"])
    digest = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
    if alg.startswith("ES"):
        size = {"ES256": 32, "ES384": 48, "ES512": 66}[alg]
        assert len(sig) == 2 * size  # raw R||S (RFC 7518 §3.4), not DER
        der = encode_dss_signature(int.from_bytes(sig[:size], "big"),
                                   int.from_bytes(sig[size:], "big"))
        key.verify(der, signing_input, ec.ECDSA(digest[alg[2:]]))
    elif alg.startswith("RS"):
        key.verify(sig, signing_input, padding.PKCS1v15(), digest[alg[2:]])
    elif alg.startswith("PS"):
        h = digest[alg[2:]]
        key.verify(sig, signing_input, padding.PSS(padding.MGF1(h), h.digest_size), h)
    else:
        assert alg == "EdDSA"
        key.verify(sig, signing_input)
    return header, claims


PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512", "EdDSA", "RS256", "PS256"])
def test_make_dpop_proof_every_key_type(alg: str, rsa_key: rsa.RSAPrivateKey) -> None:
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from fastgate.tools.devtoken import b64url, jwk_thumbprint, make_dpop_proof

    private: Any = {
        "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
        "ES384": lambda: ec.generate_private_key(ec.SECP384R1()),
        "ES512": lambda: ec.generate_private_key(ec.SECP521R1()),
        "EdDSA": ed25519.Ed25519PrivateKey.generate,
        "RS256": lambda: rsa_key,
        "PS256": lambda: rsa_key,
    }[alg]()
    token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
    before = int(time.time())
    proof = make_dpop_proof(private, htm="POST", htu="https://api.example.com/orders",
                            access_token=token, nonce="n-1",
                            alg="PS256" if alg == "PS256" else None)
    header, claims = verify_proof(proof)
    assert set(header) == {"typ", "alg", "jwk"}
    assert header["typ"] == "dpop+jwt" and header["alg"] == alg
    assert not PRIVATE_MEMBERS & set(header["jwk"])  # the PUBLIC key only
    assert set(claims) == {"jti", "htm", "htu", "iat", "ath", "nonce"}
    assert claims["htm"] == "POST" and claims["htu"] == "https://api.example.com/orders"
    assert isinstance(claims["iat"], int) and before <= claims["iat"] <= time.time() + 1
    assert claims["ath"] == b64url(hashlib.sha256(token.encode("ascii")).digest())
    assert claims["nonce"] == "n-1"
    assert len(_b64decode(claims["jti"])) >= 16
    jwk_thumbprint(header["jwk"])  # a complete public JWK
    # A fresh jti per proof; no ath/nonce unless asked; iat and jti as given.
    other = make_dpop_proof(private, htm="GET", htu="https://a/", iat=1000.7, jti="j1")
    _, claims2 = verify_proof(other)
    assert claims2 == {"jti": "j1", "htm": "GET", "htu": "https://a/", "iat": 1000}
    assert verify_proof(make_dpop_proof(private, htm="GET", htu="https://a/"))[1]["jti"] != \
        claims["jti"]


def test_make_dpop_proof_refuses_what_cannot_be_a_proof(ec_key: ec.EllipticCurvePrivateKey,
                                                        ) -> None:
    from fastgate.tools.devtoken import make_dpop_proof

    with pytest.raises(ValueError, match="asymmetric"):
        make_dpop_proof(b"secret" * 8, htm="GET", htu="https://a/")
    with pytest.raises(ValueError, match="use ES256"):
        make_dpop_proof(ec_key, htm="GET", htu="https://a/", alg="ES384")
    # Tests can break one rule on purpose.
    proof = make_dpop_proof(ec_key, htm="GET", htu="https://a/", extra_header={"typ": "JWT"},
                            extra_claims={"htm": "PUT"})
    header, claims = verify_proof(proof)
    assert header["typ"] == "JWT" and claims["htm"] == "PUT"


def _dpop_cli_output(p: subprocess.CompletedProcess[str]) -> tuple[str, str, list[str]]:
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3, p.stdout
    import shlex

    return lines[0], lines[1], shlex.split(lines[2])


def test_token_dpop_mints_a_bound_token_a_proof_and_a_curl_line() -> None:
    import hashlib

    from fastgate.tools.devtoken import b64url, jwk_thumbprint, load_key, make_dpop_proof

    url = "https://api.example.test:8443/orders/7?expand=1#top"
    p = fastgate("token", "--dpop", "--htm", "PATCH", "--htu", url, "--iss", ISS, "sub=alice")
    token, proof, curl = _dpop_cli_output(p)
    err = [line for line in p.stderr.splitlines() if not line.startswith("#")]
    issuer_jwk, client_jwk = json.loads(err[0]), json.loads(err[1])
    claims = verify(token, issuer_jwk)
    assert claims["sub"] == "alice"
    header, proof_claims = verify_proof(proof)
    assert header["alg"] == "ES256" and header["jwk"]["crv"] == "P-256"  # the default key
    # The binding: the token's cnf.jkt is the thumbprint of the proof's key (RFC 9449 §6.1).
    assert claims["cnf"] == {"jkt": jwk_thumbprint(header["jwk"])}
    assert proof_claims["htm"] == "PATCH"
    assert proof_claims["htu"] == "https://api.example.test:8443/orders/7"  # no query/fragment
    assert proof_claims["ath"] == b64url(hashlib.sha256(token.encode()).digest())
    assert f"cnf.jkt {claims['cnf']['jkt']}" in p.stderr
    assert curl == ["curl", "-X", "PATCH", "-H", f"Authorization: DPoP {token}",
                    "-H", f"DPoP: {proof}", url]
    # The printed client key is the private key of that jwk: it makes more proofs.
    client = load_key(json.dumps(client_jwk).encode())
    assert jwk_thumbprint(client.public_jwk()) == claims["cnf"]["jkt"]
    more = make_dpop_proof(client, htm="GET", htu="https://a/", access_token=token)
    assert verify_proof(more)[0]["jwk"] == header["jwk"]


def test_token_dpop_with_a_client_key_file_and_more_proofs_for_one_token(
        tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    from fastgate.tools.devtoken import jwk_thumbprint

    issuer = str(pem_file(tmp_path, rsa_key))
    client_path = tmp_path / "client.jwk"
    client_path.write_text(json.dumps(ec_private_jwk(ec_key, "c1")))
    url = "http://127.0.0.1:8080/api/x"
    p = fastgate("token", "--key", issuer, "--kid", "k1", "--iss", ISS, "--dpop",
                 "--dpop-key", str(client_path), "--htu", url)
    token, proof, curl = _dpop_cli_output(p)
    assert "PRIVATE" not in p.stderr and "JWK:" not in p.stderr  # no throw-away key to show
    claims = verify(token, public_jwk(rsa_key, "k1"))
    header, proof_claims = verify_proof(proof)
    assert claims["cnf"]["jkt"] == jwk_thumbprint(header["jwk"]) == jwk_thumbprint(
        public_jwk(ec_key))
    assert proof_claims["htm"] == "GET" and proof_claims["htu"] == url
    assert curl == ["curl", "-H", f"Authorization: DPoP {token}", "-H", f"DPoP: {proof}", url]
    # --access-token: the same token, a new proof (a proof is good for one request).
    p2 = fastgate("token", "--dpop", "--dpop-key", str(client_path), "--htu", url,
                  "--access-token", token)
    token2, proof2, _ = _dpop_cli_output(p2)
    assert token2 == token and proof2 != proof
    assert verify_proof(proof2)[1]["jti"] != proof_claims["jti"]
    # ... but not for a token bound to another key.
    other = tmp_path / "other.pem"
    other.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    p3 = fastgate("token", "--dpop", "--dpop-key", str(other), "--htu", url,
                  "--access-token", token)
    assert p3.returncode == 1 and p3.stdout == "" and "not bound to --dpop-key" in p3.stderr
    # An RSA client key signs RS256 proofs, PS256 on request.
    rsa_client = tmp_path / "client-rsa.pem"
    rsa_client.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    for alg_args, alg in (([], "RS256"), (["--dpop-alg", "PS256"], "PS256")):
        p4 = fastgate("token", "--key", issuer, "--iss", ISS, "--dpop", "--dpop-key",
                      str(rsa_client), *alg_args, "--htu", url)
        token4, proof4, _ = _dpop_cli_output(p4)
        header4, _ = verify_proof(proof4)
        assert header4["alg"] == alg
        assert verify(token4, public_jwk(rsa_key))["cnf"]["jkt"] == jwk_thumbprint(
            header4["jwk"])


def test_token_dpop_usage_errors_print_nothing_else(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jwk"
    secret.write_text(json.dumps({"kty": "oct", "k": b64u(b"s" * 32)}))
    for args, needle, code in [
        (["--htu", "https://a/"], "--htu needs --dpop", 2),
        (["--dpop-key", "x.pem"], "--dpop-key needs --dpop", 2),
        (["--dpop"], "--dpop needs --htu", 2),
        (["--dpop", "--htu", "ftp://a/"], "absolute http(s) URL", 2),
        (["--dpop", "--htu", "/relative"], "absolute http(s) URL", 2),
        (["--dpop", "--htu", "https://a/", "--htm", "GE T"], "--htm", 2),
        (["--dpop", "--htu", "https://a/", "--access-token", "a.b.c"], "needs --dpop-key", 2),
        (["--dpop", "--htu", "https://a/", "--dpop-key", str(secret)], "HMAC", 1),
        (["--dpop", "--htu", "https://a/", "--dpop-alg", "HS256"], "cannot generate", 1),
        (["--dpop", "--htu", "https://a/", "--exp", "soon"], "--exp", 2),
    ]:
        p = fastgate("token", "--iss", ISS, *args)
        assert p.returncode == code, (args, p.returncode, p.stderr)
        assert p.stdout == "", args
        assert needle in p.stderr, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, args
