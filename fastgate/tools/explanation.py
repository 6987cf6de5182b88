"""The explanation `fastgate verify` prints: :class:`Explanation` and :class:`KeyInfo`.

What the gateway decided about a token on a route and why, as data (``to_dict``: ``--json``)
and as text (``render``), and the time/value formatting both use (also used for the messages
of ``fastgate.tools.explain``, which builds an :class:`Explanation` and re-exports both
classes). Claims are labelled *unverified* unless the signature verified.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import orjson

from fastgate.token.reasons import Reason

__all__ = ["Explanation", "KeyInfo"]

_POLICY_REASONS = frozenset({Reason.INSUFFICIENT_SCOPE, Reason.CLAIM_MISMATCH})


@dataclass(frozen=True)
class KeyInfo:
    """The provider's key that decided (or was tried)."""

    provider: str
    kid: str | None
    alg: str | None
    kty: str | None = None
    thumbprint: str | None = None  # RFC 7638, SHA-256, base64url
    source: str | None = None  # discovery | jwks_uri | jwks_file | jwks | secret
    location: str | None = None  # URL or file of the key set


@dataclass
class Explanation:
    """What the gateway decides about a token on a route, and why."""

    route: str
    ok: bool
    reason: Reason
    status: int
    check: str  # the check that decided: the verifier's detail or the policy rule
    message: str  # one sentence for a human
    www_authenticate: str | None = None
    provider: str | None = None
    issuer: str | None = None  # the token's iss as read
    key: KeyInfo | None = None
    header: dict[str, Any] | None = None
    typ: Any = None  # the header's typ as found (None: absent); RFC 7515 §4.1.9
    allowed_typ: tuple[str, ...] | None = None  # the provider's typ list (None: not checked)
    claims: dict[str, Any] | None = None
    claims_verified: bool = False  # the signature verified: the claims are the issuer's
    now: float = 0.0
    clock_skew: float | None = None
    max_lifetime: float | None = None  # the provider's limit (None: not checked)
    lifetime: float | None = None  # exp - iat (or exp - now), when max_lifetime decided
    lifetime_from: str | None = None  # "iat" or "now": what `lifetime` was measured from
    times: dict[str, float] = field(default_factory=dict)  # exp / nbf / iat as found
    claim_headers: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def decision(self) -> str:
        return "accepted" if self.ok else "rejected"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view (``fastgate verify --json``)."""
        times: dict[str, Any] = {}
        for name, value in self.times.items():
            times[name] = {"value": value, "utc": _iso(value),
                           "seconds_from_now": round(value - self.now, 3)}
        return {
            "decision": self.decision,
            "ok": self.ok,
            "reason": self.reason.label,
            "status": self.status,
            "check": self.check,
            "message": self.message,
            "www_authenticate": self.www_authenticate,
            "route": self.route,
            "provider": self.provider,
            "issuer": self.issuer,
            "key": dataclasses.asdict(self.key) if self.key is not None else None,
            "header": self.header,
            "typ": {"value": self.typ,
                    "allowed": list(self.allowed_typ) if self.allowed_typ is not None else None},
            "claims": self.claims,
            "claims_verified": self.claims_verified,
            "time": {"now": self.now, "now_utc": _iso(self.now),
                     "clock_skew": self.clock_skew, "max_lifetime": self.max_lifetime,
                     **({"lifetime": {"seconds": self.lifetime, "from": self.lifetime_from}}
                        if self.lifetime is not None else {}),
                     **times},
            "claim_headers": dict(self.claim_headers),
            "notes": list(self.notes),
        }

    def render(self) -> str:
        """The human-readable explanation."""
        lines: list[str] = []
        verdict = "ACCEPTED" if self.ok else "REJECTED"
        lines.append(f"{verdict} on route {self.route!r}: {self.status} {self.reason.label}")
        lines.append(f"  check:     {self.check}")
        lines.append(f"  why:       {self.message}")
        if self.www_authenticate:
            lines.append(f"  response:  WWW-Authenticate: {self.www_authenticate}")
        if self.provider is not None:
            lines.append(f"  provider:  {self.provider}")
        if self.issuer is not None:
            lines.append(f"  issuer:    {self.issuer}")
        if self.key is not None:
            k = self.key
            parts = [f"kid={k.kid}" if k.kid is not None else "no kid",
                     f"alg={k.alg}"]
            if k.kty:
                parts.append(f"kty={k.kty}")
            if k.thumbprint:
                parts.append(f"thumbprint={k.thumbprint}")
            lines.append(f"  key:       {', '.join(parts)}")
            if k.source:
                kind = {"jwks": "inline jwks", "secret": "shared secret"}.get(k.source, k.source)
                where = f" {k.location}" if k.location else ""
                lines.append(f"  key set:   {kind}{where}")
        if self.times:
            skew = f" (clock skew {self.clock_skew:g}s)" if self.clock_skew is not None else ""
            lines.append(f"  now:       {_iso(self.now)}{skew}")
            for name in ("exp", "nbf", "iat"):
                if name in self.times:
                    value = self.times[name]
                    lines.append(f"  {name}:       {_iso(value)} ({_relative(value - self.now)})")
            if self.lifetime is not None and self.max_lifetime is not None:
                lines.append(f"  lifetime:  exp - {self.lifetime_from} = {_span(self.lifetime)}"
                             f" (max_lifetime {_span(self.max_lifetime)})")
        if self.header is not None:
            shown = _short(self.typ) if "typ" in self.header else "(none)"
            if self.allowed_typ is not None:
                shown += f" (allowed: {', '.join(self.allowed_typ)})"
            else:
                shown += " (not checked: the provider lists no typ)"
            lines.append(f"  typ:       {shown}")
            lines.append("  header:    " + orjson.dumps(self.header).decode())
        if self.claims is not None:
            if self.ok or (self.claims_verified and self.reason in _POLICY_REASONS):
                label = "claims:"
            elif self.claims_verified:
                label = f"claims (signature verified; rejected by the {self.check} check):"
            else:
                label = "claims (UNVERIFIED):"
            lines.append(f"  {label}")
            body = orjson.dumps(self.claims, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
            lines.extend("    " + line for line in body.decode().splitlines())
        if self.claim_headers:
            lines.append("  the upstream would receive:")
            lines.extend(f"    {name}: {value}" for name, value in self.claim_headers)
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    try:
        moment = dt.datetime.fromtimestamp(ts, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{ts:g} (out of range)"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _relative(seconds: float) -> str:
    text = _span(abs(seconds))
    if abs(seconds) < 0.5:
        return "now"
    return f"in {text}" if seconds > 0 else f"{text} ago"


def _span(seconds: float) -> str:
    s = round(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    if (minutes or hours or days) and not days:
        parts.append(f"{minutes}m")
    if not days and not hours:
        parts.append(f"{s}s")
    return " ".join(parts)


def _short(value: object, limit: int = 120) -> str:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
