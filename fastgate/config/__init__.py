"""Gateway configuration (SPEC §2): frozen data, parsed once from YAML.

This module holds data and its parsing only: no sockets, no logging setup, no process exit.
The loader (`load_config` / `parse_config`) collects every error into one ConfigError, each as
``<path>: <message>`` with the path in the document's own terms, e.g.
``routes[2].auth.providers[0]: unknown provider 'okat' (did you mean 'okta'?)``; file-level
problems (YAML syntax, duplicate keys) are ``<file>:<line>:<column>: <message>``.
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import math
import os
import re
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from fastgate.config import certs
from fastgate.errors import ConfigError
from fastgate.httpfields import HOP_BY_HOP

# ---------------------------------------------------------------------------------------------
# Data model (the contract between the loader and every runtime module)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Loader: YAML -> ${ENV} substitution -> one walk that validates, collects every error with its
# path and builds the frozen model. Nothing here opens sockets or exits the process.
# ---------------------------------------------------------------------------------------------

T = TypeVar("T")

_KEY_SOURCES = ("discovery", "jwks_uri", "jwks_file", "jwks", "secret")
# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MAX_CLOCK_SKEW = 300.0  # more than 5 minutes of leeway is almost certainly a unit mistake
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 token (header, method)
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3 scope-token
# A bare number (seconds) or one or more <number><unit> parts, largest unit first: 1h30m, 7d.
_DURATION_RE = re.compile(r"\d+(?:\.\d+)?|(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")
# Names a claim/payload header may never take: hop-by-hop (RFC 9110 §7.6.1), framing and
# routing (§6.4, §7.2), credentials, and the X-Forwarded-*/Forwarded headers fastgate sets.
_RESERVED_HEADERS = HOP_BY_HOP | frozenset({
    "proxy-authenticate", "proxy-authorization", "host", "content-length",
    "content-type", "content-encoding", "expect", "authorization", "cookie", "set-cookie",
    "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via",
})

_TOP_KEYS = ("listen", "admin", "workers", "limits", "timeouts", "trusted_proxies", "cache",
             "upstreams", "providers", "api_keys", "routes", "access_log", "tracing", "metrics",
             "drain_timeout", "tls", "log_format", "replay_store")
# RFC 6838 §4.2 restricted-name type "/" subtype, as lower-case ASCII.
_TYP_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_PROVIDER_KEYS = ("issuer", *_KEY_SOURCES, "audiences", "algorithms", "clock_skew", "require",
                  "max_lifetime", "typ", "jwks_cache", "token_from")
_ROUTE_KEYS = ("name", "match", "upstream", "strip_prefix", "auth")
_AUTH_KEYS = ("providers", "mode", "audiences", "scopes", "claims", "api_key", "allow_missing",
              "forward_token", "claim_headers", "payload_header", "failure_status",
              "hide_reasons", "cors_preflight", "certificate_bound", "dpop", "one_time")
_CLAIM_OPS: tuple[ClaimOp, ...] = ("equals", "one_of", "contains", "present")
_NONE: tuple[str, ...] = ()


#: RFC 9449 §11.1 / RFC 7523 §3: a jti must be seen by every process that could accept it; a
#: memory store per worker would let a replay through on another worker.
SHARED_STORE_NEEDED = ("workers is not 1, and a route uses dpop or one_time: needs "
                       "replay_store.redis (a memory store per worker would let a replay "
                       "through on another worker)")


def uses_replay_store(routes: tuple[RouteConfig, ...]) -> bool:
    """Whether any route remembers jtis (DPoP proofs or one-time tokens)."""
    return any(r.auth is not None and (r.auth.dpop is not None or r.auth.one_time)
               for r in routes)


def parse_duration(value: object, path: str | None = None) -> float:
    """Seconds from a number (int/float >= 0) or a string ``500ms``/``30s``/``10m``/``24h``/
    ``7d``, or a compound of those with each unit once, largest first (``1h30m``, ``1d12h``);
    a bare number string means seconds. Raises ValueError, prefixed by ``path`` if given."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.fullmatch(value):
        parts = _DURATION_PART_RE.findall(value)
        units = [_UNIT_SECONDS[u] for _, u in parts]
        if not parts:
            seconds = float(value)
        elif all(a > b for a, b in itertools.pairwise(units)):
            # each unit once, largest first: "30m1h" or "1m1m" is more likely a typo
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        what = repr(value) if isinstance(value, str | int | float) else _kind(value)
        message = (f"invalid duration {what}: use seconds (a number >= 0) or a string like "
                   "500ms, 30s, 10m, 24h, 7d or 1h30m (each unit once, largest first)")
        raise ValueError(f"{path}: {message}" if path else message)
    return seconds


def parse_claim_template(text: str) -> ClaimTemplate:
    """``"{sub}@{tenant.id}"`` -> ``(("sub",), "@", ("tenant", "id"))``: literal text and the
    claim paths of its ``{...}`` placeholders (``{{`` and ``}}`` are literal braces; a
    placeholder's path may be quoted as in :func:`parse_claim_path`). Raises ValueError for
    an unbalanced brace, an empty placeholder or a control character in the literal text."""
    parts: list[str | ClaimPath] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "{}" and text.startswith(ch * 2, i):
            literal.append(ch)
            i += 2
        elif ch == "{":
            j, quoted = i + 1, False
            while j < n and (quoted or text[j] != "}"):
                if text.startswith('["', j) and not quoted:
                    quoted, j = True, j + 2
                    continue
                if quoted and text.startswith('"]', j):
                    quoted, j = False, j + 2
                    continue
                j += 2 if quoted and text[j] == "\\" else 1
            if j >= n:
                raise ValueError(f"unterminated placeholder at position {i}")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(parse_claim_path(text[i + 1:j]))
            i = j + 1
        elif ch == "}":
            raise ValueError(f"unmatched '}}' at position {i} (write '}}}}' for a literal brace)")
        else:
            if not " " <= ch <= "~":
                # Every header fastgate writes is ASCII without controls (SPEC §2).
                raise ValueError(f"control or non-ASCII character at position {i}")
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    if not any(isinstance(p, tuple) for p in parts):
        raise ValueError("a template needs at least one {claim} placeholder")
    return tuple(parts)


def parse_claim_path(text: str) -> ClaimPath:
    """``tenant.region`` -> ("tenant", "region"); a segment containing dots is quoted:
    ``["https://example.com/roles"]`` or ``a["b.c"].d`` -> ("a", "b.c", "d"). Inside quotes
    ``\\"`` and ``\\\\`` escape. Raises ValueError on an empty segment or a bad quote."""
    segments: list[str] = []
    i, n = 0, len(text)
    while True:
        if text.startswith('["', i):
            j, buf = i + 2, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if not text.startswith('"]', j):
                raise ValueError(f"unterminated quoted segment at position {i}")
            segment, i = "".join(buf), j + 2
        else:
            j = i
            while j < n and text[j] not in '.["]':
                j += 1
            segment, i = text[i:j], j
        if not segment:
            raise ValueError(f"empty segment at position {i}")
        segments.append(segment)
        if i == n:
            return tuple(segments)
        if text[i] == "." and i + 1 < n:
            i += 1
        elif text[i] == ".":
            raise ValueError(f"empty segment at position {i + 1}")
        elif not text.startswith('["', i):
            raise ValueError(f"unexpected {text[i]!r} at position {i} "
                             '(quote a segment containing dots as ["..."])')


def load_config(path: str | os.PathLike[str],
                environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, validate and build a config file. Raises ConfigError with every problem."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the config: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 (byte offset {exc.start})"]) from exc
    return load_config_text(text, source, environ)


