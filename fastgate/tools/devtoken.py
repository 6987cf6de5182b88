"""Development tokens: load a private key (PEM or JWK) and mint a signed JWT; DPoP proofs
(RFC 9449) and JWK thumbprints (RFC 7638) for sender-constrained tokens.

For `fastgate token`, `fastgate demo`, tests and benchmarks only. Production tokens come from
an identity provider; nothing on the request path imports this module.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
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


def _curve(private: ec.EllipticCurvePrivateKey) -> tuple[str, str, int]:
    """(alg, JWK crv, field bytes); ValueError for a curve JOSE has no alg for (RFC 7518 §3.4)."""
    try:
        return _CURVES[private.curve.name]
    except KeyError:
        raise ValueError(f"EC curve {private.curve.name} has no JWS alg "
                         "(use P-256, P-384 or P-521)") from None


def default_alg(private: PrivateKey) -> str:
    if isinstance(private, bytes):
        return "HS256"
    if isinstance(private, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return _curve(private)[0]
    return "EdDSA"


def algorithms_for(private: PrivateKey) -> tuple[str, ...]:
    """The JWS algs this key can sign with (RFC 7518 §3.1, RFC 8037 §3.1)."""
    if isinstance(private, bytes):
        return ("HS256", "HS384", "HS512")
    if isinstance(private, rsa.RSAPrivateKey):
        return ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
    if isinstance(private, ec.EllipticCurvePrivateKey):
        # RFC 7518 §3.4: each ES alg names one curve; P-256 cannot make an ES384 signature.
        return (_curve(private)[0],)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return ("EdDSA", "Ed25519")  # RFC 9864 §2.2: Ed25519 is the fully specified name
    return ("EdDSA", "Ed448")


def _key_kind(private: PrivateKey) -> str:
    if isinstance(private, bytes):
        return "an HMAC secret"
    if isinstance(private, rsa.RSAPrivateKey):
        return f"an RSA {private.key_size}-bit key"
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return f"an EC {_curve(private)[1]} key"
    return "an Ed25519 key" if isinstance(private, ed25519.Ed25519PrivateKey) else "an Ed448 key"


def check_alg(private: PrivateKey, alg: str) -> None:
    """ValueError (one line) unless ``key`` can make an ``alg`` signature: a token whose header
    says RS256 over an ECDSA signature is never valid, so it is never minted."""
    allowed = algorithms_for(private)
    if alg not in allowed:
        raise ValueError(f"alg {alg} cannot be made with {_key_kind(private)}; "
                         f"use {' or '.join(allowed)}")


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
    elif alg == "Ed448":
        private = ed448.Ed448PrivateKey.generate()
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
        try:
            private = _private_from_jwk(jwk)
        except KeyError as exc:  # a public JWK, or a member missing
            raise ValueError(f"not a usable private JWK: member {exc} is missing or unknown "
                             "(a public JWK cannot sign)") from None
        except (TypeError, binascii.Error, AttributeError) as exc:
            raise ValueError(f"not a usable private JWK: {exc}") from None
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
    if alg is not None and not isinstance(alg, str):
        raise ValueError(f"the JWK's alg must be a string, got {alg!r}")
    alg = alg or default_alg(private)
    check_alg(private, alg)
    return DevKey(private, alg, kid)


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


def private_jwk(key: DevKey) -> dict[str, Any]:
    """The private JWK of an asymmetric key (what :func:`load_key` reads back), with its alg."""
    private = key.private
    jwk = _public_jwk(private)
    if isinstance(private, rsa.RSAPrivateKey):
        nums = private.private_numbers()
        for name, value in (("d", nums.d), ("p", nums.p), ("q", nums.q), ("dp", nums.dmp1),
                            ("dq", nums.dmq1), ("qi", nums.iqmp)):
            jwk[name] = b64url(value.to_bytes((value.bit_length() + 7) // 8 or 1, "big"))
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        size = _CURVES[private.curve.name][2]
        jwk["d"] = b64url(private.private_numbers().private_value.to_bytes(size, "big"))
    elif isinstance(private, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        jwk["d"] = b64url(private.private_bytes_raw())
    if key.kid:
        jwk["kid"] = key.kid
    jwk["alg"] = key.alg
    return jwk


# RFC 7638 §3.2: the members a thumbprint covers, per kty (sorted, as the hash input orders them).
_THUMBPRINT_MEMBERS: dict[str, tuple[str, ...]] = {
    "EC": ("crv", "kty", "x", "y"),
    "RSA": ("e", "kty", "n"),
    "OKP": ("crv", "kty", "x"),  # RFC 8037 §2
    "oct": ("k", "kty"),
}


def jwk_thumbprint(jwk: Mapping[str, str]) -> str:
    """RFC 7638 §3 SHA-256 JWK thumbprint, base64url without padding (RFC 9449 ``cnf.jkt``).

    The hash input is a JSON object of the required members only, in lexicographic order, with
    no whitespace; other members (``kid``, ``alg``, ``use``, private ones) do not change it.
    ValueError for an unknown ``kty`` or a required member that is missing or not a string.
    """
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ValueError(f"no RFC 7638 thumbprint for kty={kty!r}")
    required: dict[str, str] = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str):
            raise ValueError(f"JWK member {name!r} is missing or not a string")
        required[name] = value
    canonical = orjson.dumps(required, option=orjson.OPT_SORT_KEYS)  # compact: no whitespace
    return b64url(hashlib.sha256(canonical).digest())


def access_token_hash(access_token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url(SHA-256(ASCII of the access token))."""
    return b64url(hashlib.sha256(access_token.encode("ascii")).digest())


