# Included by _verify.pyx (one extension module: see its docstring). JOSE decoding before any
# key is involved: strict base64url, duplicate JSON members and nesting depth, and the parsed,
# cached JWS header (_Header).

# ---------------------------------------------------------------------------------------------
# Strict base64url (RFC 7515 §2 = RFC 4648 §5 without padding), with a 256-entry table.

cdef unsigned char _B64[256]


cdef void _init_b64() noexcept:
    cdef int i
    cdef const char* alphabet = (
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    for i in range(256):
        _B64[i] = 0xFF
    for i in range(64):
        _B64[<unsigned char>alphabet[i]] = <unsigned char>i


_init_b64()


cdef object _b64d(const unsigned char* s, Py_ssize_t n):
    """Decode strictly; None for any character outside [A-Za-z0-9_-] (so no '=', '+', '/',
    whitespace), a length of 1 mod 4, or non-zero unused trailing bits (a non-canonical
    encoding, catalog A9)."""
    cdef Py_ssize_t rem = n & 3
    cdef Py_ssize_t full = n >> 2
    cdef Py_ssize_t i
    cdef unsigned int a, b, c, d, acc
    cdef unsigned int bad = 0
    cdef unsigned char* o
    if rem == 1:
        return None
    out = PyBytes_FromStringAndSize(NULL, full * 3 + (rem - 1 if rem else 0))
    o = <unsigned char*>PyBytes_AS_STRING(out)
    for i in range(full):
        a = _B64[s[0]]
        b = _B64[s[1]]
        c = _B64[s[2]]
        d = _B64[s[3]]
        bad |= a | b | c | d
        acc = (a << 18) | (b << 12) | (c << 6) | d
        o[0] = <unsigned char>(acc >> 16)
        o[1] = <unsigned char>(acc >> 8)
        o[2] = <unsigned char>acc
        s += 4
        o += 3
    if rem == 2:
        a = _B64[s[0]]
        b = _B64[s[1]]
        bad |= a | b | ((b & 0x0F) << 6)  # 4 unused bits must be zero
        o[0] = <unsigned char>((a << 2) | (b >> 4))
    elif rem == 3:
        a = _B64[s[0]]
        b = _B64[s[1]]
        c = _B64[s[2]]
        bad |= a | b | c | ((c & 0x03) << 6)  # 2 unused bits must be zero
        o[0] = <unsigned char>((a << 2) | (b >> 4))
        o[1] = <unsigned char>((b << 4) | (c >> 2))
    # valid sextets are < 64, so any bit at or above 0x40 marks a bad character or bits
    if bad & 0xFFC0:
        return None
    return out


cdef object _b64d_str(object value):
    """Strict base64url of a JWK member (a str); None if it is not one."""
    if type(value) is not str or not (<str>value).isascii():
        return None
    raw = (<str>value).encode("ascii")
    return _b64d(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))

# ---------------------------------------------------------------------------------------------
# Duplicate member names (RFC 7515 §5.2 step 4, RFC 7519 §4; catalog B14/E3). orjson keeps the
# last duplicate silently, so compare the number of name separators in the raw text (in valid
# JSON every ':' outside a string is one) with the members the parsed value actually has.

