"""The walker's core: the error collector with paths, ``${NAME}`` substitution, typed getters.

`Collector` reads no section by itself: each section's mixin (`transport`, `providers`,
`routes`) and the top level (`walker`) extend it with the methods that read their keys. A
getter takes a raw value and its path and returns the typed value, or records
``<path>: <message>`` and returns None, so one walk reports every error.
May import: `fastgate.config.model`, `fastgate.config.syntax`, PyYAML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import yaml

from fastgate.config.syntax import _did_you_mean, _key_path, _kind, _secs, parse_duration

__all__ = ["Collector"]

T = TypeVar("T")

_ENV_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")


class Collector:
    """Collects every error of a walk, each with the path of the value it is about."""

    def __init__(self, environ: Mapping[str, str], base_dir: str) -> None:
        self.environ = environ
        self.base_dir = base_dir
        self.errors: list[str] = []
        self.env_paths: set[str] = set()  # values that had a ${NAME} substituted
        self.env_failed: set[str] = set()  # ...that failed: no follow-up errors for them
        self._memo: dict[int, Any] = {}

    def err(self, path: str, message: str) -> None:
        if path not in self.env_failed:
            self.errors.append(f"{path or '(root)'}: {message}")

    # -- ${NAME} substitution -----------------------------------------------------------------
    def substitute(self, value: Any, path: str) -> Any:
        if isinstance(value, str):
            return self._expand(value, path) if "$" in value else value
        if not isinstance(value, dict | list):
            return value
        if id(value) in self._memo:  # YAML aliases: expand a shared node once (no blow-up)
            return self._memo[id(value)]
        if isinstance(value, list):
            out_list: list[Any] = []
            self._memo[id(value)] = out_list
            out_list.extend(self.substitute(v, f"{path}[{i}]") for i, v in enumerate(value))
            return out_list
        out: dict[Any, Any] = {}
        self._memo[id(value)] = out
        for k, v in value.items():
            out[k] = self.substitute(v, _key_path(path, k) if isinstance(k, str) else path)
        return out

    def _expand(self, text: str, path: str) -> str:
        used = False

        def replace(m: re.Match[str]) -> str:
            nonlocal used
            if m.group(0) == "$${":
                return "${"
            name = m.group(1)
            if name is None:
                self.err(path, "malformed '${' reference: write ${NAME} (letters, digits, _) "
                               "or '$${' for a literal '${'")
                failed.add(path)
                return m.group(0)
            used = True
            if name not in self.environ:
                self.err(path, f"environment variable '{name}' is not set")
                failed.add(path)
                return ""
            return self.environ[name]

        failed: set[str] = set()
        out = _ENV_RE.sub(replace, text)
        self.env_failed |= failed
        if used:
            self.env_paths.add(path)
        return out

    # -- generic getters: a raw value and its path in, the typed value or None (error) out ---
    def mapping(self, value: Any, path: str, keys: Collection[str] | None,
                required: Collection[str] = ()) -> dict[str, Any] | None:
        """A mapping with string keys; ``keys`` (unless None) lists every allowed key."""
        if not isinstance(value, dict):
            self.err(path, f"must be a mapping, got {_kind(value)}")
            return None
        for key in value:
            if not isinstance(key, str):
                self.err(path, f"keys must be strings, got {_kind(key)} {key!r}")
            elif keys is not None and key not in keys:
                self.err(_key_path(path, key), f"unknown key '{key}'{_did_you_mean(key, keys)}")
        for key in required:
            if key not in value:
                self.err(_key_path(path, key), "required key is missing")
        return value

    def opt(self, m: Mapping[str, Any], key: str, path: str, default: T,
            parse: Callable[..., T | None], **kw: Any) -> T:
        """``m[key]`` parsed by ``parse`` if present and valid, else ``default``."""
        if key not in m:
            return default
        value = parse(m[key], _key_path(path, key), **kw)
        return default if value is None else value

    def _from_env(self, value: Any, path: str) -> Any:
        # A ${NAME} in a number/boolean position yields a string: read it as a YAML scalar.
        if isinstance(value, str) and path in self.env_paths:
            try:
                loaded = yaml.safe_load(value)
            except yaml.YAMLError:
                return value
            if isinstance(loaded, bool | int | float):
                return loaded
        return value

    def string(self, value: Any, path: str, *, empty: bool = False) -> str | None:
        if not isinstance(value, str):
            self.err(path, f"must be a string, got {_kind(value)}")
            return None
        if not value and not empty:
            self.err(path, "must not be empty")
            return None
        return value

    def integer(self, value: Any, path: str, lo: int = 0, hi: int | None = None) -> int | None:
        value = self._from_env(value, path)
        if not isinstance(value, int) or isinstance(value, bool):
            self.err(path, f"must be an integer, got {_kind(value)}")
        elif value < lo or (hi is not None and value > hi):
            self.err(path, f"must be between {lo} and {hi}" if hi is not None
                     else f"must be at least {lo}")
        else:
            return value
        return None

    def fraction(self, value: Any, path: str) -> float | None:
        value = self._from_env(value, path)
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.err(path, f"must be a number, got {_kind(value)}")
        elif not 0.0 <= value <= 1.0:
            self.err(path, "must be between 0 and 1")
        else:
            return float(value)
        return None

    def boolean(self, value: Any, path: str) -> bool | None:
        value = self._from_env(value, path)
        if isinstance(value, bool):
            return value
        self.err(path, f"must be true or false, got {_kind(value)}")
        return None

    def duration(self, value: Any, path: str, *, positive: bool = False,
                 hi: float | None = None) -> float | None:
        try:
            seconds = parse_duration(self._from_env(value, path))
        except ValueError as exc:
            self.err(path, str(exc))
            return None
        if positive and seconds <= 0:
            self.err(path, "must be greater than 0")
        elif hi is not None and seconds > hi:
            self.err(path, f"must be at most {_secs(hi)}, got {_secs(seconds)}")
        else:
            return seconds
        return None

    def choice(self, value: Any, path: str, options: tuple[str, ...]) -> str | None:
        if isinstance(value, str) and value in options:
            return value
        shown = repr(value) if isinstance(value, str) else _kind(value)
        self.err(path, f"must be one of {', '.join(options)}, got {shown}"
                 + (_did_you_mean(value, options) if isinstance(value, str) else ""))
        return None

    def names(self, value: Any, path: str, *, allow_empty: bool = False,
              pattern: re.Pattern[str] | None = None,
              what: str = "value") -> tuple[str, ...] | None:
        """A list of unique non-empty strings (optionally matching ``pattern``)."""
        if not isinstance(value, list):
            self.err(path, f"must be a list, got {_kind(value)}")
            return None
        if not value and not allow_empty:
            self.err(path, "must not be empty")
        out: list[str] = []
        for i, item in enumerate(value):
            s = self.string(item, f"{path}[{i}]")
            if s is None:
                continue
            if pattern is not None and not pattern.fullmatch(s):
                self.err(f"{path}[{i}]", f"invalid {what} {s!r}")
            elif s in out:
                self.err(f"{path}[{i}]", f"duplicate {what} {s!r}")
            out.append(s)
        return tuple(out)

    def readable_file(self, value: Any, path: str) -> tuple[str | None, bool]:
        """``(absolute path, readable now)``: relative to the config file; abspath, not
        realpath, so a symlink swapped by a secret mount (Kubernetes ..data) is followed
        again on every reload."""
        text = self.string(value, path)
        if text is None:
            return None, False
        full = os.path.abspath(os.path.join(self.base_dir, os.path.expanduser(text)))
        try:
            with open(full, "rb"):
                pass
        except OSError as exc:
            self.err(path, f"cannot read {full!r}: {exc.strerror or exc}")
            return full, False
        return full, True
