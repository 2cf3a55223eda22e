"""Scheduler: continuous batching, chunked prefill, policies, preemption, abort, the capacity rule.

``FakeCore`` drives the scheduler the way the engine core does, with a stand-in model that makes the KV cache
observable: the "KV" a sequence writes at position p is a fingerprint of its tokens [0, p], and the next token
is derived from the fingerprint read back from the cache at the last position. Reading the whole context back
each step checks every block table entry; a wrong prefix hit, a block evicted or reused while still needed, or
a preempted request resuming from stale state changes the output, which is compared with the same fake model
run on each request alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from openautoglm.config.settings import SchedulerConfig
from openautoglm.engine.kv_cache import NULL_BLOCK_ID, KVCacheManager
from openautoglm.engine.request import Request, RequestStatus
from openautoglm.engine.scheduler import Scheduler, SchedulerOutput
from openautoglm.protocol.errors import ConfigError, ContextLengthExceededError, InvalidRequestError
from openautoglm.protocol.outputs import FinishReason
from openautoglm.protocol.sampling import SamplingParams

VOCAB = 50
_MASK = (1 << 62) - 1


def _extend_fingerprints(fps: list[int], tokens: list[int]) -> None:
    for t in tokens[len(fps) :]:
        fps.append(hash((fps[-1] if fps else 0, t)) & _MASK)


def reference_output(prompt: list[int], n: int) -> list[int]:
    """The fake model run on one request alone: n greedy tokens."""
    tokens = list(prompt)
    fps: list[int] = []
    for _ in range(n):
        _extend_fingerprints(fps, tokens)
        tokens.append(fps[-1] % VOCAB)
    return tokens[len(prompt) :]


def make_request(rid: str, prompt: list[int], max_tokens: int = 16, priority: int = 0) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens), priority=priority)


@dataclass
class FakeCore:
    scheduler: Scheduler
    kv: KVCacheManager
    max_model_len: int
    config: SchedulerConfig
    slots: dict[int, int] = field(default_factory=dict)
    fps: dict[str, list[int]] = field(default_factory=dict)
    live: dict[str, Request] = field(default_factory=dict)
    done: list[Request] = field(default_factory=list)
    steps: list[SchedulerOutput] = field(default_factory=list)

    @classmethod
    def build(
        cls, num_blocks: int, block_size: int = 4, max_model_len: int = 64, caching: bool = True, **cfg: Any
    ) -> FakeCore:
        config = SchedulerConfig(**cfg)
        kv = KVCacheManager(num_blocks, block_size, caching)
        return cls(Scheduler(config, kv, max_model_len), kv, max_model_len, config)

    def add(self, request: Request) -> Request:
        self.scheduler.add_request(request)
        self.live[request.request_id] = request
        return request

    def abort(self, request_ids: list[str]) -> list[Request]:
        aborted = self.scheduler.abort_requests(request_ids)
        for r in aborted:
            assert r.status is RequestStatus.FINISHED and r.finish_reason is FinishReason.ABORT
            self._retire(r)
        return aborted

    def _retire(self, request: Request) -> None:
        del self.live[request.request_id]
        self.done.append(request)

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        self.steps.append(out)
        for r in out.finished_by_scheduler:
            assert r.status is RequestStatus.FINISHED and r.finish_reason is FinishReason.LENGTH
            self._retire(r)
        self._check_step(out)
        bs = self.kv.block_size
        written: set[int] = set()
        for s in out.scheduled:  # the backend writes every new token's KV first ...
            fps = self.fps.setdefault(s.request.request_id, [])
            _extend_fingerprints(fps, s.request.all_token_ids)
            for p in range(s.start, s.start + s.num_new_tokens):
                slot = s.block_ids[p // bs] * bs + p % bs
                assert slot not in written, "two sequences wrote one slot in one step"
                written.add(slot)
                self.slots[slot] = fps[p]
        for s in out.scheduled:  # ... then each sequence attends to its whole context
            req, ctx = s.request, s.start + s.num_new_tokens
            fps = self.fps[req.request_id]
            read = [self.slots.get(s.block_ids[p // bs] * bs + p % bs) for p in range(ctx)]
            assert read == fps[:ctx], f"{req.request_id} read a wrong KV entry"
            if ctx == req.num_tokens:
                self._sample(req, read[-1] % VOCAB)
        return out

    def _sample(self, req: Request, token: int) -> None:
        req.output_token_ids.append(token)
        max_tokens = req.sampling_params.max_tokens or self.max_model_len
        if len(req.output_token_ids) >= max_tokens or req.num_tokens >= self.max_model_len:
            self.scheduler.finish_request(req, FinishReason.LENGTH)
            assert self.kv.get_block_ids(req) == []
            self._retire(req)

    def _check_step(self, out: SchedulerOutput) -> None:
        n = out.num_decodes
        assert all(s.num_new_tokens == 1 for s in out.scheduled[:n])
        assert all(s.num_new_tokens > 1 for s in out.scheduled[n:])
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
        assert out.num_batched_tokens <= self.config.max_num_batched_tokens
        assert len(out.scheduled) <= self.config.max_num_seqs
        assert self.scheduler.num_running <= self.config.max_num_seqs
        assert len({id(s.request) for s in out.scheduled}) == len(out.scheduled)
        for s in out.scheduled:
            assert s.request.num_computed_tokens == s.start + s.num_new_tokens <= self.max_model_len
            assert s.request.status is RequestStatus.RUNNING
            assert s.block_ids == self.kv.get_block_ids(s.request)
            assert len(s.block_ids) * self.kv.block_size >= s.start + s.num_new_tokens
        for r in out.preempted:
            assert r.status is RequestStatus.PREEMPTED and r.num_computed_tokens == 0
            assert r not in [s.request for s in out.scheduled]
        self.check_blocks()

    def check_blocks(self) -> None:
        """Blocks are conserved: each block's ref count is the number of live tables holding it, a block held
        by two sequences is a cached prefix block, and every block with ref 0 is allocatable."""
        owners: dict[int, int] = {}
        for r in self.live.values():
            table = self.kv.get_block_ids(r)
            if r.status is not RequestStatus.RUNNING:
                assert table == [], f"{r.status} request {r.request_id} holds blocks"
            assert len(set(table)) == len(table) and NULL_BLOCK_ID not in table
            for b in table:
                owners[b] = owners.get(b, 0) + 1
        for b in range(1, self.kv.num_blocks):
            assert self.kv.ref_count(b) == owners.get(b, 0)
            if owners.get(b, 0) > 1:
                assert self.kv.is_cached(b)
        assert self.kv.num_free_blocks == self.kv.num_usable_blocks - len(owners)
        sched = self.scheduler
        assert sched.num_running + sched.num_waiting == len(self.live)
        assert sched.num_running == sum(r.status is RequestStatus.RUNNING for r in self.live.values())

    def run(self, max_steps: int = 1000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished():
                return
            self.step()
        raise AssertionError("the scheduler made no progress (livelock)")

    def check_outputs(self) -> None:
        for r in self.done:
            assert r.output_token_ids == reference_output(r.prompt_token_ids, len(r.output_token_ids))


def _prompts(core: FakeCore, *lengths: int) -> list[Request]:
    return [core.add(make_request(f"r{i}", [i + 1] * n)) for i, n in enumerate(lengths)]


# ---- admission, budgets, chunked prefill ------------------------------------------------------------------


def test_chunked_prefill_splits_a_long_prompt_and_runs_it_alongside_decodes() -> None:
    core = FakeCore.build(64, max_num_batched_tokens=8)
    a = core.add(make_request("a", [1, 2, 3]))
    out = core.step()
    assert [(s.request, s.start, s.num_new_tokens) for s in out.scheduled] == [(a, 0, 3)]
    b = core.add(make_request("b", list(range(10, 30))))  # 20 tokens
    chunks = []
    for _ in range(3):
        out = core.step()
        assert out.scheduled[0].request is a and out.scheduled[0].num_new_tokens == 1  # the decode goes first
        chunks.append((out.scheduled[1].start, out.scheduled[1].num_new_tokens))
        assert out.num_batched_tokens <= 8
    assert chunks == [(0, 7), (7, 7), (14, 6)]
    assert b.num_computed_tokens == 20 and len(b.output_token_ids) == 1
    core.run()
    core.check_outputs()


def test_without_chunked_prefill_a_prompt_is_only_admitted_whole() -> None:
    core = FakeCore.build(64, max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False)
    a, b = _prompts(core, 10, 10)
    out = core.step()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(a, 10)]
    out = core.step()
    assert [(s.request, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 10)]
    assert out.num_decodes == 1
    core.run()
    core.check_outputs()


def test_chunked_prefill_off_needs_a_budget_for_the_longest_prompt() -> None:
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        FakeCore.build(64, max_model_len=64, max_num_batched_tokens=16, enable_chunked_prefill=False)


def test_max_num_seqs_caps_the_running_set() -> None:
    core = FakeCore.build(64, max_num_seqs=2)
    a, b, c = (core.add(make_request(n, [7, 8], max_tokens=3)) for n in "abc")
    for _ in range(3):
        out = core.step()
        assert {s.request for s in out.scheduled} == {a, b} and c.status is RequestStatus.WAITING
    assert a.is_finished and b.is_finished
    out = core.step()
    assert [s.request for s in out.scheduled] == [c]
    core.run()
    core.check_outputs()


@pytest.mark.parametrize(("policy", "expected"), [("fcfs", ["p5", "p1", "p3"]), ("priority", ["p1", "p3", "p5"])])
def test_admission_order_follows_the_policy(policy: str, expected: list[str]) -> None:
    core = FakeCore.build(64, max_num_seqs=1, policy=policy)
    for p in (5, 1, 3):
        core.add(make_request(f"p{p}", [p, p], max_tokens=2, priority=p))
    order = []
    while core.scheduler.has_unfinished():
        out = core.step()
        order += [s.request.request_id for s in out.scheduled if s.start == 0]
    assert order == expected


def test_a_shared_prefix_hits_within_one_step() -> None:
    core = FakeCore.build(64)
    prefix = list(range(1, 9))  # two full blocks of 4
    a = core.add(make_request("a", [*prefix, 40, 41]))
    b = core.add(make_request("b", [*prefix, 50]))
    out = core.step()  # b is admitted after a's blocks were allocated and hashed in this same step
    by_req = {s.request: s for s in out.scheduled}
    assert (by_req[a].start, by_req[a].num_new_tokens) == (0, 10)
    assert (by_req[b].start, by_req[b].num_new_tokens) == (8, 1)
    assert out.scheduled[0].request is b and out.num_decodes == 1  # query length 1 sorts first
    assert by_req[a].block_ids[:2] == by_req[b].block_ids[:2]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 8)
    assert a.first_scheduled_time is not None and b.first_scheduled_time is not None
    assert core.kv.prefix_cache_hits == 8 and core.kv.prefix_cache_queries == 19
    core.run()
    core.check_outputs()


def test_never_schedules_past_max_model_len() -> None:
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(), kv, max_model_len=8)
    req = make_request("a", [1, 2, 3, 4, 5, 6, 7])
    sched.add_request(req)
    ends = []
    for _ in range(4):  # a careless core: appends two tokens a step and never finishes at max_model_len
        out = sched.schedule()
        ends += [s.start + s.num_new_tokens for s in out.scheduled]
        if out.finished_by_scheduler:
            break
        req.output_token_ids += [1, 1]
    assert ends == [7, 8]
    assert out.finished_by_scheduler == [req] and req.finish_reason is FinishReason.LENGTH
    assert kv.num_free_blocks == kv.num_usable_blocks


def test_add_request_rejects_bad_requests() -> None:
    sched = Scheduler(SchedulerConfig(), KVCacheManager(8, 4), max_model_len=8)
    sched.add_request(make_request("a", [1]))
    with pytest.raises(InvalidRequestError, match="request id"):
        sched.add_request(make_request("a", [2]))
    with pytest.raises(InvalidRequestError, match="prompt"):
        sched.add_request(make_request("b", []))
    with pytest.raises(ContextLengthExceededError, match="max_model_len"):
        sched.add_request(make_request("c", [1] * 9))
    assert sched.num_waiting == 1


# ---- preemption ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "victim"), [("fcfs", "c"), ("priority", "b")])
def test_preemption_picks_the_victim_by_policy_and_the_victim_resumes(policy: str, victim: str) -> None:
    core = FakeCore.build(5, policy=policy)  # 4 usable blocks of 4 tokens
    a = core.add(make_request("a", [1, 2, 3, 4], max_tokens=6, priority=0))
    b = core.add(make_request("b", [5, 6, 7, 8], max_tokens=6, priority=2))
    c = core.add(make_request("c", [9, 10, 11, 12], max_tokens=6, priority=1))
    core.step()  # all three prefill one block each
    out = core.step()  # each needs a second block; only one is free
    v = {"b": b, "c": c}[victim]
    assert out.preempted == [v]
    assert v.status is RequestStatus.PREEMPTED and v.num_computed_tokens == 0 and v.num_preemptions == 1
    assert core.scheduler.num_preemptions == 1 and core.scheduler.num_waiting == 1
    assert {s.request for s in out.scheduled} == {a, b, c} - {v}
    assert core.kv.get_block_ids(v) == []
    core.run()
    resumed = [s for o in core.steps[2:] for s in o.scheduled if s.request is v and s.start == 0]
    assert resumed and resumed[0].num_new_tokens == 5  # prompt + the token it had generated, recomputed
    assert v.num_cached_tokens == 0  # set on first admission only
    assert all(len(r.output_token_ids) == 6 for r in (a, b, c))
    core.check_outputs()


def test_priority_victim_is_the_largest_key_even_when_admitted_first() -> None:
    core = FakeCore.build(6, policy="priority")  # 5 usable blocks of 4 tokens
    a = core.add(make_request("a", [1] * 4, max_tokens=8, priority=0))
    b = core.add(make_request("b", [2] * 4, max_tokens=8, priority=2))
    core.step()
    c = core.add(make_request("c", [3] * 3, max_tokens=8, priority=1))  # admitted after b, runs before it
    preempted = []
    while not preempted:
        preempted = core.step().preempted
    assert preempted == [b]
    assert c.status is RequestStatus.RUNNING and a.status is RequestStatus.RUNNING
    core.run()
    core.check_outputs()


def test_preempted_requests_return_to_the_front_of_the_queue() -> None:
    core = FakeCore.build(5)  # 4 usable blocks of 4 tokens
    a, b, c = (core.add(make_request(n, [i] * 4, max_tokens=2)) for i, n in enumerate("abc", start=1))
    core.step()
    d = core.add(make_request("d", [60, 61]))  # waits behind nobody
    out = core.step()
    assert out.preempted == [c] and d.status is RequestStatus.WAITING
    assert a.is_finished and b.is_finished
    out = core.step()
    assert [s.request for s in out.scheduled] == [c, d]  # c went back in front of d
    core.run()
    core.check_outputs()


# ---- abort, finish, capacity ------------------------------------------------------------------------------


def test_abort_of_running_and_waiting_requests_frees_blocks_at_once() -> None:
    core = FakeCore.build(16, max_num_seqs=2)
    a, b, c = _prompts(core, 9, 6, 5)
    core.step()
    assert core.scheduler.num_running == 2 and core.scheduler.num_waiting == 1
    held = core.kv.num_usable_blocks - core.kv.num_free_blocks
    assert held == 5
    aborted = core.abort(["r0", "r2", "nope"])
    assert aborted == [a, c]
    assert core.kv.num_free_blocks == core.kv.num_usable_blocks - len(core.kv.get_block_ids(b))
    assert core.scheduler.get_request("r0") is None and core.scheduler.get_request("r1") is b
    assert core.scheduler.num_running == 1 and core.scheduler.num_waiting == 0
    assert core.abort(["r0"]) == []  # already gone
    core.check_blocks()
    core.run()
    assert core.kv.num_free_blocks == core.kv.num_usable_blocks
    core.check_outputs()


def test_finish_with_error_drops_the_blocks_from_the_prefix_cache() -> None:
    core = FakeCore.build(16)
    (a,) = _prompts(core, 9)
    core.step()
    core.scheduler.finish_request(a, FinishReason.ERROR)
    assert a.finish_reason is FinishReason.ERROR
    assert core.kv.get_computed_blocks(make_request("x", a.all_token_ids))[1] == 0
    core.scheduler.finish_request(a, FinishReason.STOP)  # a second finish changes nothing
    assert a.finish_reason is FinishReason.ERROR


def test_a_prompt_larger_than_the_pool_is_finished_not_livelocked() -> None:
    core = FakeCore.build(3, max_model_len=64)  # 2 usable blocks: 8 tokens
    big = core.add(make_request("big", [1] * 12))
    small = core.add(make_request("small", [2, 3], max_tokens=3))
    out = core.step()
    assert out.finished_by_scheduler == [big] and big.finish_reason is FinishReason.LENGTH
    assert [s.request for s in out.scheduled] == [small]
    core.run()
    assert small.finish_reason is FinishReason.LENGTH and len(small.output_token_ids) == 3
    assert core.kv.num_free_blocks == 2


def test_a_sequence_outgrowing_the_pool_is_finished_and_the_others_go_on() -> None:
    core = FakeCore.build(4, max_model_len=64)  # 3 usable blocks: 12 tokens
    grow = core.add(make_request("grow", [1] * 7, max_tokens=100))
    other = core.add(make_request("other", [2, 3], max_tokens=100))
    core.run(max_steps=60)
    # grow took other's block while it still fitted; neither ever preempts itself for want of a pool
    assert core.scheduler.num_preemptions == 1
    for r in (grow, other):
        # Tokens 0..11 fill the pool; the 13th was sampled from them; a 14th would need a 4th block.
        assert r.finish_reason is FinishReason.LENGTH and r.num_tokens == 13
    assert [r for o in core.steps for r in o.finished_by_scheduler] == [grow, other]
    core.check_outputs()


# ---- storms ------------------------------------------------------------------------------------------------


def _random_prompt(rng: random.Random, prefixes: list[list[int]], max_len: int) -> list[int]:
    prefix = rng.choice(prefixes)[: rng.randint(0, 12)]
    tail = [rng.randint(1, VOCAB - 1) for _ in range(rng.randint(1, 10))]
    return (prefix + tail)[:max_len]


@pytest.mark.parametrize("seed", range(12))
def test_random_storm_conserves_blocks_and_matches_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    chunked = seed % 3 != 0
    max_model_len = rng.choice([24, 32, 48])
    core = FakeCore.build(
        rng.randint(4, 14),
        block_size=rng.choice([2, 4]),
        max_model_len=max_model_len,
        caching=seed % 4 != 1,
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(max_model_len, 64) if not chunked else rng.randint(1, 24),
        enable_chunked_prefill=chunked,
        policy=rng.choice(["fcfs", "priority"]),
    )
    prefixes = [[rng.randint(1, VOCAB - 1) for _ in range(12)] for _ in range(3)]
    aborted: set[str] = set()
    for i in range(40):
        req = make_request(f"s{i}", _random_prompt(rng, prefixes, max_model_len), rng.randint(1, 12))
        req.priority = rng.randint(0, 3)
        core.add(req)
        for _ in range(rng.randint(0, 3)):
            core.step()
        if core.live and rng.random() < 0.3:
            victims = rng.sample(sorted(core.live), k=min(len(core.live), rng.randint(1, 3)))
            aborted |= {r.request_id for r in core.abort(victims)}
    core.run()
    assert core.kv.num_free_blocks == core.kv.num_usable_blocks
    assert all(core.kv.ref_count(b) == 0 for b in range(core.kv.num_blocks))
    assert not core.scheduler.has_unfinished()
    assert core.scheduler.num_running == core.scheduler.num_waiting == 0
    core.check_outputs()
    for r in core.done:
        if r.request_id not in aborted and r.finish_reason is FinishReason.LENGTH:
            full = min(r.sampling_params.max_tokens or 10**9, max_model_len - r.num_prompt_tokens)
            pool_tokens = core.kv.num_usable_blocks * core.kv.block_size
            assert len(r.output_token_ids) == full or r.num_tokens > pool_tokens


class SchedulerStorm(RuleBasedStateMachine):
    """Random interleavings of add / step / abort / finish under a tiny pool; invariants after every rule."""

    def __init__(self) -> None:
        super().__init__()
        self.core = FakeCore.build(
            7, block_size=2, max_model_len=20, max_num_seqs=4, max_num_batched_tokens=6, policy="priority"
        )
        self.n = 0

    @rule(
        prefix=st.sampled_from([[], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [9, 9, 9]]),
        tail=st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=5),
        max_tokens=st.integers(1, 6),
        priority=st.integers(0, 2),
    )
    def add(self, prefix: list[int], tail: list[int], max_tokens: int, priority: int) -> None:
        self.n += 1
        self.core.add(make_request(f"h{self.n}", prefix + tail, max_tokens, priority))

    @rule()
    def step(self) -> None:
        self.core.step()

    @precondition(lambda self: bool(self.core.live))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.core.live)))
        assert [r.request_id for r in self.core.abort([rid])] == [rid]

    @precondition(lambda self: any(r.status is RequestStatus.RUNNING for r in self.core.live.values()))
    @rule(data=st.data())
    def finish_running(self, data: st.DataObject) -> None:
        running = sorted(r for r, q in self.core.live.items() if q.status is RequestStatus.RUNNING)
        req = self.core.live[data.draw(st.sampled_from(running))]
        self.core.scheduler.finish_request(req, FinishReason.STOP, stop_reason=7)
        assert req.stop_reason == 7
        self.core._retire(req)

    @invariant()
    def blocks_conserved(self) -> None:
        self.core.check_blocks()

    def teardown(self) -> None:
        self.core.run()
        assert self.core.kv.num_free_blocks == self.core.kv.num_usable_blocks
        assert all(self.core.kv.ref_count(b) == 0 for b in range(self.core.kv.num_blocks))
        self.core.check_outputs()


TestSchedulerStorm = SchedulerStorm.TestCase
TestSchedulerStorm.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
