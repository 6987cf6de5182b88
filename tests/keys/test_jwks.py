"""Key sources against a real, breakable JWKS/OIDC server on loopback (tests/idp.py).

Decisions are checked through the real compiled Verifier; tokens come from tests/factory.py.
Time-dependent rules (rate limit, negative cache, max_stale) use an injectable clock; the
few tests that need the background loop use small real intervals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest

from fastgate import Reason, Verifier
from fastgate.config import JwksCacheConfig, ProviderConfig
from fastgate.keys.jwks import (
    NEGATIVE_KID_TTL_INTERVALS,
    FileKeySource,
    KeySourceError,
    RemoteKeySource,
    StaticKeySource,
    build_key_source,
    discovery_url,
    ttl_from_cache_control,
)
from tests.factory import (
    AUDIENCE,
    NOW,
    Clock,
    SigningKey,
    default_claims,
    generate,
    jwks_of,
    make_token,
)
from tests.idp import IdP, free_port, run

_KEYS: dict[str, SigningKey] = {}


def key(kid: str, alg: str = "ES256", rsa_bits: int = 2048) -> SigningKey:
    """Keys are generated once per session (RSA generation is slow)."""
    name = f"{kid}/{alg}/{rsa_bits}"
    if name not in _KEYS:
        _KEYS[name] = generate(alg, kid, rsa_bits=rsa_bits)
    return _KEYS[name]


class Recorder:
    """A JwksMetrics implementation that remembers every call."""

    def __init__(self) -> None:
        self.fetches: list[tuple[str, str, float]] = []
        self.key_counts: list[tuple[str, int]] = []
        self.ages: list[tuple[str, float]] = []

    def fetch(self, provider: str, result: str, seconds: float) -> None:
        self.fetches.append((provider, result, seconds))

    def keys(self, provider: str, count: int) -> None:
        self.key_counts.append((provider, count))

    def age(self, provider: str, seconds: float) -> None:
        self.ages.append((provider, seconds))

    def results(self) -> list[str]:
        return [r for _, r, _ in self.fetches]


FAST = JwksCacheConfig(ttl=600, min_ttl=30, min_refresh_interval=30, max_stale=3600,
                       timeout=0.5, max_bytes=64 * 1024)


def provider(idp: IdP, *, kind: str = "jwks_uri", cache: JwksCacheConfig = FAST,
             **kw: Any) -> ProviderConfig:
    fields: dict[str, Any] = {"name": "idp", "issuer": idp.issuer, "key_source": kind,
                              "jwks_cache": cache, "audiences": (AUDIENCE,)}
    if kind == "jwks_uri":
        fields["jwks_uri"] = idp.jwks_url
    fields.update(kw)
    return ProviderConfig(**fields)


def verifier_for(issuer: str) -> Verifier:
    return Verifier(issuer, audiences=[AUDIENCE], name="idp")


def token(k: SigningKey, issuer: str, **claims: Any) -> str:
    return make_token(k, default_claims(iss=issuer, **claims))


def reason(v: Verifier, tok: str) -> Reason:
    return v.verify(tok, now=NOW).reason


def served(src: RemoteKeySource, tok: str) -> Reason:
    """The decision the data plane answers with: a provider with no usable keys *now* is
    jwks_unavailable (503), whatever the verifier says. (The verifier reports
    jwks_unavailable only while it has never had keys; after a max_stale drop it sees an
    empty key set and says key_not_found, so proxy.py must look at ``source.ready``.)"""
    r = reason(src.verifier, tok)
    if r is Reason.KEY_NOT_FOUND and not src.ready:
        return Reason.JWKS_UNAVAILABLE
    return r


async def remote(idp: IdP, *, cache: JwksCacheConfig = FAST, kind: str = "jwks_uri",
                 clock: Any = time.monotonic, metrics: Recorder | None = None,
                 ready: bool = True, **kw: Any) -> RemoteKeySource:
    """A started remote source for ``idp``; waits for its first keys when ``ready``."""
    src = build_key_source(provider(idp, kind=kind, cache=cache), verifier_for(idp.issuer),
                           metrics=metrics, clock=clock)
    assert isinstance(src, RemoteKeySource)
    src.kid_wait = kw.get("kid_wait", src.kid_wait)
    await src.start()
    if ready:
        assert await src.wait_ready(3.0), src.state
    return src


@contextlib.asynccontextmanager
async def source(idp: IdP, **remote_kw: Any) -> AsyncIterator[RemoteKeySource]:
    """:func:`remote` for ``idp``, stopped on the way out."""
    src = await remote(idp, **remote_kw)
    try:
        yield src
    finally:
        await src.stop()


def arun(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """An async test, run by :func:`tests.idp.run` (a fresh event loop, bounded in time)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        run(fn(*args, **kwargs))

    return wrapper


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "ttl"), [
    (None, 600.0),
    ("", 600.0),
    ("public, max-age=120", 120.0),
    ("max-age=5", 30.0),                 # clamped up to min_ttl
    ("max-age=999999999", 600.0),        # clamped down to ttl
    ("public, s-maxage=5", 600.0),       # not max-age: default
    ('max-age="90"', 90.0),
    ("no-store", 30.0),
    ("no-cache, max-age=300", 30.0),
    ("max-age=abc", 600.0),
])
def test_ttl_from_cache_control_clamps(header: str | None, ttl: float) -> None:
    cfg = JwksCacheConfig(ttl=600, min_ttl=30)
    assert ttl_from_cache_control(header, cfg) == ttl


