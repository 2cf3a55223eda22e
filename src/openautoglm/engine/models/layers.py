"""Blocks shared by the GLM-family models: RMSNorm, partial interleaved rotary, SiLU-and-mul, attention.

Every block works on one flattened ragged batch ``[num_tokens, ...]``; none loops over tokens in Python.
On CUDA in bf16/fp16, with Triton installed, the norms (with the residual add before them), the rotary and
SiLU-and-mul run as single Triton kernels (``fused_ops``) that round as the torch code here rounds; everywhere
else, the CPU reference path included, the torch code below runs.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from openautoglm.engine.attention.base import ForwardContext, Rotary

if TYPE_CHECKING:
    from openautoglm.engine.parallel.context import TensorParallel

_FUSED_DTYPES = (torch.bfloat16, torch.float16)
_fused_enabled = True


@functools.cache
def _fused_ops() -> ModuleType | None:
    """The Triton kernels, imported on first use; None where Triton is not installed (CPU-only installs)."""
    if importlib.util.find_spec("triton") is None:
        return None
    from openautoglm.engine.models import fused_ops

    return fused_ops


@contextlib.contextmanager
def torch_ops_only() -> Iterator[None]:
    """Run the torch ops even where the fused kernels could, in this process, while the block runs.

    For tests and benchmarks that compare the two paths; a CUDA graph keeps the kernels it was captured with.
    """
    global _fused_enabled
    before, _fused_enabled = _fused_enabled, False
    try:
        yield
    finally:
        _fused_enabled = before


def _fusable(*tensors: torch.Tensor) -> ModuleType | None:
    """The fused kernels module when every tensor is a CUDA tensor of the first one's bf16/fp16 dtype."""
    x = tensors[0]
    if not (_fused_enabled and x.is_cuda and x.dtype in _FUSED_DTYPES):
        return None
    if any(not t.is_cuda or t.dtype != x.dtype for t in tensors[1:]):
        return None
    return _fused_ops()


