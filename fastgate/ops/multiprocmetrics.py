"""prometheus-client multi-process mode of the metrics (``workers > 1``).

With ``workers > 1`` each worker writes its values to mmap files in one directory
(prometheus-client multiprocess mode) and one scrape merges them (``collect_multiprocess``).
The supervisor calls ``setup_multiprocess(dir, clean=True)`` before it starts any worker and
``mark_process_dead(pid)`` when a worker exits. A supervisor that counts reloads itself uses
``Metrics(routes=(), providers=(), upstreams=())``: with providers it would report 0 keys for
them and pull the min-over-workers key gauge (and readiness) down to 0.

Owns: :data:`MULTIPROC_ENV`, switching this process's prometheus_client to multi-process mode
(:func:`setup_multiprocess`; :func:`_multiprocess_dir` checks both agree), dropping an exited
worker's live gauges (:func:`mark_process_dead`) and the readiness merged over the workers'
key gauges (:func:`multiprocess_ready`). The merged scrape: ``fastgate.ops.exposition``.
May import: prometheus_client only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from prometheus_client import multiprocess as _pc_multiprocess
from prometheus_client import values as _pc_values

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"


def _multiprocess_dir() -> str | None:
    """The multiproc directory, checking that prometheus_client agrees about the mode."""
    path = os.environ.get(MULTIPROC_ENV) or None
    mmaped = bool(getattr(_pc_values.ValueClass, "_multiprocess", False))
    if (path is not None) != mmaped:
        raise RuntimeError(
            f"metrics: {MULTIPROC_ENV} was changed after prometheus_client chose its mode; "
            "call fastgate.ops.metrics.setup_multiprocess(dir) before creating Metrics"
        )
    return path


def setup_multiprocess(path: str | os.PathLike[str], *, clean: bool = False) -> str:
    """Switch this process (and the workers it forks or spawns) to multi-process metrics.

    Call it in the supervisor before any worker starts and before any Metrics exists in this
    process, with ``clean=True``: files of an earlier run would otherwise be summed into the
    new one. Workers never clean (they would delete each other's counts); spawned workers
    inherit the environment variable, forked ones this module state. The directory is private
    (0700): the files are writable mmaps; tmpfs (/dev/shm, $XDG_RUNTIME_DIR) keeps their pages
    off the disk.
    """
    directory = Path(path)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if clean:
        for stale in directory.glob("*.db"):
            stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)
    # prometheus_client picks its value class once, at import (values.ValueClass), and every
    # metric child created afterwards looks it up there: re-pick it now that the variable is set.
    _pc_values.ValueClass = _pc_values.MultiProcessValue()  # type: ignore[no-untyped-call]
    return str(directory)


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """A worker exited: drop its live gauges (in-flight, cache entries, JWKS keys/age, build info).

    Its counter and histogram files stay: counters must not go back when a worker dies.
    """
    directory = path if path is not None else os.environ.get(MULTIPROC_ENV)
    if directory is None:
        raise RuntimeError(f"metrics: {MULTIPROC_ENV} is not set")
    _pc_multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


def multiprocess_ready(path: str | os.PathLike[str], providers: Iterable[str]) -> dict[str, bool]:
    """Readiness for the supervisor's ``/readyz``: provider -> every live worker has keys.

    Reads the ``fastgate_jwks_keys`` gauge files (min over live workers). A provider no live
    worker has reported yet is not ready.
    """
    files = [str(f) for f in Path(path).glob("gauge_livemin_*.db")]
    lowest: dict[str, float] = {}
    merged = _pc_multiprocess.MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
    for metric in merged:
        if metric.name != "fastgate_jwks_keys":
            continue
        for sample in metric.samples:
            lowest[sample.labels["provider"]] = sample.value
    return {p: lowest.get(p, 0.0) > 0 for p in providers}

