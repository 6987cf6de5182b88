"""The worked examples of RFC 7515 Appendix A/E/F and RFC 8037 Appendix A, transcribed.

Every value below is copied from the RFC text (A.2/A.4 cross-checked against independent
published transcriptions). Each positive example is first verified with ``cryptography``
directly (``_precondition_*``), so a transcription typo fails loudly in the precondition
instead of masquerading as a verifier bug. Then fastgate must agree: at the JWS layer
(``fastgate.verify_jws``) and, where the payload is a JWT claim set, at the JWT layer
(``Verifier.verify`` with the time passed in).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from fastgate import Reason, Verifier, verify_jws


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(s: str) -> int:
    return int.from_bytes(_b64d(s), "big")


# --- RFC 7515 Appendix A.1: HMAC SHA-256 ------------------------------------------------------
# The header and payload contain CRLF and spaces (A.1.1): the signing input is the received
# base64url text, never a re-serialization of the JSON.
A1_HEADER_JSON = b'{"typ":"JWT",\r\n "alg":"HS256"}'
A1_PAYLOAD_JSON = b'{"iss":"joe",\r\n "exp":1300819380,\r\n "http://example.com/is_root":true}'
A1_HEADER = "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
A1_PAYLOAD = ("eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFt"
              "cGxlLmNvbS9pc19yb290Ijp0cnVlfQ")
A1_KEY = {"kty": "oct",
          "k": ("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAz"
                "Zr1Z9CAow")}
A1_SIG = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
A1_TOKEN = f"{A1_HEADER}.{A1_PAYLOAD}.{A1_SIG}"
A1_EXP = 1300819380
A1_CLAIMS = {"iss": "joe", "exp": A1_EXP, "http://example.com/is_root": True}

# --- RFC 7515 Appendix A.2: RSASSA-PKCS1-v1_5 SHA-256 (same payload) ---------------------------
A2_HEADER = "eyJhbGciOiJSUzI1NiJ9"  # {"alg":"RS256"}
A2_KEY = {
    "kty": "RSA",
    "n": ("ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddx"
          "HmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMs"
          "D1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSH"
          "SXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdV"
          "MTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8"
          "NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ"),
    "e": "AQAB",
}
A2_SIG = ("cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7"
          "AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQjbKBYNX4"
          "BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K"
          "0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtFZESc6BfI7noOPqv"
          "hJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrB"
          "p0igcN_IoypGlUPQGe77Rw")
A2_TOKEN = f"{A2_HEADER}.{A1_PAYLOAD}.{A2_SIG}"

# --- RFC 7515 Appendix A.3: ECDSA P-256 SHA-256 (same payload) -------------------------------
A3_HEADER = "eyJhbGciOiJFUzI1NiJ9"  # {"alg":"ES256"}
A3_KEY = {"kty": "EC", "crv": "P-256",
          "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
          "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
A3_SIG = ("DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSA"
          "pmWQxfKTUJqPP3-Kg6NU1Q")
A3_TOKEN = f"{A3_HEADER}.{A1_PAYLOAD}.{A3_SIG}"

# --- RFC 7515 Appendix A.4: ECDSA P-521 SHA-512, payload "Payload" ---------------------------
A4_HEADER = "eyJhbGciOiJFUzUxMiJ9"  # {"alg":"ES512"}
A4_PAYLOAD = "UGF5bG9hZA"  # the 7 octets "Payload": not a JWT claim set
A4_KEY = {"kty": "EC", "crv": "P-521",
          "x": ("AekpBQ8ST8a8VcfVOTNl353vSrDCLLJXmPk06wTjxrrjcBpXp5EOnYG_"
                "NjFZ6OvLFV1jSfS9tsz4qUxcWceqwQGk"),
          "y": ("ADSmRA43Z1DSNx_RvcLI87cdL07l6jQyyBXMoxVg_l2Th-x3S1WDhjDl"
                "y79ajL4Kkd0AZMaZmh9ubmf63e3kyMj2")}
A4_SIG = ("AdwMgeerwtHoh-l192l60hp9wAHZFVJbLfD_UxMi70cwnZOYaRI1bKPWROc-mZZq"
          "wqT2SI-KGDKB34XO0aw_7XdtAG8GaSwFKdCAPZgoXD2YBJZCPEX3xKpRwcdOO8Kp"
          "EHwJjyqOgzDO7iKvU8vcnwNrmxYbSW9ERBXukOXolLzeO_Jn")
A4_TOKEN = f"{A4_HEADER}.{A4_PAYLOAD}.{A4_SIG}"

# --- RFC 7515 Appendix A.5: Unsecured JWS ------------------------------------------------------
A5_TOKEN = f"eyJhbGciOiJub25lIn0.{A1_PAYLOAD}."  # {"alg":"none"}, empty signature

# --- RFC 7515 Appendix A.6 / A.7: JSON serializations of the A.2 and A.3 signatures ----------
A6_GENERAL_JSON = json.dumps({
    "payload": A1_PAYLOAD,
    "signatures": [
        {"protected": A2_HEADER, "header": {"kid": "2010-12-29"}, "signature": A2_SIG},
        {"protected": A3_HEADER, "header": {"kid": "e9bc097a-ce51-4036-9562-d2ade882db0d"},
         "signature": A3_SIG},
    ],
})
A7_FLATTENED_JSON = json.dumps({
    "payload": A1_PAYLOAD,
    "protected": A3_HEADER,
    "header": {"kid": "e9bc097a-ce51-4036-9562-d2ade882db0d"},
    "signature": A3_SIG,
})

# --- RFC 7515 Appendix E: negative test case for "crit" ---------------------------------------
# The text shows example.invalid, the encoded header (reproduced here) says example.com
# (a known erratum); either way the extension is not understood.
E_TOKEN = ("eyJhbGciOiJub25lIiwNCiAiY3JpdCI6WyJodHRwOi8vZXhhbXBsZS5jb20vVU5ERU"
           "ZJTkVEIl0sDQogImh0dHA6Ly9leGFtcGxlLmNvbS9VTkRFRklORUQiOnRydWUNCn0."
           "RkFJTA.")

# --- RFC 8037 Appendix A: Ed25519 ------------------------------------------------------------
R8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"  # A.1
R8037_KEY = {"kty": "OKP", "crv": "Ed25519",  # A.2
             "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
R8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"  # A.3
R8037_TOKEN = ("eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."  # A.4
               "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5Bh"
               "VsPt9g7sVvpAr_MuM0KAg")

BEFORE_EXP = A1_EXP - 3600  # a "now" at which the RFC's 2011 tokens are still valid


def _signing_input(token: str) -> bytes:
    return token.rsplit(".", 1)[0].encode("ascii")


def _sig(token: str) -> bytes:
    return _b64d(token.rsplit(".", 1)[1])


def _joe_verifier(**kwargs: Any) -> Verifier:
    # The A.1-A.3 claim set: iss "joe", exp, no aud (so no audience is configured).
    return Verifier(issuer="joe", **kwargs)


# --- preconditions: the transcription is right (checked with cryptography, not fastgate) ------


def test_a1_transcription() -> None:
    """RFC 7515 A.1.1: the encoded header/payload are the CRLF-containing JSON, and the MAC
    checks with the A.1 key."""
    assert _b64d(A1_HEADER) == A1_HEADER_JSON
    assert _b64d(A1_PAYLOAD) == A1_PAYLOAD_JSON
    mac = hmac.new(_b64d(A1_KEY["k"]), _signing_input(A1_TOKEN), hashlib.sha256).digest()
    assert hmac.compare_digest(mac, _sig(A1_TOKEN))


def test_a2_transcription() -> None:
    """RFC 7515 A.2: the 2048-bit key verifies the RS256 signature."""
    pub = rsa.RSAPublicNumbers(_uint(A2_KEY["e"]), _uint(A2_KEY["n"])).public_key()
    assert pub.key_size == 2048
    pub.verify(_sig(A2_TOKEN), _signing_input(A2_TOKEN), padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize(("token", "key", "curve", "hash_", "size"), [
    pytest.param(A3_TOKEN, A3_KEY, ec.SECP256R1(), hashes.SHA256(), 32, id="A.3-ES256"),
    pytest.param(A4_TOKEN, A4_KEY, ec.SECP521R1(), hashes.SHA512(), 66, id="A.4-ES512"),
])
def test_a3_a4_transcription(token: str, key: dict[str, str], curve: ec.EllipticCurve,
                             hash_: hashes.HashAlgorithm, size: int) -> None:
    """RFC 7515 A.3/A.4: raw R||S (RFC 7518 §3.4) verifies under the transcribed key."""
    pub = ec.EllipticCurvePublicNumbers(_uint(key["x"]), _uint(key["y"]), curve).public_key()
    sig = _sig(token)
    assert len(sig) == 2 * size
    der = encode_dss_signature(int.from_bytes(sig[:size], "big"),
                               int.from_bytes(sig[size:], "big"))
    pub.verify(der, _signing_input(token), ec.ECDSA(hash_))


def test_rfc8037_transcription() -> None:
    """RFC 8037 A.1-A.4: d derives x, the RFC 7638 thumbprint matches, the signature checks."""
    priv = ed25519.Ed25519PrivateKey.from_private_bytes(_b64d(R8037_D))
    assert _b64e(priv.public_key().public_bytes_raw()) == R8037_KEY["x"]
    # RFC 7638 §3.2: required members only, lexicographic order, no whitespace.
    canonical = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": R8037_KEY["x"]},
                           separators=(",", ":"), sort_keys=True).encode()
    assert _b64e(hashlib.sha256(canonical).digest()) == R8037_THUMBPRINT
    assert _b64d(R8037_TOKEN.split(".")[1]) == b"Example of Ed25519 signing"
    ed25519.Ed25519PublicKey.from_public_bytes(_b64d(R8037_KEY["x"])).verify(
        _sig(R8037_TOKEN), _signing_input(R8037_TOKEN))


# --- RFC 7515 Appendix A.1 through fastgate ----------------------------------------------------


def test_a1_hs256_jws_layer() -> None:
    """RFC 7515 A.1.2: the JWS validates, CRLF and spaces in the JSON included."""
    assert verify_jws(A1_TOKEN, A1_KEY) is Reason.OK
    assert verify_jws(A1_TOKEN, A1_KEY, algorithms=["HS256"]) is Reason.OK


def test_a1_hs256_jwt_layer_expired_now() -> None:
    """RFC 7519 §4.1.4: exp 1300819380 (March 2011) has passed, with the real clock."""
    v = _joe_verifier(secret=_b64d(A1_KEY["k"]), algorithms=["HS256"])
    r = v.verify(A1_TOKEN)
    assert r.reason is Reason.TOKEN_EXPIRED, r.detail


def test_a1_hs256_jwt_layer_ok_before_exp() -> None:
    """RFC 7515 A.1 + RFC 7519 §7.2: with now before exp and issuer "joe" the JWT is valid and
    its claims are the RFC's, "http://example.com/is_root" included."""
    v = _joe_verifier(secret=_b64d(A1_KEY["k"]), algorithms=["HS256"])
    r = v.verify(A1_TOKEN, now=BEFORE_EXP)
    assert r.ok, (r.reason, r.detail)
    assert r.claims == A1_CLAIMS
    assert r.header == {"typ": "JWT", "alg": "HS256"}


