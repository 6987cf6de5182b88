"""The client-facing HTTP/1.1 protocol of the data plane on raw sockets (issue 9).

Every test drives the real gateway (``start_gateway``) on 127.0.0.1 with bytes written by
hand, and checks three things: what the client got (status, JSON body, ``Connection``), what
happened to the connection afterwards (kept, or closed by the gateway) and what the upstream
received (a recording aiohttp :class:`EchoUpstream`, or a raw asyncio upstream for the
misbehaving-upstream cases). RFC sections are those of RFC 9110 / RFC 9112.

Where the exact answer is a design choice, the expectation is one module-level constant.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from ipaddress import ip_network
from typing import Any, TypeVar

import pytest
from aiohttp import web

from fastgate.config import (
    Address,
    AuthConfig,
    GatewayConfig,
    Limits,
    ProviderConfig,
    RouteConfig,
    RouteMatch,
    Timeouts,
    UpstreamConfig,
)
from tests.factory import AUDIENCE, ISSUER, SigningKey, default_claims, jwks_of, key_for, make_token
from tests.gateway_fixtures import (
    EchoUpstream,
    Loop,
    MetricsSink,
    RawResponse,
    dead_port,
    eof_within,
    http_request,
    read_response,
    serving,
)

T = TypeVar("T")
MiB = 1024 * 1024
HEAD_LIMIT = 16384  # Limits.max_header_bytes used by every gateway here (the default)

# -- design choices (one place each) ------------------------------------------------------------
BAD_REQUEST = (400, {"error": "bad_request"})
# Absolute-form targets (RFC 9112 §3.2.2) and CONNECT (RFC 9110 §9.3.6): a reverse proxy is
# an origin server to its clients; what tests/dataplane/test_proxy.py already holds.
ABSOLUTE_FORM_REFUSED = (400, {"error": "bad_request"})
CONNECT_REFUSED = (405, {"error": "method_not_allowed"})
HEADER_TIMEOUT_ANSWER = (408, {"error": "request_timeout"})  # HAProxy: 408 then close
HEAD_TOO_LARGE = (431, {"error": "request_header_fields_too_large"})
# Past limits.max_connections: one 503 then close (the lead's documented behaviour).
OVER_CAPACITY = (503, {"error": "service_unavailable"})
BAD_GATEWAY = (502, {"error": "bad_gateway"})
PAYLOAD_TOO_LARGE = (413, {"error": "payload_too_large"})
# Substrings a Server header on a gateway-written response must not carry.
BANNED_SERVER_TOKENS = ("python", "aiohttp")

# What a poisoning upstream appends: the attacker's response for the NEXT client.
EVIL = (b"HTTP/1.1 302 Found\r\nLocation: http://evil.test/\r\n"
        b"Set-Cookie: session=attacker\r\nContent-Length: 0\r\n\r\n")


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


@dataclass
class Env:
    loop: Loop
    up: EchoUpstream
    key: SigningKey

    def token(self, **claims: Any) -> str:
        return make_token(self.key, default_claims(now=time.time(), **claims))

    def config(self, *routes: RouteConfig, upstream_url: str | None = None,
               **overrides: Any) -> GatewayConfig:
        """A gateway with a public ``/public/`` route, a JWT ``/api/`` route and a dead
        upstream on ``/dead/`` (or only ``routes`` when given)."""
        url = upstream_url or self.up.url
        base = GatewayConfig(
            listen=Address("127.0.0.1", 0),
            admin=None,
            limits=Limits(max_header_bytes=HEAD_LIMIT, max_body_bytes=6 * MiB),
            upstreams={
                "echo": UpstreamConfig("echo", url, max_connections=64),
                "dead": UpstreamConfig("dead", f"http://127.0.0.1:{dead_port()}",
                                       connect_timeout=1.0),
            },
            providers={"main": ProviderConfig("main", ISSUER, "jwks", jwks=jwks_of(self.key),
                                              audiences=(AUDIENCE,), algorithms=("RS256",))},
            routes=routes or (
                _route("public", path_prefix="/public/"),
                _route("api", path_prefix="/api/", auth=AuthConfig(providers=("main",))),
                _route("dead", upstream="dead", path_prefix="/dead/"),
            ),
        )
        return replace(base, **overrides)

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        try:
            return self.loop.run(coro, timeout)
        finally:
            gc.collect()

    def targets(self) -> list[str]:
        return [r.target for r in self.up.records]


def _route(name: str, upstream: str = "echo", auth: AuthConfig | None = None,
           **match: Any) -> RouteConfig:
    return RouteConfig(name, RouteMatch(**match), upstream, auth=auth)


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    loop = Loop()
    up = loop.run(EchoUpstream.start())
    try:
        yield Env(loop, up, key_for("RS256"))
    finally:
        loop.run(up.stop())
        loop.close()


@pytest.fixture(autouse=True)
def _clear(env: Env) -> None:
    env.up.clear()


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                        asyncio.StreamWriter]]:
    # A large read limit: an over-long relayed head fails an assertion, not the reader.
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=4 * MiB)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def response(reader: asyncio.StreamReader, *, head: bool = False,
                   timeout: float = 5.0) -> RawResponse:
    return await asyncio.wait_for(read_response(reader, head=head), timeout)


async def closed_within(conn: RawConn, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(conn.closed_by_gateway.wait(), seconds)
    return conn.closed_by_gateway.is_set()


async def send(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Write and drain; False when the gateway has already closed the connection."""
    try:
        writer.write(data)
        await writer.drain()
    except ConnectionError:
        return False
    return True


