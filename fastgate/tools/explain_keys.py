"""The keys behind an explanation: loading a route's key sources once, describing a key.

`fastgate verify` starts the route's providers' key sources (inline and file keys are loaded,
remote JWKS / discovery sources fetched once, bounded by :data:`MAX_FETCH_WAIT`) and names the
key that decided (:class:`fastgate.tools.explanation.KeyInfo`: kid, alg, kty and the RFC 7638
:func:`thumbprint`). ``fastgate.tools.explain`` uses these and re-exports the public names.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from fastgate.config import GatewayConfig, ProviderConfig
from fastgate.keys.jwks import KeySourceBase
from fastgate.token._verify import Result, verify_jws
from fastgate.token.reasons import Reason
from fastgate.tools.explanation import KeyInfo

__all__ = ["MAX_FETCH_WAIT", "thumbprint"]

#: Longest wait for a remote key source's first fetch (its own ``jwks_cache.timeout`` bounds
#: each attempt; this bounds the whole wait when the configured timeout is larger).
MAX_FETCH_WAIT = 30.0

# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"),
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "oct": ("k", "kty"),
}


async def _load_keys(config: GatewayConfig, sources: Mapping[str, Any],
                     notes: list[str]) -> list[Any]:
    """Start the route's key sources; wait for each remote one's first fetch to finish."""
    started: list[Any] = []
    for name, source in sources.items():
        try:
            await source.start()
        except Exception as exc:  # KeySourceError: a bad jwks_file, no usable static key
            notes.append(f"provider {name}: keys could not be loaded: {exc}")
            continue
        started.append(source)
    waits = []
    for name, source in sources.items():
        if source in started and not source.ready:
            timeout = min(MAX_FETCH_WAIT, config.providers[name].jwks_cache.timeout + 1.0)
            waits.append(_first_fetch(source, timeout))
    if waits:
        await asyncio.gather(*waits)
    for name, source in sources.items():
        if not source.ready:
            state = getattr(source, "state", None)
            error = getattr(state, "last_error", None)
            where = getattr(state, "location", None)
            if error:
                notes.append(f"provider {name}: no usable keys from {where}: {error}")
    return started


async def _first_fetch(source: Any, timeout: float) -> None:
    """Until the source has keys or its first fetch attempt ended (success or not)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not source.ready and loop.time() < deadline:
        state = getattr(source, "state", None)
        if state is not None and state.fetches > 0:
            return
        await asyncio.sleep(0.02)


def _key_document(provider: ProviderConfig, source: Any) -> list[dict[str, Any]]:
    """The JWKS ``keys`` in use, to describe the key that decided (best effort)."""
    keys: Any = None
    if provider.key_source == "jwks" and provider.jwks is not None:
        keys = provider.jwks.get("keys")
    elif provider.key_source == "jwks_file" and provider.jwks_file:
        with contextlib.suppress(OSError, orjson.JSONDecodeError, AttributeError):
            keys = orjson.loads(Path(provider.jwks_file).read_bytes()).get("keys")
    elif isinstance(source, KeySourceBase):
        # Remote sources keep the last applied document's keys.
        keys = source.applied_keys
    if not isinstance(keys, list | tuple):
        return []
    return [k for k in keys if isinstance(k, dict)]


def thumbprint(jwk: Mapping[str, Any]) -> str | None:
    """RFC 7638 JWK thumbprint (SHA-256, base64url), or None for an unknown kty."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        return None
    canonical = orjson.dumps({m: jwk[m] for m in members}, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _key_info(provider: ProviderConfig, source: Any, result: Result,
              token: str) -> KeyInfo:
    kid, alg = result.kid, result.alg
    kty: str | None = None
    print_: str | None = None
    if provider.key_source == "secret":
        kty = "oct"
    else:
        keys = _key_document(provider, source)
        match: dict[str, Any] | None = None
        if kid is not None:
            same = [k for k in keys if k.get("kid") == kid]
            match = same[0] if len(same) == 1 else None
        elif result.ok and alg is not None:
            # No kid: the verifier tried the keys that fit the alg; find the one that verifies.
            for k in keys:
                with contextlib.suppress(ValueError):
                    if verify_jws(token, k, [alg]) is Reason.OK:
                        match = k
                        break
        if match is not None:
            kty = str(match.get("kty")) if match.get("kty") is not None else None
            print_ = thumbprint(match)
    state = getattr(source, "state", None)
    return KeyInfo(provider=provider.name, kid=kid, alg=alg, kty=kty, thumbprint=print_,
                   source=provider.key_source, location=getattr(state, "location", None))


def _kids(provider: ProviderConfig, source: Any) -> list[str]:
    return [str(k["kid"]) for k in _key_document(provider, source) if "kid" in k]
