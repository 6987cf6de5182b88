"""UpstreamPool against real servers on 127.0.0.1: an aiohttp app and scripted raw servers.

No mocks: every fault (refused, stalled, reset, garbage, stale keep-alive) is produced by a
real socket peer. Every test runs on uvloop, the data plane's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Literal

import pytest
from aiohttp import web

from fastgate.config import UpstreamConfig
from fastgate.dataplane.upstream import (
    FAST_BODY_MAX,
    READ_HIGH_WATER,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from tests.gateway_fixtures import uv

pytestmark = pytest.mark.timeout(60)

def make_pool(port: int, *, base: str = "", connect_timeout: float = 2.0,
              read_timeout: float = 5.0, max_connections: int = 16,
              idle_timeout: float = 60.0) -> UpstreamPool:
    cfg = UpstreamConfig(name="t", url=f"http://127.0.0.1:{port}{base}",
                         connect_timeout=connect_timeout, read_timeout=read_timeout,
                         max_connections=max_connections)
    return UpstreamPool(cfg, idle_timeout=idle_timeout)


async def body_of(resp: UpstreamResponse) -> bytes:
    parts = []
    while chunk := await resp.read():
        parts.append(chunk)
    return b"".join(parts)


async def fetch(pool: UpstreamPool, method: str = "GET", target: str = "/",
                headers: list[tuple[str, str]] | None = None,
                body: bytes | AsyncIterator[bytes] | None = None) -> tuple[UpstreamResponse, bytes]:
    resp = await pool.request(method, target, headers or [], body, head=method == "HEAD")
    try:
        data = await body_of(resp)
    finally:
        resp.release()
    return resp, data


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


class Stats:
    def __init__(self) -> None:
        self.peers: set[Any] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.active = 0
        self.max_active = 0
        self.port = 0


@contextlib.asynccontextmanager
async def aiohttp_upstream(setup: Callable[[web.Application, Stats], None] | None = None,
                           ) -> AsyncIterator[tuple[int, Stats]]:
    stats = Stats()

    @web.middleware
    async def track(request: web.Request, handler: Any) -> web.StreamResponse:
        assert request.transport is not None
        stats.peers.add(request.transport.get_extra_info("peername"))
        stats.requests.append((request.method, request.path_qs, dict(request.headers)))
        stats.active += 1
        stats.max_active = max(stats.max_active, stats.active)
        try:
            resp: web.StreamResponse = await handler(request)
            return resp
        finally:
            stats.active -= 1

    app = web.Application(middlewares=[track])

    async def echo(request: web.Request) -> web.Response:
        data = await request.read()
        return web.json_response({"method": request.method, "path": request.path_qs,
                                  "len": len(data), "body": data.decode("latin-1"),
                                  "headers": dict(request.headers)})

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("s", "0.1")))
        return web.Response(text="slow")

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(f"part{i};".encode())
            await asyncio.sleep(0.02)
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (5 * 1024 * 1024))

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"0123456789", content_type="application/octet-stream")

    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.Response(status=code, headers={"ETag": '"v1"'})

    async def sha(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"sha256": h.hexdigest(), "len": n,
                                  "te": request.headers.get("Transfer-Encoding", ""),
                                  "cl": request.headers.get("Content-Length", "")})

    app.router.add_route("*", "/echo{tail:.*}", echo)
    app.router.add_get("/slow", slow)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/big", big)
    app.router.add_get("/sized", sized)
    app.router.add_get("/status/{code}", status)
    app.router.add_post("/sha", sha)
    if setup is not None:
        setup(app, stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    try:
        await site.start()
        port = stats.port = runner.addresses[0][1]
        yield port, stats
    finally:
        await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_upstream(handler: Handler) -> AsyncIterator[tuple[int, list[int]]]:
    """A scripted server: handler(reader, writer, connection_index). Yields (port, conns)."""
    conns: list[int] = []
    tasks: set[asyncio.Task[None]] = set()

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(conns)
        conns.append(index)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, conns
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.sleep(0)
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: (head, body); the body de-chunked when chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += data[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":")[1]))
    return head, b""


RST: Final = "rst"
"""A :func:`replies` step: reset the connection (SO_LINGER 0, then abort)."""

Step = bytes | float | Literal["rst"]


def replies(*steps: Step, keep_alive: bool = False,
            heads: list[bytes] | None = None) -> Handler:
    """A scripted server: read one request (its head appended to ``heads``), then play
    ``steps`` (bytes are written and drained, a number is slept, :data:`RST` resets); then
    close, or with ``keep_alive`` read the next request on the connection and play them
    again."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, i: int) -> None:
        while True:
            head, _ = await read_request(r)
            if heads is not None:
                heads.append(head)
            for step in steps:
                if step == RST:
                    sock = w.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    w.transport.abort()
                elif isinstance(step, bytes):
                    w.write(step)
                    await w.drain()
                else:
                    await asyncio.sleep(step)
            if not keep_alive:
                return

    return handler


