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
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from fastgate.tasks import cancel_and_wait

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

log = logging.getLogger("fastgate.replay")

FRESH: Final = 0
REPLAYED: Final = 1
NONCE_UNKNOWN: Final = 2
UNAVAILABLE: Final = 3
PENDING: Final = -1

# Label values of the metrics (fastgate.ops.metrics pre-binds one series per value). The result
# tuple is indexed by the codes above; the store and kind tuples by the constants below.
REPLAY_STORES: Final = ("memory", "redis")
REPLAY_RESULTS: Final = ("fresh", "replayed", "nonce_unknown", "unavailable")
REPLAY_ERROR_KINDS: Final = ("timeout", "connection", "protocol", "full")
STORE_MEMORY: Final = 0
STORE_REDIS: Final = 1
ERR_TIMEOUT: Final = 0
ERR_CONNECTION: Final = 1
ERR_PROTOCOL: Final = 2
ERR_FULL: Final = 3

Done = Callable[[int], None]
Keys = Sequence[tuple[bytes, float]]

# A ttl is at most ~10 years: keeps an infinite or absurd ttl from overflowing PX (int64 ms).
_MAX_TTL: Final = 10 * 365 * 86400.0


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


def _noop(*args: Any) -> None:
    return None


class _Hooks:
    """The metrics calls, bound once (a missing method is a no-op: no branch per check)."""

    __slots__ = ("error", "observe", "result")

    def __init__(self, metrics: object | None) -> None:
        def hook(name: str) -> Callable[..., None]:
            fn = getattr(metrics, name, None) if metrics is not None else None
            return fn if callable(fn) else _noop

        self.result: Callable[[int, int], None] = hook("replay_result")
        self.error: Callable[[int, int], None] = hook("replay_error")
        self.observe: Callable[[float], None] = hook("replay_observe")


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


def _ttl(ttl: float) -> float:
    # `not ttl > 0` also catches NaN; a key that is remembered at all lives at least 1 ms
    # (the redis store's PX floor).
    if not ttl > 0.0:
        return 0.001
    return min(ttl, _MAX_TTL)


# -- redis: address ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A parsed ``replay_store.redis.url``."""

    host: str | None  # None for a unix socket
    port: int
    path: str | None  # the unix socket path
    tls: bool
    username: str | None
    password: str | None
    db: int

    def __str__(self) -> str:
        """For logs: never the password."""
        if self.path is not None:
            where = f"unix://{self.path}"
        else:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            where = f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}"
        return f"{where}/{self.db}" if self.path is None else f"{where}?db={self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS, verified with
    the system CAs) or ``unix://[[user]:password@]/path.sock[?db=N]``; ValueError if not.

    User and password are percent-decoded. A user needs a password (Redis 6 ACL ``AUTH user
    pass``); a password alone is ``AUTH pass``.
    """
    if not isinstance(url, str):
        raise ValueError(f"replay_store.redis.url must be a string, got {type(url).__name__}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        # (never the URL itself in a message: it may hold the password)
        raise ValueError(f"replay_store.redis.url: scheme must be redis, rediss or unix, "
                         f"not {scheme!r}")  # fmt: skip
    if parts.fragment:
        raise ValueError("replay_store.redis.url: a fragment is not allowed")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if username is not None and password is None:
        raise ValueError("replay_store.redis.url: a user needs a password (user:password@)")
    db = 0
    if scheme == "unix":
        if parts.hostname or parts.port is not None:
            raise ValueError("replay_store.redis.url: unix:///path.sock has no host or port")
        if not parts.path.startswith("/"):
            raise ValueError("replay_store.redis.url: unix socket path must be absolute")
        for name, val in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if name != "db":
                raise ValueError(f"replay_store.redis.url: unknown parameter {name!r}")
            db = _db_number(val)
        return RedisAddress(None, 0, unquote(parts.path), False, username, password, db)
    if parts.query:
        raise ValueError("replay_store.redis.url: query parameters are not supported "
                         "(the database goes in the path: redis://host:6379/1)")  # fmt: skip
    host = parts.hostname
    if not host:
        raise ValueError("replay_store.redis.url: no host")
    try:
        port = parts.port if parts.port is not None else 6379
    except ValueError as exc:
        raise ValueError(f"replay_store.redis.url: bad port: {exc}") from None
    path = parts.path
    if path not in ("", "/"):
        db = _db_number(path[1:])
    return RedisAddress(host, port, None, scheme == "rediss", username, password, db)


def _db_number(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"replay_store.redis.url: database must be a number, got {text!r}")
    return int(text)


# -- redis: wire ---------------------------------------------------------------------------------


def encode_command(*args: bytes) -> bytes:
    """One RESP2 command as an array of bulk strings: length-prefixed, so a key may hold any
    byte (CR, LF, space, NUL); inline commands would let such a key inject commands."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(out)


