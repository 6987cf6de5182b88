"""Token extraction from the places a route's providers name in ``token_from`` (SPEC §3 step 2).

Rules (security catalog G1/G2, RFC 6750 §2, RFC 9110 §11.1):

* Every value is read (``getall``), never just the first: two ``Authorization`` lines are two
  tokens, and ``Authorization: Bearer A, Bearer B`` is a comma-joined list of two credentials
  (RFC 9110 §5.3 lets an intermediary fold repeated lines into one with commas). A compact JWS
  never contains a comma, so a comma in the credential means a list -> ``token_ambiguous``.
* More than one token occurrence in a request is ``token_ambiguous`` (400) even when the
  values are equal. RFC 6750 §2: "Clients MUST NOT use more than one method to transmit the
  token in each request"; rejecting only *different* values (Kong PR #9922) would still let
  two methods through, and the catalog (G1) asks for the stricter rule. One token, one place.
* The scheme prefix (``Bearer ``) is compared case-insensitively (RFC 9110 §11.1: the auth
  scheme is case-insensitive); exactly one space separates it from the token, so
  ``Bearer  A`` (two spaces) is ``token_malformed``; whitespace inside the token likewise.
  A value with a different scheme (``Basic ...``) is not a token for this source.
* An empty credential (``Bearer``, ``Bearer ``, ``?access_token=``, ``id_token=``) is present
  but malformed: ``token_malformed``, not ``token_missing`` (so ``allow_missing`` cannot be
  used to slip an empty credential through).
* Size is checked before anything parses the token: ``token_too_large``.
* Query: parsed from the raw query string; names and values are percent-decoded (so
  ``access%5Ftoken`` is the same parameter an upstream would decode, and cannot carry an
  unverified token past the gateway). Cookies: ``name=value`` pairs split on ``;`` (RFC 6265
  §4.2.1), names compared exactly (case-sensitive), a DQUOTE-wrapped value unwrapped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol
from urllib.parse import unquote_plus

from fastgate.config import DEFAULT_TOKEN_FROM, TokenSource
from fastgate.token._verify import token_shape
from fastgate.token.reasons import Reason

_HEADER = 0
_QUERY = 1
_COOKIE = 2

_PLACE = {"header": _HEADER, "query": _QUERY, "cookie": _COOKIE}
_NONE: list[str] = []  # shared empty default for getall (never mutated)


class HeaderSource(Protocol):
    """What extraction needs from a request's headers (aiohttp's CIMultiDictProxy)."""

    def getall(self, key: str, default: list[str]) -> list[str]: ...


def dedupe_sources(groups: Iterable[Sequence[TokenSource]]) -> tuple[TokenSource, ...]:
    """Union of several providers' ``token_from`` lists, in order, without duplicates
    (header names compared case-insensitively, prefixes case-insensitively)."""
    seen: set[tuple[str, str, str]] = set()
    out: list[TokenSource] = []
    for group in groups:
        for src in group:
            name = src.name.lower() if src.place == "header" else src.name
            key = (src.place, name, src.prefix.lower())
            if key in seen:
                continue
            seen.add(key)
            out.append(src)
    return tuple(out)


def iter_query(query_string: str) -> list[tuple[str, str, str]]:
    """``(decoded name, decoded value, raw pair)`` for every ``&``-separated pair."""
    out: list[tuple[str, str, str]] = []
    for pair in query_string.split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        if "%" in name or "+" in name:
            name = unquote_plus(name)
        if "%" in value or "+" in value:
            value = unquote_plus(value)
        out.append((name, value, pair))
    return out


def iter_cookies(header_value: str) -> list[tuple[str, str, str]]:
    """``(name, value, raw pair)`` for every cookie in one ``Cookie`` header value."""
    out: list[tuple[str, str, str]] = []
    for raw in header_value.split(";"):
        pair = raw.strip()
        if not pair:
            continue
        name, eq, value = pair.partition("=")
        if not eq:
            continue  # RFC 6265 §5.2: a pair without '=' is ignored
        name = name.strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]  # RFC 6265 §4.1.1: cookie-value may be DQUOTE-wrapped
        out.append((name, value, pair))
    return out


def strip_query_param(query_string: str, name: str) -> str:
    """The query string without every pair whose decoded name is ``name``."""
    return "&".join(raw for n, _, raw in iter_query(query_string) if n != name)


def strip_cookie(header_value: str, name: str) -> str:
    """One ``Cookie`` header value without the cookie ``name`` ("" when nothing is left)."""
    return "; ".join(raw for n, _, raw in iter_cookies(header_value) if n != name)


class _Compiled:
    __slots__ = ("index", "name", "place", "prefix", "prefix_bare", "prefix_len", "source")

    def __init__(self, index: int, source: TokenSource) -> None:
        self.index = index
        self.source = source
        self.place = _PLACE[source.place]
        self.name = source.name
        self.prefix = source.prefix.lower()
        self.prefix_len = len(source.prefix)
        # "Bearer" with nothing after it: the scheme was sent without a credential.
        self.prefix_bare = self.prefix.rstrip(" ")


class TokenExtractor:
    """Finds the token(s) of a request in the configured places.

    :meth:`extract` is the ``mode: any`` path: one token or a reason. :meth:`extract_all` is
    the ``mode: all`` path: at most one token per place, several places allowed.
    """

    __slots__ = ("_cookie", "_header", "_query", "_single", "max_token_bytes", "sources")

    def __init__(self, sources: Sequence[TokenSource] = DEFAULT_TOKEN_FROM,
                 max_token_bytes: int = 8192) -> None:
        self.sources: tuple[TokenSource, ...] = dedupe_sources([sources])
        self.max_token_bytes = max_token_bytes
        compiled = [_Compiled(i, s) for i, s in enumerate(self.sources)]
        self._header = tuple(c for c in compiled if c.place == _HEADER)
        self._query = tuple(c for c in compiled if c.place == _QUERY)
        self._cookie = tuple(c for c in compiled if c.place == _COOKIE)
        # The common case (one header with a scheme prefix, e.g. the default Authorization:
        # Bearer) gets a fast path in extract().
        self._single: _Compiled | None = (
            compiled[0] if len(compiled) == 1 and compiled[0].place == _HEADER
            and compiled[0].prefix_len else None
        )

    def _collect(self, headers: HeaderSource, query_string: str) -> list[tuple[int, str]]:
        found: list[tuple[int, str]] = []
        for src in self._header:
            for value in headers.getall(src.name, _NONE):
                plen = src.prefix_len
                if plen:
                    if value[:plen].lower() == src.prefix:
                        found.append((src.index, value[plen:]))
                    elif value.lower() == src.prefix_bare:
                        found.append((src.index, ""))
                else:
                    found.append((src.index, value))
        if self._query and query_string:
            pairs = iter_query(query_string)
            for src in self._query:
                for name, value, _ in pairs:
                    if name == src.name:
                        found.append((src.index, value))
        if self._cookie:
            cookie_values = headers.getall("Cookie", _NONE)
            if cookie_values:
                cookies = [c for v in cookie_values for c in iter_cookies(v)]
                for src in self._cookie:
                    for name, value, _ in cookies:
                        if name == src.name:
                            found.append((src.index, value))
        return found

    @property
    def single(self) -> _Compiled | None:
        """The one header source with a scheme prefix, when that is the whole configuration
        (the data plane's compiled fast path uses its ``name`` and lower-case ``prefix``)."""
        return self._single

    def check(self, token: str) -> Reason:
        """Shape checks on one extracted credential (no decoding)."""
        return token_shape(token, self.max_token_bytes)

    def extract(self, headers: HeaderSource,
                query_string: str = "") -> tuple[Reason, str | None, int]:
        """``(Reason.OK, token, source_index)``, ``(TOKEN_MISSING, None, -1)`` or a reject."""
        single = self._single
        if single is not None:
            values = headers.getall(single.name, _NONE)
            if len(values) == 1:
                value = values[0]
                plen = single.prefix_len
                if value[:plen].lower() == single.prefix:
                    token = value[plen:]
                    reason = self.check(token)
                    if reason is not Reason.OK:
                        return reason, None, -1
                    return Reason.OK, token, 0
            elif not values:
                return Reason.TOKEN_MISSING, None, -1
        found = self._collect(headers, query_string)
        if not found:
            return Reason.TOKEN_MISSING, None, -1
        if len(found) > 1:
            return Reason.TOKEN_AMBIGUOUS, None, -1
        index, token = found[0]
        reason = self.check(token)
        if reason is not Reason.OK:
            return reason, None, -1
        return Reason.OK, token, index

    def extract_all(self, headers: HeaderSource,
                    query_string: str = "") -> tuple[Reason, list[tuple[int, str]]]:
        """``mode: all``: one token per place; two in one place is ``token_ambiguous``."""
        found = self._collect(headers, query_string)
        if not found:
            return Reason.TOKEN_MISSING, []
        places: set[int] = set()
        for index, token in found:
            if index in places:
                return Reason.TOKEN_AMBIGUOUS, []
            places.add(index)
            reason = self.check(token)
            if reason is not Reason.OK:
                return reason, []
        return Reason.OK, found

    def index_of(self, source: TokenSource) -> int:
        """The index of ``source`` among this extractor's sources (compared as
        :func:`dedupe_sources` compares them), or -1."""
        want = dedupe_sources([[source]])[0]
        for i, src in enumerate(self.sources):
            if src.place == want.place and src.prefix.lower() == want.prefix.lower() and (
                    src.name.lower() == want.name.lower() if src.place == "header"
                    else src.name == want.name):
                return i
        return -1

    def source(self, index: int) -> TokenSource:
        return self.sources[index]
