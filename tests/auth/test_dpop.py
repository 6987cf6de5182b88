"""DPoP (RFC 9449), one-time tokens (RFC 7523 §3 item 7) and the replay store, end to end:
a real gateway on loopback, a real aiohttp upstream, proofs signed with `cryptography`
(tests/factory.py, independent of the verifier), and a real redis-server for the shared store.

Every reject asserts the status, the reason, the challenge and that the upstream got nothing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import pytest

from fastgate.app import Gateway
from fastgate.config import (
    AuthConfig,
    DpopConfig,
    GatewayConfig,
    ProviderConfig,
    RedisStoreConfig,
    ReplayStoreConfig,
    RouteConfig,
    RouteMatch,
    UpstreamConfig,
)
from fastgate.errors import ConfigError
from fastgate.token._verify import DpopRule, jwk_thumbprint, normalize_htu
from fastgate.token.reasons import Reason
from tests.factory import (
    AUDIENCE,
    ISSUER,
    SigningKey,
    ath,
    default_claims,
    generate,
    jwks_of,
    key_for,
    make_proof,
    make_token,
    public_jwk,
    thumbprint,
)
from tests.gateway_fixtures import (
    EchoUpstream,
    Loop,
    RawResponse,
    gather_limited,
    http_request,
    raw_request,
    start_gateway,
)
from tests.redis_fixtures import RedisServer

HOST = "gw.test"
ALGS = ("ES256", "EdDSA", "RS256", "PS256")


@pytest.fixture(scope="module")
def client_keys() -> dict[str, SigningKey]:
    """One client (proof) key per kind the issue names: EC, Ed25519, RSA (RS and PS)."""
    return {"ES256": generate("ES256", "c-es"), "EdDSA": generate("EdDSA", "c-ed"),
            "RS256": generate("RS256", "c-rs"), "PS256": generate("RS256", "c-ps")}


def _route(name: str, prefix: str, **auth: Any) -> RouteConfig:
    return RouteConfig(name, RouteMatch(path_prefix=prefix), "app",
                       auth=AuthConfig(providers=("main",), **auth))


def dpop_config(upstream_url: str, *, store: ReplayStoreConfig | None = None,
                max_age: float = 60.0, clock_skew: float = 5.0) -> GatewayConfig:
    dpop = DpopConfig(mode="required", algorithms=ALGS, max_age=max_age,
                      clock_skew=clock_skew)
    provider = ProviderConfig("main", ISSUER, "jwks", jwks=jwks_of(key_for("RS256")),
                              audiences=(AUDIENCE,), algorithms=("RS256",),
                              max_lifetime=3600.0)
    return GatewayConfig(
        admin=None,
        upstreams={"app": UpstreamConfig("app", upstream_url, read_timeout=5.0)},
        providers={"main": provider},
        routes=(
            _route("dpop", "/dpop", dpop=dpop),
            _route("either", "/either", dpop=replace(dpop, mode="allowed")),
            _route("external", "/ext", dpop=replace(
                dpop, external_url="https://api.example.com")),
            _route("nonce", "/nonce", dpop=replace(dpop, nonce=True)),
            _route("once", "/once", one_time=True),
            _route("once-dpop", "/od", one_time=True, dpop=dpop),
            _route("plain", "/plain"),
            _route("hidden", "/hidden", dpop=dpop, forward_token=False),
        ),
        replay_store=store or ReplayStoreConfig(),
    )


def bound_token(client: SigningKey | None, **claims: Any) -> str:
    """An access token from the IdP; bound to ``client``'s key (cnf.jkt) unless None."""
    body = default_claims(now=time.time(), **claims)
    if client is not None:
        body["cnf"] = {"jkt": thumbprint(public_jwk(client.private))}
    return make_token(key_for("RS256"), body)