def test_a1_hs256_jwt_layer_wrong_issuer() -> None:
    """RFC 7519 §4.1.1: the same token under another issuer's configuration is not admitted."""
    v = Verifier(issuer="joe ", secret=_b64d(A1_KEY["k"]), algorithms=["HS256"])
    assert v.verify(A1_TOKEN, now=BEFORE_EXP).reason is Reason.ISSUER_UNKNOWN


def test_a1_hs256_jwt_layer_audience_required() -> None:
    """RFC 7519 §4.1.3: the A.1 claims carry no aud, so a verifier that expects one refuses."""
    v = _joe_verifier(audiences=["api://orders"], secret=_b64d(A1_KEY["k"]),
                      algorithms=["HS256"])
    assert v.verify(A1_TOKEN, now=BEFORE_EXP).reason is Reason.AUDIENCE_MISMATCH


# --- RFC 7515 Appendix A.2-A.4 ---------------------------------------------------------------


def test_a2_rs256() -> None:
    """RFC 7515 A.2.2: valid at the JWS layer and, before exp, at the JWT layer."""
    assert verify_jws(A2_TOKEN, A2_KEY) is Reason.OK
    assert verify_jws(A2_TOKEN, {"keys": [A2_KEY]}, algorithms=["RS256"]) is Reason.OK
    v = _joe_verifier(jwks={"keys": [A2_KEY]}, algorithms=["RS256"])
    r = v.verify(A2_TOKEN, now=BEFORE_EXP)
    assert r.ok, (r.reason, r.detail)
    assert r.claims == A1_CLAIMS
    assert v.verify(A2_TOKEN).reason is Reason.TOKEN_EXPIRED


