"""Process model and signals: ``fastgate run`` (SPEC §2 ``workers``, §7 metrics, §8 signals).

One worker (``workers: 1``)
    Everything in this process on one uvloop loop: the :class:`~fastgate.app.Gateway`, its
    :class:`~fastgate.ops.metrics.Metrics` (single-process registry), the access log and the
    :class:`~fastgate.ops.admin.AdminServer` on ``admin:``.

N workers (``workers: N`` or ``--workers N``; 0 = one per CPU)
    This process becomes the *master*: it never serves the data plane. It starts N worker
    processes (``sys.executable -c "...worker_main()"``: fork+exec, so no event-loop, thread
    or lock state leaks from the master into a worker), serves the admin endpoints itself
    (``/metrics`` merged over every worker with prometheus-client multiprocess mode,
    ``/readyz`` from what the workers report) and restarts a worker that dies.

    Listening sockets: every worker binds its *own* ``SO_REUSEPORT`` socket to ``listen``, so
    the kernel spreads new connections over the workers (one shared, inherited socket would
    let whichever worker wakes first take most connections). Before starting workers the
    master binds (but never listens on) one more ``SO_REUSEPORT`` socket on that address: it
    turns ``:0`` into one concrete port all workers share, fails fast when the address is
    taken, and keeps the port ours while a worker restarts. A bound, non-listening socket is
    not part of the kernel's reuseport group for incoming connections (Linux joins it at
    ``listen()``), so it never receives one.

    Master <-> worker: one ``socketpair`` per worker carrying pickled messages
    (:class:`multiprocessing.connection.Connection` framing). The master sends the initial
    config and reloads; a worker answers ``started`` / ``failed``, its readiness (provider ->
    has keys) whenever it changes, and the result of every reload. EOF on it tells a worker
    that the master is gone (it then drains and exits: no orphans serving a stale config).

Signals
    ``SIGHUP``: re-read ``config.source``. One worker: load, ``await gateway.swap(new)``. N
    workers: the master loads and compiles the file once (a dry run of the data-plane
    compiler); an invalid file is logged with every error, counted once as a failure and the
    workers are not touched. A valid one is *sent* to every worker (they do not re-read the
    file, which could have changed again in between: every worker runs exactly what the
    master validated, and a restarted worker gets the master's current config). If any
    worker cannot apply it (e.g. an unreadable ``jwks_file``), the workers that switched are
    switched back and the reload counts as a failure; otherwise it counts once as a success.
    ``fastgate_config_reloads_total`` is kept by the master only (N workers counting would
    multiply it by N). A SIGHUP during a reload runs one more reload afterwards.
    Settings bound at start-up — ``listen``, ``admin``, ``workers``, ``access_log``,
    ``metrics`` — are not changed by a reload: a warning names them, the running values stay.

    ``SIGTERM`` / ``SIGINT``: stop accepting, let in-flight requests finish for up to
    ``drain_timeout`` (idle keep-alive connections are closed at once, busy ones after their
    response), exit 0. The master forwards SIGTERM to the workers, waits ``drain_timeout``
    plus :data:`STOP_MARGIN`, then kills stragglers. Workers ignore SIGINT and SIGHUP (a
    terminal's Ctrl-C reaches the whole process group; the master coordinates).

Restarts: a worker that exits while the master is not stopping is restarted after a
back-off that doubles for every exit within :data:`STABLE_AFTER` seconds of its start
(:data:`BACKOFF_MIN` .. :data:`BACKOFF_MAX`), so a crash loop does not spin. Its live gauges
leave ``/metrics`` (``mark_process_dead``); its counters stay (counters never go back).
If a worker cannot start at all on the first start (bind error, bad key file), the master
stops everything and ``run`` returns 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from fastgate.app import Gateway, compile_tables
from fastgate.config import (
    SHARED_STORE_NEEDED,
    Address,
    GatewayConfig,
    load_config,
    uses_replay_store,
)
from fastgate.errors import ConfigError
from fastgate.keys.sharedkeys import KeyClient, KeyHub, install_client, is_remote
from fastgate.ops.accesslog import AccessLog
from fastgate.ops.admin import AdminServer
from fastgate.ops.logformat import LOG_FORMATS, formatter
from fastgate.ops.metrics import (
    Metrics,
    collect_multiprocess,
    mark_process_dead,
    metrics_for,
    setup_multiprocess,
)
from fastgate.ops.otel import request_sink

__all__ = ["RESTART_ONLY", "run", "worker_main"]

log = logging.getLogger("fastgate.supervisor")

STOP_MARGIN: Final = 5.0
"""Seconds the master waits beyond ``drain_timeout`` for workers to exit before SIGKILL."""
START_TIMEOUT: Final = 60.0
"""Seconds a worker may take to import, compile its config and listen."""
RELOAD_TIMEOUT: Final = 30.0
"""Seconds the master waits for a worker to answer a reload."""
BACKOFF_MIN: Final = 0.2
BACKOFF_MAX: Final = 30.0
STABLE_AFTER: Final = 10.0
"""A worker that ran this long before it died restarts after ``BACKOFF_MIN`` again."""
READY_POLL: Final = 0.25
"""How often a worker checks its key sources' readiness (sent to the master on change)."""

