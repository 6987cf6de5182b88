"""Config loader (SPEC §2): the full schema, ${ENV}, durations, and every error with its path."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import pytest

from fastgate.config import (
    AccessLogConfig,
    Address,
    ApiKey,
    ApiKeyRule,
    ApiKeysConfig,
    AuthConfig,
    CacheConfig,
    ClaimHeader,
    ClaimRule,
    GatewayConfig,
    JwksCacheConfig,
    Limits,
    ProviderConfig,
    RouteConfig,
    RouteMatch,
    ScopeRule,
    TokenSource,
    UpstreamConfig,
    load_config,
    parse_claim_path,
    parse_config,
    parse_duration,
)
from fastgate.errors import ConfigError

CONFIGS = Path(__file__).parents[1] / "configs"
# RFC 7515 A.3 example P-256 public key (any well-formed JWK will do: keys are not checked here).
JWK = {"kty": "EC", "crv": "P-256", "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
       "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
SECRET = "0123456789abcdef0123456789abcdef"  # 32 bytes: enough for HS256
API_KEY_HASH = hashlib.sha256(b"mobile-secret").hexdigest()


def errors_of(data: Any, environ: dict[str, str] | None = None,
              source: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, environ or {}, source)
    assert str(info.value) == "\n".join(info.value.errors)
    return info.value.errors


def load_errors(path: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return info.value.errors


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# The full example: every SPEC §2 key (plus access_log / metrics / drain_timeout)
# ---------------------------------------------------------------------------------------------

FULL_YAML = """\
listen: 0.0.0.0:8080
admin: 127.0.0.1:9901
workers: 4
limits: {max_token_bytes: 4096, max_header_bytes: 16384, max_body_bytes: 10485760}
cache: {max_entries: 5000}

upstreams:
  orders: {url: "http://127.0.0.1:9000", connect_timeout: 2s, read_timeout: 30s,
           max_connections: 1024}
  billing: {url: "http://[::1]:9100/billing/"}

