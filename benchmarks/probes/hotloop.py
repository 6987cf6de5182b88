"""The verifier's miss path in a hot loop, for comparison with the running gateway.

    taskset -c 1 python benchmarks/probes/hotloop.py --jwks jwks.json --tokens w2.txt \
        --issuer ISS --audience AUD --cache 1000 --seconds 5 [--pollute KIB] [--gc MODE]

An ``IssuerSet`` over one ``Verifier`` and a ``TokenCache(--cache)``, as the gateway builds for
a route; the tokens are cycled so that (with 20,000 tokens and a 1,000-entry cache) every call
is a miss: full verify + LRU insert + eviction. Each call is timed with perf_counter exactly as
the gateway times its verifies (``fastgate_verify_duration_seconds``); also reported: process
CPU per call, and GC collections in the loop. ``--pollute KIB``: between two verifies, copy a
KIB/2 buffer over another (memcpy: touches KIB of memory, evicting about that much of the CPU
caches, standing in for the rest of a request), outside the timed region. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from fastgate import Verifier
from fastgate.token._verify import IssuerSet, TokenCache


def _request_work(net: bool):  # type: ignore[no-untyped-def]
    """One request's worth of unrelated code: parse a head, build headers, a JSON body."""
    import socket

    import httptools

    pair = None
    if net:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        c = socket.create_connection(lsock.getsockname())
        s, _ = lsock.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pair = (c, s)

    class P:
        def __init__(self) -> None:
            self.headers: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

    def work(tok: str) -> None:
        pr = P()
        parser = httptools.HttpRequestParser(pr)
        parser.feed_data(b"GET /api/bench HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                         b"User-Agent: wrk\r\nAuthorization: Bearer " + tok.encode()
                         + b"\r\nAccept: */*\r\n\r\n")
        h = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in pr.headers}
        out = [f"{k}: {v}\r\n" for k, v in h.items() if k != "authorization"]
        out.append(f"x-user-id: {tok[-12:]}\r\n")
        head = ("GET /api/bench HTTP/1.1\r\n" + "".join(out) + "\r\n").encode("latin-1")
        body = json.dumps({"ok": True, "n": len(head)}).encode()
        json.loads(body)
        resp = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body
        if pair is not None:
            pair[0].sendall(head)
            pair[1].recv(65536)
            pair[1].sendall(resp)
            pair[0].recv(65536)

    return work


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jwks", type=Path, required=True)
    p.add_argument("--tokens", type=Path, required=True)
    p.add_argument("--issuer", required=True)
    p.add_argument("--audience", required=True)
    p.add_argument("--cache", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--offset", type=int, default=1000)
    p.add_argument("--pollute", type=int, default=0, help="KiB touched between verifies")
    p.add_argument("--interleave", type=int, default=0,
                   help="between verifies, N rounds of request-like Python work (httptools "
                        "parse of a request head, dict/str/bytes handling, json): the code "
                        "footprint of the rest of a request, outside the timed region")
    p.add_argument("--net", action="store_true",
                   help="with --interleave: each round also sends ~300 bytes over a loopback "
                        "TCP connection and reads them back (the kernel's TCP path)")
    p.add_argument("--skip-verify", action="store_true",
                   help="run only the --interleave work (its cost alone, for comparison)")
    p.add_argument("--gc", choices=("normal", "disable", "freeze"), default="normal")
    a = p.parse_args()
    tokens = [t for t in a.tokens.read_text().splitlines() if t]
    v = Verifier(issuer=a.issuer, audiences=[a.audience], jwks=json.loads(a.jwks.read_text()),
                 algorithms=["RS256"], cache_size=0)
    cache = TokenCache(a.cache)
    iset = IssuerSet([v], cache)
    half = a.pollute * 512
    src, dst = memoryview(bytes(half)), bytearray(half + 256)
    view = memoryview(dst)
    work = _request_work(a.net) if a.interleave else None
    gens = [[0, 0.0] for _ in range(3)]
    t0 = [0.0]

    def cb(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            t0[0] = time.perf_counter()
        else:
            gens[info["generation"]][0] += 1
            gens[info["generation"]][1] += time.perf_counter() - t0[0]

    if a.gc == "disable":
        gc.disable()
    elif a.gc == "freeze":
        gc.freeze()
    gc.callbacks.append(cb)
    n = len(tokens)
    i = a.offset % n
    # warm up one cache's worth
    for _ in range(a.cache + 100):
        iset.verify(tokens[i])
        i = (i + 1) % n
    hits0 = cache.hits
    timed = 0.0
    calls = 0
    pc = time.perf_counter
    cpu0, wall0 = time.process_time(), pc()
    deadline = wall0 + a.seconds
    while True:
        tok = tokens[i]
        i = (i + 1) % n
        calls += 1
        if not a.skip_verify:
            began = pc()
            r = iset.verify(tok)
            timed += pc() - began
            if not r.ok:
                raise SystemExit(f"token rejected: {r.reason}")
        if work is not None:
            for _ in range(a.interleave):
                work(tok)
        if half:
            view[calls & 255:(calls & 255) + half] = src
        if calls % 64 == 0 and pc() > deadline:
            break
    cpu = time.process_time() - cpu0
    wall = pc() - wall0
    print(json.dumps({"calls": calls, "timed_us": timed / calls * 1e6,
                      "cpu_us": cpu / calls * 1e6, "wall_us": wall / calls * 1e6,
                      "hits": cache.hits - hits0, "pollute_kib": a.pollute, "gc": a.gc,
                      "interleave": a.interleave, "net": a.net, "skip_verify": a.skip_verify,
                      "gc_gens": gens}))


if __name__ == "__main__":
    main()