RESTART_ONLY: Final = ("listen", "admin", "workers", "access_log", "metrics", "log_format")
"""Config fields bound at start-up (sockets, processes, open files, the registry mode)."""

# Run with ``-P`` (no working directory on sys.path: a source checkout's ./fastgate, which has
# no compiled extension, must not shadow the installed package) and the master's own package
# root put first, explicitly: a worker imports exactly the fastgate the master runs.
_WORKER_CODE: Final = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
                       "from fastgate.ops.supervisor import worker_main; worker_main()")
LOG_LEVEL_ENV: Final = "FASTGATE_LOG_LEVEL"
LOG_FORMAT_ENV: Final = "FASTGATE_LOG_FORMAT"
"""Log level when ``--log-level`` is not given (debug, info, warning, error); default info."""
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_SIGNAL_NAMES: Final = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

# Messages (tuples; the first item is the kind).
#   master -> worker: ("init", index, config, multiproc_dir | None)
#                     ("reload", request_id, generation, config)
#                     ("keys", source_id, jwks | None) | ("kid_answer", request_id, found)
#   worker -> master: ("started", pid, port, ready) | ("failed", [errors])
#                     ("ready", {provider: bool}) | ("reloaded", request_id, generation, errors)
#                     ("kid", request_id, source_id, kid)
# (the keys messages: fastgate/keys/sharedkeys.py, one JWKS fetch per host)


def run(config: GatewayConfig, *, workers: int | None = None,
        log_level: str | None = None, log_format: str | None = None) -> int:
    """Serve ``config`` until SIGTERM/SIGINT; the exit code (0 after a clean drain).

    ``workers`` (the ``--workers`` flag) overrides ``config.workers``; 0 = one per CPU.
    ``log_level`` (``--log-level``) overrides ``$FASTGATE_LOG_LEVEL``; workers get the same.
    ``log_format`` (``--log-format``) overrides the config's ``log_format``; workers too.
    """
    try:
        level = resolve_log_level(log_level)
    except ValueError as exc:
        print(f"fastgate run: {exc}", file=sys.stderr)
        return 2
    fmt = log_format if log_format is not None else config.log_format
    if fmt not in LOG_FORMATS:
        print(f"fastgate run: --log-format: expected one of {', '.join(LOG_FORMATS)}, "
              f"got {fmt!r}", file=sys.stderr)
        return 2
    os.environ[LOG_LEVEL_ENV] = level  # inherited by the workers (see _spawn)
    os.environ[LOG_FORMAT_ENV] = fmt
    _setup_logging(None)
    log.debug("log level %s; fastgate from %s", level, Path(__file__).resolve().parents[1])
    # Until the loop's handler is installed, a SIGHUP must not kill the process (its default
    # action); it is ignored during start-up.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    n = config.workers if workers is None else workers
    if n < 0:
        log.error("workers must be >= 0 (0 = one per CPU), got %d", n)
        return 2
    if n == 0:
        n = os.cpu_count() or 1
    if n > 1 and config.replay_store.redis is None and uses_replay_store(config.routes):
        log.error("replay_store: %s", SHARED_STORE_NEEDED)  # --workers overrode the config
        return 2
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if n == 1:
            return runner.run(_serve_single(config))
        return runner.run(_Master(config, n).run())


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


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


