"""`fastgate verify` / fastgate.tools.explain: the decision, the check that decided, and the
context.

Tokens come from the independent factory (tests/factory.py); time is a parameter (``now``).
The CLI is exercised as a subprocess for the exit codes (0 accepted, 1 rejected, 2 usage).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fastgate.config import GatewayConfig, parse_config
from fastgate.token.reasons import Reason
from fastgate.tools.explain import ExplainError, explain, explain_async
from tests.factory import AUDIENCE, ISSUER, NOW, SigningKey, default_claims, generate, make_token
from tests.idp import IdP, run

ROOT = Path(__file__).resolve().parents[2]
OTHER_ISSUER = "https://other.example.test/"


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate("RS256", kid="main-1")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return generate("ES256", kid="other-1")


def config_doc(key: SigningKey, other_key: SigningKey) -> dict[str, Any]:
    return {
        "upstreams": {"app": {"url": "http://127.0.0.1:9"}},  # never contacted
        "providers": {
            "main": {"issuer": ISSUER, "jwks": {"keys": [key.public_jwk]},
                     "audiences": [AUDIENCE], "clock_skew": 60},
            "other": {"issuer": OTHER_ISSUER, "jwks": {"keys": [other_key.public_jwk]},
                      "audiences": [AUDIENCE]},
        },
        "api_keys": {"header": "X-API-Key",
                     "keys": [{"id": "p", "sha256": hashlib.sha256(b"k").hexdigest(),
                               "client_id": "partner-app"}]},
        "routes": [
            {"name": "public", "match": {"path_prefix": "/public/"}, "upstream": "app",
             "auth": "none"},
            {"name": "orders", "match": {"path_prefix": "/api/orders"}, "upstream": "app",
             "auth": {"providers": ["main"], "scopes": {"all": ["orders:read"]},
                      "claims": {"tenant.region": {"one_of": ["eu-west-1"]}},
                      "claim_headers": {"X-User-Id": "sub", "X-Tenant": "tenant.id"}}},
            {"name": "billing", "match": {"path_prefix": "/api/billing"}, "upstream": "app",
             "auth": {"providers": ["main"], "audiences": ["api://billing"]}},
            {"name": "partner", "match": {"path_prefix": "/api/partner"}, "upstream": "app",
             "auth": {"providers": ["main", "other"],
                      "api_key": {"required": True, "bind_claim": "client_id"}}},
        ],
    }


@pytest.fixture(scope="module")
def config(key: SigningKey, other_key: SigningKey) -> GatewayConfig:
    return parse_config(config_doc(key, other_key), {})


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory, key: SigningKey,
                other_key: SigningKey) -> Path:
    path = tmp_path_factory.mktemp("explain") / "gateway.yaml"
    path.write_text(yaml.safe_dump(config_doc(key, other_key)))
    return path


def user_claims(**overrides: Any) -> dict[str, Any]:
    claims = default_claims(NOW, sub="alice", scope="orders:read",
                            tenant={"id": "acme", "region": "eu-west-1"})
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def rfc7638(jwk: dict[str, Any]) -> str:
    members = {k: jwk[k] for k in ("e", "kty", "n")}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"),
                                       sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastgate", "verify", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, input=stdin)


# -- decisions ---------------------------------------------------------------------------------


def test_accepted_shows_provider_key_claims_and_headers(config: GatewayConfig,
                                                        key: SigningKey) -> None:
    token = make_token(key, user_claims())
    e = explain(config, token, None, NOW)
    assert e.ok and e.reason is Reason.OK and e.status == 200
    assert e.route == "orders"  # the first JWT route listing the token's issuer
    assert e.check == "ok"
    assert e.provider == "main" and e.issuer == ISSUER
    assert e.key is not None
    assert (e.key.kid, e.key.alg, e.key.kty) == ("main-1", "RS256", "RSA")
    assert e.key.thumbprint == rfc7638(key.public_jwk)
    assert e.key.source == "jwks"
    assert e.claims_verified and e.claims is not None and e.claims["sub"] == "alice"
    assert e.header == {"alg": "RS256", "typ": "JWT", "kid": "main-1"}
    assert ("X-User-Id", "alice") in e.claim_headers
    assert ("X-Tenant", "acme") in e.claim_headers
    assert e.times["exp"] == NOW + 600


def test_accepted_cli_exit_0_text_and_json(config_file: Path, key: SigningKey) -> None:
    token = make_token(key, user_claims())
    p = cli("-c", str(config_file), "--now", str(NOW), token)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.startswith("ACCEPTED on route 'orders': 200 ok")
    assert "provider:  main" in out
    assert "kid=main-1" in out and "alg=RS256" in out
    assert '"sub": "alice"' in out and "UNVERIFIED" not in out
    assert "X-User-Id: alice" in out

    p = cli("-c", str(config_file), "--now", str(NOW), "--json", token)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["decision"] == "accepted" and doc["reason"] == "ok" and doc["status"] == 200
    assert doc["key"]["kid"] == "main-1" and doc["key"]["alg"] == "RS256"
    assert doc["provider"] == "main" and doc["claims"]["sub"] == "alice"
    assert doc["claims_verified"] is True

    # The token can come from stdin (keeps it out of shell history), with a Bearer prefix.
    p = cli("-c", str(config_file), "--now", str(NOW), "-", stdin=f"Bearer {token}\n")
    assert p.returncode == 0, p.stderr


def test_expired_shows_exp_against_now_and_skew(config: GatewayConfig, config_file: Path,
                                                 key: SigningKey) -> None:
    token = make_token(key, user_claims(iat=int(NOW) - 7200, exp=int(NOW) - 3600))
    e = explain(config, token, None, NOW)
    assert not e.ok
    assert e.reason is Reason.TOKEN_EXPIRED and e.status == 401
    assert e.check == "exp"
    assert e.times["exp"] == NOW - 3600 and e.now == NOW and e.clock_skew == 60
    assert "1h 0m ago" in e.message and "clock skew 60s" in e.message
    assert 'error_description="token_expired"' in (e.www_authenticate or "")
    # The signature verified: these are the issuer's claims, only the exp check failed.
    assert e.claims_verified

    p = cli("-c", str(config_file), "--now", str(NOW), token)
    assert p.returncode == 1, p.stderr
    assert p.stdout.startswith("REJECTED on route 'orders': 401 token_expired")
    assert "check:     exp" in p.stdout
    assert "(1h 0m ago)" in p.stdout and "clock skew 60s" in p.stdout
    assert "UNVERIFIED" not in p.stdout
    assert "claims (signature verified; rejected by the exp check):" in p.stdout

    # Within the skew it is accepted; --now also takes ISO 8601.
    p = cli("-c", str(config_file), "--now", "2027-01-15T07:59:00Z",
            make_token(key, user_claims(exp=int(NOW) - 30)))
    assert NOW == 1_800_000_000.0  # 2027-01-15T08:00:00Z
    assert p.returncode == 0, p.stdout + p.stderr


def test_not_yet_valid(config: GatewayConfig, key: SigningKey) -> None:
    e = explain(config, make_token(key, user_claims(nbf=int(NOW) + 600)), None, NOW)
    assert e.reason is Reason.TOKEN_NOT_YET_VALID and e.check == "nbf"
    assert "in 10m 0s" in e.message


def test_wrong_audience_on_route_with_audiences_override(config: GatewayConfig,
                                                         key: SigningKey) -> None:
    token = make_token(key, user_claims())  # aud api://orders: fine for the provider
    assert explain(config, token, "partner", NOW).ok is True
    e = explain(config, token, "billing", NOW)
    assert e.route == "billing"
    assert e.reason is Reason.AUDIENCE_MISMATCH and e.status == 401
    assert e.check == "aud"
    assert "the route's audiences" in e.message and "api://billing" in e.message
    assert AUDIENCE in e.message


def test_insufficient_scope_names_required_and_granted(config: GatewayConfig,
                                                       key: SigningKey) -> None:
    token = make_token(key, user_claims(scope="profile email"))
    e = explain(config, token, "orders", NOW)
    assert e.reason is Reason.INSUFFICIENT_SCOPE and e.status == 403
    assert e.check == "scopes"
    assert "orders:read" in e.message and "email, profile" in e.message
    assert 'scope="orders:read"' in (e.www_authenticate or "")
    # The signature was fine: the claims are verified, but no claim headers are sent.
    assert e.claims_verified and e.claim_headers == []


def test_claim_rule_failure_names_the_rule(config: GatewayConfig, key: SigningKey) -> None:
    token = make_token(key, user_claims(tenant={"id": "acme", "region": "us-east-1"}))
    e = explain(config, token, "orders", NOW)
    assert e.reason is Reason.CLAIM_MISMATCH and e.status == 403
    assert e.check == "claims: tenant.region one_of"
    assert '"us-east-1"' in e.message

    e = explain(config, make_token(key, user_claims(tenant=None)), "orders", NOW)
    assert e.reason is Reason.CLAIM_MISSING and "absent" in e.message


def test_unknown_issuer(config: GatewayConfig, config_file: Path, key: SigningKey) -> None:
    token = make_token(key, user_claims(iss="https://evil.example.test/"))
    e = explain(config, token, None, NOW)
    assert e.route == "orders"  # no route lists that issuer: the first JWT route answers
    assert e.reason is Reason.ISSUER_UNKNOWN and e.status == 401
    assert e.check == "issuer"
    assert e.provider is None
    assert "https://evil.example.test/" in e.message and f"main: {ISSUER}" in e.message
    p = cli("-c", str(config_file), "--now", str(NOW), token)
    assert p.returncode == 1 and "issuer_unknown" in p.stdout


def test_issuer_picks_the_route(config: GatewayConfig, other_key: SigningKey) -> None:
    token = make_token(other_key, default_claims(NOW, iss=OTHER_ISSUER))
    e = explain(config, token, None, NOW)
    assert e.route == "partner"  # the first route listing provider "other"
    assert e.ok and e.provider == "other"
    assert e.key is not None and (e.key.kid, e.key.alg, e.key.kty) == ("other-1", "ES256", "EC")


def test_bad_signature(config: GatewayConfig, config_file: Path, key: SigningKey) -> None:
    forger = generate("RS256", kid="main-1")  # same kid, different key
    token = make_token(forger, user_claims())
    e = explain(config, token, None, NOW)
    assert e.reason is Reason.SIGNATURE_INVALID and e.status == 401
    assert e.check == "signature"
    assert e.key is not None and e.key.kid == "main-1"
    assert "kid=main-1" in e.message
    assert not e.claims_verified and e.claims is not None and e.claims["sub"] == "alice"
    p = cli("-c", str(config_file), "--now", str(NOW), token)
    assert p.returncode == 1
    assert "signature_invalid" in p.stdout and "claims (UNVERIFIED)" in p.stdout


def test_unknown_kid_lists_known_kids(config: GatewayConfig, key: SigningKey) -> None:
    e = explain(config, make_token(key, user_claims(), kid="rotated-away"), None, NOW)
    assert e.reason is Reason.KEY_NOT_FOUND and e.check == "kid unknown"
    assert '"rotated-away"' in e.message and "main-1" in e.message


def test_malformed_token(config: GatewayConfig) -> None:
    e = explain(config, "not-a-jwt", None, NOW)
    assert e.reason is Reason.TOKEN_MALFORMED and e.status == 401
    assert e.check == "segment count"
    assert e.header is None and e.claims is None
    assert "could not be parsed" in " ".join(e.notes)


def test_api_key_route_says_not_applicable(config: GatewayConfig, key: SigningKey) -> None:
    e = explain(config, make_token(key, user_claims(client_id="partner-app")), "partner", NOW)
    assert e.ok
    note = " ".join(e.notes)
    assert "API key" in note and "N/A" in note
    assert "client_id" in note and '"partner-app"' in note


# -- remote keys (discovery), fetched once --------------------------------------------------------


def test_discovery_provider_is_fetched_once(key: SigningKey) -> None:
    async def scenario() -> None:
        async with IdP(keys={"keys": [key.public_jwk]}) as idp:
            cfg = parse_config({
                "upstreams": {"app": {"url": "http://127.0.0.1:9"}},
                "providers": {"dev": {"issuer": idp.issuer, "discovery": True,
                                      "jwks_cache": {"timeout": "2s"}}},
                "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "app",
                            "auth": {"providers": ["dev"]}}],
            }, {})
            token = make_token(key, default_claims(NOW, iss=idp.issuer))
            e = await explain_async(cfg, token, None, NOW)
            assert e.ok, e.render()
            assert e.key is not None and e.key.source == "discovery"
            assert e.key.location == idp.jwks_url
            assert e.key.thumbprint == rfc7638(key.public_jwk)
            assert idp.hits["/jwks"] == 1 and idp.hits["/.well-known/openid-configuration"] == 1

            idp.fault = "500"
            e = await explain_async(cfg, token, None, NOW)
            assert e.reason is Reason.JWKS_UNAVAILABLE and e.status == 503
            assert any("http 500" in n for n in e.notes), e.notes

    run(scenario(), timeout=30)


# -- usage errors: exit 2 ------------------------------------------------------------------------


def test_usage_errors(config: GatewayConfig, config_file: Path, key: SigningKey,
                      tmp_path: Path) -> None:
    token = make_token(key, user_claims())
    with pytest.raises(ExplainError, match="unknown route 'nope'"):
        explain(config, token, "nope", NOW)
    with pytest.raises(ExplainError, match="auth: none"):
        explain(config, token, "public", NOW)

    p = cli("-c", str(config_file), "--route", "nope", token)
    assert p.returncode == 2 and "unknown route 'nope'" in p.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: [{name: x}]\nbogus: 1\n")
    p = cli("-c", str(broken), token)
    assert p.returncode == 2 and "bogus" in p.stderr
    p = cli("-c", str(tmp_path / "missing.yaml"), token)
    assert p.returncode == 2
    p = cli("-c", str(config_file), "--now", "yesterday", token)
    assert p.returncode == 2 and "--now" in p.stderr


def test_max_lifetime_is_explained_as_the_lifetime_check(key: SigningKey, other_key: SigningKey,
                                                         tmp_path: Path) -> None:
    doc = config_doc(key, other_key)
    doc["providers"]["main"]["max_lifetime"] = "1h"
    config = parse_config(doc, {})
    # Issued now, valid for 2 h: exp is in the future, but the issuer gave it twice the life
    # this provider allows.
    token = make_token(key, user_claims(iat=int(NOW), exp=int(NOW) + 7200))
    e = explain(config, token, None, NOW)
    assert e.reason is Reason.TOKEN_EXPIRED and e.check == "max lifetime"
    assert "exp - iat = 2h 0m" in e.message and "max_lifetime 1h 0m" in e.message
    assert "accepted until" not in e.message  # not an exp problem that reads as valid
    assert (e.lifetime, e.lifetime_from, e.max_lifetime) == (7200, "iat", 3600)
    assert e.claims_verified
    # Without iat the lifetime is measured from now.
    no_iat = make_token(key, {k: v for k, v in user_claims(exp=int(NOW) + 5400).items()
                              if k != "iat"})
    e = explain(config, no_iat, None, NOW)
    assert e.check == "max lifetime" and "exp - now = 1h 30m" in e.message
    assert e.lifetime_from == "now"

    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    p = cli("-c", str(path), "--now", str(NOW), token)
    assert p.returncode == 1, p.stderr
    assert "check:     max lifetime" in p.stdout
    assert "lifetime:  exp - iat = 2h 0m (max_lifetime 1h 0m)" in p.stdout
    assert "accepted until" not in p.stdout
    p = cli("-c", str(path), "--now", str(NOW), "--json", token)
    out = json.loads(p.stdout)
    assert out["check"] == "max lifetime"
    assert out["time"]["max_lifetime"] == 3600
    assert out["time"]["lifetime"] == {"seconds": 7200, "from": "iat"}
    assert out["claims_verified"] is True


def test_opaque_and_encrypted_tokens_get_a_hint(config: GatewayConfig) -> None:
    e = explain(config, "2YotnFZFEjr1zCsicMWpAA", None, NOW)  # RFC 6749 §4.1.4's example
    assert e.reason is Reason.TOKEN_MALFORMED and e.check == "segment count"
    assert e.message.startswith("not a JWT: an opaque access token?")
    assert "configure the IdP for JWT access tokens" in e.message
    jwe = ".".join(["eyJhbGciOiJSU0EtT0FFUCJ9", "a", "b", "c", "d"])
    e = explain(config, jwe, None, NOW)
    assert "encrypted token (JWE, 5 segments)" in e.message
    e = explain(config, "a.b", None, NOW)
    assert "2 segments" in e.message


# ---------------------------------------------------------------------------------------------
# typ (RFC 9068 §4)
# ---------------------------------------------------------------------------------------------


def typ_config(key: SigningKey, other_key: SigningKey) -> GatewayConfig:
    doc = config_doc(key, other_key)
    doc["providers"]["main"]["typ"] = ["at+jwt"]
    return parse_config(doc, {})


def test_typ_is_shown_even_when_not_checked(config: GatewayConfig, key: SigningKey) -> None:
    e = explain(config, make_token(key, user_claims()), "orders", now=NOW)
    assert e.ok and e.typ == "JWT" and e.allowed_typ is None
    assert '  typ:       "JWT" (not checked: the provider lists no typ)' in e.render()
    assert e.to_dict()["typ"] == {"value": "JWT", "allowed": None}


def test_typ_mismatch_is_explained(key: SigningKey, other_key: SigningKey) -> None:
    config = typ_config(key, other_key)
    id_token = make_token(key, user_claims())  # the factory's header says typ "JWT"
    e = explain(config, id_token, "orders", now=NOW)
    assert (e.ok, e.reason, e.status, e.check) == (False, Reason.TOKEN_TYPE_INVALID, 401, "typ")
    assert e.www_authenticate == ('Bearer realm="fastgate", error="invalid_token", '
                                  'error_description="token_type_invalid"')
    assert 'typ "JWT" is not allowed; provider main accepts typ at+jwt' in e.message
    assert "ID token" in e.message
    assert not e.claims_verified  # typ is decided before the signature
    text = e.render()
    assert '  typ:       "JWT" (allowed: at+jwt)' in text
    assert "claims (UNVERIFIED):" in text
    assert e.to_dict()["typ"] == {"value": "JWT", "allowed": ["at+jwt"]}
    # no typ at all
    header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": key.kid}).encode())
    untyped = make_token(key, user_claims(), raw_header=json.dumps(
        {"alg": "RS256", "kid": key.kid}).encode())
    assert header.decode().rstrip("=") == untyped.split(".")[0]
    e = explain(config, untyped, "orders", now=NOW)
    assert e.reason is Reason.TOKEN_TYPE_INVALID and e.typ is None
    assert e.message.startswith("the token has no typ header")
    assert "  typ:       (none) (allowed: at+jwt)" in e.render()
    # the right typ in another spelling is accepted, and the message names the typ check
    e = explain(config, make_token(key, user_claims(), header={"typ": "Application/AT+JWT"}),
                "orders", now=NOW)
    assert e.ok, e.render()
    assert "typ, time window" in e.message
