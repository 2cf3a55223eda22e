"""GLM tool calls → OpenAI ``tool_calls``, collected and streamed.

GLM-4 calls a function by answering with the function's name on the first line and its arguments as JSON after
it (the chat template renders past calls the same way). ``ToolChatOutput`` recognises that answer: collected, it
becomes ``message.tool_calls`` with ``finish_reason`` ``tool_calls``; streamed, the first line is held back until
it is known to be a function name, then the call is sent as OpenAI does (a first delta with id, type and name,
then ``arguments`` pieces). Text that is not a call is sent as ordinary content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from openautoglm.protocol.outputs import CompletionOutput, FinishReason, RequestOutput
from openautoglm.server.http.openai_chat_output import ChatOutput, chat_logprobs
from openautoglm.server.http.openai_output import finish_fields


def parse_tool_call(text: str, names: frozenset[str]) -> tuple[str, str] | None:
    """``(name, arguments JSON)`` when ``text`` is one GLM tool call of a known function, else None."""
    name, sep, args = text.partition("\n")
    name = name.strip()
    if not sep or name not in names:
        return None
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return (name, args.strip()) if isinstance(value, dict) else None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class _StreamState:
    mode: str = "undecided"  # "undecided" (first line held back), "content" or "tool"
    held: str = ""
    call_id: str = field(default_factory=new_call_id)


class ToolChatOutput(ChatOutput):
    """A chat output for requests with tools. ``forced``: the grammar makes the output a call."""

    def __init__(self, *args: Any, function_names: frozenset[str], forced: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.names = function_names
        self.forced = forced
        self._states = [_StreamState() for _ in range(self.n)]

    # --- collected -----------------------------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        body = super().response()
        for choice in body["choices"]:
            text = choice["message"]["content"]
            call = parse_tool_call(text, self.names)
            if call is None:
                continue
            name, args = call
            choice["message"] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": args}}
                ],
            }
            if choice["finish_reason"] == FinishReason.STOP.value:
                choice["finish_reason"] = "tool_calls"
        return body

    # --- streamed ------------------------------------------------------------------------------------------

    def chunk_events(self, prompt_index: int, out: RequestOutput) -> list[bytes]:
        self.account(out)
        events = []
        for o in out.outputs:
            delta = self._delta(o)
            if not (delta or o.logprobs_delta or o.finish_reason is not None):
                continue
            logprobs = None
            if self.top_logprobs is not None and o.logprobs_delta:
                logprobs = {"content": chat_logprobs(o.logprobs_delta, self.top_logprobs, self.token_bytes)}
            choice: dict[str, Any] = {"index": o.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}
            if o.finish_reason is not None:
                choice.update(finish_fields(o))
                if o.finish_reason is FinishReason.STOP and self._states[o.index].mode == "tool":
                    choice["finish_reason"] = "tool_calls"
            events.append(self.stream_chunk([choice]))
        return events

    def _delta(self, o: CompletionOutput) -> dict[str, Any]:
        state = self._states[o.index]
        if state.mode == "content":
            return {"content": o.text_delta} if o.text_delta else {}
        if state.mode == "tool":
            return self._arguments(state, o.text_delta) if o.text_delta else {}
        state.held += o.text_delta
        name, sep, rest = state.held.partition("\n")
        if sep and name.strip() in self.names:
            state.mode = "tool"
            call = {"index": 0, "id": state.call_id, "type": "function"}
            call["function"] = {"name": name.strip(), "arguments": rest}
            return {"tool_calls": [call]}
        could_be_name = not sep and any(n.startswith(state.held.lstrip()) for n in self.names)
        if could_be_name and o.finish_reason is None:
            return {}
        state.mode = "content"
        return {"content": state.held} if state.held else {}

    @staticmethod
    def _arguments(state: _StreamState, piece: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