@contextlib.asynccontextmanager
async def pool_on(port: int, **pool_kw: Any) -> AsyncIterator[UpstreamPool]:
    """:func:`make_pool` for ``port``, closed on the way out."""
    pool = make_pool(port, **pool_kw)
    try:
        yield pool
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def echo_pool(**pool_kw: Any) -> AsyncIterator[tuple[UpstreamPool, Stats]]:
    """A pool on a fresh :func:`aiohttp_upstream` (its port is ``stats.port``)."""
    async with aiohttp_upstream() as (port, stats), pool_on(port, **pool_kw) as pool:
        yield pool, stats


@contextlib.asynccontextmanager
async def raw_pool(handler: Handler, **pool_kw: Any,
                   ) -> AsyncIterator[tuple[UpstreamPool, list[int]]]:
    """A pool on a fresh :func:`raw_upstream` running ``handler``: (pool, connections)."""
    async with raw_upstream(handler) as (port, conns), pool_on(port, **pool_kw) as pool:
        yield pool, conns


async def request_error(pool: UpstreamPool, method: str = "GET", target: str = "/",
                        body: bytes | None = None) -> UpstreamError:
    """The UpstreamError that ``pool.request`` must raise."""
    with pytest.raises(UpstreamError) as ei:
        await pool.request(method, target, [], body)
    return ei.value


# ---------------------------------------------------------------------------------------------
# Round trips and framing
# ---------------------------------------------------------------------------------------------


@uv
async def test_get_and_post_round_trip() -> None:
    async with echo_pool(base="/echo/base") as (pool, stats):
        resp, data = await fetch(pool, "GET", "/a?x=1", [("X-Req", "1")])
        assert resp.status == 200 and resp.reason == "OK"
        assert resp.body_complete is not None and resp.body_complete == data
        assert resp.content_length == len(data)
        doc = json.loads(data)
        assert doc["method"] == "GET" and doc["path"] == "/echo/base/a?x=1"
        assert doc["headers"]["Host"] == f"127.0.0.1:{stats.port}"
        assert doc["headers"]["X-Req"] == "1"
        assert "Content-Length" not in doc["headers"]  # RFC 9110 §8.6: GET without content

        resp, data = await fetch(pool, "POST", "/p", [("Host", "api.example")], b"hello")
        doc = json.loads(data)
        assert doc["method"] == "POST" and doc["body"] == "hello"
        assert doc["headers"]["Host"] == "api.example"  # caller's Host is kept
        assert doc["headers"]["Content-Length"] == "5"

        resp, data = await fetch(pool, "POST", "/empty", [], None)
        assert json.loads(data)["headers"]["Content-Length"] == "0"
        assert len(stats.peers) == 1


@uv
async def test_keep_alive_reuses_one_connection() -> None:
    async with echo_pool() as (pool, stats):
        for i in range(50):
            resp, _ = await fetch(pool, "GET", f"/echo/{i}")
            assert resp.status == 200
        assert len(stats.requests) == 50
        assert len(stats.peers) == 1
        assert pool.open_connections == 1 and pool.idle_connections == 1
    assert pool.open_connections == 0


