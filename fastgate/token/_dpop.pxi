# Included by _verify.pyx (one extension module: see its docstring). DPoP proofs (RFC 9449):
# thumbprints, the proof-key cache, DpopResult, DpopRule and the htu normalisation.

# ---------------------------------------------------------------------------------------------
# DPoP proofs (RFC 9449 §4.3). A proof is a JWT the client signs, per request, with the key its
# access token is bound to (cnf.jkt, §6.1). Checked here because it is a JWT: the same strict
# base64url, JSON shape rules and signature code as access tokens. What needs state -- the jti
# replay store and the server nonces -- is the data plane's (fastgate/auth/replay.py).

# RFC 7517 §4 / RFC 7518 §6.2.2, §6.3.2, §6.4, RFC 8037 §2: members that only a private key
# (or a symmetric one) has. §4.3 check 7: the jwk "does not contain a private key".
cdef frozenset _PRIVATE_JWK = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# RFC 7638 §3.2: the members a thumbprint hashes, per kty, in lexicographic order.
cdef dict _THUMB_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                            "OKP": ("crv", "kty", "x")}
cdef Py_ssize_t _MAX_PROOF = 8192  # a proof with an RSA-4096 jwk is ~1.5 KB
cdef Py_ssize_t _MAX_JTI = 256  # becomes part of a replay-store key
cdef Py_ssize_t _PROOF_KEYS_MAX = 4096
cdef str _DPOP_TYP = "application/dpop+jwt"
cdef object _sha256 = _hashlib.sha256
cdef object _b64enc = _base64.urlsafe_b64encode

cdef str D_PROOF_SIZE = "proof size"
cdef str D_PROOF_FORMAT = "proof format"
cdef str D_PROOF_TYP = "proof typ"
cdef str D_PROOF_ALG = "proof alg"
cdef str D_PROOF_JWK = "proof jwk"
cdef str D_PROOF_PRIVATE = "proof jwk private"
cdef str D_PROOF_CLAIMS = "proof claims"
cdef str D_PROOF_HTM = "proof htm"
cdef str D_PROOF_HTU = "proof htu"
cdef str D_PROOF_IAT = "proof iat"
cdef str D_PROOF_ATH = "proof ath"
cdef str D_PROOF_SIG = "proof signature"
cdef str D_PROOF_NONCE = "proof nonce"
cdef str D_PROOF_BINDING = "cnf.jkt"


cdef str b64url(bytes raw):
    return _b64enc(raw).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk):
    """RFC 7638 SHA-256 thumbprint (base64url) of a public JWK; None when the members it
    needs are missing or are not strings."""
    if not isinstance(jwk, _Mapping):
        return None
    members = _THUMB_MEMBERS.get(jwk.get("kty"))
    if members is None:
        return None
    picked = {}
    for name in members:
        value = jwk.get(name)
        if type(value) is not str:
            return None
        picked[name] = value
    # RFC 7638 §3.3: UTF-8, no whitespace, members in lexicographic order (the tuple's order).
    return b64url(_sha256(_orjson.dumps(picked)).digest())


def access_token_hash(token):
    """RFC 9449 §4.2 ``ath``: base64url(SHA-256(the ASCII access token))."""
    if type(token) is str:
        token = (<str>token).encode("ascii", "surrogateescape")
    return b64url(_sha256(token).digest())


# ath per access token (RFC 9449 §4.2): a client sends one token with many proofs, and the
# data plane's token is the str the token cache already hashed, so a lookup costs less than
# the encode + SHA-256 + base64url it saves. Bounded like _PROOF_KEYS.
cdef dict _ATHS = {}
cdef Py_ssize_t _ATHS_MAX = 4096


cdef str _token_ath(str token):
    cdef object got = _ATHS.get(token)
    if got is not None:
        return <str>got
    ath = access_token_hash(token)
    if len(_ATHS) >= _ATHS_MAX:
        _ATHS.clear()
    _ATHS[token] = ath
    return ath