def proof_for(client: SigningKey, token: str | None, path: str, *, method: str = "GET",
              host: str = HOST, scheme: str = "http", **kw: Any) -> str:
    alg = "PS256" if client.kid == "c-ps" else None
    kw.setdefault("iat", time.time())
    return make_proof(client, htm=method, htu=f"{scheme}://{host}{path}", token=token,
                      alg=alg, **kw)


def dpop_headers(token: str, proof: str | None) -> list[tuple[str, str]]:
    headers = [("Authorization", f"DPoP {token}")]
    if proof is not None:
        headers.append(("DPoP", proof))
    return headers


async def send(gw: Gateway, path: str, headers: list[tuple[str, str]], *,
               method: str = "GET") -> RawResponse:
    return await raw_request(gw.port, http_request(method, path, headers, host=HOST))


def run(loop: Loop, config: GatewayConfig, *calls: tuple[str, list[tuple[str, str]]]
        ) -> list[RawResponse]:
    async def go() -> list[RawResponse]:
        gw = await start_gateway(config)
        try:
            return [await send(gw, path, headers) for path, headers in calls]
        finally:
            await gw.stop()

    return loop.run(go())


def assert_dpop_reject(resp: RawResponse, reason: Reason, error: str = "invalid_dpop_proof"
                       ) -> None:
    assert resp.status == 401, resp.body
    assert resp.json() == {"error": error, "reason": reason.label}
    assert resp.header("WWW-Authenticate") == (
        f'DPoP realm="fastgate", error="{error}", algs="{" ".join(ALGS)}"')


# -- accepted -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ES256", "EdDSA", "RS256", "PS256"])
def test_valid_proof_is_admitted_token_forwarded_untouched(
        loop: Loop, echo: EchoUpstream, client_keys: dict[str, SigningKey], kind: str) -> None:
    client = client_keys[kind]
    token = bound_token(client)
    proof = proof_for(client, token, "/dpop/x")
    (resp,) = run(loop, dpop_config(echo.url), ("/dpop/x?q=1", dpop_headers(token, proof)))
    assert resp.status == 200, resp.body
    rec = echo.records[-1]
    assert rec.target == "/dpop/x?q=1"  # §4.3 check 9 ignores the query
    assert rec.header_values("Authorization") == [f"DPoP {token}"]
    assert rec.header_values("DPoP") == [proof]


def test_forward_token_false_removes_token_and_proof(
        loop: Loop, echo: EchoUpstream, client_keys: dict[str, SigningKey]) -> None:
    client = client_keys["ES256"]
    token = bound_token(client)
    (resp,) = run(loop, dpop_config(echo.url), ("/hidden/x", dpop_headers(
        token, proof_for(client, token, "/hidden/x"))))
    assert resp.status == 200
    names = echo.records[-1].header_names()
    assert "authorization" not in names and "dpop" not in names


def test_cached_token_still_needs_a_fresh_proof_each_request(
        loop: Loop, echo: EchoUpstream, client_keys: dict[str, SigningKey]) -> None:
    """The verified-token cache is never a way around the proof: the same (cached) token
    with a fresh proof passes, with the same proof again, with no proof or a proof for
    another request it is rejected."""
    client = client_keys["ES256"]
    token = bound_token(client)
    first = proof_for(client, token, "/dpop/a")
    calls = [("/dpop/a", dpop_headers(token, first)),
             ("/dpop/a", dpop_headers(token, proof_for(client, token, "/dpop/a"))),
             ("/dpop/a", dpop_headers(token, first)),
             ("/dpop/a", dpop_headers(token, None)),
             ("/dpop/a", dpop_headers(token, proof_for(client, token, "/dpop/b")))]
    before = len(echo.records)
    ok1, ok2, replayed, missing, other = run(loop, dpop_config(echo.url), *calls)
    assert ok1.status == ok2.status == 200
    assert_dpop_reject(replayed, Reason.DPOP_PROOF_REPLAYED)
    assert_dpop_reject(missing, Reason.DPOP_PROOF_INVALID)
    assert_dpop_reject(other, Reason.DPOP_PROOF_INVALID)
    assert len(echo.records) - before == 2


