"""One JWKS fetch per host with ``workers > 1`` (SPEC §5 keys).

The master owns every remote key source (``jwks_uri`` / ``discovery``) in a :class:`KeyHub`:
it fetches (discovery, scheduled refresh, backoff, ``max_stale``, kid-miss single-flight with
the ``min_refresh_interval`` budget and the negative kid cache: all of
:class:`~fastgate.keys.jwks.RemoteKeySource`, unchanged) and pushes every key set it applies or
drops to every worker over the supervisor's pipe. A worker's remote providers are
:class:`SharedKeySource` objects fed by its :class:`KeyClient`: they install pushed key sets in
their verifier, are ready when one is installed, and ask the master on an unknown kid (the
master's budget decides whether that costs a fetch). A worker started (or restarted) gets the
master's current key sets with its ``init`` message: no fetch. An IdP sees the same traffic
for 1 or N workers.

Static, inline-secret and ``jwks_file`` sources stay per worker (no network involved).

Key sets are identified by :func:`source_id` (provider name + a digest of its config), so a
reload that changes a provider gets a new master source and the workers' new tables wait for
its keys rather than taking the old provider's.

Messages (see fastgate/ops/supervisor.py for the others):
  master -> worker: ("keys", source_id, {"keys": [...]} | None)
                    ("kid_answer", request_id, found)
                    ("forget", source_id)  (the master stopped that source: drop the copy)
  worker -> master: ("kid", request_id, source_id, kid)

Metrics: the master's sources count ``fastgate_jwks_fetches_total`` / durations and publish
``fastgate_jwks_age_seconds`` (once per host); every worker publishes the
``fastgate_jwks_keys`` it has installed (min over live processes, so a worker without keys
shows as 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Final

from fastgate.config import ProviderConfig
from fastgate.keys.jwks import (
    KID_REFRESH_WAIT,
    MAX_KID_LENGTH,
    FetchError,
    JwksMetrics,
    KeySourceBase,
    RemoteKeySource,
    discovery_url,
)
from fastgate.token._verify import Verifier

__all__ = ["KeyClient", "KeyHub", "SharedKeySource", "install_client", "is_remote",
           "shared_source", "source_id"]

log = logging.getLogger("fastgate.jwks")

Send = Callable[[tuple[Any, ...]], None]
KID_ANSWER_MARGIN: Final = 0.5
"""Seconds a worker waits for the master's kid answer beyond the master's own wait."""


def is_remote(provider: ProviderConfig) -> bool:
    return provider.key_source in ("jwks_uri", "discovery")


def source_id(provider: ProviderConfig) -> str:
    """The key set's identity across processes: a changed provider is another key set.

    ``repr`` of the frozen config is deterministic across processes (unlike ``hash``)."""
    digest = hashlib.sha256(repr(provider).encode()).hexdigest()[:16]
    return f"{provider.name}:{digest}"


# ---------------------------------------------------------------------------------------------
# Master side
# ---------------------------------------------------------------------------------------------


class _HubSource(RemoteKeySource):
    """A remote source that reports every installed or dropped key set."""

    on_change: Callable[[dict[str, Any] | None], None] | None = None

    def _keys_changed(self) -> None:
        super()._keys_changed()
        keys = self.applied_keys
        if self.on_change is not None:
            self.on_change({"keys": list(keys)} if keys is not None else None)


class KeyHub:
    """The master's remote key sources, one per :func:`source_id`, and their last key sets."""

    def __init__(self, broadcast: Send, metrics: JwksMetrics | None = None) -> None:
        self._broadcast = broadcast
        self._metrics = metrics
        self.sources: dict[str, _HubSource] = {}
        self.docs: dict[str, dict[str, Any] | None] = {}

    async def prepare(self, providers: Iterable[ProviderConfig]) -> None:
        """Start a source for every remote provider not running yet (first fetch in the
        background); running ones are kept (their keys, schedule and budget)."""
        for p in providers:
            if not is_remote(p):
                continue
            sid = source_id(p)
            if sid in self.sources:
                continue
            # The master verifies nothing: the verifier only holds the keys (and tells the
            # source what is loaded), so a tiny cache does.
            verifier = Verifier(p.issuer, algorithms=p.algorithms or None, cache_size=1,
                                name=p.name)
            if p.key_source == "jwks_uri":
                src = _HubSource(p, verifier, jwks_uri=p.jwks_uri, metrics=self._metrics)
            else:
                src = _HubSource(p, verifier, discovery=discovery_url(p.issuer),
                                 metrics=self._metrics)
            src.on_change = lambda doc, sid=sid: self._changed(sid, doc)
            self.sources[sid] = src
            self.docs[sid] = None
            await src.start()

    async def retain(self, providers: Iterable[ProviderConfig]) -> None:
        """Stop the sources no provider of the running config uses any more."""
        keep = {source_id(p) for p in providers if is_remote(p)}
        for sid in [s for s in self.sources if s not in keep]:
            src = self.sources.pop(sid)
            self.docs.pop(sid, None)
            # A worker must not install this copy if the provider comes back in a later
            # reload: the new master source may not vouch for those keys any more.
            self._broadcast(("forget", sid))
            with contextlib.suppress(Exception):
                await src.stop()

    async def stop(self) -> None:
        await self.retain(())

    def snapshot(self) -> list[tuple[Any, ...]]:
        """The messages that bring a new worker up to date (sent right after ``init``)."""
        return [("keys", sid, doc) for sid, doc in self.docs.items() if doc is not None]

    def _changed(self, sid: str, doc: dict[str, Any] | None) -> None:
        if sid not in self.sources:
            return
        self.docs[sid] = doc
        self._broadcast(("keys", sid, doc))

    async def refresh_for_kid(self, sid: str, kid: str) -> bool:
        """A worker's unknown kid: the master's single-flight, budget and negative cache
        decide (True: the kid is in the key set now; it was pushed before this answer)."""
        src = self.sources.get(sid)
        if src is None:
            return False
        return await src.refresh_for_kid(kid)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


