# Shared declaration of the relay's read gate (fastgate/dataplane/_flow.pyx), cimported by _http.pyx.

cdef enum:
    PEER_BUSY = 1
    QUEUED = 2
    PENDING = 4
    HIGH_WATER = 65536  # write-buffer high-water mark of both legs (asyncio's default)

cdef class ReadGate:
    cdef public object transport
    cdef public int reasons
    cpdef void pause(self, int reason)
    cpdef void resume(self, int reason)
