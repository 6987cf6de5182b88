"""The closed set of decisions (SPEC §4): one label for the HTTP body, the metrics and the logs."""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """Why a request was admitted or rejected.

    The integer values are stable: the compiled verifier returns them as C codes
    (``fastgate.token._verify.REASON_CODES`` mirrors this enum and a test keeps the two equal).
    """

    OK = 0
    TOKEN_MISSING = 1
    TOKEN_MALFORMED = 2
    TOKEN_TOO_LARGE = 3
    ALG_NOT_ALLOWED = 4
    ISSUER_UNKNOWN = 5
    KEY_NOT_FOUND = 6
    SIGNATURE_INVALID = 7
    TOKEN_EXPIRED = 8
    TOKEN_NOT_YET_VALID = 9
    AUDIENCE_MISMATCH = 10
    CLAIM_MISSING = 11
    TOKEN_AMBIGUOUS = 12
    INSUFFICIENT_SCOPE = 13
    CLAIM_MISMATCH = 14
    API_KEY_MISSING = 15
    API_KEY_INVALID = 16
    API_KEY_MISMATCH = 17
    JWKS_UNAVAILABLE = 18
    #: RFC 9068 §4 / RFC 8725 §3.11: the JOSE ``typ`` is absent or not in the provider's list.
    TOKEN_TYPE_INVALID = 19
    #: RFC 8705 §3: a certificate-bound route, and the token's cnf["x5t#S256"] is not the
    #: SHA-256 thumbprint of this connection's client certificate (or there is none).
    CERTIFICATE_MISMATCH = 20
    #: RFC 9449 §4.3: the DPoP proof is missing, malformed, badly signed, for another request
    #: (htm/htu/ath) or outside its iat window.
    DPOP_PROOF_INVALID = 21
    #: RFC 9449 §11.1: the proof's jti was already seen within the proof window.
    DPOP_PROOF_REPLAYED = 22
    #: RFC 9449 §6.1/§7.2: the token's cnf.jkt is not the proof key's thumbprint, or a
    #: DPoP-bound token was presented without a proof (as Bearer).
    DPOP_BINDING_MISMATCH = 23
    #: RFC 9449 §8: the route wants a server nonce and the proof has none or a stale one.
    DPOP_NONCE_REQUIRED = 24
    #: RFC 7523 §3 item 7: a one-time token's jti was already used within its lifetime.
    TOKEN_REPLAYED = 25
    #: The shared replay store could not answer and the route fails closed.
    REPLAY_STORE_UNAVAILABLE = 26

    @property
    def label(self) -> str:
        """The lower-snake name used in bodies, metric labels and logs."""
        return _LABELS[self]

    @property
    def status(self) -> int:
        """The HTTP status of a reject for this reason (200 for OK)."""
        return _STATUS[self]

    @property
    def error(self) -> str | None:
        """The body's ``error`` code: RFC 6750 §3.1's for credential problems; None for
        token_missing (RFC 6750 §3.1: a request that lacked credentials gets no error code,
        in the header or the body); ``service_unavailable`` for jwks_unavailable, which is not
        a credential problem and has no RFC 6750 code (the gateway's own error vocabulary, as
        ``bad_gateway``)."""
        return _ERROR[self]

    def www_authenticate(self, scope: str | None = None,
                         dpop_algs: str | None = None) -> str | None:
        """The ``WWW-Authenticate`` value of SPEC §4 (None for OK, jwks_unavailable and
        replay_store_unavailable).

        ``scope`` is the space-separated list of required scopes, used only by
        insufficient_scope (RFC 6750 §3: the ``scope`` attribute). ``dpop_algs`` is the
        route's space-separated DPoP algorithm list (RFC 9449 §7.1: the ``algs`` attribute).
        """
        if self is Reason.OK or self is Reason.JWKS_UNAVAILABLE or \
                self is Reason.REPLAY_STORE_UNAVAILABLE:
            return None
        if self in _DPOP_CHALLENGE:
            # RFC 9449 §7.1: the DPoP scheme's challenge, with the algorithms we accept.
            value = f'DPoP realm="fastgate", error="{_DPOP_CHALLENGE[self]}"'
            if dpop_algs:
                value += f', algs="{dpop_algs}"'
            return value
        if self is Reason.TOKEN_MISSING:
            # RFC 6750 §3.1: a request with no credentials gets no error code.
            return 'Bearer realm="fastgate"'
        if self is Reason.INSUFFICIENT_SCOPE:
            value = 'Bearer realm="fastgate", error="insufficient_scope"'
            if scope:
                value += f', scope="{scope}"'
            return value
        if _ERROR[self] == "invalid_token" and self.status == 401:
            return (
                f'Bearer realm="fastgate", error="invalid_token", '
                f'error_description="{self.label}"'
            )
        return f'Bearer realm="fastgate", error="{_ERROR[self]}"'


_LABELS: dict[Reason, str] = {r: r.name.lower() for r in Reason}

_STATUS: dict[Reason, int] = {r: 401 for r in Reason}
_STATUS.update(
    {
        Reason.OK: 200,
        Reason.TOKEN_AMBIGUOUS: 400,
        Reason.INSUFFICIENT_SCOPE: 403,
        Reason.CLAIM_MISMATCH: 403,
        Reason.API_KEY_MISMATCH: 403,
        Reason.JWKS_UNAVAILABLE: 503,
        Reason.REPLAY_STORE_UNAVAILABLE: 503,
    }
)

_ERROR: dict[Reason, str | None] = {r: "invalid_token" for r in Reason}
_ERROR.update(
    {
        Reason.OK: None,
        Reason.TOKEN_MISSING: None,
        Reason.TOKEN_AMBIGUOUS: "invalid_request",
        Reason.INSUFFICIENT_SCOPE: "insufficient_scope",
        Reason.CLAIM_MISMATCH: "insufficient_scope",
        Reason.API_KEY_MISSING: "invalid_request",
        Reason.API_KEY_INVALID: "invalid_request",
        Reason.JWKS_UNAVAILABLE: "service_unavailable",
        Reason.REPLAY_STORE_UNAVAILABLE: "service_unavailable",
        # RFC 9449 §7.1 / §8: DPoP's own error codes, in the DPoP challenge and the body.
        Reason.DPOP_PROOF_INVALID: "invalid_dpop_proof",
        Reason.DPOP_PROOF_REPLAYED: "invalid_dpop_proof",
        Reason.DPOP_BINDING_MISMATCH: "invalid_dpop_proof",
        Reason.DPOP_NONCE_REQUIRED: "use_dpop_nonce",
    }
)

# The reasons answered with the DPoP scheme's challenge (RFC 9449 §7.1), and its error code.
_DPOP_CHALLENGE: dict[Reason, str] = {
    Reason.DPOP_PROOF_INVALID: "invalid_dpop_proof",
    Reason.DPOP_PROOF_REPLAYED: "invalid_dpop_proof",
    Reason.DPOP_BINDING_MISMATCH: "invalid_dpop_proof",
    Reason.DPOP_NONCE_REQUIRED: "use_dpop_nonce",
}

REJECT_REASONS: tuple[Reason, ...] = tuple(r for r in Reason if r is not Reason.OK)
