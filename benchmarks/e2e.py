"""End-to-end gateway benchmark on loopback: fastgate vs HAProxy 2.6 jwt_verify vs a naive
aiohttp+PyJWT proxy, all in front of the same nginx upstream, plus nginx direct.

    python benchmarks/e2e.py                              # everything, 10 s per run
    python benchmarks/e2e.py --targets direct,haproxy,naive --workloads W1 --duration 5
    python benchmarks/e2e.py --json benchmarks/out/e2e.json

Workloads (RS256, one key):
  W1  1,000 valid tokens, reused (a gateway's steady state: clients keep their token)
  W2  20,000 distinct valid tokens (high cardinality; every token is new in the first pass)
  W3  1,000 tokens with bad signatures (all must be rejected with 401)

Each target x workload is one wrk run (`-t1 -cC -dDs --latency`, tokens cycled by
benchmarks/wrk/tokens.lua). Before measuring, every target is warmed up with W1 tokens and
sanity-checked (W1/W2 tokens must get 200, W3 tokens 401). On a 2-core machine, wrk and
nginx share CPU 0 and the target under test gets CPU 1 (for `direct`, nginx itself is the
target and runs on CPU 1); the pinning used is printed with the results.

Everything listens on 127.0.0.1; each run is bounded in time; every child process is killed
at the end (also on Ctrl-C). Outputs go to benchmarks/out/ (git-ignored): e2e-latest.md and,
with --json, the raw numbers.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = HERE / "peers"
WRK_SCRIPT = HERE / "wrk" / "tokens.lua"
DEFAULT_OUT = HERE / "out"

ISSUER = "https://idp.bench.test/"
AUDIENCE = "api://bench"
KID = "bench-rs256"
PATH = "/api/bench"
TOKEN_TTL = 12 * 3600  # tokens are re-minted when less than TOKEN_MIN_LEFT remains
TOKEN_MIN_LEFT = 2 * 3600

WORKLOADS = {
    "W1": ("w1.txt", 1_000, "1,000 valid tokens reused", 200),
    "W2": ("w2.txt", 20_000, "20,000 distinct valid tokens", 200),
    "W3": ("w3.txt", 1_000, "1,000 tokens with bad signatures", 401),
}
TARGETS = ("direct", "fastgate", "haproxy", "naive")


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Keys and tokens
# ---------------------------------------------------------------------------------------------


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_json(obj: Any) -> str:
    return b64u(json.dumps(obj, separators=(",", ":")).encode())


def load_or_create_key(path: Path) -> rsa.RSAPrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key


def public_files(key: rsa.RSAPrivateKey, run_dir: Path) -> tuple[Path, Path]:
    """PEM public key (HAProxy's jwt_verify, PyJWT) and a JWKS document (fastgate)."""
    pub = key.public_key()
    pem = run_dir / "pubkey.pem"
    pem.write_bytes(pub.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    nums = pub.public_numbers()
    jwk = {"kty": "RSA", "kid": KID, "use": "sig", "alg": "RS256",
           "n": b64u(nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")),
           "e": b64u(nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big"))}
    jwks = run_dir / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}, indent=1))
    return pem, jwks


def mint(key: rsa.RSAPrivateKey, sub: str, now: int, *, signer: rsa.RSAPrivateKey | None = None,
         ) -> str:
    header = b64u_json({"alg": "RS256", "typ": "JWT", "kid": KID})
    payload = b64u_json({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now,
                         "nbf": now - 60, "exp": now + TOKEN_TTL, "scope": "bench:read"})
    signing_input = f"{header}.{payload}".encode("ascii")
    sig = (signer or key).sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{header}.{payload}.{b64u(sig)}"


def token_files(key: rsa.RSAPrivateKey, run_dir: Path) -> dict[str, Path]:
    """Mint the token sets once and reuse them while they are valid for a while longer."""
    meta_path = run_dir / "tokens.json"
    fingerprint = b64u(key.public_key().public_numbers().n.to_bytes(256, "big")[:16])
    now = int(time.time())
    paths = {w: run_dir / spec[0] for w, spec in WORKLOADS.items()}
    with contextlib.suppress(OSError, ValueError, KeyError):
        meta = json.loads(meta_path.read_text())
        if (meta["key"] == fingerprint and meta["exp"] - now > TOKEN_MIN_LEFT
                and all(p.exists() for p in paths.values())):
            return paths
    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    t0 = time.monotonic()
    log("minting tokens (22,000 RS256 signatures, cached for later runs) ...")
    for name, (fname, count, _desc, _status) in WORKLOADS.items():
        signer = wrong if name == "W3" else None
        tmp = run_dir / f".{fname}.tmp"
        with open(tmp, "w") as f:
            for i in range(count):
                f.write(mint(key, f"{name.lower()}-user-{i}", now, signer=signer) + "\n")
        os.replace(tmp, run_dir / fname)  # atomic: a run reading the old file is unaffected
    meta_path.write_text(json.dumps({"key": fingerprint, "exp": now + TOKEN_TTL}))
    log(f"minted in {time.monotonic() - t0:.1f}s")
    return paths


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pinning:
    load_cpu: str | None  # wrk + nginx (when nginx is not the target)
    target_cpu: str | None

    def prefix(self, cpu: str | None) -> list[str]:
        return ["taskset", "-c", cpu] if cpu is not None else []

    def describe(self) -> str:
        if self.load_cpu is None:
            return "no CPU pinning (taskset unavailable, --no-pin, or fewer than 2 CPUs)"
        return (f"wrk and nginx on CPU {self.load_cpu}; the target under test on CPU "
                f"{self.target_cpu} (for `direct`, nginx is the target: CPU {self.target_cpu})")


def choose_pinning(no_pin: bool) -> Pinning:
    """wrk and nginx on CPU 0, the target on CPU 1, when taskset and two CPUs are there."""
    if not no_pin and shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return Pinning("0", "1")
    return Pinning(None, None)


def missing_tool(prog: str, tools: tuple[str, ...] = ("wrk", "nginx")) -> bool:
    """Say which required Debian tool is missing (True), or find them all (False)."""
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"{prog}: {tool} is required (Debian package {tool})", file=sys.stderr)
            return True
    return False


class Procs:
    """Every child we start, each in its own session so its whole group can be stopped."""

    def __init__(self) -> None:
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], log_path: Path, *,
              env: dict[str, str] | None = None, cwd: Path | None = None,
              ) -> subprocess.Popen[bytes]:
        logf = open(log_path, "wb")  # noqa: SIM115 - closed with the process
        try:
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                    start_new_session=True)
        finally:
            logf.close()
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # our child's own group (start_new_session)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.running)):
            self.stop(proc)


