"""End-to-end gateway benchmark on loopback: fastgate vs HAProxy 2.6 jwt_verify vs a naive
aiohttp+PyJWT proxy, all in front of the same nginx upstream, plus nginx direct; req/s, p99
and each target's own CPU time per request, over interleaved rounds with an A/A noise floor.

    python benchmarks/e2e.py --quick                      # smoke check, < 2 minutes
    python benchmarks/e2e.py --json benchmarks/out/e2e.json   # the full run (5 rounds x 8 s)
    python benchmarks/e2e.py --targets fastgate,haproxy --workloads W1,W2 --rounds 3
    python benchmarks/e2e.py --targets fastgate --workloads W4,W4-redis --controls none

Workloads (RS256, one key):
  W1    1,000 valid tokens, reused: a gateway's steady state, its token cache hits
  W2    20,000 distinct valid tokens cycled: every request is a full verify. fastgate runs W2
        in its own gateway process with `cache: {max_entries: 1000}` (--w2-cache), and each
        run continues the previous run's cycle (benchmarks/wrk/cycle.lua, WRK_OFFSET), so a
        token comes back only after 20,000 others and the LRU never hits; the report prints
        the gateway's cache-hit count over the measured runs from its /metrics (must be 0).
  W3    1,000 tokens with bad signatures, replayed (every request must get 401)
  open  no token: fastgate's `auth: none` route (/open/) vs HAProxy plain proxying (a second
        frontend in the same HAProxy process, no JWT rules)
  W4    DPoP (issue 11, fastgate only, its own gateway process): 1,000 ES256 access tokens
        bound to 1,000 client P-256 keys (cnf.jkt), `Authorization: DPoP` and a fresh ES256
        proof on every request (route `dpop: {mode: required, max_age: 300s}`, in-process
        replay store). wrk cannot sign: before every run the harness writes rate x duration x
        1.3 proofs (fresh iat, unique jti; the rate from the unit's previous run) and
        benchmarks/wrk/dpop.lua sends each once, every wrk thread its own slice. Reported
        against W1 of the same run, with the goal CPU(W4) <= CPU(W1) + 1.15 x the ES256
        verify floor (benchmarks/verify.py's floor, measured on the target CPU before the
        rounds). Selecting W4 also measures W1 on fastgate.
  W4-redis  W4 with `replay_store.redis` on a redis-server this harness starts on a loopback
        port (on the load CPU, as an external service): the added p50/p99 against W4.

Method. Every target process is started once and they run side by side, each alone on the
target CPU (idle ones cost nothing measurable); wrk (-t1 -c64 by default) and the nginx
upstream share the load CPU. On a 2-core machine: wrk and nginx on CPU 0, every gateway on
CPU 1 (`direct` is a second nginx on CPU 1). Each (target, workload) is a unit; a round
measures every unit once, in an order rotated every round, so slow drifts of a shared machine
hit all of them alike. For each run: wrk's req/s and latency percentiles, the target's CPU
time (utime+stime of its process tree from /proc/PID/stat) over the run divided by the
requests wrk completed, the share of CPU 1 that the target used and that other work used, and
for fastgate its /metrics deltas (token-cache hits and misses, verify histogram sum/count).
Reported: the median of rounds per unit, the issue's ratios as medians of paired per-round
ratios, and an A/A control: a second, identical gateway process (fastgate, and HAProxy in the
full run) measured in every round; its ratio to the first is the smallest difference this
method can tell from zero (the "noise floor" printed beside every goal).

Before measuring, every unit is sanity-checked (W1/W2/open must get 200, W3 401) and warmed up.
Everything listens on 127.0.0.1; runs are bounded by --rounds and --duration (an estimate of
the total is printed first); every child process is killed at the end (also on Ctrl-C or
SIGTERM). Outputs go to benchmarks/out/ (git-ignored): e2e-latest.md and, with --json, the raw
numbers (the input of benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import http.client
import json
import multiprocessing
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS = HERE / "peers"
WRK_SCRIPT = HERE / "wrk" / "cycle.lua"
DEFAULT_OUT = HERE / "out"

ISSUER = "https://idp.bench.test/"
AUDIENCE = "api://bench"
KID = "bench-rs256"
PATH = "/api/bench"
OPEN_PATH = "/open/bench"  # fastgate's `auth: none` route (e2e configs only)
TOKEN_TTL = 12 * 3600  # tokens are re-minted when less than TOKEN_MIN_LEFT remains
TOKEN_MIN_LEFT = 2 * 3600

WORKLOADS = {  # the token sets: name -> (file, count, description, expected status)
    "W1": ("w1.txt", 1_000, "1,000 valid tokens reused", 200),
    "W2": ("w2.txt", 20_000, "20,000 distinct valid tokens, every request a full verify", 200),
    "W3": ("w3.txt", 1_000, "1,000 tokens with bad signatures, replayed", 401),
}
OPEN = "open"
OPEN_DESC = "no token: fastgate `auth: none` route vs HAProxy plain proxying"
DPOP_WORKLOADS = {  # issue 11, fastgate only: name -> description
    "W4": "1,000 DPoP-bound ES256 tokens (cnf.jkt, 1,000 client P-256 keys), a fresh ES256 "
          "proof per request, in-process replay store",
    "W4-redis": "W4 with `replay_store.redis` (redis-server on loopback, on the load CPU)",
}
ALL_WORKLOADS = (*WORKLOADS, OPEN, *DPOP_WORKLOADS)
DPOP_SCRIPT = HERE / "wrk" / "dpop.lua"
DPOP_TOKENS = 1_000
DPOP_MAX_AGE = 300  # the W4 route's dpop.max_age, seconds
DPOP_KID = "bench-es256"
PROOF_MARGIN = 1.3  # proofs per run = rate x duration x this
PROOF_MIN_RPS = 10_000  # proofs are made for at least this rate (a shared machine's W4 rate
# swings 2x between rounds; a proof is ~35 µs to make on 2 CPUs, one left unused costs nothing)
DPOP_GOAL = 1.15  # CPU(W4) <= CPU(W1) + DPOP_GOAL x the ES256 verify floor (issue 11)
TARGETS = ("direct", "fastgate", "haproxy", "naive")
LOAD_BOUND = 0.9  # a target using less of its CPU than this was not the bottleneck
AA = "~aa"  # suffix of an A/A control's target name: "fastgate~aa" is a second fastgate

PRESETS = {  # --quick and the full run; explicit flags override
    "full": {"rounds": 5, "duration": 8.0, "warmup": 2.0, "controls": "fastgate:W1,haproxy:W1"},
    "quick": {"rounds": 3, "duration": 2.0, "warmup": 1.0, "controls": "fastgate:W1"},
}


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
# W4: DPoP-bound tokens and their proofs (fastgate.tools.devtoken: make_dpop_proof, jwk_thumbprint)
# ---------------------------------------------------------------------------------------------


def _devtoken() -> Any:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import fastgate.tools.devtoken as devtoken

    return devtoken


@dataclass
class DpopSet:
    """W4's tokens: ``tokens[k]`` is bound (cnf.jkt) to ``clients[k]``."""
    jwks: Path  # the ES256 issuer's JWKS document
    tokens_path: Path  # one access token per line
    tokens: list[str]
    clients: list[Any]  # EC P-256 private keys


def make_dpop_set(run_dir: Path) -> DpopSet:
    """A fresh ES256 issuer, 1,000 client keys and a bound access token for each (< 1 s)."""
    devtoken = _devtoken()
    issuer = devtoken.generate_key("ES256", kid=DPOP_KID)
    jwks = run_dir / "jwks-es256.json"
    jwks.write_text(json.dumps({"keys": [issuer.public_jwk()]}, indent=1))
    now = int(time.time())
    clients, tokens = [], []
    for k in range(DPOP_TOKENS):
        client = ec.generate_private_key(ec.SECP256R1())
        jkt = devtoken.jwk_thumbprint(devtoken.DevKey(client, "ES256").public_jwk())
        tokens.append(devtoken.mint(issuer, {
            "iss": ISSUER, "aud": AUDIENCE, "sub": f"w4-user-{k}", "nbf": now - 60,
            "scope": "bench:read", "cnf": {"jkt": jkt}}, lifetime=TOKEN_TTL, now=now))
        clients.append(client)
    path = run_dir / "w4-tokens.txt"
    path.write_text("".join(t + "\n" for t in tokens))
    return DpopSet(jwks, path, tokens, clients)


