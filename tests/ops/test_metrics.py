"""fastgate.ops.metrics: SPEC §7 names and labels, exact counts, closed label values, buckets,
multi-process aggregation with real worker processes, and the disabled no-op object."""

from __future__ import annotations

import importlib.machinery
import inspect
import json
import multiprocessing
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

import fastgate
from fastgate.auth import replay
from fastgate.ops.metrics import (
    CONTENT_TYPE,
    LATENCY_BUCKETS,
    NO_ROUTE,
    REPLAY_ERROR_KINDS,
    REPLAY_RESULTS,
    REPLAY_STORES,
    STATUS_CLASSES,
    UPSTREAM_ERROR_KINDS,
    VERIFY_BUCKETS,
    Metrics,
    NullMetrics,
    build_extension,
    collect_multiprocess,
    mark_process_dead,
    multiprocess_ready,
    setup_multiprocess,
)
from fastgate.token.reasons import REJECT_REASONS, Reason

# SPEC §7 (+ fastgate_config_reloads_total from the operations issue and the replay store's
# three from issue 11), written out here on purpose: a rename in metricfamilies.py must fail
# this test, not follow it.
SPEC: dict[str, tuple[str, frozenset[str]]] = {
    "fastgate_requests_total": ("counter", frozenset({"route", "status_class"})),
    "fastgate_request_duration_seconds": ("histogram", frozenset({"route"})),
    "fastgate_rejects_total": ("counter", frozenset({"route", "reason"})),
    "fastgate_verify_duration_seconds": ("histogram", frozenset()),
    "fastgate_upstream_duration_seconds": ("histogram", frozenset({"upstream"})),
    "fastgate_upstream_errors_total": ("counter", frozenset({"upstream", "kind"})),
    "fastgate_token_cache_lookups_total": ("counter", frozenset({"result"})),
    "fastgate_token_cache_entries": ("gauge", frozenset()),
    "fastgate_jwks_fetches_total": ("counter", frozenset({"provider", "result"})),
    "fastgate_jwks_fetch_duration_seconds": ("histogram", frozenset({"provider"})),
    "fastgate_jwks_keys": ("gauge", frozenset({"provider"})),
    "fastgate_jwks_age_seconds": ("gauge", frozenset({"provider"})),
    "fastgate_inflight_requests": ("gauge", frozenset()),
    "fastgate_build_info": ("gauge", frozenset({"version", "extension"})),
    "fastgate_config_reloads_total": ("counter", frozenset({"result"})),
    "fastgate_replay_store_checks_total": ("counter", frozenset({"store", "result"})),
    "fastgate_replay_store_errors_total": ("counter", frozenset({"store", "kind"})),
    "fastgate_replay_store_duration_seconds": ("histogram", frozenset({"store"})),
}
ADDITIONS = {"fastgate_config_reloads_total", "fastgate_replay_store_checks_total",
             "fastgate_replay_store_errors_total", "fastgate_replay_store_duration_seconds"}

