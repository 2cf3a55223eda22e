"""int8 weight-only: symmetric per-output-channel scales, activations stay in the model's dtype.

What users of transformers' ``load_in_8bit=True`` expect: half the weight bytes of bf16, logits close to bf16.
Each row ``w`` of a weight becomes ``round(w / s)`` in [-127, 127] with ``s = max|w| / 127``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX = 127.0


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` (any float dtype) -> int8 ``[N, K]`` and float32 scales ``[N]``."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX  # the floor keeps an all-zero row finite
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ dequant(weight)^T + bias`` in x's dtype."""
    if x.is_cuda:
        from openautoglm.engine.quantization.triton_kernels import int8_weight_only_matmul

        return int8_weight_only_matmul(x, weight, scale, bias)
    # int8 values are exact in every float dtype: the product of the integers is exact up to accumulation,
    # and the per-channel scale applies to the output. The float copy of the weight lives for this call only.
    y = F.linear(x, weight.to(x.dtype))
    y = y * scale.to(x.dtype) if x.dtype != torch.float32 else y * scale
    return y if bias is None else y + bias


def int8_gemv_silu(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``silu(gate) * up`` of one CUDA token and a fused int8 ``[gate | up]`` weight in one GEMV kernel; None
    where that kernel does not apply."""
    from openautoglm.engine.quantization.triton_kernels import int8_gemv_silu as kernel

    return kernel(x, weight, scale, bias)