def load_config_text(text: str, source: str,
                     environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """:func:`load_config` of a document already read (``fastgate check -c -`` reads standard
    input); ``source`` names it in errors and relative paths resolve against its directory.
    Every error carries ``<source>:<line>:<column>`` of the node it is about (or of the
    nearest enclosing one that exists, for a missing key), in document order."""
    loader = _Loader(text)
    positions: dict[str, tuple[int, int]] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            _node_positions(node, "", positions, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        raise ConfigError([f"{where}: invalid YAML: {problem}"
                           + (f" ({context})" if context else "")]) from exc
    finally:
        loader.dispose()
    duplicates = [f"{source}:{d}" for d in loader.duplicates]
    try:
        config = parse_config(data, environ, source)
    except ConfigError as exc:
        located = [_locate(e, source, positions) for e in exc.errors]
        raise ConfigError(_in_document_order(duplicates + located, source)) from None
    if duplicates:
        raise ConfigError(duplicates)
    return config


def _node_positions(node: yaml.Node, path: str, out: dict[str, tuple[int, int]],
                    active: set[int]) -> None:
    """``out[path] = (line, column)`` (1-based) for every node, with the paths the walker uses
    (:func:`_key_path`). A mapping or list value is placed at its key (``routes:``), a scalar
    at the value itself. ``active`` guards against recursive aliases."""
    if id(node) in active:
        return
    out.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or \
                    key_node.tag != "tag:yaml.org,2002:str":
                continue  # merge keys and non-string keys: their errors use the parent
            sub = _key_path(path, key_node.value)
            mark = key_node.start_mark
            out.setdefault(sub + _KEY_MARK, (mark.line + 1, mark.column + 1))
            if not isinstance(value_node, yaml.ScalarNode):
                out.setdefault(sub, (mark.line + 1, mark.column + 1))
            _node_positions(value_node, sub, out, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_positions(item, f"{path}[{i}]", out, active)
    active.discard(id(node))


_KEY_MARK = "\0key"  # positions[path + _KEY_MARK]: where the key itself is (unknown keys)
_LAST_SEGMENT_RE = re.compile(r"(?:\.[^.\[\]]+|\[[^\]]*\])$")


def _locate(error: str, source: str, positions: Mapping[str, tuple[int, int]]) -> str:
    """``<path>: <message>`` -> ``<source>:<line>:<column>: <path>: <message>``, placed at
    the node of ``<path>`` or of its nearest ancestor in the document."""
    path, sep, message = error.partition(": ")
    if not sep or path == "(root)":
        return error
    if message.startswith("unknown key") and path + _KEY_MARK in positions:
        line, column = positions[path + _KEY_MARK]
        return f"{source}:{line}:{column}: {error}"
    probe = path
    while probe and probe not in positions:
        shorter = _LAST_SEGMENT_RE.sub("", probe)
        if shorter == probe:
            return error  # not a path of this document
        probe = shorter
    if not probe:
        return error
    line, column = positions[probe]
    return f"{source}:{line}:{column}: {error}"


def _in_document_order(errors: list[str], source: str) -> list[str]:
    """Errors with a position sorted by it (a stable sort: one node's errors keep the
    walker's order); errors about the whole document first."""
    prefix = f"{source}:"

    def key(error: str) -> tuple[int, int]:
        if error.startswith(prefix):
            line, _, rest = error[len(prefix):].partition(":")
            column = rest.partition(":")[0]
            if line.isdigit() and column.isdigit():
                return int(line), int(column)
        return 0, 0

    return sorted(errors, key=key)


def parse_config(data: Any, environ: Mapping[str, str] | None = None,
                 source: str | None = None) -> GatewayConfig:
    """Validate an already-parsed document (a mapping). Relative file paths in it resolve
    against the directory of ``source``. Raises ConfigError with every problem."""
    base_dir = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    walker = _Walker(os.environ if environ is None else environ, base_dir)
    config = walker.gateway(walker.substitute(data, ""), source)
    if walker.errors or config is None:
        raise ConfigError(walker.errors or ["(root): invalid config"])
    return config


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, plus a record of duplicate keys (PyYAML silently keeps the
    last one, which would let a second `providers:` block or route key vanish unnoticed)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            mark = key_node.start_mark
            if isinstance(key, Hashable) and key in seen:
                self.duplicates.append(f"{mark.line + 1}:{mark.column + 1}: duplicate key "
                                       f"{key!r} (first at line {seen[key]})")
            elif isinstance(key, Hashable):
                seen[key] = mark.line + 1
        return super().construct_mapping(node, deep)


def _kind(value: object) -> str:
    for types, name in ((type(None), "null"), (bool, "boolean"), (int, "integer"),
                        (float, "number"), (str, "string"), (list, "list"), (dict, "mapping")):
        if isinstance(value, types):
            return name
    return type(value).__name__


def _did_you_mean(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _key_path(path: str, key: str) -> str:
    if not _PLAIN_KEY_RE.fullmatch(key):
        return f"{path}[{key!r}]"
    return f"{path}.{key}" if path else key


def _header_key(name: str) -> str:
    # Compared case-insensitively (RFC 9110 §5.1) and with '_' as '-': many servers and
    # frameworks fold X_User into X-User, which would smuggle a header past the strip list.
    return name.lower().replace("_", "-")


def _secs(value: float) -> str:
    return f"{value:g}s"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Walker:
    """Walks the substituted document, tracking paths and collecting every error."""

    def __init__(self, environ: Mapping[str, str], base_dir: str) -> None:
        self.environ = environ
        self.base_dir = base_dir
        self.errors: list[str] = []
        self.env_paths: set[str] = set()  # values that had a ${NAME} substituted
        self.env_failed: set[str] = set()  # ...that failed: no follow-up errors for them
        self._memo: dict[int, Any] = {}
        self.providers: dict[str, ProviderConfig] = {}
        self.input_headers: dict[str, str] = {}  # header key -> path of its definition

    def err(self, path: str, message: str) -> None:
        if path not in self.env_failed:
            self.errors.append(f"{path or '(root)'}: {message}")

    # -- ${NAME} substitution -----------------------------------------------------------------
    def substitute(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            return self._expand(value, path) if "$" in value else value
        if not isinstance(value, dict | list):
            return value
        if id(value) in self._memo:  # YAML aliases: expand a shared node once (no blow-up)
            return self._memo[id(value)]
        if isinstance(value, list):
            out_list: list[Any] = []
            self._memo[id(value)] = out_list
            out_list.extend(self.substitute(v, f"{path}[{i}]") for i, v in enumerate(value))
            return out_list
        out: dict[Any, Any] = {}
        self._memo[id(value)] = out
        for k, v in value.items():
            out[k] = self.substitute(v, _key_path(path, k) if isinstance(k, str) else path)
        return out

    def _expand(self, text: str, path: str) -> str:
        used = False

        def replace(m: re.Match[str]) -> str:
            nonlocal used
            if m.group(0) == "$${":
                return "${"
            name = m.group(1)
            if name is None:
                self.err(path, "malformed '${' reference: write ${NAME} (letters, digits, _) "
                               "or '$${' for a literal '${'")
                failed.add(path)
                return m.group(0)
            used = True
            if name not in self.environ:
                self.err(path, f"environment variable '{name}' is not set")
                failed.add(path)
                return ""
            return self.environ[name]

        failed: set[str] = set()
        out = _ENV_RE.sub(replace, text)
        self.env_failed |= failed
        if used:
            self.env_paths.add(path)
        return out

    # -- generic getters: a raw value and its path in, the typed value or None (error) out ---
    def mapping(self, value: Any, path: str, keys: Collection[str] | None,
                required: Collection[str] = ()) -> dict[str, Any] | None:
        """A mapping with string keys; ``keys`` (unless None) lists every allowed key."""
        if not isinstance(value, dict):
            self.err(path, f"must be a mapping, got {_kind(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                self.err(path, f"keys must be strings, got {_kind(key)} {key!r}")
            elif keys is not None and key not in keys:
                self.err(_key_path(path, key), f"unknown key '{key}'{_did_you_mean(key, keys)}")
        for key in required:
            if key not in value:
                self.err(_key_path(path, key), "required key is missing")
        return value

    def opt(self, m: Mapping[str, Any], key: str, path: str, default: T,
            parse: Callable[..., T | None], **kw: Any) -> T:
        """``m[key]`` parsed by ``parse`` if present and valid, else ``default``."""
        if key not in m:
            return default
        value = parse(m[key], _key_path(path, key), **kw)
        return default if value is None else value

    def _from_env(self, value: Any, path: str) -> Any:
        # A ${NAME} in a number/boolean position yields a string: read it as a YAML scalar.
        if isinstance(value, str) and path in self.env_paths:
            try:
                loaded = yaml.safe_load(value)
            except yaml.YAMLError:
                return value
            if isinstance(loaded, bool | int | float):
                return loaded
        return value

    def string(self, value: Any, path: str, *, empty: bool = False) -> str | None:
        if not isinstance(value, str):
            self.err(path, f"must be a string, got {_kind(value)}")
            return None
        if not value and not empty:
            self.err(path, "must not be empty")
            return None
        return value

    def integer(self, value: Any, path: str, lo: int = 0, hi: int | None = None) -> int | None:
        value = self._from_env(value, path)
        if not isinstance(value, int) or isinstance(value, bool):
            self.err(path, f"must be an integer, got {_kind(value)}")
        elif value < lo or (hi is not None and value > hi):
            self.err(path, f"must be between {lo} and {hi}" if hi is not None
                     else f"must be at least {lo}")
        else:
            return value
        return None

    def fraction(self, value: Any, path: str) -> float | None:
        value = self._from_env(value, path)
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.err(path, f"must be a number, got {_kind(value)}")
        elif not 0.0 <= value <= 1.0:
            self.err(path, "must be between 0 and 1")
        else:
            return float(value)
        return None

    def boolean(self, value: Any, path: str) -> bool | None:
        value = self._from_env(value, path)
        if isinstance(value, bool):
            return value
        self.err(path, f"must be true or false, got {_kind(value)}")
        return None

    def duration(self, value: Any, path: str, *, positive: bool = False,
                 hi: float | None = None) -> float | None:
        try:
            seconds = parse_duration(self._from_env(value, path))
        except ValueError as exc:
            self.err(path, str(exc))
            return None
        if positive and seconds <= 0:
            self.err(path, "must be greater than 0")
        elif hi is not None and seconds > hi:
            self.err(path, f"must be at most {_secs(hi)}, got {_secs(seconds)}")
        else:
            return seconds
        return None

    def choice(self, value: Any, path: str, options: tuple[str, ...]) -> str | None:
        if isinstance(value, str) and value in options:
            return value
        shown = repr(value) if isinstance(value, str) else _kind(value)
        self.err(path, f"must be one of {', '.join(options)}, got {shown}"
                 + (_did_you_mean(value, options) if isinstance(value, str) else ""))
        return None

    def names(self, value: Any, path: str, *, allow_empty: bool = False,
              pattern: re.Pattern[str] | None = None,
              what: str = "value") -> tuple[str, ...] | None:
        """A list of unique non-empty strings (optionally matching ``pattern``)."""
        if not isinstance(value, list):
            self.err(path, f"must be a list, got {_kind(value)}")
            return None
        if not value and not allow_empty:
            self.err(path, "must not be empty")
        out: list[str] = []
        for i, item in enumerate(value):
            s = self.string(item, f"{path}[{i}]")
            if s is None:
                continue
            if pattern is not None and not pattern.fullmatch(s):
                self.err(f"{path}[{i}]", f"invalid {what} {s!r}")
            elif s in out:
                self.err(f"{path}[{i}]", f"duplicate {what} {s!r}")
            out.append(s)
        return tuple(out)

    def networks(self, value: Any, path: str
                 ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """CIDR networks (or single addresses) of trusted proxies."""
        if not isinstance(value, list):
            self.err(path, f"must be a list of networks, got {_kind(value)}")
            return ()
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.err(f"{path}[{i}]", f"must be a network like 10.0.0.0/8, got {_kind(item)}")
                continue
            try:
                out.append(ipaddress.ip_network(item, strict=True))
            except ValueError as exc:
                self.err(f"{path}[{i}]", f"invalid network {item!r}: {exc}")
        return tuple(out)

    def address(self, value: Any, path: str) -> Address | None:
        if not isinstance(value, str):
            self.err(path, f"must be 'host:port', got {_kind(value)}")
            return None
        if m := re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", value):
            host, port = m.group(1), int(m.group(2))
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                self.err(path, f"invalid IPv6 address {host!r}")
                return None
        elif m := re.fullmatch(r"([^\s:/\[\]]+):(\d{1,5})", value):
            host, port = m.group(1), int(m.group(2))
        else:
            self.err(path, f"must be 'host:port' (IPv6 as '[::1]:9901'), got {value!r}")
            return None
        if port > 65535:
            self.err(path, f"port {port} is out of range 0-65535")
            return None
        return Address(host, port)

    def fetch_url(self, url: str, path: str) -> None:
        """A URL fastgate fetches keys from (jwks_uri, discovery issuer)."""
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            self.err(path, f"invalid port in {url!r}")
            return
        # Catalog H13: keys must come over TLS, else anyone on the path can swap them. Plain
        # http is allowed only to loopback, for tests and `fastgate demo`.
        if not parts.hostname or parts.scheme not in ("https", "http") or parts.fragment:
            self.err(path, f"must be an absolute https:// URL without a fragment, got {url!r}")
        elif parts.scheme == "http" and not _is_loopback(parts.hostname):
            self.err(path, "must use https (http is allowed only for 127.0.0.1, ::1 and "
                           "localhost)")

    def header_name(self, value: Any, path: str, taken: dict[str, str]) -> str | None:
        """A header fastgate writes: a valid, non-reserved name not already in ``taken``."""
        name = self.string(value, path)
        if name is None:
            return None
        lower = _header_key(name)
        if not _TOKEN_RE.fullmatch(name):
            self.err(path, f"invalid header name {name!r} (RFC 9110 §5.6.2 token)")
        elif lower in _RESERVED_HEADERS:
            self.err(path, f"header {name!r} is reserved and cannot carry claims")
        elif lower in taken:
            self.err(path, f"header {name!r} is already used by {taken[lower]}")
        else:
            taken[lower] = path
            return name
        return None

    # -- sections -------------------------------------------------------------------------------
    def gateway(self, data: Any, source: str | None) -> GatewayConfig | None:
        if data is None:
            self.err("", "the config is empty")
            return None
        m = self.mapping(data, "", _TOP_KEYS, required=("upstreams", "routes"))
        if m is None:
            return None
        d = GatewayConfig()
        listen = self.address(m["listen"], "listen") if "listen" in m else d.listen
        admin = d.admin
        if "admin" in m:
            admin = None if m["admin"] is None else self.address(m["admin"], "admin")
        if admin and listen and admin.port == listen.port and admin.port != 0:
            self.err("admin", "must not share the data-plane port "
                              f"(listen is {listen.host}:{listen.port})")
        workers = self.opt(m, "workers", "", d.workers, self.integer)
        limits = cache = access_log = None
        if "limits" in m and (lm := self.mapping(m["limits"], "limits", _field_names(Limits))):
            sizes = {k: self.opt(lm, k, "limits", getattr(d.limits, k), self.integer, lo=1)
                     for k in ("max_token_bytes", "max_header_bytes", "max_body_bytes",
                               "max_connections")}
            limits = Limits(**sizes, max_requests_per_connection=self.opt(
                lm, "max_requests_per_connection", "limits",
                d.limits.max_requests_per_connection, self.integer))
        timeouts = d.timeouts
        if "timeouts" in m and (tm := self.mapping(m["timeouts"], "timeouts",
                                                   _field_names(Timeouts))):
            timeouts = Timeouts(*(self.opt(tm, k, "timeouts", getattr(d.timeouts, k),
                                           self.duration, positive=True)
                                  for k in ("header", "keepalive", "send", "handshake")))
        trusted = self.networks(m["trusted_proxies"], "trusted_proxies") \
            if "trusted_proxies" in m else ()
        if "cache" in m and (cm := self.mapping(m["cache"], "cache", ("max_entries",))):
            cache = CacheConfig(self.opt(cm, "max_entries", "cache", d.cache.max_entries,
                                         self.integer))
        if "access_log" in m:
            access_log = self.access_log(m["access_log"], "access_log")
        upstreams = self.named(m["upstreams"], "upstreams", self.upstream) \
            if "upstreams" in m else {}
        providers = self.named(m.get("providers", {}), "providers", self.provider)
        self.providers = providers
        # Headers fastgate reads credentials from; no claim header may take one of these names
        # (the data plane strips every configured claim-header name from inbound requests).
        for pname, prov in providers.items():
            for i, src in enumerate(prov.token_from):
                if src.place == "header":
                    where = f"{_key_path('providers', pname)}.token_from[{i}]"
                    self.input_headers.setdefault(_header_key(src.name), where)
        declared_providers = m["providers"] if isinstance(m.get("providers"), dict) else {}
        api_keys = None
        if "api_keys" in m:  # a broken section still counts as present for the routes
            api_keys = self.api_keys(m["api_keys"], "api_keys") or ApiKeysConfig()
            if api_keys.header:
                self.input_headers[_header_key(api_keys.header)] = "api_keys.header"
        declared_upstreams = m["upstreams"] if isinstance(m.get("upstreams"), dict) else {}
        routes = self.routes(m["routes"], list(declared_upstreams), list(declared_providers),
                             api_keys) if "routes" in m else ()
        return GatewayConfig(
            listen=listen or d.listen, admin=admin,
            workers=workers,
            limits=limits or d.limits, timeouts=timeouts, trusted_proxies=trusted,
            cache=cache or d.cache,
            upstreams=upstreams, providers=providers, api_keys=api_keys, routes=routes,
            access_log=access_log or d.access_log,
            tracing=self.tracing(m["tracing"], "tracing") if "tracing" in m else d.tracing,
            metrics=self.opt(m, "metrics", "", d.metrics, self.boolean),
            drain_timeout=self.opt(m, "drain_timeout", "", d.drain_timeout, self.duration),
            log_format=cast(Literal["text", "json"], self.opt(
                m, "log_format", "", str(d.log_format), self.choice, options=("text", "json"))),
            tls=self.tls(m["tls"], "tls") if m.get("tls") is not None else None,
            replay_store=self.replay_store(m["replay_store"], "replay_store", workers, routes)
            if m.get("replay_store") is not None else self.replay_store({}, "replay_store",
                                                                         workers, routes),
            source=source,
        )

    def replay_store(self, value: Any, path: str, workers: int,
                     routes: tuple[RouteConfig, ...]) -> ReplayStoreConfig:
        d = ReplayStoreConfig()
        m = self.mapping(value, path, ("memory", "redis"))
        if m is None:
            return d
        if "memory" in m and "redis" in m:
            self.err(path, "needs one of memory, redis, not both")
        max_entries = d.max_entries
        if m.get("memory") is not None and (mm := self.mapping(
                m["memory"], f"{path}.memory", ("max_entries",))):
            max_entries = self.opt(mm, "max_entries", f"{path}.memory", d.max_entries,
                                   self.integer, lo=1)
        redis = None
        if m.get("redis") is not None:
            redis = self.redis_store(m["redis"], f"{path}.redis")
        elif workers != 1 and uses_replay_store(routes):
            self.err(path, SHARED_STORE_NEEDED)
        return ReplayStoreConfig(max_entries, redis)

    def redis_store(self, value: Any, path: str) -> RedisStoreConfig | None:
        m = self.mapping(value, path, _field_names(RedisStoreConfig), required=("url",))
        if m is None:
            return None
        d = RedisStoreConfig("")
        url = self.opt(m, "url", path, "", self.string)
        from fastgate.auth.replay import parse_redis_url  # the store's own parser: one rule

        try:
            if url:
                parse_redis_url(url)
        except ValueError as exc:  # never names the password
            why = str(exc).removeprefix("replay_store.redis.url: ")
            self.err(f"{path}.url", f"{why} (redis://[[user]:password@]host[:port][/db], "
                                    "rediss://... for TLS, or unix:///path)")
        return RedisStoreConfig(
            url,
            self.opt(m, "key_prefix", path, d.key_prefix, self.string, empty=True),
            self.opt(m, "timeout", path, d.timeout, self.duration, positive=True, hi=10.0),
            cast(Literal["fail_closed", "fail_open"], self.opt(
                m, "on_error", path, str(d.on_error), self.choice,
                options=("fail_closed", "fail_open"))))

    def dpop(self, value: Any, path: str) -> DpopConfig | None:
        d = DpopConfig()
        m = self.mapping(value, path, _field_names(DpopConfig))
        if m is None:
            return None
        algorithms = self.opt(m, "algorithms", path, d.algorithms, self.algorithms)
        for i, alg in enumerate(algorithms):
            if alg in _HMAC_MIN_BYTES:
                # RFC 9449 §4.3 check 5: the proof's alg is asymmetric.
                self.err(f"{path}.algorithms[{i}]", f"{alg} is symmetric; a DPoP proof is "
                                                    "signed with the client's private key")
        external = self.opt(m, "external_url", path, None, self.string)
        if external is not None:
            parts = urlsplit(external)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
                    or parts.fragment or parts.username is not None or \
                    parts.path not in ("", "/"):
                self.err(f"{path}.external_url", "must be scheme://host[:port] (what clients "
                                                 f"put in htu, without a path), got "
                                                 f"{external!r}")
        return DpopConfig(
            cast(Literal["allowed", "required"], self.opt(
                m, "mode", path, str(d.mode), self.choice, options=("allowed", "required"))),
            algorithms,
            self.opt(m, "max_age", path, d.max_age, self.duration, positive=True, hi=3600.0),
            self.opt(m, "clock_skew", path, d.clock_skew, self.duration, hi=_MAX_CLOCK_SKEW),
            self.opt(m, "nonce", path, d.nonce, self.boolean),
            external.rstrip("/") if external else None)

    def named(self, value: Any, path: str,
              parse: Callable[[str, Any, str], T | None]) -> dict[str, T]:
        """A mapping name -> section (upstreams, providers)."""
        out: dict[str, T] = {}
        if (m := self.mapping(value, path, None)) is None:
            return out
        if not m and path == "upstreams":
            self.err(path, "at least one upstream is required")
        for name, raw in m.items():
            if isinstance(name, str) and (item := parse(name, raw, _key_path(path, name))):
                out[name] = item
        return out

    def upstream(self, name: str, value: Any, path: str) -> UpstreamConfig | None:
        m = self.mapping(value, path, _field_names(UpstreamConfig) - {"name"}, required=("url",))
        if m is None:
            return None
        d = UpstreamConfig(name, "")
        url = self.upstream_url(m["url"], f"{path}.url") if "url" in m else None
        timeouts = [self.opt(m, k, path, getattr(d, k), self.duration, positive=True)
                    for k in ("connect_timeout", "read_timeout")]
        max_conn = self.opt(m, "max_connections", path, d.max_connections, self.integer, lo=1)
        tls = None
        if m.get("tls") is not None:
            tls = self.upstream_tls(m["tls"], f"{path}.tls")
            if url is not None and not url.startswith("https://"):
                self.err(f"{path}.tls", "is only for https:// upstream URLs")
        return UpstreamConfig(name, url or "", timeouts[0], timeouts[1], max_conn, tls)

    def upstream_url(self, value: Any, path: str) -> str | None:
        """Normalized to http(s)://host:port[/base] (explicit port, no trailing slash); the
        default port is 80 for http and 443 for https (RFC 9110 §4.2.1, §4.2.2)."""
        url = self.string(value, path)
        if url is None:
            return None
        parts = urlsplit(url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            self.err(path, f"invalid port in {url!r}")
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self.err(path, f"must be http://host:port[/path] or https://host:port[/path], "
                           f"got {url!r}")
        elif parts.query or parts.fragment or parts.username is not None:
            self.err(path, "must not contain credentials, a query or a fragment")
        else:
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            return f"{parts.scheme}://{host}:{port}{parts.path.rstrip('/')}"
        return None

    def upstream_tls(self, value: Any, path: str) -> UpstreamTlsConfig | None:
        """``upstreams.NAME.tls``: how the https upstream is verified (RFC 9110 §4.3.4)."""
        m = self.mapping(value, path, _field_names(UpstreamTlsConfig))
        if m is None:
            return None
        ca_file = self.opt(m, "ca_file", path, None, self.pem_path)
        if ca_file is not None and (ca_problem := certs.check_ca_file(ca_file)):
            self.err(f"{path}.ca_file", ca_problem)
        server_name = self.opt(m, "server_name", path, None, self.server_name)
        cert = self.opt(m, "cert", path, None, self.pem_path)
        key = self.opt(m, "key", path, None, self.pem_path)
        if ("cert" in m) != ("key" in m):
            missing = "key" if "cert" in m else "cert"
            self.err(f"{path}.{missing}", "required key is missing (a client certificate needs "
                                          "both cert and key)")
        elif cert is not None and key is not None:
            for which, problem in certs.check_certificate(cert, key):
                self.err(f"{path}.{which}", problem)
        return UpstreamTlsConfig(ca_file=ca_file, server_name=server_name, cert=cert, key=key,
                                 verify=self.opt(m, "verify", path, True, self.boolean))

    def tls(self, value: Any, path: str) -> TlsConfig | None:
        """``tls``: TLS on ``listen`` (RFC 8446, RFC 5246); certificates chosen by SNI."""
        m = self.mapping(value, path, _field_names(TlsConfig), required=("certificates",))
        if m is None:
            return None
        certificates: list[TlsCertificate] = []
        claimed: dict[str, str] = {}  # server name -> path of the certificate that claims it
        raw = m.get("certificates")
        if "certificates" in m and not isinstance(raw, list):
            self.err(f"{path}.certificates", "must be a list of {cert, key[, server_names]}, "
                                             f"got {_kind(raw)}")
        elif isinstance(raw, list) and not raw:
            self.err(f"{path}.certificates", "must not be empty")
        for i, item in enumerate(raw if isinstance(raw, list) else ()):
            cpath = f"{path}.certificates[{i}]"
            c = self.mapping(item, cpath, _field_names(TlsCertificate),
                             required=("cert", "key"))
            if c is None:
                continue
            cert = self.opt(c, "cert", cpath, None, self.pem_path)
            key = self.opt(c, "key", cpath, None, self.pem_path)
            if cert is not None and key is not None:
                for which, problem in certs.check_certificate(cert, key):
                    self.err(f"{cpath}.{which}", problem)
            names: tuple[str, ...] = ()
            if "server_names" in c:
                listed = self.names(c["server_names"], f"{cpath}.server_names",
                                    what="server name") or ()
                names = tuple(n.lower() for n in listed)
                for j, name in enumerate(names):
                    npath = f"{cpath}.server_names[{j}]"
                    if not certs.valid_server_name(name, wildcard=True):
                        self.err(npath, f"invalid server name {name!r}: a DNS name, optionally "
                                        "starting with '*.' (RFC 6066 §3: no IP addresses)")
                    elif name in claimed:
                        self.err(npath, f"server name {name!r} is already served by "
                                        f"{claimed[name]}")
                    else:
                        claimed[name] = cpath
            if cert is not None and key is not None:
                certificates.append(TlsCertificate(cert, key, names))
        min_version = "1.2"
        if "min_version" in m:
            raw_version = self._from_env(m["min_version"], f"{path}.min_version")
            if isinstance(raw_version, float) and raw_version in (1.2, 1.3):
                raw_version = str(raw_version)  # `min_version: 1.3` unquoted is a YAML float
            min_version = self.choice(raw_version, f"{path}.min_version", ("1.2", "1.3")) \
                or "1.2"
        client_ca = self.opt(m, "client_ca", path, None, self.pem_path)
        if client_ca is not None and (ca_problem := certs.check_ca_file(client_ca)):
            self.err(f"{path}.client_ca", ca_problem)
        client_auth = self.opt(m, "client_auth", path, "none", self.choice,
                               options=("none", "optional", "required"))
        if client_auth != "none" and "client_ca" not in m:
            self.err(f"{path}.client_ca", f"required key is missing (client_auth: {client_auth} "
                                          "verifies client certificates against this CA file)")
        if not certificates:
            return None
        return TlsConfig(certificates=tuple(certificates),
                         min_version=cast(TlsVersion, min_version), client_ca=client_ca,
                         client_auth=cast(ClientAuth, client_auth))

    def pem_path(self, value: Any, path: str) -> str | None:
        """A PEM file (certificate, key or CA bundle): absolute, relative to the config file,
        and readable now. abspath, not realpath: a Kubernetes secret mount swaps a symlink."""
        full, readable = self.readable_file(value, path)
        return full if readable else None

    def readable_file(self, value: Any, path: str) -> tuple[str | None, bool]:
        """``(absolute path, readable now)``: relative to the config file; abspath, not
        realpath, so a symlink swapped by a secret mount (Kubernetes ..data) is followed
        again on every reload."""
        text = self.string(value, path)
        if text is None:
            return None, False
        full = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(text)))
        try:
            with open(full, "rb"):
                pass
        except OSError as exc:
            self.err(path, f"cannot read {full!r}: {exc.strerror or exc}")
            return full, False
        return full, True

    def server_name(self, value: Any, path: str) -> str | None:
        name = self.string(value, path)
        if name is None:
            return None
        if not certs.valid_server_name(name.lower(), wildcard=False):
            self.err(path, f"invalid server name {name!r}: a DNS name (RFC 6066 §3)")
            return None
        return name.lower()

    def provider(self, name: str, value: Any, path: str) -> ProviderConfig | None:
        m = self.mapping(value, path, _PROVIDER_KEYS, required=("issuer",))
        if m is None:
            return None
        issuer = self.string(m["issuer"], f"{path}.issuer") if "issuer" in m else None
        discovery = self.opt(m, "discovery", path, False, self.boolean)
        given = [k for k in _KEY_SOURCES if (discovery if k == "discovery" else k in m)]
        if len(given) != 1:
            self.err(path, "exactly one key source is required (discovery: true, jwks_uri, "
                     "jwks_file, jwks or secret); "
                     + (f"got {', '.join(given)}" if given else "none given"))
        kind = cast(KeySourceKind, given[0] if given else "jwks")
        if discovery and issuer:
            self.fetch_url(issuer, f"{path}.issuer")
        jwks_uri = self.opt(m, "jwks_uri", path, None, self.string)
        if jwks_uri:
            self.fetch_url(jwks_uri, f"{path}.jwks_uri")
        jwks_file = self.opt(m, "jwks_file", path, None, self.jwks_file)
        jwks = self.opt(m, "jwks", path, None, self.inline_jwks)
        secret_text = self.opt(m, "secret", path, None, self.string)
        secret = secret_text.encode() if secret_text is not None else None
        algorithms = self.opt(m, "algorithms", path, None, self.algorithms)
        self.check_algorithms(kind, algorithms, secret, path, given)
        audiences = self.opt(m, "audiences", path, _NONE, self.names, what="audience")
        jwks_cache = self.opt(m, "jwks_cache", path, JwksCacheConfig(), self.jwks_cache)
        max_lifetime = None
        if m.get("max_lifetime") is not None:
            max_lifetime = self.duration(m["max_lifetime"], f"{path}.max_lifetime", positive=True)
        typ = self.opt(m, "typ", path, None, self.typ_values)
        return ProviderConfig(
            name=name, issuer=issuer or "", key_source=kind, jwks_uri=jwks_uri,
            jwks_file=jwks_file, jwks=jwks, secret=secret, audiences=audiences,
            algorithms=algorithms,
            clock_skew=self.opt(m, "clock_skew", path, 60.0, self.duration, hi=_MAX_CLOCK_SKEW),
            require=self.opt(m, "require", path, ("exp",), self.names, allow_empty=True,
                             what="claim name"),
            max_lifetime=max_lifetime, typ=typ, jwks_cache=jwks_cache,
            token_from=self.opt(m, "token_from", path, DEFAULT_TOKEN_FROM, self.token_from),
        )

    def typ_values(self, value: Any, path: str) -> tuple[str, ...] | None:
        """``providers.*.typ``: media types (RFC 6838 §4.2), "application/" optional and
        case-insensitive (RFC 7515 §4.1.9); two spellings of one type are a duplicate."""
        values = self.names(value, path, what="typ")
        if values is None:
            return None
        seen: dict[str, str] = {}
        bad = False
        for i, item in enumerate(values):
            low = item.lower()
            full = low if "/" in low else f"application/{low}"
            if not _TYP_RE.fullmatch(full):
                self.err(f"{path}[{i}]", f"invalid typ {item!r}: a media type such as 'at+jwt' "
                         "or 'application/at+jwt' (RFC 9068 §2.1)")
                bad = True
            elif full in seen and seen[full] != item:
                self.err(f"{path}[{i}]", f"duplicate typ {item!r} (the same type as "
                         f"{seen[full]!r}: case and the 'application/' prefix do not count)")
                bad = True
            seen.setdefault(full, item)
        return None if bad or not values else values

    def jwks_file(self, value: Any, path: str) -> str | None:
        return self.readable_file(value, path)[0]

    def inline_jwks(self, value: Any, path: str) -> dict[str, Any] | None:
        m = self.mapping(value, path, None, required=("keys",))
        if m is None or not isinstance(keys := m.get("keys"), list):
            if m is not None and "keys" in m:
                self.err(f"{path}.keys", f"must be a list, got {_kind(m['keys'])}")
            return None
        for i, key in enumerate(keys):
            if not isinstance(key, dict):
                self.err(f"{path}.keys[{i}]", f"must be a mapping (a JWK), got {_kind(key)}")
        return m

    def algorithms(self, value: Any, path: str) -> tuple[str, ...] | None:
        from fastgate.token._verify import SUPPORTED_ALGORITHMS  # lazy: the compiled module

        algs = self.names(value, path, what="algorithm")
        bad = False
        for i, alg in enumerate(algs or ()):
            if alg.lower() == "none":  # RFC 8725 §3.1: never accept unsigned tokens
                self.err(f"{path}[{i}]", "'none' is never allowed")
            elif alg not in SUPPORTED_ALGORITHMS:
                self.err(f"{path}[{i}]", f"unsupported algorithm {alg!r}"
                         + _did_you_mean(alg, sorted(SUPPORTED_ALGORITHMS)))
            else:
                continue
            bad = True
        return None if bad else algs

    def check_algorithms(self, kind: KeySourceKind, algorithms: tuple[str, ...] | None,
                         secret: bytes | None, path: str, given: list[str]) -> None:
        hmac = [a for a in algorithms or () if a in _HMAC_MIN_BYTES]
        asym = [a for a in algorithms or () if a not in _HMAC_MIN_BYTES]
        # RFC 8725 §3.1 / catalog B3: HMAC only with a configured secret, never beside
        # asymmetric algs (that is the key-confusion attack).
        if kind == "secret" and asym:
            self.err(f"{path}.algorithms", f"{', '.join(asym)} cannot be used with a secret "
                                           "(a secret allows HS256, HS384, HS512 only)")
        elif kind != "secret" and hmac and given:
            self.err(f"{path}.algorithms", f"{', '.join(hmac)} allowed only with a `secret` "
                                           "key source")
        if kind == "secret" and secret is not None:
            needed = max(hmac or ["HS256"], key=_HMAC_MIN_BYTES.__getitem__)
            if len(secret) < _HMAC_MIN_BYTES[needed]:
                self.err(f"{path}.secret", f"secret is {len(secret)} bytes; {needed} needs at "
                         f"least {_HMAC_MIN_BYTES[needed]} bytes (RFC 7518 §3.2)")

    def jwks_cache(self, value: Any, path: str) -> JwksCacheConfig | None:
        m = self.mapping(value, path, _field_names(JwksCacheConfig))
        if m is None:
            return None
        d = JwksCacheConfig()
        ttl, refresh, timeout = (self.opt(m, k, path, getattr(d, k), self.duration, positive=True)
                                 for k in ("ttl", "min_refresh_interval", "timeout"))
        max_stale = self.opt(m, "max_stale", path, d.max_stale, self.duration)
        min_ttl = self.opt(m, "min_ttl", path, min(d.min_ttl, ttl), self.duration, positive=True)
        if min_ttl > ttl:
            self.err(f"{path}.min_ttl", f"must not exceed ttl ({_secs(ttl)})")
        if ttl < refresh:
            self.err(f"{path}.ttl", f"must be at least min_refresh_interval ({_secs(refresh)})")
        if max_stale < ttl:
            self.err(f"{path}.max_stale", f"must be at least ttl ({_secs(ttl)})")
        max_bytes = self.opt(m, "max_bytes", path, d.max_bytes, self.integer, lo=1)
        return JwksCacheConfig(ttl, min_ttl, refresh, max_stale, timeout, max_bytes)

    def token_from(self, value: Any, path: str) -> tuple[TokenSource, ...] | None:
        if not isinstance(value, list) or not value:
            self.err(path, "must be a non-empty list" + (
                "" if isinstance(value, list) else f", got {_kind(value)}"))
            return None
        out: list[TokenSource] = []
        for i, raw in enumerate(value):
            p = f"{path}[{i}]"
            m = self.mapping(raw, p, ("header", "prefix", "query", "cookie"))
            if m is None:
                continue
            places = [k for k in ("header", "query", "cookie") if k in m]
            if len(places) != 1:
                self.err(p, "exactly one of header, query or cookie is required; got "
                         + (", ".join(places) or "none"))
                continue
            place: TokenPlace = places[0]
            name = self.string(m[place], f"{p}.{place}")
            if name and place != "query" and not _TOKEN_RE.fullmatch(name):
                self.err(f"{p}.{place}", f"invalid {place} name {name!r}")
            if "prefix" in m and place != "header":
                self.err(f"{p}.prefix", "prefix applies to a header only")
            prefix = self.opt(m, "prefix", p, "", self.string, empty=True)
            source = TokenSource(place, name or "", prefix)
            fold = _header_key if place == "header" else str
            if any(s.place == place and fold(s.name) == fold(source.name) for s in out):
                self.err(p, f"duplicate token source {place} {source.name!r}")
            out.append(source)
        return tuple(out)

    def api_keys(self, value: Any, path: str) -> ApiKeysConfig | None:
        m = self.mapping(value, path, ("header", "query", "keys"), required=("keys",))
        if m is None:
            return None
        header = self.opt(m, "header", path, None, self.string)
        if header and not _TOKEN_RE.fullmatch(header):
            self.err(f"{path}.header", f"invalid header name {header!r}")
        query = self.opt(m, "query", path, None, self.string)
        if "header" not in m and "query" not in m:
            self.err(path, "needs header and/or query (where clients send the key)")
        keys: list[ApiKey] = []
        ids: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        raw_keys = m.get("keys", [])
        if "keys" in m and (not isinstance(raw_keys, list) or not raw_keys):
            self.err(f"{path}.keys", "must be a non-empty list")
            raw_keys = []
        for i, raw in enumerate(raw_keys):
            p = f"{path}.keys[{i}]"
            k = self.mapping(raw, p, ("id", "sha256", "client_id"), required=("id", "sha256"))
            if k is None:
                continue
            key_id = self.opt(k, "id", p, "", self.string)
            if key_id in ids:
                self.err(f"{p}.id", f"duplicate key id {key_id!r} (also keys[{ids[key_id]}])")
            ids.setdefault(key_id, i)
            digest = self.opt(k, "sha256", p, "", self.string)
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                if "sha256" in k:
                    self.err(f"{p}.sha256", "must be 64 hex characters (a SHA-256 digest)")
                continue
            sha = bytes.fromhex(digest)
            if sha in digests:
                self.err(f"{p}.sha256", f"same key as keys[{digests[sha]}]")
            digests.setdefault(sha, i)
            keys.append(ApiKey(key_id, sha, self.opt(k, "client_id", p, None, self.string)))
        return ApiKeysConfig(header, query, tuple(keys))

    def routes(self, value: Any, upstreams: list[str], providers: list[str],
               api_keys: ApiKeysConfig | None) -> tuple[RouteConfig, ...]:
        if not isinstance(value, list) or not value:
            self.err("routes", "must be a non-empty list" + (
                "" if isinstance(value, list) else f", got {_kind(value)}"))
            return ()
        out: list[RouteConfig] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(value):
            p = f"routes[{i}]"
            if isinstance(raw, dict) and isinstance(name := raw.get("name"), str):
                if name in seen:
                    self.err(f"{p}.name", f"duplicate route name {name!r} (also "
                                          f"routes[{seen[name]}])")
                seen.setdefault(name, i)
            route = self.route(raw, p, upstreams, providers, api_keys)
            if route is not None:
                out.append(route)
        return tuple(out)

    def route(self, value: Any, path: str, upstreams: list[str], providers: list[str],
              api_keys: ApiKeysConfig | None) -> RouteConfig | None:
        m = self.mapping(value, path, _ROUTE_KEYS, required=("name", "match", "upstream", "auth"))
        if m is None:
            return None
        name = self.opt(m, "name", path, "", self.string)
        match = self.opt(m, "match", path, None, self.match)
        upstream = self.opt(m, "upstream", path, "", self.string)
        if upstream and upstream not in upstreams:
            self.err(f"{path}.upstream", f"unknown upstream {upstream!r}"
                     + _did_you_mean(upstream, upstreams))
        strip = self.opt(m, "strip_prefix", path, False, self.boolean)
        if strip and match is not None and match.path_prefix is None:
            self.err(f"{path}.strip_prefix", "needs match.path_prefix")
        auth: AuthConfig | None = None
        if m.get("auth") != "none" and "auth" in m:
            if isinstance(m["auth"], str):
                self.err(f"{path}.auth", f"must be 'none' or a mapping, got {m['auth']!r}")
            else:
                auth = self.auth(m["auth"], f"{path}.auth", providers, api_keys)
        return RouteConfig(name, match or RouteMatch(), upstream, strip, auth)

    def match(self, value: Any, path: str) -> RouteMatch | None:
        m = self.mapping(value, path, _field_names(RouteMatch))
        if m is None:
            return None
        paths = {}
        for key in ("path", "path_prefix"):
            text = self.opt(m, key, path, None, self.string)
            if text is not None and (not text.startswith("/") or "?" in text or "#" in text):
                self.err(f"{path}.{key}", f"must start with '/' and have no query, got {text!r}")
            paths[key] = text
        regex = self.opt(m, "path_regex", path, None, self.string)
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                self.err(f"{path}.path_regex", f"invalid regular expression: {exc}")
        methods = self.opt(m, "methods", path, None, self.names, pattern=_TOKEN_RE,
                           what="method")
        host = self.opt(m, "host", path, None, self.string)
        if host is not None and not re.fullmatch(r"[^\s/:\[\]]+|\[[0-9A-Fa-f:.]+\]", host):
            self.err(f"{path}.host", f"must be a host name without a port, got {host!r}")
        kinds = [k for k in ("path", "path_prefix", "path_regex") if k in m]
        if len(kinds) > 1:
            self.err(path, f"only one of path, path_prefix, path_regex is allowed; got "
                     f"{', '.join(kinds)}")
        elif not kinds and "host" not in m:
            self.err(path, "needs at least one of path, path_prefix, path_regex or host")
        upper = tuple(dict.fromkeys(x.upper() for x in methods)) if methods else None
        if methods and upper and len(upper) != len(methods):
            self.err(f"{path}.methods", "duplicate method (methods are case-insensitive)")
        return RouteMatch(paths["path"], paths["path_prefix"], regex, upper,
                          host.lower() if host else None)

    def auth(self, value: Any, path: str, providers: list[str],
             api_keys: ApiKeysConfig | None) -> AuthConfig | None:
        m = self.mapping(value, path, _AUTH_KEYS, required=("providers",))
        if m is None:
            return None
        names = self.opt(m, "providers", path, _NONE, self.names, what="provider")
        issuers: dict[str, str] = {}
        for i, name in enumerate(names):
            if name not in providers:
                self.err(f"{path}.providers[{i}]", f"unknown provider {name!r}"
                         + _did_you_mean(name, providers))
            elif (prov := self.providers.get(name)) and prov.issuer in issuers:
                # SPEC §3 step 3: the token's iss selects the provider; one issuer twice on a
                # route would make that choice ambiguous.
                self.err(f"{path}.providers[{i}]", f"provider {name!r} has the same issuer as "
                         f"{issuers[prov.issuer]!r}")
            elif prov:
                issuers[prov.issuer] = name
        scopes: ScopeRule | None = None
        s = self.mapping(m["scopes"], f"{path}.scopes", ("all", "any")) if "scopes" in m else None
        if s is not None:
            if len(s) != 1:
                self.err(f"{path}.scopes", "needs exactly one of all, any")
            for mode in s.keys() & {"all", "any"}:
                listed = self.names(s[mode], f"{path}.scopes.{mode}", pattern=_SCOPE_RE,
                                    what="scope")
                scopes = ScopeRule(cast(Literal["any", "all"], mode), listed or ())
        api_key = self.opt(m, "api_key", path, None, self.api_key_rule)
        if api_key is not None and api_keys is None:
            self.err(f"{path}.api_key", "needs a top-level api_keys section with keys")
        taken = dict(self.input_headers)  # names fastgate writes must not collide with these
        headers: list[ClaimHeader] = []
        if "claim_headers" in m:
            p = f"{path}.claim_headers"
            for header, claim in (self.mapping(m["claim_headers"], p, None) or {}).items():
                hp = _key_path(p, header)
                name_ok = self.header_name(header, hp, taken)
                if isinstance(claim, str) and ("{" in claim or "}" in claim):
                    template = self.claim_template(claim, hp)
                    if name_ok and template:
                        headers.append(ClaimHeader(name_ok, (), template))
                    continue
                claim_path = self.claim_path(claim, hp)
                if name_ok and claim_path:
                    headers.append(ClaimHeader(name_ok, claim_path))
        payload_header = self.opt(m, "payload_header", path, None, self.header_name, taken=taken)
        return AuthConfig(
            providers=names,
            mode=cast(Literal["any", "all"],
                      self.opt(m, "mode", path, "any", self.choice, options=("any", "all"))),
            audiences=self.opt(m, "audiences", path, None, self.names, what="audience"),
            scopes=scopes,
            claims=self.opt(m, "claims", path, (), self.claim_rules),
            api_key=api_key,
            allow_missing=self.opt(m, "allow_missing", path, False, self.boolean),
            forward_token=self.opt(m, "forward_token", path, True, self.boolean),
            claim_headers=tuple(headers),
            payload_header=payload_header,
            failure_status=self.opt(m, "failure_status", path, None, self.integer, lo=400,
                                    hi=499),
            hide_reasons=self.opt(m, "hide_reasons", path, False, self.boolean),
            cors_preflight=cast(Literal["bypass", "auth"], self.opt(
                m, "cors_preflight", path, "auth", self.choice, options=("bypass",))),
            certificate_bound=self.opt(m, "certificate_bound", path, False, self.boolean),
            dpop=self.dpop(m["dpop"], f"{path}.dpop") if m.get("dpop") is not None else None,
            one_time=self.one_time(m, path, names),
        )

    def one_time(self, m: Mapping[str, Any], path: str, names: tuple[str, ...]) -> bool:
        if not self.opt(m, "one_time", path, False, self.boolean):
            return False
        for name in names:
            prov = self.providers.get(name)
            if prov is not None and prov.max_lifetime is None:
                # RFC 7523 §3 item 7: a jti is remembered until the token expires; without a
                # lifetime bound an exp far ahead would pin it in the store for that long.
                self.err(f"{path}.one_time", f"needs max_lifetime on provider {name!r} (it "
                                             "bounds how long a used jti is remembered)")
        return True

    def claim_template(self, value: str, path: str) -> ClaimTemplate | None:
        try:
            return parse_claim_template(value)
        except ValueError as exc:
            self.err(path, f"invalid claim template {value!r}: {exc}")
            return None

    def claim_path(self, value: Any, path: str) -> ClaimPath | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            return parse_claim_path(text)
        except ValueError as exc:
            self.err(path, f"invalid claim path {text!r}: {exc}")
            return None

    def claim_rules(self, value: Any, path: str) -> tuple[ClaimRule, ...] | None:
        rules: list[ClaimRule] = []
        for claim, raw in (self.mapping(value, path, None) or {}).items():
            p = _key_path(path, claim)
            claim_path = self.claim_path(claim, p)
            m = self.mapping(raw, p, _CLAIM_OPS)
            if m is None or claim_path is None:
                continue
            ops = [op for op in _CLAIM_OPS if op in m]
            if len(ops) != 1:
                self.err(p, "needs exactly one of equals, one_of, contains, present; got "
                         + (", ".join(ops) or "none"))
                continue
            op, arg, ap = ops[0], m[ops[0]], f"{p}.{ops[0]}"
            if op == "present":
                rules.append(ClaimRule(claim_path, op, self.boolean(arg, ap)))
            elif op == "one_of":
                if not isinstance(arg, list) or not arg:
                    self.err(ap, "must be a non-empty list")
                    continue
                for i, item in enumerate(arg):
                    self.scalar(item, f"{ap}[{i}]")
                rules.append(ClaimRule(claim_path, op, tuple(arg)))
            else:
                rules.append(ClaimRule(claim_path, op, self.scalar(arg, ap)))
        return tuple(rules)

    def scalar(self, value: Any, path: str) -> Any:
        if isinstance(value, str | int | float) and not (
                isinstance(value, float) and not math.isfinite(value)):
            return value
        self.err(path, f"must be a string, number or boolean, got {_kind(value)}")
        return None

    def api_key_rule(self, value: Any, path: str) -> ApiKeyRule | None:
        m = self.mapping(value, path, ("required", "bind_claim"))
        if m is None:
            return None
        bind = self.claim_path(m["bind_claim"], f"{path}.bind_claim") if "bind_claim" in m \
            else None
        return ApiKeyRule(self.opt(m, "required", path, True, self.boolean), bind)

    def tracing(self, value: Any, path: str) -> TracingConfig:
        d = TracingConfig()
        m = self.mapping(value, path, _field_names(TracingConfig))
        if m is None:
            return d
        mode: str = self.opt(m, "traceparent", path, str(d.traceparent), self.choice,
                             options=("pass", "create"))
        otel = self.otel(m["otel"], _key_path(path, "otel")) if "otel" in m else d.otel
        return TracingConfig(self.opt(m, "request_id", path, d.request_id, self.boolean),
                             cast(Literal["pass", "create"], mode), otel)

    def otel(self, value: Any, path: str) -> OtelConfig:
        d = OtelConfig()
        m = self.mapping(value, path, _field_names(OtelConfig))
        if m is None:
            return d
        endpoint = self.opt(m, "endpoint", path, d.endpoint, self.string)
        parts = urlsplit(endpoint)
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            self.err(_key_path(path, "endpoint"), f"invalid port in {endpoint!r}")
        # Plain http is allowed anywhere: spans carry no token (never the query string), and
        # collectors usually listen on a sidecar or node-local address without TLS.
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
            self.err(_key_path(path, "endpoint"),
                     f"must be an absolute http:// or https:// URL, got {endpoint!r}")
        enabled = self.opt(m, "enabled", path, d.enabled, self.boolean)
        if enabled and not _otel_installed():
            # Said at load time, so `fastgate check` catches it before a deploy does.
            self.err(_key_path(path, "enabled"), "needs the OpenTelemetry packages: "
                                                 "pip install 'fastgate[otel]'")
        return OtelConfig(enabled, self.opt(m, "sample", path, d.sample, self.fraction),
                          endpoint,
                          self.opt(m, "service_name", path, d.service_name, self.string))

    def access_log(self, value: Any, path: str) -> AccessLogConfig | None:
        m = self.mapping(value, path, _field_names(AccessLogConfig))
        if m is None:
            return None
        log_path = None
        if m.get("path") is not None:
            log_path = self.string(m["path"], f"{path}.path")
        return AccessLogConfig(self.opt(m, "enabled", path, True, self.boolean),
                               self.opt(m, "sample", path, 1.0, self.fraction), log_path)


def _otel_installed() -> bool:
    """Whether the `otel` extra's packages can be imported (looked up, not imported)."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(name) is not None for name in (
            "opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"))
    except (ImportError, ValueError):  # a parent package missing or half-installed
        return False


def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))
