"""EngineCore: the step loop — schedule, execute, sample, emit. It owns no asyncio and no threads; AsyncEngine
and LLM drive it. A failure inside one request fails that request; the engine goes on serving the others."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from openautoglm.config.settings import EngineConfig, ModelConfig
from openautoglm.engine.attention.selector import select_backend
from openautoglm.engine.input_processor import InputProcessor, ProcessedRequest
from openautoglm.engine.kv_cache import KVCacheManager
from openautoglm.engine.loader import load_model
from openautoglm.engine.memory import step_reserve_bytes
from openautoglm.engine.parallel.workers import TensorParallelError, WorkerGroup
from openautoglm.engine.platform import configure_launches, dtype_name
from openautoglm.engine.request import PLACEHOLDER, Request
from openautoglm.engine.runner import ModelRunner, kv_cache_budget_bytes, kv_cache_bytes_per_block
from openautoglm.engine.sampling import SampledLogprobs, Sampler, SamplingPlan
from openautoglm.engine.scheduler import Scheduler
from openautoglm.engine.stats import EngineStats
from openautoglm.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from openautoglm.protocol.errors import ConfigError, InvalidRequestError
from openautoglm.protocol.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob, Usage

logger = logging.getLogger(__name__)

GiB = 1 << 30
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device is {spec!r}, but this PyTorch build sees no CUDA device")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[spec]


@dataclass(slots=True)
class _Group:
    """One user request: its n sequences and what has been reported of it."""

    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Request]
    num_unfinished: int
    first_sent: bool = False
    error: str | None = None


@dataclass(slots=True)
class _SeqState:
    group: _Group
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]
    max_tokens: int
    want_logprobs: bool


@dataclass(slots=True)
class _Sampled:
    """A step's sampled tokens, reported during the next step's GPU work. Either known on the host
    (``tokens``), or, under async scheduling, still on the device (``device``, being copied to ``host``
    behind the ``copied`` event) with a placeholder at the end of each request's outputs (``rows``)."""

    requests: list[Request]
    tokens: list[int] | None = None
    logprobs: list[SampledLogprobs | None] | None = None
    device: torch.Tensor | None = None
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None


