"""Key sources: where each provider's verification keys come from, and how they stay fresh.

One key source per provider (SPEC §2 ``providers``, §5 keys), built by :func:`build_key_source`:

- :class:`StaticKeySource` - inline ``jwks`` or an HS ``secret``: the verifier was built with
  them; ready at once; nothing to refresh.
- :class:`FileKeySource` - ``jwks_file``: loaded by ``start()`` (a bad file at start raises
  :class:`KeySourceError`), then the file's (device, inode, size, mtime) is polled about once
  a second (no inotify dependency) and the file is reloaded when it changes. A bad new file
  keeps the old keys and counts as a failed fetch. Write the file with an atomic rename.
- :class:`RemoteKeySource` - ``jwks_uri`` or ``discovery: true``: fetched in the background
  with an aiohttp client session, never on the request path except a cold start
  (:meth:`KeySource.wait_ready`) and an unknown ``kid`` (:meth:`KeySource.refresh_for_kid`).

Remote fetch rules (security catalog H1-H5, H13):

- no redirects (a 3xx is a failed fetch), a total ``timeout`` over the whole exchange
  (discovery + JWKS, headers and body: a trickling server cannot hold a fetch open), a
  ``max_bytes`` cap enforced on the announced ``Content-Length`` and while reading;
  ``Accept-Encoding: identity`` is sent and any other ``Content-Encoding`` is refused, so a
  compression bomb never gets decompressed.
- non-200, not JSON, not a JWKS (an object with a ``keys`` array), more than
  :data:`MAX_JWKS_KEYS` keys, or **zero usable keys** are failed fetches: the last good keys
  stay in use. A JWKS whose keys are all unusable (``use: enc``, RSA < 2048 bits, bad EC
  points, unknown ``kty``...) never wipes a good key set; the verifier's skipped reasons are
  logged. Individual unusable keys in an otherwise good document are skipped and logged.
  Duplicate ``kid`` policy is the verifier's (catalog H7: an ambiguous kid is never
  first-match; the duplicates are reported as skipped).
- TTL: ``Cache-Control: max-age`` clamped to ``[jwks_cache.min_ttl, jwks_cache.ttl]``;
  ``no-store``/``no-cache`` mean ``min_ttl``; no header means ``ttl``. The next refresh runs at
  75-85 % of the TTL (jitter spreads workers and gateways apart).
- Failure: retried with exponential backoff starting at ``min_refresh_interval`` (doubling,
  capped at ``ttl``) while good keys exist; during a cold start (no keys yet) the backoff
  starts at ``min(1 s, min_refresh_interval)`` and is capped at ``min_refresh_interval`` so the
  provider recovers quickly once the IdP answers.
- Stale: the last good keys stay in use for ``max_stale`` after the last successful fetch.
  Past that, the key set is dropped (the verifier gets an empty JWKS), the provider is no
  longer ready and answers ``jwks_unavailable`` (503) until a fetch succeeds again.
- Discovery: ``{issuer}/.well-known/openid-configuration`` (a trailing ``/`` of the issuer is
  removed first, OpenID Connect Discovery 1.0 §4); the document's ``issuer`` must equal the
  configured issuer exactly (§4.3) and its ``jwks_uri`` must be http(s) (https when the issuer
  is https). The document is fetched before the first JWKS fetch and again after
  :data:`REDISCOVER_AFTER_FAILURES` consecutive failed fetches (the IdP may have moved its
  keys); a failed re-discovery keeps the previously discovered ``jwks_uri``.

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

Key rotation: a key removed from the JWKS stops validating on the next successful fetch; the
verifier's ``set_jwks`` invalidates verified-token cache entries of removed keys. A fetch that
returns the same ``keys`` as the key set in use does not call ``set_jwks`` (no cache churn).

Readiness: ``source.ready`` is "usable keys loaded now" (``verifier.key_count > 0``), which
/readyz uses. The verifier answers ``jwks_unavailable`` (503) whenever its key set is empty:
before the first successful fetch and after a max_stale drop alike.

Workers (``workers > 1``): remote sources run in the master only, once per host
(fastgate/keys/sharedkeys.py): it pushes every key set it installs or drops to the workers, whose
:class:`~fastgate.keys.sharedkeys.SharedKeySource` installs them and sends unknown kids to the
master's :meth:`RemoteKeySource.refresh_for_kid` (one budget, one single-flight and one
negative cache for the host). Static and file sources run in every worker.

Metrics hooks (SPEC §7 ``fastgate_jwks_*``) go through a :class:`JwksMetrics` object; logging
goes to ``fastgate.keys.jwks``. Key material and whole documents are never logged; untrusted
strings (kids, error text from the IdP) are escaped and truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import orjson
import yarl

from fastgate.config import JwksCacheConfig, ProviderConfig
from fastgate.tasks import cancel_and_wait
from fastgate.token._verify import KeyReport, Verifier

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

log = logging.getLogger("fastgate.jwks")

Clock = Callable[[], float]
SessionFactory = Callable[[], aiohttp.ClientSession]

MAX_JWKS_KEYS = 100
"""More keys than this in one document is a failed fetch (catalog H4: bound the parse cost)."""
MAX_KID_LENGTH = 256
"""A kid longer than this never triggers a fetch (no real IdP uses such kids)."""
KID_REFRESH_WAIT = 1.0
"""Longest a request waits on an unknown-kid fetch (capped by the fetch ``timeout``)."""
NEGATIVE_KIDS_MAX = 1024
NEGATIVE_KID_TTL_INTERVALS = 10
FILE_POLL_INTERVAL = 1.0
REDISCOVER_AFTER_FAILURES = 2
METRICS_AGE_INTERVAL = 5.0
COLD_RETRY_BASE = 1.0
_REFRESH_AT = (0.75, 0.85)  # fraction of the TTL at which the background refresh runs
_MIN_DELAY = 0.01
_USER_AGENT = "fastgate-jwks/0.1"


class KeySourceError(Exception):
    """A key source cannot start (a bad ``jwks_file``, static config without usable keys)."""


class JwksMetrics(Protocol):
    """Hooks for SPEC §7 ``fastgate_jwks_*`` (implemented by fastgate.ops.metrics)."""

    def fetch(self, provider: str, result: str, seconds: float) -> None:
        """One fetch attempt ended; ``result`` is ``success`` or ``failure``."""

    def keys(self, provider: str, count: int) -> None:
        """Usable keys now loaded for the provider."""

    def age(self, provider: str, seconds: float) -> None:
        """Seconds since the provider's keys were last confirmed (last successful fetch)."""


