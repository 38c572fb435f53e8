"""An OpenAI-compatible server over HTTP (vLLM, SGLang, or a router in front of them).

aiohttp, not httpx: measured faster for relaying streams (see README). Library
errors are mapped here, once, to `UpstreamError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from proxy.upstream.base import REQUEST_ONLY, Headers, UpstreamError, UpstreamResponse, forwardable
from proxy.upstream.url import parse_upstream


@dataclass
class _AiohttpResponse:
    status: int
    headers: Headers
    _resp: aiohttp.ClientResponse

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except asyncio.TimeoutError as exc:
            raise UpstreamError("timeout", "upstream went silent mid-response") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("broken", f"upstream broke off the response: {exc}") from exc

    async def aclose(self) -> None:
        # Closing an unfinished response drops the connection, which is how the
        # engine learns the client is gone and frees the sequence's slot.
        self._resp.close()


class HttpUpstream:
    """An OpenAI-compatible server over HTTP, with one pooled client session."""

    def __init__(
        self,
        base_url: str,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 600.0,
        api_key: str | None = None,
        max_connections: int = 1000,
    ) -> None:
        url = parse_upstream(base_url)
        self._base = url.base
        self.base_url = url.shown  # credentials never reach a message, a log or the store
        self._authorization = f"Bearer {api_key}" if api_key else url.authorization
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s
        )
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300),
                timeout=self._timeout,
                auto_decompress=False,  # relay bytes exactly as sent
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def send(self, method: str, path: str, headers: Headers, body: bytes) -> UpstreamResponse:
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in forwardable(headers, REQUEST_ONLY)]
        if self._authorization:
            out = [(k, v) for k, v in out if k.lower() != "authorization"]
            out.append(("Authorization", self._authorization))
        url = self._base + path
        try:
            resp = await self._client().request(
                method, url, headers=out, data=body or None, allow_redirects=False
            )
        except asyncio.TimeoutError as exc:
            raise UpstreamError("timeout", f"upstream {self.base_url} timed out") from exc
        except aiohttp.ClientConnectionError as exc:
            raise UpstreamError("connect", f"upstream {self.base_url} unreachable: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError("broken", f"upstream {self.base_url} failed: {exc}") from exc
        return _AiohttpResponse(resp.status, [(k.lower(), v) for k, v in resp.raw_headers], resp)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