@uv
async def test_max_connections_bounds_concurrency() -> None:
    async with echo_pool(max_connections=2) as (pool, stats):
        seen_open: list[int] = []

        async def one() -> int:
            resp = await pool.request("GET", "/slow?s=0.05", [], None)
            seen_open.append(pool.open_connections)
            resp.release()
            return resp.status

        statuses = await asyncio.gather(*(one() for _ in range(10)))
        assert statuses == [200] * 10
        assert stats.max_active <= 2
        assert len(stats.peers) <= 2
        assert max(seen_open) <= 2


@uv
async def test_waiter_cancellation_frees_its_turn() -> None:
    async with echo_pool(max_connections=1) as (pool, _stats):
        first = asyncio.ensure_future(pool.request("GET", "/slow?s=0.2", [], None))
        await asyncio.sleep(0.02)
        queued = asyncio.ensure_future(pool.request("GET", "/echo", [], None))
        await asyncio.sleep(0.02)
        queued.cancel()
        first.cancel()  # mid-exchange: that connection must be closed and its slot freed
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(asyncio.CancelledError):
            await queued
        resp, _ = await fetch(pool, "GET", "/echo")
        assert resp.status == 200
        assert pool.open_connections == 1


@uv
async def test_waiting_for_a_free_connection_is_bounded() -> None:
    async with echo_pool(max_connections=1, read_timeout=0.3) as (pool, _stats):
        held = await pool.request("GET", "/chunked", [], None)  # holds the only slot
        err = await request_error(pool, "GET", "/sized")
        assert err.kind == "timeout" and err.status == 504
        held.release()  # body unread: closed; the slot is free again
        _, data = await fetch(pool, "GET", "/sized")
        assert data == b"0123456789"


@uv
async def test_chunked_response_is_streamed() -> None:
    async with echo_pool() as (pool, _stats):
        resp = await pool.request("GET", "/chunked", [], None)
        try:
            assert resp.content_length is None
            assert resp.body_complete is None  # the parts arrive over ~100 ms
            names = {n.lower() for n, _ in resp.headers}
            assert "transfer-encoding" not in names  # hop-by-hop (RFC 9110 §7.6.1)
            chunks = []
            while chunk := await resp.read():
                chunks.append(chunk)
        finally:
            resp.release()
        assert b"".join(chunks) == b"part0;part1;part2;part3;part4;"
        assert len(chunks) > 1
        resp, _ = await fetch(pool, "GET", "/sized")  # connection still usable
        assert pool.open_connections == 1


@uv
async def test_content_length_response() -> None:
    async with echo_pool() as (pool, _stats):
        resp = await pool.request("GET", "/sized", [], None)
        assert resp.content_length == 10
        assert ("Content-Length", "10") in resp.headers  # end-to-end: kept
        assert resp.body_complete == b"0123456789"
        assert await body_of(resp) == b"0123456789"  # read() streams the same body
        resp.release()
        resp.release()  # idempotent
        assert pool.idle_connections == 1


@uv
@pytest.mark.parametrize(("reply", "body", "content_length", "reused"), [
    # RFC 9112 §6.3 rule 8: no framing, the body ends at EOF; RFC 9112 §9.3: HTTP/1.0 without
    # keep-alive is not reused.
    pytest.param(replies(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello ", 0.05,
                         b"world"),
                 b"hello world", None, False, id="http10-close-delimited"),
    # RFC 9112 §9.6: not reused after "close". The server lingers after its response: the
    # pool must not wait for EOF.
    pytest.param(replies(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                         0.5),
                 b"ok", 2, False, id="connection-close"),
    pytest.param(replies(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n"
                         b"\r\nok", keep_alive=True),
                 b"ok", 2, True, id="http10-keep-alive"),
])
async def test_response_decides_whether_the_connection_is_reused(
        reply: Handler, body: bytes, content_length: int | None, reused: bool) -> None:
    """HTTP version, ``Connection`` and framing of the response decide reuse (RFC 9112 §9.3);
    the ``Connection`` field itself is hop-by-hop and never handed on."""
    async with raw_pool(reply) as (pool, conns):
        for _ in range(3):
            resp, data = await fetch(pool)
            assert resp.status == 200 and data == body
            assert resp.content_length == content_length
            if content_length is not None:
                assert resp.body_complete == body
            assert all(name.lower() != "connection" for name, _ in resp.headers)
            if not reused:
                assert pool.open_connections == 0
        assert len(conns) == (1 if reused else 3)
        await asyncio.sleep(0.01)
        assert pool.open_connections == (1 if reused else 0)


