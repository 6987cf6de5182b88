"""Signals of the ``fastgate run`` processes (the single process and the master): stop, reload.

Owns: the ``SIGTERM`` / ``SIGINT`` handlers (a future resolved once with the first signal's
name; later ones are only logged), removing the handlers again, and :class:`_Reloader`, which
runs a ``SIGHUP`` reload one at a time (a ``SIGHUP`` during a reload queues one more). What a
reload does belongs to the caller (``fastgate.ops.single``, ``fastgate.ops.master``); a worker
installs its own ``SIGTERM`` handler (``fastgate.ops.worker``).
May import: the standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("fastgate.supervisor")

_SIGNAL_NAMES: Final = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}


def _stop_trigger(stopping: asyncio.Future[str], again: str) -> Callable[[str], None]:
    """A signal handler resolving `stopping` with the signal's name once; later ones are logged."""

    def on_stop(name: str) -> None:
        if stopping.done():
            log.info("%s: %s", name, again)
        else:
            stopping.set_result(name)

    return on_stop


def _install_stop_handlers(loop: asyncio.AbstractEventLoop,
                           on_stop: Callable[[str], None]) -> None:
    for sig, name in _SIGNAL_NAMES.items():
        loop.add_signal_handler(sig, on_stop, name)


def _remove_handlers(loop: asyncio.AbstractEventLoop) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(Exception):
            loop.remove_signal_handler(sig)


class _Reloader:
    """Runs ``reload`` on SIGHUP, one at a time; a SIGHUP during a reload queues one more."""

    def __init__(self, reload: Callable[[], Any]) -> None:
        self._reload = reload
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def trigger(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            self._again = False
            try:
                await self._reload()
            except Exception:  # a bug must not kill the signal path
                log.exception("reload crashed")
            if not self._again:
                return

    async def cancel(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
