"""Keep-alive HTTP/1.1 client pool for the data plane's upstream leg.

One ``UpstreamPool`` per configured upstream (SPEC §2 ``upstreams``). Connections are
``asyncio.Protocol`` objects on the running (uvloop) loop; responses are parsed by llhttp
through ``httptools.HttpResponseParser`` - never by hand.

Hot path (one request on a warm pool): pop an idle connection (LIFO), one ``transport.write``
of the serialized head (+ small body), one Future for the response head, and - for the common
small response that arrives in one read - ``UpstreamResponse.body_complete`` already holds the
whole body, so the caller never awaits ``read()``. Timeouts use one lazily re-armed timer per
connection instead of a timer per request.

Text codec: header names/values and the reason phrase are decoded with UTF-8 +
``surrogateescape`` and request heads are encoded the same way. That is exactly how aiohttp's
server decodes (and its writer encodes) headers, so bytes round-trip unchanged through
aiohttp -> pool -> upstream; for ASCII it is identical to latin-1 (RFC 9110 §5.5 obs-text is
passed through as opaque bytes).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, Literal, cast
from urllib.parse import urlsplit

import httptools

from fastgate.config import UpstreamConfig
from fastgate.dataplane import tls
from fastgate.httpfields import HOP_BY_HOP

__all__ = ["UpstreamError", "UpstreamPool", "UpstreamResponse"]

log = logging.getLogger("fastgate.upstream")

#: ``tls``: an https upstream's TLS handshake failed (certificate not trusted, wrong name,
#: expired, no shared version or cipher; RFC 8446 §6.2 alerts).
ErrorKind = Literal["connect", "timeout", "reset", "protocol", "tls"]

#: A body at most this large that is complete when the head is handed out is joined into
#: ``UpstreamResponse.body_complete`` (fast path: no ``read()`` round trips).
FAST_BODY_MAX: Final = 64 * 1024
#: Per-response receive buffer bound: above it the transport stops reading (back-pressure
#: towards the upstream through TCP flow control); reading resumes once ``read()`` has taken
#: the buffer (it hands out everything buffered at once).
READ_HIGH_WATER: Final = 256 * 1024
#: Transport write buffer bound while streaming a request body (pause_writing above it).
WRITE_HIGH_WATER: Final = 256 * 1024
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
# 1xx responses llhttp parses as bodiless interim messages (RFC 9110 §15.2). 101 is an upgrade
# (refused: the data plane never forwards Upgrade); other 1xx codes are unassigned.
_INTERIM_OK: Final = frozenset({100, 102, 103})
# Connection options that name no end-to-end field (already dropped, or not a field at all).
_NOT_FIELD_NAMES: Final = HOP_BY_HOP | {"close", ""}

# Connection phases.
_IDLE: Final = 0  # no exchange (in the pool, or acquired and not yet written)
_HEAD: Final = 1  # request written (or being written), waiting for the final response head
_BODY: Final = 2  # head received, body still arriving
_DONE: Final = 3  # whole response received


class UpstreamError(Exception):
    """The upstream exchange failed; ``status`` is what the client gets (SPEC §3.5)."""

    kind: ErrorKind
    status: int
    #: A reused keep-alive connection closed before any response byte (RFC 9112 §9.3.1).
    stale: bool = False

    def __init__(self, kind: ErrorKind, detail: str = "") -> None:
        self.kind = kind
        # SPEC §3.5: upstream timeout -> 504 Gateway Timeout, any other failure -> 502.
        self.status = 504 if kind == "timeout" else 502
        super().__init__(f"upstream {kind} error" + (f": {detail}" if detail else ""))


class _StaleConnection(Exception):
    """A reused keep-alive connection closed before any response byte (maybe retryable)."""


class UpstreamResponse:
    """The final response head plus its body stream.

    ``body_complete`` (fast path): the whole body when it had already arrived (and is at most
    ``FAST_BODY_MAX`` bytes) by the time the head was returned; ``b""`` for responses without
    a body (HEAD, 204, 304). Otherwise None and the body is streamed with ``read()``.
    ``read()`` always streams the body from its start, independently of ``body_complete``:
    use one or the other. Always call ``release()`` (also after an error).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_eof",
        "_error",
        "body_complete",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None
    body_complete: bytes | None

    def __init__(self, conn: _Conn) -> None:
        self.status = 0
        self.reason = ""
        self.headers = []
        self.content_length = None
        self.body_complete = None
        self._conn: _Conn | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._error: UpstreamError | None = None

    async def read(self) -> bytes:
        """Next body chunk; ``b""`` once the body is complete.

        Raises UpstreamError (``reset``, ``timeout`` after ``read_timeout`` without data,
        ``protocol``) when the body cannot be completed. Data that arrived before a failure
        is returned first.
        """
        while True:
            chunks = self._chunks
            if chunks:
                # Hand out everything buffered at once (bounded by READ_HIGH_WATER + one read):
                # fewer, larger writes towards the client.
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                conn = self._conn
                if conn is not None and conn.reading_paused:
                    conn.resume_reading()
                return data
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            conn = self._conn
            if conn is None:
                raise UpstreamError("reset", "response released before its body was read")
            await conn.wait()

    def release(self) -> None:
        """Give the connection back: reused when the whole response was received and the
        connection is persistent, closed otherwise (e.g. body not fully received). Idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.pool._release(conn)

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r}>"


class _Conn(asyncio.Protocol):
    """One upstream TCP connection; parses with llhttp and feeds the current response."""

    __slots__ = (
        "_timer",
        "close_delimited",
        "dead",
        "deadline",
        "error",
        "got_bytes",
        "idle_since",
        "keep_alive",
        "loop",
        "must_close",
        "parser",
        "phase",
        "pool",
        "raw_headers",
        "reading_paused",
        "reason_buf",
        "resp",
        "reused",
        "skip_body",
        "swap_parser",
        "transport",
        "waiter",
        "write_paused",
    )

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.phase = _IDLE
        self.resp: UpstreamResponse | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.error: UpstreamError | _StaleConnection | None = None
        self.deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.dead = False
        self.reused = False
        self.got_bytes = False
        self.skip_body = False
        self.swap_parser = False
        self.keep_alive = False
        self.must_close = False
        self.close_delimited = False
        self.reading_paused = False
        self.write_paused = False
        self.idle_since = 0.0
        self.reason_buf = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport does not subclass asyncio.Transport; it implements it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.phase == _IDLE or self.phase == _DONE:
            # RFC 9112 §9.3.2: we never pipeline, so bytes outside an exchange (e.g. a 408
            # sent before an idle close) mean the connection's state is unknown: drop it.
            self.must_close = True
            if self.phase == _IDLE:
                self.close()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols: the data plane refuses Upgrade before calling us.
            self._fail(UpstreamError("protocol", "unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, UpstreamError):
                self._fail(cause)
            else:
                self._fail(UpstreamError("protocol", f"malformed response: {exc}"))
        if self.swap_parser:
            # A HEAD response ended at its head although llhttp, not knowing the request
            # method, still expects the body its Content-Length announces (RFC 9110 §9.3.2):
            # start the next exchange with a fresh parser.
            self.swap_parser = False
            self.parser = httptools.HttpResponseParser(self)

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost decides what EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == _BODY and self.close_delimited and exc is None:
            # RFC 9112 §6.3 rule 8: a response without Content-Length or chunked framing ends
            # when the server closes the connection.
            self._message_done(keep_alive=False)
        elif self.phase == _HEAD or self.phase == _BODY:
            if self.phase == _HEAD and not self.got_bytes and self.reused:
                # RFC 9112 §9.3.1: a persistent connection may be closed by the server at any
                # time; a reused one that closed before any response byte is "stale".
                self._fail(_StaleConnection())
            else:
                where = "before the response head" if self.phase == _HEAD else "mid-body"
                why = f" ({exc})" if exc else ""
                # A TLS alert after the handshake (TLS 1.3 reports a refused client
                # certificate only then, RFC 8446 §4.4.2.4) is a TLS failure.
                kind: ErrorKind = "tls" if isinstance(exc, ssl.SSLError) else "reset"
                self._fail(UpstreamError(kind, f"connection closed {where}{why}"))
        self._mark_dead()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake()

    # -- httptools callbacks (called synchronously inside feed_data) --------------------------

    def on_message_begin(self) -> None:
        self.reason_buf = b""
        self.raw_headers = []

    def on_status(self, status: bytes) -> None:
        self.reason_buf += status  # may arrive in pieces across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.phase != _HEAD:
            return  # the tail of a HEAD response's phantom body: ignored (must_close is set)
        status: int = self.parser.get_status_code()
        if status < 200:
            # RFC 9110 §15.2: 1xx responses are interim; the final response follows on the same
            # connection. Never forwarded (the gateway sends its own 100 Continue).
            if status not in _INTERIM_OK and status != 101:
                raise UpstreamError("protocol", f"unsupported interim status {status}")
            return
        resp = self.resp
        assert resp is not None
        resp.status = status
        resp.reason = self.reason_buf.decode("utf-8", "surrogateescape")
        headers: list[tuple[str, str]] = []
        conn_tokens: list[str] | None = None
        length: bytes | None = None
        chunked = False
        names = _NAMES
        for raw_name, raw_value in self.raw_headers:
            cached = names.get(raw_name)
            if cached is None:
                cached = _name_entry(raw_name)
            name, lname = cached
            if lname in HOP_BY_HOP:
                if lname == "connection":
                    # RFC 9110 §7.6.1: every option named in Connection is hop-by-hop too.
                    tokens = raw_value.decode("latin-1").lower().split(",")
                    if conn_tokens is None:
                        conn_tokens = []
                    conn_tokens.extend(t.strip() for t in tokens)
                elif lname == "transfer-encoding":
                    # RFC 9112 §6.3 rule 4: chunked framing only when chunked is the final coding.
                    chunked = raw_value.decode("latin-1").lower().rsplit(",", 1)[-1].strip() \
                        == "chunked"
                continue
            if lname == "content-length":
                length = raw_value
            headers.append((name, raw_value.decode("utf-8", "surrogateescape")))
        if conn_tokens:
            drop = frozenset(conn_tokens) - _NOT_FIELD_NAMES  # usually nothing is left
            if drop:
                headers = [h for h in headers if h[0].lower() not in drop]
        resp.headers = headers
        if length is not None and not chunked:
            try:
                resp.content_length = int(length)  # llhttp already rejected invalid values
            except ValueError:
                raise UpstreamError("protocol", "invalid Content-Length") from None
        if self.skip_body or status == 204 or status == 304:
            # RFC 9110 §9.3.2 / RFC 9112 §6.3 rule 1: responses to HEAD, and 204/304, end at
            # the head whatever their Content-Length says.
            if self.skip_body:
                self.swap_parser = True  # llhttp cannot be told the request was HEAD
                keep_alive = self._head_keep_alive(conn_tokens)
                self.phase = _BODY
                self._message_done(keep_alive)
            else:
                self.phase = _BODY  # llhttp knows 204/304 are bodiless: on_message_complete
        else:
            self.phase = _BODY
            self.close_delimited = not chunked and length is None
        self._wake()

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        if self.phase != _BODY or resp is None:
            # Bytes after the head of a HEAD response: the server is confused about framing.
            self.must_close = True
            return
        resp._chunks.append(body)
        resp._buffered += len(body)
        if resp._buffered > READ_HIGH_WATER and not self.reading_paused:
            # Back-pressure: stop reading from the socket until the consumer catches up.
            assert self.transport is not None
            self.transport.pause_reading()
            self.reading_paused = True
        if self.waiter is not None:
            self._wake()

    def on_message_complete(self) -> None:
        if self.phase == _BODY:
            self._message_done(self.parser.should_keep_alive())
        # else: the end of an interim (1xx) message, or of a HEAD response already finished

    # -- state changes ----------------------------------------------------------------------

    def _head_keep_alive(self, conn_tokens: list[str] | None) -> bool:
        # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive"
        # (RFC 9112 Appendix C.2.2). Computed here because llhttp assumes a HEAD response
        # without Content-Length is close-delimited.
        if conn_tokens and "close" in conn_tokens:
            return False
        if self.parser.get_http_version() == "1.1":
            return True
        return conn_tokens is not None and "keep-alive" in conn_tokens

    def _message_done(self, keep_alive: bool) -> None:
        self.phase = _DONE
        self.keep_alive = keep_alive
        resp = self.resp
        if resp is not None:
            resp._eof = True
        self._wake()

    def _fail(self, error: UpstreamError | _StaleConnection) -> None:
        """The exchange cannot complete: record why, wake the waiter, drop the connection."""
        self.must_close = True
        if self.phase == _DONE:
            return  # the response is already whole; only the connection is lost
        if self.error is None:
            self.error = error
            resp = self.resp
            if resp is not None and isinstance(error, UpstreamError):
                resp._error = error
        self._wake()
        self.close()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def arm(self) -> asyncio.Future[None]:
        """A future resolved at the next state change; fails the exchange with a timeout if
        nothing happens within read_timeout (RFC 9112 §9.5). A plain Future, no coroutine:
        the caller awaits it and then checks ``error``."""
        error = self.error
        if error is not None:
            raise error
        waiter: asyncio.Future[None] = self.loop.create_future()
        self.waiter = waiter
        self.deadline = deadline = self.loop.time() + self.pool._read_timeout
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._on_timer)
        return waiter

    async def wait(self) -> None:
        await self.arm()
        error = self.error
        if error is not None:
            raise error

    def _on_timer(self) -> None:
        # One timer per connection, re-armed lazily: requests only move `deadline`.
        self._timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # nobody is waiting (woken, or the waiter was cancelled)
        deadline = self.deadline
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        what = "response head" if self.phase == _HEAD else "response body"
        if self.write_paused and self.phase == _HEAD:
            what = "upstream to accept the request body"
        self._fail(UpstreamError("timeout", f"no {what} within {self.pool._read_timeout:g}s"))

    def resume_reading(self) -> None:
        self.reading_paused = False
        if self.transport is not None and not self.dead:
            self.transport.resume_reading()

    def close(self) -> None:
        """Close now (abort: nothing we would still send is useful) and free the pool slot."""
        if self.transport is not None:
            self.transport.abort()
        self._mark_dead()

    def _mark_dead(self) -> None:
        retire(self)

    # -- request writing ----------------------------------------------------------------------

    async def drain(self) -> None:
        while self.write_paused:
            await self.wait()
        if self.dead and self.error is not None:
            raise self.error

    async def send_stream(self, body: AsyncIterator[bytes], length: int | None) -> None:
        """Stream a request body: raw with the caller's Content-Length, else chunked
        (RFC 9112 §7.1). Stops early if the upstream already answered (RFC 9112 §9.5)."""
        transport = self.transport
        assert transport is not None
        sent = 0
        async for chunk in body:
            if self.phase != _HEAD or self.dead:
                # The upstream answered (or failed) before the request was complete: stop
                # sending; the connection cannot be reused (RFC 9112 §9.5).
                self.must_close = True
                return
            if not chunk:
                continue
            sent += len(chunk)
            if length is None:
                # RFC 9112 §7.1: chunk = chunk-size CRLF chunk-data CRLF
                transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
            else:
                if sent > length:
                    raise self._abort_request("request body longer than its Content-Length")
                transport.write(chunk)
            if self.write_paused:
                await self.drain()
        if self.phase != _HEAD or self.dead:
            self.must_close = True
            return
        if length is None:
            transport.write(b"0\r\n\r\n")  # RFC 9112 §7.1: last-chunk, no trailers
        elif sent != length:
            raise self._abort_request("request body shorter than its Content-Length")

    def _abort_request(self, detail: str) -> UpstreamError:
        # RFC 9112 §6.3: a message whose length does not match its framing is unrecoverable.
        error = UpstreamError("protocol", detail)
        self._fail(error)
        return error


class UpstreamPool:
    """Keep-alive connection pool for one upstream ``http(s)://host:port[/base]``.

    https (RFC 9110 §4.3.4): every connection is TLS
    (:func:`fastgate.dataplane.tls.client_context`),
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
        #: The client TLS context (https only) and the name sent as SNI and checked against
        #: the certificate (RFC 6066 §3; an IP literal is matched against IP SANs, no SNI).
        self._ssl: ssl.SSLContext | None = None
        self._server_hostname: str | None = None
        self._tls_files = tls.upstream_files(config.tls)
        self._tls_signature = tls.file_signature(self._tls_files)
        if url.scheme == "https":
            try:
                self._ssl = tls.client_context(config.tls)
            except tls.TLSLoadError as exc:
                raise ValueError(f"tls: {exc}") from None
            self._server_hostname = (config.tls.server_name if config.tls is not None
                                     and config.tls.server_name else self._host)
            if config.tls is not None and not config.tls.verify:
                log.warning(
                    "upstream %s: TLS VERIFICATION IS OFF (tls.verify: false): any server "
                    "that answers on %s:%d is trusted and can read and alter every request "
                    "and token sent to it; use tls.ca_file for a private CA instead",
                    config.name, self._host, self._port)
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
        return tls.file_signature(self._tls_files) != self._tls_signature

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
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._ssl is None:
                    await loop.create_connection(lambda: conn, self._host, self._port)
                else:
                    await loop.create_connection(
                        lambda: conn, self._host, self._port, ssl=self._ssl,
                        server_hostname=self._server_hostname,
                        ssl_handshake_timeout=self._connect_timeout)
        except BaseException as exc:
            self._count -= 1
            self._give_slot()
            if isinstance(exc, TimeoutError):
                raise UpstreamError(
                    "timeout", f"connect to {self._host}:{self._port} took over "
                               f"{self._connect_timeout:g}s") from None
            if isinstance(exc, ssl.SSLCertVerificationError):
                # RFC 9110 §4.3.4: an https upstream whose certificate does not verify (chain,
                # name or validity period) is not the upstream.
                raise UpstreamError(
                    "tls", f"certificate of {self._host}:{self._port} (as "
                           f"{self._server_hostname}) not accepted: "
                           f"{exc.verify_message or exc.reason}") from None
            if isinstance(exc, ssl.SSLError):
                raise UpstreamError(
                    "tls", f"TLS handshake with {self._host}:{self._port} failed: "
                           f"{exc.reason or exc}") from None
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


def retire(conn: Any) -> None:
    """A connection is dead: stop its timer and free its pool slot, once (for both
    connection classes: ``_Conn`` and ``fastgate.dataplane._http.RelayConn``)."""
    if not conn.dead:
        conn.dead = True
        timer = conn._timer
        if timer is not None:
            conn._timer = None
            timer.cancel()
        conn.pool._forget(conn)


_NAMES: dict[bytes, tuple[str, str]] = {}


def _name_entry(raw: bytes) -> tuple[str, str]:
    """(name, lower-case name) for a raw header name, memoized for the common names.
    llhttp only accepts RFC 9110 §5.1 token characters, so latin-1 decoding is exact."""
    name = raw.decode("latin-1")
    entry = (name, name.lower())
    if len(_NAMES) < 4096:
        _NAMES[raw] = entry
    return entry


def _expire_waiter(waiter: asyncio.Future[_Conn | None]) -> None:
    if not waiter.done():
        waiter.set_exception(
            UpstreamError("timeout", "no upstream connection became free in time"))
