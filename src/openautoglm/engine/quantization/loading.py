"""Route checkpoint tensors that belong to quantized linears into them, quantizing one tensor at a time.

The model's own ``load_weights`` copies full-precision tensors into full-precision parameters; a quantized
linear instead needs its rows quantized. ``QuantizedWeightRouter`` sits between the checkpoint reader and
``load_weights``: it takes the tensors of quantized linears out of the stream (q/k/v go to their row ranges of
the fused ``qkv_proj``) and passes every other tensor through untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from openautoglm.engine.models.base import ModelArchConfig
from openautoglm.engine.quantization.linear import QuantizedLinear
from openautoglm.protocol.errors import ModelLoadError


def _targets(model: nn.Module, arch: ModelArchConfig) -> dict[str, tuple[QuantizedLinear, slice]]:
    """Checkpoint tensor name -> (quantized linear, rows of its weight) for every quantized linear."""
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    qkv_rows = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    targets: dict[str, tuple[QuantizedLinear, slice]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        prefix, _, name = path.rpartition(".")
        if name == "qkv_proj":
            for part, rows in qkv_rows.items():
                targets[f"{prefix}.{part}.weight"] = (module, rows)
        else:
            targets[f"{path}.weight"] = (module, slice(0, module.out_features))
    return targets


class QuantizedWeightRouter:
    """Quantizes the weights of ``model``'s quantized linears as they stream past; ``consumed`` names them."""

    def __init__(self, model: nn.Module, arch: ModelArchConfig) -> None:
        self.targets = _targets(model, arch)
        self.consumed: set[str] = set()

    def route(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the tensors that are not quantized-linear weights; quantize the others into place."""
        for name, tensor in weights:
            target = self.targets.get(name)
            if target is None:
                yield name, tensor
                continue
            module, rows = target
            expected = (rows.stop - rows.start, module.in_features)
            if tuple(tensor.shape) != expected:
                raise ModelLoadError(
                    f"tensor {name!r}: shape mismatch, expected {expected} from config.json, "
                    f"found {tuple(tensor.shape)}"
                )
            module.load_rows(rows, tensor)
            self.consumed.add(name)
