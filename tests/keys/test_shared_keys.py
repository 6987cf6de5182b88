"""One JWKS fetch per host (SPEC §5 keys, fastgate/keys/sharedkeys.py): real ``fastgate run``
processes with 1 and 3 workers against the breakable loopback IdP (tests/idp.py) on its own
thread, counting the IdP's requests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from tests.factory import AUDIENCE, SigningKey, default_claims, generate, make_token
from tests.idp import IdP, free_port
from tests.ops.test_supervisor import (
    REPO,
    Fastgate,
    ThreadedUpstream,
    config,
    get,
    poll,
    value,
    write,
)
from tests.ops.test_supervisor import launch as launch
from tests.ops.test_supervisor import upstream as upstream

T = TypeVar("T")
K1 = generate("RS256", kid="shared-k1")
K2 = generate("RS256", kid="shared-k2")
INTERVAL = 2.0  # min_refresh_interval of the configs here


class ThreadedIdP:
    """The IdP on its own event loop thread: it answers while the test thread blocks."""

    def __init__(self, port: int = 0) -> None:
        self.loop = uvloop.new_event_loop()
        self.idp = IdP(port=port)
        self.idp.set_keys(K1)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def do(self, fn: Callable[[], T]) -> T:
        async def inner() -> T:
            return fn()
        return self.call(inner())

    def start(self) -> None:
        self.call(self.idp.start())

    def stop(self) -> None:
        self.call(self.idp.stop())

    def hits(self) -> int:
        """Discovery and JWKS requests so far."""
        return self.do(lambda: sum(self.idp.hits.values()))

    def jwks_hits(self) -> int:
        return self.do(lambda: self.idp.hits["/jwks"])

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def idp() -> Iterator[ThreadedIdP]:
    server = ThreadedIdP()
    server.start()
    try:
        yield server
    finally:
        server.close()


def providers(idp: ThreadedIdP, **cache: Any) -> dict[str, Any]:
    return {"idp": {"issuer": idp.idp.issuer, "discovery": True, "audiences": [AUDIENCE],
                    "jwks_cache": {"ttl": "1h", "min_ttl": "1s",
                                   "min_refresh_interval": f"{INTERVAL:g}s",
                                   "max_stale": "24h", "timeout": "2s", **cache}}}


def tok(idp: ThreadedIdP, key: SigningKey = K1, **over: Any) -> str:
    claims = default_claims(now=time.time(), scope="orders:read", iss=idp.idp.issuer)
    return make_token(key, claims, **over)


def start(launch: Callable[..., Fastgate], idp: ThreadedIdP, workers: int,
          **cache: Any) -> Fastgate:
    return launch(workers=workers, access_log=False, top={"providers": providers(idp, **cache)})


def ok_on_every_worker(fg: Fastgate, token: str, workers: int, timeout: float = 15.0) -> None:
    """Every worker accepts ``token`` (fresh connections spread over the workers; each answer
    names no worker, so the check is: many fresh connections, all 200)."""
    deadline = time.monotonic() + timeout
    good = 0
    while good < 10 * workers:
        status, _body, _h = get(fg.port, "/api/x", token)
        good = good + 1 if status == 200 else 0
        if time.monotonic() > deadline:
            pytest.fail(f"not every worker accepts the token within {timeout}s "
                        f"(last {status}){fg.why()}")


# ---------------------------------------------------------------------------------------------


def test_idp_load_is_the_same_for_one_and_three_workers(
        launch: Callable[..., Fastgate], idp: ThreadedIdP) -> None:
    # The JWKS says max-age 1: a scheduled refresh every 0.75-0.85 s (min_ttl 1 s), so the
    # window has several refreshes to count, not only the first fetch.
    idp.do(lambda: setattr(idp.idp, "max_age", 1))
    counts, discovery = {}, {}
    for workers in (1, 3):
        idp.do(idp.idp.hits.clear)
        fg = launch(workers=workers, access_log=False, top={"providers": providers(idp)})
        ok_on_every_worker(fg, tok(idp), workers)
        before = idp.hits()
        time.sleep(4.0)
        counts[workers] = idp.hits() - before
        discovery[workers] = idp.do(lambda: idp.idp.hits["/.well-known/openid-configuration"])
        fg.signal(signal.SIGTERM)
        fg.proc.wait(20)
    assert discovery == {1: 1, 3: 1}, discovery
    # 4-6 refreshes in 4 s for the host, whatever the worker count (jitter moves one or two
    # across the window's edges); one fetch per worker would be about 3x.
    assert counts[1] >= 4, counts
    assert counts[3] <= counts[1] + 2, counts


def test_kid_miss_flood_costs_one_refetch_and_every_worker_gets_the_new_kid(
        launch: Callable[..., Fastgate], idp: ThreadedIdP) -> None:
    fg = start(launch, idp, 3)
    ok_on_every_worker(fg, tok(idp), 3)
    time.sleep(INTERVAL)  # outside the start-up fetch's shadow: the budget is whole
    before = idp.jwks_hits()
    # A flood of random kids on fresh connections (spread over the 3 workers): 1 refetch.
    for i in range(60):
        status, _b, _h = get(fg.port, "/api/x", tok(idp, kid=f"random-{i}"))
        assert status == 401, fg.why()
    assert idp.jwks_hits() - before <= 1, fg.why()
    # The IdP rotates; the next interval's first miss refetches once and all workers accept.
    idp.do(lambda: idp.idp.set_keys(K1, K2))
    time.sleep(INTERVAL)
    before = idp.jwks_hits()
    ok_on_every_worker(fg, tok(idp, K2), 3)
    assert idp.jwks_hits() - before == 1, fg.why()


def test_killed_worker_is_replaced_without_an_idp_request(
        launch: Callable[..., Fastgate], idp: ThreadedIdP) -> None:
    fg = start(launch, idp, 3)
    ok_on_every_worker(fg, tok(idp), 3)
    before = idp.hits()
    old = fg.workers()
    victim = sorted(old)[0]
    os.kill(victim, signal.SIGKILL)
    poll("the worker replaced", lambda: len(fg.workers() - {victim}) == 3, 20, fg.why)
    fg.wait_ready()
    ok_on_every_worker(fg, tok(idp), 3)
    assert idp.hits() == before, fg.why()
    # Its live key gauge came back with the replacement: the min over workers has keys.
    assert value(fg.scrape(), "fastgate_jwks_keys", provider="idp") == 1.0, fg.why()
    s = fg.scrape()
    assert value(s, "fastgate_jwks_fetches_total", provider="idp", result="success") == 1.0


def test_rotation_reaches_every_worker(launch: Callable[..., Fastgate],
                                       idp: ThreadedIdP) -> None:
    # A scheduled refresh (max-age 1 -> min_ttl 1 s) carries the rotation to every worker:
    # no worker needs its own miss or fetch.
    idp.do(lambda: setattr(idp.idp, "max_age", 1))
    fg = start(launch, idp, 3)
    ok_on_every_worker(fg, tok(idp), 3)
    idp.do(lambda: idp.idp.set_keys(K2))
    time.sleep(2.0)
    poll("K1 rejected", lambda: get(fg.port, "/api/x", tok(idp))[0] == 401, 10, fg.why)
    ok_on_every_worker(fg, tok(idp, K2), 3)
    for _ in range(30):
        assert get(fg.port, "/api/x", tok(idp))[0] == 401, fg.why()


def test_idp_down_at_start_then_recovery(launch: Callable[..., Fastgate],
                                         upstream: ThreadedUpstream,
                                         tmp_path: Path) -> None:
    down = ThreadedIdP(port=free_port())
    try:
        port, admin = free_port(), free_port()
        cfg_path = tmp_path / "gateway.yaml"
        cfg = {**config(upstream, port, admin, tmp_path, workers=3, access_log=False),
               "providers": providers(down)}
        write(cfg_path, cfg)
        err = tmp_path / "stderr.log"
        with open(err, "wb") as errf:
            proc = subprocess.Popen([sys.executable, "-m", "fastgate", "run", "-c",
                                     str(cfg_path)], cwd=REPO, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=errf,
                                    start_new_session=True)
        fg = Fastgate(proc, port, admin, err, cfg_path, tmp_path)
        try:
            poll("workers up", lambda: len(fg.workers()) == 3, 20, fg.why)
            time.sleep(1.0)
            assert fg.admin_get("/readyz")[0] == 503, fg.why()
            down.start()
            fg.wait_ready(20)
            ok_on_every_worker(fg, tok(down), 3)
            # Discovery + JWKS once for the host (cold-start retries were refused connects).
            assert down.do(lambda: dict(down.idp.hits)) == {
                "/.well-known/openid-configuration": 1, "/jwks": 1}, fg.why()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
    finally:
        down.close()


def test_reload_with_a_changed_provider_switches_every_worker(
        launch: Callable[..., Fastgate], idp: ThreadedIdP, upstream: ThreadedUpstream) -> None:
    fg = start(launch, idp, 3)
    ok_on_every_worker(fg, tok(idp), 3)
    before = idp.hits()
    # The same IdP by jwks_uri instead of discovery: a new key set id in the master.
    cfg = config(upstream, fg.port, fg.admin, fg.tmp, workers=3, access_log=False)
    prov = providers(idp)
    del prov["idp"]["discovery"]
    prov["idp"]["jwks_uri"] = idp.idp.jwks_url
    cfg["providers"] = prov
    write(fg.config_path, cfg)
    fg.signal(signal.SIGHUP)
    poll("reloaded", lambda: value(fg.scrape(), "fastgate_config_reloads_total",
                                   result="success") == 1, 15, fg.why)
    ok_on_every_worker(fg, tok(idp), 3)
    assert idp.jwks_hits() >= 2
    assert idp.hits() - before == 1, fg.why()  # the new source's one JWKS fetch

