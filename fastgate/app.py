"""Compile a ``GatewayConfig`` into runtime tables and run the data-plane server.

:class:`Gateway` is the unit :mod:`fastgate.ops.supervisor` runs (in the single process, or one
per worker process, each on its own event loop); the supervisor owns signals and reloads::

    gw = Gateway.build(config, metrics=m, access_log=a, worker=0)   # compile; ConfigError
    await gw.start(sock)        # key sources, then the server (sock: a SO_REUSEPORT socket)
    gw.ready, gw.port           # every key source has keys; the bound port
    await gw.swap(new_config)   # hot reload: new tables, one reference swapped
    await gw.drain(timeout)     # stop accepting, let in-flight requests finish
    await gw.stop()             # close everything

What is compiled once (the hot path only reads these): the route table; one ``UpstreamPool``
per upstream; one ``TokenCache`` shared by every provider of the worker; one ``Verifier`` per
provider (``name=``, ``cache=``, ``max_token_bytes=``) fed by its key source
(:func:`fastgate.keys.jwks.build_key_source`); per route one ``IssuerSet`` over its providers with
the route's ``audiences`` override, a ``TokenExtractor`` over the union of the providers'
``token_from``, a ``Policy``, an ``ApiKeyCheck`` and the reject responses indexed by Reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from fastgate.auth.apikeys import ApiKeyCheck, ApiKeyTable
from fastgate.auth.dpop import DPOP_HEADER, DPOP_SOURCE, NonceIssuer, compile_possession, dpop_algs
from fastgate.auth.extract import TokenExtractor, dedupe_sources
from fastgate.auth.policy import Policy
from fastgate.auth.replay import build_store
from fastgate.auth.responses import DEFAULT_REJECTS, build_rejects
from fastgate.config import GatewayConfig, ProviderConfig
from fastgate.dataplane._http import RelayConn
from fastgate.dataplane.protocol import Server
from fastgate.dataplane.proxy import (
    HOP_BY_HOP,
    AccessLog,
    DataPlane,
    KeySourceLike,
    MetricsHooks,
    RouteRuntime,
    Tables,
)
from fastgate.dataplane.routes import RouteTable
from fastgate.dataplane.tls import ListenerTLS, TLSLoadError
from fastgate.dataplane.upstream import UpstreamPool
from fastgate.errors import ConfigError
from fastgate.keys import jwks, sharedkeys
from fastgate.keys.jwks import JwksMetrics, KeySource
from fastgate.token._verify import IssuerSet, TokenCache, Verifier

log = logging.getLogger("fastgate.app")

#: Names a claim header or payload header may never take: framing, routing and the headers
#: the gateway itself writes (a collision would let a claim steer the upstream request).
FORBIDDEN_INJECTED = HOP_BY_HOP | {
    "host", "content-length", "content-type", "content-encoding", "authorization", "cookie",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded",
}
LISTEN_BACKLOG = 2048


class GatewayMetrics(JwksMetrics, Protocol):
    """What the gateway calls on its metrics: :class:`fastgate.ops.metrics.Metrics` (or its
    ``NullMetrics`` when ``metrics: false``) implements it. The data plane's per-request calls
    are bound once from :meth:`bind`'s result (:class:`fastgate.dataplane.proxy.MetricsHooks`);
    the key sources call the :class:`~fastgate.keys.jwks.JwksMetrics` part."""

    def bind(self, *, routes: Sequence[str], upstreams: Sequence[str],
             public_routes: Iterable[str] = ()) -> object:
        """Hot-path methods for one compiled configuration's route and upstream indexes."""

    def reconfigure(self, *, routes: Sequence[str], providers: Sequence[str],
                    upstreams: Sequence[str], public_routes: Iterable[str] = ()) -> None:
        """Switch the indexes and providers to a reloaded configuration."""

    def track_cache_entries(self, fn: Callable[[], int]) -> None:
        """Read the token cache size from ``fn`` at every flush."""

    def config_reload(self, result: str) -> None:
        """One reload (``success`` or ``failure``)."""


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------


