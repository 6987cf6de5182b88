"""What the data plane counts into: :class:`MetricsBinding`, over the compiled ``_counters``.

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

Owns: :class:`MetricsBinding` (its hot-path methods are compiled in
:class:`fastgate.ops._counters.Counters`, configured here once with the bucket bounds and the
status-class and error-kind slots; the replay store's hooks are plain Python), and the slots of
the gauges list every binding of one ``Metrics`` shares.
May import: ``fastgate.ops._counters``, ``fastgate.ops.metricfamilies``,
``fastgate.ops.metricrows``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

from fastgate.ops._counters import Counters, configure
from fastgate.ops.metricfamilies import (
    LATENCY_BUCKETS,
    NO_ROUTE,
    UPSTREAM_ERROR_KINDS,
    VERIFY_BUCKETS,
)
from fastgate.ops.metricrows import _RouteRows, _UpstreamRows

# status // 100 -> slot in a route's requests row (slot i is STATUS_CLASSES[i]). A status
# outside 100..599 (RFC 9110 §15) is a gateway bug; it is counted as a server error.
_STATUS_SLOT: Final = (4, 0, 1, 2, 3, 4, 4, 4, 4, 4)
_KIND_SLOT: Final = {kind: i for i, kind in enumerate(UPSTREAM_ERROR_KINDS)}
_INFLIGHT: Final = 0  # slots of the shared gauges list
_CACHE_ENTRIES: Final = 1
configure(LATENCY_BUCKETS, VERIFY_BUCKETS, _STATUS_SLOT, _KIND_SLOT)


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