_PROOF_JOB: tuple[DpopSet, str] | None = None  # what the forked proof writers sign


def _proof_chunk(span: tuple[int, int]) -> str:
    assert _PROOF_JOB is not None
    dset, htu = _PROOF_JOB
    make = _devtoken().make_dpop_proof
    out = []
    for i in range(*span):
        k = i % DPOP_TOKENS
        proof = make(dset.clients[k], htm="GET", htu=htu, access_token=dset.tokens[k])
        out.append(f"{k} {proof}\n")
    return "".join(out)


def write_proofs(dset: DpopSet, htu: str, count: int, path: Path) -> float:
    """``count`` proofs ("<token index> <proof>" lines; proof i for token i mod 1,000), signed
    on every CPU (the gateway is idle meanwhile); the seconds it took."""
    global _PROOF_JOB
    _PROOF_JOB = (dset, htu)
    t0 = time.monotonic()
    workers = max(1, min(os.cpu_count() or 1, 4))
    step = max(1000, -(-count // (workers * 8)))
    spans = [(s, min(s + step, count)) for s in range(0, count, step)]
    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_proof_worker_init)
    try:
        with open(path, "w") as f:
            for chunk in pool.imap(_proof_chunk, spans):
                f.write(chunk)
        pool.close()
    finally:
        _PROOF_JOB = None
        pool.terminate()  # at once, after close: the workers have exited; on an error: stop them
        pool.join()
    return time.monotonic() - t0


def _proof_worker_init() -> None:
    # A forked writer inherits main()'s SIGTERM handler (raise KeyboardInterrupt): restore the
    # default, and leave Ctrl-C to the harness, which stops the pool.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def dpop_htu(port: int, path: str = PATH) -> str:
    """What the gateway expects in htu: no external_url, so scheme from the listener's TLS
    state (plain here) + the Host wrk and http.client send + the path."""
    return f"http://127.0.0.1:{port}{path}"


def sample_dpop(port: int, dset: DpopSet, n: int = 20, path: str = PATH) -> dict[str, int]:
    """Sanity of a W4 gateway: ``n`` fresh proofs must get 200, and DPoP must really be
    enforced (else W4 measures nothing): a replayed proof, a bound token sent as Bearer and a
    DPoP token without a proof must each get 401. Keys: "fresh 200", "replay 401", ..."""
    make = _devtoken().make_dpop_proof
    htu = dpop_htu(port, path)
    counts: dict[str, int] = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    cases: list[tuple[str, dict[str, str]]] = []
    for k in range(n):
        tok = dset.tokens[k]
        cases.append(("fresh", {"Authorization": f"DPoP {tok}", "DPoP": make(
            dset.clients[k], htm="GET", htu=htu, access_token=tok)}))
    cases.append(("replay", cases[0][1]))
    cases.append(("bearer", {"Authorization": f"Bearer {dset.tokens[1]}"}))
    cases.append(("no-proof", {"Authorization": f"DPoP {dset.tokens[2]}"}))
    cases.append(("wrong-htu", {"Authorization": f"DPoP {dset.tokens[3]}", "DPoP": make(
        dset.clients[3], htm="GET", htu=htu + "x", access_token=dset.tokens[3])}))
    try:
        for name, headers in cases:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            key = f"{name} {resp.status}"
            counts[key] = counts.get(key, 0) + 1
            if resp.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    finally:
        conn.close()
    return counts


DPOP_SAMPLE_EXPECTED = ("fresh 200", "replay 401", "bearer 401", "no-proof 401",
                        "wrong-htu 401")


def start_redis(env: Env) -> tuple[subprocess.Popen[bytes], int]:
    """A throw-away redis-server on a loopback port, on the load CPU (an external service, as
    the upstream is), no persistence."""
    port = free_port()
    base = env.run_dir / "redis"
    base.mkdir(exist_ok=True)
    argv = [*env.pin.prefix(env.pin.load_cpu), "redis-server", "--bind", "127.0.0.1",
            "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(base),
            "--protected-mode", "yes", "--loglevel", "warning"]
    proc = env.procs.start("redis", argv, base / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                    timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return proc, port
        time.sleep(0.1)
    env.procs.stop(proc)
    raise SkipTarget(f"redis-server did not answer on 127.0.0.1:{port}: "
                     f"{tail(base / 'redis.log', 3)}")


def es256_floor_child(seconds: float = 1.5, slices: int = 15) -> None:
    """Prints {"median_us", "best_us", "source"}: the ES256 verify floor of
    benchmarks/verify.py (the raw `cryptography` verify of pre-decoded ES256 JWS, per CPU
    second of the thread, in interleaved slices), run on the CPU the caller pinned it to.

    verify.py's own floor_fn/measure when it imports (it needs PyJWT, joserfc, jwcrypto);
    else the same method inline."""
    try:
        sys.path.insert(0, str(HERE))
        sys.path.insert(0, str(REPO))
        import verify as vb  # type: ignore[import-not-found]

        from tests.factory import generate

        key = generate("ES256")
        floor, prep = vb.floor_fn(key)
        cases = [vb.Case("ES256", "floor", floor,
                         [prep(t) for t in vb.mint(key, vb.MISS_TOKENS, time.time())])]
        measure = vb.measure
        source = "benchmarks/verify.py floor_fn + measure"
    except (ImportError, SystemExit):
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        devtoken = _devtoken()
        dkey = devtoken.generate_key("ES256")
        pub = dkey.private.public_key()
        prepared = []
        for i in range(5000):
            tok = devtoken.mint(dkey, {"iss": ISSUER, "aud": AUDIENCE, "sub": f"user-{i:08d}",
                                       "jti": f"{i:032x}", "scope": "orders:read"})
            si, _, sig = tok.rpartition(".")
            raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
            prepared.append((si.encode(), encode_dss_signature(
                int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))))
        sig_alg = ec.ECDSA(hashes.SHA256())

        class _Case:
            def __init__(self) -> None:
                self.pos = 0
                self.tokens = prepared

            @staticmethod
            def fn(x: tuple[bytes, bytes]) -> None:
                pub.verify(x[1], x[0], sig_alg)

        def measure(case: Any, secs: float) -> float:  # benchmarks/verify.py's measure()
            fn, tokens, i, done = case.fn, case.tokens, case.pos, 0
            start = time.thread_time()
            while True:
                for _ in range(200):
                    fn(tokens[i])
                    i = (i + 1) % len(tokens)
                done += 200
                now = time.thread_time()
                if now >= start + secs:
                    case.pos = i
                    return done / (now - start)

        cases = [_Case()]
        source = "benchmarks/verify.py's floor method, inline (its peers are not installed)"
    rates = [measure(cases[0], seconds / slices) for _ in range(slices)]
    print(json.dumps({"median_us": 1e6 / statistics.median(rates), "best_us": 1e6 / max(rates),
                      "source": source, "seconds": seconds, "slices": slices}))


def es256_floor(env: Env) -> dict[str, Any]:
    """es256_floor_child in a fresh interpreter on the target CPU, the machine otherwise idle."""
    code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import e2e; "
            "e2e.es256_floor_child()")
    out = subprocess.run([*env.pin.prefix(env.pin.target_cpu), sys.executable, "-c", code],
                         capture_output=True, timeout=300, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"ES256 floor failed: {out.stderr.decode()[-400:]}")
    data: dict[str, Any] = json.loads(out.stdout.decode().strip().splitlines()[-1])
    return data


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
        return (f"wrk + nginx upstream on CPU {self.load_cpu}; each target alone on CPU "
                f"{self.target_cpu} (direct: a 2nd nginx)")


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
    upstream: subprocess.Popen[bytes] | None = None  # the nginx upstream, once started
    dpop: DpopSet | None = None  # W4's tokens and client keys, when W4 runs
    redis: subprocess.Popen[bytes] | None = None  # W4-redis's replay store, when it runs
    redis_port: int | None = None


def start_nginx(env: Env, cpu: str | None, *, port: int | None = None,
                name: str = "nginx") -> subprocess.Popen[bytes]:
    """The upstream (default: env.nginx_port, files in run_dir), or another nginx serving the
    same reply (``direct``) on ``port`` with its files under run_dir/name."""
    base = env.run_dir if name == "nginx" else env.run_dir / name
    base.mkdir(exist_ok=True)
    for d in ("nginx-client-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"):
        (base / d).mkdir(exist_ok=True)
    port = env.nginx_port if port is None else port
    conf = render(PEERS / "nginx.conf", base / "nginx.conf", RUN_DIR=str(base),
                  NGINX_PORT=str(port))
    proc = env.procs.start(name, [*env.pin.prefix(cpu), "nginx", "-c", str(conf),
                                  "-p", str(base)], base / "nginx.log")
    why = wait_http(port, proc, 10)
    if why:
        raise RuntimeError(f"{name} {why}:\n{tail(base / 'nginx-error.log')}")
    if name == "nginx":
        env.upstream = proc
    return proc


