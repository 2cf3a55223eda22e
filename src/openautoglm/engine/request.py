"""The engine's per-sequence state. One ``Request`` is one sequence: a user request with ``n > 1`` becomes ``n``
of them sharing a ``parent_id`` (their prompt blocks are shared through the prefix cache)."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from openautoglm.protocol.outputs import FinishReason
from openautoglm.protocol.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

# A logits processor sees the tokens generated so far and this step's logits row (1-D, float32) and returns the
# row to sample from (it may modify it in place). Structured outputs plug in here.
LogitsProcessor = Callable[[list[int], "torch.Tensor"], "torch.Tensor"]

# The id a sampled-but-not-yet-read token holds in ``output_token_ids`` under async scheduling.
PLACEHOLDER = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were taken; recomputes from scratch
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str | None = None  # the user-visible request id when n > 1
    index: int = 0  # which of the n sequences this is
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    generator: torch.Generator | None = None  # set when sampling_params.seed is given

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (or is being computed in the step just scheduled). The scheduler advances it
    # when it schedules; a request samples once num_computed_tokens == num_tokens.
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache on first admission
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Block hashes of this sequence's full blocks, filled by the KV cache manager as blocks fill (hash chain).
    block_hashes: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # detokenizer state and the like, owned by the core
    # Async scheduling: the last output token is a placeholder (PLACEHOLDER) whose value is still on the GPU, in
    # row ``pending_row`` of the last launched step's sampled tokens; -1 when every token is known.
    pending_row: int = -1

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows (all but a pending placeholder)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) - (self.pending_row >= 0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def priority_key(self) -> tuple[int, float]:
        """Smaller runs first and is preempted last."""
        return (self.priority, self.arrival_time)
