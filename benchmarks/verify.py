"""Verifier micro-benchmark: fastgate (cache miss / hit) against PyJWT, joserfc, jwcrypto and the
raw `cryptography` verify of the same signature (the OpenSSL floor), plus the RSS cost of a full
verified-token cache.

    python benchmarks/verify.py [--seconds N] [--slices S] [--algs RS256,ES256] [--no-memory]
                                [--json benchmarks/out/verify.json]

Not a test. Every case runs for N CPU seconds in S short slices interleaved with the other cases
of the same algorithm; the median slice is reported (the machine is shared and noisy). Rates
are per CPU-second of the benchmark thread. Prints a markdown table for benchmarks/RESULTS.md;
``--json FILE`` also writes ``{"date", "args", "rates": {"best": {alg: {case: rate}},
"median": {...}}, "memory"}``, the document benchmarks/report.py reads.

W3 (bad signatures, 401): ``bad_fresh`` verifies a bad signature never seen before (the
signature check runs every time); ``bad_replay`` replays the same 1,000 bad tokens, which the
negative cache answers after the first rejection.
"""

from __future__ import annotations

import argparse
import gc
import hmac
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

for _module, _dist in (("jwt", "PyJWT"), ("joserfc", "joserfc"), ("jwcrypto", "jwcrypto")):
    try:
        __import__(_module)
    except ImportError:
        # The peers are the bench extra's: say so instead of a traceback.
        sys.exit(f"benchmarks/verify.py compares fastgate with {_dist}, which is not installed:"
                 " pip install -e '.[bench]'")

import jwt as pyjwt  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature  # noqa: E402
from joserfc import jwk as jose_jwk  # noqa: E402
from joserfc import jwt as jose_jwt  # noqa: E402
from jwcrypto import jwk as jwc_jwk  # type: ignore[import-untyped]  # noqa: E402
from jwcrypto import jwt as jwc_jwt  # noqa: E402

from fastgate import Reason, TokenCache, Verifier  # noqa: E402
from tests.factory import AUDIENCE, ISSUER, SigningKey, b64u, generate, make_token  # noqa: E402

ALGS = ("RS256", "PS256", "ES256", "EdDSA", "HS256")
MISS_TOKENS = 5000  # distinct tokens cycled through ...
MISS_CACHE = 1000  # ... a cache that holds fewer: every lookup misses (LRU, sequential scan)
HIT_TOKENS = 1000  # a working set that fits the cache: every lookup hits after warm-up
MEMORY_TOKENS = 100_000
OUT = ROOT / "benchmarks" / "out"


def typical_claims(i: int, now: float) -> dict[str, Any]:
    """About 8 claims, like an access token from a hosted IdP."""
    return {
        "iss": ISSUER,
        "sub": f"user-{i:08d}",
        "aud": AUDIENCE,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 3600,
        "jti": f"{i:032x}",
        "scope": "orders:read orders:write",
    }


def _sign_batch(args: tuple[str, str, bytes, int, int, float]) -> list[str]:
    alg, kid, pem, start, count, now = args
    key = SigningKey(alg, kid, serialization.load_pem_private_key(pem, None))
    return [make_token(key, typical_claims(i, now)) for i in range(start, start + count)]


