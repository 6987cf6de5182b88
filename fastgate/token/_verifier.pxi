# Included by _verify.pyx (one extension module: see its docstring). The per-issuer
# Verifier (its configuration checks and key set) and IssuerSet (several issuers, chosen by
# the token's iss), with the argument parsers they share.

# ---------------------------------------------------------------------------------------------
# Verifier


cdef unsigned int _parse_algorithms(object algorithms) except? 0:
    cdef unsigned int mask = 0
    if isinstance(algorithms, str):
        algorithms = (algorithms,)
    for name in algorithms:
        if type(name) is not str:
            raise ValueError(f"algorithm names are strings, got {name!r}")
        if (<str>name).lower() == "none":
            raise ValueError("'none' is never an allowed algorithm (RFC 8725 §3.1)")
        code = _ALG_CODE.get(name)
        if code is None:
            raise ValueError(f"unknown algorithm {name!r}; supported: {sorted(_ALG_NAMES)}")
        mask |= _bit(code)
    if mask == 0:
        raise ValueError("algorithms must not be empty")
    return mask


cdef frozenset _str_set(object values, str what):
    if values is None:
        return frozenset()
    if isinstance(values, str):
        values = (values,)
    out = frozenset(values)
    for v in out:
        if type(v) is not str:
            raise ValueError(f"{what} must be strings, got {v!r}")
    return out


cdef frozenset _typ_set(object values):
    """The configured typ list, normalised once (RFC 7515 §4.1.9); None when not configured."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)) or not isinstance(values, _abc.Iterable):
        raise ValueError("typ must be a list of strings")
    out = set()
    for value in values:
        if type(value) is not str or not value:
            raise ValueError("typ values must be non-empty strings")
        key = _typ_key(value)
        if key is None or key.startswith("/") or key.endswith("/") or key.count("/") != 1 \
                or any(c <= " " or c == "\x7f" or c in ";,\"" for c in key):
            raise ValueError(f"typ value {value!r} is not a media type (RFC 6838 §4.2)")
        out.add(key)
    if not out:
        raise ValueError("typ must list at least one value (omit it to accept any typ)")
    return frozenset(out)


cdef bint _aud_match(object aud, frozenset auds) except -1:
    """RFC 7519 §4.1.3: the token's aud (string or array) must contain one configured value."""
    if not auds:
        return True
    if aud is None:
        return False
    if type(aud) is str:
        return PySet_Contains(auds, aud) == 1
    for a in aud:  # a list from the payload, or the tuple a cache entry keeps
        if PySet_Contains(auds, a) == 1:
            return True
    return False


cdef bint _is_number(object v) noexcept:
    # RFC 7519 §2 NumericDate: a JSON number; bool is an int subclass in Python (catalog F2).
    return type(v) is int or type(v) is float


cdef double _as_double(object v) except? -1.0:
    # PyFloat_AsDouble on an int would allocate a float first; go straight to the C value.
    cdef long long i
    cdef int overflow = 0
    if type(v) is float:
        return PyFloat_AS_DOUBLE(v)
    i = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow == 0:
        return <double>i
    return PyLong_AsDouble(v)  # beyond 64 bits (orjson gives up to u64)


