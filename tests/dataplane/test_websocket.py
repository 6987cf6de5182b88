"""WebSocket passthrough and other upgrades (issue 9, RFC 6455, RFC 9110 §7.8).

aiohttp's real WebSocket client talks through the gateway to aiohttp's real WebSocket server;
the refused-upgrade cases use raw sockets so the exact bytes on the wire are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from fastgate.config import (
    Address,
    AuthConfig,
    ClaimHeader,
    GatewayConfig,
    ProviderConfig,
    RouteConfig,
    RouteMatch,
    UpstreamConfig,
)
from fastgate.token.reasons import Reason
from tests.factory import AUDIENCE, ISSUER, SigningKey, default_claims, jwks_of, key_for, make_token
from tests.gateway_fixtures import (
    AppServer,
    Loop,
    RawResponse,
    eof_within,
    read_response,
    serving,
)

# -- design choices (one place each) ------------------------------------------------------------
# `Upgrade: h2c` (RFC 9113 §3.1 removed it; RFC 9110 §7.8 lets a server ignore Upgrade):
# nginx and Envoy ignore it and serve the request as HTTP/1.1 with Upgrade and HTTP2-Settings
# removed; fastgate refuses it (H2C_REFUSED, then close): llhttp stops at an upgrade request,
# and parsing on from there would read bytes meant for the upgraded protocol (or an upgrade
# request's body) as HTTP/1.1 requests. True switches the test to the serve-as-HTTP/1.1 shape.
H2C_SERVED_AS_HTTP11 = False
H2C_REFUSED = (400, {"error": "bad_request"})


def with_ws_idle_timeout(config: GatewayConfig, seconds: float) -> GatewayConfig:
    """The idle timeout of a relayed WebSocket. Which setting carries it is the lead's call
    (HAProxy: `timeout tunnel`, nginx: proxy_read_timeout, Envoy: idle_timeout); both
    candidates are set so either implementation is held to it."""
    ws = replace(config.upstreams["ws"], read_timeout=seconds)
    return replace(config, timeouts=replace(config.timeouts, keepalive=seconds),
                   upstreams={**config.upstreams, "ws": ws})


H2C_REQUEST = (b"GET /plain/h2c HTTP/1.1\r\nHost: gw.test\r\n"
               b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
H2C_TAILS = {
    "next-request": b"GET /plain/after HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
}


# ---------------------------------------------------------------------------------------------
# The WebSocket upstream
# ---------------------------------------------------------------------------------------------


@dataclass
class WsUpstream(AppServer):
    """aiohttp WebSocket server on ``/<any>/echo``: echoes text and binary; ``push`` makes it
    send three messages of its own; ``close-me`` makes it close with 4000. ``/plain/...``
    answers an ordinary JSON echo of the request headers."""

    handshakes: list[dict[str, str]] = field(default_factory=list)
    plain: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    ended: list[tuple[float, int | None]] = field(default_factory=list)  # (time, close code)

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/{prefix}/echo", self._ws)
        app.router.add_get("/plain/{tail:.*}", self._plain)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append(dict(request.headers))
        ws = web.WebSocketResponse(heartbeat=None, max_msg_size=8 * 1024 * 1024)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "close-me":
                await ws.close(code=4000, message=b"bye")
            elif msg.type == aiohttp.WSMsgType.TEXT and msg.data == "push":
                for i in range(3):
                    await ws.send_str(f"push-{i}")
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.ended.append((time.monotonic(), ws.close_code))
        return ws

    async def _plain(self, request: web.Request) -> web.Response:
        self.plain.append((request.raw_path, dict(request.headers)))
        return web.json_response({"target": request.raw_path})


@dataclass
class Env:
    loop: Loop
    up: WsUpstream
    key: SigningKey
    config: GatewayConfig

    def token(self, **claims: Any) -> str:
        return make_token(self.key, default_claims(now=time.time(), **claims))


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    loop = Loop()
    up = loop.run(WsUpstream.start())
    key = key_for("RS256")
    auth = AuthConfig(providers=("main",), claim_headers=(ClaimHeader("X-User-Id", ("sub",)),))
    config = GatewayConfig(
        listen=Address("127.0.0.1", 0), admin=None,
        upstreams={"ws": UpstreamConfig("ws", up.url)},
        providers={"main": ProviderConfig("main", ISSUER, "jwks", jwks=jwks_of(key),
                                          audiences=(AUDIENCE,), algorithms=("RS256",))},
        routes=(
            RouteConfig("ws", RouteMatch(path_prefix="/ws/"), "ws"),
            RouteConfig("secure-ws", RouteMatch(path_prefix="/secure-ws/"), "ws", auth=auth),
            RouteConfig("plain", RouteMatch(path_prefix="/plain/"), "ws"),
        ),
    )
    try:
        yield Env(loop, up, key, config)
    finally:
        loop.run(up.stop())
        loop.close()


@pytest.fixture(autouse=True)
def _clear(env: Env) -> None:
    env.up.handshakes.clear()
    env.up.plain.clear()
    env.up.ended.clear()


async def answer(reader: asyncio.StreamReader, what: str) -> RawResponse:
    try:
        return await asyncio.wait_for(read_response(reader), 5)
    except TimeoutError:
        pytest.fail(f"no answer to {what} within 5 s")


async def ended_within(up: WsUpstream, count: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while len(up.ended) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return len(up.ended) >= count


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("closer", ["client", "server"])
def test_admitted_upgrade_relays_both_ways_until_close(env: Env, closer: str) -> None:
    """A JWT-admitted `Upgrade: websocket` is forwarded with the claim headers; after the
    upstream's 101 messages flow both ways (text, a 1 MiB binary, server pushes) until
    either side closes, and the close code crosses the gateway."""
    big = bytes(range(256)) * 4096

    async def go() -> tuple[list[Any], int | None, bool]:
        async with serving(env.config) as gw, aiohttp.ClientSession() as s, s.ws_connect(
                f"http://127.0.0.1:{gw.port}/secure-ws/echo", heartbeat=None,
                headers={"Authorization": f"Bearer {env.token(sub='ws-user')}"},
                max_msg_size=8 * 1024 * 1024) as ws:
            got: list[Any] = []
            await ws.send_str("hello")
            got.append((await ws.receive(timeout=5)).data)
            await ws.send_bytes(big)
            got.append((await ws.receive(timeout=5)).data == big)
            await ws.send_str("push")
            got.extend([(await ws.receive(timeout=5)).data for _ in range(3)])
            if closer == "client":
                await ws.close(code=1000)
            else:
                await ws.send_str("close-me")
                msg = await ws.receive(timeout=5)
                got.append((msg.type, msg.data))
            return got, ws.close_code, await ended_within(env.up, 1, 5)

    got, code, ended = env.loop.run(go())
    assert got[:5] == ["hello", True, "push-0", "push-1", "push-2"]
    if closer == "server":
        assert got[5] == (aiohttp.WSMsgType.CLOSE, 4000) and code == 4000
    else:
        assert code == 1000
    assert ended, "the upstream WebSocket never saw the end of the relay"
    if closer == "client":
        assert env.up.ended[0][1] == 1000  # the client's close frame reached the upstream
    [hs] = env.up.handshakes
    assert hs.get("Upgrade", "").lower() == "websocket"
    assert hs.get("X-User-Id") == "ws-user"


@pytest.mark.parametrize("case", ["missing", "expired"])
def test_rejected_upgrade_gets_the_normal_reject(env: Env, case: str) -> None:
    """An upgrade that fails auth gets the SPEC §4 reject (status, WWW-Authenticate, JSON),
    never a 101, and the upstream sees nothing; aiohttp's client reports the same status."""
    now = int(time.time())
    token = env.token(iat=now - 7200, exp=now - 3600)
    reason = Reason.TOKEN_MISSING if case == "missing" else Reason.TOKEN_EXPIRED
    auth = "" if case == "missing" else f"Authorization: Bearer {token}\r\n"
    upgrade = (f"GET /secure-ws/echo HTTP/1.1\r\nHost: gw.test\r\n{auth}"
               "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode()

    async def go() -> tuple[RawResponse, int]:
        async with serving(env.config) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            try:
                writer.write(upgrade)
                raw = await asyncio.wait_for(read_response(reader), 5)
            finally:
                writer.close()
            headers = {} if case == "missing" else {"Authorization": f"Bearer {token}"}
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await s.ws_connect(f"http://127.0.0.1:{gw.port}/secure-ws/echo",
                                       headers=headers,
                                       timeout=aiohttp.ClientWSTimeout(ws_receive=5))
            return raw, info.value.status

    raw, client_status = env.loop.run(go())
    assert raw.status == reason.status == client_status
    assert raw.header("WWW-Authenticate") == reason.www_authenticate(None)
    assert raw.header("Content-Type") == "application/json"
    expected = {"reason": reason.label}
    if reason.error is not None:  # token_missing has no error code (RFC 6750 §3.1)
        expected["error"] = reason.error
    assert raw.json() == expected
    assert raw.header("Upgrade") is None
    assert env.up.handshakes == []


@pytest.mark.parametrize("tail", list(H2C_TAILS))
def test_h2c_upgrade_refused_and_pipelined_bytes_never_hang(env: Env, tail: str) -> None:
    """`Upgrade: h2c` is never switched to (no 101) nor forwarded; whatever the client
    pipelined behind it is answered or the connection is closed - the client never hangs."""
    async def go() -> tuple[RawResponse, list[RawResponse], bytes | None]:
        async with serving(env.config) as gw:
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            try:
                writer.write(H2C_REQUEST + H2C_TAILS[tail])
                first = await answer(reader, "the h2c upgrade request")
                more = []
                if tail == "next-request" and H2C_SERVED_AS_HTTP11:
                    more.append(await answer(reader, "the request pipelined behind h2c"))
                elif tail == "http2-preface":
                    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError,
                                             TimeoutError):
                        more.append(await asyncio.wait_for(read_response(reader), 5))
                return first, more, await eof_within(reader, 5)
            finally:
                writer.close()

    first, more, rest = env.loop.run(go())
    assert first.status != 101 and 101 not in first.interim
    assert first.header("Upgrade") is None
    if H2C_SERVED_AS_HTTP11:
        assert first.status == 200 and first.json() == {"target": "/plain/h2c"}
        target, headers = env.up.plain[0]
        names = {n.lower() for n in headers}
        assert target == "/plain/h2c"
        assert "upgrade" not in names and "http2-settings" not in names
        assert "upgrade" not in headers.get("Connection", "").lower()
    else:
        status, body = H2C_REFUSED
        assert first.status == status and first.json() == body
        assert all(t != "/plain/h2c" for t, _ in env.up.plain)
    if tail == "next-request" and H2C_SERVED_AS_HTTP11:
        assert [r.status for r in more] == [200]
        assert more[0].json() == {"target": "/plain/after"}
    elif tail == "http2-preface":
        assert all(400 <= r.status < 500 for r in more)  # answered as a bad request, or not
    assert rest is not None, "the client was left hanging after the refused upgrade"
    assert rest == b""
    assert all(not t.startswith("PRI") for t, _ in env.up.plain)


def test_websocket_idle_timeout(env: Env) -> None:
    """A relayed WebSocket stays up while messages flow (2 s of traffic against a 1 s idle
    timeout), then both sides are closed about 1 s after the last message."""
    idle = 1.0
    config = with_ws_idle_timeout(env.config, idle)

    async def go() -> tuple[list[str], float, Any, bool]:
        async with serving(config) as gw, aiohttp.ClientSession() as s, s.ws_connect(
                f"http://127.0.0.1:{gw.port}/ws/echo", heartbeat=None, autoping=True) as ws:
            echoed = []
            for i in range(5):
                await asyncio.sleep(idle * 0.4)
                await ws.send_str(f"m{i}")
                echoed.append((await ws.receive(timeout=5)).data)
            quiet_from = time.monotonic()
            msg = await ws.receive(timeout=idle + 4)
            closed_after = time.monotonic() - quiet_from
            return echoed, closed_after, msg.type, await ended_within(env.up, 1, 3)

    echoed, closed_after, kind, ended = env.loop.run(go())
    assert echoed == [f"m{i}" for i in range(5)]
    assert kind in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    assert idle * 0.8 <= closed_after <= idle + 2.0, closed_after
    assert ended, "the upstream WebSocket was left open"