class KeyClient:
    """A worker's end: the key sets pushed by the master and the kid questions in flight."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.docs: dict[str, dict[str, Any] | None] = {}
        self._sources: dict[str, set[SharedKeySource]] = {}
        self._answers: dict[int, asyncio.Future[bool]] = {}
        self._ids = 0

    def handle(self, msg: tuple[Any, ...]) -> bool:
        """Apply a ``keys`` / ``kid_answer`` message; False for any other kind."""
        if msg[0] == "keys":
            _kind, sid, doc = msg
            self.docs[sid] = doc
            for src in list(self._sources.get(sid, ())):
                src.install(doc)
            return True
        if msg[0] == "forget":
            self.docs.pop(msg[1], None)  # sources still using it (retiring tables) keep theirs
            return True
        if msg[0] == "kid_answer":
            _kind, request_id, found = msg
            waiter = self._answers.pop(request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(bool(found))
            return True
        return False

    def register(self, src: SharedKeySource) -> None:
        self._sources.setdefault(src.sid, set()).add(src)
        doc = self.docs.get(src.sid)
        if doc is not None:
            src.install(doc)

    def unregister(self, src: SharedKeySource) -> None:
        self._sources.get(src.sid, set()).discard(src)

    async def ask_kid(self, sid: str, kid: str, timeout: float) -> bool:
        self._ids += 1
        request_id = self._ids
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._answers[request_id] = waiter
        try:
            self._send(("kid", request_id, sid, kid))
            async with asyncio.timeout(timeout):
                return await waiter
        except (TimeoutError, OSError):
            return False
        finally:
            self._answers.pop(request_id, None)


class SharedKeySource(KeySourceBase):
    """A worker's remote provider: keys come from the master (see the module doc)."""

    def __init__(self, provider: ProviderConfig, verifier: Verifier, client: KeyClient, *,
                 metrics: JwksMetrics | None = None) -> None:
        super().__init__(provider, verifier, metrics=metrics)
        self.kind = provider.key_source
        self.sid = source_id(provider)
        self._client = client
        self._started = False
        # kid -> single-flight question to the master; kid -> monotonic expiry of a "no"
        # (cleared by every push), so a flood of one bad kid is not a flood on the pipe.
        self._asking: dict[str, asyncio.Task[bool]] = {}
        self._no: dict[str, float] = {}
        self.kid_wait = min(KID_REFRESH_WAIT, self.cfg.timeout) + KID_ANSWER_MARGIN

    @property
    def location(self) -> str | None:
        return self.provider.jwks_uri or discovery_url(self.provider.issuer)

    async def start(self) -> None:
        if not self._started:
            self._started = True
            if not self.ready:
                self._ready_event.clear()
            self._client.register(self)

    async def stop(self) -> None:
        self._started = False
        self._client.unregister(self)
        self._ready_event.set()  # release cold-start waiters (they see ready=False)

    def install(self, doc: dict[str, Any] | None) -> None:
        """A key set from the master (already validated there), or None: dropped."""
        self._no.clear()
        if doc is None:
            self._drop_keys("the master dropped the key set")
            return
        try:
            self.apply(doc, "master")
        except FetchError as exc:  # pragma: no cover - the master applied the same document
            log.error("jwks provider=%s: key set from the master refused: %s", self.name, exc)
            return
        self._last_success_mono = self._clock()
        self._last_success_wall = self._wall()
        self._metric_keys()

    def _asked(self, task: asyncio.Task[bool]) -> None:
        for kid, t in list(self._asking.items()):
            if t is task:
                del self._asking[kid]

    async def refresh_for_kid(self, kid: str) -> bool:
        """Ask the master once per kid at a time (concurrent misses share the question)."""
        if not kid or len(kid) > MAX_KID_LENGTH:
            return False
        if self.verifier.has_kid(kid):
            return True
        if not self._started:
            return False
        now = time.monotonic()
        expiry = self._no.get(kid)
        if expiry is not None and expiry > now:
            return False
        task = self._asking.get(kid)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._client.ask_kid(self.sid, kid, self.kid_wait))
            self._asking[kid] = task
            task.add_done_callback(self._asked)
        await asyncio.wait({task})
        if self.verifier.has_kid(kid):
            return True
        if len(self._no) >= 1024:
            self._no.pop(next(iter(self._no)))
        self._no[kid] = time.monotonic() + self.cfg.min_refresh_interval
        return False


# ---------------------------------------------------------------------------------------------
# The seam used by fastgate.app.build_key_source
# ---------------------------------------------------------------------------------------------

_client: KeyClient | None = None


def install_client(client: KeyClient | None) -> None:
    """Make this process (a worker) build :class:`SharedKeySource` for remote providers."""
    global _client
    _client = client


def shared_source(provider: ProviderConfig, verifier: Verifier,
                  metrics: JwksMetrics | None) -> SharedKeySource | None:
    """The shared source for ``provider`` in a worker; None: build the usual source."""
    if _client is None or not is_remote(provider):
        return None
    return SharedKeySource(provider, verifier, _client, metrics=metrics)