@cython.final
@cython.no_gc
cdef class _ProofKey:
    """One distinct proof header, parsed once: a client signs every proof with one header."""
    cdef str detail  # None when usable
    cdef int alg
    cdef _Key key
    cdef str jkt


cdef dict _PROOF_KEYS = {}


cdef _ProofKey _proof_key(bytes hseg, const unsigned char* p, Py_ssize_t n):
    cdef _ProofKey pk = <_ProofKey>_PROOF_KEYS.get(hseg)
    if pk is not None:
        return pk
    pk = _ProofKey.__new__(_ProofKey)
    pk.alg = A_BAD
    pk.detail = D_PROOF_FORMAT
    raw = _b64d(p, n)
    hdr = None
    if raw is not None:
        try:
            hdr = _loads(raw)
        except _JSONDecodeError:
            hdr = None
    if type(hdr) is dict and _json_shape(<bytes>raw, hdr) is None:
        pk.detail = _proof_header(pk, <dict>hdr)
    if len(_PROOF_KEYS) >= _PROOF_KEYS_MAX:
        _PROOF_KEYS.clear()
    _PROOF_KEYS[hseg] = pk
    return pk


cdef str _proof_header(_ProofKey pk, dict hdr):
    """RFC 9449 §4.3 checks 4, 5 and 7 on a parsed proof header; None when they pass."""
    cdef list skipped = []
    # RFC 7515 §4.1.11 / the access-token rules: no extension we do not implement.
    if "crit" in hdr or "b64" in hdr or "enc" in hdr or "zip" in hdr:
        return D_PROOF_FORMAT
    if _typ_key(hdr.get("typ")) != _DPOP_TYP:  # check 4
        return D_PROOF_TYP
    alg = hdr.get("alg")
    code = _ALG_CODE.get(alg) if type(alg) is str else None
    if code is None or not (_ASYM_MASK & _bit(<int>code)):  # check 5: asymmetric, supported
        return D_PROOF_ALG
    jwk = hdr.get("jwk")
    if type(jwk) is not dict:
        return D_PROOF_JWK
    for name in <dict>jwk:
        if name in _PRIVATE_JWK:  # check 7
            return D_PROOF_PRIVATE
    key = _prepare_jwk(jwk, False, skipped)
    if key is None or not ((<_Key>key).mask & _bit(<int>code)):  # check 6's precondition
        return D_PROOF_JWK
    jkt = jwk_thumbprint(jwk)
    if jkt is None:
        return D_PROOF_JWK
    pk.alg = <int>code
    pk.key = <_Key>key
    pk.jkt = jkt
    return None


@cython.final
@cython.no_gc
cdef class DpopResult:
    """The outcome of one proof check (see the .pyi)."""
    cdef int _code
    cdef str _detail
    cdef public object jkt
    cdef public object jti
    cdef public object nonce
    cdef public double iat

    def __init__(self, *args, **kwargs):
        raise TypeError("DpopResult objects are made by DpopRule.check")

    @property
    def ok(self):
        return self._code == R_OK

    @property
    def reason(self):
        return _REASONS[self._code]

    @property
    def detail(self):
        return self._detail

    def __repr__(self):
        return f"<DpopResult {_REASONS[self._code].label} detail={self._detail!r}>"


cdef inline DpopResult _dpop_fail(DpopResult r, int code, str detail):
    r._code = code
    r._detail = detail
    return r


