"""JSON responses through orjson, and Server-Sent Events: framing and a lean streaming response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

SSE_MEDIA_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # keep proxies from buffering a stream


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event; orjson never emits a raw newline, so one line always holds the whole object."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class SSEResponse(Response):
    """A ``text/event-stream`` response: each item of ``body`` (one or more whole events) is sent as it comes.

    Starlette's StreamingResponse does the same with an anyio task group per response; this one needs a single
    watcher task, since the per-response cost is paid by every streamed request. When the client goes
    away, the watcher cancels the stream where it waits, so ``body``'s cleanup (aborting the engine requests)
    runs at once; the response then ends quietly, as Starlette's does.
    """

    def __init__(self, body: AsyncIterator[bytes], headers: Mapping[str, str] | None = None) -> None:
        self.events = body
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", SSE_MEDIA_TYPE.encode() + b"; charset=utf-8")]
        self.raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None  # ASGI apps always run in a task
        state = {"streaming": True, "gone": False}
        watcher = asyncio.get_running_loop().create_task(_watch_disconnect(receive, task, state))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for events in self.events:
                await send({"type": "http.response.body", "body": events, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["gone"]:
                raise
            task.uncancel()  # our own cancellation (the client left), not the server's: end normally
        except OSError:
            pass  # ASGI 2.4 servers raise this on a send after the client left: the stream is over
        finally:
            state["streaming"] = False  # from here on, a disconnect no longer cancels this task
            watcher.cancel()
            await self.events.aclose()  # type: ignore[attr-defined]


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], state: dict[str, bool]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    if state["streaming"]:
        state["gone"] = True
        task.cancel()
