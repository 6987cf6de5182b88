"""A breakable identity provider for tests: JWKS + OIDC discovery on 127.0.0.1.

    async with IdP(keys=jwks_of(k1)) as idp:
        idp.url, idp.issuer, idp.jwks_url, idp.discovery_url
        idp.set_keys(k1, k2)            # rotate (SigningKeys or a whole JWKS dict)
        idp.fault = "500"               # the next JWKS responses fail this way (see FAULTS)
        idp.discovery_fault = "issuer_mismatch"
        idp.max_age = 60                # Cache-Control: max-age on the JWKS
        idp.hits["/jwks"]               # requests per path

Everything is a real aiohttp server on an ephemeral loopback port; ``IdP(port=...)`` binds a
given port so a test can start a gateway against a port where nobody listens yet ("IdP down")
and bring the IdP up later. :func:`run` runs a coroutine with an overall deadline (the test
suite has no asyncio plugin).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import orjson
from aiohttp import web

from tests.factory import SigningKey, jwks_of

T = TypeVar("T")

FAULTS = (
    "ok",            # the key set
    "500",           # HTTP 500
    "404",           # HTTP 404
    "slow",          # sleep `slow_seconds` before answering (beyond a client timeout)
    "trickle",       # headers at once, then one body byte every 50 ms (slowloris)
    "garbage",       # 200 with a body that is not JSON
    "not_jwks",      # 200 with JSON that is not a JWKS
    "empty_keys",    # 200 {"keys": []}
    "huge",          # 200 with a 10 MB body and a Content-Length
    "huge_chunked",  # 200 with a 10 MB chunked body (no Content-Length)
    "gzip_bomb",     # 200, Content-Encoding: gzip, 10 MB after decompression
    "redirect",      # 302 to another path serving the real key set
    "drop",          # the connection is closed without a response
)
DISCOVERY_FAULTS = ("ok", "500", "slow", "garbage", "issuer_mismatch", "no_jwks_uri", "redirect")

HUGE = 10 * 1024 * 1024


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run ``coro`` in a fresh event loop, failing the test if it takes longer than timeout."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


def free_port() -> int:
    """A loopback port that was free a moment ago (nothing listens on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class IdP:
    """A JWKS/OIDC server with runtime-switchable faults (see the module doc)."""

    def __init__(self, keys: dict[str, Any] | None = None, *, port: int = 0,
                 issuer: str | None = None, max_age: int | None = None,
                 slow_seconds: float = 2.0) -> None:
        self.keys: dict[str, Any] = keys if keys is not None else {"keys": []}
        self.fault = "ok"
        self.discovery_fault = "ok"
        self.max_age = max_age
        self.cache_control: str | None = None  # raw Cache-Control (overrides max_age)
        self.slow_seconds = slow_seconds
        self.jwks_path = "/jwks"  # the path discovery advertises
        self.gone_paths: set[str] = set()  # JWKS paths answering 404
        self.hits: Counter[str] = Counter()
        self.port = port
        self._issuer = issuer
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        self._bomb: bytes | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self._issuer if self._issuer is not None else self.url

    @property
    def jwks_url(self) -> str:
        return self.url + "/jwks"

    @property
    def discovery_url(self) -> str:
        return self.url + "/.well-known/openid-configuration"

    def set_keys(self, *keys: SigningKey | dict[str, Any]) -> None:
        """Publish these keys (SigningKeys, single public JWKs, or one whole JWKS dict)."""
        if len(keys) == 1 and isinstance(keys[0], dict) and "keys" in keys[0]:
            self.keys = keys[0]
            return
        out: list[dict[str, Any]] = []
        for k in keys:
            out.extend(jwks_of(k)["keys"] if isinstance(k, SigningKey) else [k])
        self.keys = {"keys": out}

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> IdP:
        self._closing = asyncio.Event()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._runner = runner
        addr = runner.addresses[0]
        self.port = int(addr[1])
        return self

    async def stop(self) -> None:
        """Take the IdP down (connections refused) until :meth:`start` is called again."""
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> IdP:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- handlers ----------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        if path == "/.well-known/openid-configuration":
            return await self._discovery(request)
        if path.startswith("/jwks") or path == self.jwks_path:
            if path in self.gone_paths:
                return web.Response(status=404, text="gone")
            if path == "/jwks-redirected":
                return self._json(self.keys)
            return await self._jwks(request)
        return web.Response(status=404, text="not found")

    def _json(self, doc: Any, status: int = 200) -> web.Response:
        headers = {}
        if self.cache_control is not None:
            headers["Cache-Control"] = self.cache_control
        elif self.max_age is not None:
            headers["Cache-Control"] = f"public, max-age={self.max_age}"
        return web.Response(body=orjson.dumps(doc), status=status, headers=headers,
                            content_type="application/json")

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but end at once when the IdP is being stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        fault = self.discovery_fault
        doc: dict[str, Any] = {"issuer": self.issuer, "jwks_uri": self.url + self.jwks_path,
                               "id_token_signing_alg_values_supported": ["RS256", "ES256"]}
        if fault == "500":
            return web.Response(status=500, text="boom")
        if fault == "slow":
            await self._sleep(self.slow_seconds)
        if fault == "garbage":
            return web.Response(body=b"<html>oops</html>", content_type="text/html")
        if fault == "issuer_mismatch":
            doc["issuer"] = "https://evil.example.test/"
        if fault == "no_jwks_uri":
            del doc["jwks_uri"]
        if fault == "redirect":
            raise web.HTTPFound(self.url + "/.well-known/other")
        return self._json(doc)

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        fault = self.fault
        if fault == "ok":
            return self._json(self.keys)
        if fault in ("500", "404"):
            return web.Response(status=int(fault), text="idp error")
        if fault == "slow":
            await self._sleep(self.slow_seconds)
            return self._json(self.keys)
        if fault == "garbage":
            return web.Response(body=b"\x00\xffnot json{{", content_type="application/json")
        if fault == "not_jwks":
            return self._json({"error": "maintenance", "keys": "none"})
        if fault == "empty_keys":
            return self._json({"keys": []})
        if fault == "huge":
            body = b'{"keys":[' + b" " * HUGE + b"]}"
            return web.Response(body=body, content_type="application/json")
        if fault == "huge_chunked":
            return await self._stream(request, b'{"keys":[', b" " * 65536, HUGE // 65536)
        if fault == "trickle":
            return await self._trickle(request)
        if fault == "gzip_bomb":
            if self._bomb is None:
                self._bomb = gzip.compress(b'{"keys":[' + b" " * HUGE + b"]}")
            return web.Response(body=self._bomb, content_type="application/json",
                                headers={"Content-Encoding": "gzip"})
        if fault == "redirect":
            raise web.HTTPFound(self.url + "/jwks-redirected")
        if fault == "drop":
            if request.transport is not None:
                request.transport.abort()
            await asyncio.sleep(0)
            raise asyncio.CancelledError  # nothing more to send on a dead connection
        raise AssertionError(f"unknown fault {fault!r}")

    async def _stream(self, request: web.Request, head: bytes, chunk: bytes,
                      count: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(head)
            for _ in range(count):
                await resp.write(chunk)
            await resp.write(b"]}")
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client gave up, as it should
        return resp

    async def _trickle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.dumps(self.keys)
        resp = web.StreamResponse(headers={"Content-Type": "application/json",
                                           "Content-Length": str(len(body))})
        await resp.prepare(request)
        try:
            for i in range(len(body)):
                await resp.write(body[i:i + 1])
                await self._sleep(0.05)
                if self._closing.is_set():
                    break
        except (ConnectionError, RuntimeError):
            pass
        return resp
