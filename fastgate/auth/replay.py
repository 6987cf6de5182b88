"""The replay store (issue 11): remembers DPoP proof ``jti`` values and one-time tokens.

RFC 9449 §11.1: a server can store the ``jti`` of each DPoP proof for the time window in
which the proof would be accepted (here ``max_age + clock_skew``) and decline a request whose
``jti`` was seen before. RFC 7523 §3 (item 7): replay of a JWT is prevented by "maintaining
the set of used jti values for the length of time for which the JWT would be considered
valid based on the applicable exp instant" - the one-time tokens. Both need one question
answered on the hot path: *was this key seen before? If not, remember it for ttl seconds.*
A store also knows the gateway-issued DPoP nonces (RFC 9449 §8).

Two implementations of :class:`ReplayStore`:

* :class:`MemoryReplayStore` - per process, synchronous, bounded (``max_entries``). Only safe
  with one worker: each process has its own memory, so a proof replayed to another worker
  would pass (the config refuses ``workers > 1`` with it when a route uses DPoP/one-time).
* :class:`RedisReplayStore` - shared by every worker and replica: our own minimal RESP2
  client on one pipelined connection (no dependency; it runs on uvloop like the rest).
  A check without a nonce: ``SET <prefix><key> 1 NX PX <ms>`` per key, pipelined (atomic per
  key). With a nonce: one small Lua script (``EVALSHA``, loaded with ``SCRIPT LOAD`` when the
  connection is set up; after a ``NOSCRIPT`` reply that check is sent again as ``EVAL`` and
  the script loaded again) that looks at ``EXISTS <prefix>n:<nonce>`` first and does the
  ``SET NX PX`` of the keys only when the nonce is known, atomically. Either way: one write
  and one round trip per check (a ``NOSCRIPT`` costs that check a second one).

Result codes (plain ints, the data plane compares them without attribute lookups)::

    FRESH          every key was absent and is now remembered; the nonce (if given) is known
    REPLAYED       at least one key was already there (wins over everything else)
    NONCE_UNKNOWN  the nonce is not (or no longer) a gateway-issued one
    UNAVAILABLE    the store could not answer (redis down/timeout/error reply; memory full)
    PENDING        redis: the answer comes later, through ``done`` (on the loop, exactly once)

Semantics shared by both stores:

* A check whose nonce is unknown remembers none of its keys: the request is refused with
  ``use_dpop_nonce`` and the client retries with the fresh nonce and the same (one-time)
  token, which must not be burned by the refusal. Its keys are only looked up: REPLAYED if
  one of them is there already, else NONCE_UNKNOWN. (Memory: the nonce is checked first.)
* Otherwise every absent key is remembered, even when another key of the same check was
  replayed (redis has no "undo" for an ``NX`` that succeeded; the memory store does the same).
* A check without keys and nonce is FRESH at once (nothing to ask). Replay keys must not start
  with ``n:`` (the nonce namespace; the data plane's keys start with ``d:`` and ``t:``).

Metrics: ``build_store(config, metrics=...)`` binds, once, the optional methods
``replay_result(store_idx, result)``, ``replay_error(store_idx, kind_idx)`` and
``replay_observe(seconds)`` (see ``fastgate.ops.metrics``); a missing one is a no-op. Indexes:
``store_idx`` into :data:`REPLAY_STORES`, ``result`` = the code (into :data:`REPLAY_RESULTS`),
``kind_idx`` into :data:`REPLAY_ERROR_KINDS`. What is counted: every check's final result
once; ``timeout`` once per connection declared dead by the sweep; ``connection`` once per
failed connect attempt (a refused ``SCRIPT LOAD`` included) or lost connection; ``protocol``
once per check (or nonce write, or ``SCRIPT LOAD`` after a ``NOSCRIPT``) that got an error
reply and once per undecodable byte stream; ``full`` once per memory check that found no
room. Checks refused while redis is disconnected count as ``unavailable`` only. A
``NOSCRIPT`` that the ``EVAL`` answered is no error.

Layout: this module holds the :class:`ReplayStore` protocol, the memory store and
:func:`build_store`, and re-exports the rest; the result codes, metric labels and hooks are
``fastgate.auth.replay_codes``'s, the redis store ``fastgate.auth.replay_redis``'s, and its
address, RESP2 encoding and connection ``fastgate.auth.redis_resp``'s.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol

from fastgate.auth.redis_resp import RedisAddress, encode_command, parse_redis_url
from fastgate.auth.replay_codes import ERR_CONNECTION as ERR_CONNECTION
from fastgate.auth.replay_codes import (
    ERR_FULL,
    FRESH,
    NONCE_UNKNOWN,
    PENDING,
    REPLAY_ERROR_KINDS,
    REPLAY_RESULTS,
    REPLAY_STORES,
    REPLAYED,
    STORE_MEMORY,
    UNAVAILABLE,
    Done,
    Keys,
    _Hooks,
    _ttl,
)
from fastgate.auth.replay_codes import ERR_PROTOCOL as ERR_PROTOCOL
from fastgate.auth.replay_codes import ERR_TIMEOUT as ERR_TIMEOUT
from fastgate.auth.replay_codes import STORE_REDIS as STORE_REDIS
from fastgate.auth.replay_redis import RedisReplayStore

if TYPE_CHECKING:
    from fastgate.config import ReplayStoreConfig

__all__ = [
    "FRESH",
    "NONCE_UNKNOWN",
    "PENDING",
    "REPLAYED",
    "REPLAY_ERROR_KINDS",
    "REPLAY_RESULTS",
    "REPLAY_STORES",
    "UNAVAILABLE",
    "MemoryReplayStore",
    "RedisAddress",
    "RedisReplayStore",
    "ReplayStore",
    "build_store",
    "encode_command",
    "parse_redis_url",
]


class ReplayStore(Protocol):
    """What the data plane uses (fastgate/dataplane/proxy.py)."""

    shared: bool  # True for redis: safe across workers and replicas
    fail_open: bool  # redis with on_error: fail_open; memory: False

    def check(self, keys: Keys, nonce: bytes | None, done: Done) -> int:
        """Remember each ``(key, ttl_seconds)`` that is absent (none of them when ``nonce``
        is unknown); the result code (or PENDING and, later, ``done(code)``)."""
        ...

    def add_nonce(self, nonce: bytes, ttl: float) -> None:
        """A gateway-issued DPoP nonce, valid for ``ttl`` seconds (RFC 9449 §8)."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


