"""``fastgate_jwks_age_seconds`` of a ``jwks_file`` provider: the age of the file's last
successful load (or of the last check that found it unchanged since one), so it grows while the
file is missing, unreadable or invalid and an alert on it can fire (deploy/prometheus rules).

Real parts: a real file, the real FileKeySource and Verifier, the real Metrics rendered in the
Prometheus text format; only the clock is injected so the ages are exact.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from fastgate import Verifier
from fastgate.config import ProviderConfig
from fastgate.keys.jwks import FileKeySource
from fastgate.ops.metrics import Metrics
from tests.factory import Clock, generate, jwks_of

ISS = "https://idp.example.test/"


def _age(metrics: Metrics) -> float:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if s.name == "fastgate_jwks_age_seconds" and s.labels == {"provider": "f"}:
                return float(s.value)
    raise AssertionError("no fastgate_jwks_age_seconds{provider=\"f\"} sample")


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a new inode: the stat signature changes


def test_file_age_grows_while_the_file_is_bad_and_resets_on_a_good_load(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "jwks.json"
        good = orjson.dumps(jwks_of(generate("ES256", "k1")))
        path.write_bytes(good)
        clock = Clock(5000.0)
        metrics = Metrics(routes=("r",), providers=("f",), upstreams=("u",))
        src = FileKeySource(
            ProviderConfig(name="f", issuer=ISS, key_source="jwks_file", jwks_file=str(path)),
            Verifier(ISS), path=str(path), metrics=metrics, clock=clock,
            poll_interval=3600)  # checks are driven by the test, never by the poller
        await src.start()
        try:
            assert _age(metrics) == 0.0
            # Unchanged and good: every check confirms the keys, the age stays 0.
            clock.now += 120
            assert src.check() is True
            assert _age(metrics) == 0.0
            # A broken file: old keys stay in use and the age counts from the last good check.
            _write(path, b"{not json")
            clock.now += 50
            assert src.check() is False
            assert _age(metrics) == 50.0
            clock.now += 30
            assert src.check() is False  # unchanged but still bad: the age keeps growing
            assert _age(metrics) == 80.0
            path.unlink()
            clock.now += 20
            assert src.check() is False
            assert _age(metrics) == 100.0
            assert src.ready  # the last good keys are still served
            # Fixed: the next check loads it and the age starts again from 0.
            _write(path, good)
            clock.now += 5
            assert src.check() is True
            assert _age(metrics) == 0.0
        finally:
            await src.stop()

    asyncio.run(main())
