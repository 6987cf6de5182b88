"""The `fastgate` command line: `check` and `token`, run as subprocesses.

Minted tokens are checked with the compiled verifier against the public key, not by decoding
them: what `fastgate token` prints must be a token fastgate itself accepts.
"""

from __future__ import annotations

import json
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
    assert "OK (1 routes, 0 providers, 1 upstreams)" in p.stdout
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
    assert p.returncode == 1 and "--exp" in p.stderr
    garbage = tmp_path / "garbage.key"
    garbage.write_text("hello")
    p = fastgate("token", "--key", str(garbage))
    assert p.returncode == 1 and "PEM" in p.stderr


def _b64decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
