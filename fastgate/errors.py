"""Operator-facing errors (never raised per request)."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration is invalid; ``errors`` holds every problem, each prefixed by its path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))
