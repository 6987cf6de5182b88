"""Upstream connections in relay mode: the response goes straight to the client, no awaits.

A :class:`RelayConn` is an :class:`fastgate.upstream.UpstreamPool` connection whose llhttp
callbacks hand the response to a *sink* (the client-side exchange in
:mod:`fastgate.protocol`) instead of buffering it in an ``UpstreamResponse`` behind a Future.
One upstream read becomes at most one client write (the sink corks writes during
``feed_data`` and flushes after it), and the whole exchange of a warm keep-alive request runs
inside two ``data_received`` calls: no task, no future, no coroutine.

Framing safety (response-queue poisoning): the connection serves one exchange at a time
(RFC 9112 §9.3.2: the gateway never pipelines upstream). Any parser activity after the
response's framing ended -- a second response in the same read, a body after 204/304 or a
HEAD response, more bytes than Content-Length, bytes while idle -- marks the connection
``must_close``: it is closed, never returned to the pool, and the bytes never reach a client.
The response head is capped (``max_header_bytes``) while it arrives -> 502.
"""

from __future__ import annotations

import asyncio
from typing import Final, Protocol

import httptools

from fastgate.httpfields import HOP_BY_HOP
from fastgate.upstream import _BODY, _DONE, _HEAD, _IDLE, UpstreamError, _Conn

# 1xx interim responses (RFC 9110 §15.2) that are swallowed: the gateway answers
# 100-continue itself and forwards no hints.
_INTERIM: Final = frozenset({100, 102, 103})
_HOP: Final = frozenset(n.encode() for n in HOP_BY_HOP)
_NOT_FIELD_NAMES: Final = _HOP | {b"close", b""}


class Sink(Protocol):
    """What a relayed response is handed to (``fastgate.protocol.Exchange``)."""

    upgrade: bool
    complete: bool  # the request has been fully received from the client

    def response_head(self, status: int, reason: bytes, lines: list[bytes],
                      length: int | None, chunked: bool, upgrade_lines: list[bytes]) -> None: ...
    def response_body(self, data: bytes) -> None: ...
    def response_end(self, keep_alive: bool) -> None: ...
    def response_failed(self, error: UpstreamError) -> None: ...
    def tunnel_data(self, data: bytes) -> None: ...
    def tunnel_closed(self) -> None: ...
    def flush(self) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...