ROUTES = ("orders", "public")
PROVIDERS = ("okta", "cognito")
UPSTREAMS = ("orders-svc", "legacy")
NONE_IDX = len(ROUTES)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy/grafana/fastgate-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> tuple[dict[str, str], Samples]:
    """Families (SPEC name -> type) and samples ((name, labels) -> value) of an exposition."""
    families: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        name = family.name + "_total" if family.type == "counter" else family.name
        families[name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def make(**kw: Any) -> Metrics:
    return Metrics(routes=ROUTES, providers=PROVIDERS, upstreams=UPSTREAMS, **kw)


# -- names, labels, shape ------------------------------------------------------------------------


def test_exposition_has_exactly_the_spec_series() -> None:
    m = make()
    m.age("okta", 1.0)  # the age series exists once a source reported it
    families, samples = parse(m.render())
    assert families == {name: typ for name, (typ, _) in SPEC.items()}
    for (sample_name, labels), _ in samples.items():
        family = next(f for f in SPEC if sample_name == f or sample_name.startswith(f + "_"))
        typ, label_names = SPEC[family]
        keys = {k for k, _ in labels}
        if typ == "histogram":
            assert sample_name in (family + "_bucket", family + "_sum", family + "_count")
            expected = label_names | {"le"} if sample_name.endswith("_bucket") else label_names
            assert keys == expected, sample_name
        else:
            # No *_created series: they are not in SPEC §7 (and multi-process mode has none).
            assert sample_name == family, sample_name
            assert keys == label_names, sample_name


def test_content_type_is_prometheus_text() -> None:
    assert CONTENT_TYPE.startswith("text/plain; version=")


def test_every_child_is_pre_bound_at_start() -> None:
    _, s = parse(make().render())
    for route in (*ROUTES, NO_ROUTE):
        for cls in STATUS_CLASSES:
            assert value(s, "fastgate_requests_total", route=route, status_class=cls) == 0
        for reason in REJECT_REASONS:
            assert value(s, "fastgate_rejects_total", route=route, reason=reason.label) == 0
        assert value(s, "fastgate_request_duration_seconds_count", route=route) == 0
    for upstream in UPSTREAMS:
        for kind in UPSTREAM_ERROR_KINDS:
            assert value(s, "fastgate_upstream_errors_total", upstream=upstream, kind=kind) == 0
    for provider in PROVIDERS:
        assert value(s, "fastgate_jwks_keys", provider=provider) == 0
        for result in ("success", "failure"):
            assert value(s, "fastgate_jwks_fetches_total", provider=provider, result=result) == 0
    assert ("fastgate_rejects_total", frozenset({("route", "orders"), ("reason", "ok")})) not in s
    for store in REPLAY_STORES:
        for result in REPLAY_RESULTS:
            assert value(s, "fastgate_replay_store_checks_total", store=store, result=result) == 0
        for kind in REPLAY_ERROR_KINDS:
            assert value(s, "fastgate_replay_store_errors_total", store=store, kind=kind) == 0
    # Only redis round trips are timed: the memory store has no histogram series.
    assert value(s, "fastgate_replay_store_duration_seconds_count", store="redis") == 0
    assert not any(name.startswith("fastgate_replay_store_duration")
                   and dict(labels)["store"] == "memory" for (name, labels) in s)  # fmt: skip


def test_replay_label_tuples_follow_the_replay_codes() -> None:
    """fastgate.auth.replay indexes the metrics rows with its codes and constants."""
    assert REPLAY_RESULTS[replay.FRESH] == "fresh"
    assert REPLAY_RESULTS[replay.REPLAYED] == "replayed"
    assert REPLAY_RESULTS[replay.NONCE_UNKNOWN] == "nonce_unknown"
    assert REPLAY_RESULTS[replay.UNAVAILABLE] == "unavailable"
    assert len(REPLAY_RESULTS) == 4
    assert REPLAY_STORES[replay.STORE_MEMORY] == "memory"
    assert REPLAY_STORES[replay.STORE_REDIS] == "redis"
    kinds = {replay.ERR_TIMEOUT: "timeout", replay.ERR_CONNECTION: "connection",
             replay.ERR_PROTOCOL: "protocol", replay.ERR_FULL: "full"}  # fmt: skip
    assert {i: REPLAY_ERROR_KINDS[i] for i in kinds} == kinds
    assert len(REPLAY_ERROR_KINDS) == 4


# -- exact counts --------------------------------------------------------------------------------


def test_counts_after_known_calls_are_exact() -> None:
    m = make()
    for _ in range(3):
        m.request_done(0, 200, 0.0003)
    m.request_done(0, 404, 0.001)  # exactly on a bound: Prometheus buckets are "<= le"
    m.request_done(1, 503, 1.5)
    m.request_done(NONE_IDX, 404, 0.00001)
    m.reject(0, Reason.TOKEN_EXPIRED)
    m.reject(0, Reason.TOKEN_EXPIRED)
    m.reject(1, Reason.JWKS_UNAVAILABLE)
    m.reject(0, Reason.OK)  # not a reject: not counted
    m.verify_observe(0.000003)
    m.verify_observe(0.00004)
    for hit in (True, True, True, False):
        m.cache_lookup(hit)
    m.cache_entries(7)
    m.upstream_observe(0, 0.0004)
    m.upstream_error(1, "timeout")
    m.upstream_error(1, "timeout")
    m.upstream_error(0, "protocol")
    for _ in range(3):
        m.inflight_inc()
    m.inflight_dec()
    m.fetch("okta", "success", 0.05)
    m.fetch("okta", "failure", 5.0)
    m.keys("okta", 3)
    m.age("okta", 12.5)
    m.config_reload("success")
    m.config_reload("failure")
    m.config_reload("failure")
    for _ in range(4):
        m.replay_result(replay.STORE_REDIS, replay.FRESH)
    m.replay_result(replay.STORE_REDIS, replay.REPLAYED)
    m.replay_result(replay.STORE_MEMORY, replay.UNAVAILABLE)
    m.replay_result(replay.STORE_MEMORY, replay.NONCE_UNKNOWN)
    m.replay_error(replay.STORE_MEMORY, replay.ERR_FULL)
    m.replay_error(replay.STORE_REDIS, replay.ERR_TIMEOUT)
    m.replay_error(replay.STORE_REDIS, replay.ERR_TIMEOUT)
    m.replay_observe(0.0002)
    m.replay_observe(0.05)  # on a bound

    _, s = parse(m.render())
    assert value(s, "fastgate_requests_total", route="orders", status_class="2xx") == 3
    assert value(s, "fastgate_requests_total", route="orders", status_class="4xx") == 1
    assert value(s, "fastgate_requests_total", route="public", status_class="5xx") == 1
    assert value(s, "fastgate_requests_total", route=NO_ROUTE, status_class="4xx") == 1
    assert value(s, "fastgate_requests_total", route="public", status_class="2xx") == 0
    dur = "fastgate_request_duration_seconds"
    assert value(s, dur + "_bucket", route="orders", le="0.00025") == 0
    assert value(s, dur + "_bucket", route="orders", le="0.0005") == 3
    assert value(s, dur + "_bucket", route="orders", le="0.001") == 4
    assert value(s, dur + "_bucket", route="orders", le="+Inf") == 4
    assert value(s, dur + "_count", route="orders") == 4
    assert value(s, dur + "_sum", route="orders") == pytest.approx(0.0019)
    assert value(s, dur + "_bucket", route="public", le="1.0") == 0
    assert value(s, dur + "_bucket", route="public", le="2.5") == 1
    assert value(s, dur + "_bucket", route=NO_ROUTE, le="5e-05") == 1
    rej = "fastgate_rejects_total"
    assert value(s, rej, route="orders", reason="token_expired") == 2
    assert value(s, rej, route="public", reason="jwks_unavailable") == 1
    assert sum(v for (n, _), v in s.items() if n == rej) == 3
    ver = "fastgate_verify_duration_seconds"
    assert value(s, ver + "_bucket", le="5e-06") == 1
    assert value(s, ver + "_bucket", le="5e-05") == 2
    assert value(s, ver + "_count") == 2
    assert value(s, "fastgate_token_cache_lookups_total", result="hit") == 3
    assert value(s, "fastgate_token_cache_lookups_total", result="miss") == 1
    assert value(s, "fastgate_token_cache_entries") == 7
    assert value(s, "fastgate_upstream_duration_seconds_count", upstream="orders-svc") == 1
    assert value(s, "fastgate_upstream_duration_seconds_count", upstream="legacy") == 0
    err = "fastgate_upstream_errors_total"
    assert value(s, err, upstream="legacy", kind="timeout") == 2
    assert value(s, err, upstream="orders-svc", kind="protocol") == 1
    assert value(s, err, upstream="orders-svc", kind="timeout") == 0
    assert value(s, "fastgate_inflight_requests") == 2
    fetches = "fastgate_jwks_fetches_total"
    assert value(s, fetches, provider="okta", result="success") == 1
    assert value(s, fetches, provider="okta", result="failure") == 1
    assert value(s, fetches, provider="cognito", result="success") == 0
    assert value(s, "fastgate_jwks_fetch_duration_seconds_count", provider="okta") == 2
    assert value(s, "fastgate_jwks_fetch_duration_seconds_sum", provider="okta") == 5.05
    assert value(s, "fastgate_jwks_keys", provider="okta") == 3
    assert value(s, "fastgate_jwks_keys", provider="cognito") == 0
    assert value(s, "fastgate_jwks_age_seconds", provider="okta") == 12.5
    assert ("fastgate_jwks_age_seconds", frozenset({("provider", "cognito")})) not in s
    assert value(s, "fastgate_config_reloads_total", result="success") == 1
    assert value(s, "fastgate_config_reloads_total", result="failure") == 2
    checks = "fastgate_replay_store_checks_total"
    assert value(s, checks, store="redis", result="fresh") == 4
    assert value(s, checks, store="redis", result="replayed") == 1
    assert value(s, checks, store="redis", result="unavailable") == 0
    assert value(s, checks, store="memory", result="unavailable") == 1
    assert value(s, checks, store="memory", result="nonce_unknown") == 1
    assert value(s, checks, store="memory", result="fresh") == 0
    errors = "fastgate_replay_store_errors_total"
    assert value(s, errors, store="memory", kind="full") == 1
    assert value(s, errors, store="redis", kind="timeout") == 2
    assert value(s, errors, store="redis", kind="full") == 0
    rdur = "fastgate_replay_store_duration_seconds"
    assert value(s, rdur + "_bucket", store="redis", le="0.0001") == 0
    assert value(s, rdur + "_bucket", store="redis", le="0.00025") == 1
    assert value(s, rdur + "_bucket", store="redis", le="0.025") == 1
    assert value(s, rdur + "_bucket", store="redis", le="0.05") == 2
    assert value(s, rdur + "_count", store="redis") == 2
    assert value(s, rdur + "_sum", store="redis") == pytest.approx(0.0502)


def test_status_classes() -> None:
    m = make()
    for status in (101, 200, 299, 304, 400, 499, 500, 599):
        m.request_done(0, status, 0.001)
    m.request_done(0, 0, 0.001)  # not an HTTP status: a bug of ours, counted as a server error
    m.request_done(0, 700, 0.001)
    _, s = parse(m.render())
    counts = {c: value(s, "fastgate_requests_total", route="orders", status_class=c)
              for c in STATUS_CLASSES}  # fmt: skip
    assert counts == {"1xx": 1, "2xx": 2, "3xx": 1, "4xx": 2, "5xx": 4}


def test_render_twice_does_not_count_twice() -> None:
    m = make()
    m.request_done(0, 200, 0.01)
    m.cache_lookup(True)
    _, first = parse(m.render())
    _, second = parse(m.render())
    assert first == second
    m.request_done(0, 200, 0.01)
    _, third = parse(m.render())
    assert value(third, "fastgate_requests_total", route="orders", status_class="2xx") == 2
    assert value(third, "fastgate_request_duration_seconds_sum", route="orders") == 0.02


def test_cache_entries_are_read_from_the_callback_at_scrape() -> None:
    m = make()
    size = [5]
    m.track_cache_entries(lambda: size[0])
    _, s = parse(m.render())
    assert value(s, "fastgate_token_cache_entries") == 5
    size[0] = 9
    _, s = parse(m.render())
    assert value(s, "fastgate_token_cache_entries") == 9


# -- hot path: no .labels(), closed label values -------------------------------------------------


def test_hot_path_and_flush_never_call_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    m = make()
    calls: list[tuple[Any, ...]] = []

    def spy(self: MetricWrapperBase, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        raise AssertionError(".labels() on the hot path")

    monkeypatch.setattr(MetricWrapperBase, "labels", spy)
    for _ in range(10):
        m.inflight_inc()
        m.cache_lookup(False)
        m.verify_observe(0.0001)
        m.upstream_observe(1, 0.002)
        m.upstream_error(0, "reset")
        m.reject(1, Reason.SIGNATURE_INVALID)
        m.request_done(1, 401, 0.003)
        m.inflight_dec()
        m.replay_result(replay.STORE_REDIS, replay.REPLAYED)
        m.replay_error(replay.STORE_REDIS, replay.ERR_CONNECTION)
        m.replay_observe(0.0004)
    m.fetch("cognito", "success", 0.1)
    m.keys("cognito", 2)
    m.config_reload("success")
    m.flush()
    m.render()
    assert calls == []


def test_children_are_the_pre_bound_objects() -> None:
    m = make()
    for row, route in enumerate((*ROUTES, NO_ROUTE)):
        rows = m._route_rows[route]
        # The hot path's list for route_idx `row` is that route's row of pre-bound children.
        assert m._req[row] is rows.requests.counts
        for slot, cls in enumerate(STATUS_CLASSES):
            child = m._families.requests.labels(route=route, status_class=cls)
            assert rows.requests.children[slot] is child
        reason = Reason.AUDIENCE_MISMATCH
        assert m._rejects[row] is rows.rejects.counts
        assert rows.rejects.children[reason] is m._families.rejects.labels(
            route=route, reason=reason.label
        )
        assert rows.rejects.children[Reason.OK] is None


def test_a_binding_per_configuration_survives_a_reload() -> None:
    """Requests that started before a reload finish under the route they matched."""
    m = make()
    old = m.bind(routes=ROUTES, upstreams=UPSTREAMS)
    new = m.bind(routes=("public", "added"), upstreams=("legacy",))
    old.inflight_inc()
    new.inflight_inc()
    old.request_done(0, 200, 0.001)  # orders, in the old configuration
    new.request_done(0, 200, 0.001)  # public, in the new one
    new.request_done(new.route_index(None), 404, 0.001)
    old.reject(1, Reason.TOKEN_MISSING)  # public
    old.upstream_error(1, "reset")  # legacy
    new.upstream_error(0, "reset")  # legacy
    new.cache_lookup(True)
    old.verify_observe(0.001)
    old.replay_result(replay.STORE_MEMORY, replay.FRESH)
    new.replay_result(replay.STORE_MEMORY, replay.FRESH)
    new.replay_observe(0.001)
    _, s = parse(m.render())
    assert value(s, "fastgate_requests_total", route="orders", status_class="2xx") == 1
    assert value(s, "fastgate_requests_total", route="public", status_class="2xx") == 1
    assert value(s, "fastgate_requests_total", route="added", status_class="2xx") == 0
    assert value(s, "fastgate_requests_total", route=NO_ROUTE, status_class="4xx") == 1
    assert value(s, "fastgate_rejects_total", route="public", reason="token_missing") == 1
    assert value(s, "fastgate_upstream_errors_total", upstream="legacy", kind="reset") == 2
    assert value(s, "fastgate_inflight_requests") == 2  # shared by every binding
    assert value(s, "fastgate_token_cache_lookups_total", result="hit") == 1
    assert value(s, "fastgate_verify_duration_seconds_count") == 1
    # The replay store's series are not per configuration: every binding shares them.
    assert value(s, "fastgate_replay_store_checks_total", store="memory", result="fresh") == 2
    assert value(s, "fastgate_replay_store_duration_seconds_count", store="redis") == 1


def test_label_values_only_from_configured_names() -> None:
    m = make()
    m.request_done(0, 200, 0.001)
    m.reject(0, Reason.ISSUER_UNKNOWN)
    m.fetch("okta", "success", 0.1)
    m.age("cognito", 3)
    m.replay_result(replay.STORE_REDIS, replay.UNAVAILABLE)
    m.replay_error(replay.STORE_REDIS, replay.ERR_PROTOCOL)
    # A token's iss, a raw path or an unknown result never becomes a label: they are refused.
    with pytest.raises(ValueError):
        m.fetch("https://evil.example/", "success", 0.1)
    with pytest.raises(ValueError):
        m.keys("/api/orders?access_token=x", 1)
    with pytest.raises(ValueError):
        m.fetch("okta", "not_modified", 0.1)
    with pytest.raises(ValueError):
        m.config_reload("maybe")
    with pytest.raises(KeyError):
        m.upstream_error(0, "weird")
    allowed = {
        "route": {*ROUTES, NO_ROUTE},
        "status_class": set(STATUS_CLASSES),
        "reason": {r.label for r in REJECT_REASONS},
        "upstream": set(UPSTREAMS),
        "kind": set(UPSTREAM_ERROR_KINDS) | set(REPLAY_ERROR_KINDS),
        "provider": set(PROVIDERS),
        "result": {"hit", "miss", "success", "failure", *REPLAY_RESULTS},
        "store": set(REPLAY_STORES),
        "version": {fastgate.__version__},
        "extension": {"cython"},
    }
    _, samples = parse(m.render())
    for (name, labels), _ in samples.items():
        for key, val in labels:
            if key == "le":
                continue
            assert val in allowed[key], (name, key, val)


def test_configured_names_are_checked() -> None:
    with pytest.raises(ValueError, match="duplicate route"):
        Metrics(routes=("a", "a"), providers=(), upstreams=())
    with pytest.raises(ValueError, match="reserved"):
        Metrics(routes=("a", NO_ROUTE), providers=(), upstreams=())
    with pytest.raises(ValueError, match="non-empty"):
        Metrics(routes=("",), providers=(), upstreams=())


def test_indexes() -> None:
    m = make()
    assert m.route_index("public") == 1
    assert m.route_index(None) == NONE_IDX
    assert m.upstream_index("legacy") == 1


def test_reconfigure_rebinds_names_and_keeps_counts() -> None:
    m = make()
    m.request_done(0, 200, 0.001)  # orders
    m.keys("cognito", 4)
    m.reconfigure(routes=("new", "orders"), providers=("okta",), upstreams=("orders-svc",))
    m.request_done(1, 200, 0.001)  # orders again, at its new index
    m.request_done(0, 500, 0.001)
    assert m.route_index(None) == 2
    # The removed provider's key source may still report while it stops: ignored.
    m.keys("cognito", 5)
    m.fetch("cognito", "success", 0.1)
    m.age("cognito", 1.0)
    with pytest.raises(ValueError):
        m.keys("never-configured", 1)
    _, s = parse(m.render())
    assert value(s, "fastgate_requests_total", route="orders", status_class="2xx") == 2
    assert value(s, "fastgate_requests_total", route="new", status_class="5xx") == 1
    assert value(s, "fastgate_requests_total", route="public", status_class="2xx") == 0
    assert not any(dict(labels).get("provider") == "cognito" and not name.startswith(
        "fastgate_jwks_fetch") for (name, labels) in s)  # fmt: skip
    assert value(s, "fastgate_jwks_fetches_total", provider="cognito", result="success") == 0
    assert value(s, "fastgate_jwks_keys", provider="okta") == 0
    # Configured again later: reported again.
    m.reconfigure(routes=ROUTES, providers=PROVIDERS, upstreams=UPSTREAMS)
    m.keys("cognito", 6)
    _, s = parse(m.render())
    assert value(s, "fastgate_jwks_keys", provider="cognito") == 6


# -- buckets, build info ---------------------------------------------------------------------


def test_buckets_resolve_sub_millisecond_and_seconds() -> None:
    for buckets in (LATENCY_BUCKETS, VERIFY_BUCKETS):
        assert 5e-05 in buckets
        assert max(buckets) >= 5
        assert list(buckets) == sorted(buckets)
    assert min(VERIFY_BUCKETS) <= 1e-05  # cache hits (µs) apart from signature checks
    _, s = parse(make().render())
    les = {dict(labels)["le"] for (name, labels) in s
           if name == "fastgate_request_duration_seconds_bucket"}  # fmt: skip
    assert {"5e-05", "0.0001", "0.001", "5.0", "10.0", "+Inf"} <= les


def test_build_info_tells_the_compiled_verifier() -> None:
    from fastgate.token import _verify

    compiled = (_verify.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert build_extension() == ("cython" if compiled else "python")
    _, s = parse(make().render())
    infos = {labels: v for (name, labels), v in s.items() if name == "fastgate_build_info"}
    assert infos == {
        frozenset({("version", fastgate.__version__), ("extension", build_extension())}): 1.0
    }


# -- disabled ------------------------------------------------------------------------------


def test_disabled_metrics_are_no_ops() -> None:
    m = Metrics(routes=ROUTES, providers=PROVIDERS, upstreams=UPSTREAMS, enabled=False)
    assert isinstance(m, NullMetrics)
    assert isinstance(m, Metrics)
    assert m.enabled is False
    m.request_done(0, 200, 0.1)
    m.reject(0, Reason.TOKEN_MISSING)
    m.verify_observe(0.1)
    m.cache_lookup(True)
    m.cache_entries(3)
    m.upstream_observe(0, 0.1)
    m.upstream_error(0, "connect")
    m.inflight_inc()
    m.inflight_dec()
    m.fetch("anything", "anything", 1.0)
    m.keys("anything", 1)
    m.age("anything", 1.0)
    m.config_reload("anything")
    m.replay_result(1, 3)
    m.replay_error(1, 0)
    m.replay_observe(0.1)
    m.track_cache_entries(lambda: 1)
    m.flush()
    assert m.render() == b""
    assert m.route_index(None) == NONE_IDX
    binding = m.bind(routes=("x",), upstreams=())
    binding.request_done(0, 200, 0.1)
    binding.inflight_inc()
    binding.replay_result(0, 0)
    assert binding.route_index(None) == 1


def test_null_metrics_overrides_every_public_method() -> None:
    public = {n for n, _ in inspect.getmembers(Metrics) if not n.startswith("_")}
    not_overridden = {n for n in public if n not in NullMetrics.__dict__}
    # These work on the names only (no prometheus_client state) and are shared on purpose.
    assert not_overridden == {"route_index", "upstream_index"}


def test_enabled_metrics_register_in_their_own_registry() -> None:
    from prometheus_client import REGISTRY, CollectorRegistry

    registry = CollectorRegistry()
    m = Metrics(registry, routes=ROUTES, providers=PROVIDERS, upstreams=UPSTREAMS)
    assert m.registry is registry
    assert "fastgate_requests" not in {f.name for f in REGISTRY.collect()}
    with pytest.raises(ValueError):  # one Metrics per registry
        Metrics(registry, routes=ROUTES, providers=PROVIDERS, upstreams=UPSTREAMS)


# -- multi-process ---------------------------------------------------------------------------

# What worker i does: (requests to route 0 with 200, rejects on route 1, cache hits,
# in-flight left open, okta keys, okta age, redis replay checks answered replayed)
WORK = ((1000, 7, 300, 2, 3, 10.0, 4), (2345, 11, 50, 5, 2, 40.0, 9))


def _mp_worker(directory: str, index: int, setup: bool) -> None:
    """A worker: increments known amounts, flushes, exits (run in a separate process)."""
    if setup:  # spawn: nothing inherited but the environment
        setup_multiprocess(directory)
    requests, rejects, hits, open_, okta_keys, okta_age, replays = WORK[index]
    m = Metrics(routes=ROUTES, providers=PROVIDERS, upstreams=UPSTREAMS)
    assert m.multiprocess
    for _ in range(requests):
        m.inflight_inc()
        m.request_done(0, 200, 0.0002)
        m.inflight_dec()
    for _ in range(rejects):
        m.reject(1, Reason.TOKEN_EXPIRED)
        m.request_done(1, 401, 0.00007)
    for _ in range(hits):
        m.cache_lookup(True)
    for _ in range(open_):
        m.inflight_inc()
    m.keys("okta", okta_keys)
    m.keys("cognito", 1)
    m.age("okta", okta_age)
    m.fetch("okta", "success", 0.2)
    for _ in range(replays):
        m.replay_result(replay.STORE_REDIS, replay.REPLAYED)
        m.replay_observe(0.0003)
    m.replay_error(replay.STORE_REDIS, replay.ERR_TIMEOUT)
    m.flush()


def _mp_supervisor(directory: str) -> None:
    """The fork model: a supervisor sets the directory up, counts a reload, forks two workers."""
    setup_multiprocess(directory, clean=True)
    sup = Metrics(routes=(), providers=(), upstreams=())
    sup.config_reload("success")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_mp_worker, args=(directory, i, False)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    Path(directory, "pids").write_text(" ".join(str(p.pid) for p in procs))


def _run_workers(directory: str, start_method: str) -> list[int]:
    if start_method == "spawn":
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_mp_worker, args=(directory, i, True)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        return [p.pid for p in procs if p.pid is not None]
    sup = multiprocessing.get_context("spawn").Process(target=_mp_supervisor, args=(directory,))
    sup.start()
    sup.join(90)
    assert sup.exitcode == 0
    return [int(pid) for pid in Path(directory, "pids").read_text().split()]


@pytest.fixture
def mp_dir(tmp_path: Path) -> Iterator[str]:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    yield str(directory)
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None  # the test process stays single


@pytest.mark.parametrize("start_method", ["spawn", "fork"])
def test_multiprocess_one_scrape_sums_all_workers(mp_dir: str, start_method: str) -> None:
    pids = _run_workers(mp_dir, start_method)
    _, s = parse(collect_multiprocess(mp_dir))
    total = sum(w[0] for w in WORK)
    assert value(s, "fastgate_requests_total", route="orders", status_class="2xx") == total
    assert value(s, "fastgate_requests_total", route="public", status_class="4xx") == 18
    assert value(s, "fastgate_rejects_total", route="public", reason="token_expired") == 18
    dur = "fastgate_request_duration_seconds"
    assert value(s, dur + "_count", route="orders") == total
    assert value(s, dur + "_bucket", route="orders", le="0.00025") == total
    assert value(s, dur + "_bucket", route="orders", le="0.0001") == 0
    assert value(s, dur + "_bucket", route="public", le="0.0001") == 18
    assert value(s, dur + "_sum", route="orders") == pytest.approx(total * 0.0002)
    assert value(s, "fastgate_token_cache_lookups_total", result="hit") == 350
    assert value(s, "fastgate_jwks_fetches_total", provider="okta", result="success") == 2
    assert value(s, "fastgate_jwks_fetch_duration_seconds_count", provider="okta") == 2
    replays = sum(w[6] for w in WORK)
    assert value(s, "fastgate_replay_store_checks_total", store="redis", result="replayed") \
        == replays
    assert value(s, "fastgate_replay_store_checks_total", store="memory", result="fresh") == 0
    assert value(s, "fastgate_replay_store_errors_total", store="redis", kind="timeout") == 2
    rdur = "fastgate_replay_store_duration_seconds"
    assert value(s, rdur + "_count", store="redis") == replays
    assert value(s, rdur + "_bucket", store="redis", le="0.0005") == replays
    assert value(s, rdur + "_bucket", store="redis", le="0.00025") == 0
    # Gauges: in-flight summed, keys = the lowest worker, age = the oldest worker.
    assert value(s, "fastgate_inflight_requests") == 7
    assert value(s, "fastgate_jwks_keys", provider="okta") == 2
    assert value(s, "fastgate_jwks_keys", provider="cognito") == 1
    assert value(s, "fastgate_jwks_age_seconds", provider="okta") == 40.0
    info = [labels for (name, labels) in s if name == "fastgate_build_info"]
    assert len(info) == 1 and all(k != "pid" for k, _ in info[0])
    if start_method == "fork":
        assert value(s, "fastgate_config_reloads_total", result="success") == 1
    assert multiprocess_ready(mp_dir, ["okta", "cognito", "unreported"]) == {
        "okta": True, "cognito": True, "unreported": False,
    }  # fmt: skip

    # Workers exit: their live gauges leave the scrape, their counts stay.
    for pid in pids:
        mark_process_dead(pid, mp_dir)
    _, after = parse(collect_multiprocess(mp_dir))
    assert value(after, "fastgate_requests_total", route="orders", status_class="2xx") == total
    assert not any(name == "fastgate_jwks_keys" for (name, _) in after)
    # (the fork model's supervisor has an in-flight gauge too, at 0)
    assert after.get(("fastgate_inflight_requests", frozenset()), 0.0) == 0.0
    assert multiprocess_ready(mp_dir, ["okta"]) == {"okta": False}


def test_multiprocess_keys_gauge_reports_a_worker_without_keys(mp_dir: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_mp_worker, args=(mp_dir, 0, True))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    q = ctx.Process(target=_mp_worker_without_keys, args=(mp_dir,))
    q.start()
    q.join(60)
    assert q.exitcode == 0
    _, s = parse(collect_multiprocess(mp_dir))
    assert value(s, "fastgate_jwks_keys", provider="okta") == 0
    assert multiprocess_ready(mp_dir, ["okta"]) == {"okta": False}
    assert q.pid is not None
    mark_process_dead(q.pid, mp_dir)
    assert multiprocess_ready(mp_dir, ["okta"]) == {"okta": True}


def _mp_worker_without_keys(directory: str) -> None:
    setup_multiprocess(directory)
    Metrics(routes=ROUTES, providers=PROVIDERS, upstreams=UPSTREAMS).flush()


def test_setup_multiprocess_clean_removes_stale_files(tmp_path: Path) -> None:
    stale = tmp_path / "counter_12345.db"
    stale.write_bytes(b"\0" * 16)
    keep = tmp_path / "README"
    keep.write_text("not a metrics file")
    # Run in a child: switching modes is process-wide.
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=setup_multiprocess, args=(str(tmp_path),), kwargs={"clean": True})
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert not stale.exists()
    assert keep.exists()


def test_mode_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="setup_multiprocess"):
        make()


# -- Grafana dashboard -----------------------------------------------------------------------


def test_dashboard_is_valid_and_uses_only_spec_metrics() -> None:
    with DASHBOARD.open() as f:
        dash = json.load(f)
    assert dash["schemaVersion"] >= 36
    assert any(i.get("name") == "DS_PROMETHEUS" for i in dash["__inputs"])
    exprs = [
        t["expr"] for p in dash["panels"] if p.get("type") != "row" for t in p.get("targets", [])
    ]
    assert exprs
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bfastgate_[a-z_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            used.add(base)
    spec_section7 = set(SPEC) - ADDITIONS
    assert used <= spec_section7, used - spec_section7
    assert any("histogram_quantile(0.99" in e and "request_duration_seconds_bucket" in e
               for e in exprs)  # fmt: skip
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"


# -- auth: none routes, prometheus-client internals ---------------------------------------------


def test_no_reject_series_for_auth_none_routes() -> None:
    from fastgate.config import parse_config
    from fastgate.ops.metrics import metrics_for

    config = parse_config({
        "upstreams": {"app": {"url": "http://127.0.0.1:1"}},
        "providers": {"p": {"issuer": "https://idp.example.test/", "secret": "k" * 32}},
        "routes": [
            {"name": "orders", "match": {"path": "/o"}, "upstream": "app",
             "auth": {"providers": ["p"]}},
            {"name": "public", "match": {"path": "/p"}, "upstream": "app", "auth": "none"},
        ],
    }, {})
    m = metrics_for(config)
    _, s = parse(m.render())
    rejects = {dict(labels)["route"] for (name, labels) in s if name == "fastgate_rejects_total"}
    assert rejects == {"orders", NO_ROUTE}  # 16 always-zero series fewer per public route
    for cls in STATUS_CLASSES:  # the request series of a public route are still there
        assert value(s, "fastgate_requests_total", route="public", status_class=cls) == 0
    # Should a public route ever count a reject, its series appears at the next flush.
    m.reject(m.route_index("public"), Reason.TOKEN_MISSING)
    _, s = parse(m.render())
    assert value(s, "fastgate_rejects_total", route="public", reason="token_missing") == 1
    assert ("fastgate_rejects_total",
            frozenset({("route", "public"), ("reason", "token_expired")})) not in s
    # A binding for a reloaded config that adds a public route pre-binds none for it either.
    m.bind(routes=["orders", "public", "docs"], upstreams=["app"], public_routes=["docs"])
    _, s = parse(m.render())
    assert not any(dict(labels).get("route") == "docs"
                   for (name, labels) in s if name == "fastgate_rejects_total")
    assert value(s, "fastgate_requests_total", route="docs", status_class="2xx") == 0
    # ... and the gateway's own reload path (compile_tables) binds that way.
    from dataclasses import replace

    from fastgate.app import compile_tables
    from fastgate.config import RouteConfig, RouteMatch

    reloaded = replace(config, routes=(*config.routes,
                                       RouteConfig("status", RouteMatch(path="/s"), "app")))
    compile_tables(reloaded, metrics=m)
    _, s = parse(m.render())
    assert not any(dict(labels).get("route") == "status"
                   for (name, labels) in s if name == "fastgate_rejects_total")
    assert value(s, "fastgate_requests_total", route="status", status_class="2xx") == 0


def test_prometheus_client_internals_fastgate_relies_on() -> None:
    """fastgate.ops.metrics uses two prometheus-client internals (no public API does the same):
    a Histogram child's per-bucket ``_buckets`` values and ``_sum`` (to add many observations
    at once), and ``values.ValueClass`` / ``MultiProcessValue`` (to switch to multi-process
    mode after import). pyproject.toml caps prometheus-client below the next minor release;
    if this test fails after raising the cap, adapt fastgate/ops/metricrows.py (_Histo)
    and fastgate/ops/multiprocmetrics.py (setup_multiprocess) first."""
    from prometheus_client import CollectorRegistry, Histogram
    from prometheus_client import values as pc_values

    h = Histogram("probe_seconds", "probe", registry=CollectorRegistry(), buckets=(0.1, 1.0))
    buckets = getattr(h, "_buckets", None)
    total = getattr(h, "_sum", None)
    assert isinstance(buckets, list) and len(buckets) == 3, "Histogram._buckets changed"
    assert all(callable(getattr(b, "inc", None)) and callable(getattr(b, "get", None))
               for b in buckets), "Histogram bucket values changed"
    assert callable(getattr(total, "inc", None)), "Histogram._sum changed"
    # Non-cumulative per-bucket values, exported cumulatively: what _Histo.flush assumes.
    buckets[0].inc(2)
    buckets[2].inc(1)
    total.inc(5.0)
    _, s = parse(generate_latest_of(h))
    assert value(s, "probe_seconds_bucket", le="0.1") == 2
    assert value(s, "probe_seconds_bucket", le="1.0") == 2
    assert value(s, "probe_seconds_bucket", le="+Inf") == 3
    assert value(s, "probe_seconds_sum") == 5.0
    assert hasattr(pc_values, "ValueClass"), "prometheus_client.values.ValueClass is gone"
    assert callable(getattr(pc_values, "MultiProcessValue", None)), "MultiProcessValue is gone"
    assert hasattr(pc_values.MultiProcessValue(), "_multiprocess")  # type: ignore[no-untyped-call]


def generate_latest_of(metric: Any) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(metric)
    return bytes(generate_latest(registry))