def _ready_map(gateway: Gateway) -> dict[str, bool]:
    return {str(name): bool(src.ready) for name, src in gateway.tables.key_sources.items()}


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


# ---------------------------------------------------------------------------------------------
# One worker: everything in this process
# ---------------------------------------------------------------------------------------------


async def _serve_single(config: GatewayConfig) -> int:
    loop = asyncio.get_running_loop()
    metrics = metrics_for(config)
    access = AccessLog(config.access_log, 0)
    try:
        gateway = Gateway.build(
            config, metrics=metrics, worker=0,
            # None when the log and spans are off: not even a no-op call per request.
            access_log=request_sink(config, access))
    except ConfigError as exc:
        _log_start_errors(config.source, exc.errors)
        await access.stop()
        return 1
    running = config
    admin: AdminServer | None = None
    if config.admin is not None:
        admin = AdminServer(
            config.admin,
            metrics_body=metrics.render if config.metrics else None,
            ready=lambda: _ready_map(gateway))
    metrics.start()
    access.start()
    try:
        if admin is not None:
            await admin.start()
        await gateway.start()
    except (OSError, ConfigError) as exc:
        errors = exc.errors if isinstance(exc, ConfigError) else [str(exc)]
        _log_start_errors(config.source, errors)
        await gateway.stop()
        if admin is not None:
            await admin.stop()
        await access.stop()
        await metrics.stop()
        return 1

    stopping: asyncio.Future[str] = loop.create_future()
    on_stop = _stop_trigger(stopping, "already draining")

    async def reload() -> None:
        nonlocal running
        source = running.source
        if source is None:
            log.warning("SIGHUP: the config was not read from a file; nothing to reload")
            return
        log.info("SIGHUP: reloading %s", source)
        try:
            new = await loop.run_in_executor(
                None, lambda: _read_config(source, config, running, compile_check=False))
            await gateway.swap(new)
        except ConfigError as exc:
            _log_reload_errors(source, exc.errors)
            metrics.config_reload("failure")
            return
        except Exception as exc:  # a bug: the old tables stay (swap switches last)
            log.exception("reload failed")
            _log_reload_errors(source, [f"internal error: {exc!r}"])
            metrics.config_reload("failure")
            return
        running = new
        metrics.config_reload("success")
        log.info("configuration reloaded from %s", source)

    reloader = _Reloader(reload)
    _install_stop_handlers(loop, on_stop)
    loop.add_signal_handler(signal.SIGHUP, reloader.trigger)
    try:
        name = await stopping
        log.info("%s: draining (up to %gs)", name, running.drain_timeout)
        await reloader.cancel()
        await gateway.drain(running.drain_timeout)
    finally:
        _remove_handlers(loop)
        await gateway.stop()
        await access.stop()
        await metrics.stop()
        if admin is not None:
            await admin.stop()
    log.info("stopped")
    return 0


def _log_start_errors(source: str | None, errors: list[str]) -> None:
    log.error("cannot start (%s):\n%s", source or "config",
              "\n".join(f"  {e}" for e in errors))


