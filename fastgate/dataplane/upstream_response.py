"""The response the pool hands to the data plane: the final head plus its body stream.

Fast path: for the common small response that arrives in one read,
``UpstreamResponse.body_complete`` already holds the whole body (at most
:data:`FAST_BODY_MAX` bytes), so the caller never awaits ``read()``. The connection that feeds
it is :class:`fastgate.dataplane.upstream_conn._Conn`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from fastgate.dataplane.upstream_errors import UpstreamError

if TYPE_CHECKING:
    from fastgate.dataplane.upstream_conn import _Conn

__all__ = ["FAST_BODY_MAX", "UpstreamResponse"]

#: A body at most this large that is complete when the head is handed out is joined into
#: ``UpstreamResponse.body_complete`` (fast path: no ``read()`` round trips).
FAST_BODY_MAX: Final = 64 * 1024


class UpstreamResponse:
    """The final response head plus its body stream.

    ``body_complete`` (fast path): the whole body when it had already arrived (and is at most
    ``FAST_BODY_MAX`` bytes) by the time the head was returned; ``b""`` for responses without
    a body (HEAD, 204, 304). Otherwise None and the body is streamed with ``read()``.
    ``read()`` always streams the body from its start, independently of ``body_complete``:
    use one or the other. Always call ``release()`` (also after an error).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_eof",
        "_error",
        "body_complete",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None
    body_complete: bytes | None

    def __init__(self, conn: _Conn) -> None:
        self.status = 0
        self.reason = ""
        self.headers = []
        self.content_length = None
        self.body_complete = None
        self._conn: _Conn | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._error: UpstreamError | None = None

    async def read(self) -> bytes:
        """Next body chunk; ``b""`` once the body is complete.

        Raises UpstreamError (``reset``, ``timeout`` after ``read_timeout`` without data,
        ``protocol``) when the body cannot be completed. Data that arrived before a failure
        is returned first.
        """
        while True:
            chunks = self._chunks
            if chunks:
                # Hand out everything buffered at once (bounded by READ_HIGH_WATER + one read):
                # fewer, larger writes towards the client.
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                conn = self._conn
                if conn is not None and conn.reading_paused:
                    conn.resume_reading()
                return data
            if self._eof:
                return b""
            if self._error is not None:
                raise self._error
            conn = self._conn
            if conn is None:
                raise UpstreamError("reset", "response released before its body was read")
            await conn.wait()

    def release(self) -> None:
        """Give the connection back: reused when the whole response was received and the
        connection is persistent, closed otherwise (e.g. body not fully received). Idempotent."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.pool._release(conn)

    def __repr__(self) -> str:
        return f"<UpstreamResponse {self.status} {self.reason!r}>"
