# Included by _verify.pyx (one extension module: see its docstring). verify_jws: format,
# alg/key binding and signature only, for test vectors whose payload is not a claim set.

# ---------------------------------------------------------------------------------------------
# JWS only (test vectors whose payload is not a claim set)


def verify_jws(token, jwk_or_jwks, algorithms=None):
    """Format, alg/key binding and signature only (see the .pyi). Raises ValueError only for a
    bad ``jwk_or_jwks`` / ``algorithms`` argument, never for a bad token."""
    cdef unsigned int allowed = _ALL_MASK if algorithms is None else _parse_algorithms(algorithms)
    cdef list keys
    cdef bint single_jwk
    if not isinstance(jwk_or_jwks, _Mapping):
        raise ValueError("jwk_or_jwks must be a JWK or a JWKS object")
    single_jwk = "keys" not in jwk_or_jwks
    doc = {"keys": [jwk_or_jwks]} if single_jwk else jwk_or_jwks
    keys = _load_keys(doc, True, None)[0]
    if not single_jwk and _mixed_symmetry(doc):
        # A set holding both a shared secret and public keys invites key confusion (RFC 8725
        # §2.1, §3.1; Wycheproof MixedKeySet: "best practice is to reject"): no key of it is
        # used, so every token gets key_not_found.
        keys = []
    try:
        return _REASONS[_jws_only(token, keys, allowed, single_jwk)]
    except Exception:
        return _REASONS[R_TOKEN_MALFORMED]


cdef bint _mixed_symmetry(object doc) except -1:
    """Whether a JWKS names both oct (symmetric) and asymmetric keys, usable or not."""
    cdef bint sym = False
    cdef bint asym = False
    entries = doc.get("keys")
    if type(entries) is not list and type(entries) is not tuple:
        return False
    for jwk in entries:
        if isinstance(jwk, _Mapping):
            kty = jwk.get("kty")
            if kty == "oct":
                sym = True
            elif kty == "RSA" or kty == "EC" or kty == "OKP":
                asym = True
    return sym and asym


cdef int _jws_only(object token, list keys, unsigned int allowed, bint single_jwk) except -1:
    cdef bytes tok
    cdef const char* p
    cdef const char* q
    cdef Py_ssize_t n, d1, d2
    cdef _Key key = None
    cdef _Header hdr
    cdef int alg
    if type(token) is str:
        if not (<str>token).isascii():
            return R_TOKEN_MALFORMED
        tok = (<str>token).encode("ascii")
    elif isinstance(token, bytes):
        tok = bytes(token)
    else:
        return R_TOKEN_MALFORMED
    n = PyBytes_GET_SIZE(tok)
    p = PyBytes_AS_STRING(tok)
    q = <const char*>memchr(p, 46, n)
    if q == NULL:
        return R_TOKEN_MALFORMED
    d1 = q - p
    q = <const char*>memchr(p + d1 + 1, 46, n - d1 - 1)
    if q == NULL:
        return R_TOKEN_MALFORMED
    d2 = q - p
    # An empty payload segment is allowed here: a JWS payload is arbitrary octets, the empty
    # sequence included (RFC 7515 §7.1; Wycheproof emptyPayload). Only the JWT path refuses it
    # (detached content / not a claim set, catalog A15).
    if memchr(p + d2 + 1, 46, n - d2 - 1) != NULL:
        return R_TOKEN_MALFORMED
    hraw = _b64d(<const unsigned char*>p, d1)
    praw = _b64d(<const unsigned char*>p + d1 + 1, d2 - d1 - 1)
    sig = _b64d(<const unsigned char*>p + d2 + 1, n - d2 - 1)
    if hraw is None or praw is None or sig is None:
        return R_TOKEN_MALFORMED
    hdr = _parse_header(<bytes>hraw)
    if hdr.code != R_OK:
        return hdr.code
    alg = hdr.alg
    if alg == A_BAD:
        return R_TOKEN_MALFORMED
    if alg < 0 or not (allowed & _bit(alg)):
        return R_ALG_NOT_ALLOWED
    if hdr.kid_detail is not None:
        return R_TOKEN_MALFORMED
    signing_input = PyBytes_FromStringAndSize(p, d2)
    if hdr.kid is not None:
        for k in keys:
            # a single JWK handed in without a kid is the key, whatever the token's kid says
            if (<_Key>k).kid == hdr.kid or (single_jwk and (<_Key>k).kid is None):
                key = <_Key>k
                break
        if key is None:
            return R_KEY_NOT_FOUND
        if not (key.mask & _bit(alg)):
            return R_ALG_NOT_ALLOWED
        return R_OK if _verify_sig(key, alg, signing_input, <bytes>sig) else R_SIGNATURE_INVALID
    candidates = [k for k in keys if (<_Key>k).mask & _bit(alg)][:_MAX_KIDLESS]
    if not candidates:
        return R_ALG_NOT_ALLOWED if keys else R_KEY_NOT_FOUND
    for k in candidates:
        if _verify_sig(<_Key>k, alg, signing_input, <bytes>sig):
            return R_OK
    return R_SIGNATURE_INVALID