@cython.final
cdef class Verifier:
    """Verifies JWTs of one issuer (one provider)."""
    cdef str _issuer
    cdef str _name
    cdef frozenset _audiences
    cdef dict _aud_intern
    cdef unsigned int _allowed
    cdef double _skew
    cdef double _max_lifetime     # < 0: not configured
    cdef tuple _require
    cdef frozenset _typ            # allowed typ values as canonical media types; None: unchecked
    cdef TokenCache _cache
    cdef Py_ssize_t _max_bytes
    cdef bint _secret_mode
    cdef list _keys
    # Key generation: bumped whenever the key set's content or order changes, so negative-cache
    # entries of an older key set are never served (a key change can make a token valid).
    cdef unsigned long long _gen
    cdef tuple _fps               # the key set in force, as fingerprints in JWKS order
    cdef dict _by_kid
    cdef tuple _kidless            # per alg code: tuple of at most MAX_KIDLESS_KEYS keys
    cdef dict _by_fp

    def __cinit__(self, *args, **kwargs):
        # Safe empty state even if __init__ never runs (Verifier.__new__): verify() then
        # answers jwks_unavailable / issuer_unknown instead of touching a None field.
        self._issuer = ""
        self._name = ""
        self._audiences = frozenset()
        self._aud_intern = {}
        self._require = ()
        self._cache = TokenCache(0)
        self._max_bytes = 8192
        self._max_lifetime = -1.0
        self._keys = []
        self._by_kid = {}
        self._by_fp = {}
        self._kidless = ((),) * A_COUNT
        self._fps = ()

    def __init__(self, issuer, audiences=None, jwks=None, secret=None, algorithms=None,
                 clock_skew=60, require=("exp",), max_lifetime=None, cache_size=100_000, *,
                 cache=None, max_token_bytes=8192, name=None, typ=None):
        cdef unsigned int mask
        cdef _Key key
        if type(issuer) is not str or not issuer:
            raise ValueError("issuer must be a non-empty string")
        self._issuer = issuer
        self._name = issuer if name is None else str(name)
        # An empty audience list means "not configured" (aud is then not matched).
        self._audiences = _str_set(audiences, "audiences")
        self._aud_intern = {a: a for a in self._audiences}
        if jwks is not None and secret is not None:
            raise ValueError("give either jwks or secret, not both")
        if secret is not None:
            if not isinstance(secret, (bytes, bytearray)):
                raise ValueError("secret must be bytes")
            secret = bytes(secret)
        skew = float(clock_skew)
        if not isfinite(skew) or skew < 0:
            raise ValueError("clock_skew must be a finite number >= 0")
        self._skew = skew
        if max_lifetime is None:
            self._max_lifetime = -1.0
        else:
            lifetime = float(max_lifetime)
            if not isfinite(lifetime) or lifetime <= 0:
                raise ValueError("max_lifetime must be a finite number > 0")
            self._max_lifetime = lifetime
        self._require = tuple(sorted(_str_set(require, "require")))
        self._typ = _typ_set(typ)
        if type(max_token_bytes) is bool or not isinstance(max_token_bytes, int) \
                or max_token_bytes <= 0:
            raise ValueError("max_token_bytes must be a positive int")
        self._max_bytes = max_token_bytes
        if cache is not None:
            if not isinstance(cache, TokenCache):
                raise ValueError("cache must be a TokenCache")
            self._cache = cache
        else:
            self._cache = TokenCache(cache_size)

        if algorithms is not None:
            mask = _parse_algorithms(algorithms)
            if mask & _HMAC_MASK and mask & _ASYM_MASK:
                raise ValueError("algorithms mix HS* and asymmetric algorithms (key confusion, "
                                 "RFC 8725 §3.1)")
            if mask & _HMAC_MASK and secret is None:
                raise ValueError("HS* algorithms need a secret (never a JWKS)")
            if mask & _ASYM_MASK and secret is not None:
                raise ValueError("a secret only verifies HS* algorithms")
        elif secret is not None:
            mask = 0
            for code in (A_HS256, A_HS384, A_HS512):
                if len(secret) >= _HLEN[code]:
                    mask |= _bit(code)
            if mask == 0:
                raise ValueError("secret is shorter than 32 bytes (RFC 7518 §3.2)")
        else:
            mask = _ASYM_MASK
        self._allowed = mask

        self._keys = []
        self._by_kid = {}
        self._by_fp = {}
        self._kidless = ((),) * A_COUNT
        if secret is not None:
            for code in range(A_HS256, A_HS512 + 1):
                if mask & _bit(code) and len(secret) < _HLEN[code]:
                    raise ValueError(f"secret is shorter than the {_ALG_NAMES[code]} hash "
                                     "(RFC 7518 §3.2)")
            key = _Key.__new__(_Key)
            key.pub = secret
            key.hmacs = _hmac_states(secret, mask)
            key.mask = mask
            key.alive = True
            self._secret_mode = True
            self._keys = [key]
            self._kidless = tuple((key,) if mask & _bit(c) else () for c in range(A_COUNT))
        elif jwks is not None:
            self.set_jwks(jwks)

    def set_jwks(self, jwks):
        """Replace the key set (see the .pyi). Keys whose public material and binding did not
        change keep their prepared object, so their cached tokens stay warm; every other old key
        is marked dead at once, so cached tokens it verified stop hitting."""
        cdef _Key key
        cdef KeyReport report
        cdef list kidless
        if self._secret_mode:
            raise ValueError("this verifier uses a secret; it has no JWKS")
        keys, skipped = _load_keys(jwks, False, dict(self._by_fp))
        by_kid = {}
        by_fp = {}
        kidless = [[] for _ in range(A_COUNT)]
        for key in keys:
            if key.kid is not None:
                by_kid[key.kid] = key
            by_fp[key.fingerprint] = key
            # catalog C7: a kid-less token tries at most MAX_KIDLESS_KEYS keys, in JWKS order.
            for code in range(A_COUNT):
                if key.mask & _bit(code) and len(kidless[code]) < _MAX_KIDLESS:
                    kidless[code].append(key)
        for fp, old in self._by_fp.items():
            if by_fp.get(fp) is not old:
                (<_Key>old).alive = False
        self._keys = keys
        self._by_kid = by_kid
        self._by_fp = by_fp
        self._kidless = tuple(tuple(k) for k in kidless)
        # A refresh that yields the very same keys in the same order keeps the generation
        # (and so the negative cache); anything else starts a new one.
        fps = tuple([(<_Key>k).fingerprint for k in keys])
        if fps != self._fps:
            self._fps = fps
            self._gen += 1
        report = KeyReport.__new__(KeyReport)
        report._loaded = len(keys)
        report._skipped = skipped
        report._kids = frozenset(by_kid)
        return report

    def verify(self, token, now=None):
        """Verify one token (str or bytes). Never raises: every outcome is a Result."""
        try:
            return _run(self, None, token, now)
        except Exception:
            return _fail(R_TOKEN_MALFORMED, D_INTERNAL)

    def has_kid(self, kid):
        return kid in self._by_kid

    @property
    def name(self):
        return self._name

    @property
    def issuer(self):
        return self._issuer

    @property
    def audiences(self):
        return self._audiences

    @property
    def algorithms(self):
        return _mask_names(self._allowed)

    @property
    def typ(self):
        return self._typ

    @property
    def has_keys(self):
        # Usable keys now (or a secret): an emptied key set (IdP down past max_stale) is
        # "cannot verify", answered jwks_unavailable (503, SPEC §4), not the client's fault.
        return len(self._keys) > 0

    @property
    def key_count(self):
        return len(self._keys)

    @property
    def cache(self):
        return self._cache

    def __repr__(self):
        return f"<Verifier {self._name!r} issuer={self._issuer!r} keys={len(self._keys)}>"


