"""Route policy: scopes (scope/scp), claim rules on dot paths, claim-header encoding."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import unquote

import pytest

from fastgate.auth.policy import Policy, encode_claim, json_equal, lookup, payload_b64, token_scopes
from fastgate.config import AuthConfig, ClaimHeader, ClaimRule, ScopeRule, parse_claim_path
from fastgate.token.reasons import Reason


def _policy(**kw: Any) -> Policy:
    return Policy(AuthConfig(providers=("p",), **kw))


@pytest.mark.parametrize(("claims", "granted"), [
    ({"scope": "a b  c"}, {"a", "b", "c"}),
    ({"scp": "a b"}, {"a", "b"}),
    ({"scp": ["a", "b", 3]}, {"a", "b"}),
    ({"scope": "a", "scp": ["b"]}, {"a", "b"}),
    ({"scope": ["a"]}, set()),  # scope must be a string (RFC 8693 §4.2)
    ({}, set()),
])
def test_token_scopes(claims: dict[str, Any], granted: set[str]) -> None:
    assert token_scopes(claims) == granted


def test_scopes_all_and_any() -> None:
    all_ = _policy(scopes=ScopeRule("all", ("orders:read", "orders:write")))
    any_ = _policy(scopes=ScopeRule("any", ("orders:read", "orders:write")))
    assert all_.check({"scope": "orders:read orders:write x"}) is Reason.OK
    assert all_.check({"scp": ["orders:read", "orders:write"]}) is Reason.OK
    assert all_.check({"scope": "orders:read"}) is Reason.INSUFFICIENT_SCOPE
    assert all_.check({}) is Reason.INSUFFICIENT_SCOPE
    assert any_.check({"scp": "orders:write"}) is Reason.OK
    assert any_.check({"scope": "orders:readx"}) is Reason.INSUFFICIENT_SCOPE
    assert all_.scope_string == "orders:read orders:write"


CLAIMS: dict[str, Any] = {
    "sub": "u1",
    "tenant": {"region": "eu-west-1", "id": "t-9", "deep": {"n": 1}},
    "email_verified": True,
    "roles": ["reader", "writer"],
    "role": "writer",
    "level": 3,
    "https://example.com/roles": ["admin"],
    "a.b": {"c": "dotted"},
}


@pytest.mark.parametrize(("path", "op", "value", "reason"), [
    ("tenant.region", "one_of", ("eu-west-1", "eu-central-1"), Reason.OK),
    ("tenant.region", "one_of", ("us-east-1",), Reason.CLAIM_MISMATCH),
    ("tenant.missing", "one_of", ("x",), Reason.CLAIM_MISSING),
    ("email_verified", "equals", True, Reason.OK),
    ("email_verified", "equals", 1, Reason.CLAIM_MISMATCH),  # true is not 1
    ("level", "equals", 3.0, Reason.OK),
    ("level", "equals", True, Reason.CLAIM_MISMATCH),
    ("level", "equals", "3", Reason.CLAIM_MISMATCH),
    ("roles", "contains", "writer", Reason.OK),
    ("roles", "contains", "admin", Reason.CLAIM_MISMATCH),
    ("role", "contains", "writer", Reason.OK),  # a string is a one-element list
    ("role", "contains", "writ", Reason.CLAIM_MISMATCH),  # never substring
    ("roles", "one_of", ("writer",), Reason.CLAIM_MISMATCH),  # one_of is for scalars
    ('["https://example.com/roles"]', "contains", "admin", Reason.OK),
    ('["a.b"].c', "equals", "dotted", Reason.OK),
    ("tenant.deep.n", "equals", 1, Reason.OK),
    ("tenant.region.x", "present", True, Reason.CLAIM_MISSING),  # through a string
    ("sub", "present", True, Reason.OK),
    ("nope", "present", True, Reason.CLAIM_MISSING),
    ("nope", "present", False, Reason.OK),
    ("sub", "present", False, Reason.CLAIM_MISMATCH),
])
def test_claim_rules(path: str, op: str, value: Any, reason: Reason) -> None:
    policy = _policy(claims=(ClaimRule(parse_claim_path(path), op, value),))  # type: ignore[arg-type]
    assert policy.check(CLAIMS) is reason


def test_rules_run_in_order_after_scopes() -> None:
    policy = _policy(scopes=ScopeRule("any", ("s",)),
                     claims=(ClaimRule(("sub",), "equals", "u2"),))
    assert policy.check({"sub": "u2"}) is Reason.INSUFFICIENT_SCOPE
    assert policy.check({"sub": "u1", "scope": "s"}) is Reason.CLAIM_MISMATCH
    assert policy.check({"sub": "u2", "scope": "s"}) is Reason.OK


def test_lookup() -> None:
    assert lookup(CLAIMS, ("tenant", "id")) == "t-9"
    assert lookup(CLAIMS, ("a.b", "c")) == "dotted"


@pytest.mark.parametrize(("value", "encoded"), [
    ("alice", "alice"),
    ("", ""),
    (42, "42"),
    (1.5, "1.5"),
    (True, "true"),
    (False, "false"),
    (["a", "b", 3, True], "a,b,3,true"),
    ({"k": "v", "n": [1, 2]}, '{"k":"v","n":[1,2]}'),
    ([{"k": 1}], '[{"k":1}]'),
    ([["a"]], '[["a"]]'),
    ("with\ttab", "with\ttab"),
    (None, None),
    ("a\r\nX-Injected: 1", None),
    ("a\nb", None),
    ("a\rb", None),
    ("a\x00b", None),
    ("a\x7fb", None),
    ("a\x01b", None),
    (["ok", "bad\r\n"], None),
    ({"k": "line\nbreak"}, '{"k":"line\\nbreak"}'),  # JSON escapes it: safe
    ("x" * 9000, None),
    (2**80, None),  # beyond JSON's 64-bit ints in orjson: dropped, never raises
])
def test_encode_claim(value: Any, encoded: str | None) -> None:
    assert encode_claim(value) == encoded


def test_non_ascii_is_rfc8187_encoded() -> None:
    out = encode_claim("José ✓")
    assert out == "UTF-8''Jos%C3%A9%20%E2%9C%93"
    assert out.isascii()
    assert unquote(out[len("UTF-8''"):]) == "José ✓"
    # An ASCII value that looks like the encoded form is encoded too: never ambiguous.
    tricky = encode_claim("UTF-8''%41")
    assert tricky == "UTF-8''UTF-8%27%27%2541"
    assert encode_claim(["é", "a"]) == "UTF-8''%C3%A9%2Ca"
    assert encode_claim({"n": "é"}) == "UTF-8''%7B%22n%22%3A%22%C3%A9%22%7D"
    # Unicode line separators are percent-encoded, never emitted raw.
    assert encode_claim("a\u2028b") == "UTF-8''a%E2%80%A8b"
    assert encode_claim("a\u0085b") == "UTF-8''a%C2%85b"


def test_claim_headers_and_payload_header() -> None:
    policy = _policy(
        claim_headers=(ClaimHeader("X-User-Id", ("sub",)),
                       ClaimHeader("X-Tenant", ("tenant", "id")),
                       ClaimHeader("X-Roles", ("roles",)), ClaimHeader("X-Missing", ("nope",)),
                       ClaimHeader("X-Bad", ("bad",))),
        payload_header="X-Jwt-Payload",
    )
    claims = {**CLAIMS, "bad": "x\r\ny"}
    headers = policy.headers(claims)
    names = [n for n, _ in headers]
    assert names == ["X-User-Id", "X-Tenant", "X-Roles", "X-Jwt-Payload"]
    assert dict(headers)["X-Roles"] == "reader,writer"
    payload = dict(headers)["X-Jwt-Payload"]
    assert "=" not in payload and "+" not in payload and "/" not in payload
    assert json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))) == claims
    assert payload == payload_b64(claims)
    assert policy.reserved_names() == ["X-User-Id", "X-Tenant", "X-Roles", "X-Missing", "X-Bad",
                                       "X-Jwt-Payload"]


def test_json_equal() -> None:
    assert json_equal(1, 1.0)
    assert not json_equal(True, 1)
    assert not json_equal(0, False)
    assert json_equal("a", "a")
    assert not json_equal("1", 1)
    assert not json_equal(None, "None")


# -- combined claim headers ("{sub}@{tenant.id}") --------------------------------------------


def _template_policy(text: str) -> Policy:
    from fastgate.config import parse_claim_template

    return _policy(claim_headers=(ClaimHeader("X-Identity", (), parse_claim_template(text)),))


@pytest.mark.parametrize(("text", "claims", "expected"), [
    ("{sub}@{tenant.id}", {"sub": "alice", "tenant": {"id": "t-1"}}, "alice@t-1"),
    ("{sub}:{roles}", {"sub": "a", "roles": ["r1", "r2"]}, "a:r1,r2"),  # lists joined
    ("{sub}/{n}/{ok}", {"sub": "a", "n": 42, "ok": True}, "a/42/true"),  # JSON scalars
    ('{["https://x.test/org"]}-{sub}', {"https://x.test/org": "o", "sub": "s"}, "o-s"),
    ("{{literal}} {sub}", {"sub": "s"}, "{literal} s"),
    ("{sub}@{tenant.id}", {"sub": "alice"}, None),  # a missing claim drops the header
    ("{sub}@{tenant.id}", {"sub": "a\r\nX-Evil: 1", "tenant": {"id": "t"}}, None),
    ("{sub}@{tenant.id}", {"sub": None, "tenant": {"id": "t"}}, None),
    # Each placeholder in the claim-header encoding: non-ASCII as its RFC 8187 form.
    ("{name}", {"name": "José"}, "UTF-8''Jos%C3%A9"),
])
def test_template_rendering(text: str, claims: dict[str, Any], expected: str | None) -> None:
    headers = dict(_template_policy(text).headers(claims))
    assert headers.get("X-Identity") == expected


def test_template_is_compiled_once_and_reserved() -> None:
    policy = _template_policy("{sub}@{tenant.id}")
    assert policy.templates == (("X-Identity", (("sub",), "@", ("tenant", "id"))),)
    assert policy.claim_headers == ()
    assert policy.reserved_names() == ["X-Identity"]  # inbound copies are removed
