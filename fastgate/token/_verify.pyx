# cython: language_level=3, embedsignature=True
"""The hot path: compact-JWS parsing, alg/key binding, signature and claim checks, and the
verified-token cache (SPEC §3 step 4, §6). This module is the ONE implementation; there is no
pure-Python twin (SPEC §1).

Check order (SPEC §3.4), first failure wins:
size -> segments / base64url -> header JSON -> payload JSON -> alg (allow-list, none) ->
issuer selection -> typ (when the provider lists types) -> usable keys now (else
jwks_unavailable) -> kid -> key lookup -> alg/key binding -> signature -> claims (exp/nbf/iat
with skew, aud, required, lifetime).
A token that was rejected as signature_invalid is remembered in a small negative cache (per
TokenCache, separate from the verified-token LRU) until the verifier's key set changes; so is
a validly signed token rejected only by its time window (token_expired by exp,
token_not_yet_valid by nbf/iat), with the time bound that decided, re-checked on every hit.
The signature comes before the time checks, so a forged AND expired token reports
signature_invalid and only a validly signed expired token reports token_expired. The payload
parser sees attacker bytes before the signature, which is safe only because of the strict
size cap, base64url and orjson (catalog §0 rule 10).

Nothing here raises for a bad token: every decision is an int code internally and a
fastgate.token.reasons.Reason at the boundary.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_Size
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsDouble, PyLong_AsLongLongAndOverflow
from cpython.set cimport PySet_Contains
from cpython.ref cimport PyObject
from libc.math cimport INFINITY, isfinite
from libc.string cimport memchr, memcmp, memcpy
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

import base64 as _base64
import collections.abc as _abc
import hashlib as _hashlib

import orjson as _orjson
from cryptography.exceptions import InvalidSignature as _InvalidSignature
from cryptography.hazmat.primitives import hashes as _hashes
from cryptography.hazmat.primitives import hmac as _chmac
from cryptography.hazmat.primitives.asymmetric import ec as _ec
from cryptography.hazmat.primitives.asymmetric import ed448 as _ed448
from cryptography.hazmat.primitives.asymmetric import ed25519 as _ed25519
from cryptography.hazmat.primitives.asymmetric import padding as _padding
from cryptography.hazmat.primitives.asymmetric import rsa as _rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    encode_dss_signature as _encode_dss_signature_py,
)

from fastgate.token.reasons import Reason as _Reason

# Python globals rebound once as C-level names: no module-dict lookups per request.
cdef object _loads = _orjson.loads
cdef object _JSONDecodeError = _orjson.JSONDecodeError
cdef object _InvalidSig = _InvalidSignature
cdef object _HMAC = _chmac.HMAC
cdef object _encode_dss = _encode_dss_signature_py
cdef object _int_from_bytes = int.from_bytes
cdef object _Mapping = _abc.Mapping

# ---------------------------------------------------------------------------------------------
# Reason codes: a C mirror of fastgate.token.reasons.Reason (tests/token/test_reasons.py keeps them equal).

cdef enum:
    R_OK = 0
    R_TOKEN_MISSING = 1
    R_TOKEN_MALFORMED = 2
    R_TOKEN_TOO_LARGE = 3
    R_ALG_NOT_ALLOWED = 4
    R_ISSUER_UNKNOWN = 5
    R_KEY_NOT_FOUND = 6
    R_SIGNATURE_INVALID = 7
    R_TOKEN_EXPIRED = 8
    R_TOKEN_NOT_YET_VALID = 9
    R_AUDIENCE_MISMATCH = 10
    R_CLAIM_MISSING = 11
    R_TOKEN_AMBIGUOUS = 12
    R_INSUFFICIENT_SCOPE = 13
    R_CLAIM_MISMATCH = 14
    R_API_KEY_MISSING = 15
    R_API_KEY_INVALID = 16
    R_API_KEY_MISMATCH = 17
    R_JWKS_UNAVAILABLE = 18
    R_TOKEN_TYPE_INVALID = 19
    R_CERTIFICATE_MISMATCH = 20  # decided by the data plane (RFC 8705 §3), never here
    R_DPOP_PROOF_INVALID = 21  # DpopRule.check (RFC 9449 §4.3)
    R_DPOP_PROOF_REPLAYED = 22  # the data plane's replay store (RFC 9449 §11.1)
    R_DPOP_BINDING_MISMATCH = 23  # DpopRule.check: cnf.jkt is not the proof key's thumbprint
    R_DPOP_NONCE_REQUIRED = 24  # DpopRule.check / the data plane's nonces (RFC 9449 §8)
    R_TOKEN_REPLAYED = 25  # the data plane's replay store (RFC 7523 §3 item 7)
    R_REPLAY_STORE_UNAVAILABLE = 26  # the data plane's replay store

REASON_CODES = {
    "OK": R_OK, "TOKEN_MISSING": R_TOKEN_MISSING, "TOKEN_MALFORMED": R_TOKEN_MALFORMED,
    "TOKEN_TOO_LARGE": R_TOKEN_TOO_LARGE, "ALG_NOT_ALLOWED": R_ALG_NOT_ALLOWED,
    "ISSUER_UNKNOWN": R_ISSUER_UNKNOWN, "KEY_NOT_FOUND": R_KEY_NOT_FOUND,
    "SIGNATURE_INVALID": R_SIGNATURE_INVALID, "TOKEN_EXPIRED": R_TOKEN_EXPIRED,
    "TOKEN_NOT_YET_VALID": R_TOKEN_NOT_YET_VALID, "AUDIENCE_MISMATCH": R_AUDIENCE_MISMATCH,
    "CLAIM_MISSING": R_CLAIM_MISSING, "TOKEN_AMBIGUOUS": R_TOKEN_AMBIGUOUS,
    "INSUFFICIENT_SCOPE": R_INSUFFICIENT_SCOPE, "CLAIM_MISMATCH": R_CLAIM_MISMATCH,
    "API_KEY_MISSING": R_API_KEY_MISSING, "API_KEY_INVALID": R_API_KEY_INVALID,
    "API_KEY_MISMATCH": R_API_KEY_MISMATCH, "JWKS_UNAVAILABLE": R_JWKS_UNAVAILABLE,
    "TOKEN_TYPE_INVALID": R_TOKEN_TYPE_INVALID, "CERTIFICATE_MISMATCH": R_CERTIFICATE_MISMATCH,
    "DPOP_PROOF_INVALID": R_DPOP_PROOF_INVALID, "DPOP_PROOF_REPLAYED": R_DPOP_PROOF_REPLAYED,
    "DPOP_BINDING_MISMATCH": R_DPOP_BINDING_MISMATCH,
    "DPOP_NONCE_REQUIRED": R_DPOP_NONCE_REQUIRED, "TOKEN_REPLAYED": R_TOKEN_REPLAYED,
    "REPLAY_STORE_UNAVAILABLE": R_REPLAY_STORE_UNAVAILABLE,
}


cdef tuple _build_reasons():
    by_code = {code: _Reason[name] for name, code in REASON_CODES.items()}
    if sorted(by_code) != list(range(len(by_code))) or any(
        by_code[c].value != c for c in by_code
    ):  # pragma: no cover - caught by tests/token/test_reasons.py; fail loudly at import
        raise ImportError("fastgate.token._verify reason codes do not mirror fastgate.token.reasons.Reason")
    return tuple(by_code[c] for c in range(len(by_code)))


# Returning a Reason is a tuple index.
cdef tuple _REASONS = _build_reasons()

# ---------------------------------------------------------------------------------------------
# Fixed detail strings (logs and `fastgate verify` only; never a metric label).

cdef str D_OK = "ok"
cdef str D_CACHED = "cache hit"
cdef str D_CACHED_REJECT = "cached reject"
cdef str D_TYPE = "token type"
cdef str D_SIZE = "token size"
cdef str D_ASCII = "non-ascii token"
cdef str D_EMPTY = "empty token"
cdef str D_SEGMENTS = "segment count"
cdef str D_EMPTY_PAYLOAD = "empty payload"
cdef str D_B64 = "base64url"
cdef str D_HEADER_JSON = "header json"
cdef str D_HEADER_OBJ = "header not an object"
cdef str D_PAYLOAD_JSON = "payload json"
cdef str D_PAYLOAD_OBJ = "payload not an object"
cdef str D_DUP = "duplicate member"
cdef str D_DEPTH = "json depth"
cdef str D_CRIT = "crit"
cdef str D_B64HDR = "b64"
cdef str D_JWE = "jwe header"
cdef str D_NESTED = "nested jwt"
cdef str D_ALG_MISSING = "alg missing"
cdef str D_ALG_NONE = "alg none"
cdef str D_ALG = "alg not allowed"
cdef str D_ISSUER = "issuer"
cdef str D_NO_KEYS = "no keys loaded"
cdef str D_KID_TYPE = "kid type"
cdef str D_KID_LEN = "kid length"
cdef str D_KID_CHARS = "kid characters"
cdef str D_KID_UNKNOWN = "kid unknown"
cdef str D_NO_KEY_FOR_ALG = "no key for alg"
cdef str D_BINDING = "alg/key binding"
cdef str D_SIGNATURE = "signature"
cdef str D_EXP_TYPE = "exp type"
cdef str D_NBF_TYPE = "nbf type"
cdef str D_IAT_TYPE = "iat type"
cdef str D_SUB_TYPE = "sub type"
cdef str D_JTI_TYPE = "jti type"
cdef str D_AUD_TYPE = "aud type"
cdef str D_EXP = "exp"
cdef str D_NBF = "nbf"
cdef str D_IAT = "iat"
cdef str D_AUD = "aud"
cdef str D_REQUIRED = "required claim"
cdef str D_LIFETIME = "max lifetime"
cdef str D_LIFETIME_EXP = "max lifetime needs exp"
cdef str D_TYP = "typ"
cdef str D_INTERNAL = "internal error"

# ---------------------------------------------------------------------------------------------
# Algorithms: C codes, families and prebuilt cryptography objects (built once at import).

cdef enum:
    A_RS256 = 0
    A_RS384 = 1
    A_RS512 = 2
    A_PS256 = 3
    A_PS384 = 4
    A_PS512 = 5
    A_ES256 = 6
    A_ES384 = 7
    A_ES512 = 8
    A_EDDSA = 9
    A_ED25519 = 10
    A_ED448 = 11
    A_HS256 = 12
    A_HS384 = 13
    A_HS512 = 14
    A_COUNT = 15
    # header alg states that are not algorithms
    A_UNKNOWN = -1
    A_NONE = -2
    A_BAD = -3

cdef enum:
    F_RSA = 1
    F_PSS = 2
    F_EC = 3
    F_ED = 4
    F_HMAC = 5

MAX_KID_LENGTH = 256
MAX_KIDLESS_KEYS = 2
MAX_JWKS_KEYS = 100
MAX_CACHED_TOKEN_BYTES = 4096
MAX_JSON_DEPTH = 32
NEGATIVE_CACHE_ENTRIES = 4096

# Signature operations performed by this process (every _verify_sig call): an observable for
# tests and benchmarks that a cached decision cost no RSA/EC/HMAC operation.
cdef unsigned long long _SIG_OPS = 0


def token_shape(str token, Py_ssize_t max_chars):
    """Shape checks on one extracted credential, before any decoding (the one
    implementation: fastgate.auth.extract.TokenExtractor.check and the data plane's fast path
    both call it): a folded list of credentials (``,``) is token_ambiguous; longer than
    ``max_chars`` token_too_large; empty or with a space or tab token_malformed."""
    if "," in token:
        return _REASONS[R_TOKEN_AMBIGUOUS]
    if len(token) > max_chars:
        return _REASONS[R_TOKEN_TOO_LARGE]
    if not token or " " in token or "\t" in token:
        return _REASONS[R_TOKEN_MALFORMED]
    return _REASONS[R_OK]


def signature_checks():
    """Signature verifications this process has run (tests and benchmarks only)."""
    return _SIG_OPS

cdef Py_ssize_t _MAX_KID = MAX_KID_LENGTH
cdef Py_ssize_t _MAX_KIDLESS = MAX_KIDLESS_KEYS
cdef Py_ssize_t _MAX_KEYS = MAX_JWKS_KEYS
# Envoy's kMaxJwtSizeForCache: larger tokens are verified every time, never cached.
cdef Py_ssize_t _MAX_CACHED = MAX_CACHED_TOKEN_BYTES
cdef Py_ssize_t _NEG_DEFAULT = NEGATIVE_CACHE_ENTRIES
cdef Py_ssize_t _HDR_CACHE_MAX = 256
# orjson allows 1024 levels; no claim set needs more than a few, and deep values would break
# encoders downstream (orjson.dumps stops at 255), so bound nesting (catalog E6).
cdef int _MAX_DEPTH = MAX_JSON_DEPTH

cdef tuple _ALG_NAMES = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
    "EdDSA", "Ed25519", "Ed448", "HS256", "HS384", "HS512",
)
cdef dict _ALG_CODE = {name: i for i, name in enumerate(_ALG_NAMES)}
cdef int _FAM[15]
cdef Py_ssize_t _HLEN[15]      # digest length in bytes (HMAC key minimum, RFC 7518 §3.2)
cdef Py_ssize_t _ECLEN[15]     # raw R||S length, RFC 7518 §3.4
_FAM[:] = [F_RSA, F_RSA, F_RSA, F_PSS, F_PSS, F_PSS, F_EC, F_EC, F_EC, F_ED, F_ED, F_ED,
           F_HMAC, F_HMAC, F_HMAC]
_HLEN[:] = [32, 48, 64, 32, 48, 64, 32, 48, 64, 0, 0, 0, 32, 48, 64]
_ECLEN[:] = [0, 0, 0, 0, 0, 0, 64, 96, 132, 0, 0, 0, 0, 0, 0]

cdef tuple _SHA = (_hashes.SHA256(), _hashes.SHA384(), _hashes.SHA512())


cdef tuple _alg_objects():
    """Per alg code: (hash, padding, ECDSA) objects, built once and reused by every verify."""
    hash_l, pad_l, ecdsa_l = [], [], []
    for code in range(A_COUNT):
        h = _SHA[code % 3] if code < A_EDDSA or code >= A_HS256 else None
        hash_l.append(h)
        if _FAM[code] == F_RSA:
            pad_l.append(_padding.PKCS1v15())
        elif _FAM[code] == F_PSS:
            # RFC 7518 §3.5: MGF1 with the same hash, salt length = hash output length.
            pad_l.append(_padding.PSS(mgf=_padding.MGF1(h), salt_length=h.digest_size))
        else:
            pad_l.append(None)
        ecdsa_l.append(_ec.ECDSA(h) if _FAM[code] == F_EC else None)
    return tuple(hash_l), tuple(pad_l), tuple(ecdsa_l)


cdef tuple _HASH
cdef tuple _PAD
cdef tuple _ECDSA
_HASH, _PAD, _ECDSA = _alg_objects()

cdef unsigned int _bit(int code) noexcept:
    return (<unsigned int>1) << code

cdef unsigned int _HMAC_MASK = _bit(A_HS256) | _bit(A_HS384) | _bit(A_HS512)
cdef unsigned int _ALL_MASK = (_bit(A_COUNT) - 1)
cdef unsigned int _ASYM_MASK = _ALL_MASK & ~_HMAC_MASK

SUPPORTED_ALGORITHMS = frozenset(_ALG_NAMES)
HMAC_ALGORITHMS = frozenset(("HS256", "HS384", "HS512"))
ASYMMETRIC_ALGORITHMS = SUPPORTED_ALGORITHMS - HMAC_ALGORITHMS

cdef dict _EC_CURVES = {
    "P-256": (_ec.SECP256R1(), 32, A_ES256),
    "P-384": (_ec.SECP384R1(), 48, A_ES384),
    "P-521": (_ec.SECP521R1(), 66, A_ES512),
}


cdef frozenset _mask_names(unsigned int mask):
    return frozenset(_ALG_NAMES[i] for i in range(A_COUNT) if mask & _bit(i))

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


cdef inline double _clock() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9

# ---------------------------------------------------------------------------------------------
# Prepared keys


@cython.final
@cython.no_gc
cdef class _Key:
    cdef object kid          # str or None
    cdef unsigned int mask   # algorithms this key may verify (kty/crv/alg/use/key_ops)
    cdef object pub          # cryptography public key object, or the HMAC secret bytes
    cdef tuple hmacs         # oct keys: a keyed HMAC state per HS256/384/512 (None if too short)
    cdef Py_ssize_t siglen   # exact signature length: RSA modulus bytes, Ed 64/114, else 0
    cdef bint alive          # False once a JWKS refresh removed it: cached tokens stop hitting
    cdef object fingerprint  # everything that affects verification; equal -> object reused


# ROCA (CVE-2017-15361; Nemec et al., "The Return of Coppersmith's Attack", CCS 2017): the
# Infineon library built primes p = k*M + (65537^a mod M), M a primorial, so n mod r lies in
# the subgroup generated by 65537 mod r for every small prime r | M. The fingerprint test of
# the public roca-detect tool checks exactly that for these primes; a random modulus passes
# all of them with negligible probability. Key load only, never per request.
cdef tuple _ROCA_PRIMES = (
    3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89,
    97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167,
)


cdef tuple _roca_masks():
    """Per prime r: (r, bit mask of the subgroup <65537 mod r> of (Z/rZ)*), built once."""
    out = []
    for r in _ROCA_PRIMES:
        mask = 0
        x = 1
        while True:
            mask |= 1 << x
            x = x * 65537 % r
            if x == 1:
                break
        out.append((r, mask))
    return tuple(out)


cdef tuple _ROCA_MASKS = _roca_masks()


cdef bint _roca_fingerprint(object n) except -1:
    for r, mask in _ROCA_MASKS:
        if not ((<object>mask >> (n % <object>r)) & 1):
            return False
    return True


cdef tuple _hmac_states(bytes secret, unsigned int mask):
    return tuple(_HMAC(secret, _HASH[code]) if mask & _bit(code) else None
                 for code in (A_HS256, A_HS384, A_HS512))


cdef inline Py_ssize_t _der_int(unsigned char* out, const unsigned char* v, Py_ssize_t n):
    """One DER INTEGER (X.690 §8.3: minimal, non-negative) of the big-endian unsigned ``v``
    into ``out`` (room for n + 3 bytes); the bytes written."""
    cdef Py_ssize_t i = 0, k, m
    while i < n - 1 and v[i] == 0:
        i += 1
    m = n - i
    out[0] = 0x02
    if v[i] & 0x80:
        out[1] = <unsigned char>(m + 1)
        out[2] = 0
        k = 3
    else:
        out[1] = <unsigned char>m
        k = 2
    memcpy(out + k, v + i, m)
    return k + m


cdef bytes _dss_der(const char* raw, Py_ssize_t half):
    """RFC 7518 §3.4's R||S (each ``half`` bytes, at most 66: P-521) as the DER
    ECDSA-Sig-Value `cryptography` verifies (RFC 3279 §2.2.3), built in C: the same bytes as
    encode_dss_signature(int.from_bytes(R), int.from_bytes(S)), without the Python ints."""
    cdef unsigned char buf[148]
    cdef Py_ssize_t body, hl
    body = _der_int(buf + 3, <const unsigned char*>raw, half)
    body += _der_int(buf + 3 + body, <const unsigned char*>raw + half, half)
    if body < 0x80:  # X.690 §8.1.3.4: the short length form
        buf[1] = 0x30
        buf[2] = <unsigned char>body
        return PyBytes_FromStringAndSize(<char*>buf + 1, body + 2)
    buf[0] = 0x30
    buf[1] = 0x81  # the long form, one length byte (body <= 2 * (66 + 3))
    buf[2] = <unsigned char>body
    return PyBytes_FromStringAndSize(<char*>buf, body + 3)


cdef bint _verify_sig(_Key key, int alg, bytes signing_input, bytes sig) except -1:
    global _SIG_OPS
    cdef int fam = _FAM[alg]
    cdef Py_ssize_t n = PyBytes_GET_SIZE(sig)
    _SIG_OPS += 1
    try:
        if fam == F_HMAC:
            # The keyed state (ipad/opad) was built once at key load; a copy per request.
            # HMAC.verify compares the full tag in constant time (RFC 7518 §3.2, catalog D11),
            # so a truncated or empty tag never matches.
            h = (<_Key>key).hmacs[alg - A_HS256].copy()
            h.update(signing_input)
            h.verify(sig)
        elif fam == F_RSA or fam == F_PSS:
            # RFC 8017 §8.2.2 step 1: the signature is exactly k = modulus-length octets.
            if n != key.siglen:
                return False
            key.pub.verify(sig, signing_input, _PAD[alg], _HASH[alg])
        elif fam == F_EC:
            # RFC 7518 §3.4: raw R||S of exactly 2 * field length; DER only internally.
            if n != _ECLEN[alg]:
                return False
            key.pub.verify(_dss_der(PyBytes_AS_STRING(sig), n >> 1), signing_input,
                           _ECDSA[alg])
        else:  # F_ED, RFC 8037 §3.1
            if n != key.siglen:
                return False
            key.pub.verify(sig, signing_input)
    except _InvalidSig:
        return False
    return True


cdef _Key _prepare_jwk(object jwk, bint allow_oct, list skipped):
    """One JWK -> a prepared key, or None with (kid, why) appended to ``skipped``."""
    cdef _Key key
    cdef unsigned int mask
    cdef int alg_code = -1
    if not isinstance(jwk, _Mapping):
        skipped.append((None, "not an object"))
        return None
    kid = jwk.get("kid")
    if kid is not None and type(kid) is not str:
        skipped.append((None, "kid not a string"))
        return None
    if kid is not None and len(<str>kid) > _MAX_KID:
        skipped.append((None, "kid too long"))
        return None
    kty = jwk.get("kty")
    if type(kty) is not str:
        skipped.append((kid, "missing kty"))
        return None
    # RFC 7517 §4.2/§4.3: only signature keys; key_ops must allow "verify" (catalog H6).
    use = jwk.get("use")
    if use is not None:
        if use == "enc":
            skipped.append((kid, "use enc"))
            return None
        if use != "sig":
            skipped.append((kid, "use not sig"))
            return None
    if "key_ops" in jwk:
        ops = jwk["key_ops"]
        if (type(ops) is not list and type(ops) is not tuple) or "verify" not in ops:
            skipped.append((kid, "key_ops without verify"))
            return None
    # Strict binding: a JWK alg pins the token alg; one we cannot verify makes the key unusable.
    if "alg" in jwk:
        jalg = jwk["alg"]
        if type(jalg) is not str or jalg not in _ALG_CODE:
            skipped.append((kid, "unsupported key alg"))
            return None
        alg_code = _ALG_CODE[jalg]
    key = _Key.__new__(_Key)
    key.kid = kid
    key.alive = True
    if kty == "RSA":
        n_raw = _b64d_str(jwk.get("n"))
        e_raw = _b64d_str(jwk.get("e"))
        if n_raw is None or e_raw is None or not n_raw or not e_raw:
            skipped.append((kid, "bad base64url in n or e"))
            return None
        n = _int_from_bytes(n_raw, "big")
        e = _int_from_bytes(e_raw, "big")
        bits = n.bit_length()
        # RFC 7518 §3.3: at least 2048 bits; the upper cap bounds verify cost (catalog I).
        if bits < 2048:
            skipped.append((kid, "rsa modulus < 2048 bits"))
            return None
        if bits > 8192:
            skipped.append((kid, "rsa modulus > 8192 bits"))
            return None
        if e < 3 or not (e & 1) or e.bit_length() > 32:
            skipped.append((kid, "rsa exponent invalid"))
            return None
        # CVE-2017-15361: such a modulus can be factored; the key vouches for nothing.
        if _roca_fingerprint(n):
            skipped.append((kid, "rsa modulus has the ROCA fingerprint"))
            return None
        try:
            key.pub = _rsa.RSAPublicNumbers(e, n).public_key()
        except ValueError:
            skipped.append((kid, "rsa key invalid"))
            return None
        key.siglen = (bits + 7) >> 3
        mask = (_bit(A_RS256) | _bit(A_RS384) | _bit(A_RS512) | _bit(A_PS256) | _bit(A_PS384)
                | _bit(A_PS512))
        material = (n, e)
    elif kty == "EC":
        crv = jwk.get("crv")
        curve = _EC_CURVES.get(crv) if type(crv) is str else None
        if curve is None:
            skipped.append((kid, "unsupported crv"))
            return None
        x = _b64d_str(jwk.get("x"))
        y = _b64d_str(jwk.get("y"))
        if x is None or y is None:
            skipped.append((kid, "bad base64url in x or y"))
            return None
        # RFC 7518 §6.2.1.2: each coordinate is exactly the full field length.
        if len(x) != curve[1] or len(y) != curve[1]:
            skipped.append((kid, "ec coordinate length"))
            return None
        try:  # cryptography rejects a point that is not on the curve
            key.pub = _ec.EllipticCurvePublicKey.from_encoded_point(curve[0], b"\x04" + x + y)
        except ValueError:
            skipped.append((kid, "ec point not on curve"))
            return None
        mask = _bit(curve[2])  # ES256<->P-256, ES384<->P-384, ES512<->P-521 (RFC 7518 §3.4)
        material = (crv, x, y)
    elif kty == "OKP":
        crv = jwk.get("crv")
        if crv != "Ed25519" and crv != "Ed448":  # X25519/X448 are key agreement (catalog H10)
            skipped.append((kid, "unsupported crv"))
            return None
        x = _b64d_str(jwk.get("x"))
        if x is None:
            skipped.append((kid, "bad base64url in x"))
            return None
        if len(x) != (32 if crv == "Ed25519" else 57):  # RFC 8032 §5.1.5 / §5.2.5
            skipped.append((kid, "okp x length"))
            return None
        try:
            if crv == "Ed25519":
                key.pub = _ed25519.Ed25519PublicKey.from_public_bytes(x)
                key.siglen = 64
                mask = _bit(A_EDDSA) | _bit(A_ED25519)
            else:
                key.pub = _ed448.Ed448PublicKey.from_public_bytes(x)
                key.siglen = 114
                mask = _bit(A_EDDSA) | _bit(A_ED448)
        except ValueError:
            skipped.append((kid, "okp key invalid"))
            return None
        material = (crv, x)
    elif kty == "oct":
        if not allow_oct:
            # catalog B5/H11: HMAC keys come only from a configured secret, never a JWKS.
            skipped.append((kid, "oct key in jwks"))
            return None
        k = _b64d_str(jwk.get("k"))
        if k is None:
            skipped.append((kid, "bad base64url in k"))
            return None
        mask = 0
        for code in (A_HS256, A_HS384, A_HS512):
            if len(k) >= _HLEN[code]:  # RFC 7518 §3.2: key at least the hash length
                mask |= _bit(code)
        if mask == 0:
            skipped.append((kid, "oct key shorter than hash"))
            return None
        key.pub = k
        key.hmacs = _hmac_states(k, mask)
        material = (k,)
    else:
        skipped.append((kid, "unsupported kty"))
        return None
    if alg_code >= 0:
        if not (mask & _bit(alg_code)):
            skipped.append((kid, "key alg does not match key"))
            return None
        mask = _bit(alg_code)
    key.mask = mask
    key.fingerprint = (kid, kty, material, mask)
    return key


cdef tuple _load_keys(object doc, bint allow_oct, dict old_by_fp):
    """A JWKS -> (keys in document order, skipped). Duplicate kids are dropped, never first-match:
    with two keys under one kid the kid does not name a key (catalog H7; RFC 7517 §4.5)."""
    cdef list skipped = []
    cdef list keys = []
    cdef _Key key
    cdef _Key old
    cdef dict kid_count = {}
    if not isinstance(doc, _Mapping):
        raise ValueError("a JWKS must be a JSON object with a 'keys' array")
    entries = doc.get("keys")
    if type(entries) is not list and type(entries) is not tuple:
        raise ValueError("a JWKS must be a JSON object with a 'keys' array")
    # Kids are counted over every entry BEFORE any key is validated: a kid the document names
    # twice is ambiguous even when one copy is itself unusable (dropping only the bad copy
    # would silently pick the other one; Wycheproof rejectsDuplicateKid).
    for jwk in entries:
        if isinstance(jwk, _Mapping):
            kid = jwk.get("kid")
            if type(kid) is str:
                kid_count[kid] = kid_count.get(kid, 0) + 1
    for i, jwk in enumerate(entries):
        kid = jwk.get("kid") if isinstance(jwk, _Mapping) else None
        if i >= _MAX_KEYS:  # bound the load cost of a hostile document (catalog H4)
            skipped.append((kid if type(kid) is str else None, "too many keys"))
            continue
        if type(kid) is str and len(<str>kid) <= _MAX_KID and kid_count.get(kid, 0) > 1:
            skipped.append((kid, "duplicate kid"))
            continue
        key = _prepare_jwk(jwk, allow_oct, skipped)
        if key is not None:
            keys.append(key)
    result = []
    for key in keys:
        if old_by_fp is not None:
            # A routine refresh keeps the prepared object (and so the token cache) warm.
            prev = old_by_fp.pop(key.fingerprint, None)
            if prev is not None:
                old = <_Key>prev
                key = old
        result.append(key)
    return result, skipped

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

# ---------------------------------------------------------------------------------------------
# JWS only (test vectors whose payload is not a claim set)


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
