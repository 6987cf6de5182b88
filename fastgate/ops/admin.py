"""The admin server: ``/metrics``, ``/healthz``, ``/readyz`` on the admin address (SPEC §2).

It never shares the data-plane port, and it does not import the data plane: what it serves
comes from two callables, so it runs the same in a single-process gateway (next to the data
plane, on its loop) and in the multi-worker supervisor (``metrics_body`` reading the
multiprocess directory, ``ready`` asking the workers).

- ``/metrics``: Prometheus text format. Rendering ~1000 series takes ~20 ms of CPU with
  prometheus_client; it runs in a thread so the loop (maybe the data plane's) keeps serving.
- ``/healthz``: 200 while the process answers (liveness: no dependency is checked, or a slow
  IdP would get healthy gateways restarted).
- ``/readyz``: 503 until every provider has keys (SPEC §5), then 200; the body names them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from fastgate.config import Address
from fastgate.ops.metrics import CONTENT_TYPE

__all__ = ["AdminServer"]

log = logging.getLogger("fastgate.admin")

_NO_STORE: Final = {"Cache-Control": "no-store"}  # probes and scrapes must see the live state
_HEALTHY: Final = orjson.dumps({"status": "ok"})
_NOT_FOUND: Final = orjson.dumps({"error": "not_found"})
_INTERNAL: Final = orjson.dumps({"error": "internal_error"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(
        body=body, status=status, content_type="application/json", headers=_NO_STORE
    )


class AdminServer:
    """An aiohttp server for the admin endpoints.

    ``metrics_body`` returns the exposition (``Metrics.render``, or
    ``lambda: collect_multiprocess(dir)`` in a supervisor); None when metrics are off
    (``/metrics`` is then 404). ``ready`` returns ``{provider: has_keys}``.
    """

    def __init__(
        self,
        address: Address,
        *,
        metrics_body: Callable[[], bytes] | None,
        ready: Callable[[], Mapping[str, bool]],
    ) -> None:
        self._address = address
        self._metrics_body = metrics_body
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when the address asked for port 0)."""
        if self._port is None:
            raise RuntimeError("admin server is not started")
        return self._port

    async def start(self) -> None:
        # The admin endpoints take no request body.
        app = web.Application(client_max_size=1024, middlewares=[_json_not_found])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._address.host, self._address.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        sockname: Any = runner.addresses[0]
        self._port = int(sockname[1])
        log.info("admin server listening on %s:%d", self._address.host, self._port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        self._port = None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._metrics_body is None:
            return _json(_NOT_FOUND, 404)
        try:
            body = await asyncio.get_running_loop().run_in_executor(None, self._metrics_body)
        except Exception:
            log.exception("admin: rendering /metrics failed")
            return _json(_INTERNAL, 500)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE, **_NO_STORE})

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json(_HEALTHY)

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            providers = {str(name): bool(ok) for name, ok in self._ready().items()}
        except Exception:
            log.exception("admin: the readiness callable failed")
            return _json(orjson.dumps({"status": "not_ready", "providers": {}}), 503)
        ready = all(providers.values())
        body = {"status": "ready" if ready else "not_ready", "providers": providers}
        return _json(orjson.dumps(body), 200 if ready else 503)


@web.middleware
async def _json_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown paths get the same JSON 404 shape as the data plane's."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _json(_NOT_FOUND, 404)
