"""Locust load for fastgate with W1-style traffic: valid RS256 tokens, reused.

The tokens are the ones benchmarks/e2e.py mints (one per line), so run that once first:

    python benchmarks/e2e.py --targets direct --workloads W1 --duration 1   # mints tokens
    FASTGATE_TOKENS=benchmarks/out/e2e/w1.txt \
        locust -f benchmarks/locustfile.py --headless -u 64 -r 64 -t 30s \
        --host http://127.0.0.1:8080

Environment: FASTGATE_TOKENS (token file, default benchmarks/out/e2e/w1.txt),
FASTGATE_PATH (request path, default /api/bench), FASTGATE_EXPECT (expected status,
default 200; use 401 with the W3 file). Locust is in the `bench` extra; wrk (benchmarks/e2e.py)
is the tool for the numbers in RESULTS.md - Locust's Python client saturates long before a
gateway does, so use it for mixed scenarios and soak runs, not peak req/s.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import FastHttpUser, constant, task

_DEFAULT_TOKENS = Path(__file__).resolve().parent / "out" / "e2e" / "w1.txt"
TOKENS_FILE = Path(os.environ.get("FASTGATE_TOKENS", str(_DEFAULT_TOKENS)))
PATH = os.environ.get("FASTGATE_PATH", "/api/bench")
EXPECT = int(os.environ.get("FASTGATE_EXPECT", "200"))


def _load_tokens() -> list[str]:
    try:
        tokens = [line.strip() for line in TOKENS_FILE.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise SystemExit(f"cannot read FASTGATE_TOKENS={TOKENS_FILE}: {exc}; "
                         "run benchmarks/e2e.py once to mint the token files") from exc
    if not tokens:
        raise SystemExit(f"no tokens in {TOKENS_FILE}")
    return tokens


TOKENS = _load_tokens()  # read once per process, shared by every simulated user


class W1User(FastHttpUser):
    """One client that keeps cycling through the shared token set (tokens are reused)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self._i = random.randrange(len(TOKENS))  # users do not march in lockstep

    @task
    def get(self) -> None:
        self._i = (self._i + 1) % len(TOKENS)
        headers = {"Authorization": f"Bearer {TOKENS[self._i]}"}
        with self.client.get(PATH, headers=headers, name="W1 " + PATH,
                             catch_response=True) as resp:
            if resp.status_code != EXPECT:
                resp.failure(f"status {resp.status_code}, expected {EXPECT}")
            else:
                resp.success()
