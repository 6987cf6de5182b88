# Included by _verify.pyx (one extension module: see its docstring). The request path:
# size and segment checks, cache lookups, header -> issuer -> key -> signature (_run, _neg_hit,
# _full), and what a bad signature leaves in the negative cache.

# ---------------------------------------------------------------------------------------------
# The request path


cdef Result _run(Verifier single, IssuerSet iset, object token, object now_obj):
    cdef bytes tok
    cdef Py_ssize_t n
    cdef Py_ssize_t maxb = single._max_bytes if single is not None else iset._max_bytes
    cdef double now
    cdef TokenCache cache
    cdef _Entry e
    cdef Verifier v
    cdef frozenset auds
    cdef Result r
    cdef PyObject* found
    cdef bint ok
    # 1. Size before anything else (SPEC §3 step 2, catalog §0 rule 1).
    if type(token) is bytes:
        tok = <bytes>token
    elif type(token) is str:
        if len(<str>token) > maxb:
            return _fail(R_TOKEN_TOO_LARGE, D_SIZE)
        if not (<str>token).isascii():
            return _fail(R_TOKEN_MALFORMED, D_ASCII)
        tok = (<str>token).encode("ascii")
    elif isinstance(token, bytes):
        tok = bytes(token)
    else:
        return _fail(R_TOKEN_MALFORMED, D_TYPE)
    n = PyBytes_GET_SIZE(tok)
    if n > maxb:
        return _fail(R_TOKEN_TOO_LARGE, D_SIZE)
    if n == 0:
        return _fail(R_TOKEN_MALFORMED, D_EMPTY)
    if now_obj is None:
        now = _clock()
    else:
        now = _as_double(now_obj)
        if not isfinite(now):
            raise ValueError("now must be finite")

    cache = single._cache if single is not None else iset._cache
    if cache._max > 0 and n <= _MAX_CACHED:
        e = cache._get(tok)
        if e is not None:
            # A hit re-checks everything that can change after verification: the key (JWKS
            # refresh), the time window, the verifier this route would pick and the audiences
            # in force, so a cached result never admits what a fresh verify would reject.
            v = e.verifier
            if single is not None:
                ok = v is single
                auds = v._audiences
            else:
                found = PyDict_GetItem(iset._by_iss, v._issuer)
                ok = found != NULL and <object>found is v and n <= v._max_bytes
                auds = iset._audiences if iset._audiences is not None else v._audiences
            # typ: the entry's verifier is the one in force (checked above) and its typ list
            # never changes, so this holds by construction; it is re-checked anyway (a pointer
            # compare when no typ is configured) so a hit can never skip RFC 9068 §4.
            if (ok and e.key.alive and e.not_before <= now < e.expires
                    and _aud_match(e.aud, auds)
                    and (not e.kidless or e.key in <tuple>v._kidless[e.hdr.alg])
                    and (v._typ is None or _typ_ok(v, e.hdr))):
                cache._touch(e)
                cache._hits += 1
                r = Result.__new__(Result)
                r._code = R_OK
                r._detail = D_CACHED
                r._cached = True
                r._claims = e.claims
                r._payload = e.claims
                r._header = e.hdr.header
                r._kid = e.hdr.kid
                r._alg = e.hdr.alg_name
                r._issuer = v._issuer
                r._verifier = v
                return r
            cache._drop(e)  # fall through to a full verify for the exact reason
    if cache._neg_max > 0 and n <= _MAX_CACHED:
        found = PyDict_GetItem(cache._neg, tok)
        if found != NULL:
            r = _neg_hit(single, iset, <_Neg>found, tok, n, now)
            if r is not None:
                cache._neg_hits += 1
                return r
            del cache._neg[tok]  # stale (keys changed, or another verifier): verify afresh
    if cache._max > 0 and n <= _MAX_CACHED:
        cache._misses += 1
    return _full(single, iset, tok, n, now, cache)