# -- each §4.3 check failing alone ----------------------------------------------------------


def _bad_proofs(client: SigningKey, other: SigningKey, token: str
                ) -> dict[str, tuple[list[tuple[str, str]], Reason]]:
    now = time.time()
    p = "/dpop/x"
    proof = proof_for(client, token, p)
    head, payload, sig = proof.split(".")
    unsigned = _b64({"typ": "dpop+jwt", "alg": "none", "jwk": public_jwk(client.private)})
    cases: dict[str, tuple[list[tuple[str, str]], Reason]] = {
        # check 1: exactly one DPoP header
        "two proofs": ([("Authorization", f"DPoP {token}"), ("DPoP", proof), ("DPoP", proof)],
                       Reason.DPOP_PROOF_INVALID),
        # check 2: a JWT
        "not a jwt": (dpop_headers(token, "not-a-jwt"), Reason.DPOP_PROOF_INVALID),
        "two segments": (dpop_headers(token, f"{head}.{payload}"), Reason.DPOP_PROOF_INVALID),
        "padded": (dpop_headers(token, f"{head}=.{payload}.{sig}"), Reason.DPOP_PROOF_INVALID),
        # check 4: typ
        "typ jwt": (dpop_headers(token, proof_for(client, token, p, header={"typ": "JWT"})),
                    Reason.DPOP_PROOF_INVALID),
        "typ missing": (dpop_headers(token, proof_for(client, token, p, header={"typ": None})),
                        Reason.DPOP_PROOF_INVALID),
        # check 5: asymmetric and allowed
        "alg none": (dpop_headers(token, unsigned + "." + payload + "."),
                     Reason.DPOP_PROOF_INVALID),
        "alg not allowed": (dpop_headers(token, make_proof(
            generate("ES384", "c-384"), htm="GET", htu=f"http://{HOST}{p}", token=token,
            iat=now)), Reason.DPOP_PROOF_INVALID),
        # check 6: signature with the header's jwk
        "signature": (dpop_headers(token, f"{head}.{payload}.{sig[:-4]}AAAA"),
                      Reason.DPOP_PROOF_INVALID),
        "jwk of another key": (dpop_headers(token, proof_for(
            client, token, p, header={"jwk": public_jwk(other.private)})),
            Reason.DPOP_PROOF_INVALID),
        # check 7: no private key in the header
        "private jwk": (dpop_headers(token, proof_for(client, token, p, header={
            "jwk": {**public_jwk(client.private), "d": "AAAA"}})), Reason.DPOP_PROOF_INVALID),
        # check 8, 9: the request
        "htm": (dpop_headers(token, proof_for(client, token, p, method="POST")),
                Reason.DPOP_PROOF_INVALID),
        "htu path": (dpop_headers(token, proof_for(client, token, "/dpop/y")),
                     Reason.DPOP_PROOF_INVALID),
        "htu host": (dpop_headers(token, proof_for(client, token, p, host="evil.test")),
                     Reason.DPOP_PROOF_INVALID),
        "htu scheme": (dpop_headers(token, proof_for(client, token, p, scheme="https")),
                       Reason.DPOP_PROOF_INVALID),
        # check 11: iat window (max_age 60 s, skew 5 s)
        "iat old": (dpop_headers(token, proof_for(client, token, p, iat=now - 120)),
                    Reason.DPOP_PROOF_INVALID),
        "iat future": (dpop_headers(token, proof_for(client, token, p, iat=now + 60)),
                       Reason.DPOP_PROOF_INVALID),
        # check 12: ath
        "ath of another token": (dpop_headers(token, proof_for(
            client, bound_token(client, sub="u2"), p)), Reason.DPOP_PROOF_INVALID),
        # the binding: the token's cnf.jkt is another key's
        "jkt": (dpop_headers(bound_token(other), proof_for(client, bound_token(other), p)),
                Reason.DPOP_BINDING_MISMATCH),
        "token not bound": (dpop_headers(bound_token(None), proof_for(
            client, bound_token(None), p)), Reason.DPOP_BINDING_MISMATCH),
    }
    # check 3: every required claim
    for claim in ("jti", "htm", "htu", "iat", "ath"):
        cases[f"no {claim}"] = (dpop_headers(token, proof_for(client, token, p, drop=(claim,))),
                                Reason.DPOP_PROOF_INVALID)
    return cases


