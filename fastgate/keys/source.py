"""The key-source contract and what every key source shares: the key set in use and the
bookkeeping behind its state, readiness and metrics.

:class:`KeySource` is the contract between the data plane / admin and a provider's keys;
:class:`KeySourceBase` implements its shared part for the sources of
:mod:`fastgate.keys.static`, :mod:`fastgate.keys.filekeys`, :mod:`fastgate.keys.jwks` and
:mod:`fastgate.keys.sharedkeys`.

Key set acceptance (:meth:`KeySourceBase.apply`; security catalog H4, H7):

- non-200, not JSON, not a JWKS (an object with a ``keys`` array), more than
  :data:`MAX_JWKS_KEYS` keys, or **zero usable keys** are failed fetches: the last good keys
  stay in use. A JWKS whose keys are all unusable (``use: enc``, RSA < 2048 bits, bad EC
  points, unknown ``kty``...) never wipes a good key set; the verifier's skipped reasons are
  logged. Individual unusable keys in an otherwise good document are skipped and logged.
  Duplicate ``kid`` policy is the verifier's (catalog H7: an ambiguous kid is never
  first-match; the duplicates are reported as skipped).

Key rotation: a key removed from the JWKS stops validating on the next successful fetch; the
verifier's ``set_jwks`` invalidates verified-token cache entries of removed keys. A fetch that
returns the same ``keys`` as the key set in use does not call ``set_jwks`` (no cache churn).

Readiness: ``source.ready`` is "usable keys loaded now" (``verifier.key_count > 0``), which
/readyz uses. The verifier answers ``jwks_unavailable`` (503) whenever its key set is empty:
before the first successful fetch and after a max_stale drop alike.

Metrics hooks (SPEC §7 ``fastgate_jwks_*``) go through a :class:`JwksMetrics` object; logging
goes to ``fastgate.keys.jwks``. Key material and whole documents are never logged; untrusted
strings (kids, error text from the IdP) are escaped and truncated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from fastgate.config import ProviderConfig
from fastgate.token._verify import KeyReport, Verifier

__all__ = [
    "MAX_JWKS_KEYS",
    "MAX_KID_LENGTH",
    "Clock",
    "FetchError",
    "JwksMetrics",
    "KeySource",
    "KeySourceBase",
    "KeySourceError",
    "KeySourceState",
]

log = logging.getLogger("fastgate.jwks")

Clock = Callable[[], float]

MAX_JWKS_KEYS = 100
"""More keys than this in one document is a failed fetch (catalog H4: bound the parse cost)."""
MAX_KID_LENGTH = 256
"""A kid longer than this never triggers a fetch (no real IdP uses such kids)."""


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


class FetchError(Exception):
    """A failed fetch or a refused key set; the message is a short, log-safe description."""


# ---------------------------------------------------------------------------------------------
# Shared bookkeeping
# ---------------------------------------------------------------------------------------------


class KeySourceBase:
    """What every key source shares: the verifier it feeds, the key set in use, readiness and
    the fetch bookkeeping behind :class:`KeySourceState` and the ``fastgate_jwks_*`` hooks.

    Subclasses (the static, file and remote sources, and
    :class:`fastgate.keys.sharedkeys.SharedKeySource`) load documents with :meth:`apply` and
    may override the ``_keys_changed`` hook.
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

