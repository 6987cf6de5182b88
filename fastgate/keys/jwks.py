"""Key sources: where each provider's verification keys come from, and how they stay fresh.

One key source per provider (SPEC §2 ``providers``, §5 keys), built by :func:`build_key_source`:

- :class:`StaticKeySource` - inline ``jwks`` or an HS ``secret``: the verifier was built with
  them; ready at once; nothing to refresh (:mod:`fastgate.keys.static`).
- :class:`FileKeySource` - ``jwks_file``: loaded by ``start()`` (a bad file at start raises
  :class:`KeySourceError`), then the file's (device, inode, size, mtime) is polled about once
  a second (no inotify dependency) and the file is reloaded when it changes. A bad new file
  keeps the old keys and counts as a failed fetch. Write the file with an atomic rename
  (:mod:`fastgate.keys.filekeys`).
- :class:`RemoteKeySource` - ``jwks_uri`` or ``discovery: true``: fetched in the background
  with an aiohttp client session, never on the request path except a cold start
  (:meth:`KeySource.wait_ready`) and an unknown ``kid`` (:meth:`KeySource.refresh_for_kid`).
  This module: the refresh schedule, backoff, ``max_stale`` and the kid-miss budget.

Where the rest lives (every name is re-exported here, the import path of the gateway, the
tools and the tests):

- :mod:`fastgate.keys.source` - the :class:`KeySource` contract and :class:`KeySourceBase`: key
  set acceptance (not a JWKS, more than :data:`MAX_JWKS_KEYS` keys, zero usable keys), key
  rotation, readiness, the ``fastgate_jwks_*`` hooks (:class:`JwksMetrics`).
- :mod:`fastgate.keys.fetch` - one HTTP fetch under the fetch rules (no redirects, total
  ``timeout``, ``max_bytes``, identity encoding) and :func:`ttl_from_cache_control`.
- :mod:`fastgate.keys.discovery` - OIDC discovery (:func:`discovery_url`, the document's checks,
  re-discovery after :data:`~fastgate.keys.discovery.REDISCOVER_AFTER_FAILURES` failures).

Remote refresh rules (security catalog H1, H3):

- TTL: the next refresh runs at 75-85 % of the TTL (jitter spreads workers and gateways apart).
- Failure: retried with exponential backoff starting at ``min_refresh_interval`` (doubling,
  capped at ``ttl``) while good keys exist; during a cold start (no keys yet) the backoff
  starts at ``min(1 s, min_refresh_interval)`` and is capped at ``min_refresh_interval`` so the
  provider recovers quickly once the IdP answers.
- Stale: the last good keys stay in use for ``max_stale`` after the last successful fetch.
  Past that, the key set is dropped (the verifier gets an empty JWKS), the provider is no
  longer ready and answers ``jwks_unavailable`` (503) until a fetch succeeds again.

Unknown ``kid`` (catalog H1): :meth:`RemoteKeySource.refresh_for_kid` starts at most one fetch
per ``min_refresh_interval`` per provider. The budget counts kid-triggered fetches only: the
first fetch at start-up and the scheduled refreshes do not use it up, so a key published just
before a token signed with it arrives (right after start-up or a scheduled refresh) still gets
its one refetch; a miss while any fetch is in flight joins that fetch instead of starting one.
Concurrent misses share the one fetch in flight (single-flight) and wait for it at most
:data:`KID_REFRESH_WAIT` seconds; a kid still missing after a successful fetch is remembered
(at most :data:`NEGATIVE_KIDS_MAX` kids, each for ``NEGATIVE_KID_TTL_INTERVALS *
min_refresh_interval`` or until the key set changes) and answered without any fetch. A flood
of random kids therefore costs the IdP at most one request per interval.

Workers (``workers > 1``): remote sources run in the master only, once per host
(fastgate/keys/sharedkeys.py): it pushes every key set it installs or drops to the workers, whose
:class:`~fastgate.keys.sharedkeys.SharedKeySource` installs them and sends unknown kids to the
master's :meth:`RemoteKeySource.refresh_for_kid` (one budget, one single-flight and one
negative cache for the host). Static and file sources run in every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

import aiohttp

from fastgate.config import ProviderConfig
from fastgate.keys.discovery import REDISCOVER_AFTER_FAILURES, OidcDiscovery, discovery_url
from fastgate.keys.fetch import SessionFactory, _check_http_url, ttl_from_cache_control
from fastgate.keys.filekeys import FileKeySource
from fastgate.keys.source import (
    MAX_JWKS_KEYS,
    Clock,
    FetchError,
    JwksMetrics,
    KeySource,
    KeySourceBase,
    KeySourceError,
    KeySourceState,
    _safe,
    log,
)
from fastgate.keys.source import MAX_KID_LENGTH as MAX_KID_LENGTH  # (sharedkeys imports it here)
from fastgate.keys.static import StaticKeySource
from fastgate.tasks import cancel_and_wait
from fastgate.token._verify import Verifier

__all__ = [
    "KID_REFRESH_WAIT",
    "MAX_JWKS_KEYS",
    "FetchError",
    "FileKeySource",
    "JwksMetrics",
    "KeySource",
    "KeySourceBase",
    "KeySourceError",
    "KeySourceState",
    "RemoteKeySource",
    "StaticKeySource",
    "build_key_source",
    "discovery_url",
    "ttl_from_cache_control",
]

KID_REFRESH_WAIT = 1.0
"""Longest a request waits on an unknown-kid fetch (capped by the fetch ``timeout``)."""
NEGATIVE_KIDS_MAX = 1024
NEGATIVE_KID_TTL_INTERVALS = 10
METRICS_AGE_INTERVAL = 5.0
COLD_RETRY_BASE = 1.0
_REFRESH_AT = (0.75, 0.85)  # fraction of the TTL at which the background refresh runs
_MIN_DELAY = 0.01


# ---------------------------------------------------------------------------------------------
# Remote: jwks_uri / discovery
# ---------------------------------------------------------------------------------------------


class RemoteKeySource(OidcDiscovery, KeySourceBase):
    """``jwks_uri`` or OIDC discovery, refreshed in the background (see the module doc).

    The discovery document (:meth:`discover`) and the HTTP exchange (:meth:`get_json`) are the
    mixins' of :mod:`fastgate.keys.discovery` and :mod:`fastgate.keys.fetch`."""

    def __init__(
        self,
        provider: ProviderConfig,
        verifier: Verifier,
        *,
        jwks_uri: str | None = None,
        discovery: str | None = None,
        metrics: JwksMetrics | None = None,
        session: aiohttp.ClientSession | None = None,
        session_factory: SessionFactory | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        kid_wait: float = KID_REFRESH_WAIT,
    ) -> None:
        super().__init__(provider, verifier, metrics=metrics, clock=clock,
                         wall_clock=wall_clock)
        if (jwks_uri is None) == (discovery is None):
            raise ValueError(f"provider {provider.name}: exactly one of jwks_uri, discovery")
        self.kind = "discovery" if discovery is not None else "jwks_uri"
        self.discovery_url = (_check_http_url(discovery, f"provider {provider.name}: discovery")
                              if discovery is not None else None)
        self.jwks_uri = (_check_http_url(jwks_uri, f"provider {provider.name}: jwks_uri")
                         if jwks_uri is not None else None)
        self._session = session
        self._session_factory = session_factory
        self._own_session: aiohttp.ClientSession | None = None
        self.kid_wait = min(kid_wait, self.cfg.timeout)
        self._inflight: asyncio.Task[bool] | None = None
        self._last_attempt: float | None = None  # monotonic start of the last fetch
        # Monotonic start of the last fetch an unknown kid started: the kid-miss budget.
        # Scheduled fetches are not counted, so they never delay the refetch for a key
        # published between two refreshes (a kid flood still costs <= 1 fetch per interval).
        self._last_kid_fetch: float | None = None
        self._next_refresh = 0.0
        self._wakeup = asyncio.Event()
        self._missing: dict[str, float] = {}  # kid -> monotonic expiry (negative cache)

    @property
    def location(self) -> str | None:
        return self.jwks_uri or self.discovery_url

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background refresh; the first fetch runs at once but is not awaited."""
        if self._task is not None:
            return
        if not self.ready:
            self._ready_event.clear()  # a previous stop() released the waiters
        self._next_refresh = self._clock()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"fastgate-jwks-{self.name}")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._inflight) if t is not None]
        self._task = None
        for t in tasks:
            await cancel_and_wait(t)
        self._inflight = None
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None
        self._ready_event.set()  # release cold-start waiters (they see ready=False if no keys)

    # -- request path ------------------------------------------------------------------------

    async def refresh_for_kid(self, kid: str) -> bool:
        """Called by the data plane on key_not_found: True if ``kid`` is now known."""
        if not kid or len(kid) > MAX_KID_LENGTH:
            return False
        if self.verifier.has_kid(kid):
            return True
        if self._task is None:
            return False
        now = self._clock()
        self._expire_if_stale(now)
        expiry = self._missing.get(kid)
        if expiry is not None:
            if expiry > now:
                return False
            del self._missing[kid]
        task = self._inflight
        if task is None or task.done():  # (the done callback may not have run yet)
            if self._last_kid_fetch is not None and \
                    now - self._last_kid_fetch < self.cfg.min_refresh_interval:
                return False  # rate limit: at most one kid refetch per interval (catalog H1)
            log.info("jwks provider=%s: unknown kid=%s, refetching", self.name, _safe(kid, 64))
            self._last_kid_fetch = now
            task = self._fetch_shared()
        await asyncio.wait({task}, timeout=self.kid_wait)  # bounded; never cancels the fetch
        if self.verifier.has_kid(kid):
            return True
        if task.done() and not task.cancelled() and task.result():
            self._remember_missing(kid)
        return False

    async def refresh(self) -> bool:
        """Fetch now (joining a fetch in flight), ignoring the rate limit: admin/tests."""
        task = self._fetch_shared()
        await asyncio.wait({task})
        return not task.cancelled() and task.result()

    def expire_stale(self) -> bool:
        """Drop the keys if ``max_stale`` has passed; True if they were dropped."""
        return self._expire_if_stale(self._clock())

    # -- internals ---------------------------------------------------------------------------

    def _remember_missing(self, kid: str) -> None:
        if len(self._missing) >= NEGATIVE_KIDS_MAX:
            self._missing.pop(next(iter(self._missing)))
        ttl = NEGATIVE_KID_TTL_INTERVALS * self.cfg.min_refresh_interval
        self._missing[kid] = self._clock() + ttl

    def _keys_changed(self) -> None:
        self._missing.clear()  # a kid known missing may be in the new set

    def _expire_if_stale(self, now: float) -> bool:
        if self._last_success_mono is None or not self.ready:
            return False
        stale = now - self._last_success_mono
        if stale < self.cfg.max_stale:
            return False
        self._drop_keys(f"no successful fetch for {stale:.0f}s (max_stale "
                        f"{self.cfg.max_stale:.0f}s); last error: {self._last_error}")
        return True

    def _fetch_shared(self) -> asyncio.Task[bool]:
        """The single fetch in flight, started if there is none (single-flight)."""
        task = self._inflight
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(
                self._attempt(), name=f"fastgate-jwks-fetch-{self.name}")
            self._inflight = task
            task.add_done_callback(self._fetch_done)
        return task

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None
        if not task.cancelled():
            task.exception()  # retrieved (always None: _attempt catches everything)
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            now = self._clock()
            wake = self._next_refresh
            if self._last_success_mono is not None and self.ready:
                wake = min(wake, self._last_success_mono + self.cfg.max_stale)
            if self._metrics is not None:
                wake = min(wake, now + METRICS_AGE_INTERVAL)
            if now < self._next_refresh:
                self._wakeup.clear()
                # asyncio.timeout, not wait_for: on 3.11 a cancel (stop()) racing the event
                # being set is swallowed by wait_for and the loop would go on sleeping.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(_MIN_DELAY, wake - now)):
                        await self._wakeup.wait()
                self._expire_if_stale(self._clock())
                self._metric_age()
                continue
            await asyncio.wait({self._fetch_shared()})

    async def _attempt(self) -> bool:
        """One fetch (discovery if needed, then the JWKS); never raises but CancelledError."""
        self._last_attempt = self._clock()
        started = time.perf_counter()
        error: str | None = None
        ttl = self.cfg.ttl
        try:
            # One deadline for the whole exchange, body included (catalog H3).
            async with asyncio.timeout(self.cfg.timeout):
                if self.discovery_url is not None and (
                        self.jwks_uri is None
                        or self._consecutive_failures >= REDISCOVER_AFTER_FAILURES):
                    await self.discover()
                if self.jwks_uri is None:  # pragma: no cover - discover() sets it or raises
                    raise FetchError("no jwks_uri")
                doc, cache_control = await self.get_json(self.jwks_uri)
                ttl = ttl_from_cache_control(cache_control, self.cfg)
                self.apply(doc, "jwks_uri")
        except asyncio.CancelledError:
            raise
        except FetchError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"timeout after {self.cfg.timeout:g}s"
        except aiohttp.ClientError as exc:
            error = f"connection error: {type(exc).__name__}: {_safe(exc, 100)}"
        except OSError as exc:
            error = f"connection error: {_safe(exc, 100)}"
        except Exception as exc:  # never let a fetch bug kill the refresh loop
            log.exception("jwks provider=%s: unexpected fetch error", self.name)
            error = f"unexpected error: {type(exc).__name__}"
        seconds = time.perf_counter() - started
        now = self._clock()
        if error is None:
            self._ttl = ttl
            self._next_refresh = now + max(_MIN_DELAY, ttl * random.uniform(*_REFRESH_AT))
            self._record_success(seconds)
            return True
        self._next_refresh = now + self._backoff()
        self._record_failure(error, seconds)
        self._expire_if_stale(now)
        return False

    def _backoff(self) -> float:
        n = self._consecutive_failures  # failures before this one
        interval = self.cfg.min_refresh_interval
        if self.ready:
            base, cap = interval, max(interval, self.cfg.ttl)
        else:  # cold start / dropped: recover quickly once the IdP answers
            base = min(COLD_RETRY_BASE, interval)
            cap = max(base, interval)
        delay = min(cap, base * (2.0 ** min(n, 30)))
        return max(_MIN_DELAY, delay * random.uniform(0.9, 1.1))


# ---------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------


def build_key_source(
    provider: ProviderConfig,
    verifier: Verifier,
    *,
    metrics: JwksMetrics | None = None,
    session: aiohttp.ClientSession | None = None,
    session_factory: SessionFactory | None = None,
    clock: Clock = time.monotonic,
    log: logging.Logger | None = None,
) -> StaticKeySource | FileKeySource | RemoteKeySource:
    """The key source for ``provider`` feeding ``verifier``.

    ``session`` (shared, owned by the caller) or ``session_factory`` (called lazily inside the
    running loop; the source closes what it made) configure the HTTP client; by default each
    remote source makes its own small session. ``log`` is accepted for interface stability;
    messages always go to the ``fastgate.jwks`` logger.
    """
    del log
    kind = provider.key_source
    if kind in ("jwks", "secret"):
        return StaticKeySource(provider, verifier, metrics=metrics, clock=clock)
    if kind == "jwks_file":
        if not provider.jwks_file:
            raise ValueError(f"provider {provider.name}: jwks_file is not set")
        return FileKeySource(provider, verifier, path=provider.jwks_file, metrics=metrics,
                             clock=clock)
    if kind == "jwks_uri":
        if not provider.jwks_uri:
            raise ValueError(f"provider {provider.name}: jwks_uri is not set")
        return RemoteKeySource(provider, verifier, jwks_uri=provider.jwks_uri, metrics=metrics,
                               session=session, session_factory=session_factory, clock=clock)
    if kind == "discovery":
        return RemoteKeySource(provider, verifier, discovery=discovery_url(provider.issuer),
                               metrics=metrics, session=session,
                               session_factory=session_factory, clock=clock)
    raise ValueError(f"provider {provider.name}: unknown key source {kind!r}")
