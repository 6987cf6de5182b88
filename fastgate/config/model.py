"""The frozen config model (SPEC §2): the contract between the loader and every runtime module.

Owns: the dataclasses a ``gateway.yaml`` becomes (`GatewayConfig` and one per section) with
their defaults, the type aliases of their fields, and what the runtime also checks about a
built config (`uses_replay_store`, `SHARED_STORE_NEEDED`: ``fastgate run --workers`` can
override ``workers``). Data only: no parsing, no I/O.
May import: the standard library.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields
from typing import Any, Literal

__all__ = [
    "DEFAULT_TOKEN_FROM",
    "DPOP_DEFAULT_ALGORITHMS",
    "SHARED_STORE_NEEDED",
    "AccessLogConfig",
    "Address",
    "ApiKey",
    "ApiKeyRule",
    "ApiKeysConfig",
    "AuthConfig",
    "CacheConfig",
    "ClaimHeader",
    "ClaimOp",
    "ClaimPath",
    "ClaimRule",
    "ClaimTemplate",
    "ClientAuth",
    "DpopConfig",
    "GatewayConfig",
    "JwksCacheConfig",
    "KeySourceKind",
    "Limits",
    "OtelConfig",
    "ProviderConfig",
    "RedisStoreConfig",
    "ReplayStoreConfig",
    "RouteConfig",
    "RouteMatch",
    "ScopeRule",
    "Timeouts",
    "TlsCertificate",
    "TlsConfig",
    "TlsVersion",
    "TokenPlace",
    "TokenSource",
    "TracingConfig",
    "UpstreamConfig",
    "UpstreamTlsConfig",
    "uses_replay_store",
]


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Limits:
    max_token_bytes: int = 8192
    max_header_bytes: int = 16384
    max_body_bytes: int = 10 * 1024 * 1024
    # Concurrent client connections per worker; past it a new connection gets one 503 and is
    # closed (docs/operations.md).
    max_connections: int = 10_000
    max_requests_per_connection: int = 0  # 0 = unlimited (RFC 9112 §9.6 close after N)


@dataclass(frozen=True, slots=True)
class Timeouts:
    header: float = 10.0  # the whole request head must arrive within this (slowloris)
    keepalive: float = 75.0  # idle time between requests on a persistent connection
    send: float = 30.0  # a client that takes none of its response for this long is cut off
    handshake: float = 10.0  # a TLS handshake must complete within this (RFC 8446 §4)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = 100_000


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """``upstreams.NAME.tls`` of an https:// upstream (RFC 9110 §4.3.4). Paths are absolute."""

    ca_file: str | None = None  # None: the system trust store
    server_name: str | None = None  # SNI and the name checked; None: the URL's host
    cert: str | None = None  # client certificate (upstream mTLS), with ``key``
    key: str | None = None
    verify: bool = True


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    url: str  # http://host:port[/base-path] or https://host:port[/base-path]
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    max_connections: int = 1024
    tls: UpstreamTlsConfig | None = None  # https:// URLs only (None: verify, system store)


@dataclass(frozen=True, slots=True)
class TlsCertificate:
    """One listener certificate: PEM chain and key (absolute paths); ``server_names`` empty:
    the certificate's own DNS names (subjectAltName) select it (RFC 6066 §3 SNI)."""

    cert: str
    key: str
    server_names: tuple[str, ...] = ()  # lower-case; "*.example.com" matches one label