def expect(resp: RawResponse, answer: tuple[int, dict[str, str]]) -> None:
    status, body = answer
    assert resp.status == status, (resp.status, resp.body[:200])
    assert resp.header("Content-Type") == "application/json"
    assert resp.json() == body


def one_exchange(env: Env, data: bytes) -> tuple[RawResponse, bytes | None]:
    """``data`` written on a new connection to a gateway with ``env.config()``: the first
    response, and what the gateway sends after it within 3 s (b"": it closed; None: the
    connection stayed open)."""
    async def go() -> tuple[RawResponse, bytes | None]:
        async with serving(env.config()) as gw, connection(gw.port) as (reader, writer):
            writer.write(data)
            resp = await response(reader)
            return resp, await eof_within(reader, 3)

    return env.run(go())


def says_close(resp: RawResponse) -> bool:
    value = resp.header("Connection") or ""
    return "close" in [t.strip().lower() for t in value.split(",")]


def smuggled(env: Env) -> list[str]:
    return [t for t in env.targets() if "smuggled" in t]


SMUGGLED = b"GET /public/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"


@dataclass
class RawConn:
    id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    heads: list[bytes] = field(default_factory=list)
    closed_by_gateway: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_head(self) -> bytes | None:
        """The next request head, or None at EOF (the gateway closed this connection)."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_gateway.set()
            return None
        self.heads.append(head)
        return head

    async def until_eof(self) -> bytes:
        data = bytearray()
        try:
            while chunk := await self.reader.read(65536):
                data += chunk
        except ConnectionError:
            pass
        self.closed_by_gateway.set()
        return bytes(data)


class RawUpstream:
    """A hand-written upstream: ``handler(conn)`` runs once per connection the gateway
    opens; connections are numbered from 1 in accept order."""

    def __init__(self, handler: Callable[[RawConn], Awaitable[None]]) -> None:
        self.handler = handler
        self.conns: list[RawConn] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> RawUpstream:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = RawConn(len(self.conns) + 1, reader, writer)
            self.conns.append(conn)
            try:
                await self.handler(conn)
            except ConnectionError:
                conn.closed_by_gateway.set()
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            conn.writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 2)


def _target(head: bytes) -> bytes:
    return head.split(b" ", 2)[1]


# ---------------------------------------------------------------------------------------------
# Framing and smuggling (RFC 9112 §6)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["body-sent", "body-partly-sent"])
def test_rejected_request_with_unread_body_closes(env: Env, framing: str) -> None:
    """A reject answered before its body was read: the body (here a whole request) is never
    parsed as the next request; the connection closes after the reject."""
    declared = len(SMUGGLED) if framing == "body-sent" else 1_000_000

    resp, rest = one_exchange(env, b"POST /api/orders HTTP/1.1\r\nHost: gw.test\r\n"
                                   b"Content-Length: %d\r\n\r\n" % declared + SMUGGLED)
    assert resp.status == 401 and resp.json()["reason"] == "token_missing"
    assert rest == b"", "the connection stayed open (or answered the body as a request)"
    assert says_close(resp), resp.headers
    assert env.up.records == []


@pytest.mark.parametrize("head", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Content-Length: 5\r\nContent-Length: 6\r\n",
    b"Content-Length: 5, 6\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: chunked, gzip\r\n",
    b"Transfer-Encoding: xchunked\r\n",
    b"Transfer-Encoding : chunked\r\n",
], ids=["cl-then-te", "te-then-cl", "two-content-lengths", "content-length-list",
        "te-gzip-only", "te-chunked-not-final", "te-xchunked", "te-space-before-colon"])
def test_ambiguous_framing_gets_400_and_close(env: Env, head: bytes) -> None:
    """RFC 9112 §6.1, §6.3 (3, 4) and §5.1: the body length cannot be trusted, so 400 and
    close; the bytes after the head (a smuggled request) reach nobody."""
    resp, rest = one_exchange(env, b"POST /public/x HTTP/1.1\r\nHost: gw.test\r\n" + head
                              + b"\r\n0\r\n\r\n" + SMUGGLED)
    expect(resp, BAD_REQUEST)
    assert rest == b"", "the connection stayed open after a framing error"
    assert says_close(resp), resp.headers  # as HAProxy and nginx do
    assert env.up.records == []


@pytest.mark.parametrize(("data", "answer"), [
    (b"GET http://gw.test/public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n", ABSOLUTE_FORM_REFUSED),
    (b"GET http://evil.test/public/x HTTP/1.1\r\nHost: gw.test\r\n\r\n", ABSOLUTE_FORM_REFUSED),
    (b"CONNECT upstream.test:443 HTTP/1.1\r\nHost: upstream.test:443\r\n\r\n", CONNECT_REFUSED),
    (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", CONNECT_REFUSED),
], ids=["absolute-form", "absolute-form-other-host", "connect", "connect-loopback"])
def test_absolute_form_and_connect_refused(env: Env, data: bytes,
                                           answer: tuple[int, dict[str, str]]) -> None:
    expect(one_exchange(env, data)[0], answer)
    assert env.up.records == []


@pytest.mark.parametrize("hosts", [
    b"",
    b"Host: gw.test\r\nHost: gw.test\r\n",
    b"Host: gw.test\r\nHost: evil.test\r\n",
    b"Host: gw.test, evil.test\r\n",
], ids=["missing", "repeated-same", "repeated-different", "list"])
def test_missing_or_repeated_host_is_400(env: Env, hosts: bytes) -> None:
    """RFC 9112 §3.2: an HTTP/1.1 request without Host, with more than one Host, or with an
    invalid one gets 400."""
    resp, _ = one_exchange(env, b"GET /public/x HTTP/1.1\r\n" + hosts
                           + b"Connection: close\r\n\r\n")
    expect(resp, BAD_REQUEST)
    assert env.up.records == []


# ---------------------------------------------------------------------------------------------
# Persistence (RFC 9112 §9)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "extra"), [
    ("1.0", ""),
    ("1.0", "Host: gw.test\r\n"),
    ("1.1", "Host: gw.test\r\nConnection: close\r\n"),
    ("1.1", "Host: gw.test\r\nConnection: Keep-Alive, CLOSE\r\n"),
], ids=["http10-no-host", "http10", "http11-close", "http11-close-mixed-case"])
def test_http10_and_connection_close_honoured(env: Env, version: str, extra: str) -> None:
    """The response is complete, then the gateway closes (RFC 9112 §9.3, §9.6); an
    HTTP/1.0 client never gets Transfer-Encoding (§6.1) although the upstream chunks."""
    n = 200_000
    expected = ((bytes(range(256)) * 256) * 4)[:n]

    resp, rest = one_exchange(env, f"GET /public/big/{n} HTTP/{version}\r\n{extra}\r\n".encode())
    assert resp.status == 200 and resp.body == expected
    if version == "1.0":
        assert resp.header("Transfer-Encoding") is None
        assert (resp.header("Connection") or "").lower() != "keep-alive"
    else:
        assert says_close(resp), resp.headers
    assert rest == b""
    assert env.targets() == [f"/public/big/{n}"]


def test_connection_close_then_more_bytes(env: Env) -> None:
    """HAProxy and nginx: answer the request that said close, then close; the bytes behind
    it are never answered nor forwarded."""
    resp, rest = one_exchange(env, b"GET /public/first HTTP/1.1\r\nHost: gw.test\r\n"
                                   b"Connection: close\r\n\r\n" + SMUGGLED)
    assert resp.status == 200 and resp.json()["target"] == "/public/first"
    assert says_close(resp), resp.headers
    assert rest == b""
    assert env.targets() == ["/public/first"]


def test_pipelined_requests_answered_in_order(env: Env) -> None:
    """Seven requests in one write: answered one at a time in order (RFC 9112 §9.3.2); the
    fast canned 401 and 404 wait for the slow response before them."""
    body = b"hello"
    pipeline = (
        http_request("GET", "/public/sleep/0.3", close=False)
        + http_request("GET", "/api/orders", close=False)
        + http_request("HEAD", "/public/fixed/100", close=False)
        + http_request("GET", "/public/status/204", close=False)
        + http_request("GET", "/nowhere", close=False)
        + http_request("POST", "/public/post", body=body, close=False)
        + http_request("GET", "/public/last", close=True)
    )

    async def go() -> list[RawResponse]:
        async with serving(env.config()) as gw, connection(gw.port) as (reader, writer):
            writer.write(pipeline)
            return [await response(reader, head=i == 2) for i in range(7)]

    resps = env.run(go())
    assert [r.status for r in resps] == [200, 401, 200, 204, 404, 200, 200]
    assert resps[0].json()["target"] == "/public/sleep/0.3"
    assert resps[1].json()["reason"] == "token_missing"
    assert resps[2].header("Content-Length") == "100" and resps[2].body == b""
    assert resps[4].json() == {"error": "not_found"}
    assert resps[5].json()["target"] == "/public/post" and resps[5].json()["body_len"] == 5
    assert resps[6].json()["target"] == "/public/last"
    assert env.targets() == ["/public/sleep/0.3", "/public/fixed/100", "/public/status/204",
                             "/public/post", "/public/last"]


@pytest.mark.parametrize("mode", ["sequential", "pipelined"])
def test_max_requests_per_connection(env: Env, mode: str) -> None:
    """limits.max_requests_per_connection = 3: the third response says close and the
    connection ends; a fourth pipelined request is never forwarded."""
    config = env.config()
    config = replace(config, limits=replace(config.limits, max_requests_per_connection=3))

    async def go() -> tuple[list[RawResponse], bytes | None]:
        async with serving(config) as gw, connection(gw.port) as (reader, writer):
            resps = []
            if mode == "pipelined":
                writer.write(b"".join(http_request("GET", f"/public/{i}", close=False)
                                      for i in range(4)))
                resps = [await response(reader) for _ in range(3)]
            else:
                for i in range(3):
                    writer.write(http_request("GET", f"/public/{i}", close=False))
                    resps.append(await response(reader))
            return resps, await eof_within(reader, 3)

    resps, rest = env.run(go())
    assert [r.status for r in resps] == [200, 200, 200]
    assert [says_close(r) for r in resps] == [False, False, True]
    assert rest == b""
    assert env.targets() == ["/public/0", "/public/1", "/public/2"]


# ---------------------------------------------------------------------------------------------
# Timeouts
# ---------------------------------------------------------------------------------------------


def test_header_timeout_cuts_a_trickling_client(env: Env) -> None:
    """Slowloris: ten clients send their heads at 1 byte/s. Each gets 408 and close within
    timeouts.header (2 s) instead of holding the connection; meanwhile other clients are
    served at once, and nothing of the trickled requests reaches the upstream."""
    header = 2.0
    config = env.config(timeouts=Timeouts(header=header, keepalive=75.0, send=30.0))
    head = b"GET /public/slowloris HTTP/1.1\r\nHost: gw.test\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"

    async def trickle(port: int) -> tuple[float, RawResponse | None, bytes | None]:
        async with connection(port) as (reader, writer):
            started = time.monotonic()

            async def feed() -> None:
                for i in range(len(head)):
                    if not await send(writer, head[i:i + 1]):
                        return
                    await asyncio.sleep(1.0)

            feeder = asyncio.ensure_future(feed())
            try:
                resp = await response(reader, timeout=header + 4)
            except (asyncio.IncompleteReadError, ConnectionError):
                resp = None
            elapsed = time.monotonic() - started
            rest = await eof_within(reader, 2)
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            return elapsed, resp, rest

    async def normal(port: int) -> list[float]:
        took = []
        for i in range(6):
            started = time.monotonic()
            async with connection(port) as (reader, writer):
                writer.write(http_request("GET", f"/public/normal/{i}"))
                assert (await response(reader, timeout=2)).status == 200
            took.append(time.monotonic() - started)
            await asyncio.sleep(0.25)
        return took

    async def go() -> tuple[list[Any], list[float]]:
        async with serving(config) as gw:
            slow = [asyncio.ensure_future(trickle(gw.port)) for _ in range(10)]
            await asyncio.sleep(0.2)
            took = await normal(gw.port)
            return list(await asyncio.gather(*slow)), took

    results, took = env.run(go(), timeout=30)
    assert max(took) < 0.5, took
    for elapsed, resp, rest in results:
        assert resp is not None, "closed without the 408"
        expect(resp, HEADER_TIMEOUT_ANSWER)
        assert says_close(resp), resp.headers
        assert rest == b""
        assert header * 0.9 <= elapsed <= header + 1.5, elapsed
    assert [t for t in env.targets() if "slowloris" in t] == []


def test_silent_new_connection_closed_by_header_timeout(env: Env) -> None:
    """A connection that never sends a byte is closed within timeouts.header (a 408 first is
    allowed; HAProxy and nginx close silently)."""
    config = env.config(timeouts=Timeouts(header=1.0, keepalive=75.0, send=30.0))

    async def go() -> tuple[float, bytes | None]:
        async with serving(config) as gw, connection(gw.port) as (reader, _):
            started = time.monotonic()
            rest = await eof_within(reader, 4)
            return time.monotonic() - started, rest

    elapsed, rest = env.run(go())
    assert rest is not None, "a silent connection was held past timeouts.header"
    assert rest == b"" or rest.startswith(b"HTTP/1.1 408 ")
    assert 0.8 <= elapsed <= 2.5, elapsed


def test_keepalive_idle_timeout(env: Env) -> None:
    """timeouts.keepalive (1 s) never cuts a request in flight (the upstream takes 1.5 s),
    and closes the connection once it has been idle that long after the response."""
    config = env.config(timeouts=Timeouts(header=10.0, keepalive=1.0, send=30.0))

    async def go() -> tuple[RawResponse, RawResponse, float, bytes | None]:
        async with serving(config) as gw, connection(gw.port) as (reader, writer):
            writer.write(http_request("GET", "/public/sleep/1.5", close=False))
            slow = await response(reader)
            await asyncio.sleep(0.5)  # idle, but less than keepalive
            writer.write(http_request("GET", "/public/again", close=False))
            again = await response(reader)
            started = time.monotonic()
            rest = await eof_within(reader, 4)
            return slow, again, time.monotonic() - started, rest

    slow, again, idle, rest = env.run(go())
    assert slow.status == 200 and not says_close(slow)
    assert again.status == 200 and not says_close(again)
    assert rest == b"", "the idle keep-alive connection was not closed"
    assert 0.8 <= idle <= 2.5, idle


# ---------------------------------------------------------------------------------------------
# Findings of the HTTP attack run
# ---------------------------------------------------------------------------------------------


POISONINGS = {
    # name: (client request, what the upstream writes in ONE write, the client's status/body)
    "second-response": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + EVIL,
                        200, b"ok"),
    "short-content-length": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n"
                             + EVIL, 200, b"ok"),
    "past-last-chunk": ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"2\r\nok\r\n0\r\n\r\n" + EVIL, 200, b"ok"),
    "body-after-204": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + EVIL, 204, b""),
    "body-after-304": ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n' + EVIL,
                       304, b""),
    "body-after-head": ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(EVIL)
                        + EVIL, 200, b""),
    "late-bytes-on-idle-connection": ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                                      200, b"ok"),
}


@pytest.mark.parametrize("kind", list(POISONINGS))
def test_response_queue_poisoning(env: Env, kind: str) -> None:
    """An upstream writes bytes past its response's framing. The client gets the framed
    response (as HAProxy and nginx relay it); the poisoned upstream connection is closed and
    never reused, so the next clients never receive the attacker's 302 / Set-Cookie."""
    method, poison, status, body = POISONINGS[kind]

    async def handler(conn: RawConn) -> None:
        while (head := await conn.read_head()) is not None:
            if b"/poison" in _target(head):
                conn.writer.write(poison)
                await conn.writer.drain()
                if kind.startswith("late"):
                    await asyncio.sleep(0.05)
                    conn.writer.write(EVIL)
            else:
                clean = b"clean-%d" % conn.id
                conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(clean)
                                  + clean)
            await conn.writer.drain()

    async def go() -> tuple[RawResponse, list[RawResponse], RawUpstream]:
        async with RawUpstream(handler) as up, serving(env.config(upstream_url=up.url)) as gw:
            async with connection(gw.port) as (reader, writer):
                writer.write(f"{method} /public/poison HTTP/1.1\r\nHost: gw.test\r\n"
                             "Connection: close\r\n\r\n".encode())
                first = await response(reader, head=method == "HEAD")
            await asyncio.sleep(0.2)
            nexts = []
            for _ in range(3):
                async with connection(gw.port) as (reader, writer):
                    writer.write(http_request("GET", "/public/clean"))
                    nexts.append(await response(reader))
            return first, nexts, await closed_within(up.conns[0], 3), up

    first, nexts, closed, up = env.run(go())
    assert first.status == status and first.body == body
    assert first.header("Set-Cookie") is None
    for resp in nexts:
        assert resp.status == 200, (resp.status, resp.headers)
        assert resp.header("Set-Cookie") is None and resp.header("Location") is None
        assert resp.body.startswith(b"clean-") and resp.body != b"clean-1"
    assert len(up.conns[0].heads) == 1, "the poisoned upstream connection was reused"
    assert closed, "the poisoned upstream connection was kept open"