providers:
  okta:
    issuer: https://dev-123.okta.com/oauth2/default
    discovery: true
    audiences: [api://orders]
    algorithms: [RS256, ES256]
    clock_skew: 60s
    require: [exp]
    max_lifetime: 24h
    jwks_cache: {ttl: 10m, min_ttl: 1m, min_refresh_interval: 30s, max_stale: 24h, timeout: 5s,
                 max_bytes: 1048576}
    token_from:
      - {header: Authorization, prefix: "Bearer "}
      - {query: access_token}
      - {cookie: id_token}
  cognito:
    issuer: https://cognito-idp.eu-west-1.amazonaws.com/pool
    jwks_file: keys/cognito.json
    audiences: [api://orders, api://billing]
    clock_skew: 500ms
  auth0:
    issuer: https://tenant.auth0.com/
    jwks_uri: https://tenant.auth0.com/.well-known/jwks.json
    require: [exp, sub]
  inline:
    issuer: urn:inline
    jwks: {keys: [{kty: EC, crv: P-256, x: f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU,
                   y: x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0}]}
    max_lifetime: null
  internal:
    issuer: internal-batch
    secret: ${HS_SECRET}
    algorithms: [HS256]

api_keys:
  header: X-API-Key
  query: api_key
  keys:
    - {id: mobile-app, sha256: "${API_KEY_HASH}", client_id: app-42}
    - {id: partner, sha256: "A665A45920422F9D417E4867EFDC4FB8A04A1F3FFF1FA07E998E86F7F7A27AE3"}

routes:
  - name: public
    match: {path_prefix: /public/}
    upstream: orders
    auth: none
  - name: orders
    match: {path_prefix: /api/orders, methods: [get, POST]}
    upstream: orders
    strip_prefix: true
    auth:
      providers: [okta, cognito]
      mode: any
      audiences: [api://orders]
      scopes: {all: ["orders:read"]}
      claims:
        tenant.region: {one_of: [eu-west-1, eu-central-1]}
        email_verified: {equals: true}
        roles: {contains: writer}
        '["https://example.com/roles"]': {present: true}
      api_key: {required: true, bind_claim: client_id}
      allow_missing: false
      forward_token: true
      claim_headers: {X-User-Id: sub, X-Tenant: tenant.id, X-Roles: 'a["b.c"].d'}
      payload_header: X-Jwt-Payload
      failure_status: 403
      hide_reasons: true
      cors_preflight: bypass
  - name: billing
    match: {path_regex: '^/billing/[0-9]+$', host: Billing.Example.COM}
    upstream: billing
    auth:
      providers: [auth0, internal]
      mode: all
      scopes: {any: [billing, admin]}
      api_key: {required: false}
      allow_missing: true
      forward_token: false
  - name: exact
    match: {path: /healthz}
    upstream: orders
    auth: {providers: [inline]}

access_log: {enabled: true, sample: 0.5, path: /var/log/fastgate.log}
metrics: false
drain_timeout: 1m
"""


def expected_full(jwks_file: str) -> GatewayConfig:
    default_cache = JwksCacheConfig()
    bearer = TokenSource("header", "Authorization", "Bearer ")
    return GatewayConfig(
        listen=Address("0.0.0.0", 8080),
        admin=Address("127.0.0.1", 9901),
        workers=4,
        limits=Limits(max_token_bytes=4096, max_header_bytes=16384, max_body_bytes=10485760),
        cache=CacheConfig(max_entries=5000),
        upstreams={
            "orders": UpstreamConfig("orders", "http://127.0.0.1:9000", 2.0, 30.0, 1024),
            "billing": UpstreamConfig("billing", "http://[::1]:9100/billing"),
        },
        providers={
            "okta": ProviderConfig(
                name="okta", issuer="https://dev-123.okta.com/oauth2/default",
                key_source="discovery", audiences=("api://orders",),
                algorithms=("RS256", "ES256"), clock_skew=60.0, require=("exp",),
                max_lifetime=86400.0,
                jwks_cache=JwksCacheConfig(ttl=600.0, min_ttl=60.0, min_refresh_interval=30.0,
                                           max_stale=86400.0, timeout=5.0, max_bytes=1048576),
                token_from=(bearer, TokenSource("query", "access_token"),
                            TokenSource("cookie", "id_token")),
            ),
            "cognito": ProviderConfig(
                name="cognito", issuer="https://cognito-idp.eu-west-1.amazonaws.com/pool",
                key_source="jwks_file", jwks_file=jwks_file,
                audiences=("api://orders", "api://billing"), clock_skew=0.5,
            ),
            "auth0": ProviderConfig(
                name="auth0", issuer="https://tenant.auth0.com/", key_source="jwks_uri",
                jwks_uri="https://tenant.auth0.com/.well-known/jwks.json",
                require=("exp", "sub"), jwks_cache=default_cache,
            ),
            "inline": ProviderConfig(name="inline", issuer="urn:inline", key_source="jwks",
                                     jwks={"keys": [JWK]}),
            "internal": ProviderConfig(name="internal", issuer="internal-batch",
                                       key_source="secret", secret=SECRET.encode(),
                                       algorithms=("HS256",)),
        },
        api_keys=ApiKeysConfig(header="X-API-Key", query="api_key", keys=(
            ApiKey("mobile-app", bytes.fromhex(API_KEY_HASH), "app-42"),
            ApiKey("partner", hashlib.sha256(b"123").digest()),
        )),
        routes=(
            RouteConfig("public", RouteMatch(path_prefix="/public/"), "orders"),
            RouteConfig(
                "orders", RouteMatch(path_prefix="/api/orders", methods=("GET", "POST")),
                "orders", strip_prefix=True,
                auth=AuthConfig(
                    providers=("okta", "cognito"), mode="any", audiences=("api://orders",),
                    scopes=ScopeRule("all", ("orders:read",)),
                    claims=(
                        ClaimRule(("tenant", "region"), "one_of", ("eu-west-1", "eu-central-1")),
                        ClaimRule(("email_verified",), "equals", True),
                        ClaimRule(("roles",), "contains", "writer"),
                        ClaimRule(("https://example.com/roles",), "present", True),
                    ),
                    api_key=ApiKeyRule(required=True, bind_claim=("client_id",)),
                    allow_missing=False, forward_token=True,
                    claim_headers=(ClaimHeader("X-User-Id", ("sub",)),
                                   ClaimHeader("X-Tenant", ("tenant", "id")),
                                   ClaimHeader("X-Roles", ("a", "b.c", "d"))),
                    payload_header="X-Jwt-Payload", failure_status=403, hide_reasons=True,
                    cors_preflight="bypass",
                ),
            ),
            RouteConfig(
                "billing",
                RouteMatch(path_regex="^/billing/[0-9]+$", host="billing.example.com"),
                "billing",
                auth=AuthConfig(providers=("auth0", "internal"), mode="all",
                                scopes=ScopeRule("any", ("billing", "admin")),
                                api_key=ApiKeyRule(required=False), allow_missing=True,
                                forward_token=False),
            ),
            RouteConfig("exact", RouteMatch(path="/healthz"), "orders",
                        auth=AuthConfig(providers=("inline",))),
        ),
        access_log=AccessLogConfig(enabled=True, sample=0.5, path="/var/log/fastgate.log"),
        metrics=False,
        drain_timeout=60.0,
        source=None,
    )


@pytest.fixture
def full_file(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    write(tmp_path / "keys" / "cognito.json", '{"keys": []}')
    return write(tmp_path / "gateway.yaml", FULL_YAML)


FULL_ENV = {"HS_SECRET": SECRET, "API_KEY_HASH": API_KEY_HASH}


def test_full_example_parses_into_the_data_model(full_file: Path) -> None:
    config = load_config(full_file, FULL_ENV)
    expected = dataclasses.replace(expected_full(str(full_file.parent / "keys/cognito.json")),
                                   source=str(full_file))
    for name in ("upstreams", "providers"):
        assert getattr(config, name) == getattr(expected, name), name
        assert list(getattr(config, name)) == list(getattr(expected, name))  # file order kept
    for got, want in zip(config.routes, expected.routes, strict=True):
        assert got == want
    assert config == expected


def test_config_is_frozen_and_uses_tuples(full_file: Path) -> None:
    config = load_config(str(full_file), FULL_ENV)
    assert config.source == str(full_file)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers = 2  # type: ignore[misc]
    route = config.routes[1]
    assert route.auth is not None
    for value in (config.routes, route.match.methods, route.auth.providers, route.auth.claims,
                  route.auth.claim_headers, route.auth.claims[0].path, route.auth.claims[0].value,
                  config.providers["okta"].token_from, config.providers["okta"].algorithms):
        assert isinstance(value, tuple)


def test_parse_config_takes_a_mapping_and_defaults() -> None:
    config = parse_config({"upstreams": {"a": {"url": "http://127.0.0.1:1"}},
                           "routes": [{"name": "r", "match": {"host": "x"}, "upstream": "a",
                                       "auth": "none"}]}, {})
    assert config.listen == Address("0.0.0.0", 8080)
    assert config.admin == Address("127.0.0.1", 9901)
    assert config.workers == 1 and config.limits == Limits() and config.cache == CacheConfig()
    assert config.access_log == AccessLogConfig() and config.metrics is True
    assert config.drain_timeout == 30.0 and config.source is None and config.api_keys is None


# ---------------------------------------------------------------------------------------------
# tests/configs/*.yaml
# ---------------------------------------------------------------------------------------------

EXAMPLE_ENV = {"FASTGATE_HS_SECRET": SECRET, "FASTGATE_ECHO_PORT": "9001",
               "FASTGATE_IDP_PORT": "9002"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_config(path, EXAMPLE_ENV)
    assert config.routes and config.source == str(path)


def test_example_configs_exist_and_say_what_they_need() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {"minimal.yaml", "gateway.yaml", "loopback.yaml"} <= names
    gateway = load_config(CONFIGS / "gateway.yaml", EXAMPLE_ENV)
    assert gateway.providers["cognito"].jwks_file == str(CONFIGS / "jwks.json")
    loopback = load_config(CONFIGS / "loopback.yaml", EXAMPLE_ENV)
    assert loopback.upstreams["echo"].url == "http://127.0.0.1:9001/base"
    assert loopback.admin == Address("::1", 0) and loopback.workers == 0
    errors = load_errors(CONFIGS / "gateway.yaml")
    assert [e.split(": ", 1)[1] for e in errors] == [
        "providers.internal.secret: environment variable 'FASTGATE_HS_SECRET' is not set"]


# ---------------------------------------------------------------------------------------------
# ${ENV} substitution
# ---------------------------------------------------------------------------------------------


def base() -> dict[str, Any]:
    """A small valid config; tests break one thing in a fresh copy."""
    return copy.deepcopy({
        "upstreams": {"app": {"url": "http://127.0.0.1:9000"}},
        "providers": {"okta": {"issuer": "https://idp.example.com/", "jwks": {"keys": [JWK]},
                               "audiences": ["api://x"]}},
        "routes": [{"name": "api", "match": {"path_prefix": "/api/"}, "upstream": "app",
                    "auth": {"providers": ["okta"]}}],
    })


def test_env_substitution_in_any_string() -> None:
    data = base()
    data["providers"]["okta"]["issuer"] = "https://${IDP_HOST}/oauth2/${TENANT}"
    data["providers"]["okta"]["jwks"]["keys"][0]["kid"] = "${KID}"
    data["routes"][0]["auth"]["claims"] = {"tenant": {"equals": "${TENANT}"}}
    env = {"IDP_HOST": "idp.example.com", "TENANT": "acme", "KID": "k1"}
    config = parse_config(data, env)
    okta = config.providers["okta"]
    assert okta.issuer == "https://idp.example.com/oauth2/acme"
    assert okta.jwks == {"keys": [{**JWK, "kid": "k1"}]}
    assert config.routes[0].auth is not None
    assert config.routes[0].auth.claims == (ClaimRule(("tenant",), "equals", "acme"),)


def test_env_in_number_duration_and_boolean_positions_reads_as_a_yaml_scalar() -> None:
    data = base()
    data.update(workers="${WORKERS}", metrics="${METRICS}", drain_timeout="${DRAIN}")
    data["providers"]["okta"]["clock_skew"] = "${SKEW}"
    config = parse_config(data, {"WORKERS": "3", "METRICS": "false", "DRAIN": "5",
                                 "SKEW": "30s"})
    assert (config.workers, config.metrics, config.drain_timeout) == (3, False, 5.0)
    assert config.providers["okta"].clock_skew == 30.0
    # Only substituted values are read that way: a literal string stays a type error.
    data = base()
    data["workers"] = "3"
    assert errors_of(data) == ["workers: must be an integer, got string"]


def test_env_missing_names_path_and_variable_and_all_are_reported() -> None:
    data = base()
    data["providers"]["okta"]["issuer"] = "https://${IDP_HOST}/"
    data["upstreams"]["app"]["url"] = "http://${UP_HOST}:9000"
    data["routes"][0]["auth"]["claim_headers"] = {"X-Tenant": "${CLAIM}"}
    assert errors_of(data) == [
        "upstreams.app.url: environment variable 'UP_HOST' is not set",
        "providers.okta.issuer: environment variable 'IDP_HOST' is not set",
        "routes[0].auth.claim_headers.X-Tenant: environment variable 'CLAIM' is not set",
    ]


def test_env_escape_and_malformed_reference() -> None:
    data = base()
    data["providers"]["okta"]["issuer"] = "https://idp/$${NOT_A_VAR}/${HOST}"
    config = parse_config(data, {"HOST": "h", "NOT_A_VAR": "x"})
    assert config.providers["okta"].issuer == "https://idp/${NOT_A_VAR}/h"
    data["providers"]["okta"]["issuer"] = "https://${1BAD}/"
    assert errors_of(data) == [
        "providers.okta.issuer: malformed '${' reference: write ${NAME} (letters, digits, _) "
        "or '$${' for a literal '${'"]
    data["providers"]["okta"]["issuer"] = "cost: $5 and $HOME stay as they are"
    assert parse_config(data, {}).providers["okta"].issuer == data["providers"]["okta"]["issuer"]


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTGATE_TEST_ISSUER", "https://from-environ.example/")
    data = base()
    data["providers"]["okta"]["issuer"] = "${FASTGATE_TEST_ISSUER}"
    assert parse_config(data).providers["okta"].issuer == os.environ["FASTGATE_TEST_ISSUER"]


def test_env_in_yaml_file_with_secret(tmp_path: Path) -> None:
    path = write(tmp_path / "g.yaml", """\
upstreams: {app: {url: "http://127.0.0.1:${PORT}"}}
providers:
  hs: {issuer: me, secret: "${SECRET}", algorithms: [HS384]}
routes: [{name: r, match: {path: /}, upstream: app, auth: {providers: [hs]}}]
""")
    config = load_config(path, {"PORT": "7000", "SECRET": "k" * 48})
    assert config.upstreams["app"].url == "http://127.0.0.1:7000"
    assert config.providers["hs"].secret == b"k" * 48


# ---------------------------------------------------------------------------------------------
# Durations and claim paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    (0, 0.0), (5, 5.0), (1.5, 1.5), ("500ms", 0.5), ("30s", 30.0), ("10m", 600.0),
    ("24h", 86400.0), ("1.5s", 1.5), ("0s", 0.0), ("90", 90.0), ("250ms", 0.25),
    # compound forms (each unit once, largest first) and days
    ("1h30m", 5400.0), ("7d", 604800.0), ("1d12h", 129600.0), ("2m30s", 150.0),
    ("1h0m30s", 3630.0), ("1m500ms", 60.5), ("1.5h", 5400.0), ("0d1s", 1.0),
])
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    "1w", "-1s", "-1", "1 s", " 1s", "", "s", "1.5.5s", "10M", "1e3s", "ms", True, None,
    -1, -0.5, float("nan"), float("inf"), [1], "7D",
    # compound forms: out of order, a unit twice, spaces, a trailing bare number
    "30m1h", "1m1m", "1h 30m", "1h30", "h30m", "1d1d", "1s1m", "1h-30m",
])
def test_durations_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)
    with pytest.raises(ValueError, match=r"^--exp: invalid duration"):
        parse_duration(value, "--exp")


def test_duration_errors_in_config_name_the_path() -> None:
    data = base()
    data["drain_timeout"] = "2w"
    data["providers"]["okta"]["jwks_cache"] = {"timeout": "5 seconds"}
    hint = ("use seconds (a number >= 0) or a string like 500ms, 30s, 10m, 24h, 7d or 1h30m "
            "(each unit once, largest first)")
    assert errors_of(data) == [
        f"providers.okta.jwks_cache.timeout: invalid duration '5 seconds': {hint}",
        f"drain_timeout: invalid duration '2w': {hint}",
    ]


@pytest.mark.parametrize(("text", "segments"), [
    ("sub", ("sub",)),
    ("tenant.region", ("tenant", "region")),
    ("realm_access.roles", ("realm_access", "roles")),
    ('["https://example.com/roles"]', ("https://example.com/roles",)),
    ('a["b.c"].d', ("a", "b.c", "d")),
    ('a.["b.c"]', ("a", "b.c")),
    ('["a"]["b"]', ("a", "b")),
    ('["x\\"y"]', ('x"y',)),
    ("cognito:groups", ("cognito:groups",)),
])
def test_claim_paths(text: str, segments: tuple[str, ...]) -> None:
    assert parse_claim_path(text) == segments


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty segment"), ("a..b", "empty segment"), (".a", "empty segment"),
    ("a.", "empty segment"), ('[""]', "empty segment"), ('a["b', "unterminated"),
    ('a["b"', "unterminated"), ("a[b]", "unexpected '['"), ('["a"]b', "unexpected 'b'"),
    ('a"b', "unexpected '\"'"), ("a]", "unexpected ']'"),
])
def test_claim_paths_rejected(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_claim_path(text)


# ---------------------------------------------------------------------------------------------
# Unknown keys, at every depth, with did-you-mean
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("where", "key", "message"), [
    ((), "listn", "listn: unknown key 'listn' (did you mean 'listen'?)"),
    (("limits",), "max_tokens_bytes",
     "limits.max_tokens_bytes: unknown key 'max_tokens_bytes' (did you mean 'max_token_bytes'?)"),
    (("upstreams", "app"), "conect_timeout", "upstreams.app.conect_timeout: unknown key "
     "'conect_timeout' (did you mean 'connect_timeout'?)"),
    (("providers", "okta"), "audience",
     "providers.okta.audience: unknown key 'audience' (did you mean 'audiences'?)"),
    (("providers", "okta", "jwks_cache"), "tll",
     "providers.okta.jwks_cache.tll: unknown key 'tll' (did you mean 'ttl'?)"),
    (("providers", "okta", "token_from", 0), "headr",
     "providers.okta.token_from[0].headr: unknown key 'headr' (did you mean 'header'?)"),
    (("routes", 0), "upsteam", "routes[0].upsteam: unknown key 'upsteam' (did you mean "
     "'upstream'?)"),
    (("routes", 0, "match"), "paht_prefix",
     "routes[0].match.paht_prefix: unknown key 'paht_prefix' (did you mean 'path_prefix'?)"),
    (("routes", 0, "auth"), "audience",
     "routes[0].auth.audience: unknown key 'audience' (did you mean 'audiences'?)"),
    (("routes", 0, "auth", "scopes"), "al",
     "routes[0].auth.scopes.al: unknown key 'al' (did you mean 'all'?)"),
    (("routes", 0, "auth", "claims", "role"), "equal",
     "routes[0].auth.claims.role.equal: unknown key 'equal' (did you mean 'equals'?)"),
    (("routes", 0, "auth", "api_key"), "bind_clam",
     "routes[0].auth.api_key.bind_clam: unknown key 'bind_clam' (did you mean 'bind_claim'?)"),
    (("api_keys", "keys", 0), "clientid",
     "api_keys.keys[0].clientid: unknown key 'clientid' (did you mean 'client_id'?)"),
    (("access_log",), "enable",
     "access_log.enable: unknown key 'enable' (did you mean 'enabled'?)"),
    (("cache",), "xyzzy", "cache.xyzzy: unknown key 'xyzzy'"),
])
def test_unknown_keys_at_every_depth(where: tuple[str | int, ...], key: str,
                                     message: str) -> None:
    data = base()
    data["limits"] = {}
    data["cache"] = {}
    data["access_log"] = {}
    data["providers"]["okta"]["jwks_cache"] = {}
    data["providers"]["okta"]["token_from"] = [{"header": "Authorization"}]
    data["api_keys"] = {"header": "X-Key", "keys": [{"id": "k", "sha256": API_KEY_HASH}]}
    data["routes"][0]["auth"].update(scopes={"all": ["read"]}, claims={"role": {}},
                                     api_key={})
    node: Any = data
    for step in where:
        node = node[step]
    node[key] = "x"
    assert message in errors_of(data)


def test_non_string_keys_are_errors() -> None:
    data = base()
    data["upstreams"]["app"][1] = "x"
    assert errors_of(data) == ["upstreams.app: keys must be strings, got integer 1"]


# ---------------------------------------------------------------------------------------------
# One broken config: every error at once, each with its exact path
# ---------------------------------------------------------------------------------------------

BROKEN_YAML = """\
listen: 0.0.0.0:80800
admin: 0.0.0.0:8080
workers: -2
upstreams:
  orders: {url: "ftp://orders.internal:9000", read_timeout: 0}
providers:
  okta:
    issuer: https://dev-123.okta.com/oauth2/default
    jwks_uri: http://idp.example.com/keys
    secret: short
    algorithms: [RS256, none]
    audience: [api://orders]
    clock_skew: 1h
routes:
  - name: orders
    match: {path_prefix: api/orders, methods: [GET]}
    upstream: order
    auth:
      providers: [okat]
      scopes: {all: [read], any: [write]}
      claims:
        'a["b': {equals: 1}
      claim_headers: {Host: sub}
      failure_status: 500
  - name: orders
    match: {}
    upstream: orders
    auth: public
"""

BROKEN_ERRORS = [
    "listen: port 80800 is out of range 0-65535",
    "workers: must be at least 0",
    "upstreams.orders.url: must be http://host:port[/path] or https://host:port[/path], got "
    "'ftp://orders.internal:9000'",
    "upstreams.orders.read_timeout: must be greater than 0",
    "providers.okta.audience: unknown key 'audience' (did you mean 'audiences'?)",
    "providers.okta: exactly one key source is required (discovery: true, jwks_uri, jwks_file, "
    "jwks or secret); got jwks_uri, secret",
    "providers.okta.jwks_uri: must use https (http is allowed only for 127.0.0.1, ::1 and "
    "localhost)",
    "providers.okta.algorithms[1]: 'none' is never allowed",
    "providers.okta.clock_skew: must be at most 300s, got 3600s",
    "routes[1].name: duplicate route name 'orders' (also routes[0])",
    "routes[0].match.path_prefix: must start with '/' and have no query, got 'api/orders'",
    "routes[0].upstream: unknown upstream 'order' (did you mean 'orders'?)",
    "routes[0].auth.providers[0]: unknown provider 'okat' (did you mean 'okta'?)",
    "routes[0].auth.scopes: needs exactly one of all, any",
    "routes[0].auth.claims['a[\"b']: invalid claim path 'a[\"b': unterminated quoted segment "
    "at position 1",
    "routes[0].auth.claim_headers.Host: header 'Host' is reserved and cannot carry claims",
    "routes[0].auth.failure_status: must be between 400 and 499",
    "routes[1].match: needs at least one of path, path_prefix, path_regex or host",
    "routes[1].auth: must be 'none' or a mapping, got 'public'",
]


def test_broken_config_reports_every_error_at_once(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.yaml", BROKEN_YAML)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    errors = info.value.errors
    # Each error is "<file>:<line>:<column>: <path>: <message>", in document order.
    located = [e.removeprefix(f"{path}:").split(":", 2) for e in errors]
    assert all(e.startswith(f"{path}:") for e in errors), "\n".join(errors)
    positions = [(int(line), int(column)) for line, column, _ in located]
    assert positions == sorted(positions), "\n".join(errors)
    assert sorted(rest.removeprefix(" ") for _, _, rest in located) == sorted(BROKEN_ERRORS)
    assert len(errors) >= 8


# ---------------------------------------------------------------------------------------------
# Every validation rule: a failing case asserting the exact path
# ---------------------------------------------------------------------------------------------

DELETE = object()
Edit = tuple[tuple[str | int, ...], Any]


def edited(*edits: Edit) -> dict[str, Any]:
    data = base()
    for where, value in edits:
        node: Any = data
        for step in where[:-1]:
            if isinstance(step, str) and isinstance(node, dict):
                node = node.setdefault(step, {})
            else:
                node = node[step]
        if value is DELETE:
            del node[where[-1]]
        elif isinstance(node, list) and where[-1] == len(node):
            node.append(value)
        else:
            node[where[-1]] = value
    return data


P = ("providers", "okta")
R = ("routes", 0)
A = ("routes", 0, "auth")
API_KEYS = {"header": "X-API-Key", "keys": [{"id": "k1", "sha256": API_KEY_HASH}]}

RULES: list[tuple[str, list[Edit], str, str]] = [
    # (id, edits, exact path, message fragment)
    ("listen-no-port", [(("listen",), "8080")], "listen", "must be 'host:port'"),
    ("listen-not-string", [(("listen",), 8080)], "listen", "must be 'host:port', got integer"),
    ("listen-bad-ipv6", [(("listen",), "[::zz]:80")], "listen", "invalid IPv6 address"),
    ("listen-bare-ipv6", [(("listen",), "::1:80")], "listen", "IPv6 as '[::1]:9901'"),
    ("admin-port-range", [(("admin",), "127.0.0.1:65536")], "admin", "out of range 0-65535"),
    ("admin-equals-listen", [(("listen",), "127.0.0.1:8080"), (("admin",), "127.0.0.1:8080")],
     "admin", "must not share the data-plane port"),
    ("admin-same-port", [(("admin",), "127.0.0.1:8080")], "admin",
     "must not share the data-plane port (listen is 0.0.0.0:8080)"),
    ("workers-negative", [(("workers",), -1)], "workers", "must be at least 0"),
    ("workers-bool", [(("workers",), True)], "workers", "must be an integer, got boolean"),
    ("limits-zero", [(("limits", "max_token_bytes"), 0)], "limits.max_token_bytes",
     "must be at least 1"),
    ("limits-float", [(("limits", "max_body_bytes"), 1.5)], "limits.max_body_bytes",
     "must be an integer, got number"),
    ("limits-not-mapping", [(("limits",), [1])], "limits", "must be a mapping, got list"),
    ("cache-negative", [(("cache", "max_entries"), -1)], "cache.max_entries",
     "must be at least 0"),
    ("upstreams-missing", [(("upstreams",), DELETE)], "upstreams", "required key is missing"),
    ("upstreams-empty", [(("upstreams",), {})], "upstreams", "at least one upstream"),
    ("upstream-no-url", [(("upstreams", "app", "url"), DELETE)], "upstreams.app.url",
     "required key is missing"),
    ("upstream-tls-on-http", [(("upstreams", "app", "tls"), {"verify": True})],
     "upstreams.app.tls", "is only for https:// upstream URLs"),
    ("upstream-scheme", [(("upstreams", "app", "url"), "ftp://a:1")], "upstreams.app.url",
     "must be http://host:port[/path]"),
    ("upstream-no-host", [(("upstreams", "app", "url"), "http:///x")], "upstreams.app.url",
     "must be http://host:port[/path]"),
    ("upstream-bad-port", [(("upstreams", "app", "url"), "http://a:99999")],
     "upstreams.app.url", "invalid port"),
    ("upstream-query", [(("upstreams", "app", "url"), "http://a:1/?x=1")], "upstreams.app.url",
     "must not contain credentials, a query or a fragment"),
    ("upstream-timeout", [(("upstreams", "app", "connect_timeout"), 0)],
     "upstreams.app.connect_timeout", "must be greater than 0"),
    ("upstream-max-conn", [(("upstreams", "app", "max_connections"), 0)],
     "upstreams.app.max_connections", "must be at least 1"),
    ("upstream-not-mapping", [(("upstreams", "app"), "http://a:1")], "upstreams.app",
     "must be a mapping, got string"),
    ("providers-not-mapping", [(("providers",), ["okta"])], "providers",
     "must be a mapping, got list"),
    ("issuer-missing", [((*P, "issuer"), DELETE)], "providers.okta.issuer",
     "required key is missing"),
    ("issuer-empty", [((*P, "issuer"), "")], "providers.okta.issuer", "must not be empty"),
    ("issuer-not-string", [((*P, "issuer"), 1)], "providers.okta.issuer",
     "must be a string, got integer"),
    ("no-key-source", [((*P, "jwks"), DELETE)], "providers.okta",
     "exactly one key source is required (discovery: true, jwks_uri, jwks_file, jwks or "
     "secret); none given"),
    ("discovery-false-only", [((*P, "jwks"), DELETE), ((*P, "discovery"), False)],
     "providers.okta", "none given"),
    ("two-key-sources", [((*P, "discovery"), True)], "providers.okta",
     "got discovery, jwks"),
    ("discovery-not-bool", [((*P, "discovery"), "yes")], "providers.okta.discovery",
     "must be true or false, got string"),
    ("discovery-http-issuer", [((*P, "jwks"), DELETE), ((*P, "discovery"), True),
                               ((*P, "issuer"), "http://idp.example.com/")],
     "providers.okta.issuer", "must use https"),
    ("discovery-issuer-not-url", [((*P, "jwks"), DELETE), ((*P, "discovery"), True),
                                  ((*P, "issuer"), "urn:me")],
     "providers.okta.issuer", "must be an absolute https:// URL"),
    ("jwks-uri-http", [((*P, "jwks"), DELETE), ((*P, "jwks_uri"), "http://10.0.0.1/jwks")],
     "providers.okta.jwks_uri", "must use https (http is allowed only for 127.0.0.1"),
    ("jwks-uri-scheme", [((*P, "jwks"), DELETE), ((*P, "jwks_uri"), "file:///etc/jwks")],
     "providers.okta.jwks_uri", "must be an absolute https:// URL"),
    ("jwks-file-missing", [((*P, "jwks"), DELETE), ((*P, "jwks_file"), "/nonexistent/k.json")],
     "providers.okta.jwks_file", "cannot read '/nonexistent/k.json': No such file or directory"),
    ("jwks-file-directory", [((*P, "jwks"), DELETE), ((*P, "jwks_file"), "/")],
     "providers.okta.jwks_file", "cannot read '/': Is a directory"),
    ("jwks-inline-no-keys", [((*P, "jwks"), {"kty": "EC"})], "providers.okta.jwks.keys",
     "required key is missing"),
    ("jwks-inline-keys-not-list", [((*P, "jwks"), {"keys": {}})], "providers.okta.jwks.keys",
     "must be a list, got mapping"),
    ("jwks-inline-key-not-mapping", [((*P, "jwks"), {"keys": ["k"]})],
     "providers.okta.jwks.keys[0]", "must be a mapping (a JWK)"),
    ("secret-not-string", [((*P, "jwks"), DELETE), ((*P, "secret"), 12345)],
     "providers.okta.secret", "must be a string, got integer"),
    ("alg-none", [((*P, "algorithms"), ["ES256", "None"])], "providers.okta.algorithms[1]",
     "'none' is never allowed"),
    ("alg-unknown", [((*P, "algorithms"), ["RS257"])], "providers.okta.algorithms[0]",
     "unsupported algorithm 'RS257' (did you mean 'RS256'?)"),
    ("alg-lowercase", [((*P, "algorithms"), ["es256"])], "providers.okta.algorithms[0]",
     "unsupported algorithm 'es256'"),
    ("alg-empty", [((*P, "algorithms"), [])], "providers.okta.algorithms", "must not be empty"),
    ("alg-duplicate", [((*P, "algorithms"), ["ES256", "ES256"])],
     "providers.okta.algorithms[1]", "duplicate algorithm 'ES256'"),
    ("alg-hs-without-secret", [((*P, "algorithms"), ["ES256", "HS256"])],
     "providers.okta.algorithms", "HS256 allowed only with a `secret` key source"),
    ("alg-asym-with-secret", [((*P, "jwks"), DELETE), ((*P, "secret"), SECRET * 2),
                              ((*P, "algorithms"), ["HS256", "RS256"])],
     "providers.okta.algorithms", "RS256 cannot be used with a secret"),
    ("secret-short-hs512", [((*P, "jwks"), DELETE), ((*P, "secret"), SECRET),
                            ((*P, "algorithms"), ["HS256", "HS512"])], "providers.okta.secret",
     "secret is 32 bytes; HS512 needs at least 64 bytes (RFC 7518 §3.2)"),
    ("secret-short-default", [((*P, "jwks"), DELETE), ((*P, "secret"), "x" * 31)],
     "providers.okta.secret", "secret is 31 bytes; HS256 needs at least 32 bytes"),
    ("secret-utf8-bytes-counted", [((*P, "jwks"), DELETE), ((*P, "secret"), "é" * 20),
                                   ((*P, "algorithms"), ["HS384"])],
     "providers.okta.secret", "secret is 40 bytes; HS384 needs at least 48 bytes"),
    ("audiences-string", [((*P, "audiences"), "api://x")], "providers.okta.audiences",
     "must be a list, got string"),
    ("audiences-empty-item", [((*P, "audiences"), [""])], "providers.okta.audiences[0]",
     "must not be empty"),
    ("audiences-empty", [((*P, "audiences"), [])], "providers.okta.audiences",
     "must not be empty"),
    ("clock-skew-too-big", [((*P, "clock_skew"), "301s")], "providers.okta.clock_skew",
     "must be at most 300s, got 301s"),
    ("clock-skew-negative", [((*P, "clock_skew"), -1)], "providers.okta.clock_skew",
     "invalid duration -1"),
    ("require-not-list", [((*P, "require"), "exp")], "providers.okta.require",
     "must be a list, got string"),
    ("require-item", [((*P, "require"), ["exp", 1])], "providers.okta.require[1]",
     "must be a string, got integer"),
    ("max-lifetime-zero", [((*P, "max_lifetime"), 0)], "providers.okta.max_lifetime",
     "must be greater than 0"),
    ("jwks-cache-min-ttl", [((*P, "jwks_cache"), {"ttl": "1m", "min_ttl": "2m"})],
     "providers.okta.jwks_cache.min_ttl", "must not exceed ttl (60s)"),
    ("jwks-cache-ttl-below-refresh", [((*P, "jwks_cache"), {"ttl": "10s"})],
     "providers.okta.jwks_cache.ttl", "must be at least min_refresh_interval (30s)"),
    ("jwks-cache-stale", [((*P, "jwks_cache"), {"max_stale": "5m"})],
     "providers.okta.jwks_cache.max_stale", "must be at least ttl (600s)"),
    ("jwks-cache-timeout", [((*P, "jwks_cache"), {"timeout": 0})],
     "providers.okta.jwks_cache.timeout", "must be greater than 0"),
    ("jwks-cache-max-bytes", [((*P, "jwks_cache"), {"max_bytes": 0})],
     "providers.okta.jwks_cache.max_bytes", "must be at least 1"),
    ("token-from-empty", [((*P, "token_from"), [])], "providers.okta.token_from",
     "must be a non-empty list"),
    ("token-from-two", [((*P, "token_from"), [{"header": "A", "query": "b"}])],
     "providers.okta.token_from[0]", "exactly one of header, query or cookie is required; "
     "got header, query"),
    ("token-from-none", [((*P, "token_from"), [{"prefix": "Bearer "}])],
     "providers.okta.token_from[0]", "got none"),
    ("token-from-prefix-query", [((*P, "token_from"), [{"query": "t", "prefix": "x"}])],
     "providers.okta.token_from[0].prefix", "prefix applies to a header only"),
    ("token-from-bad-header", [((*P, "token_from"), [{"header": "Bad Header"}])],
     "providers.okta.token_from[0].header", "invalid header name 'Bad Header'"),
    ("token-from-duplicate", [((*P, "token_from"), [{"header": "X-T"}, {"header": "x-t"}])],
     "providers.okta.token_from[1]", "duplicate token source header 'x-t'"),
    ("api-keys-no-place", [(("api_keys",), {"keys": API_KEYS["keys"]})], "api_keys",
     "needs header and/or query"),
    ("api-keys-no-keys", [(("api_keys",), {"header": "X-K"})], "api_keys.keys",
     "required key is missing"),
    ("api-keys-empty", [(("api_keys",), {"header": "X-K", "keys": []})], "api_keys.keys",
     "must be a non-empty list"),
    ("api-keys-bad-header", [(("api_keys",), {"header": "X K", "keys": API_KEYS["keys"]})],
     "api_keys.header", "invalid header name"),
    ("api-keys-sha-short", [(("api_keys",), {"header": "X-K", "keys": [
        {"id": "a", "sha256": "abc"}]})], "api_keys.keys[0].sha256", "must be 64 hex characters"),
    ("api-keys-sha-not-hex", [(("api_keys",), {"header": "X-K", "keys": [
        {"id": "a", "sha256": "g" * 64}]})], "api_keys.keys[0].sha256",
     "must be 64 hex characters"),
    ("api-keys-dup-id", [(("api_keys",), {"header": "X-K", "keys": [
        {"id": "a", "sha256": "a" * 64}, {"id": "a", "sha256": "b" * 64}]})],
     "api_keys.keys[1].id", "duplicate key id 'a' (also keys[0])"),
    ("api-keys-dup-hash", [(("api_keys",), {"header": "X-K", "keys": [
        {"id": "a", "sha256": "a" * 64}, {"id": "b", "sha256": "A" * 64}]})],
     "api_keys.keys[1].sha256", "same key as keys[0]"),
    ("api-keys-no-id", [(("api_keys",), {"header": "X-K", "keys": [{"sha256": "a" * 64}]})],
     "api_keys.keys[0].id", "required key is missing"),
    ("routes-missing", [(("routes",), DELETE)], "routes", "required key is missing"),
    ("routes-empty", [(("routes",), [])], "routes", "must be a non-empty list"),
    ("routes-null", [(("routes",), None)], "routes", "must be a non-empty list, got null"),
    ("upstreams-null", [(("upstreams",), None)], "upstreams", "must be a mapping, got null"),
    ("routes-not-list", [(("routes",), {"a": 1})], "routes", "must be a non-empty list, "
     "got mapping"),
    ("route-not-mapping", [(("routes", 0), "api")], "routes[0]", "must be a mapping"),
    ("route-no-name", [((*R, "name"), DELETE)], "routes[0].name", "required key is missing"),
    ("route-dup-name", [(("routes", 1), {"name": "api", "match": {"path": "/x"},
                                         "upstream": "app", "auth": "none"})],
     "routes[1].name", "duplicate route name 'api' (also routes[0])"),
    ("route-no-match", [((*R, "match"), DELETE)], "routes[0].match", "required key is missing"),
    ("match-path-relative", [((*R, "match"), {"path": "x"})], "routes[0].match.path",
     "must start with '/'"),
    ("match-path-query", [((*R, "match"), {"path": "/x?y"})], "routes[0].match.path",
     "have no query"),
    ("match-prefix-relative", [((*R, "match"), {"path_prefix": "api"})],
     "routes[0].match.path_prefix", "must start with '/'"),
    ("match-regex", [((*R, "match"), {"path_regex": "^/(unclosed"})],
     "routes[0].match.path_regex", "invalid regular expression: missing ), unterminated"),
    ("match-method-token", [((*R, "match", "methods"), ["GET", "GE T"])],
     "routes[0].match.methods[1]", "invalid method 'GE T'"),
    ("match-method-dup", [((*R, "match", "methods"), ["get", "GET"])], "routes[0].match.methods",
     "duplicate method"),
    ("match-methods-empty", [((*R, "match", "methods"), [])], "routes[0].match.methods",
     "must not be empty"),
    ("match-nothing", [((*R, "match"), {"methods": ["GET"]})], "routes[0].match",
     "needs at least one of path, path_prefix, path_regex or host"),
    ("match-two-paths", [((*R, "match"), {"path": "/a", "path_prefix": "/b"})],
     "routes[0].match", "only one of path, path_prefix, path_regex is allowed; got path, "
     "path_prefix"),
    ("match-host-port", [((*R, "match"), {"host": "api.example.com:8080"})],
     "routes[0].match.host", "without a port"),
    ("route-no-upstream", [((*R, "upstream"), DELETE)], "routes[0].upstream",
     "required key is missing"),
    ("route-unknown-upstream", [((*R, "upstream"), "ap")], "routes[0].upstream",
     "unknown upstream 'ap' (did you mean 'app'?)"),
    ("strip-prefix-needs-prefix", [((*R, "match"), {"path": "/x"}), ((*R, "strip_prefix"), True)],
     "routes[0].strip_prefix", "needs match.path_prefix"),
    ("strip-prefix-not-bool", [((*R, "strip_prefix"), "no")], "routes[0].strip_prefix",
     "must be true or false"),
    ("auth-missing", [((*R, "auth"), DELETE)], "routes[0].auth", "required key is missing"),
    ("auth-bad-string", [((*R, "auth"), "None")], "routes[0].auth",
     "must be 'none' or a mapping, got 'None'"),
    ("auth-null", [((*R, "auth"), None)], "routes[0].auth", "must be a mapping, got null"),
    ("auth-no-providers", [((*A, "providers"), DELETE)], "routes[0].auth.providers",
     "required key is missing"),
    ("auth-providers-empty", [((*A, "providers"), [])], "routes[0].auth.providers",
     "must not be empty"),
    ("auth-provider-string", [((*A, "providers"), "okta")], "routes[0].auth.providers",
     "must be a list, got string"),
    ("auth-unknown-provider", [((*A, "providers"), ["okta", "okat"])],
     "routes[0].auth.providers[1]", "unknown provider 'okat' (did you mean 'okta'?)"),
    ("auth-mode", [((*A, "mode"), "some")], "routes[0].auth.mode",
     "must be one of any, all, got 'some'"),
    ("auth-audiences-string", [((*A, "audiences"), "api://x")], "routes[0].auth.audiences",
     "must be a list, got string"),
    ("scopes-both", [((*A, "scopes"), {"all": ["a"], "any": ["b"]})], "routes[0].auth.scopes",
     "needs exactly one of all, any"),
    ("scopes-neither", [((*A, "scopes"), {})], "routes[0].auth.scopes",
     "needs exactly one of all, any"),
    ("scopes-empty", [((*A, "scopes"), {"any": []})], "routes[0].auth.scopes.any",
     "must not be empty"),
    ("scopes-space", [((*A, "scopes"), {"all": ["read write"]})], "routes[0].auth.scopes.all[0]",
     "invalid scope 'read write'"),
    ("claims-not-mapping", [((*A, "claims"), ["sub"])], "routes[0].auth.claims",
     "must be a mapping, got list"),
    ("claims-two-ops", [((*A, "claims"), {"role": {"equals": "a", "contains": "b"}})],
     "routes[0].auth.claims.role", "needs exactly one of equals, one_of, contains, present; "
     "got equals, contains"),
    ("claims-no-op", [((*A, "claims"), {"role": {}})], "routes[0].auth.claims.role",
     "got none"),
    ("claims-one-of-scalar", [((*A, "claims"), {"role": {"one_of": "a"}})],
     "routes[0].auth.claims.role.one_of", "must be a non-empty list"),
    ("claims-one-of-item", [((*A, "claims"), {"role": {"one_of": ["a", {"b": 1}]}})],
     "routes[0].auth.claims.role.one_of[1]", "must be a string, number or boolean"),
    ("claims-equals-list", [((*A, "claims"), {"role": {"equals": ["a"]}})],
     "routes[0].auth.claims.role.equals", "must be a string, number or boolean, got list"),
    ("claims-present-not-bool", [((*A, "claims"), {"role": {"present": "yes"}})],
     "routes[0].auth.claims.role.present", "must be true or false"),
    ("claims-bad-path", [((*A, "claims"), {"a..b": {"present": True}})],
     "routes[0].auth.claims['a..b']", "invalid claim path 'a..b': empty segment"),
    ("claims-unterminated", [((*A, "claims"), {'["https://x/roles': {"present": True}})],
     "routes[0].auth.claims['[\"https://x/roles']", "unterminated quoted segment"),
    ("api-key-without-section", [((*A, "api_key"), {"required": True})],
     "routes[0].auth.api_key", "needs a top-level api_keys section with keys"),
    ("api-key-bind-path", [(("api_keys",), API_KEYS), ((*A, "api_key"), {"bind_claim": "a."})],
     "routes[0].auth.api_key.bind_claim", "invalid claim path 'a.': empty segment"),
    ("api-key-required-bool", [(("api_keys",), API_KEYS), ((*A, "api_key"), {"required": 1})],
     "routes[0].auth.api_key.required", "must be true or false, got integer"),
    ("allow-missing-bool", [((*A, "allow_missing"), "false")], "routes[0].auth.allow_missing",
     "must be true or false, got string"),
    ("forward-token-bool", [((*A, "forward_token"), None)], "routes[0].auth.forward_token",
     "must be true or false, got null"),
    ("claim-headers-not-mapping", [((*A, "claim_headers"), ["X-Sub"])],
     "routes[0].auth.claim_headers", "must be a mapping, got list"),
    ("claim-header-bad-name", [((*A, "claim_headers"), {"X User": "sub"})],
     "routes[0].auth.claim_headers['X User']", "invalid header name 'X User'"),
    ("claim-header-reserved", [((*A, "claim_headers"), {"Content-Length": "sub"})],
     "routes[0].auth.claim_headers.Content-Length", "header 'Content-Length' is reserved"),
    ("claim-header-hop-by-hop", [((*A, "claim_headers"), {"connection": "sub"})],
     "routes[0].auth.claim_headers.connection", "is reserved"),
    ("claim-header-authorization", [((*A, "claim_headers"), {"Authorization": "sub"})],
     "routes[0].auth.claim_headers.Authorization", "is reserved"),
    ("claim-header-dup", [((*A, "claim_headers"), {"X-User": "sub", "x-user": "email"})],
     "routes[0].auth.claim_headers.x-user",
     "header 'x-user' is already used by routes[0].auth.claim_headers.X-User"),
    ("claim-header-is-token-header", [((*P, "token_from"), [{"header": "X-Token"}]),
                                      ((*A, "claim_headers"), {"x-token": "sub"})],
     "routes[0].auth.claim_headers.x-token", "already used by providers.okta.token_from[0]"),
    ("claim-header-is-other-routes-token-header", [
        (("providers", "other"), {"issuer": "urn:o", "jwks": {"keys": [JWK]},
                                  "token_from": [{"header": "X-Other-Token"}]}),
        ((*A, "claim_headers"), {"X-Other-Token": "sub"})],
     "routes[0].auth.claim_headers.X-Other-Token", "already used by providers.other.token_from[0]"),
    ("claim-header-underscore", [((*A, "claim_headers"), {"X-User": "sub", "X_User": "email"})],
     "routes[0].auth.claim_headers.X_User", "header 'X_User' is already used by "
     "routes[0].auth.claim_headers.X-User"),
    ("auth-same-issuer-twice", [
        (("providers", "copy"), {"issuer": "https://idp.example.com/", "jwks": {"keys": [JWK]}}),
        ((*A, "providers"), ["okta", "copy"])],
     "routes[0].auth.providers[1]", "provider 'copy' has the same issuer as 'okta'"),
    ("claim-header-is-api-key-header", [(("api_keys",), API_KEYS),
                                        ((*A, "claim_headers"), {"X-Api-Key": "sub"})],
     "routes[0].auth.claim_headers.X-Api-Key", "already used by api_keys.header"),
    ("claim-header-bad-path", [((*A, "claim_headers"), {"X-Sub": 'a["b'})],
     "routes[0].auth.claim_headers.X-Sub", "invalid claim path"),
    ("payload-header-dup", [((*A, "claim_headers"), {"X-Sub": "sub"}),
                            ((*A, "payload_header"), "x-sub")],
     "routes[0].auth.payload_header", "already used by routes[0].auth.claim_headers.X-Sub"),
    ("payload-header-reserved", [((*A, "payload_header"), "Transfer-Encoding")],
     "routes[0].auth.payload_header", "is reserved"),
    ("failure-status-5xx", [((*A, "failure_status"), 500)], "routes[0].auth.failure_status",
     "must be between 400 and 499"),
    ("failure-status-3xx", [((*A, "failure_status"), 302)], "routes[0].auth.failure_status",
     "must be between 400 and 499"),
    ("hide-reasons-bool", [((*A, "hide_reasons"), "yes")], "routes[0].auth.hide_reasons",
     "must be true or false"),
    ("cors-preflight", [((*A, "cors_preflight"), "auth")], "routes[0].auth.cors_preflight",
     "must be one of bypass, got 'auth'"),
    ("cors-preflight-typo", [((*A, "cors_preflight"), "bypas")], "routes[0].auth.cors_preflight",
     "(did you mean 'bypass'?)"),
    ("access-log-sample", [(("access_log", "sample"), 1.5)], "access_log.sample",
     "must be between 0 and 1"),
    ("access-log-enabled", [(("access_log", "enabled"), "on")], "access_log.enabled",
     "must be true or false"),
    ("access-log-path", [(("access_log", "path"), 3)], "access_log.path",
     "must be a string, got integer"),
    ("metrics-bool", [(("metrics",), 1)], "metrics", "must be true or false, got integer"),
    ("drain-timeout", [(("drain_timeout",), "forever")], "drain_timeout", "invalid duration"),
]


@pytest.mark.parametrize(("edits", "path", "fragment"),
                         [pytest.param(e, p, f, id=i) for i, e, p, f in RULES])
def test_each_rule_reports_its_exact_path(edits: list[Edit], path: str, fragment: str) -> None:
    errors = errors_of(edited(*edits))
    hits = [e for e in errors if e.startswith(f"{path}: ") and fragment in e]
    assert hits, f"no '{path}: ...{fragment}...' in:\n" + "\n".join(errors)


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2], "(root): must be a mapping, got list"),
    ("text", "(root): must be a mapping, got string"),
    (None, "(root): the config is empty"),
])
def test_root_must_be_a_mapping(data: Any, message: str) -> None:
    assert errors_of(data) == [message]


# ---------------------------------------------------------------------------------------------
# Accepted shapes that the rules above must not reject
# ---------------------------------------------------------------------------------------------


def only(data: dict[str, Any]) -> GatewayConfig:
    return parse_config(data, {})


def test_admin_null_means_no_admin_and_ipv6_is_accepted() -> None:
    assert only(edited((("admin",), None))).admin is None
    config = only(edited((("listen",), "[::]:8443"), (("admin",), "[::1]:9901")))
    assert (config.listen, config.admin) == (Address("::", 8443), Address("::1", 9901))
    assert only(edited((("listen",), "127.0.0.1:0"), (("admin",), "127.0.0.1:0"))).admin \
        == Address("127.0.0.1", 0)  # two ephemeral ports never collide


def test_loopback_http_is_allowed_for_key_urls() -> None:
    for host in ("127.0.0.1:8000", "localhost", "[::1]:9"):
        config = only(edited(((*P, "jwks"), DELETE), ((*P, "jwks_uri"), f"http://{host}/jwks")))
        assert config.providers["okta"].key_source == "jwks_uri"
        config = only(edited(((*P, "jwks"), DELETE), ((*P, "discovery"), True),
                             ((*P, "issuer"), f"http://{host}/")))
        assert config.providers["okta"].key_source == "discovery"


def test_secret_providers() -> None:
    config = only(edited(((*P, "jwks"), DELETE), ((*P, "secret"), SECRET)))
    okta = config.providers["okta"]
    assert (okta.key_source, okta.secret, okta.algorithms) == ("secret", SECRET.encode(), None)
    assert SECRET not in repr(config)  # a logged config never shows the secret
    config = only(edited(((*P, "jwks"), DELETE), ((*P, "secret"), "s" * 64),
                         ((*P, "algorithms"), ["HS512", "HS256"])))
    assert config.providers["okta"].algorithms == ("HS512", "HS256")


def test_jwks_file_relative_to_the_config_file(tmp_path: Path) -> None:
    write(tmp_path / "keys.json", '{"keys": []}')
    data = edited(((*P, "jwks"), DELETE), ((*P, "jwks_file"), "keys.json"))
    config = parse_config(data, {}, str(tmp_path / "gateway.yaml"))
    assert config.providers["okta"].jwks_file == str(tmp_path / "keys.json")
    errors = errors_of(data, source=str(tmp_path / "sub" / "gateway.yaml"))
    assert errors == [f"providers.okta.jwks_file: cannot read "
                      f"{str(tmp_path / 'sub' / 'keys.json')!r}: No such file or directory"]


def test_jwks_cache_min_ttl_default_never_above_ttl() -> None:
    cache = only(edited(((*P, "jwks_cache"), {"ttl": "20s", "min_refresh_interval": "5s"})))
    assert cache.providers["okta"].jwks_cache == JwksCacheConfig(
        ttl=20.0, min_ttl=20.0, min_refresh_interval=5.0)


def test_route_match_normalisation() -> None:
    config = only(edited(((*R, "match"), {"host": "API.Example.COM", "methods": ["get", "Post"]})))
    assert config.routes[0].match == RouteMatch(host="api.example.com", methods=("GET", "POST"))


def test_upstream_url_is_normalised() -> None:
    for given, stored in [("http://app", "http://app:80"), ("http://App:81/", "http://app:81"),
                          ("http://[::1]:82/base/", "http://[::1]:82/base")]:
        assert only(edited((("upstreams", "app", "url"), given))).upstreams["app"].url == stored


def test_claim_rule_values() -> None:
    config = only(edited(((*A, "claims"), {"n": {"equals": 3}, "m": {"one_of": [1, "a", True]},
                                           "p": {"present": False}})))
    assert config.routes[0].auth is not None
    assert config.routes[0].auth.claims == (ClaimRule(("n",), "equals", 3),
                                            ClaimRule(("m",), "one_of", (1, "a", True)),
                                            ClaimRule(("p",), "present", False))


# ---------------------------------------------------------------------------------------------
# load_config: YAML-level problems
# ---------------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "listen: 0.0.0.0:8080\nroutes:\n  - name: [x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    [error] = info.value.errors
    assert error.startswith(f"{path}:4:1: invalid YAML: ")


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "upstreams:\n  a: 1\n b: 2\n")
    [error] = load_errors(path)
    assert error.startswith(f"{path}:3:2: invalid YAML: ")


def test_yaml_document_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    assert load_errors(path) == [
        "(root): must be a mapping, got list"]
    path = write(tmp_path / "empty.yaml", "# nothing\n")
    assert load_errors(path) == [
        "(root): the config is empty"]


def test_yaml_unsafe_tags_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "evil.yaml", "listen: !!python/object/apply:os.getcwd []\n")
    [error] = load_errors(path)
    assert error.startswith(f"{path}:1:9: invalid YAML: ")


def test_yaml_duplicate_keys_are_errors_with_the_other_errors(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.yaml", """\
upstreams: {app: {url: "http://127.0.0.1:1"}}
routes: [{name: r, match: {path: /}, upstream: app, auth: none}]
workers: -1
upstreams: {app: {url: "http://127.0.0.1:2"}}
""")
    errors = load_errors(path)
    assert errors == [f"{path}:3:10: workers: must be at least 0",
                      f"{path}:4:1: duplicate key 'upstreams' (first at line 1)"]


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = write(tmp_path / "merge.yaml", """\
upstreams:
  a: &up {url: "http://127.0.0.1:1", read_timeout: 5s}
  b: {<<: *up, url: "http://127.0.0.1:2"}
routes: [{name: r, match: {path: /}, upstream: b, auth: none}]
""")
    config = load_config(path, {})
    assert config.upstreams["b"] == UpstreamConfig("b", "http://127.0.0.1:2", read_timeout=5.0)


def test_unreadable_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    [error] = load_errors(missing)
    assert error == f"{missing}: cannot read the config: No such file or directory"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"listen: \xff\n")
    [error] = load_errors(binary)
    assert error == f"{binary}: not UTF-8 (byte offset 8)"


def test_config_module_does_not_import_the_compiled_verifier_at_import_time() -> None:
    package = Path(__file__).parents[2] / "fastgate" / "config"
    modules = sorted(package.glob("*.py"))
    assert len(modules) >= 3  # __init__, certs, schema at least
    for module in modules:
        lines = module.read_text().splitlines()
        top_level = [line for line in lines if line.startswith(("import ", "from "))]
        assert not any("_verify" in line for line in top_level), module


def test_semantic_errors_carry_line_and_column_in_document_order(tmp_path: Path) -> None:
    # routes come first in this file, although the loader checks providers before routes
    path = write(tmp_path / "order.yaml", """\
routes:
  - name: r
    match: {path: /}
    upstream: nope
    auth: {providers: [okta]}
  - match: {path: /x}
    upstream: app
    auth: none
providers:
  okta:
    issuer: https://idp.example.test/
    discovery: true
    clock_skew: ${SKEW}
    colour: blue
upstreams: {app: {url: "http://127.0.0.1:1"}}
""")
    assert load_errors(path) == [
        f"{path}:4:15: routes[0].upstream: unknown upstream 'nope'",
        f"{path}:6:5: routes[1].name: required key is missing",  # the enclosing mapping
        f"{path}:13:17: providers.okta.clock_skew: environment variable 'SKEW' is not set",
        f"{path}:14:5: providers.okta.colour: unknown key 'colour'",  # the key itself
    ]


def test_check_reads_stdin_and_names_it(tmp_path: Path) -> None:
    import subprocess
    import sys

    doc = "upstreams: {app: {url: 'ftp://x'}}\nroutes: []\n"
    p = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", "-"], input=doc,
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "<stdin>:1:24: upstreams.app.url: must be http://host:port[/path]" in p.stderr
    good = "upstreams: {app: {url: 'http://127.0.0.1:1'}}\n" \
           "routes: [{name: r, match: {path: /}, upstream: app, auth: none}]\n"
    p = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", "-"], input=good,
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "<stdin>: OK (1 route, 0 providers, 1 upstream)\n"
    p = subprocess.run([sys.executable, "-m", "fastgate", "check", "-c", "-"], input=b"\xff",
                       capture_output=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1 and b"<stdin>: not UTF-8" in p.stderr


# ---------------------------------------------------------------------------------------------
# tls (listener), upstreams.*.tls, timeouts.handshake — files are read at load
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Self-signed PEM files made with cryptography: good pairs and the broken shapes."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import NameOID

    root = tmp_path_factory.mktemp("pem")
    now = datetime.datetime.now(datetime.UTC)

    def cert_for(key: Any, names: list[str], sign_key: Any = None) -> bytes:
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .sign(sign_key or key, None if isinstance(key, ed25519.Ed25519PrivateKey)
                      else hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(key: Any, password: bytes | None = None) -> bytes:
        enc = serialization.BestAvailableEncryption(password) if password else \
            serialization.NoEncryption()
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8, enc)

    ec_key, ec_other = ec.generate_private_key(ec.SECP256R1()), \
        ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(65537, 2048)
    small = rsa.generate_private_key(65537, 1024)
    ed = ed25519.Ed25519PrivateKey.generate()
    files = {
        "ec.crt": cert_for(ec_key, ["api.example.com", "www.example.com"]),
        "ec.key": key_pem(ec_key),
        "rsa.crt": cert_for(rsa_key, ["partner.example.com"]),
        "rsa.key": key_pem(rsa_key),
        "other.key": key_pem(ec_other),
        "encrypted.key": key_pem(ec_key, b"secret"),
        "small.crt": cert_for(small, ["small.example.com"]),
        "small.key": key_pem(small),
        "ed.crt": cert_for(ed, ["ed.example.com"]),
        "ed.key": key_pem(ed),
        "garbage.pem": b"hello\n",
    }
    out: dict[str, Path] = {}
    for name, data in files.items():
        (root / name).write_bytes(data)
        out[name] = root / name
    return out


def with_tls(tls: Any = None, upstream_tls: Any = None, url: str = "http://127.0.0.1:9000",
             **top: Any) -> dict[str, Any]:
    data = base()
    if tls is not None:
        data["tls"] = tls
    data["upstreams"]["app"]["url"] = url
    if upstream_tls is not None:
        data["upstreams"]["app"]["tls"] = upstream_tls
    data.update(top)
    return data


def test_tls_listener_parses_with_defaults_and_relative_paths(pem: dict[str, Path]) -> None:
    from fastgate.config import TlsCertificate, TlsConfig

    source = str(pem["ec.crt"].parent / "gateway.yaml")
    config = parse_config(with_tls({"certificates": [
        {"cert": "ec.crt", "key": "ec.key"},
        {"cert": str(pem["rsa.crt"]), "key": str(pem["rsa.key"]),
         "server_names": ["Partner.Example.com", "*.partners.example.com"]},
    ]}), {}, source)
    d = str(pem["ec.crt"].parent)
    assert config.tls == TlsConfig(certificates=(
        TlsCertificate(f"{d}/ec.crt", f"{d}/ec.key"),
        TlsCertificate(str(pem["rsa.crt"]), str(pem["rsa.key"]),
                       ("partner.example.com", "*.partners.example.com")),
    ), min_version="1.2", client_ca=None, client_auth="none")
    assert config.timeouts.handshake == 10.0
    assert only(base()).tls is None  # omitted: plain HTTP


@pytest.mark.parametrize(("raw", "parsed"), [("1.3", "1.3"), (1.3, "1.3"), (1.2, "1.2")])
def test_tls_min_version_string_or_yaml_number(pem: dict[str, Path], raw: Any,
                                               parsed: str) -> None:
    config = only(with_tls({"certificates": [{"cert": str(pem["ec.crt"]),
                                              "key": str(pem["ec.key"])}],
                            "min_version": raw, "client_ca": str(pem["ec.crt"]),
                            "client_auth": "required"},
                           timeouts={"handshake": "1500ms"}))
    assert config.tls is not None and config.tls.min_version == parsed
    assert config.tls.client_auth == "required" and config.tls.client_ca == str(pem["ec.crt"])
    assert config.timeouts.handshake == 1.5


def _pair(pem: dict[str, Path], cert: str, key: str) -> dict[str, Any]:
    return {"certificates": [{"cert": str(pem[cert]), "key": str(pem[key])}]}


TLS_RULES: list[tuple[str, Any, str, str]] = [
    # (id, tls section (callable of pem or literal), exact path, message fragment)
    ("not-mapping", ["x"], "tls", "must be a mapping, got list"),
    ("no-certificates", {}, "tls.certificates", "required key is missing"),
    ("empty-certificates", {"certificates": []}, "tls.certificates", "must not be empty"),
    ("certificates-not-list", {"certificates": "a.crt"}, "tls.certificates",
     "must be a list of {cert, key[, server_names]}, got string"),
    ("unknown-key", lambda p: {**_pair(p, "ec.crt", "ec.key"), "ciphers": "ALL"},
     "tls.ciphers", "unknown key 'ciphers'"),
    ("no-key", lambda p: {"certificates": [{"cert": str(p["ec.crt"])}]},
     "tls.certificates[0].key", "required key is missing"),
    ("missing-file", lambda p: {"certificates": [{"cert": str(p["ec.crt"]) + ".nope",
                                                  "key": str(p["ec.key"])}]},
     "tls.certificates[0].cert", "cannot read"),
    ("not-pem-cert", lambda p: _pair(p, "garbage.pem", "ec.key"), "tls.certificates[0].cert",
     "holds no PEM certificate"),
    ("not-pem-key", lambda p: _pair(p, "ec.crt", "garbage.pem"), "tls.certificates[0].key",
     "holds no PEM private key"),
    ("mismatched-key", lambda p: _pair(p, "ec.crt", "other.key"), "tls.certificates[0].key",
     "does not match the certificate"),
    ("encrypted-key", lambda p: _pair(p, "ec.crt", "encrypted.key"),
     "tls.certificates[0].key", "is an encrypted key"),
    ("small-rsa", lambda p: _pair(p, "small.crt", "small.key"), "tls.certificates[0].key",
     "RSA key of 1024 bits; at least 2048"),
    ("ed25519", lambda p: _pair(p, "ed.crt", "ed.key"), "tls.certificates[0].key",
     "use RSA or ECDSA"),
    ("ip-server-name", lambda p: {"certificates": [{"cert": str(p["ec.crt"]),
                                                    "key": str(p["ec.key"]),
                                                    "server_names": ["10.0.0.1"]}]},
     "tls.certificates[0].server_names[0]", "invalid server name '10.0.0.1'"),
    ("duplicate-server-name", lambda p: {"certificates": [
        {"cert": str(p["ec.crt"]), "key": str(p["ec.key"]), "server_names": ["a.example"]},
        {"cert": str(p["rsa.crt"]), "key": str(p["rsa.key"]), "server_names": ["A.example"]}]},
     "tls.certificates[1].server_names[0]",
     "server name 'a.example' is already served by tls.certificates[0]"),
    ("min-version", lambda p: {**_pair(p, "ec.crt", "ec.key"), "min_version": "1.1"},
     "tls.min_version", "must be one of 1.2, 1.3, got '1.1'"),
    ("client-auth-typo", lambda p: {**_pair(p, "ec.crt", "ec.key"),
                                    "client_auth": "requierd", "client_ca": str(p["ec.crt"])},
     "tls.client_auth", "(did you mean 'required'?)"),
    ("client-auth-no-ca", lambda p: {**_pair(p, "ec.crt", "ec.key"),
                                     "client_auth": "optional"},
     "tls.client_ca", "required key is missing (client_auth: optional verifies"),
    ("client-ca-not-pem", lambda p: {**_pair(p, "ec.crt", "ec.key"), "client_auth": "required",
                                     "client_ca": str(p["garbage.pem"])},
     "tls.client_ca", "holds no PEM certificate"),
]


@pytest.mark.parametrize(("section", "path", "fragment"),
                         [pytest.param(s, p, f, id=i) for i, s, p, f in TLS_RULES])
def test_tls_rules_report_their_exact_path(pem: dict[str, Path], section: Any, path: str,
                                           fragment: str) -> None:
    tls = section(pem) if callable(section) else section
    errors = errors_of(with_tls(tls))
    hits = [e for e in errors if e.startswith(f"{path}: ") and fragment in e]
    assert hits, f"no '{path}: ...{fragment}...' in:\n" + "\n".join(errors)


def test_tls_file_errors_name_the_file(pem: dict[str, Path]) -> None:
    errors = errors_of(with_tls(_pair(pem, "ec.crt", "other.key")))
    assert errors == [f"tls.certificates[0].key: '{pem['other.key']}' does not match the "
                      f"certificate '{pem['ec.crt']}' (the first certificate of the file must "
                      "be the key's)"]


def test_handshake_timeout_must_be_positive() -> None:
    errors = errors_of(edited((("timeouts", "handshake"), 0)))
    assert errors == ["timeouts.handshake: must be greater than 0"]


def test_https_upstream_urls_and_tls(pem: dict[str, Path]) -> None:
    from fastgate.config import UpstreamTlsConfig

    config = only(with_tls(url="https://Billing.internal/v1/"))
    assert config.upstreams["app"].url == "https://billing.internal:443/v1"
    assert config.upstreams["app"].tls is None  # verified against the system store
    config = only(with_tls(url="https://10.0.3.7:8443", upstream_tls={
        "ca_file": str(pem["ec.crt"]), "server_name": "Billing.Internal",
        "cert": str(pem["rsa.crt"]), "key": str(pem["rsa.key"]), "verify": True}))
    assert config.upstreams["app"].tls == UpstreamTlsConfig(
        ca_file=str(pem["ec.crt"]), server_name="billing.internal", cert=str(pem["rsa.crt"]),
        key=str(pem["rsa.key"]), verify=True)
    assert only(with_tls(url="https://a.internal", upstream_tls={"verify": False})) \
        .upstreams["app"].tls == UpstreamTlsConfig(verify=False)


UPSTREAM_TLS_RULES: list[tuple[str, Any, str, str]] = [
    ("on-http", lambda p: ("http://127.0.0.1:9000", {"verify": True}), "upstreams.app.tls",
     "is only for https:// upstream URLs"),
    ("unknown-key", lambda p: ("https://a.internal", {"verify_depth": 3}),
     "upstreams.app.tls.verify_depth", "unknown key 'verify_depth'"),
    ("cert-without-key", lambda p: ("https://a.internal", {"cert": str(p["ec.crt"])}),
     "upstreams.app.tls.key", "required key is missing (a client certificate needs both"),
    ("key-without-cert", lambda p: ("https://a.internal", {"key": str(p["ec.key"])}),
     "upstreams.app.tls.cert", "required key is missing"),
    ("mismatch", lambda p: ("https://a.internal", {"cert": str(p["ec.crt"]),
                                                   "key": str(p["other.key"])}),
     "upstreams.app.tls.key", "does not match the certificate"),
    ("ca-missing", lambda p: ("https://a.internal", {"ca_file": "/nonexistent/ca.pem"}),
     "upstreams.app.tls.ca_file", "cannot read '/nonexistent/ca.pem'"),
    ("ca-not-pem", lambda p: ("https://a.internal", {"ca_file": str(p["garbage.pem"])}),
     "upstreams.app.tls.ca_file", "holds no PEM certificate"),
    ("server-name-ip", lambda p: ("https://a.internal", {"server_name": "10.1.1.1"}),
     "upstreams.app.tls.server_name", "invalid server name '10.1.1.1'"),
    ("server-name-wildcard", lambda p: ("https://a.internal", {"server_name": "*.internal"}),
     "upstreams.app.tls.server_name", "invalid server name"),
    ("verify-not-bool", lambda p: ("https://a.internal", {"verify": "no"}),
     "upstreams.app.tls.verify", "must be true or false, got string"),
    ("scheme", lambda p: ("wss://a.internal", None), "upstreams.app.url",
     "must be http://host:port[/path] or https://host:port[/path]"),
]


@pytest.mark.parametrize(("make", "path", "fragment"),
                         [pytest.param(m, p, f, id=i) for i, m, p, f in UPSTREAM_TLS_RULES])
def test_upstream_tls_rules_report_their_exact_path(pem: dict[str, Path], make: Any, path: str,
                                                    fragment: str) -> None:
    url, section = make(pem)
    errors = errors_of(with_tls(url=url, upstream_tls=section))
    hits = [e for e in errors if e.startswith(f"{path}: ") and fragment in e]
    assert hits, f"no '{path}: ...{fragment}...' in:\n" + "\n".join(errors)


def test_tls_errors_are_all_reported_at_once_with_positions(pem: dict[str, Path],
                                                             tmp_path: Path) -> None:
    path = write(tmp_path / "tls.yaml", f"""\
tls:
  certificates:
    - {{cert: {pem['garbage.pem']}, key: {pem['ec.key']}}}
  min_version: "1.0"
upstreams:
  app: {{url: "https://a.internal", tls: {{ca_file: missing.pem}}}}
routes: [{{name: r, match: {{path: /}}, upstream: app, auth: none}}]
""")
    errors = load_errors(path)
    assert [e.split(": ", 2)[1] for e in errors] == [
        "tls.certificates[0].cert", "tls.min_version", "upstreams.app.tls.ca_file"]
    assert errors[0].startswith(f"{path}:3:")
    assert f"'{tmp_path / 'missing.pem'}'" in errors[2]  # relative to the config file


# ---------------------------------------------------------------------------------------------
# providers.*.typ (RFC 9068 §4)
# ---------------------------------------------------------------------------------------------


def test_provider_typ_parsed_and_defaults_to_unchecked() -> None:
    assert parse_config(base()).providers["okta"].typ is None
    data = base()
    data["providers"]["okta"]["typ"] = ["at+jwt", "application/okta-internal-at+jwt"]
    okta = parse_config(data).providers["okta"]
    assert okta.typ == ("at+jwt", "application/okta-internal-at+jwt")  # as written


def test_provider_typ_reaches_the_verifier() -> None:
    from fastgate.app import build_verifier
    from fastgate.token._verify import TokenCache

    data = base()
    data["providers"]["okta"]["typ"] = ["AT+JWT"]
    verifier = build_verifier(parse_config(data).providers["okta"], TokenCache(0), 8192)
    assert verifier.typ == frozenset({"application/at+jwt"})


@pytest.mark.parametrize(("value", "path", "fragment"), [
    ("at+jwt", "providers.okta.typ", "must be a list, got string"),
    ([], "providers.okta.typ", "must not be empty"),
    ([""], "providers.okta.typ[0]", "must not be empty"),
    (["at+jwt", 3], "providers.okta.typ[1]", "must be a string, got integer"),
    (["at jwt"], "providers.okta.typ[0]", "invalid typ 'at jwt': a media type"),
    (["a/b/c"], "providers.okta.typ[0]", "invalid typ 'a/b/c'"),
    (["/jwt"], "providers.okta.typ[0]", "invalid typ '/jwt'"),
    (["at+jwt;q=1"], "providers.okta.typ[0]", "invalid typ"),
    (["at+jwt", "at+jwt"], "providers.okta.typ[1]", "duplicate typ 'at+jwt'"),
    (["at+jwt", "Application/AT+JWT"], "providers.okta.typ[1]",
     "duplicate typ 'Application/AT+JWT' (the same type as 'at+jwt'"),
])
def test_provider_typ_errors_have_paths(value: Any, path: str, fragment: str) -> None:
    data = base()
    data["providers"]["okta"]["typ"] = value
    data["providers"]["okta"]["clock_skew"] = "1h"  # a second error: all are reported at once
    errors = errors_of(data)
    hits = [e for e in errors if e.startswith(f"{path}: ") and fragment in e]
    assert hits, f"no '{path}: ...{fragment}...' in:\n" + "\n".join(errors)
    assert any(e.startswith("providers.okta.clock_skew: ") for e in errors)


def test_provider_typ_typo_in_key_name() -> None:
    data = base()
    data["providers"]["okta"]["type"] = ["at+jwt"]
    assert errors_of(data) == ["providers.okta.type: unknown key 'type' (did you mean 'typ'?)"]


@pytest.mark.parametrize(("value", "message"), [
    ("{sub", "unterminated placeholder"),
    ("a}b", "unmatched '}'"),
    ("{}", "empty segment"),
    ("{sub}\u00e9", "non-ASCII"),
])
def test_claim_header_template_errors_name_the_path(value: str, message: str) -> None:
    from fastgate.config import parse_config

    raw = {
        "upstreams": {"u": {"url": "http://127.0.0.1:1"}},
        "providers": {"p": {"issuer": "https://idp.example.test/", "secret": "k" * 32}},
        "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "u",
                    "auth": {"providers": ["p"], "claim_headers": {"X-Identity": value}}}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, {})
    (error,) = info.value.errors
    assert error.startswith("routes[0].auth.claim_headers.X-Identity: invalid claim template")
    assert message in error


def test_claim_header_template_parsed() -> None:
    from fastgate.config import ClaimHeader, parse_config

    raw = {
        "upstreams": {"u": {"url": "http://127.0.0.1:1"}},
        "providers": {"p": {"issuer": "https://idp.example.test/", "secret": "k" * 32}},
        "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "u",
                    "auth": {"providers": ["p"],
                             "claim_headers": {"X-Identity": "{sub}@{tenant.id}",
                                               "X-User-Id": "sub"}}}],
    }
    auth = parse_config(raw, {}).routes[0].auth
    assert auth is not None
    assert auth.claim_headers == (
        ClaimHeader("X-Identity", (), (("sub",), "@", ("tenant", "id"))),
        ClaimHeader("X-User-Id", ("sub",)),
    )