# -- memory --------------------------------------------------------------------------------------

# Expired entries removed from the heap head per check (amortised: a check adds at most a few
# entries, so purging a few more than it adds keeps up; a burst of expiries costs no pause).
_PURGE_STEP: Final = 32


class MemoryReplayStore:
    """Per-process store: a dict key -> expiry plus a heap of (expiry, key) for purging.

    Bounded by ``max_entries``. When it is full (after purging what has expired) a check that
    needs room answers UNAVAILABLE: evicting a live entry to make room would let a replay of
    that key through (RFC 9449 §11.1), so the store fails closed instead, and counts it.
    """

    __slots__ = ("_clock", "_entries", "_heap", "_hooks", "_max", "_nonces", "fail_open",
                 "max_entries", "shared")  # fmt: skip

    def __init__(self, max_entries: int = 1_000_000, *,
                 clock: Callable[[], float] = time.monotonic,
                 metrics: object | None = None) -> None:  # fmt: skip
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"replay store: max_entries must be a positive integer, "
                             f"got {max_entries!r}")  # fmt: skip
        self.shared = False
        self.fail_open = False
        self.max_entries = max_entries
        self._max = max_entries
        self._clock = clock
        self._entries: dict[bytes, float] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._nonces: dict[bytes, float] = {}
        self._hooks = _Hooks(metrics)

    def __len__(self) -> int:
        """Entries held (expired ones still waiting for the purge included)."""
        return len(self._entries)

    def _purge(self, now: float, limit: int) -> None:
        """Drop up to ``limit`` expired entries from the heap head (-1: all expired ones)."""
        heap, entries = self._heap, self._entries
        while limit and heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            # A heap item whose key was remembered again (after it expired) is stale.
            if entries.get(key) == expires:
                del entries[key]
            limit -= 1

    def check(self, keys: Keys, nonce: bytes | None, done: Done) -> int:
        """The result code, synchronously (``done`` is never called)."""
        now = self._clock()
        entries = self._entries
        heap = self._heap
        if heap and heap[0][0] <= now:
            self._purge(now, _PURGE_STEP)
        if nonce is not None and not self._nonce_known(nonce, now):
            # Refused for the nonce: nothing is remembered (the client retries with the fresh
            # nonce and the same one-time token), only looked up: REPLAYED still wins.
            code = NONCE_UNKNOWN
            for key, _ in keys:
                expires = entries.get(key)
                if expires is not None and expires > now:
                    code = REPLAYED
                    break
            self._hooks.result(STORE_MEMORY, code)
            return code
        replayed = full = False
        for key, ttl in keys:
            expires = entries.get(key)
            if expires is not None and expires > now:
                replayed = True
                continue
            if len(entries) >= self._max:
                self._purge(now, -1)
                if len(entries) >= self._max:
                    full = True
                    continue
            expires = now + _ttl(ttl)
            entries[key] = expires
            heapq.heappush(heap, (expires, key))
        if replayed:
            code = REPLAYED
        elif full:
            self._hooks.error(STORE_MEMORY, ERR_FULL)
            code = UNAVAILABLE
        else:
            code = FRESH
        self._hooks.result(STORE_MEMORY, code)
        return code

    def _nonce_known(self, nonce: bytes, now: float) -> bool:
        expires = self._nonces.get(nonce)
        return expires is not None and expires > now

    def add_nonce(self, nonce: bytes, ttl: float) -> None:
        now = self._clock()
        # The gateway adds one nonce per rotation (a handful live at once): a full scan is
        # cheap and keeps the dict from growing.
        for old in [n for n, exp in self._nonces.items() if exp <= now]:
            del self._nonces[old]
        self._nonces[nonce] = now + _ttl(ttl)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def build_store(config: ReplayStoreConfig, *, metrics: object | None = None,
                clock: Callable[[], float] = time.monotonic) -> ReplayStore:  # fmt: skip
    """The configured store (``replay_store`` of the gateway config), with its metrics hooks
    bound once from ``metrics`` (a ``fastgate.ops.metrics.Metrics``, any of its bindings, or None).
    Raises ValueError for a bad redis URL, timeout or on_error."""
    redis = config.redis
    if redis is None:
        return MemoryReplayStore(config.max_entries, clock=clock, metrics=metrics)
    return RedisReplayStore(redis.url, key_prefix=redis.key_prefix, timeout=redis.timeout,
                            on_error=redis.on_error, clock=clock, metrics=metrics)
