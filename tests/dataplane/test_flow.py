"""Flow control both ways (issue 9): the gateway never buffers what one side can't take.

The memory tests run the real ``fastgate run`` process (one worker, so the PID that serves is
the PID measured) and read its ``VmRSS`` from ``/proc/PID/status`` while a 100 MiB transfer
is stalled on the slow side; the upstream is a raw asyncio server in the test process that
writes (or reads) with ``drain()``, so it never buffers either. The send-timeout test runs
the gateway in-process in front of :class:`EchoUpstream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fastgate.config import (
    Address,
    GatewayConfig,
    RouteConfig,
    RouteMatch,
    Timeouts,
    UpstreamConfig,
)
from tests.gateway_fixtures import (
    EchoUpstream,
    Loop,
    dead_port,
    http_request,
    read_response,
    start_gateway,
)

MiB = 1024 * 1024
TOTAL = 100 * MiB
RSS_BUDGET = 20 * MiB  # issue 9: a stalled 100 MiB transfer grows the gateway by less
STALL = 3.0  # seconds the slow side takes nothing
BLOCK = bytes(range(256)) * 256  # 64 KiB, the pattern every stream here is made of
# Kernel socket buffers on loopback hold a few MiB per direction and hop; more than this
# moved while the slow side took nothing means someone buffered it in user space.
IN_FLIGHT_BOUND = 64 * MiB


def pattern_digest(n: int) -> str:
    digest = hashlib.sha256()
    for _ in range(n // len(BLOCK)):
        digest.update(BLOCK)
    digest.update(BLOCK[: n % len(BLOCK)])
    return digest.hexdigest()


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------------------------
# A raw streaming upstream
# ---------------------------------------------------------------------------------------------


@dataclass
class StreamUpstream:
    """``GET /down/<framing>/<n>``: n pattern bytes framed by Content-Length, chunked or
    connection close. ``POST /up/<pause>``: wait ``pause`` seconds without reading, then read
    the body (Content-Length or chunked) and answer its length and SHA-256."""

    server: asyncio.Server | None = None
    sent: int = 0  # body bytes written by GET handlers (cumulative)
    received: int = 0  # body bytes read by POST handlers (cumulative)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> StreamUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                method, target = head.split(b" ", 2)[:2]
                parts = target.decode().strip("/").split("/")
                if method == b"POST":
                    await self._upload(reader, writer, head, float(parts[1]))
                elif parts[0] == "down":
                    if not await self._download(writer, parts[1], int(parts[2])):
                        return
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    async def _download(self, writer: asyncio.StreamWriter, framing: str, n: int) -> bool:
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
        elif framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        left = n
        while left > 0:
            piece = BLOCK[: min(len(BLOCK), left)]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked"
                         else piece)
            await writer.drain()
            left -= len(piece)
            self.sent += len(piece)
        if framing == "chunked":
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return framing != "close"

    async def _upload(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      head: bytes, pause: float) -> None:
        await asyncio.sleep(pause)
        digest = hashlib.sha256()
        size = 0
        lower = head.lower()
        if b"transfer-encoding: chunked" in lower:
            while (n := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
                size += await self._read_exactly(reader, n, digest, "short chunk")
                await reader.readexactly(2)
            await reader.readuntil(b"\r\n")
        else:
            left = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
            size += await self._read_exactly(reader, left, digest, "short body")
        body = b'{"len":%d,"sha256":"%s"}' % (size, digest.hexdigest().encode())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    async def _read_exactly(self, reader: asyncio.StreamReader, n: int, digest: Any,
                            short: str) -> int:
        """Read ``n`` body bytes, at most 64 KiB at a time, into ``digest`` and
        :attr:`received`; ConnectionError(``short``) at an early EOF. Returns ``n``."""
        left = n
        while left > 0:
            piece = await reader.read(min(left, 65536))
            if not piece:
                raise ConnectionError(short)
            digest.update(piece)
            self.received += len(piece)
            left -= len(piece)
        return n


# ---------------------------------------------------------------------------------------------
# The real gateway process
# ---------------------------------------------------------------------------------------------


@dataclass
class Env:
    loop: Loop
    up: StreamUpstream
    proc: subprocess.Popen[bytes]
    port: int


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    loop = Loop()
    up = loop.run(StreamUpstream().start())
    port = dead_port()
    tmp = tmp_path_factory.mktemp("flow")
    path = tmp / "gateway.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{port}\nadmin: null\nmetrics: false\nworkers: 1\n"
        "access_log: {enabled: false}\ndrain_timeout: 1s\n"
        "limits: {max_body_bytes: 209715200}\n"
        f"upstreams:\n  stream: {{url: \"{up.url}\", read_timeout: 60s}}\n"
        "routes:\n  - {name: all, match: {path_prefix: /}, upstream: stream, auth: none}\n")
    log = (tmp / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "fastgate", "run", "-c", str(path)],
                            cwd=str(Path(__file__).resolve().parents[2]),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        loop.run(_until_up(port, proc), timeout=30)
        yield Env(loop, up, proc, port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        loop.run(up.stop())
        loop.close()


async def _until_up(port: int, proc: subprocess.Popen[bytes]) -> None:
    while True:
        assert proc.poll() is None, "fastgate run exited"
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(http_request("GET", "/ping"))
                if (await asyncio.wait_for(read_response(reader), 2)).status == 200:
                    return
            finally:
                writer.close()
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def slow_client(port: int, rcvbuf: int = 4096
                      ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A connection with a small receive buffer whose reader holds at most ~128 KiB before
    it stops reading from the socket (asyncio pauses the transport at 2 x limit)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=65536)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers


async def read_body_digest(reader: asyncio.StreamReader, headers: dict[str, str]
                           ) -> tuple[int, str]:
    """Stream the body (chunked, Content-Length or until close) through SHA-256."""
    digest = hashlib.sha256()
    size = 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while (n := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)) > 0:
            piece = await reader.readexactly(n)
            digest.update(piece)
            size += n
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            piece = await reader.read(min(left, 1 << 20))
            if not piece:
                raise asyncio.IncompleteReadError(b"", left)
            digest.update(piece)
            size += len(piece)
            left -= len(piece)
    else:
        while piece := await reader.read(1 << 20):
            digest.update(piece)
            size += len(piece)
    return size, digest.hexdigest()


async def peak_rss(pid: int, seconds: float) -> int:
    peak = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, rss(pid))
        await asyncio.sleep(0.05)
    return peak


async def warm_up(port: int) -> None:
    """One small transfer each way first, so start-up allocations are not counted."""
    async with slow_client(port, rcvbuf=1 << 20) as (reader, writer):
        writer.write(http_request("GET", f"/down/chunked/{4 * MiB}"))
        _, headers = await read_head(reader)
        await asyncio.wait_for(read_body_digest(reader, headers), 20)
    async with slow_client(port, rcvbuf=1 << 20) as (reader, writer):
        writer.write(http_request("POST", "/up/0", body=BLOCK * 64))
        assert (await asyncio.wait_for(read_response(reader), 20)).status == 200


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_100mib_response_to_a_stalled_client(env: Env, framing: str) -> None:
    """The client reads nothing for 3 s: the gateway's RSS grows < 20 MiB (it paused reading
    the upstream), the upstream is held back too, and once the client reads, the whole
    100 MiB arrives intact."""
    async def go() -> tuple[int, int, int, int, int, str]:
        await warm_up(env.port)
        base = rss(env.proc.pid)
        async with slow_client(env.port) as (reader, writer):
            sent_before = env.up.sent
            writer.write(http_request("GET", f"/down/{framing}/{TOTAL}"))
            peak = await peak_rss(env.proc.pid, STALL)
            moved = env.up.sent - sent_before
            status, headers = await asyncio.wait_for(read_head(reader), 10)
            size, digest = await asyncio.wait_for(read_body_digest(reader, headers), 60)
            return base, peak, moved, status, size, digest

    base, peak, moved, status, size, digest = env.loop.run(go(), timeout=120)
    assert peak - base < RSS_BUDGET, f"gateway RSS grew by {(peak - base) / MiB:.1f} MiB"
    assert moved < IN_FLIGHT_BOUND, f"{moved / MiB:.1f} MiB left the upstream while stalled"
    assert status == 200
    assert size == TOTAL and digest == pattern_digest(TOTAL)


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_fast_uploader_to_a_stalled_upstream(env: Env, framing: str) -> None:
    """The upstream reads nothing for 3 s while the client pushes 100 MiB as fast as it can:
    the gateway's RSS grows < 20 MiB and the client is held back (it paused reading the
    client); then the upstream reads and gets every byte."""
    async def go() -> tuple[int, int, int, dict[str, Any] | None, int]:
        await warm_up(env.port)
        base = rss(env.proc.pid)
        async with slow_client(env.port, rcvbuf=1 << 20) as (reader, writer):
            sent = 0
            if framing == "length":
                writer.write(b"POST /up/%d HTTP/1.1\r\nHost: gw.test\r\n"
                             b"Content-Length: %d\r\n\r\n" % (STALL, TOTAL))
            else:
                writer.write(b"POST /up/%d HTTP/1.1\r\nHost: gw.test\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n" % STALL)

            async def push() -> None:
                nonlocal sent
                piece = BLOCK * 4
                while sent < TOTAL:
                    data = piece[: TOTAL - sent]
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked"
                                 else data)
                    await writer.drain()
                    sent += len(data)
                if framing == "chunked":
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()

            pusher = asyncio.ensure_future(push())
            try:
                peak = await peak_rss(env.proc.pid, STALL - 0.3)
                pushed_while_stalled = sent
                await asyncio.wait_for(asyncio.shield(pusher), 60)
                resp = await asyncio.wait_for(read_response(reader), 30)
            finally:
                pusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pusher
            return base, peak, pushed_while_stalled, resp.json(), resp.status

    base, peak, pushed, echoed, status = env.loop.run(go(), timeout=120)
    assert peak - base < RSS_BUDGET, f"gateway RSS grew by {(peak - base) / MiB:.1f} MiB"
    assert pushed < IN_FLIGHT_BOUND, f"the client pushed {pushed / MiB:.1f} MiB while stalled"
    assert status == 200
    assert echoed == {"len": TOTAL, "sha256": pattern_digest(TOTAL)}


def test_send_timeout_frees_the_upstream_slot(tmp_path: Path) -> None:
    """Two clients that take none of their 64 MiB responses can't hold a max_connections: 2
    upstream: after timeouts.send (1 s) they are cut off (they never get the whole body), the
    pool slots are freed and other requests succeed."""
    n = 64 * MiB
    loop = Loop()
    up = loop.run(EchoUpstream.start())
    config = GatewayConfig(
        listen=Address("127.0.0.1", 0), admin=None,
        timeouts=Timeouts(header=10.0, keepalive=75.0, send=1.0),
        upstreams={"echo": UpstreamConfig("echo", up.url, max_connections=2,
                                          connect_timeout=2.0, read_timeout=5.0)},
        routes=(RouteConfig("public", RouteMatch(path_prefix="/public/"), "echo"),),
    )

    async def stalled(port: int, ready: asyncio.Event, release: asyncio.Event) -> int:
        async with slow_client(port) as (reader, writer):
            writer.write(http_request("GET", f"/public/big/{n}", close=False))
            ready.set()
            await release.wait()
            got = 0
            with contextlib.suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(20):
                    while piece := await reader.read(1 << 20):
                        got += len(piece)
            return got

    async def go() -> tuple[list[int], list[float], list[int]]:
        gw = await start_gateway(config)
        try:
            release = asyncio.Event()
            readies = [asyncio.Event() for _ in range(2)]
            stuck = [asyncio.ensure_future(stalled(gw.port, r, release)) for r in readies]
            for r in readies:
                await r.wait()
            await asyncio.sleep(config.timeouts.send + 1.5)
            statuses, took = [], []
            for i in range(4):
                started = time.monotonic()
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                try:
                    writer.write(http_request("GET", f"/public/after/{i}"))
                    statuses.append((await asyncio.wait_for(read_response(reader), 8)).status)
                finally:
                    writer.close()
                took.append(time.monotonic() - started)
            release.set()
            return statuses, took, list(await asyncio.gather(*stuck))
        finally:
            await gw.stop()

    try:
        statuses, took, got = loop.run(go(), timeout=60)
    finally:
        loop.run(up.stop())
        loop.close()
    assert statuses == [200] * 4, statuses
    assert max(took) < 1.0, took
    assert all(g < n for g in got), f"a stalled client was never cut off: {got}"
    assert [r.target for r in up.records if "/after/" in r.target] == [
        f"/public/after/{i}" for i in range(4)]
