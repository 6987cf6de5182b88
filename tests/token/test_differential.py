"""Differential tests: fastgate's Verifier against PyJWT on the same tokens.

PyJWT is configured like the Verifier: the same key, ``algorithms=[alg]``, ``audience``,
``issuer``, ``leeway`` = the Verifier's ``clock_skew`` and ``options={"require": ["exp"]}``.

* Valid tokens of every algorithm (RS/PS/ES/EdDSA/HS, keys from ``tests.conftest.key_for``):
  both accept and agree on the claims, byte for byte after JSON decoding.
* A hypothesis property mutates valid tokens (bit flips in the raw bytes, segment swaps
  between two tokens, ``-``->``+`` / ``_``->``/``, ``=`` padding, inserted whitespace, JSON edits
  of header and payload re-encoded and re-signed or not: alg changes incl. HS-with-the-public-
  key confusion and ``none``, ``crit``/``b64``/``jku``/``jwk``, duplicate names, exp/nbf/iat/aud/
  iss type and value changes, extra/missing segments, truncated signatures). For every token:
  ``verify`` does not raise, ``result.detail != "internal error"``, and fastgate never accepts
  a token PyJWT rejects (when both accept, the claims are equal). The other direction is
  expected and fine: fastgate is stricter (strict base64url, duplicate names, kid binding, ...).

Time: PyJWT reads the real clock, so tokens are minted relative to ``time.time()`` here (not
the fixed NOW of tests.factory) and fastgate gets ``now=time.time()``. Time-valued mutations
stay at least 30 s away from every boundary, so the two clocks never straddle one.
"""

from __future__ import annotations

import functools
import json
import time
from base64 import urlsafe_b64decode
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate import Verifier
from tests.factory import (
    ASYMMETRIC_ALGS,
    AUDIENCE,
    HMAC_ALGS,
    ISSUER,
    SigningKey,
    b64u,
    default_claims,
    key_for,
    sign,
)

LEEWAY = 60
ALGS = ASYMMETRIC_ALGS + HMAC_ALGS
MARGIN = 30  # seconds between any mutated time value and a validity boundary


@functools.cache
def _verifier(alg: str) -> Verifier:
    key = key_for(alg)
    common: dict[str, Any] = {"issuer": ISSUER, "audiences": [AUDIENCE], "algorithms": [alg],
                              "clock_skew": LEEWAY, "require": ("exp",)}
    if alg in HMAC_ALGS:
        return Verifier(secret=key.private, **common)
    return Verifier(jwks={"keys": [key.public_jwk]}, **common)


def _pyjwt_key(key: SigningKey) -> Any:
    return key.private if isinstance(key.private, bytes) else key.private.public_key()


