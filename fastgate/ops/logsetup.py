"""Logging of the ``fastgate run`` processes: the level, the format, the start-up error lines.

Owns: ``$FASTGATE_LOG_LEVEL`` / ``$FASTGATE_LOG_FORMAT`` (set by
:func:`fastgate.ops.supervisor.run` from ``--log-level`` / ``--log-format``; the workers
inherit them), the one stderr handler each process installs, and the "cannot start" lines of
the single process and the master. The line formats themselves: ``fastgate.ops.logformat``.
All of the process-model modules log as ``fastgate.supervisor``.
May import: ``fastgate.ops.logformat``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Final

from fastgate.ops.logformat import LOG_FORMATS, formatter

log = logging.getLogger("fastgate.supervisor")

LOG_LEVEL_ENV: Final = "FASTGATE_LOG_LEVEL"
LOG_FORMAT_ENV: Final = "FASTGATE_LOG_FORMAT"
"""Log level when ``--log-level`` is not given (debug, info, warning, error); default info."""
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def resolve_log_level(name: str | None) -> str:
    """``name``, else ``$FASTGATE_LOG_LEVEL``, else info; ValueError for anything else."""
    value = (name if name is not None else os.environ.get(LOG_LEVEL_ENV) or "info").lower()
    if value not in LOG_LEVELS:
        source = "--log-level" if name is not None else LOG_LEVEL_ENV
        raise ValueError(f"{source}: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value


def _setup_logging(worker: int | None) -> None:
    """Lines on stderr (a supervisor such as systemd or a container runtime collects them):
    plain text where the process id and role tell the workers apart, or one JSON object per
    line (fastgate/ops/logformat.py). The level comes from ``$FASTGATE_LOG_LEVEL`` (set by
    :func:`run` from ``--log-level``), the format from ``$FASTGATE_LOG_FORMAT`` (set by
    :func:`run` from ``--log-format`` or the config's ``log_format``)."""
    root = logging.getLogger()
    if root.handlers:
        return  # embedded: the host application configured logging
    try:
        level = resolve_log_level(None)
    except ValueError:
        level = "info"  # run() reported it already; a worker never fails over its log level
    fmt = os.environ.get(LOG_FORMAT_ENV, "text")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt if fmt in LOG_FORMATS else "text", worker))
    root.addHandler(handler)
    root.setLevel(level.upper())


def _log_start_errors(source: str | None, errors: list[str]) -> None:
    log.error("cannot start (%s):\n%s", source or "config",
              "\n".join(f"  {e}" for e in errors))