# ---------------------------------------------------------------------------------------------
# N workers: the master
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Slot:
    """One worker position; a restarted worker takes over its index (the access log's
    ``worker`` field)."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    conn: Connection | None = None
    pidfd: int | None = None
    started: bool = False
    started_at: float = 0.0
    generation: int = 0
    ready: dict[str, bool] | None = None
    quick_exits: int = 0
    restart: asyncio.TimerHandle | None = None
    start_waiter: asyncio.Future[list[str] | None] | None = None
    reload_waiters: dict[int, asyncio.Future[tuple[str, list[str]]]] = field(
        default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def alive(self) -> bool:
        return self.proc is not None


class _Master:
    def __init__(self, config: GatewayConfig, workers: int) -> None:
        self.configured = config  # as read at start-up (listen may say port 0)
        self.config = config  # running: the bound listen address, the worker count
        self.generation = 0
        self.n = workers
        self.slots = [_Slot(i) for i in range(workers)]
        self.stopping = False
        self.multiproc_dir: str | None = None
        self.metrics: Metrics | None = None
        self._request_ids = 0
        self._reserved: socket.socket | None = None
        self._starting = False
        self._serving = False  # every worker of the first start is up
        self._all_exited: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The remote key sources of the whole host (sharedkeys): fetched here, pushed to all.
        self.hub: KeyHub | None = None
        self._kid_tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._all_exited = asyncio.Event()
        stopping: asyncio.Future[str] = loop.create_future()
        on_stop = _stop_trigger(stopping, "already stopping")

        # Handlers first: a SIGTERM or SIGHUP while the workers start is not lost (a SIGHUP
        # reaches the workers already serving; the others get the new config once started).
        reloader = _Reloader(self._reload)
        _install_stop_handlers(loop, on_stop)
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger)
        admin: AdminServer | None = None
        try:
            try:
                self._reserved, listen = _reserve(self.config.listen)
            except OSError as exc:
                _log_start_errors(self.config.source,
                                  [f"listen {self.config.listen.host}:"
                                   f"{self.config.listen.port}: {exc.strerror or exc}"])
                return 1
            self.config = replace(self.config, listen=listen, workers=self.n)
            if self.config.metrics:
                self.multiproc_dir = setup_multiprocess(_private_dir(), clean=True)
            # The reload counter lives here only, and the fetches of the remote providers
            # (this process fetches for all workers). Only remote providers: this process
            # has no static or file keys, and a 0 would drag the min-over-processes key
            # gauge down; for a remote one its count is the one it pushes.
            self.metrics = Metrics(routes=(), providers=_remote_names(self.config.providers),
                                   upstreams=(), enabled=self.config.metrics)
            self.hub = KeyHub(self._push, metrics=self.metrics)
            await self.hub.prepare(self.config.providers.values())
            if self.config.admin is not None:
                mdir = self.multiproc_dir
                admin = AdminServer(
                    self.config.admin,
                    metrics_body=(lambda: collect_multiprocess(mdir)) if mdir else None,
                    ready=self._ready)
                try:
                    await admin.start()
                except OSError as exc:
                    admin = None
                    _log_start_errors(self.config.source, [f"admin: {exc.strerror or exc}"])
                    return 1
            log.info("master: starting %d workers on %s:%d", self.n, listen.host, listen.port)
            if not await self._start_all(stopping):
                return 1
            if not stopping.done():
                self._serving = True
                log.info("master: %d workers serving", self.n)
            name = await stopping
            self.stopping = True
            await reloader.cancel()
            timeout = self.config.drain_timeout
            log.info("%s: draining the workers (up to %gs)", name, timeout)
            await self._stop_workers(timeout + STOP_MARGIN)
            log.info("stopped")
            return 0
        finally:
            _remove_handlers(loop)
            self.stopping = True
            await reloader.cancel()
            await self._stop_workers(0.0)
            if self.hub is not None:
                await self.hub.stop()
            if admin is not None:
                await admin.stop()
            if self._reserved is not None:
                self._reserved.close()
            if self.multiproc_dir is not None:
                shutil.rmtree(self.multiproc_dir, ignore_errors=True)

    async def _start_all(self, stopping: asyncio.Future[str]) -> bool:
        """Start every worker; False (all logged) when one of them cannot start."""
        loop = self._loop
        assert loop is not None
        self._starting = True
        try:
            waiters: list[asyncio.Future[Any]] = []
            for slot in self.slots:
                slot.start_waiter = loop.create_future()
                waiters.append(slot.start_waiter)
                if not self._spawn(slot):
                    return False
            deadline = loop.time() + START_TIMEOUT
            pending: set[asyncio.Future[Any]] = set(waiters)
            while pending and not stopping.done() and loop.time() < deadline:
                _done, pending = await asyncio.wait(
                    {*pending, stopping}, timeout=deadline - loop.time(),
                    return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopping)
                if any(w.done() and w.result() is not None for w in waiters):
                    break  # one failed: no need to wait for the others
            if stopping.done():
                return True  # stopped while starting: run() drains what started
            ok = True
            for slot, waiter in zip(self.slots, waiters, strict=True):
                if not waiter.done():
                    log.error("worker %d (pid %d) did not start within %gs", slot.index,
                              slot.pid, START_TIMEOUT)
                    ok = False
                elif waiter.result() is not None:
                    _log_start_errors(self.config.source, waiter.result())
                    ok = False
            return ok
        finally:
            self._starting = False

    # -- workers -----------------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> bool:
        loop = self._loop
        assert loop is not None
        slot.restart = None
        parent, child = socket.socketpair()
        env = dict(os.environ)
        # The workers import the very fastgate this process runs, wherever it came from
        # (see _WORKER_CODE): its package root goes first on their sys.path.
        root = str(Path(__file__).resolve().parents[2])
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _WORKER_CODE, root, str(slot.index),
                 str(child.fileno())],
                pass_fds=(child.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            parent.close()
            child.close()
            log.error("worker %d: cannot start %s: %s", slot.index, sys.executable, exc)
            return False
        finally:
            child.close()
        conn = Connection(parent.detach())
        slot.proc, slot.conn = proc, conn
        slot.started, slot.ready = False, None
        slot.generation = self.generation
        slot.started_at = time.monotonic()
        with contextlib.suppress(OSError):  # it died already: the exit watcher handles it
            conn.send(("init", slot.index, self.config, self.multiproc_dir))
            # The current key sets right behind: a (re)started worker fetches nothing.
            for msg in self.hub.snapshot() if self.hub is not None else ():
                conn.send(msg)
        loop.add_reader(conn.fileno(), self._on_message, slot)
        try:
            slot.pidfd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):  # before Linux 5.3: poll for the exit
            slot.pidfd = None
            loop.create_task(self._poll_exit(slot, proc))
        else:
            loop.add_reader(slot.pidfd, self._on_exit, slot)
        log.info("worker %d: started pid %d", slot.index, proc.pid)
        return True

    async def _poll_exit(self, slot: _Slot, proc: subprocess.Popen[bytes]) -> None:
        while slot.proc is proc and proc.poll() is None:
            await asyncio.sleep(0.1)
        if slot.proc is proc:
            self._on_exit(slot)

    def _on_message(self, slot: _Slot) -> None:
        conn = slot.conn
        if conn is None:
            return
        try:
            while conn.poll():
                self._handle(slot, conn.recv())
        except (EOFError, OSError):
            # The worker closed its end (it is exiting); the exit watcher reaps it.
            assert self._loop is not None
            self._loop.remove_reader(conn.fileno())

    def _handle(self, slot: _Slot, msg: Any) -> None:
        kind = msg[0]
        if kind == "started":
            _kind, pid, port, ready = msg
            slot.started, slot.ready = True, dict(ready)
            log.info("worker %d (pid %d): serving on port %d", slot.index, pid, port)
            if slot.start_waiter is not None and not slot.start_waiter.done():
                slot.start_waiter.set_result(None)
            if slot.generation != self.generation and not self.stopping:
                self._sync(slot)  # a reload succeeded while it was starting
        elif kind == "failed":
            errors = list(msg[1])
            if slot.start_waiter is not None and not slot.start_waiter.done():
                slot.start_waiter.set_result(errors)  # the first start: the master reports
            else:
                log.error("worker %d (pid %d) cannot start:\n%s", slot.index, slot.pid,
                          "\n".join(f"  {e}" for e in errors))
        elif kind == "ready":
            slot.ready = dict(msg[1])
        elif kind == "kid":
            assert self._loop is not None
            task = self._loop.create_task(self._answer_kid(slot, *msg[1:]))
            self._kid_tasks.add(task)
            task.add_done_callback(self._kid_tasks.discard)
        elif kind == "reloaded":
            _kind, request_id, generation, errors = msg
            if not errors:
                slot.generation = generation
            waiter = slot.reload_waiters.pop(request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(("failed", list(errors)) if errors else ("ok", []))
            elif errors:
                _log_reload_errors(self.config.source, list(errors), f" in worker {slot.index}")
        else:
            log.warning("worker %d: unknown message %r", slot.index, kind)

    def _push(self, msg: tuple[Any, ...]) -> None:
        """A key set change, to every worker (starting ones too: they read it after init)."""
        for slot in self.slots:
            if slot.conn is not None:
                with contextlib.suppress(OSError):  # exiting: the exit watcher handles it
                    slot.conn.send(msg)

    async def _answer_kid(self, slot: _Slot, request_id: int, sid: str, kid: str) -> None:
        assert self.hub is not None
        conn = slot.conn
        found = await self.hub.refresh_for_kid(sid, kid)
        if slot.conn is conn and conn is not None:  # not a restarted worker's pipe
            with contextlib.suppress(OSError):
                conn.send(("kid_answer", request_id, found))

    def _on_exit(self, slot: _Slot) -> None:
        proc = slot.proc
        if proc is None:
            return
        code = proc.wait()
        self._release(slot)
        if self.multiproc_dir is not None:
            # Its live gauges (in flight, cache entries, keys) leave the scrape; its counter
            # files stay: counters must not go back.
            with contextlib.suppress(Exception):
                mark_process_dead(proc.pid, self.multiproc_dir)
        if slot.start_waiter is not None and not slot.start_waiter.done():
            slot.start_waiter.set_result([f"worker {slot.index} {_describe_exit(code)}"])
        for waiter in slot.reload_waiters.values():
            if not waiter.done():
                waiter.set_result(("gone", []))
        slot.reload_waiters.clear()
        if self.stopping or self._starting:
            log.info("worker %d (pid %d) %s", slot.index, proc.pid, _describe_exit(code))
            if self._all_exited is not None and not any(s.alive for s in self.slots):
                self._all_exited.set()
            return
        uptime = time.monotonic() - slot.started_at
        if uptime >= STABLE_AFTER:
            slot.quick_exits = 0
        delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** slot.quick_exits)
        slot.quick_exits += 1
        log.warning("worker %d (pid %d) %s after %.1fs; restarting in %.1fs", slot.index,
                    proc.pid, _describe_exit(code), uptime, delay)
        assert self._loop is not None
        slot.restart = self._loop.call_later(delay, self._respawn, slot)

    def _respawn(self, slot: _Slot) -> None:
        slot.restart = None
        if self.stopping:
            return
        if not self._spawn(slot):
            assert self._loop is not None
            slot.restart = self._loop.call_later(BACKOFF_MAX, self._respawn, slot)

    def _release(self, slot: _Slot) -> None:
        """Forget a worker that exited: readers, file descriptors."""
        loop = self._loop
        assert loop is not None
        if slot.pidfd is not None:
            loop.remove_reader(slot.pidfd)
            os.close(slot.pidfd)
            slot.pidfd = None
        if slot.conn is not None:
            loop.remove_reader(slot.conn.fileno())
            slot.conn.close()
            slot.conn = None
        slot.proc = None
        slot.started, slot.ready = False, None

    async def _stop_workers(self, timeout: float) -> None:
        """SIGTERM every worker (they drain), wait up to ``timeout``, SIGKILL the rest."""
        for slot in self.slots:
            if slot.restart is not None:
                slot.restart.cancel()
                slot.restart = None
        live = [s for s in self.slots if s.alive]
        if not live:
            return
        for slot in live:
            assert slot.proc is not None
            with contextlib.suppress(ProcessLookupError):
                slot.proc.send_signal(signal.SIGTERM)
        if self._all_exited is not None and timeout > 0:
            self._all_exited.clear()
            if any(s.alive for s in self.slots):
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._all_exited.wait(), timeout)
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                continue
            if proc.poll() is None:
                log.warning("worker %d (pid %d) still running after %gs; killing it",
                            slot.index, proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5.0)
            self._on_exit(slot)

    # -- readiness ---------------------------------------------------------------------------

    def _ready(self) -> Mapping[str, bool]:
        """``/readyz``: not before all N workers of the first start serve (a load balancer
        must not send full traffic to a fraction of the capacity); then a provider is ready
        when every serving worker has its keys (a worker being restarted is not waited for:
        the others serve)."""
        reports = [s.ready for s in self.slots if s.started and s.ready is not None]
        providers = list(self.config.providers)
        if not reports or not self._serving:
            return {p: False for p in providers} if providers else {"(workers)": False}
        return {p: all(r.get(p, False) for r in reports) for p in providers}

    # -- reload ------------------------------------------------------------------------------

    async def _reload(self) -> None:
        loop = self._loop
        metrics = self.metrics
        assert loop is not None and metrics is not None
        source = self.config.source
        if source is None:
            log.warning("SIGHUP: the config was not read from a file; nothing to reload")
            return
        log.info("SIGHUP: reloading %s", source)
        try:
            new = await loop.run_in_executor(
                None, lambda: _read_config(source, self.configured, self.config,
                                           compile_check=True))
        except ConfigError as exc:
            _log_reload_errors(source, exc.errors)
            metrics.config_reload("failure")
            return
        generation = self.generation + 1
        # New or changed remote providers start fetching here, before the workers switch
        # (their new tables take the keys as they come); unchanged ones keep theirs.
        hub = self.hub
        assert hub is not None
        metrics.reconfigure(routes=(), upstreams=(), providers=_remote_names(
            {**self.config.providers, **new.providers}))
        await hub.prepare(new.providers.values())
        targets = [s for s in self.slots if s.started and s.conn is not None]
        results = await self._broadcast(targets, new, generation)
        failed = {i: errs for i, (status, errs) in results.items()
                  if status in ("failed", "timeout")}
        running = new if not failed else self.config
        await hub.retain(running.providers.values())
        metrics.reconfigure(routes=(), upstreams=(),
                            providers=_remote_names(running.providers))
        if not failed:
            self.config, self.generation = new, generation
            metrics.config_reload("success")
            log.info("configuration reloaded from %s (%d workers)", source,
                     sum(1 for status, _ in results.values() if status == "ok"))
            for slot in self.slots:  # started while the reload ran
                if slot.started and slot.generation != generation and slot not in targets:
                    self._sync(slot)
            return
        for i, errs in failed.items():
            _log_reload_errors(source, errs, f" in worker {i}")
        # Every worker runs the same config: those that switched go back to the running one.
        back = [s for s in targets if s.index not in failed or results[s.index][0] == "timeout"]
        back = [s for s in back if s.conn is not None]
        if back:
            undo = await self._broadcast(back, self.config, self.generation)
            for i, (status, errs) in undo.items():
                if status != "ok" and status != "gone":
                    log.error("worker %d could not return to the running config: %s", i,
                              "; ".join(errs) or status)
        metrics.config_reload("failure")

    async def _broadcast(self, slots: list[_Slot], config: GatewayConfig,
                         generation: int) -> dict[int, tuple[str, list[str]]]:
        """Send a reload to ``slots``; each one's ("ok" | "failed" | "gone" | "timeout", errors)."""
        waiters = {s.index: self._send_reload(s, config, generation) for s in slots}
        if waiters:
            await asyncio.wait(waiters.values(), timeout=RELOAD_TIMEOUT)
        results: dict[int, tuple[str, list[str]]] = {}
        for index, waiter in waiters.items():
            if waiter.done():
                results[index] = waiter.result()
            else:
                waiter.cancel()
                results[index] = ("timeout", [f"no answer within {RELOAD_TIMEOUT:g}s"])
        return results

    def _sync(self, slot: _Slot) -> None:
        """Bring a worker that started on an older config to the running one."""
        waiter = self._send_reload(slot, self.config, self.generation)

        def done(w: asyncio.Future[tuple[str, list[str]]]) -> None:
            if not w.cancelled() and w.result()[0] == "failed":
                _log_reload_errors(self.config.source, w.result()[1],
                                   f" in worker {slot.index}")

        waiter.add_done_callback(done)

    def _send_reload(self, slot: _Slot, config: GatewayConfig,
                     generation: int) -> asyncio.Future[tuple[str, list[str]]]:
        assert self._loop is not None
        self._request_ids += 1
        request_id = self._request_ids
        waiter: asyncio.Future[tuple[str, list[str]]] = self._loop.create_future()
        if slot.conn is None:
            waiter.set_result(("gone", []))
            return waiter
        slot.reload_waiters[request_id] = waiter
        try:
            slot.conn.send(("reload", request_id, generation, config))
        except OSError:
            slot.reload_waiters.pop(request_id, None)
            waiter.set_result(("gone", []))
        return waiter