def test_discovery_url_strips_one_trailing_slash() -> None:
    # OIDC Discovery 1.0 §4: a terminating "/" is removed before appending the path.
    assert discovery_url("https://a.example/tenant/") == \
        "https://a.example/tenant/.well-known/openid-configuration"
    assert discovery_url("https://a.example") == \
        "https://a.example/.well-known/openid-configuration"


def test_build_key_source_kinds(tmp_path: Path) -> None:
    k1 = key("k1")
    iss = "https://idp.example.test/"
    base: dict[str, Any] = {"name": "p", "issuer": iss}
    inline = build_key_source(ProviderConfig(**base, key_source="jwks", jwks=jwks_of(k1)),
                              Verifier(iss, jwks=jwks_of(k1)))
    assert isinstance(inline, StaticKeySource)
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps(jwks_of(k1)))
    f = build_key_source(ProviderConfig(**base, key_source="jwks_file", jwks_file=str(path)),
                         Verifier(iss))
    assert isinstance(f, FileKeySource)
    r = build_key_source(ProviderConfig(**base, key_source="jwks_uri",
                                        jwks_uri="https://idp.example.test/keys"), Verifier(iss))
    assert isinstance(r, RemoteKeySource) and r.kind == "jwks_uri"
    d = build_key_source(ProviderConfig(**base, key_source="discovery"), Verifier(iss))
    assert isinstance(d, RemoteKeySource) and d.kind == "discovery"
    assert d.location == "https://idp.example.test/.well-known/openid-configuration"
    with pytest.raises(ValueError, match="http"):
        build_key_source(ProviderConfig(**base, key_source="jwks_uri",
                                        jwks_uri="file:///etc/passwd"), Verifier(iss))


# ---------------------------------------------------------------------------------------------
# Static and file sources
# ---------------------------------------------------------------------------------------------


@arun
async def test_static_sources_ready_at_once() -> None:
    k1 = key("k1")
    iss = "https://idp.example.test/"
    v = Verifier(iss, audiences=[AUDIENCE], jwks=jwks_of(k1))
    src = build_key_source(ProviderConfig(name="p", issuer=iss, key_source="jwks",
                                          jwks=jwks_of(k1)), v)
    await src.start()
    assert src.ready and await src.wait_ready(0)
    assert await src.refresh_for_kid("k1") is True
    assert await src.refresh_for_kid("nope") is False
    assert reason(v, token(k1, iss)) is Reason.OK
    await src.stop()

    secret = generate("HS256", "s1")
    assert isinstance(secret.private, bytes)
    vs = Verifier(iss, audiences=[AUDIENCE], secret=secret.private, algorithms=["HS256"])
    ss = build_key_source(ProviderConfig(name="s", issuer=iss, key_source="secret",
                                         secret=secret.private), vs)
    await ss.start()
    assert ss.ready and ss.state.kind == "secret"
    assert reason(vs, token(secret, iss)) is Reason.OK

    # An inline set with no usable key cannot serve anything: refuse to start.
    enc = dict(jwks_of(k1)["keys"][0], use="enc")
    bad = build_key_source(ProviderConfig(name="b", issuer=iss, key_source="jwks",
                                          jwks={"keys": [enc]}), Verifier(iss))
    with pytest.raises(KeySourceError, match="no usable key"):
        await bad.start()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@arun
