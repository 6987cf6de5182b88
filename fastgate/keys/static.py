"""Static key source: an inline ``jwks`` or an HS ``secret`` (SPEC §2 ``providers``).

:class:`StaticKeySource`: the verifier was built with the keys; ready at once; nothing to
refresh.
"""

from __future__ import annotations

import contextlib
import time

from fastgate.config import ProviderConfig
from fastgate.keys.source import (
    Clock,
    FetchError,
    JwksMetrics,
    KeySourceBase,
    KeySourceError,
)
from fastgate.token._verify import Verifier

__all__ = ["StaticKeySource"]


class StaticKeySource(KeySourceBase):
    """Inline ``jwks`` or an HS ``secret``: the verifier already holds the keys."""

    def __init__(self, provider: ProviderConfig, verifier: Verifier, *,
                 metrics: JwksMetrics | None = None, clock: Clock = time.monotonic) -> None:
        super().__init__(provider, verifier, metrics=metrics, clock=clock)
        self.kind = provider.key_source

    async def start(self) -> None:
        if not self.ready and self.provider.jwks is not None:
            # The verifier was built without the inline set; load it (skips are logged).
            with contextlib.suppress(FetchError):
                self.apply(self.provider.jwks, "inline")
        if not self.ready:
            raise KeySourceError(f"provider {self.name}: the {self.kind} key source has no "
                                 "usable key")
        self._last_success_mono = self._clock()
        self._last_success_wall = self._wall()
        self._set_ready(True)
        self._metric_keys()
        self._metric("age", 0.0)

    async def stop(self) -> None:
        return None

    async def refresh_for_kid(self, kid: str) -> bool:
        return self.verifier.has_kid(kid) if kid else False
