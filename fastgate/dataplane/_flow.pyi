"""Type stubs for the compiled flow control (fastgate/dataplane/_flow.pyx)."""

import asyncio

class ReadGate:
    transport: asyncio.Transport | None
    reasons: int
    def __init__(self, transport: asyncio.Transport | None = None) -> None: ...
    def pause(self, reason: int) -> None: ...
    def resume(self, reason: int) -> None: ...
