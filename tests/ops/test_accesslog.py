"""fastgate.ops.accesslog: JSON lines, no secrets, sampling, buffering, hostile input."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from fastgate.config import AccessLogConfig
from fastgate.ops.accesslog import MAX_PATH, AccessLog, RequestLogAdapter, _atomic_piece, _pieces
from fastgate.token.reasons import Reason

FIELDS = {
    "time", "worker", "route", "method", "path", "status", "reason",
    "latency_s", "upstream_latency_s", "upstream_status", "client", "bytes_in", "bytes_out",
    "user_agent", "request_id", "trace_id",
}  # fmt: skip
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTEifQ.c2lnbmF0dXJl"
API_KEY = "sk_live_51Habcdefghijklmnop"


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


def lines(stream: io.BytesIO) -> list[dict[str, Any]]:
    raw = stream.getvalue()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def make(stream: io.BytesIO, **config: Any) -> AccessLog:
    return AccessLog(AccessLogConfig(**config), worker=3, stream=stream, clock=lambda: 1.8e9)


def test_one_line_per_request_with_the_fields() -> None:
    out = io.BytesIO()
    t = 1_800_000_000.123
    alog = AccessLog(AccessLogConfig(), worker=2, stream=out, clock=lambda: t)
    alog.log("orders", "GET", "/api/orders/1", 200, None, 0.0012345678, 0.000987654321)
    alog.log("orders", "POST", "/api/orders", 401, Reason.TOKEN_EXPIRED, 0.0002, None)
    alog.log(None, "GET", "/nowhere", 404, Reason.OK, 0.00001)
    assert out.getvalue() == b""  # buffered
    alog.close()
    first, second, third = lines(out)
    expected_time = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    assert first == {
        "time": expected_time.replace("+00:00", "Z"),
        "worker": 2,
        "route": "orders",
        "method": "GET",
        "path": "/api/orders/1",
        "status": 200,
        "reason": None,
        "latency_s": 0.001235,
        "upstream_latency_s": 0.000988,
        "upstream_status": None, "client": None, "bytes_in": None, "bytes_out": None,
        "user_agent": None, "request_id": None, "trace_id": None,
    }
    assert first["time"] == "2027-01-15T08:00:00.123Z"
    assert set(second) == FIELDS
    assert second["reason"] == "token_expired"
    assert second["upstream_latency_s"] is None
    assert third["route"] is None and third["reason"] is None


def test_time_is_rfc3339_utc_with_milliseconds() -> None:
    out = io.BytesIO()
    times = iter([0.0, 0.9995, 1_700_000_000.5, 1_700_000_059.999])
    alog = AccessLog(AccessLogConfig(), worker=0, stream=out, clock=lambda: next(times))
    for _ in range(4):
        alog.log("r", "GET", "/", 200, None, 0.0)
    alog.close()
    assert [line["time"] for line in lines(out)] == [
        "1970-01-01T00:00:00.000Z",
        "1970-01-01T00:00:00.999Z",
        "2023-11-14T22:13:20.500Z",
        "2023-11-14T22:14:19.999Z",
    ]


def test_no_token_api_key_or_query_string_is_logged() -> None:
    out = io.BytesIO()
    alog = make(out)
    alog.log("orders", "GET", f"/api/orders?access_token={TOKEN}&api_key={API_KEY}", 200,
             None, 0.001)  # fmt: skip
    alog.log("orders", "GET", f"/api/orders?api_key={API_KEY}#access_token={TOKEN}", 401,
             Reason.API_KEY_INVALID, 0.001)  # fmt: skip
    alog.log("orders", "GET", f"/cb#access_token={TOKEN}", 200, None, 0.001)
    alog.close()
    raw = out.getvalue()
    for secret in (TOKEN, API_KEY, "access_token", "api_key=", "?", "#"):
        assert secret.encode() not in raw
    assert [line["path"] for line in lines(out)] == ["/api/orders", "/api/orders", "/cb"]


@pytest.mark.parametrize(
    "path",
    [
        "/a\r\nFAKE: injected\r\n{\"status\":200}",
        "/\x1b[31mred\x1b[0m\x07",
        '/"quoted"\\backslash',
        "/nul\x00byte\x7f",
        "/c1\x9b31mcsi",
        "/ünïcödé/日本/\u2028\u2029",
        "/lone\udcffsurrogate",
    ],
)
def test_hostile_paths_stay_inside_one_json_string(path: str) -> None:
    out = io.BytesIO()
    alog = make(out)
    alog.log("r", "GET\r\nX", path, 200, None, 0.001)
    alog.close()
    raw = out.getvalue()
    assert raw.count(b"\n") == 1
    # No raw control byte (ESC, CR, NUL, BEL...) reaches a terminal or a log shipper.
    assert not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]", raw)
    (line,) = lines(out)
    assert set(line) == FIELDS
    if "\udcff" in path:
        assert line["path"] == "/lone\\udcffsurrogate"
    else:
        # DEL and C1 controls (left raw by JSON) are percent-encoded.
        assert line["path"] == path.replace("\x7f", "%7F").replace("\x9b", "%9B")
    assert line["method"] == "GET\r\nX"


def test_path_and_method_are_capped() -> None:
    out = io.BytesIO()
    alog = make(out)
    alog.log("r", "X" * 10_000, "/" + "a" * 100_000, 200, None, 0.001)
    alog.close()
    (line,) = lines(out)
    assert len(line["path"]) == MAX_PATH
    assert len(line["method"]) == 32


def test_sampling_keeps_rejects_and_server_errors() -> None:
    out = io.BytesIO()
    alog = AccessLog(AccessLogConfig(sample=0.25), worker=0, stream=out, rng=random.Random(7))
    for i in range(2000):
        alog.log("r", "GET", f"/ok/{i}", 200, None, 0.001)
        if i % 10 == 0:
            alog.log("r", "GET", f"/reject/{i}", 401, Reason.SIGNATURE_INVALID, 0.001)
            alog.log("r", "GET", f"/error/{i}", 502, None, 0.001)
        if i % 20 == 0:
            alog.log(None, "GET", f"/unrouted/{i}", 404, None, 0.001)
    alog.close()
    logged = [line["path"] for line in lines(out)]
    # The same seeded sequence decides the same requests: only sampled requests (200 and
    # the unrouted 404) draw a number, in order; rejects and 5xx never do.
    rng = random.Random(7)
    draws = []
    for i in range(2000):
        draws.append((f"/ok/{i}", rng.random()))
        if i % 20 == 0:
            draws.append((f"/unrouted/{i}", rng.random()))
    expected = [path for path, r in draws if r < 0.25]
    expected_ok = [p for p in expected if p.startswith("/ok/")]
    expected_unrouted = [p for p in expected if p.startswith("/unrouted/")]
    assert [p for p in logged if p.startswith("/ok/")] == expected_ok
    assert [p for p in logged if p.startswith("/unrouted/")] == expected_unrouted
    assert 400 < len(expected_ok) < 600
    assert len([p for p in logged if p.startswith("/reject/")]) == 200
    assert len([p for p in logged if p.startswith("/error/")]) == 200


def test_sample_zero_logs_only_rejects_and_errors() -> None:
    out = io.BytesIO()
    alog = make(out, sample=0.0)
    alog.log("r", "GET", "/ok", 200, None, 0.001)
    alog.log("r", "GET", "/redirect", 302, None, 0.001)
    alog.log("r", "GET", "/missing", 401, Reason.TOKEN_MISSING, 0.001)
    alog.log("r", "GET", "/down", 503, Reason.JWKS_UNAVAILABLE, 0.001)
    alog.log("r", "GET", "/timeout", 504, None, 0.001)
    alog.close()
    assert [line["path"] for line in lines(out)] == ["/missing", "/down", "/timeout"]


def test_disabled_logs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "access.log"
    out = io.BytesIO()
    alog = AccessLog(AccessLogConfig(enabled=False, path=str(target)), worker=0, stream=out)
    for _ in range(100):
        alog.log("r", "GET", "/", 200, Reason.TOKEN_MISSING, 0.001)
    alog.close()
    assert out.getvalue() == b""
    assert not target.exists()


def test_lines_are_buffered_not_one_write_per_line() -> None:
    out = CountingStream()
    alog = AccessLog(AccessLogConfig(), worker=0, stream=out, buffer_bytes=16 * 1024)
    for i in range(2000):
        alog.log("orders", "GET", f"/api/orders/{i}", 200, None, 0.001, 0.0005)
    written_before_close = out.writes
    alog.close()
    assert len(lines(out)) == 2000
    size = len(out.getvalue())
    assert written_before_close <= size // (16 * 1024)
    assert out.writes <= size // (16 * 1024) + 1


def test_periodic_flush_and_flush_on_stop() -> None:
    out = io.BytesIO()

    async def main() -> None:
        alog = AccessLog(AccessLogConfig(), worker=0, stream=out, flush_interval=0.02)
        alog.start()
        alog.log("r", "GET", "/first", 200, None, 0.001)
        for _ in range(100):
            if out.getvalue():
                break
            await asyncio.sleep(0.01)
        assert [line["path"] for line in lines(out)] == ["/first"]
        alog.log("r", "GET", "/last", 200, None, 0.001)
        await alog.stop()
        assert [line["path"] for line in lines(out)] == ["/first", "/last"]

    asyncio.run(main())


def test_file_target_is_appended_and_closed(tmp_path: Path) -> None:
    target = tmp_path / "access.log"
    target.write_bytes(b'{"earlier":"line"}\n')

    async def main() -> None:
        alog = AccessLog(AccessLogConfig(path=str(target)), worker=1)
        alog.log("r", "GET", "/x", 200, None, 0.001)
        await alog.stop()

    asyncio.run(main())
    raw = target.read_text().splitlines()
    assert raw[0] == '{"earlier":"line"}'
    assert json.loads(raw[1])["path"] == "/x"


def test_pipe_writes_are_cut_at_line_ends_within_pipe_buf() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "wb") as w, os.fdopen(read_fd, "rb") as r:
        limit = _atomic_piece(w)
        assert 512 <= limit <= 65536
        assert _atomic_piece(io.BytesIO()) == 0
        data = b"".join(b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * (i % 300)) for i in range(200))
        pieces = list(_pieces(data, limit))
        assert b"".join(pieces) == data
        assert all(len(p) <= limit and p.endswith(b"\n") for p in pieces)
        assert len(pieces) > 1
        assert r.readable() and w.writable()
    long_line = b"y" * 10_000 + b"\n"
    assert list(_pieces(b"a\n" + long_line + b"b\n", 512)) == [b"a\n", long_line, b"b\n"]


def test_a_failing_stream_drops_lines_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(io.BytesIO):
        def write(self, data: Any) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    alog = AccessLog(AccessLogConfig(), worker=0, stream=Broken(), buffer_bytes=1)
    with caplog.at_level(logging.WARNING, logger="fastgate.accesslog"):
        for _ in range(5):
            alog.log("r", "GET", "/", 200, None, 0.001)
        alog.close()
    assert alog.dropped == 5
    assert len([r for r in caplog.records if "writing failed" in r.getMessage()]) == 1


def test_label_strings_from_the_data_plane() -> None:
    out = io.BytesIO()
    alog = make(out, sample=0.0)
    alog.log(None, "GET", "/nowhere", 404, "not_found", 0.001)  # sampled: dropped at 0
    alog.log("r", "GET", "/a", 401, "token_expired", 0.001)  # a reject: always
    alog.log("r", "GET", "/b", 502, "bad_gateway", 0.001)  # 5xx: always
    alog.close()
    # Only SPEC §4 reasons are logged as a reason.
    assert [(line["path"], line["reason"]) for line in lines(out)] == [
        ("/a", "token_expired"), ("/b", None),
    ]  # fmt: skip


def test_adapter_logs_a_real_request_without_its_secrets() -> None:
    """The data plane's sink, fed by the real gateway over loopback: the line's request fields
    (client, bytes, user agent, upstream status) and none of its secrets."""
    from fastgate.app import Gateway
    from fastgate.config import (
        Address,
        GatewayConfig,
        RouteConfig,
        RouteMatch,
        UpstreamConfig,
    )
    from tests.gateway_fixtures import EchoUpstream, read_response

    out = io.BytesIO()
    alog = AccessLog(AccessLogConfig(), worker=5, stream=out)

    async def main() -> list[int]:
        up = await EchoUpstream.start()
        config = GatewayConfig(
            listen=Address("127.0.0.1", 0), admin=None,
            upstreams={"echo": UpstreamConfig("echo", up.url)},
            routes=(RouteConfig("public", RouteMatch(path_prefix="/api/"), "echo"),))
        gw = Gateway.build(config, access_log=RequestLogAdapter(alog))
        await gw.start()
        sizes = []
        try:
            for target in (f"/api/orders/%7E42?access_token={TOKEN}&api_key={API_KEY}",
                           "/nowhere"):
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                request = (f"GET {target} HTTP/1.1\r\nHost: gw.test\r\n"
                           f"Authorization: Bearer {TOKEN}\r\nX-API-Key: {API_KEY}\r\n"
                           "User-Agent: probe/1.0 \u00e9\u0085\r\nConnection: close\r\n\r\n")
                writer.write(request.encode())
                await read_response(reader)
                writer.close()
                sizes.append(len(request.encode()))
        finally:
            await gw.stop()
            await up.stop()
            await alog.stop()
        return sizes

    sizes = asyncio.run(main())
    raw = out.getvalue()
    for secret in (TOKEN, API_KEY, "access_token", "api_key=", "Bearer", "?"):
        assert secret.encode() not in raw
    admitted, not_found = lines(out)
    assert set(admitted) == FIELDS
    assert admitted["path"] == "/api/orders/%7E42"  # as received, percent-encoding kept
    assert (admitted["method"], admitted["route"], admitted["status"]) == ("GET", "public", 200)
    assert admitted["upstream_status"] == 200 and admitted["client"] == "127.0.0.1"
    # obs-text passes (RFC 9110 §5.5); a C1 control is percent-encoded in the line.
    assert admitted["user_agent"] == "probe/1.0 \u00e9%85"
    assert 0 < admitted["bytes_in"] <= sizes[0] and admitted["bytes_out"] > 100
    assert (not_found["status"], not_found["upstream_status"], not_found["route"]) == \
        (404, None, None)
    assert not_found["bytes_out"] > 0 and not_found["worker"] == 5
    # Each request got its own generated X-Request-Id (the client sent none).
    assert admitted["request_id"] and not_found["request_id"]
    assert admitted["request_id"] != not_found["request_id"]
    assert admitted["trace_id"] is None  # tracing.traceparent: pass, and none was sent
