"""The keep-alive HTTP/1.1 connection pool of one upstream (SPEC §2 ``upstreams``).

Hot path (one request on a warm pool): pop an idle connection (LIFO), one ``transport.write``
of the serialized head (+ small body), one Future for the response head, and - for the common
small response that arrives in one read - ``UpstreamResponse.body_complete`` already holds the
whole body, so the caller never awaits ``read()``.

The pool owns the upstream's URL (host, port, ``Host`` line, base path), the connection slots
(``max_connections``, FIFO waiters, the idle sweeper), request serialization and the retry of
an idempotent request whose reused connection turned out to be stale. TLS towards an https
upstream is :mod:`fastgate.dataplane.upstream_tls`'s; one connection is
:mod:`fastgate.dataplane.upstream_conn`'s.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, Final
from urllib.parse import urlsplit

from fastgate.config import UpstreamConfig
from fastgate.dataplane.upstream_conn import _DONE, _HEAD, _IDLE, _Conn
from fastgate.dataplane.upstream_errors import UpstreamError, _StaleConnection
from fastgate.dataplane.upstream_response import FAST_BODY_MAX, UpstreamResponse
from fastgate.dataplane.upstream_tls import UpstreamTLS, handshake_error
from fastgate.httpfields import HOP_BY_HOP

__all__ = ["IDLE_TIMEOUT", "UpstreamPool"]

#: Idle keep-alive connections older than this are closed by the sweeper.
IDLE_TIMEOUT: Final = 60.0

# Request fields the pool owns: framing (RFC 9112 §6.1-6.3), connection management
# (RFC 9112 §9) and Expect (RFC 9110 §10.1.1: the gateway answers 100-continue itself, so it
# never asks the upstream for one).
_REQUEST_OWNED: Final = HOP_BY_HOP | {"content-length", "expect", "host"}
# RFC 9110 §9.2.2: idempotent methods - safe to resend when a reused connection turned out to
# be closed before any response byte (RFC 9112 §9.3.1).
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# RFC 9110 §8.6: a request whose method defines a meaning for content carries Content-Length
# even when the content is empty.
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


class UpstreamPool:
    """Keep-alive connection pool for one upstream ``http(s)://host:port[/base]``.

    https (RFC 9110 §4.3.4): every connection is TLS
    (:class:`~fastgate.dataplane.upstream_tls.UpstreamTLS`),
    verified unless ``tls.verify`` is false; keep-alive pooling is the same as for http.

    ``max_connections`` bounds open + connecting connections; callers beyond it wait in FIFO
    order (at most ``read_timeout``) for a connection to be released.
    """

    def __init__(self, config: UpstreamConfig, *, idle_timeout: float = IDLE_TIMEOUT,
                 conn_class: Callable[[UpstreamPool, asyncio.AbstractEventLoop], Any] | None = None,
                 max_head_bytes: int = 65536) -> None:
        url = urlsplit(config.url)
        if url.scheme not in ("http", "https"):
            raise ValueError(f"upstream {config.name!r}: only http:// and https:// URLs are "
                             "supported")
        if not url.hostname:
            raise ValueError(f"upstream {config.name!r}: URL has no host: {config.url!r}")
        if url.query or url.fragment:
            raise ValueError(f"upstream {config.name!r}: URL must not have a query or fragment")
        self.name = config.name
        self._host = url.hostname
        default_port = 443 if url.scheme == "https" else 80  # RFC 9110 §4.2.1, §4.2.2
        self._port = url.port or default_port
        # RFC 9112 §3.2: Host = uri-host [":" port]; IPv6 literals keep their brackets.
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_line = f"Host: {host}\r\n" if self._port == default_port else \
            f"Host: {host}:{self._port}\r\n"
        #: TLS towards an https upstream (:mod:`fastgate.dataplane.upstream_tls`): the client
        #: context and the name sent as SNI and checked against the certificate (None: http).
        self._tls = UpstreamTLS(config, self._host, self._port, https=url.scheme == "https")
        self._base = url.path.rstrip("/")
        self._connect_timeout = config.connect_timeout
        self._read_timeout = config.read_timeout
        self._max = max(1, config.max_connections)
        self._idle_timeout = idle_timeout
        self._idle: list[_Conn] = []  # LIFO: the most recently used connection is warmest
        self._all: set[_Conn] = set()
        self._count = 0  # open + connecting connections (each holds a slot)
        self._waiters: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        # The connection type (relay mode: fastgate.relay.RelayConn) and the cap on a
        # response head it enforces while the head arrives.
        # (fastgate.dataplane._http.RelayConn implements the attributes the pool reads of a _Conn.)
        self._conn_class: Callable[[UpstreamPool, asyncio.AbstractEventLoop], Any] = \
            conn_class or _Conn
        self.max_head_bytes = max_head_bytes
        #: ``Host: ...\r\n`` as bytes (the relay writes request heads itself).
        self.host_line = self._host_line.encode("ascii", "surrogateescape")
        self.base = self._base.encode("utf-8", "surrogateescape")

    # -- public API -----------------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        return self._count

    @property
    def tls_files_changed(self) -> bool:
        """True when a CA, certificate or key file of ``tls`` changed since this pool was
        built (a reload then builds a new pool rather than reusing this one)."""
        return self._tls.files_changed

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    @property
    def closed(self) -> bool:
        return self._closed

    def take_idle(self) -> _Conn | None:
        """A warm idle connection now (LIFO), or None: the caller then awaits ``acquire``."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.dead:
                return conn
        return None

    async def acquire(self, fresh: bool = False) -> _Conn:
        """A connection (idle, new, or the next released one; FIFO past max_connections).
        Raises UpstreamError (connect failure, timeout, pool closed)."""
        if self._closed:
            raise UpstreamError("connect", "pool is closed")
        return await self._acquire(fresh)

    def release(self, conn: _Conn) -> None:
        """Give a connection back (reused when its exchange ended cleanly, else closed)."""
        self._release(conn)

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        head: bool = False,
    ) -> UpstreamResponse:
        """Send one request and return the final response head (see UpstreamResponse).

        The caller must ``release()`` the response. Raises UpstreamError.
        """
        if self._closed:
            raise UpstreamError("connect", "pool is closed")
        data, stream_length = self._serialize(method, target, headers, body)
        skip_body = head or method == "HEAD"
        idle = self._idle
        conn = idle.pop() if idle else await self._acquire()
        try:
            return await self._exchange(conn, data, body, stream_length, skip_body)
        except _StaleConnection:
            # RFC 9112 §9.3.1: resend on a new connection only when the method is idempotent
            # (RFC 9110 §9.2.2) and the body can be replayed. Nothing was received, so nothing
            # reached the client either.
            if method not in _IDEMPOTENT or not (body is None or isinstance(body, bytes)):
                raise UpstreamError(
                    "reset", "keep-alive connection closed by upstream before responding"
                ) from None
        conn = await self._acquire(fresh=True)
        try:
            return await self._exchange(conn, data, body, stream_length, skip_body)
        except _StaleConnection:  # pragma: no cover - a fresh connection is never "reused"
            raise UpstreamError("reset", "connection closed before the response") from None

    async def close(self) -> None:
        """Close every connection and fail queued waiters. Idempotent."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(UpstreamError("connect", "pool is closed"))
        for conn in list(self._all):
            if conn.resp is not None and conn.phase != _IDLE and conn.error is None:
                conn._fail(UpstreamError("reset", "pool closed"))
            conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports run connection_lost

    # -- request serialization ------------------------------------------------------------------

    def _serialize(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> tuple[bytes, int | None]:
        """The request head (plus a small bytes body) as one buffer; and, for a streamed body,
        the Content-Length the caller declared (None: send chunked)."""
        # RFC 9112 §3: request-line = method SP request-target SP HTTP-version
        parts = [method, " ", self._base + target if self._base else target, " HTTP/1.1\r\n"]
        lines = 2  # request line + the empty line ending the head
        declared: str | None = None
        has_host = False
        for name, value in headers:
            lname = name.lower()
            if lname in _REQUEST_OWNED:
                if lname == "host":
                    has_host = True
                elif lname == "content-length":
                    declared = value
                    continue
                else:
                    continue  # framing / hop-by-hop / Expect: the pool decides these
            parts += (name, ": ", value, "\r\n")
            lines += 1
        if not has_host:
            parts.append(self._host_line)  # RFC 9112 §3.2: Host is mandatory in HTTP/1.1
            lines += 1
        stream_length: int | None = None
        if isinstance(body, bytes):
            if body or method in _BODY_METHODS:
                parts.append(f"Content-Length: {len(body)}\r\n")  # RFC 9112 §6.2
                lines += 1
        elif body is None:
            if method in _BODY_METHODS:
                parts.append("Content-Length: 0\r\n")  # RFC 9110 §8.6
                lines += 1
        elif declared is not None and (d := declared.strip()).isascii() and d.isdigit():
            stream_length = int(d)
            parts.append(f"Content-Length: {stream_length}\r\n")
            lines += 1
        else:
            # RFC 9112 §6.1: unknown length -> chunked transfer coding.
            parts.append("Transfer-Encoding: chunked\r\n")
            lines += 1
        parts.append("\r\n")
        text = "".join(parts)
        # RFC 9110 §5.5: CR/LF in a field value (or target) would split the message; the data
        # plane never passes them, and this cheap count proves it (no request smuggling).
        if text.count("\n") != lines or text.count("\r") != lines:
            raise ValueError("CR or LF in a request target, header name or header value")
        data = text.encode("utf-8", "surrogateescape")
        if isinstance(body, bytes) and body and len(body) <= FAST_BODY_MAX:
            data += body  # one write, one segment for the common small body
        return data, stream_length

    # -- one exchange -------------------------------------------------------------------------

    async def _exchange(
        self,
        conn: _Conn,
        data: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        stream_length: int | None,
        skip_body: bool,
    ) -> UpstreamResponse:
        if conn.dead:
            conn.close()
            # Nothing was sent: safe to retry for any method.
            if conn.reused:
                raise _StaleConnection()
            raise UpstreamError("reset", "connection closed before the request was sent")
        resp = UpstreamResponse(conn)
        conn.resp = resp
        conn.phase = _HEAD
        conn.skip_body = skip_body
        conn.got_bytes = False
        transport = conn.transport
        assert transport is not None
        try:
            transport.write(data)
            if body is not None and not isinstance(body, bytes):
                await conn.send_stream(body, stream_length)
            elif body and len(body) > FAST_BODY_MAX:
                # Large buffered body: the transport queues it (the memory is held anyway);
                # the head timeout below covers an upstream that never reads it.
                transport.write(body)
            while conn.phase == _HEAD:
                await conn.arm()
                if conn.error is not None:
                    raise conn.error
        except BaseException:
            # Includes cancellation (client went away): the exchange is half done, so the
            # connection cannot be reused.
            resp._conn = None
            conn.close()
            raise
        if conn.phase == _DONE and resp._buffered <= FAST_BODY_MAX:
            # Fast path: the whole body came with the head (common small JSON response).
            chunks = resp._chunks
            if not chunks:
                resp.body_complete = b""
            elif len(chunks) == 1:
                resp.body_complete = chunks[0]
            else:
                resp.body_complete = b"".join(chunks)
        return resp

    # -- connection slots -----------------------------------------------------------------------

    async def _acquire(self, fresh: bool = False) -> _Conn:
        while True:
            if not fresh and (idle := self.take_idle()) is not None:
                return idle
            if self._count < self._max:
                self._count += 1
                return await self._connect()
            # RFC-less policy: FIFO queue for fairness; a released connection (or a freed slot,
            # signalled by None) goes to the oldest waiter.
            loop = asyncio.get_running_loop()
            waiter: asyncio.Future[_Conn | None] = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_later(self._read_timeout, _expire_waiter, waiter)
            try:
                got = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._hand_back(waiter.result())
                raise
            finally:
                timer.cancel()
            if got is None:
                return await self._connect()  # the slot was counted for us
            if not got.dead:
                return got
            # it died in flight; its slot was given onwards - try again

    def _hand_back(self, got: _Conn | None) -> None:
        if got is None:
            self._count -= 1
            self._give_slot()
        else:
            self._release(got)

    async def _connect(self) -> _Conn:
        """Open a connection for an already counted slot."""
        loop = asyncio.get_running_loop()
        conn: _Conn = self._conn_class(self, loop)
        tls = self._tls
        try:
            async with asyncio.timeout(self._connect_timeout):
                if tls.context is None:
                    await loop.create_connection(lambda: conn, self._host, self._port)
                else:
                    await loop.create_connection(
                        lambda: conn, self._host, self._port, ssl=tls.context,
                        server_hostname=tls.server_hostname,
                        ssl_handshake_timeout=self._connect_timeout)
        except BaseException as exc:
            self._count -= 1
            self._give_slot()
            if isinstance(exc, TimeoutError):
                raise UpstreamError(
                    "timeout", f"connect to {self._host}:{self._port} took over "
                               f"{self._connect_timeout:g}s") from None
            if isinstance(exc, ssl.SSLError):
                # A certificate not accepted, or no shared version or cipher: a TLS failure.
                raise handshake_error(exc, self._host, self._port,
                                      tls.server_hostname) from None
            if isinstance(exc, OSError):
                raise UpstreamError(
                    "connect", f"connect to {self._host}:{self._port} failed: {exc}") from None
            raise
        if self._closed:
            conn.close()
            raise UpstreamError("connect", "pool is closed")
        self._all.add(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        """Back from a response (or a cancelled waiter): reuse when clean, else close."""
        resp = conn.resp
        conn.resp = None
        if resp is not None:
            resp._conn = None
        if (
            conn.dead
            or self._closed
            or conn.must_close
            or (conn.phase != _DONE and conn.phase != _IDLE)
            or (conn.phase == _DONE and not conn.keep_alive)
        ):
            conn.close()
            return
        if conn.phase == _DONE:
            conn.reused = True
            conn.phase = _IDLE
            conn.close_delimited = False
            conn.skip_body = False
            if conn.reading_paused:
                conn.resume_reading()
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_at(
                conn.idle_since + self._idle_timeout, self._sweep)

    def _forget(self, conn: _Conn) -> None:
        """A connection died (closed by us or by the upstream): free its slot exactly once."""
        if conn in self._all:
            self._all.discard(conn)
        else:
            return  # never finished connecting: _connect already handled the slot
        if conn.phase == _IDLE and conn in self._idle:
            self._idle.remove(conn)
        self._count -= 1
        self._give_slot()

    def _give_slot(self) -> None:
        waiters = self._waiters
        while waiters and self._count < self._max:
            waiter = waiters.popleft()
            if not waiter.done():
                self._count += 1
                waiter.set_result(None)
                return

    def _sweep(self) -> None:
        self._sweeper = None
        idle = self._idle
        if not idle:
            return
        loop = idle[0].loop
        cutoff = loop.time() - self._idle_timeout
        # LIFO stack: the bottom holds the connections idle the longest.
        while idle and idle[0].idle_since <= cutoff:
            idle[0].close()  # removes it from the list via _forget
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + self._idle_timeout, self._sweep)


def _expire_waiter(waiter: asyncio.Future[_Conn | None]) -> None:
    if not waiter.done():
        waiter.set_exception(
            UpstreamError("timeout", "no upstream connection became free in time"))
