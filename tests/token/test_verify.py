"""The compiled verifier: one case per Reason it produces, the security catalog sections A-F
(/work/shared/research/security-catalog.md; ids in the test ids), key loading, the
verified-token cache and the never-raises contract.

Tokens come from tests/factory.py, which signs with `cryptography` directly, so a verifier bug
cannot hide behind a matching minting bug. Time is always passed in (`now=NOW`).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import socket
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate import IssuerSet, KeyReport, Reason, Result, TokenCache, Verifier, verify_jws
from fastgate.token import _verify
from tests.factory import (
    ASYMMETRIC_ALGS,
    AUDIENCE,
    HMAC_ALGS,
    ISSUER,
    NOW,
    SigningKey,
    b64u,
    b64u_json,
    default_claims,
    generate,
    jwks_of,
    key_for,
    make_token,
    public_jwk,
)
from tests.sources import compiled_source

R = Reason
SKEW = 60
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
ED25519_L = 2**252 + 27742317777372353535851937790883648493

RS = key_for("RS256")
ES = key_for("ES256")
ED = key_for("EdDSA")
HS = key_for("HS256")
ATTACKER_ES = generate("ES256", kid=ES.kid)  # same kid as the legitimate key, other material
ATTACKER_RS = generate("RS256", kid=RS.kid)


# ---------------------------------------------------------------------------------- helpers


def verifier(*keys: SigningKey, **kw: Any) -> Verifier:
    kw.setdefault("audiences", [AUDIENCE])
    if keys and keys[0].alg.startswith("HS"):
        return Verifier(ISSUER, secret=keys[0].private, **kw)
    return Verifier(ISSUER, jwks=jwks_of(*(keys or (RS, ES, ED))), **kw)


def check(v: Verifier | IssuerSet, token: Any, reason: Reason, now: float = NOW,
          detail: str | None = None) -> Result:
    r = v.verify(token, now=now)
    assert r.detail != "internal error"
    assert r.reason is reason, f"got {r.reason.label} ({r.detail}), want {reason.label}"
    assert r.ok is (reason is R.OK)
    if detail is not None:
        assert r.detail == detail
    return r


def segment(obj: Any) -> str:
    return b64u(obj) if isinstance(obj, bytes) else b64u_json(obj)


def signed(key: SigningKey, header: Any, payload: Any) -> str:
    """Sign arbitrary header / payload (objects, or exact bytes) with ``key``."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    return f"{signing_input}.{b64u(key.sign(signing_input.encode()))}"


def with_sig(token: str, sig: bytes) -> str:
    return token.rsplit(".", 1)[0] + "." + b64u(sig)


def hdr(key: SigningKey, **extra: Any) -> dict[str, Any]:
    return {"alg": key.alg, "kid": key.kid, "typ": "JWT", **extra}


def hs_token(mac_key: bytes, header: dict[str, Any], claims: dict[str, Any] | None = None,
             digest: str = "sha256") -> str:
    signing_input = f"{b64u_json(header)}.{b64u_json(claims or default_claims())}"
    return f"{signing_input}.{b64u(hmac.new(mac_key, signing_input.encode(), digest).digest())}"


def raw_b64u(s: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def raw_sig(token: str) -> bytes:
    return raw_b64u(token.rsplit(".", 1)[1])


# ----------------------------------------------------------------- one case per Reason


def test_every_asymmetric_alg_verifies(asym_key: SigningKey) -> None:
    v = verifier(asym_key)
    r = check(v, make_token(asym_key), R.OK, detail="ok")
    assert r.claims == default_claims()
    assert r.alg == asym_key.alg and r.kid == asym_key.kid and r.issuer == ISSUER
    assert r.verifier is v and r.header == {"alg": asym_key.alg, "typ": "JWT",
                                            "kid": asym_key.kid}
    assert r.payload == default_claims()


def test_every_hmac_alg_verifies(hmac_key: SigningKey) -> None:
    v = verifier(hmac_key)
    assert check(v, make_token(hmac_key), R.OK).claims == default_claims()
    assert v.algorithms == {a for a in HMAC_ALGS if int(a[2:]) // 8 <= len(hmac_key.private)}


def test_bytes_and_str_tokens_are_equivalent() -> None:
    v = verifier(RS, cache_size=0)
    token = make_token(RS)
    assert check(v, token, R.OK).claims == check(v, token.encode(), R.OK).claims


@pytest.mark.parametrize("alg", ["Ed25519", "Ed448"])
def test_rfc9864_eddsa_names_are_bound_to_the_curve(alg: str) -> None:
    key = generate(alg)
    v = verifier(key)
    check(v, make_token(key), R.OK)
    check(v, make_token(key, alg="EdDSA"), R.OK)  # the generic name fits both curves
    other = "Ed448" if alg == "Ed25519" else "Ed25519"
    check(v, make_token(key, alg=other), R.ALG_NOT_ALLOWED, detail="alg/key binding")
    # a JWK alg pins the token alg exactly
    pinned = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(key, with_alg=True))
    check(pinned, make_token(key, alg="EdDSA"), R.ALG_NOT_ALLOWED)


def test_reason_malformed() -> None:
    check(verifier(), "not-a-token", R.TOKEN_MALFORMED, detail="segment count")


def test_reason_too_large() -> None:
    v = verifier(RS, max_token_bytes=100)
    check(v, make_token(RS), R.TOKEN_TOO_LARGE, detail="token size")
    check(v, make_token(RS).encode(), R.TOKEN_TOO_LARGE)


def test_reason_alg_not_allowed() -> None:
    check(verifier(RS, algorithms=["RS256"]), make_token(ES), R.ALG_NOT_ALLOWED,
          detail="alg not allowed")


def test_reason_issuer_unknown() -> None:
    token = make_token(RS, default_claims(iss="https://other.example/"))
    r = check(verifier(RS), token, R.ISSUER_UNKNOWN, detail="issuer")
    assert r.issuer == "https://other.example/"


def test_reason_key_not_found_names_the_kid() -> None:
    r = check(verifier(RS), make_token(RS, kid="rotated-away"), R.KEY_NOT_FOUND,
              detail="kid unknown")
    assert r.kid == "rotated-away"  # the data plane asks the key source for this kid


def test_reason_signature_invalid() -> None:
    check(verifier(RS), with_sig(make_token(RS), ATTACKER_RS.sign(b"x")), R.SIGNATURE_INVALID,
          detail="signature")


def test_reason_expired() -> None:
    token = make_token(RS, default_claims(exp=int(NOW) - SKEW - 1))
    check(verifier(RS), token, R.TOKEN_EXPIRED, detail="exp")


def test_reason_not_yet_valid() -> None:
    token = make_token(RS, default_claims(nbf=int(NOW) + SKEW + 1))
    check(verifier(RS), token, R.TOKEN_NOT_YET_VALID, detail="nbf")


def test_reason_audience_mismatch() -> None:
    token = make_token(RS, default_claims(aud="api://other"))
    check(verifier(RS), token, R.AUDIENCE_MISMATCH, detail="aud")


def test_reason_claim_missing() -> None:
    token = make_token(RS, default_claims(exp=None))
    check(verifier(RS), token, R.CLAIM_MISSING, detail="required claim")


def test_reason_jwks_unavailable() -> None:
    v = Verifier(ISSUER, [AUDIENCE])
    assert not v.has_keys
    r = check(v, make_token(RS), R.JWKS_UNAVAILABLE)
    assert r.verifier is v
    # a key set with no usable key does not make the provider ready
    report = v.set_jwks({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "x"}]})
    assert report.loaded == 0 and not v.has_keys
    check(v, make_token(RS), R.JWKS_UNAVAILABLE)
    v.set_jwks(jwks_of(RS))
    assert v.has_keys
    check(v, make_token(RS), R.OK)
    # has_keys is "usable keys now": a key set emptied later (a key source dropped its keys
    # past max_stale) is jwks_unavailable (503, SPEC §4), not the client's key_not_found
    report = v.set_jwks({"keys": []})  # still allowed: it empties the set
    assert report.loaded == 0 and not v.has_keys and v.key_count == 0
    r = check(v, make_token(RS), R.JWKS_UNAVAILABLE, detail="no keys loaded")
    assert r.verifier is v
    check(v, make_token(RS, kid=None), R.JWKS_UNAVAILABLE)
    # a set of only unusable keys empties it too
    v.set_jwks(jwks_of(RS))
    v.set_jwks({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "x"}]})
    assert not v.has_keys
    check(v, make_token(RS), R.JWKS_UNAVAILABLE)
    # and keys coming back make it answer normally again
    v.set_jwks(jwks_of(ES))
    assert v.has_keys
    check(v, make_token(RS), R.KEY_NOT_FOUND)
    check(v, make_token(ES), R.OK)


def test_check_order_signature_before_claims() -> None:
    v = verifier(RS)
    expired = default_claims(exp=int(NOW) - 3600, aud="api://other")
    forged = with_sig(make_token(RS, expired), ATTACKER_RS.sign(b"x"))
    check(v, forged, R.SIGNATURE_INVALID)
    check(v, make_token(RS, expired), R.TOKEN_EXPIRED)
    # ... and the issuer is chosen before any key work
    check(v, make_token(ATTACKER_RS, default_claims(iss="x")), R.ISSUER_UNKNOWN)


# ------------------------------------------------------------- A. structure and encoding

def _good() -> str:
    return make_token(RS)


def _h_p_s() -> tuple[str, str, str]:
    h, p, s = _good().split(".")
    return h, p, s


def _a_cases() -> list[Any]:
    h, p, s = _h_p_s()
    jwe = ("eyJhbGciOiJSU0EtT0FFUCIsImN0eSI6IkpXVCIsImVuYyI6IkExMjhHQ00ifQ."
           "a2V5.aXY.Y3Q.dGFn")
    json_serialization = json.dumps({"payload": p, "signatures": [
        {"protected": h, "signature": s}]})
    cases = [
        ("A1-empty", "", R.TOKEN_MALFORMED),
        ("A1-empty-bytes", b"", R.TOKEN_MALFORMED),
        ("A1-bearer-only", "Bearer ", R.TOKEN_MALFORMED),
        ("A2-two-segments", f"{h}.{p}", R.TOKEN_MALFORMED),
        ("A2-trailing-dot", f"{h}.{p}.{s}.", R.TOKEN_MALFORMED),
        ("A2-four-segments", f"{h}.{p}.{s}.foo", R.TOKEN_MALFORMED),
        ("A2-leading-dot", f".{h}.{p}.{s}", R.TOKEN_MALFORMED),
        ("A2-one-segment", h, R.TOKEN_MALFORMED),
        ("A2-dots-only", "..", R.TOKEN_MALFORMED),
        ("A3-100k-dots", "." * 100_000, R.TOKEN_TOO_LARGE),
        ("A3-bearer-100k-dots", "Bearer " + "." * 100_000, R.TOKEN_TOO_LARGE),
        ("A4-500KB-header", f"{'e' * 500_000}.{p}.{s}", R.TOKEN_TOO_LARGE),
        ("A4-500KB-signature", f"{h}.{p}.{'A' * 500_000}".encode(), R.TOKEN_TOO_LARGE),
        ("A11-json-serialization", json_serialization, R.TOKEN_MALFORMED),
        ("A12-jwe-5-segments", jwe, R.TOKEN_MALFORMED),
        ("A10-len-1-mod-4", f"eyJhb.{p}.{s}", R.TOKEN_MALFORMED),
        ("A10-payload-len-1-mod-4", f"{h}.{p}x{'x' * ((1 - len(p) - 1) % 4)}.{s}",
         R.TOKEN_MALFORMED),
        ("A15-empty-payload", f"{h}..{s}", R.TOKEN_MALFORMED),
        ("A15-empty-header", f".{p}.{s}", R.TOKEN_MALFORMED),
    ]
    mutations: tuple[tuple[str, Callable[[str], str]], ...] = (
        ("pad", lambda x: x + "="),
        ("pad2", lambda x: x + "=="),
        ("plus", lambda x: "+" + x[1:]),
        ("slash", lambda x: x[:-1] + "/" if len(x) % 4 != 1 else "/" + x[1:]),
        ("4-spaces", lambda x: x[:8] + "    " + x[8:]),
        ("newline", lambda x: x[:8] + "\n" + x[8:]),
        ("crlf", lambda x: x[:8] + "\r\n" + x[8:]),
        ("tab", lambda x: x[:8] + "\t" + x[8:]),
        ("space-next-to-dot", lambda x: x + " "),
        ("question", lambda x: x[:5] + "?" + x[6:]),
        ("hash", lambda x: x[:5] + "#" + x[6:]),
        ("percent", lambda x: x[:5] + "%" + x[6:]),
        ("nul", lambda x: x[:5] + "\x00" + x[6:]),
    )
    for name, seg_index in (("header", 0), ("payload", 1), ("signature", 2)):
        parts = [h, p, s]
        for label, mutate in mutations:
            mutated = list(parts)
            mutated[seg_index] = mutate(parts[seg_index])
            cid = {"pad": "A5", "pad2": "A5", "plus": "A6", "slash": "A6", "question": "A8",
                   "hash": "A8", "percent": "A8", "nul": "A8"}.get(label, "A7")
            cases.append((f"{cid}-{label}-in-{name}", ".".join(mutated), R.TOKEN_MALFORMED))
        non_ascii = list(parts)
        non_ascii[seg_index] = parts[seg_index][:5] + "é" + parts[seg_index][6:]
        cases.append((f"A8-non-ascii-str-in-{name}", ".".join(non_ascii), R.TOKEN_MALFORMED))
        cases.append((f"A8-non-ascii-bytes-in-{name}", ".".join(non_ascii).encode(),
                      R.TOKEN_MALFORMED))
    return [pytest.param(tok, reason, id=cid) for cid, tok, reason in cases]


@pytest.mark.parametrize(("token", "reason"), _a_cases())
def test_a_structure_and_encoding(token: Any, reason: Reason) -> None:
    check(verifier(RS), token, reason)


def test_a3_dot_flood_is_o1_memory() -> None:
    """A3 without the size cap: counting segments must not allocate per dot."""
    v = verifier(RS, max_token_bytes=2_000_000)
    token = b"." * 1_000_000
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        r = v.verify(token, now=NOW)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert r.reason is R.TOKEN_MALFORMED and r.detail == "segment count"
    assert peak < 4096


