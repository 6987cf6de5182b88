"""Route table compiled from ``RouteConfig`` (SPEC §2 ``routes``; first match wins).

Matching rules (decided here, documented in one place):

* Matching runs on the raw request path (no percent-decoding, no normalisation) and never on
  the query string. Because no normalisation happens, paths that a backend could read
  differently from the gateway are rejected before matching (:func:`path_is_ambiguous`,
  security catalog G5): the rule sees exactly the bytes that are forwarded.
* ``path``: exact string equality. ``path_prefix``: plain string prefix (like Envoy's
  ``prefix`` and NGINX's prefix ``location``); write ``/public/`` with the trailing slash to
  match whole segments only. ``path_regex``: :func:`re.fullmatch` over the whole path (like
  Envoy's ``safe_regex``), so ``/a`` does not match ``/a/../b``.
* ``methods``: upper-case method names; absent = any method.
* ``host``: compared lower-case with the port removed (RFC 9110 §4.2.3: host is
  case-insensitive); absent = any host.
* ``strip_prefix``: removes what matched from the front of the forwarded path: the prefix for
  ``path_prefix``, the whole path for ``path``, the regex's match for ``path_regex``; the
  result always starts with ``/``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fastgate.config import RouteConfig

_EXACT = 0
_PREFIX = 1
_REGEX = 2
_ANY = 3

# Percent-encodings whose decoded form changes how a path splits into segments.
_AMBIGUOUS_ESCAPES = ("%2e", "%2f", "%5c", "%00")


def path_is_ambiguous(path: str) -> bool:
    """True for a raw path a backend could interpret differently from the gateway.

    Rejected (security catalog G5; Envoy CVE-2026-73511, CVE-2021-43824 class): ``//``,
    dot segments (``/./``, ``/../`` and a trailing ``/.`` or ``/..``), a backslash, ``;``
    (matrix parameters that Tomcat and others strip before routing), and the escapes
    ``%2e``, ``%2f``, ``%5c``, ``%00`` in any case. A path must start with ``/``
    (origin-form, RFC 9112 §3.2.1); ``*`` and absolute-form are handled by the caller.
    ``/.well-known/x`` and ``/a/.hidden`` stay legal: only whole dot segments are ambiguous.
    """
    if not path.startswith("/"):
        return True
    if "//" in path or "\\" in path or ";" in path:
        return True
    if "/." in path:
        for segment in path.split("/"):
            if segment == "." or segment == "..":
                return True
    if "%" in path:
        lowered = path.lower()
        for escape in _AMBIGUOUS_ESCAPES:
            if escape in lowered:
                return True
    return False


def host_without_port(host: str) -> str:
    """``Example.COM:8080`` -> ``example.com``; ``[::1]:80`` -> ``[::1]``; a trailing dot
    (the absolute form of a DNS name, RFC 1034 §3.1) is dropped: ``secure.test.`` names the
    same host as ``secure.test``, so it cannot skip that host's route."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1].lower() if end != -1 else host.lower()
    colon = host.find(":")
    if colon != -1:
        host = host[:colon]
    return host.rstrip(".").lower()


class Route:
    """One compiled route: how to match it and how to rewrite the path."""

    __slots__ = ("config", "host", "index", "kind", "methods", "name", "path", "regex",
                 "strip_prefix", "upstream")

    def __init__(self, index: int, config: RouteConfig) -> None:
        m = config.match
        self.index = index
        self.config = config
        self.name = config.name
        self.upstream = config.upstream
        self.strip_prefix = config.strip_prefix
        self.methods: frozenset[str] | None = (
            frozenset(x.upper() for x in m.methods) if m.methods else None
        )
        self.host: str | None = host_without_port(m.host) if m.host else None
        self.regex: re.Pattern[str] | None = None
        self.path = ""
        if m.path is not None:
            self.kind = _EXACT
            self.path = m.path
        elif m.path_prefix is not None:
            self.kind = _PREFIX
            self.path = m.path_prefix
        elif m.path_regex is not None:
            self.kind = _REGEX
            self.regex = re.compile(m.path_regex)
        else:
            self.kind = _ANY

    def matches_path(self, path: str) -> bool:
        kind = self.kind
        if kind == _PREFIX:
            return path.startswith(self.path)
        if kind == _EXACT:
            return path == self.path
        if kind == _REGEX:
            assert self.regex is not None
            return self.regex.fullmatch(path) is not None
        return True

    def rewrite(self, path: str) -> str:
        """The forwarded path (``strip_prefix`` applied)."""
        if not self.strip_prefix:
            return path
        kind = self.kind
        if kind == _PREFIX:
            rest = path[len(self.path):]
        elif kind == _EXACT:
            rest = ""
        elif kind == _REGEX:
            assert self.regex is not None
            found = self.regex.match(path)
            rest = path[found.end():] if found is not None else path
        else:
            return path
        if not rest.startswith("/"):
            rest = "/" + rest
        return rest

    def __repr__(self) -> str:
        return f"Route({self.index}, {self.name!r})"


class RouteTable:
    """Routes in configuration order; :meth:`match` returns the first that matches."""

    __slots__ = ("_uses_host", "routes")

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes: tuple[Route, ...] = tuple(Route(i, r) for i, r in enumerate(routes))
        # Only routes with a host rule need the Host header parsed.
        self._uses_host = any(r.host is not None for r in self.routes)

    def match(self, method: str, host: str | None, path: str) -> Route | None:
        """First route whose path, method and host rules all hold, else None (-> 404).

        ``path`` is the raw path without the query string; ``host`` the Host header as
        received (port and case are handled here)."""
        bare_host: str | None = None
        if self._uses_host and host:
            bare_host = host_without_port(host)
        for route in self.routes:
            if not route.matches_path(path):
                continue
            if route.methods is not None and method not in route.methods:
                continue
            if route.host is not None and route.host != bare_host:
                continue
            return route
        return None

    def __len__(self) -> int:
        return len(self.routes)