def wait_http(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> str | None:
    """Wait until 127.0.0.1:port answers HTTP; returns None when ready, else why not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return None
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    return f"did not answer within {timeout:.0f}s ({last})"


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def render(template: Path, out: Path, **values: str) -> Path:
    text = template.read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    left = [m for m in re.findall(r"\{\{([A-Z_]+)\}\}", text) if m != "NAME"]
    if left:
        raise ValueError(f"{template}: unfilled placeholders {left}")
    out.write_text(text)
    return out


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


@dataclass
class Env:
    run_dir: Path
    pin: Pinning
    procs: Procs
    nginx_port: int
    pubkey: Path
    jwks: Path
    fastgate_cmd: str


def start_nginx(env: Env, cpu: str | None) -> subprocess.Popen[bytes]:
    for d in ("nginx-client-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"):
        (env.run_dir / d).mkdir(exist_ok=True)
    conf = render(PEERS / "nginx.conf", env.run_dir / "nginx.conf",
                  RUN_DIR=str(env.run_dir), NGINX_PORT=str(env.nginx_port))
    proc = env.procs.start("nginx", [*env.pin.prefix(cpu), "nginx", "-c", str(conf),
                                     "-p", str(env.run_dir)],
                           env.run_dir / "nginx.log")
    why = wait_http(env.nginx_port, proc, 10)
    if why:
        raise RuntimeError(f"nginx {why}:\n{tail(env.run_dir / 'nginx-error.log')}")
    return proc


def start_target(env: Env, target: str) -> tuple[subprocess.Popen[bytes] | None, int, str]:
    """Start one target; returns (process, port, description). Raises SkipTarget."""
    cpu = env.pin.target_cpu
    if target == "direct":
        return None, env.nginx_port, "nginx direct"
    port = free_port()
    logp = env.run_dir / f"{target}.log"
    if target == "haproxy":
        if shutil.which("haproxy") is None:
            raise SkipTarget("haproxy is not installed")
        cfg = render(PEERS / "haproxy.cfg", env.run_dir / "haproxy.cfg", PORT=str(port),
                     NGINX_PORT=str(env.nginx_port), PUBKEY=str(env.pubkey), ISSUER=ISSUER,
                     AUDIENCE=AUDIENCE)
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True,
                               timeout=30)
        if check.returncode != 0:
            raise SkipTarget(f"haproxy rejected its config: {check.stderr.decode()[-500:]}")
        argv = [*env.pin.prefix(cpu), "haproxy", "-f", str(cfg), "-db"]
        desc = "HAProxy 2.6 jwt_verify, nbthread 1"
        proc = env.procs.start(target, argv, logp)
    elif target == "naive":
        argv = [*env.pin.prefix(cpu), sys.executable, str(PEERS / "naive_proxy.py"),
                "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{env.nginx_port}",
                "--pubkey", str(env.pubkey), "--issuer", ISSUER, "--audience", AUDIENCE]
        desc = "aiohttp + uvloop + PyJWT + ClientSession"
        proc = env.procs.start(target, argv, logp)
    elif target == "fastgate":
        cfg_path = write_fastgate_config(env, port)
        cmd = env.fastgate_cmd.format(config=shlex.quote(str(cfg_path)),
                                      python=shlex.quote(sys.executable))
        argv = [*env.pin.prefix(cpu), *shlex.split(cmd)]
        if shutil.which(argv[len(env.pin.prefix(cpu))]) is None:
            raise SkipTarget(f"command not found: {argv[len(env.pin.prefix(cpu))]}")
        penv = dict(os.environ)
        penv["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), penv.get("PYTHONPATH")]))
        desc = "fastgate, workers: 1"
        proc = env.procs.start(target, argv, logp, env=penv, cwd=REPO)
    else:  # pragma: no cover - argparse restricts the names
        raise SkipTarget(f"unknown target {target}")
    why = wait_http(port, proc, 30)
    if why:
        env.procs.stop(proc)
        lines = tail(logp).splitlines()
        last = lines[-1].strip() if lines else "(no output)"
        log(f"{target} log tail ({logp}):\n" + "\n".join(lines))
        raise SkipTarget(f"{target} {why}: {last}")
    return proc, port, desc


class SkipTarget(Exception):
    pass


def write_fastgate_config(env: Env, port: int) -> Path:
    """SPEC §2 config: one provider (jwks_file), one route injecting X-User-Id from `sub`."""
    config = {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{free_port()}",
        "workers": 1,
        "metrics": True,
        "access_log": {"enabled": False},
        "upstreams": {"nginx": {"url": f"http://127.0.0.1:{env.nginx_port}",
                                "connect_timeout": "2s", "read_timeout": "30s"}},
        "providers": {"bench": {"issuer": ISSUER, "jwks_file": str(env.jwks),
                                "audiences": [AUDIENCE], "algorithms": ["RS256"]}},
        "routes": [{"name": "bench", "match": {"path_prefix": "/"}, "upstream": "nginx",
                    "auth": {"providers": ["bench"], "claim_headers": {"X-User-Id": "sub"}}}],
    }
    path = env.run_dir / "fastgate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    target: str
    workload: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    non2xx: int = 0
    socket_errors: int = 0
    expected_status: int = 200
    sample_statuses: dict[str, int] = field(default_factory=dict)
    anomalies: list[str] = field(default_factory=list)
    skipped: str | None = None


def sample_statuses(port: int, tokens: Path, n: int = 20) -> dict[str, int]:
    """A few requests over one keep-alive connection: exact status codes (wrk only counts)."""
    counts: dict[str, int] = {}
    lines = [t for t in tokens.read_text().splitlines() if t][:n]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for tok in lines:
            conn.request("GET", PATH, headers={"Authorization": f"Bearer {tok}"})
            resp = conn.getresponse()
            resp.read()
            counts[str(resp.status)] = counts.get(str(resp.status), 0) + 1
            if resp.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    finally:
        conn.close()
    return counts


def run_wrk(args: argparse.Namespace, env: Env, port: int, tokens: Path, seconds: float,
            tag: str) -> dict[str, Any]:
    result_path = env.run_dir / f"wrk-{tag}.json"
    result_path.unlink(missing_ok=True)
    wenv = dict(os.environ, WRK_TOKENS=str(tokens), WRK_PATH=PATH, WRK_RESULT=str(result_path))
    argv = [*env.pin.prefix(env.pin.load_cpu), "wrk", f"-t{args.threads}",
            f"-c{args.connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "10s", "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}{PATH}"]
    out = subprocess.run(argv, env=wenv, capture_output=True, timeout=seconds + 60)
    (env.run_dir / f"wrk-{tag}.txt").write_bytes(out.stdout + out.stderr)
    if out.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.decode()[-400:]}")
    data: dict[str, Any] = json.loads(result_path.read_text())
    return data


def measure(args: argparse.Namespace, env: Env, target: str, port: int,
            tokens: dict[str, Path]) -> list[RunResult]:
    results = []
    if args.warmup > 0:
        log(f"{target}: warm-up {args.warmup:g}s with W1 tokens")
        run_wrk(args, env, port, tokens["W1"], args.warmup, f"{target}-warmup")
    # nginx ignores the token, so one workload is enough for the `direct` reference.
    workloads = args.workloads[:1] if target == "direct" else args.workloads
    for w in workloads:
        expected = WORKLOADS[w][3]
        res = RunResult(target, w, expected_status=expected)
        if target != "direct":
            res.sample_statuses = sample_statuses(port, tokens[w])
            if set(res.sample_statuses) != {str(expected)}:
                res.anomalies.append(f"sample statuses {res.sample_statuses}, "
                                     f"expected all {expected}")
        log(f"{target} {w}: wrk {args.duration:g}s")
        data = run_wrk(args, env, port, tokens[w], args.duration, f"{target}-{w}")
        res.requests = int(data["requests"])
        res.rps = res.requests / (data["duration_us"] / 1e6)
        res.p50_ms = data["latency_us"]["p50"] / 1000
        res.p99_ms = data["latency_us"]["p99"] / 1000
        errs = data["errors"]
        res.non2xx = int(errs["status"])  # wrk counts status >= 400
        res.socket_errors = sum(int(errs[k]) for k in ("connect", "read", "write", "timeout"))
        if target != "direct":
            if expected == 200 and res.non2xx:
                res.anomalies.append(f"{res.non2xx} non-2xx responses")
            if expected != 200 and res.non2xx != res.requests:
                res.anomalies.append(f"{res.requests - res.non2xx} of {res.requests} "
                                     f"bad-signature requests were NOT rejected")
        if res.socket_errors:
            res.anomalies.append(f"{res.socket_errors} socket errors {errs}")
        log(f"{target} {w}: {res.rps:,.0f} req/s p50 {res.p50_ms:.2f} ms "
            f"p99 {res.p99_ms:.2f} ms{' ANOMALY' if res.anomalies else ''}")
        results.append(res)
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

GOALS = [  # (workload, numerator, denominator, metric, op, bound)
    ("W1", "fastgate", "haproxy", "rps", ">=", 1.0),
    ("W1", "fastgate", "naive", "rps", ">=", 5.0),
    ("W1", "fastgate", "haproxy", "p99", "<=", 1.5),
    ("W2", "fastgate", "haproxy", "rps", ">=", 0.6),
    ("W3", "fastgate", "haproxy", "rps", ">=", 1.0),
]


def goal_rows(results: list[RunResult]) -> list[dict[str, Any]]:
    by = {(r.target, r.workload): r for r in results if r.skipped is None}
    rows: list[dict[str, Any]] = []
    for w, num, den, metric, op, bound in GOALS:
        a, b = by.get((num, w)), by.get((den, w))
        label = (f"{w} {num}/{den} " + ("req/s" if metric == "rps" else "p99")
                 + f" {op} {bound:g}x")
        if a is None or b is None:
            rows.append({"goal": label, "ratio": None, "met": None})
            continue
        ratio = (a.rps / b.rps) if metric == "rps" else (a.p99_ms / b.p99_ms if b.p99_ms else 0.0)
        met = ratio >= bound if op == ">=" else ratio <= bound
        rows.append({"goal": label, "ratio": ratio, "met": met})
    return rows


def markdown(args: argparse.Namespace, env: Env, results: list[RunResult],
             descs: dict[str, str], skipped: dict[str, str]) -> str:
    out = []
    out.append(f"# e2e benchmark - {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n")
    out.append(f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}` "
               f"(cwd `{Path.cwd()}`)\n")
    out.append(f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
               f"{platform.python_version()}; {versions()}\n")
    out.append(f"Load: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency "
               f"(warm-up {args.warmup:g}s with W1 tokens per target), path {PATH}, loopback.\n")
    out.append(f"Pinning: {env.pin.describe()}.\n")
    load = args.load_at_start
    out.append(f"Load average (1 min) before the run: {load:.2f}"
               + (" - **the machine was busy: numbers are low and noisy; compare ratios within "
                  "this run only**" if load > 0.7 else "") + "\n")
    out.append("| target | workload | req/s | p50 ms | p99 ms | requests | non-2xx | "
               "socket errors | notes |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        notes = "; ".join(r.anomalies) if r.anomalies else "ok"
        if r.target == "direct":
            notes = "reference: nginx without a proxy (token ignored)"
        out.append(f"| {r.target} | {r.workload} | {r.rps:,.0f} | {r.p50_ms:.2f} | "
                   f"{r.p99_ms:.2f} | {r.requests:,} | {r.non2xx:,} | {r.socket_errors} | "
                   f"{notes} |")
    out.append("")
    for t, why in skipped.items():
        out.append(f"- **{t} skipped**: {why.splitlines()[0] if why else ''}")
    for t, d in descs.items():
        out.append(f"- {t}: {d}")
    out.append("")
    out.append("Goals (issue): ")
    out.append("")
    out.append("| goal | ratio | met |")
    out.append("|---|---:|---|")
    for g in goal_rows(results):
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}x"
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**NO**")
        out.append(f"| {g['goal']} | {ratio} | {met} |")
    out.append("")
    w2 = [r for r in results if r.workload == "W2" and r.target != "direct"]
    if w2:
        out.append("W2 note: 20,000 distinct tokens; in a measured run at R req/s each token is "
                   "seen about R*D/20,000 times, so a gateway with a verified-token cache "
                   "verifies each token once and then hits: "
                   + ", ".join(f"{r.target} {r.rps * args.duration / 20000:.1f} passes"
                               for r in w2) + ".")
    return "\n".join(out) + "\n"


def versions() -> str:
    parts = []
    for argv in (["wrk", "--version"], ["haproxy", "-v"], ["nginx", "-v"]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(argv, capture_output=True, timeout=10)
            first = (p.stdout or p.stderr).decode(errors="replace").splitlines()
            if first:
                parts.append(first[0].strip()[:60])
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--workloads", default="W1,W2,W3", help="comma-separated subset of W1,W2,W3")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per target")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--fastgate-cmd", default="{python} -m fastgate.cli run -c {config}",
                   help="command starting fastgate; {config} and {python} are substituted")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
    for t in args.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}")
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}")
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 120:
        p.error("--duration must be in (0, 600] and --warmup in [0, 120]")
    if args.connections < args.threads:
        p.error("--connections must be >= --threads")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.load_at_start = os.getloadavg()[0]
    if missing_tool("e2e"):
        return 2
    # Keys and tokens are shared by every run (minting 22,000 RS256 tokens takes a while);
    # configs, logs and wrk results go to a directory of this run only, so two runs at the
    # same time (e.g. another benchmark using the same out dir) never mix their files.
    cache_dir = (args.out_dir / "e2e").resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    run_dir = cache_dir / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    pin = choose_pinning(args.no_pin)

    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one minter at a time; others wait, then reuse
        key = load_or_create_key(cache_dir / "signing-key.pem")
        tokens = token_files(key, cache_dir)
    pubkey, jwks = public_files(key, run_dir)
    log(f"run directory: {run_dir}")

    procs = Procs()
    env = Env(run_dir, pin, procs, free_port(), pubkey, jwks, args.fastgate_cmd)
    results: list[RunResult] = []
    descs: dict[str, str] = {}
    skipped: dict[str, str] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        ordered = sorted(args.targets, key=lambda t: t != "direct")  # direct first
        nginx: subprocess.Popen[bytes] | None = None
        nginx_cpu: str | None = "unset"
        for target in ordered:
            want_cpu = pin.target_cpu if target == "direct" else pin.load_cpu
            if nginx is None or nginx_cpu != want_cpu:
                if nginx is not None:
                    procs.stop(nginx)
                nginx = start_nginx(env, want_cpu)
                nginx_cpu = want_cpu
            try:
                proc, port, desc = start_target(env, target)
            except SkipTarget as exc:
                log(f"SKIP {target}: {exc}")
                skipped[target] = str(exc)
                continue
            descs[target] = desc
            try:
                results.extend(measure(args, env, target, port, tokens))
            finally:
                if proc is not None:
                    procs.stop(proc)
    except KeyboardInterrupt:
        log("interrupted: stopping every child process")
        return 130
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    md = markdown(args, env, results, descs, skipped)
    print(md)
    (args.out_dir / "e2e-latest.md").write_text(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "pinning": pin.describe(), "results": [asdict(r) for r in results],
            "skipped": skipped, "goals": goal_rows(results)}, indent=2))
    log(f"report: {args.out_dir / 'e2e-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
