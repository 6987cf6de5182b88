"""``fastgate run`` as an operator runs it: real processes, signals and scrapes (SPEC §7, §8).

Every test starts ``python -m fastgate run -c FILE`` (its own session, so teardown can kill
the master and its workers with one ``killpg`` even when a test fails) on ephemeral loopback
ports in front of a real aiohttp echo upstream that runs on its own thread, so it answers
whatever the test thread is doing. Tokens are RS256 from tests/factory.py with an inline JWKS.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fastgate.token.reasons import REJECT_REASONS
from tests.factory import AUDIENCE, ISSUER, default_claims, generate, jwks_of, key_for, make_token
from tests.gateway_fixtures import EchoUpstream, Loop, dead_port

REPO = Path(__file__).resolve().parents[2]
DRAIN = 5.0  # drain_timeout of every config here
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------


class ThreadedUpstream:
    """The echo upstream on its own event loop thread."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.server = self.loop.run_until_complete(EchoUpstream.start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return self.server.url

    def count(self, predicate: Callable[[str], bool] = lambda _t: True) -> int:
        return sum(1 for r in list(self.server.records) if predicate(r.target))

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadedUpstream]:
    up = ThreadedUpstream()
    try:
        yield up
    finally:
        up.close()


KEY = key_for("RS256")


def token(**claims: Any) -> str:
    base = default_claims(now=time.time(), scope="orders:read")
    base.update(claims)
    return make_token(KEY, {k: v for k, v in base.items() if v is not None})


def config(upstream: ThreadedUpstream, port: int, admin: int, tmp: Path, *, workers: int = 2,
           user_header: str = "X-User-A", extra_route: bool = False,
           access_log: bool = True) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {"name": "api", "match": {"path_prefix": "/api/"}, "upstream": "echo",
         "auth": {"providers": ["idp"], "scopes": {"all": ["orders:read"]},
                  "claim_headers": {user_header: "sub"}}},
        {"name": "public", "match": {"path_prefix": "/public/"}, "upstream": "echo",
         "auth": "none"},
    ]
    if extra_route:
        routes.append({"name": "extra", "match": {"path_prefix": "/extra/"},
                       "upstream": "echo", "auth": "none"})
    return {
        "listen": f"127.0.0.1:{port}",
        "admin": f"127.0.0.1:{admin}",
        "workers": workers,
        "drain_timeout": f"{DRAIN:g}s",
        "access_log": ({"enabled": True, "path": str(tmp / "access.log")} if access_log
                       else {"enabled": False}),
        "upstreams": {"echo": {"url": upstream.url}},
        "providers": {"idp": {"issuer": ISSUER, "jwks": jwks_of(KEY),
                              "audiences": [AUDIENCE]}},
        "routes": routes,
    }


