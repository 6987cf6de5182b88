"""OpenTelemetry span export (fastgate/ops/otel.py, ``tracing.otel``): a real gateway on loopback
reports its requests to :class:`SpanSink`, whose real OTLP/HTTP exporter posts to a real
receiver (aiohttp, ``POST /v1/traces``) that decodes the protobuf with opentelemetry-proto.

Skipped without the ``otel`` extra (``pip install 'fastgate[otel]'``; the ``test`` extra
includes it).
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
trace_service = pytest.importorskip(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2")

from aiohttp import web  # noqa: E402 - after the skips

from fastgate.app import Gateway  # noqa: E402
from fastgate.config import (  # noqa: E402
    AccessLogConfig,
    Address,
    GatewayConfig,
    OtelConfig,
    RouteConfig,
    RouteMatch,
    TracingConfig,
    UpstreamConfig,
    parse_config,
)
from fastgate.errors import ConfigError  # noqa: E402
from fastgate.ops.accesslog import AccessLog  # noqa: E402
from fastgate.ops.otel import MISSING, SpanSink, Tee, request_sink  # noqa: E402
from tests.gateway_fixtures import AppServer, EchoUpstream, read_response  # noqa: E402
from tests.idp import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-t0ken"
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"
SPAN_KIND_SERVER = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER
STATUS_ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    status: int
    start: int
    end: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


def _attrs(kvs: Any) -> dict[str, Any]:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which)
    return out


@dataclass
class Receiver(AppServer):
    """An OTLP/HTTP traces endpoint: every decoded span, and every raw body."""

    spans: list[Span] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/traces", self._traces)

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.bodies.append(body)
        msg = trace_service.ExportTraceServiceRequest()
        msg.ParseFromString(body)
        for rs in msg.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(Span(
                        s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        s.kind, s.status.code, s.start_time_unix_nano,
                        s.end_time_unix_nano, _attrs(s.attributes), resource))
        return web.Response(
            body=trace_service.ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf")


def tracing(endpoint: str, sample: float = 1.0, mode: str = "pass") -> TracingConfig:
    return TracingConfig(traceparent=mode,  # type: ignore[arg-type]
                         otel=OtelConfig(enabled=True, sample=sample, endpoint=endpoint,
                                         service_name="edge-test"))


@dataclass
class Sent:
    statuses: list[int]  # per request, in order
    forwarded: list[str | None]  # the traceparent the upstream got, per admitted request


async def through_gateway(sink: SpanSink, trace: TracingConfig,
                          requests: list[tuple[str, str | None]]) -> Sent:
    """Each (target, traceparent or None) through a real gateway whose sink is ``sink``;
    then the sink's queue is flushed (off the loop: the receiver may be on it)."""
    up = await EchoUpstream.start()
    config = GatewayConfig(
        listen=Address("127.0.0.1", 0), admin=None, tracing=trace,
        upstreams={"echo": UpstreamConfig("echo", up.url)},
        routes=(RouteConfig("public", RouteMatch(path_prefix="/api/"), "echo"),))
    gw = Gateway.build(config, access_log=sink)
    await gw.start()
    statuses = []
    try:
        for target, tp in requests:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            head = f"GET {target} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n"
            if tp is not None:
                head += f"traceparent: {tp}\r\n"
            writer.write((head + "\r\n").encode())
            statuses.append((await read_response(reader)).status)
            writer.close()
        await asyncio.get_running_loop().run_in_executor(None, sink.force_flush, 20.0)
    finally:
        await gw.stop()
        await up.stop()
    forwarded = [(r.header_values("traceparent") or [None])[0] for r in up.records]
    return Sent(statuses, forwarded)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def run(loop: asyncio.AbstractEventLoop, sample: float, mode: str,
        requests: list[tuple[str, str | None]]) -> tuple[Receiver, Sent]:
    async def main() -> tuple[Receiver, Sent]:
        rx = await Receiver.start()
        trace = tracing(rx.url, sample, mode)
        sink = SpanSink(trace, schedule_delay=0.05)
        try:
            sent = await through_gateway(sink, trace, requests)
        finally:
            await loop.run_in_executor(None, sink.shutdown)
            await rx.stop()
        return rx, sent

    return loop.run_until_complete(main())


