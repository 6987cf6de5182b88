"""`fastgate verify`: explain what the gateway would decide about one token on one route.

The decision is made by the same compiled objects the data plane uses
(:func:`fastgate.app.compile_tables`: the route's ``IssuerSet`` with its audiences override,
its ``Policy`` and its reject table), fed by the providers' real key sources
(:func:`fastgate.keys.jwks.build_key_source`): inline and file keys are loaded, remote JWKS /
discovery sources are fetched once with their configured timeout. Nothing here is on the
request path; this module only adds the words around the decision:

* the reason label and the HTTP status the route would answer with (``failure_status``
  applied), and the check that decided (``Result.detail`` of the verifier, or the scope /
  claim rule of the route policy);
* the JOSE header and the claims - marked *unverified* unless the signature verified, because
  the payload of a token whose signature did not verify is attacker-controlled text (a token
  rejected by a claim check after its signature verified carries the issuer's own claims);
* which provider and key (kid, alg, kty, RFC 7638 thumbprint) decided;
* the token's JOSE ``typ`` and the provider's allowed types (RFC 9068 §4), and for a
  ``token_type_invalid`` what the token probably is (an ID token is typically ``JWT``);
* for time checks, ``exp`` / ``nbf`` / ``iat`` against ``now`` and the provider's clock skew,
  and for ``max_lifetime`` the lifetime the issuer gave (``exp - iat``, or ``exp - now``
  without ``iat``) against the limit;
* for a token that is not a compact JWS at all, what it probably is (an opaque access token,
  a JWE) and what to change.

API keys are a second credential of the request, not of the token: for a route that
requires one, the explanation says so and names the claim it would be bound to.

Layout: the decision is made here; the explanation it returns (and its text and JSON forms)
is ``fastgate.tools.explanation``'s, loading and describing the keys
``fastgate.tools.explain_keys``'s; the public names of both are re-exported.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import orjson

from fastgate.auth.policy import Policy, is_missing, lookup, token_scopes
from fastgate.config import AuthConfig, ClaimRule, GatewayConfig, ProviderConfig, RouteConfig
from fastgate.token._verify import Result
from fastgate.token.reasons import Reason
from fastgate.tools.explain_keys import MAX_FETCH_WAIT as MAX_FETCH_WAIT
from fastgate.tools.explain_keys import _key_info, _kids, _load_keys, thumbprint
from fastgate.tools.explanation import Explanation, KeyInfo, _iso, _relative, _short, _span

__all__ = ["ExplainError", "Explanation", "KeyInfo", "explain", "explain_async", "select_route",
           "thumbprint"]

# Verifier details (Result.detail) of the claim checks, which run only after the signature
# verified (fastgate/token/_verify.pyx step 11): with one of these the claims are the issuer's.
_CLAIM_CHECK_DETAILS = frozenset({
    "exp type", "nbf type", "iat type", "sub type", "jti type", "aud type",
    "exp", "nbf", "iat", "aud", "required claim", "max lifetime", "max lifetime needs exp",
})

_OPAQUE_HINT = ("not a JWT: an opaque access token? configure the IdP for JWT access tokens "
                "(docs/identity-providers.md, \"Generic or self-hosted OpenID Connect\")")


class ExplainError(ValueError):
    """The question cannot be asked: unknown route, a route without token auth, ..."""


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def explain(config: GatewayConfig, token: str, route: str | None = None,
            now: float | None = None) -> Explanation:
    """Explain the decision about ``token`` on ``route`` (default: the first route with JWT
    auth that lists a provider of the token's issuer). Runs its own event loop (key sources
    are asyncio objects); use :func:`explain_async` inside a running loop.

    Raises :class:`ExplainError` when the question cannot be asked and
    :class:`fastgate.errors.ConfigError` when the config does not compile."""
    return asyncio.run(explain_async(config, token, route, now))


async def explain_async(config: GatewayConfig, token: str, route: str | None = None,
                        now: float | None = None) -> Explanation:
    from fastgate.app import compile_tables  # the data plane's own compilation

    token = _clean_token(token)
    now = time.time() if now is None else float(now)
    rcfg = select_route(config, token, route)
    tables = compile_tables(config)
    try:
        index = _route_index(config, rcfg)
        rt = next(r for r in tables.runtimes if r.index == index)
        assert rt.issuer_set is not None and rcfg.auth is not None
        notes: list[str] = []
        sources = {name: tables.key_sources[name] for name in rcfg.auth.providers
                   if name in tables.key_sources}
        started = await _load_keys(config, sources, notes)
        try:
            return _decide(config, rcfg, rcfg.auth, rt, token, now, sources, notes)
        finally:
            for source in started:
                with contextlib.suppress(Exception):
                    await source.stop()
    finally:
        for pool in tables.pools.values():
            with contextlib.suppress(Exception):
                await pool.close()


def _route_index(config: GatewayConfig, rcfg: RouteConfig) -> int:
    return next(i for i, r in enumerate(config.routes) if r is rcfg)


def select_route(config: GatewayConfig, token: str, name: str | None) -> RouteConfig:
    """The route named ``name``, or the first route with JWT auth listing a provider whose
    issuer is the token's (unverified) ``iss``, or else the first route with JWT auth."""
    if name is not None:
        for rcfg in config.routes:
            if rcfg.name == name:
                if rcfg.auth is None:
                    raise ExplainError(f"route {name!r} has `auth: none`: requests are "
                                       "forwarded without any token check")
                if not rcfg.auth.providers:
                    raise ExplainError(f"route {name!r} checks only an API key; there is no "
                                       "token to verify")
                return rcfg
        names = ", ".join(r.name for r in config.routes) or "none"
        raise ExplainError(f"unknown route {name!r} (routes: {names})")
    with_jwt = [r for r in config.routes if r.auth is not None and r.auth.providers]
    if not with_jwt:
        raise ExplainError("no route of this config verifies tokens (every route is "
                           "`auth: none` or API-key only)")
    iss = _peek_issuer(token)
    if iss is not None:
        for rcfg in with_jwt:
            assert rcfg.auth is not None
            for pname in rcfg.auth.providers:
                provider = config.providers.get(pname)
                if provider is not None and provider.issuer == iss:
                    return rcfg
    return with_jwt[0]


