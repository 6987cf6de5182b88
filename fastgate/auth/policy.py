"""Compiled per-route authorization policy: scopes, claim rules, claim headers (SPEC §2, §3).

Decisions made here (documented once):

* Scopes are the union of ``scope`` (space-separated string, RFC 8693 §4.2 / RFC 9068 §2.2.3)
  and ``scp`` (string or array of strings: Entra ID, Okta). Non-string entries are ignored.
  ``any``: at least one required scope present; ``all``: every one. Failure:
  ``insufficient_scope`` (403, the challenge names the required scopes).
* Claim rules walk a dot path through nested objects (a key containing dots is one quoted
  element, already split by the loader). An absent path -> ``claim_missing`` for every
  operator (the label says what happened); a present value that fails -> ``claim_mismatch``;
  ``present: false`` with the claim present -> ``claim_mismatch``. JSON types are compared
  strictly: ``true`` never equals ``1``, ``"1"`` never equals ``1`` (``1`` equals ``1.0``).
  ``contains`` looks for an equal element of an array; a string claim is treated as a
  one-element array (exact equality, never substring: ``"writer-x"`` does not contain
  ``"writer"``). ``one_of``: the claim is a scalar equal to one of the values.
* Claim headers (SPEC §2 encoding): strings as-is; numbers and booleans as JSON; arrays of
  scalars joined with ``,``; objects and arrays containing objects or arrays as compact JSON;
  ``null`` and absent claims -> no header. A value with a control character (CR, LF, NUL, any
  other byte < 0x20 except TAB, or DEL) is never emitted: the header is dropped (and logged at
  debug). Values longer than :data:`MAX_CLAIM_HEADER_BYTES` are dropped too.
* Non-ASCII claim values are emitted in the RFC 8187 ``ext-value`` form
  ``UTF-8''<percent-encoded UTF-8>`` (the same encoding as ``filename*``), which keeps every
  emitted header pure ASCII (security catalog invariant 8: "non-ASCII in injected values is
  rejected or encoded") while staying lossless. An ASCII value that itself starts with
  ``UTF-8''`` (any case) is encoded the same way, so "starts with UTF-8'' -> decode" is always
  the right rule for a consumer.
* ``payload_header``: base64url without padding (RFC 7515 §2) of the compact JSON of all
  verified claims (orjson, UTF-8).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from fastgate.config import AuthConfig, ClaimPath, ClaimRule, ClaimTemplate, ScopeRule
from fastgate.token.reasons import Reason

log = logging.getLogger("fastgate.policy")

MAX_CLAIM_HEADER_BYTES = 8192
_MISSING: Any = object()

_OP_EQUALS = 0
_OP_ONE_OF = 1
_OP_CONTAINS = 2
_OP_PRESENT = 3
_OPS = {"equals": _OP_EQUALS, "one_of": _OP_ONE_OF, "contains": _OP_CONTAINS,
        "present": _OP_PRESENT}

# RFC 8187 §3.2.1 attr-char: ALPHA / DIGIT / "!" / "#" / "$" / "&" / "+" / "-" / "." /
# "^" / "_" / "`" / "|" / "~"  (quote() never escapes ALPHA, DIGIT and "_.-~").
_ATTR_SAFE = "!#$&+^`|"
_CONTROL = frozenset(chr(c) for c in range(0x20) if c != 0x09) | {"\x7f"}


def lookup(claims: Mapping[str, Any], path: ClaimPath) -> Any:
    """The value at ``path`` or the module's ``_MISSING`` sentinel."""
    value: Any = claims
    for key in path:
        if not isinstance(value, dict):
            return _MISSING
        value = value.get(key, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def is_missing(value: Any) -> bool:
    return value is _MISSING


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: bool is its own type; int and float compare numerically."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    return bool(a == b)


def token_scopes(claims: Mapping[str, Any]) -> set[str]:
    """Granted scopes from ``scope`` and ``scp``."""
    granted: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        granted.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, str):
        granted.update(scp.split())
    elif isinstance(scp, list):
        granted.update(s for s in scp if isinstance(s, str))
    return granted


def _has_control(value: str) -> bool:
    if value.isprintable():
        return False  # fast path: no control characters at all (and no DEL)
    return any(ch in _CONTROL for ch in value)


def ext_value(value: str) -> str:
    """RFC 8187 ext-value: ``UTF-8''`` + percent-encoded UTF-8."""
    return "UTF-8''" + quote(value.encode("utf-8"), safe=_ATTR_SAFE)


def _safe_text(value: str) -> str | None:
    """The header form of a string claim, or None when it must not be emitted."""
    if not value.isascii() or value[:7].lower() == "utf-8''":
        if _has_control(value):
            return None
        value = ext_value(value)
    elif _has_control(value):
        return None
    if len(value) > MAX_CLAIM_HEADER_BYTES:
        return None
    return value


def encode_claim(value: Any) -> str | None:
    """Header value for one claim (SPEC §2 claim header encoding), or None for no header."""
    try:
        return _encode_claim(value)
    except (orjson.JSONEncodeError, UnicodeError):
        return None  # e.g. an integer beyond 64 bits: never raise on the request path


