# Included by _verify.pyx (one extension module: see its docstring). What a check returns:
# Result (reason, detail, claims) with its _fail/_set constructors, and KeyReport (what a key
# set load kept and skipped).

# ---------------------------------------------------------------------------------------------
# Results and reports


@cython.freelist(64)
@cython.final
@cython.no_gc
cdef class Result:
    """The outcome of one verification. ``claims`` is set only when ``ok``.

    The ``claims`` and ``header`` dicts may be shared with the verified-token cache: treat them
    as read-only.
    """
    cdef int _code
    cdef bint _cached
    cdef str _detail
    cdef object _claims
    cdef object _header
    cdef object _payload
    cdef object _kid
    cdef object _alg
    cdef object _issuer
    cdef object _verifier
    # A reject served by the negative cache decodes nothing: header and payload are decoded
    # from the token only if someone asks (logs, `fastgate verify`), never on the hot path.
    cdef bytes _lazy
    cdef Py_ssize_t _d1
    cdef Py_ssize_t _d2

    def __init__(self, *args, **kwargs):
        raise TypeError("Result objects are made by the verifier")

    cdef int _decode_lazy(self) except -1:
        cdef bytes tok = self._lazy
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(tok)
        self._lazy = None
        # Both segments parsed when the token was first rejected; parse them again the same way.
        hraw = _b64d(p, self._d1)
        praw = _b64d(p + self._d1 + 1, self._d2 - self._d1 - 1)
        try:
            self._header = _loads(hraw) if hraw is not None else None
            self._payload = _loads(praw) if praw is not None else None
        except _JSONDecodeError:  # pragma: no cover - it parsed the first time
            pass
        return 0

    @property
    def ok(self):
        return self._code == R_OK

    @property
    def reason(self):
        return _REASONS[self._code]

    @property
    def claims(self):
        return self._claims if self._code == R_OK else None

    @property
    def header(self):
        if self._lazy is not None:
            self._decode_lazy()
        return self._header

    @property
    def payload(self):
        if self._lazy is not None:
            self._decode_lazy()
        return self._payload

    @property
    def detail(self):
        return self._detail

    @property
    def kid(self):
        return self._kid

    @property
    def alg(self):
        return self._alg

    @property
    def issuer(self):
        return self._issuer

    @property
    def verifier(self):
        return self._verifier

    @property
    def cached(self):
        return self._cached

    def __repr__(self):
        return f"<Result {_REASONS[self._code].label} detail={self._detail!r} cached={self._cached}>"


cdef inline Result _fail(int code, str detail):
    cdef Result r = Result.__new__(Result)
    r._code = code
    r._detail = detail
    return r


cdef inline Result _set(Result r, int code, str detail):
    r._code = code
    r._detail = detail
    return r


@cython.final
@cython.no_gc
cdef class KeyReport:
    """What :meth:`Verifier.set_jwks` did with a JWKS document."""
    cdef int _loaded
    cdef list _skipped
    cdef frozenset _kids

    def __init__(self, *args, **kwargs):
        raise TypeError("KeyReport objects are made by Verifier.set_jwks")

    @property
    def loaded(self):
        return self._loaded

    @property
    def skipped(self):
        return list(self._skipped)

    @property
    def kids(self):
        return self._kids

    def __repr__(self):
        return f"<KeyReport loaded={self._loaded} skipped={self._skipped!r}>"
