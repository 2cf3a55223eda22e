"""Quantized drop-in replacements for ``nn.Linear`` and the swap that puts them into a model.

A ``QuantizedLinear`` holds its weight as a parameter named ``weight`` (int8 or float8, shape ``[N, K]``, as
``nn.Linear`` has it, so the model's ``expected_weight_names`` stay the checkpoint's names), a float32
``weight_scale [N]`` buffer and an optional bias in the model's dtype. It is filled row range by row range
(``load_rows``) straight from full-precision checkpoint tensors: a fused projection such as ``qkv_proj`` is
quantized part by part as q, k and v arrive, and per-output-channel scales make that exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from openautoglm.engine.quantization.fp8 import FP8_DTYPE, fp8_linear, quantize_fp8
from openautoglm.engine.quantization.int8 import int8_gemv_silu, int8_linear, quantize_int8
from openautoglm.protocol.errors import ConfigError

# The linears of every decoder layer that are quantized; embeddings, lm_head and norms stay in full precision.
QUANTIZED_LINEAR_NAMES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class QuantFormat:
    name: str
    storage_dtype: torch.dtype
    quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    # silu(gate) * up of a fused [gate | up] weight in one kernel, or None where it does not apply
    gemv_silu: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor | None] | None


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat("int8", torch.int8, quantize_int8, int8_linear, int8_gemv_silu),
    "fp8": QuantFormat("fp8", FP8_DTYPE, quantize_fp8, fp8_linear, None),
}


class QuantizedLinear(nn.Module):
    def __init__(self, method: str, in_features: int, out_features: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.format = FORMATS[method]
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype  # the activations' (and the bias') dtype
        # Registered in nn.Linear's order (weight, then bias): seeded dummy weights then draw the same numbers.
        storage = self.format.storage_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=storage), requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def like(cls, linear: nn.Linear, method: str) -> QuantizedLinear:
        """An empty quantized linear of ``linear``'s shape, on its device (meta while a model is built)."""
        with torch.device(linear.weight.device):
            return cls(method, linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype)

    @property
    def method(self) -> str:
        return self.format.name

    @torch.no_grad()
    def load_rows(self, rows: slice, weight: torch.Tensor) -> None:
        """Quantize the full-precision ``weight`` (rows ``rows`` of this layer's weight) into place."""
        q, scale = self.format.quantize(weight.to(self.weight.device))
        self.weight.data[rows].copy_(q)
        self.weight_scale[rows].copy_(scale)

    def dequantized_weight(self) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.format.linear(x, self.weight, self.weight_scale, self.bias)

    def forward_silu(self, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate) * up`` of this fused ``[gate | up]`` projection in one kernel where the format has such a
        GEMV (int8, one token on the GPU); None elsewhere (the caller multiplies, then ``SiluAndMul``)."""
        if self.format.gemv_silu is None or not x.is_cuda or x.dim() != 2:
            return None
        return self.format.gemv_silu(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, quantization={self.method}"
        )


def replace_linears(model: nn.Module, method: str) -> list[str]:
    """Swap the decoder layers' ``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj`` for empty quantized
    linears of ``method`` (on the model's device; call it on the meta device, before the model is
    allocated, so no full-precision copy is ever made). Returns the module paths replaced."""
    if method not in FORMATS:
        raise ConfigError(f"quantization {method!r} is not supported; use one of none, {', '.join(FORMATS)}")
    replaced: list[str] = []
    for path, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in QUANTIZED_LINEAR_NAMES and isinstance(child, nn.Linear):
                setattr(module, child_name, QuantizedLinear.like(child, method))
                replaced.append(f"{path}.{child_name}" if path else child_name)
    return replaced