def _b64(obj: dict[str, Any]) -> str:
    from tests.factory import b64u_json

    return b64u_json(obj)


def test_each_proof_check_failing_alone_is_rejected(
        loop: Loop, echo: EchoUpstream, client_keys: dict[str, SigningKey]) -> None:
    client, other = client_keys["ES256"], client_keys["EdDSA"]
    token = bound_token(client)
    cases = _bad_proofs(client, other, token)
    # the "token not bound" and "jkt" cases carry their own tokens (in the headers)
    before = len(echo.records)
    results = run(loop, dpop_config(echo.url), *(("/dpop/x", h) for h, _ in cases.values()))
    for (name, (_, reason)), resp in zip(cases.items(), results, strict=True):
        try:
            assert_dpop_reject(resp, reason)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None
    assert len(echo.records) == before  # the upstream got none of them
    # and the proof that all of them were built from is fine on its own
    (ok,) = run(loop, dpop_config(echo.url),
                ("/dpop/x", dpop_headers(token, proof_for(client, token, "/dpop/x"))))
    assert ok.status == 200


# -- bearer, required/allowed, external_url ---------------------------------------------------


def test_bound_token_as_bearer_is_rejected_on_every_route(
        loop: Loop, echo: EchoUpstream, client_keys: dict[str, SigningKey]) -> None:
    """RFC 9449 §7.2: a DPoP-bound token without its proof is refused on every route, DPoP
    or not, with Bearer's challenge (the client's scheme)."""
    client = client_keys["ES256"]
    token = bound_token(client)
    bearer = [("Authorization", f"Bearer {token}")]
    before = len(echo.records)
    results = run(loop, dpop_config(echo.url), ("/plain/x", bearer), ("/either/x", bearer),
                  ("/once/x", bearer), ("/plain/x", bearer))  # the last one: a cache hit
    for resp in results:
        assert resp.status == 401
        assert resp.json() == {"error": "invalid_token", "reason": "dpop_binding_mismatch"}
        assert resp.header("WWW-Authenticate") == (
            'Bearer realm="fastgate", error="invalid_token", '
            'error_description="dpop_binding_mismatch"')
    assert len(echo.records) == before


def test_required_refuses_bearer_allowed_accepts_it(
        loop: Loop, echo: EchoUpstream, client_keys: dict[str, SigningKey]) -> None:
    plain = bound_token(None)
    bearer = [("Authorization", f"Bearer {plain}")]
    client = client_keys["EdDSA"]
    token = bound_token(client)
    required, allowed, allowed_dpop = run(
        loop, dpop_config(echo.url), ("/dpop/x", bearer), ("/either/x", bearer),
        ("/either/x", dpop_headers(token, proof_for(client, token, "/either/x"))))
    assert_dpop_reject(required, Reason.DPOP_PROOF_INVALID)
    assert allowed.status == 200 and allowed_dpop.status == 200