# ---------------------------------------------------------------------------------------------
# The decision
# ---------------------------------------------------------------------------------------------


def _decide(config: GatewayConfig, rcfg: RouteConfig, auth: AuthConfig, rt: Any, token: str,
            now: float, sources: Mapping[str, Any], notes: list[str]) -> Explanation:
    rejects = rt.rejects

    def finish(reason: Reason, check: str, message: str, **kw: Any) -> Explanation:
        canned = rejects[reason]
        www = canned.headers.get("WWW-Authenticate") if reason is not Reason.OK else None
        status = 200 if reason is Reason.OK else int(canned.status)
        return Explanation(route=rcfg.name, ok=reason is Reason.OK, reason=reason,
                           status=status, check=check, message=message, www_authenticate=www,
                           now=now, notes=notes, **kw)

    # The extractor's shape checks run before any decoding on the request path.
    if rt.extractor is not None:
        shape = rt.extractor.check(token)
        if shape is not Reason.OK:
            why = {
                Reason.TOKEN_TOO_LARGE: f"the token is {len(token)} bytes; "
                                        f"limits.max_token_bytes is "
                                        f"{config.limits.max_token_bytes}",
                Reason.TOKEN_AMBIGUOUS: "a ',' in the credential: a folded list of tokens",
                Reason.TOKEN_MALFORMED: "empty, or contains whitespace",
            }.get(shape, shape.label)
            _route_notes(auth, None, notes)
            return finish(shape, "extraction", why)

    result: Result = rt.issuer_set.verify(token, now)
    reason = result.reason
    verifier = result.verifier
    provider = config.providers.get(verifier.name) if verifier is not None else None
    source = sources.get(provider.name) if provider is not None else None
    if reason is Reason.KEY_NOT_FOUND and source is not None and not source.ready:
        # The data plane answers a provider without usable keys with jwks_unavailable.
        reason = Reason.JWKS_UNAVAILABLE
    header = dict(result.header) if result.header is not None else None
    payload = result.claims if result.ok else result.payload
    claims = dict(payload) if payload is not None else None
    signed = result.ok or result.detail in _CLAIM_CHECK_DETAILS
    times = {name: float(claims[name]) for name in ("exp", "nbf", "iat")
             if claims is not None and _is_number(claims.get(name))}
    common: dict[str, Any] = {
        "provider": provider.name if provider is not None else None,
        "issuer": result.issuer,
        "header": header,
        "typ": header.get("typ") if header is not None else None,
        "allowed_typ": provider.typ if provider is not None else None,
        "claims": claims,
        "claims_verified": signed,
        "times": times,
        "clock_skew": provider.clock_skew if provider is not None else None,
        "max_lifetime": provider.max_lifetime if provider is not None else None,
    }
    if result.detail == "max lifetime" and claims is not None and "exp" in times:
        measured_from = "iat" if "iat" in times else "now"
        common["lifetime"] = times["exp"] - times.get("iat", now)
        common["lifetime_from"] = measured_from
    if provider is not None and result.alg is not None:
        common["key"] = _key_info(provider, source, result, token)
    if claims is None:
        notes.append("the header and claims could not be parsed"
                     if header is None else "the claims could not be parsed")

    if not result.ok:
        _route_notes(auth, None, notes)
        message = _verifier_message(config, auth, rt, reason, result, provider, source, now,
                                    token)
        return finish(reason, result.detail, message, **common)

    assert claims is not None
    policy: Policy = rt.policy
    decided = policy.check(claims)
    _route_notes(auth, claims, notes)
    if decided is not Reason.OK:
        check, message = _policy_failure(auth, claims)
        return finish(decided, check, message, **common)
    common["claim_headers"] = policy.headers(claims)
    key = common.get("key")
    used = f"key kid={key.kid}" if key is not None and key.kid else "the provider's key"
    if provider is not None and provider.key_source == "secret":
        used = "the provider's shared secret"
    checks = ["signature", "time window", "audience", "required claims"]
    if provider is not None and provider.typ is not None:
        checks.insert(1, "typ")
    if policy.scopes:
        checks.append("scopes")
    if policy.rules:
        checks.append("claim rules")
    message = (f"signature verified with {used} ({result.alg}); "
               f"{', '.join(checks[1:])} hold")
    return finish(Reason.OK, result.detail or "ok", message, **common)


