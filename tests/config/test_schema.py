"""``fastgate schema`` and the loader agree (SPEC §2, §8).

Both ways: every key the loader accepts (its ``_TOP_KEYS``-style tuples and the config
dataclasses' fields, read from fastgate/config/__init__.py, never restated here) is a property of
the
schema at the same place, and the schema has no key the loader would refuse; and every shipped
example config and every YAML snippet in docs/ validates against the schema (a snippet against
the section it is part of) and loads. ``jsonschema`` is a test-only dependency.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from fastgate import config as c
from fastgate.config import parse_config
from fastgate.config.schema import DIALECT, schema

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = schema()
DEFS = SCHEMA["$defs"]
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _names(cls: type, *drop: str) -> set[str]:
    return {f.name for f in fields(cls)} - set(drop)


def _literal(cls: type, attr: str) -> set[str]:
    return set(typing.get_args(typing.get_type_hints(cls)[attr]))


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    """The object schema behind a ``$ref`` or an "x or null" / "'none' or auth" ``anyOf``."""
    while True:
        if "$ref" in node:
            node = DEFS[node["$ref"].rsplit("/", 1)[1]]
        elif "anyOf" in node and "properties" not in node:
            objects = [n for n in node["anyOf"] if n.get("type") == "object" or "$ref" in n]
            if len(objects) != 1:
                return node
            node = objects[0]
        else:
            return node


def _props(node: dict[str, Any]) -> set[str]:
    return set(_resolve(node)["properties"])


def _at(*path: str) -> dict[str, Any]:
    """The object schema at a path of property names; ``[]`` steps into array items, ``*``
    into a name -> value mapping's values."""
    node = _resolve(SCHEMA)
    for step in path:
        if step == "[]":
            node = node["items"]
        elif step == "*":
            node = node["additionalProperties"]
        else:
            node = node["properties"][step]
        node = _resolve(node)
    return node


# Where each loader key set applies: (schema path, the loader's keys from
# fastgate/config/__init__.py).
LOADER_KEYS: list[tuple[tuple[str, ...], set[str]]] = [
    ((), set(c._TOP_KEYS)),
    (("limits",), _names(c.Limits)),
    (("timeouts",), _names(c.Timeouts)),
    (("cache",), _names(c.CacheConfig)),
    (("access_log",), _names(c.AccessLogConfig)),
    (("tracing",), _names(c.TracingConfig)),
    (("tracing", "otel"), _names(c.OtelConfig)),
    (("tls",), _names(c.TlsConfig)),
    (("tls", "certificates", "[]"), _names(c.TlsCertificate)),
    (("upstreams", "*"), _names(c.UpstreamConfig, "name")),
    (("upstreams", "*", "tls"), _names(c.UpstreamTlsConfig)),
    (("providers", "*"), set(c._PROVIDER_KEYS)),
    (("providers", "*", "jwks_cache"), _names(c.JwksCacheConfig)),
    (("providers", "*", "token_from", "[]"),
     _literal(c.TokenSource, "place") | (_names(c.TokenSource, "place", "name"))),
    (("api_keys",), _names(c.ApiKeysConfig)),
    (("api_keys", "keys", "[]"), _names(c.ApiKey)),
    (("routes", "[]"), set(c._ROUTE_KEYS)),
    (("routes", "[]", "match"), _names(c.RouteMatch)),
    (("routes", "[]", "auth"), set(c._AUTH_KEYS)),
    (("routes", "[]", "auth", "scopes"), _literal(c.ScopeRule, "mode")),
    (("routes", "[]", "auth", "claims", "*"), set(c._CLAIM_OPS)),
    (("routes", "[]", "auth", "api_key"), _names(c.ApiKeyRule)),
    (("routes", "[]", "auth", "dpop"), _names(c.DpopConfig)),
    (("replay_store",), {"memory", "redis"}),
    (("replay_store", "memory"), {"max_entries"}),
    (("replay_store", "redis"), _names(c.RedisStoreConfig)),
]


def test_the_schema_is_draft_2020_12_and_valid() -> None:
    assert SCHEMA["$schema"] == DIALECT == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize(("path", "loader"), LOADER_KEYS,
                         ids=[".".join(p) or "(root)" for p, _ in LOADER_KEYS])
def test_every_loader_key_is_in_the_schema_and_vice_versa(path: tuple[str, ...],
                                                          loader: set[str]) -> None:
    node = _at(*path)
    in_schema = _props(node)
    assert in_schema == loader, (f"only in the loader: {sorted(loader - in_schema)}; "
                                 f"only in the schema: {sorted(in_schema - loader)} "
                                 "(describe a new key in fastgate/config/schema.py)")