def test_sampled_requests_export_one_server_span_each(loop: asyncio.AbstractEventLoop) -> None:
    rx, sent = run(loop, 1.0, "pass", [
        (f"/api/orders/%7E42?access_token={SECRET}", f"00-{TRACE}-{PARENT}-01"),
        (f"/nowhere?api_key={SECRET}", None),
        ("/api/status/503", None),
    ])
    assert sent.statuses == [200, 404, 503]
    assert len(rx.spans) == 3
    by_path = {s.attributes["url.path"]: s for s in rx.spans}
    assert set(by_path) == {"/api/orders/%7E42", "/nowhere", "/api/status/503"}
    traced, missing, failed = (by_path["/api/orders/%7E42"], by_path["/nowhere"],
                               by_path["/api/status/503"])
    # The incoming traceparent: its trace, its parent id; a new span id.
    assert (traced.trace_id, traced.parent_span_id) == (TRACE, PARENT)
    assert traced.span_id not in ("", PARENT, "0" * 16)
    assert traced.name == "GET public" and traced.kind == SPAN_KIND_SERVER
    assert traced.attributes["http.request.method"] == "GET"
    assert traced.attributes["http.response.status_code"] == 200
    assert traced.attributes["fastgate.route"] == "public"
    assert traced.attributes["fastgate.upstream.status_code"] == 200
    assert 0 < traced.attributes["fastgate.upstream.duration"] < 5
    assert traced.attributes["fastgate.request_id"]
    assert traced.attributes["client.address"] == "127.0.0.1"
    assert "fastgate.reason" not in traced.attributes
    assert 0 < traced.end - traced.start < 5e9
    assert traced.resource["service.name"] == "edge-test"
    # No traceparent: a new trace, no parent; no route: the method alone names it.
    assert missing.trace_id != TRACE and len(missing.trace_id) == 32
    assert missing.parent_span_id == ""
    assert missing.name == "GET" and "fastgate.route" not in missing.attributes
    assert (missing.attributes["http.response.status_code"],
            missing.attributes["fastgate.reason"]) == (404, "not_found")
    assert failed.status == STATUS_ERROR and traced.status != STATUS_ERROR
    assert failed.attributes["fastgate.upstream.status_code"] == 503
    # Query strings carry tokens: neither the token nor any query reached the collector.
    raw = b"".join(rx.bodies)
    assert SECRET.encode() not in raw and b"access_token" not in raw and b"api_key" not in raw


def test_sample_zero_exports_only_what_a_sampled_parent_asks_for(
        loop: asyncio.AbstractEventLoop) -> None:
    """Parent-based: sample 0 drops every request nothing else decides, but a caller's
    sampled traceparent still wins (the trace would have a hole otherwise)."""
    rx, _ = run(loop, 0.0, "pass", [("/api/a", None), ("/api/b", None), ("/nowhere", None),
                                     ("/api/c", f"00-{TRACE}-{PARENT}-01")])
    assert [(s.attributes["url.path"], s.trace_id) for s in rx.spans] == [("/api/c", TRACE)]


def test_an_unsampled_incoming_traceparent_is_not_exported(
        loop: asyncio.AbstractEventLoop) -> None:
    """Flags 00 from the caller: not exported even at sample 1.0 (parent-based); the
    request without one next to it is."""
    other = "1" * 32
    rx, sent = run(loop, 1.0, "pass", [("/api/a", f"00-{TRACE}-{PARENT}-00"),
                                       ("/api/b", f"00-{other}-{PARENT}-00"),
                                       ("/api/c", None)])
    assert sent.forwarded[:2] == [f"00-{TRACE}-{PARENT}-00", f"00-{other}-{PARENT}-00"]
    assert [s.attributes["url.path"] for s in rx.spans] == ["/api/c"]