def _millis(ttl: float) -> bytes:
    """PX value: the ttl in ms, rounded up (never remember for less than asked), >= 1."""
    ttl = _ttl(ttl)
    # round() first: 0.3 * 1000 is 300.00000000000006, which is 300 ms, not 301.
    return b"%d" % max(1, math.ceil(round(ttl * 1000.0, 6)))


# SET <key> 1 NX PX <ms>, split around the two variable parts.
_SET_HEAD: Final = b"*6\r\n$3\r\nSET\r\n$"
_SET_MID: Final = b"\r\n$1\r\n1\r\n$2\r\nNX\r\n$2\r\nPX\r\n$"
_CRLF: Final = b"\r\n"

# A check with a nonce, atomically. KEYS: the n prefixed replay keys, then the nonce key;
# ARGV: the n ttls in ms. An unknown nonce writes nothing (the request is refused, the client
# retries with the fresh nonce and the same one-time token): 2 (NONCE_UNKNOWN), or 1
# (REPLAYED) if a key is there already. Otherwise SET NX PX each key: 1 if one was there,
# else 0; pcall so that, as in a pipeline, a replay outranks an error reply for another key.
_SCRIPT: Final = b"""\
local n = #ARGV
if redis.call('EXISTS', KEYS[n + 1]) == 0 then
  if n > 0 and redis.call('EXISTS', unpack(KEYS, 1, n)) > 0 then return 1 end
  return 2
end
local replayed, err = 0, nil
for i = 1, n do
  local r = redis.pcall('SET', KEYS[i], '1', 'NX', 'PX', ARGV[i])
  if not r then replayed = 1 elseif r.err then err = err or r end
end
if replayed == 1 or not err then return replayed end
return err
"""
_SCRIPT_SHA: Final = hashlib.sha1(_SCRIPT).hexdigest().encode("ascii")  # what redis names it
# The arguments before numkeys: EVALSHA <sha> (the hot path), EVAL <script> (after NOSCRIPT).
_EVALSHA_ARGS: Final = b"$7\r\nEVALSHA\r\n$40\r\n" + _SCRIPT_SHA + _CRLF
_EVAL_ARGS: Final = b"$4\r\nEVAL\r\n$%d\r\n%b\r\n" % (len(_SCRIPT), _SCRIPT)
_SCRIPT_LOAD: Final = b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$%d\r\n%b\r\n" % (
    len(_SCRIPT), _SCRIPT)  # fmt: skip

# Decoded replies.
_R_OK: Final = 0  # a simple string (+OK, +PONG)
_R_NIL: Final = 1  # $-1: SET NX found the key (a replay)
_R_ZERO: Final = 2  # :0 (the script: FRESH)
_R_ONE: Final = 3  # :1 (the script: REPLAYED)
_R_ERR: Final = 4  # -ERR ..., -OOM ..., -NOAUTH ...
_R_BULK: Final = 5  # a bulk string: only SCRIPT LOAD's answer (the sha)
_R_TWO: Final = 6  # :2 (the script: NONCE_UNKNOWN)
_R_INT: Final = 7  # any other integer
_R_NOSCRIPT: Final = 8  # -NOSCRIPT: redis lost the script (SCRIPT FLUSH, a failover, ...)

# Pending-entry kinds.
_K_CHECK: Final = 0  # a check: result counted, `done(code)`
_K_IGNORE: Final = 1  # fire-and-forget (add_nonce): replies consumed, errors counted
_K_INTERNAL: Final = 2  # set-up (AUTH/SELECT/PING/SCRIPT LOAD): `done(code)`, not counted
_K_SCRIPT: Final = 3  # SCRIPT LOAD again after a NOSCRIPT: like _K_IGNORE

# Entry state bits.
_S_REPLAYED: Final = 1
_S_ERROR: Final = 2
_S_NONCE_UNKNOWN: Final = 4
_S_RETRIED: Final = 8  # the script check was sent again with EVAL (after NOSCRIPT)

