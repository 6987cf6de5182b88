"""fastgate.auth.replay (with replay_redis and redis_resp): the memory store (injected clock)
and the redis store against a real redis-server (tests/redis_fixtures.py): two stores as two
workers, PX expiry, nonces, key prefixes, AUTH/SELECT, unix sockets, TLS, redis
stopped/paused/restarted mid-run, 1,000 pipelined checks on one connection, error replies and
undecodable streams; metrics. An unknown nonce stores nothing (both stores); the nonce
script's NOSCRIPT -> EVAL fallback."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from fastgate.auth import redis_resp, replay, replay_codes, replay_redis
from fastgate.auth.replay import (
    FRESH,
    NONCE_UNKNOWN,
    PENDING,
    REPLAYED,
    UNAVAILABLE,
    MemoryReplayStore,
    RedisReplayStore,
    build_store,
)
from fastgate.config import RedisStoreConfig, ReplayStoreConfig
from fastgate.ops.metrics import Metrics
from tests.factory import Clock
from tests.redis_fixtures import RedisServer

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


def uv(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T]:
    """Run an async test on a fresh uvloop loop (what the gateway runs on), bounded in time."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(asyncio.wait_for(fn(*args, **kwargs), 30))

    return wrapper


class Recorder:
    """A metrics object with the replay hooks only (what build_store binds)."""

    def __init__(self) -> None:
        self.results: list[tuple[int, int]] = []
        self.errors: list[tuple[int, int]] = []
        self.observed: list[float] = []

    def replay_result(self, store_idx: int, result: int) -> None:
        self.results.append((store_idx, result))

    def replay_error(self, store_idx: int, kind_idx: int) -> None:
        self.errors.append((store_idx, kind_idx))

    def replay_observe(self, seconds: float) -> None:
        self.observed.append(seconds)

    def kinds(self) -> list[str]:
        return [replay.REPLAY_ERROR_KINDS[k] for _, k in self.errors]


def never(code: int) -> None:
    raise AssertionError("the memory store must not call done")


def key(name: str) -> bytes:
    return b"d:" + name.encode()


