"""The `fastgate` command line (SPEC §8). The only module that exits the process."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from fastgate.errors import ConfigError

if TYPE_CHECKING:
    from fastgate.config import GatewayConfig, RouteMatch


def _load_or_report(path: str) -> GatewayConfig | None:
    """The config, or None after printing every error with its path (SPEC §2)."""
    from fastgate.config import load_config

    try:
        return load_config(path, os.environ)
    except ConfigError as exc:  # the loader reports unreadable files this way too
        _print_config_errors(path, exc)
        return None


def _print_config_errors(path: str, exc: ConfigError) -> None:
    print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
    for line in exc.errors:
        print(f"  {line}", file=sys.stderr)


STDIN_NAME = "<stdin>"


def _load_stdin_or_report() -> GatewayConfig | None:
    """``check -c -``: the document on standard input (relative paths in it resolve against
    the working directory)."""
    from fastgate.config import load_config_text

    raw = sys.stdin.buffer.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _print_config_errors(STDIN_NAME, ConfigError(
            [f"{STDIN_NAME}: not UTF-8 (byte offset {exc.start})"]))
        return None
    try:
        return load_config_text(text, STDIN_NAME, os.environ)
    except ConfigError as exc:
        _print_config_errors(STDIN_NAME, exc)
        return None


def path_regex_warnings(config: GatewayConfig) -> list[str]:
    """Routes whose ``path_regex`` reads like a prefix. Regexes are full-matched (as Envoy's
    ``safe_regex``): ``^/mobile/v[0-9]+/`` matches ``/mobile/v1/`` and never
    ``/mobile/v1/orders``."""
    out: list[str] = []
    for i, route in enumerate(config.routes):
        regex = route.match.path_regex
        if regex is None:
            continue
        where = f"routes[{i}].match.path_regex ({route.name})"
        body = regex[:-1] if regex.endswith("$") and not regex.endswith("\\$") else regex
        if body.endswith("/"):
            out.append(f"{where}: {regex!r} is matched against the whole path, so it only "
                       "matches paths ending in '/'; to match everything below it, end it "
                       f"with '.*' ({body + '.*'!r}) or use path_prefix")
        elif regex.startswith("^") and regex == body and not body.endswith((".*", ".+")):
            # Anchored at the start only: written as if it were searched for (a prefix).
            out.append(f"{where}: {regex!r} is anchored like a prefix, but the regex is "
                       "matched against the whole path; end it with '.*' to match below it, "
                       "or with '$' to say the whole path is meant")
    return out


def _covers_path(a: RouteMatch, b: RouteMatch) -> bool:
    """Every path ``b`` matches, ``a`` matches too (prefixes are plain string prefixes and
    regexes are full-matched, as in fastgate/dataplane/_routes.pyx)."""
    if a.path is None and a.path_prefix is None and a.path_regex is None:
        return True  # host only: every path
    if a.path_prefix is not None:
        inner = b.path_prefix if b.path_prefix is not None else b.path
        if inner is None and b.path_regex is not None:
            inner = _literal_prefix(b.path_regex)  # every path it matches starts with this
        return inner is not None and inner.startswith(a.path_prefix)
    if a.path is not None:
        return b.path == a.path
    if b.path_regex is not None:
        return b.path_regex == a.path_regex
    return b.path is not None and re.fullmatch(a.path_regex or "", b.path) is not None


_REGEX_SPECIAL = frozenset(".^$*+?{}[]\\|()")


def _literal_prefix(regex: str) -> str:
    """The plain characters a full match of ``regex`` must start with: ``/v1/`` of
    ``^/v1/.*``; a character a quantifier makes optional is not part of it."""
    body = regex[1:] if regex.startswith("^") else regex
    if "|" in body:
        return ""  # an alternation can start anywhere
    end = 0
    while end < len(body) and body[end] not in _REGEX_SPECIAL:
        end += 1
    if end < len(body) and body[end] in "*?{" and end > 0:
        end -= 1  # "/ab?": b is optional
    return body[:end]


def shadowed_route_warnings(config: GatewayConfig) -> list[str]:
    """Routes no request can reach: an earlier route matches everything they match (its path
    rule covers theirs, its methods include theirs, its host is theirs or any). First match
    wins (SPEC §2), so such a route is dead configuration, usually an ordering mistake."""
    out: list[str] = []
    routes = config.routes
    for j, later in enumerate(routes):
        for i in range(j):
            first = routes[i]
            a, b = first.match, later.match
            if a.host is not None and a.host != b.host:
                continue
            if a.methods is not None and (b.methods is None or not set(b.methods) <= set(
                    a.methods)):
                continue
            if _covers_path(a, b):
                out.append(f"routes[{j}] ({later.name}) is never used: routes[{i}] "
                           f"({first.name}) comes first and matches every request it would "
                           "(first match wins); move it above or narrow the earlier match")
                break
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def summary(config: GatewayConfig) -> str:
    """``3 routes, 1 provider, 2 upstreams``."""
    return ", ".join((_count(len(config.routes), "route"),
                      _count(len(config.providers), "provider"),
                      _count(len(config.upstreams), "upstream")))


def cmd_check(args: argparse.Namespace) -> int:
    if args.online and args.config == "-":
        # Relative jwks_file paths and secrets are fine from stdin, but an online check is for
        # the file that will be deployed: say which one.
        print("fastgate check: --online needs a config file, not '-'", file=sys.stderr)
        return 2
    config = _load_stdin_or_report() if args.config == "-" else _load_or_report(args.config)
    if config is None:
        return 1
    for warning in path_regex_warnings(config) + shadowed_route_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    name = STDIN_NAME if args.config == "-" else args.config
    if not args.online:
        print(f"{name}: OK ({summary(config)})")
        return 0
    import asyncio

    from fastgate.tools.online import check_online, render

    items = asyncio.run(check_online(config))
    if items:
        print(render(items))
    failed = sum(not i.ok for i in items)
    if failed:
        print(f"{name}: {failed} of {len(items)} online check{'s' if len(items) != 1 else ''} "
              f"failed ({summary(config)})")
        return 1
    print(f"{name}: OK ({summary(config)}; {_count(len(items), 'online check')} passed)")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from fastgate.config.schema import schema

    print(orjson.dumps(schema(), option=orjson.OPT_INDENT_2).decode())
    return 0


def version_text() -> str:
    """``fastgate --version``: the version and what this build runs on."""
    import importlib.machinery
    import platform
    import ssl

    from cryptography import __version__ as crypto_version
    from cryptography.hazmat.backends.openssl.backend import backend

    import fastgate

    package = Path(fastgate.__file__).resolve().parent
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    compiled: list[str] = []
    missing: list[str] = []
    for source in sorted(package.glob("*/_*.pyx"), key=lambda p: p.stem):
        name = source.stem
        (compiled if any((source.parent / f"{name}{sfx}").exists() for sfx in suffixes)
         else missing).append(name)
    ext = "compiled: " + (", ".join(compiled) or "none")
    if missing:
        ext += "; MISSING: " + ", ".join(missing)
    return "\n".join((
        f"fastgate {fastgate.__version__}",
        f"extensions: {ext}",
        f"signatures: {backend.openssl_version_text()} (cryptography {crypto_version})",
        f"tls: {ssl.OPENSSL_VERSION} (Python ssl)",
        f"python: {platform.python_implementation()} {platform.python_version()} "
        f"({sys.platform})",
    ))


def cmd_run(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 1
    from fastgate.ops import supervisor

    return supervisor.run(config, workers=args.workers, log_level=args.log_level,
                          log_format=args.log_format)


def _claim_value(text: str) -> Any:
    """`key=value` pairs: the value is JSON when it parses as JSON, else a plain string."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


