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

Modules: this one is the entry (:func:`run`); the rest of the process model lives beside it:
``fastgate.ops.single`` (one worker), ``fastgate.ops.master`` (the master of N workers),
``fastgate.ops.worker`` (a worker process), ``fastgate.ops.signals`` (stop and reload
signals), ``fastgate.ops.reload`` (re-reading the config), ``fastgate.ops.resources`` (the
master's reserved port and metric files) and ``fastgate.ops.logsetup`` (log level and format).
Their public names stay importable from here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from fastgate.config import SHARED_STORE_NEEDED, GatewayConfig, uses_replay_store
from fastgate.ops.logformat import LOG_FORMATS
from fastgate.ops.logsetup import LOG_FORMAT_ENV as LOG_FORMAT_ENV
from fastgate.ops.logsetup import LOG_LEVEL_ENV as LOG_LEVEL_ENV
from fastgate.ops.logsetup import LOG_LEVELS as LOG_LEVELS
from fastgate.ops.logsetup import _setup_logging
from fastgate.ops.logsetup import resolve_log_level as resolve_log_level
from fastgate.ops.master import BACKOFF_MAX as BACKOFF_MAX
from fastgate.ops.master import BACKOFF_MIN as BACKOFF_MIN
from fastgate.ops.master import RELOAD_TIMEOUT as RELOAD_TIMEOUT
from fastgate.ops.master import STABLE_AFTER as STABLE_AFTER
from fastgate.ops.master import START_TIMEOUT as START_TIMEOUT
from fastgate.ops.master import STOP_MARGIN as STOP_MARGIN
from fastgate.ops.master import _Master
from fastgate.ops.reload import RESTART_ONLY
from fastgate.ops.single import _serve_single
from fastgate.ops.worker import READY_POLL as READY_POLL
from fastgate.ops.worker import worker_main

__all__ = ["RESTART_ONLY", "run", "worker_main"]

log = logging.getLogger("fastgate.supervisor")

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
