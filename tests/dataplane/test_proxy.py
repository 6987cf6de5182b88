"""The real gateway on a real socket in front of a real aiohttp upstream (SPEC §2-§4).

One gateway (many routes) and one recording upstream serve the whole module; every reject
test asserts status, ``WWW-Authenticate``, JSON body and that the upstream got nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from fastgate.app import Gateway
from fastgate.config import (
    Address,
    ApiKey,
    ApiKeyRule,
    ApiKeysConfig,
    AuthConfig,
    ClaimHeader,
    ClaimRule,
    GatewayConfig,
    Limits,
    ProviderConfig,
    RouteConfig,
    RouteMatch,
    ScopeRule,
    TokenSource,
    UpstreamConfig,
    parse_claim_path,
    parse_claim_template,
)
from fastgate.errors import ConfigError
from fastgate.token.reasons import Reason
from tests.factory import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    default_claims,
    generate,
    jwks_of,
    key_for,
    make_token,
)
from tests.gateway_fixtures import (
    EchoUpstream,
    Loop,
    MetricsSink,
    RawResponse,
    dead_port,
    gather_limited,
    http_request,
    raw_request,
    read_response,
    start_gateway,
)

HMAC_ISS = "https://hmac.example.test/"
FILE_ISS = "https://file.example.test/"
IDTOK_ISS = "https://idtok.example.test/"
MULTI_ISS = "https://multi.example.test/"
REMOTE_ISS = "https://remote.example.test/"
API_KEY = "k-mobile-0123456789abcdef"
API_KEY_NO_CLIENT = "k-web-fedcba9876543210"
MiB = 1024 * 1024


def _auth(*providers: str, **kw: Any) -> AuthConfig:
    return AuthConfig(providers=providers, **kw)


def _route(name: str, upstream: str = "echo", auth: AuthConfig | None = None,
           strip: bool = False, **match: Any) -> RouteConfig:
    return RouteConfig(name, RouteMatch(**match), upstream, strip_prefix=strip, auth=auth)


def build_config(up: EchoUpstream, tmp: Path, keys: dict[str, SigningKey]) -> GatewayConfig:
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps(jwks_of(keys["file"])))
    hs = keys["hmac"].private
    assert isinstance(hs, bytes)
    providers = {
        "main": ProviderConfig("main", ISSUER, "jwks", jwks=jwks_of(keys["main"]),
                               audiences=(AUDIENCE,), algorithms=("RS256",)),
        "hmac": ProviderConfig("hmac", HMAC_ISS, "secret", secret=hs, audiences=(AUDIENCE,),
                               algorithms=("HS256",)),
        "file": ProviderConfig("file", FILE_ISS, "jwks_file", jwks_file=str(jwks_file),
                               audiences=(AUDIENCE,)),
        "idtok": ProviderConfig("idtok", IDTOK_ISS, "jwks", jwks=jwks_of(keys["idtok"]),
                                audiences=(AUDIENCE,),
                                token_from=(TokenSource("header", "X-Id-Token"),)),
        "multi": ProviderConfig("multi", MULTI_ISS, "jwks", jwks=jwks_of(keys["main"]),
                                audiences=(AUDIENCE,),
                                token_from=(TokenSource("header", "Authorization", "Bearer "),
                                            TokenSource("query", "access_token"),
                                            TokenSource("cookie", "id_token"))),
        "remote": ProviderConfig("remote", REMOTE_ISS, "jwks_uri",
                                 jwks_uri=f"http://127.0.0.1:{dead_port()}/jwks.json",
                                 audiences=(AUDIENCE,)),
    }
    claim_headers = (ClaimHeader("X-User-Id", ("sub",)), ClaimHeader("X-Tenant", ("tenant", "id")),
                     ClaimHeader("X-Roles", ("roles",)), ClaimHeader("X-User-Name", ("name",)),
                     ClaimHeader("X-Identity", (), parse_claim_template("{sub}@{tenant.id}")))
    routes = (
        _route("public", path_prefix="/public/"),
        _route("strip", path_prefix="/strip/", strip=True),
        _route("orders", path_prefix="/api/orders",
               auth=_auth("main", "hmac", "file", claim_headers=claim_headers,
                          payload_header="X-Jwt-Payload")),
        _route("other-aud", path_prefix="/api/other",
               auth=_auth("main", audiences=("api://other",))),
        _route("scopes-all", path_prefix="/api/scopes-all",
               auth=_auth("main", scopes=ScopeRule("all", ("orders:read", "orders:write")))),
        _route("scopes-any", path_prefix="/api/scopes-any",
               auth=_auth("main", scopes=ScopeRule("any", ("orders:read", "orders:write")))),
        _route("claims", path_prefix="/api/claims", auth=_auth("main", claims=(
            ClaimRule(parse_claim_path("tenant.region"), "one_of", ("eu-west-1", "eu-central-1")),
            ClaimRule(parse_claim_path("email_verified"), "equals", True),
            ClaimRule(parse_claim_path("roles"), "contains", "writer"),
            ClaimRule(parse_claim_path('["https://example.com/roles"]'), "contains", "admin"),
        ))),
        _route("present", path_prefix="/api/present",
               auth=_auth("main", claims=(ClaimRule(("tenant", "id"), "present", True),))),
        _route("key", path_prefix="/api/key",
               auth=_auth("main", api_key=ApiKeyRule(True, ("client_id",)))),
        _route("all", path_prefix="/api/all", auth=_auth("main", "idtok", mode="all",
                                                         claim_headers=claim_headers[:1])),
        _route("optional", path_prefix="/api/optional",
               auth=_auth("main", allow_missing=True, claim_headers=claim_headers[:1])),
        _route("f403", path_prefix="/api/f403", auth=_auth("main", failure_status=403)),
        _route("hidden", path_prefix="/api/hidden", auth=_auth("main", hide_reasons=True)),
        _route("cors", path_prefix="/api/cors", auth=_auth("main", cors_preflight="bypass")),
        _route("multi", path_prefix="/api/multi", auth=_auth("multi", forward_token=False)),
        _route("remote", path_prefix="/api/remote", auth=_auth("remote")),
        _route("dead", upstream="dead", path_prefix="/dead/"),
        _route("slow", upstream="slow", path_prefix="/slow/"),
        _route("regex", path_regex=r"/rx/[0-9]+", methods=("GET",)),
        _route("host", host="only.example", path_prefix="/h/"),
    )
    return GatewayConfig(
        listen=Address("127.0.0.1", 0),
        admin=None,
        limits=Limits(max_token_bytes=8192, max_header_bytes=16384, max_body_bytes=6 * MiB),
        upstreams={
            "echo": UpstreamConfig("echo", up.url, max_connections=64),
            "dead": UpstreamConfig("dead", f"http://127.0.0.1:{dead_port()}", connect_timeout=1.0),
            "slow": UpstreamConfig("slow", up.url, read_timeout=0.5),
        },
        providers=providers,
        api_keys=ApiKeysConfig(header="X-API-Key", query="api_key", keys=(
            ApiKey("mobile", hashlib.sha256(API_KEY.encode()).digest(), client_id="app-42"),
            ApiKey("web", hashlib.sha256(API_KEY_NO_CLIENT.encode()).digest()),
        )),
        routes=routes,
    )


@dataclass
class Env:
    loop: Loop
    up: EchoUpstream
    gw: Gateway
    keys: dict[str, SigningKey]
    config: GatewayConfig

    @property
    def port(self) -> int:
        return self.gw.port

    def token(self, key: str = "main", **claims: Any) -> str:
        iss = {"main": ISSUER, "hmac": HMAC_ISS, "file": FILE_ISS, "idtok": IDTOK_ISS,
               "multi": MULTI_ISS, "remote": REMOTE_ISS}[key]
        signing = self.keys["main" if key in ("multi", "remote") else key]
        return make_token(signing, default_claims(now=time.time(), **{"iss": iss, **claims}))

    def raw(self, data: bytes, *, head: bool = False) -> RawResponse:
        return self.loop.run(raw_request(self.port, data, head=head))

    def get(self, target: str, headers: list[tuple[str, str]] | None = None,
            method: str = "GET", body: bytes = b"", host: str = "gw.test") -> RawResponse:
        return self.raw(http_request(method, target, headers, body, host=host),
                        head=method == "HEAD")

    def bearer(self, target: str, token: str, extra: list[tuple[str, str]] | None = None,
               method: str = "GET") -> RawResponse:
        return self.get(target, [("Authorization", f"Bearer {token}"), *(extra or [])],
                        method=method)

    def last(self) -> Any:
        return self.up.records[-1]

    def reject(self, target: str, headers: list[tuple[str, str]], reason: Reason, *,
               status: int | None = None, scope: str | None = None,
               hidden: bool = False, method: str = "GET") -> RawResponse:
        """Send; assert the SPEC §4 reject and that the upstream got nothing."""
        before = len(self.up.records)
        resp = self.get(target, headers, method=method)
        assert resp.status == (status or reason.status), (resp.status, resp.body)
        assert resp.header("WWW-Authenticate") == reason.www_authenticate(scope)
        assert resp.header("Content-Type") == "application/json"
        expected = {} if reason.error is None else {"error": reason.error}
        if not hidden:
            expected["reason"] = reason.label
        assert resp.json() == expected
        assert len(self.up.records) == before, "a rejected request reached the upstream"
        return resp


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    loop = Loop()
    up = loop.run(EchoUpstream.start())
    keys = {"main": key_for("RS256"), "hmac": key_for("HS256"), "file": key_for("ES256"),
            "idtok": generate("ES384", kid="idtok-1")}
    config = build_config(up, tmp_path_factory.mktemp("gw"), keys)
    gw = loop.run(start_gateway(config))
    try:
        yield Env(loop, up, gw, keys, config)
    finally:
        loop.run(gw.stop())
        loop.run(up.stop())
        loop.close()


def _forged(env: Env) -> str:
    """A token whose signature belongs to another payload (same key, same length)."""
    good = env.token(sub="user-1")
    other = env.token(sub="user-2")
    return good.rsplit(".", 1)[0] + "." + other.rsplit(".", 1)[1]


# ---------------------------------------------------------------------------------------------
# Admitted requests
# ---------------------------------------------------------------------------------------------


def test_valid_token_forwarded_byte_for_byte(env: Env) -> None:
    token = env.token(sub="user-1", tenant={"id": "t-1"}, roles=["r1", "r2"])
    resp = env.get("/api/orders/42?x=1", [("Authorization", f"bearer {token}"),
                                          ("X-Forwarded-For", "203.0.113.9"),
                                          ("X-Forwarded-Proto", "https")])
    assert resp.status == 200 and resp.header("X-Upstream") == "echo"
    rec = env.last()
    assert rec.target == "/api/orders/42?x=1"
    assert rec.header_values("Authorization") == [f"bearer {token}"]  # untouched
    assert rec.header_values("X-User-Id") == ["user-1"]
    assert rec.header_values("X-Tenant") == ["t-1"]
    assert rec.header_values("X-Roles") == ["r1,r2"]
    # The client is not a trusted proxy: its X-Forwarded-* are replaced (test_protocol.py
    # covers trusted_proxies).
    assert rec.header_values("X-Forwarded-For") == ["127.0.0.1"]
    assert rec.header_values("X-Forwarded-Proto") == ["http"]
    assert rec.header_values("X-Forwarded-Host") == ["gw.test"]
    assert rec.header_values("Host") == ["gw.test"]
    payload = rec.header_values("X-Jwt-Payload")[0]
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == "user-1" and claims["tenant"] == {"id": "t-1"}


@pytest.mark.parametrize("provider", ["main", "hmac", "file"])
def test_each_key_source_kind(env: Env, provider: str) -> None:
    resp = env.bearer("/api/orders", env.token(provider, sub=f"via-{provider}"))
    assert resp.status == 200, resp.body
    assert env.last().header_values("X-User-Id") == [f"via-{provider}"]


def test_public_route_and_strip_prefix(env: Env) -> None:
    assert env.get("/public/a?b=c").status == 200
    assert env.last().target == "/public/a?b=c"
    assert env.get("/strip/deep/path?q=1").status == 200
    assert env.last().target == "/deep/path?q=1"


def test_regex_and_host_routes(env: Env) -> None:
    assert env.get("/rx/123").status == 200
    assert env.get("/rx/123", method="POST").status == 404
    assert env.get("/rx/12a").status == 404
    assert env.get("/h/x", host="ONLY.example:8080").status == 200
    assert env.get("/h/x", host="other.example").status == 404


def test_not_found(env: Env) -> None:
    before = len(env.up.records)
    resp = env.get("/nothing/here")
    assert resp.status == 404 and resp.json() == {"error": "not_found"}
    assert resp.header("Content-Type") == "application/json"
    assert len(env.up.records) == before


# ---------------------------------------------------------------------------------------------
# Every SPEC §4 reason
# ---------------------------------------------------------------------------------------------


def test_reason_token_missing(env: Env) -> None:
    env.reject("/api/orders", [], Reason.TOKEN_MISSING)
    env.reject("/api/orders", [("Authorization", "Basic dXNlcjpwYXNz")], Reason.TOKEN_MISSING)


def test_reason_token_malformed(env: Env) -> None:
    env.reject("/api/orders", [("Authorization", "Bearer abc.def")], Reason.TOKEN_MALFORMED)
    env.reject("/api/orders", [("Authorization", f"Bearer  {env.token()}")],
               Reason.TOKEN_MALFORMED)


def test_reason_token_too_large(env: Env) -> None:
    env.reject("/api/orders", [("Authorization", "Bearer " + "a" * 9000)],
               Reason.TOKEN_TOO_LARGE)


def test_reason_alg_not_allowed(env: Env) -> None:
    # RS512 with the main provider's kid: the provider allows RS256 only.
    rs512 = SigningKey("RS512", env.keys["main"].kid, env.keys["main"].private)
    token = make_token(rs512, default_claims(now=time.time()))
    env.reject("/api/orders", [("Authorization", f"Bearer {token}")], Reason.ALG_NOT_ALLOWED)


def test_reason_issuer_unknown(env: Env) -> None:
    env.reject("/api/orders", [("Authorization", f"Bearer {env.token(iss='https://evil/')}")],
               Reason.ISSUER_UNKNOWN)


def test_reason_key_not_found(env: Env) -> None:
    token = make_token(env.keys["main"], default_claims(now=time.time()), kid="no-such-kid")
    env.reject("/api/orders", [("Authorization", f"Bearer {token}")], Reason.KEY_NOT_FOUND)


def test_reason_signature_invalid(env: Env) -> None:
    env.reject("/api/orders", [("Authorization", f"Bearer {_forged(env)}")],
               Reason.SIGNATURE_INVALID)


def test_reason_token_expired(env: Env) -> None:
    now = time.time()
    token = env.token(iat=int(now) - 7200, exp=int(now) - 3600)
    env.reject("/api/orders", [("Authorization", f"Bearer {token}")], Reason.TOKEN_EXPIRED)


def test_reason_token_not_yet_valid(env: Env) -> None:
    token = env.token(nbf=int(time.time()) + 3600)
    env.reject("/api/orders", [("Authorization", f"Bearer {token}")], Reason.TOKEN_NOT_YET_VALID)


def test_reason_audience_mismatch(env: Env) -> None:
    env.reject("/api/orders", [("Authorization", f"Bearer {env.token(aud='api://nope')}")],
               Reason.AUDIENCE_MISMATCH)


def test_reason_claim_missing(env: Env) -> None:
    env.reject("/api/present", [("Authorization", f"Bearer {env.token()}")], Reason.CLAIM_MISSING)
    assert env.bearer("/api/present", env.token(tenant={"id": "t"})).status == 200


def test_reason_token_ambiguous(env: Env) -> None:
    token = env.token()
    env.reject("/api/orders", [("Authorization", f"Bearer {token}"),
                               ("Authorization", f"Bearer {token}")], Reason.TOKEN_AMBIGUOUS)
    env.reject("/api/orders", [("Authorization", f"Bearer {token}, Bearer {env.token(sub='x')}")],
               Reason.TOKEN_AMBIGUOUS)


def test_reason_insufficient_scope(env: Env) -> None:
    env.reject("/api/scopes-all", [("Authorization", f"Bearer {env.token(scope='orders:read')}")],
               Reason.INSUFFICIENT_SCOPE, scope="orders:read orders:write")


def test_reason_claim_mismatch(env: Env) -> None:
    token = env.token(tenant={"region": "us-east-1"}, email_verified=True, roles=["writer"],
                      **{"https://example.com/roles": ["admin"]})
    env.reject("/api/claims", [("Authorization", f"Bearer {token}")], Reason.CLAIM_MISMATCH)


def test_reason_api_key_missing_invalid_mismatch(env: Env) -> None:
    good = env.token(client_id="app-42")
    auth = ("Authorization", f"Bearer {good}")
    env.reject("/api/key", [auth], Reason.API_KEY_MISSING)
    env.reject("/api/key", [auth, ("X-API-Key", "wrong")], Reason.API_KEY_INVALID)
    env.reject("/api/key", [("Authorization", f"Bearer {env.token(client_id='app-7')}"),
                            ("X-API-Key", API_KEY)], Reason.API_KEY_MISMATCH)
    env.reject("/api/key", [auth, ("X-API-Key", API_KEY_NO_CLIENT)], Reason.API_KEY_MISMATCH)


def test_reason_jwks_unavailable(env: Env) -> None:
    before = len(env.up.records)
    resp = env.get("/api/remote", [("Authorization", f"Bearer {env.token('remote')}")])
    assert resp.status == 503
    assert resp.header("WWW-Authenticate") is None
    assert resp.header("Retry-After") == "5"
    assert resp.json() == {"error": "service_unavailable", "reason": "jwks_unavailable"}
    assert len(env.up.records) == before
    assert not env.gw.ready  # the remote provider never had keys


def test_every_reason_is_covered() -> None:
    covered = {Reason.TOKEN_MISSING, Reason.TOKEN_MALFORMED, Reason.TOKEN_TOO_LARGE,
               Reason.ALG_NOT_ALLOWED, Reason.ISSUER_UNKNOWN, Reason.KEY_NOT_FOUND,
               Reason.SIGNATURE_INVALID, Reason.TOKEN_EXPIRED, Reason.TOKEN_NOT_YET_VALID,
               Reason.AUDIENCE_MISMATCH, Reason.CLAIM_MISSING, Reason.TOKEN_AMBIGUOUS,
               Reason.INSUFFICIENT_SCOPE, Reason.CLAIM_MISMATCH, Reason.API_KEY_MISSING,
               Reason.API_KEY_INVALID, Reason.API_KEY_MISMATCH, Reason.JWKS_UNAVAILABLE,
               Reason.TOKEN_TYPE_INVALID,
               # over real TLS with client certificates: tests/dataplane/test_tls.py
               Reason.CERTIFICATE_MISMATCH,
               # DPoP, one-time tokens and the replay store (with Redis): tests/auth/test_dpop.py
               Reason.DPOP_PROOF_INVALID, Reason.DPOP_PROOF_REPLAYED,
               Reason.DPOP_BINDING_MISMATCH, Reason.DPOP_NONCE_REQUIRED,
               Reason.TOKEN_REPLAYED, Reason.REPLAY_STORE_UNAVAILABLE}
    assert covered == {r for r in Reason if r is not Reason.OK}


# ---------------------------------------------------------------------------------------------
# Route policy
# ---------------------------------------------------------------------------------------------


def test_route_audiences_apply_to_cached_tokens(env: Env) -> None:
    token = env.token(sub="cached")
    assert env.bearer("/api/orders", token).status == 200  # verified and cached
    env.reject("/api/other", [("Authorization", f"Bearer {token}")], Reason.AUDIENCE_MISMATCH)
    assert env.bearer("/api/orders", token).status == 200
    other = env.token(aud="api://other")
    assert env.bearer("/api/other", other).status == 200


@pytest.mark.parametrize(("claims", "route", "ok"), [
    ({"scope": "orders:read orders:write"}, "/api/scopes-all", True),
    ({"scp": ["orders:read", "orders:write"]}, "/api/scopes-all", True),
    ({"scp": "orders:write orders:read"}, "/api/scopes-all", True),
    ({"scope": "orders:read", "scp": ["orders:write"]}, "/api/scopes-all", True),
    ({"scp": ["orders:read"]}, "/api/scopes-all", False),
    ({"scope": "orders:write"}, "/api/scopes-any", True),
    ({"scp": ["orders:read"]}, "/api/scopes-any", True),
    ({"scope": "orders:delete"}, "/api/scopes-any", False),
    ({}, "/api/scopes-any", False),
])
def test_scopes(env: Env, claims: dict[str, Any], route: str, ok: bool) -> None:
    token = env.token(**claims)
    if ok:
        assert env.bearer(route, token).status == 200
    else:
        env.reject(route, [("Authorization", f"Bearer {token}")], Reason.INSUFFICIENT_SCOPE,
                   scope="orders:read orders:write")


def test_claim_matchers_with_quoted_dotted_names(env: Env) -> None:
    good = {"tenant": {"region": "eu-central-1"}, "email_verified": True,
            "roles": ["reader", "writer"], "https://example.com/roles": ["admin", "x"]}
    assert env.bearer("/api/claims", env.token(**good)).status == 200
    for change in ({"email_verified": "true"}, {"roles": ["reader"]},
                   {"https://example.com/roles": ["user"]}):
        env.reject("/api/claims", [("Authorization", f"Bearer {env.token(**{**good, **change})}")],
                   Reason.CLAIM_MISMATCH)
    missing = {k: v for k, v in good.items() if k != "https://example.com/roles"}
    env.reject("/api/claims", [("Authorization", f"Bearer {env.token(**missing)}")],
               Reason.CLAIM_MISSING)


def test_mode_all(env: Env) -> None:
    main, idtok = env.token(sub="m"), env.token("idtok", sub="i")
    resp = env.get("/api/all", [("Authorization", f"Bearer {main}"), ("X-Id-Token", idtok)])
    assert resp.status == 200
    assert env.last().header_values("X-User-Id") == ["m"]  # the first listed provider's token
    env.reject("/api/all", [("Authorization", f"Bearer {main}")], Reason.TOKEN_MISSING)
    env.reject("/api/all", [("X-Id-Token", idtok)], Reason.TOKEN_MISSING)
    env.reject("/api/all", [("Authorization", f"Bearer {main}"), ("X-Id-Token", main)],
               Reason.TOKEN_AMBIGUOUS)  # two tokens of one provider
    env.reject("/api/all", [("Authorization", f"Bearer {main}"),
                            ("X-Id-Token", env.token("idtok", aud="api://x"))],
               Reason.AUDIENCE_MISMATCH)
    env.reject("/api/all", [("Authorization", f"Bearer {main}"), ("X-Id-Token", idtok),
                            ("X-Id-Token", idtok)], Reason.TOKEN_AMBIGUOUS)


def test_allow_missing(env: Env) -> None:
    resp = env.get("/api/optional", [("X-User-Id", "spoofed")])
    assert resp.status == 200
    assert env.last().header_values("X-User-Id") == []
    assert env.bearer("/api/optional", env.token(sub="opt")).status == 200
    assert env.last().header_values("X-User-Id") == ["opt"]
    # A present but bad token is still rejected (Envoy PR #15194 class).
    env.reject("/api/optional", [("Authorization", f"Bearer {_forged(env)}")],
               Reason.SIGNATURE_INVALID)
    env.reject("/api/optional", [("Authorization", f"Bearer {env.token(iss='https://x/')}")],
               Reason.ISSUER_UNKNOWN)
    env.reject("/api/optional", [("Authorization", "Bearer ")], Reason.TOKEN_MALFORMED)


def test_failure_status_and_hide_reasons(env: Env) -> None:
    env.reject("/api/f403", [], Reason.TOKEN_MISSING, status=403)
    env.reject("/api/f403", [("Authorization", f"Bearer {_forged(env)}")],
               Reason.SIGNATURE_INVALID, status=403)
    env.reject("/api/hidden", [("Authorization", f"Bearer {_forged(env)}")],
               Reason.SIGNATURE_INVALID, hidden=True)
    env.reject("/api/hidden", [], Reason.TOKEN_MISSING, hidden=True)


def test_cors_preflight_bypass(env: Env) -> None:
    resp = env.get("/api/cors", [("Origin", "https://app.example"),
                                 ("Access-Control-Request-Method", "POST")], method="OPTIONS")
    assert resp.status == 200
    assert env.last().method == "OPTIONS"
    env.reject("/api/cors", [("Origin", "https://app.example")], Reason.TOKEN_MISSING,
               method="OPTIONS")
    env.reject("/api/cors", [("Origin", "https://app.example"),
                             ("Access-Control-Request-Method", "POST")],
               Reason.TOKEN_MISSING)  # a GET is never a preflight
    env.reject("/api/orders", [("Origin", "https://app.example"),
                               ("Access-Control-Request-Method", "POST")],
               Reason.TOKEN_MISSING, method="OPTIONS")  # route without bypass


# ---------------------------------------------------------------------------------------------
# Header hygiene (catalog G1-G4)
# ---------------------------------------------------------------------------------------------


def test_spoofed_claim_headers_are_replaced(env: Env) -> None:
    token = env.token(sub="alice")
    resp = env.get("/api/orders", [
        ("Authorization", f"Bearer {token}"),
        ("X-User-Id", "admin"), ("x-user-id", "admin2"), ("X-USER-ID", "admin3"),
        ("X_User_Id", "admin4"), ("x_user-id", "admin5"),
        ("X-Tenant", "evil-tenant"), ("X-Jwt-Payload", "e30"),
    ])
    assert resp.status == 200
    rec = env.last()
    assert rec.header_values("X-User-Id") == ["alice"]
    assert "x_user_id" not in rec.header_names() and "x_user-id" not in rec.header_names()
    assert rec.header_values("X-Tenant") == []  # claim absent: no header at all
    assert rec.header_values("X-Jwt-Payload") != ["e30"]


def test_connection_listed_claim_header(env: Env) -> None:
    token = env.token(sub="alice")
    data = (f"GET /api/orders HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {token}\r\n"
            "X-User-Id: admin\r\nConnection: close, X-User-Id, X-Custom\r\nX-Custom: 1\r\n"
            "Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\n"
            "Trailer: X-T\r\n\r\n").encode()
    assert env.raw(data).status == 200
    rec = env.last()
    assert rec.header_values("X-User-Id") == ["alice"]  # ours survives Connection-listing
    names = rec.header_names()
    for hop in ("x-custom", "keep-alive", "te", "proxy-authorization", "trailer"):
        assert hop not in names, hop


def test_reserved_headers_stripped_on_public_route(env: Env) -> None:
    resp = env.get("/public/x", [("X-User-Id", "admin"), ("X_USER_ID", "admin"),
                                 ("X-Jwt-Payload", "e30"), ("X-API-Key", API_KEY),
                                 ("X-Other", "kept")])
    assert resp.status == 200
    names = env.last().header_names()
    assert "x-user-id" not in names and "x_user_id" not in names
    assert "x-jwt-payload" not in names and "x-api-key" not in names
    assert "x-other" in names


@pytest.mark.parametrize("bad", ["alice\r\nX-Injected: 1", "alice\nX-Injected: 1", "a\x00b",
                                 "a\rb", "a\x1bb", "a\x7f"])
def test_control_characters_in_claims_never_emitted(env: Env, bad: str) -> None:
    resp = env.bearer("/api/orders", env.token(sub=bad, name="fine"))
    assert resp.status == 200
    rec = env.last()
    assert rec.header_values("X-User-Id") == []
    assert "x-injected" not in rec.header_names()
    assert rec.header_values("X-User-Name") == ["fine"]


def test_combined_claim_header_template(env: Env) -> None:
    """claim_headers "{sub}@{tenant.id}": one header from two claims; a client's own copy is
    removed; a missing claim or an unsafe value drops the header (never a partial value)."""
    resp = env.bearer("/api/orders", env.token(sub="alice", tenant={"id": "t-9"}),
                      [("X-Identity", "mallory@evil")])
    assert resp.status == 200
    assert env.last().header_values("X-Identity") == ["alice@t-9"]
    assert env.bearer("/api/orders", env.token(sub="alice")).status == 200  # no tenant claim
    assert env.last().header_values("X-Identity") == []
    resp = env.bearer("/api/orders", env.token(sub="a\r\nX-Injected: 1", tenant={"id": "t"}))
    assert resp.status == 200
    assert env.last().header_values("X-Identity") == []
    assert "x-injected" not in env.last().header_names()


def test_non_ascii_claims_are_rfc8187_encoded(env: Env) -> None:
    assert env.bearer("/api/orders", env.token(name="José", roles=["ä", "b"])).status == 200
    rec = env.last()
    assert rec.header_values("X-User-Name") == ["UTF-8''Jos%C3%A9"]
    assert rec.header_values("X-Roles") == ["UTF-8''%C3%A4%2Cb"]


def test_ambiguous_token_locations(env: Env) -> None:
    token = env.token("multi")
    env.reject("/api/multi?access_token=" + token, [("Authorization", f"Bearer {token}")],
               Reason.TOKEN_AMBIGUOUS)
    env.reject("/api/multi", [("Authorization", f"Bearer {token}"),
                              ("Cookie", f"id_token={token}")], Reason.TOKEN_AMBIGUOUS)
    env.reject("/api/multi?access%5Ftoken=" + token, [("Authorization", f"Bearer {token}")],
               Reason.TOKEN_AMBIGUOUS)


def test_forward_token_false_removes_it_where_found(env: Env) -> None:
    token = env.token("multi")
    assert env.get(f"/api/multi/q?a=1&access_token={token}&b=2").status == 200
    assert env.last().target == "/api/multi/q?a=1&b=2"
    assert env.get("/api/multi/c", [("Cookie", f"a=1; id_token={token}; b=2")]).status == 200
    assert env.last().header_values("Cookie") == ["a=1; b=2"]
    assert env.bearer("/api/multi/h", token).status == 200
    assert env.last().header_values("Authorization") == []


def test_api_key_valid_and_not_forwarded(env: Env) -> None:
    token = env.token(client_id="app-42")
    resp = env.get("/api/key/x", [("Authorization", f"Bearer {token}"), ("X-API-Key", API_KEY)])
    assert resp.status == 200
    assert "x-api-key" not in env.last().header_names()
    assert env.bearer(f"/api/key/y?api_key={API_KEY}&z=1", token).status == 200
    assert env.last().target == "/api/key/y?z=1"


# ---------------------------------------------------------------------------------------------
# HTTP layer
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["//public/x", "/public/..;/admin", "/public/%2e%2e/admin",
                                    "/public/../admin", "/public/./x", "/public/a%2fb",
                                    "/public/a;jsessionid=1", "/public/a%5cb"])
def test_ambiguous_paths_rejected(env: Env, target: str) -> None:
    before = len(env.up.records)
    resp = env.get(target)
    assert resp.status == 400
    assert resp.header("Content-Type") == "application/json"
    assert len(env.up.records) == before


def test_connect_absolute_form_and_asterisk(env: Env) -> None:
    before = len(env.up.records)
    resp = env.raw(b"CONNECT gw.test:443 HTTP/1.1\r\nHost: gw.test:443\r\n\r\n")
    assert resp.status == 405 and resp.json() == {"error": "method_not_allowed"}
    assert env.raw(b"OPTIONS * HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
                   ).status == 400
    assert env.raw(b"GET http://gw.test/public/x HTTP/1.1\r\nHost: gw.test\r\n"
                   b"Connection: close\r\n\r\n").status == 400
    assert len(env.up.records) == before


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST /public/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",  # smuggling shape (RFC 9112 §6.3)
    b"GET /public/\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
], ids=["garbage", "two-content-lengths", "cl-and-te", "ctl-in-target", "nul-in-header"])
def test_malformed_requests_get_json_400(env: Env, data: bytes) -> None:
    before = len(env.up.records)
    resp = env.raw(data)
    assert resp.status == 400 and resp.json() == {"error": "bad_request"}
    assert len(env.up.records) == before


def test_well_known_paths_are_not_ambiguous(env: Env) -> None:
    assert env.get("/public/.well-known/x").status == 200


def test_head_204_304(env: Env) -> None:
    resp = env.get("/public/fixed/1000", method="HEAD")
    assert resp.status == 200 and resp.header("Content-Length") == "1000" and resp.body == b""
    for code in (204, 304):
        resp = env.get(f"/public/status/{code}")
        assert resp.status == code and resp.body == b""
        assert resp.header("Transfer-Encoding") is None


def test_head_keeps_connection_usable(env: Env) -> None:
    async def go() -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        statuses = []
        try:
            writer.write(http_request("HEAD", "/public/fixed/5000", close=False))
            statuses.append((await read_response(reader, head=True)).status)
            writer.write(http_request("GET", "/public/fixed/10", close=False))
            resp = await read_response(reader)
            statuses.append(resp.status)
            assert resp.body == b"x" * 10
        finally:
            writer.close()
        return statuses

    assert env.loop.run(go()) == [200, 200]


def test_5mib_chunked_upload_streamed(env: Env) -> None:
    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256(block * 5).hexdigest()

    async def gen() -> AsyncIterator[bytes]:
        for _ in range(5):
            for i in range(0, len(block), 65536):
                yield block[i:i + 65536]

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{env.port}/public/upload", data=gen()) as r:
            return r.status, await r.json()

    status, body = env.loop.run(go())
    assert status == 200
    assert body["body_len"] == 5 * MiB and body["body_sha256"] == expected
    rec = env.last()
    assert rec.header_values("Transfer-Encoding") == ["chunked"]  # streamed, not buffered


def test_5mib_content_length_upload(env: Env) -> None:
    body = b"y" * (5 * MiB)

    async def go() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.put(
                f"http://127.0.0.1:{env.port}/public/cl", data=io.BytesIO(body)) as r:
            return r.status, await r.json()

    status, echoed = env.loop.run(go())
    assert status == 200 and echoed["body_len"] == len(body)
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert env.last().header_values("Content-Length") == [str(len(body))]


def test_5mib_download_streamed(env: Env) -> None:
    n = 5 * MiB
    expected = hashlib.sha256((bytes(range(256)) * 256) * (n // 65536)).hexdigest()

    async def go() -> tuple[int, str, str | None]:
        digest = hashlib.sha256()
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{env.port}/public/big/{n}") as r:
            async for chunk in r.content.iter_any():
                digest.update(chunk)
            return r.status, digest.hexdigest(), r.headers.get("Transfer-Encoding")

    status, digest, te = env.loop.run(go())
    assert status == 200 and digest == expected and te == "chunked"


def test_expect_100_continue_rejected_without_reading_body(env: Env) -> None:
    before = len(env.up.records)

    async def go() -> RawResponse:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write(b"POST /api/orders HTTP/1.1\r\nHost: gw.test\r\n"
                         b"Content-Length: 1000000\r\nExpect: 100-continue\r\n\r\n")
            return await asyncio.wait_for(read_response(reader), 5)
        finally:
            writer.close()

    resp = env.loop.run(go())
    assert resp.status == 401 and resp.interim == []
    assert resp.json()["reason"] == "token_missing"
    assert resp.header("Connection") == "close"
    assert len(env.up.records) == before


def test_expect_100_continue_accepted(env: Env) -> None:
    token = env.token()
    body = b"z" * 100_000

    async def go() -> RawResponse:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write((f"POST /api/orders HTTP/1.1\r\nHost: gw.test\r\n"
                          f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n"
                          "Expect: 100-continue\r\nConnection: close\r\n\r\n").encode())
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(body)
            return await asyncio.wait_for(read_response(reader), 5)
        finally:
            writer.close()

    resp = env.loop.run(go())
    assert resp.status == 200
    assert resp.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "expect" not in env.last().header_names()


def test_413_content_length_before_upstream(env: Env) -> None:
    before = len(env.up.records)
    data = (f"POST /public/x HTTP/1.1\r\nHost: gw.test\r\nContent-Length: {7 * MiB}\r\n\r\n"
            ).encode()
    resp = env.raw(data)
    assert resp.status == 413 and resp.json() == {"error": "payload_too_large"}
    assert len(env.up.records) == before


def test_413_chunked_over_the_limit(env: Env) -> None:
    async def go() -> RawResponse:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write(b"POST /public/chunked HTTP/1.1\r\nHost: gw.test\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n" % 65536 + b"c" * 65536 + b"\r\n"
            try:
                for _ in range(7 * 16):  # 7 MiB
                    writer.write(chunk)
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            except ConnectionError:
                pass  # the gateway may close while we are still sending
            return await asyncio.wait_for(read_response(reader), 10)
        finally:
            writer.close()

    resp = env.loop.run(go())
    assert resp.status == 413 and resp.json() == {"error": "payload_too_large"}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_408_when_the_client_stops_sending_its_body(env: Env, framing: str) -> None:
    """The route's upstream read_timeout (0.5 s on /slow/) bounds the wait for body bytes."""
    async def go() -> RawResponse:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            if framing == "chunked":
                writer.write(b"POST /slow/x HTTP/1.1\r\nHost: gw.test\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            else:
                writer.write(b"POST /slow/x HTTP/1.1\r\nHost: gw.test\r\n"
                             b"Content-Length: 1000\r\n\r\nonly-a-few-bytes")
            return await asyncio.wait_for(read_response(reader), 5)
        finally:
            writer.close()

    started = time.monotonic()
    resp = env.loop.run(go())
    assert resp.status == 408 and resp.json() == {"error": "request_timeout"}
    assert time.monotonic() - started < 3


def test_431_header_line_too_large(env: Env) -> None:
    before = len(env.up.records)
    resp = env.get("/public/x", [("X-Big", "a" * 17000)])
    assert resp.status == 431
    assert resp.json() == {"error": "request_header_fields_too_large"}
    assert len(env.up.records) == before


def test_431_total_headers_too_large(env: Env) -> None:
    before = len(env.up.records)
    resp = env.get("/public/x", [(f"X-Part-{i}", "b" * 6000) for i in range(3)])
    assert resp.status == 431
    assert resp.json() == {"error": "request_header_fields_too_large"}
    assert len(env.up.records) == before


def test_502_when_nothing_listens(env: Env) -> None:
    resp = env.get("/dead/x")
    assert resp.status == 502 and resp.json() == {"error": "bad_gateway"}
    assert resp.header("Content-Type") == "application/json"


def test_504_on_upstream_timeout(env: Env) -> None:
    started = time.monotonic()
    resp = env.get("/slow/sleep/2")
    assert resp.status == 504 and resp.json() == {"error": "gateway_timeout"}
    assert time.monotonic() - started < 1.8


def test_502_on_upstream_reset(env: Env) -> None:
    resp = env.get("/public/reset")
    assert resp.status == 502 and resp.json() == {"error": "bad_gateway"}


def test_keep_alive_reuse_visible_at_upstream(env: Env) -> None:
    env.up.clear()

    async def go() -> list[int]:
        async with aiohttp.ClientSession() as s:
            statuses = []
            for _ in range(40):
                async with s.get(f"http://127.0.0.1:{env.port}/public/ka") as r:
                    await r.read()
                    statuses.append(r.status)
            return statuses

    assert env.loop.run(go()) == [200] * 40
    assert len(env.up.records) == 40
    assert len(env.up.connections()) <= 2


def test_hop_by_hop_response_headers_removed(env: Env) -> None:
    """A raw upstream sends hop-by-hop fields; the client sees none of them."""
    async def go() -> RawResponse:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Hop\r\n"
                         b"X-Hop: secret\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n\r\nok")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = replace(env.config, upstreams={"echo": UpstreamConfig("echo", f"http://127.0.0.1:{port}")},
                         routes=(_route("all", path_prefix="/"),))
        gw = await start_gateway(config)
        try:
            return await raw_request(gw.port, http_request("GET", "/x"))
        finally:
            await gw.stop()
            server.close()

    resp = env.loop.run(go())
    assert resp.status == 200 and resp.body == b"ok"
    names = [n.lower() for n, _ in resp.headers]
    assert "x-hop" not in names and "keep-alive" not in names and "x-kept" in names


