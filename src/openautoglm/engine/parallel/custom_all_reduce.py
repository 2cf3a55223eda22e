"""One-shot all-reduce for the small tensors of decode steps, over CUDA IPC (NVLink peer access).

A decode step of a GLM model all-reduces 2 x num_layers tensors of a few KiB (80 of 8 KiB for GLM-4-9B at
batch 1). NCCL spends about 20 us on each, measured on two H200s inside a CUDA graph: 1.8 ms a step, more than
the weight reads it saves. This kernel takes a few: every rank writes its tensor straight into a slot of every
peer's receive buffer over NVLink, then reads the peers' slots of its own buffer and sums all parts in float32,
in rank order (so every rank gets the same bits). Each all-reduce of a GLM layer is followed by the residual add
and RMSNorm(s), and the kernel does those too (``add_rms_norm``): one kernel where there were two.

No flags: a slot holds a sentinel (-0.0, bits 0x8000, in bfloat16 and float16) wherever no data has arrived, the
writer sends -0.0 as +0.0, and the reader polls its own memory until no sentinel is left, then puts the
sentinels back. (Profiled on two H200s, batch 1, 80 per step in a CUDA graph: 3.5 us per all-reduce + norms,
against 7.0 us for the earlier design, which staged locally, signalled through flags with system-scope
release/acquire, read the peers' staging over NVLink, and left the norms to a kernel of their own.)

Calls rotate over three sets of slots: a peer may be one call ahead, writing the next set, never further (its
next call needs this rank's next data), and the set a call empties is written again three calls later, after
this rank's next two calls, which follow the kernel that emptied it. A rank that is lost makes the others spin:
the engine sets a host ``abort`` word that the spin reads, and the kernel returns.

It serves the all-reduces captured in CUDA graphs (decode steps); eager ones (prefill, whose tensors are mostly
above ``MAX_BYTES`` anyway) go to NCCL. Set up on every rank together (``create``): buffers from cudaMalloc
filled with sentinels, IPC handles gathered through NCCL, each peer's memory mapped, then a check against
NCCL's all-reduce on random data with a bounded spin. Any failure on any rank, and every rank falls back to
NCCL.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import triton
import triton.language as tl

from openautoglm.engine import pdl
from openautoglm.engine.models.fused_ops import add_norm_epilogue
from openautoglm.engine.parallel.cudart import IPC_HANDLE_BYTES, CudaRuntime

logger = logging.getLogger(__name__)

# Per call: decode batches up to 32 of hidden size 4096 in bfloat16. Measured on two H200s (80 all-reduces in
# a CUDA graph, the earlier flag-based kernel / NCCL): 1 row 0.44 / 2.25 ms, 8 rows 0.74 / 2.12, 32 rows 1.92 /
# 2.16, 64 rows 3.60 / 2.23, 128 rows 6.79 / 2.65: past 32 rows NCCL is faster.
MAX_BYTES = 1 << 18
NUM_BLOCKS = 32  # programs of every call, whatever its size: their call counters stay equal
BLOCK = 512
PHASES = 3  # sets of receive slots, used in turn
MAX_NORM_COLS = 16384  # a row the fused norm holds in one program
SERVICE_SPIN = 2**31 - 1  # in service a wait ends when the peer's data arrives or the engine aborts
CHECK_SPIN = 2**24 + 1  # the start-up check gives up after this many polls (seconds)
DTYPES = (torch.bfloat16, torch.float16)  # 16-bit values: the sentinel is one bit pattern
_SENTINEL = tl.constexpr(-32768)  # 0x8000 as int16: -0.0 in both
_PHASES = tl.constexpr(PHASES)


@triton.jit
def _await(src, m, abort, status, max_spin, BLOCK: tl.constexpr):
    """The values at ``src`` (int16 bits) once no lane holds the sentinel; the sentinels are put back."""
    v = tl.load(src, mask=m, other=0, volatile=True)  # past the caches: the peer writes it
    spins = 0
    while (tl.sum((v == _SENTINEL).to(tl.int32), axis=0) > 0) & (spins < max_spin):
        v = tl.load(src, mask=m, other=0, volatile=True)  # past the caches: the peer writes it
        spins += 1
        if spins % 1024 == 0:  # noqa: SIM102 — Triton has no short-circuit `and`: read the host word rarely
            if tl.load(abort, volatile=True) != 0:
                spins = max_spin
    if spins >= max_spin:
        tl.store(status, 1)
    tl.store(src, tl.full([BLOCK], _SENTINEL, tl.int16), mask=m)  # empty again for the call three later
    return v


@triton.jit
def _slot(buffers, p, offset, idx, dtype: tl.constexpr):
    """Pointers to elements ``offset + idx`` of rank ``p``'s receive buffer, as ``dtype``. The buffers are
    cudaMalloc'd and the offsets multiples of 16 elements: said so, for 16-byte vector accesses."""
    base = tl.load(buffers + p).to(tl.pointer_type(dtype)) + offset
    return tl.multiple_of(base + idx, 16)


