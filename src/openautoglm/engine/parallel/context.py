"""The tensor-parallel context one model shard computes with: its rank, the group size and the collectives.

The group is a torch.distributed backend object of its own (NCCL between GPUs, gloo between CPU processes),
built from a TCP store on the loopback interface; the process-wide default group is never touched, so several
engines (and the user's own torch.distributed code) can live in one process. On GPUs, the small all-reduces of
decode steps go through Open-AutoGLM's one-shot kernel over NVLink (``custom_all_reduce``) when it passes its
start-up check, the others through NCCL. The loader passes the context down to the model's constructor;
nothing reads it from a global.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

# NVLink multicast (NVLS) never pays off for the small all-reduces of a decode step, and on shared hosts it can
# take GPUs out of service: Open-AutoGLM keeps it off in every rank.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# A collective that waits longer than this means a rank is gone or stuck: it fails instead of hanging.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True, eq=False)
class TensorParallel:
    """Rank ``rank`` of ``size``; ``group`` is None when ``size`` is 1 (every collective is then a no-op)."""

    rank: int = 0
    size: int = 1
    group: Any = None
    fast: Any = None  # CustomAllReduce, for tensors it fits

    @property
    def is_driver(self) -> bool:
        """Rank 0: it schedules, samples and drives the other ranks."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns ``x``."""
        if self.size > 1:
            if self.fast is not None and self.fast.fits(x):
                self.fast(x)
            else:
                self.group.allreduce(x).wait()
        return x

    def all_reduce_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        post_weight: torch.Tensor | None, post_eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:  # fmt: skip
        """``(norm(h), h)`` with ``h = residual + post_norm(sum of x)`` in one kernel (the one-shot all-reduce
        ending in the norms), or None where that kernel does not take ``x``: then the caller sums and norms."""
        if self.size > 1 and self.fast is not None and self.fast.fits_norm(x, residual):
            return self.fast.add_rms_norm(x, residual, weight, eps, post_weight, post_eps)
        return None

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``x [rows, cols]`` of every rank side by side: ``[rows, size * cols]`` (rank 0's columns first)."""
        if self.size == 1:
            return x
        rows, cols = x.shape
        out = x.new_empty((self.size * rows, cols))
        self.group._allgather_base(out, x.contiguous()).wait()
        return out.view(self.size, rows, cols).transpose(0, 1).reshape(rows, self.size * cols)

    def broadcast(self, x: torch.Tensor) -> None:
        """Rank 0's ``x`` into every rank's ``x`` (contiguous)."""
        if self.size > 1:
            self.group.broadcast(x, 0).wait()

    def abort(self) -> None:
        """Tear the group down without waiting for the other ranks (pending collectives fail). NCCL's part
        blocks while CUDA graphs that captured its kernels live: destroy them first where possible."""
        if self.fast is not None:
            self.fast.abort()
        abort = getattr(self.group, "abort", None)
        if abort is not None:
            abort()

    def release(self) -> None:
        """Free the custom all-reduce's memory (after ``abort``, once no rank runs its kernel)."""
        if self.fast is not None:
            self.fast.release()


def set_collective_env() -> None:
    """The NCCL environment every rank runs with (read when the group and its communicator are created)."""
    os.environ.update(NCCL_ENV)


def master_store(size: int) -> Any:
    """Rank 0's rendezvous store on a free loopback port (``.port`` tells the other ranks where)."""
    import torch.distributed as dist

    return dist.TCPStore(LOOPBACK, 0, size, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)


def connect(
    rank: int, size: int, port: int, device: torch.device, store: Any = None, *, custom_all_reduce: bool = True
) -> TensorParallel:
    """Join the group of ``size`` ranks whose store listens on ``port``: NCCL on a GPU (and the custom
    all-reduce unless told not to: every rank must be told the same), gloo on the CPU."""
    import torch.distributed as dist

    set_collective_env()
    if store is None:
        store = dist.TCPStore(LOOPBACK, port, size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    if device.type == "cuda":
        group = dist.ProcessGroupNCCL(store, rank, size, COLLECTIVE_TIMEOUT)
        if not custom_all_reduce:
            return TensorParallel(rank, size, group)
        from openautoglm.engine.parallel.custom_all_reduce import CustomAllReduce

        return TensorParallel(rank, size, group, CustomAllReduce.create(group, rank, size, device))
    from torch._C._distributed_c10d import ProcessGroupGloo

    opts = ProcessGroupGloo._Options()
    opts._timeout = COLLECTIVE_TIMEOUT
    opts._devices = [ProcessGroupGloo.create_device(hostname=LOOPBACK)]
    return TensorParallel(rank, size, ProcessGroupGloo(store, rank, size, opts))
