"""The ``replay_store.redis.url`` syntax (fastgate.config.redisurl): what the loader accepts
and the address the Redis replay store connects to. Passwords never reach ``str()``."""

from __future__ import annotations

import pytest

from fastgate.config.redisurl import parse_redis_url


@pytest.mark.parametrize("bad", [
    "http://127.0.0.1:6379", "redis://", "redis://h:99999", "redis://h/x", "redis://h/0?db=1",
    "redis://user@h", "unix://host/tmp/x.sock", "unix://x.sock", "unix:///x.sock?timeout=1",
    "redis://h/-1", "redis://h/0#frag", 6379,
])
def test_bad_urls_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^replay_store\.redis\.url"):
        parse_redis_url(bad)  # type: ignore[arg-type]


def test_parse_redis_url() -> None:
    a = parse_redis_url("redis://127.0.0.1:6390/3")
    assert (a.host, a.port, a.db, a.tls, a.password, a.username, a.path) == (
        "127.0.0.1", 6390, 3, False, None, None, None)  # fmt: skip
    a = parse_redis_url("rediss://alice:p%40ss%3Aword@Redis.Example:6380")
    assert (a.host, a.port, a.db, a.tls, a.username, a.password) == (
        "redis.example", 6380, 0, True, "alice", "p@ss:word")  # fmt: skip
    assert "p@ss" not in str(a) and "word" not in str(a)
    a = parse_redis_url("redis://:secret@[::1]/")
    assert (a.host, a.port, a.password, a.username) == ("::1", 6379, "secret", None)
    assert str(a) == "redis://[::1]:6379/0"
    a = parse_redis_url("unix:///run/redis/redis.sock?db=2")
    assert (a.path, a.db, a.host) == ("/run/redis/redis.sock", 2, None)
    a = parse_redis_url("unix://:pw@/tmp/r.sock")
    assert (a.path, a.password) == ("/tmp/r.sock", "pw")