async def test_file_source_reloads_on_change_and_keeps_keys_on_bad_file(tmp_path: Path) -> None:
    k1, k2 = key("k1"), key("k2")
    iss = "https://idp.example.test/"
    path = tmp_path / "jwks.json"
    path.write_bytes(orjson.dumps(jwks_of(k1)))
    v = verifier_for(iss)
    rec = Recorder()
    src = FileKeySource(ProviderConfig(name="f", issuer=iss, key_source="jwks_file",
                                       jwks_file=str(path)), v, path=str(path),
                        metrics=rec, poll_interval=0.05)
    await src.start()
    try:
        assert src.ready and reason(v, token(k1, iss)) is Reason.OK
        # Rotation on disk: the poller picks it up within a few polls.
        _write_atomic(path, orjson.dumps(jwks_of(k2)))
        for _ in range(100):
            if v.has_kid("k2"):
                break
            await asyncio.sleep(0.02)
        assert reason(v, token(k2, iss)) is Reason.OK
        assert reason(v, token(k1, iss)) is Reason.KEY_NOT_FOUND
        # A bad new file (not JSON, then keys all unusable): old keys kept, failure counted.
        failures = src.state.failures
        _write_atomic(path, b"{not json")
        await asyncio.sleep(0.25)
        assert reason(v, token(k2, iss)) is Reason.OK
        assert src.state.failures == failures + 1  # counted once, not once per poll
        assert src.state.last_error == "not JSON"
        _write_atomic(path, orjson.dumps({"keys": [dict(jwks_of(k1)["keys"][0],
                                                         use="enc")]}))
        await asyncio.sleep(0.25)
        assert reason(v, token(k2, iss)) is Reason.OK
        assert "no usable keys" in (src.state.last_error or "")
        # refresh_for_kid checks the file at once (no need to wait for the poll).
        _write_atomic(path, orjson.dumps(jwks_of(k1, k2)))
        assert await src.refresh_for_kid("k1") is True
        assert src.state.last_error is None and src.state.key_count == 2
        assert "failure" in rec.results() and "success" in rec.results()
    finally:
        await src.stop()


@arun
async def test_file_source_bad_file_at_start_raises(tmp_path: Path) -> None:
    iss = "https://idp.example.test/"
    path = tmp_path / "jwks.json"
    for content in (None, b"[]", b"garbage", orjson.dumps({"keys": []})):
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(content)
        src = FileKeySource(ProviderConfig(name="f", issuer=iss, key_source="jwks_file",
                                           jwks_file=str(path)), Verifier(iss),
                            path=str(path))
        with pytest.raises(KeySourceError, match="jwks_file"):
            await src.start()
        await src.stop()


# ---------------------------------------------------------------------------------------------
# Remote: happy path, rotation, refresh schedule
# ---------------------------------------------------------------------------------------------


@arun
async def test_fetch_verifies_tokens_and_reports_state() -> None:
    k1 = key("k1")
    rec = Recorder()
    async with IdP(keys=jwks_of(k1), max_age=120) as idp, source(idp, metrics=rec) as src:
        assert reason(src.verifier, token(k1, idp.issuer)) is Reason.OK
        st = src.state
        assert st.ready and st.key_count == 1 and st.kind == "jwks_uri"
        assert st.location == idp.jwks_url and st.ttl == 120
        assert st.last_error is None and st.failures == 0 and st.fetches == 1
        assert st.last_success is not None and abs(st.last_success - time.time()) < 5
        assert rec.results() == ["success"] and rec.key_counts[-1] == ("idp", 1)
        assert rec.ages and rec.ages[-1][1] < 1
        assert idp.hits["/jwks"] == 1


