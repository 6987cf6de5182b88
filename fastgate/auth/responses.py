"""Precomputed reject and error responses (SPEC §4).

Everything a reject needs (status, ``WWW-Authenticate``, JSON body) is built once at start-up
per route, so the reject path does no string formatting and no JSON encoding: it copies one
prepared header mapping and hands over prepared body bytes.

Rules (see also SPEC §4):

* Body: ``{"error":"<RFC 6750 code>","reason":"<label>"}``; with ``hide_reasons`` only
  ``{"error":...}`` (the label still reaches metrics and logs). RFC 6750 §3.1 defines no error
  code for a request without credentials, so token_missing has none in the header and none in
  the body: ``{"reason":"token_missing"}``. jwks_unavailable's 503 says
  ``"error":"service_unavailable"`` (no RFC 6750 code fits a gateway that cannot check yet).
* ``failure_status`` replaces the status of every auth failure on the route, except
  jwks_unavailable: a 503 says "the gateway cannot check right now, retry" (with Retry-After),
  which is not the client's fault and must not look like a credential problem.
* Error responses (400, 404, 405, 408, 413, 431, 502, 503, 504) are JSON too and never carry
  internals (no upstream address, no exception text).
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from fastgate.token.reasons import Reason

JSON_CONTENT_TYPE = "application/json"
RETRY_AFTER_SECONDS = 5  # jwks_unavailable: keys are fetched in the background; retry soon


class Canned:
    """One prepared response: status, headers and body bytes, built once."""

    __slots__ = ("body", "headers", "label", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        label: str | None = None,
    ) -> None:
        self.status = status
        self.body = body
        h: CIMultiDict[str] = CIMultiDict()
        h["Content-Type"] = JSON_CONTENT_TYPE
        for name, value in headers:
            h.add(name, value)
        # A read-only view: every response copies it (aiohttp mutates response headers).
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(h)
        self.label = label  # the reason label or error name, for logs and metrics

    def response(self) -> web.Response:
        """A fresh aiohttp response (response objects are single-use)."""
        return web.Response(status=self.status, body=self.body, headers=self.headers)

    def with_close(self) -> web.Response:
        """The same response with ``Connection: close`` (used when the request body was not
        read: the connection cannot be reused safely)."""
        resp = self.response()
        resp.force_close()
        return resp

    def __repr__(self) -> str:
        return f"Canned({self.status}, {self.body!r})"


def _body(obj: dict[str, str]) -> bytes:
    return orjson.dumps(obj)


def reject_body(reason: Reason, *, hide_reasons: bool = False) -> bytes:
    """``{"error":...,"reason":...}`` for a reject (SPEC §4)."""
    body: dict[str, str] = {}
    if reason.error is not None:
        body["error"] = reason.error  # none for token_missing: RFC 6750 §3.1
    if not hide_reasons:
        body["reason"] = reason.label
    return _body(body)


#: Not the client's fault (the gateway cannot check right now): never re-statused by
#: ``failure_status``, and answered with Retry-After.
_UNAVAILABLE = frozenset({Reason.JWKS_UNAVAILABLE, Reason.REPLAY_STORE_UNAVAILABLE})


def build_reject(
    reason: Reason,
    *,
    failure_status: int | None = None,
    hide_reasons: bool = False,
    scope: str | None = None,
    dpop_algs: str | None = None,
    extra_headers: Iterable[tuple[str, str]] = (),
) -> Canned:
    """The prepared reject for one reason on one route."""
    status = reason.status
    if failure_status is not None and reason not in _UNAVAILABLE:
        status = failure_status
    headers: list[tuple[str, str]] = []
    www = reason.www_authenticate(scope if reason is Reason.INSUFFICIENT_SCOPE else None,
                                  dpop_algs)
    if www is not None:
        # RFC 6750 §3: the challenge accompanies 401 and 403 (and the 400 of invalid_request).
        headers.append(("WWW-Authenticate", www))
    if reason in _UNAVAILABLE:
        # RFC 9110 §10.2.3: tell the client when to try again.
        headers.append(("Retry-After", str(RETRY_AFTER_SECONDS)))
    headers.extend(extra_headers)
    return Canned(status, reject_body(reason, hide_reasons=hide_reasons), headers, reason.label)


def build_rejects(
    *,
    failure_status: int | None = None,
    hide_reasons: bool = False,
    scope: str | None = None,
    dpop_algs: str | None = None,
) -> tuple[Canned, ...]:
    """Every reject of one route, indexed by ``Reason`` value (index 0, OK, is a placeholder
    that is never sent)."""
    table: list[Canned] = []
    for reason in Reason:
        if reason is Reason.OK:
            table.append(Canned(200, b"{}", (), "ok"))
            continue
        table.append(
            build_reject(reason, failure_status=failure_status, hide_reasons=hide_reasons,
                         scope=scope, dpop_algs=dpop_algs)
        )
    return tuple(table)


def build_bearer_binding_reject(*, failure_status: int | None = None,
                                hide_reasons: bool = False) -> Canned:
    """dpop_binding_mismatch for a DPoP-bound token presented as Bearer (RFC 9449 §7.2): the
    client used the Bearer scheme, so the challenge is Bearer's ``invalid_token``."""
    reason = Reason.DPOP_BINDING_MISMATCH
    body: dict[str, str] = {"error": "invalid_token"}
    if not hide_reasons:
        body["reason"] = reason.label
    www = (f'Bearer realm="fastgate", error="invalid_token", '
           f'error_description="{reason.label}"')
    return Canned(failure_status or reason.status, _body(body), (("WWW-Authenticate", www),),
                  reason.label)


DEFAULT_REJECTS: tuple[Canned, ...] = build_rejects()

# Gateway errors (not auth decisions): fixed bodies, never internals.
NOT_FOUND = Canned(404, _body({"error": "not_found"}), (), "not_found")
METHOD_NOT_ALLOWED = Canned(405, _body({"error": "method_not_allowed"}), (),
                            "method_not_allowed")
BAD_REQUEST = Canned(400, _body({"error": "bad_request"}), (), "bad_request")
PAYLOAD_TOO_LARGE = Canned(413, _body({"error": "payload_too_large"}), (), "payload_too_large")
HEADERS_TOO_LARGE = Canned(431, _body({"error": "request_header_fields_too_large"}), (),
                           "request_header_fields_too_large")
REQUEST_TIMEOUT = Canned(408, _body({"error": "request_timeout"}), (), "request_timeout")
BAD_GATEWAY = Canned(502, _body({"error": "bad_gateway"}), (), "bad_gateway")
GATEWAY_TIMEOUT = Canned(504, _body({"error": "gateway_timeout"}), (), "gateway_timeout")
SERVICE_UNAVAILABLE = Canned(503, _body({"error": "service_unavailable"}),
                             (("Retry-After", str(RETRY_AFTER_SECONDS)),), "service_unavailable")
