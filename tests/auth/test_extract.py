"""Token extraction (SPEC §3 step 2, catalog G1/G2): one token, one place."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from fastgate.auth.extract import (
    TokenExtractor,
    dedupe_sources,
    iter_cookies,
    iter_query,
    strip_cookie,
    strip_query_param,
)
from fastgate.config import TokenSource
from fastgate.token.reasons import Reason

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln"
OTHER = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJiIn0.c2ln"

AUTH = TokenSource("header", "Authorization", "Bearer ")
QUERY = TokenSource("query", "access_token")
COOKIE = TokenSource("cookie", "id_token")
CUSTOM = TokenSource("header", "X-Token")


def H(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_default_authorization_bearer() -> None:
    ex = TokenExtractor()
    assert ex.extract(H(("Authorization", f"Bearer {TOKEN}"))) == (Reason.OK, TOKEN, 0)


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_scheme_is_case_insensitive(scheme: str) -> None:
    ex = TokenExtractor()
    assert ex.extract(H(("Authorization", f"{scheme} {TOKEN}")))[:2] == (Reason.OK, TOKEN)


@pytest.mark.parametrize(("value", "reason"), [
    (f"Bearer  {TOKEN}", Reason.TOKEN_MALFORMED),  # two spaces
    (f"Bearer {TOKEN} ", Reason.OK),  # aiohttp strips trailing OWS before we see it
    ("Bearer", Reason.TOKEN_MALFORMED),  # scheme without credential
    ("Bearer ", Reason.TOKEN_MALFORMED),
    (f"Bearer {TOKEN}, Bearer {OTHER}", Reason.TOKEN_AMBIGUOUS),  # folded list
    (f"Bearer {TOKEN},{TOKEN}", Reason.TOKEN_AMBIGUOUS),
    ("Bearer a\tb", Reason.TOKEN_MALFORMED),
    ("Basic dXNlcjpwYXNz", Reason.TOKEN_MISSING),  # another scheme: not a bearer token
])
def test_header_shapes(value: str, reason: Reason) -> None:
    ex = TokenExtractor()
    headers = H(("Authorization", value.rstrip(" ") if reason is Reason.OK else value))
    assert ex.extract(headers)[0] is reason


def test_two_authorization_headers_are_ambiguous_even_if_equal() -> None:
    ex = TokenExtractor()
    same = H(("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {TOKEN}"))
    diff = H(("Authorization", f"Bearer {TOKEN}"), ("Authorization", f"Bearer {OTHER}"))
    assert ex.extract(same)[0] is Reason.TOKEN_AMBIGUOUS
    assert ex.extract(diff)[0] is Reason.TOKEN_AMBIGUOUS


def test_basic_plus_bearer_is_one_token() -> None:
    ex = TokenExtractor()
    headers = H(("Authorization", "Basic abc"), ("Authorization", f"Bearer {TOKEN}"))
    assert ex.extract(headers)[:2] == (Reason.OK, TOKEN)


def test_token_too_large_before_parsing() -> None:
    ex = TokenExtractor(max_token_bytes=100)
    assert ex.extract(H(("Authorization", "Bearer " + "a" * 101)))[0] is Reason.TOKEN_TOO_LARGE
    assert ex.extract(H(("Authorization", "Bearer " + "a" * 100)))[0] is Reason.OK


def test_query_and_cookie_and_header_union() -> None:
    ex = TokenExtractor([AUTH, QUERY, COOKIE])
    assert ex.extract(H(), f"a=1&access_token={TOKEN}") == (Reason.OK, TOKEN, 1)
    assert ex.extract(H(("Cookie", f"a=b; id_token={TOKEN}; c=d")), "") == (Reason.OK, TOKEN, 2)
    assert ex.extract(H(("Cookie", f'id_token="{TOKEN}"')), "")[:2] == (Reason.OK, TOKEN)
    # Same token in two places: RFC 6750 §2 "MUST NOT use more than one method".
    assert ex.extract(H(("Authorization", f"Bearer {TOKEN}")),
                      f"access_token={TOKEN}")[0] is Reason.TOKEN_AMBIGUOUS
    assert ex.extract(H(("Cookie", f"id_token={OTHER}")),
                      f"access_token={TOKEN}")[0] is Reason.TOKEN_AMBIGUOUS
    assert ex.extract(H(), f"access_token={TOKEN}&access_token={TOKEN}")[0] \
        is Reason.TOKEN_AMBIGUOUS
    assert ex.extract(H(("Cookie", f"id_token={TOKEN}"), ("Cookie", f"id_token={TOKEN}")),
                      "")[0] is Reason.TOKEN_AMBIGUOUS


def test_query_names_are_percent_decoded() -> None:
    # An upstream decodes access%5Ftoken to access_token: the gateway must see it too.
    ex = TokenExtractor([AUTH, QUERY])
    assert ex.extract(H(("Authorization", f"Bearer {TOKEN}")),
                      f"access%5Ftoken={OTHER}")[0] is Reason.TOKEN_AMBIGUOUS
    assert ex.extract(H(), f"access%5Ftoken={TOKEN}")[:2] == (Reason.OK, TOKEN)


def test_empty_query_value_is_malformed_not_missing() -> None:
    ex = TokenExtractor([QUERY])
    assert ex.extract(H(), "access_token=")[0] is Reason.TOKEN_MALFORMED
    assert ex.extract(H(), "other=1")[0] is Reason.TOKEN_MISSING


def test_cookie_names_are_case_sensitive() -> None:
    ex = TokenExtractor([COOKIE])
    assert ex.extract(H(("Cookie", f"ID_TOKEN={TOKEN}")), "")[0] is Reason.TOKEN_MISSING


def test_custom_header_without_prefix() -> None:
    ex = TokenExtractor([CUSTOM])
    assert ex.extract(H(("x-token", TOKEN)))[:2] == (Reason.OK, TOKEN)


def test_extract_all_one_per_place() -> None:
    ex = TokenExtractor([AUTH, CUSTOM])
    reason, found = ex.extract_all(H(("Authorization", f"Bearer {TOKEN}"), ("X-Token", OTHER)))
    assert reason is Reason.OK and found == [(0, TOKEN), (1, OTHER)]
    reason, _ = ex.extract_all(H(("X-Token", OTHER), ("X-Token", OTHER)))
    assert reason is Reason.TOKEN_AMBIGUOUS
    assert ex.extract_all(H())[0] is Reason.TOKEN_MISSING
    assert ex.extract_all(H(("X-Token", "a b")))[0] is Reason.TOKEN_MALFORMED


def test_dedupe_sources() -> None:
    lower = TokenSource("header", "authorization", "bearer ")
    assert dedupe_sources([[AUTH, QUERY], [lower, COOKIE, QUERY]]) == (AUTH, QUERY, COOKIE)


def test_query_and_cookie_helpers() -> None:
    assert iter_query("a=1&b=%41+c&&d") == [("a", "1", "a=1"), ("b", "A c", "b=%41+c"),
                                             ("d", "", "d")]
    assert strip_query_param("a=1&access_token=x&b=2&access%5Ftoken=y", "access_token") == \
        "a=1&b=2"
    assert iter_cookies('a=1; b="2"; junk; c=') == [("a", "1", "a=1"), ("b", "2", 'b="2"'),
                                                     ("c", "", "c=")]
    assert strip_cookie("a=1; id_token=x; b=2", "id_token") == "a=1; b=2"
    assert strip_cookie("id_token=x", "id_token") == ""
