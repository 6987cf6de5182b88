"""The configuration's JSON Schema (draft 2020-12) for editors: ``fastgate schema`` (SPEC §8).

An editor with the YAML language server validates and completes ``gateway.yaml`` from it:

    # yaml-language-server: $schema=./fastgate.config.schema.json

The loader (fastgate.config.loader and the section walkers) stays the authority: it reports
every error at once with its path and a "did you mean", checks what a schema cannot (files
readable, certificates matching their keys, provider names a route refers to) and builds the
frozen model. The schema mirrors its key sets and defaults — defaults are read from the
config dataclasses, and tests/config/test_schema.py proves both ways that every key the loader
accepts is here and nothing else is, and that every shipped example and documented snippet
validates.

Strings may carry ``${NAME}`` (SPEC §2); a number or boolean written as ``${NAME}`` is accepted
where the loader accepts it.
"""

from __future__ import annotations

from typing import Any, Final

from fastgate import config as c

__all__ = ["SCHEMA_ID", "schema"]

SCHEMA_ID: Final = "https://fastgate.dev/schema/gateway.json"
DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

J = dict[str, Any]

_ENV_REF = r"\$\{[A-Za-z_][A-Za-z0-9_]*\}"
# parse_duration: a bare number or <number><unit> parts (ms, s, m, h, d), e.g. 500ms, 1h30m.
_DURATION_RE = r"^(\d+(\.\d+)?|(\d+(\.\d+)?(ms|s|m|h|d))+)$"


def _env(inner: J) -> J:
    """``inner`` or a string holding a ``${NAME}`` reference (resolved at load time)."""
    return {"anyOf": [inner, {"type": "string", "pattern": _ENV_REF}]}


def _s(description: str, **kw: Any) -> J:
    if "pattern" in kw:  # a ${NAME} reference is checked once substituted, by the loader
        kw["pattern"] = f"(?:{kw['pattern']})|{_ENV_REF}"
    return {"type": "string", "description": description, **kw}


def _int(description: str, default: int | None = None, minimum: int = 0,
         maximum: int | None = None) -> J:
    out: J = {"description": description, **_env({"type": "integer", "minimum": minimum,
                                                   **({"maximum": maximum} if maximum else {})})}
    if default is not None:
        out["default"] = default
    return out


def _bool(description: str, default: bool | None = None) -> J:
    out: J = {"description": description, **_env({"type": "boolean"})}
    if default is not None:
        out["default"] = default
    return out


def _duration(description: str, default: float | None = None) -> J:
    out: J = {"description": description + " Seconds, or a string such as 500ms, 30s, 10m, "
                                           "24h, 1h30m.",
              "$ref": "#/$defs/duration"}
    if default is not None:
        out["default"] = int(default) if float(default).is_integer() else default
    return out


def _names(description: str, **items: Any) -> J:
    return {"type": "array", "description": description,
            "items": {"type": "string", "minLength": 1, **items}, "uniqueItems": True}


