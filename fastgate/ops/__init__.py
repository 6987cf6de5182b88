"""Running and watching the gateway: processes, admin endpoints, metrics, logs, traces.

Owns: the process model (`supervisor`: `fastgate run`; the master and its worker slots in
`master`, a worker's life in `worker`, the one-process case in `single`, signal handling in
`signals`, what a reload re-reads in `reload`, the reserved port and private directories in
`resources`, log set-up in `logsetup`), the admin server (`admin`), Prometheus metrics
(`metrics`: `Metrics` and `NullMetrics`; the families in `metricfamilies`, the per-route and
per-upstream rows in `metricrows`, the hot-path binding in `metricbinding` over the compiled
counters of `_counters.pyx`, scrape output in `exposition`, multi-worker files in
`multiprocmetrics`), the access log (`accesslog`), operational log lines (`logformat`) and
optional span export (`otel`).
May import: `fastgate.app` and everything below it.
"""
