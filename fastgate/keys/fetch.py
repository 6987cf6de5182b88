"""One HTTP fetch of a remote key source (a JWKS or a discovery document) and the TTL of
what it got.

Fetch rules (security catalog H2-H5, H13), :meth:`JsonFetcher.get_json`:

- no redirects (a 3xx is a failed fetch), a total ``timeout`` over the whole exchange
  (discovery + JWKS, headers and body: a trickling server cannot hold a fetch open), a
  ``max_bytes`` cap enforced on the announced ``Content-Length`` and while reading;
  ``Accept-Encoding: identity`` is sent and any other ``Content-Encoding`` is refused, so a
  compression bomb never gets decompressed.
- TTL (:func:`ttl_from_cache_control`): ``Cache-Control: max-age`` clamped to
  ``[jwks_cache.min_ttl, jwks_cache.ttl]``; ``no-store``/``no-cache`` mean ``min_ttl``; no
  header means ``ttl``.

:class:`JsonFetcher` is a mixin of :class:`fastgate.keys.jwks.RemoteKeySource`, which sets the
attributes it declares.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import yarl

from fastgate.config import JwksCacheConfig
from fastgate.keys.source import FetchError, _safe

__all__ = ["JsonFetcher", "SessionFactory", "ttl_from_cache_control"]

SessionFactory = Callable[[], aiohttp.ClientSession]

_USER_AGENT = "fastgate-jwks/0.1"


def ttl_from_cache_control(value: str | None, cfg: JwksCacheConfig) -> float:
    """The key-set TTL from a ``Cache-Control`` value, clamped to the configured bounds.

    RFC 9111 §5.2.2.1 (max-age), §5.2.2.4/5 (no-cache/no-store: revalidate as soon as we may).
    """
    low, high = min(cfg.min_ttl, cfg.ttl), cfg.ttl
    if not value:
        return high
    lowered = value.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return low
    match = _MAX_AGE.search(lowered)
    if match is None:
        return high
    return min(high, max(low, float(int(match.group(1)))))


_MAX_AGE = re.compile(r'(?:^|[,\s])max-age\s*=\s*"?(\d{1,12})"?')


def _check_http_url(url: str, what: str) -> str:
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not a URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{what}: must be an absolute http(s) URL")
    return url


class JsonFetcher:
    """The HTTP client side of a remote key source: its session and one GET under the fetch
    rules (see the module doc)."""

    cfg: JwksCacheConfig
    _session: aiohttp.ClientSession | None
    _session_factory: SessionFactory | None
    _own_session: aiohttp.ClientSession | None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is not None:
            return self._session
        if self._own_session is None or self._own_session.closed:
            if self._session_factory is not None:
                self._own_session = self._session_factory()
            else:
                self._own_session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=4),
                    auto_decompress=False,  # we refuse Content-Encoding anyway (bombs)
                    trust_env=False,
                    cookie_jar=aiohttp.DummyCookieJar(),
                    headers={"User-Agent": _USER_AGENT},
                )
        return self._own_session

    async def get_json(self, url: str) -> tuple[Any, str | None]:
        """GET ``url`` under the fetch rules (no redirects, ``max_bytes``, identity encoding)
        and parse it: (the JSON value, the ``Cache-Control`` header or None). Raises
        :class:`FetchError`, or the aiohttp, OS and timeout errors the caller maps (the
        request's own total timeout is ``jwks_cache.timeout``)."""
        session = self._get_session()
        max_bytes = self.cfg.max_bytes
        async with session.get(
            url,
            allow_redirects=False,  # catalog H13: a redirect is a failed fetch
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
            headers={"Accept": "application/jwk-set+json, application/json",
                     "Accept-Encoding": "identity"},
        ) as resp:
            if 300 <= resp.status < 400:
                raise FetchError(f"redirect refused (http {resp.status})")
            if resp.status != 200:
                raise FetchError(f"http {resp.status}")
            encoding = resp.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in ("", "identity"):
                raise FetchError(f"content-encoding {_safe(encoding, 30)} refused")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise FetchError(f"body exceeds max_bytes ({resp.content_length} > {max_bytes})")
            body = bytearray()
            async for chunk in resp.content.iter_any():
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(f"body exceeds max_bytes ({max_bytes})")
            cache_control = ", ".join(resp.headers.getall("Cache-Control", ())) or None
        try:
            return orjson.loads(body), cache_control
        except orjson.JSONDecodeError as exc:
            raise FetchError("body is not JSON") from exc
