"""Prometheus metrics (SPEC §7): every series pre-bound at start-up, cheap on the hot path.

Names and labels are the SPEC §7 contract (``fastgate.ops.metricfamilies``): label values come
only from closed sets, never from a token or a raw path. The data plane counts into plain lists
(``fastgate.ops.metricbinding``, ``fastgate.ops.metricrows``) that a flush exports; with
``workers > 1`` every worker writes prometheus-client multiprocess files
(``fastgate.ops.multiprocmetrics``) and a scrape merges them (``fastgate.ops.exposition``).

Owns: :class:`Metrics` (one process's series, pre-bound for the configured names, re-bound on
reload; the key-source and reload counters; the flush timer and ``render``),
:class:`NullMetrics` (``metrics: false``) and :func:`metrics_for`. Every name of the modules
above stays importable from here.
May import: the metrics modules above, ``fastgate.auth.replay`` (its label values),
``fastgate.config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from fastgate.auth.replay import REPLAY_ERROR_KINDS, REPLAY_RESULTS, REPLAY_STORES
from fastgate.config import GatewayConfig
from fastgate.ops._counters import Counters
from fastgate.ops.exposition import CONTENT_TYPE, _WithoutCreated, collect_multiprocess
from fastgate.ops.metricbinding import _CACHE_ENTRIES, _INFLIGHT, MetricsBinding
from fastgate.ops.metricfamilies import (
    CACHE_RESULTS,
    FETCH_RESULTS,
    LATENCY_BUCKETS,
    NO_ROUTE,
    RELOAD_RESULTS,
    STATUS_CLASSES,
    UPSTREAM_ERROR_KINDS,
    VERIFY_BUCKETS,
    _check_names,
    _Families,
    build_extension,
    build_version,
)
from fastgate.ops.metricrows import _Histo, _RouteRows, _Row, _UpstreamRows
from fastgate.ops.multiprocmetrics import (
    MULTIPROC_ENV,
    _multiprocess_dir,
    mark_process_dead,
    multiprocess_ready,
    setup_multiprocess,
)
from fastgate.tasks import cancel_and_wait

__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "MULTIPROC_ENV",
    "NO_ROUTE",
    "REPLAY_ERROR_KINDS",
    "REPLAY_RESULTS",
    "REPLAY_STORES",
    "STATUS_CLASSES",
    "UPSTREAM_ERROR_KINDS",
    "VERIFY_BUCKETS",
    "Metrics",
    "MetricsBinding",
    "NullMetrics",
    "collect_multiprocess",
    "mark_process_dead",
    "multiprocess_ready",
    "setup_multiprocess",
]


class Metrics(MetricsBinding):
    """Every SPEC §7 series, pre-bound for the configured names.

    The hot-path methods (inherited from :class:`MetricsBinding`) use the indexes of the names
    given here or to the last :meth:`reconfigure`. ``Metrics(..., enabled=False)`` returns a
    :class:`NullMetrics` whose methods do nothing, so the data plane calls the same methods
    whether metrics are on or off.

    The hot-path methods are meant for one thread (the worker's event loop); ``flush`` and
    ``render`` may run in another thread.
    """

    __slots__ = (
        "_build_info",
        "_cache_entries_fn",
        "_cache_entries_g",
        "_cache_row",
        "_families",
        "_fetch_children",
        "_flush_lock",
        "_inflight_g",
        "_jwks_age_children",
        "_jwks_keys_children",
        "_multiproc_dir",
        "_providers",
        "_public_routes",
        "_registry",
        "_reload_children",
        "_replay_err_rows",
        "_replay_histo",
        "_replay_rows",
        "_retired",
        "_route_rows",
        "_task",
        "_upstream_rows",
        "_verify_histo",
    )

    enabled: bool = True

    def __new__(cls, *args: Any, enabled: bool = True, **kwargs: Any) -> Metrics:
        # `Metrics(enabled=False)` is a NullMetrics: the data plane never branches on it.
        if not enabled and cls is Metrics:
            return Counters.__new__(NullMetrics)
        return Counters.__new__(cls)

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        routes: Sequence[str] = (),
        providers: Sequence[str] = (),
        upstreams: Sequence[str] = (),
        enabled: bool = True,
        version: str | None = None,
        extension: str | None = None,
        public_routes: Iterable[str] = (),
    ) -> None:
        self._multiproc_dir = _multiprocess_dir()
        self._registry = registry if registry is not None else CollectorRegistry()
        self._task: asyncio.Task[None] | None = None
        # Two flushes at once (the timer and a scrape rendered in a thread) would both add the
        # same delta before either records it as flushed.
        self._flush_lock = threading.Lock()
        self._families = f = _Families(self._registry)
        self._verify_histo = _Histo(f.verify_duration, len(VERIFY_BUCKETS))
        self._verify = self._verify_histo.cells
        self._cache_row = _Row([f.cache_lookups.labels(result=r) for r in CACHE_RESULTS])
        self._cache = self._cache_row.counts
        self._gauges = [0, 0]
        self._cache_entries_fn: Callable[[], int] | None = None
        self._cache_entries_g: Any = f.cache_entries
        self._inflight_g: Any = f.inflight
        self._reload_children = {r: f.config_reloads.labels(result=r) for r in RELOAD_RESULTS}
        self._build_info: Any = f.build_info.labels(
            version=version if version is not None else build_version(),
            extension=extension if extension is not None else build_extension(),
        )
        self._build_info.set(1)
        self._replay_rows = [_Row([f.replay_checks.labels(store=s, result=r)
                                   for r in REPLAY_RESULTS])
                             for s in REPLAY_STORES]  # fmt: skip
        self._replay_err_rows = [_Row([f.replay_errors.labels(store=s, kind=k)
                                       for k in REPLAY_ERROR_KINDS])
                                 for s in REPLAY_STORES]  # fmt: skip
        self._replay_histo = _Histo(f.replay_duration.labels(store="redis"), len(LATENCY_BUCKETS))
        self._route_rows: dict[str, _RouteRows] = {}
        self._upstream_rows: dict[str, _UpstreamRows] = {}
        self._providers: dict[str, int] = {}
        self._retired: set[str] = set()
        # `auth: none` routes: no pre-bound reject series (see _RouteRows).
        self._public_routes: set[str] = set(public_routes)
        self._bind_into(self, routes, upstreams)
        self._bind_providers(providers)

    # -- start-up / reload -------------------------------------------------------------------

    def _bind_into(
        self, target: MetricsBinding, routes: Sequence[str], upstreams: Sequence[str]
    ) -> None:
        """Point ``target``'s index tables at the rows of these names, creating (``.labels()``)
        the children of new names: the only ``.labels()`` calls for the hot path."""
        f = self._families
        route_names = (*_check_names("route", routes, reserved=NO_ROUTE), NO_ROUTE)
        upstream_names = _check_names("upstream", upstreams)
        with self._flush_lock:  # flush iterates these dicts
            for r in route_names:
                if r not in self._route_rows:
                    self._route_rows[r] = _RouteRows(f, r, public=r in self._public_routes)
            for u in upstream_names:
                if u not in self._upstream_rows:
                    self._upstream_rows[u] = _UpstreamRows(f, u)
        target._cache, target._gauges, target._verify = self._cache, self._gauges, self._verify
        target._replay_checks = [r.counts for r in self._replay_rows]
        target._replay_errors = [r.counts for r in self._replay_err_rows]
        target._replay_dur = self._replay_histo.cells
        target._set_rows(
            route_names,
            [self._route_rows[r] for r in route_names],
            upstream_names,
            [self._upstream_rows[u] for u in upstream_names],
        )

    def _bind_providers(self, providers: Sequence[str]) -> None:
        f = self._families
        names = _check_names("provider", providers)
        self._retired = (self._retired | set(self._providers)) - set(names)
        self._providers = {p: i for i, p in enumerate(names)}
        self._fetch_children = [
            (
                {r: f.jwks_fetches.labels(provider=p, result=r) for r in FETCH_RESULTS},
                f.jwks_fetch_duration.labels(provider=p),
            )
            for p in names
        ]
        # A provider starts with 0 keys (true until its source loaded some); its age series
        # appears with the first age() call, since "0 seconds old" would be a lie before that.
        self._jwks_keys_children = [f.jwks_keys.labels(provider=p) for p in names]
        self._jwks_age_children: list[Any | None] = [None] * len(names)

    def bind(self, *, routes: Sequence[str], upstreams: Sequence[str],
             public_routes: Iterable[str] = ()) -> MetricsBinding:
        """Hot-path methods for another configuration's indexes, sharing this object's series.

        For hot reloads: compile each configuration with its own binding, so a request that
        started before a reload finishes under the route it matched. ``public_routes`` names
        the ``auth: none`` routes among ``routes`` (no reject series are pre-bound for a new
        one).
        """
        self._public_routes.update(public_routes)
        binding = MetricsBinding()
        self._bind_into(binding, routes, upstreams)
        return binding

    def reconfigure(
        self, *, routes: Sequence[str], providers: Sequence[str], upstreams: Sequence[str],
        public_routes: Iterable[str] = (),
    ) -> None:
        """Switch this object's indexes (and the providers) to a reloaded configuration.

        Series of names that disappeared stay exported (counters never go back), except the
        JWKS gauges of removed providers in single-process mode; key-source hooks for removed
        providers are ignored from now on. With workers, a dead worker's live gauges go with
        ``mark_process_dead``. A request in flight across the call counts under the new
        configuration's index: use :meth:`bind` to avoid that.
        """
        self._public_routes.update(public_routes)
        self._bind_into(self, routes, upstreams)
        old = set(self._providers)
        self._bind_providers(providers)
        if self._multiproc_dir is None:
            f = self._families
            for p in old - set(self._providers):
                with contextlib.suppress(KeyError):
                    f.jwks_keys.remove(p)
                with contextlib.suppress(KeyError):
                    f.jwks_age.remove(p)

    def track_cache_entries(self, fn: Callable[[], int]) -> None:
        """Read the token cache size from ``fn`` (e.g. ``cache.__len__``) at every flush."""
        self._cache_entries_fn = fn

    # -- key sources (jwks.py), config reloads: rare, written through at once -----------------

    def _provider(self, provider: str) -> int | None:
        i = self._providers.get(provider)
        if i is None and provider not in self._retired:
            raise ValueError(f"metrics: provider {provider!r} is not configured")
        return i  # None: a removed provider's source, still stopping after a reload

    def fetch(self, provider: str, result: str, seconds: float) -> None:
        """One JWKS or discovery fetch; ``result`` is ``success`` or ``failure``."""
        i = self._provider(provider)
        if i is None:
            return
        counters, duration = self._fetch_children[i]
        if result not in counters:
            raise ValueError(f"metrics: fetch result {result!r} is not one of {FETCH_RESULTS}")
        counters[result].inc()
        duration.observe(seconds)

    def keys(self, provider: str, count: int) -> None:
        """The provider now has ``count`` usable keys (call it for static sources too)."""
        i = self._provider(provider)
        if i is not None:
            self._jwks_keys_children[i].set(count)

    def age(self, provider: str, seconds: float) -> None:
        """Seconds since the provider's keys were last confirmed (the key source calls this
        after each fetch and periodically in between; static sources once, with 0)."""
        i = self._provider(provider)
        if i is None:
            return
        child = self._jwks_age_children[i]
        if child is None:
            child = self._jwks_age_children[i] = self._families.jwks_age.labels(provider=provider)
        child.set(seconds)

    def config_reload(self, result: str) -> None:
        """One configuration reload; ``result`` is ``success`` or ``failure``."""
        child = self._reload_children.get(result)
        if child is None:
            raise ValueError(f"metrics: reload result {result!r} is not one of {RELOAD_RESULTS}")
        child.inc()

    # -- flush / exposition ------------------------------------------------------------------

    def flush(self) -> None:
        """Move local counts into the prometheus_client children and refresh the gauges."""
        with self._flush_lock:
            for route in self._route_rows.values():
                route.requests.flush()
                route.duration.flush()
                route.rejects.flush()
            for upstream in self._upstream_rows.values():
                upstream.duration.flush()
                upstream.errors.flush()
            self._cache_row.flush()
            self._verify_histo.flush()
            for row in (*self._replay_rows, *self._replay_err_rows):
                row.flush()
            self._replay_histo.flush()
            if self._cache_entries_fn is not None:
                self._gauges[_CACHE_ENTRIES] = self._cache_entries_fn()
            self._cache_entries_g.set(self._gauges[_CACHE_ENTRIES])
            self._inflight_g.set(self._gauges[_INFLIGHT])

    def render(self) -> bytes:
        """The exposition for ``/metrics``: this process, or every worker in multi-process mode."""
        self.flush()
        if self._multiproc_dir is not None:
            return collect_multiprocess(self._multiproc_dir)
        return generate_latest(_WithoutCreated(self._registry))

    @property
    def registry(self) -> CollectorRegistry:
        return self._registry

    @property
    def multiprocess(self) -> bool:
        return self._multiproc_dir is not None

    def start(self, interval: float = 1.0) -> None:
        """Flush every ``interval`` seconds on the running loop (needed with workers)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_every(interval))

    async def stop(self) -> None:
        """Stop the timer and flush what is pending (before a worker exits)."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.flush()

    async def _flush_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.flush()


class NullMetrics(Metrics):
    """Metrics switched off (``metrics: false``): the same methods, doing nothing."""

    __slots__ = ()
    enabled = False

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        routes: Sequence[str] = (),
        providers: Sequence[str] = (),
        upstreams: Sequence[str] = (),
        enabled: bool = False,
        version: str | None = None,
        extension: str | None = None,
        public_routes: Iterable[str] = (),
    ) -> None:
        self._routes = (*routes, NO_ROUTE)
        self._upstreams = tuple(upstreams)

    def bind(self, *, routes: Sequence[str], upstreams: Sequence[str],
             public_routes: Iterable[str] = ()) -> MetricsBinding:
        return NullMetrics(routes=routes, upstreams=upstreams)

    def reconfigure(
        self, *, routes: Sequence[str], providers: Sequence[str], upstreams: Sequence[str],
        public_routes: Iterable[str] = (),
    ) -> None:
        self._routes = (*routes, NO_ROUTE)
        self._upstreams = tuple(upstreams)

    def track_cache_entries(self, fn: Callable[[], int]) -> None:
        pass

    def request_done(self, route_idx: int, status: int, seconds: float) -> None:
        pass

    def reject(self, route_idx: int, reason: int) -> None:
        pass

    def verify_observe(self, seconds: float) -> None:
        pass

    def cache_lookup(self, hit: bool) -> None:
        pass

    def cache_entries(self, n: int) -> None:
        pass

    def upstream_observe(self, upstream_idx: int, seconds: float) -> None:
        pass

    def upstream_error(self, upstream_idx: int, kind: str) -> None:
        pass

    def inflight_inc(self) -> None:
        pass

    def inflight_dec(self) -> None:
        pass

    def replay_result(self, store_idx: int, result: int) -> None:
        pass

    def replay_error(self, store_idx: int, kind_idx: int) -> None:
        pass

    def replay_observe(self, seconds: float) -> None:
        pass

    def fetch(self, provider: str, result: str, seconds: float) -> None:
        pass

    def keys(self, provider: str, count: int) -> None:
        pass

    def age(self, provider: str, seconds: float) -> None:
        pass

    def config_reload(self, result: str) -> None:
        pass

    def flush(self) -> None:
        pass

    def render(self) -> bytes:
        return b""

    @property
    def registry(self) -> CollectorRegistry:
        raise RuntimeError("metrics are disabled: there is no registry")

    @property
    def multiprocess(self) -> bool:
        return False

    def start(self, interval: float = 1.0) -> None:
        pass

    async def stop(self) -> None:
        pass


def metrics_for(config: GatewayConfig) -> Metrics:
    """Metrics labelled with a gateway config's route, provider and upstream names."""
    return Metrics(routes=[r.name for r in config.routes], providers=list(config.providers),
                   upstreams=list(config.upstreams), enabled=config.metrics,
                   public_routes=[r.name for r in config.routes if r.auth is None])
