"""Typed surface of the compiled hot path (fastgate/token/_verify.pyx).

Every token-level decision is made here: compact-JWS parsing, alg/key binding, signature
verification, claim checks and the verified-token cache. Nothing in here raises for a bad
token; every outcome is a :class:`fastgate.token.reasons.Reason`.

Check order (first failure wins): size -> segments / base64url -> header JSON -> payload JSON
-> alg (allow-list, "none") -> issuer -> typ (only when the provider lists types; RFC 9068 §4)
-> usable keys now (else jwks_unavailable) -> kid -> key lookup -> alg/key binding ->
signature -> claims (exp/nbf/iat with skew, aud, required, lifetime). A forged and expired
token is signature_invalid; a validly signed expired one is token_expired.
"""

from collections.abc import Iterable, Mapping
from typing import Any

from fastgate.token.reasons import Reason

REASON_CODES: dict[str, int]
"""Reason name -> C code; kept equal to ``{r.name: r.value for r in Reason}`` by a test."""

SUPPORTED_ALGORITHMS: frozenset[str]
"""Every JWS ``alg`` this build can verify (RS*/PS*/ES*/EdDSA/HS*)."""

ASYMMETRIC_ALGORITHMS: frozenset[str]
HMAC_ALGORITHMS: frozenset[str]
MAX_KID_LENGTH: int
"""A header ``kid`` longer than this (in characters) is token_malformed."""
MAX_KIDLESS_KEYS: int
"""A token without ``kid`` tries at most this many keys that fit its alg, in JWKS order."""
MAX_JWKS_KEYS: int
"""Keys considered per JWKS document; the rest are skipped as "too many keys"."""
MAX_CACHED_TOKEN_BYTES: int
"""Tokens longer than this are verified every time and never cached (Envoy's limit)."""
MAX_JSON_DEPTH: int
"""Deepest nesting of objects/arrays accepted in a header or payload (deeper: malformed)."""
NEGATIVE_CACHE_ENTRIES: int
"""Default bound of a TokenCache's negative map (signature_invalid and time rejects)."""

def signature_checks() -> int:
    """Signature verifications (RSA/EC/EdDSA/HMAC operations) this process has run: for tests
    and benchmarks, to show that a cached decision cost none."""

class Result:
    """The outcome of one verification. ``claims`` is set only when ``ok``.

    ``claims``, ``payload`` and ``header`` may be the very objects held by the verified-token
    cache and the header cache, shared by later results: treat them as read-only (copy before
    changing). Mutating them cannot change a later decision, only what later results show.
    """

    @property
    def ok(self) -> bool: ...
    @property
    def reason(self) -> Reason: ...
    @property
    def claims(self) -> dict[str, Any] | None: ...
    @property
    def header(self) -> dict[str, Any] | None:
        """The parsed JOSE header, when parsing got that far (unverified unless ok). For a
        reject from the negative cache it is decoded from the token on first access."""
    @property
    def payload(self) -> dict[str, Any] | None:
        """The parsed payload, when parsing got that far (unverified unless ok). For a
        reject from the negative cache it is decoded from the token on first access."""
    @property
    def detail(self) -> str:
        """A short fixed description of the check that decided (for logs and `fastgate verify`),
        e.g. "segment count", "base64url", "duplicate member", "alg none", "kid unknown",
        "signature", "exp", "cache hit", "cached reject", "ok". Never contains token bytes."""
    @property
    def kid(self) -> str | None:
        """The header ``kid`` when it is an acceptable string (set for key_not_found)."""
    @property
    def alg(self) -> str | None: ...
    @property
    def issuer(self) -> str | None:
        """The token's ``iss`` as read (unverified unless ok)."""
    @property
    def verifier(self) -> Verifier | None:
        """The verifier (provider) that decided, when an issuer was selected."""
    @property
    def cached(self) -> bool:
        """True when the decision came from the verified-token cache (ok, detail "cache hit")
        or from the negative cache (signature_invalid, token_expired or token_not_yet_valid,
        detail "cached reject"): no signature was verified for it."""

class KeyReport:
    """What :meth:`Verifier.set_jwks` did with a JWKS document."""

    @property
    def loaded(self) -> int: ...
    @property
    def skipped(self) -> list[tuple[str | None, str]]:
        """(kid, why) for every key that was not usable, e.g. ("k1", "rsa modulus < 2048 bits")."""
    @property
    def kids(self) -> frozenset[str]: ...

