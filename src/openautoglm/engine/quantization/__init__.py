"""Load-time quantization of a full-precision GLM checkpoint.

- ``int8``: weight-only, symmetric per-output-channel scales; activations stay bf16/fp16/fp32. Decode reads
  half the weight bytes (Triton kernel on GPU, dequantize-on-the-fly elsewhere).
- ``fp8``: W8A8, float8 e4m3 weights with per-channel scales and dynamic per-token activation scales,
  ``torch._scaled_mm``; Hopper (compute capability 9.0) and newer, bf16 activations.

Only the decoder layers' ``qkv_proj``, ``o_proj``, ``gate_up_proj`` and ``down_proj`` are quantized;
embeddings, ``lm_head`` and norms keep the model's dtype. Quantization happens tensor by tensor while the
checkpoint streams in (``QuantizedWeightRouter``), so no full-precision copy of the model is ever allocated.
"""

from __future__ import annotations

import torch

from openautoglm.engine.platform import check_fp8_support
from openautoglm.engine.quantization.linear import QUANTIZED_LINEAR_NAMES, QuantizedLinear, replace_linears
from openautoglm.engine.quantization.loading import QuantizedWeightRouter
from openautoglm.protocol.errors import ConfigError

__all__ = [
    "QUANTIZATION_METHODS",
    "QUANTIZED_LINEAR_NAMES",
    "QuantizedLinear",
    "QuantizedWeightRouter",
    "check_quantization",
    "replace_linears",
]

QUANTIZATION_METHODS = ("none", "int8", "fp8")


def check_quantization(method: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ConfigError unless ``method`` can run on ``device`` with activations in ``dtype``."""
    if method not in QUANTIZATION_METHODS:
        allowed = ", ".join(QUANTIZATION_METHODS)
        raise ConfigError(f"model.quantization {method!r} is not supported; use one of {allowed}")
    if method != "fp8":
        return
    check_fp8_support(device)
    if dtype != torch.bfloat16:
        raise ConfigError(
            f"model.quantization 'fp8' computes with bfloat16 activations; model.dtype resolves to "
            f"{str(dtype).removeprefix('torch.')} here: set model.dtype to 'bfloat16' (or 'auto')"
        )