def make_dpop_proof(
    private_key: PrivateKey | DevKey,
    *,
    htm: str,
    htu: str,
    access_token: str | None = None,
    nonce: str | None = None,
    iat: float | None = None,
    jti: str | None = None,
    alg: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    extra_header: Mapping[str, Any] | None = None,
) -> str:
    """A DPoP proof JWT (RFC 9449 §4.2) signed with ``private_key``.

    Header ``{"typ": "dpop+jwt", "alg", "jwk"}`` with the key's PUBLIC JWK (no kid, alg or
    use members); claims ``jti`` (16 random bytes, base64url, unless given), ``htm``, ``htu``
    (used as given: RFC 9449 wants it without query and fragment), ``iat`` (an integer; now
    unless given), ``ath`` of ``access_token`` when one is given and ``nonce`` when given.
    ``alg`` defaults to the key's (ES256/ES384/ES512 by curve, EdDSA, RS256 for RSA; PS* and
    RS384/512 on request). ``extra_claims``/``extra_header`` are merged last, so tests can
    make a proof that breaks one rule. ValueError for an HMAC secret (a proof is asymmetric)
    or an alg the key cannot make.
    """
    if isinstance(private_key, DevKey):
        alg = alg or private_key.alg
        private_key = private_key.private
    if isinstance(private_key, bytes):
        raise ValueError("a DPoP proof needs an asymmetric key (RFC 9449 §4.2), not an HMAC "
                         "secret")
    alg = alg or default_alg(private_key)
    check_alg(private_key, alg)
    header: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": _public_jwk(private_key)}
    if extra_header:
        header.update(extra_header)
    claims: dict[str, Any] = {
        "jti": jti if jti is not None else b64url(secrets.token_bytes(16)),
        "htm": htm,
        "htu": htu,
        "iat": int(time.time() if iat is None else iat),
    }
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    if nonce is not None:
        claims["nonce"] = nonce
    if extra_claims:
        claims.update(extra_claims)
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    signature = _sign(DevKey(private_key, alg), signing_input.encode("ascii"))
    return f"{signing_input}.{b64url(signature)}"
