"""API-key layer (SPEC §2 ``api_keys`` and a route's ``auth.api_key``).

* Keys are stored as SHA-256 digests only. A presented key is hashed, the digest looked up in
  a dict, and the found entry compared again with :func:`hmac.compare_digest`. The dict
  lookup's timing depends on the digest, not on the secret key material: an attacker who
  learns how a digest of their own guess hashes into the table learns nothing about any
  preimage (SHA-256 preimage resistance), so the lookup is not an oracle; the constant-time
  compare keeps the final equality decision free of early-exit timing as well.
* A key may come from the configured header and/or query parameter. None present ->
  ``api_key_missing`` (when the route requires one); present but unknown, or presented twice
  (two header lines, header and query) -> ``api_key_invalid``.
* ``bind_claim``: the key's ``client_id`` must equal the claim (a string) at that path of the
  verified token, else ``api_key_mismatch`` (403). A key without ``client_id``, a missing
  claim, or no token at all (``allow_missing``) cannot be bound -> ``api_key_mismatch``.
  With ``required: false`` the binding is checked only when a key is presented.
* The API-key header and query parameter are credentials for the gateway: they are removed
  before forwarding on every route (the proxy does that), so upstreams never see them.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from fastgate.auth.extract import HeaderSource, iter_query
from fastgate.auth.policy import lookup
from fastgate.config import ApiKey, ApiKeyRule, ApiKeysConfig
from fastgate.token.reasons import Reason


class ApiKeyTable:
    """The configured keys, indexed by SHA-256 digest."""

    __slots__ = ("_by_digest", "header", "query")

    def __init__(self, config: ApiKeysConfig | None) -> None:
        self.header: str | None = config.header if config else None
        self.query: str | None = config.query if config else None
        self._by_digest: dict[bytes, ApiKey] = {}
        if config is not None:
            for key in config.keys:
                self._by_digest[bytes(key.sha256)] = key

    def __len__(self) -> int:
        return len(self._by_digest)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key whose digest equals SHA-256(presented), else None."""
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            return None
        return entry

    def presented(self, headers: HeaderSource, query_string: str) -> list[str]:
        """Every API-key value in the request (header lines and query parameters)."""
        values: list[str] = []
        if self.header is not None:
            values.extend(headers.getall(self.header, []))
        if self.query is not None and query_string:
            name = self.query
            values.extend(v for n, v, _ in iter_query(query_string) if n == name)
        return values


class ApiKeyCheck:
    """One route's API-key rule bound to the gateway's key table."""

    __slots__ = ("bind_claim", "required", "table")

    def __init__(self, rule: ApiKeyRule, table: ApiKeyTable) -> None:
        self.required = rule.required
        self.bind_claim = rule.bind_claim
        self.table = table

    def check(self, headers: HeaderSource, query_string: str,
              claims: Mapping[str, Any] | None) -> tuple[Reason, ApiKey | None]:
        values = self.table.presented(headers, query_string)
        if not values:
            if self.required:
                return Reason.API_KEY_MISSING, None
            return Reason.OK, None  # optional key: binding applies only to a presented key
        if len(values) > 1:
            return Reason.API_KEY_INVALID, None  # one key, one place (like tokens)
        key = self.table.lookup(values[0])
        if key is None:
            return Reason.API_KEY_INVALID, None
        if self.bind_claim is not None:
            if claims is None or key.client_id is None:
                return Reason.API_KEY_MISMATCH, key
            value = lookup(claims, self.bind_claim)
            if not isinstance(value, str) or not hmac.compare_digest(
                value.encode("utf-8", "surrogateescape"), key.client_id.encode("utf-8")
            ):
                return Reason.API_KEY_MISMATCH, key
        return Reason.OK, key
