"""The walker: every section composed, and the top level of the document.

`_Walker` is `Collector` (errors with paths, ``${NAME}``, typed getters) with the readers of
`transport`, `providers` and `routes` mixed in, plus what is read at the top level itself:
the root mapping (`gateway`: its keys, limits, timeouts, cache and the order the sections are
walked in), ``replay_store``, ``tracing`` (with ``otel``) and ``access_log``.
May import: `fastgate.config.model`, `.syntax`, `.collector`, `.redisurl`, the section
modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from fastgate.config.collector import T
from fastgate.config.model import (
    SHARED_STORE_NEEDED,
    AccessLogConfig,
    ApiKeysConfig,
    CacheConfig,
    GatewayConfig,
    Limits,
    OtelConfig,
    ProviderConfig,
    RedisStoreConfig,
    ReplayStoreConfig,
    RouteConfig,
    Timeouts,
    TracingConfig,
    _field_names,
    uses_replay_store,
)
from fastgate.config.redisurl import parse_redis_url
from fastgate.config.routes import RouteSections
from fastgate.config.syntax import _header_key, _key_path
from fastgate.config.transport import TransportSections

_TOP_KEYS = ("listen", "admin", "workers", "limits", "timeouts", "trusted_proxies", "cache",
             "upstreams", "providers", "api_keys", "routes", "access_log", "tracing", "metrics",
             "drain_timeout", "tls", "log_format", "replay_store")


class _Walker(TransportSections, RouteSections):
    """Walks the substituted document, tracking paths and collecting every error."""

    def __init__(self, environ: Mapping[str, str], base_dir: str) -> None:
        super().__init__(environ, base_dir)
        self.providers: dict[str, ProviderConfig] = {}
        self.input_headers: dict[str, str] = {}  # header key -> path of its definition

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
