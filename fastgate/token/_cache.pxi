# Included by _verify.pyx (one extension module: see its docstring). The verified-token
# cache: TokenCache, an LRU of verified tokens (_Entry) beside the negative cache of signature
# and time-window rejects (_Neg).

# ---------------------------------------------------------------------------------------------
# Verified-token cache


@cython.final
cdef class _Entry:
    cdef bytes tok            # the dict key itself (same object, no copy): eviction needs it
    cdef PyObject* newer      # LRU links, borrowed: the cache's dict owns every linked entry
    cdef PyObject* older
    cdef Verifier verifier    # the verifier that verified (its config is immutable)
    cdef _Key key             # the prepared key used; key.alive gates every hit
    cdef _Header hdr          # shared with the header cache: header dict, alg, kid
    cdef object claims        # the payload dict; its iss is the verifier's own str object
    cdef object aud           # claims["aud"]: the str itself (no copy), a tuple, or None
    cdef double not_before    # max(nbf, iat) - skew (and exp - max_lifetime without iat)
    cdef double expires       # exp + skew (+inf without exp): valid while now < expires
    cdef bint kidless         # the key was found by trying kid-less candidates


@cython.final
cdef class _Neg:
    """A token rejected after the signature check (signature_invalid, or a valid signature
    and only the time window failed), by whom and against which key generation."""
    cdef Verifier verifier
    cdef unsigned long long gen   # verifier._gen when rejected; any key change invalidates
    cdef object kid               # the header kid (<= MAX_KID_LENGTH chars) or None
    cdef int alg                  # the header alg code (an allowed alg: it reached the signature)
    cdef Py_ssize_t d1            # the two '.' offsets, to decode header/payload lazily
    cdef Py_ssize_t d2
    cdef int code                 # R_SIGNATURE_INVALID, R_TOKEN_EXPIRED or R_TOKEN_NOT_YET_VALID
    # Time rejects only: the bound that decided, re-checked against the clock on every hit.
    cdef double expires           # exp + skew (+inf without exp): expired once now >= expires
    cdef double early             # the nbf (or iat) that was in the future: not yet valid
                                  # while early > now + skew


@cython.final
cdef class TokenCache:
    """Bounded LRU of verified tokens, keyed by the token bytes; shareable between verifiers.

    A dict for lookup plus an intrusive doubly linked list through the entries for recency:
    a hit relinks two pointers, an insert evicts the oldest without allocating (no
    OrderedDict nodes, no popitem tuples). The list pointers are borrowed; every linked entry
    is owned by ``_map``, and every change to ``_map`` goes through ``_put``/``_drop``/``clear``.
    """
    cdef dict _map
    cdef PyObject* _newest
    cdef PyObject* _oldest
    cdef Py_ssize_t _max
    cdef long long _hits
    cdef long long _misses
    # Negative cache (W3: the same bad tokens replayed): token bytes -> _Neg, for
    # signature_invalid and for validly signed tokens outside their time window (exp/nbf/iat;
    # never max_lifetime, never a claim or audience reject). Its own dict and bound, so a flood of distinct bad tokens never evicts a verified
    # entry; cleared wholesale when full (O(1) amortised, memory bounded by
    # _neg_max * (MAX_CACHED_TOKEN_BYTES + a small entry): no parsed JSON is kept).
    cdef dict _neg
    cdef Py_ssize_t _neg_max
    cdef long long _neg_hits

    def __cinit__(self, *args, **kwargs):
        self._map = {}  # once per object: a second __init__ must not orphan linked entries
        self._neg = {}

    def __init__(self, max_entries=100_000, *, negative_entries=None):
        if type(max_entries) is bool or not isinstance(max_entries, int) or max_entries < 0:
            raise ValueError("max_entries must be an int >= 0")
        if negative_entries is None:
            negative_entries = _NEG_DEFAULT if max_entries > 0 else 0
        if type(negative_entries) is bool or not isinstance(negative_entries, int) \
                or negative_entries < 0:
            raise ValueError("negative_entries must be an int >= 0")
        self._max = max_entries
        self._neg_max = negative_entries
        while PyDict_Size(self._map) > self._max:
            self._drop(<_Entry>self._oldest)
        if PyDict_Size(self._neg) > self._neg_max:
            self._neg.clear()

    def __len__(self):
        return PyDict_Size(self._map)

    def clear(self):
        self._newest = NULL
        self._oldest = NULL
        self._map.clear()
        self._neg.clear()

    @property
    def max_entries(self):
        return self._max

    @property
    def negative_entries(self):
        return self._neg_max

    @property
    def negative_size(self):
        return PyDict_Size(self._neg)

    @property
    def negative_hits(self):
        return self._neg_hits

    @property
    def hits(self):
        return self._hits

    @property
    def misses(self):
        return self._misses

    def __repr__(self):
        return (f"<TokenCache {len(self._map)}/{self._max} hits={self._hits} "
                f"misses={self._misses} negative={len(self._neg)}/{self._neg_max}>")

    cdef int _neg_put(self, bytes tok, Verifier v, object kid, int alg, Py_ssize_t d1,
                      Py_ssize_t d2, int code, double expires, double early) except -1:
        cdef _Neg ne
        if PyDict_Size(self._neg) >= self._neg_max:
            self._neg.clear()  # bounded; a flood of distinct bad tokens only costs re-verifying
        ne = _Neg.__new__(_Neg)
        ne.verifier = v
        ne.gen = v._gen
        ne.kid = kid
        ne.alg = alg
        ne.d1 = d1
        ne.d2 = d2
        ne.code = code
        ne.expires = expires
        ne.early = early
        self._neg[tok] = ne
        return 0

    cdef inline void _unlink(self, _Entry e) noexcept:
        if e.newer != NULL:
            (<_Entry>e.newer).older = e.older
        else:
            self._newest = e.older
        if e.older != NULL:
            (<_Entry>e.older).newer = e.newer
        else:
            self._oldest = e.newer
        e.newer = NULL
        e.older = NULL

    cdef inline void _link_newest(self, _Entry e) noexcept:
        e.newer = NULL
        e.older = self._newest
        if self._newest != NULL:
            (<_Entry>self._newest).newer = <PyObject*>e
        self._newest = <PyObject*>e
        if self._oldest == NULL:
            self._oldest = <PyObject*>e

    cdef inline _Entry _get(self, bytes tok):
        cdef PyObject* found = PyDict_GetItem(self._map, tok)
        if found == NULL:
            return None
        return <_Entry>found

    cdef inline void _touch(self, _Entry e) noexcept:
        if self._newest != <PyObject*>e:
            self._unlink(e)
            self._link_newest(e)

    cdef int _drop(self, _Entry e) except -1:
        # e may be a borrowed pointer whose only owner is the dict: keep it (and its key)
        # alive across the deletion.
        cdef _Entry keep = e
        cdef bytes tok = e.tok
        self._unlink(keep)
        del self._map[tok]
        return 0

    cdef int _put(self, bytes tok, _Entry e) except -1:
        cdef PyObject* found = PyDict_GetItem(self._map, tok)
        if found != NULL:  # verified twice concurrently: replace, keeping the list consistent
            self._unlink(<_Entry>found)
        e.tok = tok
        self._map[tok] = e
        self._link_newest(e)
        while PyDict_Size(self._map) > self._max:
            self._drop(<_Entry>self._oldest)  # least recently used
        return 0
