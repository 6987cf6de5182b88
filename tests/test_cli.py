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
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_workers_import_what_the_master_runs_not_the_working_directory(tmp_path: Path) -> None:
    """cwd = a source checkout whose ./fastgate cannot import (no compiled extension there):
    the workers must still import the package the master runs, and become ready."""
    shadow = tmp_path / "checkout"
    (shadow / "fastgate").mkdir(parents=True)
    (shadow / "fastgate" / "__init__.py").write_text(
        "raise ImportError('the ./fastgate of the working directory was imported')\n")
    port, admin = _free_port(), _free_port()
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
