# Included by _http.pyx (one extension module: see its docstring). The upstream leg: RelayConn,
# a pooled upstream connection in relay mode, whole.

# ---------------------------------------------------------------------------------------------
# The upstream leg: a pooled connection in relay mode
# ---------------------------------------------------------------------------------------------


cdef class RelayConn:
    """One pooled upstream connection driving an :class:`Exchange` from llhttp's callbacks.

    It implements what :class:`fastgate.dataplane.upstream.UpstreamPool` reads and calls on its
    connections (``phase``, ``dead``, ``must_close``, ``keep_alive``, ``reused``,
    ``close()``, ...), so the pool's slot accounting, FIFO waiters and idle sweeping are
    shared with the awaitable client."""

    cdef public object pool, loop, transport, parser, resp, error
    cdef public int phase
    cdef public bint dead, reused, got_bytes, skip_body, swap_parser, keep_alive, must_close
    cdef public bint close_delimited, reading_paused, write_paused
    cdef public double idle_since, deadline
    cdef public object _timer
    cdef Exchange sink
    cdef bint finished, tunnel
    cdef Py_ssize_t head_bytes, head_limit
    cdef list raw_headers
    cdef bytes reason_buf
    cdef double read_timeout

    def __init__(self, pool, loop):
        self.pool = pool
        self.loop = loop
        self.parser = HttpResponseParser(self)
        self.phase = P_IDLE
        self.head_limit = getattr(pool, "max_head_bytes", 65536)
        self.read_timeout = pool._read_timeout
        self.raw_headers = []
        self.reason_buf = b""

    # -- one exchange -------------------------------------------------------------------------

    cdef bint start(self, Exchange sink, bint skip_body):
        """Take ``sink``'s exchange (its bytes follow with :meth:`send`); False if the
        connection died while idle."""
        if self.dead or self.transport is None or self.transport.is_closing():
            self.close()
            return False
        self.sink = sink
        self.phase = P_HEAD
        self.skip_body = skip_body
        self.got_bytes = False
        self.finished = False
        self.head_bytes = 0
        self.raw_headers = []
        self.touch()
        return True

    cdef void send(self, bytes data):
        """Request bytes (already framed by the caller)."""
        if not self.dead and self.transport is not None:
            self.transport.write(data)
            self.touch()

    cdef void touch(self):
        """Move the read deadline (RFC 9112 §9.5: the timeout is for inactivity)."""
        self.deadline = self.loop.time() + self.read_timeout
        if self._timer is None:
            self._timer = self.loop.call_at(self.deadline, self.on_timer)

    cdef void abort_exchange(self):
        """The client side gave up (went away, body too large, send timeout): drop it."""
        self.sink = None
        self.must_close = True
        self.close()

    # -- what the pool calls ------------------------------------------------------------------

    def close(self):
        """Close now (abort: nothing we would still send is useful) and free the pool slot."""
        if self.transport is not None:
            self.transport.abort()
        self.mark_dead()

    def resume_reading(self):
        self.reading_paused = False
        if self.transport is not None and not self.dead:
            self.transport.resume_reading()

    def _fail(self, error):
        self.fail(error)

    cdef void mark_dead(self):
        retire(self)

    # -- asyncio protocol ---------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, bytes data):
        cdef Exchange sink = self.sink
        try:
            self.relay(data)
        except Exception:
            self.broken(sink)

    cdef void broken(self, Exchange sink):
        """A failure in the relay itself (not the upstream's): drop the connection and
        answer the client (internal_error), never leave it hanging."""
        self.must_close = True
        self.sink = None
        self.close()
        if sink is not None and sink.proto.active is sink:
            sink.proto.internal_error(sink)

    cdef void relay(self, bytes data):
        cdef Exchange sink = self.sink
        cdef Py_ssize_t arrived
        if self.tunnel:
            if sink is not None:
                sink.tunnel_data(data)
            self.touch()
            return
        if sink is None or self.phase == P_IDLE or self.phase == P_DONE:
            # RFC 9112 §9.3.2: bytes outside an exchange mean the connection's framing is
            # unknown (a late 408, or an attacker's queued response): never reuse it.
            self.must_close = True
            self.close()
            return
        self.got_bytes = True
        arrived = len(data) if self.phase == P_HEAD else 0
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.tunnel and self.sink is not None:
                rest = data[exc.args[0]:] if exc.args else b""
                if rest:
                    self.sink.tunnel_data(rest)
            else:
                self.fail(UpstreamError("protocol", "unexpected protocol upgrade"))
        except HttpParserError as exc:
            cause = exc.__context__
            if cause is not None and not isinstance(cause, (UpstreamError, HttpParserError)):
                raise cause  # our own failure inside a callback: data_received answers it
            self.fail(cause if isinstance(cause, UpstreamError)
                      else UpstreamError("protocol", f"malformed response: {exc}"))
        if self.phase == P_HEAD and not self.dead and \
                self.head_bytes + arrived > self.head_limit:
            # Still no complete head, and already over the cap: an unfinished head must not
            # hold memory either.
            self.fail(UpstreamError("protocol", "response head over the size limit"))
        sink = self.sink
        if sink is None:
            return
        if self.finished:
            # The whole response is in: release before flushing, so the client's next
            # request (maybe dispatched from the flush) finds the connection back in the pool.
            self.sink = None
            self.finished = False
            if self.swap_parser:
                self.swap_parser = False
                self.parser = HttpResponseParser(self)
            self.pool._release(self)
            sink.response_end()
        else:
            sink.flush()
            self.touch()

    def eof_received(self):
        return False  # let the transport close; connection_lost decides what EOF meant

    def connection_lost(self, exc):
        cdef Exchange sink = self.sink
        if self.tunnel:
            self.sink = None
            if sink is not None:
                sink.tunnel_closed()
        elif sink is not None and self.phase == P_BODY and self.close_delimited and exc is None:
            # RFC 9112 §6.3 rule 8: the body of a response without framing ends at close.
            self.sink = None
            self.phase = P_DONE
            self.keep_alive = False
            sink.response_end()
        elif sink is not None and (self.phase == P_HEAD or self.phase == P_BODY):
            where = "before the response head" if self.phase == P_HEAD else "mid-body"
            # A TLS alert after the handshake (TLS 1.3 reports a refused client certificate
            # only then, RFC 8446 §4.4.2.4) is a TLS failure, not a reset.
            error = UpstreamError("tls" if isinstance(exc, SSLError) else "reset",
                                  f"connection closed {where}" + (f" ({exc})" if exc else ""))
            error.stale = self.phase == P_HEAD and not self.got_bytes and self.reused
            self.fail(error)
        self.mark_dead()

    def pause_writing(self):
        self.write_paused = True
        if self.sink is not None:
            self.sink.upstream_paused(True)

    def resume_writing(self):
        self.write_paused = False
        if self.sink is not None:
            self.sink.upstream_paused(False)

    # -- llhttp callbacks ---------------------------------------------------------------------

    def on_message_begin(self):
        if self.phase != P_HEAD:
            # A second message in this exchange: the upstream wrote past the response's
            # framing. Stop parsing; the bytes are dropped with the connection.
            self.must_close = True
            raise UpstreamError("protocol", "bytes after the end of the response")
        self.reason_buf = b""
        self.raw_headers = []
        self.head_bytes = 0

    def on_status(self, bytes status):
        self.reason_buf += status

    def on_header(self, bytes name, bytes value):
        self.raw_headers.append((name, value))
        self.head_bytes += len(name) + len(value) + 4

    def on_headers_complete(self):
        cdef int status
        cdef Exchange sink = self.sink
        cdef list lines, conn_tokens = None
        cdef Py_ssize_t length = -1
        cdef bint chunked = False
        cdef bytes name, value, lname
        if self.phase != P_HEAD or sink is None:
            return
        if self.head_bytes > self.head_limit:
            raise UpstreamError("protocol", "response head over the size limit")
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101 and sink.upgrade:
                self.upgrade_to_tunnel(sink)
                return
            if status in INTERIM:
                self.raw_headers = []
                return  # RFC 9110 §15.2: interim; the final response follows
            raise UpstreamError("protocol", f"unsupported interim status {status}")
        lines = []
        for name, value in self.raw_headers:
            lname = name.lower()
            if lname in HOP:
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
            lines.append(name + SEP + value + CRLF)
        if conn_tokens:
            drop = frozenset(conn_tokens) - NOT_FIELD_NAMES
            if drop:
                lines = [ln for ln in lines if ln.split(b":", 1)[0].lower() not in drop]
        if chunked:
            length = -1
        self.phase = P_BODY
        if self.skip_body or status == 204 or status == 304:
            # RFC 9110 §9.3.2 / RFC 9112 §6.3 rule 1: HEAD, 204 and 304 end at the head.
            sink.response_head(status, self.reason_buf, lines, length, False, b"")
            if self.skip_body:
                self.swap_parser = True  # llhttp cannot be told the request was HEAD
                self.keep_alive = self.head_keep_alive(conn_tokens)
                self.phase = P_DONE
                self.finished = True
            return
        self.close_delimited = not chunked and length < 0
        sink.response_head(status, self.reason_buf, lines, length, chunked, b"")

    cdef bint head_keep_alive(self, list conn_tokens):
        # RFC 9112 §9.3: HTTP/1.1 persists unless "close"; HTTP/1.0 only with "keep-alive"
        # (RFC 9112 Appendix C.2.2). Computed here because llhttp assumes a HEAD response
        # without Content-Length is close-delimited.
        if conn_tokens and b"close" in conn_tokens:
            return False
        if self.parser.get_http_version() == "1.1":
            return True
        return conn_tokens is not None and b"keep-alive" in conn_tokens

    cdef void upgrade_to_tunnel(self, Exchange sink):
        """RFC 9110 §15.2.2 / RFC 6455 §4.2.2: 101 -> relay bytes both ways until close."""
        cdef list lines = [n + SEP + v + CRLF for n, v in self.raw_headers
                           if n.lower() not in UPGRADE_DROP]
        self.tunnel = True
        self.must_close = True  # a tunnelled connection never returns to the pool
        self.phase = P_BODY
        sink.response_head(101, self.reason_buf, lines, -1, False, b"Connection: Upgrade\r\n")

    def on_body(self, bytes body):
        if self.phase != P_BODY or self.sink is None:
            self.must_close = True  # body bytes after a HEAD response's head
            return
        self.sink.response_body(body)

    def on_message_complete(self):
        if self.phase == P_BODY and not self.tunnel:
            self.phase = P_DONE
            self.keep_alive = self.parser.should_keep_alive()
            self.finished = True

    # -- failure and timers -------------------------------------------------------------------

    cdef void fail(self, error):
        cdef Exchange sink
        self.must_close = True
        if self.finished:
            return  # the response is whole; data_received releases (and so closes) it
        sink = self.sink
        self.sink = None
        if sink is not None and self.phase != P_DONE:
            if self.tunnel:
                sink.tunnel_closed()
            else:
                sink.response_failed(error)
        self.close()

    def on_timer(self):
        cdef Exchange sink = self.sink
        try:
            self.timer_fired()
        except Exception:
            self.broken(sink)

    cdef void timer_fired(self):
        self._timer = None
        if self.sink is None or self.dead:
            return
        if self.loop.time() < self.deadline:
            self._timer = self.loop.call_at(self.deadline, self.on_timer)
            return
        if self.tunnel:
            self.fail(UpstreamError("timeout", "tunnel idle"))
            return
        if self.phase == P_HEAD and not self.sink.complete:
            # The client is still sending the body: its own body timer (408) governs; the
            # upstream's read timeout starts with the request's last byte.
            self.touch()
            return
        what = "response head" if self.phase == P_HEAD else "response body"
        self.fail(UpstreamError("timeout", f"no {what} within {self.read_timeout:g}s"))
