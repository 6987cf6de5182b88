"""The data plane: aiohttp's low-level HTTP server handler (route -> auth -> forward).

One :class:`DataPlane` per worker process. It reads a :class:`Tables` snapshot (compiled once
by :mod:`fastgate.app`) through a single attribute, so a hot reload swaps one reference and a
request in flight finishes on the tables it started with.

Request pipeline (SPEC §3):

1. ``CONNECT`` -> 405; a target that is not origin-form (``*``, absolute-form) or a path a
   backend could read differently (``//``, dot segments, ``\\``, ``;``, ``%2e``/``%2f``/
   ``%5c``/``%00``; security catalog G5) -> 400, before any route logic.
2. Route match on the raw path (no match -> 404).
3. Inbound headers are filtered in one pass (hop-by-hop, ``Connection``-listed, fastgate's
   reserved names in every case and ``_`` variant, ``X-Forwarded-*``) while their total size
   is summed: over ``limits.max_header_bytes`` -> 431 (the parser enforces the per-line limit).
4. Auth (token extraction, issuer selection and verification in the compiled verifier,
   ``mode: all``, ``allow_missing``), then scopes and claim rules, then the API key.
5. ``Content-Length`` over ``max_body_bytes`` -> 413 without reading the body. Only now, when
   the request is admitted, ``Expect: 100-continue`` is answered (RFC 9110 §10.1.1), so a
   rejected client never sends its body.
6. Forward through the upstream pool: small bodies in one write, larger and chunked bodies
   streamed (a chunked body that crosses ``max_body_bytes`` -> 413 and the connection is
   closed); the response streamed back (``Content-Length`` or chunked passthrough), or sent
   in one piece when the pool already holds all of it.

Errors: upstream connect failure/reset -> 502, timeout -> 504, anything unexpected -> 502;
always a JSON body, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from http import HTTPStatus
from time import perf_counter
from typing import Any, Protocol

from aiohttp import web
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import LineTooLong
from aiohttp.streams import EmptyStreamReader, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from fastgate import httpfields
from fastgate._verify import IssuerSet, Result, TokenCache, Verifier
from fastgate.apikeys import ApiKeyCheck, ApiKeyTable
from fastgate.extract import TokenExtractor, iter_query, strip_cookie, strip_query_param
from fastgate.policy import Policy
from fastgate.reasons import Reason
from fastgate.responses import (
    BAD_GATEWAY,
    BAD_REQUEST,
    GATEWAY_TIMEOUT,
    HEADERS_TOO_LARGE,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    Canned,
)
from fastgate.routes import RouteTable, path_is_ambiguous
from fastgate.upstream import UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("fastgate.proxy")

#: Request bodies with a Content-Length up to this size are read whole and sent with the
#: head in one write (the pool's fast path); larger ones are streamed.
SMALL_BODY = 64 * 1024
#: Cold start: how long a request waits for a provider's first key set (SPEC §5).
COLD_START_WAIT = 1.0

# The hop-by-hop fields, plus Proxy-Authorization (a credential for this hop only) and Expect
# (answered here, RFC 9110 §10.1.1, and never forwarded).
HOP_BY_HOP = httpfields.HOP_BY_HOP | {"proxy-authorization", "expect"}
# What reading a request body raises when the client breaks off or breaks framing.
_CLIENT_BODY_ERRORS = (ConnectionError, asyncio.IncompleteReadError, RequestPayloadError, OSError)
# Header actions (one dict lookup per inbound header).
_DROP = 1
_CONNECTION = 2
_XFF = 3


class KeySourceLike(Protocol):
    """The part of ``fastgate.jwks.KeySource`` the data plane calls on the request path."""

    @property
    def ready(self) -> bool: ...
    @property
    def ever_loaded(self) -> bool: ...
    async def refresh_for_kid(self, kid: str) -> bool: ...
    async def wait_ready(self, timeout: float) -> bool: ...


class AccessLog(Protocol):
    """Optional access-log sink (the ops engineer's ``fastgate.accesslog`` adapts to it)."""

    def log(self, request: BaseRequest, *, route: str | None, status: int,
            reason: str | None, duration: float,
            upstream_latency: float | None = None) -> None: ...


class MetricsHooks:
    """The data plane's metrics calls, bound once from any object with (some of) the
    ``fastgate.metrics.Metrics`` methods; a missing method is a no-op, so the hot path never
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


class WireResponse(web.StreamResponse):
    """A :class:`~fastgate.responses.Canned` answer written as ONE preassembled buffer.

    The reject path's cost is dominated by aiohttp's generic response machinery (a headers
    multidict copied and mutated per request, then serialised); a canned answer's head is
    known at compile time except for ``Date`` and the connection token. The wire bytes are
    those aiohttp writes for ``Canned.response()`` (same header order, ``Date``, ``Server``,
    ``Connection`` per RFC 9112 §9.3 / §C.2.2 keep-alive rules, no body for HEAD — RFC 9110
    §9.3.2 — and for 1xx/204/304). aiohttp's protocol only calls ``prepare``, ``write_eof``
    and reads ``keep_alive``; ``status`` and ``force_close()`` work as on any response."""

    def __init__(self, wire: Wire, close: bool = False) -> None:
        # Deliberately not StreamResponse.__init__: none of its state (a headers multidict,
        # cookies, compression, chunking) is used; only what the properties below read.
        self._wire = wire
        self._status = wire.status
        self._reason = wire.reason
        self._keep_alive: bool | None = False if close else None
        self._eof_sent = False
        self._payload_writer = None
        self._req = None

    async def prepare(self, request: BaseRequest) -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = request.keep_alive
        self._keep_alive = keep_alive
        wire = self._wire
        version = request.version
        if version == HttpVersion11:
            first = b"HTTP/1.1"
            conn = b"" if keep_alive else b"Connection: close\r\n"
        else:
            first = b"HTTP/%d.%d" % (version.major, version.minor)
            conn = b"Connection: keep-alive\r\n" if keep_alive and version == HttpVersion10 \
                else b""
        body = b"" if must_be_empty_body(request.method, wire.status) else wire.body
        data = b"".join((first, wire.head, rfc822_formatted_time().encode(), wire.server, conn,
                         b"\r\n", body))
        # One write (and aiohttp's own back-pressure wait) through the request's writer.
        await request._payload_writer.write_eof(data)

    async def write_eof(self, data: bytes = b"") -> None:
        return None


class Wire:
    """The compile-time part of a :class:`WireResponse`: status line tail, the fixed headers
    (``Content-Type``, the canned extras, ``Content-Length``) and the body."""

    __slots__ = ("body", "canned", "head", "reason", "server", "status")

    def __init__(self, canned: Canned) -> None:
        self.canned = canned
        self.status = canned.status
        try:
            self.reason = HTTPStatus(canned.status).phrase
        except ValueError:
            self.reason = ""
        self.body = canned.body
        lines = [f" {self.status} {self.reason}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in canned.headers.items())
        lines.append(f"Content-Length: {len(canned.body)}\r\nDate: ")
        self.head = "".join(lines).encode("utf-8")
        self.server = f"\r\nServer: {SERVER_SOFTWARE}\r\n".encode()

    def response(self, close: bool = False) -> WireResponse:
        return WireResponse(self, close)


_WIRE_BAD_REQUEST = Wire(BAD_REQUEST)
_WIRE_NOT_FOUND = Wire(NOT_FOUND)


class BodyTooLarge(Exception):
    """A chunked request body crossed ``max_body_bytes`` while it was being streamed."""


class BodyTimeout(Exception):
    """The client sent no request-body bytes for the route's upstream ``read_timeout``."""


class RouteRuntime:
    """Everything the handler needs for one route, compiled once (no dicts of options)."""

    __slots__ = (
        "allow_missing", "api_key", "auth", "body_timeout", "cors_bypass", "extractor",
        "forward_token", "index", "issuer_set", "key_sources", "mode_all", "name", "policy",
        "policy_checks", "policy_headers", "pool", "rejects", "route", "upstream",
        "upstream_index", "verifiers", "wires",
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


class Tables:
    """One compiled configuration: what a request reads. Replaced whole on reload."""

    __slots__ = ("api_keys", "cache", "config", "header_actions", "hooks", "inflight",
                 "key_sources", "max_body_bytes", "max_header_bytes", "no_route", "pools", "routes",
                 "runtimes", "uses_host", "verifiers")

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
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.uses_host = any(r.host is not None for r in routes.routes)
        self.no_route = len(routes.routes)  # the metrics index of "no route matched"
        self.inflight = 0
        actions: dict[str, int] = {}
        for name in HOP_BY_HOP:
            actions[name] = _DROP
        for name in reserved_headers:
            actions[name] = _DROP
        # X-Forwarded-* are rewritten by the gateway (RFC 7239 §4 practice for XFF: append).
        actions["x-forwarded-proto"] = _DROP
        actions["x-forwarded-host"] = _DROP
        actions["connection"] = _CONNECTION
        actions["x-forwarded-for"] = _XFF
        self.header_actions = actions


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


class _Protocol(RequestHandler):
    """aiohttp's per-connection protocol with JSON error responses.

    Parser errors arrive here before any handler code: a request line or header line over the
    limit (``LineTooLong``) and too many header lines become 431 (RFC 6585 §5); every other
    malformed request 400. Logged at debug level: a bad client is not a server error."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        self.logger.debug("request error %s from %s: %r", status, request.remote, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        if isinstance(exc, LineTooLong) or (
            message is not None and "Too many headers" in message
        ):
            canned = HEADERS_TOO_LARGE
        elif status == 400:
            canned = BAD_REQUEST
        elif status == 504:
            canned = GATEWAY_TIMEOUT
        else:
            canned = BAD_GATEWAY
        return canned.with_close()


class _Server(Server):
    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=self._loop, **self._kwargs)


class DataPlane:
    """The request handler. ``tables`` is the only mutable state (swapped on reload)."""

    def __init__(self, tables: Tables, *, metrics: object | None = None,
                 access_log: AccessLog | None = None) -> None:
        self.tables = tables
        self.access_log = access_log
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def make_server(self, loop: asyncio.AbstractEventLoop, *, max_header_bytes: int,
                    keepalive_timeout: float = 75.0) -> Server:
        """The aiohttp low-level server (a protocol factory for ``loop.create_server``)."""
        self._loop = loop
        return _Server(
            self.handle,
            loop=loop,
            handler_cancellation=True,  # a client that went away frees its upstream slot
            access_log=None,  # our own access log (or none): aiohttp's costs per request
            keepalive_timeout=keepalive_timeout,
            # One header line (or request line) may not exceed the whole header budget; the
            # total is checked in the handler.
            max_line_size=max_header_bytes,
            max_field_size=max_header_bytes,
            max_headers=128,
            auto_decompress=False,  # a proxy forwards Content-Encoding untouched
            lingering_time=2.0,
        )

    # -- the handler -----------------------------------------------------------------------------

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        tables = self.tables
        hooks = tables.hooks  # captured with the tables: both belong to one configuration
        loop = self._loop or asyncio.get_running_loop()
        start = loop.time()
        tables.inflight += 1
        hooks.inflight_inc()
        route_index = tables.no_route
        label: str | None = None
        upstream_s: float | None = None
        resp: web.StreamResponse | None = None
        try:
            resp, route_index, label, upstream_s = await self._dispatch(tables, request)
            if self.draining:
                resp.force_close()  # RFC 9112 §9.6: tell the client not to reuse it
            return resp
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never a traceback to the client (SPEC §3.5).
            log.exception("unexpected error handling %s %s", request.method,
                          request.raw_path[:200])
            label = BAD_GATEWAY.label
            resp = BAD_GATEWAY.with_close()
            return resp
        finally:
            tables.inflight -= 1
            hooks.inflight_dec()
            status = resp.status if resp is not None else 499
            duration = loop.time() - start
            hooks.request_done(route_index, status, duration)
            if self.access_log is not None:
                rt = tables.runtimes[route_index] if route_index < tables.no_route else None
                self.access_log.log(request, route=rt.name if rt else None, status=status,
                                    reason=label, duration=duration,
                                    upstream_latency=upstream_s)

    async def _dispatch(self, t: Tables, request: BaseRequest
                        ) -> tuple[web.StreamResponse, int, str | None, float | None]:
        method = request.method
        if method == "CONNECT":
            # CVE-2021-43824 class: the gateway is not a forward proxy.
            return METHOD_NOT_ALLOWED.with_close(), t.no_route, METHOD_NOT_ALLOWED.label, None
        raw = request.raw_path
        q = raw.find("?")
        if q == -1:
            path = raw
            qs = ""
        else:
            path = raw[:q]
            qs = raw[q + 1:]
        if path_is_ambiguous(path):
            return _WIRE_BAD_REQUEST.response(), t.no_route, BAD_REQUEST.label, None
        headers = request.headers
        route = t.routes.match(method, headers.get("Host") if t.uses_host else None, path)
        if route is None:
            return _WIRE_NOT_FOUND.response(), t.no_route, NOT_FOUND.label, None
        rt = t.runtimes[route.index]
        idx = rt.index

        # -- one pass over the inbound headers: filter and measure ---------------------------
        actions = t.header_actions
        fwd: list[tuple[str, str]] = []
        size = len(raw) + 16
        xff: str | None = None
        listed: list[str] | None = None
        for name, value in headers.items():
            size += len(name) + len(value) + 4
            lname = name.lower()
            action = actions.get(lname)
            if action is None:
                if "_" in lname and lname.replace("_", "-") in actions:
                    continue  # X_User_Id: a CGI/WSGI upstream would read it as X-User-Id
                fwd.append((name, value))
            elif action == _XFF:
                xff = value if xff is None else xff + ", " + value
            elif action == _CONNECTION:
                # RFC 9110 §7.6.1: options listed in Connection are hop-by-hop as well.
                if listed is None:
                    listed = []
                listed.extend(tok.strip().lower() for tok in value.split(","))
        if size > t.max_header_bytes:
            return HEADERS_TOO_LARGE.with_close(), idx, HEADERS_TOO_LARGE.label, None
        if listed:
            drop_listed = frozenset(listed) - {"host"}
            fwd = [h for h in fwd if h[0].lower() not in drop_listed]

        # -- auth ------------------------------------------------------------------------
        claims: Mapping[str, Any] | None = None
        if rt.auth and not (
            rt.cors_bypass and method == "OPTIONS" and "Origin" in headers
            and "Access-Control-Request-Method" in headers
        ):
            reason, claims, found = await self._authenticate(rt, t.hooks, headers, qs)
            if reason is not Reason.OK:
                t.hooks.reject(idx, reason)
                wire = rt.wires[reason]
                # The body was not read: close rather than drain it (no 100 was sent).
                close = request.body_exists and not request.content.is_eof()
                return wire.response(close), idx, wire.canned.label, None
            if found and not rt.forward_token:
                fwd, qs = self._remove_tokens(rt, fwd, qs, found)
            if claims is not None and rt.policy_headers:
                assert rt.policy is not None
                fwd.extend(rt.policy.headers(claims))
        if t.api_keys.query is not None and qs:
            # The API key is a credential for the gateway: never forwarded.
            qs = strip_query_param(qs, t.api_keys.query)

        # -- X-Forwarded-* ------------------------------------------------------------
        peer = request.remote
        if peer is not None:
            fwd.append(("X-Forwarded-For", peer if xff is None else xff + ", " + peer))
        elif xff is not None:
            fwd.append(("X-Forwarded-For", xff))
        fwd.append(("X-Forwarded-Proto", "http"))
        host = headers.get("Host")
        if host is not None:
            fwd.append(("X-Forwarded-Host", host))

        # -- body --------------------------------------------------------------------
        body: bytes | AsyncIterator[bytes] | None = None
        payload = request.content
        if type(payload) is not EmptyStreamReader:
            length_text = headers.get("Content-Length")
            if length_text is not None:
                length = int(length_text)  # the parser validated it (RFC 9112 §6.3)
                if length > t.max_body_bytes:
                    return PAYLOAD_TOO_LARGE.with_close(), idx, PAYLOAD_TOO_LARGE.label, None
            else:
                length = -1
            await _continue(request, headers)
            if 0 <= length <= SMALL_BODY:
                if length:
                    try:
                        # A client that stops sending must not hold the handler forever.
                        async with asyncio.timeout(rt.body_timeout):
                            body = await payload.readexactly(length)
                    except TimeoutError:
                        return REQUEST_TIMEOUT.with_close(), idx, REQUEST_TIMEOUT.label, None
                    except _CLIENT_BODY_ERRORS as exc:
                        log.debug("route %s: request body read failed: %r", rt.name, exc)
                        return BAD_REQUEST.with_close(), idx, BAD_REQUEST.label, None
            else:
                body = _stream_body(payload, t.max_body_bytes, rt.body_timeout)

        target = rt.route.rewrite(path) if rt.route.strip_prefix else path
        if qs:
            target = target + "?" + qs
        return await self._forward(rt, t.hooks, request, method, target, fwd, body)

    # -- auth -----------------------------------------------------------------------------

    async def _authenticate(
        self, rt: RouteRuntime, hooks: MetricsHooks, headers: Any, qs: str
    ) -> tuple[Reason, Mapping[str, Any] | None, list[tuple[int, str]] | None]:
        """``(reason, claims, found)``: ``found`` lists ``(source index, token)`` pairs."""
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
                if reason is not Reason.OK:
                    return reason, None, None
            else:
                reason, token, index = extractor.extract(headers, qs)
                if reason is Reason.OK:
                    assert token is not None
                    result = self._verify_now(rt, hooks, token)
                    if not result.ok:
                        reason = result.reason
                        if reason is Reason.KEY_NOT_FOUND or reason is Reason.JWKS_UNAVAILABLE:
                            result = await self._verify_after_keys(rt, token, result)
                        if not result.ok:
                            return result.reason, None, None
                    claims = result.claims
                    found = [(index, token)]
                elif reason is Reason.TOKEN_MISSING and rt.allow_missing:
                    pass  # SPEC §2: no token -> forwarded without claim headers
                else:
                    return reason, None, None
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
    def _remove_tokens(rt: RouteRuntime, fwd: list[tuple[str, str]], qs: str,
                       found: list[tuple[int, str]]
                       ) -> tuple[list[tuple[str, str]], str]:
        """``forward_token: false``: remove each token from where it was found."""
        assert rt.extractor is not None
        for index, _ in found:
            src = rt.extractor.source(index)
            if src.place == "header":
                lname = src.name.lower()
                fwd = [h for h in fwd if h[0].lower() != lname]
            elif src.place == "query":
                qs = strip_query_param(qs, src.name)
            else:
                out: list[tuple[str, str]] = []
                for name, value in fwd:
                    if name.lower() == "cookie":
                        value = strip_cookie(value, src.name)
                        if not value:
                            continue
                    out.append((name, value))
                fwd = out
        return fwd, qs

    # -- forwarding -------------------------------------------------------------------------

    async def _forward(
        self,
        rt: RouteRuntime,
        hooks: MetricsHooks,
        request: BaseRequest,
        method: str,
        target: str,
        fwd: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> tuple[web.StreamResponse, int, str | None, float | None]:
        idx = rt.index
        loop = self._loop or asyncio.get_running_loop()
        sent = loop.time()
        try:
            up = await rt.pool.request(method, target, fwd, body, head=method == "HEAD")
        except UpstreamError as exc:
            hooks.upstream_error(rt.upstream_index, exc.kind)
            log.info("route %s upstream %s: %s", rt.name, rt.upstream, exc)
            canned = GATEWAY_TIMEOUT if exc.status == 504 else BAD_GATEWAY
            return self._error(request, canned), idx, canned.label, None
        except BodyTooLarge:
            return PAYLOAD_TOO_LARGE.with_close(), idx, PAYLOAD_TOO_LARGE.label, None
        except BodyTimeout:
            return REQUEST_TIMEOUT.with_close(), idx, REQUEST_TIMEOUT.label, None
        except _CLIENT_BODY_ERRORS as exc:
            # The client went away (or broke framing) while its body was being read.
            log.debug("route %s: request body read failed: %r", rt.name, exc)
            return BAD_REQUEST.with_close(), idx, BAD_REQUEST.label, None
        upstream_s = loop.time() - sent
        hooks.upstream_observe(rt.upstream_index, upstream_s)
        try:
            complete = up.body_complete
            if complete is not None:
                return web.Response(status=up.status, reason=up.reason, headers=up.headers,
                                    body=complete), idx, None, upstream_s
            return await self._stream_response(request, up, rt, hooks), idx, None, upstream_s
        finally:
            up.release()

    async def _stream_response(self, request: BaseRequest, up: UpstreamResponse,
                               rt: RouteRuntime, hooks: MetricsHooks) -> web.StreamResponse:
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=up.headers)
        if up.content_length is None and request.version != HttpVersion11:
            resp.force_close()  # HTTP/1.0: the body ends when the connection closes
        await resp.prepare(request)
        try:
            while True:
                chunk = await up.read()
                if not chunk:
                    break
                await resp.write(chunk)
        except ConnectionError:
            # The client went away mid-response; release() closes the upstream connection.
            log.debug("route %s: client closed the connection mid-response", rt.name)
        except UpstreamError as exc:
            # Mid-body failure: the head is gone already, so the only honest signal left is
            # to cut the client connection (an incomplete body, never a silent truncation).
            hooks.upstream_error(rt.upstream_index, exc.kind)
            log.info("route %s upstream %s: %s (mid-body)", rt.name, rt.upstream, exc)
            transport = request.transport
            if transport is not None:
                transport.abort()
        return resp

    @staticmethod
    def _error(request: BaseRequest, canned: Canned) -> web.StreamResponse:
        # A request body that was not (fully) consumed leaves the connection unusable.
        if request.body_exists and not request.content.is_eof():
            return canned.with_close()
        return canned.response()


async def _continue(request: BaseRequest, headers: Any) -> None:
    """RFC 9110 §10.1.1: answer ``Expect: 100-continue`` once the request is admitted."""
    expect = headers.get("Expect")
    if expect is not None and request.version == HttpVersion11 and \
            expect.lower() == "100-continue":
        writer = request.writer
        await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.output_size = 0  # the final response has not started yet


async def _stream_body(payload: StreamReader, limit: int,
                       idle: float) -> AsyncIterator[bytes]:
    """The request body as it arrives, aborting once it exceeds ``limit`` bytes or the client
    sends nothing for ``idle`` seconds (the pool's own timer does not run while it sends)."""
    total = 0
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await payload.readany()
        except TimeoutError:
            raise BodyTimeout() from None
        if not chunk:
            return
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge()
        yield chunk


def reserved_variants(names: list[str]) -> frozenset[str]:
    """Lower-case header names with ``_`` normalised to ``-`` (the handler checks both)."""
    return frozenset(n.lower().replace("_", "-") for n in names)


__all__ = [
    "HOP_BY_HOP",
    "AccessLog",
    "BodyTimeout",
    "BodyTooLarge",
    "DataPlane",
    "KeySourceLike",
    "MetricsHooks",
    "RouteRuntime",
    "Tables",
    "iter_query",
    "reserved_variants",
]
