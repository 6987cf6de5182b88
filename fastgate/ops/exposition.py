"""What a ``/metrics`` scrape returns: the content type and the exposition bodies.

Owns: :data:`CONTENT_TYPE`, :class:`_WithoutCreated` (this process's registry without the
``*_created`` samples) and :func:`collect_multiprocess` (every worker's files merged into one
exposition, in multi-process mode).
May import: prometheus_client only.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as _pc_multiprocess

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST


class _WithoutCreated:
    """A registry view without the ``*_created`` samples.

    They are not SPEC §7 series, and multi-process collection has none: single- and
    multi-process scrapes stay the same shape. (prometheus_client's switch for this,
    ``disable_created_metrics()``, is process-global.)
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        for metric in self._registry.collect():
            if metric.type in ("counter", "histogram"):
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def collect_multiprocess(path: str | os.PathLike[str]) -> bytes:
    """One exposition of every worker's files in ``path`` (counters and histograms summed)."""
    registry = CollectorRegistry(auto_describe=False)
    _pc_multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return bytes(generate_latest(registry))
