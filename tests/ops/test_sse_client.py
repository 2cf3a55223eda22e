"""The benchmark's streaming HTTP client: its parser against responses cut at every possible place (the events and
their order never depend on how the bytes arrive), and the client against real loopback servers (keep-alive
reuse, a stale idle connection, error bodies, a connection that breaks mid-stream)."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openautoglm.ops.sse_client import ResponseError, StreamClient, _StreamProtocol

EVENTS = [b'{"a": 1}', b'{"b": "x\\ny"}', b"[DONE]"]
SSE = b"".join(b"data: " + e + b"\n\n" for e in EVENTS[:1]) + b": keep-alive\r\n\r\n"
SSE += b"".join(b"data: " + e + b"\r\n\r\n" for e in EVENTS[1:])


def chunked(body: bytes, sizes: list[int]) -> bytes:
    out, at = b"", 0
    for size in sizes:
        part = body[at : at + size]
        if part:
            out += b"%x;ext=1\r\n" % len(part) + part + b"\r\n"
        at += size
    if at < len(body):
        out += b"%x\r\n" % (len(body) - at) + body[at:] + b"\r\n"
    return out + b"0\r\n\r\n"


HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def _feed(response: bytes, cuts: list[int]) -> tuple[list[bytes], asyncio.Future[None]]:
    proto, got = _StreamProtocol(), []
    done = proto.start(lambda data, _now: got.append(data))
    at = 0
    for cut in [*sorted(set(cuts)), len(response)]:
        if cut > at:
            proto.data_received(response[at:cut])
            at = cut
    return got, done


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), max_size=8), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_events_do_not_depend_on_chunk_sizes_or_read_boundaries(sizes: list[int], cuts: list[int]) -> None:
    async def run() -> None:
        got, done = await _feed(HEAD + chunked(SSE, sizes), cuts)
        assert got == EVENTS and done.done() and done.exception() is None

    asyncio.run(run())


async def test_content_length_bodies_and_malformed_responses() -> None:
    body = b"data: {}\n\n"
    got, done = await _feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body, [3, 40])
    assert got == [b"{}"] and done.done()
    _, done = await _feed(b"HTTP/1.1 200 OK\r\n\r\ndata: {}\n\n", [])
    with pytest.raises(ResponseError, match="neither chunked nor Content-Length"):
        done.result()
    _, done = await _feed(HEAD + b"zz\r\n", [])
    with pytest.raises(ResponseError, match="bad response"):
        done.result()


async def _serve(handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/prefix"


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[1])
    return head, await reader.readexactly(length)


async def test_keep_alive_connections_are_reused_and_stale_ones_replaced() -> None:
    connections, requests = [], []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            try:
                head, body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                writer.close()
                return
            requests.append((head, body))
            writer.write(HEAD + chunked(b"data: " + body + b"\n\n", [4]))
            await writer.drain()
            if len(requests) == 2:
                writer.close()  # the server drops the idle connection after the second response
                return

    server, url = await _serve(handler)
    client = StreamClient(url)
    try:
        for i in range(3):
            got: list[bytes] = []
            status, _ = await client.post("/v1/x", b'{"i": %d}' % i, lambda data, _now, got=got: got.append(data))
            assert status == 200 and got == [b'{"i": %d}' % i]
            await asyncio.sleep(0.05)
    finally:
        client.close()
        server.close()
    assert len(connections) == 2  # the first served two requests; the third found it closed and reconnected
    head = requests[0][0]
    assert head.startswith(b"POST /prefix/v1/x HTTP/1.1\r\n") and b"Accept-Encoding: gzip, deflate" in head


async def test_error_bodies_are_returned_and_broken_streams_raise() -> None:
    error = gzip.compress(b'{"error": {"message": "queue full"}}')

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await _read_request(reader)
        if body == b"error":
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Encoding: gzip\r\n")
            writer.write(b"Content-Length: %d\r\n\r\n" % len(error) + error)
        else:
            writer.write(HEAD + b"a\r\ndata: {}\n\n\r\n")  # one event, then the connection breaks
        await writer.drain()
        writer.close()

    server, url = await _serve(handler)
    client = StreamClient(url)
    try:
        status, body = await client.post("/x", b"error", lambda *_: None)
        assert (status, body) == (503, b'{"error": {"message": "queue full"}}')
        got: list[bytes] = []
        with pytest.raises(ResponseError, match="closed the connection"):
            await client.post("/x", b"stream", lambda data, _now: got.append(data))
        assert got == [b"{}"]
    finally:
        client.close()
        server.close()
