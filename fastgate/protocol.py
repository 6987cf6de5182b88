"""The client-facing HTTP/1.1 server: one protocol per connection over llhttp (httptools).

:class:`ClientProtocol` is the asyncio protocol *and* the parser's callback target (the shape
of uvicorn's ``httptools_impl.py``). A request is decided inside ``on_headers_complete``:
route, header pass, auth (a cached verify is a plain call), policy; an admitted request's head
goes to a warm pooled upstream connection (:class:`fastgate.relay.RelayConn`) in the same
call, its body is relayed from ``on_body``, and the response is relayed back from the upstream
connection's own callbacks into :class:`Exchange`, the per-request state. The common request
-- admitted or rejected, cached or not, small body or none -- creates no task, future or
coroutine; only the slow cases do (waiting for keys, opening an upstream connection).

HTTP/1.1 rules enforced here (each cited where it is applied): one response per request, in
order (pipelined requests queue behind the one in flight and reading pauses, RFC 9112 §9.3.2);
a rejected request whose body was not read closes the connection (its bytes are never parsed
as a next request); framing conflicts are llhttp's strict errors -> 400 + close (RFC 9112
§6.1, §6.3); origin-form targets only (§3.2); exactly one Host (§3.2); ``Connection: close``
and HTTP/1.0 honoured (§9.3, §9.6); the head limit is counted in bytes while they arrive; a
head must arrive within ``timeouts.header`` (408), an idle connection closes after
``timeouts.keepalive``, a client that takes none of its response for ``timeouts.send`` is cut
off (freeing the upstream connection).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
from collections.abc import Mapping
from time import perf_counter
from typing import Any, Final, cast

import httptools

from fastgate.extract import strip_query_param
from fastgate.flow import HIGH_WATER, PEER_BUSY, PENDING, QUEUED, ReadGate
from fastgate.proxy import (
    A_AUTH,
    A_AUTH_DROP,
    A_CONNECTION,
    A_EXPECT,
    A_HOST,
    A_LENGTH,
    A_TE,
    A_UPGRADE,
    A_XFF,
    A_XFH,
    A_XFP,
    DataPlane,
    RouteRuntime,
    Tables,
)
from fastgate.reasons import Reason
from fastgate.relay import RelayConn
from fastgate.responses import (
    BAD_GATEWAY,
    BAD_REQUEST,
    GATEWAY_TIMEOUT,
    HEADERS_TOO_LARGE,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    SERVICE_UNAVAILABLE,
)
from fastgate.routes import path_is_ambiguous
from fastgate.upstream import UpstreamError
from fastgate.wire import Wire, connection_line

log = logging.getLogger("fastgate.protocol")

_W_BAD_REQUEST: Final = Wire(BAD_REQUEST)
_W_NOT_FOUND: Final = Wire(NOT_FOUND)
_W_METHOD: Final = Wire(METHOD_NOT_ALLOWED)
_W_HEADERS: Final = Wire(HEADERS_TOO_LARGE)
_W_TOO_LARGE: Final = Wire(PAYLOAD_TOO_LARGE)
_W_TIMEOUT: Final = Wire(REQUEST_TIMEOUT)
_W_BAD_GATEWAY: Final = Wire(BAD_GATEWAY)
_W_GATEWAY_TIMEOUT: Final = Wire(GATEWAY_TIMEOUT)
_W_UNAVAILABLE: Final = Wire(SERVICE_UNAVAILABLE)
_WIRES: dict[int, Wire] = {}  # id(Canned) -> Wire for the few gateway errors

#: RFC 9110 §9.2.2: idempotent methods, resent once when a reused connection was stale.
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
#: RFC 9110 §8.6: methods whose request carries Content-Length even when empty.
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_CHUNK_END: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"
_SEP: Final = b": "
# RFC 9112 §3.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ] (reg-name, IPv4 or an IPv6
# literal in brackets); a list, spaces or a userinfo part are not a Host.
_HOST_RE: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]*)(?::[0-9]*)?")

# Timer states (one lazily re-armed timer per connection).
_T_NONE: Final = 0
_T_IDLE: Final = 1  # between requests (keepalive) or before the first one (header timeout)
_T_HEAD: Final = 2  # a head is arriving
_T_BODY: Final = 3  # a request body is arriving (the route's upstream read_timeout)
_T_SEND: Final = 4  # the client does not take its response
_T_TUNNEL: Final = 5  # WebSocket tunnel idle

# Exchange states.
_DECIDING: Final = 0
_SENDING: Final = 1  # head written upstream; body relayed as it arrives
_DONE: Final = 2


class _Stop(Exception):
    """Raised from a parser callback to stop parsing (the connection is closing)."""


class RequestHeaders:
    """The header fields the auth layer reads (``getall`` as the extractor expects).

    Only the names the compiled tables mark as read by auth are collected, so building this
    costs one list append per such header (usually one: ``Authorization``)."""

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: dict[bytes, list[bytes]] = {}

    def add(self, lname: bytes, value: bytes) -> None:
        values = self._map.get(lname)
        if values is None:
            self._map[lname] = [value]
        else:
            values.append(value)

    def getall(self, key: str, default: list[str]) -> list[str]:
        values = self._map.get(key.lower().encode("latin-1"))
        if values is None:
            return default
        return [v.decode("utf-8", "surrogateescape") for v in values]

    def get(self, key: str) -> str | None:
        values = self._map.get(key.lower().encode("latin-1"))
        return values[0].decode("utf-8", "surrogateescape") if values else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower().encode("latin-1") in self._map


class Exchange:
    """One request and its response: the relay's sink (:class:`fastgate.relay.Sink`)."""

    __slots__ = (
        "auth_headers", "body", "body_bytes", "buffered", "chunked_in", "chunked_out",
        "client_xff", "client_xfh", "client_xfp", "complete", "conn", "content_length",
        "expect", "head", "head_only", "host", "hosts", "http10", "keep_alive", "label",
        "method", "no_body_out", "out", "proto", "raw_headers", "retried", "route_index",
        "rt", "size", "started", "state", "status", "tables", "task", "upgrade",
        "upstream_s", "upstream_t0", "url", "websocket", "wrote_head",
    )

    def __init__(self, proto: ClientProtocol) -> None:
        self.proto = proto
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.size = 0  # bytes of the head's fields as received (RFC 9112 §5)
        self.method = ""
        self.http10 = False
        self.keep_alive = True
        self.upgrade = False
        self.websocket = False
        self.complete = False  # the request message (head and body) is fully received
        self.body: list[bytes] = []  # body bytes buffered before the upstream leg exists
        self.buffered = 0
        self.body_bytes = 0
        self.chunked_in = False
        self.content_length = -1
        self.expect = False
        self.host: bytes | None = None
        self.hosts = 0
        self.client_xff: bytes | None = None
        self.client_xfp: bytes | None = None
        self.client_xfh: bytes | None = None
        self.auth_headers: RequestHeaders | None = None
        self.state = _DECIDING
        self.tables: Tables | None = None
        self.rt: RouteRuntime | None = None
        self.route_index = 0
        self.status = 0
        self.label: str | None = None
        self.started = 0.0
        self.upstream_t0 = 0.0
        self.upstream_s: float | None = None
        self.conn: RelayConn | None = None
        self.head = b""
        self.retried = False
        self.task: asyncio.Task[None] | None = None
        self.out: list[bytes] = []
        self.wrote_head = False
        self.chunked_out = False
        self.no_body_out = False
        self.head_only = False

    # -- for the access log ------------------------------------------------------------------

    @property
    def raw_path(self) -> str:
        return self.url.decode("utf-8", "surrogateescape")

    @property
    def remote(self) -> str | None:
        return self.proto.peer

    # -- relay sink: the upstream's response ---------------------------------------------------

    def response_head(self, status: int, reason: bytes, lines: list[bytes],
                      length: int | None, chunked: bool, upgrade_lines: list[bytes]) -> None:
        proto = self.proto
        now = perf_counter()
        self.upstream_s = now - self.upstream_t0
        tables = self.tables
        assert tables is not None and self.rt is not None
        tables.hooks.upstream_observe(self.rt.upstream_index, self.upstream_s)
        self.status = status
        self.wrote_head = True
        if status == 101:
            # RFC 6455 §4.2.2: the upgrade's own fields, then the connection is a tunnel.
            self.out.append(b"".join((b"HTTP/1.1 101 ", reason, _CRLF, *lines, *upgrade_lines,
                                      _CRLF)))
            proto.start_tunnel(self)
            return
        parts = [b"HTTP/1.1 %d " % status, reason, _CRLF, *lines]
        no_body = self.head_only or status == 204 or status == 304
        self.no_body_out = no_body
        keep = self.keep_alive and self.complete and not proto.plane.draining
        if length is not None:
            # RFC 9110 §8.6: a HEAD or 304 response may carry the length of the full one.
            if status != 204:
                parts.append(b"Content-Length: %d\r\n" % length)
        elif not no_body:
            if self.http10:
                keep = False  # RFC 9112 §6.3 rule 8: the body ends when the connection does
            else:
                self.chunked_out = True  # RFC 9112 §7.1
                parts.append(b"Transfer-Encoding: chunked\r\n")
        self.keep_alive = keep
        parts.append(connection_line(not keep, self.http10))
        parts.append(_CRLF)
        self.out.append(b"".join(parts))

    def response_body(self, data: bytes) -> None:
        if self.no_body_out:
            return
        if self.chunked_out:
            self.out.extend((b"%x\r\n" % len(data), data, _CRLF))
        else:
            self.out.append(data)

    def flush(self) -> None:
        out = self.out
        if out:
            transport = self.proto.transport
            if transport is not None and not transport.is_closing():
                transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def response_end(self, keep_alive: bool) -> None:
        if self.chunked_out and not self.no_body_out:
            self.out.append(_CHUNK_END)
        self.flush()
        self.conn = None
        self.proto.exchange_done(self)

    def response_failed(self, error: UpstreamError) -> None:
        self.conn = None
        proto = self.proto
        tables = self.tables
        assert tables is not None and self.rt is not None
        if error.stale and not self.retried and self.method in _IDEMPOTENT and \
                self.body_bytes == 0 and self.complete and not self.wrote_head:
            # RFC 9112 §9.3.1: a reused connection closed before any response byte; nothing
            # reached the client, and the request is replayable: once more on a fresh one.
            self.retried = True
            proto.connect_then_send(self, fresh=True)
            return
        tables.hooks.upstream_error(self.rt.upstream_index, error.kind)
        log.info("route %s upstream %s: %s", self.rt.name, self.rt.upstream, error)
        if self.wrote_head:
            # The head is gone already: the only honest signal left is to cut the client
            # connection (an incomplete body, never a silent truncation).
            self.out.clear()
            self.status = self.status or 502
            proto.abort(self)
            return
        wire = _W_GATEWAY_TIMEOUT if error.status == 504 else _W_BAD_GATEWAY
        proto.reply(self, wire)

    def upstream_paused(self, paused: bool) -> None:
        # The upstream's write buffer crossed its high-water mark: stop reading the client.
        if paused:
            self.proto.gate.pause(PEER_BUSY)
        else:
            self.proto.gate.resume(PEER_BUSY)

    def tunnel_data(self, data: bytes) -> None:
        self.flush()
        transport = self.proto.transport
        if transport is not None:
            transport.write(data)
        self.proto.touch_tunnel()

    def tunnel_closed(self) -> None:
        self.flush()
        self.conn = None
        self.proto.exchange_done(self)


