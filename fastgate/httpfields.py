"""HTTP field names shared by the config checks, the data plane and the upstream pool."""

from __future__ import annotations

from typing import Final

# RFC 9110 §7.6.1: hop-by-hop fields a proxy removes from a forwarded message, plus
# Proxy-Connection (RFC 9112 Appendix C.2.2: obsolete, still seen) and Keep-Alive.
HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade",
})
