"""The benchmark's floor: the least a Python pass-through proxy can do (raw ASGI + aiohttp).

No parsing, no observing, no recording: read the body, forward it, relay the
response chunk by chunk. Whatever dynasor costs beyond this is dynasor's own.
`--client dynasor` relays through dynasor's own upstream client instead of
aiohttp: the relay alone, so the difference to `dynasorctl observe` is what
observing costs.
Run it as its own process: `python -m dynasorctl.bench.floor_proxy --upstream URL --port P`.
"""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import aiohttp

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length",
              "te", "trailer", "proxy-authenticate", "proxy-authorization"}


class FloorProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":  # the startup message
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            await self.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await self.relay(scope, body, send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(auto_decompress=False,
                                             connector=aiohttp.TCPConnector(limit=1000))

    async def stop(self) -> None:
        assert self.session is not None
        await self.session.close()

    async def relay(self, scope: MutableMapping[str, Any], body: bytes, send: Send) -> None:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]
                   if k.decode("latin-1") not in HOP_BY_HOP]
        assert self.session is not None
        async with self.session.request(scope["method"], self.upstream + scope["path"],
                                        headers=headers, data=body or None) as resp:
            out = [(k.lower(), v) for k, v in resp.raw_headers
                   if k.decode("latin-1").lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})


class RelayOnly(FloorProxy):
    """The same pass-through on dynasor's upstream client (`proxy.upstream.http`)."""

    async def start(self) -> None:
        from proxy.upstream.http import HttpUpstream

        self.client = HttpUpstream(self.upstream)

    async def stop(self) -> None:
        await self.client.aclose()

    async def relay(self, scope: MutableMapping[str, Any], body: bytes, send: Send) -> None:
        from proxy.upstream.base import forwardable

        resp = await self.client.send(scope["method"], scope["path"], scope["headers"], body)
        try:
            await send({"type": "http.response.start", "status": resp.status,
                        "headers": forwardable(resp.headers)})
            async for chunk in resp.chunks():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await resp.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client", choices=("aiohttp", "dynasor"), default="aiohttp")
    args = parser.parse_args(argv)
    import uvicorn

    app = FloorProxy(args.upstream) if args.client == "aiohttp" else RelayOnly(args.upstream)
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop",
                http="httptools", lifespan="on", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
