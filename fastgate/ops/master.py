"""The master of ``fastgate run`` with N workers (fastgate/ops/supervisor.py: the process model).

Owns: :class:`_Master`, which never serves the data plane: it starts the worker processes
(:class:`_Slot`: one worker position) and restarts those that die, with a back-off; speaks the
master <-> worker messages; fetches the remote key sets for the whole host (``KeyHub``) and
pushes them to every worker; serves ``/metrics`` (merged over the workers) and ``/readyz``;
validates a ``SIGHUP`` reload once, sends it to every worker and switches the ones that took it
back when another cannot; and drains the workers on ``SIGTERM`` / ``SIGINT``. It is over 450
lines because it is one class whose methods share its state (the slots, the running config and
its generation); the pieces that need none of it are in ``resources``, ``reload``, ``signals``
and ``logsetup``; a worker's own side is ``fastgate.ops.worker``.
May import: ``fastgate.config``, ``fastgate.keys.sharedkeys``, ``fastgate.ops`` modules other
than ``supervisor`` and ``single``.
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
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Final

from fastgate.config import GatewayConfig
from fastgate.errors import ConfigError
from fastgate.keys.sharedkeys import KeyHub, is_remote
from fastgate.ops.admin import AdminServer
from fastgate.ops.logsetup import _log_start_errors
from fastgate.ops.metrics import (
    Metrics,
    collect_multiprocess,
    mark_process_dead,
    setup_multiprocess,
)
from fastgate.ops.reload import _log_reload_errors, reread
from fastgate.ops.resources import _private_dir, _reserve
from fastgate.ops.signals import (
    _install_stop_handlers,
    _Reloader,
    _remove_handlers,
    _stop_trigger,
)

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

# Run with ``-P`` (no working directory on sys.path: a source checkout's ./fastgate, which has
# no compiled extension, must not shadow the installed package) and the master's own package
# root put first, explicitly: a worker imports exactly the fastgate the master runs.
_WORKER_CODE: Final = ("import sys; sys.path.insert(0, sys.argv.pop(1)); "
                       "from fastgate.ops.supervisor import worker_main; worker_main()")


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
        try:
            new = await reread(loop, self.config, self.configured, compile_check=True)
        except ConfigError as exc:
            _log_reload_errors(source, exc.errors)
            metrics.config_reload("failure")
            return
        if new is None:
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