cdef Py_ssize_t _count_colons(const unsigned char* s, Py_ssize_t n) noexcept:
    """':' outside strings. Called only on text orjson accepted, so strings are terminated."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t j, b
    cdef Py_ssize_t count = 0
    cdef const unsigned char* q
    cdef unsigned char ch
    while i < n:
        ch = s[i]
        if ch == 34:
            # skip the string: the next '"' preceded by an even number of backslashes
            j = i + 1
            while True:
                q = <const unsigned char*>memchr(s + j, 34, n - j)
                if q == NULL:
                    return count
                j = q - s
                b = j - 1
                while s[b] == 92:  # s[i] is '"', so this stops at the opening quote
                    b -= 1
                if ((j - 1 - b) & 1) == 0:
                    break
                j += 1
            i = j + 1
        else:
            if ch == 58:
                count += 1
            i += 1
    return count


cdef Py_ssize_t _members(object value, int depth) except -2:
    """Object members in ``value``, recursively; -1 once nesting exceeds MAX_JSON_DEPTH."""
    cdef Py_ssize_t total = 0
    cdef Py_ssize_t sub
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    if depth > _MAX_DEPTH:
        return -1
    if type(value) is dict:
        total = PyDict_Size(value)
        while PyDict_Next(value, &pos, &k, &v):
            if type(<object>v) is dict or type(<object>v) is list:
                sub = _members(<object>v, depth + 1)
                if sub < 0:
                    return sub
                total += sub
    elif type(value) is list:
        for item in <list>value:
            if type(item) is dict or type(item) is list:
                sub = _members(item, depth + 1)
                if sub < 0:
                    return sub
                total += sub
    return total


cdef str _json_shape(bytes raw, object parsed):
    """None, or why parsed JSON is refused although orjson accepted it."""
    cdef Py_ssize_t members = _members(parsed, 1)
    if members < 0:
        return D_DEPTH
    if _count_colons(<const unsigned char*>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw)) \
            != members:
        return D_DUP
    return None


# ---------------------------------------------------------------------------------------------
# Header parsing, with a small cache keyed by the header segment: an IdP signs every token
# with one of a handful of headers, so typical tokens skip header decoding and parsing.

@cython.final
@cython.no_gc
cdef class _Header:
    cdef object header     # the parsed dict (shared by every token with this header)
    cdef int code          # R_OK or R_TOKEN_MALFORMED (structural checks)
    cdef str detail
    cdef int alg           # an A_* code >= 0, or A_UNKNOWN / A_NONE / A_BAD
    cdef object alg_name   # the header's alg when it is a str
    cdef object kid        # str or None
    cdef str kid_detail    # None when the kid is acceptable
    cdef object typ        # the header typ as a canonical media type (see _typ_key), or None


cdef object _typ_key(object value):
    """A JOSE ``typ`` as the full lower-case media type it names, or None when it cannot name
    one (not a str, empty, not ASCII). RFC 7515 §4.1.9: a value without '/' is read as if
    "application/" were prepended; media types compare case-insensitively (RFC 6838 §4.2,
    RFC 9068 §2.1: "at+jwt" and "application/at+jwt" are the same type)."""
    if type(value) is not str or not value or not (<str>value).isascii():
        return None
    low = (<str>value).lower()
    return low if "/" in low else "application/" + low


cdef dict _HDR_CACHE = {}
# The header seen last: most traffic repeats it, and a memcmp beats a slice + hash + lookup.
cdef bytes _LAST_HSEG = b""
cdef _Header _LAST_HDR = None


cdef _Header _parse_header(bytes raw):
    cdef _Header h = _Header.__new__(_Header)
    cdef Py_UCS4 ch
    h.code = R_TOKEN_MALFORMED
    h.alg = A_BAD
    try:
        obj = _loads(raw)
    except _JSONDecodeError:
        h.detail = D_HEADER_JSON
        return h
    if type(obj) is not dict:
        h.detail = D_HEADER_OBJ
        return h
    detail = _json_shape(raw, obj)
    if detail is not None:
        h.detail = detail
        return h
    h.header = obj
    # RFC 7515 §4.1.11: a recipient MUST reject a crit it does not understand; fastgate
    # implements no extensions, so any crit (even [] or malformed) is rejected (catalog B9).
    if "crit" in obj:
        h.detail = D_CRIT
        return h
    # RFC 7797 b64 changes what is signed; never compute the MAC over raw payload bytes (B10).
    if "b64" in obj:
        h.detail = D_B64HDR
        return h
    # RFC 7516 §4.1.2/§4.1.3: enc and zip exist only in JWE headers (catalog A13).
    if "enc" in obj or "zip" in obj:
        h.detail = D_JWE
        return h
    # RFC 7519 §5.2: cty "JWT" means a nested JWT; we never recurse (catalog A14). Media
    # types are case-insensitive and the "application/" prefix is optional (RFC 7515 §4.1.10).
    cty = obj.get("cty")
    if type(cty) is str and (<str>cty).upper() in ("JWT", "APPLICATION/JWT"):
        h.detail = D_NESTED
        return h
    h.code = R_OK
    h.detail = D_OK
    # Normalised once per distinct header (the header cache keeps it), so a provider's typ
    # list is a set lookup per token (RFC 9068 §4).
    h.typ = _typ_key(obj.get("typ"))
    alg = obj.get("alg")
    if type(alg) is str:
        h.alg_name = alg
        code = _ALG_CODE.get(alg)
        if code is not None:
            h.alg = code
        elif (<str>alg).lower() == "none":  # RFC 8725 §3.1: never "none", in any casing
            h.alg = A_NONE
        else:
            h.alg = A_UNKNOWN
    # jwk, jku, x5u, x5c, x5t are never read (RFC 8725 §3.10): keys come from config only.
    kid = obj.get("kid")
    if kid is not None or "kid" in obj:
        if type(kid) is not str:
            h.kid_detail = D_KID_TYPE
        elif len(<str>kid) > _MAX_KID:
            h.kid_detail = D_KID_LEN
        else:
            # control characters never name a key and must not reach logs (catalog C5)
            for ch in <str>kid:
                if ch < 0x20 or ch == 0x7F:
                    h.kid_detail = D_KID_CHARS
                    break
            else:
                h.kid = kid
    return h