def test_every_object_in_the_schema_is_checked_against_the_loader() -> None:
    """No closed object of the schema escapes the comparison above (a new section must be
    added to LOADER_KEYS)."""
    compared = {json.dumps(_at(*p), sort_keys=True) for p, _ in LOADER_KEYS}
    unchecked: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if node.get("additionalProperties") is False and \
                    json.dumps(node, sort_keys=True) not in compared:
                unchecked.append(where)
            for k, v in node.items():
                walk(v, f"{where}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{where}/{i}")

    walk(SCHEMA, "#")
    assert unchecked == []


def test_every_described_property_has_a_description() -> None:
    missing: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for name, prop in (node.get("properties") or {}).items():
                if "description" not in prop:
                    missing.append(f"{where}.{name}")
            for k, v in node.items():
                walk(v, f"{where}/{k}")

    walk(SCHEMA, "#")
    assert missing == []


def test_defaults_are_the_loaders_defaults() -> None:
    loaded = parse_config({"upstreams": {"u": {"url": "http://127.0.0.1:1"}},
                           "routes": [{"name": "r", "match": {"path_prefix": "/"},
                                       "upstream": "u", "auth": "none"}]})
    def leaf(*path: str) -> Any:
        return _at(*path[:-1])["properties"][path[-1]]["default"]

    assert leaf("workers") == loaded.workers
    assert leaf("log_format") == loaded.log_format == "text"
    assert leaf("limits", "max_body_bytes") == loaded.limits.max_body_bytes
    assert leaf("timeouts", "header") == loaded.timeouts.header
    assert leaf("providers", "*", "jwks_cache", "max_stale") == c.JwksCacheConfig().max_stale
    assert leaf("listen") == f"{loaded.listen.host}:{loaded.listen.port}"


# -- examples and documented snippets --------------------------------------------------------


EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_config_validates(path: Path) -> None:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in VALIDATOR.iter_errors(doc)]
    assert errors == []


def _snippets() -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for md in sorted((ROOT / "docs").glob("*.md")):
        text = md.read_text(encoding="utf-8")
        for m in re.finditer(r"```ya?ml\n(.*?)```", text, re.S):
            line = text[:m.start()].count("\n") + 1
            out.append((f"docs/{md.name}:{line}", textwrap.dedent(m.group(1))))
    return out


SNIPPETS = _snippets()
# Sections a documented fragment can be part of, most general first.
SECTIONS = [((), SCHEMA)] + [(p, _at(*p)) for p, _ in LOADER_KEYS[1:]]


def _section_for(doc: dict[str, Any]) -> tuple[tuple[str, ...], dict[str, Any]]:
    for path, node in SECTIONS:
        try:
            if set(doc) <= _props(node):
                return path, node
        except (KeyError, ValueError):
            continue
    raise AssertionError(f"no schema section has all of {sorted(doc)}")


def test_docs_have_yaml_snippets() -> None:
    assert len(SNIPPETS) >= 10


@pytest.mark.parametrize(("where", "text"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_every_yaml_snippet_in_docs_validates(where: str, text: str) -> None:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict), where
    path, node = _section_for(doc)
    node = copy.deepcopy(node)
    node.pop("required", None)  # a fragment shows some keys of its section
    validator = jsonschema.Draft202012Validator({**node, "$defs": DEFS})
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(doc)]
    assert errors == [], f"{where} (as {'.'.join(path) or 'the root'})"


def test_the_schema_catches_what_the_loader_refuses() -> None:
    """Every check can fail: a misspelt key, a bad enum and a bad duration are errors."""
    base: dict[str, Any] = {"upstreams": {"u": {"url": "http://127.0.0.1:1"}},
                            "routes": [{"name": "r", "match": {"path_prefix": "/"},
                                        "upstream": "u", "auth": "none"}]}
    assert list(VALIDATOR.iter_errors(base)) == []
    for bad in ({"log_fromat": "json"}, {"log_format": "xml"}, {"drain_timeout": "soon"},
                {"routes": []}, {"workers": -1}):
        assert list(VALIDATOR.iter_errors({**base, **bad})), bad


def test_cli_prints_the_schema() -> None:
    p = subprocess.run([sys.executable, "-m", "fastgate", "schema"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == SCHEMA


def test_configuration_doc_shows_the_editor_line() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert "# yaml-language-server: $schema=" in text
    assert "fastgate schema" in text
