"""Loading a config: a file or text -> YAML -> ``${NAME}`` -> the walk -> `GatewayConfig`.

Owns the entry points (`load_config`, `load_config_text`, `parse_config`), the YAML loader that
records duplicate keys, and the placing of every walker error at ``<file>:<line>:<column>`` of
the node its path names, in document order. Nothing here opens sockets or exits the process.
May import: `fastgate.config.walker` (and what it imports), `fastgate.errors`, PyYAML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping
from typing import Any

import yaml

from fastgate.config.model import GatewayConfig
from fastgate.config.syntax import _key_path
from fastgate.config.walker import _Walker
from fastgate.errors import ConfigError

__all__ = ["load_config", "load_config_text", "parse_config"]


def load_config(path: str | os.PathLike[str],
                environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, validate and build a config file. Raises ConfigError with every problem."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the config: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not UTF-8 (byte offset {exc.start})"]) from exc
    return load_config_text(text, source, environ)


def load_config_text(text: str, source: str,
                     environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """:func:`load_config` of a document already read (``fastgate check -c -`` reads standard
    input); ``source`` names it in errors and relative paths resolve against its directory.
    Every error carries ``<source>:<line>:<column>`` of the node it is about (or of the
    nearest enclosing one that exists, for a missing key), in document order."""
    loader = _Loader(text)
    positions: dict[str, tuple[int, int]] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            _node_positions(node, "", positions, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        raise ConfigError([f"{where}: invalid YAML: {problem}"
                           + (f" ({context})" if context else "")]) from exc
    finally:
        loader.dispose()
    duplicates = [f"{source}:{d}" for d in loader.duplicates]
    try:
        config = parse_config(data, environ, source)
    except ConfigError as exc:
        located = [_locate(e, source, positions) for e in exc.errors]
        raise ConfigError(_in_document_order(duplicates + located, source)) from None
    if duplicates:
        raise ConfigError(duplicates)
    return config


def _node_positions(node: yaml.Node, path: str, out: dict[str, tuple[int, int]],
                    active: set[int]) -> None:
    """``out[path] = (line, column)`` (1-based) for every node, with the paths the walker uses
    (:func:`_key_path`). A mapping or list value is placed at its key (``routes:``), a scalar
    at the value itself. ``active`` guards against recursive aliases."""
    if id(node) in active:
        return
    out.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    active.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or \
                    key_node.tag != "tag:yaml.org,2002:str":
                continue  # merge keys and non-string keys: their errors use the parent
            sub = _key_path(path, key_node.value)
            mark = key_node.start_mark
            out.setdefault(sub + _KEY_MARK, (mark.line + 1, mark.column + 1))
            if not isinstance(value_node, yaml.ScalarNode):
                out.setdefault(sub, (mark.line + 1, mark.column + 1))
            _node_positions(value_node, sub, out, active)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_positions(item, f"{path}[{i}]", out, active)
    active.discard(id(node))


_KEY_MARK = "\0key"  # positions[path + _KEY_MARK]: where the key itself is (unknown keys)
_LAST_SEGMENT_RE = re.compile(r"(?:\.[^.\[\]]+|\[[^\]]*\])$")


def _locate(error: str, source: str, positions: Mapping[str, tuple[int, int]]) -> str:
    """``<path>: <message>`` -> ``<source>:<line>:<column>: <path>: <message>``, placed at
    the node of ``<path>`` or of its nearest ancestor in the document."""
    path, sep, message = error.partition(": ")
    if not sep or path == "(root)":
        return error
    if message.startswith("unknown key") and path + _KEY_MARK in positions:
        line, column = positions[path + _KEY_MARK]
        return f"{source}:{line}:{column}: {error}"
    probe = path
    while probe and probe not in positions:
        shorter = _LAST_SEGMENT_RE.sub("", probe)
        if shorter == probe:
            return error  # not a path of this document
        probe = shorter
    if not probe:
        return error
    line, column = positions[probe]
    return f"{source}:{line}:{column}: {error}"


def _in_document_order(errors: list[str], source: str) -> list[str]:
    """Errors with a position sorted by it (a stable sort: one node's errors keep the
    walker's order); errors about the whole document first."""
    prefix = f"{source}:"

    def key(error: str) -> tuple[int, int]:
        if error.startswith(prefix):
            line, _, rest = error[len(prefix):].partition(":")
            column = rest.partition(":")[0]
            if line.isdigit() and column.isdigit():
                return int(line), int(column)
        return 0, 0

    return sorted(errors, key=key)


def parse_config(data: Any, environ: Mapping[str, str] | None = None,
                 source: str | None = None) -> GatewayConfig:
    """Validate an already-parsed document (a mapping). Relative file paths in it resolve
    against the directory of ``source``. Raises ConfigError with every problem."""
    base_dir = os.path.dirname(os.path.abspath(source)) if source else os.getcwd()
    walker = _Walker(os.environ if environ is None else environ, base_dir)
    config = walker.gateway(walker.substitute(data, ""), source)
    if walker.errors or config is None:
        raise ConfigError(walker.errors or ["(root): invalid config"])
    return config


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, plus a record of duplicate keys (PyYAML silently keeps the
    last one, which would let a second `providers:` block or route key vanish unnoticed)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Hashable, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            mark = key_node.start_mark
            if isinstance(key, Hashable) and key in seen:
                self.duplicates.append(f"{mark.line + 1}:{mark.column + 1}: duplicate key "
                                       f"{key!r} (first at line {seen[key]})")
            elif isinstance(key, Hashable):
                seen[key] = mark.line + 1
        return super().construct_mapping(node, deep)
