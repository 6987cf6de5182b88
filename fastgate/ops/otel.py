"""OpenTelemetry span export (``tracing.otel``; the ``fastgate[otel]`` extra).

:class:`SpanSink` is an access-log-like sink (the data plane's
``fastgate.dataplane.proxy.AccessLog``
protocol): the data plane reports every finished request once, and for the sampled ones the
sink records one ``SERVER`` span — name ``"<METHOD> <route>"``, start = now - duration — and
hands it to the SDK's ``BatchSpanProcessor``, whose own thread encodes and POSTs batches to the
OTLP/HTTP endpoint. Nothing is exported on the request path, a collector that is down or slow
costs dropped spans (the queue is bounded) and a log line per failed batch, never a request.

Sampling is parent-based, decided here before any span object exists (an unsampled request
costs a flag test and a ``random()``):

* a valid incoming ``traceparent`` decides by its sampled flag: ``01`` is exported (its trace
  id, parent = its parent id), ``00`` is not — the caller said it does not record this trace,
  and exporting it would leave an orphan fragment in a trace nobody else keeps;
* otherwise the request is exported with probability ``sample``.

Under ``traceparent: create`` the gateway is a trace root: a ``00`` traceparent — the one it
created, or a caller's, which the data plane's Exchange does not tell apart — is sampled by
``sample`` too, and its ids become the span's trace and span id, so the upstream's spans
(whose parent is that id) nest under the gateway's. (A caller's unsampled span is never
exported, so the reused id collides with nothing.) Only ``pass`` honours a caller's ``00``.

Limits of doing this after the fact, outside the compiled data plane: a passed-through
``traceparent`` reaches the upstream with the caller's parent id, so the upstream's spans are
the gateway span's siblings, not its children; and a created one carries flags ``00`` even
when this sink exports the request.

The span carries the path without its query (query strings carry tokens and API keys). Spans
still in the queue are flushed at interpreter exit (workers exit through ``sys.exit``).

Importing this module needs nothing beyond fastgate: the SDK is imported when a sink is built.
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import time
from typing import Any, Final

from fastgate import __version__
from fastgate.config import GatewayConfig, TracingConfig
from fastgate.dataplane.proxy import AccessLog as Sink
from fastgate.errors import ConfigError
from fastgate.ops.accesslog import MAX_METHOD, AccessLog, RequestLogAdapter, _clean_path, _untrusted

__all__ = ["MISSING", "SpanSink", "Tee", "request_sink"]

log = logging.getLogger("fastgate.otel")

MISSING: Final = ("tracing.otel.enabled: needs the OpenTelemetry packages: "
                  "pip install 'fastgate[otel]'")
EXPORT_TIMEOUT: Final = 5.0
"""Seconds one batch POST may take; the exporter's retries stay within it."""
_SAMPLED_DIGITS: Final = frozenset(b"13579bdf")  # last hex digit of flags: bit 0 = sampled