def _encode_claim(value: Any) -> str | None:
    if isinstance(value, str):
        return _safe_text(value)
    if value is None or value is _MISSING:
        return None
    if isinstance(value, (bool, int, float)):
        return orjson.dumps(value).decode("ascii")
    if isinstance(value, list):
        if all(isinstance(v, (str, bool, int, float)) for v in value):
            parts: list[str] = []
            for v in value:
                parts.append(v if isinstance(v, str) else orjson.dumps(v).decode("ascii"))
            return _safe_text(",".join(parts))
        return _safe_text(orjson.dumps(value).decode("utf-8"))
    if isinstance(value, dict):
        # JSON escapes control characters, so only non-ASCII needs the ext-value form.
        return _safe_text(orjson.dumps(value).decode("utf-8"))
    return None


def render_template(template: ClaimTemplate, claims: Mapping[str, Any]) -> str | None:
    """A combined claim header's value: each placeholder in the claim-header encoding (SPEC
    §2), literal text as configured (validated at load: no control characters). None -- no
    header -- when a claim is missing or cannot be emitted, or the result is too long."""
    pieces: list[str] = []
    for part in template:
        if isinstance(part, str):
            pieces.append(part)
            continue
        value = lookup(claims, part)
        if value is _MISSING:
            return None
        encoded = encode_claim(value)
        if encoded is None:
            return None
        pieces.append(encoded)
    combined = "".join(pieces)
    if len(combined) > MAX_CLAIM_HEADER_BYTES or not combined.isascii():
        return None
    return combined


def payload_b64(claims: Mapping[str, Any]) -> str:
    """base64url (no padding) of the compact JSON of ``claims``."""
    return base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode("ascii")


class Policy:
    """One route's claim-level checks and header injection, compiled from ``AuthConfig``."""

    __slots__ = ("claim_headers", "has_checks", "payload_header", "rules", "scope_all",
                 "scope_string", "scopes", "templates")

    def __init__(self, auth: AuthConfig) -> None:
        rule: ScopeRule | None = auth.scopes
        self.scopes: frozenset[str] = frozenset(rule.scopes) if rule else frozenset()
        self.scope_all = bool(rule and rule.mode == "all")
        # The challenge's scope attribute (RFC 6750 §3): the required scopes, space-separated.
        self.scope_string: str | None = " ".join(rule.scopes) if rule else None
        self.rules: tuple[tuple[ClaimPath, int, Any], ...] = tuple(
            _compile_rule(r) for r in auth.claims
        )
        self.has_checks = bool(self.scopes or self.rules)
        self.claim_headers: tuple[tuple[str, ClaimPath], ...] = tuple(
            (h.header, h.path) for h in auth.claim_headers if h.template is None
        )
        # Combined headers ("{sub}@{tenant.id}"): compiled once at config load.
        self.templates: tuple[tuple[str, ClaimTemplate], ...] = tuple(
            (h.header, h.template) for h in auth.claim_headers if h.template is not None
        )
        self.payload_header: str | None = auth.payload_header

    def check(self, claims: Mapping[str, Any]) -> Reason:
        """Scopes then claim rules; ``Reason.OK`` when everything holds."""
        if self.scopes:
            granted = token_scopes(claims)
            if self.scope_all:
                if not self.scopes <= granted:
                    return Reason.INSUFFICIENT_SCOPE
            elif self.scopes.isdisjoint(granted):
                return Reason.INSUFFICIENT_SCOPE
        for path, op, expected in self.rules:
            value = lookup(claims, path)
            if op == _OP_PRESENT:
                if value is _MISSING:
                    if expected:
                        return Reason.CLAIM_MISSING
                    continue
                if not expected:
                    return Reason.CLAIM_MISMATCH
                continue
            if value is _MISSING:
                return Reason.CLAIM_MISSING
            if op == _OP_EQUALS:
                if not json_equal(value, expected):
                    return Reason.CLAIM_MISMATCH
            elif op == _OP_ONE_OF:
                if isinstance(value, (list, dict)) or not any(
                    json_equal(value, e) for e in expected
                ):
                    return Reason.CLAIM_MISMATCH
            else:  # contains
                items = [value] if isinstance(value, str) else value
                if not isinstance(items, list) or not any(
                    json_equal(v, expected) for v in items
                ):
                    return Reason.CLAIM_MISMATCH
        return Reason.OK

    def headers(self, claims: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The claim headers (and payload header) to inject for verified ``claims``."""
        out: list[tuple[str, str]] = []
        for name, path in self.claim_headers:
            value = lookup(claims, path)
            if value is _MISSING:
                continue
            encoded = encode_claim(value)
            if encoded is None:
                if value is not None:
                    log.debug("claim header %s not emitted: unsafe or oversized value", name)
                continue
            out.append((name, encoded))
        for name, template in self.templates:
            combined = render_template(template, claims)
            if combined is not None:
                out.append((name, combined))
        if self.payload_header is not None:
            try:
                out.append((self.payload_header, payload_b64(claims)))
            except orjson.JSONEncodeError:
                log.debug("payload header %s not emitted: claims not encodable",
                          self.payload_header)
        return out

    def reserved_names(self) -> list[str]:
        """Header names this policy injects (inbound copies are always removed)."""
        names = [name for name, _ in self.claim_headers]
        names.extend(name for name, _ in self.templates)
        if self.payload_header is not None:
            names.append(self.payload_header)
        return names


def _compile_rule(rule: ClaimRule) -> tuple[ClaimPath, int, Any]:
    op = _OPS[rule.op]
    value = rule.value
    if op == _OP_ONE_OF:
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    elif op == _OP_PRESENT:
        value = True if value is None else bool(value)
    return (rule.path, op, value)