# Replies to our commands are a few bytes; more undecoded bytes than this are not redis.
_MAX_BUFFER: Final = 64 * 1024
_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 2.0
_WARN_EVERY: Final = 60.0  # seconds between repeated "still cannot connect" warnings


class _ProtocolError(Exception):
    pass


class _SetupError(Exception):
    pass


class _Pending:
    """One request on the connection, waiting for ``left`` replies (matched FIFO)."""

    __slots__ = ("deadline", "done", "kind", "left", "script", "seq", "started", "state")

    def __init__(self, kind: int, done: Done | None, left: int, script: bytes | None,
                 started: float, deadline: float, seq: int) -> None:  # fmt: skip
        self.kind = kind
        self.done = done
        self.left = left
        # A check with a nonce: its EVALSHA command (one reply, the code), kept to send it
        # again as EVAL after a NOSCRIPT reply. None: one reply per SET NX PX.
        self.script = script
        self.started = started
        self.deadline = deadline
        self.seq = seq
        self.state = 0

    def code(self) -> int:
        state = self.state
        if state & _S_REPLAYED:  # a definite "seen before" outranks an error on another key
            return REPLAYED
        if state & _S_ERROR:
            return UNAVAILABLE
        if state & _S_NONCE_UNKNOWN:
            return NONCE_UNKNOWN
        return FRESH


class _Connection(asyncio.Protocol):
    """One redis connection: writes pipelined commands, decodes RESP2 replies, hands each to
    the oldest pending entry (redis answers in order)."""

    __slots__ = ("buf", "closed", "last_error", "pending", "ready", "reloading", "store",
                 "transport")  # fmt: skip

    def __init__(self, store: RedisReplayStore) -> None:
        self.store = store
        self.transport: asyncio.Transport | None = None
        self.pending: deque[_Pending] = deque()
        self.buf = bytearray()
        self.closed = False
        self.ready = False  # set-up done: checks may use it
        self.reloading = False  # a SCRIPT LOAD after a NOSCRIPT is in flight
        self.last_error = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check)
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            reason = f"connection lost: {exc}" if exc else "connection closed by redis"
            self.store._broken(self, ERR_CONNECTION, reason)

    def send(self, data: bytes, entry: _Pending, then: _Pending | None = None) -> None:
        """One write; ``entry`` (and ``then``, for commands after entry's) wait for replies."""
        self.pending.append(entry)
        if then is not None:
            self.pending.append(then)
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        pos, n = 0, len(data)
        pending = self.pending
        error_line = b""
        try:
            while pos < n:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    break
                t = data[pos]
                nxt = end + 2
                if t == 43:  # "+"
                    reply = _R_OK
                elif t == 58:  # ":"
                    value = int(data[pos + 1:end])
                    reply = (_R_ZERO if value == 0 else _R_ONE if value == 1 else
                             _R_TWO if value == 2 else _R_INT)  # fmt: skip
                elif t == 36:  # "$"
                    length = int(data[pos + 1:end])
                    if length == -1:
                        reply = _R_NIL
                    elif length < 0:
                        raise _ProtocolError(f"bad bulk length {length}")
                    else:
                        nxt = end + 2 + length + 2
                        if nxt > n:
                            if n - pos > _MAX_BUFFER:
                                raise _ProtocolError("oversized bulk reply")
                            break
                        if data[nxt - 2:nxt] != b"\r\n":
                            raise _ProtocolError("bulk reply not terminated by CRLF")
                        reply = _R_BULK
                elif t == 45:  # "-"
                    reply = _R_NOSCRIPT if data.startswith(b"NOSCRIPT", pos + 1) else _R_ERR
                    error_line = data[pos + 1:end][:200]
                else:
                    raise _ProtocolError(f"unexpected reply type {data[pos:pos + 1]!r}")
                pos = nxt
                if not pending:
                    raise _ProtocolError("a reply nobody asked for")
                entry = pending[0]
                if reply in (_R_ERR, _R_NOSCRIPT) and not entry.state & _S_ERROR:
                    # The first error of an entry is the telling one (a wrong AUTH also
                    # makes the PING after it fail, with NOAUTH).
                    self.last_error = error_line.decode("utf-8", "replace")
                self._apply(entry, reply)
                if self.closed:  # a `done` closed the store, or the connection broke
                    return
        except (ValueError, _ProtocolError) as exc:
            self.store._broken(self, ERR_PROTOCOL, f"protocol error: {exc}")
            return
        if pos < n:
            if n - pos > _MAX_BUFFER:
                self.store._broken(self, ERR_PROTOCOL, "protocol error: reply line too long")
                return
            buf += data[pos:]

    def _apply(self, entry: _Pending, reply: int) -> None:
        kind = entry.kind
        if kind == _K_CHECK:
            if entry.script is not None:  # EVALSHA / EVAL: one integer, the code
                if reply == _R_ZERO:
                    pass
                elif reply == _R_ONE:
                    entry.state |= _S_REPLAYED
                elif reply == _R_TWO:
                    entry.state |= _S_NONCE_UNKNOWN
                elif reply == _R_NOSCRIPT and not entry.state & _S_RETRIED:
                    # Nothing ran: safe to send again, at the back of the queue.
                    self.pending.popleft()
                    entry.state |= _S_RETRIED
                    self.store._eval(self, entry)
                    return
                else:
                    entry.state |= _S_ERROR
            elif reply == _R_NIL:  # SET NX did not set: the key was there
                entry.state |= _S_REPLAYED
            elif reply != _R_OK:
                entry.state |= _S_ERROR
        elif kind == _K_SCRIPT or (kind == _K_INTERNAL and entry.left == 1):
            if reply != _R_BULK:  # SCRIPT LOAD (the set-up's last command): the sha
                entry.state |= _S_ERROR
        elif reply in (_R_ERR, _R_NOSCRIPT, _R_BULK):
            entry.state |= _S_ERROR
        entry.left -= 1
        if entry.left == 0:
            self.pending.popleft()
            self.store._finish(entry, entry.code(), self)


