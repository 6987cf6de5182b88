"""A real redis-server for the replay-store tests (Debian's ``redis-server``; .ci/run installs
it). Registered as a pytest plugin in tests/conftest.py.

``redis_server`` (session): one server on a free 127.0.0.1 port (and a unix socket), no
persistence, that a test may ``stop()``, ``start()`` again on the same port, ``pause()``
(SIGSTOP: the connection stays, nothing is answered) and ``resume()``. ``RedisServer`` starts
extra ones (a password, TLS). ``call(*args)`` is a tiny blocking client for assertions.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def encode(*args: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def read_reply(f: IO[bytes]) -> object:
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"redis closed the connection ({line!r})")
    t, rest = line[:1], line[1:-2]
    if t == b"+":
        return rest.decode()
    if t == b"-":
        raise RedisReplyError(rest.decode())
    if t == b":":
        return int(rest)
    if t == b"$":
        n = int(rest)
        if n < 0:
            return None
        data: bytes = f.read(n + 2)[:-2]
        return data
    if t == b"*":
        return [read_reply(f) for _ in range(int(rest))]
    raise ConnectionError(f"not RESP: {line!r}")


class RedisReplyError(Exception):
    pass


class RedisServer:
    """One redis-server subprocess in ``workdir``."""

    def __init__(self, workdir: Path, *, password: str | None = None,
                 tls: tuple[Path, Path, Path] | None = None,
                 extra: Sequence[str] = ()) -> None:  # fmt: skip
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not on PATH (.ci/run installs Debian's redis-server)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.tls = tls  # (ca, cert, key)
        self.unix_path = str(workdir / "redis.sock")
        self.extra = tuple(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        assert REDIS_SERVER is not None
        argv = [REDIS_SERVER, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", str(self.workdir),
                "--unixsocket", self.unix_path, "--unixsocketperm", "700",
                "--logfile", str(self.workdir / "redis.log")]  # fmt: skip
        if self.tls:
            ca, cert, key = self.tls
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                     "--tls-auth-clients", "no"]  # fmt: skip
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + list(self.extra)

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart, on the same port) and wait until it answers PING."""
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.call("PING") == "PONG":
                    return
            except (OSError, ConnectionError, RedisReplyError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.workdir / "redis.log"
                text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server did not come up on {self.port}:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server (SIGKILL: its clients see the connection drop, nothing is saved)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()  # SIGKILL also ends a paused (SIGSTOP) server, without running it
        proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (a hung redis)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=2.0)
        if self.tls:
            ctx = ssl.create_default_context(cafile=str(self.tls[0]))
            sock = ctx.wrap_socket(sock, server_hostname="127.0.0.1")
        return sock

    def call(self, *args: str | bytes, db: int = 0) -> object:
        """One command on a fresh connection (authenticated, in database ``db``); the decoded
        reply (an error reply raises RedisReplyError)."""
        with self._connect() as sock, sock.makefile("rb") as f:
            if self.password:
                sock.sendall(encode("AUTH", self.password))
                read_reply(f)
            if db:
                sock.sendall(encode("SELECT", str(db)))
                read_reply(f)
            sock.sendall(encode(*args))
            return read_reply(f)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A session's redis-server. Tests that stop or pause it must leave it running."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The session server, running and empty."""
    if redis_server.proc is None:
        redis_server.start()
    else:
        redis_server.resume()
    redis_server.call("FLUSHALL")
    return redis_server