def _remote_names(providers: Mapping[str, Any]) -> list[str]:
    return [name for name, p in providers.items() if is_remote(p)]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _reserve(address: Address) -> tuple[socket.socket, Address]:
    """Bind (never listen on) a SO_REUSEPORT socket on ``address``; the concrete address.

    It resolves port 0 to the one port every worker binds, fails fast when the address is
    taken by another program, and holds the port while workers restart.
    """
    infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # As asyncio's create_server does: the workers' sockets are v6-only too.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock, Address(address.host, int(sock.getsockname()[1]))


_DIR_PREFIX: Final = "fastgate-metrics-"


def _private_dir() -> str:
    """A fresh 0700 directory for the metric files, on tmpfs when there is one.

    Its name carries the master's pid: a master that was SIGKILLed cannot remove its
    directory, so the next one removes the directories of masters that no longer exist.
    """
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    _remove_stale_dirs(Path(base))
    return tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=base)


def _remove_stale_dirs(base: Path) -> None:
    uid = os.getuid()
    with contextlib.suppress(OSError):
        for entry in base.glob(f"{_DIR_PREFIX}*-*"):
            pid_text = entry.name[len(_DIR_PREFIX):].split("-", 1)[0]
            with contextlib.suppress(OSError, ValueError):
                if not pid_text.isdigit() or entry.stat().st_uid != uid or not entry.is_dir():
                    continue
                try:
                    os.kill(int(pid_text), 0)
                except ProcessLookupError:
                    shutil.rmtree(entry, ignore_errors=True)
                except PermissionError:
                    pass  # alive (someone else's)


# ---------------------------------------------------------------------------------------------
# A worker process
# ---------------------------------------------------------------------------------------------


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