def test_htu_uses_external_url_when_configured(
        loop: Loop, echo: EchoUpstream, client_keys: dict[str, SigningKey]) -> None:
    client = client_keys["ES256"]
    token = bound_token(client)
    ext = proof_for(client, token, "/ext/a", host="api.example.com", scheme="https")
    ext_norm = proof_for(client, token, "/ext/./a", host="API.example.com:443", scheme="HTTPS")
    local = proof_for(client, token, "/ext/a")
    ok, ok_norm, wrong = run(loop, dpop_config(echo.url), ("/ext/a", dpop_headers(token, ext)),
                             ("/ext/a", dpop_headers(token, ext_norm)),
                             ("/ext/a", dpop_headers(token, local)))
    assert ok.status == 200 and ok_norm.status == 200  # RFC 3986 §6 normalisation
    assert_dpop_reject(wrong, Reason.DPOP_PROOF_INVALID)


# -- nonces ---------------------------------------------------------------------------------


def test_nonce_flow(loop: Loop, echo: EchoUpstream,
                    client_keys: dict[str, SigningKey]) -> None:
    """RFC 9449 §8: without a nonce -> 401 use_dpop_nonce with DPoP-Nonce; the retry with
    that nonce is admitted; a made-up nonce is refused the same way."""
    client = client_keys["ES256"]
    token = bound_token(client)

    async def go() -> tuple[RawResponse, RawResponse, RawResponse]:
        gw = await start_gateway(dpop_config(echo.url))
        try:
            first = await send(gw, "/nonce/x", dpop_headers(
                token, proof_for(client, token, "/nonce/x")))
            nonce = first.header("DPoP-Nonce")
            assert nonce
            retry = await send(gw, "/nonce/x", dpop_headers(
                token, proof_for(client, token, "/nonce/x", nonce=nonce)))
            bogus = await send(gw, "/nonce/x", dpop_headers(
                token, proof_for(client, token, "/nonce/x", nonce="made-up")))
            return first, retry, bogus
        finally:
            await gw.stop()

    before = len(echo.records)
    first, retry, bogus = loop.run(go())
    for resp in (first, bogus):
        assert_dpop_reject(resp, Reason.DPOP_NONCE_REQUIRED, "use_dpop_nonce")
        assert resp.header("DPoP-Nonce") == first.header("DPoP-Nonce")
    assert retry.status == 200
    assert len(echo.records) - before == 1


# -- one-time tokens --------------------------------------------------------------------------


def test_one_time_token_is_accepted_once(loop: Loop, echo: EchoUpstream) -> None:
    token = bound_token(None, jti="once-1")
    no_jti = bound_token(None)
    bearer = [("Authorization", f"Bearer {token}")]
    before = len(echo.records)
    first, second, missing, elsewhere = run(
        loop, dpop_config(echo.url), ("/once/x", bearer), ("/once/x", bearer),
        ("/once/x", [("Authorization", f"Bearer {no_jti}")]), ("/plain/x", bearer))
    assert first.status == 200
    assert second.status == 401
    assert second.json() == {"error": "invalid_token", "reason": "token_replayed"}
    assert second.header("WWW-Authenticate") == (
        'Bearer realm="fastgate", error="invalid_token", error_description="token_replayed"')
    assert missing.status == 401 and missing.json()["reason"] == "claim_missing"
    assert elsewhere.status == 200  # one_time is the route's rule
    assert len(echo.records) - before == 2


def test_one_time_with_dpop_reports_the_replayed_token(
        loop: Loop, echo: EchoUpstream, client_keys: dict[str, SigningKey]) -> None:
    client = client_keys["ES256"]
    token = bound_token(client, jti="once-2")
    first, fresh_proof = run(
        loop, dpop_config(echo.url),
        ("/od/x", dpop_headers(token, proof_for(client, token, "/od/x"))),
        ("/od/x", dpop_headers(token, proof_for(client, token, "/od/x"))))
    assert first.status == 200
    assert fresh_proof.status == 401 and fresh_proof.json()["reason"] == "token_replayed"


