# cython: language_level=3
"""Flow control for the relay: a transport's reading is paused while any reason holds.

The data plane relays bytes between two transports (client <-> upstream). When one side's
write buffer passes its high-water mark (asyncio calls ``pause_writing`` on that side's
protocol), the *other* side's reading is paused, so neither a slow client nor a slow upstream
makes the gateway buffer more than about one high-water mark plus one read per direction
(what uvicorn's ``flow_control.py`` and every proxy do).

Reading can be paused for several independent reasons at once (the peer's buffer is full,
pipelined requests are queued, a slow-path decision is pending); :class:`ReadGate` keeps them
as bits (``PEER_BUSY``, ``QUEUED``, ``PENDING`` in ``_flow.pxd``) and touches the transport
only on the first pause and the last resume.
"""


cdef class ReadGate:
    """Pause/resume a transport's reading by reason bits (see the module docstring)."""

    def __init__(self, transport=None):
        self.transport = transport
        self.reasons = 0

    cpdef void pause(self, int reason):
        if not self.reasons and self.transport is not None:
            self.transport.pause_reading()
        self.reasons |= reason

    cpdef void resume(self, int reason):
        if not self.reasons & reason:
            return
        self.reasons &= ~reason
        if not self.reasons and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
