"""A worker process of ``fastgate run`` with N workers: one Gateway on its own uvloop loop.

Owns: :func:`worker_main` (what the master starts as ``python -c ... INDEX FD``), the worker's
end of the master <-> worker messages (listed in ``fastgate.ops.supervisor``): the initial config,
the key sets (``KeyClient``), reloads applied with ``Gateway.swap`` in order, the readiness it
reports whenever it changes, and its drain on ``SIGTERM`` or when the master goes away. Also
:func:`_ready_map`, one gateway's readiness, which the single process serves on ``/readyz``.
May import: ``fastgate.app``, ``fastgate.keys.sharedkeys``, ``fastgate.ops`` modules other than
``supervisor``, ``master`` and ``single``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from fastgate.app import Gateway
from fastgate.config import GatewayConfig
from fastgate.errors import ConfigError
from fastgate.keys.sharedkeys import KeyClient, install_client
from fastgate.ops.accesslog import AccessLog
from fastgate.ops.logsetup import LOG_LEVEL_ENV, _setup_logging
from fastgate.ops.metrics import metrics_for, setup_multiprocess
from fastgate.ops.otel import request_sink

log = logging.getLogger("fastgate.supervisor")

READY_POLL: Final = 0.25
"""How often a worker checks its key sources' readiness (sent to the master on change)."""


def _ready_map(gateway: Gateway) -> dict[str, bool]:
    return {str(name): bool(src.ready) for name, src in gateway.tables.key_sources.items()}


def worker_main() -> None:
    """Entry point of a worker (``python -c ... INDEX FD``); exits the process."""
    # The master coordinates reloads and stops; Ctrl-C reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    index, fd = int(sys.argv[1]), int(sys.argv[2])
    _setup_logging(index)
    log.debug("log level %s; fastgate from %s", os.environ.get(LOG_LEVEL_ENV, "info"),
              Path(__file__).resolve().parents[1])
    conn = Connection(fd)
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        sys.exit(1)  # the master is gone before it sent anything
    _kind, _index, config, multiproc_dir = msg
    if multiproc_dir is not None:
        setup_multiprocess(multiproc_dir)  # never clean: the other workers' files are there
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(_Worker(index, config, conn).run())
    sys.exit(code)


class _Worker:
    def __init__(self, index: int, config: GatewayConfig, conn: Connection) -> None:
        self.index = index
        self.config = config
        self.conn = conn
        self.gateway: Gateway | None = None
        self._stopping: asyncio.Future[str] | None = None
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        # Remote keys come from the master (sharedkeys): compile_tables builds shared sources.
        self.keys = KeyClient(self._send)
        install_client(self.keys)

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send(msg)
        except OSError:
            self._stop("the master went away")

    def _stop(self, why: str) -> None:
        if self._stopping is not None and not self._stopping.done():
            self._stopping.set_result(why)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopping = loop.create_future()
        config = self.config
        metrics = metrics_for(config)
        access = AccessLog(config.access_log, self.index)
        # The key sets the master sent with init: installed when the sources start, so the
        # first "started" already reports them ready.
        self._on_readable(at_start=True)
        try:
            gateway = Gateway.build(
                config, metrics=metrics, worker=self.index,
                access_log=request_sink(config, access))
        except ConfigError as exc:
            self._send(("failed", exc.errors))
            await access.stop()
            return 1
        self.gateway = gateway
        metrics.start()
        access.start()
        try:
            await gateway.start()
        except (OSError, ConfigError) as exc:
            errors = exc.errors if isinstance(exc, ConfigError) else [
                f"listen {config.listen.host}:{config.listen.port}: {exc}"]
            self._send(("failed", errors))
            await gateway.stop()
            await access.stop()
            await metrics.stop()
            return 1
        loop.add_signal_handler(signal.SIGTERM, self._stop, "SIGTERM")
        loop.add_reader(self.conn.fileno(), self._on_readable)
        ready = _ready_map(gateway)
        self._send(("started", os.getpid(), gateway.port, ready))
        tasks = [loop.create_task(self._process_inbox()), loop.create_task(self._watch(ready))]
        why = await self._stopping
        log.info("%s: draining (up to %gs)", why, self.config.drain_timeout)
        with contextlib.suppress(Exception):
            loop.remove_reader(self.conn.fileno())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await gateway.drain(self.config.drain_timeout)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            await gateway.stop()
            await access.stop()  # after draining: the last requests are logged too
            await metrics.stop()  # flush the last counts into the shared files
            self.conn.close()
        return 0

    def _on_readable(self, at_start: bool = False) -> None:
        try:
            while self.conn.poll():
                msg = self.conn.recv()
                # Keys and kid answers at once: a reload in the inbox must not delay them.
                if not self.keys.handle(msg):
                    self._inbox.put_nowait(msg)
        except (EOFError, OSError):
            if at_start:
                return  # run() finds out with the reader (or the first send)
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.conn.fileno())
            self._stop("the master went away")

    async def _process_inbox(self) -> None:
        # One message at a time, in order: a reload and its roll-back apply in sequence.
        while True:
            msg = await self._inbox.get()
            if msg[0] == "reload":
                await self._reload(*msg[1:])
            else:
                log.warning("unknown message %r", msg[0])

    async def _reload(self, request_id: int, generation: int, config: GatewayConfig) -> None:
        gateway = self.gateway
        assert gateway is not None
        errors: list[str] = []
        try:
            await gateway.swap(config)
        except ConfigError as exc:
            errors = exc.errors
        except Exception as exc:  # report it, keep serving the old tables
            log.exception("reload failed")
            errors = [f"internal error: {exc!r}"]
        else:
            self.config = config
            self._send(("ready", _ready_map(gateway)))
        self._send(("reloaded", request_id, generation, errors))

    async def _watch(self, last: dict[str, bool]) -> None:
        gateway = self.gateway
        assert gateway is not None
        while True:
            await asyncio.sleep(READY_POLL)
            now = _ready_map(gateway)
            if now != last:
                self._send(("ready", now))
                last = now