def test_a2_rs256_not_as_ps256() -> None:
    """RFC 7518 §3.5: the PKCS#1 v1.5 signature of A.2 is not a PS256 signature."""
    ps256_header = _b64e(b'{"alg":"PS256"}')
    forged = f"{ps256_header}.{A1_PAYLOAD}.{A2_SIG}"
    assert verify_jws(forged, A2_KEY) is Reason.SIGNATURE_INVALID


def test_a3_es256() -> None:
    """RFC 7515 A.3.2: valid at the JWS layer and, before exp, at the JWT layer."""
    assert verify_jws(A3_TOKEN, A3_KEY) is Reason.OK
    v = _joe_verifier(jwks={"keys": [A3_KEY]}, algorithms=["ES256"])
    r = v.verify(A3_TOKEN, now=BEFORE_EXP)
    assert r.ok, (r.reason, r.detail)
    assert r.claims == A1_CLAIMS


def test_a3_es256_key_bound_to_curve() -> None:
    """RFC 7518 §3.4: ES256 names P-256, so the A.4 P-521 key is never used for the A.3 ES256
    JWS; and RFC 8725 §3.1: an allow-list without ES256 refuses it whatever the key."""
    assert verify_jws(A3_TOKEN, A4_KEY) is Reason.ALG_NOT_ALLOWED
    assert verify_jws(A3_TOKEN, A3_KEY, algorithms=["ES512"]) is Reason.ALG_NOT_ALLOWED


