"""Route table compiled from ``RouteConfig`` (SPEC §2 ``routes``; first match wins).

Matching rules (decided here, documented in one place; the table is compiled in
``fastgate/dataplane/_routes.pyx``, since the data plane matches every request against it):

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

from fastgate.dataplane._routes import Route, RouteTable, host_without_port, path_is_ambiguous

__all__ = ["Route", "RouteTable", "host_without_port", "path_is_ambiguous"]