def start_check(store: replay.ReplayStore, keys: Sequence[tuple[bytes, float]],
                nonce: bytes | None = None) -> asyncio.Future[int]:  # fmt: skip
    """Issue a check; a future of its code. Asserts the ``done`` contract: never from inside
    ``check``, exactly once, and only when ``check`` returned PENDING."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    calls: list[int] = []
    inside = True

    def done(code: int) -> None:
        assert not inside, "done called from inside check"
        calls.append(code)
        assert len(calls) == 1, f"done called {len(calls)} times"
        assert code in (FRESH, REPLAYED, NONCE_UNKNOWN, UNAVAILABLE)
        fut.set_result(code)

    code = store.check(keys, nonce, done)
    inside = False
    if code != PENDING:
        assert not calls
        fut.set_result(code)
    return fut


async def check(store: replay.ReplayStore, keys: Sequence[tuple[bytes, float]],
                nonce: bytes | None = None, timeout: float = 5.0) -> int:  # fmt: skip
    code = await asyncio.wait_for(start_check(store, keys, nonce), timeout)
    await asyncio.sleep(0)  # a second done() would show up here
    return code


async def until(pred: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(step)


def redis_store(url: str, *, prefix: str = "fg:", timeout: float = 1.0,
                on_error: str = "fail_closed", metrics: object | None = None,
                ) -> RedisReplayStore:  # fmt: skip
    config = ReplayStoreConfig(redis=RedisStoreConfig(url, prefix, timeout, on_error))  # type: ignore[arg-type]
    store = build_store(config, metrics=metrics)
    assert isinstance(store, RedisReplayStore)
    return store


# -- memory store --------------------------------------------------------------------------------


def test_memory_fresh_then_replayed() -> None:
    store = MemoryReplayStore(100, clock=Clock())
    assert store.shared is False and store.fail_open is False
    assert store.check([(key("a"), 60)], None, never) == FRESH
    assert store.check([(key("a"), 60)], None, never) == REPLAYED
    assert store.check([(key("b"), 60)], None, never) == FRESH
    # One key seen: REPLAYED, and the other key is remembered all the same (as redis does).
    assert store.check([(key("a"), 60), (key("c"), 60)], None, never) == REPLAYED
    assert store.check([(key("c"), 60)], None, never) == REPLAYED
    # The same key twice in one check: the second is a replay of the first.
    assert store.check([(key("d"), 60), (key("d"), 60)], None, never) == REPLAYED
    assert store.check([], None, never) == FRESH


def test_memory_expiry_follows_the_injected_clock() -> None:
    clock = Clock()
    store = MemoryReplayStore(100, clock=clock)
    assert store.check([(key("a"), 10.0)], None, never) == FRESH
    clock.now += 9.999
    assert store.check([(key("a"), 10.0)], None, never) == REPLAYED
    clock.now += 0.001  # exactly at the expiry: gone
    assert store.check([(key("a"), 10.0)], None, never) == FRESH
    assert len(store) == 1
    # ttl <= 0 or NaN: remembered for 1 ms (never "forever", never "not at all").
    assert store.check([(key("z"), 0.0)], None, never) == FRESH
    assert store.check([(key("n"), float("nan"))], None, never) == FRESH
    assert store.check([(key("z"), 5.0), (key("n"), 5.0)], None, never) == REPLAYED
    clock.now += 0.001
    assert store.check([(key("z"), 5.0)], None, never) == FRESH
    assert store.check([(key("n"), 5.0)], None, never) == FRESH


def test_memory_purge_is_amortised_and_ignores_stale_heap_items() -> None:
    clock = Clock(0.0)
    store = MemoryReplayStore(10_000, clock=clock)
    for i in range(1000):
        assert store.check([(key(f"a{i:04}"), 1.0)], None, never) == FRESH
    # Sorts after every a-key of the same expiry: its heap item is popped last.
    assert store.check([(b"zzz", 1.0)], None, never) == FRESH
    clock.now = 2.0
    # Expired but not purged yet (one check purges a few): absent, remembered again.
    assert store.check([(b"zzz", 5.0)], None, never) == FRESH
    assert 900 < len(store) < 1001  # a burst of expiries is not purged in one pause
    for i in range(100):
        store.check([(key(f"b{i}"), 100.0)], None, never)
    assert len(store) == 101  # the 100 b-keys and zzz: every expired one is gone by now
    # The stale (1.0, zzz) heap item did not delete zzz's new entry.
    assert store.check([(b"zzz", 5.0)], None, never) == REPLAYED
    clock.now = 7.0
    assert store.check([(b"zzz", 5.0)], None, never) == FRESH


def test_memory_full_fails_closed_and_never_evicts() -> None:
    clock = Clock()
    rec = Recorder()
    store = MemoryReplayStore(3, clock=clock, metrics=rec)
    for name in "abc":
        assert store.check([(key(name), 10.0)], None, never) == FRESH
    assert store.check([(key("d"), 10.0)], None, never) == UNAVAILABLE
    # The live entries are all still there: a replay of them is still refused.
    for name in "abc":
        assert store.check([(key(name), 10.0)], None, never) == REPLAYED
    # A definite replay outranks "no room" for the other key.
    assert store.check([(key("a"), 10.0), (key("e"), 10.0)], None, never) == REPLAYED
    assert rec.kinds() == ["full"]
    clock.now += 10.0  # everything expired: room again
    assert store.check([(key("d"), 10.0)], None, never) == FRESH
    assert [r for _, r in rec.results] == [FRESH] * 3 + [UNAVAILABLE] + [REPLAYED] * 4 + [FRESH]
    assert {s for s, _ in rec.results} == {replay.STORE_MEMORY}
    assert rec.observed == []  # the memory store is not timed
    with pytest.raises(ValueError):
        MemoryReplayStore(0)


def test_memory_nonces() -> None:
    clock = Clock()
    store = MemoryReplayStore(100, clock=clock)
    assert store.check([(key("a"), 60)], b"n1", never) == NONCE_UNKNOWN
    store.add_nonce(b"n1", 20.0)
    assert store.check([(key("b"), 60)], b"n1", never) == FRESH
    assert store.check([], b"n1", never) == FRESH
    assert store.check([(key("b"), 60)], b"n1", never) == REPLAYED  # REPLAYED wins
    assert store.check([(key("c"), 60)], b"n2", never) == NONCE_UNKNOWN
    clock.now += 20.0
    assert store.check([(key("d"), 60)], b"n1", never) == NONCE_UNKNOWN
    store.add_nonce(b"n3", 5.0)
    assert list(store._nonces) == [b"n3"]  # expired nonces are dropped as new ones come


def test_memory_unknown_nonce_stores_nothing() -> None:
    clock = Clock()
    rec = Recorder()
    store = MemoryReplayStore(3, clock=clock, metrics=rec)
    token = b"t:one-time"
    # Refused for a stale nonce: neither the proof nor the one-time token is remembered...
    assert store.check([(key("p1"), 60), (token, 600)], b"stale", never) == NONCE_UNKNOWN
    assert len(store) == 0
    store.add_nonce(b"fresh", 20.0)
    # ... so the retry with the fresh nonce and the same token (a new proof) is admitted.
    assert store.check([(key("p2"), 60), (token, 600)], b"fresh", never) == FRESH
    assert len(store) == 2  # a known nonce: the keys are remembered
    # The token once more: REPLAYED, and the new proof key is remembered all the same.
    assert store.check([(key("p3"), 60), (token, 600)], b"fresh", never) == REPLAYED
    assert len(store) == 3
    # An unknown nonce and a key seen before: REPLAYED wins (looked up, nothing stored).
    assert store.check([(key("p4"), 60), (token, 600)], b"stale", never) == REPLAYED
    assert store.check([(key("p4"), 60)], b"stale", never) == NONCE_UNKNOWN
    # Full: a check refused for its nonce needs no room (NONCE_UNKNOWN, not UNAVAILABLE).
    assert store.check([(key("x"), 60)], b"stale", never) == NONCE_UNKNOWN
    assert store.check([(key("x"), 60)], b"fresh", never) == UNAVAILABLE
    clock.now += 20.0  # the nonce expired
    assert store.check([(key("y"), 60)], b"fresh", never) == NONCE_UNKNOWN
    assert store.check([], b"fresh", never) == NONCE_UNKNOWN
    assert len(store) == 3
    assert rec.kinds() == ["full"]
    assert [r for _, r in rec.results] == [NONCE_UNKNOWN, FRESH, REPLAYED, REPLAYED,
                                           NONCE_UNKNOWN, NONCE_UNKNOWN, UNAVAILABLE,
                                           NONCE_UNKNOWN, NONCE_UNKNOWN]  # fmt: skip


@uv
async def test_memory_store_through_build_store_counts_in_metrics() -> None:
    m = Metrics(routes=(), providers=(), upstreams=())
    store = build_store(ReplayStoreConfig(max_entries=1), metrics=m)
    assert isinstance(store, MemoryReplayStore) and store.max_entries == 1
    await store.start()
    assert store.check([(key("a"), 60)], None, never) == FRESH
    assert store.check([(key("a"), 60)], None, never) == REPLAYED
    assert store.check([(key("b"), 60)], None, never) == UNAVAILABLE
    await store.close()
    s = samples(m)
    checks = "fastgate_replay_store_checks_total"
    assert s[(checks, (("result", "fresh"), ("store", "memory")))] == 1
    assert s[(checks, (("result", "replayed"), ("store", "memory")))] == 1
    assert s[(checks, (("result", "unavailable"), ("store", "memory")))] == 1
    assert s[("fastgate_replay_store_errors_total", (("kind", "full"), ("store", "memory")))] == 1


def connected_clients(server: RedisServer) -> int:
    info = server.call("INFO", "clients")
    assert isinstance(info, bytes)
    line = next(x for x in info.decode().splitlines() if x.startswith("connected_clients:"))
    return int(line.split(":")[1])


def command_calls(server: RedisServer) -> dict[str, int]:
    """``INFO commandstats``: calls per command (since the last ``CONFIG RESETSTAT``)."""
    info = server.call("INFO", "commandstats")
    assert isinstance(info, bytes)
    out = {}
    for line in info.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line[len("cmdstat_"):].partition(":")
            out[name] = int(stats.split(",")[0].removeprefix("calls="))
    return out


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- URLs ----------------------------------------------------------------------------------------


def test_store_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        RedisReplayStore("redis://h", timeout=0)
    with pytest.raises(ValueError):
        RedisReplayStore("redis://h", on_error="maybe")


def test_commands_are_bulk_strings() -> None:
    assert replay.encode_command(b"SET", b"a\r\nb c", b"1") == (
        b"*3\r\n$3\r\nSET\r\n$6\r\na\r\nb c\r\n$1\r\n1\r\n")  # fmt: skip
    assert redis_resp._millis(0.3) == b"300"  # not 301 (0.3 * 1000 = 300.00000000000006)
    assert redis_resp._millis(0.0301) == b"31"  # rounded up
    assert redis_resp._millis(0.0) == b"1"
    assert redis_resp._millis(float("inf")) == b"%d" % (replay_codes._MAX_TTL * 1000)


# -- redis: answers --------------------------------------------------------------------------------


@uv
async def test_redis_two_workers_share_the_store(redis: RedisServer) -> None:
    a, b = redis_store(redis.url), redis_store(redis.url)
    assert a.shared and not a.fail_open
    await a.start()
    await b.start()
    try:
        assert a.connected and b.connected
        assert await check(a, [(key("p1"), 60.0)]) == FRESH
        assert await check(b, [(key("p1"), 60.0)]) == REPLAYED  # the other worker saw it
        assert await check(b, [(key("p2"), 60.0)]) == FRESH
        assert await check(a, [(key("p2"), 60.0), (key("p3"), 60.0)]) == REPLAYED
        assert await check(b, [(key("p3"), 60.0)]) == REPLAYED  # remembered all the same
        assert await check(a, []) == FRESH
        pttl = redis.call("PTTL", b"fg:" + key("p1"))
        assert isinstance(pttl, int) and 59_000 < pttl <= 60_000
        assert redis.call("GET", b"fg:" + key("p1")) == b"1"
    finally:
        await a.close()
        await b.close()
    fut = start_check(a, [(key("p4"), 1.0)])  # closed: unavailable at once
    assert fut.result() == UNAVAILABLE


@uv
async def test_redis_expiry_is_px(redis: RedisServer) -> None:
    store = redis_store(redis.url)
    await store.start()
    try:
        assert await check(store, [(key("short"), 0.15), (key("long"), 30.0)]) == FRESH
        pttl = redis.call("PTTL", b"fg:" + key("short"))
        assert isinstance(pttl, int) and 0 < pttl <= 150
        assert await check(store, [(key("short"), 0.15)]) == REPLAYED
        await asyncio.sleep(0.3)
        assert await check(store, [(key("short"), 0.15)]) == FRESH
        assert await check(store, [(key("long"), 30.0)]) == REPLAYED
        assert await check(store, [(key("tiny"), 0.0)]) == FRESH  # PX 1, never PX 0
    finally:
        await store.close()


@uv
async def test_redis_nonces_across_workers(redis: RedisServer) -> None:
    a, b = redis_store(redis.url), redis_store(redis.url)
    await a.start()
    await b.start()
    try:
        assert await check(b, [(key("x1"), 60.0)], b"nonce-1") == NONCE_UNKNOWN
        a.add_nonce(b"nonce-1", 30.0)
        a.add_nonce(b"nonce-short", 0.15)
        # FIFO on one connection: the nonce writes were answered before this check.
        assert await check(a, [(key("barrier"), 60.0)]) == FRESH
        assert await check(b, [(key("x2"), 60.0)], b"nonce-1") == FRESH
        assert await check(b, [], b"nonce-1") == FRESH
        assert await check(b, [(key("x2"), 60.0)], b"nonce-2") == REPLAYED  # REPLAYED wins
        assert await check(b, [(key("x3"), 60.0)], b"nonce-2") == NONCE_UNKNOWN
        assert await check(b, [(key("x4"), 60.0)], b"nonce-short") == FRESH
        pttl = redis.call("PTTL", b"fg:n:nonce-1")
        assert isinstance(pttl, int) and 29_000 < pttl <= 30_000
        await asyncio.sleep(0.3)
        assert await check(b, [(key("x5"), 60.0)], b"nonce-short") == NONCE_UNKNOWN
    finally:
        await a.close()
        await b.close()


@uv
async def test_redis_unknown_nonce_stores_nothing(redis: RedisServer) -> None:
    rec = Recorder()
    store = redis_store(redis.url, metrics=rec)
    await store.start()
    try:
        token = b"t:one-time"
        redis.call("CONFIG", "RESETSTAT")
        # Refused for a stale nonce: neither the proof nor the one-time token is stored...
        assert await check(store, [(key("p1"), 60.0), (token, 600.0)], b"stale") == NONCE_UNKNOWN
        assert redis.call("DBSIZE") == 0
        calls = command_calls(redis)  # one EVALSHA: no SET ran, no EVAL fallback
        assert calls.get("evalsha") == 1 and "set" not in calls and "eval" not in calls
        store.add_nonce(b"fresh", 30.0)  # (FIFO: written before the checks below)
        # ... so the retry with the fresh nonce and the same token (a new proof) is FRESH.
        assert await check(store, [(key("p2"), 60.0), (token, 600.0)], b"fresh") == FRESH
        # An unknown nonce and a key seen before: REPLAYED wins, the new key is not stored.
        assert await check(store, [(key("p3"), 60.0), (token, 600.0)], b"stale") == REPLAYED
        assert redis.call("EXISTS", b"fg:" + key("p1"), b"fg:" + key("p3")) == 0
        assert await check(store, [], b"stale") == NONCE_UNKNOWN
        assert redis.call("DBSIZE") == 3  # p2, the token, the nonce
        assert rec.errors == []
        assert [r for _, r in rec.results] == [NONCE_UNKNOWN, FRESH, REPLAYED, NONCE_UNKNOWN]
    finally:
        await store.close()


@uv
async def test_redis_known_nonce_stores_the_keys(redis: RedisServer) -> None:
    store = redis_store(redis.url)
    other = redis_store(redis.url)  # another worker
    await store.start()
    await other.start()
    try:
        store.add_nonce(b"n", 30.0)
        assert await check(store, [(key("p1"), 60.0), (b"t:tok", 0.5)], b"n") == FRESH
        pttl = redis.call("PTTL", b"fg:" + key("p1"))
        assert isinstance(pttl, int) and 59_000 < pttl <= 60_000
        pttl = redis.call("PTTL", b"fg:t:tok")
        assert isinstance(pttl, int) and 0 < pttl <= 500
        assert redis.call("GET", b"fg:" + key("p1")) == b"1"
        # Seen by the other worker, with or without the nonce.
        assert await check(other, [(b"t:tok", 0.5)], b"n") == REPLAYED
        assert await check(other, [(key("p1"), 60.0)]) == REPLAYED
        # REPLAYED with a known nonce: the new key of the check is stored all the same.
        assert await check(other, [(key("p2"), 60.0), (b"t:tok", 0.5)], b"n") == REPLAYED
        assert await check(store, [(key("p2"), 60.0)]) == REPLAYED
        assert await check(store, [(key("p3"), 60.0), (key("p3"), 60.0)], b"n") == REPLAYED
        assert await check(store, [], b"n") == FRESH
    finally:
        await store.close()
        await other.close()


@uv
async def test_redis_noscript_falls_back_to_eval_and_loads_again(redis: RedisServer) -> None:
    rec = Recorder()
    store = redis_store(redis.url, metrics=rec)
    await store.start()
    try:
        sha = replay_redis._SCRIPT_SHA
        assert redis.call("SCRIPT", "EXISTS", sha) == [1]  # loaded by the set-up
        store.add_nonce(b"n", 60.0)
        assert await check(store, [(key("a"), 60.0)], b"n") == FRESH
        conn = store._conn
        redis.call("SCRIPT", "FLUSH")
        redis.call("CONFIG", "RESETSTAT")
        assert await check(store, [(key("b"), 60.0)], b"n") == FRESH  # NOSCRIPT -> EVAL
        assert await check(store, [(key("b"), 60.0)], b"n") == REPLAYED  # EVALSHA again
        assert redis.call("EXISTS", b"fg:" + key("b")) == 1
        assert redis.call("SCRIPT", "EXISTS", sha) == [1]
        calls = command_calls(redis)
        assert (calls["evalsha"], calls["eval"], calls["script|load"]) == (2, 1, 1)
        # Lost with many checks in flight: each is sent again with EVAL (and answered
        # right, FIFO), the script is loaded again once.
        redis.call("SCRIPT", "FLUSH")
        redis.call("CONFIG", "RESETSTAT")
        futures = [start_check(store, [(key(f"c{i}"), 60.0)], b"n" if i % 2 else b"stale")
                   for i in range(20)]  # fmt: skip
        futures.append(start_check(store, [(key("b"), 60.0)], b"stale"))
        # Pipelined SET, written before c1's EVAL (sent when its NOSCRIPT came back): this
        # one runs first and is FRESH, c1's EVAL finds the key. Exactly one of them is FRESH.
        futures.append(start_check(store, [(key("c1"), 60.0)]))
        got = await asyncio.wait_for(asyncio.gather(*futures), 5.0)
        expected = [FRESH if i % 2 else NONCE_UNKNOWN for i in range(20)] + [REPLAYED, FRESH]
        expected[1] = REPLAYED
        assert got == expected
        calls = command_calls(redis)
        assert (calls["evalsha"], calls["eval"], calls["script|load"]) == (21, 21, 1)
        assert redis.call("EXISTS", *[b"fg:" + key(f"c{i}") for i in range(20)]) == 10
        assert await check(store, [(key("d"), 60.0)], b"n") == FRESH
        assert command_calls(redis)["evalsha"] == 22
        assert store._conn is conn  # NOSCRIPT costs no connection, no error
        assert rec.errors == []
        assert not conn.reloading
    finally:
        await store.close()


@uv
async def test_redis_key_prefixes_isolate_gateways(redis: RedisServer) -> None:
    a, b = redis_store(redis.url, prefix="gw-a:"), redis_store(redis.url, prefix="gw-b:")
    await a.start()
    await b.start()
    try:
        assert await check(a, [(key("j"), 60.0)]) == FRESH
        assert await check(b, [(key("j"), 60.0)]) == FRESH
        assert await check(a, [(key("j"), 60.0)]) == REPLAYED
        a.add_nonce(b"n", 60.0)
        assert await check(a, [], b"n") == FRESH
        assert await check(b, [], b"n") == NONCE_UNKNOWN
        keys = redis.call("KEYS", "*")
        assert isinstance(keys, list)
        assert sorted(keys) == [b"gw-a:d:j", b"gw-a:n:n", b"gw-b:d:j"]
    finally:
        await a.close()
        await b.close()


@uv
async def test_redis_keys_may_hold_any_byte(redis: RedisServer) -> None:
    store = redis_store(redis.url)
    await store.start()
    try:
        nasty = [b"d:\r\n*1\r\n$8\r\nFLUSHALL\r\n", b"d: \x00\xff\r", b"t:" + bytes(range(256))]
        for k in nasty:  # through the script (KEYS), the nonce unknown: nothing stored
            assert await check(store, [(k, 60.0)], b"\r\nPING\r\n") == NONCE_UNKNOWN
        assert redis.call("DBSIZE") == 0
        store.add_nonce(b"\r\nPING\r\n\x00", 60.0)
        for k in nasty[:2]:  # the script, the nonce known
            assert await check(store, [(k, 60.0)], b"\r\nPING\r\n\x00") == FRESH
        assert await check(store, [(nasty[2], 60.0)]) == FRESH  # the pipelined SET
        for k in nasty:
            assert await check(store, [(k, 60.0)]) == REPLAYED
        # exactly these keys (and the nonce), nothing injected
        assert redis.call("DBSIZE") == len(nasty) + 1
        assert redis.call("EXISTS", b"fg:" + nasty[0], b"fg:n:\r\nPING\r\n\x00") == 2
    finally:
        await store.close()


class CountingTransport:
    """Counts the writes of a transport (uvloop's transport attributes are read-only)."""

    def __init__(self, transport: asyncio.Transport, writes: list[int]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@uv
async def test_redis_1000_concurrent_checks_pipelined_on_one_connection(
    redis: RedisServer,
) -> None:
    m = Metrics(routes=(), providers=(), upstreams=())
    store = redis_store(redis.url, timeout=5.0, metrics=m)
    await store.start()
    try:
        clients_before = connected_clients(redis)
        store.add_nonce(b"good", 60.0)
        for i in range(500):  # half of the keys below are seen before
            assert store.check([(key(f"k{i}"), 60.0)], None, lambda code: None) == PENDING
        assert await check(store, [(key("barrier"), 60.0)]) == FRESH  # FIFO: all answered
        writes: list[int] = []
        conn = store._conn
        assert conn is not None and conn.transport is not None
        conn.transport = CountingTransport(conn.transport, writes)  # type: ignore[assignment]
        rng = random.Random(11)
        order = list(range(1000))
        rng.shuffle(order)
        expected: list[int] = []
        futures: list[asyncio.Future[int]] = []
        for i in order:
            keys = [(key(f"k{i}"), 60.0)]
            if i % 3 == 0:  # some checks have two keys: different reply counts per check
                keys.append((key(f"extra{i}"), 60.0))
            nonce = None if i % 5 else (b"good" if i % 2 else b"bad")
            futures.append(start_check(store, keys, nonce))
            if i < 500:
                expected.append(REPLAYED)
            elif nonce == b"bad":
                expected.append(NONCE_UNKNOWN)
            else:
                expected.append(FRESH)
        assert len(writes) == 1000  # one write per check
        got = await asyncio.wait_for(asyncio.gather(*futures), 20)
        assert got == expected
        assert got.count(REPLAYED) == 500
        assert store._conn is conn  # the same single connection throughout
        assert connected_clients(redis) == clients_before
    finally:
        await store.close()
    s = samples(m)
    checks = "fastgate_replay_store_checks_total"
    assert s[(checks, (("result", "replayed"), ("store", "redis")))] == 500
    fresh = 500 + 1 + 500 - expected.count(NONCE_UNKNOWN)
    assert s[(checks, (("result", "fresh"), ("store", "redis")))] == fresh
    assert s[(checks, (("result", "nonce_unknown"), ("store", "redis")))] == expected.count(
        NONCE_UNKNOWN)  # fmt: skip
    count = s[("fastgate_replay_store_duration_seconds_count", (("store", "redis"),))]
    assert count == 1501


# -- redis: connection set-up --------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_with_password(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = RedisServer(tmp_path_factory.mktemp("redis-auth"), password="s3cret pass")
    server.start()
    server.call("ACL", "SETUSER", "alice", "on", ">wonder:land", "~*", "&*", "+@all")
    try:
        yield server
    finally:
        server.stop()


@uv
async def test_redis_auth_and_select(redis_with_password: RedisServer) -> None:
    server = redis_with_password
    server.call("FLUSHALL")
    port = server.port
    rec = Recorder()
    good = redis_store(f"redis://:s3cret%20pass@127.0.0.1:{port}/3", metrics=rec)
    acl = redis_store(f"redis://alice:wonder%3Aland@127.0.0.1:{port}/2")
    await good.start()
    await acl.start()
    try:
        assert good.connected and acl.connected
        assert await check(good, [(key("a"), 60.0)]) == FRESH
        assert await check(acl, [(key("a"), 60.0)]) == FRESH  # another database
        assert await check(good, [(key("a"), 60.0)]) == REPLAYED
        assert server.call("EXISTS", b"fg:d:a", db=3) == 1
        assert server.call("EXISTS", b"fg:d:a", db=2) == 1
        assert server.call("EXISTS", b"fg:d:a") == 0
        assert rec.errors == []
    finally:
        await good.close()
        await acl.close()


@uv
async def test_redis_bad_credentials_do_not_stop_start(redis_with_password: RedisServer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    port = redis_with_password.port
    for url in (f"redis://:wrong@127.0.0.1:{port}", f"redis://127.0.0.1:{port}",
                f"redis://:s3cret%20pass@127.0.0.1:{port}/99"):  # fmt: skip
        rec = Recorder()
        store = redis_store(url, metrics=rec)
        with caplog.at_level(logging.WARNING, "fastgate.replay"):
            await store.start()  # returns: logged, retried in the background
        try:
            assert not store.connected
            assert start_check(store, [(key("a"), 1.0)]).result() == UNAVAILABLE
            assert rec.kinds() == ["connection"]
            assert rec.results == [(replay.STORE_REDIS, UNAVAILABLE)]
        finally:
            await store.close()
    text = caplog.text
    assert "WRONGPASS" in text and "NOAUTH" in text and "DB index" in text
    assert "s3cret" not in text and "wrong@" not in text


@uv
async def test_redis_unix_socket(redis: RedisServer) -> None:
    store = redis_store(f"unix://{redis.unix_path}?db=1")
    await store.start()
    try:
        assert await check(store, [(key("u"), 60.0)]) == FRESH
        assert await check(store, [(key("u"), 60.0)]) == REPLAYED
        assert redis.call("EXISTS", b"fg:d:u", db=1) == 1
    finally:
        await store.close()


@uv
async def test_rediss_verifies_the_server_certificate(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fastgate.tools.demo import write_demo_pki

    (tmp_path / "pki").mkdir()
    ca, cert, key_file = write_demo_pki(tmp_path / "pki")
    server = RedisServer(tmp_path / "redis-tls", tls=(ca, cert, key_file))
    server.start()
    try:
        untrusted = redis_store(server.url)  # the system CAs do not know the demo CA
        await untrusted.start()
        assert not untrusted.connected
        await untrusted.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the default context reads it
        store = redis_store(server.url)
        await store.start()
        try:
            assert store.connected
            assert await check(store, [(key("t"), 60.0)]) == FRESH
            assert await check(store, [(key("t"), 60.0)]) == REPLAYED
        finally:
            await store.close()
    finally:
        server.stop()


# -- redis: failures -------------------------------------------------------------------------------


@uv
async def test_redis_down_at_start_then_up(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "late")
    store = redis_store(server.url)
    t0 = time.monotonic()
    await store.start()  # nothing listens: logged, not raised
    assert time.monotonic() - t0 < 1.0
    try:
        assert not store.connected
        assert start_check(store, [(key("a"), 1.0)]).result() == UNAVAILABLE
        server.start()
        await until(lambda: store.connected, timeout=5.0)
        assert await check(store, [(key("a"), 60.0)]) == FRESH
    finally:
        await store.close()
        server.stop()


@uv
async def test_redis_killed_mid_run_then_restarted(redis: RedisServer) -> None:
    rec = Recorder()
    store = redis_store(redis.url, timeout=0.2, metrics=rec)
    other = redis_store(redis.url)
    await store.start()
    try:
        store.add_nonce(b"kept", 60.0)
        assert await check(store, [(key("before"), 60.0)], b"kept") == FRESH
        redis.pause()  # the checks below are in flight when it dies
        inflight = [start_check(store, [(key(f"f{i}"), 60.0)]) for i in range(20)]
        await asyncio.sleep(0.02)
        t0 = time.monotonic()
        redis.stop()
        got = await asyncio.wait_for(asyncio.gather(*inflight), 2.0)
        assert got == [UNAVAILABLE] * 20
        assert time.monotonic() - t0 < 0.5
        # Disconnected: answered at once, nothing left pending.
        fut = start_check(store, [(key("during"), 60.0)])
        assert fut.done() and fut.result() == UNAVAILABLE
        redis.start()  # same port, empty (no persistence)
        await until(lambda: store.connected, timeout=5.0)
        # The same store object works again; the nonce was written again on reconnect.
        assert await check(store, [(key("after"), 60.0)], b"kept") == FRESH
        assert await check(store, [(key("after"), 60.0)]) == REPLAYED
        await other.start()
        assert await check(other, [], b"kept") == FRESH
        assert "connection" in rec.kinds()
    finally:
        if redis.proc is not None:
            redis.resume()
        await store.close()
        await other.close()


@uv
async def test_redis_hung_times_out_and_recovers(redis: RedisServer) -> None:
    rec = Recorder()
    timeout = 0.1
    store = redis_store(redis.url, timeout=timeout, metrics=rec)
    await store.start()
    try:
        assert await check(store, [(key("a"), 60.0)]) == FRESH
        redis.pause()
        t0 = time.monotonic()
        futures = [start_check(store, [(key(f"h{i}"), 60.0)]) for i in range(10)]
        got = await asyncio.wait_for(asyncio.gather(*futures), 2.0)
        elapsed = time.monotonic() - t0
        assert got == [UNAVAILABLE] * 10
        # The sweep runs every timeout/2: at most ~1.5 x timeout (+ scheduling slack).
        assert timeout <= elapsed < 3 * timeout + 0.3, elapsed
        assert rec.kinds().count("timeout") == 1  # one dead connection, not one per check
        assert start_check(store, [(key("b"), 60.0)]).result() == UNAVAILABLE
        redis.resume()
        await until(lambda: store.connected, timeout=8.0)
        assert await check(store, [(key("a"), 60.0)]) == REPLAYED
        assert await check(store, [(key("c"), 60.0)]) == FRESH
    finally:
        redis.resume()
        await store.close()


@uv
async def test_redis_error_reply_is_unavailable_for_that_check(redis: RedisServer) -> None:
    rec = Recorder()
    store = redis_store(redis.url, metrics=rec)
    await store.start()
    try:
        store.add_nonce(b"n", 60.0)
        assert await check(store, [(key("seen"), 60.0)]) == FRESH
        conn = store._conn
        redis.call("CONFIG", "SET", "maxmemory", "1")  # every write: -OOM ...
        try:
            assert await check(store, [(key("new"), 60.0)]) == UNAVAILABLE
            assert await check(store, [(key("new"), 60.0)], b"n") == UNAVAILABLE
        finally:
            redis.call("CONFIG", "SET", "maxmemory", "0")
        assert await check(store, [(key("new"), 60.0)], b"n") == FRESH
        assert store._conn is conn  # an error reply does not cost the connection
        assert rec.kinds() == ["protocol"] * 2
        assert [r for _, r in rec.results] == [FRESH, UNAVAILABLE, UNAVAILABLE, FRESH]
    finally:
        await store.close()


class FakeRedis:
    """A TCP server that answers the set-up (PING, SCRIPT LOAD), then whatever ``reply``
    returns."""

    def __init__(self, reply: Callable[[bytes], bytes]) -> None:
        self.reply = reply
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> FakeRedis:
        self.server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError):
            first = await reader.read(65536)
            assert b"PING" in first and b"SCRIPT" in first
            writer.write(b"+PONG\r\n$40\r\n%b\r\n" % replay_redis._SCRIPT_SHA)
            while data := await reader.read(65536):
                writer.write(self.reply(data))
        writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 1.0)


@pytest.mark.parametrize("garbage", [b"?what\r\n", b"$3\r\nabcXY", b"*1\r\n:1\r\n",
                                     b"$-2\r\n", b":x\r\n"])  # fmt: skip
@uv
async def test_undecodable_replies_break_the_connection(garbage: bytes) -> None:
    fake = await FakeRedis(lambda data: garbage).start()
    rec = Recorder()
    store = redis_store(f"redis://127.0.0.1:{fake.port}", metrics=rec)
    await store.start()
    try:
        assert store.connected
        assert await check(store, [(key("a"), 60.0)]) == UNAVAILABLE
        assert rec.kinds() == ["protocol"]
        await until(lambda: fake.connections >= 2)  # reconnects
    finally:
        await store.close()
        await fake.stop()


@uv
async def test_replies_split_across_reads_and_unexpected_bulk() -> None:
    chunks: list[bytes] = []

    def reply(data: bytes) -> bytes:
        # The first check's "+OK" split mid-token over two writes; the second write also
        # carries the second check's "$-1" and, for the third, a bulk string.
        chunks.append(data)
        if len(chunks) == 1:
            return b"+O"
        return b"K\r\n$-1\r\n$1\r\nx\r\n" if len(chunks) == 2 else b""

    fake = await FakeRedis(reply).start()
    store = redis_store(f"redis://127.0.0.1:{fake.port}")
    await store.start()
    try:
        first = start_check(store, [(key("a"), 60.0)])
        await asyncio.sleep(0.05)
        second = start_check(store, [(key("a"), 60.0)])
        third = start_check(store, [(key("b"), 60.0)])
        got = await asyncio.wait_for(asyncio.gather(first, second, third), 5.0)
        # A bulk string is no answer to SET: that check is unavailable, the others are fine.
        assert got == [FRESH, REPLAYED, UNAVAILABLE]
        assert store.connected
    finally:
        await store.close()
        await fake.stop()


@uv
async def test_a_replay_outranks_an_error_reply_for_another_key() -> None:
    # (a real redis under OOM refuses every SET, so this needs the fake; a check without a
    # nonce: one reply per SET. With a nonce the script does the same with pcall.)
    fake = await FakeRedis(lambda data: b"$-1\r\n-ERR boom\r\n").start()
    rec = Recorder()
    store = redis_store(f"redis://127.0.0.1:{fake.port}", metrics=rec)
    await store.start()
    try:
        assert await check(store, [(key("a"), 60.0), (key("b"), 60.0)]) == REPLAYED
        assert rec.kinds() == ["protocol"]
        assert store.connected
    finally:
        await store.close()
        await fake.stop()


@uv
async def test_done_callback_errors_do_not_starve_other_checks(redis: RedisServer) -> None:
    store = redis_store(redis.url)
    await store.start()
    try:
        def boom(code: int) -> None:
            raise RuntimeError("caller bug")

        assert store.check([(key("x"), 60.0)], None, boom) == PENDING
        assert await check(store, [(key("x"), 60.0)]) == REPLAYED
        assert store.connected
    finally:
        await store.close()


@uv
async def test_close_answers_pending_checks(redis: RedisServer) -> None:
    store = redis_store(redis.url, timeout=0.2)
    await store.start()
    redis.pause()
    try:
        futures = [start_check(store, [(key(f"c{i}"), 60.0)]) for i in range(5)]
        await store.close()
        assert all(f.done() for f in futures)
        assert [f.result() for f in futures] == [UNAVAILABLE] * 5
    finally:
        redis.resume()
    fail_open = redis_store(redis.url, on_error="fail_open")
    assert fail_open.fail_open and fail_open.shared

