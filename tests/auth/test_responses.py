"""Precomputed reject and error responses (SPEC §4)."""

from __future__ import annotations

import orjson
import pytest

from fastgate.auth.responses import (
    BAD_GATEWAY,
    GATEWAY_TIMEOUT,
    HEADERS_TOO_LARGE,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    build_bearer_binding_reject,
    build_reject,
    build_rejects,
)
from fastgate.token.reasons import REJECT_REASONS, Reason

# SPEC §4, verbatim.
EXPECTED = {
    Reason.TOKEN_MISSING: (401, 'Bearer realm="fastgate"'),
    Reason.TOKEN_AMBIGUOUS: (400, 'Bearer realm="fastgate", error="invalid_request"'),
    Reason.INSUFFICIENT_SCOPE: (
        403, 'Bearer realm="fastgate", error="insufficient_scope", scope="a:read b:write"'),
    Reason.CLAIM_MISMATCH: (403, 'Bearer realm="fastgate", error="insufficient_scope"'),
    Reason.API_KEY_MISSING: (401, 'Bearer realm="fastgate", error="invalid_request"'),
    Reason.API_KEY_INVALID: (401, 'Bearer realm="fastgate", error="invalid_request"'),
    Reason.API_KEY_MISMATCH: (403, 'Bearer realm="fastgate", error="invalid_token"'),
    Reason.JWKS_UNAVAILABLE: (503, None),
    Reason.REPLAY_STORE_UNAVAILABLE: (503, None),
    Reason.DPOP_NONCE_REQUIRED: (401, 'DPoP realm="fastgate", error="use_dpop_nonce"'),
}
for _r in (Reason.DPOP_PROOF_INVALID, Reason.DPOP_PROOF_REPLAYED, Reason.DPOP_BINDING_MISMATCH):
    EXPECTED[_r] = (401, 'DPoP realm="fastgate", error="invalid_dpop_proof"')
for _r in (Reason.TOKEN_MALFORMED, Reason.TOKEN_TOO_LARGE, Reason.ALG_NOT_ALLOWED,
           Reason.ISSUER_UNKNOWN, Reason.KEY_NOT_FOUND, Reason.SIGNATURE_INVALID,
           Reason.TOKEN_EXPIRED, Reason.TOKEN_NOT_YET_VALID, Reason.AUDIENCE_MISMATCH,
           Reason.CLAIM_MISSING, Reason.TOKEN_TYPE_INVALID, Reason.CERTIFICATE_MISMATCH,
           Reason.TOKEN_REPLAYED):
    EXPECTED[_r] = (401, f'Bearer realm="fastgate", error="invalid_token", '
                         f'error_description="{_r.label}"')


@pytest.mark.parametrize("reason", REJECT_REASONS, ids=lambda r: r.label)
def test_every_reason(reason: Reason) -> None:
    canned = build_rejects(scope="a:read b:write")[reason]
    status, www = EXPECTED[reason]
    resp = canned.response()
    assert resp.status == status
    assert resp.headers.get("WWW-Authenticate") == www
    assert resp.headers["Content-Type"] == "application/json"
    expected = {"reason": reason.label}
    if reason.error is not None:
        expected["error"] = reason.error
    assert orjson.loads(canned.body) == expected
    # The body and the header agree (RFC 6750 §3.1): an error code in one is in the other.
    www = reason.www_authenticate(None)
    unavailable = (Reason.JWKS_UNAVAILABLE, Reason.REPLAY_STORE_UNAVAILABLE)
    assert (reason.error is None) == (www is None or "error=" not in www) or \
        reason in unavailable
    if reason in unavailable:
        assert resp.headers["Retry-After"] == "5"
    else:
        assert "Retry-After" not in resp.headers


def test_failure_status_and_hide_reasons() -> None:
    table = build_rejects(failure_status=403, hide_reasons=True)
    for reason in REJECT_REASONS:
        canned = table[reason]
        if reason in (Reason.JWKS_UNAVAILABLE, Reason.REPLAY_STORE_UNAVAILABLE):
            assert canned.status == 503  # not the client's fault: never overridden
        else:
            assert canned.status == 403
        assert orjson.loads(canned.body) == ({} if reason.error is None
                                              else {"error": reason.error})
        assert canned.label == reason.label  # logs and metrics keep the reason


def test_bearer_binding_reject_uses_the_bearer_challenge() -> None:
    # RFC 9449 §7.2: a DPoP-bound token sent as Bearer is answered in the client's scheme
    canned = build_bearer_binding_reject()
    assert canned.status == 401
    assert canned.headers["WWW-Authenticate"] == (
        'Bearer realm="fastgate", error="invalid_token", '
        'error_description="dpop_binding_mismatch"')
    assert orjson.loads(canned.body) == {"error": "invalid_token",
                                         "reason": "dpop_binding_mismatch"}
    hidden = build_bearer_binding_reject(failure_status=403, hide_reasons=True)
    assert hidden.status == 403 and orjson.loads(hidden.body) == {"error": "invalid_token"}
    assert hidden.label == "dpop_binding_mismatch"


def test_responses_are_fresh_objects() -> None:
    canned = build_reject(Reason.TOKEN_EXPIRED)
    a, b = canned.response(), canned.response()
    assert a is not b
    a.headers["X"] = "1"
    assert "X" not in b.headers and "X" not in canned.headers
    assert canned.with_close().keep_alive is False


@pytest.mark.parametrize(("canned", "status", "error"), [
    (NOT_FOUND, 404, "not_found"),
    (PAYLOAD_TOO_LARGE, 413, "payload_too_large"),
    (REQUEST_TIMEOUT, 408, "request_timeout"),
    (HEADERS_TOO_LARGE, 431, "request_header_fields_too_large"),
    (BAD_GATEWAY, 502, "bad_gateway"),
    (GATEWAY_TIMEOUT, 504, "gateway_timeout"),
])
def test_error_responses(canned: object, status: int, error: str) -> None:
    from fastgate.auth.responses import Canned

    assert isinstance(canned, Canned)
    assert canned.status == status
    assert orjson.loads(canned.body) == {"error": error}
    assert canned.response().content_type == "application/json"