_HTTP_METHOD = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §9.1: a token


def _dpop_usage(args: argparse.Namespace) -> str | None:
    """Why the DPoP arguments cannot work together (None when they can)."""
    if not args.dpop:
        for flag, value in (("--htu", args.htu), ("--htm", args.htm),
                            ("--dpop-key", args.dpop_key), ("--dpop-alg", args.dpop_alg),
                            ("--access-token", args.access_token)):
            if value is not None:
                return f"{flag} needs --dpop"
        return None
    if not args.htu:
        return "--dpop needs --htu URL (the URL the request will go to)"
    from urllib.parse import urlsplit

    try:
        url = urlsplit(args.htu)
        url.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"--htu: not a URL: {exc}"
    if url.scheme.lower() not in ("http", "https") or not url.hostname:
        return f"--htu: expected an absolute http(s) URL, got {args.htu!r}"
    if args.htm is not None and not _HTTP_METHOD.fullmatch(args.htm):
        return f"--htm: not an HTTP method: {args.htm!r}"
    if args.access_token is not None and not args.dpop_key:
        return "--access-token needs --dpop-key (the key the token is bound to)"
    return None


def _proof_htu(url: str) -> str:
    """RFC 9449 §4.2: the proof's htu is the target URI without query and fragment."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _bound_jkt(token: str) -> Any:
    """The ``cnf.jkt`` of a token's (unverified) payload, None when it has none."""
    import base64

    parts = token.split(".")
    if len(parts) != 3:
        raise ValueError("--access-token: not a compact JWT (three dot-separated parts)")
    try:
        payload = orjson.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise ValueError("--access-token: its payload is not base64url JSON") from None
    cnf = payload.get("cnf") if isinstance(payload, dict) else None
    return cnf.get("jkt") if isinstance(cnf, dict) else None


