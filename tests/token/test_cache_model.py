"""The verified-token LRU (fastgate/token/_verify.pyx ``TokenCache``) against a reference model.

The cache links its entries with borrowed pointers (an intrusive list next to the dict that
owns them), so a bookkeeping slip would be a use-after-free or a leak, not a wrong answer
one could see in passing. Three checks:

* a property test (hypothesis) drives random put / hit / evict / clear / set_jwks / bad-token
  sequences and compares every answer (ok, cached), ``len()`` and the hit count with a plain
  OrderedDict model; eviction order is observable because a token the model says was evicted
  must come back as a miss;
* reference counts: a linked entry holds exactly one reference to its claims dict (the dict
  a result hands out), so ``sys.getrefcount`` says whether the cache still owns an entry -
  it must while the model has it (never freed while linked) and must not after the model
  dropped it (evicted, cleared, or dropped on a hit whose key was rotated out: no leak);
* a leak check: a million cache operations under ``tracemalloc`` end with the traced memory
  back within a small bound of where it was after warm-up.
"""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc
from collections import OrderedDict
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastgate import Reason, TokenCache, Verifier
from tests.factory import AUDIENCE, ISSUER, NOW, SigningKey, default_claims, generate, make_token

KEYS: list[SigningKey] = [generate("ES256", kid=f"k{i}") for i in range(3)]
TOKENS_PER_KEY = 4
# token index -> (token, kid); every token is valid while its key is published
TOKENS: list[tuple[str, str]] = [
    (make_token(k, default_claims(sub=f"{k.kid}-{j}", jti=f"{k.kid}-{j}")), k.kid)
    for k in KEYS for j in range(TOKENS_PER_KEY)
]


def _flip_signature(token: str) -> str:
    """The same header and payload with a different first signature character: the ECDSA
    ``r`` changes, so the signature cannot verify (signature_invalid)."""
    cut = token.rindex(".") + 1
    first = token[cut]
    return token[:cut] + ("B" if first == "A" else "A") + token[cut + 1:]


BAD: list[str] = [_flip_signature(t) for t, _ in TOKENS]
assert all(b != t for b, (t, _) in zip(BAD, TOKENS, strict=True))


def jwks(kids: list[str]) -> dict[str, Any]:
    by_kid = {k.kid: k for k in KEYS}
    return {"keys": [by_kid[kid].public_jwk for kid in kids]}


class Model:
    """What the cache should hold: token index -> the key generation it was verified with."""

    def __init__(self, max_entries: int) -> None:
        self.max = max_entries
        self.entries: OrderedDict[int, int] = OrderedDict()
        self.published: list[str] = [k.kid for k in KEYS]
        self.gen: dict[str, int] = {k.kid: 0 for k in KEYS}  # bumped when a kid is removed
        self.hits = 0

    def verify(self, i: int) -> tuple[bool, bool]:
        """(ok, cached) for token i, updating the model."""
        kid = TOKENS[i][1]
        alive = kid in self.published
        if i in self.entries:
            if alive and self.entries[i] == self.gen[kid]:
                self.entries.move_to_end(i)
                self.hits += 1
                return True, True
            del self.entries[i]  # the hit's re-check failed: dropped, verified afresh
        if not alive:
            return False, False
        self.entries[i] = self.gen[kid]
        while len(self.entries) > self.max:
            self.entries.popitem(last=False)  # least recently used
        return True, False

    def set_jwks(self, kids: list[str]) -> None:
        for kid in self.published:
            if kid not in kids:
                self.gen[kid] += 1  # its prepared key is retired; re-adding makes a new one
        self.published = list(kids)

    def clear(self) -> None:
        self.entries.clear()


