"""What the master holds for its workers while it runs: the listening port, the metric files.

Owns: :func:`_reserve`, one bound but never listening ``SO_REUSEPORT`` socket on ``listen``
(port 0 resolved once for every worker, a taken address found before any worker starts, the
port kept while a worker restarts; fastgate/ops/supervisor.py tells why it receives no
connections), and :func:`_private_dir`, a fresh 0700 directory for the prometheus-client
multiprocess files, which also removes the directories of masters that no longer run.
May import: ``fastgate.config``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Final

from fastgate.config import Address


def _reserve(address: Address) -> tuple[socket.socket, Address]:
    """Bind (never listen on) a SO_REUSEPORT socket on ``address``; the concrete address.

    It resolves port 0 to the one port every worker binds, fails fast when the address is
    taken by another program, and holds the port while workers restart.
    """
    infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _canon, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # As asyncio's create_server does: the workers' sockets are v6-only too.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except OSError:
        sock.close()
        raise
    return sock, Address(address.host, int(sock.getsockname()[1]))


_DIR_PREFIX: Final = "fastgate-metrics-"


def _private_dir() -> str:
    """A fresh 0700 directory for the metric files, on tmpfs when there is one.

    Its name carries the master's pid: a master that was SIGKILLed cannot remove its
    directory, so the next one removes the directories of masters that no longer exist.
    """
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
    _remove_stale_dirs(Path(base))
    return tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=base)


def _remove_stale_dirs(base: Path) -> None:
    uid = os.getuid()
    with contextlib.suppress(OSError):
        for entry in base.glob(f"{_DIR_PREFIX}*-*"):
            pid_text = entry.name[len(_DIR_PREFIX):].split("-", 1)[0]
            with contextlib.suppress(OSError, ValueError):
                if not pid_text.isdigit() or entry.stat().st_uid != uid or not entry.is_dir():
                    continue
                try:
                    os.kill(int(pid_text), 0)
                except ProcessLookupError:
                    shutil.rmtree(entry, ignore_errors=True)
                except PermissionError:
                    pass  # alive (someone else's)
