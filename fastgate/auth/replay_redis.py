"""The shared replay store: :class:`RedisReplayStore`, on one pipelined RESP2 connection.

What it sends (``SET NX PX`` per key, or the nonce script by ``EVALSHA``), how a check's
replies become its result code, timeouts by one sweep, reconnects with back-off, and the
nonces written again after a reconnect; the address, the encoding and the connection itself
are ``fastgate.auth.redis_resp``'s. The semantics shared with the memory store are described
in ``fastgate.auth.replay``, which re-exports this class.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Final

from fastgate.auth.redis_resp import (
    _CRLF,
    _K_CHECK,
    _K_IGNORE,
    _K_INTERNAL,
    _K_SCRIPT,
    _S_ERROR,
    _SET_HEAD,
    _SET_MID,
    RedisAddress,
    _Connection,
    _millis,
    _Pending,
    encode_command,
    parse_redis_url,
)
from fastgate.auth.replay_codes import (
    ERR_CONNECTION,
    ERR_PROTOCOL,
    ERR_TIMEOUT,
    FRESH,
    PENDING,
    STORE_REDIS,
    UNAVAILABLE,
    Done,
    Keys,
    _Hooks,
    _ttl,
)
from fastgate.tasks import cancel_and_wait

__all__ = ["RedisReplayStore"]

log = logging.getLogger("fastgate.replay")

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

_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 2.0
_WARN_EVERY: Final = 60.0  # seconds between repeated "still cannot connect" warnings


class _SetupError(Exception):
    pass


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
