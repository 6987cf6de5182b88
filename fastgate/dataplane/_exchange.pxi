# Included by _http.pyx (one extension module: see its docstring). One request and its
# response: the header fields auth reads (RequestHeaders) and the Exchange, the relay's sink.

cdef class RequestHeaders:
    """The header fields the auth layer reads (``getall`` as the extractor expects).

    Only the names the compiled tables mark as read by auth are collected, so building this
    costs one list append per such header (usually one: ``Authorization``)."""

    cdef dict _map

    def __cinit__(self):
        self._map = {}

    cdef void add(self, bytes lname, bytes value):
        cdef object values = self._map.get(lname)
        if values is None:
            self._map[lname] = [value]
        else:
            (<list>values).append(value)

    def getall(self, str key, default):
        values = self._map.get(key.lower().encode("latin-1"))
        if values is None:
            return default
        return [v.decode("utf-8", "surrogateescape") for v in values]

    def __contains__(self, key):
        return isinstance(key, str) and key.lower().encode("latin-1") in self._map


# ---------------------------------------------------------------------------------------------
# Exchange: one request and its response
# ---------------------------------------------------------------------------------------------


cdef class Exchange:
    """One request and its response; the relay's sink."""

    cdef ClientProtocol proto
    cdef public bytes url
    cdef list raw_headers
    cdef Py_ssize_t size
    cdef public str method
    cdef bint http10, keep_alive, upgrade, websocket, chunked_in, expect, retried
    cdef public bint complete  # the request (head and body) has been fully received
    cdef list body  # body bytes not yet written upstream
    cdef Py_ssize_t buffered, body_bytes, content_length
    cdef object host, client_xff, client_xfp, client_xfh
    cdef int hosts, state
    cdef RequestHeaders auth_headers
    cdef object tables, rt, task, claims, token
    cdef public object request_id  # bytes: X-Request-Id as forwarded
    cdef public object traceparent  # bytes: the traceparent forwarded (valid or created)
    cdef object tracestate
    cdef public int route_index, status
    cdef public object label, upstream_s
    cdef public int upstream_status  # the upstream's status (0: the gateway answered itself)
    cdef public Py_ssize_t bytes_out
    cdef double started, upstream_t0
    cdef RelayConn conn
    cdef bytes head
    cdef list out
    cdef bint wrote_head, chunked_out, no_body_out, head_only
    cdef bint via_dpop  # the token came as Authorization: DPoP (RFC 9449 §7.1)
    cdef bint possessed  # possession and replay checks passed (admit resumes after a wait)

    def __cinit__(self, ClientProtocol proto):
        self.proto = proto
        self.method = ""  # until the head is complete (a parse error may come first)
        self.url = b""
        self.raw_headers = []
        self.keep_alive = True
        self.body = []
        self.content_length = -1
        self.out = []
        self.status = 0

    # -- for the access log ------------------------------------------------------------------

    @property
    def raw_path(self):
        return self.url.decode("utf-8", "surrogateescape")

    @property
    def client(self):
        """The peer, or from a trusted proxy the address it appended to X-Forwarded-For."""
        if self.proto.trusted and self.client_xff:
            last = self.client_xff.rsplit(b",", 1)[-1].strip()
            if last:
                return last.decode("latin-1")
        return self.proto.peer

    @property
    def trace_id(self):
        return self.traceparent[3:35].decode("ascii") if self.traceparent else None

    @property
    def bytes_in(self):
        return self.size + self.body_bytes

    @property
    def user_agent(self):
        for name, value in self.raw_headers:
            if name.lower() == b"user-agent":
                return value.decode("utf-8", "surrogateescape")
        return None

    # -- the upstream's response (called by RelayConn) ---------------------------------------

    cdef void response_head(self, int status, bytes reason, list lines, Py_ssize_t length,
                            bint chunked, bytes upgrade_line):
        cdef ClientProtocol proto = self.proto
        cdef list parts
        cdef bint keep, no_body
        self.upstream_s = monotonic() - self.upstream_t0
        self.tables.hooks.upstream_observe(self.rt.upstream_index, self.upstream_s)
        self.status = status
        self.upstream_status = status
        self.wrote_head = True
        if status == 101:
            # RFC 6455 §4.2.2: the upgrade's own fields, then the connection is a tunnel.
            self.out.append(b"HTTP/1.1 101 " + reason + CRLF + b"".join(lines)
                            + upgrade_line + CRLF)
            proto.start_tunnel(self)
            return
        parts = [b"HTTP/1.1 %d " % status, reason, CRLF]
        parts.extend(lines)
        no_body = self.head_only or status == 204 or status == 304
        self.no_body_out = no_body
        keep = self.keep_alive and self.complete and not proto.plane.draining
        if length >= 0:
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
        parts.append(CONNECTION_LINES[not keep][self.http10])  # RFC 9112 §9.6, §C.2.2
        parts.append(CRLF)
        self.out.append(b"".join(parts))

    cdef void response_body(self, bytes data):
        if self.no_body_out:
            return
        if self.chunked_out:
            self.out.append(b"%x\r\n" % len(data) + data + CRLF)
        else:
            self.out.append(data)

    cdef void flush(self):
        cdef list out = self.out
        if out:
            transport = self.proto.transport
            data = out[0] if len(out) == 1 else b"".join(out)
            self.bytes_out += len(data)
            if transport is not None and not transport.is_closing():
                transport.write(data)
            out.clear()

    cdef void response_end(self):
        if self.chunked_out and not self.no_body_out:
            self.out.append(CHUNK_END)
        self.flush()
        self.conn = None
        self.proto.exchange_done(self)

    cdef void response_failed(self, error):
        cdef ClientProtocol proto = self.proto
        self.conn = None
        if error.stale and not self.retried and self.method in IDEMPOTENT and \
                self.body_bytes == 0 and self.complete and not self.wrote_head:
            # RFC 9112 §9.3.1: a reused connection closed before any response byte; nothing
            # reached the client, and the request is replayable: once more on a fresh one.
            self.retried = True
            proto.connect_then_send(self, True)
            return
        self.tables.hooks.upstream_error(self.rt.upstream_index, error.kind)
        log.info("route %s upstream %s: %s", self.rt.name, self.rt.upstream, error)
        if self.wrote_head:
            # The head is gone already: the only honest signal left is to cut the client
            # connection (an incomplete body, never a silent truncation).
            self.out.clear()
            proto.abort(self)
            return
        proto.reply(self, W_GATEWAY_TIMEOUT if error.status == 504 else W_BAD_GATEWAY, False)

    cdef void upstream_paused(self, bint paused):
        # The upstream's write buffer crossed its high-water mark: stop reading the client.
        if paused:
            self.proto.gate.pause(PEER_BUSY)
        else:
            self.proto.gate.resume(PEER_BUSY)

    cdef void tunnel_data(self, bytes data):
        self.flush()
        transport = self.proto.transport
        self.bytes_out += len(data)
        if transport is not None:
            transport.write(data)
        self.proto.touch_tunnel()

    cdef void tunnel_closed(self):
        self.flush()
        self.conn = None
        self.proto.exchange_done(self)