def cmd_token(args: argparse.Namespace) -> int:
    """Every argument is checked before anything is printed: a bad --exp after a throw-away
    key's JWK would leave a JWK for a token that never came.

    ``--dpop``: a token bound to a client key (``cnf.jkt``, RFC 9449 §6.1) and one proof for
    ``--htm``/``--htu``; standard output is three lines: the token, the proof, a curl line."""
    from fastgate.config import parse_duration
    from fastgate.tools.devtoken import (
        DevKey,
        generate_key,
        jwk_thumbprint,
        load_key,
        make_dpop_proof,
        mint,
        private_jwk,
    )

    why = _dpop_usage(args)
    if why:
        print(why, file=sys.stderr)
        return 2
    claims: dict[str, Any] = {}
    if args.claims:
        try:
            loaded = orjson.loads(args.claims)
        except orjson.JSONDecodeError as exc:
            print(f"--claims: not JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(loaded, dict):
            print("--claims must be a JSON object", file=sys.stderr)
            return 2
        claims.update(loaded)
    for pair in args.pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            print(f"expected key=value, got {pair!r}", file=sys.stderr)
            return 2
        claims[name] = _claim_value(value)
    for name in ("iss", "sub", "scope"):
        if getattr(args, name):
            claims[name] = getattr(args, name)
    if args.aud:
        claims["aud"] = args.aud[0] if len(args.aud) == 1 else list(args.aud)
    try:
        lifetime = parse_duration(args.exp, "--exp")
    except ValueError as exc:
        print(str(exc) if "--exp" in str(exc) else f"--exp: {exc}", file=sys.stderr)
        return 2
    client: DevKey | None = None
    if args.dpop:
        if args.dpop_key:
            client = load_key(Path(args.dpop_key).read_bytes(), alg=args.dpop_alg)
            if isinstance(client.private, bytes):
                raise ValueError("--dpop-key: a DPoP key is asymmetric (RFC 9449 §4.2), "
                                 "not an HMAC secret")
        else:
            client = generate_key(args.dpop_alg or "ES256")
        jkt = jwk_thumbprint(client.public_jwk())
        if args.access_token is not None:
            token = args.access_token.strip()
            bound = _bound_jkt(token)
            if bound != jkt:
                raise ValueError("--access-token is not bound to --dpop-key: its cnf.jkt is "
                                 f"{bound!r}, the key's thumbprint is {jkt!r}")
        else:
            cnf = claims.get("cnf")
            claims["cnf"] = {**(cnf if isinstance(cnf, dict) else {}), "jkt": jkt}
    if args.dpop and args.access_token is not None:
        key = None  # a proof for a token minted before: no issuer key involved
    elif args.key:
        key = load_key(Path(args.key).read_bytes(), alg=args.alg, kid=args.kid)
    else:
        key = generate_key(args.alg or "RS256", kid=args.kid or "dev")
    if key is not None:
        token = mint(key, claims, lifetime=lifetime)  # may refuse the claims: nothing printed
    proof = ""
    if client is not None:
        proof = make_dpop_proof(client, htm=args.htm or "GET", htu=_proof_htu(args.htu),
                                access_token=token)
    if key is not None and not args.key:
        print("# no --key given: signed with a throw-away key; its public JWK:", file=sys.stderr)
        print(orjson.dumps(key.public_jwk()).decode(), file=sys.stderr)
    if client is None:
        print(token)
        return 0
    if not args.dpop_key:
        print("# no --dpop-key given: a throw-away client key; its PRIVATE JWK (save it and "
              "pass --dpop-key FILE --access-token TOKEN for more proofs):", file=sys.stderr)
        print(orjson.dumps(private_jwk(client)).decode(), file=sys.stderr)
    print(f"# token bound to cnf.jkt {jkt}; a proof is good for one request "
          "(its jti) within the route's dpop.max_age", file=sys.stderr)
    import shlex

    method = [] if (args.htm or "GET") == "GET" else ["-X", shlex.quote(args.htm)]
    print(token)
    print(proof)
    print(" ".join(["curl", *method, "-H", f"'Authorization: DPoP {token}'",
                    "-H", f"'DPoP: {proof}'", shlex.quote(args.htu)]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fastgate.tools import demo

    if args.duration is not None and not (math.isfinite(args.duration) and args.duration > 0):
        print("--duration must be a number of seconds > 0", file=sys.stderr)
        return 2
    for flag, port in (("--port", args.port), ("--admin-port", args.admin_port)):
        if port is not None and not 0 <= port <= 65535:
            print(f"{flag}: {port} is not a port (0-65535; 0 = any free port)",
                  file=sys.stderr)
            return 2
    return demo.main(port=args.port, duration=args.duration, as_json=args.json,
                     workdir=args.dir, admin_port=args.admin_port, tls=args.tls)


def _parse_now(text: str) -> float:
    """Seconds since the epoch, or an ISO 8601 date-time (UTC when it has no offset)."""
    try:
        return float(text)
    except ValueError:
        pass
    import datetime as dt

    moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the token would be accepted, 1 when rejected, 2 on usage/config errors."""
    from fastgate.tools.explain import ExplainError, explain

    token = sys.stdin.read() if args.token == "-" else args.token
    if not token.strip():
        print("fastgate verify: empty token", file=sys.stderr)
        return 2
    try:
        now = _parse_now(args.now) if args.now is not None else None
    except ValueError:
        print(f"--now: expected seconds since the epoch or an ISO 8601 time, got {args.now!r}",
              file=sys.stderr)
        return 2
    config = _load_or_report(args.config)
    if config is None:
        return 2
    try:
        result = explain(config, token, args.route, now)
    except ConfigError as exc:
        _print_config_errors(args.config, exc)
        return 2
    except ExplainError as exc:
        print(f"fastgate verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        print(result.render())
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastgate", description="JWT-validating edge reverse proxy"
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="print the version and build information and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="serve the gateway")
    run.add_argument("-c", "--config", required=True, help="gateway YAML file")
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes (overrides the config; 0 = one per CPU)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     type=str.lower, default=None,
                     help="log level of the master and the workers (default: "
                          "$FASTGATE_LOG_LEVEL, else info); debug adds per-request detail")
    run.add_argument("--log-format", choices=("text", "json"), type=str.lower, default=None,
                     help="operational log lines: text, or one JSON object per line "
                          "(default: the config's log_format, else text)")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config; exit 1 listing every error")
    check.add_argument("-c", "--config", required=True,
                       help="gateway YAML file ('-' reads it from standard input)")
    check.add_argument("--online", action="store_true",
                       help="also fetch every discovery document and JWKS and connect to "
                            "every upstream; one line per check, exit 1 on any failure")
    check.set_defaults(func=cmd_check)

    schema = sub.add_parser("schema", help="print the config's JSON Schema (draft 2020-12)")
    schema.set_defaults(func=cmd_schema)

    token = sub.add_parser("token", help="mint a development token")
    token.add_argument("--key", help="private key file: PEM or JWK (default: throw-away key)")
    token.add_argument("--alg", help="JWS alg (default: from the key type)")
    token.add_argument("--kid", help="key id for the header")
    token.add_argument("--iss")
    token.add_argument("--sub")
    token.add_argument("--aud", action="append", help="audience (repeatable)")
    token.add_argument("--scope", help="space-separated scopes")
    token.add_argument("--exp", default="10m", help="lifetime: seconds or 30s/10m/24h/7d/1h30m")
    token.add_argument("--claims", help="claims as a JSON object")
    token.add_argument("--dpop", action="store_true",
                       help="bind the token to a client key (cnf.jkt, RFC 9449) and print a "
                            "DPoP proof for --htm/--htu and a curl line (stdout: token, "
                            "proof, curl)")
    token.add_argument("--dpop-key",
                       help="client private key file, PEM or JWK (default: a throw-away EC "
                            "P-256 key, printed as a private JWK on stderr)")
    token.add_argument("--dpop-alg", help="proof alg (default: from the client key; RSA: "
                                          "RS256, PS256 on request)")
    token.add_argument("--htm", help="the proof's HTTP method (default GET)")
    token.add_argument("--htu", help="the request URL the proof is for (query and fragment "
                                     "are left out of the proof, kept in the curl line)")
    token.add_argument("--access-token", metavar="TOKEN",
                       help="with --dpop-key: no new token, a fresh proof for this one")
    token.add_argument("pairs", nargs="*", metavar="key=value",
                       help="extra claims; values are JSON when they parse, else strings")
    token.set_defaults(func=cmd_token)

    demo = sub.add_parser(
        "demo", help="dev issuer + echo upstream + gateway on loopback, with curl commands")
    demo.add_argument("--port", type=int, default=8080,
                      help="gateway port (default 8080; a free port if busy; 0 = any free port)")
    demo.add_argument("--admin-port", type=int, default=None,
                      help="metrics/readiness port (default 9901, a free one if busy; "
                           "with --port 0: any free port)")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop by itself after this many seconds (default: until Ctrl-C)")
    demo.add_argument("--json", action="store_true",
                      help="print the URLs, tokens and commands as one JSON line")
    demo.add_argument("--tls", action="store_true",
                      help="serve the gateway over TLS with a throw-away CA; the curl lines "
                           "use --cacert")
    demo.add_argument("--dir", help="where to write the config and the issuer key "
                                    "(default: a new temporary directory)")
    demo.set_defaults(func=cmd_demo)

    verify = sub.add_parser(
        "verify", help="explain the decision about a token: reason, check, claims, key")
    verify.add_argument("-c", "--config", required=True, help="gateway YAML file")
    verify.add_argument("--route", help="route name (default: the first route with JWT auth "
                                        "listing the token's issuer)")
    verify.add_argument("--now", help="evaluate at this time: epoch seconds or ISO 8601")
    verify.add_argument("--json", action="store_true", help="machine-readable output")
    verify.add_argument("token", metavar="TOKEN", help="the JWT ('-' reads it from stdin)")
    verify.set_defaults(func=cmd_verify)
    return parser


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the command and where to read more (argparse's default
    prints the whole usage block first)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


class _Version(argparse.Action):
    """``--version``: computed only when asked (it imports cryptography's backend)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()  # here, so a closed pipe is seen while it can still be handled
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _stdout_gone()
    except (OSError, ValueError) as exc:
        print(f"fastgate {args.command}: {exc}", file=sys.stderr)
        return 1
    return result


def _stdout_gone() -> int:
    """``fastgate verify ... | head``: the reader left. Not an error worth a message: point
    stdout at /dev/null so the interpreter's final flush cannot complain either (the recipe of
    the Python signal docs), and exit 128 + SIGPIPE as a shell expects of a writer cut off."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