# -- redis: store --------------------------------------------------------------------------------


class RedisReplayStore:
    """The shared store: one pipelined RESP2 connection to redis.

    * One check = one ``transport.write`` of all its commands, one round trip; replies are
      matched FIFO to the pending entries (a deque), so any number of checks share the
      connection without a lock or a per-request future. A check with a nonce is one
      ``EVALSHA`` (one reply: the code); on ``NOSCRIPT`` (nothing ran) it is written again
      as ``EVAL`` with the script text, with ``SCRIPT LOAD`` (one in flight at a time), and
      goes to the back of the queue with a fresh deadline: a second round trip, rare.
    * No per-request timers: one sweep every ``timeout / 2`` looks at the oldest pending
      entry; past its deadline (and written before the previous sweep, so the loop has read
      the socket since - a stalled loop must not look like a dead redis) the connection is
      declared broken: every pending check gets UNAVAILABLE, the transport is closed and a
      reconnect is scheduled. A check waits at most ~1.5 x timeout.
    * Disconnected: ``check`` answers UNAVAILABLE at once. Reconnects back off exponentially
      (0.05 s doubling to 2 s, reset by a connection whose set-up succeeded).
    * On connect: ``AUTH`` (with the user when given), ``SELECT db`` (when db != 0, so a proxy
      without SELECT works with db 0), ``PING`` and ``SCRIPT LOAD`` of the check script;
      checks use the connection only after all were answered OK (a user the ACL denies
      scripting cannot connect: logged, retried). Nonces added through this object that
      are still valid are written again (a restarted redis without persistence lost them).
      The ACL needs: ``AUTH SELECT PING SET EXISTS EVALSHA EVAL SCRIPT|LOAD``.
    """

    __slots__ = ("_address", "_clock", "_conn", "_connect_timeout", "_connector", "_delay",
                 "_first", "_hooks", "_interval", "_last_err_warn", "_last_warn", "_loop",
                 "_nonce_prefix", "_nonces", "_prefix", "_seq", "_setup", "_ssl", "_stopping",
                 "_streak", "_sweep_handle", "_swept_seq", "_timeout", "fail_open",
                 "shared")  # fmt: skip

    def __init__(self, url: str, *, key_prefix: str = "fastgate:", timeout: float = 0.05,
                 on_error: str = "fail_closed", clock: Callable[[], float] = time.monotonic,
                 metrics: object | None = None) -> None:  # fmt: skip
        if on_error not in ("fail_closed", "fail_open"):
            raise ValueError(f"replay_store.redis.on_error must be fail_closed or fail_open, "
                             f"got {on_error!r}")  # fmt: skip
        if not (isinstance(timeout, int | float) and 0 < timeout < math.inf):
            raise ValueError(f"replay_store.redis.timeout must be positive, got {timeout!r}")
        self._address = parse_redis_url(url)
        self.shared = True
        self.fail_open = on_error == "fail_open"
        self._prefix = key_prefix.encode("utf-8")
        self._nonce_prefix = self._prefix + b"n:"
        self._timeout = float(timeout)
        self._interval = self._timeout / 2
        # Connecting (TCP, TLS, set-up round trip) may take longer than one check's round trip.
        self._connect_timeout = max(1.0, 10 * self._timeout)
        self._clock = clock
        self._hooks = _Hooks(metrics)
        self._ssl = ssl.create_default_context() if self._address.tls else None
        self._setup = self._setup_commands()
        self._conn: _Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connector: asyncio.Task[None] | None = None
        self._first: asyncio.Future[None] | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._seq = 0  # writes so far
        self._swept_seq = 0  # writes before the last sweep
        self._delay = _BACKOFF_MIN
        self._streak = 0  # failed connect attempts in a row
        self._last_warn = -math.inf
        self._last_err_warn = -math.inf
        self._stopping = False
        self._nonces: dict[bytes, float] = {}  # nonce -> expiry (clock): re-sent on reconnect

    @property
    def address(self) -> RedisAddress:
        return self._address

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _setup_commands(self) -> list[bytes]:
        a = self._address
        cmds = []
        if a.password is not None:
            enc = a.password.encode("utf-8")
            cmds.append(encode_command(b"AUTH", a.username.encode("utf-8"), enc) if a.username
                        else encode_command(b"AUTH", enc))  # fmt: skip
        if a.db:
            cmds.append(encode_command(b"SELECT", b"%d" % a.db))
        cmds.append(encode_command(b"PING"))  # proof of a live, authenticated redis
        cmds.append(_SCRIPT_LOAD)  # last: _apply expects its bulk reply (the sha) there
        return cmds

    # -- hot path --------------------------------------------------------------------------

    def check(self, keys: Keys, nonce: bytes | None, done: Done) -> int:
        """PENDING (``done(code)`` follows on the loop, exactly once), or UNAVAILABLE at once
        when disconnected, or FRESH at once for a check with nothing to ask.

        Without a nonce: ``SET NX PX`` per key, pipelined (one reply each). With one: one
        ``EVALSHA`` of the script (one reply, the code), nothing written if it is unknown."""
        conn = self._conn
        if conn is None:
            self._hooks.result(STORE_REDIS, UNAVAILABLE)
            return UNAVAILABLE
        prefix = self._prefix
        script: bytes | None = None
        if nonce is None:
            parts: list[bytes] = []
            n = 0
            for key, ttl in keys:
                k = prefix + key
                ms = _millis(ttl)
                parts += (_SET_HEAD, b"%d\r\n" % len(k), k, _SET_MID, b"%d\r\n" % len(ms), ms,
                          _CRLF)  # fmt: skip
                n += 1
            if n == 0:
                self._hooks.result(STORE_REDIS, FRESH)
                return FRESH
            data = b"".join(parts)
        else:
            # EVALSHA <sha> <n+1> <key>... <nonce key> <ms>...: 2n + 4 arguments.
            n = len(keys)
            numkeys = b"%d" % (n + 1)
            parts = [b"*%d\r\n" % (2 * n + 4), _EVALSHA_ARGS, b"$%d\r\n" % len(numkeys),
                     numkeys, _CRLF]  # fmt: skip
            ttls: list[bytes] = []
            for key, ttl in keys:
                k = prefix + key
                ms = _millis(ttl)
                parts += (b"$%d\r\n" % len(k), k, _CRLF)
                ttls += (b"$%d\r\n" % len(ms), ms, _CRLF)
            k = self._nonce_prefix + nonce
            parts += (b"$%d\r\n" % len(k), k, _CRLF)
            parts += ttls
            data = script = b"".join(parts)
            n = 1
        now = self._clock()
        seq = self._seq
        self._seq = seq + 1
        conn.send(data, _Pending(_K_CHECK, done, n, script, now, now + self._timeout, seq))
        return PENDING

    def _eval(self, conn: _Connection, entry: _Pending) -> None:
        """A NOSCRIPT reply to a check's EVALSHA (redis lost its scripts: SCRIPT FLUSH, a
        restart or failover behind a proxy): the check once more as EVAL with the script
        text, and SCRIPT LOAD again (once at a time per connection), in one write; answered
        after what is pending already, with a fresh deadline (a second round trip)."""
        old = entry.script
        assert old is not None
        head = old.index(b"\r\n") + 2  # *<count>\r\n: the same for EVAL
        data = old[:head] + _EVAL_ARGS + old[head + len(_EVALSHA_ARGS):]
        now = self._clock()
        seq = self._seq
        self._seq = seq + 1
        entry.seq = seq
        entry.deadline = now + self._timeout
        reload = None
        if not conn.reloading:
            conn.reloading = True
            data += _SCRIPT_LOAD
            reload = _Pending(_K_SCRIPT, None, 1, None, now, now + self._timeout, seq)
        conn.send(data, entry, reload)

    def add_nonce(self, nonce: bytes, ttl: float) -> None:
        """``SET <prefix>n:<nonce> 1 PX <ms>``, fire-and-forget (remembered here too, and
        written again after a reconnect while it is valid)."""
        now = self._clock()
        for old in [n for n, exp in self._nonces.items() if exp <= now]:
            del self._nonces[old]
        self._nonces[nonce] = now + _ttl(ttl)
        conn = self._conn
        if conn is not None:
            self._send_nonce(conn, nonce, ttl, now)

    def _send_nonce(self, conn: _Connection, nonce: bytes, ttl: float, now: float) -> None:
        data = encode_command(b"SET", self._nonce_prefix + nonce, b"1", b"PX", _millis(ttl))
        seq = self._seq
        self._seq = seq + 1
        conn.send(data, _Pending(_K_IGNORE, None, 1, None, now, now + self._timeout, seq))

    def _finish(self, entry: _Pending, code: int, conn: _Connection) -> None:
        """An entry is complete (answered, or failed with UNAVAILABLE)."""
        if entry.kind == _K_CHECK:
            hooks = self._hooks
            if entry.state & _S_ERROR:
                hooks.error(STORE_REDIS, ERR_PROTOCOL)
                self._error_reply(conn, "check answered unavailable")
            elif code != UNAVAILABLE:
                hooks.observe(self._clock() - entry.started)
            hooks.result(STORE_REDIS, code)
        elif entry.kind == _K_IGNORE:
            if entry.state & _S_ERROR:
                self._hooks.error(STORE_REDIS, ERR_PROTOCOL)
                self._error_reply(conn, "nonce not stored")
            return
        elif entry.kind == _K_SCRIPT:
            conn.reloading = False
            if entry.state & _S_ERROR:
                self._hooks.error(STORE_REDIS, ERR_PROTOCOL)
                self._error_reply(conn, "script not loaded again; checks with a nonce use EVAL")
            return
        done = entry.done
        if done is not None:
            try:
                done(code)
            except Exception:  # one caller's bug must not starve the other pending checks
                log.exception("replay store: a check's done callback raised")

    def _error_reply(self, conn: _Connection, what: str) -> None:
        # An OOM redis answers every check with an error: one warning a while, not one each.
        now = self._clock()
        if now - self._last_err_warn >= _WARN_EVERY / 6:
            self._last_err_warn = now
            log.warning("replay store %s: error reply (%s): %s", self._address, what,
                        conn.last_error)  # fmt: skip

    # -- failures, reconnects --------------------------------------------------------------

    def _broken(self, conn: _Connection, kind: int | None, reason: str) -> None:
        """Drop a connection: every pending entry gets UNAVAILABLE, a reconnect follows.
        ``kind`` None: closed on purpose (not counted, not logged)."""
        if conn.closed:
            return
        was_ready = conn.ready
        conn.abort()
        if self._conn is conn:
            self._conn = None
        pending, conn.pending = conn.pending, deque()
        if was_ready and kind is not None:
            self._hooks.error(STORE_REDIS, kind)
            log.warning("replay store %s: %s; %d checks answered unavailable, reconnecting",
                        self._address, reason, len(pending))  # fmt: skip
        elif not was_ready:
            conn.last_error = conn.last_error or reason
        for entry in pending:
            self._finish(entry, UNAVAILABLE, conn)
        if was_ready:
            self._schedule_connect(wait=True)

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        self._sweep_handle = loop.call_later(self._interval, self._sweep)
        seen, self._swept_seq = self._swept_seq, self._seq
        conn = self._conn
        if conn is None or not conn.pending:
            return
        head = conn.pending[0]
        if head.seq < seen and head.deadline < self._clock():
            self._broken(conn, ERR_TIMEOUT,
                         f"no reply within {self._timeout * 1000:g} ms")  # fmt: skip

    def _schedule_connect(self, *, wait: bool) -> None:
        if self._stopping or self._loop is None:
            return
        if self._connector is not None and not self._connector.done():
            return
        self._connector = self._loop.create_task(self._connect_loop(wait))

    async def _connect_loop(self, wait: bool) -> None:
        while not self._stopping:
            if wait:
                await asyncio.sleep(self._delay)
                self._delay = min(self._delay * 2, _BACKOFF_MAX)
            wait = True
            conn = _Connection(self)
            try:
                await asyncio.wait_for(self._open(conn), self._connect_timeout)
            except asyncio.CancelledError:
                conn.abort()
                raise
            except (OSError, TimeoutError, _SetupError) as exc:
                conn.abort()
                self._connect_failed(exc)
                continue
            self._connected(conn)
            return

    async def _open(self, conn: _Connection) -> None:
        loop = asyncio.get_running_loop()
        a = self._address
        transport: asyncio.Transport
        if a.path is not None:
            transport, _ = await loop.create_unix_connection(lambda: conn, a.path)
        else:
            assert a.host is not None
            transport, _ = await loop.create_connection(
                lambda: conn, a.host, a.port, ssl=self._ssl,
                server_hostname=a.host if self._ssl else None)
        conn.transport = transport  # (uvloop may call connection_made only later)
        done: asyncio.Future[int] = loop.create_future()

        def answered(code: int) -> None:
            if not done.done():
                done.set_result(code)

        now = self._clock()
        seq = self._seq
        self._seq = seq + 1
        conn.send(b"".join(self._setup), _Pending(_K_INTERNAL, answered, len(self._setup),
                                                  None, now, now + self._connect_timeout, seq))
        if await done != FRESH:
            raise _SetupError(conn.last_error or "connection set-up failed")

    def _connect_failed(self, exc: BaseException) -> None:
        self._hooks.error(STORE_REDIS, ERR_CONNECTION)
        self._streak += 1
        now = self._clock()
        what = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        if self._streak == 1 or now - self._last_warn >= _WARN_EVERY:
            self._last_warn = now
            log.warning("replay store %s: cannot connect (%s; failed attempts in a row: %d); "
                        "checks answer unavailable (%s) until it is back", self._address, what,
                        self._streak, "admitted" if self.fail_open else "503")  # fmt: skip
        else:
            log.debug("replay store %s: cannot connect: %s", self._address, what)
        self._first_attempt_done()

    def _connected(self, conn: _Connection) -> None:
        conn.ready = True
        self._conn = conn
        self._delay = _BACKOFF_MIN
        if self._streak:
            log.info("replay store %s: connected after %d failed attempts", self._address,
                     self._streak)  # fmt: skip
        else:
            log.info("replay store %s: connected", self._address)
        self._streak = 0
        now = self._clock()
        for nonce, expires in list(self._nonces.items()):
            if expires > now:
                self._send_nonce(conn, nonce, expires - now, now)
            else:
                del self._nonces[nonce]
        self._first_attempt_done()

    def _first_attempt_done(self) -> None:
        first = self._first
        if first is not None and not first.done():
            first.set_result(None)

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting and the timeout sweep; returns after the first connect attempt
        (connected or not: a redis that is down at start is logged and retried, it does not
        stop the gateway; checks answer UNAVAILABLE meanwhile)."""
        if self._loop is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._sweep_handle = loop.call_later(self._interval, self._sweep)
        self._first = loop.create_future()
        self._schedule_connect(wait=False)
        await asyncio.shield(self._first)

    async def close(self) -> None:
        """Let pending checks finish (up to ~2 x timeout), then drop the connection (what is
        still pending gets UNAVAILABLE)."""
        self._stopping = True
        conn = self._conn
        if conn is not None and conn.pending:
            deadline = self._clock() + 2 * self._timeout
            while conn.pending and not conn.closed and self._clock() < deadline:
                await asyncio.sleep(min(0.005, self._interval))
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None
        await cancel_and_wait(self._connector)
        self._connector = None
        self._first_attempt_done()
        conn = self._conn
        if conn is not None:
            self._broken(conn, None, "closed")
        self._loop = None
        await asyncio.sleep(0)  # let the transport's close run


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
