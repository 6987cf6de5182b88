"""Local counts of the metrics and their flush into the prometheus_client children.

The data plane adds to plain per-process lists: a :class:`_Row` of counts per labelled counter
row, the cells of a :class:`_Histo` per histogram child. ``Metrics.flush`` moves the deltas
into the prometheus_client children, which were all created (``.labels()``) when the names
were bound. :class:`_RouteRows` and :class:`_UpstreamRows` hold the rows of one route or
upstream name (a name keeps its rows across reloads).
May import: ``fastgate.ops.metricfamilies``, ``fastgate.token.reasons``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

from fastgate.ops.metricfamilies import (
    LATENCY_BUCKETS,
    STATUS_CLASSES,
    UPSTREAM_ERROR_KINDS,
    _Families,
)
from fastgate.token.reasons import REJECT_REASONS, Reason

_N_REASONS: Final = max(Reason) + 1


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