class SkipTarget(Exception):
    pass


def write_fastgate_config(env: Env, port: int, *, admin_port: int | None = None,
                          cache_entries: int | None = None, open_route: bool = False,
                          name: str = "fastgate", variant: str | None = None) -> Path:
    """SPEC §2 config: one provider (jwks_file), one route injecting X-User-Id from `sub`.

    ``open_route`` (the e2e gateways): the JWT route matches /api/ and an `auth: none` route
    /open/ follows it; ``cache_entries`` sets ``cache.max_entries`` (default: SPEC's).
    ``variant`` W4: the provider is W4's ES256 issuer and the route has
    ``dpop: {mode: required, max_age: 300s}``; W4-redis: also ``replay_store.redis``."""
    bench: dict[str, Any] = {
        "name": "bench", "match": {"path_prefix": "/"}, "upstream": "nginx",
        "auth": {"providers": ["bench"], "claim_headers": {"X-User-Id": "sub"}}}
    provider: dict[str, Any] = {"issuer": ISSUER, "jwks_file": str(env.jwks),
                                "audiences": [AUDIENCE], "algorithms": ["RS256"]}
    if variant is not None:
        assert env.dpop is not None
        provider.update(jwks_file=str(env.dpop.jwks), algorithms=["ES256"])
        bench["auth"]["dpop"] = {"mode": "required", "max_age": f"{DPOP_MAX_AGE}s"}
    routes = [bench]
    if open_route:
        bench["match"] = {"path_prefix": "/api/"}
        routes.append({"name": "open", "match": {"path_prefix": "/open/"}, "upstream": "nginx",
                       "auth": "none"})
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin_port or free_port()}",
        "workers": 1,
        "metrics": True,
        "access_log": {"enabled": False},
        "upstreams": {"nginx": {"url": f"http://127.0.0.1:{env.nginx_port}",
                                "connect_timeout": "2s", "read_timeout": "30s"}},
        "providers": {"bench": provider},
        "routes": routes,
    }
    if cache_entries is not None:
        config["cache"] = {"max_entries": cache_entries}
    if variant == "W4-redis":
        assert env.redis_port is not None
        config["replay_store"] = {"redis": {"url": f"redis://127.0.0.1:{env.redis_port}/0",
                                            "key_prefix": f"fgbench-{os.getpid()}:"}}
    path = env.run_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Instance:
    """One running target process (or process tree, for nginx)."""
    name: str  # unique: fastgate, fastgate-w2, fastgate~aa, haproxy, ...
    target: str  # direct | fastgate | haproxy | naive
    desc: str
    proc: subprocess.Popen[bytes]
    port: int
    open_port: int | None = None  # where the `open` workload goes (HAProxy: its plain frontend)
    admin_port: int | None = None  # fastgate's /metrics
    dpop: DpopSet | None = None  # a W4 gateway: its tokens and client keys

    @property
    def dpop_tokens(self) -> Path | None:
        return self.dpop.tokens_path if self.dpop is not None else None


DPOP_INSTANCE = {"W4": "fastgate-w4", "W4-redis": "fastgate-w4-redis"}


def start_instance(env: Env, target: str, name: str, *, cache_entries: int | None = None,
                   variant: str | None = None) -> Instance:
    """Start one target process on the target CPU. Raises SkipTarget."""
    cpu = env.pin.target_cpu
    port = free_port()
    logp = env.run_dir / f"{name}.log"
    open_port: int | None = None
    admin_port: int | None = None
    if target == "direct":
        proc = start_nginx(env, cpu, port=port, name=name)
        return Instance(name, target, "nginx direct (no proxy, token ignored)", proc, port)
    if target == "haproxy":
        if shutil.which("haproxy") is None:
            raise SkipTarget("haproxy is not installed")
        open_port = free_port()
        cfg = render(PEERS / "haproxy.cfg", env.run_dir / f"{name}.cfg", PORT=str(port),
                     NGINX_PORT=str(env.nginx_port), PUBKEY=str(env.pubkey), ISSUER=ISSUER,
                     AUDIENCE=AUDIENCE)
        # The `open` workload's peer: plain proxying, same process, same backend and pool.
        with open(cfg, "a") as f:
            f.write(f"\n# Added by e2e.py: HAProxy plain proxying (no JWT), the peer of an\n"
                    f"# `auth: none` route.\nfrontend fe_plain\n    bind 127.0.0.1:{open_port}\n"
                    f"    default_backend be_nginx\n")
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True,
                               timeout=30)
        if check.returncode != 0:
            raise SkipTarget(f"haproxy rejected its config: {check.stderr.decode()[-500:]}")
        argv = [*env.pin.prefix(cpu), "haproxy", "-f", str(cfg), "-db"]
        desc = "HAProxy 2.6 jwt_verify, nbthread 1 (`open`: a plain frontend, same process)"
        proc = env.procs.start(name, argv, logp)
    elif target == "naive":
        argv = [*env.pin.prefix(cpu), sys.executable, str(PEERS / "naive_proxy.py"),
                "--listen", f"127.0.0.1:{port}", "--upstream", f"http://127.0.0.1:{env.nginx_port}",
                "--pubkey", str(env.pubkey), "--issuer", ISSUER, "--audience", AUDIENCE]
        desc = "aiohttp + uvloop + PyJWT + ClientSession"
        proc = env.procs.start(name, argv, logp)
    elif target == "fastgate":
        admin_port = free_port()
        cfg_path = write_fastgate_config(env, port, admin_port=admin_port,
                                         cache_entries=cache_entries, open_route=True,
                                         name=name.replace("~", "-"), variant=variant)
        cmd = env.fastgate_cmd.format(config=shlex.quote(str(cfg_path)),
                                      python=shlex.quote(sys.executable))
        argv = [*env.pin.prefix(cpu), *shlex.split(cmd)]
        if shutil.which(argv[len(env.pin.prefix(cpu))]) is None:
            raise SkipTarget(f"command not found: {argv[len(env.pin.prefix(cpu))]}")
        penv = dict(os.environ)
        penv["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), penv.get("PYTHONPATH")]))
        desc = ("fastgate, workers: 1, metrics on, access log off, cache "
                + (f"max_entries {cache_entries}" if cache_entries else "default (100,000)"))
        if variant is not None:
            desc += (f"; ES256 provider, route dpop: {{mode: required, max_age: "
                     f"{DPOP_MAX_AGE}s}}, replay store "
                     + ("redis (loopback, load CPU)" if variant == "W4-redis"
                        else "in-process (default max_entries)"))
        proc = env.procs.start(name, argv, logp, env=penv, cwd=REPO)
    else:  # pragma: no cover - argparse restricts the names
        raise SkipTarget(f"unknown target {target}")
    for p in filter(None, (port, open_port, admin_port)):
        why = wait_http(p, proc, 30)
        if why:
            env.procs.stop(proc)
            lines = tail(logp).splitlines()
            last = lines[-1].strip() if lines else "(no output)"
            log(f"{name} log tail ({logp}):\n" + "\n".join(lines))
            raise SkipTarget(f"{name} {why}: {last}")
    return Instance(name, target, desc, proc, port, open_port, admin_port,
                    env.dpop if variant is not None else None)


# ---------------------------------------------------------------------------------------------
# Measuring: CPU from /proc, fastgate's /metrics, wrk
# ---------------------------------------------------------------------------------------------


def proc_tree(pid: int) -> list[int]:
    """pid and its descendants (nginx's master and worker; fastgate's workers if any)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_ticks(pids: list[int]) -> dict[int, tuple[int, int]]:
    """(utime, stime) (all threads) of each live pid, in clock ticks."""
    ticks = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks[pid] = (int(fields[11]), int(fields[12]))  # fields 14 and 15 of stat
    return ticks


def cpu_busy_ticks(cpu: str | None) -> tuple[int, int]:
    """(busy, total) clock ticks of one CPU since boot, from /proc/stat (None: all CPUs)."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    for line in Path("/proc/stat").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == name:
            vals = [int(v) for v in parts[1:9]]  # user nice system idle iowait irq softirq steal
            idle = vals[3] + vals[4]
            return sum(vals) - idle, sum(vals)
    return 0, 0


_SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(admin_port: int | None) -> dict[str, float]:
    """The few fastgate series the report uses, from the admin /metrics (summed over workers)."""
    if admin_port is None:
        return {}
    want = {"hits": 0.0, "misses": 0.0, "verify_sum": 0.0, "verify_count": 0.0}
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "fastgate_token_cache_lookups_total":
            if 'result="hit"' in labels:
                want["hits"] += value
            elif 'result="miss"' in labels:
                want["misses"] += value
        elif name == "fastgate_verify_duration_seconds_sum":
            want["verify_sum"] += value
        elif name == "fastgate_verify_duration_seconds_count":
            want["verify_count"] += value
    return want


def sample_statuses(port: int, tokens: Path | None, n: int = 20, path: str = PATH
                    ) -> dict[str, int]:
    """A few requests over one keep-alive connection: exact status codes (wrk only counts).
    ``tokens`` None: requests without Authorization."""
    counts: dict[str, int] = {}
    lines: list[str | None] = [None] * n if tokens is None else \
        [t for t in tokens.read_text().splitlines() if t][:n]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for tok in lines:
            conn.request("GET", path, headers={} if tok is None
                         else {"Authorization": f"Bearer {tok}"})
            resp = conn.getresponse()
            resp.read()
            counts[str(resp.status)] = counts.get(str(resp.status), 0) + 1
            if resp.will_close:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    finally:
        conn.close()
    return counts


def run_wrk(args: argparse.Namespace, env: Env, port: int, tokens: Path | None, seconds: float,
            tag: str, *, path: str = PATH, offset: int = 0, proofs: Path | None = None,
            connections: int | None = None) -> dict[str, Any]:
    """One wrk run (benchmarks/wrk/cycle.lua) on the load CPU; its JSON summary.
    ``tokens`` None: no Authorization header; ``offset``: index of the first token.
    ``proofs`` (W4): benchmarks/wrk/dpop.lua sends each of these DPoP proofs once."""
    result_path = env.run_dir / f"wrk-{tag}.json"
    result_path.unlink(missing_ok=True)
    wenv = dict(os.environ, WRK_TOKENS=str(tokens) if tokens else "", WRK_PATH=path,
                WRK_RESULT=str(result_path), WRK_OFFSET=str(offset),
                WRK_THREADS=str(args.threads), WRK_PROOFS=str(proofs or ""))
    script = WRK_SCRIPT if proofs is None else DPOP_SCRIPT
    argv = [*env.pin.prefix(env.pin.load_cpu), "wrk", f"-t{args.threads}",
            f"-c{connections or args.connections}", f"-d{max(1, round(seconds))}s", "--latency",
            "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(argv, env=wenv, capture_output=True, timeout=seconds + 60)
    (env.run_dir / f"wrk-{tag}.txt").write_bytes(out.stdout + out.stderr)
    if out.returncode != 0 or not result_path.exists():
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.decode()[-400:]}")
    data: dict[str, Any] = json.loads(result_path.read_text())
    return data


@dataclass
class Unit:
    """One (target, workload) measured every round, on one instance."""
    target: str  # the reported name: fastgate, haproxy, ..., or fastgate~aa (a control)
    workload: str
    inst: Instance
    tokens: Path | None
    path: str
    expected: int
    cursor: int = 0  # where the next wrk run starts in the token list
    dpop: DpopSet | None = None  # W4: a fresh proof per request
    rate: float = 0.0  # W4: the highest req/s seen so far (sizes the next run's proofs)

    @property
    def port(self) -> int:
        if self.workload == OPEN and self.inst.open_port is not None:
            return self.inst.open_port
        return self.inst.port


@dataclass
class RunResult:
    target: str
    workload: str
    # Medians over the rounds (the keys report.py reads), totals for the counts.
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
    instance: str = ""
    cpu_us: float = 0.0  # the target's CPU µs per request (median of rounds)
    sys_us: float = 0.0  # of which in the kernel (stime; median of rounds)
    cpu_load: float = 0.0  # share of the target CPU the target used during a run (median)
    other_load: float = 0.0  # share of the target CPU used by anything else (median)
    load_other: float = 0.0  # share of the load CPU used by neither wrk nor the upstream
    redis_us: float | None = None  # W4-redis: redis-server CPU µs per request (median)
    cache_hits: int | None = None  # fastgate: token-cache lookups over the measured runs
    cache_misses: int | None = None
    verify_us_per_miss: float | None = None  # fastgate: verify histogram sum/count, runs
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str) -> list[float]:
        return [float(r[key]) for r in self.rounds]


