"""The data plane's compiled tables and its decisions (route -> auth -> policy).

One :class:`DataPlane` per worker process. It reads a :class:`Tables` snapshot (compiled once
by :mod:`fastgate.app`) through a single attribute, so a hot reload swaps one reference and a
request in flight finishes on the tables it started with. The HTTP/1.1 side -- parsing,
framing, relaying, timeouts -- is :mod:`fastgate.dataplane.protocol`; this module holds what it
reads:

* :class:`Tables`: the route table, one :class:`RouteRuntime` per route, the upstream pools,
  the verifiers and key sources, and ``header_actions``: one dict lookup per inbound header
  name says what the header pass does with it (forward, drop, or note it);
* :class:`DataPlane`: the auth decision, synchronous for the common case
  (:meth:`DataPlane.authenticate_now`: a cached or fresh verify is a plain call), awaiting
  only for an unknown kid, a cold start or ``mode: all`` (:meth:`DataPlane.authenticate`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from time import perf_counter
from typing import Any, Protocol

from fastgate import httpfields
from fastgate.auth.apikeys import ApiKeyCheck, ApiKeyTable
from fastgate.auth.dpop import DPOP_SOURCE, Possession, one_time_key
from fastgate.auth.extract import TokenExtractor, iter_query, strip_cookie, strip_query_param
from fastgate.auth.policy import Policy
from fastgate.auth.replay import build_store
from fastgate.auth.responses import Canned
from fastgate.auth.wire import Wire
from fastgate.config import ReplayStoreConfig
from fastgate.dataplane.routes import RouteTable
from fastgate.dataplane.upstream import UpstreamPool
from fastgate.token._verify import DpopRule, IssuerSet, Result, TokenCache, Verifier
from fastgate.token.reasons import Reason

log = logging.getLogger("fastgate.proxy")

#: Cold start: how long a request waits for a provider's first key set (SPEC §5).
COLD_START_WAIT = 1.0

# The hop-by-hop fields, plus Proxy-Authorization (a credential for this hop only) and Expect
# (answered here, RFC 9110 §10.1.1, and never forwarded).
HOP_BY_HOP = httpfields.HOP_BY_HOP | {"proxy-authorization", "expect"}

# Header actions (one dict lookup per inbound header name, lower-case bytes). A name not in
# the table is forwarded as it came.
A_DROP = 1  # hop-by-hop, reserved (claim/payload/API-key headers), X-Forwarded-* not kept
A_CONNECTION = 2  # RFC 9110 §7.6.1: its options are hop-by-hop too
A_XFF = 3
A_XFP = 4
A_XFH = 5
A_HOST = 6  # RFC 9112 §3.2: exactly one
A_LENGTH = 7  # Content-Length: the relay writes its own framing
A_EXPECT = 8
A_UPGRADE = 9
A_AUTH = 10  # forwarded, and read by the auth layer (token, cookie, API key, CORS)
A_TE = 11
A_AUTH_DROP = 12  # read by the auth layer, never forwarded (the API-key header)
# X-Request-Id: kept from trusted proxies, else replaced (fastgate.dataplane.protocol)
A_REQUEST_ID = 13
A_TRACEPARENT = 14  # W3C Trace Context: validated, then forwarded (or created)
A_TRACESTATE = 15  # forwarded only with the client's valid traceparent (W3C §3.3)


class KeySourceLike(Protocol):
    """The part of ``fastgate.keys.jwks.KeySource`` the data plane calls on the request path."""

    @property
    def ready(self) -> bool: ...
    @property
    def ever_loaded(self) -> bool: ...
    async def refresh_for_kid(self, kid: str) -> bool: ...
    async def wait_ready(self, timeout: float) -> bool: ...


class AccessLog(Protocol):
    """Optional access-log sink (the ops engineer's ``fastgate.ops.accesslog`` adapts to it)."""

    def log(self, request: Any, *, route: str | None, status: int,
            reason: str | None, duration: float,
            upstream_latency: float | None = None) -> None: ...


class MetricsHooks:
    """The data plane's metrics calls, bound once from any object with (some of) the
    ``fastgate.ops.metrics.Metrics`` methods; a missing method is a no-op, so the hot path never
    branches on whether metrics are enabled."""

    __slots__ = ("cache_lookup", "inflight_dec", "inflight_inc", "reject", "request_done",
                 "upstream_error", "upstream_observe", "verify_observe")

    def __init__(self, metrics: object | None = None) -> None:
        def hook(name: str) -> Callable[..., None]:
            fn = getattr(metrics, name, None) if metrics is not None else None
            return fn if callable(fn) else _noop

        # route_idx: index in config.routes, len(config.routes) = no route matched;
        # upstream_idx: index in list(config.upstreams) (what Metrics(upstreams=...) got).
        self.request_done = hook("request_done")  # (route_idx, status, seconds)
        self.reject = hook("reject")  # (route_idx, Reason)
        self.verify_observe = hook("verify_observe")  # (seconds) - cache misses only
        self.cache_lookup = hook("cache_lookup")  # (hit: bool)
        self.upstream_observe = hook("upstream_observe")  # (upstream_idx, seconds)
        self.upstream_error = hook("upstream_error")  # (upstream_idx, kind)
        self.inflight_inc = hook("inflight_inc")
        self.inflight_dec = hook("inflight_dec")


def _noop(*args: Any) -> None:
    return None


class RouteRuntime:
    """Everything the handler needs for one route, compiled once (no dicts of options)."""

    __slots__ = (
        "allow_missing",
        "api_key",
        "auth",
        "binding_wire",
        "body_timeout",
        "certificate_bound",
        "claim_cache",
        "cors_bypass",
        "dpop",
        "dpop_base",
        "dpop_index",
        "dpop_required",
        "extractor",
        "fast_header",
        "fast_prefix",
        "forward_token",
        "index",
        "issuer_set",
        "key_sources",
        "max_token_chars",
        "mode_all",
        "name",
        "nonces",
        "one_time",
        "one_time_lifetime",
        "one_time_skew",
        "policy",
        "policy_checks",
        "policy_headers",
        "pool",
        "possession",
        "rejects",
        "replay",
        "route",
        "upstream",
        "upstream_index",
        "verifiers",
        "wires",
    )

    def __init__(
        self,
        *,
        route: Any,
        pool: UpstreamPool,
        upstream_index: int = 0,
        body_timeout: float = 30.0,
        rejects: tuple[Canned, ...],
        issuer_set: IssuerSet | None = None,
        verifiers: tuple[Verifier, ...] = (),
        key_sources: Mapping[Verifier, KeySourceLike] | None = None,
        extractor: TokenExtractor | None = None,
        policy: Policy | None = None,
        api_key: ApiKeyCheck | None = None,
        mode_all: bool = False,
        allow_missing: bool = False,
        forward_token: bool = True,
        cors_bypass: bool = False,
        certificate_bound: bool = False,
        possession: Possession | None = None,
    ) -> None:
        self.route = route
        self.index: int = route.index
        self.name: str = route.name
        self.upstream: str = route.upstream
        self.upstream_index = upstream_index
        self.body_timeout = body_timeout  # the upstream's read_timeout, client side
        self.pool = pool
        self.rejects = rejects
        self.wires = tuple(Wire(c) for c in rejects)  # same index (Reason) as rejects
        self.issuer_set = issuer_set
        self.verifiers = verifiers
        self.key_sources: Mapping[Verifier, KeySourceLike] = key_sources or {}
        self.extractor = extractor
        self.policy = policy
        self.policy_checks = policy is not None and policy.has_checks
        self.policy_headers = policy is not None and bool(
            policy.claim_headers or policy.payload_header)
        self.api_key = api_key
        self.auth = issuer_set is not None or api_key is not None
        self.mode_all = mode_all
        self.allow_missing = allow_missing
        self.forward_token = forward_token
        self.cors_bypass = cors_bypass
        self.certificate_bound = certificate_bound
        # The compiled protocol's fast path for the common route: one header source with a
        # scheme prefix (Authorization: Bearer), mode any, no API key. It does what
        # authenticate_now does for that shape (the extractor's own fast path, then the
        # verify), without the Python calls; anything else goes through authenticate_now.
        single = extractor.single if extractor is not None else None
        fast = single is not None and not mode_all and issuer_set is not None and \
            api_key is None
        self.fast_header: bytes | None = \
            single.name.lower().encode("latin-1") if fast and single is not None else None
        self.fast_prefix: bytes = single.prefix.encode("latin-1") if fast and single else b""
        # Claim headers are a function of the verified token alone: remembered per token
        # (bounded; cleared when full) so a cached token's headers are not re-encoded.
        self.max_token_chars: int = extractor.max_token_bytes if extractor is not None else 0
        self.claim_cache: dict[str, bytes] = {}
        # Proof of possession and replay (fastgate/auth/dpop.py compiles them; RFC 9449, RFC 7523).
        pos = possession if possession is not None else Possession()
        self.dpop: DpopRule | None = pos.dpop
        self.dpop_required = pos.required
        self.dpop_base = pos.external_url
        self.dpop_index = -1
        if pos.dpop is not None and extractor is not None:
            self.dpop_index = extractor.index_of(DPOP_SOURCE)
        self.nonces = pos.nonces
        self.one_time = pos.one_time
        self.one_time_skew = pos.one_time_skew
        self.one_time_lifetime = pos.one_time_lifetime
        self.replay = pos.replay
        self.possession = pos.dpop is not None or pos.one_time
        self.binding_wire = Wire(pos.binding_reject)

    def one_time_key(self, claims: Mapping[str, Any]) -> tuple[bytes, float] | None:
        """The replay-store key of a one-time token and how long to remember it (until it
        expires, RFC 7523 §3 item 7), or None when it lacks ``jti`` or ``exp``."""
        return one_time_key(claims, self.one_time_skew, self.one_time_lifetime)


class Tables:
    """One compiled configuration: what a request reads. Replaced whole on reload."""

    __slots__ = ("api_keys", "cache", "config", "header_actions", "hooks", "inflight",
                 "key_sources", "max_body_bytes", "max_header_bytes", "no_route", "pools",
                 "replay", "routes", "runtimes", "uses_host", "verifiers")

    header_actions: dict[bytes, int]

    def __init__(
        self,
        *,
        config: Any,
        routes: RouteTable,
        runtimes: tuple[RouteRuntime, ...],
        pools: dict[str, UpstreamPool],
        verifiers: dict[str, Verifier],
        key_sources: dict[str, Any],
        cache: TokenCache,
        api_keys: ApiKeyTable,
        reserved_headers: frozenset[str],
        max_body_bytes: int,
        max_header_bytes: int,
        hooks: MetricsHooks | None = None,
        auth_headers: frozenset[str] = frozenset(),
        replay: Any = None,
    ) -> None:
        self.config = config
        # Metrics bound to THIS configuration's route/upstream indexes: a request in flight
        # across a reload counts under the route it matched, never an index of the new list.
        self.hooks = hooks if hooks is not None else MetricsHooks(None)
        self.routes = routes
        self.runtimes = runtimes
        self.pools = pools
        self.verifiers = verifiers
        self.key_sources = key_sources
        self.cache = cache
        self.api_keys = api_keys
        # The replay store (fastgate.auth.replay): DPoP proof jtis, one-time tokens, nonces.
        self.replay = replay if replay is not None else build_store(ReplayStoreConfig())
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.uses_host = any(r.host is not None for r in routes.routes)
        self.no_route = len(routes.routes)  # the metrics index of "no route matched"
        self.inflight = 0
        actions: dict[bytes, int] = {}
        for name in HOP_BY_HOP:
            actions[name.encode()] = A_DROP
        for name in reserved_headers:
            actions[name.encode("latin-1")] = A_DROP
        for name in auth_headers:
            key = name.lower().encode("latin-1")
            # The API-key header is read by the auth layer but never forwarded.
            actions[key] = A_AUTH_DROP if actions.get(key) == A_DROP else A_AUTH
        actions[b"connection"] = A_CONNECTION
        actions[b"x-forwarded-for"] = A_XFF
        actions[b"x-forwarded-proto"] = A_XFP
        actions[b"x-forwarded-host"] = A_XFH
        actions[b"host"] = A_HOST
        actions[b"content-length"] = A_LENGTH
        actions[b"transfer-encoding"] = A_TE
        actions[b"expect"] = A_EXPECT
        actions[b"upgrade"] = A_UPGRADE
        actions[b"x-request-id"] = A_REQUEST_ID
        actions[b"traceparent"] = A_TRACEPARENT
        actions[b"tracestate"] = A_TRACESTATE
        self.header_actions = actions


# ---------------------------------------------------------------------------------------------
# Auth decisions (the protocol in fastgate.dataplane.protocol calls these)
# ---------------------------------------------------------------------------------------------


class DataPlane:
    """The decisions of the data plane. ``tables`` is the only mutable state (swapped on
    reload); the HTTP/1.1 protocol (:mod:`fastgate.dataplane.protocol`) reads it per request."""

    def __init__(self, tables: Tables, *, metrics: object | None = None,
                 access_log: AccessLog | None = None) -> None:
        self.tables = tables
        self.access_log = access_log
        self.draining = False

    # -- auth -----------------------------------------------------------------------------

    def authenticate_now(
        self, rt: RouteRuntime, hooks: MetricsHooks, headers: Any, qs: str
    ) -> tuple[Reason, Mapping[str, Any] | None, list[tuple[int, str]] | None] | None:
        """The decision without waiting: ``(reason, claims, found)`` (``found`` lists
        ``(source index, token)`` pairs), or None when it must wait for keys (an unknown
        kid, a cold start) or needs several tokens (``mode: all``): then :meth:`authenticate`.
        """
        claims: Mapping[str, Any] | None = None
        found: list[tuple[int, str]] | None = None
        extractor = rt.extractor
        if extractor is not None:
            if rt.mode_all:
                return None
            reason, token, index = extractor.extract(headers, qs)
            if reason is Reason.OK:
                assert token is not None
                result = self._verify_now(rt, hooks, token)
                if not result.ok:
                    reason = result.reason
                    if (reason is Reason.KEY_NOT_FOUND or reason is Reason.JWKS_UNAVAILABLE) \
                            and result.verifier in rt.key_sources:
                        return None
                    return reason, None, None
                claims = result.claims
                found = [(index, token)]
            elif reason is not Reason.TOKEN_MISSING or not rt.allow_missing:
                return reason, None, None
            # else SPEC §2 allow_missing: no token -> forwarded without claim headers
        return self._policy(rt, headers, qs, claims, found)

    async def authenticate(
        self, rt: RouteRuntime, hooks: MetricsHooks, headers: Any, qs: str
    ) -> tuple[Reason, Mapping[str, Any] | None, list[tuple[int, str]] | None]:
        """The decision, waiting where it must (the slow path of :meth:`authenticate_now`)."""
        claims: Mapping[str, Any] | None = None
        found: list[tuple[int, str]] | None = None
        extractor = rt.extractor
        if extractor is not None:
            if rt.mode_all:
                reason, tokens = extractor.extract_all(headers, qs)
                if reason is Reason.OK:
                    reason, claims = await self._verify_all(rt, hooks, tokens)
                    found = tokens
                elif reason is Reason.TOKEN_MISSING and rt.allow_missing:
                    reason = Reason.OK
            else:
                reason, token, index = extractor.extract(headers, qs)
                if reason is Reason.OK:
                    assert token is not None
                    result = await self._verify(rt, hooks, token)
                    reason = result.reason
                    claims = result.claims
                    found = [(index, token)]
                elif reason is Reason.TOKEN_MISSING and rt.allow_missing:
                    reason = Reason.OK
            if reason is not Reason.OK:
                return reason, None, None
        return self._policy(rt, headers, qs, claims, found)

    @staticmethod
    def _policy(
        rt: RouteRuntime, headers: Any, qs: str, claims: Mapping[str, Any] | None,
        found: list[tuple[int, str]] | None,
    ) -> tuple[Reason, Mapping[str, Any] | None, list[tuple[int, str]] | None]:
        """Scopes and claim rules on verified claims, then the API key (SPEC §3 step 4)."""
        if claims is not None and rt.policy_checks:
            assert rt.policy is not None
            reason = rt.policy.check(claims)
            if reason is not Reason.OK:
                return reason, None, None
        if rt.api_key is not None:
            reason, _ = rt.api_key.check(headers, qs, claims)
            if reason is not Reason.OK:
                return reason, None, None
        return Reason.OK, claims, found

    @staticmethod
    def _verify_now(rt: RouteRuntime, hooks: MetricsHooks, token: str) -> Result:
        """One verification in the compiled verifier (synchronous: no await on the hot path)."""
        issuer_set = rt.issuer_set
        assert issuer_set is not None
        began = perf_counter()
        result = issuer_set.verify(token)
        if result.cached:
            hooks.cache_lookup(True)
        else:
            # Only real verifications are timed: a cache hit is counted, not observed.
            hooks.verify_observe(perf_counter() - began)
            hooks.cache_lookup(False)
        return result

    async def _verify(self, rt: RouteRuntime, hooks: MetricsHooks, token: str) -> Result:
        result = self._verify_now(rt, hooks, token)
        reason = result.reason
        if reason is Reason.KEY_NOT_FOUND or reason is Reason.JWKS_UNAVAILABLE:
            result = await self._verify_after_keys(rt, token, result)
        return result

    async def _verify_after_keys(self, rt: RouteRuntime, token: str, result: Result) -> Result:
        """The only awaits of the auth path: an unknown kid or a cold start (SPEC §5)."""
        verifier = result.verifier
        source = rt.key_sources.get(verifier) if verifier is not None else None
        if source is None:
            return result
        if result.reason is Reason.KEY_NOT_FOUND:
            # One single-flight, rate-limited refetch of the provider's JWKS.
            kid = result.kid
            retry = bool(kid) and await source.refresh_for_kid(kid or "")
        elif not source.ever_loaded:
            # Cold start: wait briefly for the provider's first keys. After a max_stale drop
            # the IdP is known to be failing, so the 503 goes out at once instead.
            retry = await source.wait_ready(COLD_START_WAIT)
        else:
            retry = False
        if retry:
            assert rt.issuer_set is not None
            result = rt.issuer_set.verify(token)
        return result

    async def _verify_all(self, rt: RouteRuntime, hooks: MetricsHooks,
                          tokens: list[tuple[int, str]]
                          ) -> tuple[Reason, Mapping[str, Any] | None]:
        """``mode: all``: every token valid, and together they cover every listed provider;
        policy and claim headers read the token of the first listed provider."""
        covered: dict[Verifier, Mapping[str, Any]] = {}
        for _, token in tokens:
            result = await self._verify(rt, hooks, token)
            if not result.ok:
                return result.reason, None
            verifier = result.verifier
            if verifier is None or result.claims is None:
                return Reason.ISSUER_UNKNOWN, None
            if verifier in covered:
                return Reason.TOKEN_AMBIGUOUS, None  # two tokens of one provider
            covered[verifier] = result.claims
        for verifier in rt.verifiers:
            if verifier not in covered:
                return Reason.TOKEN_MISSING, None
        return Reason.OK, covered[rt.verifiers[0]]

    @staticmethod
    def remove_tokens(rt: RouteRuntime, fwd: list[tuple[bytes, bytes]], qs: str,
                      found: list[tuple[int, str]]
                      ) -> tuple[list[tuple[bytes, bytes]], str]:
        """``forward_token: false``: remove each token from where it was found."""
        assert rt.extractor is not None
        for index, _ in found:
            src = rt.extractor.source(index)
            if src.place == "header":
                lname = src.name.lower().encode("latin-1")
                # A DPoP token's proof (RFC 9449 §4.1) is useless without it: it goes too.
                drop = {lname, b"dpop"} if index == rt.dpop_index else {lname}
                fwd = [h for h in fwd if h[0].lower() not in drop]
            elif src.place == "query":
                qs = strip_query_param(qs, src.name)
            else:
                out: list[tuple[bytes, bytes]] = []
                for name, value in fwd:
                    if name.lower() == b"cookie":
                        text = strip_cookie(value.decode("utf-8", "surrogateescape"), src.name)
                        if not text:
                            continue
                        value = text.encode("utf-8", "surrogateescape")
                    out.append((name, value))
                fwd = out
        return fwd, qs


def reserved_variants(names: list[str]) -> frozenset[str]:
    """Lower-case header names with ``_`` normalised to ``-`` (the handler checks both)."""
    return frozenset(n.lower().replace("_", "-") for n in names)


__all__ = [
    "HOP_BY_HOP",
    "AccessLog",
    "DataPlane",
    "KeySourceLike",
    "MetricsHooks",
    "RouteRuntime",
    "Tables",
    "iter_query",
    "reserved_variants",
]
