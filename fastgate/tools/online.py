"""``fastgate check --online``: what ``check`` cannot see from the file alone (SPEC §8).

For every provider: the discovery document (its ``issuer`` must be identical to the configured
one, OpenID Connect Discovery 1.0 §4.3 — a trailing ``/`` is the classic mismatch) and the JWKS
with its usable and skipped keys and why; for every upstream: a TCP connect and, for https://,
the TLS handshake with the same verification the gateway uses. One :class:`Item` per check.

Nothing here re-implements fetching or key validation: the discovery and JWKS exchanges are
those of :class:`fastgate.keys.jwks.RemoteKeySource` (same limits: no redirects, ``max_bytes``,
``timeout``, no Content-Encoding), keys are judged by the compiled verifier's ``set_jwks``
through the source's own probe, and upstream connections are opened by
:class:`fastgate.dataplane.upstream.UpstreamPool` (so a TLS upstream is verified exactly as in
service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from fastgate import Verifier
from fastgate.config import GatewayConfig, ProviderConfig, UpstreamConfig
from fastgate.dataplane.upstream import UpstreamError, UpstreamPool
from fastgate.keys.jwks import (
    FetchError,
    FileKeySource,
    RemoteKeySource,
    discovery_url,
)

__all__ = ["Item", "check_online", "render"]

_MAX_KIDS_SHOWN = 8


@dataclass(frozen=True, slots=True)
class Item:
    """One checked thing: ``what`` (e.g. ``providers.okta discovery``), ok, one-line detail."""

    what: str
    ok: bool
    detail: str


def render(items: list[Item]) -> str:
    """A table: one line per item, ``OK`` or ``FAIL`` first."""
    width = max((len(i.what) for i in items), default=0)
    return "\n".join(f"{'OK  ' if i.ok else 'FAIL'}  {i.what:<{width}}  {i.detail}"
                     for i in items)


async def check_online(config: GatewayConfig) -> list[Item]:
    """Every provider's keys and every upstream's reachability, checked concurrently."""
    with _quiet("fastgate.jwks"), _quiet("fastgate.upstream"):
        provider_checks = [_provider(p) for p in config.providers.values()]
        upstream_checks = [_upstream(u) for u in config.upstreams.values()]
        results = await asyncio.gather(*provider_checks, *upstream_checks)
    return [item for group in results for item in group]


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """The key source and pool log what they skip or refuse; here the items say it once."""
    logger = logging.getLogger(name)
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def _where(p: ProviderConfig) -> str:
    return f"providers.{p.name}"


def _keys_detail(report: Any) -> tuple[bool, str]:
    """(usable, text) from a :class:`fastgate.KeyReport`."""
    kids = sorted(report.kids)
    shown = ", ".join(kids[:_MAX_KIDS_SHOWN]) + (", ..." if len(kids) > _MAX_KIDS_SHOWN else "")
    text = f"{report.loaded} usable key{'s' if report.loaded != 1 else ''}"
    if kids:
        text += f" (kid {shown})"
    if report.skipped:
        why = "; ".join(f"kid {kid if kid is not None else '(none)'}: {reason}"
                        for kid, reason in report.skipped)
        text += f", {len(report.skipped)} skipped ({why})"
    if report.loaded == 0:
        text += ": no usable key, every request would get jwks_unavailable"
    return report.loaded > 0, text


def _verifier(p: ProviderConfig) -> Verifier:
    return Verifier(p.issuer, algorithms=list(p.algorithms) if p.algorithms else None,
                    cache_size=1, name=f"{p.name}-online")


def _issuer_hint(configured: str, detail: str) -> str:
    """The trailing-slash case told in so many words: tokens carry the issuer byte for byte
    (RFC 7519 §4.1.1 ``iss`` is a case-sensitive StringOrURI), so both must be identical."""
    other = configured.rstrip("/") if configured.endswith("/") else configured + "/"
    if detail.endswith(f"discovered {other}"):
        return (f"{detail} (they differ only by a trailing '/': set issuer to {other!r}, "
                "exactly as the provider's tokens carry it in iss)")
    return detail


async def _provider(p: ProviderConfig) -> list[Item]:
    where = _where(p)
    kind = p.key_source
    if kind == "secret":
        return [Item(f"{where} secret", True, "shared secret (HS*): nothing to fetch")]
    if kind == "jwks":
        report = _verifier(p).set_jwks(p.jwks or {"keys": []})
        ok, text = _keys_detail(report)
        return [Item(f"{where} jwks (inline)", ok, text)]
    if kind == "jwks_file":
        return [_file(p)]
    return await _remote(p)


def _file(p: ProviderConfig) -> Item:
    path = p.jwks_file or ""
    what = f"{_where(p)} jwks_file {path}"
    source = FileKeySource(p, _verifier(p), path=path)
    error = source.reload()  # the gateway's own read: max_bytes, JSON, usable keys
    if error is not None:
        return Item(what, False, error)
    try:
        with open(path, "rb") as fh:
            doc = orjson.loads(fh.read(p.jwks_cache.max_bytes + 1))
        _, text = _keys_detail(source.probe(doc))
    except (OSError, ValueError) as exc:  # changed between the two reads
        return Item(what, False, f"cannot read: {exc}")
    return Item(what, True, text)


async def _remote(p: ProviderConfig) -> list[Item]:
    where = _where(p)
    items: list[Item] = []
    verifier = _verifier(p)
    async with aiohttp.ClientSession(
            auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        if p.key_source == "discovery":
            url = discovery_url(p.issuer)
            source = RemoteKeySource(p, verifier, discovery=url, session=session)
            what = f"{where} discovery {url}"
            error = await _exchange(source.discover(), p.jwks_cache.timeout)
            if error is not None:
                return [Item(what, False, _issuer_hint(p.issuer, error))]
            items.append(Item(what, True, f"issuer matches {p.issuer!r}; jwks_uri "
                                          f"{source.jwks_uri}"))
        else:
            source = RemoteKeySource(p, verifier, jwks_uri=p.jwks_uri, session=session)
        jwks_uri = source.jwks_uri or ""
        what = f"{where} jwks {jwks_uri}"
        got: dict[str, Any] = {}

        async def fetch() -> None:
            doc, _ = await source.get_json(jwks_uri)
            with contextlib.suppress(ValueError, TypeError):  # not a JWKS: apply says so
                got["report"] = source.probe(doc)  # every key's verdict, usable or not
            source.apply(doc, "online check")  # the gateway's own acceptance rules

        error = await _exchange(fetch(), p.jwks_cache.timeout)
        if "report" in got:
            ok, text = _keys_detail(got["report"])
            items.append(Item(what, error is None and ok,
                              text if error is None or not ok else f"{error}; {text}"))
        else:
            items.append(Item(what, False, error or "no answer"))
    return items


async def _exchange(coro: Any, timeout: float) -> str | None:
    """Run one fetch under the provider's ``jwks_cache.timeout``; None or the error, mapped as
    the key source maps it for its logs."""
    try:
        async with asyncio.timeout(timeout):
            await coro
    except FetchError as exc:
        return str(exc)
    except TimeoutError:
        return f"timeout after {timeout:g}s"
    except aiohttp.ClientError as exc:
        return f"connection error: {type(exc).__name__}: {exc}"
    except OSError as exc:
        return f"connection error: {exc}"
    return None


async def _upstream(u: UpstreamConfig) -> list[Item]:
    scheme = "TLS handshake" if u.url.startswith("https://") else "TCP connect"
    what = f"upstreams.{u.name} {u.url}"
    try:
        pool = UpstreamPool(u)
    except ValueError as exc:
        return [Item(what, False, str(exc))]
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        conn = await pool.acquire(fresh=True)  # the gateway's own connect (and TLS) path
        elapsed = loop.time() - started
        pool.release(conn)
    except UpstreamError as exc:
        return [Item(what, False, str(exc))]
    finally:
        await pool.close()
    return [Item(what, True, f"{scheme} OK in {elapsed * 1000:.0f} ms")]