def write(path: Path, data: dict[str, Any] | str) -> None:
    """Replace the file atomically (as a config-management tool would)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


@dataclass
class Fastgate:
    proc: subprocess.Popen[bytes]
    port: int
    admin: int
    stderr_path: Path
    config_path: Path
    tmp: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def why(self) -> str:
        return f"\n--- fastgate stderr ---\n{self.stderr()[-4000:]}"

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def admin_get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"fastgate exited with {self.proc.returncode}{self.why()}")
            with contextlib.suppress(OSError):
                status, body = self.admin_get("/readyz")
                last = f"{status} {body!r}"
                if status == 200:
                    return
            time.sleep(0.05)
        pytest.fail(f"/readyz not 200 within {timeout}s ({last}){self.why()}")

    def scrape(self) -> Samples:
        status, body = self.admin_get("/metrics")
        assert status == 200, body
        out: Samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def workers(self) -> set[int]:
        """Pids of the worker processes (children of the master running a worker)."""
        pids = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid and b"fastgate.ops.supervisor" in (
                        entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
        return pids

    def access_lines(self) -> list[dict[str, Any]]:
        path = self.tmp / "access.log"
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


@pytest.fixture
def launch(tmp_path: Path, upstream: ThreadedUpstream) -> Iterator[Callable[..., Fastgate]]:
    started: list[Fastgate] = []

    def start(*, cli_workers: int | None = None, args: tuple[str, ...] = (),
              top: dict[str, Any] | None = None, **kw: Any) -> Fastgate:
        port, admin = dead_port(), dead_port()
        cfg_path = tmp_path / "gateway.yaml"
        write(cfg_path, {**config(upstream, port, admin, tmp_path, **kw), **(top or {})})
        argv = [sys.executable, "-m", "fastgate", "run", "-c", str(cfg_path), *args]
        if cli_workers is not None:
            argv += ["--workers", str(cli_workers)]
        err = tmp_path / "stderr.log"
        with open(err, "wb") as errf:
            proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=errf,
                                    start_new_session=True)  # its own group: killpg below
        fg = Fastgate(proc, port, admin, err, cfg_path, tmp_path)
        started.append(fg)
        fg.wait_ready()
        return fg

    try:
        yield start
    finally:
        for fg in started:
            if fg.proc.poll() is None:
                fg.signal(signal.SIGTERM)  # graceful: the master removes its metric files
                with contextlib.suppress(subprocess.TimeoutExpired):
                    fg.proc.wait(3)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(fg.proc.pid, signal.SIGKILL)  # whatever is left of the group
            fg.proc.wait(10)


def get(port: int, path: str, tok: str | None = None, *, close: bool = True
        ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
    """One request on a fresh connection: status, JSON body (or None) and headers."""
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    if close:
        headers["Connection"] = "close"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    parsed = orjson.loads(body) if body and "json" in hdrs.get("content-type", "") else None
    return resp.status, parsed, hdrs


def echoed(body: dict[str, Any] | None, name: str) -> list[str]:
    """Values of header ``name`` the upstream received (from the echo body)."""
    assert body is not None
    return [v for n, v in body["headers"] if n.lower() == name.lower()]


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def poll(what: str, check: Callable[[], bool], timeout: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout}s{why()}")


def reloads(fg: Fastgate) -> tuple[float, float]:
    s = fg.scrape()
    return (value(s, "fastgate_config_reloads_total", result="success"),
            value(s, "fastgate_config_reloads_total", result="failure"))


# ---------------------------------------------------------------------------------------------
# 1. One scrape reports every worker, exactly
# ---------------------------------------------------------------------------------------------


def test_two_workers_scrape_adds_up_exactly(launch: Callable[..., Fastgate],
                                            upstream: ThreadedUpstream) -> None:
    # The config says 1 worker; --workers overrides it.
    fg = launch(workers=1, cli_workers=2)
    assert len(fg.workers()) == 2, fg.why()
    before = upstream.count()
    other = generate("RS256", kid=KEY.kid)  # same kid, other key: signature_invalid
    Step = tuple[str, str | None, int]
    plan: list[Step] = (
        list[Step]([("/api/orders", token(), 200)]) * 12
        + [("/api/orders", None, 401)] * 5  # token_missing
        + [("/api/orders", token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
            401)] * 4  # token_expired
        + [("/api/orders", make_token(other, default_claims(now=time.time(),
                                                             scope="orders:read")), 401)] * 3
        + [("/api/orders", token(scope="orders:write"), 403)] * 3  # insufficient_scope
        + [("/nowhere", None, 404)] * 4
        + [("/public/x", None, 200)] * 5
    )
    for path, tok, want in plan:  # a fresh connection each: the kernel spreads them
        status, body, _ = get(fg.port, path, tok)
        assert status == want, (path, body)
    total = len(plan)
    assert upstream.count() - before == 12 + 5  # rejects never reached it

    expected_requests = {("api", "2xx"): 12, ("api", "4xx"): 15, ("public", "2xx"): 5,
                         ("_none", "4xx"): 4}
    expected_rejects = {("api", "token_missing"): 5, ("api", "token_expired"): 4,
                        ("api", "signature_invalid"): 3, ("api", "insufficient_scope"): 3}

    def requests_sum() -> float:
        return sum(series(fg.scrape(), "fastgate_requests_total").values())

    # Workers flush their counts every second; wait until all of them are in.
    poll(f"fastgate_requests_total sums to {total}", lambda: requests_sum() == total, 10,
         fg.why)
    time.sleep(1.2)  # one more flush interval: nothing may be counted twice
    s = fg.scrape()
    for route in ("api", "public", "_none"):
        for cls in STATUS_CLASSES:
            assert value(s, "fastgate_requests_total", route=route, status_class=cls) == \
                expected_requests.get((route, cls), 0), (route, cls)
        assert value(s, "fastgate_request_duration_seconds_count", route=route) == sum(
            v for (r, _c), v in expected_requests.items() if r == route), route
        for reason in REJECT_REASONS:
            assert value(s, "fastgate_rejects_total", route=route, reason=reason.label) == \
                expected_rejects.get((route, reason.label), 0), (route, reason.label)
    assert sum(series(s, "fastgate_rejects_total").values()) == 15
    assert value(s, "fastgate_config_reloads_total", result="success") == 0

    # Both workers served (the access log names the worker of each line).
    poll("every request in the access log", lambda: len(fg.access_lines()) == total, 5,
         fg.why)
    lines = fg.access_lines()
    assert {line["worker"] for line in lines} == {0, 1}
    assert sorted(line["status"] for line in lines) == sorted(w for _p, _t, w in plan)


# ---------------------------------------------------------------------------------------------
# 2. Reload under continuous load: no failed request, the new config is served
# ---------------------------------------------------------------------------------------------


@dataclass
class LoadStats:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    # (sent at, answered at, user header): a request sent just before a SIGHUP may be
    # answered on the new config, so windows are judged by both ends.
    seen: list[tuple[float, float, str]] = field(default_factory=list)


async def _client(session: aiohttp.ClientSession, port: int, tok: str, stats: LoadStats,
                  stop: asyncio.Event) -> None:
    url = f"http://127.0.0.1:{port}/api/load"
    headers = {"Authorization": f"Bearer {tok}"}
    while not stop.is_set():
        sent = time.monotonic()
        try:
            async with session.get(url, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    stats.failures.append(f"status {resp.status}: {body[:200]!r}")
                    continue
                names = {n.lower() for n, _v in orjson.loads(body)["headers"]}
                letter = "".join(c for c in "ABC" if f"x-user-{c.lower()}" in names)
                stats.seen.append((sent, time.monotonic(), letter))
                stats.ok += 1
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            stats.failures.append(f"{type(exc).__name__}: {exc}")


def test_reload_under_load_drops_nothing(launch: Callable[..., Fastgate],
                                         tmp_path: Path, upstream: ThreadedUpstream) -> None:
    fg = launch()
    tok = token()
    stats = LoadStats()
    marks: dict[str, float] = {}

    def wait_reloads(n: int) -> None:
        poll(f"{n} successful reloads", lambda: reloads(fg)[0] == n, 10, fg.why)

    async def scenario() -> None:
        stop = asyncio.Event()
        keep = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=3))
        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        clients = [asyncio.create_task(_client(s, fg.port, tok, stats, stop))
                   for s in (keep, keep, keep, fresh, fresh, fresh)]
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(0.6)
            for step, (letter, extra) in enumerate((("B", True), ("C", True)), start=1):
                write(fg.config_path, config(upstream, fg.port, fg.admin, tmp_path,
                                             user_header=f"X-User-{letter}",
                                             extra_route=extra))
                marks[f"hup{step}"] = time.monotonic()
                fg.signal(signal.SIGHUP)
                await loop.run_in_executor(None, wait_reloads, step)
                marks[letter] = time.monotonic()  # every worker has switched by now
                await asyncio.sleep(0.8)
        finally:
            stop.set()
            await asyncio.gather(*clients)
            await keep.close()
            await fresh.close()

    runner = Loop()
    try:
        runner.run(scenario(), timeout=30)
    finally:
        runner.close()

    assert stats.failures == [], stats.failures[:10]
    assert stats.ok > 100, stats.ok
    before = [w for _t, done, w in stats.seen if done < marks["hup1"]]
    after_b = [w for t, done, w in stats.seen if marks["B"] <= t and done < marks["hup2"]]
    after_c = [w for t, _done, w in stats.seen if t >= marks["C"]]
    assert before and set(before) == {"A"}
    assert after_b and set(after_b) == {"B"}
    assert after_c and set(after_c) == {"C"}
    assert {w for _t, _d, w in stats.seen} <= {"A", "B", "C"}  # never none, never two
    # The route added by the reload is served, on fresh connections too.
    for _ in range(6):
        status, _body, _h = get(fg.port, "/extra/x")
        assert status == 200
    assert reloads(fg) == (2, 0)
    assert "configuration reloaded" in fg.stderr()


# ---------------------------------------------------------------------------------------------
# 3. An invalid reload keeps the running config
# ---------------------------------------------------------------------------------------------


def test_invalid_reload_keeps_serving(launch: Callable[..., Fastgate], tmp_path: Path,
                                      upstream: ThreadedUpstream) -> None:
    fg = launch()
    tok = token()

    # (a) Rejected by the master's validation: the workers are not touched.
    bad = config(upstream, fg.port, fg.admin, tmp_path, user_header="X-User-B")
    bad["routes"][0]["upstream"] = "nope"
    bad["drain_timeout"] = "soon"
    write(fg.config_path, bad)
    fg.signal(signal.SIGHUP)
    poll("a failed reload", lambda: reloads(fg) == (0, 1), 10, fg.why)
    err = fg.stderr()
    assert "routes[0].upstream: unknown upstream 'nope'" in err, fg.why()
    # all, one a line (each may start with the file:line:column of its node)
    assert re.search(r"\n  (\S+:\d+:\d+: )?drain_timeout: invalid duration 'soon'", err), fg.why()
    status, body, _ = get(fg.port, "/api/x", tok)
    assert status == 200 and echoed(body, "X-User-A") == ["user-1"]
    assert echoed(body, "X-User-B") == []

    # (b) Valid for the loader, but no worker can start its key source: rolled back.
    jwks = tmp_path / "jwks.json"
    jwks.write_text("this is not a JWKS")
    bad2 = config(upstream, fg.port, fg.admin, tmp_path, user_header="X-User-B")
    bad2["providers"]["idp"] = {"issuer": ISSUER, "jwks_file": str(jwks),
                                "audiences": [AUDIENCE]}
    write(fg.config_path, bad2)
    fg.signal(signal.SIGHUP)
    poll("a second failed reload", lambda: reloads(fg) == (0, 2), 10, fg.why)
    assert "jwks_file" in fg.stderr(), fg.why()
    for _ in range(6):
        status, body, _ = get(fg.port, "/api/x", tok)
        assert status == 200 and echoed(body, "X-User-A") == ["user-1"]

    # The file fixed: the next SIGHUP applies it.
    write(fg.config_path, config(upstream, fg.port, fg.admin, tmp_path, user_header="X-User-C"))
    fg.signal(signal.SIGHUP)
    poll("a successful reload", lambda: reloads(fg) == (1, 2), 10, fg.why)
    status, body, _ = get(fg.port, "/api/x", tok)
    assert status == 200 and echoed(body, "X-User-C") == ["user-1"]
    assert fg.proc.poll() is None


# ---------------------------------------------------------------------------------------------
# 4. SIGTERM drains: the in-flight request completes, new connections are refused, exit 0
# ---------------------------------------------------------------------------------------------


def test_sigterm_drains_in_flight_request(launch: Callable[..., Fastgate],
                                          upstream: ThreadedUpstream) -> None:
    fg = launch()
    tok = token()
    request = (f"GET /api/sleep/1.5 HTTP/1.1\r\nHost: gw.test\r\n"
               f"Authorization: Bearer {tok}\r\n\r\n").encode()
    slow_path = re.compile(r"/api/sleep/1\.5")

    async def scenario() -> tuple[str, bool, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", fg.port)
        try:
            writer.write(request)
            await writer.drain()
            deadline = time.monotonic() + 5
            while not upstream.count(lambda t: bool(slow_path.search(t))):
                assert time.monotonic() < deadline, "the slow request never reached upstream"
                await asyncio.sleep(0.02)
            fg.signal(signal.SIGTERM)
            t0 = time.monotonic()
            response = asyncio.create_task(reader.read())  # until the gateway closes it
            refused = False
            while time.monotonic() - t0 < 1.0 and not response.done():
                try:
                    _r, w = await asyncio.open_connection("127.0.0.1", fg.port)
                except ConnectionRefusedError:
                    refused = True
                    break
                w.close()
                await asyncio.sleep(0.02)
            refused_before_done = refused and not response.done()
            raw = await asyncio.wait_for(response, 10)
            return raw.decode("latin-1"), refused_before_done, time.monotonic() - t0
        finally:
            writer.close()

    loop = Loop()
    try:
        raw, refused_early, elapsed = loop.run(scenario(), timeout=30)
    finally:
        loop.close()
    assert raw.startswith("HTTP/1.1 200"), raw[:300] + fg.why()
    assert '"target":"/api/sleep/1.5"' in raw
    assert "connection: close" in raw.lower()  # the drain closes it after the response
    assert refused_early, "a new connection was still accepted during the drain" + fg.why()
    assert elapsed < DRAIN
    rc = fg.proc.wait(DRAIN + 5)
    assert rc == 0, fg.why()
    assert fg.workers() == set()


# ---------------------------------------------------------------------------------------------
# 5. A killed worker is replaced; its counts stay in the scrape
# ---------------------------------------------------------------------------------------------


def test_killed_worker_is_replaced(launch: Callable[..., Fastgate], tmp_path: Path,
                                   upstream: ThreadedUpstream) -> None:
    fg = launch()
    tok = token()
    first = fg.workers()
    assert len(first) == 2, fg.why()
    for _ in range(10):
        assert get(fg.port, "/api/x", tok)[0] == 200
    write(fg.config_path, config(upstream, fg.port, fg.admin, tmp_path, user_header="X-User-B"))
    fg.signal(signal.SIGHUP)
    poll("a successful reload", lambda: reloads(fg) == (1, 0), 10, fg.why)
    # Edited but not signalled: a replacement worker must run what the master runs (B).
    write(fg.config_path, config(upstream, fg.port, fg.admin, tmp_path, user_header="X-User-C"))
    time.sleep(1.3)  # a flush interval: the victim's counts are in its metric files
    victim = min(first)
    started = re.findall(r"worker (\d+): started pid (\d+)", fg.stderr())
    slot = {int(pid): int(i) for i, pid in started}[victim]
    os.kill(victim, signal.SIGKILL)
    # Once the victim's listener is closed, the survivor serves everything. (A connection
    # still queued in the victim's own accept backlog at the kill is reset: per-worker
    # SO_REUSEPORT listeners; Linux >= 5.14 hands those to a sibling listener with
    # net.ipv4.tcp_migrate_req=1.)
    poll("the killed worker's listener closed", lambda: _listeners(fg.port) == 1, 5, fg.why)
    for _ in range(20):
        status, body, _ = get(fg.port, "/api/x", tok)
        assert status == 200 and echoed(body, "X-User-B") == ["user-1"], (body, fg.why())
    poll("the worker replaced", lambda: len(fg.workers()) == 2 and victim not in fg.workers(),
         10, fg.why)
    assert f"worker {slot} (pid {victim}) was killed by SIGKILL" in fg.stderr()
    new_pid = (fg.workers() - first).pop()
    poll("the replacement listening", lambda: f"worker {slot} (pid {new_pid}): serving"
         in fg.stderr(), 10, fg.why)
    fg.wait_ready()
    start = len(fg.access_lines())
    for _ in range(30):
        status, body, _ = get(fg.port, "/api/x", tok)
        assert status == 200 and echoed(body, "X-User-B") == ["user-1"], body
    poll("the replacement serving",
         lambda: slot in {line["worker"] for line in fg.access_lines()[start:]}, 5, fg.why)
    poll("60 requests counted",
         lambda: value(fg.scrape(), "fastgate_requests_total", route="api",
                       status_class="2xx") == 60, 5, fg.why)


def _listeners(port: int) -> int:
    """Listening sockets on 127.0.0.1:port (from /proc/net/tcp; state 0A is LISTEN)."""
    local = f"0100007F:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1] == local and line.split()[3] == "0A")


# ---------------------------------------------------------------------------------------------
# 6. One worker: everything in one process
# ---------------------------------------------------------------------------------------------


def test_single_worker_admin_reload_and_stop(launch: Callable[..., Fastgate], tmp_path: Path,
                                             upstream: ThreadedUpstream) -> None:
    fg = launch(workers=1, access_log=False)
    assert fg.workers() == set()  # no worker processes
    tok = token()
    status, raw = fg.admin_get("/healthz")
    assert status == 200 and orjson.loads(raw) == {"status": "ok"}
    status, raw = fg.admin_get("/readyz")
    assert status == 200 and orjson.loads(raw) == {"status": "ready",
                                                   "providers": {"idp": True}}
    status, body, _ = get(fg.port, "/api/x", tok)
    assert status == 200 and echoed(body, "X-User-A") == ["user-1"]
    assert get(fg.port, "/api/x")[0] == 401
    s = fg.scrape()  # single process: rendered at the scrape, no flush lag
    assert value(s, "fastgate_requests_total", route="api", status_class="2xx") == 1
    assert value(s, "fastgate_rejects_total", route="api", reason="token_missing") == 1
    assert get(fg.port, "/metrics")[0] == 404  # the admin endpoints are not on the data plane

    write(fg.config_path, config(upstream, fg.port, fg.admin, tmp_path, workers=1,
                                 user_header="X-User-B", access_log=False))
    fg.signal(signal.SIGHUP)
    poll("a successful reload", lambda: reloads(fg) == (1, 0), 10, fg.why)
    status, body, _ = get(fg.port, "/api/x", tok)
    assert status == 200 and echoed(body, "X-User-B") == ["user-1"]

    write(fg.config_path, "routes: [")  # not even YAML
    fg.signal(signal.SIGHUP)
    poll("a failed reload", lambda: reloads(fg) == (1, 1), 10, fg.why)
    assert "invalid YAML" in fg.stderr()
    assert get(fg.port, "/api/x", tok)[0] == 200

    fg.signal(signal.SIGTERM)
    assert fg.proc.wait(DRAIN + 5) == 0, fg.why()


# ---------------------------------------------------------------------------------------------
# 7. A reload that removes routes while a request is in flight on one that stays
# ---------------------------------------------------------------------------------------------


def test_reload_removing_routes_keeps_in_flight_request(
        launch: Callable[..., Fastgate], tmp_path: Path, upstream: ThreadedUpstream) -> None:
    fg = launch(workers=1, extra_route=True, access_log=False)  # routes: api, public, extra

    async def scenario() -> tuple[int, bytes]:
        task = asyncio.create_task(asyncio.to_thread(get, fg.port, "/extra/sleep/1.5"))
        deadline = time.monotonic() + 5
        while not upstream.count(lambda t: t == "/extra/sleep/1.5"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        only_extra = config(upstream, fg.port, fg.admin, tmp_path, workers=1,
                            extra_route=True, access_log=False)
        only_extra["routes"] = only_extra["routes"][2:]  # index 2 -> 0
        write(fg.config_path, only_extra)
        fg.signal(signal.SIGHUP)
        status, body, _h = await task
        return status, orjson.dumps(body)

    loop = Loop()
    try:
        status, body = loop.run(scenario(), timeout=30)
    finally:
        loop.close()
    assert reloads(fg) == (1, 0), fg.why()
    assert status == 200, body
    assert value(fg.scrape(), "fastgate_requests_total", route="extra", status_class="2xx") == 1


# ---------------------------------------------------------------------------------------------
# Operational log format (log_format / --log-format)
# ---------------------------------------------------------------------------------------------

_RFC3339_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def _stop(fg: Fastgate) -> str:
    fg.signal(signal.SIGTERM)
    assert fg.proc.wait(DRAIN + 10) == 0, fg.why()
    return fg.stderr()


def test_json_logs_from_the_master_and_every_worker(launch: Callable[..., Fastgate]) -> None:
    fg = launch(workers=2, top={"log_format": "json"})
    status, _, _ = get(fg.port, "/public/x")
    assert status == 200
    lines = [line for line in _stop(fg).splitlines() if line.strip()]
    assert lines
    records = []
    for line in lines:
        record = orjson.loads(line)  # every line is one JSON object, nothing else
        assert set(record) >= {"time", "level", "logger", "message", "worker"}, line
        assert set(record) <= {"time", "level", "logger", "message", "worker", "exception"}
        assert _RFC3339_MS.fullmatch(record["time"]), record
        assert record["level"] in ("debug", "info", "warning", "error", "critical")
        assert record["logger"].startswith("fastgate"), record
        records.append(record)
    assert {r["worker"] for r in records} == {None, 0, 1}  # the master and both workers
    assert any(r["worker"] is None and "worker 1: started pid" in r["message"]
               for r in records)


def test_log_format_flag_overrides_the_config(launch: Callable[..., Fastgate]) -> None:
    fg = launch(workers=1, top={"log_format": "json"}, args=("--log-format", "text"))
    lines = [line for line in _stop(fg).splitlines() if line.strip()]
    assert lines and all(not line.startswith("{") for line in lines), lines
    assert all(" fastgate[" in line for line in lines), lines
    fg = launch(workers=1, args=("--log-format", "json"))  # config default: text
    lines = [line for line in _stop(fg).splitlines() if line.strip()]
    assert lines and all(orjson.loads(line)["worker"] is None for line in lines)