def prepare_proofs(env: Env, unit: Unit, seconds: float, tag: str,
                   ) -> tuple[Path | None, dict[str, Any]]:
    """W4: the proofs of one run, written just before it (iat fresh, a unique jti each):
    rate x duration x PROOF_MARGIN of them, the rate being the highest the unit reached so
    far, and at least PROOF_MIN_RPS."""
    if unit.dpop is None:
        return None, {}
    rate = max(unit.rate, PROOF_MIN_RPS)
    count = int(rate * max(1, round(seconds)) * PROOF_MARGIN) + 4 * 1024
    path = env.run_dir / f"proofs-{tag}.txt"
    took = write_proofs(unit.dpop, dpop_htu(unit.port, unit.path), count, path)
    log(f"{tag}: {count:,} proofs in {took:.1f}s (for up to {count / max(1, round(seconds)):,.0f}"
        " req/s)")
    return path, {"proofs": count, "proof_seconds": took}


def after_proofs(unit: Unit, proofs: Path | None, data: dict[str, Any], seconds: float) -> None:
    if proofs is None:
        return
    proofs.unlink(missing_ok=True)  # about 0.6 KB a proof: do not keep them
    unit.rate = max(unit.rate, data["requests"] / max(1e-9, data["duration_us"] / 1e6))


def latency_probe(args: argparse.Namespace, env: Env, unit: Unit, tag: str) -> dict[str, Any]:
    """W4: a short extra run at low concurrency (``--latency-connections``), after the
    measured one, so latency is the service time plus the replay store's round trip, not the
    queueing of 64 connections at saturation. Not part of the CPU measurement."""
    seconds = args.latency_probe
    probe = Unit(unit.target, unit.workload, unit.inst, unit.tokens, unit.path, unit.expected,
                 dpop=unit.dpop, rate=unit.rate)
    proofs, _ = prepare_proofs(env, probe, seconds, tag + "-lat")
    data = run_wrk(args, env, unit.port, unit.tokens, seconds, tag + "-lat", path=unit.path,
                   proofs=proofs, connections=args.latency_connections)
    after_proofs(probe, proofs, data, seconds)
    lat = data["latency_us"]
    return {"lat_p50_ms": lat["p50"] / 1000, "lat_p99_ms": lat["p99"] / 1000,
            "lat_rps": data["requests"] / max(1e-9, data["duration_us"] / 1e6),
            "lat_bad": int(data["errors"]["status"]) + int(data.get("overrun", 0))}