def _pyjwt(token: str | bytes, alg: str) -> dict[str, Any] | None:
    """PyJWT's decision: the claims, or None when it rejects (any exception is a reject, except
    a warning turned into an error by the test config: that must surface, not count as a no)."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, _pyjwt_key(key_for(alg)), algorithms=[alg], audience=AUDIENCE,
            issuer=ISSUER, leeway=LEEWAY, options={"require": ["exp"]})
    except Warning:
        raise
    except Exception:
        return None
    return claims


def _mint(alg: str, claims: dict[str, Any] | None = None, *,
          header: dict[str, Any] | None = None, kid: bool = True) -> str:
    key = key_for(alg)
    hdr: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid:
        hdr["kid"] = key.kid
    hdr.update(header or {})
    body = claims if claims is not None else default_claims(time.time())
    return _sign_parts(alg, _enc(hdr), _enc(body))


def _enc(obj: Any) -> str:
    return b64u(json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def _sign_parts(alg: str, head: str, payload: str) -> str:
    key = key_for(alg)
    signing_input = f"{head}.{payload}".encode("ascii")
    return f"{head}.{payload}.{b64u(sign(alg, key.private, signing_input))}"


# --------------------------------------------------------------------------------------------
# Valid tokens: both accept, same claims
# --------------------------------------------------------------------------------------------


def _claim_variants(now: float) -> dict[str, tuple[dict[str, Any], dict[str, Any], bool]]:
    """name -> (claims, extra header, with kid)."""
    base = default_claims(now)
    return {
        "default": (base, {}, True),
        "aud-list": ({**base, "aud": ["api://other", AUDIENCE]}, {}, True),
        "nbf-past": ({**base, "nbf": int(now) - 10}, {}, True),
        "no-iat": (default_claims(now, iat=None), {}, True),
        "float-exp": ({**base, "exp": now + 600.5}, {}, True),
        "nested": ({**base, "tenant": {"id": "t-1", "region": "eu-west-1"},
                    "roles": ["reader", "writer"], "name": "Zoë ✓ 日本",
                    "scope": "orders:read orders:write", "email_verified": True,
                    "n": 3.25, "none": None}, {}, True),
        "no-kid": (base, {}, False),
        "extra-header": (base, {"typ": "at+jwt", "x5t": "ignored", "cty": "json"}, True),
    }


_VARIANTS = list(_claim_variants(0.0))


@pytest.mark.parametrize("variant", _VARIANTS)
@pytest.mark.parametrize("alg", ALGS)
def test_valid_tokens_accepted_by_both_with_equal_claims(alg: str, variant: str) -> None:
    claims, header, with_kid = _claim_variants(time.time())[variant]
    token = _mint(alg, claims, header=header, kid=with_kid)
    expected = _pyjwt(token, alg)
    assert expected is not None, "PyJWT rejects the factory's valid token"
    result = _verifier(alg).verify(token, now=time.time())
    assert result.ok, (result.reason, result.detail)
    assert result.claims == expected == json.loads(json.dumps(claims))


# --------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------


@dataclass
class Mutant:
    alg: str
    token: str | bytes
    what: str


def _segments(token: str) -> list[str]:
    return token.split(".")


def _public_pem(alg: str) -> bytes:
    priv = key_for(alg).private
    return bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def _can_sign(key: SigningKey, alg: str) -> bool:
    """Whether the legitimate private key can produce an ``alg`` signature at all."""
    if isinstance(key.private, bytes):
        return alg in HMAC_ALGS
    if key.alg.startswith(("RS", "PS")):
        return alg.startswith(("RS", "PS")) and alg in ALGS
    return alg == key.alg  # an EC key is bound to its curve's alg, Ed25519 to EdDSA


def _resign(alg: str, head_json: dict[str, Any] | str, payload_json: dict[str, Any] | str
            ) -> str:
    """Sign edited JSON with the legitimate key, under the header's (possibly edited) alg when
    the key can make such a signature; an HS* alg over an asymmetric key uses the public key's
    PEM as the HMAC secret (the classic confusion, catalog B3); "none" gets an empty signature;
    anything else is signed under the original alg."""
    head = b64u(head_json.encode()) if isinstance(head_json, str) else _enc(head_json)
    payload = b64u(payload_json.encode()) if isinstance(payload_json, str) \
        else _enc(payload_json)
    new_alg = head_json.get("alg") if isinstance(head_json, dict) else alg
    signing_input = f"{head}.{payload}".encode("ascii")
    key = key_for(alg)
    if new_alg in ("none", "None"):
        return f"{head}.{payload}."
    if isinstance(new_alg, str) and _can_sign(key, new_alg):
        return f"{head}.{payload}.{b64u(sign(new_alg, key.private, signing_input))}"
    if new_alg in HMAC_ALGS:
        return f"{head}.{payload}.{b64u(sign(new_alg, _public_pem(alg), signing_input))}"
    return f"{head}.{payload}.{b64u(sign(alg, key.private, signing_input))}"


_HEADER_EDITS: list[tuple[str, Any]] = [
    ("alg", "none"), ("alg", "None"), ("alg", "HS256"), ("alg", "HS512"), ("alg", "RS256"),
    ("alg", "RS512"), ("alg", "PS256"), ("alg", "ES256"), ("alg", "EdDSA"), ("alg", "Ed25519"),
    ("alg", ""), ("alg", None), ("alg", 256), ("alg", ["RS256"]), ("alg", "rs256"),
    ("alg", "RS256 "), ("crit", []), ("crit", ["exp"]), ("crit", ["b64"]), ("b64", False),
    ("jku", "https://attacker.example/jwks.json"), ("x5u", "http://127.0.0.1:1/"),
    ("jwk", {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}), ("kid", "other"),
    ("kid", 7), ("kid", None), ("kid", "k\r\nX: 1"), ("enc", "A128GCM"), ("zip", "DEF"),
    ("cty", "JWT"), ("typ", None),
]


def _payload_edits(now: float) -> list[tuple[str, Any]]:
    future = int(now) + 600
    past = int(now) - LEEWAY - 120
    return [
        ("exp", future), ("exp", past), ("exp", str(future)), ("exp", True), ("exp", None),
        ("exp", future + 0.5), ("exp", 1e300), ("exp", -1), ("exp", [future]),
        ("exp", {"v": future}), ("exp", 10**19), ("exp", "__drop__"),
        ("nbf", int(now) + LEEWAY + 3600), ("nbf", int(now) - 10), ("nbf", "soon"),
        ("iat", int(now) + LEEWAY + 3600), ("iat", "x"), ("iat", int(now) - 3600),
        ("iss", "https://idp.example.test"), ("iss", ISSUER.upper()), ("iss", None),
        ("iss", 123), ("iss", [ISSUER]), ("iss", "__drop__"),
        ("aud", ["api://other"]), ("aud", []), ("aud", [AUDIENCE, 1]), ("aud", 123),
        ("aud", AUDIENCE + " "), ("aud", [AUDIENCE, "x"]), ("aud", "__drop__"),
        ("sub", 123), ("sub", None), ("jti", 5),
    ]


def _edit(obj: dict[str, Any], name: str, value: Any) -> dict[str, Any]:
    out = dict(obj)
    if value == "__drop__" or (value is None and name in ("kid", "typ")):
        out.pop(name, None)
    else:
        out[name] = value
    return out


def _with_segment(alg: str, token: str, header: dict[str, Any], claims: dict[str, Any],
                  seg: int, new: dict[str, Any] | str, resign: bool) -> str:
    """``token`` with its header (``seg`` 0) or payload (1) replaced by ``new`` (an object or
    JSON text): re-signed by :func:`_resign`, or keeping the original signature."""
    if resign:
        return _resign(alg, new if seg == 0 else header, new if seg == 1 else claims)
    parts = _segments(token)
    parts[seg] = b64u(new.encode()) if isinstance(new, str) else _enc(new)
    return ".".join(parts)


def _dup_json(obj: dict[str, Any], name: str, value: Any, first: bool) -> str:
    """JSON text with ``name`` twice: the edited value first or last (catalog B14/E3)."""
    body = json.dumps(obj, separators=(",", ":"))
    extra = f'"{name}":{json.dumps(value)}'
    return "{" + extra + "," + body[1:] if first else body[:-1] + "," + extra + "}"


@st.composite
def mutants(draw: st.DrawFn) -> Mutant:
    alg = draw(st.sampled_from(ALGS))
    now = time.time()
    claims = default_claims(now)
    key = key_for(alg)
    header: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": key.kid}
    token = _mint(alg, claims)
    kind = draw(st.sampled_from(["bitflip", "swap", "alphabet", "padding", "whitespace",
                                 "header", "payload", "dup", "structure"]))

    if kind == "bitflip":
        raw = bytearray(token.encode())
        flips = draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 7)),
                              min_size=1, max_size=3, unique=True))
        for i, bit in flips:
            raw[i] ^= 1 << bit
        return Mutant(alg, bytes(raw), f"bitflip {flips}")

    if kind == "swap":
        other_alg = draw(st.sampled_from(ALGS))
        other_claims = {**default_claims(now), "sub": "user-2", "roles": ["admin"]}
        other = _mint(other_alg, other_claims)
        a, b = _segments(token), _segments(other)
        pick = draw(st.lists(st.booleans(), min_size=3, max_size=3))
        parts = [b[i] if take else a[i] for i, take in enumerate(pick)]
        return Mutant(alg, ".".join(parts), f"swap {pick} with {other_alg}")

    if kind == "alphabet":
        src, dst = draw(st.sampled_from([("-", "+"), ("_", "/")]))
        everywhere = draw(st.booleans())
        mutated = token.replace(src, dst) if everywhere else token.replace(src, dst, 1)
        return Mutant(alg, mutated, f"alphabet {src}->{dst} all={everywhere}")

    if kind == "padding":
        seg = draw(st.integers(0, 2))
        parts = _segments(token)
        parts[seg] += "=" * draw(st.integers(1, 3))
        return Mutant(alg, ".".join(parts), f"padding on segment {seg}")

    if kind == "whitespace":
        pos = draw(st.integers(0, len(token)))
        ws = draw(st.sampled_from([" ", "\t", "\n", "\r\n", "    ", "\u00a0"]))
        return Mutant(alg, token[:pos] + ws + token[pos:], f"whitespace {ws!r} at {pos}")

    resign = draw(st.booleans())
    if kind in ("header", "payload"):
        seg = 0 if kind == "header" else 1
        name, value = draw(st.sampled_from(_HEADER_EDITS if seg == 0 else _payload_edits(now)))
        edited = _edit(header if seg == 0 else claims, name, value)
        mutated = _with_segment(alg, token, header, claims, seg, edited, resign)
        return Mutant(alg, mutated, f"{kind} {name}={value!r} resign={resign}")

    if kind == "dup":
        in_header = draw(st.booleans())
        first = draw(st.booleans())
        if in_header:
            name, value = draw(st.sampled_from([("alg", "none"), ("alg", "HS256"),
                                                ("kid", "other"), ("alg", alg)]))
            text = _dup_json(header, name, value, first)
        else:
            name, value = draw(st.sampled_from([
                ("exp", int(now) - LEEWAY - 120), ("exp", int(now) + 600),
                ("iss", "https://evil.example/"), ("aud", "api://other"),
                ("sub", "admin"), ("nbf", int(now) + LEEWAY + 3600)]))
            text = _dup_json(claims, name, value, first)
        mutated = _with_segment(alg, token, header, claims, 0 if in_header else 1, text, resign)
        return Mutant(alg, mutated, f"duplicate {name}={value!r} first={first} "
                                    f"header={in_header} resign={resign}")

    # structure: segment count and signature length
    parts = _segments(token)
    op = draw(st.sampled_from(["drop-sig", "empty-sig", "extra", "two", "truncate", "extend",
                               "empty-payload", "only-dots"]))
    if op == "drop-sig":
        mutated = ".".join(parts[:2])
    elif op == "empty-sig":
        mutated = f"{parts[0]}.{parts[1]}."
    elif op == "extra":
        mutated = f"{token}.{parts[2]}"
    elif op == "two":
        mutated = f"{parts[0]}.{parts[2]}"
    elif op == "empty-payload":
        mutated = f"{parts[0]}..{parts[2]}"
    elif op == "only-dots":
        mutated = "." * draw(st.integers(0, 50))
    else:
        sig = urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        k = draw(st.integers(1, 4))
        sig = sig[:-k] if op == "truncate" else sig + b"\0" * k
        mutated = f"{parts[0]}.{parts[1]}.{b64u(sig)}"
    return Mutant(alg, mutated, f"structure {op}")


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(m=mutants())
def test_mutants_never_accepted_when_pyjwt_rejects(m: Mutant) -> None:
    result = _verifier(m.alg).verify(m.token, now=time.time())  # must not raise
    assert result.detail != "internal error", (m.what, m.token)
    expected = _pyjwt(m.token, m.alg)
    if result.ok:
        assert expected is not None, \
            f"fastgate accepted what PyJWT rejects: {m.what}: {m.token!r}"
        assert result.claims == expected, m.what


@settings(max_examples=100, deadline=None, database=None)
@given(alg=st.sampled_from(ALGS), junk=st.binary(max_size=300) | st.text(max_size=300))
def test_arbitrary_input_never_raises_nor_accepted(alg: str, junk: bytes | str) -> None:
    result = _verifier(alg).verify(junk, now=time.time())
    assert result.detail != "internal error", junk
    assert not result.ok
    assert _pyjwt(junk, alg) is None