cdef Result _neg_hit(Verifier single, IssuerSet iset, _Neg ne, bytes tok, Py_ssize_t n,
                     double now):
    """The remembered reject, or None when it may no longer hold (the caller then drops the
    entry and verifies afresh).

    Everything up to and including the signature is a function of the token bytes, the
    verifier (its configuration is immutable: allow-list, typ, size limit) and its key set
    (kid lookup, binding, kid-less candidates in JWKS order): so a signature_invalid entry
    holds while this Verifier / IssuerSet would pick the same verifier and that verifier's key
    generation is unchanged. Time plays no part there: the signature is checked before
    exp/nbf. A time reject additionally holds only while its bound still fails at ``now``,
    computed exactly as _check_claims does: exp is checked first (RFC 7519 §4.1.4), so
    "expired" is decided by exp + skew alone; "not yet valid" (§4.1.5) needs the token not
    expired and its nbf (or iat) still beyond now + skew. Route audiences are checked after
    the time window, so they cannot change either answer."""
    cdef Verifier v = ne.verifier
    cdef PyObject* found
    cdef Result r
    if single is not None:
        if v is not single:
            return None
    else:
        found = PyDict_GetItem(iset._by_iss, v._issuer)
        if found == NULL or <object>found is not v or n > v._max_bytes:
            return None
    if ne.gen != v._gen:
        return None
    if ne.code == R_TOKEN_EXPIRED:
        if not (now >= ne.expires):
            return None  # the clock went back (or a test's `now`): verify for the exact answer
    elif ne.code == R_TOKEN_NOT_YET_VALID:
        if now >= ne.expires or not (ne.early > now + v._skew):
            return None  # nbf/iat has passed: a full verify may accept it now
    r = Result.__new__(Result)
    r._code = ne.code
    r._detail = D_CACHED_REJECT
    r._cached = True
    r._kid = ne.kid
    r._alg = _ALG_NAMES[ne.alg]
    r._issuer = v._issuer
    r._verifier = v
    r._lazy = tok
    r._d1 = ne.d1
    r._d2 = ne.d2
    return r