class TokenCache:
    """Bounded LRU of verified tokens, keyed by the token bytes; shareable between verifiers.

    Only ok results of tokens up to MAX_CACHED_TOKEN_BYTES are stored. A hit re-checks the
    time window (exp/nbf/iat with skew, and max_lifetime), that the key used is still in the
    verifier's key set, that the verifier is the one this Verifier / IssuerSet would pick, and
    the audiences in force; a failed re-check evicts the entry and verifies afresh.
    ``max_entries=0`` disables caching.

    A separate negative map remembers signature_invalid tokens (up to MAX_CACHED_TOKEN_BYTES)
    with the verifier and its key generation; it is consulted after a verified-token miss,
    before any decoding. A hit answers signature_invalid (detail "cached reject",
    ``cached=True``) only while this Verifier / IssuerSet would pick that verifier and its key
    set is unchanged (any set_jwks that changes the keys or their order invalidates it).
    Validly signed tokens rejected by the time window alone (token_expired by ``exp``,
    token_not_yet_valid by ``nbf``/``iat``; not ``max_lifetime``) are remembered the same way
    with the bound that decided: a hit re-checks it against ``now`` (exp + skew reached; nbf or
    iat still beyond now + skew and exp not reached) and otherwise falls through to a full
    verify, so a not-yet-valid token is accepted once its nbf passes.
    It never shares the LRU: a flood of distinct bad tokens cannot evict verified entries.
    ``negative_entries`` bounds it (default NEGATIVE_CACHE_ENTRIES, 0 when ``max_entries`` is
    0); when full it is cleared at once. ``len()`` counts verified entries only.
    """

    def __init__(self, max_entries: int = 100_000, *,
                 negative_entries: int | None = None) -> None: ...
    def __len__(self) -> int: ...
    def clear(self) -> None:
        """Empty both the verified-token LRU and the negative map."""
    @property
    def max_entries(self) -> int: ...
    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int:
        """Lookups that went on to a full verification (negative hits are not misses)."""
    @property
    def negative_entries(self) -> int:
        """The bound of the negative map (0: disabled)."""
    @property
    def negative_size(self) -> int: ...
    @property
    def negative_hits(self) -> int: ...

class Verifier:
    """Verifies JWTs of one issuer (one provider)."""

    def __init__(
        self,
        issuer: str,
        audiences: Iterable[str] | None = None,
        jwks: Mapping[str, Any] | None = None,
        secret: bytes | None = None,
        algorithms: Iterable[str] | None = None,
        clock_skew: float = 60,
        require: Iterable[str] = ("exp",),
        max_lifetime: float | None = None,
        cache_size: int = 100_000,
        *,
        cache: TokenCache | None = None,
        max_token_bytes: int = 8192,
        name: str | None = None,
        typ: Iterable[str] | None = None,
    ) -> None:
        """Raises ValueError for a configuration that cannot be safe (unknown alg, "none", empty
        algorithms, HS with jwks, mixed HS and asymmetric algs, secret shorter than the hash,
        jwks and secret both, negative skew, ...).

        ``algorithms`` defaults to every asymmetric alg (with ``jwks`` or no keys yet) or to
        the HS* algs whose hash fits ``secret``. ``audiences`` None or empty: aud is not
        matched (its type is still checked). ``cache``: share a TokenCache (``cache_size`` is
        then ignored); ``cache_size=0`` disables caching. With ``secret`` the header kid is not
        used: the secret is the only key.

        ``typ`` (RFC 9068 §4, RFC 8725 §3.11): the JOSE header ``typ`` values allowed; None
        (default) does not check typ. Compared as media types: case-insensitive, a value
        without '/' read as "application/" + value (RFC 7515 §4.1.9), so "at+jwt" also accepts
        "application/at+jwt" and "AT+JWT". A token whose typ is absent, not a string or not
        listed is token_type_invalid. ValueError for an empty list or a value that is not a
        media type."""
    def verify(self, token: str | bytes, now: float | None = None) -> Result:
        """Never raises. ``now`` (seconds since the epoch) defaults to CLOCK_REALTIME."""
    def set_jwks(self, jwks: Mapping[str, Any]) -> KeyReport:
        """Replace the key set. Raises ValueError if the document is not a JWKS (not an object
        with a ``keys`` array) or this verifier uses a secret; individual unusable keys are
        skipped and reported (oct keys, use enc, RSA < 2048 or > 8192 bits, an RSA modulus
        with the ROCA fingerprint (CVE-2017-15361), bad points, ...). A kid that appears twice
        in the document is ambiguous: every entry with it is dropped ("duplicate kid"), even
        when one copy is itself unusable (kids are counted before keys are validated).
        A document with no usable key is accepted and empties the key set.
        Keys whose material and binding are unchanged keep their prepared object (cached
        tokens stay warm); cached tokens of removed or changed keys stop hitting at once."""
    def has_kid(self, kid: str) -> bool: ...
    @property
    def name(self) -> str: ...
    @property
    def issuer(self) -> str: ...
    @property
    def audiences(self) -> frozenset[str]: ...
    @property
    def algorithms(self) -> frozenset[str]: ...
    @property
    def typ(self) -> frozenset[str] | None:
        """The allowed typ values as canonical media types ("application/at+jwt"), or None."""
    @property
    def has_keys(self) -> bool:
        """Usable keys now (or a secret). While False (never loaded, or emptied by set_jwks,
        e.g. a key source dropping its keys past max_stale) every token that reaches the key
        lookup gets jwks_unavailable (503), not key_not_found."""
    @property
    def key_count(self) -> int: ...
    @property
    def cache(self) -> TokenCache: ...