def _providers_equal(a: GatewayConfig, b: GatewayConfig) -> bool:
    return (a.providers == b.providers and a.cache == b.cache
            and a.limits.max_token_bytes == b.limits.max_token_bytes)


def build_verifier(provider: ProviderConfig, cache: TokenCache, max_token_bytes: int) -> Verifier:
    """The provider's verifier. Inline ``jwks`` and ``secret`` are given at construction
    (ready at once); file and remote sources load keys through their key source."""
    return Verifier(
        provider.issuer,
        audiences=provider.audiences or None,
        jwks=provider.jwks if provider.key_source == "jwks" else None,
        secret=provider.secret if provider.key_source == "secret" else None,
        algorithms=provider.algorithms,
        clock_skew=provider.clock_skew,
        require=provider.require,
        max_lifetime=provider.max_lifetime,
        typ=provider.typ,
        cache=cache,
        max_token_bytes=max_token_bytes,
        name=provider.name,
    )


def build_key_source(provider: ProviderConfig, verifier: Verifier,
                     metrics: JwksMetrics | None) -> KeySource:
    """The seam to :mod:`fastgate.keys.jwks` (static, file and remote key sources)."""
    # A worker of N gets remote keys from the master (one fetch per host), see sharedkeys.
    shared = sharedkeys.shared_source(provider, verifier, metrics)
    if shared is not None:
        return shared
    return jwks.build_key_source(provider, verifier, metrics=metrics)