cdef Result _full(Verifier single, IssuerSet iset, bytes tok, Py_ssize_t n, double now,
                  TokenCache cache):
    global _LAST_HSEG, _LAST_HDR
    cdef const char* p = PyBytes_AS_STRING(tok)
    cdef const char* q
    cdef Py_ssize_t d1, d2
    cdef _Header hdr = None
    cdef PyObject* found
    cdef Result r = Result.__new__(Result)
    cdef int alg
    cdef Verifier v
    cdef _Key key = None
    cdef tuple candidates = None
    cdef frozenset auds
    cdef _Entry e
    cdef double not_before = -INFINITY
    cdef double expires = INFINITY
    cdef int code

    # 2. Exactly three segments (RFC 7515 §7.1). memchr, never a split: a flood of dots costs
    # O(1) memory (golang-jwt CVE-2025-30204); a JWE's 5 segments end here (catalog A12).
    q = <const char*>memchr(p, 46, n)
    if q == NULL:
        return _set(r, R_TOKEN_MALFORMED, D_SEGMENTS)
    d1 = q - p
    q = <const char*>memchr(p + d1 + 1, 46, n - d1 - 1)
    if q == NULL:
        return _set(r, R_TOKEN_MALFORMED, D_SEGMENTS)
    d2 = q - p
    if memchr(p + d2 + 1, 46, n - d2 - 1) != NULL:
        return _set(r, R_TOKEN_MALFORMED, D_SEGMENTS)
    if d2 == d1 + 1:  # detached content (RFC 7515 App. F) is not a JWT (catalog A15)
        return _set(r, R_TOKEN_MALFORMED, D_EMPTY_PAYLOAD)

    # 3. Strict base64url of every segment before any JSON.
    hraw = None
    if _LAST_HDR is not None and d1 == PyBytes_GET_SIZE(_LAST_HSEG) \
            and memcmp(p, PyBytes_AS_STRING(_LAST_HSEG), d1) == 0:
        hdr = _LAST_HDR
    else:
        hseg = PyBytes_FromStringAndSize(p, d1)
        found = PyDict_GetItem(_HDR_CACHE, hseg)
        if found != NULL:
            hdr = <_Header>found
            _LAST_HSEG = hseg
            _LAST_HDR = hdr
        else:
            hraw = _b64d(<const unsigned char*>p, d1)
            if hraw is None:
                return _set(r, R_TOKEN_MALFORMED, D_B64)
    praw = _b64d(<const unsigned char*>p + d1 + 1, d2 - d1 - 1)
    if praw is None:
        return _set(r, R_TOKEN_MALFORMED, D_B64)
    sig = _b64d(<const unsigned char*>p + d2 + 1, n - d2 - 1)
    if sig is None:
        return _set(r, R_TOKEN_MALFORMED, D_B64)

    # 4. Header JSON (cached when it passed every structural check).
    if hdr is None:
        hdr = _parse_header(<bytes>hraw)
        if hdr.code != R_OK:
            r._header = hdr.header
            return _set(r, hdr.code, hdr.detail)
        if len(_HDR_CACHE) >= _HDR_CACHE_MAX:
            _HDR_CACHE.clear()  # bounded: a flood of distinct headers only costs re-parsing
        _HDR_CACHE[hseg] = hdr
        _LAST_HSEG = hseg
        _LAST_HDR = hdr
    r._header = hdr.header
    r._alg = hdr.alg_name
    r._kid = hdr.kid

    # 5. Payload JSON: an object, strict UTF-8, no NaN/Infinity, no duplicate names (orjson
    # rejects the rest: lone surrogates, BOM, depth > 1024, trailing bytes, 1e400).
    try:
        claims = _loads(praw)
    except _JSONDecodeError:
        return _set(r, R_TOKEN_MALFORMED, D_PAYLOAD_JSON)
    if type(claims) is not dict:
        return _set(r, R_TOKEN_MALFORMED, D_PAYLOAD_OBJ)
    detail = _json_shape(<bytes>praw, claims)
    if detail is not None:
        return _set(r, R_TOKEN_MALFORMED, detail)
    r._payload = claims

    # 6. alg: from the allow-list only, never "none" (RFC 8725 §3.1, §2.1).
    alg = hdr.alg
    if alg == A_BAD:
        return _set(r, R_TOKEN_MALFORMED, D_ALG_MISSING)
    if alg == A_NONE:
        return _set(r, R_ALG_NOT_ALLOWED, D_ALG_NONE)
    if alg < 0 or not ((single._allowed if single is not None else iset._allowed) & _bit(alg)):
        return _set(r, R_ALG_NOT_ALLOWED, D_ALG)

    # 7. Issuer: exact code-point equality, no normalisation (PyJWT CVE-2024-53861).
    found = PyDict_GetItem(<dict>claims, "iss")
    iss = <object>found if found != NULL else None
    if type(iss) is not str:
        return _set(r, R_ISSUER_UNKNOWN, D_ISSUER)
    r._issuer = iss
    if single is not None:
        if iss != single._issuer:
            return _set(r, R_ISSUER_UNKNOWN, D_ISSUER)
        v = single
        auds = v._audiences
    else:
        found = PyDict_GetItem(iset._by_iss, iss)
        if found == NULL:
            return _set(r, R_ISSUER_UNKNOWN, D_ISSUER)
        v = <Verifier>found
        r._verifier = v
        if n > v._max_bytes:
            return _set(r, R_TOKEN_TOO_LARGE, D_SIZE)
        if not (v._allowed & _bit(alg)):
            return _set(r, R_ALG_NOT_ALLOWED, D_ALG)
        auds = iset._audiences if iset._audiences is not None else v._audiences
    r._verifier = v
    # typ: RFC 9068 §4 (an access token is "at+jwt") and RFC 8725 §3.11 (explicit typing keeps
    # one kind of JWT from being accepted as another, e.g. an ID token as an access token).
    # Only when the provider lists types; an absent typ then fails too. A header property,
    # like alg, so it is decided before any key work or signature.
    if v._typ is not None and not _typ_ok(v, hdr):
        return _set(r, R_TOKEN_TYPE_INVALID, D_TYP)
    # No usable key right now (never loaded, or dropped past max_stale): the server cannot
    # verify anything, which is not the client's fault -> 503 + Retry-After (SPEC §4).
    if not v._keys:
        return _set(r, R_JWKS_UNAVAILABLE, D_NO_KEYS)

    # 8. kid, then the key: an exact dict lookup in this issuer's keys (catalog C1-C8).
    if hdr.kid_detail is not None:
        return _set(r, R_TOKEN_MALFORMED, hdr.kid_detail)
    if v._secret_mode:
        key = <_Key>v._keys[0]  # the configured secret is the only key; kid names nothing
    elif hdr.kid is not None:
        found = PyDict_GetItem(v._by_kid, hdr.kid)
        if found == NULL:
            return _set(r, R_KEY_NOT_FOUND, D_KID_UNKNOWN)
        key = <_Key>found
    else:
        candidates = <tuple>v._kidless[alg]
        if not candidates:
            return _set(r, R_KEY_NOT_FOUND, D_NO_KEY_FOR_ALG)
    # 9. The token's alg must fit the key: kty, crv, the JWK's alg (catalog B3-B8).
    if key is not None and not (key.mask & _bit(alg)):
        return _set(r, R_ALG_NOT_ALLOWED, D_BINDING)

    # 10. Signature over the received ASCII bytes "H.P" exactly (catalog D10).
    signing_input = PyBytes_FromStringAndSize(p, d2)
    if key is not None:
        if not _verify_sig(key, alg, signing_input, <bytes>sig):
            return _bad_sig(r, cache, tok, n, v, hdr, d1, d2)
    else:
        for k in candidates:
            if _verify_sig(<_Key>k, alg, signing_input, <bytes>sig):
                key = <_Key>k
                break
        if key is None:
            return _bad_sig(r, cache, tok, n, v, hdr, d1, d2)

    # 11. Claims (RFC 7519 §4.1).
    code = _check_claims(v, <dict>claims, now, auds, r, &not_before, &expires)
    if code != R_OK:
        # A validly signed token outside its time window: remember it like a bad signature, so
        # a client replaying an expired token costs a dict lookup, not a signature (W3). Only
        # the pure time checks (exp, nbf, iat): their answer is a function of the clock and
        # the bound, re-checked on every hit (_neg_hit). A max_lifetime reject without iat
        # depends on the clock the other way (exp - now shrinks) and is never stored.
        if cache._neg_max > 0 and n <= _MAX_CACHED:
            if code == R_TOKEN_EXPIRED and r._detail is D_EXP:
                cache._neg_put(tok, v, hdr.kid, alg, d1, d2, code, expires, INFINITY)
            elif code == R_TOKEN_NOT_YET_VALID:
                early = (<dict>claims)["nbf" if r._detail is D_NBF else "iat"]
                cache._neg_put(tok, v, hdr.kid, alg, d1, d2, code, expires, _as_double(early))
        return _set(r, code, r._detail)
    r._code = R_OK
    r._detail = D_OK
    r._claims = claims

    if cache._max > 0 and n <= _MAX_CACHED:
        e = _Entry.__new__(_Entry)
        e.verifier = v
        e.key = key
        e.hdr = hdr
        # Store nothing twice: iss becomes the verifier's own (equal) str object, and an aud
        # equal to a configured audience becomes that configured str object.
        (<dict>claims)["iss"] = v._issuer
        aud = (<dict>claims).get("aud")
        if type(aud) is str:
            found = PyDict_GetItem(v._aud_intern, aud)
            if found != NULL:
                aud = <object>found
                (<dict>claims)["aud"] = aud
        _share_values(<dict>claims)
        e.claims = claims
        # an aud array is copied to a tuple: editing the returned claims cannot widen a later hit
        e.aud = tuple(<list>aud) if type(aud) is list else aud
        e.not_before = not_before
        e.expires = expires
        e.kidless = candidates is not None
        cache._put(tok, e)
    return r


cdef inline bint _typ_ok(Verifier v, _Header hdr) except -1:
    """The header's typ is one the provider allows (``v._typ`` is not None)."""
    return hdr.typ is not None and PySet_Contains(v._typ, hdr.typ) == 1


cdef Result _bad_sig(Result r, TokenCache cache, bytes tok, Py_ssize_t n, Verifier v,
                     _Header hdr, Py_ssize_t d1, Py_ssize_t d2):
    # Remember the reject (never in the verified-token LRU): a replayed bad token then costs a
    # dict lookup instead of a signature check (W3). Large tokens are never stored.
    if cache._neg_max > 0 and n <= _MAX_CACHED:
        cache._neg_put(tok, v, hdr.kid, hdr.alg, d1, d2, R_SIGNATURE_INVALID, INFINITY,
                       INFINITY)
    return _set(r, R_SIGNATURE_INVALID, D_SIGNATURE)
