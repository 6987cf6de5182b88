"""OpenID Connect discovery for a ``discovery: true`` provider: where its JWKS is.

Discovery: ``{issuer}/.well-known/openid-configuration`` (a trailing ``/`` of the issuer is
removed first, OpenID Connect Discovery 1.0 §4); the document's ``issuer`` must equal the
configured issuer exactly (§4.3) and its ``jwks_uri`` must be http(s) (https when the issuer
is https). The document is fetched before the first JWKS fetch and again after
:data:`REDISCOVER_AFTER_FAILURES` consecutive failed fetches (the IdP may have moved its
keys); a failed re-discovery keeps the previously discovered ``jwks_uri``.

:class:`OidcDiscovery` is a mixin of :class:`fastgate.keys.jwks.RemoteKeySource`, which sets
the attributes it declares and decides when to discover.
"""

from __future__ import annotations

from fastgate.config import ProviderConfig
from fastgate.keys.fetch import JsonFetcher, _check_http_url
from fastgate.keys.source import FetchError, _safe, log

__all__ = ["REDISCOVER_AFTER_FAILURES", "OidcDiscovery", "discovery_url"]

REDISCOVER_AFTER_FAILURES = 2


def discovery_url(issuer: str) -> str:
    """OpenID Connect Discovery 1.0 §4: strip a terminating ``/``, append the well-known path."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


class OidcDiscovery(JsonFetcher):
    """The discovery document fetch of a remote key source (see the module doc)."""

    provider: ProviderConfig
    name: str
    discovery_url: str | None
    jwks_uri: str | None

    async def discover(self) -> None:
        """Fetch the discovery document and take its ``jwks_uri`` (issuer identical to the
        configured one, http(s), https for an https issuer). Raises :class:`FetchError` when
        there is no ``jwks_uri`` yet; a failed re-discovery keeps the one there is."""
        assert self.discovery_url is not None
        try:
            doc, _ = await self.get_json(self.discovery_url)
            if not isinstance(doc, dict):
                raise FetchError("discovery document is not a JSON object")
            issuer = doc.get("issuer")
            if issuer != self.provider.issuer:
                # OIDC Discovery 1.0 §4.3: the issuer MUST be identical to the one configured.
                raise FetchError(
                    f"discovery issuer mismatch: configured {_safe(self.provider.issuer, 100)}, "
                    f"discovered {_safe(issuer, 100)}")
            uri = doc.get("jwks_uri")
            if not isinstance(uri, str):
                raise FetchError("discovery document has no jwks_uri")
            try:
                _check_http_url(uri, "jwks_uri")
            except ValueError as exc:
                raise FetchError(f"discovery jwks_uri refused: {_safe(uri, 100)}") from exc
            if self.discovery_url.startswith("https:") and not uri.startswith("https:"):
                raise FetchError(f"discovery jwks_uri is not https: {_safe(uri, 100)}")
        except FetchError as exc:
            if self.jwks_uri is None:
                raise
            log.warning("jwks provider=%s: re-discovery failed (%s); keeping jwks_uri %s",
                        self.name, exc, _safe(self.jwks_uri))
            return
        if uri != self.jwks_uri:
            log.info("jwks provider=%s: discovered jwks_uri %s", self.name, _safe(uri))
            self.jwks_uri = uri