@uv
async def test_head_response_has_no_body_and_connection_is_reused() -> None:
    async with echo_pool() as (pool, stats):
        resp = await pool.request("HEAD", "/sized", [], None, head=True)
        assert resp.status == 200
        assert resp.content_length == 10  # what a GET would carry (RFC 9110 §9.3.2)
        assert resp.body_complete == b""
        assert await resp.read() == b""
        resp.release()
        # The next exchange on the same connection parses cleanly (parser was reset).
        resp, data = await fetch(pool, "GET", "/sized")
        assert data == b"0123456789"
        assert len(stats.peers) == 1


@uv
async def test_head_without_length_or_chunked_keeps_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, i: int) -> None:
        while True:
            head, _ = await read_request(r)
            if head.startswith(b"HEAD /chunked"):
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            elif head.startswith(b"HEAD /bad"):
                # A server that (wrongly) sends a body after a HEAD response head.
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad")
            elif head.startswith(b"HEAD"):
                w.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n")
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
            await w.drain()

    async with raw_pool(handler) as (pool, conns):
        resp, data = await fetch(pool, "HEAD")
        assert data == b"" and resp.content_length is None
        resp, data = await fetch(pool, "HEAD", "/chunked")
        assert data == b"" and resp.content_length is None
        resp, data = await fetch(pool, "GET")
        assert data == b"get"
        assert len(conns) == 1
        resp, data = await fetch(pool, "HEAD", "/bad")
        assert resp.status == 200 and data == b""  # the stray bytes are never a body
        resp, data = await fetch(pool, "GET")
        assert data == b"get"
        assert len(conns) == 2  # ...and that connection was not trusted again


@uv
@pytest.mark.parametrize("code", [204, 304])
async def test_no_body_statuses(code: int) -> None:
    async with echo_pool() as (pool, stats):
        for _ in range(2):
            resp, data = await fetch(pool, "GET", f"/status/{code}")
            assert resp.status == code and data == b""
            assert resp.body_complete == b""
        assert len(stats.peers) == 1


@uv
async def test_interim_100_continue_is_skipped_and_expect_not_forwarded() -> None:
    heads: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, i: int) -> None:
        while True:
            head, body = await read_request(r)
            heads.append(head)
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.01)
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await w.drain()

    async with raw_pool(handler) as (pool, conns):
        resp, data = await fetch(pool, "POST", "/", [("Expect", "100-continue")], b"abc")
        assert resp.status == 201 and data == b"abc"
        assert all(n.lower() != "link" for n, _ in resp.headers)
        assert b"expect" not in heads[0].lower()
        resp, data = await fetch(pool, "POST", "/", [], b"again")
        assert resp.status == 201 and data == b"again"
        assert len(conns) == 1


@uv
async def test_hop_by_hop_response_headers_are_stripped() -> None:
    reply = replies(b"HTTP/1.1 200 OK\r\n"
                    b"Connection: X-Private, keep-alive\r\n"
                    b"Connection: X-Other\r\n"
                    b"Keep-Alive: timeout=5\r\n"
                    b"Proxy-Connection: keep-alive\r\n"
                    b"TE: trailers\r\n"
                    b"Trailer: X-Checksum\r\n"
                    b"Upgrade: h2c\r\n"
                    b"X-Private: secret\r\n"
                    b"x-other: 2\r\n"
                    b"X-Kept: yes\r\n"
                    b"Set-Cookie: a=1\r\n"
                    b"Set-Cookie: b=2\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n", keep_alive=True)
    async with raw_pool(reply) as (pool, conns):
        for _ in range(2):
            resp, data = await fetch(pool)
            assert data == b"abc"
            assert resp.headers == [("X-Kept", "yes"), ("Set-Cookie", "a=1"),
                                    ("Set-Cookie", "b=2")]
        assert len(conns) == 1