@dataclass(slots=True)
class _StepOutputs:
    by_group: dict[str, list[CompletionOutput]] = field(default_factory=dict)

    def add(self, group: _Group, out: CompletionOutput) -> None:
        self.by_group.setdefault(group.request_id, []).append(out)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mcfg = config.model
        self.device = resolve_device(mcfg.device)
        self.dtype = resolve_dtype(mcfg.dtype, self.device)
        torch.manual_seed(mcfg.seed)
        # Tensor-parallel ranks 1..N-1 run in their own processes; this one is rank 0.
        self.workers = WorkerGroup.start(config, self.device, self.dtype) if config.tensor_parallel_size > 1 else None
        loaded = load_model(mcfg, self.device, self.dtype, self.workers.tp if self.workers else None)
        self.arch = loaded.arch
        self.checkpoint_path = loaded.path
        self.tokenizer = Tokenizer.from_pretrained(mcfg.tokenizer or loaded.path)
        self.model_name = served_model_name(mcfg)
        self.max_model_len = self._max_model_len(mcfg)
        block_size = config.cache.block_size
        num_blocks = self._num_blocks(block_size)
        if self.workers is not None:
            num_blocks = self.workers.agree_num_blocks(num_blocks)
        self.kv_cache = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, self.max_model_len)
        # Async scheduling: step N+1 is launched before step N's tokens are read (greedy steps; see _defer).
        # Benchmarks switch it off between requests to time the synchronous loop on the same engine.
        async_default = self.device.type == "cuda"
        self.async_scheduling = async_default if config.async_scheduling is None else config.async_scheduling
        configure_launches(config.programmatic_launch, self.device)
        backend = select_backend(config, self.device, self.dtype)
        self.runner = ModelRunner(
            loaded.model, self.arch, backend, num_blocks, block_size, self.device, self.dtype,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_model_len=self.max_model_len, workers=self.workers,
            persistent_inputs=True if self.async_scheduling else None,
        )  # fmt: skip
        if self.device.type == "cuda" and backend.name == "triton" and not config.enforce_eager:
            self.runner.capture_graphs(min(config.cuda_graph_max_batch, config.scheduler.max_num_seqs))
        self.sampler = Sampler(self.arch.vocab_size)
        self.input_processor = InputProcessor(
            self.tokenizer,
            config.scheduler,
            self.max_model_len,
            self.arch.vocab_size,
            self.kv_cache.num_usable_blocks * block_size,
            stop_token_ids=frozenset(self.tokenizer.eos_token_ids) | frozenset(self.arch.eos_token_ids),
        )
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.arch.eos_token_ids)
        self._groups: dict[str, _Group] = {}
        self._seqs: dict[str, _SeqState] = {}
        # On a GPU a step's sampled tokens are detokenized and reported during the next step's GPU work.
        self._overlap = self.device.type == "cuda" or self.async_scheduling
        self._sampled: _Sampled | None = None
        self.num_deferred_steps = 0  # steps whose tokens were read back during the next step (async scheduling)
        # Pinned host buffers the deferred tokens are copied into, used in turn (one step's may still be read).
        pinned = self.device.type == "cuda"
        self._token_hosts = [
            torch.empty(config.scheduler.max_num_seqs, dtype=torch.long, pin_memory=pinned) for _ in range(2)
        ]
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._num_steps = 0
        logger.info(
            "Open-AutoGLM engine ready: %s (%s) on %s/%s, max_model_len %d, %d KV blocks of %d tokens, %s attention",
            self.model_name, self.arch.architecture, self.device, dtype_name(self.dtype),
            self.max_model_len, num_blocks, block_size, backend.name,
        )  # fmt: skip

    # ---- set-up -------------------------------------------------------------------------------------------

    def _max_model_len(self, mcfg: ModelConfig) -> int:
        limit = self.arch.max_position_embeddings
        if mcfg.max_model_len is None:
            return limit
        if mcfg.max_model_len > limit:
            raise ConfigError(
                f"model.max_model_len ({mcfg.max_model_len}) exceeds the checkpoint's max_position_embeddings "
                f"({limit}); set it to at most {limit}"
            )
        return mcfg.max_model_len

    def _num_blocks(self, block_size: int) -> int:
        ccfg = self.config.cache
        if ccfg.num_blocks is not None:
            return ccfg.num_blocks
        per_block = kv_cache_bytes_per_block(self.arch, block_size, self.dtype, self.config.tensor_parallel_size)
        budget = ccfg.kv_cache_memory_bytes
        if budget is None and self.device.type == "cuda":
            budget = kv_cache_budget_bytes(self.device, ccfg.gpu_memory_utilization) - self._step_reserve()
        elif budget is None:
            # On CPU, never reserve more than the sequences could ever use at once (twice, for prefix reuse).
            useful = 2 * self.config.scheduler.max_num_seqs * math.ceil(self.max_model_len / block_size)
            budget = min(GiB, useful * per_block)
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise ConfigError(
                f"the KV cache budget ({budget} bytes) holds {num_blocks} blocks of {per_block} bytes; raise "
                "cache.kv_cache_memory_bytes or cache.gpu_memory_utilization, or lower cache.block_size"
            )
        return num_blocks

    def _step_reserve(self) -> int:
        """GPU memory kept out of the KV budget for the steps themselves (largest step, decode graphs)."""
        cfg = self.config
        graph_batch = 0
        if not cfg.enforce_eager:
            graph_batch = min(cfg.cuda_graph_max_batch, cfg.scheduler.max_num_seqs)
        return step_reserve_bytes(
            self.arch, dtype_name(self.dtype), cfg.scheduler.max_num_batched_tokens,
            cfg.scheduler.max_num_seqs, graph_batch, cfg.tensor_parallel_size,
        )  # fmt: skip

    # ---- requests -----------------------------------------------------------------------------------------

    def add_request(self, processed: ProcessedRequest) -> None:
        rid = processed.request_id
        if rid in self._groups:
            raise InvalidRequestError(f"request id {rid!r} is already in flight", param="request_id")
        params = processed.sampling
        group = _Group(rid, processed.prompt_token_ids, [], params.n)
        for index in range(params.n):
            seq = Request(
                request_id=rid if params.n == 1 else f"{rid}#{index}",
                prompt_token_ids=processed.prompt_token_ids,
                sampling_params=params,
                eos_token_ids=self.eos_token_ids,
                priority=processed.priority,
                parent_id=rid,
                index=index,
                generator=_generator(params.seed, index, self.device),
                logits_processors=[f()] if (f := processed.logits_processor_factory) is not None else [],
            )
            detok = IncrementalDetokenizer(
                self.tokenizer,
                processed.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            self._seqs[seq.request_id] = _SeqState(
                group, detok, frozenset(params.stop_token_ids), params.max_tokens or 1, params.logprobs is not None
            )
            group.seqs.append(seq)
        self._groups[rid] = group
        self._prompt_tokens += len(processed.prompt_token_ids)
        for seq in group.seqs:
            self.scheduler.add_request(seq)

    def abort(self, request_ids: Iterable[str]) -> list[RequestOutput]:
        sampled = _StepOutputs()
        self._report_sampled(sampled)  # what was sampled before the abort is reported first, in its own chunk
        earlier = self._collect(sampled)
        out = _StepOutputs()
        seq_ids = [s.request_id for rid in request_ids if (g := self._groups.get(rid)) for s in g.seqs]
        for seq in self.scheduler.abort_requests(seq_ids):
            self._finish(seq, FinishReason.ABORT, None, "", out)
        return earlier + self._collect(out)

    def has_unfinished(self) -> bool:
        return bool(self._groups)

    def shutdown(self) -> None:
        """Release what outlives a step loop: the tensor-parallel worker processes (idempotent)."""
        self.runner.shutdown()

    # ---- the step -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self._overlap:
            return self._step_overlapped()
        out = _StepOutputs()
        launched = self._launch(out)
        if launched is not None and launched[0]:
            for req, token, lp in self._sample(launched[1], launched[0], out):
                self._append_token(req, token, lp, out)
        return self._collect(out)

    def _launch(
        self, out: _StepOutputs, pending: torch.Tensor | None = None
    ) -> tuple[list[Request], torch.Tensor] | None:
        """Schedule and run the model: the requests that sample now and their logits, or None when nothing ran.
        What the scheduler finished is reported; a model fault fails this step's requests, never the engine.
        ``pending``: the previous step's tokens still on the device (async scheduling)."""
        sched = self.scheduler.schedule()
        self._num_steps += 1
        for seq in sched.finished_by_scheduler:
            self._finish(seq, seq.finish_reason or FinishReason.LENGTH, None, "", out, notify_scheduler=False)
        if not sched.scheduled:
            return None
        try:
            return self.runner.execute(sched.scheduled, pending)
        except TensorParallelError:
            raise  # a lost rank fails every later step too: the engine stops
        except Exception as exc:  # one step's requests fail; the loop goes on
            logger.exception("Open-AutoGLM engine: model step failed; failing its %d requests", len(sched.scheduled))
            for s in sched.scheduled:
                self._fail(s.request, exc, out)
            return None

    def _sample(
        self, logits: torch.Tensor, reqs: list[Request], out: _StepOutputs, plan: SamplingPlan | None = None
    ) -> list[tuple[Request, int, SampledLogprobs | None]]:
        try:
            res = self.sampler.sample(logits, reqs, plan)
            return list(zip(reqs, res.token_ids, res.logprobs, strict=True))
        except Exception:  # noqa: BLE001 — find the faulty request(s) row by row; the others still get a token
            logger.warning("Open-AutoGLM engine: batched sampling failed; isolating the faulty request")
        results = []
        for i, req in enumerate(reqs):
            try:
                res = self.sampler.sample(logits[i : i + 1], [req])
            except Exception as exc:  # noqa: BLE001 — a logits processor or parameter fault is this request's
                self._fail(req, exc, out)
                continue
            results.append((req, res.token_ids[0], res.logprobs[0]))
        return results

    def _step_overlapped(self) -> list[RequestOutput]:
        """The step with its CPU tail overlapped: schedule, launch the model, then (while the GPU computes)
        detokenize and report the previous step's tokens, then sample. A request that a stop condition ends at
        the previous token has already been scheduled once more; the token computed for it is dropped (its
        blocks are freed while this step may still write them; the next owner's writes are queued behind).

        Async scheduling: a step whose rows all sample on the device (``Sampler.sample_on_device``) is not read
        back here: its requests get a placeholder token, the next step is launched with the placeholders'
        ids taken from the device, and the tokens are read (long copied by then) during that next step."""
        out = _StepOutputs()
        previous, self._sampled = self._sampled, None
        launched = self._launch(out, previous.device if previous is not None else None)
        reqs, logits = launched if launched is not None else ([], None)
        plan = self.sampler.plan(reqs)  # once per step: both samplers take it
        tokens = self._sample_on_device(logits, reqs, plan) if self.async_scheduling and reqs else None
        self._report(previous, out)
        if tokens is not None:
            self._sampled = self._defer(reqs, tokens)
        elif logits is not None and reqs:
            kept = [
                (req, token, lp)
                for req, token, lp in self._sample(logits, reqs, out, plan)
                if req.request_id in self._seqs and not req.is_finished
            ]
            for req, token, _ in kept:
                self._accept(req, token)
                self._finish_early(req, token)
            self._sampled = _Sampled([r for r, _, _ in kept], [t for _, t, _ in kept], [lp for _, _, lp in kept])
        return self._collect(out)

    def _sample_on_device(self, logits: torch.Tensor, reqs: list[Request], plan: SamplingPlan) -> torch.Tensor | None:
        try:
            return self.sampler.sample_on_device(logits, reqs, plan)
        except Exception:  # noqa: BLE001 — the host sampler runs the step and isolates the faulty request
            logger.warning("Open-AutoGLM engine: device sampling failed; sampling this step on the host")
            return None

    def _defer(self, reqs: list[Request], tokens: torch.Tensor) -> _Sampled:
        """Start copying the step's tokens to the host and give each live request a placeholder for its token.
        Lengths end a request now (no token value needed); EOS and stop ids when the token is read."""
        self.num_deferred_steps += 1
        host = self._token_hosts[0][: len(reqs)]
        self._token_hosts.reverse()
        host.copy_(tokens, non_blocking=True)
        copied = None
        if tokens.is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        live = []
        for row, req in enumerate(reqs):
            if req.request_id in self._seqs and not req.is_finished:
                req.output_token_ids.append(PLACEHOLDER)
                req.pending_row = row
                self._generation_tokens += 1
                live.append(req)
                self._finish_early(req, PLACEHOLDER)
        return _Sampled(live, device=tokens, host=host, copied=copied)

    def _report(self, sampled: _Sampled | None, out: _StepOutputs) -> None:
        """Report a step's sampled tokens; deferred ones are read first and replace their placeholders."""
        if sampled is None:
            return
        if sampled.tokens is None:
            assert sampled.host is not None
            if sampled.copied is not None:
                sampled.copied.synchronize()  # copied during the step launched since: no wait in practice
            values = sampled.host.tolist()
            tokens = []
            now = time.monotonic()
            for req in sampled.requests:
                token = values[req.pending_row]
                req.output_token_ids[-1] = token
                req.pending_row = -1
                if req.first_token_time is None:
                    req.first_token_time = now
                tokens.append(token)
            sampled.tokens = tokens
        lps = sampled.logprobs or [None] * len(sampled.requests)
        for req, token, lp in zip(sampled.requests, sampled.tokens, lps, strict=True):
            if req.request_id in self._seqs:  # else aborted or failed meanwhile
                self._emit(req, token, lp, out)

    def _report_sampled(self, out: _StepOutputs) -> None:
        sampled, self._sampled = self._sampled, None
        self._report(sampled, out)

    def _finish_early(self, req: Request, token: int) -> None:
        """Stop conditions that need no text (stop ids, EOS, lengths) end the request in the scheduler now, so
        it is not scheduled again; its output is reported with the token, next step."""
        reason, stop = self._stop_check(req, self._seqs[req.request_id], token, None)
        if reason is not None:
            self.scheduler.finish_request(req, reason, stop)

    def _accept(self, req: Request, token: int) -> None:
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        self._generation_tokens += 1

    def _append_token(self, req: Request, token: int, lp: SampledLogprobs | None, out: _StepOutputs) -> None:
        self._accept(req, token)
        self._emit(req, token, lp, out)

    def _emit(self, req: Request, token: int, lp: SampledLogprobs | None, out: _StepOutputs) -> None:
        """Detokenize an accepted token, check the stop conditions and report it."""
        state = self._seqs[req.request_id]
        try:
            delta = state.detok.step([token])
            logprobs = [self._logprob(lp)] if state.want_logprobs and lp is not None else None
        except Exception as exc:  # noqa: BLE001 — e.g. a tokenizer fault on this request's text
            self._fail(req, exc, out)
            return
        reason, stop = self._stop_check(req, state, token, delta.stop_str)
        if reason is not None:
            if req.is_finished:  # ended early by the same token; a stop string takes precedence
                req.finish_reason, req.stop_reason = reason, stop
            text = delta.text if delta.stop_str is not None else delta.text + state.detok.flush()
            self._finish(req, reason, stop, text, out, token_ids=[token], logprobs=logprobs)
            return
        out.add(
            state.group,
            CompletionOutput(req.index, delta.text, [token], logprobs, None, None, len(req.output_token_ids)),
        )

    def _stop_check(
        self, req: Request, state: _SeqState, token: int, stop_str: str | None
    ) -> tuple[FinishReason | None, str | int | None]:
        params = req.sampling_params
        num_out = len(req.output_token_ids)
        if stop_str is not None:
            return FinishReason.STOP, stop_str
        if token in state.stop_ids and num_out >= params.min_tokens:
            return FinishReason.STOP, token
        if token in req.eos_token_ids and not params.ignore_eos and num_out >= params.min_tokens:
            return FinishReason.STOP, None
        if num_out >= state.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _logprob(self, lp: SampledLogprobs) -> TokenLogprob:
        text = self.tokenizer.token_text
        return TokenLogprob(lp.token_id, text(lp.token_id), lp.logprob, [(t, text(t), v) for t, v in lp.top])

    # ---- finishing ----------------------------------------------------------------------------------------

    def _fail(self, req: Request, exc: BaseException, out: _StepOutputs) -> None:
        logger.error("Open-AutoGLM engine: request %s failed: %s: %s", req.request_id, type(exc).__name__, exc)
        state = self._seqs.get(req.request_id)
        if state is not None:
            state.group.error = f"{type(exc).__name__}: {exc}"
        self._finish(req, FinishReason.ERROR, None, "", out)

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        stop: str | int | None,
        text: str,
        out: _StepOutputs,
        *,
        token_ids: list[int] | None = None,
        logprobs: list[TokenLogprob] | None = None,
        notify_scheduler: bool = True,
    ) -> None:
        state = self._seqs.pop(req.request_id, None)
        if state is None:  # already finished (e.g. aborted and failed in the same step)
            return
        if notify_scheduler and not req.is_finished:
            self.scheduler.finish_request(req, reason, stop)
        state.group.num_unfinished -= 1
        out.add(
            state.group,
            CompletionOutput(req.index, text, token_ids or [], logprobs, reason, stop, len(req.output_token_ids)),
        )

    def _collect(self, out: _StepOutputs) -> list[RequestOutput]:
        results = []
        for rid, outputs in out.by_group.items():
            group = self._groups[rid]
            finished = group.num_unfinished == 0
            results.append(
                RequestOutput(
                    request_id=rid,
                    outputs=outputs,
                    prompt_token_ids=None if group.first_sent else group.prompt_token_ids,
                    finished=finished,
                    usage=self._usage(group) if finished else None,
                    error=group.error if finished else None,
                    queue_time=None if group.first_sent else _queue_time(group),
                )
            )
            group.first_sent = True
            if finished:
                del self._groups[rid]
        return results

    @staticmethod
    def _usage(group: _Group) -> Usage:
        return Usage(
            prompt_tokens=len(group.prompt_token_ids),
            completion_tokens=sum(len(s.output_token_ids) for s in group.seqs),
            cached_tokens=group.seqs[0].num_cached_tokens,
        )

    def stats(self, step_loop_alive: bool = True) -> EngineStats:
        kv = self.kv_cache
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_blocks=kv.num_blocks,
            num_free_blocks=kv.num_free_blocks,
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries,
            prefix_cache_hits=kv.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            num_steps=self._num_steps,
            step_loop_alive=step_loop_alive,
        )


def served_model_name(mcfg: ModelConfig) -> str:
    return mcfg.served_model_name or mcfg.model


def _generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    # Each of the n sequences gets its own stream; sequence 0 uses the seed as given.
    gen.manual_seed((seed + index * 0x9E3779B97F4A7C15) % (1 << 64))
    return gen


def _queue_time(group: _Group) -> float | None:
    """Seconds the request waited before its first sequence was scheduled (None if it never was)."""
    times = [s.first_scheduled_time - s.arrival_time for s in group.seqs if s.first_scheduled_time is not None]
    return min(times) if times else None