def test_a_created_traceparent_is_sampled_by_ratio_and_parents_the_upstream(
        loop: asyncio.AbstractEventLoop) -> None:
    """``traceparent: create``: the gateway is the trace root. Its own traceparent (flags
    00) is sampled by ``sample``, and the span's ids are the forwarded ones, so the upstream's
    spans hang under it; at sample 0 nothing without a sampled parent is exported."""
    rx, sent = run(loop, 1.0, "create", [("/api/a", None)])
    created = sent.forwarded[0]
    assert created is not None and created.endswith("-00")
    assert [(s.trace_id, s.span_id, s.parent_span_id) for s in rx.spans] == \
        [(created[3:35], created[36:52], "")]
    rx, sent = run(loop, 0.0, "create", [("/api/a", None), ("/api/b", None)])
    assert len(sent.forwarded) == 2 and rx.spans == []


def test_a_collector_that_is_down_costs_no_request(loop: asyncio.AbstractEventLoop,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1/traces"
    trace = tracing(down)

    async def main() -> Sent:
        sink = SpanSink(trace, schedule_delay=0.05)
        try:
            return await through_gateway(sink, trace, [("/api/a", None), ("/api/b", None),
                                                       (f"/api/c?t={SECRET}", None)])
        finally:
            await loop.run_in_executor(None, sink.shutdown)

    with caplog.at_level(logging.WARNING):
        sent = loop.run_until_complete(main())
    assert sent.statuses == [200, 200, 200]
    failures = [r for r in caplog.records if r.name.startswith("opentelemetry")]
    assert failures, "the failed export is logged"
    assert not any(r.name == "fastgate.otel" for r in caplog.records)


def test_sink_selection() -> None:
    """request_sink: no sink at all when both are off; spans alone; both through a Tee."""
    off = parse_config(_doc())
    log_off = AccessLog(AccessLogConfig(enabled=False), 0)
    log_on = AccessLog(AccessLogConfig(enabled=True), 0)
    assert request_sink(off, log_off) is None
    on = parse_config(_doc(tracing={"otel": {"enabled": True, "sample": 0.5}}))
    assert on.tracing.otel == OtelConfig(enabled=True, sample=0.5)
    spans = request_sink(on, log_off)
    both = request_sink(on, log_on)
    try:
        assert isinstance(spans, SpanSink)
        assert isinstance(both, Tee)
    finally:
        for sink in (spans, both):
            inner = getattr(sink, "_second", sink)
            if isinstance(inner, SpanSink):
                inner.shutdown()


def _doc(**extra: Any) -> dict[str, Any]:
    return {"upstreams": {"u": {"url": "http://127.0.0.1:1"}},
            "routes": [{"name": "r", "match": {"path_prefix": "/"}, "upstream": "u",
                        "auth": "none"}], **extra}


def test_config_errors_have_paths() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(tracing={"otel": {"enabled": "yes", "sample": 2,
                                            "endpoint": "ftp://collector/v1/traces",
                                            "service_nam": "x"}}))
    errors = "\n".join(info.value.errors)
    for path in ("tracing.otel.enabled", "tracing.otel.sample", "tracing.otel.endpoint",
                 "tracing.otel.service_nam"):
        assert path in errors
    assert "did you mean" in errors
    assert parse_config(_doc()).tracing.otel == OtelConfig()  # off by default


def test_enabled_without_the_extra_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("opentelemetry.sdk.trace", "opentelemetry.sdk",
                 "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        monkeypatch.setitem(sys.modules, name, None)  # what `import` sees when absent
    with pytest.raises(ConfigError) as info:
        parse_config(_doc(tracing={"otel": {"enabled": True}}))
    assert info.value.errors == [MISSING]
    assert "pip install 'fastgate[otel]'" in MISSING
    parse_config(_doc(tracing={"otel": {"enabled": False}}))  # off: no need for it
    with pytest.raises(ConfigError) as built:
        SpanSink(TracingConfig(otel=OtelConfig(enabled=True)))
    assert built.value.errors == [MISSING]


def test_fastgate_imports_without_opentelemetry() -> None:
    code = ("import sys; sys.modules['opentelemetry'] = None\n"
            "import fastgate, fastgate.ops.otel, fastgate.ops.supervisor\n"
            "import fastgate.app, fastgate.cli\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
