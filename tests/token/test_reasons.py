"""The closed set of reasons (SPEC §4) and its C mirror in the compiled verifier."""

from __future__ import annotations

import pytest

from fastgate.token import _verify
from fastgate.token.reasons import REJECT_REASONS, Reason

# SPEC §4, row by row: reason -> (status, WWW-Authenticate without a scope)
_INVALID_TOKEN = 'Bearer realm="fastgate", error="invalid_token", error_description="{}"'
SPEC_TABLE: dict[Reason, tuple[int, str | None]] = {
    Reason.TOKEN_MISSING: (401, 'Bearer realm="fastgate"'),
    **{
        r: (401, _INVALID_TOKEN.format(r.name.lower()))
        for r in (
            Reason.TOKEN_MALFORMED, Reason.TOKEN_TOO_LARGE, Reason.ALG_NOT_ALLOWED,
            Reason.ISSUER_UNKNOWN, Reason.KEY_NOT_FOUND, Reason.SIGNATURE_INVALID,
            Reason.TOKEN_EXPIRED, Reason.TOKEN_NOT_YET_VALID, Reason.AUDIENCE_MISMATCH,
            Reason.CLAIM_MISSING, Reason.TOKEN_TYPE_INVALID, Reason.CERTIFICATE_MISMATCH,
            Reason.TOKEN_REPLAYED,
        )
    },
    # RFC 9449 §7.1: the DPoP scheme's challenge (algs is added per route, see below)
    **{
        r: (401, 'DPoP realm="fastgate", error="invalid_dpop_proof"')
        for r in (Reason.DPOP_PROOF_INVALID, Reason.DPOP_PROOF_REPLAYED,
                  Reason.DPOP_BINDING_MISMATCH)
    },
    Reason.DPOP_NONCE_REQUIRED: (401, 'DPoP realm="fastgate", error="use_dpop_nonce"'),
    Reason.REPLAY_STORE_UNAVAILABLE: (503, None),
    Reason.TOKEN_AMBIGUOUS: (400, 'Bearer realm="fastgate", error="invalid_request"'),
    Reason.INSUFFICIENT_SCOPE: (403, 'Bearer realm="fastgate", error="insufficient_scope"'),
    Reason.CLAIM_MISMATCH: (403, 'Bearer realm="fastgate", error="insufficient_scope"'),
    Reason.API_KEY_MISSING: (401, 'Bearer realm="fastgate", error="invalid_request"'),
    Reason.API_KEY_INVALID: (401, 'Bearer realm="fastgate", error="invalid_request"'),
    Reason.API_KEY_MISMATCH: (403, 'Bearer realm="fastgate", error="invalid_token"'),
    Reason.JWKS_UNAVAILABLE: (503, None),
}


def test_c_codes_mirror_the_enum() -> None:
    assert {r.name: r.value for r in Reason} == _verify.REASON_CODES


def test_spec_table_covers_every_reject_reason() -> None:
    assert set(SPEC_TABLE) == set(REJECT_REASONS)
    assert Reason.OK not in REJECT_REASONS


@pytest.mark.parametrize("reason", list(Reason), ids=lambda r: r.name)
def test_label_is_the_lower_snake_name(reason: Reason) -> None:
    assert reason.label == reason.name.lower()
    assert reason.label.replace("_", "").isalpha()


def test_labels_are_unique() -> None:
    assert len({r.label for r in Reason}) == len(Reason)


@pytest.mark.parametrize("reason", list(REJECT_REASONS), ids=lambda r: r.name)
def test_status_and_www_authenticate_follow_spec(reason: Reason) -> None:
    status, header = SPEC_TABLE[reason]
    assert reason.status == status
    assert reason.www_authenticate() == header


def test_ok() -> None:
    assert Reason.OK.status == 200
    assert Reason.OK.label == "ok"
    assert Reason.OK.error is None
    assert Reason.OK.www_authenticate() is None


def test_insufficient_scope_names_the_required_scopes() -> None:
    assert Reason.INSUFFICIENT_SCOPE.www_authenticate("orders:read orders:write") == (
        'Bearer realm="fastgate", error="insufficient_scope", scope="orders:read orders:write"'
    )
    # the scope attribute belongs to insufficient_scope only (RFC 6750 §3)
    assert Reason.CLAIM_MISMATCH.www_authenticate("x") == (
        'Bearer realm="fastgate", error="insufficient_scope"'
    )


@pytest.mark.parametrize("reason", list(REJECT_REASONS), ids=lambda r: r.name)
def test_rfc6750_error_codes(reason: Reason) -> None:
    expected = {
        Reason.TOKEN_MISSING: None,  # RFC 6750 §3.1: no credentials, no error code
        Reason.TOKEN_AMBIGUOUS: "invalid_request",
        Reason.API_KEY_MISSING: "invalid_request",
        Reason.API_KEY_INVALID: "invalid_request",
        Reason.INSUFFICIENT_SCOPE: "insufficient_scope",
        Reason.CLAIM_MISMATCH: "insufficient_scope",
        Reason.JWKS_UNAVAILABLE: "service_unavailable",
        Reason.REPLAY_STORE_UNAVAILABLE: "service_unavailable",
        # RFC 9449 §7.1 and §8 define DPoP's own codes
        Reason.DPOP_PROOF_INVALID: "invalid_dpop_proof",
        Reason.DPOP_PROOF_REPLAYED: "invalid_dpop_proof",
        Reason.DPOP_BINDING_MISMATCH: "invalid_dpop_proof",
        Reason.DPOP_NONCE_REQUIRED: "use_dpop_nonce",
    }.get(reason, "invalid_token")
    assert reason.error == expected


def test_dpop_challenges_name_the_route_algorithms() -> None:
    # RFC 9449 §7.1: algs lists the proof algorithms the resource server accepts
    assert Reason.DPOP_PROOF_INVALID.www_authenticate(dpop_algs="ES256 EdDSA") == (
        'DPoP realm="fastgate", error="invalid_dpop_proof", algs="ES256 EdDSA"')
    assert Reason.DPOP_NONCE_REQUIRED.www_authenticate(dpop_algs="ES256") == (
        'DPoP realm="fastgate", error="use_dpop_nonce", algs="ES256"')
    # Bearer challenges never carry algs
    assert "algs" not in (Reason.TOKEN_EXPIRED.www_authenticate(dpop_algs="ES256") or "")


def test_values_are_stable() -> None:
    # the compiled verifier and metrics rely on these integers
    assert [r.value for r in Reason] == list(range(len(Reason)))
    assert Reason.OK.value == 0
    assert Reason.JWKS_UNAVAILABLE.value == 18