def _verifier_message(config: GatewayConfig, auth: AuthConfig, rt: Any, reason: Reason,
                      result: Result, provider: ProviderConfig | None, source: Any,
                      now: float, token_text: str) -> str:
    payload = result.payload or {}
    skew = provider.clock_skew if provider is not None else 0.0
    limit = provider.max_lifetime if provider is not None else None
    if result.detail == "max lifetime" and limit is not None and _is_number(payload.get("exp")):
        exp = float(payload["exp"])
        if _is_number(payload.get("iat")):
            lifetime = exp - float(payload["iat"])
            basis = f"exp - iat = {_span(lifetime)} (iat {_iso(float(payload['iat']))})"
        else:
            lifetime = exp - now
            basis = f"exp - now = {_span(lifetime)} (the token has no iat)"
        return (f"the issuer gave this token a longer life than the provider allows: {basis} "
                f"exceeds max_lifetime {_span(limit)}; it is rejected as expired whatever exp "
                "says")
    if result.detail == "max lifetime needs exp":
        return ("max_lifetime is set for this provider, so exp is required; the token has "
                "no exp")
    if reason is Reason.TOKEN_EXPIRED and _is_number(payload.get("exp")):
        exp = float(payload["exp"])
        return (f"exp {_iso(exp)} is {_relative(exp - now)}; tokens are accepted until "
                f"exp + clock skew {skew:g}s ({_iso(exp + skew)})")
    if reason is Reason.TOKEN_NOT_YET_VALID and _is_number(payload.get("nbf")):
        nbf = float(payload["nbf"])
        return (f"nbf {_iso(nbf)} is {_relative(nbf - now)}; tokens are accepted from "
                f"nbf - clock skew {skew:g}s ({_iso(nbf - skew)})")
    if reason is Reason.TOKEN_NOT_YET_VALID and _is_number(payload.get("iat")):
        iat = float(payload["iat"])
        return f"iat {_iso(iat)} is {_relative(iat - now)} (beyond the {skew:g}s clock skew)"
    if reason is Reason.AUDIENCE_MISMATCH:
        wanted = list(auth.audiences) if auth.audiences is not None else (
            list(provider.audiences) if provider is not None else [])
        origin = "the route's audiences" if auth.audiences is not None else \
            "the provider's audiences"
        return (f"aud {_short(payload.get('aud'))} contains none of {origin} "
                f"{_short(wanted)}")
    if reason is Reason.ISSUER_UNKNOWN:
        known = {n: config.providers[n].issuer for n in auth.providers
                 if n in config.providers}
        iss = result.issuer if result.issuer is not None else payload.get("iss")
        if iss is None:
            return "the token has no usable iss claim, so no provider can be selected"
        return (f"iss {_short(iss)} is not the issuer of any provider of this route "
                f"({', '.join(f'{n}: {i}' for n, i in known.items())})")
    if reason is Reason.TOKEN_TYPE_INVALID and provider is not None:
        return _typ_message(provider, result.header)
    if reason is Reason.SIGNATURE_INVALID:
        kid = f"kid={result.kid}" if result.kid else "the key(s) fitting the alg"
        return f"the signature does not verify with {kid} ({result.alg})"
    if reason is Reason.KEY_NOT_FOUND and provider is not None:
        kids = _kids(provider, source)
        listed = ", ".join(kids) if kids else "none with a kid"
        if result.kid:
            return (f"kid {_short(result.kid)} is not in provider {provider.name}'s key set "
                    f"(kids: {listed})")
        return f"no key of provider {provider.name} fits alg {result.alg} (kids: {listed})"
    if reason is Reason.ALG_NOT_ALLOWED:
        allowed = sorted(provider.algorithms or ()) if provider is not None else []
        extra = f"; allowed: {', '.join(allowed)}" if allowed else ""
        return f"alg {_short(result.alg)} is not allowed ({result.detail}){extra}"
    if reason is Reason.JWKS_UNAVAILABLE:
        name = provider.name if provider is not None else "the provider"
        return f"{name} has no usable keys (yet): every request would get 503"
    if reason is Reason.CLAIM_MISSING:
        required = list(provider.require) if provider is not None else []
        return f"a required claim is missing ({result.detail}; required: {', '.join(required)})"
    if reason is Reason.TOKEN_MALFORMED and result.detail == "segment count":
        return _segments_message(token_text)
    if reason is Reason.TOKEN_MALFORMED:
        return f"not a well-formed compact JWS: {result.detail}"
    if reason is Reason.TOKEN_TOO_LARGE:
        return f"the token exceeds limits.max_token_bytes ({config.limits.max_token_bytes})"
    return f"{reason.label} ({result.detail})"


