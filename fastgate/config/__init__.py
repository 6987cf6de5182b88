"""Gateway configuration (SPEC §2): frozen data, parsed once from YAML.

This package holds data and its parsing only: no sockets, no logging setup, no process exit.
The loader (`load_config` / `parse_config`) collects every error into one ConfigError, each as
``<path>: <message>`` with the path in the document's own terms, e.g.
``routes[2].auth.providers[0]: unknown provider 'okat' (did you mean 'okta'?)``; file-level
problems (YAML syntax, duplicate keys) are ``<file>:<line>:<column>: <message>``.

Owns: the frozen model (`model`); the syntax of values and of error paths (`syntax`); the
walker that validates a raw mapping key by key and builds the model -- its core, the error
collector with ``${NAME}`` substitution and typed getters (`collector`), the readers of each
section (`transport`: listen, upstreams, TLS; `providers`: providers, key sources, API keys;
`routes`: routes and their auth options), and the top level that composes them (`walker`); the
entry points and error placement (`loader`); the Redis URL syntax (`redisurl`, which the replay
store connects by), the certificate file checks (`certs`) and the JSON Schema (`schema`).
Every name other modules use is re-exported here: import it from `fastgate.config`. Within
the package the imports run one way: model <- syntax <- collector <- transport, providers <-
routes <- walker <- loader (redisurl and certs are leaves).
May import: `fastgate.errors`, `fastgate.httpfields`; lazily `fastgate.token._verify` (the
supported algorithms). Nothing above it: `fastgate.auth` imports the Redis URL rule from here.
"""

from __future__ import annotations

from fastgate.config.loader import load_config, load_config_text, parse_config
from fastgate.config.model import (
    DEFAULT_TOKEN_FROM,
    DPOP_DEFAULT_ALGORITHMS,
    SHARED_STORE_NEEDED,
    AccessLogConfig,
    Address,
    ApiKey,
    ApiKeyRule,
    ApiKeysConfig,
    AuthConfig,
    CacheConfig,
    ClaimHeader,
    ClaimOp,
    ClaimPath,
    ClaimRule,
    ClaimTemplate,
    ClientAuth,
    DpopConfig,
    GatewayConfig,
    JwksCacheConfig,
    KeySourceKind,
    Limits,
    OtelConfig,
    ProviderConfig,
    RedisStoreConfig,
    ReplayStoreConfig,
    RouteConfig,
    RouteMatch,
    ScopeRule,
    Timeouts,
    TlsCertificate,
    TlsConfig,
    TlsVersion,
    TokenPlace,
    TokenSource,
    TracingConfig,
    UpstreamConfig,
    UpstreamTlsConfig,
    uses_replay_store,
)

# The key sets tests/config/test_schema.py compares the JSON Schema with.
from fastgate.config.providers import _PROVIDER_KEYS as _PROVIDER_KEYS
from fastgate.config.routes import _AUTH_KEYS as _AUTH_KEYS
from fastgate.config.routes import _CLAIM_OPS as _CLAIM_OPS
from fastgate.config.routes import _ROUTE_KEYS as _ROUTE_KEYS
from fastgate.config.syntax import parse_claim_path, parse_claim_template, parse_duration
from fastgate.config.walker import _TOP_KEYS as _TOP_KEYS

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
    "load_config",
    "load_config_text",
    "parse_claim_path",
    "parse_claim_template",
    "parse_config",
    "parse_duration",
    "uses_replay_store",
]