def _obj(description: str, properties: J, required: tuple[str, ...] = ()) -> J:
    out: J = {"type": "object", "description": description, "properties": properties,
              "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


def _address(description: str, default: str | None) -> J:
    out = _s(description + " 'host:port'; IPv6 as '[::1]:9901'.",
             pattern=r"^(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}$")
    if default is not None:
        out["default"] = default
    return out


def _limits() -> J:
    d = c.Limits()
    return _obj("Size and connection limits of the data plane.", {
        "max_token_bytes": _int("A longer token is rejected (token_too_large) before any "
                                "decoding.", d.max_token_bytes, 1),
        "max_header_bytes": _int("Request head size limit (431 beyond it).",
                                 d.max_header_bytes, 1),
        "max_body_bytes": _int("Request body size limit (413 beyond it).", d.max_body_bytes, 1),
        "max_connections": _int("Client connections per worker.", d.max_connections, 1),
        "max_requests_per_connection": _int(
            "Close a keep-alive connection after this many requests (RFC 9112 §9.6); "
            "0 = unlimited.", d.max_requests_per_connection),
    })


def _timeouts() -> J:
    d = c.Timeouts()
    return _obj("Client-side timeouts.", {
        "header": _duration("The whole request head must arrive within this (slowloris).",
                            d.header),
        "keepalive": _duration("Idle time allowed between requests on a connection.",
                               d.keepalive),
        "send": _duration("A client that takes none of its response for this long is cut "
                          "off.", d.send),
        "handshake": _duration("A TLS handshake on `listen` must finish within this "
                               "(RFC 8446 §4).", d.handshake),
    })


def _tls() -> J:
    d = c.TlsConfig(certificates=())
    cert = _obj("A PEM certificate chain and its key.", {
        "cert": _s("PEM certificate chain (relative to the config file)."),
        "key": _s("PEM private key of the certificate."),
        "server_names": _names("SNI names this certificate serves (RFC 6066 §3; '*.example"
                               ".com' matches one label); empty: its own DNS names."),
    }, ("cert", "key"))
    return _obj("TLS on `listen` (RFC 8446 / RFC 5246); omit for plain HTTP.", {
        "certificates": {"type": "array", "minItems": 1, "items": cert,
                         "description": "The first is the default; others are chosen by SNI."},
        "min_version": {"description": "Lowest TLS version accepted.",
                        "enum": ["1.2", "1.3", 1.2, 1.3], "default": d.min_version},
        "client_ca": _s("CA bundle client certificates are verified against (mTLS)."),
        "client_auth": {"description": "Client certificates: none, optional or required "
                                       "(needs client_ca).",
                        "enum": ["none", "optional", "required"], "default": d.client_auth},
    }, ("certificates",))


def _upstream() -> J:
    d = c.UpstreamConfig("", "")
    t = c.UpstreamTlsConfig()
    tls = _obj("How an https:// upstream is verified (RFC 9110 §4.3.4).", {
        "ca_file": _s("CA bundle the upstream's certificate must chain to (default: the "
                      "system trust store)."),
        "server_name": _s("SNI and the name checked in the certificate (default: the URL's "
                          "host)."),
        "cert": _s("Client certificate for upstream mTLS (with key)."),
        "key": _s("Private key of the client certificate."),
        "verify": _bool("false turns certificate verification off (never in production).",
                        t.verify),
    })
    return _obj("One upstream service.", {
        "url": _s("http://host:port[/base-path] or https://host:port[/base-path].",
                  pattern=r"^https?://"),
        "connect_timeout": _duration("Connect (and TLS handshake) timeout; beyond it: 504.",
                                     d.connect_timeout),
        "read_timeout": _duration("Time allowed for the upstream's response head; beyond it: "
                                  "504.", d.read_timeout),
        "max_connections": _int("Open connections to this upstream per worker.",
                                d.max_connections, 1),
        "tls": {"anyOf": [tls, {"type": "null"}], "description": tls["description"]},
    }, ("url",))


def _provider() -> J:
    from fastgate.token._verify import SUPPORTED_ALGORITHMS

    d = c.JwksCacheConfig()
    cache = _obj("How keys are cached and refreshed (SPEC §5).", {
        "ttl": _duration("Upper bound of the TTL taken from Cache-Control: max-age.", d.ttl),
        "min_ttl": _duration("Lower bound of that TTL.", d.min_ttl),
        "min_refresh_interval": _duration("At most one refetch for an unknown kid per "
                                          "interval.", d.min_refresh_interval),
        "max_stale": _duration("How long the last good keys stay in use while fetches fail.",
                               d.max_stale),
        "timeout": _duration("Deadline of one discovery or JWKS fetch, body included.",
                             d.timeout),
        "max_bytes": _int("Largest discovery or JWKS document accepted.", d.max_bytes, 1),
    })
    source = {"type": "object", "additionalProperties": False, "minProperties": 1,
              "properties": {
                  "header": _s("Header name, e.g. Authorization."),
                  "prefix": _s("Scheme prefix of a header value, e.g. 'Bearer ' (compared "
                               "case-insensitively)."),
                  "query": _s("Query parameter name, e.g. access_token."),
                  "cookie": _s("Cookie name."),
              }}
    p = c.ProviderConfig("", "", "jwks")
    return _obj("One token issuer and where its keys come from (exactly one key source).", {
        "issuer": _s("The iss of its tokens, byte for byte (a trailing '/' matters)."),
        "discovery": _bool("Fetch {issuer}/.well-known/openid-configuration for jwks_uri "
                           "(its issuer must match)."),
        "jwks_uri": _s("URL of the JWKS (https; http only for loopback)."),
        "jwks_file": _s("A JWKS file, reloaded when it changes."),
        "jwks": {"type": "object", "description": "An inline JWKS document.",
                 "required": ["keys"],
                 "properties": {"keys": {"type": "array", "description": "The JWKs."}}},
        "secret": _s("Shared secret for HS256/HS384/HS512 only (RFC 7518 §3.2 minimum "
                     "lengths)."),
        "audiences": _names("The token's aud must contain one of these."),
        "algorithms": _names("Allowed JWS algorithms (default: every asymmetric one).",
                             enum=sorted(SUPPORTED_ALGORITHMS)),
        "clock_skew": _duration("Leeway for exp/nbf/iat (at most 5 minutes).", p.clock_skew),
        "require": {**_names("Claims that must be present."), "default": list(p.require)},
        "max_lifetime": {"anyOf": [{"$ref": "#/$defs/duration"}, {"type": "null"}],
                         "description": "exp - iat (or exp - now) must not exceed it."},
        "typ": _names("Allowed JOSE typ values, e.g. at+jwt (RFC 9068 §4; 'application/' "
                      "optional, case-insensitive); a mismatch is token_type_invalid."),
        "jwks_cache": cache,
        "token_from": {"type": "array", "minItems": 1, "items": source,
                       "description": "Where tokens are read; exactly one of header, query, "
                                      "cookie per entry.",
                       "default": [{"header": "Authorization", "prefix": "Bearer "}]},
    }, ("issuer",))


def _auth() -> J:
    d = c.AuthConfig(providers=())
    scalar = {"type": ["string", "number", "boolean"]}
    rule = {"type": "object", "additionalProperties": False, "minProperties": 1,
            "maxProperties": 1, "properties": {
                "equals": {**scalar, "description": "The claim equals this value."},
                "one_of": {"type": "array", "minItems": 1, "items": scalar,
                           "description": "The claim is one of these values."},
                "contains": {**scalar, "description": "The claim (a list) contains this."},
                "present": {"type": "boolean", "description": "The claim is (not) present."},
            }}
    scopes = {"type": "object", "additionalProperties": False, "minProperties": 1,
              "maxProperties": 1,
              "description": "Scopes from `scope` (space-separated) or `scp`.",
              "properties": {"all": _names("Every one of these scopes."),
                             "any": _names("At least one of these scopes.")}}
    return _obj("JWT authentication of a route (or the string 'none').", {
        "providers": _names("Providers whose tokens this route accepts."),
        "mode": {"enum": ["any", "all"], "default": d.mode,
                 "description": "any: one valid token; all: every listed provider's."},
        "audiences": _names("Overrides the providers' audiences for this route."),
        "scopes": scopes,
        "claims": {"type": "object", "additionalProperties": rule,
                   "description": "Claim rules by dot path (quote a dotted key in "
                                  "[\"...\"])."},
        "api_key": _obj("Require an API key, optionally bound to a claim.", {
            "required": _bool("A key must be sent.", c.ApiKeyRule().required),
            "bind_claim": _s("The key's client_id must equal this claim."),
        }),
        "allow_missing": _bool("No token: forwarded without claim headers (a bad token is "
                               "still rejected).", d.allow_missing),
        "forward_token": _bool("The token reaches the upstream byte for byte.",
                               d.forward_token),
        "claim_headers": {"type": "object", "additionalProperties": {"type": "string"},
                          "description": "Header name -> claim path (or a \"{path}\" "
                                         "template) injected upstream."},
        "payload_header": _s("Header carrying base64url(JSON of all claims)."),
        "failure_status": _int("Status of every auth failure on this route.", None, 400, 499),
        "hide_reasons": _bool("No reason in response bodies (metrics and logs keep it).",
                              d.hide_reasons),
        "certificate_bound": _bool("The token's cnf[\"x5t#S256\"] must match the TLS client "
                                   "certificate (RFC 8705 §3).", d.certificate_bound),
        "cors_preflight": {"enum": ["bypass"], "default": d.cors_preflight,
                           "description": "bypass: a CORS preflight skips auth."},
        "dpop": _dpop(),
        "one_time": _bool("A token's jti is accepted once within its lifetime (RFC 7523 §3); "
                          "needs the providers' max_lifetime.", d.one_time),
    }, ("providers",))


def _dpop() -> J:
    d = c.DpopConfig()
    return _obj("DPoP proof of possession on the route (RFC 9449).", {
        "mode": {"enum": ["allowed", "required"], "default": d.mode,
                 "description": "allowed: DPoP or Bearer; required: DPoP only."},
        "algorithms": _names("Proof algorithms accepted (asymmetric only).",
                             enum=list(c.DPOP_DEFAULT_ALGORITHMS)),
        "max_age": _duration("How old a proof's iat may be.", d.max_age),
        "clock_skew": _duration("How far in the future a proof's iat may be.", d.clock_skew),
        "nonce": _bool("Proofs must carry a nonce the gateway issued (RFC 9449 §8).", d.nonce),
        "external_url": _s("scheme://host[:port] clients send requests to (the proof's htu); "
                           "default: the Host header and the listener's TLS state."),
    })


def _replay_store() -> J:
    d = c.ReplayStoreConfig()
    r = c.RedisStoreConfig("")
    return {**_obj("Where DPoP proof jtis, one-time token jtis and DPoP nonces are "
                   "remembered: in-process (one worker) or Redis (shared).", {
        "memory": _obj("In-process store (per worker).", {
            "max_entries": _int("Entries kept; when full, checks fail closed.",
                                d.max_entries, 1)}),
        "redis": _obj("Shared store on Redis (SET NX PX, one round trip per check).", {
            "url": _s("redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or "
                      "unix:///path."),
            "key_prefix": {**_s("Prefix of every key."), "default": r.key_prefix},
            "timeout": _duration("One round trip; beyond it the store counts as down.",
                                 r.timeout),
            "on_error": {"enum": ["fail_closed", "fail_open"], "default": r.on_error,
                         "description": "Redis down: reject with 503 "
                                        "replay_store_unavailable, or admit."},
        }, ("url",)),
    }), "maxProperties": 1}


def _route() -> J:
    match = _obj("What the route matches; first match wins.", {
        "path": _s("Exact path."),
        "path_prefix": _s("Path prefix (plain string prefix)."),
        "path_regex": _s("Regular expression matched against the whole path."),
        "methods": _names("Methods (case-insensitive)."),
        "host": _s("Host without a port."),
    })
    return _obj("One route.", {
        "name": _s("Unique name (metrics and logs label)."),
        "match": match,
        "upstream": _s("Name of an upstream."),
        "strip_prefix": _bool("Remove match.path_prefix before forwarding.",
                              c.RouteConfig("", c.RouteMatch(), "").strip_prefix),
        "auth": {"description": "'none' or JWT authentication.",
                 "anyOf": [{"const": "none"}, {"$ref": "#/$defs/auth"}]},
    }, ("name", "match", "upstream", "auth"))


def schema() -> J:
    """The whole schema as a JSON-ready dict."""
    d = c.GatewayConfig()
    a = c.AccessLogConfig()
    access_log = _obj("JSON access log.", {
        "enabled": _bool("Write the access log.", a.enabled),
        "sample": {"description": "Fraction of successful requests logged (rejects and 5xx "
                                  "always are).", "default": a.sample,
                   **_env({"type": "number", "minimum": 0, "maximum": 1})},
        "path": {"type": ["string", "null"], "description": "File path; null: stdout."},
    })
    api_keys = _obj("API keys the JWT check augments.", {
        "header": _s("Header clients send the key in."),
        "query": _s("Query parameter clients send the key in."),
        "keys": {"type": "array", "minItems": 1, "description": "The accepted keys.",
                 "items": _obj("One API key.", {
            "id": _s("Key id (logs)."),
            "sha256": _s("Hex SHA-256 of the key.", pattern="^[0-9a-fA-F]{64}$"),
            "client_id": _s("Client the key belongs to (api_key.bind_claim)."),
        }, ("id", "sha256"))},
    }, ("keys",))
    admin = _address("Admin server: /metrics /healthz /readyz; null: none.",
                     f"{d.admin.host}:{d.admin.port}" if d.admin else None)
    root = _obj("fastgate gateway configuration (SPEC §2).", {
        "listen": _address("Data-plane address.", f"{d.listen.host}:{d.listen.port}"),
        "tls": {"anyOf": [{"$ref": "#/$defs/tls"}, {"type": "null"}],
                "description": "TLS on `listen`; omit for plain HTTP."},
        "trusted_proxies": _names("Peers (CIDR) whose X-Forwarded-* headers are kept."),
        "timeouts": _timeouts(),
        "admin": {"anyOf": [admin, {"type": "null"}], "description": admin["description"],
                  "default": admin.get("default")},
        "workers": _int("Processes sharing `listen` (SO_REUSEPORT); 0 = one per CPU.",
                        d.workers),
        "limits": _limits(),
        "cache": _obj("Verified-token cache (per worker).", {
            "max_entries": _int("Entries kept.", d.cache.max_entries)}),
        "upstreams": {"type": "object", "minProperties": 1, "description": "Name -> upstream.",
                      "additionalProperties": {"$ref": "#/$defs/upstream"}},
        "providers": {"type": "object", "description": "Name -> provider (one issuer each).",
                      "additionalProperties": {"$ref": "#/$defs/provider"}},
        "api_keys": api_keys,
        "routes": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/route"},
                   "description": "First match wins; no match: 404."},
        "access_log": access_log,
        "tracing": _obj("Request ids and W3C trace context.", {
            "request_id": _bool("X-Request-Id: kept from trusted_proxies peers, generated "
                                "otherwise; forwarded and logged.", d.tracing.request_id),
            "traceparent": {"enum": ["pass", "create"], "default": d.tracing.traceparent,
                            "description": "W3C traceparent: pass forwards a valid one; "
                                           "create also makes one when absent or invalid."},
            "otel": _obj("OpenTelemetry span export over OTLP/HTTP (the fastgate[otel] "
                         "extra); a change needs a restart.", {
                "enabled": _bool("Export one SERVER span per sampled request.",
                                 d.tracing.otel.enabled),
                "sample": {"description": "Fraction of requests exported when no incoming "
                                          "traceparent decides (parent-based sampling).",
                           "default": d.tracing.otel.sample,
                           **_env({"type": "number", "minimum": 0, "maximum": 1})},
                "endpoint": {**_s("OTLP/HTTP traces URL (protobuf)."),
                             "default": d.tracing.otel.endpoint},
                "service_name": {**_s("The spans' service.name."),
                                 "default": d.tracing.otel.service_name},
            }),
        }),
        "metrics": _bool("Serve /metrics on the admin port.", d.metrics),
        "drain_timeout": _duration("SIGTERM: how long in-flight requests may finish.",
                                   d.drain_timeout),
        "log_format": {"enum": ["text", "json"], "default": d.log_format,
                       "description": "Operational logs: plain text or one JSON object per "
                                      "line (time, level, logger, message, worker)."},
        "replay_store": _replay_store(),
    }, ("upstreams", "routes"))
    return {
        "$schema": DIALECT,
        "$id": SCHEMA_ID,
        "title": "fastgate configuration",
        **root,
        "$defs": {
            "duration": {"anyOf": [{"type": "number", "minimum": 0},
                                   {"type": "string", "pattern": _DURATION_RE},
                                   {"type": "string", "pattern": _ENV_REF}]},
            "tls": _tls(),
            "upstream": _upstream(),
            "provider": _provider(),
            "route": _route(),
            "auth": _auth(),
        },
    }
