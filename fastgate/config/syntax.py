"""The syntax of config values, and the helpers that spell paths and values in errors.

Owns: durations (`parse_duration`: ``500ms``, ``1h30m``; also ``fastgate token --ttl``), claim
paths and templates (`parse_claim_path`, `parse_claim_template`; also the auth policy's), the
RFC 9110 token pattern, and how an error names a path (`_key_path`: ``routes[2].auth``,
``upstreams['a.b']``), a value's kind (`_kind`) or a close match (`_did_you_mean`).
May import: `fastgate.config.model`, the standard library.
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import math
import re
from collections.abc import Collection

from fastgate.config.model import ClaimPath, ClaimTemplate

__all__ = ["parse_claim_path", "parse_claim_template", "parse_duration"]

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2 token (header, method)
# A bare number (seconds) or one or more <number><unit> parts, largest unit first: 1h30m, 7d.
_DURATION_RE = re.compile(r"\d+(?:\.\d+)?|(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")
_NONE: tuple[str, ...] = ()


def parse_duration(value: object, path: str | None = None) -> float:
    """Seconds from a number (int/float >= 0) or a string ``500ms``/``30s``/``10m``/``24h``/
    ``7d``, or a compound of those with each unit once, largest first (``1h30m``, ``1d12h``);
    a bare number string means seconds. Raises ValueError, prefixed by ``path`` if given."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.fullmatch(value):
        parts = _DURATION_PART_RE.findall(value)
        units = [_UNIT_SECONDS[u] for _, u in parts]
        if not parts:
            seconds = float(value)
        elif all(a > b for a, b in itertools.pairwise(units)):
            # each unit once, largest first: "30m1h" or "1m1m" is more likely a typo
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        what = repr(value) if isinstance(value, str | int | float) else _kind(value)
        message = (f"invalid duration {what}: use seconds (a number >= 0) or a string like "
                   "500ms, 30s, 10m, 24h, 7d or 1h30m (each unit once, largest first)")
        raise ValueError(f"{path}: {message}" if path else message)
    return seconds


def parse_claim_template(text: str) -> ClaimTemplate:
    """``"{sub}@{tenant.id}"`` -> ``(("sub",), "@", ("tenant", "id"))``: literal text and the
    claim paths of its ``{...}`` placeholders (``{{`` and ``}}`` are literal braces; a
    placeholder's path may be quoted as in :func:`parse_claim_path`). Raises ValueError for
    an unbalanced brace, an empty placeholder or a control character in the literal text."""
    parts: list[str | ClaimPath] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in "{}" and text.startswith(ch * 2, i):
            literal.append(ch)
            i += 2
        elif ch == "{":
            j, quoted = i + 1, False
            while j < n and (quoted or text[j] != "}"):
                if text.startswith('["', j) and not quoted:
                    quoted, j = True, j + 2
                    continue
                if quoted and text.startswith('"]', j):
                    quoted, j = False, j + 2
                    continue
                j += 2 if quoted and text[j] == "\\" else 1
            if j >= n:
                raise ValueError(f"unterminated placeholder at position {i}")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(parse_claim_path(text[i + 1:j]))
            i = j + 1
        elif ch == "}":
            raise ValueError(f"unmatched '}}' at position {i} (write '}}}}' for a literal brace)")
        else:
            if not " " <= ch <= "~":
                # Every header fastgate writes is ASCII without controls (SPEC §2).
                raise ValueError(f"control or non-ASCII character at position {i}")
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    if not any(isinstance(p, tuple) for p in parts):
        raise ValueError("a template needs at least one {claim} placeholder")
    return tuple(parts)


def parse_claim_path(text: str) -> ClaimPath:
    """``tenant.region`` -> ("tenant", "region"); a segment containing dots is quoted:
    ``["https://example.com/roles"]`` or ``a["b.c"].d`` -> ("a", "b.c", "d"). Inside quotes
    ``\\"`` and ``\\\\`` escape. Raises ValueError on an empty segment or a bad quote."""
    segments: list[str] = []
    i, n = 0, len(text)
    while True:
        if text.startswith('["', i):
            j, buf = i + 2, []
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n:
                    j += 1
                buf.append(text[j])
                j += 1
            if not text.startswith('"]', j):
                raise ValueError(f"unterminated quoted segment at position {i}")
            segment, i = "".join(buf), j + 2
        else:
            j = i
            while j < n and text[j] not in '.["]':
                j += 1
            segment, i = text[i:j], j
        if not segment:
            raise ValueError(f"empty segment at position {i}")
        segments.append(segment)
        if i == n:
            return tuple(segments)
        if text[i] == "." and i + 1 < n:
            i += 1
        elif text[i] == ".":
            raise ValueError(f"empty segment at position {i + 1}")
        elif not text.startswith('["', i):
            raise ValueError(f"unexpected {text[i]!r} at position {i} "
                             '(quote a segment containing dots as ["..."])')


def _kind(value: object) -> str:
    for types, name in ((type(None), "null"), (bool, "boolean"), (int, "integer"),
                        (float, "number"), (str, "string"), (list, "list"), (dict, "mapping")):
        if isinstance(value, types):
            return name
    return type(value).__name__


def _did_you_mean(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _key_path(path: str, key: str) -> str:
    if not _PLAIN_KEY_RE.fullmatch(key):
        return f"{path}[{key!r}]"
    return f"{path}.{key}" if path else key


def _header_key(name: str) -> str:
    # Compared case-insensitively (RFC 9110 §5.1) and with '_' as '-': many servers and
    # frameworks fold X_User into X-User, which would smuggle a header past the strip list.
    return name.lower().replace("_", "-")


def _secs(value: float) -> str:
    return f"{value:g}s"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