def measure_unit(args: argparse.Namespace, env: Env, unit: Unit, res: RunResult,
                 tag: str) -> None:
    proofs, proof_info = prepare_proofs(env, unit, args.duration, tag)  # before any sampling
    redis_pids = proc_tree(env.redis.pid) if unit.workload == "W4-redis" and env.redis else []
    r0 = cpu_ticks(redis_pids)
    before = scrape(unit.inst.admin_port)
    pids = proc_tree(unit.inst.proc.pid)  # taskset execs: the pid is the target's
    up = proc_tree(env.upstream.pid) if env.upstream is not None else []
    t0, b0 = cpu_ticks(pids), cpu_busy_ticks(env.pin.target_cpu)
    u0, l0 = cpu_ticks(up), cpu_busy_ticks(env.pin.load_cpu)
    k0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once waited for
    data = run_wrk(args, env, unit.port, unit.tokens, args.duration, tag, path=unit.path,
                   offset=unit.cursor, proofs=proofs)
    t1, b1 = cpu_ticks(sorted(set(pids) | set(proc_tree(unit.inst.proc.pid)))), \
        cpu_busy_ticks(env.pin.target_cpu)
    u1, l1 = cpu_ticks(up), cpu_busy_ticks(env.pin.load_cpu)
    k1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r1 = cpu_ticks(redis_pids)
    after = scrape(unit.inst.admin_port)
    after_proofs(unit, proofs, data, args.duration)
    hz = os.sysconf("SC_CLK_TCK")
    user = sum(t1[p][0] - t0.get(p, (0, 0))[0] for p in t1) / hz
    system = sum(t1[p][1] - t0.get(p, (0, 0))[1] for p in t1) / hz
    cpu = user + system
    busy = (b1[0] - b0[0]) / hz  # /proc/stat counts in USER_HZ too
    # The load CPU: what wrk and the upstream used, and what anything else did.
    wrk_cpu = (k1.ru_utime + k1.ru_stime) - (k0.ru_utime + k0.ru_stime)
    up_cpu = sum(sum(u1[p]) - sum(u0.get(p, (0, 0))) for p in u1) / hz
    load_busy = (l1[0] - l0[0]) / hz
    requests = int(data["requests"])
    # Continue the cycle past every token sent (in-flight ones at the end included), so a
    # cache never sees a token again before all the others.
    if unit.tokens is not None:
        unit.cursor += requests + 4 * args.connections
    wall = data["duration_us"] / 1e6
    errs = data["errors"]
    rnd: dict[str, Any] = {
        "rps": requests / wall, "p50_ms": data["latency_us"]["p50"] / 1000,
        "p99_ms": data["latency_us"]["p99"] / 1000, "p999_ms": data["latency_us"]["p999"] / 1000,
        "requests": requests, "non2xx": int(errs["status"]),
        "socket_errors": sum(int(errs[k]) for k in ("connect", "read", "write", "timeout")),
        "cpu_s": cpu, "cpu_us": cpu / requests * 1e6 if requests else 0.0,
        "sys_us": system / requests * 1e6 if requests else 0.0,
        "cpu_load": cpu / wall,
        "other_load": max(0.0, busy - cpu) / wall if env.pin.target_cpu is not None else None,
        "load_cpu_load": load_busy / wall if env.pin.load_cpu is not None else None,
        "load_other": max(0.0, load_busy - wrk_cpu - up_cpu) / wall
        if env.pin.load_cpu is not None and unit.target != "direct" else None,
        "tag": tag, **proof_info,
    }
    if proofs is not None:
        rnd["overrun"] = int(data.get("overrun", 0))
        if rnd["overrun"]:
            res.anomalies.append(f"{tag}: ran out of proofs, {rnd['overrun']} replays sent "
                                 "(the next run makes more)")
    if proofs is not None and args.latency_probe > 0:
        rnd.update(latency_probe(args, env, unit, tag))
    if redis_pids and requests:
        rnd["redis_us"] = sum(sum(r1[p]) - sum(r0.get(p, (0, 0))) for p in r1) / hz \
            / requests * 1e6
    if before and after:
        rnd["cache_hits"] = int(after["hits"] - before["hits"])
        rnd["cache_misses"] = int(after["misses"] - before["misses"])
        n = after["verify_count"] - before["verify_count"]
        rnd["verify_count"] = int(n)
        rnd["verify_us"] = (after["verify_sum"] - before["verify_sum"]) / n * 1e6 if n else None
    res.rounds.append(rnd)
    if unit.expected == 200 and rnd["non2xx"]:
        res.anomalies.append(f"{tag}: {rnd['non2xx']} non-2xx responses")
    if unit.expected != 200 and unit.target != "direct" and rnd["non2xx"] != requests:
        res.anomalies.append(f"{tag}: {requests - rnd['non2xx']} of {requests} bad-signature "
                             f"requests were NOT rejected")
    if rnd["socket_errors"]:
        res.anomalies.append(f"{tag}: {rnd['socket_errors']} socket errors {errs}")
    if unit.workload == "W2" and rnd.get("cache_hits"):
        res.anomalies.append(f"{tag}: {rnd['cache_hits']} W2 cache hits (must be 0)")
    extra = ""
    if "cache_hits" in rnd:
        extra = f", cache {rnd['cache_hits']} hit / {rnd['cache_misses']} miss"
        if rnd.get("verify_us"):
            extra += f", verify {rnd['verify_us']:.1f} µs/miss"
    log(f"{tag}: {rnd['rps']:,.0f} req/s p99 {rnd['p99_ms']:.2f} ms, {rnd['cpu_us']:.1f} µs "
        f"CPU/request ({rnd['cpu_load'] * 100:.0f} % of the target CPU{extra})")


def summarize(res: RunResult) -> None:
    if not res.rounds:
        return
    med = statistics.median
    res.rps = med(res.series("rps"))
    res.p50_ms = med(res.series("p50_ms"))
    res.p99_ms = med(res.series("p99_ms"))
    res.cpu_us = med(res.series("cpu_us"))
    res.sys_us = med(res.series("sys_us"))
    res.cpu_load = med(res.series("cpu_load"))
    others = [r["other_load"] for r in res.rounds if r.get("other_load") is not None]
    res.other_load = med(others) if others else 0.0
    lothers = [r["load_other"] for r in res.rounds if r.get("load_other") is not None]
    res.load_other = med(lothers) if lothers else 0.0
    redis = [r["redis_us"] for r in res.rounds if r.get("redis_us") is not None]
    res.redis_us = med(redis) if redis else None
    res.requests = sum(int(r["requests"]) for r in res.rounds)
    res.non2xx = sum(int(r["non2xx"]) for r in res.rounds)
    res.socket_errors = sum(int(r["socket_errors"]) for r in res.rounds)
    if all("cache_hits" in r for r in res.rounds):
        res.cache_hits = sum(int(r["cache_hits"]) for r in res.rounds)
        res.cache_misses = sum(int(r["cache_misses"]) for r in res.rounds)
        n = sum(int(r["verify_count"]) for r in res.rounds)
        total = sum((r["verify_us"] or 0.0) * r["verify_count"] for r in res.rounds)
        res.verify_us_per_miss = total / n if n else None


# ---------------------------------------------------------------------------------------------
# Ratios, goals, the noise floor
# ---------------------------------------------------------------------------------------------

GOALS = [  # (workload, numerator, denominator, metric, op, bound) - issue 9, Speed
    ("W1", "fastgate", "haproxy", "rps", ">=", 1.5),
    ("W1", "fastgate", "haproxy", "cpu_us", "<=", 0.7),
    ("W1", "fastgate", "haproxy", "p99_ms", "<=", 1.0),
    ("W1", "fastgate", "naive", "rps", ">=", 6.0),
    ("W2", "fastgate", "haproxy", "rps", ">=", 1.0),
    ("W3", "fastgate", "haproxy", "rps", ">=", 2.0),
    (OPEN, "fastgate", "haproxy", "rps", ">=", 1.0),
]
METRIC_LABEL = {"rps": "req/s", "cpu_us": "CPU/request", "p99_ms": "p99"}


def paired(a: RunResult, b: RunResult, metric: str) -> list[float]:
    """Per-round ratios a/b: each from runs seconds apart in the same round."""
    return [x / y for x, y in zip(a.series(metric), b.series(metric), strict=False) if y]


def noise_floors(by: dict[tuple[str, str], RunResult]) -> dict[str, dict[str, Any]]:
    """Per metric: the A/A controls' median paired ratios and the floor |1 - ratio| (max over
    the controls run)."""
    floors: dict[str, dict[str, Any]] = {}
    for metric in METRIC_LABEL:
        rows = []
        for (t, w), ctl in by.items():
            if not t.endswith(AA) or (t[:-len(AA)], w) not in by:
                continue
            ratios = paired(ctl, by[(t[:-len(AA)], w)], metric)
            if ratios:
                rows.append({"control": f"{t} {w}", "median": statistics.median(ratios),
                             "min": min(ratios), "max": max(ratios)})
        floors[metric] = {"controls": rows,
                          "floor": max((abs(1 - r["median"]) for r in rows), default=None)}
    return floors


