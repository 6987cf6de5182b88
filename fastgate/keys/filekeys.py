"""File key source: ``jwks_file`` (SPEC §2 ``providers``), reloaded when the file changes.

:class:`FileKeySource` - loaded by ``start()`` (a bad file at start raises
:class:`~fastgate.keys.source.KeySourceError`), then the file's (device, inode, size, mtime) is
polled about once a second (no inotify dependency) and the file is reloaded when it changes. A
bad new file keeps the old keys and counts as a failed fetch. Write the file with an atomic
rename.
"""

from __future__ import annotations

import asyncio
import os
import time

import orjson

from fastgate.config import ProviderConfig
from fastgate.keys.source import (
    MAX_KID_LENGTH,
    Clock,
    FetchError,
    JwksMetrics,
    KeySourceBase,
    KeySourceError,
    log,
)
from fastgate.tasks import cancel_and_wait
from fastgate.token._verify import Verifier

__all__ = ["FILE_POLL_INTERVAL", "FileKeySource"]

FILE_POLL_INTERVAL = 1.0

_FileSig = tuple[int, int, int, int]


class FileKeySource(KeySourceBase):
    """``jwks_file``: loaded at start, reloaded when (dev, inode, size, mtime) changes."""

    kind = "jwks_file"

    def __init__(self, provider: ProviderConfig, verifier: Verifier, *, path: str,
                 metrics: JwksMetrics | None = None, clock: Clock = time.monotonic,
                 poll_interval: float = FILE_POLL_INTERVAL) -> None:
        super().__init__(provider, verifier, metrics=metrics, clock=clock)
        self.path = path
        self.poll_interval = poll_interval
        self._sig: _FileSig | None = None

    @property
    def location(self) -> str:
        return self.path

    async def start(self) -> None:
        if self._task is not None:
            return
        error = self.reload()
        if error is not None:
            raise KeySourceError(f"provider {self.name}: jwks_file {self.path}: {error}")
        self._task = asyncio.get_running_loop().create_task(
            self._poll(), name=f"fastgate-jwks-file-{self.name}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        self._ready_event.set()  # release cold-start waiters (they see ready=False if no keys)

    async def refresh_for_kid(self, kid: str) -> bool:
        """Check the file now: a stat costs about a microsecond, so no rate limit is needed
        (the file is only re-read when it changed)."""
        if not kid or len(kid) > MAX_KID_LENGTH:
            return False
        if self.verifier.has_kid(kid):
            return True
        if self._task is not None:
            self.check()
        return self.verifier.has_kid(kid)

    def check(self) -> bool:
        """Reload if the file changed; returns False when a changed file could not be loaded."""
        try:
            sig: _FileSig | None = self._stat()
        except OSError:
            sig = None
        if sig is not None and sig == self._sig:
            if self._last_error is None:
                # Unchanged and last load good: the keys on disk are confirmed current.
                self._last_success_mono = self._clock()
                self._last_success_wall = self._wall()
            ok = self._last_error is None
        else:
            ok = self.reload() is None
        # Published on every check, failed ones too: fastgate_jwks_age_seconds of a file is the
        # age of its last successful load (or of the last check that found it unchanged since),
        # so it grows while the file is missing, unreadable or invalid, and an alert can see it.
        self._metric_age()
        return ok

    def _stat(self) -> _FileSig:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def reload(self) -> str | None:
        """Read and apply the file now, changed or not (``max_bytes``, JSON, :meth:`apply`);
        counted as a fetch. None on success, else the log-safe error (old keys kept)."""
        started = time.perf_counter()
        error: str | None = None
        try:
            self._sig = self._stat()
            with open(self.path, "rb") as fh:
                data = fh.read(self.cfg.max_bytes + 1)
            if len(data) > self.cfg.max_bytes:
                raise FetchError(f"file exceeds max_bytes ({self.cfg.max_bytes})")
            try:
                doc = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise FetchError("not JSON") from exc
            self.apply(doc, "file")
        except FetchError as exc:
            error = str(exc)
        except OSError as exc:
            self._sig = None
            error = f"cannot read: {exc.strerror or type(exc).__name__}"
        seconds = time.perf_counter() - started
        if error is None:
            self._record_success(seconds)
        else:
            self._record_failure(error, seconds)
        return error

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.check()
            except Exception:  # never let the poller die: the old keys stay in use
                log.exception("jwks provider=%s: file check failed", self.name)
