"""Every shipped example config is reachable route by route, through a real gateway.

For each example (deploy/examples/gateway.yaml, the Kubernetes ConfigMap's gateway.yaml and the
sidecar example), the routes are kept exactly as shipped; only what cannot exist in a test
is swapped: every upstream points at a local echo server (keeping its base path), every
provider's keys become a local key of an algorithm it allows (issuer, audiences and
algorithms unchanged; HS secrets stay), every API key gets a known raw key. Then one request
per route is built from the route's own match and auth rules (path, method, host, scopes,
claim rules, API key binding, every provider's token for `mode: all`), sent over raw HTTP,
and must be admitted *by that route*: the echo upstream receives it and the route's own
``fastgate_requests_total`` series counts it (an earlier route shadowing it would count it
under its own name instead).

A ``path_regex`` route needs a sample path in SAMPLE_PATHS: a realistic path the example
means the route to serve, e.g. ``/mobile/v1/orders`` (a regex that only matches ``.../``
fails here - regexes are full-matched).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fastgate.config import GatewayConfig, RouteConfig, TokenSource, load_config, parse_config
from fastgate.ops.metrics import metrics_for
from tests.factory import SigningKey, generate, make_proof, make_token, thumbprint
from tests.gateway_fixtures import EchoUpstream, Loop, http_request, raw_request, start_gateway
from tests.redis_fixtures import RedisServer

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"

SECRET = "0123456789abcdef0123456789abcdef0123456789abcdef"
ENV = {
    "ORDERS_UPSTREAM": "http://127.0.0.1:9",  # replaced by the echo upstream below
    "INTERNAL_JWT_SECRET": SECRET,
    "BATCH_API_KEY_SHA256": hashlib.sha256(b"unused").hexdigest(),
}

# (example, route name) -> a path the route is meant to serve (path_regex routes only).
SAMPLE_PATHS: dict[tuple[str, str], str] = {
    ("deploy/examples/gateway.yaml", "mobile"): "/mobile/v1/orders",
}


def _configmap_text(relative: str, name: str | None = None) -> str:
    with open(K8S / relative, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == "ConfigMap"]
    (doc,) = [d for d in docs if name is None or d["metadata"]["name"] == name]
    text: str = doc["data"]["gateway.yaml"]
    return text


def examples() -> dict[str, str]:
    """Example name -> its gateway.yaml text."""
    return {
        "deploy/examples/gateway.yaml": (ROOT / "deploy/examples/gateway.yaml").read_text(
            encoding="utf-8"),
        "deploy/kubernetes/configmap.yaml": _configmap_text("configmap.yaml"),
        "deploy/kubernetes/examples/sidecar.yaml": _configmap_text("examples/sidecar.yaml"),
    }


# -- turning an example into a testable one --------------------------------------------------


def _key_for(algorithms: list[str] | None, kid: str) -> SigningKey:
    for alg in algorithms or ["RS256"]:
        if alg[:2] in ("RS", "PS", "ES") or alg in ("EdDSA", "Ed25519"):
            return generate(alg, kid=kid)
    raise AssertionError(f"no asymmetric alg in {algorithms}")


@dataclass
class Example:
    source: str
    config: GatewayConfig
    keys: dict[str, SigningKey]  # provider -> signing key
    api_keys: dict[str, str]  # API key id -> raw key


def prepare(name: str, text: str, tmp: Path, upstream: EchoUpstream,
            redis_url: str | None = None) -> Example:
    path = tmp / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    (tmp / "jwks.json").write_text('{"keys": []}', encoding="utf-8")  # jwks_file providers
    load_config(path, ENV)  # the example as shipped loads
    doc: dict[str, Any] = yaml.safe_load(text)
    for up in doc["upstreams"].values():
        base = urlsplit(up["url"]).path if "${" not in up["url"] else ""
        up["url"] = upstream.url + base
        up.pop("tls", None)  # an https upstream's tls block: the echo upstream is plain http
    keys: dict[str, SigningKey] = {}
    for pname, provider in doc.get("providers", {}).items():
        if "secret" in provider:
            keys[pname] = SigningKey(alg="HS256", kid=f"{pname}-hs", private=SECRET.encode())
            continue
        for source in ("discovery", "jwks_uri", "jwks_file", "jwks"):
            provider.pop(source, None)
        keys[pname] = _key_for(provider.get("algorithms"), f"{pname}-test")
        provider["jwks"] = {"keys": [keys[pname].public_jwk]}
    if (doc.get("replay_store") or {}).get("redis") is not None:
        # The example's Redis is the test's real redis-server (tests/redis_fixtures.py).
        assert redis_url is not None, "this example needs the redis fixture"
        doc["replay_store"]["redis"]["url"] = redis_url
    api_keys: dict[str, str] = {}
    for entry in (doc.get("api_keys") or {}).get("keys", []):
        raw = f"raw-key-{entry['id']}"
        api_keys[entry["id"]] = raw
        entry["sha256"] = hashlib.sha256(raw.encode()).hexdigest()
    config = parse_config(doc, ENV, str(path))
    return Example(name, config, keys, api_keys)


# -- one request per route --------------------------------------------------------------------


def _set_claim(claims: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = claims
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _path_for(ex: Example, route: RouteConfig) -> str:
    m = route.match
    if m.path is not None:
        return m.path
    if m.path_prefix is not None:
        return m.path_prefix.rstrip("/") + "/probe"
    if m.path_regex is not None:
        sample = SAMPLE_PATHS.get((ex.source, route.name))
        assert sample is not None, (
            f"{ex.source}: route {route.name!r} has path_regex {m.path_regex!r}: add the path "
            "it is meant to serve to SAMPLE_PATHS")
        assert re.fullmatch(m.path_regex, sample), (
            f"{ex.source}: route {route.name!r}: path_regex {m.path_regex!r} does not match "
            f"{sample!r} (regexes are full-matched: end a prefix-like regex with '.*')")
        return sample
    return "/probe"


def request_for(ex: Example, route: RouteConfig) -> bytes:
    """A request the route should admit, built from its own rules."""
    method = route.match.methods[0] if route.match.methods else "GET"
    target = _path_for(ex, route)
    headers: list[tuple[str, str]] = []
    query: list[str] = []
    auth = route.auth
    if auth is not None:
        now = int(time.time())
        claims: dict[str, Any] = {"sub": f"user-of-{route.name}", "iat": now, "exp": now + 300}
        if auth.scopes is not None:
            granted = auth.scopes.scopes if auth.scopes.mode == "all" else auth.scopes.scopes[:1]
            claims["scope"] = " ".join(granted)
        for rule in auth.claims:
            if rule.op == "present" and rule.value is False:
                continue  # the claim must be absent
            value = {"equals": lambda v: v, "one_of": lambda v: v[0],
                     "contains": lambda v: [v], "present": lambda v: "present"}[rule.op]
            _set_claim(claims, rule.path, value(rule.value))
        if auth.api_key is not None:
            table = ex.config.api_keys
            assert table is not None and table.keys, f"route {route.name} needs api_keys"
            bound = [k for k in table.keys if k.client_id is not None]
            key = (bound or list(table.keys))[0] if auth.api_key.bind_claim else table.keys[0]
            if auth.api_key.bind_claim is not None:
                _set_claim(claims, auth.api_key.bind_claim, key.client_id)
            raw = ex.api_keys[key.id]
            if table.header is not None:
                headers.append((table.header, raw))
            else:
                assert table.query is not None
                query.append(f"{table.query}={quote(raw)}")
        if auth.one_time:
            claims["jti"] = f"once-{route.name}-{time.time_ns()}"  # RFC 7523 §3 item 7
        client = None
        if auth.dpop is not None:
            # RFC 9449: the token bound to a client key (cnf.jkt), a proof per request.
            client = generate("ES256", "client")
            claims["cnf"] = {"jkt": thumbprint(client.public_jwk)}
        providers = auth.providers if auth.mode == "all" else auth.providers[:1]
        # mode: all - place the providers with the fewest token places first
        providers = tuple(sorted(providers, key=lambda p: len(ex.config.providers[p].token_from)))
        used: set[tuple[str, str]] = set()
        for pname in providers:
            provider = ex.config.providers[pname]
            token_claims = dict(claims, iss=provider.issuer)
            audiences = auth.audiences if auth.audiences is not None else provider.audiences
            if audiences:
                token_claims["aud"] = audiences[0]
            token = make_token(ex.keys[pname], token_claims)
            # mode: all - each provider's token in a place no other token took
            place: TokenSource = next(s for s in provider.token_from
                                      if (s.place, s.name.lower()) not in used)
            used.add((place.place, place.name.lower()))
            if client is not None and auth.dpop is not None:
                base = auth.dpop.external_url or f"http://{route.match.host or 'gw.test'}"
                headers.append(("Authorization", f"DPoP {token}"))
                headers.append(("DPoP", make_proof(client, htm=method, htu=base + target,
                                                   token=token, iat=time.time())))
            elif place.place == "header":
                headers.append((place.name, place.prefix + token))
            elif place.place == "cookie":
                headers.append(("Cookie", f"{place.name}={token}"))
            else:
                query.append(f"{place.name}={token}")
    if query:
        target += "?" + "&".join(query)
    host = route.match.host or "gw.test"
    return http_request(method, target, headers, host=host)


# Path segments the echo upstream (tests/gateway_fixtures.py) answers specially, e.g. the
# example's `/status` route gets an error from it: reached, but not a 200.
_ECHO_SPECIAL = {"sleep", "status", "big", "reset", "fixed"}


def _route_counts(body: bytes) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        if family.name != "fastgate_requests":
            continue
        for s in family.samples:
            if s.name == "fastgate_requests_total":
                out[(s.labels["route"], s.labels["status_class"])] = s.value
    return out


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.mark.parametrize("name", list(examples()))
def test_every_route_of_the_example_is_reachable(name: str, loop: Loop, tmp_path: Path,
                                                redis: RedisServer) -> None:
    upstream = loop.run(EchoUpstream.start())
    try:
        ex = prepare(name, examples()[name], tmp_path, upstream, redis.url)
        metrics = metrics_for(ex.config)
        gw = loop.run(start_gateway(ex.config, metrics=metrics))
        try:
            assert ex.config.routes
            seen: set[str] = set()
            for route in ex.config.routes:
                before = len(upstream.records)
                request = request_for(ex, route)
                resp = loop.run(raw_request(gw.port, request))
                assert len(upstream.records) == before + 1, (name, route.name, resp.status,
                                                             resp.body)
                path = request.split(b" ", 2)[1].decode().partition("?")[0]
                if not _ECHO_SPECIAL & set(path.split("/")):
                    assert resp.status == 200, (name, route.name, resp.status, resp.body)
                    assert resp.header("X-Upstream") == "echo", (name, route.name)
                counts = _route_counts(metrics.render())
                counted = {r: v for (r, _), v in counts.items() if v}
                assert counted.get(route.name) == 1 and sum(counted.values()) == len(
                    seen) + 1, (f"{name}: the request meant for route {route.name!r} was "
                                f"counted as {counted}")
                seen.add(route.name)
            # ...and nothing else is served: an unmatched path is 404 (unless a catch-all
            # route, like the sidecar's `path_prefix: /`, serves every path).
            catch_all = any(r.match.path_prefix == "/" and r.match.host is None
                            and r.match.methods is None for r in ex.config.routes)
            resp = loop.run(raw_request(gw.port, http_request(
                "GET", "/no-such-route-here", host="unmatched.test")))
            assert (resp.status == 404) is not catch_all, resp.body
        finally:
            loop.run(gw.stop())
    finally:
        loop.run(upstream.stop())


def test_a_prefix_like_regex_would_fail_this_test() -> None:
    """The check above is not vacuous: the regex the example used to ship never matches."""
    assert re.fullmatch(r"^/mobile/v[0-9]+/", "/mobile/v1/orders") is None
    shipped = yaml.safe_load((ROOT / "deploy/examples/gateway.yaml").read_text("utf-8"))
    mobile = next(r for r in shipped["routes"] if r["name"] == "mobile")
    assert re.fullmatch(mobile["match"]["path_regex"], "/mobile/v1/orders")