@cython.final
cdef class DpopRule:
    """One route's DPoP settings, compiled once (RFC 9449 §4.3)."""
    cdef unsigned int mask
    cdef double max_age
    cdef double skew
    cdef readonly str algs  # the WWW-Authenticate algs attribute (§7.1)

    def __init__(self, algorithms=None, double max_age=60.0, double clock_skew=5.0):
        cdef unsigned int mask = _ASYM_MASK if algorithms is None else \
            _parse_algorithms(algorithms)
        if mask & _HMAC_MASK:
            raise ValueError("a DPoP proof is signed with an asymmetric key (RFC 9449 §4.3)")
        if not (max_age > 0.0) or not (clock_skew >= 0.0):
            raise ValueError("max_age must be > 0 and clock_skew >= 0")
        self.mask = mask
        self.max_age = max_age
        self.skew = clock_skew
        self.algs = " ".join(_ALG_NAMES[i] for i in range(A_COUNT) if mask & _bit(i))

    @property
    def window(self):
        """Seconds a proof's jti must be remembered: past it the iat check rejects it."""
        return self.max_age + self.skew

    def check(self, proof, str method, str htu, str token, jkt, now=None):
        """RFC 9449 §4.3 for one request: ``proof`` is the DPoP header's value, ``htu`` the
        URI the request was sent to (scheme://authority/path), ``jkt`` the access token's
        ``cnf.jkt`` (None when it has none). Never raises for a bad proof."""
        cdef DpopResult r = DpopResult.__new__(DpopResult)
        cdef bytes tok
        cdef const char* p
        cdef const char* q
        cdef Py_ssize_t n, d1, d2
        cdef _ProofKey pk
        cdef dict claims
        cdef double t = _clock() if now is None else <double>now
        cdef double iat
        if type(proof) is str:
            if not (<str>proof).isascii():
                return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_FORMAT)
            tok = (<str>proof).encode("ascii")
        elif type(proof) is bytes:
            tok = <bytes>proof
        else:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_FORMAT)
        n = PyBytes_GET_SIZE(tok)
        if n > _MAX_PROOF:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_SIZE)
        # Check 2: a well-formed compact JWS, three segments.
        p = PyBytes_AS_STRING(tok)
        q = <const char*>memchr(p, 46, n)
        if q == NULL:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_FORMAT)
        d1 = q - p
        q = <const char*>memchr(p + d1 + 1, 46, n - d1 - 1)
        if q == NULL or memchr(q + 1, 46, n - (q - p) - 1) != NULL:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_FORMAT)
        d2 = q - p
        pk = _proof_key(tok[:d1], <const unsigned char*>p, d1)
        if pk.detail is not None:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, pk.detail)
        if not (self.mask & _bit(pk.alg)):  # check 5: the route's allow-list
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_ALG)
        praw = _b64d(<const unsigned char*>p + d1 + 1, d2 - d1 - 1)
        sig = _b64d(<const unsigned char*>p + d2 + 1, n - d2 - 1)
        if praw is None or sig is None:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_FORMAT)
        try:
            obj = _loads(praw)
        except _JSONDecodeError:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_FORMAT)
        if type(obj) is not dict or _json_shape(<bytes>praw, obj) is not None:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_FORMAT)
        claims = <dict>obj
        # Check 3: the claims a proof to a resource server must have (§4.2, §7.1: ath).
        jti = claims.get("jti")
        htm = claims.get("htm")
        phtu = claims.get("htu")
        iat_v = claims.get("iat")
        ath = claims.get("ath")
        if type(jti) is not str or not jti or len(<str>jti) > _MAX_JTI or \
                type(htm) is not str or type(phtu) is not str or type(ath) is not str or \
                not _is_number(iat_v):
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_CLAIMS)
        nonce = claims.get("nonce")
        if nonce is not None and type(nonce) is not str:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_NONCE)
        # The cheap request-binding checks come before the signature: a proof for another
        # request costs no public-key operation.
        if htm != method:  # check 8 (methods are case-sensitive, RFC 9110 §9.1)
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_HTM)
        if phtu != htu and not _same_htu(<str>phtu, htu):  # check 9
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_HTU)
        iat = _as_double(iat_v)
        # Check 11 (§11.1): recent enough, and not from the future beyond the skew.
        if not isfinite(iat) or iat < t - self.max_age or iat > t + self.skew:
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_IAT)
        if ath != _token_ath(token):  # check 12
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_ATH)
        # Check 6: the signature, with the proof's own jwk.
        if not _verify_sig(pk.key, pk.alg, PyBytes_FromStringAndSize(p, d2), <bytes>sig):
            return _dpop_fail(r, R_DPOP_PROOF_INVALID, D_PROOF_SIG)
        r.jkt = pk.jkt
        r.jti = jti
        r.nonce = nonce
        r.iat = iat
        # §7.1 / §6.1: the token is bound to THIS key (its cnf.jkt is the jwk's thumbprint).
        if type(jkt) is not str or jkt != pk.jkt:
            return _dpop_fail(r, R_DPOP_BINDING_MISMATCH, D_PROOF_BINDING)
        return _dpop_fail(r, R_OK, D_OK)


