"""Flow control for the relay: a transport's reading is paused while any reason holds.

The data plane relays bytes between two transports (client <-> upstream). When one side's
write buffer passes its high-water mark (asyncio calls ``pause_writing`` on that side's
protocol), the *other* side's reading is paused, so neither a slow client nor a slow upstream
makes the gateway buffer more than about one high-water mark plus one read per direction
(RFC 9112 says nothing of this; it is what uvicorn's ``flow_control.py`` and every proxy do).

Reading can be paused for several independent reasons at once (the peer's buffer is full,
pipelined requests are queued, a slow-path decision is pending); :class:`ReadGate` keeps them
as bits and touches the transport only on the first pause and the last resume.
"""

from __future__ import annotations

import asyncio
from typing import Final

#: The peer's transport write buffer is over its high-water mark.
PEER_BUSY: Final = 1
#: Requests are queued behind the one in flight (pipelining): read no further ahead.
QUEUED: Final = 2
#: The request's decision or upstream connection is pending and its body is buffered.
PENDING: Final = 4

#: Write-buffer high-water mark for both legs (asyncio's default is 64 KiB).
HIGH_WATER: Final = 64 * 1024


class ReadGate:
    """Pause/resume a transport's reading by reason bits (see the module docstring)."""

    __slots__ = ("reasons", "transport")

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self.transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons and self.transport is not None:
            self.transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if not self.reasons & reason:
            return
        self.reasons &= ~reason
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    @property
    def paused(self) -> bool:
        return bool(self.reasons)
