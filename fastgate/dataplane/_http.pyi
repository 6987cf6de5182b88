"""Type stubs for the compiled data plane (fastgate/dataplane/_http.pyx)."""

import asyncio
from typing import Any

from fastgate.dataplane._flow import ReadGate

class RequestHeaders:
    def getall(self, key: str, default: list[str]) -> list[str]: ...
    def __contains__(self, key: object) -> bool: ...

class Exchange:
    method: str
    complete: bool
    route_index: int
    status: int
    label: str | None
    upstream_s: float | None
    @property
    def raw_path(self) -> str: ...

class ClientProtocol(asyncio.Protocol):
    transport: asyncio.Transport | None
    gate: ReadGate
    peer: str | None
    active: Exchange | None
    tunnel: RelayConn | None
    def __init__(self, server: Any) -> None: ...

class RelayConn(asyncio.Protocol):
    pool: Any
    phase: int
    dead: bool
    must_close: bool
    keep_alive: bool
    reused: bool
    def __init__(self, pool: Any, loop: asyncio.AbstractEventLoop) -> None: ...
    def close(self) -> None: ...
    def resume_reading(self) -> None: ...
