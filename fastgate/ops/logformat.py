"""Operational log lines: ``text`` (the default) or ``json`` (``log_format`` / ``--log-format``).

JSON lines are shaped like the access log's: one object per line with ``time`` (RFC 3339 §5.6
UTC, milliseconds), ``level``, ``logger``, ``message`` and ``worker`` (the worker index, null in
the master or a single-process gateway), plus ``exception`` when a traceback is logged. The
message is JSON-escaped by orjson, so a CR/LF in a logged value (a hostile kid, an upstream's
error text) cannot start a forged line.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import orjson

LOG_FORMATS: Final = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, without a trailing newline (the handler adds it)."""

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        ms = round(record.created * 1_000_000) // 1000  # whole microseconds first, as datetime
        sec, frac = divmod(ms, 1000)
        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "worker": self.worker,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        try:
            return orjson.dumps(out).decode("utf-8")
        except orjson.JSONEncodeError:
            # Lone surrogates (undecodable bytes in a message) are not UTF-8: show them escaped.
            return orjson.dumps({k: v.encode("utf-8", "backslashreplace").decode()
                                 if isinstance(v, str) else v
                                 for k, v in out.items()}).decode("utf-8")


def text_formatter(role: str) -> logging.Formatter:
    """Plain lines: a supervisor such as systemd or a container runtime adds its own time."""
    tag = f" {role}" if role else ""
    return logging.Formatter(
        f"%(asctime)s fastgate[%(process)d]{tag} %(levelname)s %(name)s: %(message)s")


def formatter(fmt: str, worker: int | None) -> logging.Formatter:
    """The formatter for ``fmt`` (one of :data:`LOG_FORMATS`); ValueError for anything else."""
    if fmt == "json":
        return JsonFormatter(worker)
    if fmt == "text":
        return text_formatter(f"worker {worker}" if worker is not None else "")
    raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