@dataclass(frozen=True, slots=True)
class KeySourceState:
    """A snapshot for metrics, /readyz and logs."""

    provider: str
    kind: str  # discovery | jwks_uri | jwks_file | jwks | secret
    location: str | None  # URL or path (configuration, not secret); None for static keys
    ready: bool
    key_count: int
    last_success: float | None  # wall clock (time.time()) of the last successful fetch/load
    age: float | None  # seconds since then; None if never
    last_error: str | None
    consecutive_failures: int
    fetches: int
    failures: int
    ttl: float | None  # the TTL in force (after clamping); None for static/file sources


class KeySource(Protocol):
    """The contract between the data plane / admin and a provider's keys."""

    verifier: Verifier

    @property
    def ready(self) -> bool: ...
    @property
    def ever_loaded(self) -> bool: ...
    @property
    def state(self) -> KeySourceState: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def refresh_for_kid(self, kid: str) -> bool: ...
    async def wait_ready(self, timeout: float) -> bool: ...


def _safe(value: object, limit: int = 120) -> str:
    """Untrusted text for a log line: truncated, control and non-ASCII characters escaped."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return ascii(text)[1:-1]


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


def discovery_url(issuer: str) -> str:
    """OpenID Connect Discovery 1.0 §4: strip a terminating ``/``, append the well-known path."""
    return issuer.rstrip("/") + "/.well-known/openid-configuration"


def _check_http_url(url: str, what: str) -> str:
    try:
        parsed = yarl.URL(url)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: not a URL") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{what}: must be an absolute http(s) URL")
    return url


class FetchError(Exception):
    """A failed fetch or a refused key set; the message is a short, log-safe description."""


# ---------------------------------------------------------------------------------------------
# Shared bookkeeping
# ---------------------------------------------------------------------------------------------


class KeySourceBase:
    """What every key source shares: the verifier it feeds, the key set in use, readiness and
    the fetch bookkeeping behind :class:`KeySourceState` and the ``fastgate_jwks_*`` hooks.

    Subclasses (here and :class:`fastgate.keys.sharedkeys.SharedKeySource`) load documents with
    :meth:`apply` and may override the ``_keys_changed`` hook.
    """

    kind: str = "static"

    def __init__(
        self,
        provider: ProviderConfig,
        verifier: Verifier,
        *,
        metrics: JwksMetrics | None = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
    ) -> None:
        self.provider = provider
        self.name = provider.name
        self.verifier = verifier
        self.cfg = provider.jwks_cache
        self._metrics = metrics
        self._clock = clock
        self._wall = wall_clock
        self._ready_event = asyncio.Event()
        self._applied_keys: list[Any] | None = None
        self._kids: frozenset[str] = frozenset()
        self._last_success_mono: float | None = None
        self._last_success_wall: float | None = None
        self._last_error: str | None = None
        self._consecutive_failures = 0
        self._fetches = 0
        self._failures = 0
        self._ttl: float | None = None
        self._task: asyncio.Task[None] | None = None

    # -- public ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Usable keys are loaded now (the verifier answers jwks_unavailable otherwise)."""
        return self.verifier.key_count > 0

    @property
    def ever_loaded(self) -> bool:
        """A key set was loaded at least once (False only during a cold start)."""
        return self._last_success_mono is not None

    @property
    def location(self) -> str | None:
        return None

    @property
    def applied_keys(self) -> tuple[Any, ...] | None:
        """The ``keys`` array of the document in use (a copy, as the JWKS had it: usable and
        skipped members alike); None before the first document or after a drop.

        Static sources built with their keys already in the verifier report None until a
        document is applied (see :meth:`StaticKeySource.start`)."""
        keys = self._applied_keys
        return tuple(keys) if keys is not None else None

    @property
    def state(self) -> KeySourceState:
        age = None
        if self._last_success_mono is not None:
            age = max(0.0, self._clock() - self._last_success_mono)
        return KeySourceState(
            provider=self.name,
            kind=self.kind,
            location=self.location,
            ready=self.ready,
            key_count=self.verifier.key_count,
            last_success=self._last_success_wall,
            age=age,
            last_error=self._last_error,
            consecutive_failures=self._consecutive_failures,
            fetches=self._fetches,
            failures=self._failures,
            ttl=self._ttl,
        )

    async def wait_ready(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for usable keys (cold start); True when ready."""
        if self.ready:
            return True
        if timeout > 0:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready_event.wait()
        return self.ready

    # -- key set -----------------------------------------------------------------------------

    def probe(self, doc: Mapping[str, Any]) -> KeyReport:
        """What the verifier would load from ``doc``, without touching the live key set.

        ``set_jwks`` replaces the keys in place, so a document whose keys are all unusable
        would wipe a good set; a throw-away verifier with the same algorithm allow-list tells
        us first.
        """
        probe = Verifier(
            self.verifier.issuer,
            algorithms=self.verifier.algorithms or None,
            cache_size=1,
            name=f"{self.name}-probe",
        )
        return probe.set_jwks(doc)

    def apply(self, doc: Any, origin: str) -> None:
        """Install ``doc`` as the key set, or raise :class:`FetchError` and leave the old set
        alone (``origin`` names the document's source in the log lines).

        The gateway's acceptance rules: a JWKS object, at most :data:`MAX_JWKS_KEYS` keys, at
        least one usable key (checked by :meth:`probe` first); the same ``keys`` as the set in
        use changes nothing (the verifier and its token cache stay)."""
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise FetchError("not a JWKS (no 'keys' array)")
        keys: list[Any] = doc["keys"]
        if len(keys) > MAX_JWKS_KEYS:
            raise FetchError(f"too many keys ({len(keys)} > {MAX_JWKS_KEYS})")
        if self._applied_keys is not None and keys == self._applied_keys and self.ready:
            return  # unchanged: keep the verifier (and its token cache) as is
        try:
            report = self.probe(doc)
        except ValueError as exc:
            raise FetchError(f"not a JWKS ({_safe(exc, 80)})") from exc
        for kid, why in report.skipped:
            log.warning("jwks provider=%s source=%s: key kid=%s skipped: %s",
                        self.name, origin, _safe(kid, 64), _safe(why, 80))
        if report.loaded == 0:
            raise FetchError(f"no usable keys ({len(report.skipped)} skipped)")
        before = self._kids
        live = self.verifier.set_jwks(doc)
        self._applied_keys = keys
        self._kids = live.kids
        self._keys_changed()
        self._set_ready(True)
        added = sorted(live.kids - before)
        removed = sorted(before - live.kids)
        log.info("jwks provider=%s source=%s: %d keys loaded (added %s, removed %s)",
                 self.name, origin, live.loaded, _safe(added, 200), _safe(removed, 200))

    def _keys_changed(self) -> None:
        """Hook: the live key set was replaced."""

    def _drop_keys(self, why: str) -> None:
        """Past max_stale: serve nothing rather than keys nobody vouches for any more."""
        if self._applied_keys is None and not self.ready:
            return
        self.verifier.set_jwks({"keys": []})
        self._applied_keys = None
        self._kids = frozenset()
        self._keys_changed()
        self._set_ready(False)
        self._metric_keys()
        log.error("jwks provider=%s: key set dropped: %s; requests get jwks_unavailable "
                  "until a fetch succeeds", self.name, why)

    def _set_ready(self, ready: bool) -> None:
        if ready:
            self._ready_event.set()
        else:
            self._ready_event.clear()

    # -- outcome bookkeeping -----------------------------------------------------------------

    def _record_success(self, seconds: float) -> None:
        self._fetches += 1
        self._consecutive_failures = 0
        self._last_error = None
        self._last_success_mono = self._clock()
        self._last_success_wall = self._wall()
        self._metric("fetch", "success", seconds)
        self._metric_keys()
        self._metric_age()

    def _record_failure(self, error: str, seconds: float) -> None:
        self._fetches += 1
        self._failures += 1
        self._consecutive_failures += 1
        self._last_error = error
        self._metric("fetch", "failure", seconds)
        age = self.state.age
        log.warning("jwks provider=%s source=%s: fetch failed (%d in a row): %s; %s",
                    self.name, self.location, self._consecutive_failures, error,
                    f"keeping keys confirmed {age:.0f}s ago" if self.ready and age is not None
                    else "no usable keys")

    def _metric(self, method: str, *args: Any) -> None:
        if self._metrics is None:
            return
        try:
            getattr(self._metrics, method)(self.name, *args)
        except Exception:  # a metrics bug must never stop key refresh
            log.exception("jwks provider=%s: metrics hook %s failed", self.name, method)

    def _metric_keys(self) -> None:
        self._metric("keys", self.verifier.key_count)

    def _metric_age(self) -> None:
        if self._last_success_mono is not None:
            self._metric("age", max(0.0, self._clock() - self._last_success_mono))


# ---------------------------------------------------------------------------------------------
# Static: inline jwks / secret
# ---------------------------------------------------------------------------------------------


class StaticKeySource(KeySourceBase):
    """Inline ``jwks`` or an HS ``secret``: the verifier already holds the keys."""

    def __init__(self, provider: ProviderConfig, verifier: Verifier, *,
                 metrics: JwksMetrics | None = None, clock: Clock = time.monotonic) -> None:
        super().__init__(provider, verifier, metrics=metrics, clock=clock)
        self.kind = provider.key_source

    async def start(self) -> None:
        if not self.ready and self.provider.jwks is not None:
            # The verifier was built without the inline set; load it (skips are logged).
            with contextlib.suppress(FetchError):
                self.apply(self.provider.jwks, "inline")
        if not self.ready:
            raise KeySourceError(f"provider {self.name}: the {self.kind} key source has no "
                                 "usable key")
        self._last_success_mono = self._clock()
        self._last_success_wall = self._wall()
        self._set_ready(True)
        self._metric_keys()
        self._metric("age", 0.0)

    async def stop(self) -> None:
        return None

    async def refresh_for_kid(self, kid: str) -> bool:
        return self.verifier.has_kid(kid) if kid else False


# ---------------------------------------------------------------------------------------------
# File: jwks_file, reloaded on change
# ---------------------------------------------------------------------------------------------

_FileSig = tuple[int, int, int, int]


class FileKeySource(KeySourceBase):
    """``jwks_file``: loaded at start, reloaded when (dev, inode, size, mtime) changes."""

    kind = "jwks_file"

    def __init__(self, provider: ProviderConfig, verifier: Verifier, *, path: str,
                 metrics: JwksMetrics | None = None, clock: Clock = time.monotonic,
                 poll_interval: float = FILE_POLL_INTERVAL) -> None:
        super().__init__(provider, verifier, metrics=metrics, clock=clock)
        self.path = path
        self.poll_interval = poll_interval
        self._sig: _FileSig | None = None

    @property
    def location(self) -> str:
        return self.path

    async def start(self) -> None:
        if self._task is not None:
            return
        error = self.reload()
        if error is not None:
            raise KeySourceError(f"provider {self.name}: jwks_file {self.path}: {error}")
        self._task = asyncio.get_running_loop().create_task(
            self._poll(), name=f"fastgate-jwks-file-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._ready_event.set()  # release cold-start waiters (they see ready=False if no keys)

    async def refresh_for_kid(self, kid: str) -> bool:
        """Check the file now: a stat costs about a microsecond, so no rate limit is needed
        (the file is only re-read when it changed)."""
        if not kid or len(kid) > MAX_KID_LENGTH:
            return False
        if self.verifier.has_kid(kid):
            return True
        if self._task is not None:
            self.check()
        return self.verifier.has_kid(kid)

    def check(self) -> bool:
        """Reload if the file changed; returns False when a changed file could not be loaded."""
        try:
            sig: _FileSig | None = self._stat()
        except OSError:
            sig = None
        if sig is not None and sig == self._sig:
            if self._last_error is None:
                # Unchanged and last load good: the keys on disk are confirmed current.
                self._last_success_mono = self._clock()
                self._last_success_wall = self._wall()
            ok = self._last_error is None
        else:
            ok = self.reload() is None
        # Published on every check, failed ones too: fastgate_jwks_age_seconds of a file is the
        # age of its last successful load (or of the last check that found it unchanged since),
        # so it grows while the file is missing, unreadable or invalid, and an alert can see it.
        self._metric_age()
        return ok

    def _stat(self) -> _FileSig:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self) -> str | None:
        """Read and apply the file now, changed or not (``max_bytes``, JSON, :meth:`apply`);
        counted as a fetch. None on success, else the log-safe error (old keys kept)."""
        started = time.perf_counter()
        error: str | None = None
        try:
            self._sig = self._stat()
            with open(self.path, "rb") as fh:
                data = fh.read(self.cfg.max_bytes + 1)
            if len(data) > self.cfg.max_bytes:
                raise FetchError(f"file exceeds max_bytes ({self.cfg.max_bytes})")
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise FetchError("not JSON") from exc
            self.apply(doc, "file")
        except FetchError as exc:
            error = str(exc)
        except OSError as exc:
            self._sig = None
            error = f"cannot read: {exc.strerror or type(exc).__name__}"
        seconds = time.perf_counter() - started
        if error is None:
            self._record_success(seconds)
        else:
            self._record_failure(error, seconds)
        return error

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.check()
            except Exception:  # never let the poller die: the old keys stay in use
                log.exception("jwks provider=%s: file check failed", self.name)


# ---------------------------------------------------------------------------------------------
# Remote: jwks_uri / discovery
# ---------------------------------------------------------------------------------------------


class RemoteKeySource(KeySourceBase):
    """``jwks_uri`` or OIDC discovery, refreshed in the background (see the module doc)."""

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
    messages always go to the ``fastgate.keys.jwks`` logger.
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
