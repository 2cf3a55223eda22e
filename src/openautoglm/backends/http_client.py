"""The pooled keep-alive HTTP client of remote backends, and the SSE reader.

aiohttp, not httpx: proxying an SSE stream on loopback cost 4.6-4.9 µs of client CPU per event with aiohttp
against 12.9-13.0 µs with httpx (2.7x), and a one-event request 103-114 µs against 836-858 µs (7.7x); measured
with 8 concurrent streams of 500 events and 3,000 one-event requests, the JSON parse included in both.

One ``HttpPool`` serves every remote backend of a router: connections to a backend are reused across requests.
An aiohttp session belongs to the event loop that made it, so the pool makes one per loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp


class HttpPool:
    def __init__(self, *, limit: int = 1000, limit_per_host: int = 256, keepalive_s: float = 60.0) -> None:
        self._limit = limit
        self._limit_per_host = limit_per_host
        self._keepalive_s = keepalive_s
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                limit_per_host=self._limit_per_host,
                keepalive_timeout=self._keepalive_s,
                ttl_dns_cache=10,  # re-resolve names: backends behind DNS move
            )
            # No session-wide timeout: each request sets its own from the backend config and the deadline.
            session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
            self._sessions[loop] = session
        return session

    async def aclose(self) -> None:
        """Close this loop's session (others belong to loops that close their own)."""
        loop = asyncio.get_running_loop()
        session = self._sessions.pop(loop, None)
        if session is not None:
            await session.close()


async def sse_data(content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    """The ``data`` of each server-sent event (multi-line data joined by newlines); comments are skipped."""
    data: list[bytes] = []
    async for raw in content:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        # "event:", "id:", "retry:" and ":" comments carry nothing the OpenAI protocol uses
    if data:
        yield b"\n".join(data)
