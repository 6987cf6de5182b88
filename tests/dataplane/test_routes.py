"""Route table: first match wins; path/prefix/regex, methods, host; strip_prefix; G5 paths."""

from __future__ import annotations

import pytest

from fastgate.config import RouteConfig, RouteMatch
from fastgate.dataplane.routes import RouteTable, host_without_port, path_is_ambiguous


def _route(name: str, **match: object) -> RouteConfig:
    strip = bool(match.pop("strip_prefix", False))
    return RouteConfig(name, RouteMatch(**match), "up", strip_prefix=strip)  # type: ignore[arg-type]


TABLE = RouteTable([
    _route("exact", path="/health"),
    _route("orders-get", path_prefix="/api/orders", methods=("GET", "HEAD")),
    _route("orders-any", path_prefix="/api/orders"),
    _route("regex", path_regex=r"/items/[0-9]+"),
    _route("host-only", host="admin.example.com", path_prefix="/"),
    _route("public", path_prefix="/public/", strip_prefix=True),
    _route("catch-all", path_prefix="/"),
])


@pytest.mark.parametrize(("method", "host", "path", "expected"), [
    ("GET", None, "/health", "exact"),
    ("GET", None, "/health/x", "catch-all"),  # exact is exact
    ("GET", None, "/api/orders/1", "orders-get"),
    ("HEAD", None, "/api/orders", "orders-get"),
    ("POST", None, "/api/orders/1", "orders-any"),  # first match wins, methods filter
    ("GET", None, "/api/orders-admin", "orders-get"),  # plain string prefix (documented)
    ("GET", None, "/items/42", "regex"),
    ("GET", None, "/items/42/x", "catch-all"),  # fullmatch
    ("GET", None, "/items/abc", "catch-all"),
    ("GET", "ADMIN.example.com:8443", "/anything", "host-only"),  # case and port ignored
    ("GET", "other.example.com", "/anything", "catch-all"),
    ("GET", None, "/public/a", "public"),
])
def test_first_match_wins(method: str, host: str | None, path: str, expected: str) -> None:
    route = TABLE.match(method, host, path)
    assert route is not None
    assert route.name == expected


def test_no_match_is_none() -> None:
    table = RouteTable([_route("a", path="/a"), _route("b", path_prefix="/b/", methods=("GET",))])
    assert table.match("GET", None, "/c") is None
    assert table.match("POST", None, "/b/x") is None
    assert len(table) == 2


@pytest.mark.parametrize(("match", "path", "forwarded"), [
    ({"path_prefix": "/public/"}, "/public/a/b", "/a/b"),
    ({"path_prefix": "/public"}, "/public/a", "/a"),
    ({"path_prefix": "/public"}, "/public", "/"),
    ({"path_prefix": "/public/"}, "/public/", "/"),
    ({"path": "/exact"}, "/exact", "/"),
    ({"path_regex": r"/v[0-9]+/.*"}, "/v1/users", "/"),
])
def test_strip_prefix(match: dict[str, str], path: str, forwarded: str) -> None:
    table = RouteTable([RouteConfig("r", RouteMatch(**match), "up", strip_prefix=True)])
    route = table.match("GET", None, path)
    assert route is not None
    assert route.rewrite(path) == forwarded


def test_no_strip_keeps_path() -> None:
    table = RouteTable([_route("r", path_prefix="/p/")])
    route = table.match("GET", None, "/p/x")
    assert route is not None and route.rewrite("/p/x") == "/p/x"


@pytest.mark.parametrize("path", [
    "//admin", "/public//admin", "/public/../admin", "/public/./admin", "/public/..",
    "/public/.", "/public/..;/admin", "/admin;x=y", "/%2e%2e/admin", "/%2E%2E/admin",
    "/admin%2F", "/admin%2fx", "/a%5cb", "/a\\b", "/a%00b", "*", "http://evil/x", "",
    "admin",
])
def test_ambiguous_paths_rejected(path: str) -> None:
    assert path_is_ambiguous(path)


@pytest.mark.parametrize("path", [
    "/", "/public/a", "/.well-known/openid-configuration", "/a/.hidden", "/a/..b",
    "/a/b.", "/a%20b", "/caf%C3%A9", "/a-b_c~d", "/a/b/",
])
def test_normal_paths_accepted(path: str) -> None:
    assert not path_is_ambiguous(path)


@pytest.mark.parametrize(("host", "bare"), [
    ("Example.COM", "example.com"), ("example.com:8080", "example.com"),
    ("[::1]:8080", "[::1]"), ("[::1]", "[::1]"), ("10.0.0.1:80", "10.0.0.1"),
])
def test_host_without_port(host: str, bare: str) -> None:
    assert host_without_port(host) == bare