@arun
async def test_rotation_new_kid_after_one_refetch_removed_kid_rejected_after_refresh() -> None:
    k1, k2 = key("k1"), key("k2")
    clock = Clock()
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, clock=clock) as src:
        v = src.verifier
        t1, t2 = token(k1, idp.issuer), token(k2, idp.issuer)
        assert reason(v, t1) is Reason.OK
        assert v.verify(t1, now=NOW).cached  # now in the verified-token cache
        # The IdP publishes k2 and starts signing with it.
        idp.set_keys(k1, k2)
        clock.advance(FAST.min_refresh_interval)
        r = v.verify(t2, now=NOW)
        assert r.reason is Reason.KEY_NOT_FOUND and r.kid == "k2"
        assert await src.refresh_for_kid("k2") is True
        assert idp.hits["/jwks"] == 2  # exactly one refetch
        assert reason(v, t2) is Reason.OK
        assert reason(v, t1) is Reason.OK
        # k1 is retired: on the next refresh it stops validating, cache included.
        idp.set_keys(k2)
        assert await src.refresh() is True
        assert reason(v, t1) is Reason.KEY_NOT_FOUND
        assert reason(v, t2) is Reason.OK


@arun
async def test_applied_keys_are_the_document_in_use() -> None:
    k1, k2 = key("k1"), key("k2")
    clock = Clock()
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, clock=clock) as src:
        assert src.applied_keys == tuple(jwks_of(k1)["keys"])
        idp.set_keys(k1, k2)
        assert await src.refresh() is True
        assert src.applied_keys == tuple(jwks_of(k1, k2)["keys"])
        idp.fault = "500"
        clock.advance(FAST.max_stale)
        assert src.expire_stale() is True
        assert src.applied_keys is None  # dropped: no document vouched for any more


@arun
async def test_unchanged_key_set_keeps_the_token_cache() -> None:
    k1 = key("k1")
    async with IdP(keys=jwks_of(k1)) as idp, source(idp) as src:
        t1 = token(k1, idp.issuer)
        assert reason(src.verifier, t1) is Reason.OK
        assert await src.refresh() is True
        assert src.verifier.verify(t1, now=NOW).cached


@arun
async def test_background_refresh_before_expiry_picks_up_rotation() -> None:
    k1, k2 = key("k1"), key("k2")
    cache = JwksCacheConfig(ttl=0.3, min_ttl=0.1, min_refresh_interval=0.1,
                            max_stale=60, timeout=1)
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, cache=cache) as src:
        idp.set_keys(k2)
        await asyncio.sleep(0.6)  # refresh runs at 75-85 % of the 0.3 s TTL
        # No unknown-kid miss was needed: the background refresh swapped the keys.
        assert src.verifier.has_kid("k2") and not src.verifier.has_kid("k1")
        assert 2 <= idp.hits["/jwks"] <= 5
        assert src.state.age is not None and src.state.age < 0.3


@pytest.mark.parametrize(("cache_control", "ttl"), [
    ("max-age=1", 30.0), ("max-age=45", 45.0), ("max-age=86400", 600.0), (None, 600.0)])
@arun
async def test_max_age_is_clamped_to_configured_bounds(cache_control: str | None,
                                                       ttl: float) -> None:
    async with IdP(keys=jwks_of(key("k1"))) as idp:
        idp.cache_control = cache_control
        src = await remote(idp)
        await src.stop()
        assert src.state.ttl == ttl


# ---------------------------------------------------------------------------------------------
# Remote: hostile or broken IdP
# ---------------------------------------------------------------------------------------------

BROKEN = [
    ("500", "http 500"),
    ("404", "http 404"),
    ("slow", "timeout"),
    ("trickle", "timeout"),
    ("garbage", "not JSON"),
    ("not_jwks", "not a JWKS"),
    ("empty_keys", "no usable keys"),
    ("huge", "max_bytes"),
    ("huge_chunked", "max_bytes"),
    ("gzip_bomb", "content-encoding"),
    ("redirect", "redirect refused"),
    ("drop", "connection error"),
]