ops = st.one_of(
    st.tuples(st.just("verify"), st.integers(0, len(TOKENS) - 1)),
    st.tuples(st.just("verify"), st.integers(0, len(TOKENS) - 1)),  # twice as likely
    st.tuples(st.just("bad"), st.integers(0, len(BAD) - 1)),
    st.tuples(st.just("clear"), st.just(0)),
    st.tuples(st.just("set_jwks"),
              st.lists(st.sampled_from([k.kid for k in KEYS]), unique=True, max_size=3)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_entries=st.integers(1, 6), sequence=st.lists(ops, max_size=60))
def test_cache_matches_the_model(max_entries: int, sequence: list[tuple[str, Any]]) -> None:
    cache = TokenCache(max_entries)
    v = Verifier(ISSUER, audiences=[AUDIENCE], jwks=jwks([k.kid for k in KEYS]), cache=cache)
    model = Model(max_entries)
    held: dict[int, dict[str, Any]] = {}  # token -> the claims object its entry should own
    for op, arg in sequence:
        if op == "verify":
            r = v.verify(TOKENS[arg][0], now=NOW)
            ok, cached = model.verify(arg)
            assert (r.ok, r.cached) == (ok, cached), (op, arg, r.reason, r.detail)
            if ok and not cached:
                assert r.claims is not None
                held[arg] = r.claims  # a fresh entry owns this very dict
            elif not ok:
                assert r.reason in (Reason.KEY_NOT_FOUND, Reason.JWKS_UNAVAILABLE)
            del r
        elif op == "bad":
            r = v.verify(BAD[arg], now=NOW)
            assert r.reason is Reason.SIGNATURE_INVALID or (
                r.reason in (Reason.KEY_NOT_FOUND, Reason.JWKS_UNAVAILABLE)
                and TOKENS[arg][1] not in model.published)
            del r  # a bad token never touches the LRU (its own negative map)
        elif op == "clear":
            cache.clear()
            model.clear()
        else:
            v.set_jwks(jwks(arg))
            model.set_jwks(arg)
        assert len(cache) == len(model.entries), (op, arg)
        assert cache.hits == model.hits
        for i in held:
            # our `held` entry + getrefcount's argument = 2; +1 while an entry owns it
            # (counted outside the assert: pytest's rewriting would hold one more reference)
            owned = i in model.entries
            count = sys.getrefcount(held[i])
            assert count == 2 + owned, (i, owned, op, arg)


def test_refcounts_detect_an_unowned_or_leaked_entry() -> None:
    """The refcount check above can fail: an entry's claims lose exactly one reference when
    the entry goes, and keep it while it is linked."""
    cache = TokenCache(1)
    v = Verifier(ISSUER, audiences=[AUDIENCE], jwks=jwks(["k0", "k1", "k2"]), cache=cache)
    first = v.verify(TOKENS[0][0], now=NOW).claims
    assert first is not None
    linked = sys.getrefcount(first)  # ours, the entry's, the argument's
    hit = v.verify(TOKENS[0][0], now=NOW)
    assert hit.cached and hit.claims is first
    del hit
    v.verify(TOKENS[1][0], now=NOW)  # evicts token 0 (max_entries=1)
    evicted = sys.getrefcount(first)
    assert (linked, evicted) == (3, 2)
    assert first["sub"] == "k0-0"  # still intact: the evicted entry did not take it along


def test_a_million_operations_do_not_leak() -> None:
    secret = b"s" * 32
    cache = TokenCache(64)
    v = Verifier("https://hs.example.test/", secret=secret, cache=cache)
    hs = SigningKey(alg="HS256", kid="hs", private=secret)
    tokens = [make_token(hs, default_claims(iss="https://hs.example.test/", aud=None,
                                            sub=f"u{i}"), kid=None) for i in range(256)]
    rng = random.Random(1)
    picks = [rng.randrange(len(tokens)) for _ in range(4096)]

    def run(n: int) -> None:
        verify = v.verify
        for j in range(n):
            if j % 50_000 == 49_999:
                cache.clear()
            # mostly a small hot set (hits), the rest evicts and re-verifies
            i = picks[j % len(picks)] if j % 4 else j % 48
            verify(tokens[i], NOW)

    run(50_000)  # warm-up: caches, interned strings, free lists
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        run(1_000_000)
        cache.clear()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert cache.hits > 300_000 and cache.misses > 300_000  # hits, evictions, re-verifies
    # a leaked entry (token bytes + claims dict + header) is several hundred bytes: even one
    # per 10 000 operations would be > 30 KB here
    assert after - before < 32 * 1024, after - before
