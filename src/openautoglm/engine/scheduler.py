"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``). Running
sequences go first, in order (FCFS: admission order; priority: ``Request.priority_key``), each taking what it
still lacks: one token for a decode, the next chunk of a prompt being prefilled. Waiting sequences are then
admitted in order while budget, sequence slots and KV blocks last; a prompt longer than the remaining budget
is split across steps (chunked prefill) or, with chunking off, waits until it fits whole. Waiting sequences
are not admitted in a step that had to preempt.

When a running sequence needs a block and none is free, the scheduler preempts by recomputation: the victim
(the last running sequence: the most recently admitted under FCFS, the largest ``priority_key`` under the
priority policy) loses its blocks, its ``num_computed_tokens`` drops to 0, and it waits again at the front of
the queue (priority policy: in key order). On resumption it recomputes prompt and generated tokens — mostly
prefix-cache hits on its own freed blocks — and then samples its next token. Victims always come from behind
the sequence being served, so a victim was never scheduled in the same step (its freshly cached blocks are all
valid).

A sequence whose context outgrows the whole pool (or ``max_model_len``) would preempt everyone forever;
instead it is finished with ``FinishReason.LENGTH`` and reported in ``SchedulerOutput.finished_by_scheduler``.

The step's work is O(running + admitted) plus O(new blocks): nothing scans the sequences' tokens.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from openautoglm.config.settings import SchedulerConfig
from openautoglm.engine.kv_cache import KVCacheManager
from openautoglm.engine.request import Request, RequestStatus
from openautoglm.protocol.errors import ConfigError, ContextLengthExceededError, InvalidRequestError
from openautoglm.protocol.outputs import FinishReason


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # tokens computed this step (the query length)
    start: int  # num_computed_tokens before this step: the new tokens are positions [start, start + num_new)
    block_ids: list[int]  # the request's live block table after allocation (read-only)


@dataclass(slots=True)
class SchedulerOutput:
    # Sequences with num_new_tokens == 1 come first (the attention backend relies on it).
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Request] = field(default_factory=list)  # lost their blocks this step; waiting again
    finished_by_scheduler: list[Request] = field(default_factory=list)  # finished (LENGTH), blocks freed
    num_decodes: int = 0  # how many leading entries of ``scheduled`` have num_new_tokens == 1


class _FcfsQueue:
    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def push(self, request: Request) -> None:
        self._q.append(request)

    def push_front(self, request: Request) -> None:
        self._q.appendleft(request)

    def peek(self) -> Request:
        return self._q[0]

    def pop(self) -> Request:
        return self._q.popleft()

    def remove(self, request: Request) -> None:
        self._q.remove(request)  # Request compares by identity


class _PriorityQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[tuple[int, float], int, Request]] = []
        self._seq = itertools.count()  # ties keep insertion order

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.priority_key, next(self._seq), request))

    push_front = push  # a preempted sequence rejoins in key order

    def peek(self) -> Request:
        return self._heap[0][2]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def remove(self, request: Request) -> None:
        for i, entry in enumerate(self._heap):
            if entry[2] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return