def mint(key: SigningKey, count: int, now: float, start: int = 0) -> list[str]:
    if count < 2000 or not key.alg.startswith(("RS", "PS")):
        return [make_token(key, typical_claims(i, now)) for i in range(start, start + count)]
    # RSA signing is the slow part of the setup: spread it over the cores.
    pem = key.private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    workers = os.cpu_count() or 1
    step = -(-count // workers)
    jobs = [(key.alg, key.kid, pem, start + s, min(step, count - s), now)
            for s in range(0, count, step)]
    with ProcessPoolExecutor(workers) as pool:
        return [t for batch in pool.map(_sign_batch, jobs) for t in batch]


class Case:
    """One measured function and its inputs, with a cursor that survives between slices: the
    cache-miss case must keep cycling through more tokens than the cache holds (restarting at
    token 0 every slice would turn misses into hits)."""

    def __init__(self, alg: str, name: str, fn: Callable[[Any], object], tokens: list[Any]):
        self.alg, self.name, self.fn, self.tokens, self.pos = alg, name, fn, tokens, 0


def measure(case: Case, seconds: float) -> float:
    """ops per CPU-second of the case, cycling through its tokens, for ``seconds`` of CPU time.

    CPU time (CLOCK_THREAD_CPUTIME_ID), not wall time: other processes on the shared machine
    steal the core, which would otherwise count against whichever case ran at that moment.
    """
    fn, tokens = case.fn, case.tokens
    count = len(tokens)
    done = 0
    i = case.pos
    clock = time.thread_time
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(200):
            fn(tokens[i])
            i += 1
            if i == count:
                i = 0
        done += 200
        now = clock()
        if now >= deadline:
            case.pos = i
            return done / (now - start)


def floor_fn(key: SigningKey) -> tuple[Callable[[Any], object], Callable[[str], Any]]:
    """The raw primitive on pre-decoded input: (verify(prepared), prepare(token))."""
    alg = key.alg
    if alg == "HS256":
        secret = key.private

        def prep_hs(tok: str) -> tuple[bytes, bytes]:
            si, _, sig = tok.rpartition(".")
            return si.encode(), pyjwt.utils.base64url_decode(sig)

        def hs(x: tuple[bytes, bytes]) -> object:
            return hmac.compare_digest(hmac.digest(secret, x[0], "sha256"), x[1])

        return hs, prep_hs
    pub = key.private.public_key()

    def prep(tok: str) -> tuple[bytes, bytes]:
        si, _, sig = tok.rpartition(".")
        raw = pyjwt.utils.base64url_decode(sig)
        if alg == "ES256":
            raw = encode_dss_signature(int.from_bytes(raw[:32], "big"),
                                       int.from_bytes(raw[32:], "big"))
        return si.encode(), raw

    if alg == "RS256":
        pad, h = padding.PKCS1v15(), hashes.SHA256()
        return (lambda x: pub.verify(x[1], x[0], pad, h)), prep
    if alg == "PS256":
        h = hashes.SHA256()
        pss = padding.PSS(mgf=padding.MGF1(h), salt_length=32)
        return (lambda x: pub.verify(x[1], x[0], pss, h)), prep
    if alg == "ES256":
        sig_alg = ec.ECDSA(hashes.SHA256())
        return (lambda x: pub.verify(x[1], x[0], sig_alg)), prep
    return (lambda x: pub.verify(x[1], x[0])), prep


def competitors(key: SigningKey) -> dict[str, Callable[[Any], object]]:
    alg = key.alg
    jwk_dict = key.public_jwk if alg != "HS256" else {"kty": "oct", "k": b64u(key.private)}
    pyjwt_key = key.private if alg == "HS256" else key.private.public_key()
    opts = {"require": ["exp", "iat", "nbf"]}

    def pyjwt_decode(tok: str) -> object:
        return pyjwt.decode(tok, pyjwt_key, algorithms=[alg], audience=AUDIENCE, issuer=ISSUER,
                            leeway=60, options=opts)  # type: ignore[arg-type]

    jose_key = jose_jwk.import_key(jwk_dict)  # type: ignore[arg-type]
    registry = jose_jwt.JWTClaimsRegistry(iss={"essential": True, "value": ISSUER},
                                          aud={"essential": True, "value": AUDIENCE},
                                          exp={"essential": True}, leeway=60)

    def joserfc_decode(tok: str) -> object:
        token = jose_jwt.decode(tok, jose_key, algorithms=[alg])
        registry.validate(token.claims)
        return token.claims

    jwc_key = jwc_jwk.JWK(**jwk_dict)
    checks = {"iss": ISSUER, "aud": AUDIENCE, "exp": None}

    def jwcrypto_decode(tok: str) -> object:
        return json.loads(jwc_jwt.JWT(jwt=tok, key=jwc_key, algs=[alg],
                                      check_claims=checks).claims)

    return {"PyJWT": pyjwt_decode, "joserfc": joserfc_decode, "jwcrypto": jwcrypto_decode}


def fastgate_verifier(key: SigningKey, cache_size: int,
                      cache: TokenCache | None = None) -> Verifier:
    if key.alg == "HS256":
        return Verifier(ISSUER, [AUDIENCE], secret=key.private, cache_size=cache_size,
                        cache=cache)
    return Verifier(ISSUER, [AUDIENCE], jwks={"keys": [key.public_jwk]},
                    algorithms=[key.alg], cache_size=cache_size, cache=cache)


def bad_signatures(tokens: list[bytes]) -> list[bytes]:
    """Each token with the next token's signature: the right length for the key (so the
    signature math runs), wrong for this signing input."""
    sigs = [t.rpartition(b".")[2] for t in tokens]
    return [t.rpartition(b".")[0] + b"." + sigs[(i + 1) % len(sigs)]
            for i, t in enumerate(tokens)]


def run_speed(algs: list[str], seconds: float,
              slices: int) -> dict[str, dict[str, dict[str, float]]]:
    now = time.time()
    cases: list[Case] = []
    checks: list[tuple[str, Verifier, Verifier, int]] = []
    w3_checks: list[tuple[str, Verifier, Verifier, int]] = []
    for alg in algs:
        key = generate(alg)
        print(f"minting {MISS_TOKENS} {alg} tokens ...", file=sys.stderr, flush=True)
        tokens = mint(key, MISS_TOKENS, now)
        # the verify path gets bytes, as the data plane hands it a header value
        btokens = [t.encode() for t in tokens]
        miss = fastgate_verifier(key, MISS_CACHE)
        hit = fastgate_verifier(key, 100_000)
        hit_tokens = btokens[:HIT_TOKENS]
        for t in hit_tokens:
            assert hit.verify(t).ok
        r = fastgate_verifier(key, 0).verify(btokens[0])
        assert r.ok, (alg, r)
        floor, prep = floor_fn(key)
        prepared = [prep(t) for t in tokens]  # the same tokens as the miss case
        cases.append(Case(alg, "floor", floor, prepared))
        cases.append(Case(alg, "miss", miss.verify, btokens))
        cases.append(Case(alg, "hit", hit.verify, hit_tokens))
        checks.append((alg, miss, hit, len(hit_tokens)))
        # W3: bad signatures. Fresh: 5,000 distinct bad tokens cycled through a negative map
        # that holds at most 1,000 (cleared when full), so no token is ever still there when it
        # comes round again. Replayed: 1,000 bad tokens, answered by the negative cache.
        bad = bad_signatures(btokens)
        fresh = fastgate_verifier(key, 0, TokenCache(MISS_CACHE, negative_entries=MISS_CACHE))
        replay = fastgate_verifier(key, 100_000)
        bad_replay = bad[:HIT_TOKENS]
        for t in bad_replay:
            assert replay.verify(t).reason is Reason.SIGNATURE_INVALID
        assert fresh.verify(bad[0]).reason is Reason.SIGNATURE_INVALID
        cases.append(Case(alg, "bad_fresh", fresh.verify, bad[1:]))
        cases.append(Case(alg, "bad_replay", replay.verify, bad_replay))
        w3_checks.append((alg, fresh, replay, len(bad_replay)))
        for name, fn in competitors(key).items():
            fn(tokens[0])  # fails loudly if a library rejects a valid token
            cases.append(Case(alg, name, fn, tokens[:HIT_TOKENS]))
    # Fine interleaving: each case runs in short slices, round-robin with the other cases of
    # its algorithm. Noise from other processes comes in bursts, so neighbouring slices of the
    # cases being compared see the same machine. Reported: the best slice (the quiet machine,
    # as timeit's min) and the median slice (the typical shared machine).
    rates: dict[str, dict[str, list[float]]] = {alg: {} for alg in algs}
    slice_seconds = seconds / slices
    for alg in algs:
        print(f"measuring {alg} ...", file=sys.stderr, flush=True)
        mine = [c for c in cases if c.alg == alg]
        for _ in range(slices):
            for case in mine:
                rates[alg].setdefault(case.name, []).append(measure(case, slice_seconds))
    for alg, miss, hit, warm in checks:
        # the two fastgate cases measured what they claim to
        assert miss.cache.hits == 0, (alg, miss.cache)  # warm-up only used the 2nd verifier
        assert hit.cache.misses == warm, (alg, hit.cache)
    for alg, fresh, replay, warm in w3_checks:
        assert fresh.cache.negative_hits == 0, (alg, fresh.cache)
        assert replay.cache.misses == warm and replay.cache.negative_hits > 0, (alg, replay.cache)
    return {
        "best": {alg: {name: max(values) for name, values in by_name.items()}
                 for alg, by_name in rates.items()},
        "median": {alg: {name: statistics.median(values) for name, values in by_name.items()}
                   for alg, by_name in rates.items()},
    }


def statm_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(path: str) -> None:
    """Runs in a fresh interpreter: RSS delta of a cache filled with 100 000 RS256 tokens."""
    blob = Path(path).read_bytes()
    spans = []
    start = 0
    for line_end in range(MEMORY_TOKENS):
        end = blob.index(b"\n", start)
        spans.append((start, end))
        start = end + 1
        del line_end
    key_doc = json.loads(Path(path + ".jwks").read_text())
    v = Verifier(ISSUER, [AUDIENCE], jwks=key_doc, cache_size=MEMORY_TOKENS)
    gc.collect()
    before = statm_rss()
    now = float(Path(path + ".now").read_text())
    for a, b in spans:
        # a fresh bytes object per request, as the data plane would hand over
        r = v.verify(blob[a:b], now=now)
        assert r.ok, r
    gc.collect()
    after = statm_rss()
    assert len(v.cache) == MEMORY_TOKENS
    hits = sum(v.verify(blob[a:b], now=now).cached for a, b in spans[:1000])
    assert hits == 1000
    avg = sum(b - a for a, b in spans) / len(spans)
    print(json.dumps({"delta": after - before, "avg_token_bytes": avg}))


def run_memory() -> dict[str, float]:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "rs256-100k.tokens"
    if not path.exists() or not (OUT / "rs256-100k.tokens.jwks").exists():
        print(f"minting {MEMORY_TOKENS} RS256 tokens once (cached in {path}) ...",
              file=sys.stderr, flush=True)
        key = generate("RS256")
        now = time.time()
        tokens = mint(key, MEMORY_TOKENS, now)
        path.write_text("\n".join(tokens) + "\n")
        Path(str(path) + ".jwks").write_text(json.dumps({"keys": [key.public_jwk]}))
        Path(str(path) + ".now").write_text(repr(now))
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def table(best: dict[str, dict[str, float]]) -> str:
    ref = best.get("RS256", {}).get("PyJWT")
    lines = [
        "| alg | floor (cryptography) | fastgate miss | fastgate hit | PyJWT | joserfc | "
        "jwcrypto | miss/floor | miss/PyJWT | hit/PyJWT-RS256 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for alg, row in best.items():
        hit_ratio = f"{row['hit'] / ref:.0f}x" if ref else "n/a"
        lines.append(
            f"| {alg} | {row['floor']:,.0f} | {row['miss']:,.0f} | {row['hit']:,.0f} | "
            f"{row['PyJWT']:,.0f} | {row['joserfc']:,.0f} | {row['jwcrypto']:,.0f} | "
            f"{row['miss'] / row['floor']:.2f} | {row['miss'] / row['PyJWT']:.1f}x | {hit_ratio} |"
        )
    return "\n".join(lines)


def w3_table(rates: dict[str, dict[str, float]]) -> str:
    lines = [
        "| alg | fastgate bad signature, fresh | fastgate bad signature, replayed "
        "(negative cache) | replayed/fresh |",
        "|---|---:|---:|---:|",
    ]
    for alg, row in rates.items():
        if "bad_fresh" in row and "bad_replay" in row:
            lines.append(f"| {alg} | {row['bad_fresh']:,.0f} | {row['bad_replay']:,.0f} | "
                         f"{row['bad_replay'] / row['bad_fresh']:.0f}x |")
    return "\n".join(lines)


def write_json(path: Path, args: argparse.Namespace,
               results: dict[str, dict[str, dict[str, float]]],
               memory: dict[str, float] | None) -> None:
    """The document benchmarks/report.py reads (``load_verify``): rates by slice, alg, case."""
    doc = {
        "date": time.strftime("%Y-%m-%d"),
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "memory_child")},
        "rates": results,
        "memory": None if memory is None else {**memory, "tokens": MEMORY_TOKENS},
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="CPU seconds per case (split into slices)")
    parser.add_argument("--slices", type=int, default=20,
                        help="interleaved slices per case; the median slice is reported")
    parser.add_argument("--algs", default=",".join(ALGS))
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the results as JSON (for benchmarks/report.py)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    results = run_speed(args.algs.split(","), args.seconds, args.slices)
    memory = None if args.no_memory else run_memory()
    print(f"`python benchmarks/verify.py --seconds {args.seconds:g} --slices {args.slices}` "
          f"(Python {sys.version.split()[0]}, {os.cpu_count()} CPUs)\n")
    print("Best slice (ops per CPU-second; quiet machine):\n")
    print(table(results["best"]))
    print("\nMedian slice (ops per CPU-second; typical shared machine):\n")
    print(table(results["median"]))
    print("\nW3, bad signatures (ops per CPU-second; best, then median):\n")
    print(w3_table(results["best"]))
    print()
    print(w3_table(results["median"]))
    if memory:
        mib = memory["delta"] / 2**20
        print(f"\nRSS delta of {MEMORY_TOKENS:,} cached RS256 tokens "
              f"(avg {memory['avg_token_bytes']:.0f} bytes, 8 claims): **{mib:.1f} MiB** "
              f"({memory['delta'] / MEMORY_TOKENS:,.0f} bytes per entry)")
    if args.json:
        write_json(args.json, args, results, memory)
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