@triton.jit
def _sum_over_ranks(
    x_ptr, idx, m, buffers, phase, rank, abort, status, max_spin,
    SLOT: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Send ``x[idx]`` to every peer's slot for this rank, then sum every rank's part, float32, rank order."""
    dtype = x_ptr.dtype.element_ty
    bits = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.int16, bitcast=True)
    x = tl.where(bits == _SENTINEL, tl.zeros_like(bits), bits).to(dtype, bitcast=True)  # -0.0 travels as +0.0
    region = phase * (W * SLOT)
    for p in tl.static_range(W):
        if p != rank:
            tl.store(_slot(buffers, p, region + rank * SLOT, idx, dtype), x, mask=m)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p in tl.static_range(W):
        if p == rank:
            acc += x.to(tl.float32)
        else:
            v = _await(_slot(buffers, rank, region + p * SLOT, idx, tl.int16), m, abort, status, max_spin, BLOCK)
            acc += v.to(dtype, bitcast=True).to(tl.float32)
    return acc


@triton.jit(do_not_specialize=["n", "max_spin", "rank", "post_eps", "eps"])  # span: a multiple of 16 (fits_norm)
def _one_shot_all_reduce(
    x_ptr,
    n,
    span,  # program b sums x[b * span : (b + 1) * span]: a row when HAS_NORM
    buffers,  # int64 [W]: every rank's receive buffer [PHASES, W, SLOT], as this process addresses it
    counters,  # int64 [NUM_BLOCKS]: this rank's calls so far, per program
    abort,  # int32 [1], pinned host memory: non-zero once a rank is lost
    status,  # int32 [1]: set to 1 when a wait gave up
    max_spin,
    rank,
    res_ptr,  # HAS_NORM: the residual rows, then out = norm(h), res_out = h = residual + post_norm(sum)
    out_ptr,
    res_out_ptr,
    post_w_ptr,
    w_ptr,
    post_eps,
    eps,
    SLOT: tl.constexpr,  # elements of one rank's slot
    W: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_NORM: tl.constexpr,
    HAS_POST: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    # The counter is the previous call's write: read after the wait (before it, kernels further back may run).
    pdl.begin(PDL)
    e = tl.load(counters + b)
    phase = e % _PHASES
    lo = b * span
    hi = tl.minimum(lo + span, n)
    if lo < hi:  # the same programs have work on every rank: the others send and wait for nothing
        if HAS_NORM:
            cols = tl.arange(0, BLOCK)
            m = cols < span
            idx = lo + cols
            w = tl.load(w_ptr + cols, mask=m, other=0.0)
            post_w = w
            if HAS_POST:
                post_w = tl.load(post_w_ptr + cols, mask=m, other=0.0)
            r = tl.load(res_ptr + idx, mask=m, other=0.0).to(tl.float32)
            acc = _sum_over_ranks(x_ptr, idx, m, buffers, phase, rank, abort, status, max_spin, SLOT, W, BLOCK)
            # Rounded to the model dtype as the all-reduce's output is, then normed as add_rms_norm norms it.
            x = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
            add_norm_epilogue(
                x, r, w, post_w, cols, m, out_ptr + idx, res_out_ptr + idx, span, post_eps, eps, True, HAS_POST
            )
        else:
            for off in range(lo, hi, BLOCK):
                idx = off + tl.arange(0, BLOCK)
                m = idx < hi
                acc = _sum_over_ranks(x_ptr, idx, m, buffers, phase, rank, abort, status, max_spin, SLOT, W, BLOCK)
                tl.store(x_ptr + idx, acc.to(x_ptr.dtype.element_ty), mask=m)
    tl.store(counters + b, e + 1)


@triton.jit
def _fill_sentinels(buffers, rank, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mine = tl.load(buffers + rank).to(tl.pointer_type(tl.int16))
    tl.store(mine + idx, tl.full([BLOCK], _SENTINEL, tl.int16), mask=idx < n)


class CustomAllReduce:
    """This rank's side of the one-shot all-reduce (``create`` builds it on every rank at once)."""

    def __init__(self, rt: CudaRuntime, rank: int, size: int, device: torch.device) -> None:
        self.rt, self.rank, self.size, self.device = rt, rank, size, device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.own: list[int] = []  # cudaMalloc'd: the receive buffer
        self.opened: list[int] = []  # peers' memory mapped here
        self.buffers = torch.empty(0)
        self.counters = torch.zeros(NUM_BLOCKS, dtype=torch.int64, device=device)
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.abort_word = torch.zeros(1, dtype=torch.int32, pin_memory=True)

    @classmethod
    def create(cls, group: Any, rank: int, size: int, device: torch.device) -> CustomAllReduce | None:
        """Build it on every rank of ``group`` (call on all of them together); None on every rank when it
        cannot run here or gives a wrong sum. Every rank runs the same collectives whatever fails locally."""
        ar: CustomAllReduce | None = None
        handle = bytes(IPC_HANDLE_BYTES)
        try:
            ar = cls(CudaRuntime(), rank, size, device)
            handle = ar._allocate()
        except Exception as exc:  # noqa: BLE001 — any failure here means: NCCL only (logged)
            logger.warning("Open-AutoGLM: custom all-reduce unavailable on rank %d: %s", rank, exc)
            ar = _discard(ar) if ar is not None else None
        rows = _gather(group, device, bytes([ar is not None]) + handle)
        if ar is not None and not all(row[0] for row in rows):
            ar = _discard(ar)
        if ar is not None:
            try:
                ar._open([row[1:] for row in rows])
                with pdl.active():  # the kernels that CUDA graphs capture
                    ar._check(group)
            except Exception as exc:  # noqa: BLE001 — the others learn it through the vote below
                logger.warning("Open-AutoGLM: custom all-reduce failed its check on rank %d: %s", rank, exc)
                ar = _discard(ar)
        if not _all_agree(group, device, ar is not None):
            return _discard(ar) if ar is not None else None
        return ar

    def _allocate(self) -> bytes:
        with torch.cuda.device(self.device):
            self.rt.set_device(self.index)
            self.own = [self.rt.malloc(PHASES * self.size * MAX_BYTES)]
            return self.rt.ipc_handle(self.own[0])

    def _open(self, handles: list[bytes]) -> None:
        buffers = []
        with torch.cuda.device(self.device):
            self.rt.set_device(self.index)
            for p, h in enumerate(handles):
                if p == self.rank:
                    buffers.append(self.own[0])
                    continue
                ptr = self.rt.ipc_open(h)
                self.opened.append(ptr)
                buffers.append(ptr)
        self.buffers = torch.tensor(buffers, dtype=torch.int64, device=self.device)
        n = PHASES * self.size * MAX_BYTES // 2
        _fill_sentinels[(triton.cdiv(n, 4096),)](self.buffers, self.rank, n, BLOCK=4096)
        torch.cuda.synchronize(self.device)  # before any peer writes (the check's first meeting follows)

    def _check(self, group: Any) -> None:
        """Against NCCL on random data (bounded spins); raises on a wrong sum or a wait that gave up."""
        gen = torch.Generator(device=self.device).manual_seed(1234 + self.rank)
        for dtype in DTYPES:
            # Compile first, then meet: a rank compiling while another spins would look like a lost rank.
            self(torch.zeros(8, dtype=dtype, device=self.device), CHECK_SPIN, warmup=True)
            _all_agree(group, self.device, True)
            for n in (8, 4096, 7 * 4096 + 5, MAX_BYTES // torch.empty((), dtype=dtype).element_size()):  # all fit
                x = torch.randn(n, generator=gen, device=self.device).to(dtype)
                x[: n // 2 : 3] = -0.0  # the sentinel's bits: sent as +0.0, or the peers would wait for it
                want = x.clone()
                group.allreduce(want).wait()
                self(x, CHECK_SPIN)
                torch.cuda.synchronize(self.device)
                if self.status.item() != 0:
                    raise RuntimeError("a wait for the other ranks gave up")
                if not torch.allclose(x.float(), want.float(), rtol=1e-2, atol=1e-2):
                    raise RuntimeError(f"sum differs from NCCL's ({dtype}, {n} elements)")
        for dtype, post in ((torch.bfloat16, True), (torch.float16, False)):
            self._check_norm(group, gen, dtype, post)

    def _check_norm(self, group: Any, gen: torch.Generator, dtype: torch.dtype, post: bool) -> None:
        """The fused all-reduce + norms against NCCL's sum normed by ``fused_ops.add_rms_norm``."""
        from openautoglm.engine.models.fused_ops import add_rms_norm

        rows, cols = 5, 4096
        x, residual, weight, post_weight = (
            torch.randn(shape, generator=gen, device=self.device).to(dtype)
            for shape in ((rows, cols), (rows, cols), (cols,), (cols,))
        )
        post_args = (post_weight if post else None, 1e-5)
        self._norm(x, residual, weight, 1e-6, *post_args, CHECK_SPIN, warmup=True)
        _all_agree(group, self.device, True)
        summed = x.clone()
        group.allreduce(summed).wait()
        want = add_rms_norm(summed, residual, weight, 1e-6, *post_args)
        got = self._norm(x, residual, weight, 1e-6, *post_args, CHECK_SPIN)
        torch.cuda.synchronize(self.device)
        if self.status.item() != 0:
            raise RuntimeError("a wait for the other ranks gave up")
        # NCCL may sum in another order than rank order: the sums agree to a rounding step, not to the bit.
        for name, a, b in zip(("norm", "residual"), got, want, strict=True):
            if not torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2):
                raise RuntimeError(f"fused all-reduce + norm: {name} differs ({dtype}, post norm {post})")

    def fits(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes through this kernel: small, contiguous, and captured into a CUDA graph (every rank
        captures the same graphs, so every rank decides the same)."""
        small = x.dtype in DTYPES and x.numel() * x.element_size() <= MAX_BYTES and x.is_contiguous()
        return small and torch.cuda.is_current_stream_capturing()

    def fits_norm(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        """Whether ``add_rms_norm`` takes ``x [rows, cols]``: ``fits``, one program per row, rows a multiple of 16
        elements (the kernel's 16-byte accesses into the receive buffers start on a row)."""
        rows_ok = x.dim() == 2 and x.shape[0] <= NUM_BLOCKS and x.shape[1] <= MAX_NORM_COLS and x.shape[1] % 16 == 0
        same = residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
        return rows_ok and same and self.fits(x)

    def __call__(self, x: torch.Tensor, max_spin: int = SERVICE_SPIN, *, warmup: bool = False) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (every rank calls it with the same shape, in the same order);
        ``warmup`` only compiles the kernel."""
        span = triton.cdiv(triton.cdiv(x.numel(), NUM_BLOCKS), BLOCK) * BLOCK
        self._launch(x, span, (x, x, x, x, x, 0.0, 0.0), max_spin, BLOCK, False, False, warmup)
        return x

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        post_weight: torch.Tensor | None = None, post_eps: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(norm(h), h)`` with ``h = residual + post_norm(sum of x over the ranks)``, in one kernel: what
        ``all_reduce`` followed by ``fused_ops.add_rms_norm`` computes, bit for bit but for the sign of a zero
        (-0.0 is sent as +0.0) (``fits_norm`` first)."""
        return self._norm(x, residual, weight, eps, post_weight, post_eps, SERVICE_SPIN)

    def _norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        post_weight: torch.Tensor | None, post_eps: float, max_spin: int, *, warmup: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        out, res_out = torch.empty_like(x), torch.empty_like(x)
        post = weight if post_weight is None else post_weight
        norm = (residual, out, res_out, post, weight, post_eps, eps)
        block = triton.next_power_of_2(x.shape[1])
        self._launch(x, x.shape[1], norm, max_spin, block, True, post_weight is not None, warmup)
        return out, res_out

    def _launch(
        self, x: torch.Tensor, span: int, norm: tuple, max_spin: int, block: int, has_norm: bool, has_post: bool,
        warmup: bool,
    ) -> None:  # fmt: skip
        args = (x, x.numel(), span, self.buffers, self.counters, self.abort_word, self.status, max_spin)
        kwargs = {
            "SLOT": MAX_BYTES // x.element_size(), "W": self.size, "BLOCK": block, "HAS_NORM": has_norm,
            "HAS_POST": has_post, "num_warps": min(16, max(4, block // 512)), **pdl.launch(),
        }  # fmt: skip
        if warmup:
            _one_shot_all_reduce.warmup(*args, self.rank, *norm, grid=(NUM_BLOCKS,), **kwargs)
        else:
            _one_shot_all_reduce[(NUM_BLOCKS,)](*args, self.rank, *norm, **kwargs)

    def abort(self) -> None:
        """Make every wait of this rank return (a rank is lost); no CUDA call, safe from any thread."""
        self.abort_word[0] = 1

    def release(self) -> None:
        """Unmap the peers' memory and free this rank's (once no kernel of any rank can touch it)."""
        with torch.cuda.device(self.device):
            self.rt.set_device(self.index)
            for ptr in self.opened:
                self.rt.ipc_close(ptr)
            for ptr in self.own:
                self.rt.free(ptr)
        self.opened, self.own = [], []


def _discard(ar: CustomAllReduce) -> None:
    """Release what ``ar`` holds; a failure to do so is logged, never raised (the ranks must stay in step)."""
    try:
        ar.release()
    except Exception:  # the memory leaks; the engine goes on with NCCL
        logger.exception("Open-AutoGLM: could not release the custom all-reduce's memory")


def _gather(group: Any, device: torch.device, payload: bytes) -> list[bytes]:
    mine = torch.tensor(list(payload), dtype=torch.uint8, device=device)
    out = torch.empty(group.size() * mine.numel(), dtype=torch.uint8, device=device)
    group._allgather_base(out, mine).wait()
    rows = out.view(group.size(), -1).cpu()
    return [bytes(row.tolist()) for row in rows]


def _all_agree(group: Any, device: torch.device, ok: bool) -> bool:
    import torch.distributed as dist

    vote = torch.tensor([int(ok)], dtype=torch.int32, device=device)
    group.allreduce(vote, dist.ReduceOp.MIN).wait()
    return bool(vote.item())
