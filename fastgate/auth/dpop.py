"""Proof of possession and replay on a route, compiled once (RFC 9449 DPoP; RFC 7523 §3).

What a request checks is in the compiled protocol (``ClientProtocol.possess`` in
``fastgate/dataplane/_http.pyx``) and the compiled proof check
(``fastgate.token._verify.DpopRule``); this
module holds what they read, built at config load: the route's :class:`Possession`, the
gateway's DPoP nonces (:class:`NonceIssuer`, RFC 9449 §8) and the one-time-token key rule.
What remembers jtis and nonces is :mod:`fastgate.auth.replay`.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from fastgate.auth.responses import Canned, build_bearer_binding_reject
from fastgate.auth.wire import Wire
from fastgate.config import AuthConfig, ProviderConfig, TokenSource
from fastgate.token._verify import DpopRule
from fastgate.token.reasons import Reason

#: RFC 9449 §7.1: a DPoP-bound token travels as ``Authorization: DPoP <token>``; a route
#: with a dpop block reads this source besides its providers' ``token_from``.
DPOP_SOURCE = TokenSource(place="header", name="Authorization", prefix="DPoP ")
#: The DPoP proof's own header (RFC 9449 §4.1); read by the auth layer, forwarded.
DPOP_HEADER = "DPoP"


class NonceStore(Protocol):
    """The part of a :mod:`fastgate.auth.replay` store the nonces use."""

    def add_nonce(self, nonce: bytes, ttl: float) -> None: ...


class NonceIssuer:
    """The gateway's current DPoP nonce (RFC 9449 §8), rotated every ``period`` seconds.

    Each nonce is written to the replay store when it is made and stays valid there for two
    periods, so a client that just got one keeps it across one rotation; the store is what
    makes a nonce issued by one worker valid at the others (with Redis). The 401 that hands a
    nonce out (``use_dpop_nonce``) is built once per nonce and route.
    """

    __slots__ = ("_clock", "_current", "_next", "_store", "_wires", "period")

    def __init__(self, store: NonceStore, period: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._clock = clock
        self.period = period
        self._current = ""
        self._next = float("-inf")
        self._wires: dict[int, tuple[str, Wire]] = {}

    def current(self) -> str:
        now = self._clock()
        if now >= self._next:
            # §8.1: unpredictable to the client; base64url is within the NQCHAR syntax.
            nonce = base64.urlsafe_b64encode(os.urandom(18)).decode("ascii")
            self._store.add_nonce(nonce.encode("ascii"), 2 * self.period)
            self._current = nonce
            self._next = now + self.period
        return self._current

    def wire(self, rt: Any) -> Wire:
        """The route's ``dpop_nonce_required`` 401 with the current ``DPoP-Nonce``."""
        nonce = self.current()
        cached = self._wires.get(rt.index)
        if cached is not None and cached[0] == nonce:
            return cached[1]
        base: Canned = rt.rejects[Reason.DPOP_NONCE_REQUIRED]
        canned = Canned(base.status, base.body,
                        [*base.headers.items(), ("DPoP-Nonce", nonce)], base.label)
        wire = Wire(canned)
        self._wires[rt.index] = (nonce, wire)
        return wire


class Possession:
    """One route's proof-of-possession and replay settings (all off by default)."""

    __slots__ = ("binding_reject", "dpop", "external_url", "nonces", "one_time",
                 "one_time_lifetime", "one_time_skew", "replay", "required")

    def __init__(self, *, dpop: DpopRule | None = None, required: bool = False,
                 external_url: str | None = None, nonces: NonceIssuer | None = None,
                 one_time: bool = False, one_time_skew: float = 0.0,
                 one_time_lifetime: float = 0.0, replay: Any = None,
                 binding_reject: Canned | None = None) -> None:
        self.dpop = dpop
        self.required = required
        self.external_url = external_url
        self.nonces = nonces
        self.one_time = one_time
        self.one_time_skew = one_time_skew
        self.one_time_lifetime = one_time_lifetime
        self.replay = replay
        self.binding_reject = binding_reject or build_bearer_binding_reject()


def compile_possession(auth: AuthConfig, providers: Mapping[str, ProviderConfig],
                       store: Any, nonces: Callable[[float], NonceIssuer]) -> Possession:
    """The route's :class:`Possession` from its auth config. ``nonces(period)`` returns the
    gateway's issuer for that rotation period (one per period, shared by routes)."""
    dpop = auth.dpop
    rule = None
    issuer = None
    if dpop is not None:
        rule = DpopRule(dpop.algorithms, dpop.max_age, dpop.clock_skew)
        if dpop.nonce:
            issuer = nonces(dpop.max_age)
    provs = [providers[n] for n in auth.providers if n in providers]
    return Possession(
        dpop=rule,
        required=dpop is not None and dpop.mode == "required",
        external_url=dpop.external_url if dpop is not None else None,
        nonces=issuer,
        one_time=auth.one_time,
        one_time_skew=max((p.clock_skew for p in provs), default=0.0),
        one_time_lifetime=max((p.max_lifetime or 0.0 for p in provs), default=0.0),
        replay=store,
        binding_reject=build_bearer_binding_reject(failure_status=auth.failure_status,
                                                   hide_reasons=auth.hide_reasons),
    )


def dpop_algs(auth: AuthConfig) -> str | None:
    """The ``algs`` attribute of the route's DPoP challenges (RFC 9449 §7.1)."""
    return " ".join(auth.dpop.algorithms) if auth.dpop is not None else None


def one_time_key(claims: Mapping[str, Any], skew: float, lifetime: float,
                 now: float | None = None) -> tuple[bytes, float] | None:
    """``(key, seconds)``: a one-time token's replay-store key (its issuer and jti, hashed:
    fixed length whatever the token says) and how long to remember it -- until it expires
    plus the clock skew, never past ``lifetime`` + skew (RFC 7523 §3 item 7). None when the
    token has no string ``jti`` or numeric ``exp``."""
    jti = claims.get("jti")
    exp = claims.get("exp")
    if not isinstance(jti, str) or not jti or isinstance(exp, bool) or \
            not isinstance(exp, int | float):
        return None
    iss = claims.get("iss")
    digest = hashlib.sha256(f"{iss}\0{jti}".encode("utf-8", "surrogateescape")).digest()
    t = time.time() if now is None else now
    ttl = min(float(exp) - t, lifetime) + skew
    return b"t:" + digest, max(ttl, 1.0)


__all__ = ["DPOP_HEADER", "DPOP_SOURCE", "NonceIssuer", "Possession",
           "compile_possession", "dpop_algs", "one_time_key"]
