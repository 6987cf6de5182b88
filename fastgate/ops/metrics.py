"""Prometheus metrics (SPEC §7): every series pre-bound at start-up, cheap on the hot path.

Names and labels are the SPEC §7 contract. Label values come only from closed sets: the
configured route, provider and upstream names, ``Reason.label``, the status classes 1xx..5xx,
the upstream error kinds and fixed results. Nothing from a token or a raw path ever becomes
a label value (unbounded cardinality, and an attacker-controlled one).

Hot path
--------
The data-plane methods (``request_done``, ``reject``, ``verify_observe``, ``cache_lookup``,
``upstream_observe``, ``upstream_error``, ``inflight_inc``/``inflight_dec`` and the replay
store's ``replay_result``, ``replay_error``, ``replay_observe``) never touch
prometheus_client. They add to plain per-process lists indexed by integers that the data plane
computed once at start-up (route index, upstream index, ``Reason`` value, status // 100), so a
request costs a few list increments and one ``bisect`` per histogram. ``flush()`` moves the
deltas into the prometheus_client children, which were all created (``.labels()``) when the
names were bound (constructor, ``bind``, ``reconfigure``). It runs at every scrape of this
process and on a timer (``start()``), so in multi-process mode the other workers' numbers are
at most one flush interval old, and a killed worker loses at most one interval of counts.

Why not ``child.inc()`` per request: measured on the development box (2 shared cores),
``Counter.inc()`` costs 0.5-0.8 µs single-process and 1.4-1.9 µs in multi-process mode (a lock,
``os.getpid()`` and an mmap write each), ``Histogram.observe()`` 1.2-2.1 µs / 3.0-4.0 µs. The
seven updates of a proxied request cost 6-8 µs / 18-22 µs that way, 1.0-1.5 µs in either mode
this way; a proxied request costs ~170 µs of gateway CPU (budget: 5 %).

Replay store
------------
Three families beside SPEC §7 (issue 11), fed by ``fastgate.auth.replay`` through hooks that
``replay.build_store(config, metrics=...)`` binds once (any binding of this object works; a
missing method is a no-op):

``replay_result(store_idx, result)``
    one answered check: ``fastgate_replay_store_checks_total{store, result}``; ``store_idx``
    indexes ``REPLAY_STORES`` (``memory``, ``redis``), ``result`` is the check's code
    (``replay.FRESH`` .. ``replay.UNAVAILABLE``), which indexes ``REPLAY_RESULTS``.
``replay_error(store_idx, kind_idx)``
    one store failure: ``fastgate_replay_store_errors_total{store, kind}``; ``kind_idx``
    indexes ``REPLAY_ERROR_KINDS`` (``timeout``, ``connection``, ``protocol``, ``full``).
``replay_observe(seconds)``
    one redis round trip: ``fastgate_replay_store_duration_seconds{store="redis"}`` (the
    memory store answers in well under a microsecond and is not timed; only the redis
    histogram is pre-bound).

All 16 counter series are pre-bound whichever store is configured (a ``rate()`` over a series
that does not exist yet would hide the first failures from an alert).

Multi-process mode
------------------
With ``workers > 1`` each worker writes its values to mmap files in one directory
(prometheus-client multiprocess mode) and one scrape merges them (``collect_multiprocess``).
The supervisor calls ``setup_multiprocess(dir, clean=True)`` before it starts any worker and
``mark_process_dead(pid)`` when a worker exits. A supervisor that counts reloads itself uses
``Metrics(routes=(), providers=(), upstreams=())``: with providers it would report 0 keys for
them and pull the min-over-workers key gauge (and readiness) down to 0.

Gauge aggregation across workers (the ``multiprocess_mode`` of each gauge) is chosen per gauge
below; every gauge uses a ``live*`` mode so a dead worker's values leave the scrape once
``mark_process_dead`` ran. No mode that keeps a ``pid`` label is used: SPEC §7 fixes the label
sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.machinery
import os
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _pc_multiprocess
from prometheus_client import values as _pc_values

from fastgate.auth.replay import REPLAY_ERROR_KINDS, REPLAY_RESULTS, REPLAY_STORES
from fastgate.config import GatewayConfig
from fastgate.ops._counters import Counters, configure
from fastgate.tasks import cancel_and_wait
from fastgate.token.reasons import REJECT_REASONS, Reason

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

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

NO_ROUTE: Final = "_none"
"""The route label of a request that matched no route (its ``route_idx`` is ``len(routes)``)."""

STATUS_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
UPSTREAM_ERROR_KINDS: Final = ("connect", "timeout", "reset", "protocol", "tls")
CACHE_RESULTS: Final = ("miss", "hit")  # indexed by the bool `hit`
FETCH_RESULTS: Final = ("success", "failure")
RELOAD_RESULTS: Final = ("success", "failure")

# Requests through a compiled verifier and a loopback upstream take tens of µs to a few ms;
# the default prometheus buckets start at 5 ms and would put all of them in one bucket.
LATENCY_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# HMAC checks and cache hits take a few µs, RSA/EC signature checks tens of µs: three more
# buckets below 50 µs tell them apart (one unlabelled histogram: they cost 3 series).
VERIFY_BUCKETS: Final = (0.000005, 0.00001, 0.000025, *LATENCY_BUCKETS)

# status // 100 -> slot in a route's requests row (slot i is STATUS_CLASSES[i]). A status
# outside 100..599 (RFC 9110 §15) is a gateway bug; it is counted as a server error.
_STATUS_SLOT: Final = (4, 0, 1, 2, 3, 4, 4, 4, 4, 4)
_KIND_SLOT: Final = {kind: i for i, kind in enumerate(UPSTREAM_ERROR_KINDS)}
_N_REASONS: Final = max(Reason) + 1
_INFLIGHT: Final = 0  # slots of the shared gauges list
_CACHE_ENTRIES: Final = 1
configure(LATENCY_BUCKETS, VERIFY_BUCKETS, _STATUS_SLOT, _KIND_SLOT)

_HELP: Final = {
    "requests": "Requests handled, by route and response status class.",
    "request_duration": "Whole request time at the gateway (auth + upstream), by route.",
    "rejects": "Requests rejected by the auth layer, by route and reason.",
    "verify_duration": "Token verification time.",
    "upstream_duration": "Time from sending the request upstream to the response head.",
    "upstream_errors": "Upstream failures, by kind (connect, timeout, reset, protocol, tls).",
    "cache_lookups": "Verified-token cache lookups, by result (hit, miss).",
    "cache_entries": "Entries in the verified-token caches (summed over workers).",
    "jwks_fetches": "JWKS / discovery fetches, by provider and result.",
    "jwks_fetch_duration": "JWKS / discovery fetch time, by provider.",
    "jwks_keys": "Usable keys of the provider (the lowest over live workers).",
    "jwks_age": "Seconds since the provider's keys were last fetched, or loaded from (or found "
                "unchanged in) its jwks_file (the oldest over live workers).",
    "inflight": "Requests in flight (summed over workers).",
    "build_info": "Always 1; labels tell the version and whether the compiled verifier runs.",
    "config_reloads": "Configuration reloads, by result.",
    "replay_checks": "Replay store checks (DPoP proof jtis, one-time tokens), by store and result.",
    "replay_errors": "Replay store failures, by store and kind (timeout, connection, protocol, "
                     "full).",
    "replay_duration": "Replay store round trip (redis), from the check to its answer.",
}


def _check_names(
    kind: str, names: Sequence[str], *, reserved: str | None = None
) -> tuple[str, ...]:
    """Configured names become label values: they must be non-empty and distinct."""
    out = tuple(names)
    for name in out:
        if not isinstance(name, str) or not name:
            raise ValueError(f"metrics: {kind} name {name!r} is not a non-empty string")
        if name == reserved:
            raise ValueError(f"metrics: {kind} name {name!r} is reserved for unmatched requests")
    if len(set(out)) != len(out):
        raise ValueError(f"metrics: duplicate {kind} names in {list(out)}")
    return out


def build_extension() -> str:
    """``cython`` when fastgate.token._verify is the compiled module, else ``python`` (or
    ``none``)."""
    try:
        from fastgate.token import _verify
    except ImportError:
        return "none"
    origin = getattr(_verify, "__file__", None) or ""
    return "cython" if origin.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) else "python"


def build_version() -> str:
    from fastgate import __version__

    return __version__


class _Histo:
    """One histogram child and its local (not yet flushed) observations.

    ``cells`` holds one count per bucket of the child (the last is +Inf) and then the sum:
    ``observe`` is ``cells[bisect_left(bounds, v)] += 1; cells[-1] += v`` (a Prometheus bucket
    counts values ``<= le``, which is exactly ``bisect_left``).
    """

    __slots__ = ("buckets", "cells", "flushed", "sum")

    def __init__(self, child: Any, n_bounds: int) -> None:
        # prometheus_client keeps one value per bucket (non-cumulative) and one for the sum;
        # there is no public "observe n times" call, so the flush adds to those values directly.
        buckets = getattr(child, "_buckets", None)
        value_sum = getattr(child, "_sum", None)
        if buckets is None or value_sum is None or len(buckets) != n_bounds + 1:
            raise RuntimeError("metrics: unsupported prometheus_client Histogram layout")
        self.buckets: list[Any] = list(buckets)
        self.sum: Any = value_sum
        self.cells: list[float] = [0.0] * (n_bounds + 2)
        self.flushed: list[float] = [0.0] * (n_bounds + 2)

    def flush(self) -> None:
        cells, flushed, buckets = self.cells, self.flushed, self.buckets
        for i, bucket in enumerate(buckets):
            v = cells[i]
            if v != flushed[i]:
                bucket.inc(v - flushed[i])
                flushed[i] = v
        v = cells[-1]
        if v != flushed[-1]:
            self.sum.inc(v - flushed[-1])
            flushed[-1] = v


class _Row:
    """Counter children and their local counts; the flush adds ``count - flushed``.

    Deltas against a ``flushed`` copy (instead of resetting the counts) keep an increment that
    races a flush from another thread: it is simply picked up by the next flush.
    """

    __slots__ = ("children", "counts", "factory", "flushed")

    def __init__(self, children: Sequence[Any | None],
                 factory: Callable[[int], Any | None] | None = None) -> None:
        self.children: list[Any | None] = list(children)
        self.counts: list[int] = [0] * len(self.children)
        self.flushed: list[int] = [0] * len(self.children)
        # Creates the child of slot i on its first count (rows whose series are not pre-bound).
        self.factory = factory

    def flush(self) -> None:
        counts, flushed, children = self.counts, self.flushed, self.children
        for i, child in enumerate(children):
            v = counts[i]
            if v == flushed[i]:
                continue
            if child is None and self.factory is not None:
                child = children[i] = self.factory(i)
            if child is not None:
                child.inc(v - flushed[i])
                flushed[i] = v


class _RouteRows:
    """A route's requests row, duration histogram and rejects row (kept for its name)."""

    __slots__ = ("duration", "rejects", "requests")

    def __init__(self, f: _Families, route: str, *, public: bool = False) -> None:
        self.requests = _Row(
            [f.requests.labels(route=route, status_class=c) for c in STATUS_CLASSES]
        )
        self.duration = _Histo(f.request_duration.labels(route=route), len(LATENCY_BUCKETS))
        # Indexed by Reason value; slot 0 (Reason.OK) has no child: OK is not a reject.
        rejects: list[Any | None] = [None] * _N_REASONS
        if not public:
            for reason in REJECT_REASONS:
                rejects[reason] = f.rejects.labels(route=route, reason=reason.label)

        def reject_child(slot: int) -> Any | None:
            # An `auth: none` route never rejects, so its 16 reject series are not pre-bound
            # (always-zero series cost the TSDB); should one ever count (the route got auth
            # in a reload), its series appears at that flush.
            if slot == Reason.OK:
                return None
            return f.rejects.labels(route=route, reason=Reason(slot).label)

        self.rejects = _Row(rejects, reject_child)


