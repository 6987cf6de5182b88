"""The token issuers and API keys: ``providers`` (issuer, one key source -- discovery,
jwks_uri, jwks_file, inline jwks or a secret --, algorithms, audiences, lifetimes, typ, the
JWKS cache, where the token is read from) and ``api_keys``.

`ProviderSections` adds their readers to the walker. The algorithm checks are where key
confusion is refused (RFC 8725 §3.1: HMAC only with a secret, never beside asymmetric keys).
May import: `fastgate.config.model`, `.syntax`, `.collector`; `fastgate.token._verify` lazily
(its list of supported algorithms).
"""

from __future__ import annotations

import re
from typing import Any, cast
from urllib.parse import urlsplit

from fastgate.config.collector import Collector
from fastgate.config.model import (
    DEFAULT_TOKEN_FROM,
    ApiKey,
    ApiKeysConfig,
    JwksCacheConfig,
    KeySourceKind,
    ProviderConfig,
    TokenPlace,
    TokenSource,
    _field_names,
)
from fastgate.config.syntax import (
    _NONE,
    _TOKEN_RE,
    _did_you_mean,
    _header_key,
    _is_loopback,
    _kind,
    _secs,
)

__all__ = ["ProviderSections"]

_KEY_SOURCES = ("discovery", "jwks_uri", "jwks_file", "jwks", "secret")
# RFC 7518 §3.2: an HMAC key must be at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MAX_CLOCK_SKEW = 300.0  # more than 5 minutes of leeway is almost certainly a unit mistake
# RFC 6838 §4.2 restricted-name type "/" subtype, as lower-case ASCII.
_TYP_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}")
_PROVIDER_KEYS = ("issuer", *_KEY_SOURCES, "audiences", "algorithms", "clock_skew", "require",
                  "max_lifetime", "typ", "jwks_cache", "token_from")


