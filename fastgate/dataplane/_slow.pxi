# Included by _http.pyx (one extension module: see its docstring). The slow paths: the only
# places a request creates a task or waits (keys not loaded yet, a shared replay store that
# answers later, an upstream connection still to open).

async def _guarded(str what, step, ClientProtocol proto, Exchange ex, *args):
    """Run a slow-path step of ``ex`` (``step(proto, ex, *args)``, created here so a task
    cancelled before it starts leaves no coroutine behind); a failure inside it answers
    ``ex`` (internal_error), never leaves it hanging."""
    try:
        await step(proto, ex, *args)
    except Exception:
        if proto.active is ex:
            proto.internal_error(ex)
        else:
            log.exception("%s failed", what)


def _never_called(int code):
    """MemoryReplayStore's ``done`` (it answers synchronously, so this is never called)."""
    raise AssertionError("the in-process replay store answered later")


cdef class _ReplayWait:
    """The rest of admit, run when the shared replay store answers (no task, no future)."""
    cdef ClientProtocol proto
    cdef Exchange ex
    cdef list fwd
    cdef str path, qs
    cdef dict claims
    cdef object found, replayed

    def __cinit__(self, ClientProtocol proto, Exchange ex, list fwd, str path, str qs,
                  dict claims, found, replayed):
        self.proto = proto
        self.ex = ex
        self.fwd = fwd
        self.path = path
        self.qs = qs
        self.claims = claims
        self.found = found
        self.replayed = replayed

    def __call__(self, int code):
        cdef ClientProtocol proto = self.proto
        cdef Exchange ex = self.ex
        if proto.active is not ex or ex.state != X_DECIDING:
            return  # the client went away meanwhile
        try:
            if proto.replay_outcome(ex, code, self.replayed) != PO_PASS:
                return
            ex.possessed = True
            proto.admit(ex, self.fwd, self.path, self.qs, self.claims, self.found)
            if ex.conn is not None and ex.body and ex.state == X_SENDING:
                proto.send_body(ex)
        except Exception:
            if proto.active is ex:
                proto.internal_error(ex)
            else:
                log.exception("replay store continuation failed")


async def _decide_later(ClientProtocol proto, Exchange ex, list fwd, str path, str qs):
    """The slow auth path (SPEC §5: an unknown kid, a cold start; or ``mode: all``)."""
    rt = ex.rt
    t = ex.tables
    reason, claims, found = await proto.plane.authenticate(rt, t.hooks, ex.auth_headers, qs)
    ex.task = None
    if proto.active is not ex:
        return  # the client went away meanwhile
    if reason is not REASON_OK:
        proto.reject(ex, reason)
    else:
        proto.admit(ex, fwd, path, qs, claims, found)
    if ex.conn is not None and ex.body and ex.state == X_SENDING:
        proto.send_body(ex)


async def _connect_then_send(ClientProtocol proto, Exchange ex, bint fresh):
    """Open an upstream connection (or wait for a pool slot), then send."""
    pool = ex.rt.pool
    try:
        conn = await pool.acquire(fresh)
    except UpstreamError as exc:
        ex.task = None
        if proto.active is ex:
            ex.response_failed(exc)
        return
    ex.task = None
    if proto.active is not ex or ex.state == X_DONE:
        pool.release(conn)
        return
    proto.send(ex, <RelayConn>conn)