cdef bint _same_htu(str got, str want) except -1:
    """RFC 9449 §4.3 check 9: the two URIs are equal after RFC 3986 §6.2.2 (syntax-based)
    and §6.2.3 (scheme-based) normalisation, ignoring query and fragment."""
    a = normalize_htu(got)
    return a is not None and a == normalize_htu(want)


cdef str _HEX = "0123456789ABCDEF"
cdef str _UNRESERVED = ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def normalize_htu(str uri):
    """scheme://authority/path normalised (RFC 3986 §6.2.2, §6.2.3), query and fragment
    dropped; None when ``uri`` is not an absolute http(s) URI."""
    cdef Py_ssize_t i, j, n
    if not uri.isascii():
        return None
    i = uri.find("://")
    if i <= 0:
        return None
    scheme = uri[:i].lower()  # §6.2.2.1: scheme and host are case-insensitive
    if scheme != "http" and scheme != "https":
        return None
    rest = uri[i + 3:]
    for sep in ("#", "?"):  # §4.3 check 9: query and fragment are ignored
        j = rest.find(sep)
        if j >= 0:
            rest = rest[:j]
    j = rest.find("/")
    authority = rest if j < 0 else rest[:j]
    path = "/" if j < 0 else rest[j:]  # §6.2.3: an empty path is "/"
    if not authority or "@" in authority:
        return None
    host = authority
    port = ""
    if authority.startswith("["):
        j = authority.find("]")
        if j < 0:
            return None
        host = authority[:j + 1]
        port = authority[j + 1:]
        if port and not port.startswith(":"):
            return None
        port = port[1:]
    else:
        j = authority.rfind(":")
        if j >= 0:
            host, port = authority[:j], authority[j + 1:]
    if port and not port.isdigit():
        return None
    # §6.2.3: the scheme's default port is the same as no port.
    if port == "" or (scheme == "https" and int(port) == 443) or \
            (scheme == "http" and int(port) == 80):
        port = ""
    else:
        port = ":" + str(int(port))
    host = _pct_normalize(host.lower())
    path = _pct_normalize(path)
    if host is None or path is None:
        return None
    return scheme + "://" + host + port + _remove_dots(path)


cdef object _pct_normalize(str s):
    """§6.2.2.1 / §6.2.2.2: percent-escapes upper-case, unreserved characters decoded."""
    cdef Py_ssize_t i = s.find("%")
    cdef Py_ssize_t n = len(s)
    cdef list out
    if i < 0:
        return s
    out = [s[:i]]
    while i < n:
        ch = s[i]
        if ch == "%":
            if i + 3 > n:
                return None
            h = s[i + 1:i + 3].upper()
            if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
                return None
            c = chr(int(h, 16))
            out.append(c if c in _UNRESERVED else "%" + h)
            i += 3
        else:
            out.append(ch)
            i += 1
    return "".join(out)


cdef str _remove_dots(str path):
    """RFC 3986 §5.2.4 remove_dot_segments (§6.2.2.3)."""
    cdef list out = []
    if "." not in path:
        return path
    segments = path.split("/")
    for k, seg in enumerate(segments):
        if seg == ".":
            if k == len(segments) - 1:
                out.append("")
        elif seg == "..":
            if len(out) > 1:
                out.pop()
            if k == len(segments) - 1:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result