UPSTREAM_HEADS = {
    # name: (response head written by the upstream, the client's status)
    "under-the-cap": (b"HTTP/1.1 200 OK\r\n" + b"".join(
        b"X-Fill-%03d: %s\r\n" % (i, b"f" * 180) for i in range(40)), 200),
    "many-fields": (b"HTTP/1.1 200 OK\r\n" + b"".join(
        b"X-Fill-%03d: %s\r\n" % (i, b"f" * 180) for i in range(400)), 502),
    "one-long-field": (b"HTTP/1.1 200 OK\r\nX-Long: " + b"l" * MiB + b"\r\n", 502),
    "unterminated": (b"HTTP/1.1 200 OK\r\n" + b"X-Endless: e\r\n" * (MiB // 14), 502),
}


@pytest.mark.parametrize("kind", list(UPSTREAM_HEADS))
def test_upstream_response_head_cap(env: Env, kind: str) -> None:
    """The upstream response head is capped (like the request head: max_header_bytes) ->
    502 JSON at once (not the 10 s read timeout), and that upstream connection is closed."""
    head, status = UPSTREAM_HEADS[kind]

    async def handler(conn: RawConn) -> None:
        if await conn.read_head() is None:
            return
        conn.writer.write(head)
        if kind != "unterminated":
            conn.writer.write(b"Content-Length: 2\r\n\r\nok")
        await conn.writer.drain()
        await conn.until_eof()

    async def go() -> tuple[RawResponse, float, bool]:
        async with RawUpstream(handler) as up:
            config = env.config(upstream_url=up.url)
            config = replace(config, upstreams={
                **config.upstreams, "echo": UpstreamConfig("echo", up.url, read_timeout=10.0)})
            async with serving(config) as gw, connection(gw.port) as (reader, writer):
                started = time.monotonic()
                writer.write(http_request("GET", "/public/head"))
                resp = await response(reader)
                took = time.monotonic() - started
                closed = status == 502 and await closed_within(up.conns[0], 3)
                return resp, took, closed

    resp, took, closed = env.run(go())
    if status == 200:
        assert resp.status == 200 and resp.body == b"ok"
        assert resp.header("X-Fill-039") == "f" * 180
    else:
        expect(resp, BAD_GATEWAY)
        assert took < 3, took
        assert not any(n.lower().startswith("x-") for n, _ in resp.headers)
        assert closed, "the upstream connection with the oversized head was kept"


@pytest.mark.parametrize("char", ["é", "€", "😀"], ids=["2-byte", "3-byte", "4-byte"])
def test_request_head_limit_counts_bytes(env: Env, char: str) -> None:
    """max_header_bytes counts bytes: a UTF-8 value of fewer characters than the limit but
    more bytes -> 431; the same number of ASCII characters passes."""
    fields = 4  # each field well under any per-line limit; the total is what counts
    count = (HEAD_LIMIT * 5 // 4) // len(char.encode()) // fields + 1
    assert fields * count < HEAD_LIMIT < fields * count * len(char.encode())

    async def one(port: int, c: str) -> RawResponse:
        async with connection(port) as (reader, writer):
            writer.write(http_request("GET", "/public/x",
                                      [(f"X-Value-{i}", c * count) for i in range(fields)]))
            return await response(reader)

    async def go() -> tuple[RawResponse, RawResponse]:
        async with serving(env.config()) as gw:
            return await one(gw.port, char), await one(gw.port, "a")

    wide, ascii_ = env.run(go())
    expect(wide, HEAD_TOO_LARGE)
    assert ascii_.status == 200
    assert len(env.up.records) == 1


@pytest.mark.parametrize("partial", [
    b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\nX-Long: " + b"a" * (HEAD_LIMIT + 4096),
    b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n"
    + b"".join(b"X-L%04d: %s\r\n" % (i, b"c" * 7000) for i in range(3)),
    b"GET /public/x HTTP/1.1\r\nHost: gw.test\r\n"
    + b"".join(b"X-L%04d: %s\r\n" % (i, b"c" * 90) for i in range(200)),
], ids=["one-unfinished-line", "few-long-lines-no-end", "many-lines-no-end"])
def test_request_head_limit_enforced_while_bytes_arrive(env: Env, partial: bytes) -> None:
    """An unfinished head past max_header_bytes is answered 431 and closed as soon as the
    limit is passed, not buffered until timeouts.header (10 s)."""
    assert len(partial) > HEAD_LIMIT

    async def go() -> tuple[RawResponse, float, bytes | None]:
        async with serving(env.config()) as gw, connection(gw.port) as (reader, writer):
            started = time.monotonic()
            await send(writer, partial)
            resp = await response(reader, timeout=5)
            took = time.monotonic() - started
            return resp, took, await eof_within(reader, 3)

    resp, took, rest = env.run(go())
    expect(resp, HEAD_TOO_LARGE)
    assert took < 2, took
    assert rest == b""
    assert env.up.records == []


def test_max_connections(env: Env) -> None:
    """limits.max_connections = 3: a fourth concurrent client gets one 503 and close, the
    three keep being served, and a slot freed by a close is usable again."""
    config = env.config()
    config = replace(config, limits=replace(config.limits, max_connections=3))

    async def go() -> tuple[list[int], RawResponse, bytes | None, list[int], int]:
        async with serving(config) as gw, contextlib.AsyncExitStack() as stack:
            held = [await stack.enter_async_context(connection(gw.port)) for _ in range(3)]
            first = []
            for reader, writer in held:
                writer.write(http_request("GET", "/public/held", close=False))
                first.append((await response(reader)).status)
            async with connection(gw.port) as (reader, writer):
                writer.write(http_request("GET", "/public/over", close=False))
                over = await response(reader)
                over_rest = await eof_within(reader, 3)
            again = []
            for reader, writer in held:
                writer.write(http_request("GET", "/public/held", close=False))
                again.append((await response(reader)).status)
            held[0][1].close()
            await asyncio.sleep(0.3)
            async with connection(gw.port) as (reader, writer):
                writer.write(http_request("GET", "/public/after"))
                after = (await response(reader)).status
            return first, over, over_rest, again, after

    first, over, over_rest, again, after = env.run(go())
    assert first == [200] * 3
    expect(over, OVER_CAPACITY)
    assert says_close(over)
    assert over_rest == b""
    assert again == [200] * 3
    assert after == 200
    assert "/public/over" not in env.targets()


@pytest.mark.parametrize("chunk", [64 * 1024, 2 * MiB], ids=["many-chunks", "one-big-chunk"])
def test_chunked_upload_over_max_body_aborts_upstream(env: Env, chunk: int) -> None:
    """max_body_bytes = 1 MiB; 2 MiB arrive chunked on a public (streamed) route: the client
    gets 413, and the upstream request is cut mid-body: the upstream never sees the last
    chunk, its connection is closed."""
    received: list[bytes] = []

    async def handler(conn: RawConn) -> None:
        if await conn.read_head() is None:
            return
        data = bytearray()
        while not data.endswith(b"\r\n0\r\n\r\n"):
            piece = await conn.reader.read(65536)
            if not piece:
                conn.closed_by_gateway.set()
                break
            data += piece
        received.append(bytes(data))
        if data.endswith(b"\r\n0\r\n\r\n"):
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ncomplete")
            await conn.writer.drain()

    async def go() -> tuple[RawResponse, list[bool]]:
        async with RawUpstream(handler) as up:
            config = env.config(upstream_url=up.url)
            config = replace(config, limits=replace(config.limits, max_body_bytes=MiB))
            async with serving(config) as gw, connection(gw.port) as (reader, writer):
                writer.write(b"POST /public/upload HTTP/1.1\r\nHost: gw.test\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n")
                total = 2 * MiB
                while total > 0 and await send(writer, b"%x\r\n" % chunk + b"u" * chunk
                                               + b"\r\n"):
                    total -= chunk
                await send(writer, b"0\r\n\r\n")
                resp = await response(reader, timeout=10)
                closed = [await closed_within(c, 3) for c in up.conns]
                return resp, closed

    resp, closed = env.run(go())
    expect(resp, PAYLOAD_TOO_LARGE)
    assert says_close(resp), resp.headers
    assert all(not r.endswith(b"\r\n0\r\n\r\n") for r in received), \
        "the upstream got a complete request"
    assert all(closed), "the upstream request was left open, not aborted"


@pytest.mark.parametrize("host", ["secure.test", "secure.test.", "secure.test:80",
                                  "SECURE.Test.:80", "secure.test.:80"])
def test_host_match_normalised(env: Env, host: str) -> None:
    """A trailing dot and the default port name the same host (RFC 9110 §4.2.1, §7.2), so
    they hit the host route's auth, never the catch-all behind it."""
    config = env.config(
        _route("secure", host="secure.test", path_prefix="/",
               auth=AuthConfig(providers=("main",))),
        _route("catch-all", path_prefix="/"),
    )

    async def go() -> tuple[RawResponse, RawResponse, RawResponse]:
        async with serving(config) as gw:
            async def one(h: str, headers: list[tuple[str, str]] | None = None) -> RawResponse:
                async with connection(gw.port) as (reader, writer):
                    writer.write(http_request("GET", "/admin", headers, host=h))
                    return await response(reader)

            anonymous = await one(host)
            authed = await one(host, [("Authorization", f"Bearer {env.token(sub='u-1')}")])
            other = await one("other.test")
            return anonymous, authed, other

    anonymous, authed, other = env.run(go())
    assert anonymous.status == 401 and anonymous.json()["reason"] == "token_missing"
    assert authed.status == 200  # the host route (with its auth), admitted
    assert other.status == 200
    assert len(env.up.records) == 2  # nothing for the anonymous request


CLIENT_FORWARDED = [("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-Proto", "https"),
                    ("X-Forwarded-Host", "api.example.com")]


@pytest.mark.parametrize(("trusted", "sent", "expected"), [
    (True, CLIENT_FORWARDED, ("203.0.113.9, 127.0.0.1", "https", "api.example.com")),
    (True, [("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.9")],
     ("198.51.100.1, 203.0.113.9, 127.0.0.1", "http", "gw.test")),
    (True, [], ("127.0.0.1", "http", "gw.test")),
    (False, CLIENT_FORWARDED, ("127.0.0.1", "http", "gw.test")),
    (False, [], ("127.0.0.1", "http", "gw.test")),
], ids=["trusted-kept", "trusted-two-fields", "trusted-none-sent", "untrusted-replaced",
        "untrusted-none-sent"])
def test_x_forwarded_follow_trusted_proxies(env: Env, trusted: bool,
                                            sent: list[tuple[str, str]],
                                            expected: tuple[str, str, str]) -> None:
    """SPEC §2 trusted_proxies: from a trusted peer the client's X-Forwarded-* are kept and
    the peer appended to X-Forwarded-For; from anyone else they are replaced."""
    proxies = (ip_network("127.0.0.1/32"),) if trusted else ()
    config = env.config(trusted_proxies=proxies)

    async def go() -> RawResponse:
        async with serving(config) as gw, connection(gw.port) as (reader, writer):
            writer.write(http_request("GET", "/public/xff", sent))
            return await response(reader)

    assert env.run(go()).status == 200
    rec = env.up.records[-1]
    got = tuple(rec.header_values(n) for n in ("X-Forwarded-For", "X-Forwarded-Proto",
                                               "X-Forwarded-Host"))
    assert got == tuple([v] for v in expected)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(("trusted", "sent_id", "kept"), [
    (True, "req-abc.123", True), (False, "req-abc.123", False), (True, None, False),
    (True, "bad id with spaces", False),
], ids=["trusted-kept", "untrusted-replaced", "absent-generated", "invalid-replaced"])
def test_request_id_kept_from_trusted_proxies_else_generated(
        env: Env, trusted: bool, sent_id: str | None, kept: bool) -> None:
    """tracing.request_id: a trusted proxy's X-Request-Id is forwarded as it is; anyone
    else's (or none) is replaced by an id the gateway makes, unique per request."""
    proxies = (ip_network("127.0.0.1/32"),) if trusted else ()
    config = env.config(trusted_proxies=proxies)
    headers = [("X-Request-Id", sent_id)] if sent_id is not None else []

    async def go() -> None:
        async with serving(config) as gw:
            for _ in range(2):
                async with connection(gw.port) as (reader, writer):
                    writer.write(http_request("GET", "/public/rid", headers))
                    assert (await response(reader)).status == 200

    env.run(go())
    ids = [r.header_values("X-Request-Id") for r in env.up.records]
    assert all(len(v) == 1 for v in ids), ids  # exactly one, never the client's plus ours
    if kept:
        assert ids == [[sent_id], [sent_id]]
    else:
        assert sent_id not in (ids[0][0], ids[1][0])
        assert ids[0] != ids[1] and all(re.fullmatch(r"[0-9a-f]{32}", v[0]) for v in ids)


@pytest.mark.parametrize(("mode", "sent", "forwarded"), [
    ("pass", TRACEPARENT, TRACEPARENT),
    ("pass", None, None),
    ("pass", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
    ("pass", "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
    ("pass", TRACEPARENT.upper(), None),
    ("create", TRACEPARENT, TRACEPARENT),
    ("create", None, "new"),
    ("create", "garbage", "new"),
], ids=["pass-valid", "pass-absent", "pass-zero-trace", "pass-version-ff", "pass-upper",
        "create-keeps-valid", "create-absent", "create-invalid"])
def test_w3c_traceparent_passed_or_created(env: Env, mode: str, sent: str | None,
                                           forwarded: str | None) -> None:
    """W3C Trace Context §3.2: a valid traceparent is forwarded (with its tracestate); an
    invalid one is dropped (and tracestate with it); ``traceparent: create`` makes a new one
    when there is none valid."""
    from fastgate.config import TracingConfig

    config = env.config(tracing=TracingConfig(traceparent=mode))  # type: ignore[arg-type]
    headers = [("traceparent", sent), ("tracestate", "vendor=1")] if sent is not None else []

    async def go() -> None:
        async with serving(config) as gw, connection(gw.port) as (reader, writer):
            writer.write(http_request("GET", "/public/tp", headers))
            assert (await response(reader)).status == 200

    env.run(go())
    rec = env.up.records[-1]
    got = rec.header_values("traceparent")
    if forwarded is None:
        assert got == [] and rec.header_values("tracestate") == []
    elif forwarded == "new":
        assert len(got) == 1 and re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", got[0])
        assert rec.header_values("tracestate") == []  # not the client's, with a new trace
    else:
        assert got == [forwarded] and rec.header_values("tracestate") == ["vendor=1"]


@pytest.mark.parametrize("data", [
    http_request("GET", "/nowhere"),
    http_request("GET", "/api/orders"),
    b"GARBAGE\r\n\r\n",
    b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
    http_request("POST", "/public/x", [("Content-Length", str(100 * MiB))]),
    http_request("GET", "/public/x", [("X-Big", "b" * (HEAD_LIMIT + 1))]),
    http_request("GET", "/dead/x"),
], ids=["404", "401", "400", "405", "413", "431", "502"])
def test_gateway_responses_have_no_python_server_banner(env: Env, data: bytes) -> None:
    resp, _ = one_exchange(env, data)
    assert resp.status >= 400
    server = (resp.header("Server") or "").lower()
    assert not any(token in server for token in BANNED_SERVER_TOKENS), server


# ---------------------------------------------------------------------------------------------
# Metrics timing and drain
# ---------------------------------------------------------------------------------------------

MIN_SECONDS = 0.0005  # the upstream blocks this long: sub-millisecond, as the finding says


def test_request_durations_never_below_a_known_minimum(env: Env) -> None:
    """Request and upstream durations use a high-resolution monotonic clock: a request whose
    upstream blocks >= 0.5 ms is never recorded below 0.5 ms (a millisecond-tick clock like
    uvloop's loop.time() records ~half of them as 0)."""
    class Durations(MetricsSink):
        def __init__(self) -> None:
            self.requests: list[float] = []
            self.upstream: list[float] = []

        def request_done(self, route_idx: int, status: int, seconds: float) -> None:
            self.requests.append(seconds)

        def upstream_observe(self, upstream_idx: int, seconds: float) -> None:
            self.upstream.append(seconds)

    async def handle(request: web.Request) -> web.Response:
        time.sleep(MIN_SECONDS)  # blocking on purpose: a guaranteed real-time minimum
        return web.Response(body=b"ok")

    durations = Durations()
    n = 40

    async def go() -> list[int]:
        app = web.Application()
        app.router.add_get("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            config = env.config(upstream_url=f"http://127.0.0.1:{port}")
            async with serving(config, metrics=durations) as gw, \
                    connection(gw.port) as (reader, writer):
                statuses = []
                for _ in range(n):
                    writer.write(http_request("GET", "/public/timed", close=False))
                    statuses.append((await response(reader)).status)
                return statuses
        finally:
            await runner.cleanup()

    assert env.run(go()) == [200] * n
    assert len(durations.requests) == n and len(durations.upstream) == n
    assert min(durations.requests) >= MIN_SECONDS, sorted(durations.requests)[:5]
    assert min(durations.upstream) >= MIN_SECONDS, sorted(durations.upstream)[:5]


def test_graceful_drain(env: Env) -> None:
    """gw.drain(2.0) with a slow request in flight: new connections are refused, an idle
    keep-alive connection is closed at once, the slow request completes with
    Connection: close, and drain returns when it is done (not at its timeout)."""
    async def go() -> tuple[float, bytes | None, bool, RawResponse, bytes | None, float]:
        async with serving(env.config()) as gw:
            port = gw.port
            async with connection(port) as (idle_r, idle_w), \
                    connection(port) as (busy_r, busy_w):
                idle_w.write(http_request("GET", "/public/idle", close=False))
                assert (await response(idle_r)).status == 200
                busy_w.write(http_request("GET", "/public/sleep/1.0", close=False))
                await asyncio.sleep(0.2)
                started = time.monotonic()
                drain = asyncio.ensure_future(gw.drain(2.0))
                idle_rest = await eof_within(idle_r, 0.5)
                idle_closed_after = time.monotonic() - started
                refused = False
                try:
                    _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1)
                    w.close()
                except (ConnectionRefusedError, OSError):
                    refused = True
                busy = await response(busy_r)
                busy_rest = await eof_within(busy_r, 2)
                await asyncio.wait_for(drain, 3)
                return (idle_closed_after, idle_rest, refused, busy, busy_rest,
                        time.monotonic() - started)

    idle_after, idle_rest, refused, busy, busy_rest, drained_in = env.run(go())
    assert idle_rest == b"", "the idle keep-alive connection was not closed at once"
    assert idle_after < 0.5
    assert refused, "a new connection was accepted while draining"
    assert busy.status == 200 and busy.json()["target"] == "/public/sleep/1.0"
    assert says_close(busy)
    assert busy_rest == b""
    assert drained_in < 1.9, drained_in


def test_reload_swaps_tables_without_dropping_a_request(env: Env) -> None:
    """gw.swap() between two requests of a keep-alive connection, with a third in flight:
    nothing is dropped, the connection stays usable, and its next request sees the new
    tables."""
    before = env.config()
    after = env.config(*before.routes, _route("new", path_prefix="/new/"))

    async def go() -> list[int]:
        async with serving(before) as gw, connection(gw.port) as (reader, writer), \
                connection(gw.port) as (slow_r, slow_w):
            statuses = []
            slow_w.write(http_request("GET", "/public/sleep/0.5", close=False))
            for i in range(20):
                if i == 10:
                    await gw.swap(after)
                writer.write(http_request("GET", f"/public/{i}", close=False))
                statuses.append((await response(reader)).status)
            writer.write(http_request("GET", "/new/x", close=False))
            statuses.append((await response(reader)).status)
            statuses.append((await response(slow_r)).status)
            return statuses

    assert env.run(go()) == [200] * 22
    assert "/new/x" in env.targets()


class _Broken(MetricsSink):
    """A metrics or access-log sink that fails (a bug, a full disk): the request must still
    be answered, never left hanging."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        if name != self.method:
            raise AttributeError(name)

        def fail(*args: Any, **kwargs: Any) -> None:
            self.calls += 1
            raise RuntimeError(f"{name} is broken")

        return fail


@pytest.mark.parametrize(("hook", "where", "status"), [
    ("upstream_observe", "metrics", 502),  # fails before the response head: a 502 instead
    ("reject", "metrics", 502),  # fails while deciding a reject
    ("log", "access_log", 200),  # fails after the response was written: it still arrives
])
def test_internal_failure_is_answered_never_a_hang(env: Env, hook: str, where: str,
                                                   status: int) -> None:
    broken = _Broken(hook)
    build: dict[str, Any] = {where: broken}
    target = "/api/x" if hook == "reject" else "/public/x"

    async def go() -> tuple[RawResponse, bytes | None]:
        async with serving(env.config(), **build) as gw, \
                connection(gw.port) as (reader, writer):
            writer.write(http_request("GET", target, close=False))
            resp = await response(reader)
            return resp, await eof_within(reader, 3)

    resp, rest = env.run(go(), timeout=15)
    assert broken.calls >= 1
    assert resp.status == status
    if status == 502:
        assert resp.json() == {"error": "bad_gateway"}
        assert rest == b"", "the connection must close after an internal error"
