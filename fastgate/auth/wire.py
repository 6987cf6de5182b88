"""Responses the gateway writes itself, serialised once (RFC 9112 §4, §6; RFC 9110 §6.6.1).

A :class:`Wire` holds the status line and fixed fields of a :class:`~fastgate.auth.responses.Canned`
answer as bytes, built at start-up; sending one costs a join of five pieces: the prebuilt head,
the cached ``Date`` line, the connection token, the blank line and the body. No ``Server``
field: a banner only tells an attacker what to try (security catalog, fingerprinting).
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import Final

from fastgate.auth.responses import Canned

# RFC 9112 §9.3 / §9.6: HTTP/1.1 persists unless "close"; HTTP/1.0 only when told
# (§C.2.2). Indexed [close][http10]; the compiled relay reads the table directly.
CONNECTION_LINES: Final = (
    (b"", b"Connection: keep-alive\r\n"),
    (b"Connection: close\r\n", b"Connection: close\r\n"),
)
_date_second = -1
_date_line = b""


def date_line() -> bytes:
    """``Date: <IMF-fixdate>\\r\\n`` (RFC 9110 §5.6.7), recomputed at most once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = b"Date: " + formatdate(now, usegmt=True).encode("ascii") + b"\r\n"
    return _date_line


def connection_line(close: bool, http10: bool) -> bytes:
    """The connection field of a response (see ``CONNECTION_LINES``)."""
    return CONNECTION_LINES[close][http10]


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


class Wire:
    """One canned response as prebuilt bytes (see the module docstring)."""

    __slots__ = ("body", "canned", "head", "label", "status")

    def __init__(self, canned: Canned) -> None:
        self.canned = canned
        self.status = canned.status
        self.label = canned.label
        self.body = canned.body
        lines = [f"HTTP/1.1 {self.status} {reason_phrase(self.status)}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in canned.headers.items())
        lines.append(f"Content-Length: {len(canned.body)}\r\n")
        self.head = "".join(lines).encode("utf-8")

    def bytes(self, *, close: bool, http10: bool = False, head_only: bool = False) -> bytes:
        """The response; no body for HEAD (RFC 9110 §9.3.2)."""
        return b"".join((self.head, date_line(), connection_line(close, http10), b"\r\n",
                         b"" if head_only else self.body))


__all__ = ["CONNECTION_LINES", "Wire", "connection_line", "date_line", "reason_phrase"]