def test_a4_es512() -> None:
    """RFC 7515 A.4.2: 132-octet R||S over "Payload" validates at the JWS layer; the payload is
    not a claim set (RFC 7519 §7.2 step 10), so the JWT layer refuses it."""
    assert verify_jws(A4_TOKEN, A4_KEY) is Reason.OK
    assert verify_jws(A4_TOKEN, A4_KEY, algorithms=["ES512"]) is Reason.OK
    v = _joe_verifier(jwks={"keys": [A4_KEY]}, algorithms=["ES512"])
    assert v.verify(A4_TOKEN, now=BEFORE_EXP).reason is Reason.TOKEN_MALFORMED


# --- RFC 7515 Appendix A.5-A.7, E, F: must be rejected -----------------------------------------


def test_a5_unsecured_jws_rejected() -> None:
    """RFC 7515 A.5 + RFC 8725 §3.1: "none" is never accepted, whatever key is configured."""
    assert verify_jws(A5_TOKEN, A1_KEY) is Reason.ALG_NOT_ALLOWED
    assert verify_jws(A5_TOKEN, A2_KEY) is Reason.ALG_NOT_ALLOWED
    v = _joe_verifier(secret=_b64d(A1_KEY["k"]), algorithms=["HS256"])
    assert v.verify(A5_TOKEN, now=BEFORE_EXP).reason is Reason.ALG_NOT_ALLOWED


@pytest.mark.parametrize("serialized", [
    pytest.param(A6_GENERAL_JSON, id="A.6-general"),
    pytest.param(A7_FLATTENED_JSON, id="A.7-flattened"),
])
def test_a6_a7_json_serialization_rejected(serialized: str) -> None:
    """RFC 7515 A.6/A.7 (§7.2): a JWT is compact-serialized only (RFC 7519 §1), so the JSON
    forms of the very signatures that validate above are malformed tokens here."""
    assert verify_jws(serialized, A2_KEY) is Reason.TOKEN_MALFORMED
    assert verify_jws(serialized, A3_KEY) is Reason.TOKEN_MALFORMED
    v = _joe_verifier(jwks={"keys": [A3_KEY]}, algorithms=["ES256"])
    assert v.verify(serialized, now=BEFORE_EXP).reason is Reason.TOKEN_MALFORMED


