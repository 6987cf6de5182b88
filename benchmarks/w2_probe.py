"""Where a W2 cache miss's time goes inside the running gateway (issue 9, Speed: "a miss
inside the running gateway costs 59 µs against 41-46 µs in a hot loop: find the difference").

    python benchmarks/w2_probe.py                      # 4 rounds x 6 s, then perf profiles
    python benchmarks/w2_probe.py --rounds 3 --duration 5 --no-perf --gc-mode freeze

Two identical fastgate gateways (`fastgate run -c`, `cache: {max_entries: 1000}`, the e2e
harness' config, started through benchmarks/probes/gc_wrap.py, which only adds gc.callbacks
accounting) alone on CPU 1: `w1` serves W1 (1,000 tokens: every lookup a hit), `w2` serves W2
(20,000 tokens cycled: every lookup a miss). wrk and nginx on CPU 0. Each round, in rotated
order: a W1 run, a W2 run, and benchmarks/probes/hotloop.py on CPU 1 (the same 20,000 tokens
through an IssuerSet with a 1,000-entry TokenCache, timed per call with perf_counter as the
gateway times its verifies). Per run: CPU µs per request (/proc), the gateway's verify
histogram sum/count and cache hits/misses (/metrics), GC collections and time per generation.
Then (unless --no-perf) `perf record -e cpu-clock` of each gateway over one run of its
workload, flat by DSO and symbol, scaled to µs per request, and W2 minus W1 per symbol.
Outputs: benchmarks/out/w2-probe/ and w2-probe-latest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import e2e  # noqa: E402 - benchmarks/ is not a package

PROBES = HERE / "probes"


def gc_read(path: Path) -> list[list[float]]:
    for _ in range(20):
        try:
            return json.loads(path.read_text())["gens"]
        except (OSError, ValueError):
            time.sleep(0.05)
    return [[0, 0.0, 0]] * 3


def gw_run(args: argparse.Namespace, env: e2e.Env, unit: e2e.Unit, gc_path: Path,
           tag: str) -> dict[str, Any]:
    time.sleep(0.25)  # let the gc stats writer catch up with the previous run
    g0 = gc_read(gc_path)
    res = e2e.RunResult(unit.target, unit.workload)
    e2e.measure_unit(args, env, unit, res, tag)
    time.sleep(0.25)
    g1 = gc_read(gc_path)
    rnd = res.rounds[0]
    n = rnd["requests"]
    rnd["gc"] = [{"collections": g1[i][0] - g0[i][0],
                  "us_per_request": (g1[i][1] - g0[i][1]) / n * 1e6 if n else 0.0}
                 for i in range(3)]
    rnd["anomalies"] = res.anomalies
    return rnd


def hotloop(args: argparse.Namespace, env: e2e.Env, tokens: Path, pollute: int = 0,
            perf_data: Path | None = None) -> dict[str, Any]:
    perf = [] if perf_data is None else ["perf", "record", "-q", "-e", "cpu-clock", "-F",
                                         str(args.perf_freq), "-o", str(perf_data), "--"]
    argv = [*perf, *env.pin.prefix(env.pin.target_cpu), sys.executable,
            str(PROBES / "hotloop.py"),
            "--jwks", str(env.jwks), "--tokens", str(tokens), "--issuer", e2e.ISSUER,
            "--audience", e2e.AUDIENCE, "--cache", str(args.cache),
            "--seconds", str(args.hot_seconds), "--pollute", str(pollute),
            "--gc", args.gc_mode]
    env_ = dict(os.environ, PYTHONPATH=str(e2e.REPO))
    out = subprocess.run(argv, capture_output=True, timeout=args.hot_seconds + 60, env=env_)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.decode()[-500:])
    d: dict[str, Any] = json.loads(out.stdout)
    e2e.log(f"hot loop: {d['timed_us']:.1f} µs per timed verify, {d['cpu_us']:.1f} µs CPU "
            f"per call, {d['hits']} hits")
    return d


_PERF_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.kgu]\]\s+(.*)$")


def perf_rows(data: Path, comm: str | None = None) -> list[tuple[float, str, str]]:
    argv = ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,sym",
            "--stdio", "-q", "--percent-limit", "0"]
    if comm:
        argv += ["--comms", comm]
    rep = subprocess.run(argv, capture_output=True, timeout=120)
    rows = []
    for line in rep.stdout.decode(errors="replace").splitlines():
        m = _PERF_LINE.match(line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
    return rows


def perf_profile(args: argparse.Namespace, env: e2e.Env, unit: e2e.Unit, tag: str
                 ) -> dict[str, Any]:
    data = env.run_dir / f"perf-{tag}.data"
    perf = [*env.pin.prefix(env.pin.load_cpu), "perf", "record", "-q", "-e", "cpu-clock",
            "-F", str(args.perf_freq), *(["-g"] if args.callgraph else []),
            "-p", str(unit.inst.proc.pid), "-o", str(data),
            "--", "sleep", str(args.duration + 1)]
    rec = subprocess.Popen(perf, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    rnd = gw_run(args, env, unit, env.run_dir / f"gc-{unit.inst.name}.json", tag)
    rec.wait(timeout=args.duration + 30)
    if args.callgraph:
        cg = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--stdio",
                             "-G", "--percent-limit", "1"], capture_output=True, timeout=300)
        (env.run_dir / f"perf-{tag}-callgraph.txt").write_bytes(cg.stdout)
    rep = subprocess.run(["perf", "report", "-i", str(data), "--no-children", "--sort",
                          "dso,sym", "--stdio", "-q", "--percent-limit", "0"],
                         capture_output=True, timeout=120)
    rows = []
    for line in rep.stdout.decode(errors="replace").splitlines():
        m = _PERF_LINE.match(line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3).strip()))
    # perf ran the whole wrk window plus ~1.5 s idle: scale the shares to the measured CPU.
    return {"cpu_us": rnd["cpu_us"], "requests": rnd["requests"], "rows": rows,
            "run": rnd}


def dso_group(dso: str, sym: str) -> str:
    if "libcrypto" in dso:
        return "OpenSSL libcrypto (RSA)"
    if "_verify" in dso:
        return "fastgate _verify.so"
    if dso.startswith("[kernel"):
        return "kernel (syscalls, TCP loopback)"
    if "libpython" in dso or dso.startswith("python"):
        if re.search(r"gc_|visit_|subtract_refs|move_unreachable|update_refs|"
                     r"deduce_unreachable|_PyObject_GC|collect", sym):
            return "python: cyclic GC"
        if re.search(r"malloc|free|_PyObject_Malloc|pymalloc|arena|obmalloc|_Py_Dealloc"
                     r"|dealloc", sym):
            return "python: allocator / dealloc"
        return "python: interpreter and objects"
    if "libc" in dso:
        return "libc (malloc, memcpy, ...)"
    if "orjson" in dso:
        return "orjson"
    if "uvloop" in dso or "loop.cpython" in dso:
        return "uvloop"
    if "httptools" in dso or "parser" in dso:
        return "httptools"
    if "aiohttp" in dso or "_http_parser" in dso or "_websocket" in dso:
        return "aiohttp C extensions"
    return dso


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--hot-seconds", type=float, default=3.0)
    p.add_argument("--cache", type=int, default=1000)
    p.add_argument("--gc-mode", choices=("normal", "disable", "freeze"), default="normal")
    p.add_argument("--no-perf", action="store_true")
    p.add_argument("--perf-freq", type=int, default=2999)
    p.add_argument("--callgraph", action="store_true",
                   help="perf record -g of the gateways; perf-*-callgraph.txt in the run dir")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=e2e.DEFAULT_OUT)
    args = p.parse_args(argv)
    if e2e.missing_tool("w2_probe"):
        return 2
    cache_dir = (args.out_dir / "e2e").resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    run_dir = (args.out_dir / "w2-probe" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True)
    key = e2e.load_or_create_key(cache_dir / "signing-key.pem")
    tokens = e2e.token_files(key, cache_dir)
    pubkey, jwks = e2e.public_files(key, run_dir)
    pin = e2e.choose_pinning(False)
    procs = e2e.Procs()
    cmd = f"{{python}} {PROBES / 'gc_wrap.py'} run -c {{config}}"
    env = e2e.Env(run_dir, pin, procs, e2e.free_port(), pubkey, jwks, cmd)
    load0 = os.getloadavg()[0]
    out: dict[str, Any] = {"rounds": [], "args": {k: str(v) for k, v in vars(args).items()}}
    try:
        e2e.start_nginx(env, pin.load_cpu)
        units = {}
        for w in ("W1", "W2"):
            name = f"fg-{w.lower()}"
            os.environ["FG_GC_STATS"] = str(run_dir / f"gc-{name}.json")
            os.environ["FG_GC_MODE"] = args.gc_mode
            inst = e2e.start_instance(env, "fastgate", name, cache_entries=args.cache)
            u = e2e.Unit("fastgate", w, inst, tokens[w], e2e.PATH, 200,
                         cursor=1000 if w == "W2" else 0)
            data = e2e.run_wrk(args, env, u.port, u.tokens, args.warmup, f"{name}-warmup",
                               offset=u.cursor)
            u.cursor += int(data["requests"]) + 4 * args.connections
            units[w] = u
        for r in range(args.rounds):
            steps = ["W1", "W2", "hot"]
            steps = steps[r % 3:] + steps[:r % 3]
            rnd: dict[str, Any] = {}
            for s in steps:
                if s == "hot":
                    rnd["hot"] = hotloop(args, env, tokens["W2"])
                else:
                    u = units[s]
                    rnd[s] = gw_run(args, env, u, run_dir / f"gc-{u.inst.name}.json",
                                    f"{s}-r{r + 1}")
            out["rounds"].append(rnd)
        if not args.no_perf and shutil.which("perf"):
            out["perf"] = {w: perf_profile(args, env, units[w], f"perf-{w}") for w in units}
            hot_data = run_dir / "perf-hot.data"
            hot = hotloop(args, env, tokens["W2"], perf_data=hot_data)
            # the hot loop's process, start-up included (small against --hot-seconds)
            out["perf"]["hot"] = {"cpu_us": hot["cpu_us"], "rows": perf_rows(hot_data),
                                  "requests": hot["calls"], "run": hot}
    finally:
        procs.stop_all()
    (run_dir / "probe.json").write_text(json.dumps(out, indent=1, default=str))
    md = report(args, out, load0, os.getloadavg()[0])
    print(md)
    (args.out_dir / "w2-probe-latest.md").write_text(md)
    e2e.log(f"raw: {run_dir / 'probe.json'}")
    return 0


def report(args: argparse.Namespace, out: dict[str, Any], load0: float, load1: float) -> str:
    med = statistics.median
    rs = out["rounds"]
    L = [f"# W2 miss probe - {time.strftime('%Y-%m-%d %H:%M %Z')}\n",
         "`python benchmarks/w2_probe.py " + " ".join(sys.argv[1:]) + f"`; {args.rounds} "
         f"rounds x {args.duration:g}s, cache max_entries {args.cache}, gc {args.gc_mode}; "
         f"load average {load0:.2f} -> {load1:.2f}.\n",
         "| round | W1 CPU µs/req | W2 CPU µs/req | W2-W1 | W2 in-gateway verify µs/miss "
         "| hot-loop verify µs | hot CPU µs/call | gateway/hot | W2 hits | GC µs/req W1 (g0/g1/g2) "
         "| GC µs/req W2 (g0/g1/g2) | W2 gen2 collections |",
         "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for i, r in enumerate(rs, 1):
        w1, w2, hot = r["W1"], r["W2"], r["hot"]
        gc1 = "/".join(f"{g['us_per_request']:.1f}" for g in w1["gc"])
        gc2 = "/".join(f"{g['us_per_request']:.1f}" for g in w2["gc"])
        L.append(f"| {i} | {w1['cpu_us']:.1f} | {w2['cpu_us']:.1f} | "
                 f"{w2['cpu_us'] - w1['cpu_us']:.1f} | {w2['verify_us']:.1f} | "
                 f"{hot['timed_us']:.1f} | {hot['cpu_us']:.1f} | "
                 f"{w2['verify_us'] / hot['timed_us']:.2f} | {w2['cache_hits']} | {gc1} | "
                 f"{gc2} | {w2['gc'][2]['collections']} |")
    L.append(f"| median | {med(r['W1']['cpu_us'] for r in rs):.1f} | "
             f"{med(r['W2']['cpu_us'] for r in rs):.1f} | "
             f"{med(r['W2']['cpu_us'] - r['W1']['cpu_us'] for r in rs):.1f} | "
             f"{med(r['W2']['verify_us'] for r in rs):.1f} | "
             f"{med(r['hot']['timed_us'] for r in rs):.1f} | "
             f"{med(r['hot']['cpu_us'] for r in rs):.1f} | "
             f"{med(r['W2']['verify_us'] / r['hot']['timed_us'] for r in rs):.2f} | | | | |")
    L.append("")
    L.append("W1/W2 req/s per round: " + "; ".join(
        f"{r['W1']['rps']:,.0f} / {r['W2']['rps']:,.0f}" for r in rs))
    if "perf" in out:
        L.append("")
        L.append("perf record -e cpu-clock (flat, self time), shares scaled to the run's CPU "
                 "µs per request:\n")
        groups: dict[str, dict[str, float]] = {}
        syms: dict[str, dict[str, float]] = {}
        for w, prof in out["perf"].items():
            total = sum(pct for pct, _d, _s in prof["rows"]) or 100.0
            g: dict[str, float] = defaultdict(float)
            s: dict[str, float] = defaultdict(float)
            for pct, dso, sym in prof["rows"]:
                us = pct / total * prof["cpu_us"]
                g[dso_group(dso, sym)] += us
                s[f"{dso} {sym}"] += us
            groups[w], syms[w] = g, s
        L.append("| group | W1 µs/req | W2 µs/req | W2 - W1 | hot loop µs/verify |")
        L.append("|---|---:|---:|---:|---:|")
        keys = sorted(set(groups["W1"]) | set(groups["W2"]),
                      key=lambda k: -(groups["W2"].get(k, 0) - groups["W1"].get(k, 0)))
        for k in keys:
            a, b = groups["W1"].get(k, 0.0), groups["W2"].get(k, 0.0)
            h = groups.get("hot", {}).get(k, 0.0)
            if a > 0.3 or b > 0.3 or h > 0.3:
                L.append(f"| {k} | {a:.1f} | {b:.1f} | {b - a:+.1f} | {h:.1f} |")
        hot_cpu = out["perf"].get("hot", {}).get("cpu_us", 0.0)
        L.append(f"| **total (CPU/req of the profiled runs)** | {out['perf']['W1']['cpu_us']:.1f}"
                 f" | {out['perf']['W2']['cpu_us']:.1f} | "
                 f"{out['perf']['W2']['cpu_us'] - out['perf']['W1']['cpu_us']:+.1f} | "
                 f"{hot_cpu:.1f} |")
        L.append("")
        L.append("Top symbols by W2 - W1 (µs per request):\n")
        L.append("| symbol | W1 | W2 | W2 - W1 | hot loop |")
        L.append("|---|---:|---:|---:|---:|")
        ks = sorted(set(syms["W1"]) | set(syms["W2"]),
                    key=lambda k: -(syms["W2"].get(k, 0) - syms["W1"].get(k, 0)))
        for k in ks[:30]:
            a, b = syms["W1"].get(k, 0.0), syms["W2"].get(k, 0.0)
            h = syms.get("hot", {}).get(k, 0.0)
            L.append(f"| `{k[:90]}` | {a:.2f} | {b:.2f} | {b - a:+.2f} | {h:.2f} |")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
