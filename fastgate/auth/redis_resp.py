"""The redis wire: RESP2 encoding and one connection (the address it connects to is
:func:`fastgate.config.redisurl.parse_redis_url`'s, re-exported here).

Owns :func:`encode_command` and the pieces the
store's hot path joins (``SET NX PX``, the ttl in ms), and :class:`_Connection`: an asyncio
protocol that writes pipelined commands, decodes RESP2 replies (simple strings, integers,
bulk strings, errors; nothing else is asked for) and hands each to the oldest pending entry
(:class:`_Pending`, matched FIFO). What a complete entry means is its owner's:
:class:`fastgate.auth.replay_redis.RedisReplayStore` (through :class:`_Owner`, so this module
does not import the store).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from typing import Final, Protocol, cast

from fastgate.auth.replay_codes import (
    ERR_CONNECTION,
    ERR_PROTOCOL,
    FRESH,
    NONCE_UNKNOWN,
    REPLAYED,
    UNAVAILABLE,
    Done,
    _ttl,
)
from fastgate.config.redisurl import RedisAddress as RedisAddress
from fastgate.config.redisurl import parse_redis_url as parse_redis_url

__all__ = ["RedisAddress", "encode_command", "parse_redis_url"]


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


class _ProtocolError(Exception):
    pass


class _Owner(Protocol):
    """What a connection calls back: the store that owns it (``RedisReplayStore``)."""

    def _broken(self, conn: _Connection, kind: int | None, reason: str) -> None: ...

    def _eval(self, conn: _Connection, entry: _Pending) -> None: ...

    def _finish(self, entry: _Pending, code: int, conn: _Connection) -> None: ...


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

    def __init__(self, store: _Owner) -> None:
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