def test_appendix_e_crit_rejected() -> None:
    """RFC 7515 App. E / §4.1.11: a crit naming an extension we do not understand is refused
    (it also says "none", so the crit-specific variant below is the discriminating one)."""
    assert verify_jws(E_TOKEN, A1_KEY) in (Reason.TOKEN_MALFORMED, Reason.ALG_NOT_ALLOWED)


def test_appendix_e_crit_on_a_valid_mac_rejected() -> None:
    """RFC 7515 App. E applied to the A.1 key: the same unknown crit on an HS256 header with a
    correct MAC is refused, while the identical header without crit is accepted."""
    key = _b64d(A1_KEY["k"])

    def signed(header: bytes) -> str:
        head = _b64e(header)
        mac = hmac.new(key, f"{head}.{A1_PAYLOAD}".encode(), hashlib.sha256).digest()
        return f"{head}.{A1_PAYLOAD}.{_b64e(mac)}"

    with_crit = signed(b'{"alg":"HS256",\r\n "crit":["http://example.invalid/UNDEFINED"],\r\n'
                       b' "http://example.invalid/UNDEFINED":true\r\n}')
    without = signed(b'{"alg":"HS256",\r\n "http://example.invalid/UNDEFINED":true\r\n}')
    assert verify_jws(without, A1_KEY) is Reason.OK
    assert verify_jws(with_crit, A1_KEY) is Reason.TOKEN_MALFORMED
    v = _joe_verifier(secret=key, algorithms=["HS256"])
    assert v.verify(without, now=BEFORE_EXP).ok
    assert v.verify(with_crit, now=BEFORE_EXP).reason is Reason.TOKEN_MALFORMED


def test_appendix_f_detached_content_rejected() -> None:
    """RFC 7515 App. F: A.1 with its payload detached ("H..S"). fastgate never supplies
    detached content. At the JWS layer an empty payload is legal (RFC 7515 §7.1), so the MAC
    is checked over "H." and fails; at the JWT layer it is malformed (catalog A15)."""
    detached = f"{A1_HEADER}..{A1_SIG}"
    assert verify_jws(detached, A1_KEY) is Reason.SIGNATURE_INVALID
    v = _joe_verifier(secret=_b64d(A1_KEY["k"]), algorithms=["HS256"])
    assert v.verify(detached, now=BEFORE_EXP).reason is Reason.TOKEN_MALFORMED


# --- RFC 8037 Appendix A.4/A.5: Ed25519 ---------------------------------------------------------


def test_rfc8037_a4_ed25519() -> None:
    """RFC 8037 A.4/A.5: the EdDSA JWS validates with the A.2 public key."""
    assert verify_jws(R8037_TOKEN, R8037_KEY) is Reason.OK
    assert verify_jws(R8037_TOKEN, R8037_KEY, algorithms=["EdDSA"]) is Reason.OK


def test_rfc8037_a4_allow_list_and_tamper() -> None:
    """RFC 8725 §3.1: the caller's allow-list wins; RFC 8032 §5.1.7: one flipped bit fails."""
    assert verify_jws(R8037_TOKEN, R8037_KEY, algorithms=["ES256"]) is Reason.ALG_NOT_ALLOWED
    head, payload, sig = R8037_TOKEN.split(".")
    raw = bytearray(_b64d(sig))
    raw[0] ^= 1
    assert verify_jws(f"{head}.{payload}.{_b64e(bytes(raw))}", R8037_KEY) \
        is Reason.SIGNATURE_INVALID
    other = f"{head}.{_b64e(b'Example of Ed25519 signinG')}.{sig}"
    assert verify_jws(other, R8037_KEY) is Reason.SIGNATURE_INVALID


def test_rfc8037_key_is_not_an_x25519_key() -> None:
    """RFC 8037 §3.1/§3.2: the same x under crv X25519 is a key-agreement key, never EdDSA."""
    x25519 = {**R8037_KEY, "crv": "X25519"}
    assert verify_jws(R8037_TOKEN, x25519) in (Reason.KEY_NOT_FOUND, Reason.ALG_NOT_ALLOWED)
