"""The request path: the client-facing HTTP/1.1 protocol, routes, the upstream pool, TLS.

Owns: the compiled protocol and relay (`_http.pyx` and its `.pxi` includes, with flow control
in `_flow.pyx` and the route table in `_routes.pyx`, whose rules `routes` documents and
re-exports), the server that makes a protocol per connection and owns limits and drain
(`protocol`), the per-route runtime built from the config (`proxy`), the upstream side
(`upstream`, re-exporting the pool `upstream_pool`, one connection `upstream_conn`, the
response `upstream_response`, TLS to upstreams `upstream_tls` and the errors
`upstream_errors`), and the TLS contexts of the listener and upstreams (`tls`).
May import: `fastgate.auth`, `fastgate.config`, `fastgate.token`, the leaf modules. Not
`fastgate.keys`: the request path sees a key source through `proxy.KeySourceLike`.
"""
