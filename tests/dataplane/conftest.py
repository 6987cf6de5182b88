"""Fixtures of the data-plane tests (raw sockets, gateways started and stopped per test)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_sockets() -> Iterator[None]:
    """A failed test's sockets and transports are finalised here, between tests, not while
    pytest reports (where their ResourceWarnings would land on the next test)."""
    gc.collect()
    yield
    gc.collect()