class _UpstreamRows:
    __slots__ = ("duration", "errors")

    def __init__(self, f: _Families, upstream: str) -> None:
        self.duration = _Histo(f.upstream_duration.labels(upstream=upstream), len(LATENCY_BUCKETS))
        self.errors = _Row([f.upstream_errors.labels(upstream=upstream, kind=k)
                            for k in UPSTREAM_ERROR_KINDS])  # fmt: skip


class MetricsBinding(Counters):
    """The hot-path methods for one configuration's route and upstream indexes (compiled in
    :class:`fastgate.ops._counters.Counters`: ``request_done``, ``reject``, ``verify_observe``,
    ``cache_lookup``, ``cache_entries``, ``upstream_observe``, ``upstream_error``,
    ``inflight_inc``, ``inflight_dec``).

    ``route_idx`` is the index in that configuration's ``routes`` (``config.routes`` order),
    ``len(routes)`` meaning "no route matched" (label ``_none``); ``upstream_idx`` is the index
    in its ``upstreams``. Each method adds to plain lists; :meth:`Metrics.flush` exports them.
    Rows belong to names, so a binding of an older configuration (requests still in flight
    after a reload) keeps counting under the names it was made for.
    """

    __slots__ = ("_replay_checks", "_replay_dur", "_replay_errors", "_routes", "_upstreams")
    _routes: tuple[str, ...]
    _upstreams: tuple[str, ...]
    _req: list[list[int]]  # [route_idx][status slot]
    _req_dur: list[list[float]]  # [route_idx][bucket..., sum]
    _rejects: list[list[int]]  # [route_idx][Reason]
    _up_dur: list[list[float]]
    _up_err: list[list[int]]
    # Shared by every binding of one Metrics:
    _verify: list[float]
    _cache: list[int]  # [miss, hit]
    _gauges: list[int]  # [_INFLIGHT, _CACHE_ENTRIES]
    _replay_checks: list[list[int]]  # [store_idx][result code]
    _replay_errors: list[list[int]]  # [store_idx][kind_idx]
    _replay_dur: list[float]  # the redis round-trip histogram's cells

    def _set_rows(
        self,
        routes: tuple[str, ...],
        route_rows: Sequence[_RouteRows],
        upstreams: tuple[str, ...],
        upstream_rows: Sequence[_UpstreamRows],
    ) -> None:
        self._routes = routes
        self._upstreams = upstreams
        self._req = [r.requests.counts for r in route_rows]
        self._req_dur = [r.duration.cells for r in route_rows]
        self._rejects = [r.rejects.counts for r in route_rows]
        self._up_dur = [u.duration.cells for u in upstream_rows]
        self._up_err = [u.errors.counts for u in upstream_rows]

    def route_index(self, route: str | None) -> int:
        """The ``route_idx`` of a route name (None -> the ``_none`` index)."""
        return self._routes.index(NO_ROUTE if route is None else route)

    def upstream_index(self, upstream: str) -> int:
        return self._upstreams.index(upstream)

    # The replay store's hooks (fastgate.auth.replay binds them once; plain Python: a few list
    # operations, no prometheus_client).

    def replay_result(self, store_idx: int, result: int) -> None:
        """One answered replay-store check (``result``: a ``fastgate.auth.replay`` code)."""
        self._replay_checks[store_idx][result] += 1

    def replay_error(self, store_idx: int, kind_idx: int) -> None:
        """One replay-store failure (``kind_idx`` indexes ``REPLAY_ERROR_KINDS``)."""
        self._replay_errors[store_idx][kind_idx] += 1

    def replay_observe(self, seconds: float) -> None:
        """One redis round trip."""
        cells = self._replay_dur
        cells[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        cells[-1] += seconds


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


class _Families:
    """The metric families of SPEC §7 (+ config reloads), registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        h = _HELP
        self.requests = Counter(
            "fastgate_requests_total", h["requests"], ["route", "status_class"], registry=r
        )
        self.request_duration = Histogram(
            "fastgate_request_duration_seconds", h["request_duration"], ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejects = Counter(
            "fastgate_rejects_total", h["rejects"], ["route", "reason"], registry=r
        )
        self.verify_duration = Histogram(
            "fastgate_verify_duration_seconds", h["verify_duration"],
            buckets=VERIFY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_duration = Histogram(
            "fastgate_upstream_duration_seconds", h["upstream_duration"], ["upstream"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "fastgate_upstream_errors_total", h["upstream_errors"], ["upstream", "kind"],
            registry=r,
        )  # fmt: skip
        self.cache_lookups = Counter(
            "fastgate_token_cache_lookups_total", h["cache_lookups"], ["result"], registry=r
        )
        # Each worker has its own token cache: the total is the sum over live workers.
        self.cache_entries = Gauge(
            "fastgate_token_cache_entries", h["cache_entries"],
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip
        self.jwks_fetches = Counter(
            "fastgate_jwks_fetches_total", h["jwks_fetches"], ["provider", "result"], registry=r
        )
        self.jwks_fetch_duration = Histogram(
            "fastgate_jwks_fetch_duration_seconds", h["jwks_fetch_duration"], ["provider"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        # Every worker fetches its own keys. The minimum over live workers is what matters:
        # "== 0" must fire when ANY worker has no keys (it answers jwks_unavailable), which
        # max or sum would hide; in steady state all workers hold the same set, so min is
        # also the provider's key count. (liveall would add a pid label SPEC §7 does not have.)
        self.jwks_keys = Gauge(
            "fastgate_jwks_keys", h["jwks_keys"], ["provider"],
            multiprocess_mode="livemin", registry=r,
        )  # fmt: skip
        # The oldest keys over live workers: an alert on age must see the one worker whose
        # refresh is failing; min would let one fresh worker mask the stale ones.
        self.jwks_age = Gauge(
            "fastgate_jwks_age_seconds", h["jwks_age"], ["provider"],
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self.inflight = Gauge(
            "fastgate_inflight_requests", h["inflight"], multiprocess_mode="livesum", registry=r
        )
        # Every worker sets 1; max keeps one series per (version, extension). live*: after an
        # upgrade the dead workers' version disappears with mark_process_dead.
        self.build_info = Gauge(
            "fastgate_build_info", h["build_info"], ["version", "extension"],
            multiprocess_mode="livemax", registry=r,
        )  # fmt: skip
        self.config_reloads = Counter(
            "fastgate_config_reloads_total", h["config_reloads"], ["result"], registry=r
        )
        self.replay_checks = Counter(
            "fastgate_replay_store_checks_total", h["replay_checks"], ["store", "result"],
            registry=r,
        )  # fmt: skip
        self.replay_errors = Counter(
            "fastgate_replay_store_errors_total", h["replay_errors"], ["store", "kind"],
            registry=r,
        )  # fmt: skip
        self.replay_duration = Histogram(
            "fastgate_replay_store_duration_seconds", h["replay_duration"], ["store"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip


class _WithoutCreated:
    """A registry view without the ``*_created`` samples.

    They are not SPEC §7 series, and multi-process collection has none: single- and
    multi-process scrapes stay the same shape. (prometheus_client's switch for this,
    ``disable_created_metrics()``, is process-global.)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        for metric in self._registry.collect():
            if metric.type in ("counter", "histogram"):
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


# -- multi-process mode ------------------------------------------------------------------------


def _multiprocess_dir() -> str | None:
    """The multiproc directory, checking that prometheus_client agrees about the mode."""
    path = os.environ.get(MULTIPROC_ENV) or None
    mmaped = bool(getattr(_pc_values.ValueClass, "_multiprocess", False))
    if (path is not None) != mmaped:
        raise RuntimeError(
            f"metrics: {MULTIPROC_ENV} was changed after prometheus_client chose its mode; "
            "call fastgate.ops.metrics.setup_multiprocess(dir) before creating Metrics"
        )
    return path


def setup_multiprocess(path: str | os.PathLike[str], *, clean: bool = False) -> str:
    """Switch this process (and the workers it forks or spawns) to multi-process metrics.

    Call it in the supervisor before any worker starts and before any Metrics exists in this
    process, with ``clean=True``: files of an earlier run would otherwise be summed into the
    new one. Workers never clean (they would delete each other's counts); spawned workers
    inherit the environment variable, forked ones this module state. The directory is private
    (0700): the files are writable mmaps; tmpfs (/dev/shm, $XDG_RUNTIME_DIR) keeps their pages
    off the disk.
    """
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if clean:
        for stale in directory.glob("*.db"):
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client picks its value class once, at import (values.ValueClass), and every
    # metric child created afterwards looks it up there: re-pick it now that the variable is set.
    _pc_values.ValueClass = _pc_values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return str(directory)


def collect_multiprocess(path: str | os.PathLike[str]) -> bytes:
    """One exposition of every worker's files in ``path`` (counters and histograms summed)."""
    registry = CollectorRegistry(auto_describe=False)
    _pc_multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return bytes(generate_latest(registry))


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """A worker exited: drop its live gauges (in-flight, cache entries, JWKS keys/age, build info).

    Its counter and histogram files stay: counters must not go back when a worker dies.
    """
    directory = path if path is not None else os.environ.get(MULTIPROC_ENV)
    if directory is None:
        raise RuntimeError(f"metrics: {MULTIPROC_ENV} is not set")
    _pc_multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def multiprocess_ready(path: str | os.PathLike[str], providers: Iterable[str]) -> dict[str, bool]:
    """Readiness for the supervisor's ``/readyz``: provider -> every live worker has keys.

    Reads the ``fastgate_jwks_keys`` gauge files (min over live workers). A provider no live
    worker has reported yet is not ready.
    """
    files = [str(f) for f in Path(path).glob("gauge_livemin_*.db")]
    lowest: dict[str, float] = {}
    merged = _pc_multiprocess.MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
    for metric in merged:
        if metric.name != "fastgate_jwks_keys":
            continue
        for sample in metric.samples:
            lowest[sample.labels["provider"]] = sample.value
    return {p: lowest.get(p, 0.0) > 0 for p in providers}


def metrics_for(config: GatewayConfig) -> Metrics:
    """Metrics labelled with a gateway config's route, provider and upstream names."""
    return Metrics(routes=[r.name for r in config.routes], providers=list(config.providers),
                   upstreams=list(config.upstreams), enabled=config.metrics,
                   public_routes=[r.name for r in config.routes if r.auth is None])