def _typ_message(provider: ProviderConfig, header: Mapping[str, Any] | None) -> str:
    """RFC 9068 §4: why the header typ does not fit the provider's ``typ`` list."""
    allowed = ", ".join(provider.typ or ())
    rule = (f"provider {provider.name} accepts typ {allowed} (case-insensitive, "
            "'application/' optional)")
    if header is None or "typ" not in header:
        return (f"the token has no typ header; {rule}: an access token of an RFC 9068 issuer "
                "carries one, so this is probably another kind of JWT (an ID token?) or the "
                "IdP does not type its access tokens (docs/identity-providers.md)")
    typ = header["typ"]
    if not isinstance(typ, str):
        return f"the header typ {_short(typ)} is not a string; {rule}"
    hint = ""
    if typ.lower() in ("jwt", "application/jwt"):
        hint = ": a plain JWT such as an ID token, not an access token (RFC 9068 §2.1)"
    return f"typ {_short(typ)} is not allowed; {rule}{hint}"


def _segments_message(token: str) -> str:
    """A compact JWS is three base64url segments (RFC 7515 §7.1); say what else it may be."""
    dots = token.count(".")
    if dots == 0:
        return _OPAQUE_HINT
    if dots == 4:
        # RFC 7516 §7.1: five segments is the JWE compact form.
        return ("an encrypted token (JWE, 5 segments), not a signed JWT: fastgate verifies "
                "JWS only; configure the IdP to sign access tokens without encrypting them")
    return (f"not a compact JWS: {dots + 1} segments where header.payload.signature has 3 "
            "(a truncated or concatenated token?)")