class ClientProtocol(asyncio.Protocol):
    """One client connection (see the module docstring)."""

    __slots__ = (
        "active", "cur", "deadline", "discard", "eof", "gate", "head_bytes", "in_head", "loop",
        "parser", "peer", "plane", "queue", "requests", "server", "timer", "timer_at",
        "timer_kind", "transport", "trusted", "tunnel", "write_paused",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.plane = server.plane
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.gate = ReadGate()
        self.peer: str | None = None
        self.trusted = False
        self.cur: Exchange | None = None  # the request being parsed
        self.active: Exchange | None = None  # the request being answered
        self.queue: collections.deque[Exchange] = collections.deque()  # pipelined behind it
        self.requests = 0
        self.head_bytes = 0
        self.discard = False  # no further request is read on this connection
        self.eof = False  # the client half-closed
        self.in_head = False  # a head is being parsed
        self.write_paused = False
        self.tunnel: RelayConn | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = _T_NONE
        self.timer_at = 0.0
        self.deadline = 0.0

    # -- transport ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = tr = cast(asyncio.Transport, transport)
        self.gate.transport = tr
        server = self.server
        if len(server.connections) >= server.max_connections:
            # limits.max_connections: one cheap 503 and close, before any parsing
            # (docs/operations.md); the socket is never read.
            tr.write(_W_UNAVAILABLE.bytes(close=True))
            tr.close()
            self.discard = True
            return
        server.connections.add(self)
        tr.set_write_buffer_limits(high=HIGH_WATER)
        peer = tr.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0])
            nets = server.trusted
            if nets:
                try:
                    ip = ipaddress.ip_address(self.peer)
                    self.trusted = any(ip in net for net in nets)
                except ValueError:
                    self.trusted = False
        self.arm(_T_IDLE, server.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.discard = True
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            tunnel.abort_exchange()
        ex = self.active
        if ex is not None:
            self.active = None
            task = ex.task
            if task is not None and not task.done():
                task.cancel()
            conn = ex.conn
            if conn is not None:
                # The client went away: the upstream exchange is half done, never reused.
                ex.conn = None
                conn.abort_exchange()
            if ex.state != _DONE:
                ex.status = ex.status if ex.wrote_head else 499
                self._account(ex)
        self.queue.clear()

    def pause_writing(self) -> None:
        # The client's buffer is over the high-water mark: stop reading the upstream.
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.conn is not None and ex.conn.transport is not None:
            ex.conn.transport.pause_reading()
        if self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.pause_reading()
        self.arm(_T_SEND, self.server.send_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self.active
        conn = ex.conn if ex is not None else self.tunnel
        if conn is not None and conn.transport is not None and not conn.dead:
            conn.transport.resume_reading()
        if self.timer_kind == _T_SEND:
            self.timer_kind = _T_TUNNEL if self.tunnel is not None else _T_NONE
            if self.tunnel is not None:
                self.touch_tunnel()

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.send(data)
            self.touch_tunnel()
            return
        if self.discard:
            ex = self.active
            if ex is not None and ex.websocket and ex.upgrade and ex.state != _DONE:
                ex.body.append(data)  # early WebSocket frames: sent once the 101 is in
                self.gate.pause(PENDING)
            return
        self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgraded(data[exc.args[0]:] if exc.args else b"")
        except httptools.HttpParserError as exc:
            if not self.discard:
                self._parse_error(exc)
            return
        ex = self.active
        if ex is not None and ex.conn is not None and ex.body:
            self._send_body(ex)  # what on_body relayed during this read, in one write
        if self.discard:
            return
        cur = self.cur
        if self.in_head and cur is not None and self.head_bytes > self.server.max_header_bytes:
            # The head is still arriving and is already over the limit (counted in bytes as
            # they arrive, so an unfinished head cannot hold memory).
            self._error(_W_HEADERS, cur)

    def eof_received(self) -> bool | None:
        # A half-closed client still gets its response (RFC 9112 §9.6), then the close.
        self.eof = True
        return self.active is not None

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.discard:
            raise _Stop()
        self.cur = Exchange(self)
        self.in_head = True
        if self.active is None:
            self.arm(_T_HEAD, self.server.header_timeout)

    def on_url(self, url: bytes) -> None:
        cur = self.cur
        assert cur is not None
        cur.url += url
        cur.size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        cur = self.cur
        assert cur is not None
        cur.raw_headers.append((name, value))
        cur.size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        ex = self.cur
        assert ex is not None
        parser = self.parser
        ex.method = parser.get_method().decode("ascii")
        ex.http10 = parser.get_http_version() == "1.0"
        ex.keep_alive = parser.should_keep_alive()
        ex.upgrade = parser.should_upgrade()
        self.requests += 1
        server = self.server
        if server.max_requests and self.requests >= server.max_requests:
            ex.keep_alive = False  # RFC 9112 §9.6: the last response says close
        self.in_head = False
        self.head_bytes = 0
        if ex.upgrade:
            ex.keep_alive = False  # after an upgrade no more HTTP is read here
        if self.active is None:
            self.dispatch(ex)
        else:
            # RFC 9112 §9.3.2: answered in order; read no further until it is its turn.
            self.queue.append(ex)
            self.gate.pause(QUEUED)

    def on_body(self, body: bytes) -> None:
        ex = self.cur
        if ex is None or ex.state == _DONE:
            return  # the body of a request already answered (and closing)
        ex.body_bytes += len(body)
        tables = ex.tables
        if ex.chunked_in and tables is not None and ex.body_bytes > tables.max_body_bytes:
            # A chunked body crossed max_body_bytes: the upstream never sees the end of it.
            self._too_large(ex)
            return
        if ex.state == _SENDING and ex.conn is not None:
            ex.body.append(b"%x\r\n" % len(body) + body + _CRLF if ex.chunked_in else body)
        else:
            ex.body.append(body)
            ex.buffered += len(body)
            if ex.buffered > HIGH_WATER:
                self.gate.pause(PENDING)
        if self.timer_kind == _T_BODY:
            self.deadline = self.loop.time() + (ex.rt.body_timeout if ex.rt else 30.0)

    def on_message_complete(self) -> None:
        ex = self.cur
        self.cur = None
        self.head_bytes = 0
        if ex is None or ex.state == _DONE:
            return
        ex.complete = True
        if ex.chunked_in and ex.state == _SENDING:
            ex.body.append(_CHUNK_END)  # RFC 9112 §7.1: last-chunk, no trailers
        if self.timer_kind == _T_BODY and ex is self.active:
            self.timer_kind = _T_NONE
        if not ex.keep_alive:
            self.discard = True  # RFC 9112 §9.6: nothing after a close is read

    # -- the decision --------------------------------------------------------------------------

    def dispatch(self, ex: Exchange) -> None:
        """Route, header pass, auth and policy; then forward or reject."""
        plane = self.plane
        t = plane.tables
        ex.tables = t
        ex.started = perf_counter()
        self.active = ex
        t.inflight += 1
        t.hooks.inflight_inc()
        ex.route_index = t.no_route
        if self.timer_kind == _T_HEAD or self.timer_kind == _T_IDLE:
            self.timer_kind = _T_NONE
        method = ex.method
        if method == "CONNECT":
            # CVE-2021-43824 class: the gateway is not a forward proxy.
            self.reply(ex, _W_METHOD, close=True)
            return
        url = ex.url
        if ex.size + 16 > t.max_header_bytes:
            self.reply(ex, _W_HEADERS, close=True)
            return
        if url[:1] != b"/":
            # RFC 9112 §3.2: only origin-form; absolute-form and "*" are not ours to serve.
            self.reply(ex, _W_BAD_REQUEST, close=True)
            return
        q = url.find(b"?")
        if q == -1:
            path = url.decode("utf-8", "surrogateescape")
            qs = ""
        else:
            path = url[:q].decode("utf-8", "surrogateescape")
            qs = url[q + 1:].decode("utf-8", "surrogateescape")
        if path_is_ambiguous(path):
            self.reply(ex, _W_BAD_REQUEST)
            return

        # -- one pass over the inbound headers ------------------------------------------------
        actions = t.header_actions
        fwd: list[tuple[bytes, bytes]] = []
        listed: list[bytes] | None = None
        bad_framing = False
        auth_headers = RequestHeaders()
        ex.auth_headers = auth_headers
        for name, value in ex.raw_headers:
            lname = name.lower()
            action = actions.get(lname)
            if action is None:
                if b"_" in lname and lname.replace(b"_", b"-") in actions:
                    continue  # X_User_Id: a CGI/WSGI upstream would read it as X-User-Id
                fwd.append((name, value))
            elif action == A_AUTH:
                auth_headers.add(lname, value)
                fwd.append((name, value))
            elif action == A_HOST:
                ex.hosts += 1
                ex.host = value
                fwd.append((name, value))
            elif action == A_LENGTH:
                ex.content_length = int(value)  # llhttp validated it (RFC 9112 §6.3)
            elif action == A_TE:
                # RFC 9112 §6.3 rule 4: in a request, chunked must be the final coding, else
                # the length cannot be determined: 400 and close.
                ex.chunked_in = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                if not ex.chunked_in:
                    bad_framing = True
            elif action == A_XFF:
                ex.client_xff = value if ex.client_xff is None else ex.client_xff + b", " + value
            elif action == A_XFP:
                ex.client_xfp = value
            elif action == A_XFH:
                ex.client_xfh = value
            elif action == A_CONNECTION:
                if listed is None:
                    listed = []
                listed.extend(tok.strip() for tok in value.lower().split(b","))
            elif action == A_EXPECT:
                ex.expect = value.lower() == b"100-continue"
            elif action == A_UPGRADE:
                ex.websocket = value.lower() == b"websocket"
            elif action == A_AUTH_DROP:
                auth_headers.add(lname, value)
            # A_DROP: hop-by-hop or reserved
        if not ex.chunked_in and ex.content_length <= 0:
            ex.complete = True  # no body: the message ends with its head
        if bad_framing:
            self.reply(ex, _W_BAD_REQUEST, close=True)
            return
        if (ex.hosts != 1 and not (ex.hosts == 0 and ex.http10)) or \
                (ex.host is not None and not _HOST_RE.fullmatch(ex.host)):
            # RFC 9112 §3.2: a server MUST respond 400 to an HTTP/1.1 request without Host or
            # with more than one.
            self.reply(ex, _W_BAD_REQUEST, close=True)
            return
        if listed:
            drop = frozenset(listed) - {b"host"}
            fwd = [h for h in fwd if h[0].lower() not in drop]
        host = ex.host.decode("utf-8", "surrogateescape") if ex.host is not None else None
        route = t.routes.match(method, host if t.uses_host else None, path)
        if route is None:
            self.reply(ex, _W_NOT_FOUND)
            return
        rt = t.runtimes[route.index]
        ex.rt = rt
        ex.route_index = rt.index
        if ex.upgrade and not (ex.websocket and method == "GET"):
            # Only WebSocket is relayed (RFC 6455); h2c and the rest are refused (400 + close:
            # bytes behind a refused upgrade are never parsed as requests).
            self.reply(ex, _W_BAD_REQUEST, close=True)
            return

        # -- auth -------------------------------------------------------------------------------
        claims: Mapping[str, Any] | None = None
        found: list[tuple[int, str]] | None = None
        if rt.auth and not (rt.cors_bypass and method == "OPTIONS" and "Origin" in auth_headers
                            and "Access-Control-Request-Method" in auth_headers):
            decided = plane.authenticate_now(rt, t.hooks, auth_headers, qs)
            if decided is None:
                # Slow path: an unknown kid or a cold start (SPEC §5), or mode: all.
                self._decide_later(ex, fwd, path, qs)
                return
            reason, claims, found = decided
            if reason is not Reason.OK:
                self.reject(ex, reason)
                return
        self.admit(ex, fwd, path, qs, claims, found)

    def _decide_later(self, ex: Exchange, fwd: list[tuple[bytes, bytes]], path: str,
                      qs: str) -> None:
        async def decide() -> None:
            rt = ex.rt
            t = ex.tables
            assert rt is not None and t is not None and ex.auth_headers is not None
            reason, claims, found = await self.plane.authenticate(rt, t.hooks, ex.auth_headers,
                                                                  qs)
            ex.task = None
            if self.active is not ex:
                return  # the client went away meanwhile
            if reason is not Reason.OK:
                self.reject(ex, reason)
            else:
                self.admit(ex, fwd, path, qs, claims, found)
            self.data_flush(ex)

        ex.task = self.loop.create_task(decide())

    def reject(self, ex: Exchange, reason: Reason) -> None:
        rt = ex.rt
        assert rt is not None and ex.tables is not None
        ex.tables.hooks.reject(rt.index, reason)
        self.reply(ex, rt.wires[reason])

    def admit(self, ex: Exchange, fwd: list[tuple[bytes, bytes]], path: str, qs: str,
              claims: Mapping[str, Any] | None, found: list[tuple[int, str]] | None) -> None:
        """Build the upstream request head and send it (RFC 9110 §7.6, RFC 9112 §3, §6)."""
        rt = ex.rt
        t = ex.tables
        assert rt is not None and t is not None
        if ex.content_length > t.max_body_bytes:
            self.reply(ex, _W_TOO_LARGE)
            return
        if found and not rt.forward_token:
            fwd, qs = self.plane.remove_tokens(rt, fwd, qs, found)
        if t.api_keys.query is not None and qs:
            qs = strip_query_param(qs, t.api_keys.query)  # a credential for the gateway only
        pool = rt.pool
        target = rt.route.rewrite(path) if rt.route.strip_prefix else path
        parts: list[bytes] = [ex.method.encode("ascii"), b" ", pool.base,
                              target.encode("utf-8", "surrogateescape")]
        if qs:
            parts += (b"?", qs.encode("utf-8", "surrogateescape"))
        parts.append(b" HTTP/1.1\r\n")
        for name, value in fwd:
            parts += (name, _SEP, value, _CRLF)
        if ex.host is None:
            parts.append(pool.host_line)  # RFC 9112 §3.2: Host is mandatory in HTTP/1.1
        if claims is not None and rt.policy_headers:
            assert rt.policy is not None
            for name_s, value_s in rt.policy.headers(claims):
                # encode_claim never yields CR, LF or NUL (SPEC §2): no header injection.
                parts += (name_s.encode("latin-1"), _SEP,
                          value_s.encode("utf-8", "surrogateescape"), _CRLF)
        # X-Forwarded-*: a trusted proxy's values are kept and the peer appended; anyone
        # else's are replaced (RFC 7239 §5.2 practice for the de-facto headers).
        peer = (self.peer or "").encode("ascii", "replace")
        trusted = self.trusted
        xff = ex.client_xff
        parts += (b"X-Forwarded-For: ", xff + b", " + peer if trusted and xff else peer, _CRLF)
        xfp = ex.client_xfp if trusted and ex.client_xfp else self.server.scheme
        parts += (b"X-Forwarded-Proto: ", xfp, _CRLF)
        xfh = ex.client_xfh if trusted and ex.client_xfh else ex.host
        if xfh is not None:
            parts += (b"X-Forwarded-Host: ", xfh, _CRLF)
        if ex.websocket and ex.upgrade:
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        elif ex.chunked_in:
            parts.append(b"Transfer-Encoding: chunked\r\n")  # RFC 9112 §7.1
        elif ex.content_length >= 0:
            parts.append(b"Content-Length: %d\r\n" % ex.content_length)
        elif ex.method in _BODY_METHODS:
            parts.append(b"Content-Length: 0\r\n")  # RFC 9110 §8.6
        parts.append(_CRLF)
        ex.head = b"".join(parts)
        ex.head_only = ex.method == "HEAD"
        if ex.expect and not ex.complete and not ex.http10:
            # RFC 9110 §10.1.1: 100 Continue only now that the request is admitted.
            assert self.transport is not None
            self.transport.write(_CONTINUE)
        if not ex.complete and (ex.chunked_in or ex.content_length > 0):
            self.arm(_T_BODY, rt.body_timeout)
        conn = pool.take_idle()
        if conn is None:
            self.connect_then_send(ex)
        else:
            self.send(ex, cast(RelayConn, conn))

    # -- the upstream leg ----------------------------------------------------------------------

    def send(self, ex: Exchange, conn: RelayConn) -> None:
        """Write the head and what body there is to ``conn``; the rest follows from on_body."""
        if not conn.start(ex, ex.head_only):
            self.connect_then_send(ex)
            return
        ex.conn = conn
        ex.upstream_t0 = perf_counter()
        pieces = [ex.head]
        if ex.body:
            if ex.chunked_in:
                pieces.extend(b"%x\r\n" % len(b) + b + _CRLF for b in ex.body)
                if ex.complete:
                    pieces.append(_CHUNK_END)
            else:
                pieces.extend(ex.body)
            ex.body.clear()
        elif ex.chunked_in and ex.complete:
            pieces.append(_CHUNK_END)
        ex.state = _SENDING
        ex.buffered = 0
        self.gate.resume(PENDING)
        conn.send(b"".join(pieces))

    def _send_body(self, ex: Exchange) -> None:
        conn = ex.conn
        assert conn is not None
        body = ex.body
        conn.send(body[0] if len(body) == 1 else b"".join(body))
        body.clear()

    def data_flush(self, ex: Exchange) -> None:
        if ex.conn is not None and ex.body and ex.state == _SENDING:
            self._send_body(ex)

    def connect_then_send(self, ex: Exchange, fresh: bool = False) -> None:
        """Slow path: no warm connection; open one (or wait for a slot) in a task."""
        rt = ex.rt
        assert rt is not None
        if ex.buffered > HIGH_WATER:
            self.gate.pause(PENDING)

        async def connect() -> None:
            try:
                conn = await rt.pool.acquire(fresh)
            except UpstreamError as exc:
                ex.task = None
                if self.active is ex:
                    ex.response_failed(exc)
                return
            ex.task = None
            if self.active is not ex or ex.state == _DONE:
                rt.pool.release(conn)
                return
            self.send(ex, cast(RelayConn, conn))

        ex.task = self.loop.create_task(connect())

    # -- answers the gateway writes itself -----------------------------------------------------

    def reply(self, ex: Exchange, wire: Wire, close: bool = False) -> None:
        """A prebuilt response. A request whose body was not read closes the connection: its
        bytes must never be parsed as a next request (no 100 was sent, so a client that
        waits for one sends nothing)."""
        close = close or not ex.complete or not ex.keep_alive or self.plane.draining
        ex.status = wire.status
        ex.label = wire.label
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(wire.bytes(close=close, http10=ex.http10,
                                       head_only=ex.method == "HEAD"))
        ex.keep_alive = not close
        if close:
            self.discard = True
        self.exchange_done(ex)

    def _error(self, wire: Wire, ex: Exchange | None) -> None:
        """A framing or limit error outside a dispatched request: answer, then close."""
        self.discard = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.active is None:
            if ex is not None and ex.tables is None:
                ex.tables = self.plane.tables
                ex.route_index = ex.tables.no_route
                ex.started = perf_counter()
                ex.tables.inflight += 1
                ex.tables.hooks.inflight_inc()
                ex.status = wire.status
                ex.label = wire.label
                self.active = ex
                transport.write(wire.bytes(close=True))
                ex.keep_alive = False
                self.exchange_done(ex)
                return
            transport.write(wire.bytes(close=True))
            transport.close()
        else:
            self.active.keep_alive = False  # finish the current answer, then close

    def _parse_error(self, exc: Exception) -> None:
        log.debug("request parse error from %s: %r", self.peer, exc)
        cause = exc.__context__
        if isinstance(cause, _Stop):
            return
        if self.cur is not None and self.cur.tables is None:
            self._error(_W_BAD_REQUEST, self.cur)
        else:
            self._error(_W_BAD_REQUEST, None)

    def _too_large(self, ex: Exchange) -> None:
        conn = ex.conn
        if conn is not None:
            ex.conn = None
            conn.abort_exchange()  # the upstream never sees a complete request
        if ex.task is not None:
            ex.task.cancel()
            ex.task = None
        ex.body.clear()
        if ex.wrote_head:
            self.abort(ex)
        else:
            self.reply(ex, _W_TOO_LARGE, close=True)

    def abort(self, ex: Exchange) -> None:
        """Cut the client connection (mid-response failure, send timeout)."""
        ex.keep_alive = False
        self.discard = True
        conn = ex.conn
        if conn is not None:
            ex.conn = None
            conn.abort_exchange()
        self.exchange_done(ex)
        if self.transport is not None:
            self.transport.abort()

    # -- end of an exchange ----------------------------------------------------------------------

    def _account(self, ex: Exchange) -> None:
        ex.state = _DONE
        t = ex.tables
        if t is None:
            return
        t.inflight -= 1
        hooks = t.hooks
        hooks.inflight_dec()
        duration = perf_counter() - ex.started
        hooks.request_done(ex.route_index, ex.status, duration)
        access_log = self.plane.access_log
        if access_log is not None:
            rt = ex.rt
            access_log.log(ex, route=rt.name if rt is not None else None, status=ex.status,
                           reason=ex.label, duration=duration, upstream_latency=ex.upstream_s)

    def exchange_done(self, ex: Exchange) -> None:
        if ex.state == _DONE:
            return
        self._account(ex)
        if self.active is ex:
            self.active = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not ex.keep_alive or not ex.complete or self.plane.draining or self.eof:
            self.discard = True
            transport.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self.gate.resume(QUEUED)
            self.dispatch(nxt)
            if nxt is self.active:
                self.data_flush(nxt)
            return
        if self.cur is not None and self.cur is not ex:
            self.arm(_T_HEAD, self.server.header_timeout)  # the next head is arriving
        else:
            self.arm(_T_IDLE, self.server.keepalive_timeout)

    # -- WebSocket tunnel (RFC 6455 §4) -----------------------------------------------------------

    def _upgraded(self, rest: bytes) -> None:
        """llhttp paused after an Upgrade request's head; ``rest`` is what followed it."""
        ex = self.active
        self.discard = True  # no more HTTP on this connection either way
        if ex is None or not (ex.websocket and ex.upgrade) or ex.state == _DONE:
            return
        if rest:
            ex.body.append(rest)  # sent once the upstream's 101 arrived
            self.gate.pause(PENDING)

    def start_tunnel(self, ex: Exchange) -> None:
        conn = ex.conn
        assert conn is not None
        ex.flush()
        self.tunnel = conn
        ex.complete = True
        ex.keep_alive = False
        if ex.body:
            conn.send(b"".join(ex.body))
            ex.body.clear()
        self.gate.resume(PENDING)
        self.touch_tunnel()

    def touch_tunnel(self) -> None:
        if self.timer_kind != _T_SEND:
            self.arm(_T_TUNNEL, self.server.keepalive_timeout)

    # -- the connection's one timer ---------------------------------------------------------------

    def arm(self, kind: int, seconds: float) -> None:
        """Set the one deadline; the timer is re-armed lazily, or moved when it must fire
        earlier than it is set for."""
        self.timer_kind = kind
        self.deadline = deadline = self.loop.time() + seconds
        timer = self.timer
        if timer is not None:
            if deadline >= self.timer_at:
                return
            timer.cancel()
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        kind = self.timer_kind
        if kind == _T_NONE or self.transport is None or self.transport.is_closing():
            return
        if self.loop.time() < self.deadline:
            self.timer_at = self.deadline
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        self.timer_kind = _T_NONE
        ex = self.active
        if kind in (_T_IDLE, _T_TUNNEL):
            self.transport.close()  # RFC 9112 §9.8: an idle connection may be closed
        elif kind == _T_HEAD:
            # Slowloris: the head did not arrive in time.
            if ex is None:
                self._error(_W_TIMEOUT, self.cur)
            else:
                self.transport.close()
        elif kind == _T_BODY and ex is not None:
            conn = ex.conn
            if conn is not None:
                ex.conn = None
                conn.abort_exchange()
            if ex.wrote_head:
                self.abort(ex)
            else:
                self.reply(ex, _W_TIMEOUT, close=True)
        elif kind == _T_SEND:
            log.debug("client %s took none of its response for %gs: closed", self.peer,
                      self.server.send_timeout)
            if ex is not None:
                self.abort(ex)
            else:
                self.transport.abort()


class Server:
    """The data plane's protocol factory for one worker; tracks its live connections."""

    def __init__(self, plane: DataPlane, loop: asyncio.AbstractEventLoop, *,
                 scheme: bytes = b"http") -> None:
        self.plane = plane
        self.loop = loop
        self.scheme = scheme
        self.connections: set[ClientProtocol] = set()
        self.configure()

    def configure(self) -> None:
        """Read the limits and timeouts of the current tables (again after a reload)."""
        config = self.plane.tables.config
        self.header_timeout: float = config.timeouts.header
        self.keepalive_timeout: float = config.timeouts.keepalive
        self.send_timeout: float = config.timeouts.send
        self.max_connections: int = config.limits.max_connections
        self.max_requests: int = config.limits.max_requests_per_connection
        self.max_header_bytes: int = config.limits.max_header_bytes
        self.trusted = tuple(config.trusted_proxies)

    def __call__(self) -> ClientProtocol:
        return ClientProtocol(self)

    def close_idle(self) -> None:
        """Drain: idle keep-alive connections close now; busy ones after their response."""
        for proto in list(self.connections):
            if proto.active is None and proto.tunnel is None and proto.transport is not None:
                proto.transport.close()

    async def shutdown(self, timeout: float) -> None:
        """Wait (bounded) for the requests in flight, then close what is left."""
        deadline = self.loop.time() + timeout
        while any(p.active is not None for p in self.connections) and \
                self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.abort() if proto.active is not None else \
                    proto.transport.close()


__all__ = ["ClientProtocol", "Exchange", "RequestHeaders", "Server"]
