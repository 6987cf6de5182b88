"""TLS end-to-end benchmark: fastgate's TLS listener vs HAProxy 2.6 `bind ... ssl crt`.

Two workloads, both with an ECDSA P-256 certificate (a throw-away CA made here) and the
e2e harness' W1 tokens (1,000 valid RS256 tokens, reused), in front of the same nginx:

  tls-W1   wrk keep-alive over TLS (-c64): the steady state of TLS clients
  tls-new  every request on a new TLS connection (Connection: close; -c16): handshakes/s

Each gateway runs alone on the target CPU; wrk and nginx share the load CPU (the e2e pinning),
in interleaved rounds with the order rotated, each unit after a short warm-up. Printed per
target and workload: req/s (median of rounds), p99, the target's CPU µs per request
(utime+stime from /proc), the share of the target CPU the target got and how busy both CPUs
were (a target that got much less than its CPU shared it with something else: read that
round with care), and the ratios the TLS issue's goals are stated in (tls-W1 >= 1.2x HAProxy
req/s; tls-new >= 0.8x HAProxy).

Returning clients resume their TLS session on both targets (wrk keeps it across reconnects):
fastgate from its session cache (no tickets), HAProxy by default from stateless session
tickets; ``--haproxy-no-tickets`` gives HAProxy fastgate's mechanism (like for like).

Before measuring, what each target negotiates is checked and printed (TLS version, cipher
suite, key-exchange group, ALPN, and whether a returning client resumes its session, as wrk
does on reconnecting): the comparison is only fair when these are the same.

    python benchmarks/tls.py                 # 3 rounds x 6 s
    python benchmarks/tls.py --rounds 5 --duration 6 --json benchmarks/out/tls.json
    python benchmarks/tls.py --haproxy-no-tickets   # both resume from a session cache
    python benchmarks/tls.py --serve 600     # just start everything (for perf / callgrind)

Needs wrk (with TLS: Debian's is built with OpenSSL), haproxy, nginx; loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import ssl
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # fastgate, from a checkout

import e2e

WORKLOADS = ("tls-W1", "tls-new")
GOALS = {"tls-W1": 1.2, "tls-new": 0.8}  # fastgate / HAProxy req/s
CONTENDED = 0.9  # a target's share of its CPU below this: the round was disturbed


def make_pki(d: Path) -> tuple[Path, Path, Path]:
    """The demo's throw-away CA and ECDSA P-256 certificate for 127.0.0.1:
    (cert, key, combined cert+key for HAProxy's ``crt``)."""
    from fastgate.tools.demo import write_demo_pki

    _, cert, key = write_demo_pki(d)
    (d / "tls.pem").write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, d / "tls.pem"


def wait_tls(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    import socket
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s, \
                    ctx.wrap_socket(s):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not answer TLS within {timeout:.0f}s")


def negotiated(port: int) -> dict[str, Any]:
    """What a client like wrk gets from the target on ``port``: version, cipher, ALPN, and
    whether the second of two connections resumed the first one's session (wrk keeps its
    session across reconnects: SSL_shutdown + SSL_clear). The key-exchange group comes from
    ``openssl s_client`` (Python's ssl does not report it)."""
    import socket
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    out: dict[str, Any] = {}
    session: ssl.SSLSession | None = None
    for attempt in range(2):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            with contextlib.suppress(OSError):  # a 401 without a token; read to the close
                while conn.recv(65536):
                    pass
            if attempt == 0:
                cipher = conn.cipher()
                out.update(version=conn.version(), cipher=cipher[0] if cipher else None,
                           alpn=conn.selected_alpn_protocol())
            else:
                out["resumed"] = conn.session_reused
            session = conn.session
    try:
        done = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}"],
                              input=b"", capture_output=True, timeout=10)
        text = done.stdout.decode(errors="replace")
        m = re.search(r"(?:Server Temp Key|Negotiated TLS1\.3 group): ([^,\n]+)", text)
        out["group"] = m.group(1).strip() if m else None
    except (OSError, subprocess.SubprocessError):
        out["group"] = None
    return out