class SpanSink:
    """One SERVER span per sampled request, exported in batches over OTLP/HTTP."""

    __slots__ = ("_context", "_creates", "_error", "_flags", "_kind", "_processor", "_random",
                 "_readable", "_resource", "_sample", "_scope", "_unset", "_warned")

    def __init__(self, tracing: TracingConfig, *, exporter: Any = None,
                 schedule_delay: float = 1.0, max_queue: int = 2048) -> None:
        """``exporter``: a SpanExporter instead of OTLP/HTTP to ``tracing.otel.endpoint``
        (the benchmark's discarding one); ``schedule_delay``: seconds between batch exports."""
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import ReadableSpan
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
            from opentelemetry.trace.status import Status, StatusCode
            if exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                    OTLPSpanExporter,
                )
        except ImportError as exc:
            raise ConfigError([MISSING]) from exc
        otel = tracing.otel
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=otel.endpoint, timeout=EXPORT_TIMEOUT)
        # Any: the SDK is untyped, and absent when mypy runs without the extra.
        self._processor: Any = BatchSpanProcessor(
            exporter, max_queue_size=max_queue, schedule_delay_millis=schedule_delay * 1000,
            max_export_batch_size=min(512, max_queue), export_timeout_millis=EXPORT_TIMEOUT * 1000)
        # Resource.create adds the SDK's attributes and OTEL_RESOURCE_ATTRIBUTES; the config's
        # service name wins over OTEL_SERVICE_NAME (it is what the operator wrote here).
        self._resource = Resource.create({"service.name": otel.service_name,
                                          "process.pid": os.getpid()})
        self._scope = InstrumentationScope("fastgate", __version__)
        self._readable = ReadableSpan
        self._context = SpanContext
        self._kind = SpanKind.SERVER
        self._flags = TraceFlags(TraceFlags.SAMPLED)  # the processor drops spans without it
        self._unset = Status(StatusCode.UNSET)
        self._error = Status(StatusCode.ERROR)
        self._sample = otel.sample
        self._creates = tracing.traceparent == "create"
        self._random = random.random
        self._warned = False
        atexit.register(self.shutdown)

    def log(self, request: Any, *, route: str | None, status: int, reason: str | None,
            duration: float, upstream_latency: float | None = None) -> None:
        try:
            tp: bytes | None = request.traceparent
            parent = 0
            if tp:  # valid: the data plane drops an invalid one
                if tp[54] in _SAMPLED_DIGITS:
                    trace_id, parent = int(tp[3:35], 16), int(tp[36:52], 16)
                    span_id = random.getrandbits(64) or 1
                elif self._creates:
                    # The gateway is the trace root: its own traceparent (flags 00), or a
                    # caller's 00 (the Exchange cannot tell them apart; an unsampled caller
                    # span is never exported, so taking its id collides with nothing).
                    if self._random() >= self._sample:
                        return
                    # The upstream got this traceparent: its parent id is this span's id.
                    trace_id, span_id = int(tp[3:35], 16), int(tp[36:52], 16)
                else:
                    return  # the caller's traceparent says: not sampled
            else:
                if self._random() >= self._sample:
                    return
                trace_id, span_id = random.getrandbits(128) or 1, random.getrandbits(64) or 1
            self._record(request, trace_id, span_id, parent, route, status, reason, duration,
                         upstream_latency)
        except Exception:  # a span is never worth a request: say it once, keep serving
            if not self._warned:
                self._warned = True
                log.exception("span not recorded (further failures are not logged)")

    def _record(self, request: Any, trace_id: int, span_id: int, parent_id: int,
                route: str | None, status: int, reason: str | None, duration: float,
                upstream_latency: float | None) -> None:
        end = time.time_ns()
        method = _untrusted(request.method, MAX_METHOD)
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": _clean_path(request.raw_path),  # never the query: tokens live there
            "http.response.status_code": status,
        }
        if route is not None:
            attributes["fastgate.route"] = route
        if reason is not None:
            attributes["fastgate.reason"] = reason
        rid = request.request_id
        if rid is not None:
            attributes["fastgate.request_id"] = rid.decode("ascii")
        if request.client:
            attributes["client.address"] = request.client
        if request.upstream_status:
            attributes["fastgate.upstream.status_code"] = request.upstream_status
        if upstream_latency is not None:
            attributes["fastgate.upstream.duration"] = upstream_latency  # seconds
        flags, context = self._flags, self._context
        self._processor.on_end(self._readable(
            name=method if route is None else f"{method} {route}",
            context=context(trace_id, span_id, False, flags),
            parent=context(trace_id, parent_id, True, flags) if parent_id else None,
            resource=self._resource,
            attributes=attributes,
            kind=self._kind,
            # OTel HTTP semantic conventions: a SERVER span is an error on 5xx only.
            status=self._error if status >= 500 else self._unset,
            start_time=end - int(duration * 1e9),
            end_time=end,
            instrumentation_scope=self._scope,
        ))

    def force_flush(self, timeout: float = 30.0) -> bool:
        return bool(self._processor.force_flush(int(timeout * 1000)))

    def shutdown(self) -> None:
        """Export what is queued and stop the export thread (idempotent)."""
        atexit.unregister(self.shutdown)
        self._processor.shutdown()


class Tee:
    """Both sinks, in order: the access log, then the span sink."""

    __slots__ = ("_first", "_second")

    def __init__(self, first: Sink, second: Sink) -> None:
        self._first, self._second = first, second

    def log(self, request: Any, *, route: str | None, status: int, reason: str | None,
            duration: float, upstream_latency: float | None = None) -> None:
        self._first.log(request, route=route, status=status, reason=reason,
                        duration=duration, upstream_latency=upstream_latency)
        self._second.log(request, route=route, status=status, reason=reason,
                         duration=duration, upstream_latency=upstream_latency)


def request_sink(config: GatewayConfig, access: AccessLog) -> Sink | None:
    """The data plane's sink for this config: the access log, spans, both, or None (no call
    per request at all). ConfigError when otel is on and its packages are missing."""
    lines = RequestLogAdapter(access) if access.enabled else None
    if not config.tracing.otel.enabled:
        return lines
    spans = SpanSink(config.tracing)
    return spans if lines is None else Tee(lines, spans)
