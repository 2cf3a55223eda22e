"""fp8 W8A8: float8 e4m3 weights with per-output-channel scales, activations quantized per token at run time.

The matmul is ``torch._scaled_mm`` with row-wise scales (Hopper and newer), accumulating in float32:
``y[m, n] = (sum_k xq[m, k] * wq[n, k]) * sx[m] * sw[n]``. The per-token activation scale adapts to each
token's range, which is what keeps W8A8 close to bf16 without calibration data.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> float8 e4m3 ``[N, K]`` and float32 scales ``[N]`` (row max maps to 448)."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / FP8_MAX
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def per_token_fp8_quant_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference per-token activation quantization: float8 ``[M, K]`` and float32 scales ``[M, 1]``."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K]`` (bf16) times float8 ``weight [N, K]`` with float32 ``scale [N]``: ``[M, N]`` bf16."""
    from openautoglm.engine.quantization.triton_kernels import fp8_gemv, per_token_fp8_quant

    xq, xs = per_token_fp8_quant(x)
    if x.shape[0] == 1:  # one token: a weight stream, which _scaled_mm's tiles serve poorly
        return fp8_gemv(xq, xs, weight, scale, bias, x.dtype)
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=scale.view(1, -1), out_dtype=x.dtype, use_fast_accum=True)
    return y if bias is None else y + bias