@uv
async def test_request_head_framing_and_header_order() -> None:
    heads: list[bytes] = []
    handler = replies(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", keep_alive=True,
                      heads=heads)
    async with raw_upstream(handler) as (port, _conns), pool_on(port, base="/base/") as pool:
        hdrs = [("X-B", "2"), ("Content-Length", "999"), ("Transfer-Encoding", "gzip"),
                ("Connection", "close"), ("X-A", "caf\u00e9"), ("X-A", "1")]
        await fetch(pool, "PUT", "/t?q=1", hdrs, b"xyz")
        assert heads[0] == (f"PUT /base/t?q=1 HTTP/1.1\r\nX-B: 2\r\nX-A: caf\u00e9\r\n"
                            f"X-A: 1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 3\r\n\r\n"
                            ).encode()
        with pytest.raises(ValueError):
            await pool.request("GET", "/", [("X-Evil", "a\r\nX-Injected: 1")], None)
        with pytest.raises(ValueError):
            await pool.request("GET", "/ HTTP/1.1\r\nX: y", [], None)


# ---------------------------------------------------------------------------------------------
# Streaming and back-pressure
# ---------------------------------------------------------------------------------------------


@uv
async def test_5mib_request_body_streamed_chunked() -> None:
    async with echo_pool() as (pool, _stats):
        blob = os.urandom(5 * 1024 * 1024)

        async def gen() -> AsyncIterator[bytes]:
            for off in range(0, len(blob), 100_000):
                yield blob[off:off + 100_000]
                if off % 1_000_000 == 0:
                    await asyncio.sleep(0)

        _resp, data = await fetch(pool, "POST", "/sha", [], gen())
        doc = json.loads(data)
        assert doc == {"sha256": hashlib.sha256(blob).hexdigest(), "len": len(blob),
                       "te": "chunked", "cl": ""}
        # A declared Content-Length with a streamed body is kept (raw, not chunked).
        _resp, data = await fetch(pool, "POST", "/sha", [("Content-Length", str(len(blob)))],
                                  gen())
        doc = json.loads(data)
        assert doc["te"] == "" and doc["cl"] == str(len(blob)) and doc["len"] == len(blob)
        assert pool.open_connections == 1


@uv
async def test_5mib_response_streamed_with_back_pressure() -> None:
    async with echo_pool() as (pool, _stats):
        resp = await pool.request("GET", "/big", [], None)
        try:
            assert resp.content_length == 5 * 1024 * 1024
            assert resp.body_complete is None
            await asyncio.sleep(0.2)  # a slow consumer: the pool must stop reading
            assert resp._buffered <= READ_HIGH_WATER + 256 * 1024
            h = hashlib.sha256()
            n_chunks = 0
            biggest = 0
            while chunk := await resp.read():
                h.update(chunk)
                n_chunks += 1
                biggest = max(biggest, len(chunk))
        finally:
            resp.release()
        assert h.hexdigest() == hashlib.sha256(b"x" * (5 * 1024 * 1024)).hexdigest()
        assert n_chunks > 4
        assert biggest <= READ_HIGH_WATER + 256 * 1024
        assert pool.idle_connections == 1


@uv
async def test_unread_body_discards_connection() -> None:
    async with echo_pool() as (pool, stats):
        resp = await pool.request("GET", "/big", [], None)
        assert await resp.read()
        resp.release()  # body not fully received: the connection cannot be reused
        assert pool.open_connections == 0
        _resp2, data = await fetch(pool, "GET", "/sized")
        assert data == b"0123456789"
        assert len(stats.peers) == 2


@uv
async def test_fast_path_threshold() -> None:
    size = FAST_BODY_MAX + 1

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, i: int) -> None:
        while True:
            head, _ = await read_request(r)
            n = size if b"/large" in head else 100
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + b"y" * n)
            await w.drain()

    async with raw_pool(handler) as (pool, _conns):
        resp = await pool.request("GET", "/small", [], None)
        assert resp.body_complete == b"y" * 100
        resp.release()
        resp = await pool.request("GET", "/large", [], None)
        assert resp.body_complete is None
        assert len(await body_of(resp)) == size
        resp.release()