def _gemv_path(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[ModuleType, Any] | None:
    """The fused kernels and the GEMV's launch shape for one token row on CUDA in bf16/fp16 and a weight shape
    the GEMV was tuned for; None elsewhere."""
    if not (x.dim() == 2 and x.shape[0] == 1 and x.is_contiguous() and weight.is_contiguous()):
        return None
    ops = _fusable(x, weight) if bias is None else _fusable(x, weight, bias)
    config = ops.GEMV_TUNED.get(tuple(weight.shape)) if ops is not None else None
    return None if config is None else (ops, config)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; for one token row on CUDA in bf16/fp16 with a weight shape the GEMV was tuned for, the
    Triton GEMV (``fused_ops.gemv``), which streams the weight faster than cuBLAS there."""
    path = _gemv_path(x, weight, bias)
    if path is not None:
        ops, config = path
        return ops.gemv(x, weight, bias, config)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose one-token products may take the GEMV (``linear``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of this fused ``[gate | up]`` projection in one GEMV kernel, for one token on the
        GPU with a tuned shape; None elsewhere (the caller multiplies, then ``SiluAndMul``)."""
        path = _gemv_path(x, self.weight, self.bias) if self.weight.shape[0] % 2 == 0 else None
        if path is None:
            return None
        ops, config = path
        return ops.gemv(x, self.weight, self.bias, config, silu=True)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, cast back, then scaled (the order transformers uses)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps
        self.shape = (hidden_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fusable(x, self.weight)
        if fused is not None:
            return fused.rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused op; same result as the cast-then-scale path below
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm: RMSNorm,
    post_norm: RMSNorm | None = None,
    tp: TensorParallel | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(h), h)`` with ``h = residual + post_norm(x)`` (``post_norm`` skipped when None); with ``tp``,
    ``x`` is a row-parallel output, summed over the ranks first.

    The residual add between a block's output and the next block's input norm; with GLM-4-0414's sandwich
    norm, the norm of the block's output too. One kernel on the fused path, the all-reduce included where the
    one-shot all-reduce takes it.
    """
    weights = (norm.weight,) if post_norm is None else (norm.weight, post_norm.weight)
    fused = _fusable(x, residual, *weights)
    post = (None, 0.0) if post_norm is None else (post_norm.weight, post_norm.eps)
    if tp is not None and tp.size > 1:
        reduced = tp.all_reduce_add_rms_norm(x, residual, norm.weight, norm.eps, *post) if fused else None
        if reduced is not None:
            return reduced
        tp.all_reduce(x)
    if fused is not None:
        return fused.add_rms_norm(x, residual, norm.weight, norm.eps, *post)
    if post_norm is not None:
        x = post_norm(x)
    h = residual + x
    return norm(h), h


class RotaryEmbedding(nn.Module):
    """Cos/sin of rotary position embedding for the first ``rotary_dim`` dims of each head.

    The table is built lazily on the device and dtype of the first call, so building the model on the meta
    device costs nothing; the model looks it up once per step and every layer shares the result.
    """

    def __init__(self, rotary_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        # Same arithmetic as transformers, so float32 results match bit for bit; on the CPU explicitly, since
        # the model may be built under a meta-device context.
        exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float, device="cpu") / rotary_dim
        self.inv_freq_cpu = 1.0 / (base**exponent)
        self.rotary_dim = 2 * self.inv_freq_cpu.numel()
        self.max_position = max_position
        self._table: torch.Tensor | None = None  # [max_position, 2, rotary_dim / 2]: cos, sin

    def _build(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        pos = torch.arange(self.max_position, dtype=torch.float, device="cpu")
        freqs = pos[:, None] * self.inv_freq_cpu[None, :]
        return torch.stack((freqs.cos(), freqs.sin()), dim=1).to(device=device, dtype=dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cos and sin ``[num_tokens, 1, rotary_dim / 2]`` for ``positions``, broadcastable over heads."""
        table = self._table
        if table is None or table.device != positions.device or table.dtype != dtype:
            table = self._table = self._build(positions.device, dtype)
        cs = table[positions]
        return cs[:, :1], cs[:, 1:]


def _rotary_fusable(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> ModuleType | None:
    """The fused kernels where a Triton kernel may rotate ``x`` by ``cos``/``sin``: the fused path's tensors with
    unit-stride last dimensions (the kernels' layout); None elsewhere."""
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return None
    return _fusable(x, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) in the first ``2 * cos.shape[-1]`` dims of ``x [T, heads, D]``.

    GLM rotates pairs GPT-J style, not NeoX halves, and only part of each head; the other dims pass through.
    Returns the rotated tensor: on the fused path that is ``x`` itself, rotated in place (one launch for the q
    and k heads of a fused projection, no copy of the pass-through dims); otherwise a new tensor.
    """
    fused = _rotary_fusable(x, cos, sin)
    if fused is not None:
        fused.rotary_(x, cos, sin)
        return x
    rot = 2 * cos.shape[-1]
    pairs = x[..., :rot].unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rot == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., rot:]), dim=-1)


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a fused ``[gate | up]`` projection (the gate is the first half)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fusable(x)
        if fused is not None:
            return fused.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class Attention(nn.Module):
    """Hands q/k/v of one layer to the step's attention backend with that layer's KV cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim**-0.5

    def backend_rotary(
        self, ctx: ForwardContext, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> Rotary | None:
        """The rotary to hand the backend with unrotated q and k, where the backend fuses it and a kernel could
        rotate them (``_rotary_fusable``); None where the caller rotates them (``apply_rotary``)."""
        fused = ctx.backend.fuses_rotary and _rotary_fusable(qk, cos, sin) is not None
        return Rotary(cos, sin) if fused else None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, rotary: Rotary | None = None
    ) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
        out = ctx.backend.forward(q, k, v, ctx.kv_caches[self.layer_idx], ctx.metadata, self.scale, rotary)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
