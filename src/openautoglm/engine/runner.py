"""ModelRunner: turns a scheduled step into batch tensors and attention metadata, runs the model, and returns the
logits of the sequences that sample this step. It owns the KV cache tensors; it decides nothing.

On the CPU every step builds fresh tensors (``build_metadata``). On a GPU the step's inputs are written into
pinned host buffers (two sets, used in turn, so filling one never races the copy out of the other) and go to
persistent device buffers in one asynchronous copy; nothing here waits for the GPU. Decode-only steps of up
to ``cuda_graph_max_batch`` sequences replay a CUDA graph captured for the next larger bucket size; the padding
rows compute a dummy token against the reserved null block and are dropped.

With tensor parallelism this runner is rank 0's: each step it sends the step's shape (``_Step``, a few numbers)
to the worker ranks, broadcasts its device input buffer to theirs, and every rank runs the same forward pass
(the same CUDA graph) on its shard; the logits are gathered on every rank, and only rank 0 samples. A worker's
runner is this class too, driven by ``follow``.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from openautoglm.engine.attention.base import AttentionBackend, AttentionMetadata, ForwardContext
from openautoglm.engine.attention.reference import build_metadata
from openautoglm.engine.kv_cache import NULL_BLOCK_ID
from openautoglm.engine.models.base import CausalLM, ModelArchConfig
from openautoglm.engine.parallel import TensorParallel, kv_heads_per_rank
from openautoglm.engine.platform import launch_scope
from openautoglm.engine.request import Request
from openautoglm.engine.scheduler import ScheduledRequest
from openautoglm.protocol.errors import InternalError

if TYPE_CHECKING:
    from openautoglm.engine.parallel.workers import WorkerGroup

logger = logging.getLogger(__name__)


def kv_cache_bytes_per_block(arch: ModelArchConfig, block_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of one KV block on one rank (a rank holds its share of the KV heads, at least one)."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv_heads = kv_heads_per_rank(arch.num_key_value_heads, tp_size)
    return 2 * block_size * kv_heads * arch.head_dim * elem * arch.num_hidden_layers


def kv_cache_budget_bytes(device: torch.device, gpu_memory_utilization: float) -> int:
    """What is left for the KV cache on a GPU once everything allocated so far (the model) is counted, within
    ``gpu_memory_utilization`` of its memory."""
    free, total = torch.cuda.mem_get_info(device)
    return int(total * gpu_memory_utilization) - (total - free)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Decode batch sizes captured as CUDA graphs: 1, 2, 4, 8, then every multiple of 16, up to max_batch."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return [*sizes, max_batch]


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        arch: ModelArchConfig,
        backend: AttentionBackend,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        *,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
        persistent_inputs: bool | None = None,
        tp: TensorParallel | None = None,
        workers: WorkerGroup | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.tp = workers.tp if workers is not None else tp or TensorParallel()
        self.workers = workers  # rank 0 of several: the other ranks, which follow every step
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if workers is not None:
            # Also when the runner is collected or the interpreter exits: graphs go first (see close()).
            self._release = weakref.finalize(self, _release_parallel, self._graphs, workers)
            workers.send(
                ("runner", {
                    "num_blocks": num_blocks, "block_size": block_size, "max_num_seqs": max_num_seqs,
                    "max_num_batched_tokens": max_num_batched_tokens, "max_model_len": max_model_len,
                    "backend": backend.name,
                })
            )  # fmt: skip
        kv_heads = kv_heads_per_rank(arch.num_key_value_heads, self.tp.size)
        shape = (2, num_blocks, block_size, kv_heads, arch.head_dim)
        # Zeroed, not empty: masked-out slots still enter the reference backend's matmuls, and garbage NaNs there
        # would poison the sums even with zero weight.
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(arch.num_hidden_layers)]
        self._inputs: _DeviceInputs | None = None
        self.num_graph_replays = 0
        self.use_graphs = True  # benchmarks switch it off to time eager decode on the same engine
        if persistent_inputs is None:
            # Ranks share a step's inputs by broadcasting the persistent buffer, on the CPU too.
            persistent_inputs = device.type == "cuda" or self.tp.size > 1
        if persistent_inputs:
            max_len = max_model_len or arch.max_position_embeddings
            max_tokens = max(max_num_batched_tokens, max_num_seqs)
            self._inputs = _DeviceInputs(max_tokens, max_num_seqs, math.ceil(max_len / block_size), device)

    @property
    def graph_batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    @torch.inference_mode()
    def execute(
        self, scheduled: list[ScheduledRequest], pending_tokens: torch.Tensor | None = None
    ) -> tuple[list[Request], torch.Tensor]:
        """Run one step; return the requests that sample now and their logits rows [len, vocab] (float32).

        ``pending_tokens``: the previous step's sampled tokens, still on the device (async scheduling). A request
        whose last token is a placeholder (``Request.pending_row``) takes its input id from that row, copied on
        the device before the forward pass; the host never waits for it. (Only persistent inputs take them: the
        core turns those on with async scheduling.)"""
        if self._inputs is not None:
            if self.workers is not None:
                return self.workers.guard(self._execute_device, scheduled, self._inputs, pending_tokens)
            return self._execute_device(scheduled, self._inputs, pending_tokens)
        input_ids: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        samplers: list[Request] = []
        sample_rows: list[int] = []
        for s in scheduled:
            req, start, n = s.request, s.start, s.num_new_tokens
            input_ids.extend(_new_token_ids(req, start, n))
            query_lens.append(n)
            context_lens.append(start)
            block_tables.append(s.block_ids)
            if start + n == req.num_tokens:
                samplers.append(req)
                sample_rows.append(len(input_ids) - 1)
        metadata = build_metadata(query_lens, context_lens, block_tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        positions = self._positions(query_lens, context_lens, len(input_ids))
        ctx = ForwardContext(metadata=metadata, kv_caches=self.kv_caches, backend=self.backend)
        hidden = self.model.forward(ids, positions, ctx)
        if not samplers:
            return samplers, hidden.new_empty((0, 0), dtype=torch.float32)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return samplers, self.model.compute_logits(hidden.index_select(0, rows))

    def _positions(self, query_lens: list[int], context_lens: list[int], num_tokens: int) -> torch.Tensor:
        if num_tokens == len(query_lens):  # all decodes: one position each
            return torch.tensor(context_lens, dtype=torch.long, device=self.device)
        q = torch.tensor(query_lens, dtype=torch.long)
        starts = torch.cumsum(q, 0) - q  # offset of each sequence's first new token in the batch
        shift = torch.repeat_interleave(torch.tensor(context_lens, dtype=torch.long) - starts, q)
        return (torch.arange(num_tokens, dtype=torch.long) + shift).to(self.device)

    # ---- the GPU path (and every rank of a tensor-parallel group) ------------------------------------------

    def _execute_device(
        self, scheduled: list[ScheduledRequest], inputs: _DeviceInputs, pending_tokens: torch.Tensor | None
    ) -> tuple[list[Request], torch.Tensor]:
        step, samplers = inputs.fill(scheduled, self.block_size, self._graph_size(scheduled))
        if step.num_pending:
            if pending_tokens is None:
                raise InternalError("runner: a step holds placeholder tokens but no pending tokens were given")
            inputs.take_pending(pending_tokens, step.num_pending)
        if self.workers is not None:
            self.workers.send(("step", step))
            inputs.share(self.tp, step.nbytes)
        return samplers, self._run(step, inputs)

    @torch.inference_mode()
    def follow(self, step: _Step) -> None:
        """A worker rank's share of rank 0's step: take its inputs, run the same forward pass."""
        assert self._inputs is not None
        self._inputs.share(self.tp, step.nbytes)
        self._run(step, self._inputs)

    def _run(self, step: _Step, inputs: _DeviceInputs) -> torch.Tensor:
        """The step's forward pass (its graph, or eagerly); the logits of its sampling rows."""
        ns = step.num_samples
        if step.graph_bs:
            graph, logits = self._graphs[step.graph_bs]
            graph.replay()
            self.num_graph_replays += 1
            if not ns or not self.tp.is_driver:
                return logits.new_empty((0, 0))
            return logits[:ns] if step.rows_are_prefix else logits.index_select(0, inputs.sample_rows[:ns])
        ctx = ForwardContext(metadata=inputs.metadata(step), kv_caches=self.kv_caches, backend=self.backend)
        t = step.num_tokens
        hidden = self.model.forward(inputs.ids[:t], inputs.positions[:t], ctx)
        if not ns:
            return hidden.new_empty((0, 0), dtype=torch.float32)
        if not step.rows_are_prefix:
            hidden = hidden.index_select(0, inputs.sample_rows[:ns])
        return self.model.compute_logits(hidden[:ns])

    def _graph_size(self, scheduled: list[ScheduledRequest]) -> int:
        """The captured batch size this step replays, or 0 to run eagerly."""
        n = len(scheduled)
        if (
            not self.use_graphs
            or not self._graphs
            or n > max(self._graphs)
            or any(s.num_new_tokens != 1 for s in scheduled)
        ):
            return 0
        return next(b for b in sorted(self._graphs) if b >= n)

    @torch.inference_mode()
    def capture_graphs(self, max_batch: int) -> None:
        """Capture decode steps of every bucket size up to ``max_batch`` (largest first, sharing one pool).
        Every rank of a tensor-parallel group captures the same graphs, collectives included, in lockstep."""
        if self.workers is not None:
            self.workers.send(("capture", max_batch))
            self.workers.guard(self._capture, max_batch)
        else:
            self._capture(max_batch)

    def _capture(self, max_batch: int) -> None:
        inputs = self._inputs
        if inputs is None or self.device.type != "cuda":
            raise InternalError("CUDA graphs need a CUDA device; this runner runs on " + str(self.device))
        sizes = graph_batch_sizes(min(max_batch, inputs.max_seqs))
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        # NCCL's watchdog thread queries events while a rank captures: only this thread's calls are checked.
        mode = "thread_local" if self.tp.size > 1 else "global"
        inputs.fill_dummy_decode(max(sizes))
        # Graphs only: an eager launch with the attribute costs the host more, and eager one-token steps are
        # bound by the host (measured on an H100, GLM-4-9B shapes: 22.6 -> 34.4 ms a step with it).
        with launch_scope(self.device):
            self._capture_sizes(sizes, pool, mode)
        # Eager one-token steps (a prompt whose blocks are all cached) run the kernels without that launch
        # attribute, compiled apart: compiled here, not on a user's first such request (0.5-0.9 s on an H100).
        self._decode_logits(1, ForwardContext(inputs.decode_metadata(1), self.kv_caches, self.backend))
        # So does the prefill attention's variant for 2-16 new tokens (a short prompt, or a prompt's tail after
        # its cached blocks): compiled here on two tokens against the null block, not on a user's request.
        md = build_metadata([2], [0], [[NULL_BLOCK_ID]], self.block_size, self.device)
        ctx = ForwardContext(md, self.kv_caches, self.backend)
        self.model.compute_logits(self.model.forward(inputs.ids[:2], inputs.positions[:2], ctx)[-1:])
        torch.cuda.synchronize(self.device)
        logger.info(
            "Open-AutoGLM: captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
            len(sizes), max(sizes), time.perf_counter() - start,
        )  # fmt: skip

    def _capture_sizes(self, sizes: list[int], pool: Any, mode: str) -> None:
        inputs = self._inputs
        assert inputs is not None
        for bs in reversed(sizes):
            md = inputs.decode_metadata(bs)
            ctx = ForwardContext(metadata=md, kv_caches=self.kv_caches, backend=self.backend)
            for _ in range(2):  # compile the kernels and settle the allocator outside the capture
                self._decode_logits(bs, ctx)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                logits = self._decode_logits(bs, ctx)
            self._graphs[bs] = (graph, logits)

    def dummy_decode_graph(self, batch: int) -> torch.cuda.CUDAGraph | LockstepGraph | None:
        """The graph that a decode batch of ``batch`` replays, its inputs set to dummy decodes against the null
        block (benchmarks time its replays); None when no captured graph covers that batch. With tensor
        parallelism, each replay replays the worker ranks' graphs too."""
        size = next((b for b in sorted(self._graphs) if b >= batch), None)
        if size is None or self._inputs is None:
            return None
        if self.workers is not None:
            self.workers.send(("dummy", size))
        self._inputs.fill_dummy_decode(size)
        graph = self._graphs[size][0]
        return graph if self.workers is None else LockstepGraph(graph, size, self.workers)

    def replay_graph(self, size: int) -> None:
        """A worker rank's share of a benchmark's replay (``LockstepGraph``)."""
        self._graphs[size][0].replay()

    def _decode_logits(self, bs: int, ctx: ForwardContext) -> torch.Tensor:
        inputs = self._inputs
        assert inputs is not None
        hidden = self.model.forward(inputs.ids[:bs], inputs.positions[:bs], ctx)
        return self.model.compute_logits(hidden)

    def shutdown(self) -> None:
        """Stop the worker ranks, if any (idempotent)."""
        if self.workers is not None:
            self._release()


