"""The routes: ``routes[]`` (name, match, upstream, strip_prefix) and each route's ``auth``
(providers, scopes, claim rules, API key rule, claim and payload headers, DPoP, one-time
tokens).

`RouteSections` adds their readers to the walker. It extends `ProviderSections`: a route names
providers (their issuers, lifetimes and input headers are checked against it) and DPoP takes
the providers' algorithm list. The top level walks the providers first and sets
``providers`` and ``input_headers`` before the routes.
May import: `fastgate.config.model`, `.syntax`, `.collector`, `.providers`,
`fastgate.httpfields`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal, cast
from urllib.parse import urlsplit

from fastgate.config.model import (
    ApiKeyRule,
    ApiKeysConfig,
    AuthConfig,
    ClaimHeader,
    ClaimOp,
    ClaimPath,
    ClaimRule,
    ClaimTemplate,
    DpopConfig,
    ProviderConfig,
    RouteConfig,
    RouteMatch,
    ScopeRule,
    _field_names,
)
from fastgate.config.providers import _HMAC_MIN_BYTES, _MAX_CLOCK_SKEW, ProviderSections
from fastgate.config.syntax import (
    _NONE,
    _TOKEN_RE,
    _did_you_mean,
    _header_key,
    _key_path,
    _kind,
    parse_claim_path,
    parse_claim_template,
)
from fastgate.httpfields import HOP_BY_HOP

__all__ = ["RouteSections"]

_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3 scope-token
# Names a claim/payload header may never take: hop-by-hop (RFC 9110 §7.6.1), framing and
# routing (§6.4, §7.2), credentials, and the X-Forwarded-*/Forwarded headers fastgate sets.
_RESERVED_HEADERS = HOP_BY_HOP | frozenset({
    "proxy-authenticate", "proxy-authorization", "host", "content-length",
    "content-type", "content-encoding", "expect", "authorization", "cookie", "set-cookie",
    "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via",
})

_ROUTE_KEYS = ("name", "match", "upstream", "strip_prefix", "auth")
_AUTH_KEYS = ("providers", "mode", "audiences", "scopes", "claims", "api_key", "allow_missing",
              "forward_token", "claim_headers", "payload_header", "failure_status",
              "hide_reasons", "cors_preflight", "certificate_bound", "dpop", "one_time")
_CLAIM_OPS: tuple[ClaimOp, ...] = ("equals", "one_of", "contains", "present")


class RouteSections(ProviderSections):
    """Readers of the routes and of their auth options."""

    # Set by the top level (walker._Walker.gateway) before the routes are read.
    providers: dict[str, ProviderConfig]
    input_headers: dict[str, str]  # header key -> path of its definition

    def header_name(self, value: Any, path: str, taken: dict[str, str]) -> str | None:
        """A header fastgate writes: a valid, non-reserved name not already in ``taken``."""
        name = self.string(value, path)
        if name is None:
            return None
        lower = _header_key(name)
        if not _TOKEN_RE.fullmatch(name):
            self.err(path, f"invalid header name {name!r} (RFC 9110 §5.6.2 token)")
        elif lower in _RESERVED_HEADERS:
            self.err(path, f"header {name!r} is reserved and cannot carry claims")
        elif lower in taken:
            self.err(path, f"header {name!r} is already used by {taken[lower]}")
        else:
            taken[lower] = path
            return name
        return None

    def routes(self, value: Any, upstreams: list[str], providers: list[str],
               api_keys: ApiKeysConfig | None) -> tuple[RouteConfig, ...]:
        if not isinstance(value, list) or not value:
            self.err("routes", "must be a non-empty list" + (
                "" if isinstance(value, list) else f", got {_kind(value)}"))
            return ()
        out: list[RouteConfig] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(value):
            p = f"routes[{i}]"
            if isinstance(raw, dict) and isinstance(name := raw.get("name"), str):
                if name in seen:
                    self.err(f"{p}.name", f"duplicate route name {name!r} (also "
                                          f"routes[{seen[name]}])")
                seen.setdefault(name, i)
            route = self.route(raw, p, upstreams, providers, api_keys)
            if route is not None:
                out.append(route)
        return tuple(out)

    def route(self, value: Any, path: str, upstreams: list[str], providers: list[str],
              api_keys: ApiKeysConfig | None) -> RouteConfig | None:
        m = self.mapping(value, path, _ROUTE_KEYS, required=("name", "match", "upstream", "auth"))
        if m is None:
            return None
        name = self.opt(m, "name", path, "", self.string)
        match = self.opt(m, "match", path, None, self.match)
        upstream = self.opt(m, "upstream", path, "", self.string)
        if upstream and upstream not in upstreams:
            self.err(f"{path}.upstream", f"unknown upstream {upstream!r}"
                     + _did_you_mean(upstream, upstreams))
        strip = self.opt(m, "strip_prefix", path, False, self.boolean)
        if strip and match is not None and match.path_prefix is None:
            self.err(f"{path}.strip_prefix", "needs match.path_prefix")
        auth: AuthConfig | None = None
        if m.get("auth") != "none" and "auth" in m:
            if isinstance(m["auth"], str):
                self.err(f"{path}.auth", f"must be 'none' or a mapping, got {m['auth']!r}")
            else:
                auth = self.auth(m["auth"], f"{path}.auth", providers, api_keys)
        return RouteConfig(name, match or RouteMatch(), upstream, strip, auth)

    def match(self, value: Any, path: str) -> RouteMatch | None:
        m = self.mapping(value, path, _field_names(RouteMatch))
        if m is None:
            return None
        paths = {}
        for key in ("path", "path_prefix"):
            text = self.opt(m, key, path, None, self.string)
            if text is not None and (not text.startswith("/") or "?" in text or "#" in text):
                self.err(f"{path}.{key}", f"must start with '/' and have no query, got {text!r}")
            paths[key] = text
        regex = self.opt(m, "path_regex", path, None, self.string)
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                self.err(f"{path}.path_regex", f"invalid regular expression: {exc}")
        methods = self.opt(m, "methods", path, None, self.names, pattern=_TOKEN_RE,
                           what="method")
        host = self.opt(m, "host", path, None, self.string)
        if host is not None and not re.fullmatch(r"[^\s/:\[\]]+|\[[0-9A-Fa-f:.]+\]", host):
            self.err(f"{path}.host", f"must be a host name without a port, got {host!r}")
        kinds = [k for k in ("path", "path_prefix", "path_regex") if k in m]
        if len(kinds) > 1:
            self.err(path, f"only one of path, path_prefix, path_regex is allowed; got "
                     f"{', '.join(kinds)}")
        elif not kinds and "host" not in m:
            self.err(path, "needs at least one of path, path_prefix, path_regex or host")
        upper = tuple(dict.fromkeys(x.upper() for x in methods)) if methods else None
        if methods and upper and len(upper) != len(methods):
            self.err(f"{path}.methods", "duplicate method (methods are case-insensitive)")
        return RouteMatch(paths["path"], paths["path_prefix"], regex, upper,
                          host.lower() if host else None)

    def auth(self, value: Any, path: str, providers: list[str],
             api_keys: ApiKeysConfig | None) -> AuthConfig | None:
        m = self.mapping(value, path, _AUTH_KEYS, required=("providers",))
        if m is None:
            return None
        names = self.opt(m, "providers", path, _NONE, self.names, what="provider")
        issuers: dict[str, str] = {}
        for i, name in enumerate(names):
            if name not in providers:
                self.err(f"{path}.providers[{i}]", f"unknown provider {name!r}"
                         + _did_you_mean(name, providers))
            elif (prov := self.providers.get(name)) and prov.issuer in issuers:
                # SPEC §3 step 3: the token's iss selects the provider; one issuer twice on a
                # route would make that choice ambiguous.
                self.err(f"{path}.providers[{i}]", f"provider {name!r} has the same issuer as "
                         f"{issuers[prov.issuer]!r}")
            elif prov:
                issuers[prov.issuer] = name
        scopes: ScopeRule | None = None
        s = self.mapping(m["scopes"], f"{path}.scopes", ("all", "any")) if "scopes" in m else None
        if s is not None:
            if len(s) != 1:
                self.err(f"{path}.scopes", "needs exactly one of all, any")
            for mode in s.keys() & {"all", "any"}:
                listed = self.names(s[mode], f"{path}.scopes.{mode}", pattern=_SCOPE_RE,
                                    what="scope")
                scopes = ScopeRule(cast(Literal["any", "all"], mode), listed or ())
        api_key = self.opt(m, "api_key", path, None, self.api_key_rule)
        if api_key is not None and api_keys is None:
            self.err(f"{path}.api_key", "needs a top-level api_keys section with keys")
        taken = dict(self.input_headers)  # names fastgate writes must not collide with these
        headers: list[ClaimHeader] = []
        if "claim_headers" in m:
            p = f"{path}.claim_headers"
            for header, claim in (self.mapping(m["claim_headers"], p, None) or {}).items():
                hp = _key_path(p, header)
                name_ok = self.header_name(header, hp, taken)
                if isinstance(claim, str) and ("{" in claim or "}" in claim):
                    template = self.claim_template(claim, hp)
                    if name_ok and template:
                        headers.append(ClaimHeader(name_ok, (), template))
                    continue
                claim_path = self.claim_path(claim, hp)
                if name_ok and claim_path:
                    headers.append(ClaimHeader(name_ok, claim_path))
        payload_header = self.opt(m, "payload_header", path, None, self.header_name, taken=taken)
        return AuthConfig(
            providers=names,
            mode=cast(Literal["any", "all"],
                      self.opt(m, "mode", path, "any", self.choice, options=("any", "all"))),
            audiences=self.opt(m, "audiences", path, None, self.names, what="audience"),
            scopes=scopes,
            claims=self.opt(m, "claims", path, (), self.claim_rules),
            api_key=api_key,
            allow_missing=self.opt(m, "allow_missing", path, False, self.boolean),
            forward_token=self.opt(m, "forward_token", path, True, self.boolean),
            claim_headers=tuple(headers),
            payload_header=payload_header,
            failure_status=self.opt(m, "failure_status", path, None, self.integer, lo=400,
                                    hi=499),
            hide_reasons=self.opt(m, "hide_reasons", path, False, self.boolean),
            cors_preflight=cast(Literal["bypass", "auth"], self.opt(
                m, "cors_preflight", path, "auth", self.choice, options=("bypass",))),
            certificate_bound=self.opt(m, "certificate_bound", path, False, self.boolean),
            dpop=self.dpop(m["dpop"], f"{path}.dpop") if m.get("dpop") is not None else None,
            one_time=self.one_time(m, path, names),
        )

    def one_time(self, m: Mapping[str, Any], path: str, names: tuple[str, ...]) -> bool:
        if not self.opt(m, "one_time", path, False, self.boolean):
            return False
        for name in names:
            prov = self.providers.get(name)
            if prov is not None and prov.max_lifetime is None:
                # RFC 7523 §3 item 7: a jti is remembered until the token expires; without a
                # lifetime bound an exp far ahead would pin it in the store for that long.
                self.err(f"{path}.one_time", f"needs max_lifetime on provider {name!r} (it "
                                             "bounds how long a used jti is remembered)")
        return True

    def dpop(self, value: Any, path: str) -> DpopConfig | None:
        d = DpopConfig()
        m = self.mapping(value, path, _field_names(DpopConfig))
        if m is None:
            return None
        algorithms = self.opt(m, "algorithms", path, d.algorithms, self.algorithms)
        for i, alg in enumerate(algorithms):
            if alg in _HMAC_MIN_BYTES:
                # RFC 9449 §4.3 check 5: the proof's alg is asymmetric.
                self.err(f"{path}.algorithms[{i}]", f"{alg} is symmetric; a DPoP proof is "
                                                    "signed with the client's private key")
        external = self.opt(m, "external_url", path, None, self.string)
        if external is not None:
            parts = urlsplit(external)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
                    or parts.fragment or parts.username is not None or \
                    parts.path not in ("", "/"):
                self.err(f"{path}.external_url", "must be scheme://host[:port] (what clients "
                                                 f"put in htu, without a path), got "
                                                 f"{external!r}")
        return DpopConfig(
            cast(Literal["allowed", "required"], self.opt(
                m, "mode", path, str(d.mode), self.choice, options=("allowed", "required"))),
            algorithms,
            self.opt(m, "max_age", path, d.max_age, self.duration, positive=True, hi=3600.0),
            self.opt(m, "clock_skew", path, d.clock_skew, self.duration, hi=_MAX_CLOCK_SKEW),
            self.opt(m, "nonce", path, d.nonce, self.boolean),
            external.rstrip("/") if external else None)

    def claim_template(self, value: str, path: str) -> ClaimTemplate | None:
        try:
            return parse_claim_template(value)
        except ValueError as exc:
            self.err(path, f"invalid claim template {value!r}: {exc}")
            return None

    def claim_path(self, value: Any, path: str) -> ClaimPath | None:
        text = self.string(value, path)
        if text is None:
            return None
        try:
            return parse_claim_path(text)
        except ValueError as exc:
            self.err(path, f"invalid claim path {text!r}: {exc}")
            return None

    def claim_rules(self, value: Any, path: str) -> tuple[ClaimRule, ...] | None:
        rules: list[ClaimRule] = []
        for claim, raw in (self.mapping(value, path, None) or {}).items():
            p = _key_path(path, claim)
            claim_path = self.claim_path(claim, p)
            m = self.mapping(raw, p, _CLAIM_OPS)
            if m is None or claim_path is None:
                continue
            ops = [op for op in _CLAIM_OPS if op in m]
            if len(ops) != 1:
                self.err(p, "needs exactly one of equals, one_of, contains, present; got "
                         + (", ".join(ops) or "none"))
                continue
            op, arg, ap = ops[0], m[ops[0]], f"{p}.{ops[0]}"
            if op == "present":
                rules.append(ClaimRule(claim_path, op, self.boolean(arg, ap)))
            elif op == "one_of":
                if not isinstance(arg, list) or not arg:
                    self.err(ap, "must be a non-empty list")
                    continue
                for i, item in enumerate(arg):
                    self.scalar(item, f"{ap}[{i}]")
                rules.append(ClaimRule(claim_path, op, tuple(arg)))
            else:
                rules.append(ClaimRule(claim_path, op, self.scalar(arg, ap)))
        return tuple(rules)

    def scalar(self, value: Any, path: str) -> Any:
        if isinstance(value, str | int | float) and not (
                isinstance(value, float) and not math.isfinite(value)):
            return value
        self.err(path, f"must be a string, number or boolean, got {_kind(value)}")
        return None

    def api_key_rule(self, value: Any, path: str) -> ApiKeyRule | None:
        m = self.mapping(value, path, ("required", "bind_claim"))
        if m is None:
            return None
        bind = self.claim_path(m["bind_claim"], f"{path}.bind_claim") if "bind_claim" in m \
            else None
        return ApiKeyRule(self.opt(m, "required", path, True, self.boolean), bind)