@pytest.mark.parametrize(("fault", "error"), BROKEN, ids=[f for f, _ in BROKEN])
@arun
async def test_broken_idp_keeps_last_good_keys(fault: str, error: str) -> None:
    k1 = key("k1")
    rec = Recorder()
    async with IdP(keys=jwks_of(k1), slow_seconds=2.0) as idp, source(idp, metrics=rec) as src:
        v = src.verifier
        t1 = token(k1, idp.issuer)
        idp.fault = fault
        started = time.monotonic()
        assert await src.refresh() is False
        assert time.monotonic() - started < FAST.timeout + 0.5  # bounded by timeout
        st = src.state
        assert st.failures == 1 and st.consecutive_failures == 1
        assert error in (st.last_error or ""), st.last_error
        assert rec.results() == ["success", "failure"]
        assert src.ready and v.key_count == 1
        assert reason(v, t1) is Reason.OK  # stale-while-error
        if fault == "redirect":
            assert idp.hits["/jwks-redirected"] == 0  # never followed
        idp.fault = "ok"
        assert await src.refresh() is True
        assert src.state.consecutive_failures == 0 and src.state.last_error is None


@arun
async def test_idp_down_keeps_keys_then_recovers() -> None:
    k1 = key("k1")
    idp = await IdP(keys=jwks_of(k1)).start()
    src = await remote(idp)
    try:
        await idp.stop()
        assert await src.refresh() is False
        assert "connection error" in (src.state.last_error or "")
        assert reason(src.verifier, token(k1, idp.issuer)) is Reason.OK
        await idp.start()  # same port
        assert await src.refresh() is True
    finally:
        await src.stop()
        await idp.stop()


@pytest.mark.parametrize("bad", ["enc", "rsa1024", "x25519"])
@arun
async def test_document_with_only_unusable_keys_is_a_failure(
              bad: str, caplog: pytest.LogCaptureFixture) -> None:
    k1, weak = key("k1"), key("weak", "RS256", rsa_bits=1024)
    async with IdP(keys=jwks_of(k1)) as idp, source(idp) as src:
        v = src.verifier
        if bad == "enc":
            idp.set_keys(dict(jwks_of(key("k2"))["keys"][0], use="enc"))
        elif bad == "rsa1024":
            idp.set_keys(weak)
        else:
            idp.set_keys({"kty": "OKP", "crv": "X25519", "kid": "x",
                          "x": "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo"})
        with caplog.at_level(logging.WARNING, logger="fastgate.jwks"):
            assert await src.refresh() is False
        assert "no usable keys (1 skipped)" in (src.state.last_error or "")
        assert src.state.failures == 1
        skipped = [r for r in caplog.records if "key kid=" in r.getMessage()]
        assert skipped, caplog.text  # the verifier's reason is logged
        assert reason(v, token(k1, idp.issuer)) is Reason.OK  # old keys kept
        # Mixed with a good key: the good one is used, the bad one skipped and logged.
        good = jwks_of(key("k3"))["keys"]
        idp.set_keys({"keys": good + idp.keys["keys"]})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastgate.jwks"):
            assert await src.refresh() is True
        assert v.key_count == 1 and v.has_kid("k3")
        assert any("key kid=" in r.getMessage() for r in caplog.records)


@arun
async def test_too_many_keys_is_a_failure() -> None:
    k1 = key("k1")
    cache = JwksCacheConfig(max_bytes=1 << 20, timeout=1)
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, cache=cache) as src:
        one = jwks_of(k1)["keys"][0]
        idp.set_keys({"keys": [dict(one, kid=f"k{i}") for i in range(101)]})
        assert await src.refresh() is False
        assert "too many keys" in (src.state.last_error or "")
        assert src.verifier.key_count == 1


# ---------------------------------------------------------------------------------------------
# Unknown kid: single-flight, rate limit, negative cache, bounded wait
# ---------------------------------------------------------------------------------------------


