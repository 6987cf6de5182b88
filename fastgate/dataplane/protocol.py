"""The client-facing HTTP/1.1 server: one protocol per connection over llhttp (httptools).

The protocol itself -- :class:`ClientProtocol`, the parser's callback target, with the
per-request :class:`Exchange` and the upstream relay -- is compiled
(``fastgate/dataplane/_http.pyx``:
the profile of its pure-Python first version was all attribute lookups and calls). This module
is the Python side: :class:`Server`, the protocol factory one worker hands to
``loop.create_server``, which holds the limits and timeouts and the set of live connections
that a drain closes.
"""

from __future__ import annotations

import asyncio

from fastgate.dataplane._http import ClientProtocol, Exchange, RequestHeaders
from fastgate.dataplane.proxy import DataPlane


class Server:
    """The data plane's protocol factory for one worker; tracks its live connections."""

    def __init__(self, plane: DataPlane, loop: asyncio.AbstractEventLoop, *,
                 scheme: bytes = b"http") -> None:
        self.plane = plane
        self.loop = loop
        self.scheme = scheme
        self.connections: set[ClientProtocol] = set()
        self.configure()

    def configure(self) -> None:
        """Read the limits and timeouts of the current tables (again after a reload)."""
        config = self.plane.tables.config
        self.header_timeout: float = config.timeouts.header
        self.keepalive_timeout: float = config.timeouts.keepalive
        self.send_timeout: float = config.timeouts.send
        self.max_connections: int = config.limits.max_connections
        self.max_requests: int = config.limits.max_requests_per_connection
        self.max_header_bytes: int = config.limits.max_header_bytes
        self.trusted = tuple(config.trusted_proxies)
        self.request_id: bool = config.tracing.request_id
        self.create_traceparent: bool = config.tracing.traceparent == "create"

    def __call__(self) -> ClientProtocol:
        return ClientProtocol(self)

    def close_idle(self) -> None:
        """Drain: idle keep-alive connections close now; busy ones after their response."""
        for proto in list(self.connections):
            if proto.active is None and proto.tunnel is None and proto.transport is not None:
                proto.transport.close()

    async def shutdown(self, timeout: float) -> None:
        """Wait (bounded) for the requests in flight, then close what is left."""
        deadline = self.loop.time() + timeout
        while any(p.active is not None for p in self.connections) and \
                self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.abort() if proto.active is not None else \
                    proto.transport.close()


__all__ = ["ClientProtocol", "Exchange", "RequestHeaders", "Server"]
