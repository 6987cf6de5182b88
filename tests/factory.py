"""Keys per algorithm and a token factory that signs with `cryptography` directly.

Independent of fastgate's verifier on purpose: a token minted here is what an identity
provider would send, so a verifier bug cannot hide behind a matching minting bug.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "https://idp.example.test/"
AUDIENCE = "api://orders"
NOW = 1_800_000_000.0  # a fixed "now" for tests that pass time as a parameter

_HASH = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_EC_CURVES = {"ES256": (ec.SECP256R1, "P-256", 32), "ES384": (ec.SECP384R1, "P-384", 48),
              "ES512": (ec.SECP521R1, "P-521", 66)}


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_json(obj: Any) -> str:
    return b64u(json.dumps(obj, separators=(",", ":")).encode())


def _uint(value: int, length: int | None = None) -> str:
    length = length or (value.bit_length() + 7) // 8
    return b64u(value.to_bytes(length, "big"))


@dataclass
class SigningKey:
    """A private key, its alg and kid, and the public JWK a JWKS would publish."""

    alg: str
    kid: str
    private: Any  # cryptography private key, or bytes for HS*

    @property
    def public_jwk(self) -> dict[str, Any]:
        return public_jwk(self.private, self.kid, self.alg)

    def sign(self, signing_input: bytes) -> bytes:
        return sign(self.alg, self.private, signing_input)


def public_jwk(private: Any, kid: str | None = None, alg: str | None = None) -> dict[str, Any]:
    if isinstance(private, bytes):
        jwk: dict[str, Any] = {"kty": "oct", "k": b64u(private)}
    elif isinstance(private, rsa.RSAPrivateKey):
        nums = private.public_key().public_numbers()
        jwk = {"kty": "RSA", "n": _uint(nums.n), "e": _uint(nums.e)}
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        nums = private.public_key().public_numbers()
        crv, size = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48),
                     "secp521r1": ("P-521", 66)}[private.curve.name]
        jwk = {"kty": "EC", "crv": crv, "x": _uint(nums.x, size), "y": _uint(nums.y, size)}
    elif isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes_raw()
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64u(raw)}
    elif isinstance(private, ed448.Ed448PrivateKey):
        raw = private.public_key().public_bytes_raw()
        jwk = {"kty": "OKP", "crv": "Ed448", "x": b64u(raw)}
    else:  # pragma: no cover
        raise TypeError(type(private))
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return jwk


def generate(alg: str, kid: str | None = None, rsa_bits: int = 2048) -> SigningKey:
    kid = kid or f"{alg.lower()}-key"
    if alg.startswith(("RS", "PS")):
        priv: Any = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    elif alg in _EC_CURVES:
        priv = ec.generate_private_key(_EC_CURVES[alg][0]())
    elif alg in ("EdDSA", "Ed25519"):
        priv = ed25519.Ed25519PrivateKey.generate()
    elif alg == "Ed448":
        priv = ed448.Ed448PrivateKey.generate()
    elif alg.startswith("HS"):
        priv = hashlib.sha512(kid.encode()).digest()[: int(alg[2:]) // 8]
    else:
        raise ValueError(alg)
    return SigningKey(alg=alg, kid=kid, private=priv)


def sign(alg: str, private: Any, signing_input: bytes) -> bytes:
    if alg.startswith("HS"):
        return hmac.new(private, signing_input, "sha" + alg[2:]).digest()
    if alg.startswith("RS"):
        return private.sign(signing_input, padding.PKCS1v15(), _HASH[alg[2:]]())
    if alg.startswith("PS"):
        h = _HASH[alg[2:]]()
        return private.sign(signing_input, padding.PSS(mgf=padding.MGF1(h),
                                                       salt_length=h.digest_size), h)
    if alg in _EC_CURVES:
        der = private.sign(signing_input, ec.ECDSA(_HASH[alg[2:]]()))
        r, s = decode_dss_signature(der)
        size = _EC_CURVES[alg][2]
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return private.sign(signing_input)  # EdDSA


def default_claims(now: float = NOW, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {"iss": ISSUER, "sub": "user-1", "aud": AUDIENCE,
                              "iat": int(now), "exp": int(now) + 600}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def make_token(key: SigningKey, claims: dict[str, Any] | None = None, *,
               header: dict[str, Any] | None = None, kid: Any = "__key__",
               alg: str | None = None, raw_payload: bytes | None = None,
               raw_header: bytes | None = None) -> str:
    """Sign a compact JWS. ``header`` extends the default {"alg","kid","typ"} header;
    ``kid=None`` omits the kid; ``raw_*`` override the JSON bytes exactly."""
    hdr: dict[str, Any] = {"alg": alg or key.alg, "typ": "JWT"}
    if kid == "__key__":
        hdr["kid"] = key.kid
    elif kid is not None:
        hdr["kid"] = kid
    if header:
        hdr.update(header)
    h = b64u(raw_header) if raw_header is not None else b64u_json(hdr)
    body = claims if claims is not None else default_claims()
    p = b64u(raw_payload) if raw_payload is not None else b64u_json(body)
    signing_input = f"{h}.{p}".encode("ascii")
    return f"{h}.{p}.{b64u(key.sign(signing_input))}"


def jwks_of(*keys: SigningKey, with_alg: bool = False) -> dict[str, Any]:
    return {"keys": [public_jwk(k.private, k.kid, k.alg if with_alg else None)
                     for k in keys if not isinstance(k.private, bytes)]}


# ---------------------------------------------------------------------------------------------
# DPoP (RFC 9449): client keys, thumbprints and proofs, minted with `cryptography` only.


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 §3: SHA-256 over the required members, sorted, no whitespace."""
    members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
               "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    text = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64u(hashlib.sha256(text.encode()).digest())


def ath(token: str) -> str:
    """RFC 9449 §4.2: base64url(SHA-256(access token))."""
    return b64u(hashlib.sha256(token.encode("ascii")).digest())


def make_proof(key: SigningKey, *, htm: str, htu: str, token: str | None, iat: float,
               jti: str | None = None, nonce: str | None = None,
               header: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
               claims: dict[str, Any] | None = None, alg: str | None = None) -> str:
    """A DPoP proof (RFC 9449 §4.2) signed by ``key``; ``header``/``claims`` override members,
    ``drop`` removes claims (to make each §4.3 check fail alone)."""
    import os

    hdr: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg or key.alg,
                           "jwk": public_jwk(key.private)}
    if header:
        hdr.update(header)
    body: dict[str, Any] = {"jti": jti or b64u(os.urandom(16)), "htm": htm, "htu": htu,
                            "iat": int(iat)}
    if token is not None:
        body["ath"] = ath(token)
    if nonce is not None:
        body["nonce"] = nonce
    if claims:
        body.update(claims)
    for name in drop:
        body.pop(name, None)
    signing_input = f"{b64u_json(hdr)}.{b64u_json(body)}".encode("ascii")
    return f"{signing_input.decode()}.{b64u(sign(alg or key.alg, key.private, signing_input))}"


ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                   "ES256", "ES384", "ES512", "EdDSA")
HMAC_ALGS = ("HS256", "HS384", "HS512")

_KEYS: dict[str, SigningKey] = {}


def key_for(alg: str) -> SigningKey:
    """One key per algorithm for the whole session (RSA generation is slow)."""
    if alg not in _KEYS:
        _KEYS[alg] = generate(alg)
    return _KEYS[alg]


class Clock:
    """A clock a test moves by hand (``clock.now += 5``): pass it where the code takes one."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
