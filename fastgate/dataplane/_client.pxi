# Included by _http.pyx (one extension module: see its docstring). The client connection:
# ClientProtocol, whole (Cython allows no include inside a class body; see the docstring).

# ---------------------------------------------------------------------------------------------
# The client connection
# ---------------------------------------------------------------------------------------------


cdef class ClientProtocol:
    """One client connection (see the module docstring)."""

    cdef object server, plane, loop, parser, timer
    cdef public object transport
    cdef public ReadGate gate
    cdef public object peer
    cdef public bint trusted
    cdef bint discard, eof, in_head, write_paused
    cdef Exchange cur  # the request being parsed
    cdef public Exchange active  # the request being answered
    cdef object queue  # deque of Exchanges pipelined behind it
    cdef Py_ssize_t requests, head_bytes
    cdef public RelayConn tunnel
    cdef object cert_thumbprint  # None: not computed yet; b"": no client certificate
    cdef int timer_kind
    cdef double timer_at, deadline

    def __init__(self, server):
        self.server = server
        self.plane = server.plane
        self.loop = server.loop
        self.transport = None
        self.parser = HttpRequestParser(self)
        self.gate = ReadGate()
        self.queue = collections.deque()

    # -- transport ---------------------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        self.gate.transport = transport
        server = self.server
        if len(server.connections) >= server.max_connections:
            # limits.max_connections: one cheap 503 and close, before any parsing
            # (docs/operations.md); the socket is never read.
            transport.write(W_UNAVAILABLE.bytes(close=True))
            transport.close()
            self.discard = True
            return
        server.connections.add(self)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = str(peer[0])
            nets = server.trusted
            if nets:
                try:
                    ip = ipaddress.ip_address(self.peer)
                    self.trusted = any(ip in net for net in nets)
                except ValueError:
                    self.trusted = False
        self.arm(T_IDLE, server.header_timeout)

    def connection_lost(self, exc):
        cdef Exchange ex
        cdef RelayConn conn
        self.server.connections.discard(self)
        self.discard = True
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()
        if self.tunnel is not None:
            conn = self.tunnel
            self.tunnel = None
            conn.abort_exchange()
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
            if ex.state != X_DONE:
                if not ex.wrote_head:
                    ex.status = 499
                self.account(ex)
        self.queue.clear()

    def pause_writing(self):
        # The client's buffer is over the high-water mark: stop reading the upstream.
        self.write_paused = True
        ex = self.active
        if ex is not None and ex.conn is not None and ex.conn.transport is not None:
            ex.conn.transport.pause_reading()
        if self.tunnel is not None and self.tunnel.transport is not None:
            self.tunnel.transport.pause_reading()
        self.arm(T_SEND, self.server.send_timeout)

    def resume_writing(self):
        cdef RelayConn conn = None
        self.write_paused = False
        if self.active is not None:
            conn = self.active.conn
        if conn is None:
            conn = self.tunnel
        if conn is not None and conn.transport is not None and not conn.dead:
            conn.transport.resume_reading()
        if self.timer_kind == T_SEND:
            self.timer_kind = T_NONE
            if self.tunnel is not None:
                self.touch_tunnel()

    def data_received(self, bytes data):
        cdef Exchange ex
        if self.tunnel is not None:
            self.tunnel.send(data)
            self.touch_tunnel()
            return
        if self.discard:
            ex = self.active
            if ex is not None and ex.websocket and ex.upgrade and ex.state != X_DONE:
                ex.body.append(data)  # early WebSocket frames: sent once the 101 is in
                self.gate.pause(PENDING)
            return
        self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self.upgraded(data[exc.args[0]:] if exc.args else b"")
        except HttpParserError as exc:
            if not self.discard:
                self.parse_error(exc)
            return
        ex = self.active
        if ex is not None and ex.conn is not None and ex.body:
            self.send_body(ex)  # what on_body relayed during this read, in one write
        if self.discard:
            return
        if self.in_head and self.cur is not None and \
                self.head_bytes > self.server.max_header_bytes:
            # The head is still arriving and is already over the limit (counted in bytes as
            # they arrive, so an unfinished head cannot hold memory).
            self.error(W_HEADERS, self.cur)

    def eof_received(self):
        # A half-closed client still gets its response (RFC 9112 §9.6), then the close.
        self.eof = True
        return self.active is not None

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self):
        if self.discard:
            raise _Stop()
        self.cur = Exchange(self)
        self.in_head = True
        if self.active is None:
            self.arm(T_HEAD, self.server.header_timeout)

    def on_url(self, bytes url):
        cdef Exchange cur = self.cur
        cur.url += url
        cur.size += len(url)

    def on_header(self, bytes name, bytes value):
        cdef Exchange cur = self.cur
        cur.raw_headers.append((name, value))
        cur.size += len(name) + len(value) + 4

    def on_headers_complete(self):
        cdef Exchange ex = self.cur
        parser = self.parser
        ex.method = parser.get_method().decode("ascii")
        ex.http10 = parser.get_http_version() == "1.0"
        ex.keep_alive = parser.should_keep_alive()
        ex.upgrade = parser.should_upgrade()
        self.requests += 1
        server = self.server
        max_requests = server.max_requests
        if max_requests and self.requests >= max_requests:
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

    def on_body(self, bytes body):
        cdef Exchange ex = self.cur
        if ex is None or ex.state == X_DONE:
            return  # the body of a request already answered (and closing)
        ex.body_bytes += len(body)
        if ex.chunked_in and ex.tables is not None and \
                ex.body_bytes > ex.tables.max_body_bytes:
            # A chunked body crossed max_body_bytes: the upstream never sees the end of it.
            self.too_large(ex)
            return
        if ex.state == X_SENDING and ex.conn is not None:
            ex.body.append(b"%x\r\n" % len(body) + body + CRLF if ex.chunked_in else body)
        else:
            ex.body.append(body)
            ex.buffered += len(body)
            if ex.buffered > HIGH_WATER:
                self.gate.pause(PENDING)
        if self.timer_kind == T_BODY:
            self.deadline = self.loop.time() + (ex.rt.body_timeout if ex.rt is not None
                                                else 30.0)

    def on_message_complete(self):
        cdef Exchange ex = self.cur
        self.cur = None
        self.head_bytes = 0
        if ex is None or ex.state == X_DONE:
            return
        ex.complete = True
        if ex.chunked_in and ex.state == X_SENDING:
            ex.body.append(CHUNK_END)  # RFC 9112 §7.1: last-chunk, no trailers
        if self.timer_kind == T_BODY and ex is self.active:
            self.timer_kind = T_NONE
        if not ex.keep_alive:
            self.discard = True  # RFC 9112 §9.6: nothing after a close is read

    # -- the decision --------------------------------------------------------------------------

    cdef void dispatch(self, Exchange ex):
        """Decide ``ex``; whatever fails inside becomes a 502 for it, never a hang."""
        try:
            self.decide(ex)
        except Exception:
            self.internal_error(ex)

    cdef void internal_error(self, Exchange ex):
        """SPEC §3.5: the client never sees a traceback -- and never waits for an answer
        that will not come. Before the response head: 502 JSON and close; after it: cut."""
        log.exception("internal error handling %s %r", ex.method, ex.url[:200])
        try:
            if ex.conn is not None:
                conn = ex.conn
                ex.conn = None
                conn.abort_exchange()
            if ex.state == X_DONE:
                if self.transport is not None:
                    self.transport.close()
            elif ex.wrote_head:
                self.abort(ex)
            else:
                ex.complete = False  # close after the answer: the state is unknown
                self.reply(ex, W_BAD_GATEWAY, True)
        except Exception:
            log.exception("internal error while answering it")
            if self.transport is not None:
                self.transport.abort()

    cdef void decide(self, Exchange ex):
        """Route, header pass, auth and policy; then forward or reject."""
        cdef list fwd
        cdef list listed = None
        cdef bint bad_framing = False
        cdef bytes name, value, lname, url
        cdef dict actions
        cdef object action
        cdef RequestHeaders auth_headers
        cdef Py_ssize_t q
        cdef Route route
        plane = self.plane
        t = plane.tables
        ex.tables = t
        ex.started = monotonic()
        self.active = ex
        t.inflight += 1
        hooks = t.hooks
        hooks.inflight_inc()
        ex.route_index = t.no_route
        if self.timer_kind == T_HEAD or self.timer_kind == T_IDLE:
            self.timer_kind = T_NONE
        method = ex.method
        if method == "CONNECT":
            # CVE-2021-43824 class: the gateway is not a forward proxy.
            self.reply(ex, W_METHOD, True)
            return
        url = ex.url
        if ex.size + 16 > t.max_header_bytes:
            self.reply(ex, W_HEADERS, True)
            return
        if url[:1] != b"/":
            # RFC 9112 §3.2: only origin-form; absolute-form and "*" are not ours to serve.
            self.reply(ex, W_BAD_REQUEST, True)
            return
        q = url.find(b"?")
        if q == -1:
            path = url.decode("utf-8", "surrogateescape")
            qs = ""
        else:
            path = url[:q].decode("utf-8", "surrogateescape")
            qs = url[q + 1:].decode("utf-8", "surrogateescape")
        if path_is_ambiguous(path):
            self.reply(ex, W_BAD_REQUEST, False)
            return

        # -- one pass over the inbound headers ------------------------------------------------
        actions = t.header_actions
        fwd = []
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
            elif action == A_REQUEST_ID:
                ex.request_id = value
            elif action == A_TRACEPARENT:
                # Two traceparent fields: invalid (W3C Trace Context §3.2.1).
                ex.traceparent = value if ex.traceparent is None else b""
            elif action == A_TRACESTATE:
                ex.tracestate = value if ex.tracestate is None else ex.tracestate + b"," + value
            # A_DROP: hop-by-hop or reserved
        if not ex.chunked_in and ex.content_length <= 0:
            ex.complete = True  # no body: the message ends with its head
        self.trace(ex)
        if bad_framing:
            self.reply(ex, W_BAD_REQUEST, True)
            return
        if (ex.hosts != 1 and not (ex.hosts == 0 and ex.http10)) or \
                (ex.host is not None and HOST_RE.fullmatch(ex.host) is None):
            # RFC 9112 §3.2: a server MUST respond 400 to an HTTP/1.1 request without Host or
            # with more than one (or an invalid one).
            self.reply(ex, W_BAD_REQUEST, True)
            return
        if listed:
            drop = frozenset(listed) - {b"host"}
            fwd = [h for h in fwd if h[0].lower() not in drop]
        host = ex.host.decode("utf-8", "surrogateescape") if ex.host is not None else None
        route = (<RouteTable>t.routes).match(method, host if t.uses_host else None, path)
        if route is None:
            self.reply(ex, W_NOT_FOUND, False)
            return
        rt = t.runtimes[route.index]
        ex.rt = rt
        ex.route_index = rt.index
        if ex.upgrade and not (ex.websocket and method == "GET"):
            # Only WebSocket is relayed (RFC 6455); h2c and the rest are refused (400 + close:
            # bytes behind a refused upgrade are never parsed as requests).
            self.reply(ex, W_BAD_REQUEST, True)
            return

        # -- auth -------------------------------------------------------------------------------
        claims = None
        found = None
        if rt.auth and not (rt.cors_bypass and method == "OPTIONS" and "Origin" in auth_headers
                            and "Access-Control-Request-Method" in auth_headers):
            outcome = self.dpop_auth(ex, rt, hooks) if rt.dpop is not None else \
                self.fast_auth(ex, rt, hooks)
            if outcome == FA_DONE:
                return
            if outcome == FA_OK:
                claims = ex.claims
                if not rt.forward_token and ex.token is not None:
                    found = [(rt.dpop_index if ex.via_dpop else 0, ex.token)]
            else:
                decided = None if outcome == FA_SLOW else \
                    plane.authenticate_now(rt, hooks, auth_headers, qs)
                if decided is None:
                    # Slow path: an unknown kid or a cold start (SPEC §5), or mode: all.
                    ex.task = self.loop.create_task(_guarded(
                        "slow auth path", _decide_later, self, ex, fwd, path, qs))
                    return
                reason, claims, found = decided
                if reason is not REASON_OK:
                    self.reject(ex, reason)
                    return
                if found is not None and len(found) == 1:
                    ex.token = found[0][1]
        self.admit(ex, fwd, path, qs, claims, found)

    cdef void trace(self, Exchange ex):
        """X-Request-Id and W3C Trace Context for this request (docs/operations.md)."""
        global id_counter
        server = self.server
        if server.request_id:
            rid = ex.request_id
            if not (self.trusted and rid is not None and REQUEST_ID_RE.fullmatch(rid)):
                id_counter += 1
                ex.request_id = ID_PREFIX + b"%016x" % id_counter
        else:
            ex.request_id = None
        tp = ex.traceparent
        if tp is not None and TRACEPARENT_RE.fullmatch(tp) is None:
            tp = None  # W3C §3.2: an invalid traceparent is ignored, tracestate with it
        if tp is None:
            ex.tracestate = None
            if server.create_traceparent:
                tp = b"00-" + os.urandom(16).hex().encode() + b"-" + \
                    os.urandom(8).hex().encode() + b"-00"
        ex.traceparent = tp

    cdef int fast_auth(self, Exchange ex, rt, hooks):
        """The common route's decision without Python calls (see RouteRuntime.fast_header):
        the same steps and answers as TokenExtractor.extract + DataPlane.authenticate_now."""
        cdef bytes header = rt.fast_header
        cdef bytes prefix, value
        cdef Py_ssize_t plen
        if header is None:
            return FA_GENERIC
        values = ex.auth_headers._map.get(header)
        if values is None:
            if rt.allow_missing:
                ex.claims = None  # SPEC §2: no token -> forwarded without claim headers
                return FA_OK
            self.reject(ex, REASON_MISSING)
            return FA_DONE
        if len(values) != 1:
            return FA_GENERIC  # several lines: the extractor's ambiguity rules
        value = values[0]
        prefix = rt.fast_prefix
        plen = len(prefix)
        if value[:plen].lower() != prefix:
            return FA_GENERIC  # another scheme, or a bare "Bearer"
        return self.verified(ex, rt, hooks, value[plen:].decode("utf-8", "surrogateescape"))

    cdef int dpop_auth(self, Exchange ex, rt, hooks):
        """A DPoP route's fast path for ``Authorization: DPoP <token>`` (RFC 9449 §7.1): the
        token is extracted and verified like fast_auth's; the proof is checked in admit
        (possess), where the slow path ends too."""
        cdef bytes value
        values = ex.auth_headers._map.get(b"authorization")
        if values is None or len(values) != 1:
            return FA_GENERIC  # none or several: the extractor's rules
        value = values[0]
        if value[:5].lower() != b"dpop ":
            return FA_GENERIC  # Bearer (or another scheme): the generic path
        ex.via_dpop = True
        return self.verified(ex, rt, hooks, value[5:].decode("utf-8", "surrogateescape"))

    cdef int verified(self, Exchange ex, rt, hooks, str token):
        """The fast paths' shared step: shape, verify, policy (TokenExtractor.check +
        DataPlane.authenticate_now for one token)."""
        cdef double began
        reason = token_shape(token, rt.max_token_chars)  # TokenExtractor.check's rules
        if reason is not REASON_OK:
            self.reject(ex, reason)
            return FA_DONE
        began = monotonic()
        result = rt.issuer_set.verify(token)
        if result.cached:
            hooks.cache_lookup(True)
        else:
            # Only real verifications are timed: a cache hit is counted, not observed.
            hooks.verify_observe(monotonic() - began)
            hooks.cache_lookup(False)
        if not result.ok:
            reason = result.reason
            if (reason is REASON_KEY_NOT_FOUND or reason is REASON_JWKS_UNAVAILABLE) and \
                    result.verifier in rt.key_sources:
                return FA_SLOW  # an unknown kid or a cold start (SPEC §5)
            self.reject(ex, reason)
            return FA_DONE
        claims = result.claims
        if rt.policy_checks:
            reason = rt.policy.check(claims)
            if reason is not REASON_OK:
                self.reject(ex, reason)
                return FA_DONE
        ex.claims = claims
        ex.token = token
        return FA_OK

    cdef bint bound_to_connection(self, claims):
        """RFC 8705 §3.1: the token's ``cnf["x5t#S256"]`` is the base64url SHA-256 of the DER
        of the client certificate on *this* connection. Checked on every request after the
        verify, so a cached token presented over another connection never passes."""
        cdef bytes thumb = self.cert_thumbprint
        if thumb is None:
            thumb = b""
            ssl_object = self.transport.get_extra_info("ssl_object") \
                if self.transport is not None else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if der:
                thumb = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=")
            self.cert_thumbprint = thumb
        if not thumb or not isinstance(claims, dict):
            return False
        cnf = claims.get("cnf")
        bound = cnf.get("x5t#S256") if isinstance(cnf, dict) else None
        return isinstance(bound, str) and bound.isascii() and \
            hmac.compare_digest(bound.encode("ascii"), thumb)

    cdef int possess(self, Exchange ex, list fwd, str path, str qs, dict claims, found):
        """Proof of possession and replay (RFC 9449 §4.3, §7; RFC 7523 §3 item 7), after the
        token verified (a cached token too: the proof is checked fresh on every request)."""
        cdef list keys = None
        cdef bytes nonce = None
        rt = ex.rt
        cnf = claims.get("cnf")
        jkt = (<dict>cnf).get("jkt") if type(cnf) is dict else None
        token = ex.token if ex.token is not None else (found[0][1] if found else None)
        replayed = REASON_TOKEN_REPLAYED
        if ex.via_dpop or (found and rt.dpop_index >= 0 and found[0][0] == rt.dpop_index):
            proofs = ex.auth_headers._map.get(b"dpop")
            if proofs is None or len(proofs) != 1:
                self.reject(ex, REASON_DPOP_PROOF_INVALID)  # §4.3 check 1: exactly one
                return PO_DONE
            base = rt.dpop_base
            if base is None:
                # No external_url: the URI this connection was sent to (docs/security.md).
                base = (<bytes>self.server.scheme).decode("ascii") + "://" + \
                    ex.host.decode("utf-8", "surrogateescape")
            # The header's bytes as they came (DpopRule.check takes bytes: no decode and
            # re-encode of a ~600-byte proof; a non-ASCII byte fails its base64url check).
            result = rt.dpop.check(proofs[0], ex.method, base + path, token, jkt)
            if not result.ok:
                self.reject(ex, result.reason)
                return PO_DONE
            if rt.nonces is not None:
                if result.nonce is None:
                    self.reject_with(ex, REASON_DPOP_NONCE_REQUIRED, rt.nonces.wire(rt))
                    return PO_DONE
                nonce = (<str>result.nonce).encode("utf-8", "surrogateescape")
            keys = [(b"d:" + (<str>result.jkt).encode("ascii") + b":"
                     + (<str>result.jti).encode("utf-8", "surrogateescape"), rt.dpop.window)]
            replayed = REASON_DPOP_PROOF_REPLAYED
        elif jkt is not None:
            # RFC 9449 §7.2: a DPoP-bound token without its proof (as Bearer, or from a query
            # or cookie) is refused on every route; Bearer's challenge, the client's scheme.
            ex.tables.hooks.reject(rt.index, REASON_DPOP_BINDING_MISMATCH)
            self.reply(ex, rt.binding_wire, False)
            return PO_DONE
        elif rt.dpop_required:
            self.reject(ex, REASON_DPOP_PROOF_INVALID)
            return PO_DONE
        if rt.one_time:
            key = rt.one_time_key(claims)
            if key is None:
                self.reject(ex, REASON_CLAIM_MISSING)  # RFC 7523 §3 item 7 needs jti and exp
                return PO_DONE
            if keys is None:
                keys = []
            keys.append(key)
            # With both keys, a replayed proof means its token (bound by ath) was used too.
            replayed = REASON_TOKEN_REPLAYED
        if keys is None:
            return PO_PASS
        store = rt.replay
        if type(store) is MemoryReplayStore:
            # The in-process store answers at once and never calls ``done``: no continuation.
            code = store.check(keys, nonce, _never_called)
            return self.replay_outcome(ex, code, replayed)
        waiter = _ReplayWait(self, ex, fwd, path, qs, claims, found, replayed)
        code = store.check(keys, nonce, waiter)
        if code == STORE_PENDING:
            return PO_WAIT
        return self.replay_outcome(ex, code, replayed)

    cdef int replay_outcome(self, Exchange ex, int code, replayed):
        rt = ex.rt
        if code == FRESH:
            return PO_PASS
        if code == REPLAYED:
            self.reject(ex, replayed)
        elif code == NONCE_UNKNOWN:
            self.reject_with(ex, REASON_DPOP_NONCE_REQUIRED, rt.nonces.wire(rt))
        elif rt.replay.fail_open:
            return PO_PASS  # on_error: fail_open (the store counted the unavailable answer)
        else:
            self.reject(ex, REASON_REPLAY_STORE_UNAVAILABLE)
        return PO_DONE

    cdef void reject(self, Exchange ex, reason):
        rt = ex.rt
        ex.tables.hooks.reject(rt.index, reason)
        self.reply(ex, rt.wires[reason], False)

    cdef void reject_with(self, Exchange ex, reason, wire):
        """A reject whose response is not the route's prebuilt one (a fresh DPoP-Nonce)."""
        ex.tables.hooks.reject(ex.rt.index, reason)
        self.reply(ex, wire, False)

    cdef void admit(self, Exchange ex, list fwd, str path, str qs, claims, found):
        """Build the upstream request head and send it (RFC 9110 §7.6, RFC 9112 §3, §6).
        Both decision paths (at once and slow) end here, so the connection-level check of a
        certificate-bound token is made here once."""
        cdef list parts
        cdef bytes name, value, peer, xfp
        rt = ex.rt
        t = ex.tables
        if rt.certificate_bound and claims is not None and not self.bound_to_connection(claims):
            self.reject(ex, REASON_CERTIFICATE_MISMATCH)
            return
        # RFC 9449 §7.2: a DPoP-bound token (cnf.jkt) is checked on every route, so the cnf
        # test is made even where no DPoP or one-time rule is configured.
        if claims is not None and not ex.possessed and (rt.possession or "cnf" in claims):
            if self.possess(ex, fwd, path, qs, claims, found) != PO_PASS:
                return
        if ex.content_length > t.max_body_bytes:
            self.reply(ex, W_TOO_LARGE, False)
            return
        if found and not rt.forward_token:
            fwd, qs = self.plane.remove_tokens(rt, fwd, qs, found)
        if t.api_keys.query is not None and qs:
            qs = strip_query_param(qs, t.api_keys.query)  # a credential for the gateway only
        pool = rt.pool
        route = rt.route
        target = route.rewrite(path) if route.strip_prefix else path
        parts = [ex.method.encode("ascii"), b" ", pool.base,
                 target.encode("utf-8", "surrogateescape")]
        if qs:
            parts.append(b"?")
            parts.append(qs.encode("utf-8", "surrogateescape"))
        parts.append(b" HTTP/1.1\r\n")
        for name, value in fwd:
            parts.append(name + SEP + value + CRLF)
        if ex.host is None:
            parts.append(pool.host_line)  # RFC 9112 §3.2: Host is mandatory in HTTP/1.1
        if claims is not None and rt.policy_headers:
            token = ex.token
            cache = rt.claim_cache
            block = cache.get(token) if token is not None else None
            if block is None:
                # encode_claim never yields CR, LF or NUL (SPEC §2): no header injection.
                block = b"".join([name_s.encode("latin-1") + SEP
                                  + value_s.encode("utf-8", "surrogateescape") + CRLF
                                  for name_s, value_s in rt.policy.headers(claims)])
                if token is not None:
                    if len(cache) >= CLAIM_CACHE_MAX:
                        cache.clear()
                    cache[token] = block
            parts.append(block)
        # X-Forwarded-*: a trusted proxy's values are kept and the peer appended; anyone
        # else's are replaced (RFC 7239 §5.2 practice for the de-facto headers).
        peer = (self.peer or "").encode("ascii", "replace")
        if self.trusted and ex.client_xff:
            parts.append(b"X-Forwarded-For: " + ex.client_xff + b", " + peer + CRLF)
        else:
            parts.append(b"X-Forwarded-For: " + peer + CRLF)
        xfp = ex.client_xfp if self.trusted and ex.client_xfp else self.server.scheme
        parts.append(b"X-Forwarded-Proto: " + xfp + CRLF)
        xfh = ex.client_xfh if self.trusted and ex.client_xfh else ex.host
        if xfh is not None:
            parts.append(b"X-Forwarded-Host: " + xfh + CRLF)
        if ex.request_id is not None:
            parts.append(b"X-Request-Id: " + ex.request_id + CRLF)
        if ex.traceparent is not None:
            parts.append(b"traceparent: " + ex.traceparent + CRLF)
            if ex.tracestate is not None:
                parts.append(b"tracestate: " + ex.tracestate + CRLF)
        if ex.websocket and ex.upgrade:
            parts.append(b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
        elif ex.chunked_in:
            parts.append(b"Transfer-Encoding: chunked\r\n")  # RFC 9112 §7.1
        elif ex.content_length >= 0:
            parts.append(b"Content-Length: %d\r\n" % ex.content_length)
        elif ex.method in BODY_METHODS:
            parts.append(b"Content-Length: 0\r\n")  # RFC 9110 §8.6
        parts.append(CRLF)
        ex.head = b"".join(parts)
        ex.head_only = ex.method == "HEAD"
        if ex.expect and not ex.complete and not ex.http10:
            # RFC 9110 §10.1.1: 100 Continue only now that the request is admitted.
            self.transport.write(CONTINUE)
        if not ex.complete and (ex.chunked_in or ex.content_length > 0):
            self.arm(T_BODY, rt.body_timeout)
        # UpstreamPool.take_idle, inline: the warmest idle connection (LIFO).
        idle = pool._idle
        conn = None
        while idle:
            conn = idle.pop()
            if not (<RelayConn>conn).dead:
                break
            conn = None
        if conn is None:
            self.connect_then_send(ex, False)
        else:
            self.send(ex, <RelayConn>conn)

    # -- the upstream leg ----------------------------------------------------------------------

    cdef void send(self, Exchange ex, RelayConn conn):
        """Write the head and what body there is to ``conn``; the rest follows from on_body."""
        cdef list pieces
        cdef bytes b
        if not conn.start(ex, ex.head_only):
            self.connect_then_send(ex, False)
            return
        ex.conn = conn
        ex.upstream_t0 = monotonic()
        pieces = [ex.head]
        if ex.body:
            if ex.chunked_in:
                for b in ex.body:
                    pieces.append(b"%x\r\n" % len(b) + b + CRLF)
                if ex.complete:
                    pieces.append(CHUNK_END)
            else:
                pieces.extend(ex.body)
            ex.body.clear()
        elif ex.chunked_in and ex.complete:
            pieces.append(CHUNK_END)
        ex.state = X_SENDING
        ex.buffered = 0
        self.gate.resume(PENDING)
        conn.send(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    cdef void send_body(self, Exchange ex):
        cdef list body = ex.body
        ex.conn.send(body[0] if len(body) == 1 else b"".join(body))
        body.clear()

    cdef void connect_then_send(self, Exchange ex, bint fresh):
        """Slow path: no warm connection; open one (or wait for a slot) in a task."""
        if ex.buffered > HIGH_WATER:
            self.gate.pause(PENDING)
        ex.task = self.loop.create_task(_guarded(
            "upstream connect", _connect_then_send, self, ex, fresh))

    # -- answers the gateway writes itself -----------------------------------------------------

    cdef void reply(self, Exchange ex, wire, bint close):
        """A prebuilt response. A request whose body was not read closes the connection: its
        bytes must never be parsed as a next request (no 100 was sent, so a client that
        waits for one sends nothing)."""
        close = close or not ex.complete or not ex.keep_alive or self.plane.draining
        ex.status = wire.status
        ex.label = wire.label
        transport = self.transport
        data = wire.bytes(close=close, http10=ex.http10, head_only=ex.method == "HEAD")
        ex.bytes_out += len(data)
        if transport is not None and not transport.is_closing():
            transport.write(data)
        ex.keep_alive = not close
        if close:
            self.discard = True
        self.exchange_done(ex)

    cdef void error(self, wire, Exchange ex):
        """A framing or limit error outside a dispatched request: answer, then close."""
        self.discard = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.active is not None:
            self.active.keep_alive = False  # finish the current answer, then close
            return
        if ex is not None and ex.tables is None:
            t = self.plane.tables
            ex.tables = t
            ex.route_index = t.no_route
            ex.started = monotonic()
            t.inflight += 1
            t.hooks.inflight_inc()
            ex.status = wire.status
            ex.label = wire.label
            ex.keep_alive = False
            self.active = ex
            transport.write(wire.bytes(close=True))
            self.exchange_done(ex)
            return
        transport.write(wire.bytes(close=True))
        transport.close()

    cdef void parse_error(self, exc):
        log.debug("request parse error from %s: %r", self.peer, exc)
        if isinstance(exc.__context__, _Stop):
            return
        if self.cur is not None and self.cur.tables is None:
            self.error(W_BAD_REQUEST, self.cur)
        else:
            self.error(W_BAD_REQUEST, None)

    cdef void too_large(self, Exchange ex):
        cdef RelayConn conn = ex.conn
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
            self.reply(ex, W_TOO_LARGE, True)

    cdef void abort(self, Exchange ex):
        """Cut the client connection (mid-response failure, send timeout)."""
        cdef RelayConn conn = ex.conn
        ex.keep_alive = False
        self.discard = True
        if conn is not None:
            ex.conn = None
            conn.abort_exchange()
        self.exchange_done(ex)
        if self.transport is not None:
            self.transport.abort()

    # -- end of an exchange ----------------------------------------------------------------------

    cdef void account(self, Exchange ex):
        ex.state = X_DONE
        t = ex.tables
        if t is None:
            return
        t.inflight -= 1
        hooks = t.hooks
        hooks.inflight_dec()
        duration = monotonic() - ex.started
        hooks.request_done(ex.route_index, ex.status, duration)
        access_log = self.plane.access_log
        if access_log is not None:
            rt = ex.rt
            access_log.log(ex, route=rt.name if rt is not None else None, status=ex.status,
                           reason=ex.label, duration=duration, upstream_latency=ex.upstream_s)

    cdef void exchange_done(self, Exchange ex):
        cdef Exchange nxt
        if ex.state == X_DONE:
            return
        self.account(ex)
        if self.active is ex:
            self.active = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not ex.keep_alive or not ex.complete or self.plane.draining or self.eof:
            self.discard = True
            if not ex.complete and not self.eof and transport.can_write_eof():
                # The client may still be sending the body we did not read: send FIN after
                # the response and read on (discarding) for a moment, then close.
                transport.write_eof()
                self.arm(T_LINGER, LINGER_SECONDS)
                return
            transport.close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if not self.queue:
                self.gate.resume(QUEUED)
            self.dispatch(nxt)
            if nxt is self.active and nxt.conn is not None and nxt.body and \
                    nxt.state == X_SENDING:
                self.send_body(nxt)
            return
        if self.cur is not None and self.cur is not ex:
            self.arm(T_HEAD, self.server.header_timeout)  # the next head is arriving
        else:
            self.arm(T_IDLE, self.server.keepalive_timeout)

    # -- WebSocket tunnel (RFC 6455 §4) -----------------------------------------------------------

    cdef void upgraded(self, bytes rest):
        """llhttp paused after an Upgrade request's head; ``rest`` is what followed it."""
        cdef Exchange ex = self.active
        self.discard = True  # no more HTTP on this connection either way
        if ex is None or not (ex.websocket and ex.upgrade) or ex.state == X_DONE:
            return
        if rest:
            ex.body.append(rest)  # sent once the upstream's 101 arrived
            self.gate.pause(PENDING)

    cdef void start_tunnel(self, Exchange ex):
        cdef RelayConn conn = ex.conn
        ex.flush()
        self.tunnel = conn
        ex.complete = True
        ex.keep_alive = False
        if ex.body:
            conn.send(b"".join(ex.body))
            ex.body.clear()
        self.gate.resume(PENDING)
        self.touch_tunnel()

    cdef void touch_tunnel(self):
        if self.timer_kind != T_SEND:
            self.arm(T_TUNNEL, self.server.keepalive_timeout)

    # -- the connection's one timer ---------------------------------------------------------------

    cdef void arm(self, int kind, double seconds):
        """Set the one deadline; the timer is re-armed lazily, or moved when it must fire
        earlier than it is set for."""
        cdef double deadline
        self.timer_kind = kind
        self.deadline = deadline = self.loop.time() + seconds
        timer = self.timer
        if timer is not None:
            if deadline >= self.timer_at:
                return
            timer.cancel()
        self.timer_at = deadline
        self.timer = self.loop.call_at(deadline, self.on_timer)

    def on_timer(self):
        try:
            self.timer_fired()
        except Exception:
            if self.active is not None:
                self.internal_error(self.active)
            elif self.transport is not None:
                log.exception("client connection timer failed")
                self.transport.abort()

    cdef void timer_fired(self):
        cdef Exchange ex
        cdef RelayConn conn
        cdef int kind = self.timer_kind
        self.timer = None
        if kind == T_NONE or self.transport is None or self.transport.is_closing():
            return
        if self.loop.time() < self.deadline:
            self.timer_at = self.deadline
            self.timer = self.loop.call_at(self.deadline, self.on_timer)
            return
        self.timer_kind = T_NONE
        ex = self.active
        if kind == T_IDLE or kind == T_TUNNEL or kind == T_LINGER:
            self.transport.close()  # RFC 9112 §9.8: an idle connection may be closed
        elif kind == T_HEAD:
            # Slowloris: the head did not arrive in time.
            if ex is None:
                self.error(W_TIMEOUT, self.cur)
            else:
                self.transport.close()
        elif kind == T_BODY and ex is not None:
            conn = ex.conn
            if conn is not None:
                ex.conn = None
                conn.abort_exchange()
            if ex.wrote_head:
                self.abort(ex)
            else:
                self.reply(ex, W_TIMEOUT, True)
        elif kind == T_SEND:
            log.debug("client %s took none of its response for %gs: closed", self.peer,
                      self.server.send_timeout)
            if ex is not None:
                self.abort(ex)
            else:
                self.transport.abort()

