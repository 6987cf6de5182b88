"""Fixtures of the verifier's tests: one parametrized key fixture per algorithm family, so a
test that takes ``asym_key`` runs once per asymmetric algorithm (keys from tests.factory)."""

from __future__ import annotations

import pytest

from tests.factory import ASYMMETRIC_ALGS, HMAC_ALGS, SigningKey, key_for


@pytest.fixture(params=ASYMMETRIC_ALGS)
def asym_key(request: pytest.FixtureRequest) -> SigningKey:
    return key_for(request.param)


@pytest.fixture(params=HMAC_ALGS)
def hmac_key(request: pytest.FixtureRequest) -> SigningKey:
    return key_for(request.param)