def _trailing_bits_token(seg_index: int) -> str:
    """A9: the same bytes with non-zero unused bits in the last character of a segment."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for pad in range(4):
        claims = default_claims(x="y" * pad)
        parts = make_token(RS, claims).split(".")
        seg = parts[seg_index]
        if len(seg) % 4 in (2, 3):
            last = alphabet.index(seg[-1])
            assert last & 1 == 0  # canonical encoders leave the unused bits zero
            parts[seg_index] = seg[:-1] + alphabet[last | 1]
            return ".".join(parts)
    raise AssertionError("no segment length with unused bits")


@pytest.mark.parametrize("seg_index", [1, 2], ids=["A9-payload", "A9-signature"])
def test_a9_non_canonical_trailing_bits(seg_index: int) -> None:
    check(verifier(RS), _trailing_bits_token(seg_index), R.TOKEN_MALFORMED, detail="base64url")


def test_a9_header_trailing_bits() -> None:
    header = hdr(RS, x="")
    for pad in range(4):
        header["x"] = "y" * pad
        h = b64u_json(header)
        if len(h) % 4 in (2, 3):
            break
    token = signed(RS, header, default_claims())
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bad_h = h[:-1] + alphabet[alphabet.index(h[-1]) | 1]
    check(verifier(RS), bad_h + token[len(h):], R.TOKEN_MALFORMED, detail="base64url")


@pytest.mark.parametrize(("extra", "detail"), [
    pytest.param({"enc": "A128GCM"}, "jwe header", id="A13-enc"),
    pytest.param({"zip": "DEF"}, "jwe header", id="A13-zip"),
    pytest.param({"cty": "JWT"}, "nested jwt", id="A14-cty-JWT"),
    pytest.param({"cty": "jwt"}, "nested jwt", id="A14-cty-jwt"),
    pytest.param({"cty": "application/JWT"}, "nested jwt", id="A14-cty-application-jwt"),
])
def test_a13_a14_jwe_and_nested_headers(extra: dict[str, Any], detail: str) -> None:
    payload: Any = default_claims()
    if "cty" in extra:
        payload = make_token(RS).encode()  # the payload is another compact JWT
    check(verifier(RS), signed(RS, hdr(RS, **extra), payload), R.TOKEN_MALFORMED,
          detail=detail)


def test_a14_other_cty_is_not_nested() -> None:
    check(verifier(RS), signed(RS, hdr(RS, cty="application/json"), default_claims()), R.OK)


# --------------------------------------------------------------- B. header and algorithm

@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("sig", ["", "AAAA", "real"])
@pytest.mark.parametrize("kid", [None, "real"])
def test_b1_alg_none(alg: str, sig: str, kid: str | None) -> None:
    v = verifier(RS)
    header: dict[str, Any] = {"alg": alg}
    if kid:
        header["kid"] = RS.kid
    token = f"{b64u_json(header)}.{b64u_json(default_claims())}."
    if sig == "AAAA":
        token += sig
    elif sig == "real":
        token += b64u(RS.sign(token[:-1].encode()))
    check(v, token, R.ALG_NOT_ALLOWED, detail="alg none")


def test_b1_none_is_never_configurable() -> None:
    for alg in ("none", "None"):
        with pytest.raises(ValueError):
            Verifier(ISSUER, jwks=jwks_of(RS), algorithms=[alg])


@pytest.mark.parametrize(("alg", "reason"), [
    pytest.param(None, R.TOKEN_MALFORMED, id="B2-missing"),
    pytest.param("", R.ALG_NOT_ALLOWED, id="B2-empty"),
    pytest.param("null", R.TOKEN_MALFORMED, id="B2-null"),
    pytest.param(256, R.TOKEN_MALFORMED, id="B2-number"),
    pytest.param(["RS256"], R.TOKEN_MALFORMED, id="B2-array"),
    pytest.param({"RS256": 1}, R.TOKEN_MALFORMED, id="B2-object"),
    pytest.param(True, R.TOKEN_MALFORMED, id="B2-bool"),
    pytest.param("InvalidAlg", R.ALG_NOT_ALLOWED, id="B2-unknown"),
    pytest.param("RS256 ", R.ALG_NOT_ALLOWED, id="B2-trailing-space"),
    pytest.param("rs256", R.ALG_NOT_ALLOWED, id="B2-lowercase"),
    pytest.param("\uff32\uff33\uff12\uff15\uff16", R.ALG_NOT_ALLOWED, id="B2-fullwidth"),
    pytest.param("RS256\u200b", R.ALG_NOT_ALLOWED, id="B2-zero-width"),
    pytest.param("ES256K", R.ALG_NOT_ALLOWED, id="B7-es256k"),
])
def test_b2_bad_alg_values(alg: Any, reason: Reason) -> None:
    header: dict[str, Any] = {"kid": RS.kid, "typ": "JWT"}
    if alg == "null":
        header["alg"] = None
    elif alg is not None:
        header["alg"] = alg
    check(verifier(RS), signed(RS, header, default_claims()), reason)


def _self_signed_cert(private: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example.test")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(private.public_key()).serial_number(1)
               .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=365)))
    algorithm = None if isinstance(private, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(private, algorithm).public_bytes(serialization.Encoding.PEM)


def _public_encodings(key: SigningKey) -> dict[str, bytes]:
    """Every form of the IdP public key an attacker might use as an HMAC secret (B3/B4)."""
    pub = key.private.public_key()
    enc, fmt = serialization.Encoding, serialization.PublicFormat
    pem = pub.public_bytes(enc.PEM, fmt.SubjectPublicKeyInfo)
    out = {
        "B3-pem-spki": pem,
        "B3-pem-spki-no-newline": pem.rstrip(b"\n"),
        "B3-pem-spki-crlf": pem.replace(b"\n", b"\r\n"),
        "B3-cert-pem": _self_signed_cert(key.private),
        "B4-der-spki": pub.public_bytes(enc.DER, fmt.SubjectPublicKeyInfo),
        "B4-openssh": pub.public_bytes(enc.OpenSSH, fmt.OpenSSH),
        "B4-jwk-json": json.dumps(key.public_jwk).encode(),
        "B4-jwk-json-compact": json.dumps(key.public_jwk, separators=(",", ":")).encode(),
    }
    if isinstance(pub, rsa.RSAPublicKey):
        n = pub.public_numbers().n
        out["B3-pem-pkcs1"] = pub.public_bytes(enc.PEM, fmt.PKCS1)
        out["B4-raw-n"] = n.to_bytes((n.bit_length() + 7) // 8, "big")
        out["B4-b64-n"] = key.public_jwk["n"].encode()
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        point = pub.public_bytes(enc.X962, fmt.UncompressedPoint)
        out["B4-ec-point"] = point
        out["B4-ec-xy"] = point[1:]
    else:
        out["B4-ed25519-x"] = pub.public_bytes(enc.Raw, fmt.Raw)
    return out


def _confusion_cases() -> list[Any]:
    cases = []
    for key in (RS, ES, ED):
        for name, secret in _public_encodings(key).items():
            cases.append(pytest.param(key, secret, id=f"{name}-{key.alg}"))
    return cases


@pytest.mark.parametrize(("key", "mac_key"), _confusion_cases())
def test_b3_b4_hs_key_confusion(key: SigningKey, mac_key: bytes) -> None:
    token = hs_token(mac_key, {"alg": "HS256", "kid": key.kid, "typ": "JWT"})
    check(verifier(key), token, R.ALG_NOT_ALLOWED)
    check(verifier(key, algorithms=[key.alg]), token, R.ALG_NOT_ALLOWED)
    # verify_jws allows every alg by default: the key type still refuses HMAC
    assert verify_jws(token, key.public_jwk) is R.ALG_NOT_ALLOWED
    assert verify_jws(token, jwks_of(key)) is R.ALG_NOT_ALLOWED


def test_b5_oct_key_in_a_jwks_is_discarded() -> None:
    secret = os.urandom(32)
    doc = jwks_of(RS)
    doc["keys"].append({"kty": "oct", "kid": "k-oct", "k": b64u(secret)})
    v = Verifier(ISSUER, [AUDIENCE], jwks=doc)
    assert not v.has_kid("k-oct")
    token = hs_token(secret, {"alg": "HS256", "kid": "k-oct"})
    check(v, token, R.ALG_NOT_ALLOWED)
    with pytest.raises(ValueError):
        Verifier(ISSUER, jwks=doc, algorithms=["HS256"])


@pytest.mark.parametrize(("token_alg", "key"), [
    pytest.param("RS256", ES, id="B6-RS256-with-EC-key"),
    pytest.param("PS256", ES, id="B6-PS256-with-EC-key"),
    pytest.param("ES256", RS, id="B6-ES256-with-RSA-key"),
    pytest.param("EdDSA", ES, id="B6-EdDSA-with-EC-key"),
    pytest.param("ES256", ED, id="B6-ES256-with-OKP-key"),
    pytest.param("RS256", ED, id="B6-RS256-with-OKP-key"),
    pytest.param("ES384", ES, id="B7-ES384-with-P256"),
    pytest.param("ES512", ES, id="B7-ES512-with-P256"),
    pytest.param("ES256", key_for("ES384"), id="B7-ES256-with-P384"),
    pytest.param("ES384", key_for("ES512"), id="B7-ES384-with-P521"),
])
def test_b6_b7_alg_must_fit_the_key(token_alg: str, key: SigningKey) -> None:
    v = verifier(RS, ES, ED, key_for("ES384"), key_for("ES512"))
    token = signed(key, {"alg": token_alg, "kid": key.kid}, default_claims())
    check(v, token, R.ALG_NOT_ALLOWED, detail="alg/key binding")


@pytest.mark.parametrize("alg", ["RS256", "RS384", "RS512", "PS256", "PS384"])
def test_b8_jwk_alg_pins_the_token_alg(alg: str) -> None:
    key = SigningKey("PS512", "ps512-pinned", RS.private)
    v = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(key, with_alg=True))
    check(v, make_token(SigningKey(alg, key.kid, RS.private)), R.ALG_NOT_ALLOWED,
          detail="alg/key binding")
    check(v, make_token(key), R.OK)


@pytest.mark.parametrize("crit", [
    pytest.param({"crit": ["exp"], "exp": 1}, id="B9-crit-exp"),
    pytest.param({"crit": []}, id="B9-crit-empty"),
    pytest.param({"crit": ["alg"]}, id="B9-crit-alg"),
    pytest.param({"crit": ["absent"]}, id="B9-crit-absent-param"),
    pytest.param({"crit": "exp"}, id="B9-crit-not-array"),
    pytest.param({"crit": ["exp", "exp"], "exp": 1}, id="B9-crit-duplicates"),
    pytest.param({"crit": None}, id="B9-crit-null"),
    pytest.param({"crit": ["http://example.com/UNDEFINED"],
                  "http://example.com/UNDEFINED": True}, id="B9-rfc7515-appendix-e"),
])
def test_b9_crit_is_always_rejected(crit: dict[str, Any]) -> None:
    check(verifier(ES), signed(ES, hdr(ES, **crit), default_claims()), R.TOKEN_MALFORMED,
          detail="crit")


@pytest.mark.parametrize("b64", [
    pytest.param({"b64": False, "crit": ["b64"]}, id="B10-b64-false-crit"),
    pytest.param({"b64": False}, id="B10-b64-false"),
    pytest.param({"b64": True}, id="B10-b64-true"),
])
def test_b10_b64_is_rejected(b64: dict[str, Any]) -> None:
    header = {"alg": "HS256", **b64}
    raw_payload = json.dumps(default_claims()).encode()
    # RFC 7797: the MAC is over the raw payload, which must never be accepted
    signing_input = b64u_json(header).encode() + b"." + raw_payload
    token = f"{b64u_json(header)}.{b64u(raw_payload)}.{b64u(HS.sign(signing_input))}"
    detail = "crit" if "crit" in b64 else "b64"
    check(verifier(HS), token, R.TOKEN_MALFORMED, detail=detail)
    check(verifier(HS), signed(HS, header, default_claims()), R.TOKEN_MALFORMED)


def test_b11_embedded_jwk_is_never_used() -> None:
    v = verifier(ES)
    header = hdr(ES, jwk=ATTACKER_ES.public_jwk)
    check(v, signed(ATTACKER_ES, header, default_claims()), R.SIGNATURE_INVALID)
    header.pop("kid")
    check(v, signed(ATTACKER_ES, header, default_claims()), R.SIGNATURE_INVALID)
    # the header member is ignored, not a reason to reject a legitimate token
    check(v, signed(ES, hdr(ES, jwk=ATTACKER_ES.public_jwk), default_claims()), R.OK)


@pytest.mark.parametrize("member", ["jku", "x5u"])
@pytest.mark.parametrize("url", [
    "https://attacker.example/jwks.json", "file:///etc/passwd",
    "http://169.254.169.254/latest/meta-data/", "data:application/json,{}", "LOOPBACK",
])
def test_b12_jku_x5u_never_fetched(member: str, url: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        if url == "LOOPBACK":
            url = f"http://127.0.0.1:{server.getsockname()[1]}/jwks.json"
        v = verifier(ES)
        check(v, signed(ATTACKER_ES, hdr(ES, **{member: url}), default_claims()),
              R.SIGNATURE_INVALID)
        check(v, signed(ES, hdr(ES, **{member: url}), default_claims()), R.OK)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected


def test_b13_x5c_x5t_are_ignored() -> None:
    v = verifier(ES)
    cert = _self_signed_cert(ATTACKER_ES.private)
    der = x509.load_pem_x509_certificate(cert).public_bytes(serialization.Encoding.DER)
    x5c = {"x5c": [b64u(der)], "x5t": b64u(hashlib.sha1(der).digest()),
           "x5t#S256": b64u(hashlib.sha256(der).digest())}
    check(v, signed(ATTACKER_ES, hdr(ES, **x5c), default_claims()), R.SIGNATURE_INVALID)
    # Azure AD / ADFS tokens carry x5t: presence alone is not a reason to reject
    check(v, signed(ES, hdr(ES, x5t="bm90LWEtcmVhbC10aHVtYnByaW50"), default_claims()), R.OK)


@pytest.mark.parametrize("raw", [
    pytest.param(b'{"alg":"RS256","alg":"none","kid":"%s"}', id="B14-alg-then-none"),
    pytest.param(b'{"alg":"none","alg":"RS256","kid":"%s"}', id="B14-none-then-alg"),
    pytest.param(b'{"\\u0061lg":"none","alg":"RS256","kid":"%s"}', id="B14-escaped-name"),
    pytest.param(b'{"alg":"RS256","kid":"%s","kid":"other"}', id="B14-duplicate-kid"),
    pytest.param(b'{"alg":"RS256","kid":"%s","x":{"a":1,"a":2}}', id="B14-nested-duplicate"),
])
def test_b14_duplicate_header_names(raw: bytes) -> None:
    token = signed(RS, raw % RS.kid.encode(), default_claims())
    check(verifier(RS), token, R.TOKEN_MALFORMED, detail="duplicate member")


@pytest.mark.parametrize("typ", ["at+jwt", "JWT", "application/at+jwt", "anything", None])
def test_b15_typ_is_not_enforced(typ: str | None) -> None:
    """B15: fastgate has no configured typ (SPEC §2 has no such key), so typ is not checked;
    token-type confusion is caught by the audience instead (F10)."""
    header = {"alg": RS.alg, "kid": RS.kid}
    if typ is not None:
        header["typ"] = typ
    check(verifier(RS), signed(RS, header, default_claims()), R.OK)


# ------------------------------------------------------------------------ C. kid handling

@pytest.mark.parametrize("kid", [
    "../../../../../../dev/null", "/proc/self/environ", "C:\\windows\\win.ini",
    "file:///etc/passwd", "https://attacker.example/k",
], ids=lambda k: "C1-" + k[:12])
def test_c1_path_traversal_kid(kid: str) -> None:
    token = hs_token(b"", {"alg": "HS256", "kid": kid})
    check(verifier(RS), token, R.ALG_NOT_ALLOWED)
    check(verifier(HS), token, R.SIGNATURE_INVALID)  # the MAC key is the secret, never a file
    r = check(verifier(RS), make_token(RS, kid=kid), R.KEY_NOT_FOUND)
    assert r.kid == kid


@pytest.mark.parametrize("kid", [
    "x' UNION SELECT 'k", "' OR '1'='1", "$(id)", "|whoami", "${jndi:ldap://a.example/x}",
], ids=lambda k: "C2-" + k[:8])
def test_c2_injection_kid(kid: str) -> None:
    assert check(verifier(RS), make_token(RS, kid=kid), R.KEY_NOT_FOUND).kid == kid


def test_c3_long_kid() -> None:
    v = verifier(RS)
    check(v, make_token(RS, kid="k" * 10 * 1024), R.TOKEN_TOO_LARGE)  # over max_token_bytes
    check(v, make_token(RS, kid="k" * 5 * 1024), R.TOKEN_MALFORMED, detail="kid length")
    v_big = verifier(RS, max_token_bytes=64 * 1024)
    check(v_big, make_token(RS, kid="k" * 10 * 1024), R.TOKEN_MALFORMED, detail="kid length")
    check(v_big, make_token(RS, kid="k" * 257), R.TOKEN_MALFORMED, detail="kid length")
    check(v_big, make_token(RS, kid="k" * 256), R.KEY_NOT_FOUND)
    check(v, make_token(RS, kid="k" * 1024 * 1024), R.TOKEN_TOO_LARGE)


@pytest.mark.parametrize("kid", [1, None, [], {}, True, 1.5], ids=lambda k: f"C4-{k!r}")
def test_c4_non_string_kid(kid: Any) -> None:
    token = signed(RS, {"alg": "RS256", "kid": kid}, default_claims())
    check(verifier(RS), token, R.TOKEN_MALFORMED, detail="kid type")


@pytest.mark.parametrize("kid", ["a\u0000b", "k\r\nX-Injected: 1", "\u001b[31mred", "k\x7f"],
                         ids=["C5-nul", "C5-crlf", "C5-ansi", "C5-del"])
def test_c5_control_characters_in_kid(kid: str) -> None:
    r = check(verifier(RS), make_token(RS, kid=kid), R.TOKEN_MALFORMED, detail="kid characters")
    assert r.kid is None  # never handed to a key refresh or a log line


@pytest.mark.parametrize("variant", ["rs256-k\u0435y", "RS256-KEY", "rs256-key ", "\uff52s256-key"],
                         ids=["C6-cyrillic", "C6-case", "C6-space", "C6-fullwidth"])
def test_c6_kid_is_byte_exact(variant: str) -> None:
    assert RS.kid == "rs256-key"
    check(verifier(RS), make_token(RS, kid=variant), R.KEY_NOT_FOUND)


def test_c7_kidless_tries_at_most_two_keys() -> None:
    keys = [generate("ES256", kid=f"k{i}") for i in range(3)]
    v = verifier(*keys)
    assert _verify.MAX_KIDLESS_KEYS == 2
    check(v, make_token(keys[0], kid=None), R.OK)
    check(v, make_token(keys[1], kid=None), R.OK)
    check(v, make_token(keys[2], kid=None), R.SIGNATURE_INVALID)  # never "try every key"
    check(v, make_token(keys[2]), R.OK)  # with its kid it is found directly
    # only keys that fit the alg count: two RSA keys first do not use up the budget for ES256
    v2 = verifier(generate("RS256"), RS, keys[2])
    check(v2, make_token(keys[2], kid=None), R.OK)
    check(verifier(RS), make_token(ES, kid=None), R.KEY_NOT_FOUND, detail="no key for alg")


def test_c8_kid_of_another_issuer() -> None:
    other = generate("ES256", kid="issuer-b-key")
    a = verifier(ES)
    b = Verifier("https://b.example/", [AUDIENCE], jwks=jwks_of(other))
    routes = IssuerSet([a, b], TokenCache(10))
    token = make_token(other, default_claims())  # iss = issuer A, signed with B's key
    r = check(routes, token, R.KEY_NOT_FOUND)
    assert r.verifier is a
    check(routes, make_token(other, default_claims(iss="https://b.example/")), R.OK)


@pytest.mark.parametrize("kid", [
    "abc+def/ghi=", "a/B+c==", "XhB7sNZdvm5jAkQx2oUbRhSUq0Y", "1f0e3dad99908345f7439f8ffabdffc4",
], ids=["C9-cognito", "C9-base64", "C9-base64url", "C9-hex"])
def test_c9_real_world_kids_pass(kid: str) -> None:
    key = SigningKey("ES256", kid, ES.private)
    check(verifier(key), make_token(key), R.OK)


# ---------------------------------------------------------------------- D. signature bytes

def _es_token_with_raw(r: int, s: int, size: int = 32) -> str:
    return with_sig(make_token(ES), r.to_bytes(size, "big") + s.to_bytes(size, "big"))


@pytest.mark.parametrize(("alg", "length"), [("ES256", 64), ("ES384", 96), ("ES512", 132)])
def test_d1_psychic_signature(alg: str, length: int) -> None:
    key = key_for(alg)
    v = verifier(key)
    check(v, with_sig(make_token(key), bytes(length)), R.SIGNATURE_INVALID)
    check(v, with_sig(make_token(key), bytes.fromhex("3006020100020100")), R.SIGNATURE_INVALID)


_SPECIAL = {"0": 0, "1": 1, "n-1": P256_ORDER - 1, "n": P256_ORDER}


@pytest.mark.parametrize("r_name", list(_SPECIAL))
@pytest.mark.parametrize("s_name", list(_SPECIAL))
def test_d2_special_r_s(r_name: str, s_name: str) -> None:
    check(verifier(ES), _es_token_with_raw(_SPECIAL[r_name], _SPECIAL[s_name]),
          R.SIGNATURE_INVALID)


@pytest.mark.parametrize("case", ["r-too-big", "s-too-big", "both-max"], ids=lambda c: f"D2-{c}")
def test_d2_out_of_range(case: str) -> None:
    r, s = int.from_bytes(raw_sig(make_token(ES))[:32], "big"), 1
    big = 2**256 - 1
    r, s = {"r-too-big": (P256_ORDER + 1, s), "s-too-big": (r, P256_ORDER + 1),
            "both-max": (big, big)}[case]
    check(verifier(ES), _es_token_with_raw(r, s), R.SIGNATURE_INVALID)


@pytest.mark.parametrize("length", [0, 2, 16, 26, 32, 40, 63, 65, 66, 128],
                         ids=lambda n: f"D3-{n}-bytes")
def test_d3_wrong_es256_length(length: int) -> None:
    sig = raw_sig(make_token(ES))
    bad = (sig + bytes(length))[:length] if length <= 64 else sig + bytes(length - 64)
    check(verifier(ES), with_sig(make_token(ES), bad), R.SIGNATURE_INVALID)


def test_d3_leading_and_trailing_zeros() -> None:
    token = make_token(ES)
    sig = raw_sig(token)
    check(verifier(ES), with_sig(token, b"\x00" + sig), R.SIGNATURE_INVALID)
    check(verifier(ES), with_sig(token, sig + b"\x00"), R.SIGNATURE_INVALID)
    check(verifier(ES), token, R.OK)


@pytest.mark.parametrize("alg", ["ES256", "ES384", "ES512"])
def test_d4_der_instead_of_raw(alg: str) -> None:
    key = key_for(alg)
    token = make_token(key)
    sig = raw_sig(token)
    half = len(sig) // 2
    der = encode_dss_signature(int.from_bytes(sig[:half], "big"),
                               int.from_bytes(sig[half:], "big"))
    check(verifier(key), with_sig(token, der), R.SIGNATURE_INVALID)
    check(verifier(key), token, R.OK)


def test_d5_high_s_twin_is_accepted() -> None:
    token = make_token(ES)
    sig = raw_sig(token)
    r, s = sig[:32], int.from_bytes(sig[32:], "big")
    twin = with_sig(token, r + (P256_ORDER - s).to_bytes(32, "big"))
    assert twin != token
    # JWS does not require low-S (Wycheproof P1363 tc1 is "valid"): both verify, which is why
    # the cache is keyed on the whole token and nothing keys "seen" sets on signature bytes.
    v = verifier(ES)
    check(v, twin, R.OK)
    check(v, token, R.OK)


@pytest.mark.parametrize("case", ["strip-leading-byte", "add-leading-zero", "not-reduced",
                                  "append-byte", "flip-bit", "zero", "empty"],
                         ids=lambda c: f"D6-{c}")
def test_d6_rsa_signature_bytes(case: str) -> None:
    token = make_token(RS)
    sig = raw_sig(token)
    n = RS.private.public_key().public_numbers().n
    s = int.from_bytes(sig, "big")
    bad = {
        "strip-leading-byte": sig[1:],
        "add-leading-zero": b"\x00" + sig,
        "not-reduced": (s + n).to_bytes(((s + n).bit_length() + 7) // 8, "big"),
        "append-byte": sig + b"\x00",
        "flip-bit": bytes([sig[0] ^ 1]) + sig[1:],
        "zero": bytes(len(sig)),
        "empty": b"",
    }[case]
    check(verifier(RS), with_sig(token, bad), R.SIGNATURE_INVALID)


def _pkcs1_forgery(message: bytes, digest_info_prefix: str, pad_byte: int = 0xFF) -> bytes:
    """An RSA 'signature' over a hand-built EM (RFC 8017 §9.2) using the private exponent."""
    nums = RS.private.private_numbers()
    n, d = nums.public_numbers.n, nums.d
    k = (n.bit_length() + 7) // 8
    t = bytes.fromhex(digest_info_prefix) + hashlib.sha256(message).digest()
    ps = bytes([0xFF] * (k - len(t) - 3))
    ps = bytes([pad_byte]) + ps[1:]
    em = b"\x00\x01" + ps + b"\x00" + t
    forged: int = pow(int.from_bytes(em, "big"), d, n)
    return forged.to_bytes(k, "big")


_SHA256_DIGEST_INFO = "3031300d060960864801650304020105000420"


@pytest.mark.parametrize(("prefix", "pad_byte"), [
    pytest.param("302f300b0609608648016503040201" + "0420", 0xFF, id="D7-missing-null"),
    pytest.param("3031300d060960864801650304020305000420", 0xFF, id="D7-sha512-oid"),
    pytest.param("3031300d06096086480165030402010500" + "0421", 0xFF, id="D7-bad-length"),
    pytest.param(_SHA256_DIGEST_INFO, 0xFE, id="D7-padding-byte"),
])
def test_d7_pkcs1_tampering(prefix: str, pad_byte: int) -> None:
    token = make_token(RS)
    signing_input = token.rsplit(".", 1)[0].encode()
    # the construction itself is right: with the genuine DigestInfo it verifies
    check(verifier(RS), with_sig(token, _pkcs1_forgery(signing_input, _SHA256_DIGEST_INFO)),
          R.OK)
    check(verifier(RS), with_sig(token, _pkcs1_forgery(signing_input, prefix, pad_byte)),
          R.SIGNATURE_INVALID)


@pytest.mark.parametrize("case", ["salt-0", "salt-20", "salt-64", "salt-max", "mgf1-sha1",
                                  "pss-as-rs256", "pkcs1-as-ps256"], ids=lambda c: f"D8-{c}")
def test_d8_pss_parameters(case: str) -> None:
    key = SigningKey("PS256", RS.kid, RS.private)
    v = verifier(RS)  # JWK without alg: both RS* and PS* fit the key
    token = make_token(key)
    signing_input = token.rsplit(".", 1)[0].encode()
    sha = hashes.SHA256()
    pss: dict[str, Any] = {"salt-0": 0, "salt-20": 20, "salt-64": 64,
                           "salt-max": padding.PSS.MAX_LENGTH}
    if case in pss:
        sig = RS.private.sign(signing_input, padding.PSS(padding.MGF1(sha), pss[case]), sha)
    elif case == "mgf1-sha1":
        sig = RS.private.sign(signing_input, padding.PSS(padding.MGF1(hashes.SHA1()), 32), sha)
    elif case == "pss-as-rs256":
        token = make_token(RS)
        signing_input = token.rsplit(".", 1)[0].encode()
        sig = RS.private.sign(signing_input, padding.PSS(padding.MGF1(sha), 32), sha)
    else:
        sig = RS.private.sign(signing_input, padding.PKCS1v15(), sha)
    check(v, with_sig(token, sig), R.SIGNATURE_INVALID)
    check(v, token if case != "pss-as-rs256" else make_token(RS), R.OK)


@pytest.mark.parametrize("case", ["s-plus-l", "truncated", "garbage-appended", "random",
                                  "zero", "r-only"], ids=lambda c: f"D9-{c}")
def test_d9_ed25519_signature_bytes(case: str) -> None:
    token = make_token(ED)
    sig = raw_sig(token)
    s = int.from_bytes(sig[32:], "little")
    bad = {
        "s-plus-l": sig[:32] + (s + ED25519_L).to_bytes(32, "little"),
        "truncated": sig[:63],
        "garbage-appended": sig + b"\x01",
        "random": os.urandom(64),
        "zero": bytes(64),
        "r-only": sig[:32],
    }[case]
    check(verifier(ED), with_sig(token, bad), R.SIGNATURE_INVALID)


@pytest.mark.parametrize("case", ["truncated-16", "truncated-31", "empty", "other-encoding",
                                  "extended"], ids=lambda c: f"D10-{c}")
def test_d10_hmac_tag(case: str) -> None:
    v = verifier(HS)
    token = make_token(HS)
    tag = raw_sig(token)
    if case == "other-encoding":
        # the MAC of a differently spaced JSON of the same claims (Wycheproof tc375 shape)
        h = token.split(".")[0]
        other_p = b64u(json.dumps(default_claims(), indent=1).encode())
        bad = HS.sign(f"{h}.{other_p}".encode())
    else:
        bad = {"truncated-16": tag[:16], "truncated-31": tag[:31], "empty": b"",
               "extended": tag + b"\x00"}[case]
    check(v, with_sig(token, bad), R.SIGNATURE_INVALID)


def test_d11_hmac_compare_is_constant_time() -> None:
    """D11: the tag comparison is HMAC.verify (OpenSSL CRYPTO_memcmp), never ``==``."""
    source = compiled_source(Path(_verify.__file__).parent / "_verify.pyx")
    body = source[source.index("cdef bint _verify_sig("):source.index("cdef _Key _prepare_jwk(")]
    assert "h.verify(sig)" in body
    assert "== sig" not in body and "sig ==" not in body
    v = verifier(HS)
    token = make_token(HS)
    tag = raw_sig(token)
    check(v, with_sig(token, tag[:-1] + bytes([tag[-1] ^ 1])), R.SIGNATURE_INVALID)


# ---------------------------------------------------------------- E. JSON-level (both parts)

def _e_cases() -> list[tuple[str, bytes, Reason, str | None]]:
    """(id, raw JSON bytes, reason, detail) for a document placed in the header or payload.
    ``{alg}``-style objects are completed by the test; raw bytes are sent exactly."""
    deep_1000 = b'{"alg":"RS256","a":' + b"[" * 1000 + b"]" * 1000 + b"}"
    deep_2000 = b'{"alg":"RS256","a":' + b"[" * 2000 + b"]" * 2000 + b"}"
    return [
        ("E1-array", b"[]", R.TOKEN_MALFORMED, None),
        ("E1-string", b'"alg"', R.TOKEN_MALFORMED, None),
        ("E1-null", b"null", R.TOKEN_MALFORMED, None),
        ("E1-number", b"1", R.TOKEN_MALFORMED, None),
        ("E1-true", b"true", R.TOKEN_MALFORMED, None),
        ("E1-empty", b"", R.TOKEN_MALFORMED, None),
        ("E2-trailing-garbage", b'{"alg":"RS256"}x', R.TOKEN_MALFORMED, None),
        ("E2-two-objects", b'{"alg":"RS256"}{"alg":"RS256"}', R.TOKEN_MALFORMED, None),
        ("E2-trailing-comma", b'{"alg":"RS256",}', R.TOKEN_MALFORMED, None),
        ("E2-single-quotes", b"{'alg':'RS256'}", R.TOKEN_MALFORMED, None),
        ("E2-comment", b'{"alg":"RS256"/*x*/}', R.TOKEN_MALFORMED, None),
        ("E3-duplicate-sub", b'{"sub":"user","sub":"admin","alg":"RS256"}', R.TOKEN_MALFORMED,
         "duplicate member"),
        ("E3-duplicate-escaped", b'{"sub":"user","s\\u0075b":"admin","alg":"RS256"}',
         R.TOKEN_MALFORMED, "duplicate member"),
        ("E3-duplicate-nested", b'{"alg":"RS256","o":[{"a":1,"a":1}]}', R.TOKEN_MALFORMED,
         "duplicate member"),
        ("E4-nan", b'{"alg":"RS256","x":NaN}', R.TOKEN_MALFORMED, None),
        ("E4-infinity", b'{"alg":"RS256","x":Infinity}', R.TOKEN_MALFORMED, None),
        ("E4-minus-infinity", b'{"alg":"RS256","x":-Infinity}', R.TOKEN_MALFORMED, None),
        ("E5-1e400", b'{"alg":"RS256","x":1e400}', R.TOKEN_MALFORMED, None),
        ("E5-5000-digits", b'{"alg":"RS256","x":' + b"9" * 5000 + b"}", R.TOKEN_MALFORMED,
         None),
        ("E6-depth-1000", deep_1000, R.TOKEN_MALFORMED, "json depth"),
        ("E6-depth-2000", deep_2000, R.TOKEN_MALFORMED, None),
        ("E6-depth-4000", b'{"a":' + b"[" * 4000 + b"]" * 4000 + b"}", R.TOKEN_TOO_LARGE,
         None),
        ("E7-utf16le", '{"alg":"RS256"}'.encode("utf-16-le"), R.TOKEN_MALFORMED, None),
        ("E7-utf16be", '{"alg":"RS256"}'.encode("utf-16-be"), R.TOKEN_MALFORMED, None),
        ("E7-utf16-bom", '{"alg":"RS256"}'.encode("utf-16"), R.TOKEN_MALFORMED, None),
        ("E7-utf32", '{"alg":"RS256"}'.encode("utf-32"), R.TOKEN_MALFORMED, None),
        ("E7-utf8-bom", b'\xef\xbb\xbf{"alg":"RS256"}', R.TOKEN_MALFORMED, None),
        ("E7-invalid-ff", b'{"alg":"RS256","x":"\xff"}', R.TOKEN_MALFORMED, None),
        ("E7-overlong", b'{"alg":"RS256","x":"\xc0\xaf"}', R.TOKEN_MALFORMED, None),
        ("E7-cesu-surrogate", b'{"alg":"RS256","x":"\xed\xa0\x80\xed\xb0\x80"}',
         R.TOKEN_MALFORMED, None),
        ("E8-lone-high-surrogate", b'{"alg":"RS256","x":"\\ud800"}', R.TOKEN_MALFORMED, None),
        ("E8-lone-low-surrogate", b'{"alg":"RS256","x":"\\udc00"}', R.TOKEN_MALFORMED, None),
    ]


@pytest.mark.parametrize(("raw", "reason", "detail"),
                         [pytest.param(r, why, d, id=f"{cid}-header")
                          for cid, r, why, d in _e_cases()])
def test_e_json_in_header(raw: bytes, reason: Reason, detail: str | None) -> None:
    v = verifier(RS, max_token_bytes=8192)
    check(v, signed(RS, raw, default_claims()), reason, detail=detail)


@pytest.mark.parametrize(("raw", "reason", "detail"),
                         [pytest.param(r, why, d, id=f"{cid}-payload")
                          for cid, r, why, d in _e_cases()])
def test_e_json_in_payload(raw: bytes, reason: Reason, detail: str | None) -> None:
    v = verifier(RS)
    if raw == b"":
        # an empty payload segment is detached content (A15)
        check(v, signed(RS, hdr(RS), raw), R.TOKEN_MALFORMED, detail="empty payload")
        return
    check(v, signed(RS, hdr(RS), raw), reason, detail=detail)


@pytest.mark.parametrize(("exp", "reason"), [
    pytest.param(b"1e-400", R.TOKEN_EXPIRED, id="E5-exp-1e-400"),
    pytest.param(b"-0", R.TOKEN_EXPIRED, id="E5-exp-minus-zero"),
    pytest.param(b"9007199254740993", R.OK, id="E5-exp-2p53-plus-1"),
    pytest.param(b"18446744073709551615", R.OK, id="E5-exp-u64-max"),
    pytest.param(b"1e308", R.OK, id="E5-exp-1e308"),
    pytest.param(b"-1e308", R.TOKEN_EXPIRED, id="E5-exp-minus-1e308"),
])
def test_e5_number_edges(exp: bytes, reason: Reason) -> None:
    claims = json.dumps(default_claims(exp=None))[:-1].encode() + b', "exp": ' + exp + b"}"
    check(verifier(RS), signed(RS, hdr(RS), claims), reason)


def test_e6_moderate_nesting_passes() -> None:
    claims = default_claims(a=json.loads("[" * 30 + "]" * 30))
    assert check(verifier(RS), make_token(RS, claims), R.OK).claims == claims


def test_e6_depth_boundary() -> None:
    assert _verify.MAX_JSON_DEPTH == 32
    at_limit = default_claims(a=json.loads("[" * 31 + "]" * 31))  # 31 lists in the object
    check(verifier(RS), make_token(RS, at_limit), R.OK)
    over = default_claims(a=json.loads("[" * 32 + "]" * 32))
    check(verifier(RS), make_token(RS, over), R.TOKEN_MALFORMED, detail="json depth")


def test_e8_lone_surrogate_in_kid() -> None:
    raw = b'{"alg":"RS256","kid":"\\ud800"}'
    check(verifier(RS), signed(RS, raw, default_claims()), R.TOKEN_MALFORMED,
          detail="header json")


@pytest.mark.parametrize(("claims", "reason"), [
    pytest.param({"iss": "https://idp.examp1e.test/"}, R.ISSUER_UNKNOWN, id="E9-homoglyph-iss"),
    pytest.param({"iss": "https://idp.ex\u0430mple.test/"}, R.ISSUER_UNKNOWN, id="E9-cyrillic-iss"),
    pytest.param({"iss": "\uff48ttps://idp.example.test/"}, R.ISSUER_UNKNOWN, id="E9-nfkc-iss"),
    pytest.param({"aud": "api://ord\u0435rs"}, R.AUDIENCE_MISMATCH, id="E9-cyrillic-aud"),
    pytest.param({"sub": "user\u202e1"}, R.OK, id="E9-rtl-override-sub"),
    pytest.param({"sub": "us\u200der"}, R.OK, id="E9-zero-width-joiner-sub"),
])
def test_e9_unicode_is_compared_exactly(claims: dict[str, Any], reason: Reason) -> None:
    r = check(verifier(RS), make_token(RS, default_claims(**claims)), reason)
    if r.ok:
        assert r.claims == default_claims(**claims)  # returned as sent, never normalised


def test_e10_whitespace_is_legal() -> None:
    header = b'{"typ":"JWT",\r\n "alg":"RS256" , "kid" :\t"' + RS.kid.encode() + b'"}'
    payload = (b'{\r\n "iss" : "' + ISSUER.encode() + b'",\r\n "aud":"' + AUDIENCE.encode()
               + b'", "exp": ' + str(int(NOW) + 60).encode()
               + b' ,\n "x":"a:b\\":c\\\\", "y":{"k:":["::"]}}')
    r = check(verifier(RS), signed(RS, header, payload), R.OK)
    assert r.claims is not None and r.claims["x"] == 'a:b":c\\'
    assert r.claims["y"] == {"k:": ["::"]}


# ---------------------------------------------------------------------------- F. claims

def test_f1_exp_missing() -> None:
    check(verifier(RS), make_token(RS, default_claims(exp=None)), R.CLAIM_MISSING)
    # require=() accepts a token without exp
    check(verifier(RS, require=()), make_token(RS, default_claims(exp=None)), R.OK)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["9999999999", True, False, None, [1], {"a": 1}],
                         ids=["string", "true", "false", "null", "array", "object"])
def test_f2_numeric_date_type(claim: str, value: Any) -> None:
    token = make_token(RS, {**default_claims(), claim: value})
    check(verifier(RS), token, R.CLAIM_MISSING, detail=f"{claim} type")


def test_f3_float_exp_accepted() -> None:
    check(verifier(RS), make_token(RS, default_claims(exp=NOW + 0.5)), R.OK)
    check(verifier(RS), make_token(RS, default_claims(exp=NOW - SKEW - 0.5)), R.TOKEN_EXPIRED)


@pytest.mark.parametrize("exp", [int(NOW) - SKEW, int(NOW) - SKEW - 1, 0, -1, -10**12],
                         ids=["F4-at-boundary", "F4-before", "F4-zero", "F4-negative",
                              "F4-very-negative"])
def test_f4_expired(exp: int) -> None:
    # RFC 7519 §4.1.4: expired once now >= exp (+ skew), so exp == now - skew is expired
    check(verifier(RS), make_token(RS, default_claims(exp=exp)), R.TOKEN_EXPIRED, detail="exp")


def test_f4_just_valid_and_skew() -> None:
    check(verifier(RS), make_token(RS, default_claims(exp=int(NOW) - SKEW + 1)), R.OK)
    v0 = verifier(RS, clock_skew=0)
    check(v0, make_token(RS, default_claims(exp=int(NOW))), R.TOKEN_EXPIRED)
    check(v0, make_token(RS, default_claims(exp=int(NOW) + 1)), R.OK)


def test_f5_far_future_exp_and_max_lifetime() -> None:
    far = default_claims(exp=10**30)
    check(verifier(RS), make_token(RS, far), R.OK)
    limited = verifier(RS, max_lifetime=3600)
    check(limited, make_token(RS, far), R.TOKEN_EXPIRED, detail="max lifetime")
    check(limited, make_token(RS, default_claims(exp=int(NOW) + 3600)), R.OK)
    check(limited, make_token(RS, default_claims(exp=int(NOW) + 3601)), R.TOKEN_EXPIRED)
    # without iat the remaining lifetime counts: exp - now
    no_iat = default_claims(iat=None, exp=int(NOW) + 3601)
    check(limited, make_token(RS, no_iat), R.TOKEN_EXPIRED, detail="max lifetime")
    check(limited, make_token(RS, no_iat), R.OK, now=NOW + 1)
    # a lifetime limit needs an exp to measure
    check(verifier(RS, max_lifetime=60, require=()), make_token(RS, default_claims(exp=None)),
          R.CLAIM_MISSING, detail="max lifetime needs exp")


def test_f6_not_yet_valid() -> None:
    v = verifier(RS)
    check(v, make_token(RS, default_claims(nbf=int(NOW) + SKEW + 1)), R.TOKEN_NOT_YET_VALID)
    check(v, make_token(RS, default_claims(nbf=int(NOW) + SKEW)), R.OK)
    check(v, make_token(RS, default_claims(iat=int(NOW) + SKEW + 1)), R.TOKEN_NOT_YET_VALID,
          detail="iat")
    check(v, make_token(RS, default_claims(iat=int(NOW) + SKEW)), R.OK)


@pytest.mark.parametrize(("aud", "reason"), [
    pytest.param("api", R.OK, id="F7-string"),
    pytest.param(["x", "api"], R.OK, id="F7-list"),
    pytest.param([], R.TOKEN_MALFORMED, id="F7-empty-list"),
    pytest.param([1, 2], R.TOKEN_MALFORMED, id="F7-numbers"),
    pytest.param(["api", 1], R.TOKEN_MALFORMED, id="F7-mixed"),
    pytest.param([["api"]], R.TOKEN_MALFORMED, id="F7-nested"),
    pytest.param(1, R.TOKEN_MALFORMED, id="F7-number"),
    pytest.param({"api": 1}, R.TOKEN_MALFORMED, id="F7-object"),
    pytest.param("", R.AUDIENCE_MISMATCH, id="F7-empty-string"),
    pytest.param("ap", R.AUDIENCE_MISMATCH, id="F7-prefix"),
    pytest.param("api ", R.AUDIENCE_MISMATCH, id="F7-trailing-space"),
    pytest.param("API", R.AUDIENCE_MISMATCH, id="F7-case"),
    pytest.param("xapiy", R.AUDIENCE_MISMATCH, id="F7-substring"),
    pytest.param(["x", "y"], R.AUDIENCE_MISMATCH, id="F7-list-without"),
    pytest.param("MISSING", R.AUDIENCE_MISMATCH, id="F7-missing"),
])
def test_f7_audience(aud: Any, reason: Reason) -> None:
    claims = default_claims(aud="api")
    if aud == "MISSING":
        del claims["aud"]
    else:
        claims["aud"] = aud
    token = make_token(RS, claims)
    r = check(verifier(RS, audiences=["api"]), token, reason)
    if reason is R.TOKEN_MALFORMED:
        assert r.detail == "aud type"
        # a malformed aud is malformed whether or not audiences are configured
        check(verifier(RS, audiences=None), token, R.TOKEN_MALFORMED)


def test_f7_no_audiences_configured() -> None:
    v = verifier(RS, audiences=None)
    assert v.audiences == frozenset()
    check(v, make_token(RS, default_claims(aud="anything")), R.OK)
    check(v, make_token(RS, default_claims(aud=None)), R.OK)
    check(verifier(RS, audiences=["a", "b"]), make_token(RS, default_claims(aud=["b"])), R.OK)


@pytest.mark.parametrize("iss", [
    "https://idp.example.test", "HTTPS://IDP.EXAMPLE.TEST/", "https://idp.example.test.evil.tld/",
    "http://idp.example.test/", "http", "https://idp.example.test//", True, None, 1, ["x"],
    "MISSING",
], ids=lambda i: f"F8-{i!r}"[:40])
def test_f8_issuer_is_exact(iss: Any) -> None:
    claims = default_claims()
    if iss == "MISSING":
        del claims["iss"]
    else:
        claims["iss"] = iss
    assert ISSUER == "https://idp.example.test/"
    check(verifier(RS), make_token(RS, claims), R.ISSUER_UNKNOWN)


@pytest.mark.parametrize("claim", ["sub", "jti"])
@pytest.mark.parametrize("value", [1, None, True, ["u"], {"u": 1}])
def test_f9_sub_jti_must_be_strings(claim: str, value: Any) -> None:
    token = make_token(RS, {**default_claims(), claim: value})
    check(verifier(RS), token, R.TOKEN_MALFORMED, detail=f"{claim} type")
    check(verifier(RS), make_token(RS, default_claims(jti="abc")), R.OK)


def test_f10_id_token_presented_as_access_token() -> None:
    id_token = make_token(RS, default_claims(aud="client-123", nonce="n-0S6_WzA2Mj"))
    check(verifier(RS), id_token, R.AUDIENCE_MISMATCH)


def test_required_claims() -> None:
    v = verifier(RS, require=("exp", "sub", "jti"))
    check(v, make_token(RS, default_claims(jti="j")), R.OK)
    check(v, make_token(RS), R.CLAIM_MISSING, detail="required claim")


def test_claims_returned_equal_the_payload() -> None:
    claims = default_claims(scope="a b", roles=["r1", "r2"], tenant={"id": 7, "region": "eu"},
                            n=1.5, flag=False, nothing=None)
    claims["nothing"] = None
    for cached_run in (False, True):
        r = check(verifier(RS) if not cached_run else _shared_v, make_token(RS, claims), R.OK)
        assert r.claims == claims and r.payload == claims


_shared_v = verifier(RS)


# --------------------------------------------------------------------------- IssuerSet

def test_issuer_set_selects_by_iss() -> None:
    b_key = generate("ES256", kid="b")
    a = verifier(RS)
    b = Verifier("https://b.example/", ["api://b"], jwks=jwks_of(b_key), name="b")
    routes = IssuerSet([a, b], TokenCache(100))
    assert routes.verifier_for(ISSUER) is a and routes.verifier_for("nope") is None
    assert check(routes, make_token(RS), R.OK).verifier is a
    token_b = make_token(b_key, default_claims(iss="https://b.example/", aud="api://b"))
    assert check(routes, token_b, R.OK).verifier is b
    for iss in ("https://c.example/", None, 1, True):
        check(routes, make_token(RS, default_claims(iss=iss)), R.ISSUER_UNKNOWN)
    check(routes, make_token(RS, {k: v for k, v in default_claims().items() if k != "iss"}),
          R.ISSUER_UNKNOWN)
    # each verifier's allow-list applies after selection
    a_rs_only = verifier(RS, algorithms=["RS256"])
    mixed = IssuerSet([a_rs_only, b], TokenCache(10))
    check(mixed, make_token(SigningKey("ES256", RS.kid, ES.private)), R.ALG_NOT_ALLOWED)


def test_issuer_set_audience_override() -> None:
    a = verifier(RS)
    routes = IssuerSet([a], TokenCache(10), audiences=["api://payments"])
    check(routes, make_token(RS), R.AUDIENCE_MISMATCH)
    check(routes, make_token(RS, default_claims(aud="api://payments")), R.OK)


def test_issuer_set_rejects_duplicate_issuers() -> None:
    with pytest.raises(ValueError):
        IssuerSet([verifier(RS), verifier(ES)], TokenCache(1))


def test_issuer_set_jwks_unavailable() -> None:
    routes = IssuerSet([Verifier(ISSUER)], TokenCache(1))
    check(routes, make_token(RS), R.JWKS_UNAVAILABLE)
    # a provider whose keys were dropped is unavailable on every route that uses it
    v = verifier(RS)
    routes = IssuerSet([v], TokenCache(10))
    token = make_token(RS)
    check(routes, token, R.OK)
    v.set_jwks({"keys": []})
    check(routes, token, R.JWKS_UNAVAILABLE)  # the cached entry's key is dead: no stale hit


# ----------------------------------------------------------------------- token cache

def test_cache_hit_and_counters() -> None:
    v = verifier(RS)
    token = make_token(RS)
    first = check(v, token, R.OK)
    second = check(v, token, R.OK, detail="cache hit")
    assert not first.cached and second.cached
    assert second.claims == first.claims and second.header == first.header
    assert second.kid == RS.kid and second.alg == "RS256" and second.issuer == ISSUER
    assert second.verifier is v
    assert (v.cache.hits, v.cache.misses, len(v.cache)) == (1, 1, 1)


def test_cache_hit_rechecks_time() -> None:
    v = verifier(RS)
    exp = int(NOW) + 600
    nbf = int(NOW)
    token = make_token(RS, default_claims(exp=exp, nbf=nbf))
    check(v, token, R.OK)
    assert check(v, token, R.OK, now=exp + SKEW - 1).cached
    check(v, token, R.TOKEN_EXPIRED, now=exp + SKEW)
    assert len(v.cache) == 0  # the failed re-check evicted the entry
    check(v, token, R.OK)
    check(v, token, R.TOKEN_NOT_YET_VALID, now=nbf - SKEW - 1)  # a clock going backwards
    # iat and a lifetime without iat are re-checked too
    limited = verifier(RS, max_lifetime=700)
    no_iat = make_token(RS, default_claims(iat=None))
    check(limited, no_iat, R.OK)
    check(limited, no_iat, R.TOKEN_EXPIRED, now=NOW - 200, detail="max lifetime")
    check(limited, no_iat, R.OK)
    iat_token = make_token(RS, default_claims(nbf=None))
    check(v, iat_token, R.OK)
    check(v, iat_token, R.TOKEN_NOT_YET_VALID, now=NOW - SKEW - 1, detail="iat")


def test_cache_key_removal_stops_hits() -> None:
    other = generate("RS256", kid="other")
    v = verifier(RS, other)
    token = make_token(RS)
    check(v, token, R.OK)
    assert check(v, token, R.OK).cached
    v.set_jwks(jwks_of(RS, other))  # routine refresh, same keys: stays warm
    assert check(v, token, R.OK).cached
    v.set_jwks(jwks_of(other))  # RS removed
    check(v, token, R.KEY_NOT_FOUND)
    v.set_jwks(jwks_of(RS, other))
    check(v, token, R.OK)


def test_cache_key_material_change_stops_hits() -> None:
    v = verifier(RS)
    token = make_token(RS)
    check(v, token, R.OK)
    v.set_jwks(jwks_of(ATTACKER_RS))  # same kid, other material
    check(v, token, R.SIGNATURE_INVALID)


def test_cache_binding_change_stops_hits() -> None:
    v = verifier(RS)
    token = make_token(RS)
    check(v, token, R.OK)
    pinned = jwks_of(RS)
    pinned["keys"][0]["alg"] = "PS256"
    v.set_jwks(pinned)
    check(v, token, R.ALG_NOT_ALLOWED)


def test_cache_issuer_sets_with_different_audiences() -> None:
    cache = TokenCache(100)
    a = verifier(RS, cache=cache)
    orders = IssuerSet([a], cache, audiences=[AUDIENCE])
    payments = IssuerSet([a], cache, audiences=["api://payments"])
    token = make_token(RS)
    check(orders, token, R.OK)
    assert check(orders, token, R.OK).cached
    check(payments, token, R.AUDIENCE_MISMATCH)
    check(orders, token, R.OK)
    # the verifier's own audiences are in force for Verifier.verify on the shared cache
    assert check(a, token, R.OK).cached


def test_cache_other_verifier_same_issuer() -> None:
    cache = TokenCache(100)
    v1 = verifier(RS, cache=cache)
    v2 = verifier(ES, cache=cache)  # same issuer, other keys (e.g. after a config reload)
    token = make_token(RS)
    check(v1, token, R.OK)
    check(v2, token, R.KEY_NOT_FOUND)
    routes = IssuerSet([v2], cache)
    check(v1, token, R.OK)
    check(routes, token, R.KEY_NOT_FOUND)


def test_cache_is_bounded_lru() -> None:
    v = verifier(RS, cache_size=3)
    tokens = [make_token(RS, default_claims(jti=str(i))) for i in range(5)]
    for t in tokens[:3]:
        check(v, t, R.OK)
    check(v, tokens[0], R.OK)  # touch: tokens[1] is now the least recently used
    check(v, tokens[3], R.OK)
    assert len(v.cache) == 3 and v.cache.max_entries == 3
    assert check(v, tokens[0], R.OK).cached
    assert not check(v, tokens[1], R.OK).cached
    for t in tokens:
        check(v, t, R.OK)
    assert len(v.cache) == 3
    v.cache.clear()
    assert len(v.cache) == 0


def test_cache_disabled_and_large_tokens() -> None:
    v = verifier(RS, cache_size=0)
    token = make_token(RS)
    check(v, token, R.OK)
    assert not check(v, token, R.OK).cached and len(v.cache) == 0
    big = make_token(RS, default_claims(pad="x" * 4000))
    assert len(big) > _verify.MAX_CACHED_TOKEN_BYTES
    v2 = verifier(RS)
    check(v2, big, R.OK)
    assert not check(v2, big, R.OK).cached and len(v2.cache) == 0


def test_cache_kidless_rechecks_candidates() -> None:
    keys = [generate("ES256", kid=f"k{i}") for i in range(3)]
    v = verifier(keys[0], keys[1])
    token = make_token(keys[1], kid=None)
    check(v, token, R.OK)
    assert check(v, token, R.OK).cached
    v.set_jwks(jwks_of(keys[2], keys[0], keys[1]))  # keys[1] is now beyond the 2 tried
    check(v, token, R.SIGNATURE_INVALID)


def test_cache_entry_ignores_edits_to_returned_claims() -> None:
    cache = TokenCache(10)
    a = verifier(RS, cache=cache)
    payments = IssuerSet([a], cache, audiences=["api://payments"])
    token = make_token(RS, default_claims(aud=[AUDIENCE, "api://x"], exp=int(NOW) + 600))
    claims = check(a, token, R.OK).claims
    assert claims is not None
    claims["aud"].append("api://payments")  # a careless consumer
    claims["exp"] = 10**12
    check(payments, token, R.AUDIENCE_MISMATCH)
    check(a, token, R.OK)
    check(a, token, R.TOKEN_EXPIRED, now=NOW + 600 + SKEW)


def test_cache_only_ok_results() -> None:
    v = verifier(RS)
    bad = make_token(RS, default_claims(exp=1))
    check(v, bad, R.TOKEN_EXPIRED)
    check(v, bad, R.TOKEN_EXPIRED)
    assert len(v.cache) == 0


def test_cache_shared_claims_are_equal() -> None:
    v = verifier(RS)
    claims = default_claims(scope="a b", nbf=int(NOW))
    t1 = make_token(RS, {**claims, "jti": "1"})
    t2 = make_token(RS, {**claims, "jti": "2"})
    assert check(v, t1, R.OK).claims == {**claims, "jti": "1"}
    assert check(v, t2, R.OK).claims == {**claims, "jti": "2"}
    assert check(v, t1, R.OK).claims == {**claims, "jti": "1"}


def test_token_cache_reinit_shrinks() -> None:
    cache = TokenCache(10)
    v = verifier(RS, cache=cache)
    tokens = [make_token(RS, default_claims(jti=str(i))) for i in range(5)]
    for t in tokens:
        check(v, t, R.OK)
    cache.__init__(2)  # type: ignore[misc]
    assert len(cache) == 2 and cache.max_entries == 2
    assert check(v, tokens[4], R.OK).cached
    assert not check(v, tokens[0], R.OK).cached


def test_uninitialised_objects_do_not_crash() -> None:
    token = make_token(ES)
    assert not Verifier.__new__(Verifier).verify(token, now=NOW).ok
    assert not IssuerSet.__new__(IssuerSet).verify(token, now=NOW).ok
    assert len(TokenCache.__new__(TokenCache)) == 0


def test_token_cache_validation() -> None:
    with pytest.raises(ValueError):
        TokenCache(-1)
    assert TokenCache().max_entries == 100_000
    assert TokenCache(0).max_entries == 0
    assert TokenCache().negative_entries == _verify.NEGATIVE_CACHE_ENTRIES == 4096
    assert TokenCache(0).negative_entries == 0  # "cache_size=0 disables caching": both
    assert TokenCache(0, negative_entries=8).negative_entries == 8
    bad_bounds: list[Any] = [-1, True, 1.5]
    for bad in bad_bounds:
        with pytest.raises(ValueError):
            TokenCache(10, negative_entries=bad)


# ----------------------------------------------------------- negative cache (W3 replays)

def test_negative_cache_replay_then_key_change() -> None:
    a = generate("ES256", kid="k")
    b = generate("ES256", kid="k")  # same kid, other material
    v = verifier(a)
    token = make_token(b)
    first = check(v, token, R.SIGNATURE_INVALID, detail="signature")
    second = check(v, token, R.SIGNATURE_INVALID, detail="cached reject")
    assert not first.cached and second.cached
    # the same Result shape as the full reject (header/payload decoded only when asked)
    for name in ("kid", "alg", "issuer", "verifier", "header", "payload", "claims"):
        assert getattr(second, name) == getattr(first, name), name
    assert second.verifier is v and second.claims is None
    cache = v.cache
    assert (cache.negative_hits, cache.negative_size, len(cache)) == (1, 1, 0)
    assert (cache.hits, cache.misses) == (0, 1)  # the replay did not verify again
    v.set_jwks(jwks_of(a))  # a routine refresh with the very same keys keeps it
    check(v, token, R.SIGNATURE_INVALID, detail="cached reject")
    # a key change that makes the token valid is never answered from the negative cache
    v.set_jwks(jwks_of(b))
    ok = check(v, token, R.OK)
    assert not ok.cached and cache.negative_size == 0  # the stale entry was dropped
    assert check(v, token, R.OK).cached
    v.set_jwks(jwks_of(a))
    check(v, token, R.SIGNATURE_INVALID, detail="signature")


def test_negative_cache_kidless_order_change_is_a_key_change() -> None:
    k0, k1, k2 = (generate("ES256", kid=f"k{i}") for i in range(3))
    v = verifier(k0, k2, k1)  # a kid-less token tries the first two keys only (C7)
    token = make_token(k1, kid=None)
    check(v, token, R.SIGNATURE_INVALID, detail="signature")
    check(v, token, R.SIGNATURE_INVALID, detail="cached reject")
    v.set_jwks(jwks_of(k1, k0, k2))  # same keys, other order: k1 is now tried
    check(v, token, R.OK)


def test_negative_cache_is_per_verifier_and_route() -> None:
    a = generate("ES256", kid="k")
    b = generate("ES256", kid="k")
    cache = TokenCache(100)
    v_a = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(a), cache=cache)
    v_b = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(b), cache=cache, name="other")
    route_a, route_b = IssuerSet([v_a], cache), IssuerSet([v_b], cache)
    token = make_token(b)
    check(route_a, token, R.SIGNATURE_INVALID, detail="signature")
    assert check(route_a, token, R.SIGNATURE_INVALID, detail="cached reject").verifier is v_a
    assert check(v_a, token, R.SIGNATURE_INVALID).cached  # the same verifier, directly
    check(route_b, token, R.OK)  # another provider for the issuer: verified, not a stale reject
    check(v_b, token, R.OK)
    other = Verifier("https://other.example.test/", jwks=jwks_of(a), cache=cache)
    check(IssuerSet([other], cache), token, R.ISSUER_UNKNOWN)
    # other checks still come first: a replayed bad token over the route's size limit
    small = IssuerSet([Verifier(ISSUER, jwks=jwks_of(a), cache=cache, max_token_bytes=64)],
                      cache)
    check(small, token, R.TOKEN_TOO_LARGE)


def test_negative_cache_bounded_and_never_evicts_valid_entries() -> None:
    cache = TokenCache(100, negative_entries=8)
    v = Verifier(ISSUER, [AUDIENCE], secret=HS.private, cache=cache)
    good = [hs_token(HS.private, {"alg": "HS256"}, default_claims(jti=str(i))) for i in range(5)]
    for t in good:
        check(v, t, R.OK)
    si = good[0].rsplit(".", 1)[0]
    for i in range(50):
        check(v, f"{si}.{b64u(i.to_bytes(32, 'big'))}", R.SIGNATURE_INVALID)
        assert cache.negative_size <= 8
    assert len(cache) == 5
    assert all(check(v, t, R.OK).cached for t in good)
    # tokens longer than MAX_CACHED_TOKEN_BYTES are never stored
    cache.clear()
    big = hs_token(HS.private, {"alg": "HS256"}, default_claims(pad="x" * 4200))
    big_bad = big.rsplit(".", 1)[0] + "." + b64u(bytes(32))
    assert len(big_bad) > _verify.MAX_CACHED_TOKEN_BYTES
    check(v, big_bad, R.SIGNATURE_INVALID, detail="signature")
    check(v, big_bad, R.SIGNATURE_INVALID, detail="signature")
    assert cache.negative_size == 0
    # beside signature_invalid only pure time rejects are remembered: not a malformed token,
    # not an audience reject (those depend on the route), not max_lifetime
    check(v, "a.b.c", R.TOKEN_MALFORMED)
    check(v, make_token(HS, default_claims(aud="api://other")), R.AUDIENCE_MISMATCH)
    assert cache.negative_size == 0
    check(v, make_token(HS, default_claims(exp=int(NOW) - 3600)), R.TOKEN_EXPIRED)
    assert cache.negative_size == 1
    cache.clear()
    # disabled with the cache
    off = Verifier(ISSUER, [AUDIENCE], secret=HS.private, cache_size=0)
    bad = f"{si}.{b64u(bytes(32))}"
    check(off, bad, R.SIGNATURE_INVALID)
    assert not check(off, bad, R.SIGNATURE_INVALID).cached


def test_negative_cache_memory_is_bounded() -> None:
    # A flood of distinct bad tokens (3x the default bound): the map is cleared when full, and
    # a reject keeps no parsed JSON, so memory stays near bound * token size.
    v = Verifier(ISSUER, [AUDIENCE], secret=HS.private)
    bound = v.cache.negative_entries
    si = make_token(HS).rsplit(".", 1)[0]
    tokens = [f"{si}.{b64u(i.to_bytes(32, 'big'))}".encode() for i in range(3 * bound)]
    per_token = len(tokens[0])
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for t in tokens:
            assert v.verify(t, now=NOW).reason is R.SIGNATURE_INVALID
            assert v.cache.negative_size <= bound
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    # the tokens list is allocated outside the traced window; only the cache grows here
    assert grown < bound * (per_token + 300), grown
    assert len(v.cache) == 0


# ------------------------------------------------------------------------- key loading

ROCA_WHY = "rsa modulus has the ROCA fingerprint"
# roca-detect's prime list (Nemec et al. 2017); the fingerprint: n mod r lies in <65537 mod r>.
ROCA_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79,
               83, 89, 97, 101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167)


def _roca_reference(n: int) -> bool:
    """An independent, slow statement of the fingerprint test."""
    for r in ROCA_PRIMES:
        subgroup = {pow(65537, k, r) for k in range(r)}
        if n % r not in subgroup:
            return False
    return True


def _modulus_jwk(n: int, kid: str = "roca") -> dict[str, Any]:
    return {"kty": "RSA", "kid": kid, "n": b64u(n.to_bytes((n.bit_length() + 7) // 8, "big")),
            "e": "AQAB"}


def _roca_like_modulus() -> int:
    """n = p*q with p, q = k*M + (65537^a mod M), M = 2 * the primes: the structure of the
    vulnerable Infineon primes (primality plays no part in the fingerprint)."""
    m = 2
    for r in ROCA_PRIMES:
        m *= r
    rng = int.from_bytes(os.urandom(64), "big")
    p = (rng | 1 << 1100) * m + pow(65537, 1 + rng % 1000, m)
    q = ((rng >> 7) | 1 << 1100) * m + pow(65537, 3 + rng % 997, m)
    return p * q


def test_roca_structured_modulus_is_skipped() -> None:
    n = _roca_like_modulus()
    assert _roca_reference(n) and 2048 <= n.bit_length() <= 8192
    v = Verifier(ISSUER, [AUDIENCE])
    report = v.set_jwks({"keys": [_modulus_jwk(n), RS.public_jwk]})
    assert report.skipped == [("roca", ROCA_WHY)] and report.kids == {RS.kid}
    # a nearby odd modulus off the fingerprint (some residue leaves its subgroup) loads
    twin = next(n + d for d in range(2, 400, 2) if not _roca_reference(n + d))
    assert v.set_jwks({"keys": [_modulus_jwk(twin)]}).loaded == 1


def test_roca_wycheproof_modulus_is_skipped(wycheproof_dir: Path) -> None:
    data = json.loads((wycheproof_dir / "json_web_key_test.json").read_text())
    jwks = [jwk for group in data["testGroups"]
            if any(t["comment"] == "rejectsKeyWithRocaVulnerability" for t in group["tests"])
            for jwk in (group.get("public") or group["private"])["keys"]]
    assert jwks, "no ROCA vector in json_web_key_test.json"
    for jwk in jwks:
        assert _roca_reference(int.from_bytes(raw_b64u(jwk["n"]), "big"))
        report = Verifier(ISSUER, [AUDIENCE]).set_jwks({"keys": [jwk]})
        assert report.loaded == 0 and report.skipped == [(jwk.get("kid"), ROCA_WHY)]
        assert verify_jws(make_token(RS, kid=jwk.get("kid")), jwk) is R.KEY_NOT_FOUND


def test_roca_no_false_positive_on_fresh_keys() -> None:
    keys = [rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
            for _ in range(20)]
    assert not any(_roca_reference(n) for n in keys)
    report = Verifier(ISSUER, [AUDIENCE]).set_jwks(
        {"keys": [_modulus_jwk(n, f"k{i}") for i, n in enumerate(keys)]})
    assert report.loaded == 20 and not report.skipped

def _rsa_jwk(bits: int = 2048, e: int = 65537) -> dict[str, Any]:
    n = rsa.generate_private_key(65537, bits).public_key().public_numbers().n if bits <= 2048 \
        else (1 << (bits - 1)) | 1
    return {"kty": "RSA", "kid": "k", "n": b64u(n.to_bytes((n.bit_length() + 7) // 8, "big")),
            "e": b64u(e.to_bytes((e.bit_length() + 7) // 8, "big"))}


def _skip_cases() -> list[Any]:
    es = dict(ES.public_jwk)
    ed = dict(ED.public_jwk)
    # another kid than RS's: the valid RS key loaded beside it must not be a duplicate kid
    rs = dict(RS.public_jwk, kid="rs-variant")
    return [
        pytest.param(_rsa_jwk(1024), "rsa modulus < 2048 bits", id="rsa-1024"),
        pytest.param(_rsa_jwk(16384), "rsa modulus > 8192 bits", id="rsa-16384"),
        pytest.param({**rs, "e": "AQ"}, "rsa exponent invalid", id="rsa-e-1"),
        pytest.param({**rs, "e": b64u((65536).to_bytes(3, "big"))}, "rsa exponent invalid",
                     id="rsa-e-even"),
        pytest.param({**rs, "e": b64u((2**64 + 1).to_bytes(9, "big"))}, "rsa exponent invalid",
                     id="rsa-e-huge"),
        pytest.param({**rs, "n": rs["n"] + "="}, "bad base64url in n or e", id="rsa-n-padded"),
        pytest.param({**rs, "n": "+" + rs["n"][1:]}, "bad base64url in n or e",
                     id="rsa-n-plus"),
        pytest.param({**rs, "n": None}, "bad base64url in n or e", id="rsa-n-missing"),
        pytest.param({**es, "x": b64u(os.urandom(32)), "y": b64u(os.urandom(32))},
                     "ec point not on curve", id="ec-invalid-point"),
        pytest.param({**es, "x": b64u(os.urandom(31))}, "ec coordinate length",
                     id="ec-short-coordinate"),
        pytest.param({**es, "crv": "P-384"}, "ec coordinate length", id="ec-wrong-crv"),
        pytest.param({**es, "crv": "P-192"}, "unsupported crv", id="ec-unknown-crv"),
        pytest.param({**es, "crv": "secp256k1"}, "unsupported crv", id="ec-secp256k1"),
        pytest.param({**es, "crv": ["P-256"]}, "unsupported crv", id="ec-crv-list"),
        pytest.param({**ed, "crv": "X25519"}, "unsupported crv", id="okp-x25519"),
        pytest.param({**ed, "x": b64u(os.urandom(31))}, "okp x length", id="okp-short"),
        pytest.param({"kty": "oct", "kid": "k", "k": b64u(os.urandom(32))}, "oct key in jwks",
                     id="oct"),
        pytest.param({**es, "use": "enc"}, "use enc", id="use-enc"),
        pytest.param({**es, "use": "other"}, "use not sig", id="use-other"),
        pytest.param({**es, "key_ops": ["encrypt"]}, "key_ops without verify",
                     id="key-ops-encrypt"),
        pytest.param({**es, "key_ops": "verify"}, "key_ops without verify", id="key-ops-string"),
        pytest.param({**es, "alg": "RSA1_5"}, "unsupported key alg", id="alg-jwe"),
        pytest.param({**es, "alg": "ES256K"}, "unsupported key alg", id="alg-unknown"),
        pytest.param({**es, "alg": "RS256"}, "key alg does not match key", id="alg-mismatch"),
        pytest.param({**es, "alg": "ES384"}, "key alg does not match key", id="alg-wrong-curve"),
        pytest.param({**es, "kty": "DSA"}, "unsupported kty", id="kty-unknown"),
        pytest.param({k: v for k, v in es.items() if k != "kty"}, "missing kty", id="no-kty"),
        pytest.param({**es, "kid": 7}, "kid not a string", id="kid-number"),
        pytest.param("not-an-object", "not an object", id="not-an-object"),
    ]


@pytest.mark.parametrize(("jwk", "why"), _skip_cases())
def test_set_jwks_skips_unusable_keys(jwk: Any, why: str) -> None:
    v = Verifier(ISSUER, [AUDIENCE])
    report = v.set_jwks({"keys": [jwk, RS.public_jwk]})
    assert isinstance(report, KeyReport)
    assert report.loaded == 1 and report.kids == {RS.kid}
    assert len(report.skipped) == 1
    assert report.skipped[0][1] == why
    assert v.key_count == 1 and v.has_kid(RS.kid)


def test_set_jwks_duplicate_kid_drops_both() -> None:
    # catalog H7: an ambiguous kid names no key, never "first match"
    a, b = generate("ES256", kid="dup"), generate("ES256", kid="dup")
    v = Verifier(ISSUER, [AUDIENCE])
    report = v.set_jwks(jwks_of(a, b, RS))
    assert report.loaded == 1
    assert report.skipped == [("dup", "duplicate kid"), ("dup", "duplicate kid")]
    check(v, make_token(a), R.KEY_NOT_FOUND)
    check(v, make_token(a, kid=None), R.KEY_NOT_FOUND)


@pytest.mark.parametrize("bad_first", [False, True])
def test_set_jwks_duplicate_kid_counted_before_validation(bad_first: bool) -> None:
    # Wycheproof JWK tc4: one copy of the kid is itself unusable. Dropping only that copy would
    # let the other one answer the ambiguous kid; kids are counted over every entry first.
    a = generate("ES256", kid="dup")
    bad = dict(a.public_jwk, x=b64u(os.urandom(32)), y=b64u(os.urandom(32)))  # off the curve
    keys = [bad, a.public_jwk] if bad_first else [a.public_jwk, bad]
    v = Verifier(ISSUER, [AUDIENCE])
    report = v.set_jwks({"keys": [*keys, RS.public_jwk]})
    assert report.loaded == 1 and report.kids == {RS.kid}
    assert report.skipped == [("dup", "duplicate kid"), ("dup", "duplicate kid")]
    check(v, make_token(a), R.KEY_NOT_FOUND)
    check(v, make_token(RS), R.OK)
    # the same loader serves verify_jws: a JWKS with two "dup" entries names no key
    token = signed(a, hdr(a), b"payload")
    assert verify_jws(token, {"keys": keys}) is R.KEY_NOT_FOUND
    assert verify_jws(token, {"keys": [a.public_jwk]}) is R.OK


def test_set_jwks_duplicate_kid_beyond_the_key_cap_still_counts() -> None:
    filler = [dict(ES.public_jwk, kid=f"k{i}") for i in range(_verify.MAX_JWKS_KEYS - 1)]
    doc = {"keys": [RS.public_jwk, *filler, dict(RS.public_jwk)]}  # RS's kid again, last
    report = Verifier(ISSUER, [AUDIENCE]).set_jwks(doc)
    assert (RS.kid, "duplicate kid") in report.skipped
    assert report.skipped[-1] == (RS.kid, "too many keys")
    assert RS.kid not in report.kids


def test_set_jwks_caps_the_key_count() -> None:
    doc = {"keys": [dict(ES.public_jwk, kid=f"k{i}") for i in range(_verify.MAX_JWKS_KEYS + 5)]}
    v = Verifier(ISSUER, [AUDIENCE])
    report = v.set_jwks(doc)
    assert report.loaded == _verify.MAX_JWKS_KEYS
    assert report.skipped[-1] == (f"k{_verify.MAX_JWKS_KEYS + 4}", "too many keys")
    assert len(report.skipped) == 5


def test_set_jwks_tolerates_extra_members_and_leading_zero() -> None:
    jwk = dict(RS.public_jwk, x5c=["abc"], d_unused=1)
    jwk["n"] = b64u(b"\x00" + b64_decode(jwk["n"]))  # RFC 7518 §6.3.1.1 "MUST NOT"; tolerated
    v = Verifier(ISSUER, [AUDIENCE])
    assert v.set_jwks({"keys": [jwk]}).loaded == 1
    check(v, make_token(RS), R.OK)


def b64_decode(s: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


@pytest.mark.parametrize("doc", [[], "keys", {}, {"keys": {}}, {"keys": "x"}, {"keys": None}, 1],
                         ids=lambda d: repr(d)[:20])
def test_set_jwks_rejects_non_jwks(doc: Any) -> None:
    v = verifier(RS)
    with pytest.raises(ValueError):
        v.set_jwks(doc)
    check(v, make_token(RS), R.OK)  # the old keys stay


def test_set_jwks_on_secret_verifier() -> None:
    with pytest.raises(ValueError):
        verifier(HS).set_jwks(jwks_of(RS))


# ----------------------------------------------------------------- construction errors

@pytest.mark.parametrize("kwargs", [
    pytest.param({"jwks": jwks_of(RS), "algorithms": ["HS256"]}, id="hs-with-jwks"),
    pytest.param({"secret": HS.private, "algorithms": ["HS256", "RS256"]}, id="mixed"),
    pytest.param({"jwks": jwks_of(RS), "algorithms": ["RS256", "HS256"]}, id="mixed-jwks"),
    pytest.param({"jwks": jwks_of(RS), "algorithms": ["RS257"]}, id="unknown-alg"),
    pytest.param({"jwks": jwks_of(RS), "algorithms": ["none"]}, id="none"),
    pytest.param({"jwks": jwks_of(RS), "algorithms": []}, id="empty-algorithms"),
    pytest.param({"jwks": jwks_of(RS), "algorithms": [256]}, id="non-string-alg"),
    pytest.param({"jwks": jwks_of(RS), "secret": HS.private}, id="jwks-and-secret"),
    pytest.param({"secret": b"x" * 31}, id="secret-31-bytes"),
    pytest.param({"secret": b""}, id="secret-empty"),
    pytest.param({"secret": b"x" * 32, "algorithms": ["HS512"]}, id="secret-short-for-hs512"),
    pytest.param({"secret": b"x" * 48, "algorithms": ["HS256", "HS512"]}, id="short-for-one"),
    pytest.param({"secret": "text-is-not-bytes" * 4}, id="secret-str"),
    pytest.param({"secret": b"x" * 32, "algorithms": ["RS256"]}, id="secret-with-rs"),
    pytest.param({"algorithms": ["HS256"]}, id="hs-without-secret"),
    pytest.param({"jwks": {"kid": "x"}}, id="jwks-not-a-jwks"),
    pytest.param({"clock_skew": -1}, id="negative-skew"),
    pytest.param({"clock_skew": float("nan")}, id="nan-skew"),
    pytest.param({"max_lifetime": 0}, id="zero-lifetime"),
    pytest.param({"cache_size": -1}, id="negative-cache"),
    pytest.param({"max_token_bytes": 0}, id="zero-max-bytes"),
    pytest.param({"audiences": [1]}, id="non-string-audience"),
])
def test_constructor_value_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Verifier(ISSUER, **kwargs)


def test_constructor_defaults() -> None:
    v = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(RS))
    assert v.algorithms == _verify.ASYMMETRIC_ALGORITHMS
    assert v.name == ISSUER and v.issuer == ISSUER and v.audiences == {AUDIENCE}
    assert v.cache.max_entries == 100_000 and v.key_count == 1 and v.has_keys
    assert _verify.SUPPORTED_ALGORITHMS == _verify.ASYMMETRIC_ALGORITHMS | _verify.HMAC_ALGORITHMS
    hs = Verifier(ISSUER, secret=b"s" * 48)
    assert hs.algorithms == {"HS256", "HS384"}
    assert Verifier(ISSUER, audiences="single").audiences == {"single"}
    shared = TokenCache(5)
    assert Verifier(ISSUER, cache=shared, name="okta").cache is shared
    with pytest.raises(TypeError):
        Result()
    with pytest.raises(TypeError):
        KeyReport()


# -------------------------------------------------------------------------- verify_jws

def test_verify_jws_payload_need_not_be_json() -> None:
    for key in (RS, ES, ED):
        token = signed(key, hdr(key), b"foo")
        assert verify_jws(token, key.public_jwk) is R.OK
        assert verify_jws(token.encode(), jwks_of(key)) is R.OK
        assert verify_jws(with_sig(token, b"x"), key.public_jwk) is R.SIGNATURE_INVALID

def test_verify_jws_empty_payload_is_a_valid_jws() -> None:
    # RFC 7515 §7.1: the payload is arbitrary octets, the empty sequence included (Wycheproof
    # emptyPayload is valid). Only the JWT path refuses "H..S" (A15, not a claim set).
    for key in (RS, ES, ED):
        token = signed(key, hdr(key), b"")
        assert token.split(".")[1] == ""
        assert verify_jws(token, key.public_jwk) is R.OK
        assert verify_jws(token, jwks_of(key)) is R.OK
        assert verify_jws(with_sig(token, key.sign(b"x")), key.public_jwk) is R.SIGNATURE_INVALID
        check(verifier(key), token, R.TOKEN_MALFORMED, detail="empty payload")
    mac_key = os.urandom(32)
    head = b64u_json({"alg": "HS256"})
    token = f"{head}..{b64u(hmac.new(mac_key, f'{head}.'.encode(), 'sha256').digest())}"
    assert verify_jws(token, {"kty": "oct", "k": b64u(mac_key)}) is R.OK
    check(Verifier(ISSUER, secret=mac_key), token, R.TOKEN_MALFORMED, detail="empty payload")
    assert verify_jws("..", RS.public_jwk) is R.TOKEN_MALFORMED  # empty header: no JSON


def test_verify_jws_mixed_key_set_is_rejected() -> None:
    # Wycheproof JWK tc1 / json_web_crypto tc47 (MixedKeySet): a set holding both a shared
    # secret and public keys is refused as a whole; every token gets key_not_found.
    secret = os.urandom(32)
    oct_jwk = {"kty": "oct", "k": b64u(secret), "kid": "hs"}
    es_token = signed(ES, hdr(ES), b"payload")
    hs_tok = hs_token(secret, {"alg": "HS256", "kid": "hs"})
    mixed = {"keys": [oct_jwk, ES.public_jwk]}
    assert verify_jws(es_token, mixed) is R.KEY_NOT_FOUND
    assert verify_jws(hs_tok, mixed) is R.KEY_NOT_FOUND
    assert verify_jws(signed(ES, {"alg": "ES256"}, b"p"), mixed) is R.KEY_NOT_FOUND
    # an unusable oct entry still makes the set mixed; a bad token is still malformed first
    short = {"kty": "oct", "k": b64u(secret[:8]), "kid": "short"}
    assert verify_jws(es_token, {"keys": [ES.public_jwk, short]}) is R.KEY_NOT_FOUND
    assert verify_jws("a.b", mixed) is R.TOKEN_MALFORMED
    # each half on its own is fine
    assert verify_jws(es_token, {"keys": [ES.public_jwk]}) is R.OK
    assert verify_jws(hs_tok, {"keys": [oct_jwk]}) is R.OK
    assert verify_jws(es_token, jwks_of(RS, ES, ED)) is R.OK


def test_verify_jws_oct_keys() -> None:
    secret = os.urandom(64)
    jwk = {"kty": "oct", "k": b64u(secret), "kid": "hs"}
    for alg in HMAC_ALGS:
        token = hs_token(secret, {"alg": alg, "kid": "hs"}, digest="sha" + alg[2:])
        assert verify_jws(token, jwk) is R.OK
        assert verify_jws(token, jwk, algorithms=["HS256"]) is (
            R.OK if alg == "HS256" else R.ALG_NOT_ALLOWED)
    short = {"kty": "oct", "k": b64u(secret[:31]), "kid": "hs"}
    assert verify_jws(hs_token(secret[:31], {"alg": "HS256", "kid": "hs"}), short) \
        is R.KEY_NOT_FOUND  # a key shorter than the hash is unusable
    mid = {"kty": "oct", "k": b64u(secret[:32])}
    assert verify_jws(hs_token(secret[:32], {"alg": "HS384"}, digest="sha384"), mid) \
        is R.ALG_NOT_ALLOWED


def test_verify_jws_key_selection() -> None:
    no_kid = {k: v for k, v in ES.public_jwk.items() if k != "kid"}
    token = make_token(ES, kid="whatever")
    assert verify_jws(token, no_kid) is R.OK  # a lone JWK handed in is the key
    assert verify_jws(token, {"keys": [no_kid]}) is R.KEY_NOT_FOUND
    assert verify_jws(token, ES.public_jwk) is R.KEY_NOT_FOUND
    assert verify_jws(make_token(ES), jwks_of(RS, ES)) is R.OK
    assert verify_jws(make_token(ES, kid=None), jwks_of(RS, ES)) is R.OK
    assert verify_jws(make_token(ES), ES.public_jwk, algorithms=["RS256"]) is R.ALG_NOT_ALLOWED
    assert verify_jws("a.b", ES.public_jwk) is R.TOKEN_MALFORMED
    assert verify_jws(None, ES.public_jwk) is R.TOKEN_MALFORMED  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        verify_jws(make_token(ES), "not a jwk")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        verify_jws(make_token(ES), ES.public_jwk, algorithms=["none"])


def test_verify_jws_header_rules_apply() -> None:
    assert verify_jws(signed(ES, hdr(ES, crit=["x"]), b"foo"), ES.public_jwk) \
        is R.TOKEN_MALFORMED
    assert verify_jws(signed(ES, {"alg": "none"}, b"foo"), ES.public_jwk) is R.ALG_NOT_ALLOWED
    assert verify_jws(signed(ES, b'{"alg":"ES256","alg":"ES256"}', b"foo"), ES.public_jwk) \
        is R.TOKEN_MALFORMED


# ------------------------------------------------------------------- never raises

_ODD_INPUTS: list[Any] = [
    None, 0, 1.5, [], {}, object(), bytearray(b"a.b.c"), memoryview(b"a.b.c"), "\x00", b"\x00",
    b"\x00.eyJhIjoxfQ.AAAA", b".eyJhIjoxfQ.AAAA", "\x00.\x00.\x00",
    "..", b"..", ".", "a.b.c", "\ud800", "é.é.é", b"\xff.\xff.\xff", "eyJ.eyJ.eyJ",
    "e" * 8193, b"e" * 8193, "a" * 8192, "A" * 4 + "." + "A" * 4 + "." + "A" * 4,
]


@pytest.mark.parametrize("value", _ODD_INPUTS, ids=lambda v: type(v).__name__ + repr(v)[:12])
def test_verify_never_raises_for_odd_inputs(value: Any) -> None:
    routes = IssuerSet([_shared_v], TokenCache(10))
    for target in (_shared_v, routes):
        r = target.verify(value, now=NOW)
        assert not r.ok and r.detail != "internal error"
        assert r.reason in (R.TOKEN_MALFORMED, R.TOKEN_TOO_LARGE)
    assert verify_jws(value, RS.public_jwk) in (R.TOKEN_MALFORMED,)


def test_bad_now_is_an_internal_error_not_an_exception() -> None:
    r = _shared_v.verify(make_token(RS), now="later")  # type: ignore[arg-type]
    assert r.reason is R.TOKEN_MALFORMED and r.detail == "internal error"
    r = _shared_v.verify(make_token(RS), now=float("nan"))
    assert r.reason is R.TOKEN_MALFORMED and r.detail == "internal error"


def test_default_now_is_the_wall_clock() -> None:
    import time

    v = verifier(RS, cache_size=0)
    check(v, make_token(RS, default_claims(now=time.time())), R.OK, now=None)  # type: ignore
    stale = default_claims(now=time.time() - 10_000)
    check(v, make_token(RS, stale), R.TOKEN_EXPIRED, now=None)  # type: ignore[arg-type]


_FUZZ_SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])


@_FUZZ_SETTINGS
@given(st.one_of(st.binary(max_size=600), st.text(max_size=600)))
def test_fuzz_random_input_never_raises(value: bytes | str) -> None:
    r = _shared_v.verify(value, now=NOW)
    assert not r.ok and r.detail != "internal error"


_FUZZ_TOKEN = make_token(RS, default_claims(jti="fuzz"))
_FUZZ_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00é"


@_FUZZ_SETTINGS
@given(st.lists(st.tuples(st.integers(0, len(_FUZZ_TOKEN) - 1),
                          st.sampled_from(_FUZZ_ALPHABET)), min_size=1, max_size=4))
def test_fuzz_mutated_token_never_passes(edits: list[tuple[int, str]]) -> None:
    chars = list(_FUZZ_TOKEN)
    for pos, ch in edits:
        chars[pos] = ch
    token = "".join(chars)
    r = _shared_v.verify(token, now=NOW)
    assert r.detail != "internal error"
    assert r.ok is (token == _FUZZ_TOKEN)


@_FUZZ_SETTINGS
@given(st.dictionaries(st.text(max_size=8), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=8), max_size=6))
def test_fuzz_signed_claims_never_raise(extra: dict[str, Any]) -> None:
    claims = {**extra, **default_claims()}
    try:
        token = make_token(RS, claims)
    except UnicodeEncodeError:
        return  # lone surrogates cannot be serialised by the factory
    r = _shared_v.verify(token, now=NOW)
    assert r.detail != "internal error"
    if r.ok:
        assert r.claims == json.loads(json.dumps(claims))


def test_many_distinct_headers_stay_correct() -> None:
    """The header cache is bounded and cleared when full; results do not depend on it."""
    v = verifier(RS, cache_size=0)
    for i in range(600):
        token = signed(RS, hdr(RS, n=i), default_claims())
        check(v, token, R.OK)
    check(v, signed(RS, hdr(RS, n=0), default_claims(exp=1)), R.TOKEN_EXPIRED)


def test_asymmetric_algs_constant_matches_conftest() -> None:
    assert set(ASYMMETRIC_ALGS) <= _verify.ASYMMETRIC_ALGORITHMS
    assert {"Ed25519", "Ed448"} <= _verify.ASYMMETRIC_ALGORITHMS
    assert public_jwk(RS.private)["kty"] == "RSA"


# ------------------------------------------------------- typ (RFC 9068 §4, RFC 7515 §4.1.9)

def typed(key: SigningKey, typ: Any = "__absent__", claims: dict[str, Any] | None = None) -> str:
    """A token whose header typ is ``typ`` (absent by default, JSON null for None)."""
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid}
    if typ != "__absent__":
        header["typ"] = typ
    return make_token(key, claims, raw_header=json.dumps(header).encode())


@pytest.mark.parametrize(("allowed", "typ", "ok"), [
    (["at+jwt"], "at+jwt", True),
    (["at+jwt"], "application/at+jwt", True),  # RFC 7515 §4.1.9: the prefix is optional
    (["at+jwt"], "AT+JWT", True),  # media types compare case-insensitively
    (["at+jwt"], "Application/At+Jwt", True),
    (["application/at+jwt"], "at+jwt", True),  # either side may carry the prefix
    (["APPLICATION/AT+JWT"], "at+JWT", True),
    (["at+jwt", "JWT"], "jwt", True),
    (["application/okta-internal-at+jwt"], "okta-internal-at+jwt", True),
    (["at+jwt"], "JWT", False),  # an ID token's usual typ
    (["at+jwt"], "jwt+at", False),
    (["at+jwt"], "at+jwt ", False),  # no trimming: not the same media type
    (["at+jwt"], "text/at+jwt", False),  # another top-level type is another type
    (["at+jwt"], "application/application/at+jwt", False),
    (["at+jwt"], "", False),
    (["at+jwt"], "__absent__", False),  # RFC 9068 §4: typ is required when checked
    (["at+jwt"], None, False),  # JSON null
    (["at+jwt"], ["at+jwt"], False),  # not a string
    (["at+jwt"], 1, False),
    (["at+jwt"], "at+jwt\u00e9", False),  # non-ASCII never names a media type here
])
def test_typ_allowed_list(allowed: list[str], typ: Any, ok: bool) -> None:
    v = verifier(ES, typ=allowed)
    want = R.OK if ok else R.TOKEN_TYPE_INVALID
    check(v, typed(ES, typ), want, detail=None if ok else "typ")
    check(v, typed(ES, typ), want)  # the same answer from the cache / header cache


def test_typ_not_configured_ignores_the_header() -> None:
    v = verifier(ES)
    assert v.typ is None
    for typ in ("JWT", "at+jwt", "__absent__", None, 7):
        check(v, typed(ES, typ), R.OK)


def test_typ_normalised_once_and_validated() -> None:
    v = verifier(ES, typ=("at+jwt", "Application/AT+JWT", "JWT"))
    assert v.typ == frozenset({"application/at+jwt", "application/jwt"})
    bad: list[Any] = ["at+jwt", [], [""], [1], ["a/b/c"], ["/x"], ["x/"], ["at jwt"],
                      ["at+jwt;q=1"], ["\u00e9"]]
    for value in bad:
        with pytest.raises(ValueError):
            verifier(ES, typ=value)


def test_typ_check_order() -> None:
    v = verifier(ES, typ=["at+jwt"])
    # after the header and alg checks ...
    check(v, typed(ES, "JWT", default_claims()).replace(".", "!", 1), R.TOKEN_MALFORMED)
    rs_v = verifier(RS, typ=["at+jwt"], algorithms=["RS256"])
    check(rs_v, typed(ES, "JWT"), R.ALG_NOT_ALLOWED)
    check(v, typed(ES, "JWT", default_claims(iss="https://other.example/")), R.ISSUER_UNKNOWN)
    # ... and before the key lookup, the signature and the claims
    check(v, make_token(ES, kid="no-such-kid", header={"typ": "JWT"}), R.TOKEN_TYPE_INVALID)
    forged = typed(ES, "JWT").rsplit(".", 1)[0] + "." + typed(ES, "at+jwt").rsplit(".", 1)[1]
    before = _verify.signature_checks()
    check(v, forged, R.TOKEN_TYPE_INVALID)
    check(v, typed(ES, "JWT", default_claims(exp=int(NOW) - 3600)), R.TOKEN_TYPE_INVALID)
    assert _verify.signature_checks() == before  # decided from the header alone
    empty = Verifier(ISSUER, [AUDIENCE], typ=["at+jwt"])  # no keys yet
    check(empty, typed(ES, "JWT"), R.TOKEN_TYPE_INVALID)
    check(empty, typed(ES, "at+jwt"), R.JWKS_UNAVAILABLE)


def test_typ_cached_token_never_passes_a_provider_that_requires_typ() -> None:
    """One cache, one issuer, two provider configs (as across a reload, or two Verifiers):
    a token verified where typ is not checked never hits where it is."""
    cache = TokenCache(100)
    loose = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(ES), cache=cache, name="loose")
    strict = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(ES), cache=cache, name="strict",
                      typ=["at+jwt"])
    id_token = typed(ES, "JWT")
    access = typed(ES, "at+jwt")
    for first, second in ((loose, strict), (IssuerSet([loose], cache), IssuerSet([strict], cache))):
        cache.clear()
        check(first, id_token, R.OK)
        assert check(first, id_token, R.OK).cached
        r = check(second, id_token, R.TOKEN_TYPE_INVALID, detail="typ")
        assert not r.cached
        check(first, id_token, R.OK)  # re-verified under the loose config: fine there
        check(second, access, R.OK)
        assert check(second, access, R.OK).cached
        assert check(first, access, R.OK).cached is False  # another verifier: verified again
    # an expired token remembered by one config is not answered for the other
    cache.clear()
    old = typed(ES, "JWT", default_claims(exp=int(NOW) - 3600))
    check(loose, old, R.TOKEN_EXPIRED, detail="exp")
    assert check(loose, old, R.TOKEN_EXPIRED).cached
    check(strict, old, R.TOKEN_TYPE_INVALID, detail="typ")


# ------------------------------------------- negative cache: time rejects (W3, expired replays)

def test_expired_replay_costs_no_signature() -> None:
    v = verifier(RS)
    token = make_token(RS, default_claims(iat=int(NOW) - 7200, exp=int(NOW) - 3600))
    before = _verify.signature_checks()
    first = check(v, token, R.TOKEN_EXPIRED, detail="exp")
    assert _verify.signature_checks() == before + 1 and not first.cached
    for _ in range(3):
        again = check(v, token, R.TOKEN_EXPIRED, detail="cached reject")
        assert again.cached
    assert _verify.signature_checks() == before + 1  # no RSA operation for the replays
    cache = v.cache
    assert (cache.negative_hits, cache.negative_size, cache.misses, len(cache)) == (3, 1, 1, 0)
    # the same Result shape as the full reject (header/payload decoded only when asked)
    for name in ("kid", "alg", "issuer", "verifier", "header", "payload", "claims"):
        assert getattr(again, name) == getattr(first, name), name
    # still expired later; if the clock goes back before exp + skew, verified afresh
    check(v, token, R.TOKEN_EXPIRED, now=NOW + 86400, detail="cached reject")
    check(v, token, R.OK, now=NOW - 3600)
    assert _verify.signature_checks() == before + 2


def test_expired_entry_invalidated_by_a_key_change() -> None:
    a, b = generate("ES256", kid="k"), generate("ES256", kid="k2")
    v = verifier(a)
    token = make_token(a, default_claims(exp=int(NOW) - 3600))
    check(v, token, R.TOKEN_EXPIRED, detail="exp")
    check(v, token, R.TOKEN_EXPIRED, detail="cached reject")
    v.set_jwks(jwks_of(a))  # the same keys: kept
    check(v, token, R.TOKEN_EXPIRED, detail="cached reject")
    v.set_jwks(jwks_of(b))  # the key is gone: the signature decides again
    check(v, token, R.KEY_NOT_FOUND)
    v.set_jwks(jwks_of(a, b))
    check(v, token, R.TOKEN_EXPIRED, detail="exp")


def test_not_yet_valid_remembered_then_accepted_after_nbf() -> None:
    v = verifier(ES)
    nbf = int(NOW) + 600
    token = make_token(ES, default_claims(nbf=nbf, exp=int(NOW) + 3600))
    before = _verify.signature_checks()
    check(v, token, R.TOKEN_NOT_YET_VALID, detail="nbf")
    check(v, token, R.TOKEN_NOT_YET_VALID, detail="cached reject")
    # up to the last instant before nbf - skew: still answered from the negative cache
    assert check(v, token, R.TOKEN_NOT_YET_VALID, now=nbf - SKEW - 0.5).cached
    assert _verify.signature_checks() == before + 1
    # once nbf - skew is reached the entry no longer holds: verified and accepted
    ok = check(v, token, R.OK, now=nbf - SKEW)
    assert not ok.cached and v.cache.negative_size == 0
    assert check(v, token, R.OK, now=nbf).cached
    assert _verify.signature_checks() == before + 2
    # and past exp + skew it is expired, not "not yet valid"
    check(v, token, R.TOKEN_EXPIRED, now=NOW + 3600 + SKEW)


def test_future_iat_remembered_then_accepted() -> None:
    v = verifier(ES)
    iat = int(NOW) + 600
    token = make_token(ES, default_claims(iat=iat, exp=iat + 600))
    check(v, token, R.TOKEN_NOT_YET_VALID, detail="iat")
    assert check(v, token, R.TOKEN_NOT_YET_VALID).cached
    check(v, token, R.OK, now=iat - SKEW)


def test_not_yet_valid_entry_never_outlives_exp() -> None:
    # nbf after exp: not yet valid now, and expired by the time nbf comes
    v = verifier(ES)
    token = make_token(ES, default_claims(nbf=int(NOW) + 3600, exp=int(NOW) + 600))
    check(v, token, R.TOKEN_NOT_YET_VALID, detail="nbf")
    check(v, token, R.TOKEN_NOT_YET_VALID, detail="cached reject")
    check(v, token, R.TOKEN_EXPIRED, now=NOW + 600 + SKEW, detail="exp")
    check(v, token, R.TOKEN_EXPIRED, now=NOW + 600 + SKEW, detail="cached reject")


def test_time_rejects_per_verifier_and_route() -> None:
    cache = TokenCache(100)
    lax = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(ES), cache=cache, clock_skew=3600)
    strict = Verifier(ISSUER, [AUDIENCE], jwks=jwks_of(ES), cache=cache, clock_skew=0,
                      name="strict")
    token = make_token(ES, default_claims(exp=int(NOW) - 60))
    check(strict, token, R.TOKEN_EXPIRED, detail="exp")
    assert check(IssuerSet([strict], cache), token, R.TOKEN_EXPIRED).cached
    check(lax, token, R.OK)  # another verifier (its skew): never the remembered reject
    check(IssuerSet([lax], cache, audiences=["api://other"]), token, R.AUDIENCE_MISMATCH)
    # the route's audiences are checked after the time window: same answer on any route
    check(IssuerSet([strict], cache, audiences=["api://other"]), token, R.TOKEN_EXPIRED)


def test_max_lifetime_rejects_are_not_remembered() -> None:
    v = verifier(ES, max_lifetime=600)
    no_iat = make_token(ES, default_claims(iat=None, exp=int(NOW) + 1200))
    check(v, no_iat, R.TOKEN_EXPIRED, detail="max lifetime")
    assert v.cache.negative_size == 0
    check(v, no_iat, R.OK, now=NOW + 700)  # exp - now shrank below the limit


def test_time_negative_cache_is_bounded_and_off_with_the_cache() -> None:
    cache = TokenCache(100, negative_entries=4)
    v = Verifier(ISSUER, [AUDIENCE], secret=HS.private, cache=cache)
    for i in range(20):
        check(v, make_token(HS, default_claims(exp=int(NOW) - 3600, jti=str(i))),
              R.TOKEN_EXPIRED)
        assert cache.negative_size <= 4
    off = Verifier(ISSUER, [AUDIENCE], secret=HS.private, cache_size=0)
    token = make_token(HS, default_claims(exp=int(NOW) - 3600))
    check(off, token, R.TOKEN_EXPIRED, detail="exp")
    assert not check(off, token, R.TOKEN_EXPIRED, detail="exp").cached