def _release_parallel(graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]], workers: WorkerGroup) -> None:
    """Destroy rank 0's CUDA graphs, then stop the workers and leave the group: NCCL does not release a
    communicator while a graph that captured its kernels lives."""
    for graph, _ in graphs.values():
        graph.reset()
    graphs.clear()
    workers.close()


class LockstepGraph:
    """A captured decode graph whose every replay on rank 0 is matched by the worker ranks' replays."""

    def __init__(self, graph: torch.cuda.CUDAGraph, size: int, workers: WorkerGroup) -> None:
        self.graph, self.size, self.workers = graph, size, workers

    def replay(self) -> None:
        self.workers.send(("replay", self.size))
        self.graph.replay()


def _new_token_ids(req: Request, start: int, n: int) -> list[int]:
    if n == 1:
        return [req.token_id_at(start)]
    if start + n <= req.num_prompt_tokens:
        return req.prompt_token_ids[start : start + n]
    return req.all_token_ids[start : start + n]


class _Step(NamedTuple):
    """One step's shape: what ``fill`` wrote, and (with tensor parallelism) what rank 0 sends the other ranks
    so they can run the same step on the inputs it broadcasts. Plain numbers: it crosses a pipe every step."""

    num_seqs: int
    num_tokens: int
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    query_lens: list[int]
    seq_lens: list[int]
    num_samples: int
    num_pending: int  # input ids that come from the previous step's sampled tokens, on the device
    rows_are_prefix: bool  # the sampling rows are 0..len-1 (every decode samples): no gather needed
    graph_bs: int  # the captured graph this step replays, or 0 to run eagerly
    nbytes: int  # the prefix of the input buffer this step uses