def goal_rows(results: list[RunResult], floors: dict[str, dict[str, Any]] | None = None,
              ) -> list[dict[str, Any]]:
    by = {(r.target, r.workload): r for r in results if r.skipped is None and r.rounds}
    floors = floors if floors is not None else noise_floors(by)
    rows: list[dict[str, Any]] = []
    for w, num, den, metric, op, bound in GOALS:
        a, b = by.get((num, w)), by.get((den, w))
        label = f"{w} {num}/{den} {METRIC_LABEL[metric]} {op} {bound:g}x"
        row: dict[str, Any] = {"goal": label, "workload": w, "metric": metric, "op": op,
                               "bound": bound, "ratio": None, "met": None}
        if a is None or b is None:
            rows.append(row)
            continue
        ratios = paired(a, b, metric)
        ratio = statistics.median(ratios) if ratios else 0.0
        of_medians = getattr(a, metric) / getattr(b, metric) if getattr(b, metric) else 0.0
        met = ratio >= bound if op == ">=" else ratio <= bound
        floor = floors[metric]["floor"]
        if w == "W2" and num == "fastgate" and a.cache_hits:
            met = False  # not a W2 measurement: the cache hit
        bound_by_load = [r.target for r in (a, b) if r.cpu_load < LOAD_BOUND]
        row.update(ratio=ratio, ratio_of_medians=of_medians, per_round=ratios, met=met,
                   noise_floor=floor, load_bound=bound_by_load,
                   within_noise=floor is not None and abs(ratio - bound) <= floor * bound)
        rows.append(row)
    w2 = by.get(("fastgate", "W2"))
    if w2 is not None:
        rows.append({"goal": "W2 fastgate token-cache hits == 0", "workload": "W2",
                     "metric": "cache_hits", "op": "==", "bound": 0,
                     "ratio": w2.cache_hits, "met": w2.cache_hits == 0})
    return rows


