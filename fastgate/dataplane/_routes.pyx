# cython: language_level=3, embedsignature=True, wraparound=True, boundscheck=True
"""The compiled route table: :class:`RouteTable`, :class:`Route` and the path checks the data
plane runs on every request. The matching rules are documented in :mod:`fastgate.dataplane.routes`
(the Python-facing module that re-exports these)."""

import re

cdef enum:
    _EXACT = 0
    _PREFIX = 1
    _REGEX = 2
    _ANY = 3

# Percent-encodings whose decoded form changes how a path splits into segments.
cdef tuple _AMBIGUOUS_ESCAPES = ("%2e", "%2f", "%5c", "%00")


cpdef bint path_is_ambiguous(str path):
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


cpdef str host_without_port(str host):
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


cdef class Route:
    """One compiled route: how to match it and how to rewrite the path."""

    def __init__(self, int index, config):
        m = config.match
        self.index = index
        self.config = config
        self.name = config.name
        self.upstream = config.upstream
        self.strip_prefix = config.strip_prefix
        self.methods = frozenset(x.upper() for x in m.methods) if m.methods else None
        self.host = host_without_port(m.host) if m.host else None
        self.regex = None
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

    cpdef bint matches_path(self, str path):
        cdef int kind = self.kind
        if kind == _PREFIX:
            return path.startswith(self.path)
        if kind == _EXACT:
            return path == self.path
        if kind == _REGEX:
            return self.regex.fullmatch(path) is not None
        return True

    cpdef str rewrite(self, str path):
        """The forwarded path (``strip_prefix`` applied)."""
        if not self.strip_prefix:
            return path
        cdef int kind = self.kind
        if kind == _PREFIX:
            rest = path[len(self.path):]
        elif kind == _EXACT:
            rest = ""
        elif kind == _REGEX:
            found = self.regex.match(path)
            rest = path[found.end():] if found is not None else path
        else:
            return path
        if not rest.startswith("/"):
            rest = "/" + rest
        return rest

    def __repr__(self):
        return f"Route({self.index}, {self.name!r})"


cdef class RouteTable:
    """Routes in configuration order; :meth:`match` returns the first that matches."""

    def __init__(self, routes):
        self.routes = tuple(Route(i, r) for i, r in enumerate(routes))
        # Only routes with a host rule need the Host header parsed.
        self._uses_host = any(r.host is not None for r in self.routes)

    cpdef Route match(self, str method, object host, str path):
        """First route whose path, method and host rules all hold, else None (-> 404).

        ``path`` is the raw path without the query string; ``host`` the Host header as
        received (port and case are handled here)."""
        cdef Route route
        cdef object bare_host = None
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

    def __len__(self):
        return len(self.routes)
