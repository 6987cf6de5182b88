"""Project Wycheproof vectors through fastgate's public verifier API.

Vectors are read from ``$FASTGATE_WYCHEPROOF_DIR`` (the ``wycheproof_dir`` fixture skips the
module when it is unset); they are never copied into the repository. The files are unmodified
copies of C2SP/wycheproof ``testvectors_v1/`` at commit
dac1dd4729fd1f8dd9e1e9f3dce51d783da6c166 (Apache-2.0). Every test id carries the vector's
``tcId`` (``jws-tc357``, ``ecdsa_p256-tc12``, ...).

What each group of tests proves
===============================

JOSE files (the verdict of the vector carries over exactly)
-----------------------------------------------------------
* ``json_web_signature_test.json`` (``jws-tcN``), ``json_web_key_test.json`` (``jwk-tcN``) and
  the ``jws_*`` groups of ``json_web_crypto_test.json`` (``jwcrypto-tcN``): each compact token
  goes through ``fastgate.verify_jws(token, key)`` with the group's key (``public`` when present,
  else ``private``), ``algorithms=None``. ``valid`` -> ``Reason.OK``; ``invalid`` -> not OK, and
  where the failure has one well-defined cause the reason family is asserted as well.
* ``json_web_encryption_test.json`` (``jwe-tcN``) and the ``jwe_*`` groups of
  ``json_web_crypto_test.json``: every JWE (5 segments, the "missing ... and separator" 4-segment
  variants and the JSON serialization) is rejected with TOKEN_MALFORMED, whatever its label:
  fastgate is a JWS-only validator (SPEC §3 step 4; catalog A2/A11/A12). A usable HS256 key is
  handed in so that the token's structure is the only defect.

Documented deviations from the Wycheproof labels (decided policy, not bugs):
* jws tc367/tc370 (``invalidBase64Padding*``) are byte-identical to the valid tc357: the ``=``
  padding was lost when upstream generated them, so they cannot be honoured -> skipped.
  ``=`` padding is covered by our own tests elsewhere (catalog A5).
* jws tc372/tc373 are labelled ``valid`` although a ``?`` was inserted into a segment (a lenient
  base64 decoder drops it). fastgate's decoder is strict (RFC 7515 §2, SPEC §3 step 4):
  asserted rejected with TOKEN_MALFORMED.
* jws tc346/tc350 (key ``alg: PS256``, token ``PS384``) and tc347/tc351 (key ``alg: ES521``, not
  a registered JWS name, token ``ES512``) are labelled ``valid``. fastgate binds a JWK's ``alg``
  strictly (SPEC §3 step 4, catalog B8): tc346/tc350 are asserted rejected with
  ALG_NOT_ALLOWED; for tc347/tc351 the unregistered key alg makes the key unusable (it is
  dropped at load time), so no key answers the token's kid: KEY_NOT_FOUND.

Reason families of invalid vectors: a vector whose payload segment is empty (``H..S``) may be
refused as TOKEN_MALFORMED before its intended defect is reached, because fastgate refuses an
empty payload as detached content (RFC 7515 App. F, catalog A15). The key policy those vectors
target (jwk tc8 1024-bit modulus, tc9 e = 1) is asserted separately through
``Verifier.set_jwks`` (``jwk-keyset-tcN``), which also covers every other asymmetric key of
``json_web_key_test.json``. Valid vectors with an empty payload (jws tc259/264/268/272/320/325)
keep Wycheproof's label: ``verify_jws`` must accept them.

Primitive files (the vector's verdict does NOT carry over in general)
---------------------------------------------------------------------
A primitive vector signs its ``msg`` bytes, while a JWS signs the ASCII of
``b64u(header) "." b64u(payload)``. None of the primitive vectors' ``msg`` has the shape of a JWS
signing input (each primitive test re-checks this premise for its own vector), and fastgate
exposes no
lower-level "verify these bytes" entry (by design: ``verify_jws`` is the narrowest public
entry, SPEC §6), so a primitive (msg, sig) pair cannot be replayed through fastgate. What these
tests do instead, per file:

* ``*-key-tcN`` (one per group, id = the group's first tcId): the group's public JWK
  (``publicKeyJwk``/``keyJwk``; for the DER ECDSA file built from ``wx``/``wy``) is loaded by
  ``Verifier.set_jwks`` and must be reported loaded, not skipped. Proves: fastgate's JWK->key
  path accepts every key shape of the file (EdgeCasePublicKey coordinates, 4096-bit moduli,
  e = 3 per the verifier's policy of accepting odd e >= 3).
* ``<file>-tcN`` (every test of ECDSA P1363, ECDSA DER, RSA PKCS#1, RSA-PSS, Ed25519): the
  token is ``b64u({"alg","kid"}) "." b64u(msg) "." b64u(sig)`` with the vector's own key, so
  the JWS payload equals the vector's ``msg``. Every one must be rejected: invalid signatures
  are invalid, and valid ones sign ``msg``, not our signing input. The reason must be
  SIGNATURE_INVALID when the signature has the algorithm's exact length (which proves the key
  loaded, was bound to the alg and the signature math ran), else SIGNATURE_INVALID or
  TOKEN_MALFORMED. Proves: no byte shape of the file (empty, truncated, with garbage, DER,
  r/s = 0/n, s >= n, ...) is accepted, raises, or is misattributed. Does NOT prove that fastgate
  accepts the file's valid signatures or rejects its invalid ones for the reason Wycheproof
  means (PKCS#1/PSS padding checks, Ed25519 malleability): for that we rely on
  ``cryptography``/OpenSSL and on the JOSE file's rs256/ps256/ps512/SpecialCaseEs256 groups,
  which do carry over.
* ``ecdsa_p*-recovered-tcN`` (ECDSA P1363, and ``ecdsa_p256_der-recovered-tcN`` for the valid
  DER vectors): ECDSA admits public-key recovery. For the vector's (r, s) and OUR JWS signing
  input with hash e we compute Q' = (r mod n)^-1 * (s*R - e*G), where R is the curve point
  with x = r. Then (r, s) is a mathematically valid ECDSA signature over our signing input
  under Q' exactly when 1 <= r, s < n (``cryptography`` checks this inside the test, so an
  arithmetic slip fails loudly). fastgate must accept the vector's exact signature bytes under
  Q' iff 1 <= r, s < n, and must reject the out-of-range ones (RangeCheck, IntegerOverflow)
  even though their reduced twins verify under Q'. For the DER file the raw R||S form must be
  accepted and the DER bytes of the same (r, s) rejected (catalog D4). Proves: fastgate's raw
  R||S decoding handles every valid byte shape of the file (leading zero bytes, small r/s,
  high s) and range-checks r and s. Does NOT prove anything about the vector's own key.
  Vectors without a curve point R (r = 0 mod n, or neither r nor r + n is an x-coordinate)
  and P1363 vectors of the wrong length are left out of this test (every valid vector of the
  three files is in it).
* ``hmac_sha*-tcN``: for HMAC the vector gives the key, so the verdict carries over honestly.
  We compute the vector's tag modification delta = tag XOR HMAC(key, msg)[:tagSize], apply it
  to HMAC(key, signing_input)[:tagSize] and send that. Expected OK exactly for ``valid``
  vectors with a full-length tag and keySize >= the hash size; truncated tags (JWS needs the
  full MAC, RFC 7518 §3.2) and short keys (the key is unusable) are rejected, and every
  "Flipped bit"/"all zero" modification is rejected as SIGNATURE_INVALID. Each test first
  checks HMAC(key, msg)[:tagSize] == tag for valid vectors (our reading of the file).

Empty messages: a vector with an empty ``msg`` becomes a token with an empty payload, which
fastgate refuses as detached content (RFC 7515 App. F, catalog A15) before the signature is
looked at; whether an empty JWS payload is acceptable at all is decided by the JOSE vectors
(jws tc259/264/268/272/320/325), not here. So for those vectors the token with the vector's
own (empty) payload may also come back TOKEN_MALFORMED, and every such vector is sent a second
time with the fixed non-empty payload ``b"wycheproof"`` (nothing here depends on the payload
bytes: a primitive verdict never carried over through them), which carries the strict
assertion. This matters: every modified-tag vector of the HMAC files has an empty message.

``acceptable`` results occur only in the RSA PKCS#1 files ("missing NULL"); their verdict does
not carry over (see above), so they are asserted rejected like every other primitive vector.
RSA-PSS groups whose sLen or MGF1 hash differ from the JOSE alg's (RFC 7518 §3.5) would be
skipped with a reason; the files in use have none.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _pytest.mark import ParameterSet
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from fastgate import Reason, Verifier, verify_jws
from tests.factory import b64u, b64u_json

WYCHEPROOF_COMMIT = "dac1dd4729fd1f8dd9e1e9f3dce51d783da6c166"
_ROOT = os.environ.get("FASTGATE_WYCHEPROOF_DIR")
_ISSUER = "https://wycheproof.test/"

R = Reason
MALFORMED = frozenset({R.TOKEN_MALFORMED})
SIG = frozenset({R.SIGNATURE_INVALID})
SIG_OR_MALFORMED = frozenset({R.SIGNATURE_INVALID, R.TOKEN_MALFORMED})
ALG = frozenset({R.ALG_NOT_ALLOWED})
# A key fastgate must not use (wrong use/key_ops/alg/kty, too small, bad point): the token is
# refused either because the key was dropped at load time (no key for the kid) or because the
# alg cannot be bound to it (SPEC §3 step 4, §5).
KEY_UNUSABLE = frozenset({R.ALG_NOT_ALLOWED, R.KEY_NOT_FOUND})
ANY_REJECT = frozenset(r for r in Reason if r is not R.OK)

# A usable signing key handed in with the JWE vectors, so that the token is the only defect.
_HS256_KEY = {"kty": "oct", "k": b64u(bytes(range(32)))}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@functools.cache
def _load(name: str) -> dict[str, Any]:
    assert _ROOT is not None
    data: dict[str, Any] = json.loads((Path(_ROOT) / name).read_text(encoding="utf-8"))
    return data


def _params(name: str, build: Callable[[dict[str, Any]], list[ParameterSet]]
            ) -> list[ParameterSet]:
    """Parametrize from a vector file; one placeholder when the directory is not available
    (the test then asks for the ``wycheproof_dir`` fixture, which skips or fails loudly)."""
    if not _ROOT or not (Path(_ROOT) / name).is_file():
        return [pytest.param(None, id=f"{name.removesuffix('.json')}-unavailable")]
    return build(_load(name))


C = TypeVar("C")


def _need(case: C | None, wycheproof_dir: Path) -> C:
    """The case of a vector file; a failure when the file is missing (the fixture skipped
    already when ``FASTGATE_WYCHEPROOF_DIR`` is unset)."""
    if case is None:
        pytest.fail(f"vector file missing under {wycheproof_dir}")
    return case


def _b64u_dec(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


# --------------------------------------------------------------------------------------------
# JOSE files: the vector's verdict carries over
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoseCase:
    tc: int
    comment: str
    result: str
    token: str
    key: dict[str, Any]
    expect_ok: bool
    reasons: frozenset[Reason] = field(default=ANY_REJECT)
    why: str = ""


# Label quirks of json_web_signature_test.json (see the module docstring).
_JWS_SKIP = {
    367: "byte-identical to valid tc357: the '=' padding was lost upstream; cannot be honoured",
    370: "byte-identical to valid tc357: the '=' padding was lost upstream; cannot be honoured",
}
_JWS_STRICT_BASE64 = {372, 373}  # labelled valid; strict base64url rejects '?'
# labelled valid; the key's alg pins the token alg (346/350) or is unregistered (347/351)
_JWS_STRICT_ALG_BINDING = {346: ALG, 350: ALG, 347: frozenset({R.KEY_NOT_FOUND}),
                           351: frozenset({R.KEY_NOT_FOUND})}


def _token_text(raw: Any) -> str:
    if raw is None:  # json_web_crypto's rejectsEmptyString carries null
        return ""
    if isinstance(raw, str):
        return raw
    return json.dumps(raw)  # JSON serialization vectors carry an object


def _header_of(token: str) -> dict[str, Any] | None:
    try:
        hdr = json.loads(_b64u_dec(token.split(".")[0]))
    except (ValueError, IndexError):
        return None
    return hdr if isinstance(hdr, dict) else None


def _empty_payload(token: str) -> bool:
    parts = token.split(".")
    return len(parts) == 3 and parts[1] == ""


def _keys_of(key: dict[str, Any]) -> list[dict[str, Any]]:
    return list(key["keys"]) if "keys" in key else [key]


def _sig_len_for(key: dict[str, Any], alg: str) -> int | None:
    if alg.startswith(("RS", "PS")):
        for k in _keys_of(key):
            if k.get("kty") == "RSA":
                return len(_b64u_dec(k["n"]).lstrip(b"\0"))
        return None
    return {"ES256": 64, "ES384": 96, "ES512": 132, "HS256": 32, "HS384": 48, "HS512": 64,
            "EdDSA": 64}.get(alg)


# Invalid vectors whose only defect is the key (json_web_key_test.json, the JWS file's
# rsa_encryption/ec_key_for_encryption groups, json_web_crypto's ROCA group): wrong use or
# key_ops, RSA < 2048 bits, e = 1, ROCA modulus, HMAC key shorter than the hash or empty,
# unregistered or mismatched alg/crv/kty, invalid point, AES keys (SPEC §5; catalog H).
_KEY_UNUSABLE_COMMENTS = frozenset({
    "rejectWrongUse", "rejectWrongKeyOps", "rejectsWrongUse", "rejects1024bitRsaKey",
    "rejectsPublicExponent1", "rejectsKeyWithRocaVulnerability", "key_too_short", "empty_key",
    "mismatchedAlgAndCurve", "rejectsModifiedKey", "rejectsAesKey",
})


def _invalid_reasons(test: dict[str, Any], token: str, key: dict[str, Any]) -> frozenset[Reason]:
    """The reason family of an invalid JOSE vector, where the cause is well-defined."""
    comment = test["comment"]
    flags = set(test["flags"])
    if "JsonSerialization" in flags or comment in ("rejectsValidJsonSerialization",):
        return MALFORMED
    if comment == "rejectsEmptyString":
        return frozenset({R.TOKEN_MALFORMED, R.TOKEN_MISSING})
    if token.count(".") != 2 or token.startswith("."):
        # Missing/extra segments or an empty header (RFC 7515 §7.1; catalog A1/A2).
        return MALFORMED
    hdr = _header_of(token)
    if "AlgIsNone" in flags or (hdr is not None and str(hdr.get("alg", "")).lower() == "none"):
        return ALG  # RFC 8725 §3.1; catalog B1
    if comment in ("rejectsMissingSignature", "rejectsMissingPayload"):
        return SIG_OR_MALFORMED
    if comment == "rejectsModifiedHeader":  # kid changed: no such key, or the MAC breaks
        return frozenset({R.KEY_NOT_FOUND, R.SIGNATURE_INVALID})
    if comment.startswith("rejectsSymmetryConfusionAttacks"):
        return ALG  # HS256 over an EC key's bytes (catalog B3/B4)
    if comment == "rejectsAttackerProvidedEmbeddedJwk":
        return SIG_OR_MALFORMED  # the header jwk is never trusted (catalog B11)
    if comment in _KEY_UNUSABLE_COMMENTS:
        return KEY_UNUSABLE
    if "WrongPrimitive" in flags:
        key_alg = _keys_of(key)[0].get("alg")
        if hdr is not None and hdr.get("alg") != key_alg:
            return ALG  # key alg PS512 pins the token alg (catalog B8)
        return SIG  # alg matches the key, the signature was made with another scheme
    if "ModifiedPadding" in flags or "ModifiedSignature" in flags or comment in (
        "rejectsModifiedSignature", "rejectsModifiedPayload",
    ):
        alg = hdr.get("alg") if hdr else None
        want = _sig_len_for(key, alg) if isinstance(alg, str) else None
        got = len(_b64u_dec(token.split(".")[2])) if want is not None else None
        return SIG if want is not None and got == want else SIG_OR_MALFORMED
    return ANY_REJECT


def _base64_group_reasons(test: dict[str, Any]) -> frozenset[Reason]:
    if test["comment"] == "ModifiedUnusedBitsInPayload":
        # Non-zero unused bits: a strict decoder says malformed; a decoder that re-encodes
        # finds the MAC wrong. Both are acceptable (catalog A9).
        return SIG_OR_MALFORMED
    return MALFORMED  # whitespace, '?', '#', non-canonical encoding (catalog A5-A9)


def _jose_cases(data: dict[str, Any], tag: str, *, jws_quirks: bool) -> list[ParameterSet]:
    out: list[ParameterSet] = []
    for group in data["testGroups"]:
        key = group.get("public") or group["private"]
        for test in group["tests"]:
            tc = test["tcId"]
            raw = test.get("jws", test.get("jwe"))
            token = _token_text(raw)
            marks: list[Any] = []
            if test["result"] == "valid":
                case = JoseCase(tc, test["comment"], "valid", token, key, True, ANY_REJECT)
            elif test["result"] == "invalid":
                reasons = (_base64_group_reasons(test) if group.get("comment") == "base64"
                           else _invalid_reasons(test, token, key))
                if _empty_payload(token):
                    reasons |= MALFORMED  # refused as detached content first (catalog A15)
                case = JoseCase(tc, test["comment"], "invalid", token, key, False, reasons)
            else:  # pragma: no cover - no acceptable vectors in the JOSE files
                raise AssertionError(f"{tag} tc{tc}: unexpected result {test['result']}")
            if jws_quirks:
                if tc in _JWS_SKIP:
                    marks.append(pytest.mark.skip(reason=_JWS_SKIP[tc]))
                elif tc in _JWS_STRICT_BASE64:
                    case = JoseCase(tc, test["comment"], test["result"], token, key, False,
                                    MALFORMED, "documented deviation: strict base64url")
                elif tc in _JWS_STRICT_ALG_BINDING:
                    case = JoseCase(tc, test["comment"], test["result"], token, key, False,
                                    _JWS_STRICT_ALG_BINDING[tc],
                                    "documented deviation: strict JWK alg binding")
            out.append(pytest.param(case, id=f"{tag}-tc{tc}", marks=marks))
    return out


def _crypto_jws_cases(data: dict[str, Any]) -> list[ParameterSet]:
    jws_only = {**data, "testGroups": [g for g in data["testGroups"]
                                       if not str(g.get("comment", "")).startswith("jwe")]}
    return _jose_cases(jws_only, "jwcrypto", jws_quirks=False)


def _check_jose(case: JoseCase) -> None:
    got = verify_jws(case.token, case.key)
    assert isinstance(got, Reason)
    detail = f"tc{case.tc} {case.comment} ({case.result}{'; ' + case.why if case.why else ''})"
    if case.expect_ok:
        assert got is R.OK, f"{detail}: expected OK, got {got.name}"
    else:
        assert got is not R.OK, f"{detail}: invalid token accepted"
        assert got in case.reasons, (
            f"{detail}: expected one of {sorted(r.name for r in case.reasons)}, got {got.name}")


@pytest.mark.parametrize("case", [
    *_params("json_web_signature_test.json", lambda d: _jose_cases(d, "jws", jws_quirks=True)),
    *_params("json_web_key_test.json", lambda d: _jose_cases(d, "jwk", jws_quirks=False)),
    *_params("json_web_crypto_test.json", _crypto_jws_cases),
])
def test_jose_vector(wycheproof_dir: Path, case: JoseCase | None) -> None:
    """The JWS vectors of json_web_signature_test (``jws-``), json_web_key_test (``jwk-``) and
    the JWS groups of json_web_crypto_test (``jwcrypto-``)."""
    _check_jose(_need(case, wycheproof_dir))


# json_web_key_test.json: what Verifier.set_jwks (the JWKS path every provider uses) must do
# with each asymmetric key set. Groups with oct keys are left out: a JWKS never yields an HMAC
# key (catalog B5), which says nothing about those vectors.
_JWK_SET_KEY_ONLY_DEFECT = {
    6: "use enc", 7: "ROCA modulus", 8: "1024-bit modulus", 9: "e = 1",
    19: "alg ES521 on P-256", 20: "alg ES224", 21: "use enc", 22: "point not on curve",
    23: "crv P-384 with P-256 coordinates", 24: "kty RSA with EC members",
}


def _jwk_set_cases(data: dict[str, Any]) -> list[ParameterSet]:
    out = []
    for group in data["testGroups"]:
        keys = _keys_of(group.get("public") or group["private"])
        if any(k.get("kty") == "oct" for k in keys):
            continue
        for test in group["tests"]:
            tc = test["tcId"]
            if test["result"] == "valid":
                want = None
            else:
                assert tc in _JWK_SET_KEY_ONLY_DEFECT, f"jwk tc{tc}: classify this vector"
                want = _JWK_SET_KEY_ONLY_DEFECT[tc]
            out.append(pytest.param((tc, keys, want), id=f"jwk-keyset-tc{tc}"))
    return out


@pytest.mark.parametrize("case", _params("json_web_key_test.json", _jwk_set_cases))
def test_json_web_key_set_policy(wycheproof_dir: Path,
                                 case: tuple[int, list[dict[str, Any]], str | None] | None
                                 ) -> None:
    case = _need(case, wycheproof_dir)
    tc, keys, defect = case
    verifier = Verifier(issuer=_ISSUER, jwks={"keys": []})
    report = verifier.set_jwks({"keys": keys})
    if defect is None:
        assert report.loaded == len(keys) and not report.skipped, f"tc{tc}: {report.skipped}"
    else:
        # SPEC §5: unusable keys are skipped (logged, counted), never loaded.
        assert report.loaded == 0, f"tc{tc}: key with defect '{defect}' was loaded"
        assert len(report.skipped) == len(keys)


def _jwe_cases(data: dict[str, Any], tag: str) -> list[ParameterSet]:
    return [pytest.param((test["tcId"], _token_text(test["jwe"])), id=f"{tag}-tc{test['tcId']}")
            for group in data["testGroups"] for test in group["tests"] if "jwe" in test]


def _check_jwe(case: tuple[int, str]) -> None:
    tc, token = case
    got = verify_jws(token, _HS256_KEY)
    # A JWE has 5 segments (RFC 7516 §7.1), the truncated variants 4, the JSON form none:
    # all fail the compact-JWS segment count before any key is consulted (catalog A2/A12).
    assert got is R.TOKEN_MALFORMED, f"tc{tc}: expected TOKEN_MALFORMED, got {got.name}"


@pytest.mark.parametrize("case", [
    *_params("json_web_encryption_test.json", lambda d: _jwe_cases(d, "jwe")),
    *_params("json_web_crypto_test.json", lambda d: _jwe_cases(d, "jwcrypto_jwe")),
])
def test_jwe_rejected(wycheproof_dir: Path, case: tuple[int, str] | None) -> None:
    """The JWE vectors of json_web_encryption_test (``jwe-``) and json_web_crypto_test
    (``jwcrypto_jwe-``)."""
    _check_jwe(_need(case, wycheproof_dir))


# --------------------------------------------------------------------------------------------
# Primitive files
# --------------------------------------------------------------------------------------------

# (test-id label, file, the JWS alg the file's primitive is)
_SIG_FILES: list[tuple[str, str, str]] = [
    ("ecdsa_p256", "ecdsa_secp256r1_sha256_p1363_test.json", "ES256"),
    ("ecdsa_p384", "ecdsa_secp384r1_sha384_p1363_test.json", "ES384"),
    ("ecdsa_p521", "ecdsa_secp521r1_sha512_p1363_test.json", "ES512"),
    ("ecdsa_p256_der", "ecdsa_secp256r1_sha256_test.json", "ES256"),
    ("rsa_2048_sha256", "rsa_signature_2048_sha256_test.json", "RS256"),
    ("rsa_2048_sha384", "rsa_signature_2048_sha384_test.json", "RS384"),
    ("rsa_2048_sha512", "rsa_signature_2048_sha512_test.json", "RS512"),
    ("rsa_pss_2048_sha256", "rsa_pss_2048_sha256_mgf1_32_test.json", "PS256"),
    ("rsa_pss_2048_sha384", "rsa_pss_2048_sha384_mgf1_48_test.json", "PS384"),
    ("rsa_pss_4096_sha512", "rsa_pss_4096_sha512_mgf1_64_test.json", "PS512"),
    ("ed25519", "ed25519_test.json", "EdDSA"),
]

_HASH_BYTES = {"256": 32, "384": 48, "512": 64}
_EC_SIZE = {"P-256": 32, "P-384": 48, "P-521": 66}
_EC_ALG_CRV = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


def _group_jwk(group: dict[str, Any], alg: str) -> dict[str, Any]:
    jwk = group.get("publicKeyJwk") or group.get("keyJwk")
    if jwk is not None:
        return dict(jwk)
    # ecdsa_secp256r1_sha256_test.json (DER) carries no JWK: build it from the raw point.
    pub = group["publicKey"]
    crv = _EC_ALG_CRV[alg]
    size = _EC_SIZE[crv]
    return {"kty": "EC", "crv": crv, "kid": "none",
            "x": b64u(int(pub["wx"], 16).to_bytes(size, "big")),
            "y": b64u(int(pub["wy"], 16).to_bytes(size, "big"))}


def _pss_mismatch(group: dict[str, Any], alg: str) -> str | None:
    """RFC 7518 §3.5: PSxxx means MGF1 with the same hash and a salt of the hash length."""
    if not alg.startswith("PS"):
        return None
    bits = alg[2:]
    want_sha = f"SHA-{bits}"
    if group.get("sha") != want_sha or group.get("mgfSha") != want_sha \
            or group.get("sLen") != _HASH_BYTES[bits] or group.get("mgf", "MGF1") != "MGF1":
        return (f"group parameters sha={group.get('sha')} mgfSha={group.get('mgfSha')} "
                f"sLen={group.get('sLen')} are not those of JOSE {alg}")
    return None


def _expected_sig_len(jwk: dict[str, Any], alg: str) -> int:
    if alg.startswith(("RS", "PS")):
        return len(_b64u_dec(jwk["n"]).lstrip(b"\0"))
    if alg == "EdDSA":
        return 64
    return 2 * _EC_SIZE[_EC_ALG_CRV[alg]]


@dataclass(frozen=True)
class KeyCase:
    label: str
    tc: int
    alg: str
    jwk: dict[str, Any]


@dataclass(frozen=True)
class SigCase(KeyCase):
    msg: bytes
    sig: bytes
    result: str
    flags: tuple[str, ...]


SigGroup = Callable[[str, str, dict[str, Any], list[Any]], list[ParameterSet]]


def _sig_file_params(build: SigGroup, unavailable: str) -> list[ParameterSet]:
    """``build(label, alg, group, marks)`` for every group of every signature file (marks:
    the skip of a PSS group whose parameters the JWS alg cannot express); one placeholder
    ``{label}<unavailable>`` per missing file."""
    out: list[ParameterSet] = []
    for label, name, alg in _SIG_FILES:
        if not _ROOT or not (Path(_ROOT) / name).is_file():
            out.append(pytest.param(None, id=f"{label}{unavailable}"))
            continue
        for group in _load(name)["testGroups"]:
            skip = _pss_mismatch(group, alg)
            marks = [pytest.mark.skip(reason=skip)] if skip else []
            out.extend(build(label, alg, group, marks))
    return out


def _sig_cases() -> list[ParameterSet]:
    def build(label: str, alg: str, group: dict[str, Any], marks: list[Any]
              ) -> list[ParameterSet]:
        jwk = _group_jwk(group, alg)
        return [pytest.param(SigCase(label, t["tcId"], alg, jwk, bytes.fromhex(t["msg"]),
                                     bytes.fromhex(t["sig"]), t["result"], tuple(t["flags"])),
                             id=f"{label}-tc{t['tcId']}", marks=marks)
                for t in group["tests"]]

    return _sig_file_params(build, "-unavailable")


def _key_cases() -> list[ParameterSet]:
    def build(label: str, alg: str, group: dict[str, Any], marks: list[Any]
              ) -> list[ParameterSet]:
        first = group["tests"][0]["tcId"]
        return [pytest.param(KeyCase(label, first, alg, _group_jwk(group, alg)),
                             id=f"{label}-key-tc{first}", marks=marks)]

    return _sig_file_params(build, "-key-unavailable")


_B64URL = re.compile(rb"[A-Za-z0-9_-]+")


def _is_signing_input(msg: bytes) -> bool:
    """Whether msg has the shape ASCII(b64u(JSON object) "." b64u(payload))."""
    head, dot, payload = msg.partition(b".")
    if not dot or not _B64URL.fullmatch(head) or (payload and not _B64URL.fullmatch(payload)):
        return False
    try:
        return isinstance(json.loads(_b64u_dec(head.decode())), dict)
    except ValueError:
        return False


_COMPANION_PAYLOAD = b"wycheproof"


def _payloads(msg: bytes) -> list[bytes]:
    """The vector's msg as the payload, plus a non-empty companion when msg is empty (the
    companion first, so its strict assertion is reported even if the empty one differs)."""
    return [msg] if msg else [_COMPANION_PAYLOAD, msg]


def _token(alg: str, kid: str | None, payload: bytes, sig: bytes) -> tuple[str, bytes]:
    hdr: dict[str, Any] = {"alg": alg}
    if kid is not None:
        hdr["kid"] = kid
    signing_input = f"{b64u_json(hdr)}.{b64u(payload)}"
    return f"{signing_input}.{b64u(sig)}", signing_input.encode("ascii")


@pytest.mark.parametrize("case", _key_cases())
def test_primitive_group_key_loads(wycheproof_dir: Path, case: KeyCase | None) -> None:
    case = _need(case, wycheproof_dir)
    jwk = dict(case.jwk)
    verifier = Verifier(issuer=_ISSUER, jwks={"keys": [jwk]}, algorithms=[case.alg])
    report = verifier.set_jwks({"keys": [jwk]})
    assert report.loaded == 1, f"{case.label} tc{case.tc}: key skipped: {report.skipped}"
    assert not report.skipped
    assert verifier.has_keys and verifier.key_count == 1


@pytest.mark.parametrize("case", _sig_cases())
def test_primitive_signature_rejected_over_jws_input(wycheproof_dir: Path,
                                                     case: SigCase | None) -> None:
    case = _need(case, wycheproof_dir)
    # The premise of this mapping: msg is not itself a JWS signing input, so (msg, sig) cannot
    # be replayed as a token and the vector's verdict does not carry over.
    assert not _is_signing_input(case.msg), f"{case.label} tc{case.tc}: msg is H.P-shaped"
    exact = len(case.sig) == _expected_sig_len(case.jwk, case.alg)
    for payload in _payloads(case.msg):
        token, _ = _token(case.alg, case.jwk.get("kid"), payload, case.sig)
        got = verify_jws(token, case.jwk)
        detail = (f"{case.label} tc{case.tc} ({case.result}, {','.join(case.flags)}, "
                  f"payload {'msg' if payload == case.msg else 'companion'})")
        assert got is not R.OK, f"{detail}: a signature over msg was accepted over a JWS input"
        # An empty payload may be refused first (catalog A15, see the module docstring).
        if exact and payload and case.label != "ecdsa_p256_der":
            assert got is R.SIGNATURE_INVALID, \
                f"{detail}: expected SIGNATURE_INVALID, got {got.name}"
        else:
            assert got in SIG_OR_MALFORMED, \
                f"{detail}: expected SIGNATURE_INVALID or TOKEN_MALFORMED, got {got.name}"


# --- ECDSA public-key recovery ---------------------------------------------------------------
#
# Curve constants (SEC 2 / FIPS 186-4 D.1.2). They are cross-checked against `cryptography`
# (the generator lies on the curve; (n-1)*G == -G; n is rejected as a private scalar) by
# test_ecdsa_curve_constants, so a transcription error fails loudly.

_CURVES: dict[str, tuple[ec.EllipticCurve, int, int, int, Any, Any]] = {
    "P-256": (
        ec.SECP256R1(),
        0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF,
        0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
        0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
        hashlib.sha256, hashes.SHA256,
    ),
    "P-384": (
        ec.SECP384R1(),
        2**384 - 2**128 - 2**96 + 2**32 - 1,
        int("B3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875A"
            "C656398D8A2ED19D2A85C8EDD3EC2AEF", 16),
        int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF"
            "581A0DB248B0A77AECEC196ACCC52973", 16),
        hashlib.sha384, hashes.SHA384,
    ),
    "P-521": (
        ec.SECP521R1(),
        2**521 - 1,
        int("0051953EB9618E1C9A1F929A21A0B68540EEA2DA725B99B315F3B8B489918EF1"
            "09E156193951EC7E937B1652C0BD3BB1BF073573DF883D2C34F1EF451FD46B503F00", 16),
        int("01FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
            "FA51868783BF2F966B7FCC0148F709A5D03BB5C9B8899C47AEBB6FB71E91386409", 16),
        hashlib.sha512, hashes.SHA512,
    ),
}

_Jac = tuple[int, int, int]
_INF: _Jac = (0, 1, 0)


def _jdouble(pt: _Jac, p: int) -> _Jac:
    # Jacobian doubling for a = -3 (all three NIST curves).
    x, y, z = pt
    if z == 0 or y == 0:
        return _INF
    yy = y * y % p
    s = 4 * x * yy % p
    zz = z * z % p
    m = 3 * (x - zz) * (x + zz) % p
    x3 = (m * m - 2 * s) % p
    return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * y * z % p


def _jadd(a: _Jac, b: _Jac, p: int) -> _Jac:
    if a[2] == 0:
        return b
    if b[2] == 0:
        return a
    x1, y1, z1 = a
    x2, y2, z2 = b
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    if u1 == u2:
        return _jdouble(a, p) if s1 == s2 else _INF
    h, r = (u2 - u1) % p, (s2 - s1) % p
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - s1 * hhh) % p, z1 * z2 * h % p


def _jmul(k: int, x: int, y: int, p: int) -> _Jac:
    acc, base = _INF, (x, y, 1)
    for bit in bin(k)[2:]:
        acc = _jdouble(acc, p)
        if bit == "1":
            acc = _jadd(acc, base, p)
    return acc


def _affine(pt: _Jac, p: int) -> tuple[int, int] | None:
    if pt[2] == 0:
        return None
    zi = pow(pt[2], -1, p)
    return pt[0] * zi * zi % p, pt[1] * zi * zi * zi % p


def _lift_x(crv: str, x: int) -> int | None:
    """A y with (x, y) on the curve, or None (p = 3 mod 4 for all three curves)."""
    _, p, b, _, _, _ = _CURVES[crv]
    if not 0 <= x < p:
        return None
    rhs = (x * x * x - 3 * x + b) % p
    y = pow(rhs, (p + 1) // 4, p)
    return y if y * y % p == rhs else None


@dataclass(frozen=True)
class RecoverCase:
    label: str
    tc: int
    alg: str
    crv: str
    msg: bytes
    r: int
    s: int
    raw: bytes  # the exact signature bytes sent as R||S
    der: bytes | None  # DER bytes of the same (r, s) for the DER file (catalog D4)
    result: str


def _recover_cases() -> list[ParameterSet]:
    out: list[ParameterSet] = []
    for label, name, alg in _SIG_FILES:
        if not alg.startswith("ES"):
            continue
        if not _ROOT or not (Path(_ROOT) / name).is_file():
            out.append(pytest.param(None, id=f"{label}-recovered-unavailable"))
            continue
        crv = _EC_ALG_CRV[alg]
        size = _EC_SIZE[crv]
        n = _CURVES[crv][3]
        der_file = label.endswith("_der")
        for group in _load(name)["testGroups"]:
            for t in group["tests"]:
                sig = bytes.fromhex(t["sig"])
                if der_file:
                    if t["result"] != "valid":
                        continue  # only strict DER of a valid (r, s) has a raw twin
                    r, s = decode_dss_signature(sig)
                    raw, der = r.to_bytes(size, "big") + s.to_bytes(size, "big"), sig
                else:
                    if len(sig) != 2 * size:
                        continue  # wrong length: covered by the rejection test above
                    r, s = int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big")
                    raw, der = sig, None
                if r % n == 0 or (_lift_x(crv, r) is None and _lift_x(crv, r + n) is None):
                    continue  # no point R with x = r: nothing to recover
                out.append(pytest.param(
                    RecoverCase(label, t["tcId"], alg, crv, bytes.fromhex(t["msg"]), r, s,
                                raw, der, t["result"]),
                    id=f"{label}-recovered-tc{t['tcId']}"))
    return out


def _recover_key(crv: str, signing_input: bytes, r: int, s: int) -> ec.EllipticCurvePublicKey:
    """Q' = (r mod n)^-1 * (s*R - e*G): (r, s) then verifies over signing_input under Q'."""
    curve, p, _, n, hfun, _ = _CURVES[crv]
    x = r if _lift_x(crv, r) is not None else r + n
    y = _lift_x(crv, x)
    assert y is not None
    e = int.from_bytes(hfun(signing_input).digest(), "big")  # hash bits <= curve bits
    rinv = pow(r % n, -1, n)
    u_r, u_g = s * rinv % n, (-e * rinv) % n
    acc = _jmul(u_r, x, y, p)
    if u_g:
        # u_g * G via OpenSSL (fast), added in Python.
        g = ec.derive_private_key(u_g, curve).public_key().public_numbers()
        acc = _jadd(acc, (g.x, g.y, 1), p)
    q = _affine(acc, p)
    if q is None:
        pytest.skip("recovered key is the point at infinity")
    return ec.EllipticCurvePublicNumbers(q[0], q[1], curve).public_key()


def test_ecdsa_curve_constants() -> None:
    for crv, (curve, p, b, n, _, _) in _CURVES.items():
        g = ec.derive_private_key(1, curve).public_key().public_numbers()
        assert (g.y * g.y - (g.x**3 - 3 * g.x + b)) % p == 0, crv
        neg = ec.derive_private_key(n - 1, curve).public_key().public_numbers()
        assert (neg.x, neg.y) == (g.x, p - g.y), crv
        with pytest.raises(ValueError):
            ec.derive_private_key(n, curve)


def _ecdsa_valid(pub: ec.EllipticCurvePublicKey, crv: str, data: bytes, r: int, s: int) -> bool:
    try:
        pub.verify(encode_dss_signature(r, s), data, ec.ECDSA(_CURVES[crv][5]()))
    except InvalidSignature:
        return False
    return True


@pytest.mark.parametrize("case", _recover_cases())
def test_ecdsa_signature_bytes_under_recovered_key(wycheproof_dir: Path,
                                                   case: RecoverCase | None) -> None:
    case = _need(case, wycheproof_dir)
    for payload in _payloads(case.msg):
        _check_recovered(case, payload)


def _check_recovered(case: RecoverCase, payload: bytes) -> None:
    crv, n = case.crv, _CURVES[case.crv][3]
    size = _EC_SIZE[crv]
    token, signing_input = _token(case.alg, None, payload, case.raw)
    pub = _recover_key(crv, signing_input, case.r, case.s)
    nums = pub.public_numbers()
    jwk = {"kty": "EC", "crv": crv, "x": b64u(nums.x.to_bytes(size, "big")),
           "y": b64u(nums.y.to_bytes(size, "big"))}
    in_range = 1 <= case.r < n and 1 <= case.s < n
    # Preconditions, checked with cryptography so a recovery slip fails here, not in fastgate:
    # the reduced (r, s) always verifies under Q'; the sent (r, s) verifies iff in range.
    if case.s % n:
        assert _ecdsa_valid(pub, crv, signing_input, case.r % n, case.s % n)
    if in_range:
        assert _ecdsa_valid(pub, crv, signing_input, case.r, case.s)
    if case.result == "valid":
        assert in_range, f"{case.label} tc{case.tc}: valid vector with out-of-range r/s?"

    got = verify_jws(token, jwk)
    detail = (f"{case.label} tc{case.tc} ({case.result}, "
              f"payload {'msg' if payload == case.msg else 'companion'})")
    if not payload:  # the empty-payload policy is decided by the JOSE vectors (A15)
        assert got in (R.OK, R.TOKEN_MALFORMED) if in_range else got in SIG_OR_MALFORMED, \
            f"{detail}: got {got.name}"
    elif in_range:
        assert got is R.OK, f"{detail}: valid raw R||S rejected: {got.name}"
    else:
        # r >= n or s >= n (RangeCheck/IntegerOverflow) or s == 0: the reduced twin verifies,
        # so accepting these would be a missing range check (SEC 1 §4.1.4 step 1).
        assert got in SIG_OR_MALFORMED, f"{detail}: out-of-range r/s gave {got.name}"
    if case.der is not None:
        der_token, _ = _token(case.alg, None, payload, case.der)
        got_der = verify_jws(der_token, jwk)
        # RFC 7518 §3.4: the JWS form is R||S; the DER of the very same valid (r, s) is refused.
        assert got_der in SIG_OR_MALFORMED, f"{detail}: DER signature gave {got_der.name}"


# --- HMAC: the key is in the vector, so the verdict carries over -----------------------------


@dataclass(frozen=True)
class MacCase:
    label: str
    tc: int
    alg: str
    key: bytes
    msg: bytes
    tag: bytes
    key_bits: int
    tag_bits: int
    result: str
    comment: str


def _mac_cases() -> list[ParameterSet]:
    out: list[ParameterSet] = []
    for bits in ("256", "384", "512"):
        name, label = f"hmac_sha{bits}_test.json", f"hmac_sha{bits}"
        if not _ROOT or not (Path(_ROOT) / name).is_file():
            out.append(pytest.param(None, id=f"{label}-unavailable"))
            continue
        for group in _load(name)["testGroups"]:
            for t in group["tests"]:
                out.append(pytest.param(
                    MacCase(label, t["tcId"], f"HS{bits}", bytes.fromhex(t["key"]),
                            bytes.fromhex(t["msg"]), bytes.fromhex(t["tag"]),
                            group["keySize"], group["tagSize"], t["result"], t["comment"]),
                    id=f"{label}-tc{t['tcId']}"))
    return out


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("case", _mac_cases())
def test_hmac_vector_as_jws(wycheproof_dir: Path, case: MacCase | None) -> None:
    case = _need(case, wycheproof_dir)
    digest = "sha" + case.alg[2:]
    full_bits = int(case.alg[2:])
    tag_len = case.tag_bits // 8
    on_msg = hmac.new(case.key, case.msg, digest).digest()[:tag_len]
    if case.result == "valid":
        assert on_msg == case.tag, f"tc{case.tc}: our HMAC disagrees with the vector"
    delta = _xor(case.tag, on_msg)  # zero for valid vectors, the modification otherwise
    full_tag = case.tag_bits == full_bits
    strong_key = case.key_bits >= full_bits
    for payload in _payloads(case.msg):
        hdr = b64u_json({"alg": case.alg})
        signing_input = f"{hdr}.{b64u(payload)}".encode("ascii")
        tag = _xor(hmac.new(case.key, signing_input, digest).digest()[:tag_len], delta)
        token = f"{signing_input.decode()}.{b64u(tag)}"
        got = verify_jws(token, {"kty": "oct", "k": b64u(case.key)})

        detail = (f"{case.label} tc{case.tc} ({case.result}, {case.comment!r}, "
                  f"key {case.key_bits} bits, tag {case.tag_bits} bits, "
                  f"payload {'msg' if payload == case.msg else 'companion'})")
        if not payload and got is R.TOKEN_MALFORMED:
            continue  # the empty-payload policy is decided by the JOSE vectors (A15)
        if case.result == "valid" and full_tag and strong_key:
            assert got is R.OK, f"{detail}: expected OK, got {got.name}"
            continue
        assert got is not R.OK, f"{detail}: accepted"
        if not strong_key:
            # RFC 7518 §3.2: a key shorter than the hash output MUST NOT be used.
            assert got in KEY_UNUSABLE, f"{detail}: short key gave {got.name}"
        elif not full_tag:
            # RFC 7518 §3.2 / catalog D10: the JWS MAC is the full HMAC output; a prefix fails.
            assert got in SIG_OR_MALFORMED, f"{detail}: truncated tag gave {got.name}"
        else:
            assert got is R.SIGNATURE_INVALID, f"{detail}: modified tag gave {got.name}"