def dpop_rows(results: list[RunResult], floor: dict[str, Any] | None,
              args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Issue 11's numbers: W4 against W1 (CPU per request, the goal CPU(W4) <= CPU(W1) +
    1.15 x the ES256 verify floor, on the median of the per-round paired differences), and
    W4-redis against W4 (the added p50/p99 latency and CPU)."""
    by = {(r.target, r.workload): r for r in results if r.skipped is None and r.rounds}
    out: dict[str, Any] = {"floor": floor,
                           "latency_connections": getattr(args, "latency_connections", None),
                           "latency_probe": getattr(args, "latency_probe", None)}
    w1, w4, w4r = (by.get(("fastgate", w)) for w in ("W1", "W4", "W4-redis"))

    def diffs(a: RunResult, b: RunResult, metric: str) -> list[float]:
        return [x - y for x, y in zip(a.series(metric), b.series(metric), strict=False)]

    if w1 is not None and w4 is not None:
        d = diffs(w4, w1, "cpu_us")
        row: dict[str, Any] = {
            "w1_rps": w1.rps, "w4_rps": w4.rps, "w1_cpu_us": w1.cpu_us, "w4_cpu_us": w4.cpu_us,
            "rps_ratio": statistics.median(paired(w4, w1, "rps")),
            "cpu_added_us": statistics.median(d), "cpu_added_per_round": d,
            "p99_added_ms": statistics.median(diffs(w4, w1, "p99_ms"))}
        if floor is not None:
            for kind in ("median", "best"):
                bound = DPOP_GOAL * floor[f"{kind}_us"]
                row[f"bound_us_{kind}_floor"] = bound
                row[f"met_{kind}_floor"] = row["cpu_added_us"] <= bound
            row["added_in_floors"] = row["cpu_added_us"] / floor["median_us"]
        out["w4_vs_w1"] = row
    if w4 is not None and w4r is not None:
        lat: dict[str, Any] = {}
        if all("lat_p50_ms" in r for r in (*w4.rounds, *w4r.rounds)):
            lat = {"lat_p50_added_ms": statistics.median(diffs(w4r, w4, "lat_p50_ms")),
                   "lat_p99_added_ms": statistics.median(diffs(w4r, w4, "lat_p99_ms")),
                   "w4_lat_p50_ms": statistics.median(w4.series("lat_p50_ms")),
                   "w4_lat_p99_ms": statistics.median(w4.series("lat_p99_ms")),
                   "w4_redis_lat_p50_ms": statistics.median(w4r.series("lat_p50_ms")),
                   "w4_redis_lat_p99_ms": statistics.median(w4r.series("lat_p99_ms"))}
        out["redis_vs_memory"] = {**lat,
            "p50_added_ms": statistics.median(diffs(w4r, w4, "p50_ms")),
            "p99_added_ms": statistics.median(diffs(w4r, w4, "p99_ms")),
            "cpu_added_us": statistics.median(diffs(w4r, w4, "cpu_us")),
            "rps_ratio": statistics.median(paired(w4r, w4, "rps")),
            "w4_p50_ms": w4.p50_ms, "w4_p99_ms": w4.p99_ms,
            "w4_redis_p50_ms": w4r.p50_ms, "w4_redis_p99_ms": w4r.p99_ms,
            "redis_server_us": w4r.redis_us}
    return out


def dpop_markdown(d: dict[str, Any]) -> list[str]:
    out = ["DPoP (issue 11): W4 against W1 and W4-redis against W4, medians of the per-round "
           "paired differences:\n"]
    floor = d.get("floor")
    if floor is not None:
        out.append(f"- ES256 verify floor on the target CPU: {floor['median_us']:.1f} µs "
                   f"(median slice; best {floor['best_us']:.1f} µs), {floor['source']}.")
    row = d.get("w4_vs_w1")
    if row is not None:
        out.append(f"- W4 {row['w4_rps']:,.0f} req/s, {row['w4_cpu_us']:.1f} µs CPU/request; "
                   f"W1 {row['w1_rps']:,.0f} req/s, {row['w1_cpu_us']:.1f} µs; W4/W1 req/s "
                   f"{row['rps_ratio']:.2f}x; W4 adds {row['cpu_added_us']:.1f} µs CPU per "
                   "request (rounds " + ", ".join(f"{x:.1f}" for x in row["cpu_added_per_round"])
                   + f") and {row['p99_added_ms']:.2f} ms p99.")
        if floor is not None:
            for kind in ("median", "best"):
                met = "yes" if row[f"met_{kind}_floor"] else "**NO**"
                out.append(f"- goal CPU(W4) <= CPU(W1) + {DPOP_GOAL:g} x ES256 floor "
                           f"({kind} slice): added {row['cpu_added_us']:.1f} µs <= "
                           f"{row[f'bound_us_{kind}_floor']:.1f} µs: {met}")
            out.append(f"- the added CPU is {row['added_in_floors']:.2f} ES256 verify floors "
                       "(the proof's signature plus its parse, htu, the thumbprint, the replay "
                       "store)")
    redis = d.get("redis_vs_memory")
    if redis is not None:
        extra = "" if redis["redis_server_us"] is None else \
            f"; redis-server itself {redis['redis_server_us']:.1f} µs CPU per request"
        out.append(f"- W4-redis vs W4: p50 {redis['w4_redis_p50_ms']:.2f} vs "
                   f"{redis['w4_p50_ms']:.2f} ms (added {redis['p50_added_ms']:+.2f} ms), p99 "
                   f"{redis['w4_redis_p99_ms']:.2f} vs {redis['w4_p99_ms']:.2f} ms (added "
                   f"{redis['p99_added_ms']:+.2f} ms); gateway CPU {redis['cpu_added_us']:+.1f} "
                   f"µs per request; req/s {redis['rps_ratio']:.2f}x{extra} (at saturation, "
                   "-c as above: latency there is mostly queueing).")
        if "lat_p50_added_ms" in redis:
            out.append(f"- W4-redis vs W4 at low concurrency (-c{d['latency_connections']}, "
                       f"{d['latency_probe']:g} s after each measured run): p50 "
                       f"{redis['w4_redis_lat_p50_ms']:.3f} vs {redis['w4_lat_p50_ms']:.3f} ms "
                       f"(added {redis['lat_p50_added_ms']:+.3f} ms), p99 "
                       f"{redis['w4_redis_lat_p99_ms']:.3f} vs {redis['w4_lat_p99_ms']:.3f} ms "
                       f"(added {redis['lat_p99_added_ms']:+.3f} ms): the replay store's round "
                       "trip.")
    out.append("")
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def markdown(args: argparse.Namespace, env: Env, results: list[RunResult],
             descs: dict[str, str], skipped: dict[str, str], load_end: float) -> str:
    by = {(r.target, r.workload): r for r in results if r.rounds}
    floors = noise_floors(by)
    out = [f"# e2e benchmark - {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}\n"]
    out.append(f"Command: `{' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}` "
               f"(cwd `{Path.cwd()}`)\n")
    out.append(f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python "
               f"{platform.python_version()}; {versions()}\n")
    out.append(f"fastgate: {revision()}\n")
    out.append(f"Load: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency "
               f"per run, {args.rounds} interleaved rounds (order rotated every round), warm-up "
               f"{args.warmup:g}s per unit; loopback; fastgate W2 with cache max_entries "
               f"{args.w2_cache}.\n")
    out.append(f"Pinning: {env.pin.describe()}.\n")
    busy = args.load_at_start > 0.7 or load_end > 1.7
    out.append(f"Load average (1 min): {args.load_at_start:.2f} before, {load_end:.2f} after "
               f"(this harness itself adds about 1.5)"
               + (" - **the machine was busy: compare ratios within this run only**"
                  if busy else "") + "\n")
    out.append("Per (target, workload), medians of the rounds. CPU µs/req: the target's "
               "utime+stime over the run / requests completed (of which kernel: stime). "
               "target CPU: the share of its "
               "CPU it used (near 100 %: the target is the bottleneck; well below: wrk or the "
               "upstream on the load CPU is, or the target waits). other: the rest of that "
               "CPU's busy time; load CPU other: the load CPU's busy time used by neither wrk "
               "nor the upstream (both: other jobs on the machine, i.e. noise). cache, verify: "
               "fastgate's /metrics deltas over the measured runs.\n")
    out.append("| target | workload | req/s | req/s min-max | p50 ms | p99 ms | CPU µs/req | "
               "of which kernel | target CPU | other | load CPU other | cache hit / miss | "
               "verify µs/miss | notes |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        if not r.rounds:
            continue
        rps = r.series("rps")
        notes = "; ".join(r.anomalies[:3]) + (" ..." if len(r.anomalies) > 3 else "") \
            if r.anomalies else "ok"
        if r.cpu_load < LOAD_BOUND:
            notes = ("**load-side bound** (the target was not saturated: its req/s is the "
                     "limit of wrk and the upstream on the load CPU; compare CPU/request)"
                     + ("" if notes == "ok" else f"; {notes}"))
        cache = "" if r.cache_hits is None else f"{r.cache_hits:,} / {r.cache_misses:,}"
        ver = "" if r.verify_us_per_miss is None else f"{r.verify_us_per_miss:.1f}"
        out.append(f"| {r.target} | {r.workload} | {r.rps:,.0f} | {min(rps):,.0f}-"
                   f"{max(rps):,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.cpu_us:.1f} | "
                   f"{r.sys_us:.1f} | "
                   f"{r.cpu_load * 100:.0f} % | {r.other_load * 100:.0f} % | "
                   f"{r.load_other * 100:.0f} % | {cache} | {ver} | "
                   f"{notes} |")
    out.append("")
    for t, why in skipped.items():
        out.append(f"- **{t} skipped**: {why.splitlines()[0] if why else ''}")
    for t, d in descs.items():
        out.append(f"- {t}: {d}")
    for w in args.workloads:
        desc = WORKLOADS[w][2] if w in WORKLOADS else DPOP_WORKLOADS.get(w, OPEN_DESC)
        out.append(f"- {w}: {desc}")
    out.append("")

    out.append("Ratios fastgate / peer (median of the per-round paired ratios):\n")
    out.append("| workload | peer | req/s | CPU/request | p99 |")
    out.append("|---|---|---:|---:|---:|")
    for w in args.workloads:
        for peer in ("haproxy", "naive", "direct"):
            a, b = by.get(("fastgate", w)), by.get((peer, w))
            if a is None or b is None:
                continue
            cells = []
            for metric in ("rps", "cpu_us", "p99_ms"):
                rs = paired(a, b, metric)
                cells.append(f"{statistics.median(rs):.2f}x" if rs else "n/a")
            out.append(f"| {w} | {peer} | " + " | ".join(cells) + " |")
    out.append("")

    out.append("Goals (issue 9, Speed); noise floor = |1 - A/A ratio| of the controls below:\n")
    out.append("| goal | ratio (median of rounds) | ratio of medians | per round | noise floor | "
               "met |")
    out.append("|---|---:|---:|---|---:|---|")
    for g in goal_rows(results, floors):
        if g["metric"] == "cache_hits":
            val = "n/a" if g["ratio"] is None else f"{g['ratio']:,}"
            met = "yes" if g["met"] else "**NO**"
            out.append(f"| {g['goal']} | {val} | | | | {met} |")
            continue
        if g["ratio"] is None:
            out.append(f"| {g['goal']} | n/a | | | | n/a |")
            continue
        met = "yes" if g["met"] else "**NO**"
        if g["within_noise"]:
            met += " (within noise)"
        if g["load_bound"] and g["metric"] != "cpu_us":
            met += f" ({', '.join(g['load_bound'])} load-side bound)"
        floor = "n/a" if g["noise_floor"] is None else f"±{g['noise_floor'] * 100:.1f} %"
        out.append(f"| {g['goal']} | {g['ratio']:.2f}x | {g['ratio_of_medians']:.2f}x | "
                   + ", ".join(f"{x:.2f}" for x in g["per_round"]) + f" | {floor} | {met} |")
    out.append("")
    for metric, label in METRIC_LABEL.items():
        for c in floors[metric]["controls"]:
            out.append(f"- A/A {c['control']} vs its twin, {label}: median ratio "
                       f"{c['median']:.3f} (rounds {c['min']:.3f}-{c['max']:.3f})")
    if not any(floors[m]["controls"] for m in METRIC_LABEL):
        out.append("- no A/A control was run (--controls): no noise floor")
    out.append("")
    for w in ("W1", "W2"):
        fg = by.get(("fastgate", w))
        if fg is not None and fg.cache_hits is not None:
            out.append(f"- fastgate {w} ({fg.instance}): token cache {fg.cache_hits:,} hits, "
                       f"{fg.cache_misses:,} misses over the measured runs"
                       + (f"; in-gateway verify {fg.verify_us_per_miss:.1f} µs per miss "
                          "(fastgate_verify_duration_seconds sum/count)"
                          if fg.verify_us_per_miss else "") + ".")
    out.append("")
    if any(w in DPOP_WORKLOADS for w in args.workloads):
        out.extend(dpop_markdown(dpop_rows(results, getattr(args, "es256_floor", None), args)))
    out.append("Per round (req/s | CPU µs/req):\n")
    for r in results:
        if r.rounds:
            out.append(f"- {r.target} {r.workload}: " + ", ".join(
                f"{x['rps']:,.0f} | {x['cpu_us']:.1f}" for x in r.rounds))
    return "\n".join(out) + "\n"


def revision() -> str:
    """The commit of the tree the gateway ran from, and whether fastgate/ had local edits."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %ci %s"],
                              capture_output=True, timeout=10).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "fastgate"], capture_output=True, timeout=10).stdout.strip()
        return f"`{head[:100]}`" + (" + uncommitted edits in fastgate/" if dirty else "")
    return "unknown revision"


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
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 3 rounds x 2 s, 1 s warm-ups, fastgate A/A only "
                        "(< 2 minutes with the default targets)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help=f"comma-separated subset of {','.join(TARGETS)}")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                   help=f"comma-separated subset of {','.join(ALL_WORKLOADS)}")
    p.add_argument("--naive-workloads", default="W1",
                   help="workloads the naive proxy runs (its goal is W1 only; default W1)")
    p.add_argument("--rounds", type=int, help="interleaved rounds, >= 3 (default 5; quick 3)")
    p.add_argument("--duration", type=float,
                   help="seconds per measured run (default 8; quick 2)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per unit (default 2; quick 1)")
    p.add_argument("--controls",
                   help="A/A controls, target:workload pairs measured twice per round in two "
                        "identical processes (default fastgate:W1,haproxy:W1; quick "
                        "fastgate:W1; 'none' for none)")
    p.add_argument("--w2-cache", type=int, default=1000,
                   help="cache.max_entries of fastgate's W2 gateway (default 1000: 20,000 "
                        "cycled tokens never hit)")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--latency-connections", type=int, default=4,
                   help="W4/W4-redis: connections of the latency probe run after each "
                        "measured run (default 4)")
    p.add_argument("--latency-probe", type=float, default=2.0,
                   help="W4/W4-redis: seconds of that probe; 0 = none (default 2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--fastgate-cmd", default="{python} -m fastgate run -c {config}",
                   help="command starting fastgate (`fastgate run -c FILE`); {config} and "
                        "{python} are substituted")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    canonical = {w.lower(): w for w in ALL_WORKLOADS}
    args.workloads = [canonical.get(w.lower(), w) for w in args.workloads]
    if (any(w in DPOP_WORKLOADS for w in args.workloads) and "W1" not in args.workloads
            and "fastgate" in args.targets):
        args.workloads.insert(0, "W1")  # W4 is reported against W1 of the same run
    args.naive_workloads = [w.strip().upper() for w in args.naive_workloads.split(",")
                            if w.strip()]
    for t in args.targets:
        if t not in TARGETS:
            p.error(f"unknown target {t!r}")
    for w in args.workloads:
        if w not in ALL_WORKLOADS:
            p.error(f"unknown workload {w!r}")
    controls = []
    if args.controls.strip().lower() not in ("", "none"):
        for pair in args.controls.split(","):
            t, _, w = pair.strip().partition(":")
            w = canonical.get(w.lower(), w)
            if t not in TARGETS or t == "direct" or w not in ALL_WORKLOADS \
                    or w in DPOP_WORKLOADS:
                p.error(f"--controls: bad pair {pair!r} (target:workload, not direct, not "
                        "W4)")
            controls.append((t, w))
    args.controls = controls
    if args.rounds < 3 or args.rounds > 50:
        p.error("--rounds must be in [3, 50] (medians of rounds)")
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 120:
        p.error("--duration must be in (0, 600] and --warmup in [0, 120]")
    if args.connections < args.threads:
        p.error("--connections must be >= --threads")
    if args.w2_cache < 1:
        p.error("--w2-cache must be >= 1")
    return args