def compile_tables(
    config: GatewayConfig,
    *,
    previous: Tables | None = None,
    metrics: GatewayMetrics | None = None,
) -> Tables:
    """Everything the data plane reads, built from the frozen config.

    With ``previous`` (hot reload): upstream pools whose config is unchanged are reused (their
    warm keep-alive connections too); when the providers, the cache size and the token limit
    are unchanged, the verifiers, key sources and the token cache are reused; otherwise all
    of them are new (a fresh cache: a cached decision of an old provider must not survive).
    Raises ConfigError for anything semantically impossible, with every problem listed.
    """
    errors: list[str] = []
    upstream_names = list(config.upstreams)

    # -- upstream pools -----------------------------------------------------------------------
    pools: dict[str, UpstreamPool] = {}
    for name, ucfg in config.upstreams.items():
        if previous is not None and previous.config.upstreams.get(name) == ucfg \
                and name in previous.pools and not previous.pools[name].tls_files_changed:
            pools[name] = previous.pools[name]  # a renewed CA/client cert: a new pool
            continue
        try:
            pools[name] = UpstreamPool(ucfg, conn_class=RelayConn,
                                       max_head_bytes=config.limits.max_header_bytes)
        except ValueError as exc:
            errors.append(f"upstreams.{name}: {exc}")

    # -- providers: one cache, one verifier and one key source each ----------------------
    verifiers: dict[str, Verifier] = {}
    key_sources: dict[str, KeySource] = {}
    if previous is not None and _providers_equal(previous.config, config):
        cache = previous.cache
        verifiers = dict(previous.verifiers)
        key_sources = dict(previous.key_sources)
    else:
        cache = TokenCache(config.cache.max_entries)
        for name, pcfg in config.providers.items():
            try:
                verifier = build_verifier(pcfg, cache, config.limits.max_token_bytes)
            except ValueError as exc:
                errors.append(f"providers.{name}: {exc}")
                continue
            try:
                key_sources[name] = build_key_source(pcfg, verifier, metrics)
            except ValueError as exc:
                errors.append(f"providers.{name}: {exc}")
                continue
            verifiers[name] = verifier

    # -- API keys and reserved header names -------------------------------------------
    api_table = ApiKeyTable(config.api_keys)
    reserved: set[str] = set()
    if config.api_keys is not None and config.api_keys.header:
        reserved.add(config.api_keys.header.lower().replace("_", "-"))
    for i, rcfg in enumerate(config.routes):
        if rcfg.auth is None:
            continue
        names = [h.header for h in rcfg.auth.claim_headers]
        if rcfg.auth.payload_header:
            names.append(rcfg.auth.payload_header)
        for name in names:
            lname = name.lower().replace("_", "-")
            if lname in FORBIDDEN_INJECTED:
                errors.append(f"routes[{i}].auth: {name!r} cannot be a claim or payload header")
            reserved.add(lname)
    token_headers = {
        src.name.lower().replace("_", "-")
        for p in config.providers.values() for src in p.token_from if src.place == "header"
    }
    # What the auth layer reads from a request (the header pass collects only these).
    auth_headers = set(token_headers) | {"cookie", "origin", "access-control-request-method"}
    if any(r.auth is not None and r.auth.dpop is not None for r in config.routes):
        # RFC 9449 §7.1: Authorization: DPoP <token>, and the proof in its own header.
        auth_headers |= {DPOP_SOURCE.name.lower(), DPOP_HEADER.lower()}

    # -- the replay store (DPoP proof jtis, one-time tokens, nonces) ----------------------
    if previous is not None and previous.config.replay_store == config.replay_store:
        replay = previous.replay  # its remembered jtis (and its Redis connection) stay
    else:
        replay = build_store(config.replay_store, metrics=metrics)
    nonce_issuers: dict[float, NonceIssuer] = {}

    def nonces(period: float) -> NonceIssuer:
        if period not in nonce_issuers:
            nonce_issuers[period] = NonceIssuer(replay, period)
        return nonce_issuers[period]
    if config.api_keys is not None and config.api_keys.header:
        auth_headers.add(config.api_keys.header.lower())
    for name in sorted(reserved & token_headers):
        errors.append(f"header {name!r} is both a token source and an injected/API-key header")

    # -- routes -------------------------------------------------------------------------
    try:
        table = RouteTable(config.routes)
    except Exception as exc:  # re.error from a path_regex the loader did not see
        raise ConfigError([*errors, f"routes: {exc}"]) from None
    runtimes: list[RouteRuntime] = []
    for route in table.routes:
        p = f"routes[{route.index}]"
        pool = pools.get(route.upstream)
        if pool is None:
            if route.upstream not in config.upstreams:
                errors.append(f"{p}.upstream: unknown upstream {route.upstream!r}")
            continue
        uidx = upstream_names.index(route.upstream)
        body_timeout = config.upstreams[route.upstream].read_timeout
        auth = route.config.auth
        if auth is None:
            runtimes.append(RouteRuntime(route=route, pool=pool, upstream_index=uidx,
                                         body_timeout=body_timeout, rejects=DEFAULT_REJECTS))
            continue
        route_verifiers: list[Verifier] = []
        issuers: dict[str, str] = {}
        for j, pname in enumerate(auth.providers):
            maybe = config.providers.get(pname)
            if maybe is None:
                errors.append(f"{p}.auth.providers[{j}]: unknown provider {pname!r}")
                continue
            if maybe.issuer in issuers:
                # The issuer selects the verifier (SPEC §3 step 3): two providers with one
                # issuer on one route would make that choice ambiguous.
                errors.append(f"{p}.auth.providers[{j}]: provider {pname!r} has the same "
                              f"issuer as {issuers[maybe.issuer]!r}")
                continue
            issuers[maybe.issuer] = pname
            if pname in verifiers:
                route_verifiers.append(verifiers[pname])
        api_check: ApiKeyCheck | None = None
        if auth.api_key is not None:
            if not len(api_table):
                errors.append(f"{p}.auth.api_key: needs a top-level api_keys section with keys")
            elif api_table.header is None and api_table.query is None:
                errors.append(f"{p}.auth.api_key: api_keys needs a header or a query name")
            else:
                api_check = ApiKeyCheck(auth.api_key, api_table)
        if auth.certificate_bound and (config.tls is None or config.tls.client_auth == "none"):
            # RFC 8705 §3 needs the client's certificate: without TLS client authentication
            # every request on the route would be rejected.
            errors.append(f"{p}.auth.certificate_bound: needs tls with client_ca and "
                          "client_auth optional or required")
        policy = Policy(auth)
        issuer_set: IssuerSet | None = None
        extractor: TokenExtractor | None = None
        if auth.providers:
            if len(route_verifiers) != len(auth.providers):
                continue  # errors recorded above
            issuer_set = IssuerSet(route_verifiers, cache, audiences=auth.audiences)
            sources = dedupe_sources([*(config.providers[n].token_from for n in auth.providers),
                                      (DPOP_SOURCE,) if auth.dpop is not None else ()])
            extractor = TokenExtractor(sources, config.limits.max_token_bytes)
        route_sources: dict[Verifier, KeySourceLike] = {
            verifiers[n]: key_sources[n] for n in auth.providers if n in key_sources
        }
        runtimes.append(RouteRuntime(
            route=route,
            pool=pool,
            upstream_index=uidx,
            body_timeout=body_timeout,
            rejects=build_rejects(failure_status=auth.failure_status,
                                  hide_reasons=auth.hide_reasons, scope=policy.scope_string,
                                  dpop_algs=dpop_algs(auth)),
            issuer_set=issuer_set,
            verifiers=tuple(route_verifiers),
            key_sources=route_sources,
            extractor=extractor,
            policy=policy,
            api_key=api_check,
            mode_all=auth.mode == "all",
            allow_missing=auth.allow_missing,
            forward_token=auth.forward_token,
            cors_bypass=auth.cors_preflight == "bypass",
            certificate_bound=auth.certificate_bound,
            possession=compile_possession(auth, config.providers, replay, nonces),
        ))
    if errors:
        raise ConfigError(errors)
    # One metrics binding per compiled configuration (its own route/upstream indexes), so a
    # request that started on these tables counts under its route across a reload.
    hooks = MetricsHooks(None if metrics is None else metrics.bind(
        routes=[r.name for r in config.routes], upstreams=upstream_names,
        public_routes=[r.name for r in config.routes if r.auth is None]))
    return Tables(
        config=config,
        routes=table,
        runtimes=tuple(runtimes),
        pools=pools,
        verifiers=verifiers,
        key_sources=key_sources,
        cache=cache,
        api_keys=api_table,
        reserved_headers=frozenset(reserved),
        max_body_bytes=config.limits.max_body_bytes,
        max_header_bytes=config.limits.max_header_bytes,
        hooks=hooks,
        auth_headers=frozenset(auth_headers),
        replay=replay,
    )


