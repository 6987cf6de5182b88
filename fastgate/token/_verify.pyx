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

Layout: this file holds the cimports and imports, the C-level rebindings, the reason enum, the
detail strings and the algorithm tables; the rest is included, in this order:

- ``_jose.pxi``: strict base64url, duplicate JSON members / depth, the parsed and cached JWS
  header (``_Header``);
- ``_keys.pxi``: the prepared key (``_Key``), JWK -> key and JWKS -> keys, the signature check;
- ``_results.pxi``: ``Result`` and ``KeyReport``;
- ``_cache.pxi``: the verified-token cache (``TokenCache``: the LRU and the negative cache);
- ``_verifier.pxi``: ``Verifier`` and ``IssuerSet``;
- ``_request.pxi``: the request path (``_run``: size, segments, cache, header, issuer, key,
  signature);
- ``_claims.pxi``: the claim checks of a validly signed token;
- ``_dpop.pxi``: DPoP proofs (``DpopRule``, thumbprints, ``normalize_htu``);
- ``_jws.pxi``: ``verify_jws`` (format, binding and signature only).

Includes, not modules: it stays ONE extension module, so a call from one file into another is
still a direct C call of a ``cdef`` function or a ``cdef class`` method, the hot path gets no
Python-level indirection (no cross-module cimport through a capsule), and there is no ``.pxd``
declaring the shared types and functions to keep in step with their definitions. The order
is the order the code had in one file: module-level statements run top to bottom at import
(the tables are built before anything uses them) and the generated C is the same as the
unsplit module's. A cdef class may be named as a type before its definition (Cython reads the
whole module first); the one thing that must come first is a base class, and there is none.
``_clock`` stays here, between the includes, because both the request path and the DPoP
check read it and its place keeps that order.
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
# The rest of the module, by concern (see the module docstring), in the order it runs at import.

include "_jose.pxi"


# Wall-clock seconds for the time checks (the request path and DPoP proofs).
cdef inline double _clock() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9

include "_keys.pxi"
include "_results.pxi"
include "_cache.pxi"
include "_verifier.pxi"
include "_request.pxi"
include "_claims.pxi"
include "_dpop.pxi"
include "_jws.pxi"
