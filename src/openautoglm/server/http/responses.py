"""JSON responses through orjson, and Server-Sent Events framing."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

SSE_MEDIA_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"


class OrjsonResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def sse_event(payload: dict[str, Any]) -> bytes:
    """One ``data:`` event; orjson never emits a raw newline, so one line always holds the whole object."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # keep proxies from buffering a stream