@arun
async def test_unknown_kid_single_flight() -> None:
    k1, k2 = key("k1"), key("k2")
    cache = JwksCacheConfig(timeout=2, min_refresh_interval=0.1)
    async with IdP(keys=jwks_of(k1), slow_seconds=0.2) as idp, source(idp, cache=cache) as src:
        await asyncio.sleep(0.15)  # past min_refresh_interval
        idp.set_keys(k1, k2)
        idp.fault = "slow"  # every concurrent miss arrives while the fetch is open
        hits = idp.hits["/jwks"]
        results = await asyncio.gather(*(src.refresh_for_kid("k2") for _ in range(100)))
        assert all(results)
        assert idp.hits["/jwks"] - hits == 1


@arun
async def test_unknown_kid_negative_cache_and_rate_limit() -> None:
    k1 = key("k1")
    clock = Clock()
    cache = JwksCacheConfig(timeout=1, min_refresh_interval=10)
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, cache=cache, clock=clock) as src:
        assert idp.hits["/jwks"] == 1
        # Right after start-up the kid still gets its one refetch: the start-up
        # fetch is not a kid refetch.
        assert await src.refresh_for_kid("nope") is False  # one fetch, kid missing
        assert idp.hits["/jwks"] == 2
        # Within min_refresh_interval of that refetch: no fetch at all.
        assert await src.refresh_for_kid("nope-2") is False
        assert idp.hits["/jwks"] == 2
        clock.advance(10)
        assert await src.refresh_for_kid("nope") is False  # known missing: no fetch
        assert idp.hits["/jwks"] == 2
        assert await src.refresh_for_kid("other") is False  # a new kid may fetch
        assert idp.hits["/jwks"] == 3
        clock.advance(NEGATIVE_KID_TTL_INTERVALS * 10)  # negative entries expire
        assert await src.refresh_for_kid("nope") is False
        assert idp.hits["/jwks"] == 4
        # A key set that changes clears the negative cache.
        k2 = key("k2")
        clock.advance(10)
        assert await src.refresh_for_kid("other") is False
        assert idp.hits["/jwks"] == 5
        idp.set_keys(k1, k2)
        clock.advance(10)
        assert await src.refresh_for_kid("k2") is True
        idp.set_keys(k1, k2, key("other"))
        clock.advance(10)
        assert await src.refresh_for_kid("other") is True
        assert idp.hits["/jwks"] == 7
        # Kids that can never be real never fetch.
        clock.advance(10)
        assert await src.refresh_for_kid("") is False
        assert await src.refresh_for_kid("x" * 1000) is False
        assert idp.hits["/jwks"] == 7


@arun
async def test_kid_miss_budget_counts_kid_refetches_not_scheduled_ones() -> None:
    k1, k2, k3 = key("k1"), key("k2"), key("k3")
    clock = Clock()
    cache = JwksCacheConfig(timeout=1, min_refresh_interval=10)
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, cache=cache, clock=clock) as src:
        assert idp.hits["/jwks"] == 1  # the start-up fetch, this very instant
        # The IdP publishes k2 and signs with it at once: one refetch, accepted.
        idp.set_keys(k1, k2)
        assert await src.refresh_for_kid("k2") is True
        assert idp.hits["/jwks"] == 2
        clock.advance(10)
        # A scheduled refresh (the background loop's own fetch) ...
        assert await src.refresh() is True
        assert idp.hits["/jwks"] == 3
        # ... does not use up the budget: a kid published right after it is fetched.
        idp.set_keys(k1, k2, k3)
        assert await src.refresh_for_kid("k3") is True
        assert idp.hits["/jwks"] == 4
        assert reason(src.verifier, token(k3, idp.issuer)) is Reason.OK
        # The budget is spent for this interval: a kid flood costs nothing more, and
        # another scheduled refresh in between does not reopen it.
        rng = random.Random(9)
        flood = [f"{rng.getrandbits(64):016x}" for _ in range(200)]
        assert not any(await asyncio.gather(*(src.refresh_for_kid(k) for k in flood)))
        assert idp.hits["/jwks"] == 4
        assert await src.refresh() is True
        assert idp.hits["/jwks"] == 5
        assert await src.refresh_for_kid("late") is False
        assert idp.hits["/jwks"] == 5
        clock.advance(10)  # the next interval: one refetch again, then nothing
        assert not any(await asyncio.gather(*(src.refresh_for_kid(k) for k in flood)))
        assert idp.hits["/jwks"] == 6


