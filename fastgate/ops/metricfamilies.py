"""The Prometheus metric families (SPEC §7): names, help texts, label values, bucket bounds.

Names and labels are the SPEC §7 contract. Label values come only from closed sets: the
configured route, provider and upstream names, ``Reason.label``, the status classes 1xx..5xx,
the upstream error kinds and fixed results. Nothing from a token or a raw path ever becomes
a label value (unbounded cardinality, and an attacker-controlled one).

Gauge aggregation across workers (the ``multiprocess_mode`` of each gauge) is chosen per gauge
below; every gauge uses a ``live*`` mode so a dead worker's values leave the scrape once
``mark_process_dead`` ran. No mode that keeps a ``pid`` label is used: SPEC §7 fixes the label
sets.

Owns: :class:`_Families` (every family, registered once per registry), the closed label value
sets, the bucket bounds, the ``fastgate_build_info`` label values and the check on configured
names before they become label values.
May import: prometheus_client, ``fastgate`` (its version), ``fastgate.token`` (which verifier runs).
"""

from __future__ import annotations

import importlib.machinery
from collections.abc import Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
