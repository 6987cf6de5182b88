# cython: language_level=3, embedsignature=True, wraparound=True, boundscheck=True
"""The metrics hot path, compiled: the per-request counter updates of
:class:`fastgate.ops.metrics.MetricsBinding` (its base class).

Each method adds to plain lists that ``Metrics.flush`` exports to prometheus-client once a
second and on scrape (docs/operations.md); compiled so that the five calls a request makes
cost C calls instead of Python frames. The bucket bounds, status-class and error-kind slots
are given once by :func:`configure` (fastgate.ops.metricfamilies owns their values,
fastgate.ops.metricbinding makes the call).
"""

cdef double LAT[64]
cdef double VER[64]
cdef Py_ssize_t NLAT = 0
cdef Py_ssize_t NVER = 0
cdef int STATUS_SLOT[10]
cdef dict KIND_SLOT = {}


def configure(latency, verify, status_slot, kind_slot):
    """Bucket upper bounds (ascending), the slot of each status class, the slot of each
    upstream error kind."""
    global NLAT, NVER, KIND_SLOT
    if len(latency) > 64 or len(verify) > 64 or len(status_slot) != 10:
        raise ValueError("bucket or slot table out of range")
    for i, b in enumerate(latency):
        LAT[i] = b
    NLAT = len(latency)
    for i, b in enumerate(verify):
        VER[i] = b
    NVER = len(verify)
    for i, s in enumerate(status_slot):
        STATUS_SLOT[i] = s
    KIND_SLOT = dict(kind_slot)


cdef inline Py_ssize_t bucket(double* bounds, Py_ssize_t n, double x):
    """bisect_left: the first bucket whose upper bound is >= x (n: the +Inf bucket)."""
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if bounds[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef class Counters:
    """Per-request counters (see the module docstring); the lists are MetricsBinding's."""

    cdef public list _req  # [route_idx][status slot]
    cdef public list _req_dur  # [route_idx][bucket..., +Inf, sum]
    cdef public list _rejects  # [route_idx][Reason]
    cdef public list _up_dur
    cdef public list _up_err
    cdef public list _verify  # shared by every binding of one Metrics
    cdef public list _cache  # [miss, hit]
    cdef public list _gauges  # [inflight, cache entries]

    cpdef void request_done(self, Py_ssize_t route_idx, int status, double seconds):
        """One finished request (rejects included): its status class and its duration."""
        cdef list row = self._req[route_idx]
        cdef Py_ssize_t slot = STATUS_SLOT[status // 100] if 0 <= status < 1000 else 4
        row[slot] += 1
        cells = <list>self._req_dur[route_idx]
        slot = bucket(LAT, NLAT, seconds)
        cells[slot] += 1
        cells[-1] += seconds

    cpdef void reject(self, Py_ssize_t route_idx, int reason):
        """An auth reject (also call ``request_done`` for the request). OK is not counted."""
        cdef list row = self._rejects[route_idx]
        row[reason] += 1

    cpdef void verify_observe(self, double seconds):
        cdef list cells = self._verify
        cdef Py_ssize_t slot = bucket(VER, NVER, seconds)
        cells[slot] += 1
        cells[-1] += seconds

    cpdef void cache_lookup(self, bint hit):
        self._cache[1 if hit else 0] += 1

    cpdef void cache_entries(self, Py_ssize_t n):
        self._gauges[1] = n

    cpdef void upstream_observe(self, Py_ssize_t upstream_idx, double seconds):
        cdef list cells = self._up_dur[upstream_idx]
        cdef Py_ssize_t slot = bucket(LAT, NLAT, seconds)
        cells[slot] += 1
        cells[-1] += seconds

    cpdef void upstream_error(self, Py_ssize_t upstream_idx, str kind):
        """``kind`` is ``UpstreamError.kind``."""
        cdef list row = self._up_err[upstream_idx]
        row[KIND_SLOT[kind]] += 1

    cpdef void inflight_inc(self):
        self._gauges[0] += 1

    cpdef void inflight_dec(self):
        self._gauges[0] -= 1