@dataclass(slots=True)
class _Step:
    out: SchedulerOutput
    budget: int
    scheduled: list[ScheduledRequest] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager, max_model_len: int) -> None:
        if max_model_len < 1:
            raise ConfigError(f"model.max_model_len must be >= 1, got {max_model_len}", param="max_model_len")
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            raise ConfigError(
                f"scheduler.max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= "
                f"max_model_len ({max_model_len}) when chunked prefill is off (long prompts could never run)",
                param="max_num_batched_tokens",
            )
        self._config = config
        self._kv = kv_cache
        self._max_model_len = max_model_len
        self._priority = config.policy == "priority"
        self._waiting: _FcfsQueue | _PriorityQueue = _PriorityQueue() if self._priority else _FcfsQueue()
        self._running: list[Request] = []  # may hold finished requests until the next schedule() (lazy removal)
        self._num_running = 0
        self._running_dirty = False
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._num_preemptions = 0
        # Tokens the pool can hold for one sequence: a longer context can never run.
        self._capacity_tokens = kv_cache.num_usable_blocks * kv_cache.block_size

    # ---- queries ------------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ---- requests in and out ------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use", param="request_id")
        if request.num_tokens == 0:
            raise InvalidRequestError("the prompt must hold at least 1 token", param="prompt")
        if request.num_tokens > self._max_model_len:
            raise ContextLengthExceededError(
                f"the prompt has {request.num_tokens} tokens; this model's context (max_model_len) holds at "
                f"most {self._max_model_len}",
                param="prompt",
            )
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._waiting.push(request)

    def abort_requests(self, request_ids: Iterable[str]) -> list[Request]:
        """Abort running or waiting requests; their blocks are free on return. Unknown ids are skipped."""
        aborted = []
        for rid in request_ids:
            request = self._requests.get(rid)
            if request is not None:
                self.finish_request(request, FinishReason.ABORT)
                aborted.append(request)
        return aborted

    def finish_request(self, request: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Mark a request finished and free its blocks. With ``FinishReason.ERROR`` its blocks also leave the
        prefix cache (the failed step may not have written them). Finishing twice is a no-op."""
        if request.is_finished or self._requests.get(request.request_id) is not request:
            return
        if request.status is RequestStatus.RUNNING:
            self._num_running -= 1
            self._running_dirty = True  # dropped from the running list by the next schedule()
        else:
            self._waiting.remove(request)
        self._release(request, reason, stop_reason)

    def _release(self, request: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Free the blocks and mark finished; the caller has taken the request out of its queue."""
        self._kv.free(request, uncache=reason is FinishReason.ERROR)
        del self._requests[request.request_id]
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason

    # ---- the step -----------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        if self._running_dirty:
            self._running = [r for r in self._running if r.status is RequestStatus.RUNNING]
            self._running_dirty = False
        step = _Step(SchedulerOutput(), self._config.max_num_batched_tokens)
        self._schedule_running(step)
        if not step.out.preempted:
            self._schedule_waiting(step)
        out = step.out
        decodes = [s for s in step.scheduled if s.num_new_tokens == 1]
        out.num_decodes = len(decodes)
        out.scheduled = decodes + [s for s in step.scheduled if s.num_new_tokens != 1] if decodes else step.scheduled
        out.num_batched_tokens = self._config.max_num_batched_tokens - step.budget
        return out

    def _schedule_running(self, step: _Step) -> None:
        running = self._running
        i = 0
        while i < len(running) and step.budget > 0:
            request = running[i]
            room = self._max_model_len - request.num_computed_tokens
            if room <= 0:  # the core should have finished it at max_model_len; never run past it
                running.pop(i)
                self._finish_by_scheduler(request, step)
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, step.budget, room)
            if num_new <= 0:  # waiting for its sampled token
                i += 1
                continue
            if self._make_room(request, num_new, step):
                self._add_scheduled(request, num_new, step)
                i += 1
            # else: it left the running list (preempted or finished) and running[i] is the next one

    def _make_room(self, request: Request, num_new: int, step: _Step) -> bool:
        """Allocate, preempting from the back of the running list until it fits. False if ``request`` was
        preempted (or finished, when even an empty pool could not hold its context)."""
        while not self._kv.allocate_slots(request, num_new):
            if request.num_tokens > self._capacity_tokens:
                self._running.remove(request)
                self._finish_by_scheduler(request, step)
                return False
            victim = self._running.pop()
            self._preempt(victim, step)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, step: _Step) -> None:
        self._kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        self._num_running -= 1
        self._waiting.push_front(request)
        step.out.preempted.append(request)

    def _finish_by_scheduler(self, request: Request, step: _Step) -> None:
        """Finish (LENGTH) a request that can never run further; the caller has taken it out of its queue."""
        if request.status is RequestStatus.RUNNING:
            self._num_running -= 1
        self._release(request, FinishReason.LENGTH)
        step.out.finished_by_scheduler.append(request)

    def _schedule_waiting(self, step: _Step) -> None:
        waiting = self._waiting
        chunked = self._config.enable_chunked_prefill
        max_seqs = self._config.max_num_seqs
        while waiting and step.budget > 0 and len(self._running) < max_seqs:
            request = waiting.peek()
            if request.num_tokens > min(self._capacity_tokens, self._max_model_len):
                waiting.pop()
                self._finish_by_scheduler(request, step)
                continue
            computed = self._kv.get_computed_blocks(request)
            num_cached = computed[1]
            num_new = request.num_tokens - num_cached
            if not chunked and num_new > step.budget:
                break
            num_new = min(num_new, step.budget)
            if not self._kv.allocate_slots(request, num_new, computed):
                break
            waiting.pop()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_cached
            if self._priority:
                bisect.insort(self._running, request, key=lambda r: r.priority_key)
            else:
                self._running.append(request)
            self._num_running += 1
            self._add_scheduled(request, num_new, step)

    def _add_scheduled(self, request: Request, num_new: int, step: _Step) -> None:
        start = request.num_computed_tokens
        step.scheduled.append(ScheduledRequest(request, num_new, start, self._kv.get_block_ids(request)))
        request.num_computed_tokens = start + num_new
        step.budget -= num_new
