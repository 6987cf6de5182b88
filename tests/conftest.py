"""Shared fixtures: keys per algorithm, the token factory and a fixed clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.factory import NOW, SigningKey, generate

pytest_plugins = ["tests.redis_fixtures"]  # redis_server / redis: a real redis-server

ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                   "ES256", "ES384", "ES512", "EdDSA")
HMAC_ALGS = ("HS256", "HS384", "HS512")

_KEYS: dict[str, SigningKey] = {}


def key_for(alg: str) -> SigningKey:
    """One key per algorithm for the whole session (RSA generation is slow)."""
    if alg not in _KEYS:
        _KEYS[alg] = generate(alg)
    return _KEYS[alg]


@pytest.fixture(params=ASYMMETRIC_ALGS)
def asym_key(request: pytest.FixtureRequest) -> SigningKey:
    return key_for(request.param)


@pytest.fixture(params=HMAC_ALGS)
def hmac_key(request: pytest.FixtureRequest) -> SigningKey:
    return key_for(request.param)


@pytest.fixture
def rs256() -> SigningKey:
    return key_for("RS256")


@pytest.fixture
def es256() -> SigningKey:
    return key_for("ES256")


@pytest.fixture
def now() -> float:
    return NOW


@pytest.fixture(scope="session")
def wycheproof_dir() -> Path:
    root = os.environ.get("FASTGATE_WYCHEPROOF_DIR")
    if not root:
        pytest.skip("FASTGATE_WYCHEPROOF_DIR is not set")
    path = Path(root)
    if not path.is_dir():
        pytest.fail(f"FASTGATE_WYCHEPROOF_DIR={root} is not a directory")
    return path