@arun
async def test_unknown_kid_flood_costs_one_fetch_per_interval() -> None:
    k1 = key("k1")
    interval = 0.2
    cache = JwksCacheConfig(ttl=600, min_refresh_interval=interval, timeout=1)
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, cache=cache) as src:
        hits = idp.hits["/jwks"]
        started = time.monotonic()
        rng = random.Random(7)
        for _ in range(10):  # 1 000 random kids over about a second
            kids = [f"{rng.getrandbits(64):016x}" for _ in range(100)]
            results = await asyncio.gather(*(src.refresh_for_kid(k) for k in kids))
            assert not any(results)
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        fetched = idp.hits["/jwks"] - hits
        assert 1 <= fetched <= 1 + elapsed / interval
        assert src.state.failures == 0
        assert reason(src.verifier, token(k1, idp.issuer)) is Reason.OK


@arun
async def test_unknown_kid_wait_is_bounded() -> None:
    k1, k2 = key("k1"), key("k2")
    cache = JwksCacheConfig(timeout=3, min_refresh_interval=0.05)
    async with (IdP(keys=jwks_of(k1), slow_seconds=0.6) as idp,
                source(idp, cache=cache, kid_wait=0.1) as src):
        await asyncio.sleep(0.1)
        idp.set_keys(k1, k2)
        idp.fault = "slow"
        started = time.monotonic()
        assert await src.refresh_for_kid("k2") is False  # gave up waiting ...
        assert time.monotonic() - started < 0.4
        assert await src.wait_ready(0)  # (still has k1)
        for _ in range(100):  # ... but the fetch went on and landed
            if src.verifier.has_kid("k2"):
                break
            await asyncio.sleep(0.02)
        assert src.verifier.has_kid("k2")
        assert await src.refresh_for_kid("k2") is True


# ---------------------------------------------------------------------------------------------
# Staleness and cold start
# ---------------------------------------------------------------------------------------------


@arun
async def test_max_stale_drops_keys_then_jwks_unavailable_until_recovery() -> None:
    k1 = key("k1")
    clock = Clock()
    rec = Recorder()
    cache = JwksCacheConfig(ttl=600, min_refresh_interval=30, max_stale=3600, timeout=1)
    async with (IdP(keys=jwks_of(k1)) as idp,
                source(idp, cache=cache, clock=clock, metrics=rec) as src):
        v, t1 = src.verifier, token(k1, idp.issuer)
        idp.fault = "500"
        clock.advance(3000)
        assert await src.refresh() is False
        assert src.ready and reason(v, t1) is Reason.OK  # stale but within max_stale
        assert src.expire_stale() is False
        clock.advance(601)
        assert src.expire_stale() is True
        assert not src.ready and v.key_count == 0
        assert served(src, t1) is Reason.JWKS_UNAVAILABLE
        assert rec.key_counts[-1] == ("idp", 0)
        assert await src.wait_ready(0.05) is False
        idp.fault = "ok"
        assert await src.refresh() is True
        assert src.ready and reason(v, t1) is Reason.OK
        # A failed fetch past max_stale drops the keys too (no separate timer needed).
        idp.fault = "garbage"
        clock.advance(3601)
        assert await src.refresh() is False
        assert not src.ready


@arun
async def test_cold_start_with_idp_down_then_recovery() -> None:
    k1 = key("k1")
    port = free_port()
    idp = IdP(keys=jwks_of(k1), port=port)
    cache = JwksCacheConfig(min_refresh_interval=0.2, timeout=0.5)
    rec = Recorder()
    src = await remote(idp, cache=cache, metrics=rec, ready=False)
    v, t1 = src.verifier, token(k1, idp.issuer)
    try:
        assert await src.wait_ready(0.3) is False
        assert not src.ready
        assert reason(v, t1) is Reason.JWKS_UNAVAILABLE
        assert served(src, t1) is Reason.JWKS_UNAVAILABLE
        assert src.state.failures >= 1 and "failure" in rec.results()
        assert await src.refresh_for_kid("k1") is False
        await idp.start()
        assert await src.wait_ready(3.0) is True  # retried in the background
        assert reason(v, t1) is Reason.OK
    finally:
        await src.stop()
        await idp.stop()


