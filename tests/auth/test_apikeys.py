"""API-key layer: SHA-256 digests, constant-time compare, missing/invalid/mismatch."""

from __future__ import annotations

import hashlib

from multidict import CIMultiDict, CIMultiDictProxy

from fastgate.auth.apikeys import ApiKeyCheck, ApiKeyTable
from fastgate.config import ApiKey, ApiKeyRule, ApiKeysConfig
from fastgate.token.reasons import Reason

SECRET = "k-mobile-0123456789"
OTHER = "k-web-9876543210"
CONFIG = ApiKeysConfig(
    header="X-API-Key",
    query="api_key",
    keys=(
        ApiKey("mobile", hashlib.sha256(SECRET.encode()).digest(), client_id="app-42"),
        ApiKey("web", hashlib.sha256(OTHER.encode()).digest()),
    ),
)
TABLE = ApiKeyTable(CONFIG)


def H(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_lookup_by_digest() -> None:
    key = TABLE.lookup(SECRET)
    assert key is not None and key.id == "mobile"
    assert TABLE.lookup(SECRET + "x") is None
    assert TABLE.lookup("") is None
    assert len(TABLE) == 2


def test_required_key() -> None:
    check = ApiKeyCheck(ApiKeyRule(required=True), TABLE)
    assert check.check(H(), "", None) == (Reason.API_KEY_MISSING, None)
    assert check.check(H(("X-API-Key", "nope")), "", None) == (Reason.API_KEY_INVALID, None)
    reason, key = check.check(H(("x-api-key", SECRET)), "", None)
    assert reason is Reason.OK and key is not None and key.id == "mobile"
    reason, key = check.check(H(), f"a=1&api_key={SECRET}", None)
    assert reason is Reason.OK and key is not None


def test_two_keys_are_invalid() -> None:
    check = ApiKeyCheck(ApiKeyRule(required=True), TABLE)
    assert check.check(H(("X-API-Key", SECRET), ("X-API-Key", SECRET)), "", None)[0] \
        is Reason.API_KEY_INVALID
    assert check.check(H(("X-API-Key", SECRET)), f"api_key={SECRET}", None)[0] \
        is Reason.API_KEY_INVALID


def test_optional_key() -> None:
    check = ApiKeyCheck(ApiKeyRule(required=False, bind_claim=("client_id",)), TABLE)
    assert check.check(H(), "", {"client_id": "x"}) == (Reason.OK, None)
    assert check.check(H(("X-API-Key", "bad")), "", None)[0] is Reason.API_KEY_INVALID


def test_bind_claim() -> None:
    check = ApiKeyCheck(ApiKeyRule(required=True, bind_claim=("client_id",)), TABLE)
    h = H(("X-API-Key", SECRET))
    assert check.check(h, "", {"client_id": "app-42"})[0] is Reason.OK
    assert check.check(h, "", {"client_id": "app-43"})[0] is Reason.API_KEY_MISMATCH
    assert check.check(h, "", {"client_id": 42})[0] is Reason.API_KEY_MISMATCH
    assert check.check(h, "", {})[0] is Reason.API_KEY_MISMATCH
    assert check.check(h, "", None)[0] is Reason.API_KEY_MISMATCH  # no token to bind to
    # A key without client_id can never satisfy a binding.
    assert check.check(H(("X-API-Key", OTHER)), "", {"client_id": "app-42"})[0] \
        is Reason.API_KEY_MISMATCH
    nested = ApiKeyCheck(ApiKeyRule(required=True, bind_claim=("app", "id")), TABLE)
    assert nested.check(h, "", {"app": {"id": "app-42"}})[0] is Reason.OK


def test_header_only_table_ignores_query() -> None:
    table = ApiKeyTable(ApiKeysConfig(header="X-Key", keys=CONFIG.keys))
    check = ApiKeyCheck(ApiKeyRule(), table)
    assert check.check(H(), f"api_key={SECRET}", None)[0] is Reason.API_KEY_MISSING


def test_empty_table() -> None:
    table = ApiKeyTable(None)
    assert len(table) == 0 and table.lookup(SECRET) is None