@cython.final
cdef class IssuerSet:
    """Selects the verifier by the token's (unverified) ``iss`` and verifies with it."""
    cdef dict _by_iss
    cdef TokenCache _cache
    cdef frozenset _audiences       # None: each verifier's own audiences
    cdef unsigned int _allowed      # union of the verifiers' allow-lists
    cdef Py_ssize_t _max_bytes

    def __cinit__(self, *args, **kwargs):
        self._by_iss = {}
        self._cache = TokenCache(0)
        self._max_bytes = 8192

    def __init__(self, verifiers, cache, audiences=None):
        cdef Verifier v
        if not isinstance(cache, TokenCache):
            raise ValueError("cache must be a TokenCache")
        self._cache = cache
        self._by_iss = {}
        self._allowed = 0
        self._max_bytes = 0
        for item in verifiers:
            if not isinstance(item, Verifier):
                raise ValueError("IssuerSet takes Verifier objects")
            v = <Verifier>item
            if v._issuer in self._by_iss:
                raise ValueError(f"two verifiers for issuer {v._issuer!r}")
            self._by_iss[v._issuer] = v
            self._allowed |= v._allowed
            if v._max_bytes > self._max_bytes:
                self._max_bytes = v._max_bytes
        if self._max_bytes == 0:
            self._max_bytes = 8192
        auds = _str_set(audiences, "audiences")
        self._audiences = auds if auds else None

    def verify(self, token, now=None):
        """Verify one token (str or bytes). Never raises: every outcome is a Result."""
        try:
            return _run(None, self, token, now)
        except Exception:
            return _fail(R_TOKEN_MALFORMED, D_INTERNAL)

    def verifier_for(self, issuer):
        return self._by_iss.get(issuer)

    def __repr__(self):
        return f"<IssuerSet issuers={sorted(self._by_iss)!r}>"
