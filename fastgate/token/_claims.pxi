# Included by _verify.pyx (one extension module: see its docstring). The claim checks of a
# validly signed token (exp/nbf/iat with skew, aud, required claims, lifetime; SPEC §3.4) and
# the values cached claim sets share.

# Values that repeat across the tokens of a client are stored once instead of once per cached
# token: the scope string (compared with the last one cached: a memcmp, no hashing), and nbf,
# which is usually the same number as iat.
cdef object _LAST_SCOPE = None


cdef int _share_values(dict claims) except -1:
    global _LAST_SCOPE
    cdef PyObject* found = PyDict_GetItem(claims, "scope")
    cdef PyObject* iat
    if found != NULL and type(<object>found) is str:
        if _LAST_SCOPE is not None and <object>found is not _LAST_SCOPE \
                and <str><object>found == <str>_LAST_SCOPE:
            claims["scope"] = _LAST_SCOPE
        else:
            _LAST_SCOPE = <object>found
    found = PyDict_GetItem(claims, "nbf")
    if found != NULL and type(<object>found) is int:
        iat = PyDict_GetItem(claims, "iat")
        if iat != NULL and found != iat and type(<object>iat) is int \
                and <object>found == <object>iat:
            claims["nbf"] = <object>iat
    return 0


cdef int _check_claims(Verifier v, dict claims, double now, frozenset auds, Result r,
                       double* not_before, double* expires) except -1:
    cdef PyObject* found
    cdef double exp = 0, nbf = 0, iat = 0
    cdef bint has_exp = False, has_nbf = False, has_iat = False
    cdef double skew = v._skew
    # Types first: NumericDate is a finite JSON number, never a bool or a string (catalog F2).
    found = PyDict_GetItem(claims, "exp")
    if found != NULL:
        if not _is_number(<object>found):
            r._detail = D_EXP_TYPE
            return R_CLAIM_MISSING
        exp = _as_double(<object>found)
        if not isfinite(exp):
            r._detail = D_EXP_TYPE
            return R_CLAIM_MISSING
        has_exp = True
    found = PyDict_GetItem(claims, "nbf")
    if found != NULL:
        if not _is_number(<object>found):
            r._detail = D_NBF_TYPE
            return R_CLAIM_MISSING
        nbf = _as_double(<object>found)
        if not isfinite(nbf):
            r._detail = D_NBF_TYPE
            return R_CLAIM_MISSING
        has_nbf = True
    found = PyDict_GetItem(claims, "iat")
    if found != NULL:
        if not _is_number(<object>found):
            r._detail = D_IAT_TYPE
            return R_CLAIM_MISSING
        iat = _as_double(<object>found)
        if not isfinite(iat):
            r._detail = D_IAT_TYPE
            return R_CLAIM_MISSING
        has_iat = True
    # RFC 7519 §4.1.2/§4.1.7: StringOrURI; they reach upstream headers (catalog F9).
    found = PyDict_GetItem(claims, "sub")
    if found != NULL and type(<object>found) is not str:
        r._detail = D_SUB_TYPE
        return R_TOKEN_MALFORMED
    found = PyDict_GetItem(claims, "jti")
    if found != NULL and type(<object>found) is not str:
        r._detail = D_JTI_TYPE
        return R_TOKEN_MALFORMED
    # RFC 7519 §4.1.3: a string or a non-empty array of strings (golang-jwt CVE-2020-26160).
    found = PyDict_GetItem(claims, "aud")
    aud = <object>found if found != NULL else None
    if found != NULL and type(aud) is not str:
        if type(aud) is not list or not aud:
            r._detail = D_AUD_TYPE
            return R_TOKEN_MALFORMED
        for a in <list>aud:
            if type(a) is not str:
                r._detail = D_AUD_TYPE
                return R_TOKEN_MALFORMED
    # RFC 7519 §4.1.4: exp is exclusive, expired once now >= exp (+ skew).
    if has_exp:
        expires[0] = exp + skew
        if now >= expires[0]:
            r._detail = D_EXP
            return R_TOKEN_EXPIRED
    # RFC 7519 §4.1.5: not before nbf; an iat in the future is not valid yet either.
    if has_nbf:
        not_before[0] = nbf - skew
        if nbf > now + skew:
            r._detail = D_NBF
            return R_TOKEN_NOT_YET_VALID
    if has_iat:
        if iat - skew > not_before[0]:
            not_before[0] = iat - skew
        if iat > now + skew:
            r._detail = D_IAT
            return R_TOKEN_NOT_YET_VALID
    if not _aud_match(aud, auds):
        r._detail = D_AUD
        return R_AUDIENCE_MISMATCH
    for name in v._require:
        if PyDict_GetItem(claims, name) == NULL:
            r._detail = D_REQUIRED
            return R_CLAIM_MISSING
    if v._max_lifetime >= 0:
        # A token that outlives the allowed lifetime is treated as expired: the issuer gave
        # it more time than this provider allows (Envoy max_lifetime, catalog F5).
        if not has_exp:
            r._detail = D_LIFETIME_EXP
            return R_CLAIM_MISSING
        if has_iat:
            if exp - iat > v._max_lifetime:
                r._detail = D_LIFETIME
                return R_TOKEN_EXPIRED
        else:
            if exp - now > v._max_lifetime:
                r._detail = D_LIFETIME
                return R_TOKEN_EXPIRED
            # the same bound, as a time, so a cache hit re-checks it (now only grows)
            if exp - v._max_lifetime > not_before[0]:
                not_before[0] = exp - v._max_lifetime
    return R_OK
