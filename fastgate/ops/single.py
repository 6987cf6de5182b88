"""``fastgate run`` with one worker: everything in this process on one uvloop loop.

Owns: :func:`_serve_single`: the Gateway, its single-process Metrics, the access log and the
admin server on ``admin:``, ``SIGHUP`` reloads through ``Gateway.swap`` (counted in
``fastgate_config_reloads_total``), and the drain on ``SIGTERM`` / ``SIGINT``.
May import: ``fastgate.app``, ``fastgate.ops`` modules other than ``supervisor`` and ``master``.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from fastgate.app import Gateway
from fastgate.config import GatewayConfig
from fastgate.errors import ConfigError
from fastgate.ops.accesslog import AccessLog
from fastgate.ops.admin import AdminServer
from fastgate.ops.logsetup import _log_start_errors
from fastgate.ops.metrics import metrics_for
from fastgate.ops.otel import request_sink
from fastgate.ops.reload import _log_reload_errors, reread
from fastgate.ops.signals import (
    _install_stop_handlers,
    _Reloader,
    _remove_handlers,
    _stop_trigger,
)
from fastgate.ops.worker import _ready_map

log = logging.getLogger("fastgate.supervisor")


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
        try:
            new = await reread(loop, running, config, compile_check=False)
            if new is None:
                return
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
