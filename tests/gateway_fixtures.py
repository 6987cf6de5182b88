"""Shared helpers for gateway tests: a recording upstream, a started gateway, raw HTTP.

Everything runs on 127.0.0.1 with ephemeral ports on one uvloop event loop that the test
drives with :meth:`Loop.run` (no pytest-asyncio needed)::

    loop = Loop()
    upstream = loop.run(EchoUpstream.start())
    gw = loop.run(start_gateway(config))       # config.listen may use port 0
    resp = loop.run(raw_request(gw.port, b"GET /x HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n"))
    ...
    loop.run(gw.stop()); loop.run(upstream.stop()); loop.close()

:class:`EchoUpstream` is a real aiohttp server that records every request it gets (method,
target, headers in order, body length and SHA-256, the client port = the gateway's upstream
connection) and answers with a JSON echo. Special paths (anywhere in the path):

``/sleep/<seconds>``   sleep, then echo            ``/status/<code>``   empty response
``/big/<n>``           stream n bytes (chunked)    ``/reset``           drop the connection
``/fixed/<n>``         n bytes with Content-Length
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Self, TypeVar

import orjson
import uvloop
from aiohttp import web

from fastgate.app import Gateway
from fastgate.config import Address, GatewayConfig

T = TypeVar("T")


class Loop:
    """One uvloop event loop driven synchronously by the tests."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T] | Awaitable[T], timeout: float = 30.0) -> T:
        async def bounded() -> T:
            return await asyncio.wait_for(coro, timeout)

        return self.loop.run_until_complete(bounded())

    def close(self) -> None:
        loop = self.loop
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def uv(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """An async test run on a fresh uvloop loop (the data plane's loop), bounded to 30 s::

        @uv
        async def test_x() -> None: ...
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


@dataclass
class Recorded:
    method: str
    target: str  # path?query as received
    headers: list[tuple[str, str]]
    body_len: int
    body_sha256: str
    client_port: int

    def header_values(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def header_names(self) -> list[str]:
        return [n.lower() for n, _ in self.headers]


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """``app`` served on 127.0.0.1 at an ephemeral port: (runner, port); stop it with
    ``runner.cleanup()``."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


class AppServer:
    """A test server: the subclass's handlers (:meth:`routes`) in an aiohttp application on
    127.0.0.1 at an ephemeral port (:func:`serve_app`). ``server = await Sub.start()`` ...
    ``await server.stop()``; every field of a subclass needs a default."""

    client_max_size = 1024**2  # aiohttp's default
    runner: web.AppRunner
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    @classmethod
    async def start(cls) -> Self:
        self = cls()
        app = web.Application(client_max_size=cls.client_max_size)
        self.routes(app)
        self.runner, self.port = await serve_app(app)
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


@dataclass
class EchoUpstream(AppServer):
    records: list[Recorded] = field(default_factory=list)
    client_max_size = 64 * 1024 * 1024

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    def clear(self) -> None:
        self.records.clear()

    def connections(self) -> set[int]:
        """Distinct client ports seen: one per upstream connection the gateway opened."""
        return {r.client_port for r in self.records}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        rec = Recorded(
            method=request.method,
            target=request.raw_path,
            headers=[(k, v) for k, v in request.headers.items()],
            body_len=size,
            body_sha256=digest.hexdigest(),
            client_port=peer[1] if peer else 0,
        )
        self.records.append(rec)
        parts = request.path.split("/")
        if "reset" in parts:
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError("reset on purpose")
        if "sleep" in parts:
            await asyncio.sleep(float(parts[parts.index("sleep") + 1]))
        if "status" in parts:
            return web.Response(status=int(parts[parts.index("status") + 1]))
        if "fixed" in parts:
            n = int(parts[parts.index("fixed") + 1])
            return web.Response(body=b"x" * n, content_type="application/octet-stream")
        if "big" in parts:
            n = int(parts[parts.index("big") + 1])
            resp = web.StreamResponse()
            resp.content_type = "application/octet-stream"
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            block = bytes(range(256)) * 256  # 64 KiB
            sent = 0
            while sent < n:
                piece = block[: min(len(block), n - sent)]
                await resp.write(piece)
                sent += len(piece)
            await resp.write_eof()
            return resp
        body = orjson.dumps({
            "method": rec.method, "target": rec.target, "headers": rec.headers,
            "body_len": size, "body_sha256": rec.body_sha256,
        })
        return web.Response(body=body, content_type="application/json",
                            headers={"X-Upstream": "echo"})


def dead_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class MetricsSink:
    """The control part of :class:`fastgate.app.GatewayMetrics`, doing nothing, for test
    recorders: ``bind`` returns the recorder itself, so the data plane binds its per-request
    hooks (``request_done``, ``reject`` ...) from whatever methods a subclass defines."""

    def bind(self, *, routes: Sequence[str], upstreams: Sequence[str],
             public_routes: Iterable[str] = ()) -> Self:
        return self

    def reconfigure(self, *, routes: Sequence[str], providers: Sequence[str],
                    upstreams: Sequence[str], public_routes: Iterable[str] = ()) -> None:
        return None

    def track_cache_entries(self, fn: Callable[[], int]) -> None:
        return None

    def config_reload(self, result: str) -> None:
        return None

    def fetch(self, provider: str, result: str, seconds: float) -> None:
        return None

    def keys(self, provider: str, count: int) -> None:
        return None

    def age(self, provider: str, seconds: float) -> None:
        return None


async def start_gateway(config: GatewayConfig, **build_kwargs: Any) -> Gateway:
    """Build and start a gateway on 127.0.0.1 (ephemeral port unless config.listen has one)."""
    if config.listen.host != "127.0.0.1":
        config = replace(config, listen=Address("127.0.0.1", 0))
    gw = Gateway.build(config, **build_kwargs)
    await gw.start()
    return gw


@contextlib.asynccontextmanager
async def serving(config: GatewayConfig, **build_kwargs: Any) -> AsyncIterator[Gateway]:
    """A started gateway for the ``async with`` block, stopped after it."""
    gw = await start_gateway(config, **build_kwargs)
    try:
        yield gw
    finally:
        await gw.stop()


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[int]  # 1xx statuses received before the final response

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return None

    def json(self) -> Any:
        return orjson.loads(self.body)


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawResponse:
    """Parse one HTTP/1.1 response (Content-Length, chunked or until-close framing)."""
    interim: list[int] = []
    while True:
        head_bytes = await reader.readuntil(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        _, code, *rest = lines[0].split(" ", 2)
        status = int(code)
        headers = []
        for line in lines[1:]:
            if line:
                n, _, v = line.partition(":")
                headers.append((n.strip(), v.strip()))
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    resp = RawResponse(status, rest[0] if rest else "", headers, b"", interim)
    if head or status in (204, 304):
        return resp
    te = resp.header("Transfer-Encoding")
    cl = resp.header("Content-Length")
    if te is not None and "chunked" in te.lower():
        body = bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        resp.body = bytes(body)
    elif cl is not None:
        resp.body = await reader.readexactly(int(cl))
    else:
        resp.body = await reader.read()
    return resp


async def raw_request(port: int, data: bytes, *, head: bool = False,
                      timeout: float = 10.0) -> RawResponse:
    """Send raw bytes on a new connection and read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(read_response(reader, head=head), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def http_request(method: str, target: str, headers: list[tuple[str, str]] | None = None,
                 body: bytes = b"", *, host: str = "gw.test", close: bool = True) -> bytes:
    """Serialize a request (Content-Length added for a non-empty body)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    for n, v in headers or []:
        lines.append(f"{n}: {v}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


async def gather_limited(n: int, coros: list[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run the coroutine factories with at most ``n`` in flight; results in order."""
    sem = asyncio.Semaphore(n)

    async def one(factory: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await factory()

    return list(await asyncio.gather(*(one(f) for f in coros)))


async def eof_within(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """The bytes read before the gateway closed the connection (a reset counts as closed),
    or None when it was still open after ``seconds``."""
    data = bytearray()
    try:
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionError:
        pass
    except TimeoutError:
        return None
    return bytes(data)