@uv
async def test_early_response_stops_request_body() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, i: int) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        await asyncio.sleep(1)

    async with raw_pool(handler) as (pool, _conns):
        sent = 0

        async def gen() -> AsyncIterator[bytes]:
            nonlocal sent
            for _ in range(50):
                await asyncio.sleep(0.01)
                sent += 1
                yield b"z" * 1000

        resp = await pool.request("POST", "/", [], gen())
        assert resp.status == 413
        resp.release()
        assert sent < 50
        assert pool.open_connections == 0  # request incomplete: never reused


# ---------------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------------


@uv
async def test_connect_refused_is_502() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    async with pool_on(port) as pool:
        err = await request_error(pool)
        assert err.kind == "connect" and err.status == 502
        assert pool.open_connections == 0


@uv
async def test_connect_timeout_is_504() -> None:
    # A listener that never accepts, with its accept queue already full: the kernel drops
    # further SYNs, so connect() hangs like against a black-holed host.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    await asyncio.sleep(0.05)
    try:
        async with pool_on(port, connect_timeout=0.3) as pool:
            t0 = time.monotonic()
            err = await request_error(pool)
            assert err.kind == "timeout" and err.status == 504
            assert 0.25 < time.monotonic() - t0 < 2.0
            assert pool.open_connections == 0
    finally:
        for c in fillers:
            c.close()
        lsock.close()


_GARBAGE = [
    b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 150 Odd\r\n\r\n",
]


@uv
@pytest.mark.parametrize(("reply", "read_timeout", "kind", "status", "min_seconds"), [
    pytest.param(replies(5.0), 0.3, "timeout", 504, 0.25, id="read-timeout-waiting-for-head"),
    pytest.param(replies(b"HTTP/1.1 200 OK\r\nContent-Le", RST), 5.0, "reset", 502, 0.0,
                 id="reset-mid-head"),
    pytest.param(replies(), 5.0, "reset", 502, 0.0, id="eof-without-response"),
    *(pytest.param(replies(garbage, 1.0), 5.0, "protocol", 502, 0.0,
                   id=f"malformed-response-{n}") for n, garbage in enumerate(_GARBAGE)),
])
async def test_no_usable_response_head(reply: Handler, read_timeout: float, kind: str,
                                       status: int, min_seconds: float) -> None:
    """The request was sent; the answer never becomes a response head: an UpstreamError
    (timeout 504; reset or malformed 502) and the connection is not kept."""
    async with raw_pool(reply, read_timeout=read_timeout) as (pool, _conns):
        t0 = time.monotonic()
        err = await request_error(pool)
        assert err.kind == kind and err.status == status
        assert min_seconds < time.monotonic() - t0 < 2.0
        assert pool.open_connections == 0