class RelayConn(_Conn):
    """One pooled upstream connection driving a :class:`Sink` from llhttp's callbacks."""

    __slots__ = ("finished", "head_bytes", "head_limit", "sink", "status", "tunnel")

    def __init__(self, pool: object, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(pool, loop)  # type: ignore[arg-type]
        self.sink: Sink | None = None
        self.finished = False
        self.tunnel = False
        self.head_bytes = 0
        self.head_limit: int = getattr(pool, "max_head_bytes", 65536)
        self.status = 0

    # -- one exchange -------------------------------------------------------------------------

    def start(self, sink: Sink, skip_body: bool) -> bool:
        """Take ``sink``'s exchange (its bytes follow with :meth:`send`); False if the
        connection died while idle."""
        if self.dead or self.transport is None or self.transport.is_closing():
            self.close()
            return False
        self.sink = sink
        self.phase = _HEAD
        self.skip_body = skip_body
        self.got_bytes = False
        self.finished = False
        self.head_bytes = 0
        self.raw_headers = []
        self.touch()
        return True

    def send(self, data: bytes) -> None:
        """More request body bytes (already framed by the caller)."""
        if not self.dead and self.transport is not None:
            self.transport.write(data)
            self.touch()

    def touch(self) -> None:
        """Move the read deadline (RFC 9112 §9.5: the timeout is for inactivity)."""
        self.deadline = deadline = self.loop.time() + self.pool._read_timeout
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def abort_exchange(self) -> None:
        """The client side gave up (went away, body too large, send timeout): drop it."""
        self.sink = None
        self.must_close = True
        self.close()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if self.tunnel:
            if sink is not None:
                sink.tunnel_data(data)
            self.touch()
            return
        if sink is None or self.phase == _IDLE or self.phase == _DONE:
            # RFC 9112 §9.3.2: bytes outside an exchange mean the connection's framing is
            # unknown (a late 408, or an attacker's queued response): never reuse it.
            self.must_close = True
            self.close()
            return
        self.got_bytes = True
        arrived = len(data) if self.phase == _HEAD else 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            if self.tunnel and self.sink is not None:
                rest = data[exc.args[0]:] if exc.args else b""
                if rest:
                    self.sink.tunnel_data(rest)
            else:
                self._fail(UpstreamError("protocol", "unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            self._fail(cause if isinstance(cause, UpstreamError)
                       else UpstreamError("protocol", f"malformed response: {exc}"))
        if self.phase == _HEAD and not self.dead and \
                self.head_bytes + arrived > self.head_limit:
            # Still no complete head, and already over the cap: an unfinished head must not
            # hold memory either.
            self._fail(UpstreamError("protocol", "response head over the size limit"))
        sink = self.sink
        if sink is None:
            return
        if self.finished:
            # The whole response is in: release before flushing, so the client's next
            # request (maybe dispatched from the flush) finds the connection back in the pool.
            self.sink = None
            self.finished = False
            keep = self.keep_alive and not self.must_close
            if self.swap_parser:
                self.swap_parser = False
                self.parser = httptools.HttpResponseParser(self)
            self.pool._release(self)
            sink.response_end(keep)
        else:
            sink.flush()
        self.touch()

    def connection_lost(self, exc: Exception | None) -> None:
        sink = self.sink
        if self.tunnel:
            self.sink = None
            if sink is not None:
                sink.tunnel_closed()
        elif sink is not None and self.phase == _BODY and self.close_delimited and exc is None:
            # RFC 9112 §6.3 rule 8: the body of a response without framing ends at close.
            self.sink = None
            self.phase = _DONE
            self.keep_alive = False
            sink.response_end(False)
        elif sink is not None and (self.phase == _HEAD or self.phase == _BODY):
            where = "before the response head" if self.phase == _HEAD else "mid-body"
            stale = self.phase == _HEAD and not self.got_bytes and self.reused
            error = UpstreamError("reset", f"connection closed {where}"
                                  + (f" ({exc})" if exc else ""))
            error.stale = stale
            self._fail(error)
        self._mark_dead()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.sink is not None:
            self.sink.upstream_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.sink is not None:
            self.sink.upstream_paused(False)

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.phase != _HEAD:
            # A second message in this exchange: the upstream wrote past the response's
            # framing. Stop parsing; the bytes are dropped with the connection.
            self.must_close = True
            raise UpstreamError("protocol", "bytes after the end of the response")
        self.reason_buf = b""
        self.raw_headers = []
        self.head_bytes = 0

    def on_status(self, status: bytes) -> None:
        self.reason_buf += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.raw_headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        if self.phase != _HEAD:
            return
        status: int = self.parser.get_status_code()
        sink = self.sink
        assert sink is not None
        if self.head_bytes > self.head_limit:
            raise UpstreamError("protocol", "response head over the size limit")
        if status < 200:
            if status == 101 and sink.upgrade:
                self._upgrade(sink)
                return
            if status in _INTERIM:
                self.raw_headers = []
                return  # RFC 9110 §15.2: interim; the final response follows
            raise UpstreamError("protocol", f"unsupported interim status {status}")
        lines: list[bytes] = []
        conn_tokens: list[bytes] | None = None
        length: int | None = None
        chunked = False
        hop = _HOP
        for name, value in self.raw_headers:
            lname = name.lower()
            if lname in hop:
                if lname == b"connection":
                    # RFC 9110 §7.6.1: options listed in Connection are hop-by-hop too.
                    if conn_tokens is None:
                        conn_tokens = []
                    conn_tokens.extend(t.strip() for t in value.lower().split(b","))
                elif lname == b"transfer-encoding":
                    # RFC 9112 §6.3 rule 4: chunked only when it is the final coding.
                    chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                continue
            if lname == b"content-length":
                length = int(value)  # llhttp validated it (RFC 9112 §6.3 rule 5)
                continue  # the client leg writes its own framing
            lines.append(name + b": " + value + b"\r\n")
        if conn_tokens:
            drop = frozenset(conn_tokens) - _NOT_FIELD_NAMES
            if drop:
                lines = [ln for ln in lines if ln.split(b":", 1)[0].lower() not in drop]
        if chunked:
            length = None
        self.status = status
        self.phase = _BODY
        if self.skip_body or status == 204 or status == 304:
            # RFC 9110 §9.3.2 / RFC 9112 §6.3 rule 1: HEAD, 204 and 304 end at the head.
            sink.response_head(status, self.reason_buf, lines, length, False, [])
            if self.skip_body:
                self.swap_parser = True  # llhttp cannot be told the request was HEAD
                self.keep_alive = self._head_keep_alive(
                    [t.decode("latin-1") for t in conn_tokens] if conn_tokens else None)
                self.phase = _DONE
                self.finished = True
            return
        self.close_delimited = not chunked and length is None
        sink.response_head(status, self.reason_buf, lines, length, chunked, [])

    def _upgrade(self, sink: Sink) -> None:
        """RFC 9110 §15.2.2 / RFC 6455 §4.2.2: 101 -> relay bytes both ways until close."""
        lines = [n + b": " + v + b"\r\n" for n, v in self.raw_headers
                 if n.lower() not in (b"connection", b"keep-alive", b"transfer-encoding",
                                      b"content-length")]
        self.tunnel = True
        self.must_close = True  # a tunnelled connection never returns to the pool
        self.phase = _BODY
        sink.response_head(101, self.reason_buf, lines, None, False,
                           [b"Connection: Upgrade\r\n"])

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if self.phase != _BODY or sink is None:
            self.must_close = True  # body bytes after a HEAD response's head
            return
        sink.response_body(body)

    def on_message_complete(self) -> None:
        if self.phase == _BODY and not self.tunnel:
            self.phase = _DONE
            self.keep_alive = self.parser.should_keep_alive()
            self.finished = True

    # -- failure and timers -------------------------------------------------------------------

    def _fail(self, error: UpstreamError | Exception) -> None:
        self.must_close = True
        if self.finished:
            return  # the response is whole; data_received releases (and so closes) it
        sink = self.sink
        self.sink = None
        if not isinstance(error, UpstreamError):
            error = UpstreamError("protocol", str(error))
        if sink is not None and self.phase != _DONE:
            if self.tunnel:
                sink.tunnel_closed()
            else:
                sink.response_failed(error)
        self.close()

    def _on_timer(self) -> None:
        self._timer = None
        if self.sink is None or self.dead:
            return
        deadline = self.deadline
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            return
        if self.tunnel:
            self._fail(UpstreamError("timeout", "tunnel idle"))
            return
        if self.phase == _HEAD and not self.sink.complete:
            # The client is still sending the body: its own body timer (408) governs; the
            # upstream's read timeout starts with the request's last byte.
            self.touch()
            return
        what = "response head" if self.phase == _HEAD else "response body"
        self._fail(UpstreamError("timeout", f"no {what} within {self.pool._read_timeout:g}s"))


__all__ = ["RelayConn", "Sink"]