TlsVersion = Literal["1.2", "1.3"]
ClientAuth = Literal["none", "optional", "required"]


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``tls``: TLS on ``listen`` (RFC 8446, RFC 5246). The first certificate is the default."""

    certificates: tuple[TlsCertificate, ...]
    min_version: TlsVersion = "1.2"
    client_ca: str | None = None  # CA bundle client certificates are verified against
    client_auth: ClientAuth = "none"


@dataclass(frozen=True, slots=True)
class JwksCacheConfig:
    ttl: float = 600.0  # upper bound of the TTL taken from Cache-Control: max-age
    min_ttl: float = 30.0  # lower bound of that TTL
    min_refresh_interval: float = 30.0
    max_stale: float = 86400.0
    timeout: float = 5.0
    max_bytes: int = 1024 * 1024


TokenPlace = Literal["header", "query", "cookie"]


@dataclass(frozen=True, slots=True)
class TokenSource:
    place: TokenPlace
    name: str
    prefix: str = ""  # header only, e.g. "Bearer " (scheme compared case-insensitively)


DEFAULT_TOKEN_FROM: tuple[TokenSource, ...] = (
    TokenSource(place="header", name="Authorization", prefix="Bearer "),
)

KeySourceKind = Literal["discovery", "jwks_uri", "jwks_file", "jwks", "secret"]


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    issuer: str
    key_source: KeySourceKind
    jwks_uri: str | None = None
    jwks_file: str | None = None
    jwks: dict[str, Any] | None = None  # inline JWKS document
    secret: bytes | None = field(default=None, repr=False)  # never in logs via repr()
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] | None = None  # None = the verifier's default
    clock_skew: float = 60.0
    require: tuple[str, ...] = ("exp",)
    max_lifetime: float | None = None
    typ: tuple[str, ...] | None = None  # allowed JOSE typ values (RFC 9068 §4); None: unchecked
    jwks_cache: JwksCacheConfig = field(default_factory=JwksCacheConfig)
    token_from: tuple[TokenSource, ...] = DEFAULT_TOKEN_FROM


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    sha256: bytes  # 32 raw bytes (decoded from the hex in the file)
    client_id: str | None = None


@dataclass(frozen=True, slots=True)
class ApiKeysConfig:
    header: str | None = None
    query: str | None = None
    keys: tuple[ApiKey, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] | None = None  # upper-case
    host: str | None = None  # lower-case, compared without the port


ClaimPath = tuple[str, ...]  # "tenant.region" -> ("tenant", "region"); '["a.b"].c' -> ("a.b", "c")
ClaimOp = Literal["equals", "one_of", "contains", "present"]


@dataclass(frozen=True, slots=True)
class ClaimRule:
    path: ClaimPath
    op: ClaimOp
    value: Any = None  # equals: scalar; one_of: tuple; contains: scalar; present: bool


@dataclass(frozen=True, slots=True)
class ScopeRule:
    mode: Literal["any", "all"]
    scopes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ApiKeyRule:
    required: bool = True
    bind_claim: ClaimPath | None = None


ClaimTemplate = tuple[str | ClaimPath, ...]  # literal text and claim paths, in order


@dataclass(frozen=True, slots=True)
class ClaimHeader:
    header: str
    path: ClaimPath  # () for a template
    template: ClaimTemplate | None = None  # "{sub}@{tenant.id}": parts in order


@dataclass(frozen=True, slots=True)
class AuthConfig:
    providers: tuple[str, ...]
    mode: Literal["any", "all"] = "any"
    audiences: tuple[str, ...] | None = None  # overrides the providers' audiences
    scopes: ScopeRule | None = None
    claims: tuple[ClaimRule, ...] = ()
    api_key: ApiKeyRule | None = None
    allow_missing: bool = False
    forward_token: bool = True
    claim_headers: tuple[ClaimHeader, ...] = ()
    payload_header: str | None = None
    failure_status: int | None = None
    hide_reasons: bool = False
    cors_preflight: Literal["bypass", "auth"] = "auth"
    certificate_bound: bool = False  # RFC 8705 §3: cnf["x5t#S256"] = the client certificate
    dpop: DpopConfig | None = None  # RFC 9449; None: no DPoP on the route
    one_time: bool = False  # RFC 7523 §3 item 7: a token's jti is accepted once


#: RFC 9449 §4.3 check 5: asymmetric algorithms only (a proof signed with a shared secret
#: proves nothing about possession).
DPOP_DEFAULT_ALGORITHMS: tuple[str, ...] = (
    "ES256", "ES384", "ES512", "EdDSA", "Ed25519", "RS256", "RS384", "RS512", "PS256", "PS384",
    "PS512")


@dataclass(frozen=True, slots=True)
class DpopConfig:
    """``auth.dpop`` (RFC 9449): proof-of-possession on a route (docs/security.md)."""

    mode: Literal["allowed", "required"] = "allowed"
    algorithms: tuple[str, ...] = DPOP_DEFAULT_ALGORITHMS
    max_age: float = 60.0  # §11.1: a proof's iat may be at most this old ...
    clock_skew: float = 5.0  # ... and at most this far in the future
    nonce: bool = False  # §8: proofs must carry a nonce the gateway issued
    external_url: str | None = None  # scheme://authority clients use; None: Host + TLS state


@dataclass(frozen=True, slots=True)
class RedisStoreConfig:
    url: str  # redis://[[user]:password@]host[:port][/db], rediss:// (TLS), unix:///path
    key_prefix: str = "fastgate:"
    timeout: float = 0.05  # one round trip; past it the check counts as unavailable
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"


@dataclass(frozen=True, slots=True)
class ReplayStoreConfig:
    """``replay_store``: where DPoP proof jtis, one-time token jtis and DPoP nonces are
    remembered. In-process by default (right for one worker); Redis to share them."""

    max_entries: int = 1_000_000  # the memory store's bound (per worker)
    redis: RedisStoreConfig | None = None


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    match: RouteMatch
    upstream: str
    strip_prefix: bool = False
    auth: AuthConfig | None = None  # None = `auth: none`


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    enabled: bool = True
    sample: float = 1.0  # fraction of requests logged (rejects and 5xx are always logged)
    path: str | None = None  # None = stdout


@dataclass(frozen=True, slots=True)
class OtelConfig:
    # OpenTelemetry span export (fastgate/ops/otel.py; the `otel` extra). Off by default: it costs
    # CPU per sampled request and sends request paths to a collector.
    enabled: bool = False
    sample: float = 0.01  # of the requests no incoming traceparent decides for (parent-based)
    endpoint: str = "http://127.0.0.1:4318/v1/traces"  # OTLP/HTTP (protobuf) traces URL
    service_name: str = "fastgate"


@dataclass(frozen=True, slots=True)
class TracingConfig:
    # X-Request-Id: kept from a trusted_proxies peer, generated otherwise (absent, or sent by
    # anyone else); forwarded and in the access log.
    request_id: bool = True
    # W3C Trace Context (traceparent): "pass" forwards a valid one; "create" also makes one
    # when it is absent or invalid.
    traceparent: Literal["pass", "create"] = "pass"
    otel: OtelConfig = field(default_factory=OtelConfig)


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: Address = Address("0.0.0.0", 8080)
    admin: Address | None = Address("127.0.0.1", 9901)
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstreams: dict[str, UpstreamConfig] = field(default_factory=dict)
    providers: dict[str, ProviderConfig] = field(default_factory=dict)
    api_keys: ApiKeysConfig | None = None
    routes: tuple[RouteConfig, ...] = ()
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    metrics: bool = True
    drain_timeout: float = 30.0
    tls: TlsConfig | None = None  # None: plain HTTP on `listen`
    replay_store: ReplayStoreConfig = field(default_factory=ReplayStoreConfig)
    log_format: Literal["text", "json"] = "text"  # operational logs (fastgate/ops/logformat.py)
    source: str | None = None  # path the config was read from, for logs and reloads


#: RFC 9449 §11.1 / RFC 7523 §3: a jti must be seen by every process that could accept it; a
#: memory store per worker would let a replay through on another worker.
SHARED_STORE_NEEDED = ("workers is not 1, and a route uses dpop or one_time: needs "
                       "replay_store.redis (a memory store per worker would let a replay "
                       "through on another worker)")


def uses_replay_store(routes: tuple[RouteConfig, ...]) -> bool:
    """Whether any route remembers jtis (DPoP proofs or one-time tokens)."""
    return any(r.auth is not None and (r.auth.dpop is not None or r.auth.one_time)
               for r in routes)


def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))
