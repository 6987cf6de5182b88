"""fastgate.ops.admin: a real AdminServer on an ephemeral loopback port, real HTTP requests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastgate.config import Address
from fastgate.ops.admin import AdminServer
from fastgate.ops.metrics import CONTENT_TYPE, Metrics
from fastgate.token.reasons import Reason

Body = Callable[[], bytes] | None
Ready = Callable[[], Mapping[str, bool]]


def run(
    test: Callable[[aiohttp.ClientSession, str], Awaitable[None]],
    *,
    metrics_body: Body = None,
    ready: Ready = dict,
) -> None:
    async def main() -> None:
        server = AdminServer(Address("127.0.0.1", 0), metrics_body=metrics_body, ready=ready)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                await test(session, f"http://127.0.0.1:{server.port}")
        finally:
            await server.stop()

    asyncio.run(main())


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    async with session.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def test_metrics_endpoint_serves_the_exposition() -> None:
    m = Metrics(routes=("orders",), providers=("okta",), upstreams=("svc",))
    m.request_done(0, 200, 0.001)
    m.request_done(0, 401, 0.0002)
    m.reject(0, Reason.TOKEN_EXPIRED)

    async def test(session: aiohttp.ClientSession, base: str) -> None:
        status, headers, body = await get(session, base + "/metrics")
        assert status == 200
        assert headers["Content-Type"] == CONTENT_TYPE
        assert headers["Cache-Control"] == "no-store"
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
        }
        key = ("fastgate_requests_total", (("route", "orders"), ("status_class", "2xx")))
        assert samples[key] == 1
        key = ("fastgate_rejects_total", (("reason", "token_expired"), ("route", "orders")))
        assert samples[key] == 1
        # Counted between two scrapes: the second one sees it (render flushes).
        m.request_done(0, 200, 0.001)
        _, _, body = await get(session, base + "/metrics")
        assert b'fastgate_requests_total{route="orders",status_class="2xx"} 2.0' in body

    run(test, metrics_body=m.render)


_NOT_FOUND = b'{"error":"not_found"}'


def _broken_metrics() -> bytes:
    raise OSError("/secret/path/multiproc: disk on fire")


def _broken_ready() -> Mapping[str, bool]:
    raise RuntimeError("boom")


@pytest.mark.parametrize(("path", "metrics_body", "ready", "status", "body"), [
    pytest.param("/metrics", None, dict, 404, _NOT_FOUND, id="metrics-off-is-404"),
    pytest.param("/metrics", _broken_metrics, dict, 500, b'{"error":"internal_error"}',
                 id="metrics-failure-is-500-without-details"),
    pytest.param("/healthz", None, dict, 200, b'{"status":"ok"}', id="healthz"),
    pytest.param("/readyz", None, dict, 200, b'{"status":"ready","providers":{}}',
                 id="readyz-without-providers-is-ready"),
    pytest.param("/readyz", None, _broken_ready, 503, b'{"status":"not_ready","providers":{}}',
                 id="readyz-when-the-callable-fails-is-503"),
    *(pytest.param(path, lambda: b"", dict, 404, _NOT_FOUND, id=f"other-path-is-404:{path}")
      for path in ["/", "/metricsx", "/metrics/", "/admin", "/readyz/../x"]),
])
def test_one_get_answers(path: str, metrics_body: Body, ready: Ready, status: int,
                         body: bytes) -> None:
    """One GET, one JSON answer: its status and its exact body."""

    async def test(session: aiohttp.ClientSession, base: str) -> None:
        got_status, headers, got_body = await get(session, base + path)
        assert (got_status, got_body) == (status, body)
        assert headers["Content-Type"].startswith("application/json")

    run(test, metrics_body=metrics_body, ready=ready)


def test_readyz_flips_from_503_to_200() -> None:
    state = {"okta": False, "cognito": False}

    async def test(session: aiohttp.ClientSession, base: str) -> None:
        async def readyz() -> tuple[int, Any]:
            async with session.get(base + "/readyz") as resp:
                return resp.status, await resp.json()

        assert await readyz() == (
            503, {"status": "not_ready", "providers": {"okta": False, "cognito": False}}
        )  # fmt: skip
        state["okta"] = True
        assert await readyz() == (
            503, {"status": "not_ready", "providers": {"okta": True, "cognito": False}}
        )  # fmt: skip
        state["cognito"] = True
        assert await readyz() == (
            200, {"status": "ready", "providers": {"okta": True, "cognito": True}}
        )  # fmt: skip
        state["okta"] = False  # keys lost (e.g. a worker restarted): not ready again
        status, _ = await readyz()
        assert status == 503

    run(test, ready=lambda: state)


def test_post_is_not_allowed() -> None:
    async def test(session: aiohttp.ClientSession, base: str) -> None:
        async with session.post(base + "/healthz", data=b"x") as resp:
            assert resp.status == 405

    run(test)


def test_port_is_known_only_while_started_and_stop_frees_it() -> None:
    async def main() -> None:
        server = AdminServer(Address("127.0.0.1", 0), metrics_body=None, ready=dict)
        with pytest.raises(RuntimeError):
            _ = server.port
        await server.start()
        port = server.port
        assert port > 0
        await server.stop()
        with pytest.raises(RuntimeError):
            _ = server.port
        with pytest.raises(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        await server.stop()  # idempotent

    asyncio.run(main())


def test_address_in_use_is_an_error() -> None:
    async def main() -> None:
        first = AdminServer(Address("127.0.0.1", 0), metrics_body=None, ready=dict)
        await first.start()
        try:
            second = AdminServer(Address("127.0.0.1", first.port), metrics_body=None, ready=dict)
            with pytest.raises(OSError):
                await second.start()
        finally:
            await first.stop()

    asyncio.run(main())
