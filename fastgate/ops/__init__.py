"""Running and watching the gateway: processes, admin endpoints, metrics, logs, traces.

Owns: the supervisor and its workers (`supervisor`), the admin server (`admin`), Prometheus
metrics (`metrics`, with the compiled per-request counters in `_counters.pyx`), the access log
(`accesslog`), operational log lines (`logformat`) and optional span export (`otel`).
May import: `fastgate.app` and everything below it.
"""