@arun
async def test_stop_during_a_fetch_is_clean() -> None:
    async with IdP(keys=jwks_of(key("k1")), slow_seconds=5) as idp:
        idp.fault = "slow"
        src = await remote(idp, cache=JwksCacheConfig(timeout=5), ready=False)
        waiter = asyncio.ensure_future(src.wait_ready(10))
        await asyncio.sleep(0.1)
        await src.stop()
        assert await waiter is False  # released by stop, not by its timeout
        assert await src.refresh_for_kid("k1") is False


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


@arun
async def test_discovery_happy_path() -> None:
    k1 = key("k1")
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, kind="discovery") as src:
        assert src.jwks_uri == idp.jwks_url
        assert idp.hits["/.well-known/openid-configuration"] == 1
        assert reason(src.verifier, token(k1, idp.issuer)) is Reason.OK
        assert await src.refresh() is True  # later fetches reuse the jwks_uri
        assert idp.hits["/.well-known/openid-configuration"] == 1
        assert idp.hits["/jwks"] == 2


@pytest.mark.parametrize(("fault", "error"), [
    ("issuer_mismatch", "issuer mismatch"),
    ("no_jwks_uri", "no jwks_uri"),
    ("garbage", "not JSON"),
    ("redirect", "redirect refused"),
    ("500", "http 500"),
])
@arun
async def test_discovery_refused(fault: str, error: str) -> None:
    async with IdP(keys=jwks_of(key("k1"))) as idp:
        idp.discovery_fault = fault
        src = await remote(idp, kind="discovery", ready=False)
        try:
            assert await src.wait_ready(0.3) is False
            assert error in (src.state.last_error or ""), src.state.last_error
            assert src.verifier.key_count == 0
            assert idp.hits["/jwks"] == 0  # the JWKS of an unverified issuer is never used
        finally:
            await src.stop()


@arun
async def test_discovery_issuer_is_compared_exactly() -> None:
    async with IdP(keys=jwks_of(key("k1"))) as idp:
        cfg = ProviderConfig(name="idp", issuer=idp.issuer + "/", key_source="discovery",
                             jwks_cache=FAST)
        src = build_key_source(cfg, verifier_for(idp.issuer + "/"))
        await src.start()
        try:
            assert await src.wait_ready(0.3) is False
            error = src.state.last_error or ""
            assert "issuer mismatch" in error
            # Both sides, so the operator sees which one to fix.
            assert f"configured {idp.issuer}/" in error
            assert f"discovered {idp.issuer}" in error
        finally:
            await src.stop()


@arun
async def test_rediscovery_after_repeated_failures() -> None:
    k1 = key("k1")
    async with IdP(keys=jwks_of(k1)) as idp, source(idp, kind="discovery") as src:
        idp.gone_paths.add("/jwks")  # the IdP moves its keys
        idp.jwks_path = "/jwks-v2"
        assert await src.refresh() is False
        assert await src.refresh() is False
        assert idp.hits["/.well-known/openid-configuration"] == 1
        assert await src.refresh() is True  # re-discovered after two failures
        assert idp.hits["/.well-known/openid-configuration"] == 2
        assert src.jwks_uri == idp.url + "/jwks-v2"
        # A failed re-discovery keeps the known jwks_uri.
        idp.gone_paths.add("/jwks-v2")
        idp.discovery_fault = "issuer_mismatch"
        for _ in range(3):
            assert await src.refresh() is False
        assert src.jwks_uri == idp.url + "/jwks-v2"
        assert src.ready


def test_works_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        k1 = key("k1")
        async with IdP(keys=jwks_of(k1)) as idp:
            src = await remote(idp)
            try:
                assert reason(src.verifier, token(k1, idp.issuer)) is Reason.OK
            finally:
                await src.stop()

    uvloop.run(asyncio.wait_for(main(), 10))