class ProviderSections(Collector):
    """Readers of the providers (and their key sources) and of the API keys."""

    def fetch_url(self, url: str, path: str) -> None:
        """A URL fastgate fetches keys from (jwks_uri, discovery issuer)."""
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            self.err(path, f"invalid port in {url!r}")
            return
        # Catalog H13: keys must come over TLS, else anyone on the path can swap them. Plain
        # http is allowed only to loopback, for tests and `fastgate demo`.
        if not parts.hostname or parts.scheme not in ("https", "http") or parts.fragment:
            self.err(path, f"must be an absolute https:// URL without a fragment, got {url!r}")
        elif parts.scheme == "http" and not _is_loopback(parts.hostname):
            self.err(path, "must use https (http is allowed only for 127.0.0.1, ::1 and "
                           "localhost)")

    def provider(self, name: str, value: Any, path: str) -> ProviderConfig | None:
        m = self.mapping(value, path, _PROVIDER_KEYS, required=("issuer",))
        if m is None:
            return None
        issuer = self.string(m["issuer"], f"{path}.issuer") if "issuer" in m else None
        discovery = self.opt(m, "discovery", path, False, self.boolean)
        given = [k for k in _KEY_SOURCES if (discovery if k == "discovery" else k in m)]
        if len(given) != 1:
            self.err(path, "exactly one key source is required (discovery: true, jwks_uri, "
                     "jwks_file, jwks or secret); "
                     + (f"got {', '.join(given)}" if given else "none given"))
        kind = cast(KeySourceKind, given[0] if given else "jwks")
        if discovery and issuer:
            self.fetch_url(issuer, f"{path}.issuer")
        jwks_uri = self.opt(m, "jwks_uri", path, None, self.string)
        if jwks_uri:
            self.fetch_url(jwks_uri, f"{path}.jwks_uri")
        jwks_file = self.opt(m, "jwks_file", path, None, self.jwks_file)
        jwks = self.opt(m, "jwks", path, None, self.inline_jwks)
        secret_text = self.opt(m, "secret", path, None, self.string)
        secret = secret_text.encode() if secret_text is not None else None
        algorithms = self.opt(m, "algorithms", path, None, self.algorithms)
        self.check_algorithms(kind, algorithms, secret, path, given)
        audiences = self.opt(m, "audiences", path, _NONE, self.names, what="audience")
        jwks_cache = self.opt(m, "jwks_cache", path, JwksCacheConfig(), self.jwks_cache)
        max_lifetime = None
        if m.get("max_lifetime") is not None:
            max_lifetime = self.duration(m["max_lifetime"], f"{path}.max_lifetime", positive=True)
        typ = self.opt(m, "typ", path, None, self.typ_values)
        return ProviderConfig(
            name=name, issuer=issuer or "", key_source=kind, jwks_uri=jwks_uri,
            jwks_file=jwks_file, jwks=jwks, secret=secret, audiences=audiences,
            algorithms=algorithms,
            clock_skew=self.opt(m, "clock_skew", path, 60.0, self.duration, hi=_MAX_CLOCK_SKEW),
            require=self.opt(m, "require", path, ("exp",), self.names, allow_empty=True,
                             what="claim name"),
            max_lifetime=max_lifetime, typ=typ, jwks_cache=jwks_cache,
            token_from=self.opt(m, "token_from", path, DEFAULT_TOKEN_FROM, self.token_from),
        )

    def typ_values(self, value: Any, path: str) -> tuple[str, ...] | None:
        """``providers.*.typ``: media types (RFC 6838 §4.2), "application/" optional and
        case-insensitive (RFC 7515 §4.1.9); two spellings of one type are a duplicate."""
        values = self.names(value, path, what="typ")
        if values is None:
            return None
        seen: dict[str, str] = {}
        bad = False
        for i, item in enumerate(values):
            low = item.lower()
            full = low if "/" in low else f"application/{low}"
            if not _TYP_RE.fullmatch(full):
                self.err(f"{path}[{i}]", f"invalid typ {item!r}: a media type such as 'at+jwt' "
                         "or 'application/at+jwt' (RFC 9068 §2.1)")
                bad = True
            elif full in seen and seen[full] != item:
                self.err(f"{path}[{i}]", f"duplicate typ {item!r} (the same type as "
                         f"{seen[full]!r}: case and the 'application/' prefix do not count)")
                bad = True
            seen.setdefault(full, item)
        return None if bad or not values else values

    def jwks_file(self, value: Any, path: str) -> str | None:
        return self.readable_file(value, path)[0]

    def inline_jwks(self, value: Any, path: str) -> dict[str, Any] | None:
        m = self.mapping(value, path, None, required=("keys",))
        if m is None or not isinstance(keys := m.get("keys"), list):
            if m is not None and "keys" in m:
                self.err(f"{path}.keys", f"must be a list, got {_kind(m['keys'])}")
            return None
        for i, key in enumerate(keys):
            if not isinstance(key, dict):
                self.err(f"{path}.keys[{i}]", f"must be a mapping (a JWK), got {_kind(key)}")
        return m

    def algorithms(self, value: Any, path: str) -> tuple[str, ...] | None:
        from fastgate.token._verify import SUPPORTED_ALGORITHMS  # lazy: the compiled module

        algs = self.names(value, path, what="algorithm")
        bad = False
        for i, alg in enumerate(algs or ()):
            if alg.lower() == "none":  # RFC 8725 §3.1: never accept unsigned tokens
                self.err(f"{path}[{i}]", "'none' is never allowed")
            elif alg not in SUPPORTED_ALGORITHMS:
                self.err(f"{path}[{i}]", f"unsupported algorithm {alg!r}"
                         + _did_you_mean(alg, sorted(SUPPORTED_ALGORITHMS)))
            else:
                continue
            bad = True
        return None if bad else algs

    def check_algorithms(self, kind: KeySourceKind, algorithms: tuple[str, ...] | None,
                         secret: bytes | None, path: str, given: list[str]) -> None:
        hmac = [a for a in algorithms or () if a in _HMAC_MIN_BYTES]
        asym = [a for a in algorithms or () if a not in _HMAC_MIN_BYTES]
        # RFC 8725 §3.1 / catalog B3: HMAC only with a configured secret, never beside
        # asymmetric algs (that is the key-confusion attack).
        if kind == "secret" and asym:
            self.err(f"{path}.algorithms", f"{', '.join(asym)} cannot be used with a secret "
                                           "(a secret allows HS256, HS384, HS512 only)")
        elif kind != "secret" and hmac and given:
            self.err(f"{path}.algorithms", f"{', '.join(hmac)} allowed only with a `secret` "
                                           "key source")
        if kind == "secret" and secret is not None:
            needed = max(hmac or ["HS256"], key=_HMAC_MIN_BYTES.__getitem__)
            if len(secret) < _HMAC_MIN_BYTES[needed]:
                self.err(f"{path}.secret", f"secret is {len(secret)} bytes; {needed} needs at "
                         f"least {_HMAC_MIN_BYTES[needed]} bytes (RFC 7518 §3.2)")

    def jwks_cache(self, value: Any, path: str) -> JwksCacheConfig | None:
        m = self.mapping(value, path, _field_names(JwksCacheConfig))
        if m is None:
            return None
        d = JwksCacheConfig()
        ttl, refresh, timeout = (self.opt(m, k, path, getattr(d, k), self.duration, positive=True)
                                 for k in ("ttl", "min_refresh_interval", "timeout"))
        max_stale = self.opt(m, "max_stale", path, d.max_stale, self.duration)
        min_ttl = self.opt(m, "min_ttl", path, min(d.min_ttl, ttl), self.duration, positive=True)
        if min_ttl > ttl:
            self.err(f"{path}.min_ttl", f"must not exceed ttl ({_secs(ttl)})")
        if ttl < refresh:
            self.err(f"{path}.ttl", f"must be at least min_refresh_interval ({_secs(refresh)})")
        if max_stale < ttl:
            self.err(f"{path}.max_stale", f"must be at least ttl ({_secs(ttl)})")
        max_bytes = self.opt(m, "max_bytes", path, d.max_bytes, self.integer, lo=1)
        return JwksCacheConfig(ttl, min_ttl, refresh, max_stale, timeout, max_bytes)

    def token_from(self, value: Any, path: str) -> tuple[TokenSource, ...] | None:
        if not isinstance(value, list) or not value:
            self.err(path, "must be a non-empty list" + (
                "" if isinstance(value, list) else f", got {_kind(value)}"))
            return None
        out: list[TokenSource] = []
        for i, raw in enumerate(value):
            p = f"{path}[{i}]"
            m = self.mapping(raw, p, ("header", "prefix", "query", "cookie"))
            if m is None:
                continue
            places = [k for k in ("header", "query", "cookie") if k in m]
            if len(places) != 1:
                self.err(p, "exactly one of header, query or cookie is required; got "
                         + (", ".join(places) or "none"))
                continue
            place: TokenPlace = places[0]
            name = self.string(m[place], f"{p}.{place}")
            if name and place != "query" and not _TOKEN_RE.fullmatch(name):
                self.err(f"{p}.{place}", f"invalid {place} name {name!r}")
            if "prefix" in m and place != "header":
                self.err(f"{p}.prefix", "prefix applies to a header only")
            prefix = self.opt(m, "prefix", p, "", self.string, empty=True)
            source = TokenSource(place, name or "", prefix)
            fold = _header_key if place == "header" else str
            if any(s.place == place and fold(s.name) == fold(source.name) for s in out):
                self.err(p, f"duplicate token source {place} {source.name!r}")
            out.append(source)
        return tuple(out)

    def api_keys(self, value: Any, path: str) -> ApiKeysConfig | None:
        m = self.mapping(value, path, ("header", "query", "keys"), required=("keys",))
        if m is None:
            return None
        header = self.opt(m, "header", path, None, self.string)
        if header and not _TOKEN_RE.fullmatch(header):
            self.err(f"{path}.header", f"invalid header name {header!r}")
        query = self.opt(m, "query", path, None, self.string)
        if "header" not in m and "query" not in m:
            self.err(path, "needs header and/or query (where clients send the key)")
        keys: list[ApiKey] = []
        ids: dict[str, int] = {}
        digests: dict[bytes, int] = {}
        raw_keys = m.get("keys", [])
        if "keys" in m and (not isinstance(raw_keys, list) or not raw_keys):
            self.err(f"{path}.keys", "must be a non-empty list")
            raw_keys = []
        for i, raw in enumerate(raw_keys):
            p = f"{path}.keys[{i}]"
            k = self.mapping(raw, p, ("id", "sha256", "client_id"), required=("id", "sha256"))
            if k is None:
                continue
            key_id = self.opt(k, "id", p, "", self.string)
            if key_id in ids:
                self.err(f"{p}.id", f"duplicate key id {key_id!r} (also keys[{ids[key_id]}])")
            ids.setdefault(key_id, i)
            digest = self.opt(k, "sha256", p, "", self.string)
            if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
                if "sha256" in k:
                    self.err(f"{p}.sha256", "must be 64 hex characters (a SHA-256 digest)")
                continue
            sha = bytes.fromhex(digest)
            if sha in digests:
                self.err(f"{p}.sha256", f"same key as keys[{digests[sha]}]")
            digests.setdefault(sha, i)
            keys.append(ApiKey(key_id, sha, self.opt(k, "client_id", p, None, self.string)))
        return ApiKeysConfig(header, query, tuple(keys))
