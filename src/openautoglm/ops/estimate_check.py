"""Check ``autoglm estimate`` against a real allocation on a GPU (``python -m openautoglm.ops.estimate_check``).

Loads a named architecture with dummy weights, sizes the KV pool for exactly ``max_num_seqs`` sequences of
``max_model_len`` tokens, runs a full batch through prefill and sampled decode, and compares PyTorch's peak
allocation with the estimate's weights + KV cache + activation peak. Prints one JSON object per case.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

from openautoglm.config.settings import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from openautoglm.ops.estimate import arch_for, estimate


def measure(
    name: str = "glm-4-9b-0414",
    *,
    quantization: str = "none",
    max_model_len: int = 4096,
    max_num_seqs: int = 32,
    max_num_batched_tokens: int = 2048,
    prompt_len: int = 1000,
) -> dict[str, Any]:
    from openautoglm.engine.llm import LLM
    from openautoglm.protocol.sampling import SamplingParams

    e = estimate(arch_for(name), model=name, quantization=quantization, max_model_len=max_model_len,
                 max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)  # fmt: skip
    num_blocks = max_num_seqs * math.ceil(max_model_len / e.block_size)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    free_before = torch.cuda.mem_get_info()[0]
    config = EngineConfig(
        model=ModelConfig(
            model=name,
            load_format="dummy",
            device="cuda",
            dtype="bfloat16",
            quantization=quantization,
            max_model_len=max_model_len,
        ),
        cache=CacheConfig(num_blocks=num_blocks, block_size=e.block_size),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
    )
    llm = LLM(config)
    prompts = [[(7 * i + j) % 50000 + 100 for j in range(prompt_len)] for i in range(max_num_seqs)]
    llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, ignore_eos=True))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    used = free_before - torch.cuda.mem_get_info()[0]
    result = {
        "model": name,
        "quantization": quantization,
        "gpu": torch.cuda.get_device_name(),
        "estimated_allocated_bytes": e.allocated_bytes,
        "peak_allocated_bytes": peak,
        "allocated_error": (peak - e.allocated_bytes) / e.allocated_bytes,
        "estimated_weight_bytes": e.weight_bytes,
        "estimated_kv_bytes": e.kv_bytes,
        "estimated_activation_bytes": e.activation_bytes,
        "estimated_total_bytes": e.total_bytes,
        "device_bytes_used": used,
        "total_error": (used - e.total_bytes) / e.total_bytes,
    }
    del llm
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="glm-4-9b-0414")
    parser.add_argument("--quantization", nargs="+", default=["none", "int8"])
    args = parser.parse_args()
    for q in args.quantization:
        print(json.dumps(measure(args.model, quantization=q)), flush=True)


if __name__ == "__main__":
    main()
