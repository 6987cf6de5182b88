"""Keep-alive HTTP/1.1 client pool for the data plane's upstream leg.

One ``UpstreamPool`` per configured upstream (SPEC §2 ``upstreams``). Connections are
``asyncio.Protocol`` objects on the running (uvloop) loop; responses are parsed by llhttp
through ``httptools.HttpResponseParser`` - never by hand.

Hot path (one request on a warm pool): pop an idle connection (LIFO), one ``transport.write``
of the serialized head (+ small body), one Future for the response head, and - for the common
small response that arrives in one read - ``UpstreamResponse.body_complete`` already holds the
whole body, so the caller never awaits ``read()``. Timeouts use one lazily re-armed timer per
connection instead of a timer per request.

Text codec: header names/values and the reason phrase are decoded with UTF-8 +
``surrogateescape`` and request heads are encoded the same way. That is exactly how aiohttp's
server decodes (and its writer encodes) headers, so bytes round-trip unchanged through
aiohttp -> pool -> upstream; for ASCII it is identical to latin-1 (RFC 9110 §5.5 obs-text is
passed through as opaque bytes).

The upstream side is split by concern; this module is its import path (every name the data
plane, the compiled relay, the tools and the tests import from here is re-exported):

- :mod:`fastgate.dataplane.upstream_pool` - :class:`UpstreamPool`: the URL, the connection
  slots and waiters, the idle sweeper, request serialization, the stale-connection retry.
- :mod:`fastgate.dataplane.upstream_conn` - one connection (``_Conn``, llhttp callbacks,
  timer, back-pressure, streamed request bodies), the connection phases and :func:`retire`.
- :mod:`fastgate.dataplane.upstream_response` - :class:`UpstreamResponse` (head, body stream,
  the ``body_complete`` fast path).
- :mod:`fastgate.dataplane.upstream_tls` - TLS to an https upstream (context, verify, SNI,
  client certificate files, handshake failures).
- :mod:`fastgate.dataplane.upstream_errors` - :class:`UpstreamError` and its kinds.
"""

from __future__ import annotations

from fastgate.dataplane.upstream_conn import READ_HIGH_WATER as READ_HIGH_WATER
from fastgate.dataplane.upstream_conn import WRITE_HIGH_WATER as WRITE_HIGH_WATER
from fastgate.dataplane.upstream_conn import retire as retire
from fastgate.dataplane.upstream_errors import ErrorKind as ErrorKind
from fastgate.dataplane.upstream_errors import UpstreamError
from fastgate.dataplane.upstream_pool import IDLE_TIMEOUT as IDLE_TIMEOUT
from fastgate.dataplane.upstream_pool import UpstreamPool
from fastgate.dataplane.upstream_response import FAST_BODY_MAX as FAST_BODY_MAX
from fastgate.dataplane.upstream_response import UpstreamResponse

__all__ = ["UpstreamError", "UpstreamPool", "UpstreamResponse"]
