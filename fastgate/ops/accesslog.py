"""JSON access log: one line per request, written through a buffer.

A line holds ``time`` (RFC 3339 UTC, milliseconds), ``worker``, ``route`` (configured name or
null), ``method``, ``path``, ``status``, ``reason`` (``Reason.label`` of a reject, else null),
``latency_s`` and ``upstream_latency_s`` (seconds as floats, null when the upstream was not
reached), ``upstream_status`` (the upstream's status, null when the gateway answered itself),
``client`` (the peer address, or from a ``trusted_proxies`` peer the address it put last in
X-Forwarded-For), ``bytes_in`` / ``bytes_out`` (request head fields and body received,
response bytes written), ``user_agent`` (capped at :data:`MAX_USER_AGENT`), ``request_id``
(the X-Request-Id forwarded) and ``trace_id`` (of the W3C traceparent forwarded). What is never
written: the token, the API key, any other header, and the query string
(query strings carry ``access_token`` / ``api_key``, SPEC §2 ``token_from``); the path is cut
at ``?`` even when the caller passed the whole request target, and capped at
:data:`MAX_PATH` characters. Untrusted strings (path, method) are JSON-escaped by orjson, so
CR/LF, ANSI escapes and quotes in a hostile path cannot forge or break a line; DEL and the C1
controls, which JSON leaves raw, are percent-encoded.

``reason`` may be a Reason or the label string the data plane has for its answer; only
SPEC §4 reject reasons are logged (its own ``not_found``, ``bad_gateway``, ... become null:
the status says as much).

Sampling (``access_log.sample`` < 1): requests that succeeded are logged with that
probability; auth rejects (a SPEC §4 reason) and server errors (status >= 500) are always
logged, since they are what an operator investigates. Other answers, 4xx included (no route,
method not allowed, an upstream's own 4xx), are sampled like successes, so a scanner cannot
flood the log at full rate.

Lines go to a buffer, written when it reaches ``buffer_bytes`` and every ``flush_interval``
seconds (``start()``), and on ``stop()``: not one syscall per request. Up to one interval of
lines is lost if the process is killed. When the stream is a pipe or a socket (stdout under a
container runtime), writes are cut at line boundaries into pieces of at most ``PIPE_BUF``
bytes, which the kernel keeps whole when several workers share the pipe. A failing stream
(EPIPE, disk full) drops lines, never a request; the drops are counted and logged once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import select
import stat
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any, Final

import orjson

from fastgate.config import AccessLogConfig
from fastgate.tasks import cancel_and_wait
from fastgate.token.reasons import REJECT_REASONS, Reason

__all__ = ["MAX_METHOD", "MAX_PATH", "AccessLog", "RequestLogAdapter"]

log = logging.getLogger("fastgate.accesslog")

MAX_PATH: Final = 1024
MAX_METHOD: Final = 32
MAX_USER_AGENT: Final = 256
_PIPE_BUF: Final = getattr(select, "PIPE_BUF", 512)
_REJECT_LABELS: Final = frozenset(r.label for r in REJECT_REASONS)


class AccessLog:
    """The access log of one worker.

    ``stream`` (binary, with ``write``/``flush``) overrides ``config.path``; by default the log
    goes to ``config.path`` (opened for appending, closed by ``stop``) or to stdout. ``rng``
    decides sampling (inject a seeded ``random.Random`` in tests), ``clock`` gives the
    wall-clock time of a line.
    """

    def __init__(
        self,
        config: AccessLogConfig,
        worker: int,
        stream: IO[bytes] | None = None,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        flush_interval: float = 1.0,
        buffer_bytes: int = 64 * 1024,
    ) -> None:
        self.enabled = config.enabled
        self._sample = config.sample
        self._worker = worker
        self._random = (rng or random.Random()).random
        self._clock = clock
        self._flush_interval = flush_interval
        self._limit = buffer_bytes
        self._buf: list[bytes] = []
        self._size = 0
        self._ms = self._sec = -1
        self._ms_text = self._sec_text = ""
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.dropped = 0
        """Lines lost because the stream failed."""
        self._owned = False
        self._stream: IO[bytes] | None = None
        self._piece = 0
        if not self.enabled:
            return
        if stream is not None:
            self._stream = stream
        elif config.path is not None:
            self._stream = open(config.path, "ab")  # noqa: SIM115 - closed by stop()
            self._owned = True
        else:
            self._stream = sys.stdout.buffer
        self._piece = _atomic_piece(self._stream)

    def log(
        self,
        route: str | None,
        method: str,
        path: str,
        status: int,
        reason: Reason | str | None,
        latency: float,
        upstream_latency: float | None = None,
        *,
        upstream_status: int | None = None,
        client: str | None = None,
        bytes_in: int | None = None,
        bytes_out: int | None = None,
        user_agent: str | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Record one request.

        ``reason``: the Reason of a reject (None or Reason.OK when admitted), or the data
        plane's label string for its answer (``"token_expired"``, ``"not_found"``, ...).
        """
        if not self.enabled:
            return
        # Only the closed set of SPEC §4 reasons is logged (the same labels as in bodies and
        # metrics); the data plane's other answer labels (not_found, bad_gateway, ...) say
        # nothing the status does not.
        label = reason.label if isinstance(reason, Reason) else reason
        if label not in _REJECT_LABELS:
            label = None
        if status < 500 and label is None and self._sample < 1.0 and self._random() >= self._sample:
            return
        t = self._clock()
        record: dict[str, Any] = {
            "time": self._timestamp(t),
            "worker": self._worker,
            "route": route,
            "method": _untrusted(method, MAX_METHOD),
            "path": _clean_path(path),
            "status": status,
            "reason": label,
            "latency_s": _micros(latency),
            "upstream_latency_s": None if upstream_latency is None else _micros(upstream_latency),
            "upstream_status": upstream_status,
            "client": None if client is None else _untrusted(client, MAX_METHOD * 2),
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "user_agent": None if user_agent is None else _untrusted(user_agent, MAX_USER_AGENT),
            "request_id": request_id,
            "trace_id": trace_id,
        }
        try:
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            # Lone surrogates (undecodable bytes) are not UTF-8: show them as escapes.
            for key in ("route", "method", "path", "client", "user_agent"):
                if isinstance(record[key], str):
                    record[key] = record[key].encode("utf-8", "backslashreplace").decode()
            line = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        self._buf.append(line)
        self._size += len(line)
        if self._size >= self._limit:
            self.flush()

    def _timestamp(self, t: float) -> str:
        # RFC 3339 §5.6 with milliseconds, formatted once per millisecond (lines share it at
        # high rates). Whole microseconds first, as datetime does: int(t * 1000) would turn
        # x.123 into x.122 through float error.
        ms = round(t * 1_000_000) // 1000
        if ms != self._ms:
            self._ms = ms
            sec, frac = divmod(ms, 1000)
            if sec != self._sec:
                self._sec = sec
                self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self._ms_text = f"{self._sec_text}.{frac:03d}Z"
        return self._ms_text

    def flush(self) -> None:
        """Write the buffered lines now."""
        if not self._buf or self._stream is None:
            return
        lines, self._buf, self._size = self._buf, [], 0
        data = b"".join(lines)
        try:
            for piece in _pieces(data, self._piece):
                self._stream.write(piece)
                self._stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed under us
            self.dropped += len(lines)
            if not self._failing:
                self._failing = True
                log.warning("access log: writing failed (%s); dropping lines", exc)
            return
        if self._failing:
            self._failing = False
            log.warning("access log: writing works again (%d lines dropped)", self.dropped)

    def start(self) -> None:
        """Flush every ``flush_interval`` seconds on the running loop."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._flush_every())

    async def stop(self) -> None:
        """Stop the timer, write what is buffered, close the file this log opened."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self.close()

    def close(self) -> None:
        """Synchronous ``stop`` without the timer (for a process that is exiting)."""
        self.flush()
        if self._owned and self._stream is not None:
            self._stream.close()
            self._stream = None

    async def _flush_every(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            self.flush()


# JSON leaves DEL and the C1 controls (U+0080-U+009F, e.g. U+009B "CSI") raw; some terminals
# act on them. They are invalid in a request target anyway (RFC 9112 §3.2): percent-encode.
_C1_TABLE: Final = {c: f"%{c:02X}" for c in range(0x7F, 0xA0)}


def _untrusted(text: str, cap: int) -> str:
    text = text[:cap]
    if "\x7f" in text or not text.isascii():
        text = text.translate(_C1_TABLE)
    return text


class RequestLogAdapter:
    """:class:`AccessLog` behind the data plane's sink protocol
    (``fastgate.dataplane.proxy.AccessLog``):
    ``log(exchange, *, route, status, reason, duration, upstream_latency)``. What the line says
    of the request comes from the exchange (``fastgate.dataplane._http.Exchange``): method,
    ``raw_path``
    (as received, percent-encoding kept; its query is cut off), ``upstream_status``,
    ``client``, ``bytes_in``, ``bytes_out``, ``user_agent``."""

    __slots__ = ("_log",)

    def __init__(self, access_log: AccessLog) -> None:
        self._log = access_log.log

    def log(
        self,
        request: Any,
        *,
        route: str | None,
        status: int,
        reason: str | None,
        duration: float,
        upstream_latency: float | None = None,
    ) -> None:
        self._log(route, request.method, request.raw_path, status, reason, duration,
                  upstream_latency, upstream_status=request.upstream_status or None,
                  client=request.client, bytes_in=request.bytes_in,
                  bytes_out=request.bytes_out, user_agent=request.user_agent,
                  request_id=None if request.request_id is None
                  else request.request_id.decode("ascii"),
                  trace_id=request.trace_id)


def _micros(seconds: float) -> float:
    """Seconds rounded to the microsecond (round(x, 6) is several times slower)."""
    return int(seconds * 1_000_000 + 0.5) / 1_000_000


def _clean_path(path: str) -> str:
    """The path without query or fragment, capped: query strings carry tokens and API keys."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return _untrusted(path, MAX_PATH)


def _atomic_piece(stream: Any) -> int:
    """Largest write the kernel keeps whole for this stream (0: no limit, a regular file)."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return 0  # in-memory stream
    return 0 if stat.S_ISREG(mode) else _PIPE_BUF


def _pieces(data: bytes, limit: int) -> Iterator[bytes]:
    """``data`` cut at line ends into pieces of at most ``limit`` bytes (0: one piece).

    A single line longer than ``limit`` is its own piece (it cannot be kept whole anyway).
    """
    if not limit or len(data) <= limit:
        yield data
        return
    start = 0
    while start < len(data):
        end = start + limit
        if end >= len(data):
            yield data[start:]
            return
        cut = data.rfind(b"\n", start, end)
        if cut < 0:  # one line longer than the limit
            cut = data.find(b"\n", end)
            if cut < 0:
                yield data[start:]
                return
        yield data[start : cut + 1]
        start = cut + 1
