"""Fixtures every test package shares: a fixed clock, an event loop with an echo upstream,
and a real redis-server (tests/redis_fixtures.py). Keys per algorithm come from
tests.factory.key_for; the verifier's parametrized key fixtures live in tests/token/conftest.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.factory import NOW
from tests.gateway_fixtures import EchoUpstream, Loop

pytest_plugins = ["tests.redis_fixtures"]  # redis_server / redis: a real redis-server


@pytest.fixture
def now() -> float:
    return NOW


@pytest.fixture
def loop() -> Iterator[Loop]:
    """A uvloop event loop of the test's own (gateways and upstreams run on it)."""
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def echo(loop: Loop) -> Iterator[EchoUpstream]:
    """A real aiohttp upstream that answers with what it received."""
    up = loop.run(EchoUpstream.start())
    yield up
    loop.run(up.stop())


@pytest.fixture(scope="session")
def wycheproof_dir() -> Path:
    root = os.environ.get("FASTGATE_WYCHEPROOF_DIR")
    if not root:
        pytest.skip("FASTGATE_WYCHEPROOF_DIR is not set")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"FASTGATE_WYCHEPROOF_DIR={root} is not a directory")
    return path
