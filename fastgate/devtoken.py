"""Development tokens: load a private key (PEM or JWK) and mint a signed JWT.

For `fastgate token` and `fastgate demo` only. Production tokens come from an identity
provider; nothing on the request path imports this module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | bytes
)

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
# RFC 7518 §3.4: the curve fixes the ES algorithm and the r||s field length.
_CURVES: dict[str, tuple[str, str, int]] = {
    "secp256r1": ("ES256", "P-256", 32),
    "secp384r1": ("ES384", "P-384", 48),
    "secp521r1": ("ES512", "P-521", 66),
}
_CRV_TO_CURVE: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
}


def b64url(data: bytes) -> str:
    """RFC 7515 §2 base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64int(text: str) -> int:
    return int.from_bytes(_b64url_decode(text), "big")


@dataclass(frozen=True)
class DevKey:
    """A signing key with the algorithm it signs with and its key id."""

    private: PrivateKey
    alg: str
    kid: str | None = None

    def public_jwk(self) -> dict[str, Any]:
        """The public JWK an issuer publishes for this key (never for HMAC secrets)."""
        jwk = _public_jwk(self.private)
        if self.kid:
            jwk["kid"] = self.kid
        jwk["alg"] = self.alg
        jwk["use"] = "sig"
        return jwk


def default_alg(private: PrivateKey) -> str:
    if isinstance(private, bytes):
        return "HS256"
    if isinstance(private, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return _CURVES[private.curve.name][0]
    return "EdDSA"


def generate_key(alg: str = "RS256", kid: str | None = None) -> DevKey:
    """A fresh key pair for `alg` (RSA 2048 for RS*/PS*, the matching curve for ES*)."""
    private: PrivateKey
    if alg[:2] in ("RS", "PS"):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg.startswith("ES"):
        curve = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}[alg]
        private = ec.generate_private_key(_CRV_TO_CURVE[curve])
    elif alg in ("EdDSA", "Ed25519"):
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"cannot generate a key for alg {alg!r}")
    return DevKey(private, alg, kid)


def load_key(data: bytes, *, alg: str | None = None, kid: str | None = None) -> DevKey:
    """Load a PEM private key or a private JWK (RSA, EC, OKP, oct)."""
    text = data.strip()
    private: PrivateKey
    if text.startswith(b"{"):
        jwk = orjson.loads(text)
        if not isinstance(jwk, dict):
            raise ValueError("a JWK must be a JSON object")
        private = _private_from_jwk(jwk)
        kid = kid or jwk.get("kid")
        alg = alg or jwk.get("alg")
    elif text.startswith(b"-----BEGIN"):
        loaded = serialization.load_pem_private_key(text, password=None)
        if not isinstance(
            loaded,
            rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
            | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
        ):
            raise ValueError(f"unsupported private key type {type(loaded).__name__}")
        private = loaded
    else:
        raise ValueError("expected a PEM private key or a private JWK (JSON)")
    return DevKey(private, alg or default_alg(private), kid)


def _private_from_jwk(jwk: Mapping[str, Any]) -> PrivateKey:
    kty = jwk.get("kty")
    if kty == "oct":
        return _b64url_decode(str(jwk["k"]))
    if kty == "RSA":
        public = rsa.RSAPublicNumbers(_b64int(jwk["e"]), _b64int(jwk["n"]))
        return rsa.RSAPrivateNumbers(
            p=_b64int(jwk["p"]), q=_b64int(jwk["q"]), d=_b64int(jwk["d"]),
            dmp1=_b64int(jwk["dp"]), dmq1=_b64int(jwk["dq"]), iqmp=_b64int(jwk["qi"]),
            public_numbers=public,
        ).private_key()
    if kty == "EC":
        curve = _CRV_TO_CURVE[jwk["crv"]]
        return ec.derive_private_key(_b64int(jwk["d"]), curve)
    if kty == "OKP" and jwk.get("crv") == "Ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(_b64url_decode(jwk["d"]))
    if kty == "OKP" and jwk.get("crv") == "Ed448":
        return ed448.Ed448PrivateKey.from_private_bytes(_b64url_decode(jwk["d"]))
    raise ValueError(f"unsupported JWK kty={kty!r} crv={jwk.get('crv')!r}")


def _public_jwk(private: PrivateKey) -> dict[str, Any]:
    if isinstance(private, bytes):
        raise ValueError("an HMAC secret has no public JWK")
    if isinstance(private, rsa.RSAPrivateKey):
        nums = private.public_key().public_numbers()
        n = nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")
        e = nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")
        return {"kty": "RSA", "n": b64url(n), "e": b64url(e)}
    if isinstance(private, ec.EllipticCurvePrivateKey):
        _, crv, size = _CURVES[private.curve.name]
        pub = private.public_key().public_numbers()
        return {"kty": "EC", "crv": crv, "x": b64url(pub.x.to_bytes(size, "big")),
                "y": b64url(pub.y.to_bytes(size, "big"))}
    crv = "Ed25519" if isinstance(private, ed25519.Ed25519PrivateKey) else "Ed448"
    return {"kty": "OKP", "crv": crv, "x": b64url(private.public_key().public_bytes_raw())}


def _sign(key: DevKey, signing_input: bytes) -> bytes:
    alg, private = key.alg, key.private
    if isinstance(private, bytes):
        return hmac.new(private, signing_input, getattr(hashlib, "sha" + alg[2:])).digest()
    if isinstance(private, rsa.RSAPrivateKey):
        digest = _HASHES[alg[2:]]()
        if alg.startswith("PS"):
            # RFC 7518 §3.5: MGF1 with the same hash, salt length = hash length.
            pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
            return private.sign(signing_input, pss, digest)
        return private.sign(signing_input, padding.PKCS1v15(), digest)
    if isinstance(private, ec.EllipticCurvePrivateKey):
        _, _, size = _CURVES[private.curve.name]
        r, s = decode_dss_signature(private.sign(signing_input, ec.ECDSA(_HASHES[alg[2:]]())))
        # RFC 7518 §3.4: JWS carries raw r||s, each left-padded to the field length.
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return private.sign(signing_input)


def mint(
    key: DevKey,
    claims: Mapping[str, Any],
    *,
    lifetime: float | None = 600,
    now: float | None = None,
    header: Mapping[str, Any] | None = None,
) -> str:
    """A compact JWS of `claims`; `lifetime` sets iat/exp unless the claims carry them."""
    now = time.time() if now is None else now
    body = dict(claims)
    if lifetime is not None:
        body.setdefault("iat", int(now))
        body.setdefault("exp", int(now + lifetime))
    hdr: dict[str, Any] = {"alg": key.alg, "typ": "JWT"}
    if key.kid:
        hdr["kid"] = key.kid
    if header:
        hdr.update(header)
    signing_input = f"{b64url(orjson.dumps(hdr))}.{b64url(orjson.dumps(body))}".encode("ascii")
    return f"{signing_input.decode('ascii')}.{b64url(_sign(key, signing_input))}"


def private_pem(key: DevKey) -> bytes:
    if isinstance(key.private, bytes):
        raise ValueError("an HMAC secret has no PEM form")
    return key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