class _Staging:
    """One pinned host buffer, laid out exactly like the device buffer it is copied into."""

    def __init__(self, nbytes: int, n64: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.np64 = self.host[: 8 * n64].view(torch.int64).numpy()
        self.np32 = self.host[8 * n64 :].view(torch.int32).numpy()
        self.copied = torch.cuda.Event() if pinned else None
        self.used = False


class _DeviceInputs:
    """Persistent device buffers for one step's inputs (CUDA graphs read them in place) and their staging.

    One byte buffer, so a step's inputs travel in one copy (and, to the other tensor-parallel ranks, in one
    broadcast): int64 [input ids | positions | slot mapping] of max_tokens each, then [sample rows | pending
    destinations | pending sources] of max_seqs each (async scheduling: input ids that are copied from the
    previous step's sampled tokens on the device); then int32 [query_start_loc] of max_seqs + 1, [seq_lens] of
    max_seqs, then block tables [max_seqs, width].
    """

    def __init__(self, max_tokens: int, max_seqs: int, width: int, device: torch.device) -> None:
        self.max_tokens, self.max_seqs, self.width = max_tokens, max_seqs, width
        t, s = max_tokens, max_seqs
        n64, self._o32_tables = 3 * t + 3 * s, 2 * s + 1
        self._b32 = 8 * n64  # where the int32 part starts
        nbytes = self._b32 + 4 * (self._o32_tables + s * width)
        self.dev = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        dev64, dev32 = self.dev[: self._b32].view(torch.int64), self.dev[self._b32 :].view(torch.int32)
        self.ids, self.positions, self.slots = dev64[:t], dev64[t : 2 * t], dev64[2 * t : 3 * t]
        self.sample_rows = dev64[3 * t : 3 * t + s]
        self.pending_dst, self.pending_src = dev64[3 * t + s : 3 * t + 2 * s], dev64[3 * t + 2 * s : 3 * t + 3 * s]
        self.query_start_loc = dev32[: s + 1]
        self.seq_lens = dev32[s + 1 : 2 * s + 1]
        self.block_tables = dev32[self._o32_tables :].view(s, width)
        self._staging = [_Staging(nbytes, n64, device), _Staging(nbytes, n64, device)]
        self._turn = 0

    def _next_staging(self) -> _Staging:
        st = self._staging[self._turn]
        self._turn ^= 1
        if st.used and st.copied is not None:
            st.copied.synchronize()  # its last copy has long finished in practice: the step read its tokens
        st.used = True
        return st

    def fill(self, scheduled: list[ScheduledRequest], block_size: int, graph_bs: int) -> tuple[_Step, list[Request]]:
        """Write the step's inputs to pinned memory and start the copy; with ``graph_bs``, rows n..graph_bs-1
        become dummy decodes (token 0 at position 0, written to the null block's slot 0)."""
        n = len(scheduled)
        pad_to = graph_bs or n
        if pad_to > self.max_seqs:
            raise InternalError(f"runner: a step of {pad_to} sequences exceeds max_num_seqs ({self.max_seqs})")
        st = self._next_staging()
        t_max, s_max, w = self.max_tokens, self.max_seqs, self.width
        ids, pos, slots = st.np64[:t_max], st.np64[t_max : 2 * t_max], st.np64[2 * t_max : 3 * t_max]
        rows_out = st.np64[3 * t_max : 3 * t_max + s_max]
        pend_dst, pend_src = st.np64[3 * t_max + s_max : 3 * t_max + 2 * s_max], st.np64[3 * t_max + 2 * s_max :]
        num_pending = 0
        qsl, seq_lens = st.np32[: s_max + 1], st.np32[s_max + 1 : 2 * s_max + 1]
        tables = st.np32[self._o32_tables :].reshape(s_max, w)
        query_lens: list[int] = []
        seq_len_list: list[int] = []
        samplers: list[Request] = []
        rows: list[int] = []
        t = 0
        num_decodes = n
        for i, s in enumerate(scheduled):
            req, start, q = s.request, s.start, s.num_new_tokens
            table = s.block_ids
            if len(table) > w:
                raise InternalError(f"runner: sequence {req.request_id} holds {len(table)} blocks, above {w}")
            tables[i, : len(table)] = table
            if q == 1:
                ids[t] = req.token_id_at(start)
                pos[t] = start
                slots[t] = table[start // block_size] * block_size + start % block_size
            else:
                if num_decodes == n:
                    num_decodes = i
                if t + q > t_max:
                    raise InternalError(f"runner: a step of more than {t_max} tokens (max_num_batched_tokens)")
                ids[t : t + q] = _new_token_ids(req, start, q)
                p = np.arange(start, start + q)
                pos[t : t + q] = p
                slots[t : t + q] = tables[i, p // block_size].astype(np.int64) * block_size + p % block_size
            if req.pending_row >= 0 and start + q == req.num_tokens:  # its last input id is still on the device
                pend_dst[num_pending], pend_src[num_pending] = t + q - 1, req.pending_row
                num_pending += 1
            query_lens.append(q)
            seq_len_list.append(start + q)
            seq_lens[i] = start + q
            t += q
            qsl[i + 1] = t
            if start + q == req.num_tokens:
                samplers.append(req)
                rows.append(t - 1)
        qsl[0] = 0
        for i in range(n, pad_to):  # dummy decodes padding a graph batch
            ids[i] = pos[i] = 0
            slots[i] = NULL_BLOCK_ID * block_size
            seq_lens[i] = 1
            tables[i, 0] = NULL_BLOCK_ID
            qsl[i + 1] = i + 1
        rows_out[: len(rows)] = rows
        prefix = rows == list(range(len(rows)))
        nbytes = self._b32 + 4 * (self._o32_tables + max(pad_to, n) * w)
        self.dev[:nbytes].copy_(st.host[:nbytes], non_blocking=True)
        if st.copied is not None:
            st.copied.record()
        step = _Step(
            n, t, num_decodes, max(query_lens, default=1), max(seq_len_list, default=1), query_lens, seq_len_list,
            len(samplers), num_pending, prefix, graph_bs, nbytes,
        )  # fmt: skip
        return step, samplers

    def take_pending(self, tokens: torch.Tensor, num: int) -> None:
        """Copy the previous step's sampled tokens into this step's input ids (the rows ``fill`` recorded)."""
        self.ids.index_copy_(0, self.pending_dst[:num], tokens.index_select(0, self.pending_src[:num]))

    def share(self, tp: TensorParallel, nbytes: int) -> None:
        """Rank 0's inputs into every rank's buffer (the first ``nbytes``, what the step uses)."""
        tp.broadcast(self.dev[:nbytes])

    def metadata(self, step: _Step) -> AttentionMetadata:
        """A fresh metadata object over the persistent buffers (the reference backend keys its plan on it)."""
        n, t = step.num_seqs, step.num_tokens
        return AttentionMetadata(
            num_seqs=n,
            num_tokens=t,
            slot_mapping=self.slots[:t],
            query_start_loc=self.query_start_loc[: n + 1],
            seq_lens=self.seq_lens[:n],
            block_tables=self.block_tables[:n],
            max_query_len=step.max_query_len,
            max_seq_len=step.max_seq_len,
            query_lens_cpu=step.query_lens,
            seq_lens_cpu=step.seq_lens,
            num_decodes=step.num_decodes,
        )

    def fill_dummy_decode(self, bs: int) -> None:
        """Inputs for capturing graphs: bs dummy decodes against the null block."""
        self.fill([], 1, graph_bs=bs)

    def decode_metadata(self, bs: int) -> AttentionMetadata:
        """Metadata a captured decode graph of batch ``bs`` bakes in: the buffers' first bs rows."""
        return AttentionMetadata(
            num_seqs=bs,
            num_tokens=bs,
            slot_mapping=self.slots[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=1,
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[1] * bs,
            num_decodes=bs,
        )
