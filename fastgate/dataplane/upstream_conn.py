"""One upstream connection: an ``asyncio.Protocol`` that writes a request and parses the
response with llhttp (``httptools.HttpResponseParser``), never by hand.

The connection feeds the current :class:`~fastgate.dataplane.upstream_response.UpstreamResponse`
(head, body chunks, end, failure) and applies back-pressure both ways: reading pauses above
:data:`READ_HIGH_WATER` buffered bytes, a streamed request body waits while the transport's
buffer is above :data:`WRITE_HIGH_WATER`. Timeouts use one lazily re-armed timer per
connection instead of a timer per request. :func:`retire` frees a dead connection's pool slot
(for this class and for ``fastgate.dataplane._http.RelayConn``).

Text codec: header names/values and the reason phrase are decoded with UTF-8 +
``surrogateescape`` (names with latin-1: llhttp only accepts token characters), as aiohttp's
server decodes them, so bytes round-trip unchanged through aiohttp -> pool -> upstream.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from fastgate.dataplane.upstream_errors import ErrorKind, UpstreamError, _StaleConnection
from fastgate.httpfields import HOP_BY_HOP

if TYPE_CHECKING:
    from fastgate.dataplane.upstream_pool import UpstreamPool
    from fastgate.dataplane.upstream_response import UpstreamResponse

__all__ = ["READ_HIGH_WATER", "WRITE_HIGH_WATER", "retire"]

#: Per-response receive buffer bound: above it the transport stops reading (back-pressure
#: towards the upstream through TCP flow control); reading resumes once ``read()`` has taken
#: the buffer (it hands out everything buffered at once).
READ_HIGH_WATER: Final = 256 * 1024
#: Transport write buffer bound while streaming a request body (pause_writing above it).
WRITE_HIGH_WATER: Final = 256 * 1024

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