def test_one_time_needs_max_lifetime(tmp_path: Any) -> None:
    from fastgate.config import load_config_text

    text = """
upstreams: {app: {url: "http://127.0.0.1:9"}}
providers: {main: {issuer: "https://i/", jwks: {keys: []}}}
routes: [{name: r, match: {path_prefix: /}, upstream: app,
          auth: {providers: [main], one_time: true}}]
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "<test>")
    assert any("routes[0].auth.one_time: needs max_lifetime on provider 'main'" in e
               for e in info.value.errors)


def test_workers_need_a_shared_store() -> None:
    from fastgate.config import load_config_text

    text = """
workers: 2
upstreams: {app: {url: "http://127.0.0.1:9"}}
providers: {main: {issuer: "https://i/", jwks: {keys: []}}}
routes: [{name: r, match: {path_prefix: /}, upstream: app,
          auth: {providers: [main], dpop: {mode: required}}}]
"""
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "<test>")
    assert any(e.startswith("replay_store: workers is not 1") for e in info.value.errors)
    shared = text + "replay_store: {redis: {url: 'redis://127.0.0.1:6379/0'}}\n"
    config = load_config_text(shared, "<test>")
    assert config.replay_store.redis is not None
    assert config.replay_store.redis.on_error == "fail_closed"


def test_workers_flag_needs_a_shared_store_too(tmp_path: Any) -> None:
    """``fastgate run --workers 2`` overrides a config that said one worker: refused too."""
    import subprocess
    import sys

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("""
listen: 127.0.0.1:0
admin: null
upstreams: {app: {url: "http://127.0.0.1:9"}}
providers: {main: {issuer: "https://i/", jwks: {keys: []}}}
routes: [{name: r, match: {path_prefix: /}, upstream: app,
          auth: {providers: [main], dpop: {mode: required}}}]
