"""Config reloads (``SIGHUP``): reading ``config.source`` again, and what a reload keeps.

Owns: :data:`RESTART_ONLY` (settings bound at start-up: a reload keeps their running values and
a warning names them), re-reading the file (for the master with a dry run of the data-plane
compiler, so an invalid file never reaches a worker), and the reload error lines. Applying the
new config belongs to the caller: ``Gateway.swap`` in the single process and in a worker, the
master's broadcast to its workers (``fastgate.ops.master``).
May import: ``fastgate.app`` (the compiler), ``fastgate.config``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import Final

from fastgate.app import compile_tables
from fastgate.config import GatewayConfig, load_config

log = logging.getLogger("fastgate.supervisor")

RESTART_ONLY: Final = ("listen", "admin", "workers", "access_log", "metrics", "log_format")
"""Config fields bound at start-up (sockets, processes, open files, the registry mode)."""


def _keep_startup_settings(new: GatewayConfig, configured: GatewayConfig,
                           running: GatewayConfig) -> GatewayConfig:
    """``new`` with the :data:`RESTART_ONLY` fields of the running config.

    ``configured`` is the config as it was read at start-up (``listen`` as written, e.g.
    port 0); ``running`` holds the values in effect (the bound port, the worker count).
    """
    changed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(configured, name)]
    if changed:
        log.warning("%s: %s changed; that needs a restart, keeping the running value%s",
                    new.source, ", ".join(changed), "s" if len(changed) > 1 else "")
    return replace(new, **{name: getattr(running, name) for name in RESTART_ONLY})


def _log_reload_errors(source: str | None, errors: list[str], who: str = "") -> None:
    # One error per line, each with its config path (SPEC §2), so an operator can fix them
    # all at once.
    n = len(errors)
    log.error("reload of %s failed%s, keeping the running config (%d error%s):\n%s",
              source, who, n, "" if n == 1 else "s", "\n".join(f"  {e}" for e in errors))


def _read_config(source: str, configured: GatewayConfig, running: GatewayConfig,
                 *, compile_check: bool) -> GatewayConfig:
    """Load ``source`` again (raises ConfigError with every problem).

    ``compile_check``: also run the data-plane compiler once (the master's dry run; it builds
    objects but opens nothing), so a semantic error is found before any worker is touched.
    """
    new = _keep_startup_settings(load_config(source, os.environ), configured, running)
    if compile_check:
        compile_tables(new)
    return new


async def reread(loop: asyncio.AbstractEventLoop, running: GatewayConfig,
                 configured: GatewayConfig, *, compile_check: bool) -> GatewayConfig | None:
    """A SIGHUP's first step in both process models: ``running.source`` read again (see
    :func:`_read_config`) in the loop's executor, so YAML parsing and the dry run never stall
    the event loop. None: the config came from no file, nothing to reload (logged).
    Raises ConfigError with every problem."""
    source = running.source
    if source is None:
        log.warning("SIGHUP: the config was not read from a file; nothing to reload")
        return None
    log.info("SIGHUP: reloading %s", source)
    return await loop.run_in_executor(
        None, lambda: _read_config(source, configured, running, compile_check=compile_check))
