"""The ``replay_store.redis.url`` syntax: :func:`parse_redis_url` and :class:`RedisAddress`.

A config rule (the loader checks the URL with it, so a bad one is a config error with its
path), and the address the Redis replay store (fastgate.auth.replay_redis) connects to: one
parser for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["RedisAddress", "parse_redis_url"]


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A parsed ``replay_store.redis.url``."""

    host: str | None  # None for a unix socket
    port: int
    path: str | None  # the unix socket path
    tls: bool
    username: str | None
    password: str | None
    db: int

    def __str__(self) -> str:
        """For logs: never the password."""
        if self.path is not None:
            where = f"unix://{self.path}"
        else:
            host = f"[{self.host}]" if self.host and ":" in self.host else self.host
            where = f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}"
        return f"{where}/{self.db}" if self.path is None else f"{where}?db={self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS, verified with
    the system CAs) or ``unix://[[user]:password@]/path.sock[?db=N]``; ValueError if not.

    User and password are percent-decoded. A user needs a password (Redis 6 ACL ``AUTH user
    pass``); a password alone is ``AUTH pass``.
    """
    if not isinstance(url, str):
        raise ValueError(f"replay_store.redis.url must be a string, got {type(url).__name__}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        # (never the URL itself in a message: it may hold the password)
        raise ValueError(f"replay_store.redis.url: scheme must be redis, rediss or unix, "
                         f"not {scheme!r}")  # fmt: skip
    if parts.fragment:
        raise ValueError("replay_store.redis.url: a fragment is not allowed")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if username is not None and password is None:
        raise ValueError("replay_store.redis.url: a user needs a password (user:password@)")
    db = 0
    if scheme == "unix":
        if parts.hostname or parts.port is not None:
            raise ValueError("replay_store.redis.url: unix:///path.sock has no host or port")
        if not parts.path.startswith("/"):
            raise ValueError("replay_store.redis.url: unix socket path must be absolute")
        for name, val in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
            if name != "db":
                raise ValueError(f"replay_store.redis.url: unknown parameter {name!r}")
            db = _db_number(val)
        return RedisAddress(None, 0, unquote(parts.path), False, username, password, db)
    if parts.query:
        raise ValueError("replay_store.redis.url: query parameters are not supported "
                         "(the database goes in the path: redis://host:6379/1)")  # fmt: skip
    host = parts.hostname
    if not host:
        raise ValueError("replay_store.redis.url: no host")
    try:
        port = parts.port if parts.port is not None else 6379
    except ValueError as exc:
        raise ValueError(f"replay_store.redis.url: bad port: {exc}") from None
    path = parts.path
    if path not in ("", "/"):
        db = _db_number(path[1:])
    return RedisAddress(host, port, None, scheme == "rediss", username, password, db)


def _db_number(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"replay_store.redis.url: database must be a number, got {text!r}")
    return int(text)