def test_concurrent_mixed_tokens_never_leak(env: Env) -> None:
    """Kong #13050 class: 2 000 concurrent requests, half invalid; none of those gets through."""
    valid = [env.token(sub=f"good-{i}") for i in range(20)]
    now = int(time.time())
    invalid = [_forged(env), env.token(sub="bad-exp", iat=now - 7200, exp=now - 3600),
               env.token(sub="bad-aud", aud="api://nope"), env.token(sub="bad-iss", iss="https://x/"),
               make_token(env.keys["main"], default_claims(now=time.time(), sub="bad-kid"),
                          kid="nope"), "garbage"]
    env.up.clear()
    plan: list[tuple[str, bool]] = []
    for i in range(2000):
        plan.append((valid[i % len(valid)], True) if i % 2 else (invalid[i % len(invalid)], False))

    async def go() -> list[tuple[int, bool]]:
        conn = aiohttp.TCPConnector(limit=100)
        async with aiohttp.ClientSession(connector=conn) as s:
            async def one(token: str, ok: bool) -> tuple[int, bool]:
                async with s.get(f"http://127.0.0.1:{env.port}/api/orders/c",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                    await r.read()
                    return r.status, ok

            return await gather_limited(200, [lambda t=t, ok=ok: one(t, ok) for t, ok in plan])

    results = env.loop.run(go(), timeout=90)
    assert all(status == 200 for status, ok in results if ok)
    assert all(status in (400, 401) for status, ok in results if not ok)
    subs = [r.header_values("X-User-Id") for r in env.up.records]
    assert len(subs) == 1000
    assert all(s and s[0].startswith("good-") for s in subs)


# ---------------------------------------------------------------------------------------------
# Gateway lifecycle (for the CLI and the supervisor)
# ---------------------------------------------------------------------------------------------


def test_build_rejects_semantic_errors(env: Env) -> None:
    twin = replace(env.config.providers["main"], name="twin")
    bad = replace(env.config, providers={**env.config.providers, "twin": twin}, routes=(
        _route("x", path_prefix="/", auth=_auth("main", claim_headers=(
            ClaimHeader("Host", ("sub",)),))),
        _route("y", upstream="missing", path_prefix="/y"),
        _route("z", path_prefix="/z", auth=_auth("main", "twin")),
        _route("w", path_prefix="/w", auth=_auth("main", claim_headers=(
            ClaimHeader("X-API-Key", ("sub",)),))),
    ))
    with pytest.raises(ConfigError) as info:
        Gateway.build(bad)
    errors = info.value.errors
    assert any("'Host' cannot be a claim or payload header" in e for e in errors)
    assert any("routes[1].upstream: unknown upstream 'missing'" in e for e in errors)
    assert any("routes[2].auth.providers[1]: provider 'twin' has the same issuer as 'main'" in e
               for e in errors)
    assert len(errors) == 3


def test_swap_hot_reload_and_drain(env: Env) -> None:
    async def go() -> tuple[int, int, int, int]:
        config = replace(env.config, routes=(_route("a", path_prefix="/a/"),))
        gw = await start_gateway(config)
        try:
            url = f"http://127.0.0.1:{gw.port}"
            async with aiohttp.ClientSession() as s:
                slow = asyncio.ensure_future(s.get(url + "/a/sleep/0.5"))
                await asyncio.sleep(0.1)
                await gw.swap(replace(config, routes=(_route("b", path_prefix="/b/"),)))
                async with s.get(url + "/a/x") as r1:
                    gone = r1.status
                async with s.get(url + "/b/x") as r2:
                    new = r2.status
                old = (await slow).status  # finished on the old tables
                slow2 = asyncio.ensure_future(s.get(url + "/b/sleep/0.3"))
                await asyncio.sleep(0.1)
                await gw.drain(5.0)
                drained = (await slow2).status
            return gone, new, old, drained
        finally:
            await gw.stop()

    assert env.loop.run(go()) == (404, 200, 200, 200)


def test_swap_in_flight_request_on_removed_route_counts_under_it(env: Env) -> None:
    """A request in flight on route index 2 across a reload to a one-route list completes
    (200) and is counted under the route it matched, not an index of the new list."""
    from prometheus_client.parser import text_string_to_metric_families

    from fastgate.ops.metrics import Metrics

    routes = (_route("a", path_prefix="/a/"), _route("b", path_prefix="/b/"),
              _route("c", path_prefix="/c/"))
    config = replace(env.config, routes=routes)
    metrics = Metrics(routes=[r.name for r in routes], providers=list(config.providers),
                      upstreams=list(config.upstreams))

    async def go() -> tuple[int, int]:
        gw = await start_gateway(config, metrics=metrics)
        try:
            url = f"http://127.0.0.1:{gw.port}"
            async with aiohttp.ClientSession() as s:
                slow = asyncio.ensure_future(s.get(url + "/c/sleep/0.5"))
                await asyncio.sleep(0.2)
                await gw.swap(replace(config, routes=(_route("b", path_prefix="/b/"),)))
                async with s.get(url + "/b/x") as r:
                    new = r.status
                old = await slow
                await old.read()
            return old.status, new
        finally:
            await gw.stop()

    assert env.loop.run(go()) == (200, 200)
    counts: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == "fastgate_requests_total":
                key = (sample.labels["route"], sample.labels["status_class"])
                counts[key] = counts.get(key, 0) + sample.value
    assert counts.get(("c", "2xx")) == 1  # the old route's name, not the new index 0
    assert counts.get(("b", "2xx")) == 1
    assert not counts.get(("a", "2xx"))


def test_metrics_hooks_are_called(env: Env) -> None:
    calls: dict[str, list[tuple[Any, ...]]] = {}

    class Recorder(MetricsSink):
        def __getattr__(self, name: str) -> Any:  # the hot-path hooks: bind() returns self
            if name.startswith("_"):
                raise AttributeError(name)

            def record(*args: Any) -> None:
                calls.setdefault(name, []).append(args)
            return record

    logged: list[tuple[str | None, int, str | None, float | None]] = []

    class AccessRecorder:
        def log(self, request: Any, *, route: str | None, status: int, reason: str | None,
                duration: float, upstream_latency: float | None = None) -> None:
            assert duration >= 0
            logged.append((route, status, reason, upstream_latency))

    async def go() -> None:
        config = replace(env.config, routes=(
            _route("open", path_prefix="/open/"),
            _route("locked", path_prefix="/locked/", auth=_auth("main"))))
        gw = await start_gateway(config, metrics=Recorder(), access_log=AccessRecorder())
        try:
            await raw_request(gw.port, http_request("GET", "/open/x"))
            await raw_request(gw.port, http_request("GET", "/locked/x"))
            await raw_request(gw.port, http_request("GET", "/nowhere"))
        finally:
            await gw.stop()

    env.loop.run(go())
    assert calls["request_done"][0][:2] == (0, 200)
    assert calls["request_done"][1][:2] == (1, 401)
    assert calls["request_done"][2][:2] == (2, 404)  # len(routes): no route matched
    assert calls["reject"] == [(1, Reason.TOKEN_MISSING)]
    assert calls["upstream_observe"][0][0] == 0
    assert len(calls["inflight_inc"]) == len(calls["inflight_dec"]) == 3
    assert [entry[:3] for entry in logged] == [
        ("open", 200, None), ("locked", 401, "token_missing"), (None, 404, "not_found")]
    assert logged[0][3] is not None and logged[1][3] is None


def test_run_single_process_sighup_and_sigterm(env: Env, tmp_path: Path) -> None:
    """``fastgate run -c FILE`` (one worker: the supervisor's single-process path) on a real
    YAML file without admin or metrics: SIGHUP reloads it, SIGTERM drains and exits 0."""
    port = dead_port()
    path = tmp_path / "gateway.yaml"

    def write(prefixes: list[str]) -> None:
        routes = "".join(
            f"  - {{name: r{i}, match: {{path_prefix: {p}}}, upstream: echo, auth: none}}\n"
            for i, p in enumerate(prefixes))
        path.write_text(f"listen: 127.0.0.1:{port}\nadmin: null\nmetrics: false\n"
                        f"access_log: {{enabled: false}}\ndrain_timeout: 2s\n"
                        f"upstreams:\n  echo: {{url: \"{env.up.url}\"}}\nroutes:\n{routes}")

    write(["/a/"])

    async def status(s: aiohttp.ClientSession, target: str) -> int:
        async with s.get(f"http://127.0.0.1:{port}{target}") as r:
            await r.read()
            return r.status

    async def until(s: aiohttp.ClientSession, target: str, want: int) -> bool:
        for _ in range(100):
            try:
                if await status(s, target) == want:
                    return True
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
        return False

    async def go() -> tuple[bool, int, bool, int | None]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fastgate", "run", "-c", str(path),
            cwd=str(Path(__file__).resolve().parents[2]))
        try:
            async with aiohttp.ClientSession() as s:
                up = await until(s, "/a/x", 200)
                before = await status(s, "/b/x")
                write(["/a/", "/b/"])
                proc.send_signal(signal.SIGHUP)
                reloaded = await until(s, "/b/x", 200)
            proc.terminate()  # SIGTERM
            code = await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        return up, before, reloaded, code

    assert env.loop.run(go(), timeout=40) == (True, 404, True, 0)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(("version", "conn", "closes"), [
    ("1.1", None, False), ("1.1", "close", True), ("1.0", None, True),
    ("1.0", "keep-alive", False),
])
def test_gateway_written_responses_framing(env: Env, method: str, version: str,
                                           conn: str | None, closes: bool) -> None:
    """The one-write responses the gateway writes itself (404 here; rejects share the code):
    Content-Length framing, no body for HEAD (RFC 9110 §9.3.2), Connection per RFC 9112 §9.3
    and §C.2.2, a Date, and no Server banner."""
    extra = f"Connection: {conn}\r\n" if conn else ""
    data = f"{method} /nope HTTP/{version}\r\nHost: gw.test\r\n{extra}\r\n".encode()

    async def go() -> tuple[RawResponse, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        try:
            writer.write(data)
            resp = await asyncio.wait_for(read_response(reader, head=method == "HEAD"), 5)
            # A closing connection ends (EOF); a persistent one stays open with nothing more.
            rest = b"timeout"
            with contextlib.suppress(TimeoutError):
                rest = await asyncio.wait_for(reader.read(100), 0.3)
            return resp, rest
        finally:
            writer.close()

    resp, rest = env.loop.run(go())
    assert resp.status == 404
    assert resp.header("Content-Length") == str(len(b'{"error":"not_found"}'))
    assert resp.header("Server") is None and resp.header("Date") is not None
    if method == "GET":
        assert resp.json() == {"error": "not_found"}
    token = (resp.header("Connection") or "").lower()
    assert (token == "close") is closes
    assert (token == "keep-alive") is (version == "1.0" and not closes)
    assert rest == (b"" if closes else b"timeout")


def test_reason_token_type_invalid(env: Env) -> None:
    """RFC 9068 §4: a provider that lists typ values rejects any other typ (or none) with
    401 token_type_invalid; the listed type passes in any case and with "application/"."""
    typed = replace(env.config.providers["main"], typ=("at+jwt",))
    config = replace(env.config, providers={"main": typed},
                     routes=(_route("orders", path_prefix="/api/orders", auth=_auth("main")),))
    gw = env.loop.run(start_gateway(config))
    try:
        local = Env(env.loop, env.up, gw, env.keys, config)
        id_token = env.token()  # the factory's header says typ "JWT"
        for _ in range(2):  # the second time through the caches
            local.reject("/api/orders", [("Authorization", f"Bearer {id_token}")],
                         Reason.TOKEN_TYPE_INVALID)
        claims = default_claims(now=time.time())
        untyped = make_token(env.keys["main"], claims, raw_header=json.dumps(
            {"alg": "RS256", "kid": env.keys["main"].kid}).encode())
        local.reject("/api/orders", [("Authorization", f"Bearer {untyped}")],
                     Reason.TOKEN_TYPE_INVALID)
        for typ in ("at+jwt", "application/AT+JWT"):
            access = make_token(env.keys["main"], claims, header={"typ": typ})
            assert local.bearer("/api/orders", access).status == 200
    finally:
        env.loop.run(gw.stop())