# ---------------------------------------------------------------------------------------------
# The gateway (one per event loop / worker process)
# ---------------------------------------------------------------------------------------------


class Gateway:
    """A compiled gateway bound to one event loop. Build with :meth:`build`."""

    def __init__(self, tables: Tables, *, metrics: GatewayMetrics | None = None,
                 access_log: AccessLog | None = None, worker: int = 0) -> None:
        self.worker = worker
        self.metrics = metrics
        self.plane = DataPlane(tables, metrics=metrics, access_log=access_log)
        self._http: Server | None = None  # the data plane's protocol factory
        #: TLS on ``listen`` (``config.tls``): built by :meth:`build`, polled after start.
        self.tls: ListenerTLS | None = None
        self._server: asyncio.Server | None = None
        self._retiring: dict[asyncio.Task[None], Tables] = {}
        self._started_sources: set[int] = set()
        self._closed = False

    @classmethod
    def build(cls, config: GatewayConfig, *, metrics: GatewayMetrics | None = None,
              access_log: AccessLog | None = None, worker: int = 0) -> Gateway:
        """Compile ``config`` (raises ConfigError listing every semantic problem)."""
        tables = compile_tables(config, metrics=metrics)
        gateway = cls(tables, metrics=metrics, access_log=access_log, worker=worker)
        gateway.tls = gateway._listener_tls(config)
        _track_cache(metrics, tables)
        return gateway

    def _listener_tls(self, config: GatewayConfig) -> ListenerTLS | None:
        if config.tls is None:
            return None
        try:
            return ListenerTLS(config.tls, on_reload=self._tls_files_reloaded)
        except TLSLoadError as exc:
            raise ConfigError([f"tls: {exc}"]) from None

    def _tls_files_reloaded(self, ok: bool) -> None:
        # Certificates renewed on disk count as reloads (a broken renewal is the one to alert
        # on). Every worker polls its own files; worker 0 alone counts, as the master does for
        # SIGHUP reloads, so N workers do not count one renewal N times.
        if self.worker == 0 and self.metrics is not None:
            self.metrics.config_reload("success" if ok else "failure")

    # -- properties -------------------------------------------------------------------------

    @property
    def tables(self) -> Tables:
        return self.plane.tables

    @property
    def config(self) -> GatewayConfig:
        config: GatewayConfig = self.plane.tables.config
        return config

    @property
    def ready(self) -> bool:
        """True when every provider's key source has usable keys (``/readyz``)."""
        return all(bool(s.ready) for s in self.plane.tables.key_sources.values())

    @property
    def port(self) -> int:
        """The bound data-plane port (after :meth:`start`)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the gateway is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, sock: socket.socket | None = None) -> None:
        """Start key sources (cold start: static and file keys are loaded now, remote ones in
        the background), then listen: on ``sock`` when given (the supervisor's SO_REUSEPORT
        socket), else on ``config.listen`` with SO_REUSEPORT."""
        loop = asyncio.get_running_loop()
        await self._start_sources(self.plane.tables.key_sources.values())
        await self.plane.tables.replay.start()
        config = self.config
        if self.tls is None:
            self.tls = self._listener_tls(config)
        # RFC 8446 / RFC 5246 on the listener: uvloop's TLS transport under the same
        # protocol; a handshake (or a plain-HTTP client, or one that stalls mid-handshake) is
        # cut after timeouts.handshake, before any byte reaches the HTTP layer.
        tls_args: dict[str, Any] = {} if self.tls is None else {
            "ssl": self.tls.context, "ssl_handshake_timeout": config.timeouts.handshake}
        # RFC 9110 §4.3.4 / §7.2: requests received over TLS are forwarded as https.
        self._http = Server(self.plane, loop,
                            scheme=b"http" if self.tls is None else b"https")
        if sock is not None:
            self._server = await loop.create_server(self._http, sock=sock,
                                                    backlog=LISTEN_BACKLOG, **tls_args)
        else:
            self._server = await loop.create_server(
                self._http, config.listen.host, config.listen.port, reuse_port=True,
                reuse_address=True, backlog=LISTEN_BACKLOG, **tls_args)
        if self.tls is not None:
            self.tls.start()
        log.info("worker %d: data plane listening on %s:%d%s", self.worker,
                 config.listen.host, self.port, " (TLS)" if self.tls is not None else "")

    async def _start_sources(self, sources: Iterable[KeySource]) -> None:
        todo = [s for s in sources if id(s) not in self._started_sources]
        for s in todo:
            self._started_sources.add(id(s))
        if not todo:
            return
        results = await asyncio.gather(*(s.start() for s in todo), return_exceptions=True)
        problems = [str(r) for r in results if isinstance(r, BaseException)]
        if problems:
            raise ConfigError(problems)

    async def swap(self, new_config: GatewayConfig) -> None:
        """Hot reload: compile ``new_config`` (ConfigError -> the old tables stay), start its
        new key sources, then swap one reference. Requests in flight finish on the old tables;
        the old tables' pools and key sources that the new ones do not reuse are closed once
        the last of those requests is done (or after ``drain_timeout``)."""
        old = self.plane.tables
        new = compile_tables(new_config, previous=old, metrics=self.metrics)
        if new_config.listen != old.config.listen and self._server is not None:
            log.warning("listen address changes need a restart; keeping %s:%d",
                        old.config.listen.host, old.config.listen.port)
        try:
            # The certificate files are read again (SIGHUP = use the renewed ones now).
            tls_commit = self._prepare_tls(old.config, new_config)
        except TLSLoadError as exc:
            await _close_unshared(new, old)
            raise ConfigError([f"tls: {exc}"]) from None
        try:
            await self._start_sources(new.key_sources.values())
        except ConfigError:
            await _close_unshared(new, old)
            raise
        if new.replay is not old.replay:
            await new.replay.start()
        if self.metrics is not None:
            self.metrics.reconfigure(routes=[r.name for r in new_config.routes],
                        providers=list(new_config.providers),
                        upstreams=list(new_config.upstreams))
        _track_cache(self.metrics, new)
        if tls_commit is not None:
            tls_commit()  # new handshakes get the new certificates; open connections keep theirs
        self.plane.tables = new  # the atomic switch
        if self._http is not None:
            self._http.configure()  # new limits and timeouts for new connections
        task = asyncio.get_running_loop().create_task(
            self._retire(old, new, new_config.drain_timeout))
        self._retiring[task] = old
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    def _prepare_tls(self, old: GatewayConfig,
                     new: GatewayConfig) -> Callable[[], None] | None:
        """Load the listener's new certificates (TLSLoadError: broken) and return the switch
        to them (None: no TLS). Turning TLS on or off, or a new handshake timeout, needs a
        restart (the listening socket keeps its settings)."""
        if (old.tls is None) != (new.tls is None) and self._server is not None:
            log.warning("turning TLS on or off on `listen` needs a restart; keeping %s",
                        "TLS" if old.tls is not None else "plain HTTP")
        if new.timeouts.handshake != old.timeouts.handshake and self._server is not None \
                and self.tls is not None:
            log.warning("timeouts.handshake changes need a restart; keeping %gs",
                        old.timeouts.handshake)
        if self.tls is None or new.tls is None:
            return None
        return self.tls.prepare(new.tls)

    async def _retire(self, old: Tables, new: Tables, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while old.inflight > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await _close_unshared(old, new)
        for s in old.key_sources.values():
            if s not in new.key_sources.values():
                self._started_sources.discard(id(s))

    async def drain(self, timeout: float) -> None:
        """Stop accepting connections, then wait up to ``timeout`` seconds for in-flight
        requests to finish; idle keep-alive connections are closed at once and busy ones after
        their current response."""
        self.plane.draining = True  # responses from now on say Connection: close
        if self._server is not None:
            self._server.close()
        if self._http is not None:
            # close(): idle keep-alive connections end now, busy ones after their response;
            # then wait (bounded) for the handlers still running.
            self._http.close_idle()
            await self._http.shutdown(timeout)

    async def stop(self) -> None:
        """Close the listener, every connection, the upstream pools and the key sources."""
        if self._closed:
            return
        self._closed = True
        if self.tls is not None:
            await self.tls.stop()
        await self.drain(0.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        tables = self.plane.tables
        for task, old in list(self._retiring.items()):
            task.cancel()
            await _close_unshared(old, tables)
        for pool in tables.pools.values():
            await pool.close()
        await tables.replay.close()
        for source in tables.key_sources.values():
            with contextlib.suppress(Exception):
                await source.stop()


def _track_cache(metrics: GatewayMetrics | None, tables: Tables) -> None:
    if metrics is not None:
        metrics.track_cache_entries(tables.cache.__len__)


async def _close_unshared(old: Tables, keep: Tables) -> None:
    """Close what ``old`` owns that ``keep`` does not reuse."""
    kept_pools = {id(p) for p in keep.pools.values()}
    for pool in old.pools.values():
        if id(pool) not in kept_pools:
            await pool.close()
    if old.replay is not keep.replay:
        await old.replay.close()
    kept_sources = {id(s) for s in keep.key_sources.values()}
    for source in old.key_sources.values():
        if id(source) not in kept_sources:
            with contextlib.suppress(Exception):
                await source.stop()