""")
    proc = subprocess.run([sys.executable, "-m", "fastgate", "run", "-c", str(cfg),
                           "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "needs replay_store.redis" in proc.stderr and "Traceback" not in proc.stderr


# -- the shared store on Redis ----------------------------------------------------------------


def redis_store(redis: RedisServer, on_error: str = "fail_closed") -> ReplayStoreConfig:
    return ReplayStoreConfig(redis=RedisStoreConfig(redis.url, key_prefix="t:", timeout=0.5,
                                                    on_error=on_error))  # type: ignore[arg-type]


def test_replay_to_another_worker_is_caught(
        loop: Loop, echo: EchoUpstream, redis: RedisServer,
        client_keys: dict[str, SigningKey]) -> None:
    """Two gateways (two workers' worth of stores and connections) on one Redis: a proof
    used at one is refused at the other, and so is a one-time token."""
    client = client_keys["ES256"]
    token = bound_token(client)
    proof = proof_for(client, token, "/dpop/x")
    once = [("Authorization", f"Bearer {bound_token(None, jti='shared-1')}")]

    async def go() -> list[RawResponse]:
        config = dpop_config(echo.url, store=redis_store(redis))
        a, b = await start_gateway(config), await start_gateway(config)
        try:
            return [await send(a, "/dpop/x", dpop_headers(token, proof)),
                    await send(b, "/dpop/x", dpop_headers(token, proof)),
                    await send(a, "/dpop/x", dpop_headers(token, proof)),
                    await send(b, "/once/x", once),
                    await send(a, "/once/x", once)]
        finally:
            await a.stop()
            await b.stop()

    ok, other_worker, same_worker, once_ok, once_again = loop.run(go())
    assert ok.status == 200 and once_ok.status == 200
    assert_dpop_reject(other_worker, Reason.DPOP_PROOF_REPLAYED)
    assert_dpop_reject(same_worker, Reason.DPOP_PROOF_REPLAYED)
    assert once_again.status == 401 and once_again.json()["reason"] == "token_replayed"


def test_nonce_issued_by_one_worker_is_valid_at_another(
        loop: Loop, echo: EchoUpstream, redis: RedisServer,
        client_keys: dict[str, SigningKey]) -> None:
    client = client_keys["ES256"]
    token = bound_token(client)

    async def go() -> tuple[RawResponse, RawResponse]:
        config = dpop_config(echo.url, store=redis_store(redis))
        a, b = await start_gateway(config), await start_gateway(config)
        try:
            first = await send(a, "/nonce/x", dpop_headers(
                token, proof_for(client, token, "/nonce/x")))
            nonce = first.header("DPoP-Nonce")
            assert nonce
            await asyncio.sleep(0.05)  # the nonce's SET is fire-and-forget
            return first, await send(b, "/nonce/x", dpop_headers(
                token, proof_for(client, token, "/nonce/x", nonce=nonce)))
        finally:
            await a.stop()
            await b.stop()

    first, second = loop.run(go())
    assert first.status == 401 and second.status == 200, second.body


@pytest.mark.parametrize("on_error", ["fail_closed", "fail_open"])
def test_redis_stopped_mid_run(loop: Loop, echo: EchoUpstream, redis: RedisServer,
                               client_keys: dict[str, SigningKey], on_error: str) -> None:
    """Redis killed while the gateway runs: fail_closed answers 503 replay_store_unavailable
    (no upstream contact), fail_open admits; when Redis is back, checks work again."""
    client = client_keys["ES256"]
    token = bound_token(client)

    def fresh() -> list[tuple[str, str]]:
        return dpop_headers(token, proof_for(client, token, "/dpop/x"))

    async def go() -> list[RawResponse]:
        gw = await start_gateway(dpop_config(echo.url, store=redis_store(redis, on_error)))
        try:
            out = [await send(gw, "/dpop/x", fresh())]
            redis.stop()
            out.append(await send(gw, "/dpop/x", fresh()))
            redis.start()
            for _ in range(100):  # the store reconnects with backoff
                resp = await send(gw, "/dpop/x", fresh())
                if resp.status != 503:
                    break
                await asyncio.sleep(0.1)
            out.append(resp)
            return out
        finally:
            await gw.stop()

    before = len(echo.records)
    up, down, back = loop.run(go(), timeout=60)
    assert up.status == 200 and back.status == 200
    if on_error == "fail_closed":
        assert down.status == 503
        assert down.json() == {"error": "service_unavailable",
                               "reason": "replay_store_unavailable"}
        assert len(echo.records) - before == 2
    else:
        assert down.status == 200
        assert len(echo.records) - before == 3


def test_redis_hung_costs_the_timeout_not_a_hang(
        loop: Loop, echo: EchoUpstream, redis: RedisServer,
        client_keys: dict[str, SigningKey]) -> None:
    client = client_keys["ES256"]
    token = bound_token(client)

    async def go() -> tuple[RawResponse, float]:
        gw = await start_gateway(dpop_config(echo.url, store=redis_store(redis)))
        try:
            await send(gw, "/dpop/x", dpop_headers(token, proof_for(client, token, "/dpop/x")))
            redis.pause()
            began = time.monotonic()
            try:
                resp = await send(gw, "/dpop/x", dpop_headers(
                    token, proof_for(client, token, "/dpop/x")))
            finally:
                redis.resume()
            return resp, time.monotonic() - began
        finally:
            await gw.stop()

    resp, took = loop.run(go())
    assert resp.status == 503 and resp.json()["reason"] == "replay_store_unavailable"
    assert took < 5.0  # timeout 0.5 s (+ the sweep): bounded, never a hang


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis"])
def test_concurrent_proofs_no_replay_accepted_no_valid_proof_rejected(
        loop: Loop, echo: EchoUpstream, redis: RedisServer,
        client_keys: dict[str, SigningKey], shared: bool) -> None:
    """1,000 concurrent DPoP requests: 500 distinct valid proofs, each sent twice at once
    (on Redis: once to each of two gateways). Exactly one of each pair is admitted."""
    client = client_keys["ES256"]
    token = bound_token(client)
    proofs = [proof_for(client, token, "/dpop/c") for _ in range(500)]
    store = redis_store(redis) if shared else None

    async def go() -> list[RawResponse]:
        config = dpop_config(echo.url, store=store)
        a = await start_gateway(config)
        b = await start_gateway(config) if shared else a
        try:
            calls = []
            for i, proof in enumerate(proofs):
                for gw in (a, b):
                    calls.append(lambda gw=gw, proof=proof: send(
                        gw, "/dpop/c", dpop_headers(token, proof)))
                del i
            return await gather_limited(200, calls)
        finally:
            await a.stop()
            if b is not a:
                await b.stop()

    before = len(echo.records)
    results = loop.run(go(), timeout=120)
    for first, second in zip(results[::2], results[1::2], strict=True):
        statuses = sorted((first.status, second.status))
        assert statuses == [200, 401], (first.body, second.body)
        loser = first if first.status == 401 else second
        assert loser.json()["reason"] == "dpop_proof_replayed"
    assert len(echo.records) - before == 500


# -- the compiled proof check (RFC 9449 §4.3), unit level ---------------------------------------


def test_iat_window_edges(client_keys: dict[str, SigningKey]) -> None:
    client = client_keys["ES256"]
    rule = DpopRule(["ES256"], max_age=60.0, clock_skew=5.0)
    jkt = thumbprint(public_jwk(client.private))
    now = 1_800_000_000.0
    for iat, ok in [(now - 60, True), (now - 61, False), (now + 5, True), (now + 6, False),
                    (now, True)]:
        proof = make_proof(client, htm="GET", htu="https://a.test/x", token="t.t.t", iat=iat)
        result = rule.check(proof, "GET", "https://a.test/x", "t.t.t", jkt, now=now)
        assert result.ok is ok, (iat - now, result)
        if not ok:
            assert result.reason is Reason.DPOP_PROOF_INVALID and result.detail == "proof iat"
    assert rule.window == 65.0


def test_check_reports_jkt_jti_and_nonce(client_keys: dict[str, SigningKey]) -> None:
    client = client_keys["EdDSA"]
    rule = DpopRule(None)
    jwk = public_jwk(client.private)
    proof = make_proof(client, htm="POST", htu="https://a.test/x", token="a.b.c",
                       iat=time.time(), jti="j-1", nonce="n-1")
    result = rule.check(proof, "POST", "https://a.test/x", "a.b.c", thumbprint(jwk))
    assert result.ok and result.jti == "j-1" and result.nonce == "n-1"
    assert result.jkt == thumbprint(jwk) == jwk_thumbprint(jwk)
    assert "ES256" in rule.algs and "HS256" not in rule.algs
    with pytest.raises(ValueError):
        DpopRule(["HS256"])  # a proof is never signed with a shared secret


def test_rfc7638_example_thumbprint() -> None:
    # RFC 7638 §3.1's example key and thumbprint
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
           "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR"
                "1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4"
                "QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbO"
                "pbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csF"
                "Cur-kEgU8awapJzKnqDKgw"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert thumbprint(jwk) == jwk_thumbprint(jwk)  # the test factory agrees


@pytest.mark.parametrize(("uri", "normal"), [
    ("https://A.Example.COM:443/x", "https://a.example.com/x"),
    ("http://a.test:80", "http://a.test/"),
    ("http://a.test:8080/a/./b/../c", "http://a.test:8080/a/c"),
    ("https://a.test/%7euser/%2f?q=1#f", "https://a.test/~user/%2F"),
    ("https://[::1]:443/x", "https://[::1]/x"),
    ("ftp://a.test/x", None),
    ("https://user@a.test/x", None),
    ("https://a.test/%zz", None),
])
def test_htu_normalisation(uri: str, normal: str | None) -> None:
    assert normalize_htu(uri) == normal


def test_ath_helper_matches_rfc_definition() -> None:
    from fastgate.token._verify import access_token_hash

    assert access_token_hash("a.b.c") == ath("a.b.c")
