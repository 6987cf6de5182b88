"""The replay store's shared vocabulary: result codes, metric labels, the metrics hooks.

Both stores (:class:`fastgate.auth.replay.MemoryReplayStore`,
:class:`fastgate.auth.replay_redis.RedisReplayStore`) answer with these codes and count through
the same hooks; ``fastgate.auth.replay`` describes what each code means and re-exports the
public names (the data plane and ``fastgate.ops.metrics`` import them from there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

__all__ = [
    "ERR_CONNECTION",
    "ERR_FULL",
    "ERR_PROTOCOL",
    "ERR_TIMEOUT",
    "FRESH",
    "NONCE_UNKNOWN",
    "PENDING",
    "REPLAYED",
    "REPLAY_ERROR_KINDS",
    "REPLAY_RESULTS",
    "REPLAY_STORES",
    "STORE_MEMORY",
    "STORE_REDIS",
    "UNAVAILABLE",
    "Done",
    "Keys",
]

FRESH: Final = 0
REPLAYED: Final = 1
NONCE_UNKNOWN: Final = 2
UNAVAILABLE: Final = 3
PENDING: Final = -1

# Label values of the metrics (fastgate.ops.metrics pre-binds one series per value). The result
# tuple is indexed by the codes above; the store and kind tuples by the constants below.
REPLAY_STORES: Final = ("memory", "redis")
REPLAY_RESULTS: Final = ("fresh", "replayed", "nonce_unknown", "unavailable")
REPLAY_ERROR_KINDS: Final = ("timeout", "connection", "protocol", "full")
STORE_MEMORY: Final = 0
STORE_REDIS: Final = 1
ERR_TIMEOUT: Final = 0
ERR_CONNECTION: Final = 1
ERR_PROTOCOL: Final = 2
ERR_FULL: Final = 3

Done = Callable[[int], None]
Keys = Sequence[tuple[bytes, float]]

# A ttl is at most ~10 years: keeps an infinite or absurd ttl from overflowing PX (int64 ms).
_MAX_TTL: Final = 10 * 365 * 86400.0


def _noop(*args: Any) -> None:
    return None


class _Hooks:
    """The metrics calls, bound once (a missing method is a no-op: no branch per check)."""

    __slots__ = ("error", "observe", "result")

    def __init__(self, metrics: object | None) -> None:
        def hook(name: str) -> Callable[..., None]:
            fn = getattr(metrics, name, None) if metrics is not None else None
            return fn if callable(fn) else _noop

        self.result: Callable[[int, int], None] = hook("replay_result")
        self.error: Callable[[int, int], None] = hook("replay_error")
        self.observe: Callable[[float], None] = hook("replay_observe")


def _ttl(ttl: float) -> float:
    # `not ttl > 0` also catches NaN; a key that is remembered at all lives at least 1 ms
    # (the redis store's PX floor).
    if not ttl > 0.0:
        return 0.001
    return min(ttl, _MAX_TTL)