@uv
@pytest.mark.parametrize(("reply", "read_timeout", "content_length", "first", "kind", "status"), [
    pytest.param(replies(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 5.0),
                 0.3, 10, b"abc", "timeout", 504, id="read-timeout-between-body-chunks"),
    pytest.param(replies(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", 0.05),
                 5.0, 100, b"0123456789", "reset", 502, id="reset-mid-body"),
    pytest.param(replies(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                         0.05, b"zz\r\n", 1.0),
                 5.0, None, b"abc", "protocol", 502, id="malformed-chunk-mid-body"),
])
async def test_body_failure_raises_from_read(reply: Handler, read_timeout: float,
                                             content_length: int | None, first: bytes,
                                             kind: str, status: int) -> None:
    """The head arrived, the body breaks off: ``read()`` gives what came, then raises; the
    connection is not kept."""
    async with raw_pool(reply, read_timeout=read_timeout) as (pool, _conns):
        resp = await pool.request("GET", "/", [], None)
        assert resp.status == 200 and resp.body_complete is None
        assert resp.content_length == content_length
        assert await resp.read() == first
        with pytest.raises(UpstreamError) as ei:
            await resp.read()
        assert ei.value.kind == kind and ei.value.status == status
        resp.release()
        assert pool.open_connections == 0


# ---------------------------------------------------------------------------------------------
# Stale keep-alive connections and retries
# ---------------------------------------------------------------------------------------------


@uv
async def test_server_closing_idle_connection_is_noticed() -> None:
    # The server closes the idle keep-alive connection 50 ms after its response.
    reply = replies(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 0.05)
    async with raw_pool(reply) as (pool, conns):
        await fetch(pool)
        assert pool.idle_connections == 1
        await asyncio.sleep(0.2)
        assert pool.idle_connections == 0 and pool.open_connections == 0
        _resp, data = await fetch(pool)
        assert data == b"ok" and len(conns) == 2


def stale_server(log: list[tuple[int, bytes]]) -> Handler:
    """Answers the first request of each connection; on the second one it closes without a
    response byte - a keep-alive connection the server dropped just as it was reused."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, i: int) -> None:
        head, _ = await read_request(r)
        log.append((i, head.split(b" ", 1)[0]))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        head, _ = await read_request(r)
        log.append((i, head.split(b" ", 1)[0]))

    return handler


@uv
async def test_stale_connection_get_is_retried_once() -> None:
    log: list[tuple[int, bytes]] = []
    async with raw_pool(stale_server(log)) as (pool, _conns):
        await fetch(pool)
        resp, data = await fetch(pool)  # stale reused connection -> one retry, fresh conn
        assert resp.status == 200 and data == b"ok"
        assert log == [(0, b"GET"), (0, b"GET"), (1, b"GET")]


@uv
async def test_stale_connection_post_is_not_retried() -> None:
    log: list[tuple[int, bytes]] = []
    async with raw_pool(stale_server(log)) as (pool, conns):
        await fetch(pool, "POST", "/", [], b"1")
        err = await request_error(pool, "POST", "/", b"2")
        assert err.kind == "reset" and err.status == 502
        await asyncio.sleep(0.05)
        assert log == [(0, b"POST"), (0, b"POST")]  # sent once, never resent
        assert len(conns) == 1


@uv
async def test_idle_connections_expire() -> None:
    async with echo_pool(idle_timeout=0.2) as (pool, stats):
        await fetch(pool, "GET", "/sized")
        assert pool.idle_connections == 1
        await asyncio.sleep(0.5)
        assert pool.idle_connections == 0 and pool.open_connections == 0
        await fetch(pool, "GET", "/sized")
        assert len(stats.peers) == 2


@uv
async def test_closed_pool_refuses() -> None:
    async with echo_pool() as (pool, _stats):
        await pool.close()
        assert (await request_error(pool)).status == 502


@pytest.mark.parametrize(("url", "match"), [
    ("ftp://127.0.0.1:1", "only http:// and https://"),
    ("http:///api", "URL has no host"),
    ("http://127.0.0.1:1/api?x=1", "must not have a query or fragment"),
    ("http://127.0.0.1:1/api#top", "must not have a query or fragment"),
])
def test_rejects_unusable_urls(url: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UpstreamPool(UpstreamConfig(name="x", url=url))


@pytest.mark.parametrize(("url", "host_line", "base"), [
    ("http://[::1]:8080/api/", "Host: [::1]:8080\r\n", "/api"),  # IPv6 keeps its brackets
    # RFC 9110 §4.2.1/§4.2.2: the scheme's default port (80, 443) is left out of Host
    # (tests/dataplane/test_tls.py covers https upstreams end to end).
    ("http://api.example.com:80", "Host: api.example.com\r\n", ""),
    ("https://api.example.com:443", "Host: api.example.com\r\n", ""),
    ("https://api.example.com:8443/v1", "Host: api.example.com:8443\r\n", "/v1"),
])
def test_host_line_and_base_path_from_the_url(url: str, host_line: str, base: str) -> None:
    pool = UpstreamPool(UpstreamConfig(name="x", url=url))
    assert pool._host_line == host_line and pool._base == base


def test_also_runs_on_the_default_asyncio_loop() -> None:
    async def main() -> bytes:
        async with echo_pool() as (pool, _stats):
            await fetch(pool, "GET", "/sized")
            _, data = await fetch(pool, "GET", "/chunked")
            return data

    assert asyncio.run(main()) == b"part0;part1;part2;part3;part4;"