def _policy_failure(auth: AuthConfig, claims: Mapping[str, Any]) -> tuple[str, str]:
    """Which rule of the route policy failed, found by checking the rules one at a time with
    the route's own Policy code (so this can never disagree with the data plane)."""
    rule = auth.scopes
    if rule is not None:
        only = Policy(dataclasses.replace(auth, claims=()))
        if only.check(claims) is not Reason.OK:
            granted = sorted(token_scopes(claims))
            return ("scopes", f"the route needs {rule.mode} of [{', '.join(rule.scopes)}]; "
                              f"the token grants [{', '.join(granted)}] (scope/scp)")
    for claim_rule in auth.claims:
        one = Policy(dataclasses.replace(auth, scopes=None, claims=(claim_rule,)))
        outcome = one.check(claims)
        if outcome is not Reason.OK:
            path = _path_text(claim_rule)
            value = lookup(claims, claim_rule.path)
            shown = "absent" if is_missing(value) else _short(value)
            expected = "" if claim_rule.op == "present" else f" {_short(claim_rule.value)}"
            return (f"claims: {path} {claim_rule.op}",
                    f"claim {path} must be {claim_rule.op}{expected}; the token has {shown}")
    return ("policy", "the route policy refused the claims")


def _route_notes(auth: AuthConfig, claims: Mapping[str, Any] | None, notes: list[str]) -> None:
    if auth.mode == "all" and len(auth.providers) > 1:
        notes.append(f"mode: all - a request also needs valid tokens of every other provider "
                     f"of the route ({', '.join(auth.providers)}); only this token was checked")
    rule = auth.api_key
    if rule is not None:
        need = "requires" if rule.required else "accepts"
        text = (f"API key: this route {need} an API key as well; that is a credential of the "
                "request, not of the token, so it is not checked here (N/A)")
        if rule.bind_claim is not None:
            path = ".".join(rule.bind_claim)
            value = lookup(claims, rule.bind_claim) if claims is not None else None
            have = "" if claims is None or is_missing(value) else \
                f" (this token: {_short(value)})"
            if claims is not None and is_missing(value):
                have = " (this token has none: any key would get api_key_mismatch)"
            text += f"; the key's client_id must equal the token's {path} claim{have}"
        notes.append(text)
    if auth.allow_missing:
        notes.append("allow_missing: a request without a token is forwarded (without claim "
                     "headers); a bad token is still rejected")


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _clean_token(token: str) -> str:
    text = token.strip()
    if text[:7].lower() == "bearer ":
        text = text[7:].strip()
    return text


def _peek_issuer(token: str) -> str | None:
    """The unverified ``iss`` (route selection only; the verifier decides everything)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        raw = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        payload = orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None
    iss = payload.get("iss") if isinstance(payload, dict) else None
    return iss if isinstance(iss, str) else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _path_text(rule: ClaimRule) -> str:
    return ".".join(f'["{p}"]' if "." in p else p for p in rule.path)