def start_targets(env: e2e.Env, cert: Path, key: Path, combined: Path, *,
                  haproxy_tickets: bool = True,
                  ) -> dict[str, tuple[subprocess.Popen[bytes], int]]:
    cpu = env.pin.target_cpu
    out: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    # fastgate: the e2e config with `tls` on the listener.
    port = e2e.free_port()
    cfg_path = e2e.write_fastgate_config(env, port, name="fastgate-tls")
    config = yaml.safe_load(cfg_path.read_text())
    config["tls"] = {"certificates": [{"cert": str(cert), "key": str(key)}]}
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = env.fastgate_cmd.format(config=shlex.quote(str(cfg_path)),
                                  python=shlex.quote(sys.executable))
    penv = dict(os.environ)
    penv["PYTHONPATH"] = os.pathsep.join(filter(None, [str(e2e.REPO), penv.get("PYTHONPATH")]))
    proc = env.procs.start("fastgate", [*env.pin.prefix(cpu), *shlex.split(cmd)],
                           env.run_dir / "fastgate-tls.log", env=penv, cwd=e2e.REPO)
    wait_tls(port, proc)
    out["fastgate"] = (proc, port)
    # HAProxy: the e2e jwt_verify frontend, its bind with TLS (ALPN http/1.1).
    port = e2e.free_port()
    cfg = e2e.render(e2e.PEERS / "haproxy.cfg", env.run_dir / "haproxy-tls.cfg",
                     PORT=str(port), NGINX_PORT=str(env.nginx_port), PUBKEY=str(env.pubkey),
                     ISSUER=e2e.ISSUER, AUDIENCE=e2e.AUDIENCE)
    bind = f"bind 127.0.0.1:{port} ssl crt {combined} alpn http/1.1"
    if not haproxy_tickets:
        bind += " no-tls-tickets"  # resume from its session cache, as fastgate does
    text = cfg.read_text().replace(f"bind 127.0.0.1:{port}", bind)
    cfg.write_text(text)
    proc = env.procs.start("haproxy", [*env.pin.prefix(cpu), "haproxy", "-f", str(cfg), "-db"],
                           env.run_dir / "haproxy-tls.log")
    wait_tls(port, proc)
    out["haproxy"] = (proc, port)
    return out


