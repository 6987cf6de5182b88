"""How an upstream exchange fails: the error kinds and the status the client gets (SPEC §3.5).

:class:`UpstreamError` is what the pool, its connections and the compiled relay
(``fastgate/dataplane/_http.pyx``) raise; :class:`_StaleConnection` stays inside the pool (a
reused keep-alive connection closed before any response byte: maybe retryable).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["ErrorKind", "UpstreamError"]

#: ``tls``: an https upstream's TLS handshake failed (certificate not trusted, wrong name,
#: expired, no shared version or cipher; RFC 8446 §6.2 alerts).
ErrorKind = Literal["connect", "timeout", "reset", "protocol", "tls"]


class UpstreamError(Exception):
    """The upstream exchange failed; ``status`` is what the client gets (SPEC §3.5)."""

    kind: ErrorKind
    status: int
    #: A reused keep-alive connection closed before any response byte (RFC 9112 §9.3.1).
    stale: bool = False

    def __init__(self, kind: ErrorKind, detail: str = "") -> None:
        self.kind = kind
        # SPEC §3.5: upstream timeout -> 504 Gateway Timeout, any other failure -> 502.
        self.status = 504 if kind == "timeout" else 502
        super().__init__(f"upstream {kind} error" + (f": {detail}" if detail else ""))


class _StaleConnection(Exception):
    """A reused keep-alive connection closed before any response byte (maybe retryable)."""