class IssuerSet:
    """Selects the verifier by the token's (unverified) ``iss`` and verifies with it.

    One per route: ``audiences``, when given, replaces every verifier's own audiences
    (SPEC §2 route ``auth.audiences``). Cached results are re-checked against this set's
    verifiers and audiences, so a token cached on one route never passes another route
    by way of the cache.
    """

    def __init__(
        self,
        verifiers: Iterable[Verifier],
        cache: TokenCache,
        audiences: Iterable[str] | None = None,
    ) -> None: ...
    def verify(self, token: str | bytes, now: float | None = None) -> Result: ...
    def verifier_for(self, issuer: str) -> Verifier | None: ...

class DpopResult:
    """The outcome of one DPoP proof check (RFC 9449 §4.3). ``jkt``, ``jti``, ``nonce`` and
    ``iat`` are set once the proof's signature verified (also for dpop_binding_mismatch)."""

    jkt: str | None
    jti: str | None
    nonce: str | None
    iat: float
    @property
    def ok(self) -> bool: ...
    @property
    def reason(self) -> Reason:
        """OK, dpop_proof_invalid or dpop_binding_mismatch."""
    @property
    def detail(self) -> str:
        """The check that decided ("proof typ", "proof htu", "proof signature", "cnf.jkt",
        ...); never proof bytes."""

class DpopRule:
    """One route's DPoP settings: the proof algorithms (asymmetric only), how old a proof's
    ``iat`` may be and how far in the future."""

    algs: str
    """The algorithms, space-separated (RFC 9449 §7.1's ``algs`` attribute)."""
    def __init__(self, algorithms: Iterable[str] | None = None, max_age: float = 60.0,
                 clock_skew: float = 5.0) -> None: ...
    @property
    def window(self) -> float:
        """Seconds a proof's jti must be remembered (max_age + clock_skew)."""
    def check(self, proof: str | bytes, method: str, htu: str, token: str,
              jkt: object, now: float | None = None) -> DpopResult:
        """RFC 9449 §4.3 for one request (checks 2-9, 11, 12 and the cnf.jkt binding; the
        single-header check, the nonce and the jti replay are the data plane's). ``jkt`` is
        the access token's ``cnf.jkt``. Never raises for a bad proof."""

def jwk_thumbprint(jwk: Mapping[str, Any]) -> str | None:
    """RFC 7638 SHA-256 thumbprint (base64url) of a public JWK; None if it lacks members."""

def access_token_hash(token: str | bytes) -> str:
    """RFC 9449 §4.2 ``ath``: base64url(SHA-256(access token))."""

def normalize_htu(uri: str) -> str | None:
    """An http(s) URI normalised per RFC 3986 §6.2.2-§6.2.3 without query and fragment;
    None when it is not one."""

def verify_jws(
    token: str | bytes,
    jwk_or_jwks: Mapping[str, Any],
    algorithms: Iterable[str] | None = None,
) -> Reason:
    """Format, alg/key binding and signature only (for test vectors whose payload is not a
    claim set). The payload is arbitrary octets, so an empty payload segment (``H..S``) is a
    valid JWS here (RFC 7515 §7.1); the JWT path refuses it. ``oct`` keys are accepted here
    because the caller hands the key in directly (one shorter than the hash is unusable), but
    a JWKS that mixes ``oct`` and asymmetric keys is refused as a whole (key_not_found for
    every token). A single JWK without ``kid`` is used whatever the token's kid; in a JWKS the
    kid must match. Never raises for a bad token; ValueError for a ``jwk_or_jwks`` that is not
    a JSON object or a bad ``algorithms``."""

def token_shape(token: str, max_chars: int) -> Reason: ...
