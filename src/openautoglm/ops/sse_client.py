"""A lean HTTP/1.1 client for streamed responses, for ``autoglm bench serve``.

The load generator shares the CPU with the server it measures, so its cost per streamed event comes out of the
server's throughput. aiohttp wakes a future and a task for every read; this protocol parses the response head,
its chunked (or length-delimited) body and the SSE lines inside the transport's ``data_received`` callback, and
hands each ``data:`` payload on with the time its bytes arrived — the timestamps a client reading the stream
itself would take. It speaks just what the benchmark needs: one POST at a time per connection, keep-alive reuse
through a small pool, http and https.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections.abc import Callable
from urllib.parse import urlsplit

from openautoglm.protocol.errors import ConfigError

OnEvent = Callable[[bytes, float], None]  # (an SSE data payload, perf_counter time its bytes arrived)
_MAX_HEAD = 64 * 1024


class ResponseError(Exception):
    """The connection broke or the response was not valid HTTP/1.1."""


class _StreamProtocol(asyncio.Protocol):
    """One connection; ``start`` arms it for the next response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._done: asyncio.Future[None] | None = None
        self._on_event: OnEvent | None = None

    # --- per response -------------------------------------------------------------------------------------

    def start(self, on_event: OnEvent) -> asyncio.Future[None]:
        self._on_event = on_event
        self._done = asyncio.get_running_loop().create_future()
        self._buf.clear()
        self.got_bytes = False
        self.status = 0
        self.body = bytearray()  # a non-200 response's body, for the error message
        self.keep_alive = True
        self.compressed = False  # only ever a whole (error) body: streams are never compressed
        self._head = True
        self._chunked = False
        self._left = 0  # bytes left in the current chunk, or of a Content-Length body
        self._chunk_tail = False  # the CRLF after a chunk's data is due
        self._sse = b""
        return self._done

    # --- asyncio callbacks --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ResponseError(f"the server closed the connection: {exc or 'end of stream'}"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._done is None or self._done.done():
            return  # bytes after a finished response: none are expected
        self.got_bytes = True
        self._buf += data
        try:
            if self._head and not self._parse_head():
                return
            self._parse_body(now)
        except (ValueError, ResponseError) as exc:  # a malformed head or chunk, or an event that is not JSON
            self.keep_alive = False
            self._done.set_exception(ResponseError(f"bad response: {exc}"))

    # --- parsing ------------------------------------------------------------------------------------------

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                raise ResponseError(f"response head over {_MAX_HEAD} bytes")
            return False
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        version, status, *_ = lines[0].split(b" ", 2)
        if not version.startswith(b"HTTP/1."):
            raise ResponseError(f"status line {lines[0][:80]!r}")
        self.status = int(status)
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self._chunked = True
            elif name == b"content-length":
                length = int(value)
            elif name == b"connection" and value == b"close":
                self.keep_alive = False
            elif name == b"content-encoding" and value in (b"gzip", b"deflate"):
                self.compressed = True
        if not self._chunked:
            if length is None:
                raise ResponseError("neither chunked nor Content-Length")
            self._left = length
        self._head = False
        return True

    def _parse_body(self, now: float) -> None:
        buf = self._buf
        if not self._chunked:
            take = bytes(buf[: self._left])
            del buf[: len(take)]
            self._left -= len(take)
            self._feed(take, now)
            if self._left == 0:
                self._finish()
            return
        while buf:
            if self._chunk_tail:
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise ResponseError("chunk data not followed by CRLF")
                del buf[:2]
                self._chunk_tail = False
            if self._left == 0:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                if size == 0:
                    if buf.find(b"\r\n\r\n", eol) < 0:  # the last chunk; trailers end with an empty line
                        return
                    del buf[:]
                    self._finish()
                    return
                del buf[: eol + 2]
                self._left = size
            take = bytes(buf[: self._left])
            del buf[: len(take)]
            self._left -= len(take)
            if self._left == 0:
                self._chunk_tail = True
            self._feed(take, now)

    def _feed(self, data: bytes, now: float) -> None:
        if self.status != 200:
            self.body += data
            return
        lines = (self._sse + data).split(b"\n")
        self._sse = lines.pop()
        on_event = self._on_event
        assert on_event is not None
        for line in lines:
            if line.startswith(b"data:"):
                on_event(line[5:].strip(), now)

    def _finish(self) -> None:
        assert self._done is not None
        if not self._done.done():
            self._done.set_result(None)


class StreamClient:
    """POSTs to one server, each response streamed through ``on_event``; idle keep-alive connections are reused."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--url must be http://HOST[:PORT] or https://HOST[:PORT], got {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.encode("idna")
        self._idle: list[_StreamProtocol] = []

    async def post(self, path: str, body: bytes, on_event: OnEvent) -> tuple[int, bytes]:
        """Send one request to ``path`` (under the URL's own path); return its status and, unless it is 200, its
        body (the events went to ``on_event``). A reused connection that the server had closed in the meantime
        is replaced by a fresh one."""
        head = (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\n"
            # What aiohttp and httpx send by default, so the server does the work it does for them.
            b"Accept-Encoding: gzip, deflate\r\n"
            b"Content-Length: %d\r\n\r\n" % ((self.prefix + path).encode(), self._host_header, len(body))
        )
        while self._idle:
            proto = self._idle.pop()
            if proto.closed:
                continue
            try:
                return await self._exchange(proto, head + body, on_event)
            except ResponseError:
                if proto.got_bytes:
                    raise
                # The server closed this idle connection before our request reached it: use a fresh one.
        proto = await self._connect()
        return await self._exchange(proto, head + body, on_event)

    async def _connect(self) -> _StreamProtocol:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await loop.create_connection(_StreamProtocol, self.host, self.port, ssl=self.ssl)
        except OSError as exc:
            raise ResponseError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        return proto

    async def _exchange(self, proto: _StreamProtocol, request: bytes, on_event: OnEvent) -> tuple[int, bytes]:
        done = proto.start(on_event)
        assert proto.transport is not None
        proto.transport.write(request)
        try:
            await done
        except BaseException:
            proto.transport.close()
            raise
        if proto.keep_alive and not proto.closed:
            self._idle.append(proto)
        else:
            proto.transport.close()
        body = bytes(proto.body)
        return proto.status, zlib.decompress(body, zlib.MAX_WBITS | 32) if proto.compressed else body

    def close(self) -> None:
        for proto in self._idle:
            if proto.transport is not None:
                proto.transport.close()
        self._idle.clear()
