"""The cost of metrics and of the access log: e2e workload W1 against one fastgate worker in
three configurations plus an A/A control, interleaved; OpenTelemetry spans in-process only.

    python benchmarks/ops_cost.py                         # 9 rounds x 6 s per configuration
    python benchmarks/ops_cost.py --rounds 5 --duration 6 --json benchmarks/out/ops-cost.json

Configurations (everything else is the e2e harness' fastgate config: one jwks_file provider,
one route injecting X-User-Id, nginx upstream, workers: 1):
  metrics     metrics on,  access log off   (the e2e default)
  bare        metrics off, access log off   (the reference for the ratios)
  metrics+log metrics on,  access log on, every request, to a file
  bare-again  the same as bare, in its own process: an A/A control. Two identical gateway
              processes differ by a few percent (hash seeds, memory layout) and the machine
              adds noise; the control's ratio to bare shows the smallest difference this
              method can tell apart from zero.

The three gateways run side by side (idle ones cost nothing measurable) and are measured in
turn, A B C, B C A, C A B, ..., so slow drifts of a shared 2-core machine hit all of them
alike and none is always first in its round. The
issue's goal: metrics on costs <= 5 % of W1 throughput. Reported per configuration: median
and range of req/s and p99 over the rounds, the gateway's CPU time per request (utime +
stime of the pinned fastgate process over the run / requests: steadier than req/s when
other work shares the machine), and the median of the per-round ratios to ``bare`` (a paired
comparison: each ratio uses runs seconds apart).

The pieces (keys, token sets, nginx, wrk with benchmarks/wrk/cycle.lua, CPU pinning, child
process handling) are benchmarks/e2e.py's, imported. Outputs go to benchmarks/out/ (git-ignored):
ops-cost/ (configs, logs, wrk outputs) and ops-cost-latest.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import e2e  # noqa: E402 - benchmarks/ is not a package; e2e.py is the harness

if str(e2e.REPO) not in sys.path:
    sys.path.insert(0, str(e2e.REPO))

VARIANTS: dict[str, tuple[bool, bool, str]] = {  # name -> (metrics, access log, description)
    "metrics": (True, False, "metrics on, access log off"),
    "bare": (False, False, "metrics off, access log off"),
    "metrics+log": (True, True, "metrics on, access log on (every request, to a file)"),
}
REFERENCE = "bare"
CONTROL = "bare-again"  # a second, identical `bare` gateway (--no-control drops it)


@dataclass
class Variant:
    name: str
    metrics: bool
    access_log: bool
    description: str
    port: int = 0
    config: Path | None = None
    rps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)  # gateway CPU time per request
    pid: int = 0
    requests: int = 0
    anomalies: list[str] = field(default_factory=list)


def write_config(env: e2e.Env, variant: Variant, port: int) -> Path:
    """The e2e harness' fastgate config with this variant's metrics / access-log switches."""
    base = yaml.safe_load(e2e.write_fastgate_config(env, port).read_text())
    base["metrics"] = variant.metrics
    if variant.access_log:
        log_path = env.run_dir / f"access-{variant.name}.log"
        log_path.unlink(missing_ok=True)
        base["access_log"] = {"enabled": True, "sample": 1.0, "path": str(log_path)}
    else:
        base["access_log"] = {"enabled": False}
    path = env.run_dir / f"fastgate-{variant.name.replace('+', '-')}.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def start_fastgate(env: e2e.Env, variant: Variant) -> subprocess.Popen[bytes]:
    port = e2e.free_port()
    cfg = write_config(env, variant, port)
    cmd = env.fastgate_cmd.format(config=shlex.quote(str(cfg)),
                                  python=shlex.quote(sys.executable))
    argv = [*env.pin.prefix(env.pin.target_cpu), *shlex.split(cmd)]
    penv = dict(os.environ)
    penv["PYTHONPATH"] = os.pathsep.join(filter(None, [str(e2e.REPO), penv.get("PYTHONPATH")]))
    logp = env.run_dir / f"fastgate-{variant.name.replace('+', '-')}.log"
    proc = env.procs.start(f"fastgate-{variant.name}", argv, logp, env=penv, cwd=e2e.REPO)
    why = e2e.wait_http(port, proc, 30)
    if why:
        raise RuntimeError(f"fastgate ({variant.name}) {why}:\n{e2e.tail(logp)}")
    variant.port, variant.config, variant.pid = port, cfg, proc.pid  # taskset execs: same pid
    return proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, env: e2e.Env, variant: Variant, tokens: Path,
            tag: str) -> None:
    cpu0 = cpu_seconds(variant.pid)
    data = e2e.run_wrk(args, env, variant.port, tokens, args.duration, tag)
    cpu = cpu_seconds(variant.pid) - cpu0
    requests = int(data["requests"])
    variant.cpu_us.append(cpu / requests * 1e6 if requests else 0.0)
    variant.requests += requests
    rps = requests / (data["duration_us"] / 1e6)
    variant.rps.append(rps)
    variant.p50_ms.append(data["latency_us"]["p50"] / 1000)
    variant.p99_ms.append(data["latency_us"]["p99"] / 1000)
    errs = data["errors"]
    bad = int(errs["status"]) + sum(int(errs[k]) for k in ("connect", "read", "write",
                                                              "timeout"))
    if bad:
        variant.anomalies.append(f"{tag}: {errs}")
    e2e.log(f"{tag}: {rps:,.0f} req/s p99 {variant.p99_ms[-1]:.2f} ms, "
            f"{variant.cpu_us[-1]:.1f} µs CPU/request"
            + (f" ERRORS {errs}" if bad else ""))


def micro(run_dir: Path, n: int = 200_000) -> dict[str, float]:
    """µs per request of exactly what each switch adds, measured in this process.

    ``metrics``: the hook calls the data plane makes for one proxied W1 request (in flight
    +1/-1, a token-cache hit, the upstream duration, the request's status and duration) on a
    real Metrics minus the same calls on the NullMetrics that ``metrics: false`` gives.
    ``access_log``: one line through AccessLog.log to a file, buffer flushes included.
    ``otel`` (when the ``otel`` extra is installed): ``tracing.otel`` at sample 1.0, one span
    per request through SpanSink.log plus its share of the batch export — the OTLP protobuf
    encoding the exporter thread does — to a discarding exporter (no socket: the POST is the
    collector's cost, not the gateway's, and would measure loopback noise); the processor is
    flushed every 1,000 spans so none is dropped from a full queue. ``otel_unsampled``: the
    same sink at sample 0, what every request not sampled pays.
    Deterministic where the e2e runs are noisy; it leaves out cache and allocator effects.
    """
    import timeit

    from fastgate.config import AccessLogConfig
    from fastgate.ops.accesslog import AccessLog
    from fastgate.ops.metrics import Metrics

    def per_call(fn: Any) -> float:
        best = min(timeit.repeat(fn, number=n, repeat=3))
        return best / n * 1e6

    def hooks(m: Any) -> Any:
        def one() -> None:
            m.inflight_inc()
            m.cache_lookup(True)
            m.upstream_observe(0, 0.0004)
            m.request_done(0, 200, 0.0009)
            m.inflight_dec()
        return one

    on = Metrics(routes=["bench"], providers=["bench"], upstreams=["nginx"])
    off = Metrics(routes=["bench"], providers=["bench"], upstreams=["nginx"], enabled=False)
    path = run_dir / "micro-access.log"
    with open(path, "wb") as f:
        access = AccessLog(AccessLogConfig(enabled=True), 0, stream=f)
        line = per_call(lambda: access.log("bench", "GET", "/api/bench", 200, None,
                                           0.00091234, 0.00041234))
        access.flush()
    path.unlink(missing_ok=True)
    out = {"metrics": per_call(hooks(on)) - per_call(hooks(off)), "access_log": line}
    out.update(micro_otel())
    return out


class _Exchange:
    """What SpanSink reads of fastgate.dataplane._http.Exchange, for one admitted W1 request."""

    method = "GET"
    raw_path = "/api/bench"
    traceparent = None
    request_id = b"f1a2b3c4d5e6f7a8" + b"%016x" % 42
    client = "127.0.0.1"
    upstream_status = 200


def micro_otel(n: int = 20_000, chunk: int = 1_000) -> dict[str, float]:
    """µs per request of ``tracing.otel`` (see micro); {} without the otel extra."""
    try:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    except ImportError:
        return {}
    from fastgate.config import OtelConfig, TracingConfig
    from fastgate.ops.otel import SpanSink

    class Discard(SpanExporter):  # type: ignore[misc]
        def __init__(self, encode: bool) -> None:
            self.encode = encode

        def export(self, spans: Any) -> Any:
            if self.encode:
                encode_spans(spans).SerializeToString()  # what OTLPSpanExporter POSTs
            return SpanExportResult.SUCCESS

    request = _Exchange()
    out: dict[str, float] = {}
    # otel_request_path: without the encoding, i.e. what SpanSink.log itself costs the loop.
    for key, sample, encode in (("otel", 1.0, True), ("otel_request_path", 1.0, False),
                                ("otel_unsampled", 0.0, False)):
        sink = SpanSink(TracingConfig(otel=OtelConfig(enabled=True, sample=sample)),
                        exporter=Discard(encode), schedule_delay=60.0, max_queue=chunk)
        best = float("inf")
        try:
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(n // chunk):
                    for _ in range(chunk):
                        sink.log(request, route="bench", status=200, reason=None,
                                 duration=0.00091234, upstream_latency=0.00041234)
                    sink.force_flush()
                best = min(best, time.perf_counter() - t0)
        finally:
            sink.shutdown()
        out[key] = best / n * 1e6
    return out


def _otel_words(micro_us: dict[str, float], base_cpu: float | None = None) -> str:
    if "otel" not in micro_us:
        return "; otel span export: not measured (pip install 'fastgate[otel]')"
    share = f" ({micro_us['otel'] / base_cpu * 100:.1f} %)" if base_cpu else ""
    return (f"; one exported OpenTelemetry span (tracing.otel, sample 1.0, the export "
            f"thread's protobuf encoding included) {micro_us['otel']:.2f} µs{share}, of which "
            f"{micro_us['otel_request_path']:.2f} µs on the request path; an unsampled "
            f"request {micro_us['otel_unsampled']:.2f} µs")


def paired_ratios(v: Variant, ref: Variant, attr: str) -> list[float]:
    mine: list[float] = getattr(v, attr)
    theirs: list[float] = getattr(ref, attr)
    return [a / b for a, b in zip(mine, theirs, strict=True) if b]


def iqr(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def report(args: argparse.Namespace, env: e2e.Env, variants: list[Variant],
           load_before: float, log_lines: int | None, micro_us: dict[str, float]) -> str:
    ref = next(v for v in variants if v.name == REFERENCE)
    out = [f"# fastgate ops cost (metrics, access log) - "
           f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n"]
    out.append(f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}` "
               f"(cwd `{Path.cwd()}`)\n")
    out.append(f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
               f"{platform.python_version()}.\n")
    out.append(f"Load: W1 (1,000 valid RS256 tokens reused), wrk -t{args.threads} "
               f"-c{args.connections} -d{args.duration:g}s per run, {args.rounds} interleaved "
               f"rounds ({', '.join(v.name for v in variants)}; order rotated every round), "
               f"warm-up {args.warmup:g}s each; "
               f"fastgate workers: 1 in front of nginx.\n")
    out.append(f"Pinning: {env.pin.describe()}.\n")
    out.append(f"Load average (1 min) before the run: {load_before:.2f}"
               + (" - **busy machine: compare the ratios, not the absolute numbers**"
                  if load_before > 0.7 else "") + "\n")
    out.append("| configuration | req/s (median) | req/s (min-max) | p99 ms (median) | "
               f"req/s vs {REFERENCE} (median of rounds) | p99 vs {REFERENCE} | "
               f"gateway CPU µs/request (median) | CPU vs {REFERENCE} | notes |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for v in variants:
        ratio = "1.00 (reference)" if v is ref else \
            f"{statistics.median(paired_ratios(v, ref, 'rps')):.3f}"
        p99r = "1.00" if v is ref else f"{statistics.median(paired_ratios(v, ref, 'p99_ms')):.2f}"
        cpur = "1.00" if v is ref else f"{statistics.median(paired_ratios(v, ref, 'cpu_us')):.3f}"
        notes = "; ".join(v.anomalies) if v.anomalies else v.description
        out.append(f"| {v.name} | {statistics.median(v.rps):,.0f} | {min(v.rps):,.0f}-"
                   f"{max(v.rps):,.0f} | {statistics.median(v.p99_ms):.2f} | {ratio} | {p99r} "
                   f"| {statistics.median(v.cpu_us):.1f} | {cpur} | {notes} |")
    out.append("")
    metrics = next(v for v in variants if v.name == "metrics")
    rps_r = paired_ratios(metrics, ref, "rps")
    cpu_r = paired_ratios(metrics, ref, "cpu_us")
    rps_med, (rps_lo, rps_hi) = statistics.median(rps_r), iqr(rps_r)
    cpu_med, (cpu_lo, cpu_hi) = statistics.median(cpu_r), iqr(cpu_r)
    of_medians = statistics.median(metrics.rps) / statistics.median(ref.rps)
    if rps_hi - rps_lo > 0.10:
        verdict = (f"**inconclusive at this noise level** (the paired rounds' spread, "
                   f"{(rps_hi - rps_lo) * 100:.0f} points, is wider than the 5 % goal)")
    else:
        verdict = "met" if rps_med >= 0.95 else "**NOT met**"
    out.append(f"Metrics on vs off (goal: at most 5 % less W1 throughput): req/s ratio "
               f"{rps_med:.3f} (median of paired rounds; IQR {rps_lo:.3f}-{rps_hi:.3f}; "
               f"ratio of the medians {of_medians:.3f}), "
               f"gateway CPU per request ratio {cpu_med:.3f} (IQR {cpu_lo:.3f}-{cpu_hi:.3f}): "
               f"{verdict}.")
    control = next((v for v in variants if v.name == CONTROL), None)
    if control is not None:
        c_rps, c_cpu = paired_ratios(control, ref, "rps"), paired_ratios(control, ref, "cpu_us")
        out.append(f"A/A control ({CONTROL}, identical to {REFERENCE}): req/s ratio "
                   f"{statistics.median(c_rps):.3f} (IQR {iqr(c_rps)[0]:.3f}-{iqr(c_rps)[1]:.3f}),"
                   f" CPU per request ratio {statistics.median(c_cpu):.3f}: differences of "
                   "this size are the method's noise floor, not costs.")
    logged = next((v for v in variants if v.access_log), None)
    if logged is not None and log_lines is not None:
        out.append(f"Access log: {log_lines:,} lines written for {logged.requests:,} requests "
                   f"measured (+ warm-up and sanity requests).")
    base_cpu = statistics.median(ref.cpu_us)
    out.append("")
    out.append(f"In-process micro-measure of what each switch adds per request: metrics hooks "
               f"{micro_us['metrics']:.2f} µs, one access-log line {micro_us['access_log']:.2f} "
               f"µs, i.e. {micro_us['metrics'] / base_cpu * 100:.1f} % and "
               f"{micro_us['access_log'] / base_cpu * 100:.1f} % of the {base_cpu:.0f} µs of "
               f"gateway CPU a W1 request costs ({REFERENCE}, median)"
               + _otel_words(micro_us, base_cpu) + ".")
    out.append("")
    out.append("Per round req/s: " + "; ".join(
        f"{v.name} " + ", ".join(f"{x:,.0f}" for x in v.rps) for v in variants) + ".")
    out.append("")
    out.append("Per round gateway CPU µs/request: " + "; ".join(
        f"{v.name} " + ", ".join(f"{x:.1f}" for x in v.cpu_us) for v in variants) + ".")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (>= 3)")
    p.add_argument("--duration", type=float, default=6.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per gateway")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--no-control", action="store_true",
                   help=f"skip the A/A control gateway ({CONTROL})")
    p.add_argument("--out-dir", type=Path, default=e2e.DEFAULT_OUT)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--fastgate-cmd", default="{python} -m fastgate run -c {config}",
                   help="command starting fastgate; {config} and {python} are substituted")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be >= 3 (the machine is noisy)")
    if not 0 < args.duration <= 120 or not 0 <= args.warmup <= 60:
        p.error("--duration must be in (0, 120] and --warmup in [0, 60]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    if e2e.missing_tool("ops_cost"):
        return 2
    run_dir = (args.out_dir / "ops-cost").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pin = e2e.choose_pinning(args.no_pin)
    key = e2e.load_or_create_key(run_dir / "signing-key.pem")
    pubkey, jwks = e2e.public_files(key, run_dir)
    tokens = e2e.token_files(key, run_dir)["W1"]

    procs = e2e.Procs()
    env = e2e.Env(run_dir, pin, procs, e2e.free_port(), pubkey, jwks, args.fastgate_cmd)
    variants = [Variant(name, m, a, d) for name, (m, a, d) in VARIANTS.items()]
    if not args.no_control:
        variants.append(Variant(CONTROL, False, False, "A/A control: bare again, own process"))
    micro_us = micro(run_dir)
    e2e.log(f"micro: metrics hooks {micro_us['metrics']:.2f} µs/request, access-log line "
            f"{micro_us['access_log']:.2f} µs" + _otel_words(micro_us))

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        e2e.start_nginx(env, pin.load_cpu)
        for v in variants:
            start_fastgate(env, v)
            statuses = e2e.sample_statuses(v.port, tokens)
            if set(statuses) != {"200"}:
                raise RuntimeError(f"{v.name}: W1 sample statuses {statuses}, expected 200")
            if args.warmup > 0:
                e2e.log(f"{v.name}: warm-up {args.warmup:g}s")
                e2e.run_wrk(args, env, v.port, tokens, args.warmup, f"{v.name}-warmup")
        for r in range(1, args.rounds + 1):
            # Rotated order (A B C, B C A, C A B, ...): no configuration always runs first
            # or last in a round, where periodic disturbances would bias it.
            k = (r - 1) % len(variants)
            for v in variants[k:] + variants[:k]:
                measure(args, env, v, tokens, f"{v.name}-r{r}")
        time.sleep(1.5)  # the access log flushes every second
    except KeyboardInterrupt:
        e2e.log("interrupted: stopping every child process")
        return 130
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    log_lines = None
    for v in variants:
        if v.access_log:
            path = run_dir / f"access-{v.name}.log"
            with open(path, "rb") as f:
                log_lines = sum(1 for _ in f)
    md = report(args, env, variants, load_before, log_lines, micro_us)
    print(md)
    (args.out_dir / "ops-cost-latest.md").write_text(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {k: (str(x) if isinstance(x, Path) else x) for k, x in vars(args).items()},
            "pinning": pin.describe(), "load_before": load_before, "micro_us": micro_us,
            "variants": [asdict(v) | {"config": str(v.config)} for v in variants]}, indent=2))
    e2e.log(f"report: {args.out_dir / 'ops-cost-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
