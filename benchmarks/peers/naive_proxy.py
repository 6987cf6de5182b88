"""The straightforward JWT proxy a team would write first: the e2e benchmark's naive peer.

aiohttp web app on uvloop; PyJWT verifies RS256 with the PEM public key (signature, iss, aud,
exp); an aiohttp ClientSession forwards the request with the `sub` claim as X-User-Id. No
token cache, no connection-pool tuning beyond ClientSession's defaults - on purpose.

    python benchmarks/peers/naive_proxy.py --listen 127.0.0.1:8081 \
        --upstream http://127.0.0.1:8080 --pubkey pub.pem --issuer ISS --audience AUD
"""

from __future__ import annotations

import argparse

import aiohttp
import jwt
import uvloop
from aiohttp import web

_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                  "transfer-encoding", "upgrade", "host", "content-length"})


def build_app(upstream: str, pubkey: bytes, issuer: str, audience: str) -> web.Application:
    app = web.Application()
    session_key = web.AppKey("session", aiohttp.ClientSession)

    async def on_startup(app: web.Application) -> None:
        app[session_key] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app[session_key].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return web.json_response({"error": "invalid_request"}, status=401)
        try:
            claims = jwt.decode(auth[7:], pubkey, algorithms=["RS256"], audience=audience,
                                issuer=issuer)
        except jwt.InvalidTokenError:
            return web.json_response({"error": "invalid_token"}, status=401)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        headers["X-User-Id"] = str(claims.get("sub", ""))
        body = await request.read()
        async with app[session_key].request(request.method, upstream + request.path_qs,
                                            headers=headers, data=body or None) as resp:
            data = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
            return web.Response(status=resp.status, body=data, headers=out)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="host:port")
    parser.add_argument("--upstream", required=True, help="http://host:port")
    parser.add_argument("--pubkey", required=True, help="PEM public key file")
    parser.add_argument("--issuer", required=True)
    parser.add_argument("--audience", required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    with open(args.pubkey, "rb") as f:
        pubkey = f.read()
    app = build_app(args.upstream.rstrip("/"), pubkey, args.issuer, args.audience)
    web.run_app(app, host=host, port=int(port), access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