def plan_units(args: argparse.Namespace, insts: dict[str, Instance],
               tokens: dict[str, Path]) -> list[Unit]:
    """Every (target, workload) to measure, in the first round's order."""
    units: list[Unit] = []

    def add(target: str, workload: str, inst: Instance) -> None:
        toks = tokens.get(workload) if workload != OPEN else None
        path = OPEN_PATH if workload == OPEN and inst.target == "fastgate" else PATH
        expected = WORKLOADS[workload][3] if workload in WORKLOADS else 200
        # Tokens 0-19 were sent by the sanity check: start past them.
        units.append(Unit(target, workload, inst, toks, path, expected,
                          cursor=1000 if workload == "W2" else 0))

    for t in args.targets:
        for w in args.workloads:
            if t == "direct" and w != args.workloads[0]:
                continue  # nginx ignores the token: one workload is the reference
            if t == "naive" and w not in args.naive_workloads:
                continue
            if w in DPOP_WORKLOADS:
                name = DPOP_INSTANCE[w]
                if t == "fastgate" and name in insts:
                    units.append(Unit(t, w, insts[name], insts[name].dpop_tokens, PATH, 200,
                                      dpop=insts[name].dpop))
                continue
            name = "fastgate-w2" if (t, w) == ("fastgate", "W2") else t
            if name in insts:
                add(t, w, insts[name])
    for t, w in args.controls:
        name = t + AA + ("-w2" if (t, w) == ("fastgate", "W2") else "")
        if name in insts and t in args.targets:
            add(t + AA, w, insts[name])
    return units


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
    started = time.monotonic()
    try:
        start_nginx(env, pin.load_cpu)
        insts: dict[str, Instance] = {}
        # (instance name, target, cache, variant)
        wanted: list[tuple[str, str, int | None, str | None]] = []
        for t in args.targets:
            wanted.append((t, t, None, None))
            if t == "fastgate" and "W2" in args.workloads:
                wanted.append(("fastgate-w2", t, args.w2_cache, None))
            if t == "fastgate":
                wanted.extend((DPOP_INSTANCE[w], t, None, w) for w in DPOP_WORKLOADS
                              if w in args.workloads)
        for t, w in args.controls:
            if t in args.targets and w in args.workloads:
                two = (t, w) == ("fastgate", "W2")
                wanted.append((t + AA + ("-w2" if two else ""), t,
                               args.w2_cache if two else None, None))
        if any(v is not None for *_, v in wanted):
            env.dpop = make_dpop_set(run_dir)
        for name, target, cache, variant in wanted:
            if target in skipped or name in skipped:
                continue
            try:
                if variant == "W4-redis" and env.redis is None:
                    if shutil.which("redis-server") is None:
                        raise SkipTarget("redis-server is not installed (Debian package "
                                         "redis-server)")
                    env.redis, env.redis_port = start_redis(env)
                insts[name] = start_instance(env, target, name, cache_entries=cache,
                                             variant=variant)
            except SkipTarget as exc:
                log(f"SKIP {name}: {exc}")
                skipped[name if variant is not None else target] = str(exc)
                continue
            descs.setdefault(target, insts[name].desc)
            if name != target:
                descs[name] = insts[name].desc
        units = plan_units(args, insts, tokens)
        args.es256_floor = None
        if any(u.dpop is not None for u in units):
            log("measuring the ES256 verify floor on the target CPU ...")
            args.es256_floor = es256_floor(env)
            log(f"ES256 verify floor: {args.es256_floor['median_us']:.1f} µs (median slice), "
                f"{args.es256_floor['best_us']:.1f} µs (best); {args.es256_floor['source']}")
        for u in units:
            res = RunResult(u.target, u.workload, expected_status=u.expected,
                            instance=u.inst.name)
            results.append(res)
        per_run = args.duration + 0.6  # wrk start-up, the /proc reads and the scrapes
        estimate = len(units) * (args.rounds * per_run + args.warmup + 0.6)
        log(f"{len(units)} units x {args.rounds} rounds x {args.duration:g}s: about "
            f"{estimate / 60:.1f} minutes from now")
        for u, res in zip(units, results, strict=True):
            if u.dpop is not None:
                res.sample_statuses = sample_dpop(u.port, u.dpop, path=u.path)
                if set(res.sample_statuses) != set(DPOP_SAMPLE_EXPECTED):
                    res.anomalies.append(f"sample statuses {res.sample_statuses}, expected "
                                         f"{', '.join(DPOP_SAMPLE_EXPECTED)}")
                    log(f"ANOMALY {u.target} {u.workload}: {res.anomalies[-1]}")
            elif u.target != "direct":
                res.sample_statuses = sample_statuses(u.port, u.tokens, path=u.path)
                if set(res.sample_statuses) != {str(u.expected)}:
                    res.anomalies.append(f"sample statuses {res.sample_statuses}, expected "
                                         f"all {u.expected}")
                    log(f"ANOMALY {u.target} {u.workload}: {res.anomalies[-1]}")
            if args.warmup > 0:
                tag = f"{u.target}-{u.workload}-warmup"
                proofs, _ = prepare_proofs(env, u, args.warmup, tag)
                data = run_wrk(args, env, u.port, u.tokens, args.warmup, tag, path=u.path,
                               offset=u.cursor, proofs=proofs)
                after_proofs(u, proofs, data, args.warmup)
                if u.tokens is not None:
                    u.cursor += int(data["requests"]) + 4 * args.connections
        for r in range(1, args.rounds + 1):
            k = (r - 1) % len(units)  # A B C, B C A, C A B, ...
            order = list(range(len(units)))[k:] + list(range(len(units)))[:k]
            log(f"round {r}/{args.rounds}")
            for i in order:
                u = units[i]
                measure_unit(args, env, u, results[i], f"{u.target}-{u.workload}-r{r}")
    except KeyboardInterrupt:
        log("interrupted: stopping every child process")
        return 130
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for res in results:
        summarize(res)
    load_end = os.getloadavg()[0]
    md = markdown(args, env, results, descs, skipped, load_end)
    print(md)
    (args.out_dir / "e2e-latest.md").write_text(md)
    log(f"took {(time.monotonic() - started) / 60:.1f} minutes")
    if args.json:
        by = {(r.target, r.workload): r for r in results if r.rounds}
        main_results = [r for r in results if not r.target.endswith(AA)]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "date": dt.date.today().isoformat(),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "pinning": pin.describe(), "load_at_start": args.load_at_start,
            "load_at_end": load_end, "descriptions": descs,
            "results": [asdict(r) for r in main_results],
            "controls": [asdict(r) for r in results if r.target.endswith(AA)],
            "noise_floor": noise_floors(by),
            "skipped": skipped, "goals": goal_rows(results),
            **({"dpop": dpop_rows(results, args.es256_floor, args)}
               if any(w in DPOP_WORKLOADS for w in args.workloads) else {})}, indent=2))
        log(f"json: {args.json}")
    log(f"report: {args.out_dir / 'e2e-latest.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