def run_wrk(env: e2e.Env, port: int, tokens: Path, seconds: float, workload: str,
            tag: str) -> dict[str, Any]:
    result = env.run_dir / f"wrk-{tag}.json"
    result.unlink(missing_ok=True)
    close = workload == "tls-new"
    wenv = dict(os.environ, WRK_TOKENS=str(tokens), WRK_PATH=e2e.PATH, WRK_RESULT=str(result),
                WRK_OFFSET="0", WRK_THREADS="1", WRK_CLOSE="1" if close else "")
    argv = [*env.pin.prefix(env.pin.load_cpu), "wrk", "-t1", f"-c{16 if close else 64}",
            f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "10s",
            "-s", str(e2e.WRK_SCRIPT), f"https://127.0.0.1:{port}{e2e.PATH}"]
    done = subprocess.run(argv, env=wenv, capture_output=True, timeout=seconds + 60)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.decode()[-400:]}")
    data: dict[str, Any] = json.loads(result.read_text())
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=6.0)
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds of the same load before each measured unit")
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fastgate-cmd", default="{python} -m fastgate.cli run -c {config}")
    parser.add_argument("--haproxy-no-tickets", action="store_true",
                        help="HAProxy's bind with no-tls-tickets: returning clients resume "
                             "from its session cache, the mechanism fastgate uses (default: "
                             "HAProxy's default, stateless session tickets)")
    parser.add_argument("--serve", type=float, metavar="SECONDS",
                        help="no measuring: start nginx and both targets (same pinning), print "
                             "their ports and pids, keep them up this long (for profiling)")
    args = parser.parse_args(argv)
    if e2e.missing_tool("tls.py", ("wrk", "nginx", "haproxy")):
        return 2
    cache = (e2e.HERE / "out" / "e2e").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    run_dir = cache / "runs" / f"tls-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    key = e2e.load_or_create_key(cache / "signing-key.pem")
    tokens = e2e.token_files(key, cache)["W1"]
    pubkey, jwks = e2e.public_files(key, run_dir)
    pin = e2e.choose_pinning(args.no_pin)
    procs = e2e.Procs()
    env = e2e.Env(run_dir, pin, procs, e2e.free_port(), pubkey, jwks, args.fastgate_cmd)
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        e2e.start_nginx(env, pin.load_cpu)
        cert, keyf, combined = make_pki(run_dir)
        targets = start_targets(env, cert, keyf, combined,
                                haproxy_tickets=not args.haproxy_no_tickets)
        if args.serve is not None:
            for t, (proc, port) in targets.items():
                print(f"{t} https://127.0.0.1:{port}{e2e.PATH} pid {proc.pid} "
                      f"pids {' '.join(map(str, e2e.proc_tree(proc.pid)))}", flush=True)
            print(f"tokens {tokens}", flush=True)
            # SIGTERM too (a background job ignores SIGINT) stops everything via `finally`
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            time.sleep(args.serve)
            return 0
        seen = {t: negotiated(port) for t, (_, port) in targets.items()}
        for t, got in seen.items():
            print(f"{t}: {got['version']} {got['cipher']} group {got['group']} "
                  f"ALPN {got['alpn']} resumed {got['resumed']}", flush=True)
        same = {k for k in ("version", "cipher", "group", "alpn", "resumed")
                if len({str(got[k]) for got in seen.values()}) == 1}
        if len(same) < 5:
            print("WARNING: the targets negotiate differently "
                  f"({', '.join(sorted({'version', 'cipher', 'group', 'alpn', 'resumed'} - same))})"
                  ": the comparison is not like for like", file=sys.stderr)
        order = [(t, w) for w in WORKLOADS for t in targets]
        for r in range(args.rounds):
            for t, w in order[r % len(order):] + order[:r % len(order)]:
                proc, port = targets[t]
                if args.warmup > 0:
                    run_wrk(env, port, tokens, args.warmup, w, f"{t}-{w}-{r}-warmup")
                pids = e2e.proc_tree(proc.pid)
                before = e2e.cpu_ticks(pids)
                busy0 = [e2e.cpu_busy_ticks(c) for c in (pin.target_cpu, pin.load_cpu)]
                data = run_wrk(env, port, tokens, args.duration, w, f"{t}-{w}-{r}")
                busy1 = [e2e.cpu_busy_ticks(c) for c in (pin.target_cpu, pin.load_cpu)]
                after = e2e.cpu_ticks(pids)
                ticks = sum(sum(after[p]) - sum(before.get(p, (0, 0))) for p in after)
                n = max(1, data["requests"])
                seconds = data["duration_us"] / 1e6
                (tb, tt), (lb, lt) = ((b1 - b0, t1 - t0) for (b0, t0), (b1, t1)
                                      in zip(busy0, busy1, strict=True))
                rows.setdefault((t, w), []).append({
                    "rps": n / seconds,
                    "p99_ms": data["latency_us"]["p99"] / 1000,
                    "cpu_us": ticks / os.sysconf("SC_CLK_TCK") * 1e6 / n,
                    # the target's share of one CPU, and how busy the target and load CPUs were
                    "target_cpu": ticks / os.sysconf("SC_CLK_TCK") / seconds,
                    "target_cpu_busy": tb / tt if tt else 0.0,
                    "load_cpu_busy": lb / lt if lt else 0.0,
                    "errors": sum(data["errors"].values()),
                })
    finally:
        procs.stop_all()
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    print(f"TLS benchmark {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"{args.rounds} rounds x {args.duration:g}s, ECDSA P-256, W1 tokens, HAProxy "
          f"{'no-tls-tickets' if args.haproxy_no_tickets else 'default (session tickets)'}")
    print("| target | workload | req/s | p99 ms | CPU µs/req | target's CPU share | "
          "target CPU busy | load CPU busy | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for (t, w), m in sorted(med.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {t} | {w} | {m['rps']:,.0f} | {m['p99_ms']:.2f} | {m['cpu_us']:.1f} | "
              f"{m['target_cpu']:.0%} | {m['target_cpu_busy']:.0%} | {m['load_cpu_busy']:.0%} "
              f"| {m['errors']:.0f} |")
    print("| goal | per-round ratios | median | met |\n|---|---|---:|---|")
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "negotiated": seen,
                              "rounds": {f"{t}:{w}": v for (t, w), v in rows.items()},
                              "medians": {f"{t}:{w}": m for (t, w), m in med.items()}}
    for w, goal in GOALS.items():
        fg, hp = rows.get(("fastgate", w)), rows.get(("haproxy", w))
        if not fg or not hp:
            continue
        ratios = [a["rps"] / b["rps"] for a, b in zip(fg, hp, strict=True)]
        ratio = statistics.median(ratios)
        report[f"{w}_ratio"] = ratio
        # *: a round where a target got less than CONTENDED of its CPU (someone else ran there)
        marks = ["*" if min(a["target_cpu"], b["target_cpu"]) < CONTENDED else ""
                 for a, b in zip(fg, hp, strict=True)]
        print(f"| {w} fastgate/haproxy req/s >= {goal}x | "
              f"{', '.join(f'{x:.2f}{m}' for x, m in zip(ratios, marks, strict=True))} | "
              f"{ratio:.2f}x | {'yes' if ratio >= goal else '**NO**'} |")
    if any(min(r["target_cpu"] for r in v) < CONTENDED for v in rows.values()):
        print(f"*: a target got less than {CONTENDED:.0%} of its CPU in that round (the CPU "
              "was shared with other work); its ratio says little")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
