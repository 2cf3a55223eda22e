"""Quantization on one GPU: kernel checks, an int8 block-shape sweep, and int8 / fp8 against bf16 on a model.

``python -m openautoglm.ops.bench_quant --out quant.json`` measures, in one process and one run:

- kernels: the int8 Triton kernels and the fp8 per-token quantizer against float64 / torch references;
- per-linear times of GLM-4-9B's four decoder projections (bf16 ``F.linear``, int8 Triton, int8 dequantize +
  cuBLAS, fp8 ``_scaled_mm``) over token counts, with the achieved weight bandwidth, and the block-shape sweep
  that ``triton_kernels.int8_config`` is set from;
- the whole model (a named config, dummy weights, one seed, so every format quantizes the same weights):
  single-stream decode step (CUDA graph, batch 1), a batch-256 decode step and a 4096-token prefill, each
  against bf16, and the offline-workload estimate; logits of every format against bf16 (cosine, top-1).

Speed is reported as ratios against bf16 measured in the same run; nothing here asserts. ``run_suite`` is the
entry point ``autoglm bench gpu-suite`` calls.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from openautoglm.config.settings import ModelConfig
from openautoglm.engine.attention.base import ForwardContext
from openautoglm.engine.attention.reference import ReferenceAttentionBackend, build_metadata
from openautoglm.engine.loader import load_model
from openautoglm.engine.models.base import ModelArchConfig
from openautoglm.engine.quantization.fp8 import dequantize_fp8, fp8_linear, per_token_fp8_quant_torch, quantize_fp8
from openautoglm.engine.quantization.int8 import quantize_int8
from openautoglm.ops.bench_offline import synthetic_prompts

GLM9B_LINEARS = {
    "qkv_proj": (4608, 4096),
    "o_proj": (4096, 4096),
    "gate_up_proj": (27392, 4096),
    "down_proj": (4096, 13696),
}
BLOCK = 16
ATTENTION = {"backend": "reference"}  # which attention backend the model measurements use (--attention)
# The offline workload: 512 requests, prompts uniform in 128..1024 tokens, 128 output tokens each.
WORKLOAD = {"requests": 512, "mean_prompt": 576, "output": 128, "max_num_seqs": 256}


def _ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median milliseconds of ``fn``: device events with the L2 cache flushed between calls on a GPU, a wall
    clock on the CPU (dry runs of this script)."""
    if not torch.cuda.is_available():
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[1]
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def env_info(device: torch.device) -> dict[str, Any]:
    import triton

    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "gpu": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "nvidia_smi": smi.stdout.strip(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def copy_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = _ms(lambda: dst.copy_(src), rep=50)
    return 2 * nbytes / ms / 1e6


# --- kernels ----------------------------------------------------------------------------------------------


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def check_kernels(device: torch.device) -> dict[str, Any]:
    """Triton int8 and fp8 paths against references on fresh random inputs; NaN counts as failure."""
    from openautoglm.engine.quantization.triton_kernels import int8_weight_only_matmul, per_token_fp8_quant

    g = torch.Generator(device=device).manual_seed(1)
    worst: dict[str, float] = {"int8_vs_dequant_fp64": 0.0, "fp8_linear_vs_dequant_fp64": 0.0}
    for n, k in [(4608, 4096), (4096, 13696), (40, 100), (1000, 4096)]:
        w = torch.randn(n, k, device=device, generator=g) * 0.02
        b = torch.randn(n, device=device, generator=g).to(torch.bfloat16)
        q, s = quantize_int8(w)
        fq, fs = quantize_fp8(w)
        for m in (1, 3, 16, 33, 64, 200):
            x = torch.randn(m, k, device=device, generator=g).to(torch.bfloat16)
            ref = x.double() @ (q.double() * s.double()[:, None]).t() + b.double()
            y = int8_weight_only_matmul(x, q, s, b)
            err = _rel(y, ref) if not y.isnan().any() else math.inf
            worst["int8_vs_dequant_fp64"] = max(worst["int8_vs_dequant_fp64"], err)
            if k % 16 == 0 and n % 16 == 0:
                xq, xs = per_token_fp8_quant_torch(x)
                fref = (xq.double() * xs.double()) @ dequantize_fp8(fq, fs, torch.float64).t() + b.double()
                fy = fp8_linear(x, fq, fs, b)
                ferr = _rel(fy, fref) if not fy.isnan().any() else math.inf
                worst["fp8_linear_vs_dequant_fp64"] = max(worst["fp8_linear_vs_dequant_fp64"], ferr)
    x = torch.randn(300, 4096, device=device, generator=g).to(torch.bfloat16) * 3
    x[7] = 0  # an all-zero token must stay finite
    q1, s1 = per_token_fp8_quant(x)
    q2, s2 = per_token_fp8_quant_torch(x)
    worst["fp8_quant_scale_max_rel_diff"] = float(((s1 - s2).abs() / s2).max())
    worst["fp8_quant_values_mismatch_fraction"] = float((q1.float() != q2.float()).float().mean())
    worst["fp8_quant_finite"] = bool(torch.isfinite(q1.float()).all() and torch.isfinite(s1).all())
    return worst


# --- per-linear times and the int8 sweep --------------------------------------------------------------------


def _candidates(m: int) -> list[Any]:
    """The int8 launch shapes swept at ``m`` tokens (the first is the unpacked baseline where one exists)."""
    from openautoglm.engine.quantization.triton_kernels import Int8Config

    if m == 1:
        gemv = [(4, 1024, 4, False), (4, 1024, 4, True), (2, 1024, 4, True), (4, 2048, 4, True), (8, 1024, 8, True)]
        gemv += [(4, 4096, 8, False), (4, 4096, 8, True), (8, 2048, 8, True)]
        gemv += [(1, 1024, 8, True), (1, 2048, 8, True), (2, 2048, 8, True), (1, 4096, 8, True), (2, 1024, 8, True)]
        return [Int8Config("gemv", 1, 2, 1024, packed=False)] + [
            Int8Config("gemv", 1, bn, bk, w, evict=ev) for bn, bk, w, ev in gemv
        ]
    if m <= 16:
        mma = [(16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 64, 256, 8, 4), (16, 32, 512, 4, 3)]
        return [Int8Config("mma", *c) for c in mma]
    if m <= 64:
        mma = [(32, 32, 256, 4, 4), (64, 32, 256, 4, 4), (64, 64, 128, 4, 4), (64, 64, 256, 8, 4)]
        return [Int8Config("mma", *c) for c in mma]
    if m <= 512:
        return [Int8Config("dequant"), Int8Config("mma", 128, 128, 64, 8, 3), Int8Config("mma", 64, 128, 64, 4, 4)]
    return [Int8Config("dequant")]


FP8_GEMV_CANDIDATES = [(2, 1024, 4), (4, 1024, 4), (4, 2048, 8), (8, 1024, 8), (2, 2048, 4)]


def _fp8_row(x: torch.Tensor, fp8: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    from openautoglm.engine.quantization.triton_kernels import fp8_gemv, per_token_fp8_quant

    wq, ws = fp8
    row: dict[str, Any] = {"fp8_ms": _ms(lambda: fp8_linear(x, wq, ws, None))}
    if x.shape[0] == 1:
        xq, xs = per_token_fp8_quant(x)
        row["fp8_quant_ms"] = _ms(lambda: per_token_fp8_quant(x))
        row["fp8_scaled_mm_ms"] = _ms(
            lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=x.dtype)
        )
        row["fp8_gemv_sweep"] = {
            str(b): _ms(lambda b=b: fp8_gemv(xq, xs, wq, ws, None, x.dtype, b)) for b in FP8_GEMV_CANDIDATES
        }
    return row


def _linear_row(x: torch.Tensor, w: torch.Tensor, int8: tuple[torch.Tensor, torch.Tensor], fp8: Any) -> dict[str, Any]:
    from openautoglm.engine.quantization.triton_kernels import int8_config, int8_weight_only_matmul

    (m, k), n = x.shape, w.shape[0]
    q, s = int8
    row: dict[str, Any] = {"tokens": m, "bf16_ms": _ms(lambda: F.linear(x, w))}
    row["int8_default_ms"] = _ms(lambda: int8_weight_only_matmul(x, q, s))
    row["int8_default_config"] = str(int8_config(m, n, k))
    timed = [(_ms(lambda c=c: int8_weight_only_matmul(x, q, s, config=c)), c) for c in _candidates(m)]
    best_ms, best = min(timed, key=lambda t: t[0])
    row["int8_best_ms"], row["int8_best"] = best_ms, best
    row["int8_sweep"] = {str(c): t for t, c in timed}
    row.update(_fp8_row(x, fp8))
    row["bf16_weight_GBps"] = n * k * 2 / row["bf16_ms"] / 1e6
    row["int8_weight_GBps"] = n * k / best_ms / 1e6
    return row


def bench_linears(device: torch.device, token_counts: list[int], tune: bool = True) -> dict[str, Any]:
    """Per-projection times: bf16, int8 (default rule and every swept shape), fp8. With ``tune``, the best int8
    shape of each (tokens, projection) and the best fp8 GEMV block go into the kernels' tables for this process,
    so the model measurements that follow use them."""
    from openautoglm.engine.quantization import triton_kernels

    g = torch.Generator(device=device).manual_seed(2)
    results: dict[str, Any] = {}
    fp8_gemv_total: dict[str, float] = {}
    for name, (n, k) in GLM9B_LINEARS.items():
        w = (torch.randn(n, k, device=device, generator=g) * 0.02).to(torch.bfloat16)
        int8, fp8 = quantize_int8(w), quantize_fp8(w)
        rows = []
        for m in token_counts:
            row = _linear_row(torch.randn(m, k, device=device, generator=g).to(torch.bfloat16), w, int8, fp8)
            if tune:
                triton_kernels.TUNED_CONFIGS[(m, n, k)] = row["int8_best"]
            for block, ms in row.get("fp8_gemv_sweep", {}).items():
                fp8_gemv_total[block] = fp8_gemv_total.get(block, 0.0) + ms
            row["int8_best"] = str(row["int8_best"])
            rows.append(row)
        results[name] = rows
    if tune and fp8_gemv_total:
        best = min(fp8_gemv_total, key=fp8_gemv_total.__getitem__)
        triton_kernels.FP8_GEMV_BLOCK = next(b for b in FP8_GEMV_CANDIDATES if str(b) == best)
        results["fp8_gemv_block"] = best
    return results


# --- the whole model --------------------------------------------------------------------------------------


def _load(name: str, quantization: str, device: torch.device, cache_dir: str, seed: int = 0) -> Any:
    cfg = ModelConfig(
        model=name,
        load_format="dummy",
        quantization=quantization,
        seed=seed,
        download_dir=cache_dir,  # type: ignore[arg-type]
    )
    _sync(device)
    t0 = time.perf_counter()
    loaded = load_model(cfg, device, torch.bfloat16)
    _sync(device)
    return loaded, time.perf_counter() - t0


def _backend(device: torch.device) -> Any:
    if ATTENTION["backend"] == "triton":
        from openautoglm.engine.attention.triton_paged import TritonPagedAttentionBackend

        return TritonPagedAttentionBackend(device)
    return ReferenceAttentionBackend()


def _kv_caches(
    arch: ModelArchConfig, num_blocks: int, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> list[torch.Tensor]:
    shape = (2, num_blocks, BLOCK, arch.num_key_value_heads, arch.head_dim)
    return [torch.randn(shape, device=device, dtype=dtype) for _ in range(arch.num_hidden_layers)]


def _tables(num_seqs: int, tokens: int) -> list[list[int]]:
    per = -(-tokens // BLOCK)
    return [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(num_seqs)]


@torch.inference_mode()
def decode_step_ms(model: Any, arch: ModelArchConfig, batch: int, context: int, device: torch.device) -> float:
    """One decode step (forward + logits) of ``batch`` sequences at ``context`` tokens, replayed as a CUDA graph."""
    tables = _tables(batch, context + 1)
    kv = _kv_caches(arch, batch * len(tables[0]) + 1, device)
    md = build_metadata([1] * batch, [context] * batch, tables, BLOCK, device)
    ctx = ForwardContext(metadata=md, kv_caches=kv, backend=_backend(device))
    ids = torch.randint(0, arch.vocab_size, (batch,), device=device)
    pos = torch.full((batch,), context, dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        return model.compute_logits(model.forward(ids, pos, ctx))

    if device.type != "cuda":
        return _ms(step)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):  # plan, rotary table, Triton compilation: all before capture
            step()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = _ms(graph.replay, rep=200)
    del graph, kv
    return ms


@torch.inference_mode()
def prefill_ms(model: Any, arch: ModelArchConfig, seqs: int, length: int, device: torch.device) -> float:
    tables = _tables(seqs, length)
    kv = _kv_caches(arch, seqs * len(tables[0]) + 1, device)
    md = build_metadata([length] * seqs, [0] * seqs, tables, BLOCK, device)
    ctx = ForwardContext(metadata=md, kv_caches=kv, backend=_backend(device))
    ids = torch.randint(0, arch.vocab_size, (seqs * length,), device=device)
    pos = torch.arange(length, device=device).repeat(seqs)
    last = torch.arange(1, seqs + 1, device=device) * length - 1
    ms = _ms(lambda: model.compute_logits(model.forward(ids, pos, ctx).index_select(0, last)), rep=300)
    del kv
    return ms


@torch.inference_mode()
def prompt_logits(
    model: Any, arch: ModelArchConfig, device: torch.device, dtype: torch.dtype = torch.bfloat16, seqs: int = 4
) -> torch.Tensor:
    """Logits at every position of ``seqs`` fixed random 128-token prompts (the same ids for every format)."""
    length = 128
    tables = _tables(seqs, length)
    kv = _kv_caches(arch, seqs * len(tables[0]) + 1, device, dtype)
    md = build_metadata([length] * seqs, [0] * seqs, tables, BLOCK, device)
    backend = _backend(device) if dtype != torch.float32 else ReferenceAttentionBackend()
    ctx = ForwardContext(metadata=md, kv_caches=kv, backend=backend)
    gen = torch.Generator().manual_seed(123)
    ids = torch.randint(0, arch.vocab_size, (seqs * length,), generator=gen).to(device)
    pos = torch.arange(length, device=device).repeat(seqs)
    return model.compute_logits(model.forward(ids, pos, ctx)).float().cpu()


def compare_logits(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    cos = F.cosine_similarity(ref.double(), out.double(), dim=-1)
    return {
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float((ref.argmax(-1) == out.argmax(-1)).double().mean()),
        "positions": ref.shape[0],
    }


def offline_estimate(prefill_tokens_per_s: float, decode256_ms: float) -> float:
    """Total tokens/s of the issue's offline workload from a prefill rate and a full-batch decode step."""
    w = WORKLOAD
    prompt_tokens = w["requests"] * w["mean_prompt"]
    steps = w["requests"] // w["max_num_seqs"] * w["output"]
    seconds = prompt_tokens / prefill_tokens_per_s + steps * decode256_ms / 1e3
    return (prompt_tokens + w["requests"] * w["output"]) / seconds


def bench_model(name: str, device: torch.device, formats: list[str], cache_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {"model": name, "formats": {}}
    ref_logits = fp32_logits = None
    for fmt in formats:
        loaded, load_s = _load(name, fmt, device, cache_dir)
        model, arch = loaded.model, loaded.arch
        res: dict[str, Any] = {"load_s": load_s}
        if device.type == "cuda":
            res["gpu_bytes"] = torch.cuda.memory_allocated(device)
        logits = prompt_logits(model, arch, device)
        if ref_logits is None:
            ref_logits = logits
        else:
            res["vs_bf16"] = compare_logits(ref_logits, logits)
            if fp32_logits is not None:
                res["vs_fp32"] = compare_logits(fp32_logits, logits)
        res["decode_b1_ms"] = decode_step_ms(model, arch, 1, 256, device)
        res["decode_b1_tokens_per_s"] = 1e3 / res["decode_b1_ms"]
        res["decode_b256_ms"] = decode_step_ms(model, arch, 256, 640, device)
        res["prefill_4x1024_ms"] = prefill_ms(model, arch, 4, 1024, device)
        res["prefill_tokens_per_s"] = 4096 / res["prefill_4x1024_ms"] * 1e3
        res["offline_estimate_tokens_per_s"] = offline_estimate(res["prefill_tokens_per_s"], res["decode_b256_ms"])
        if fmt == "none" and device.type == "cuda":
            # The noise floor: the same bf16 weights computed in float32 (reference attention).
            fp32_logits = prompt_logits(model.float(), arch, device, torch.float32)
            res["bf16_vs_fp32"] = compare_logits(fp32_logits, logits)
        out["formats"][fmt] = res
        del loaded, model, logits
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"[bench_quant] {name} {fmt}: {json.dumps(res)}", flush=True)
    base = out["formats"].get("none")
    if base:
        for res in out["formats"].values():
            res["decode_b1_speedup"] = base["decode_b1_ms"] / res["decode_b1_ms"]
            res["decode_b256_speedup"] = base["decode_b256_ms"] / res["decode_b256_ms"]
            res["prefill_speedup"] = base["prefill_4x1024_ms"] / res["prefill_4x1024_ms"]
            res["offline_speedup"] = res["offline_estimate_tokens_per_s"] / base["offline_estimate_tokens_per_s"]
    return out


def run_suite(
    device: torch.device,
    model: str = "glm-4-9b-0414",
    parts: tuple[str, ...] = ("kernels", "linears", "model"),
    formats: tuple[str, ...] = ("none", "int8", "fp8"),
    token_counts: tuple[int, ...] = (1, 16, 64, 256, 4096),
    cache_dir: str = "/tmp/openautoglm-bench",
) -> dict[str, Any]:
    """The parts asked for, in order; a dict ready for JSON."""
    started = time.perf_counter()
    result: dict[str, Any] = {"env": env_info(device), "copy_GBps": copy_bandwidth(device)}
    result["attention_backend"] = ATTENTION["backend"]
    print(f"[bench_quant] env {json.dumps(result)}", flush=True)
    if "kernels" in parts:
        result["kernels"] = check_kernels(device)
        print(f"[bench_quant] kernels {json.dumps(result['kernels'])}", flush=True)
    if "linears" in parts:
        result["linears"] = bench_linears(device, list(token_counts))
        print("[bench_quant] linears done", flush=True)
    if "model" in parts:
        result["model"] = bench_model(model, device, list(formats), cache_dir)
    result["elapsed_s"] = time.perf_counter() - started
    return result


# --- through the engine: the gpu-suite measurement -----------------------------------------------------------


def _engine_figures(ctx: Any, quantization: str, ref_logits: torch.Tensor | None) -> dict[str, Any]:
    """One engine (bf16 weights quantized as asked): single-stream decode, offline throughput, prompt logits."""
    import gc

    from openautoglm.engine.llm import LLM

    o = ctx.options
    start = time.perf_counter()
    llm = LLM(ctx.engine_config(quantization=quantization))
    res: dict[str, Any] = {"load_s": time.perf_counter() - start}
    arch, device = llm.core.arch, llm.core.device
    from openautoglm.ops.bench_gpu import stream_one  # bench_gpu imports this module at its end

    prompt = synthetic_prompts(1, (o.decode_prompt_len, o.decode_prompt_len), arch.vocab_size, o.seed + 1)[0]
    stream_one(llm, prompt, 8, "warm")
    runs = [stream_one(llm, prompt, o.decode_new_tokens, f"{quantization}-{i}") for i in range(2)]
    res["single_stream"] = max(runs, key=lambda r: r["decode_tokens_per_s"])
    prompts = synthetic_prompts(o.offline_requests, o.offline_input_len, arch.vocab_size, o.seed)
    from openautoglm.ops.bench_gpu import offline_figures  # bench_gpu imports this module at its end

    res["offline"] = offline_figures(llm, prompts, o.offline_output_len)
    logits = prompt_logits(llm.core.runner.model, arch, device)
    if ref_logits is not None:
        res["logits_vs_bf16"] = compare_logits(ref_logits, logits)
    res["_logits"] = logits
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def measure_quantized_engines(ctx: Any) -> dict[str, Any]:
    """bf16, int8 and fp8 engines of the suite's model, one after the other, on the same requests: single-stream
    decode and offline throughput ratios against bf16, and prompt-logit agreement (cosine, top-1)."""
    ctx.release_engine()
    out: dict[str, Any] = {}
    ref = None
    hopper = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
    formats = ["none", "int8"] + (["fp8"] if hopper else [])
    for fmt in formats:
        res = _engine_figures(ctx, fmt, ref)
        logits = res.pop("_logits")
        ref = logits if ref is None else ref
        out[fmt] = res
        print(f"[bench_quant] engine {fmt}: {json.dumps(res)}", flush=True)
    base = out["none"]
    for fmt in formats[1:]:
        r = out[fmt]
        r["single_stream_over_bf16"] = (
            r["single_stream"]["decode_tokens_per_s"] / base["single_stream"]["decode_tokens_per_s"]
        )
        r["offline_over_bf16"] = r["offline"]["total_tokens_per_s"] / base["offline"]["total_tokens_per_s"]
    out["targets"] = {
        "int8_single_stream_over_bf16": {"measured": out["int8"]["single_stream_over_bf16"], "target": 1.6},
        **(
            {"fp8_offline_over_bf16": {"measured": out["fp8"]["offline_over_bf16"], "target": 1.3}}
            if "fp8" in out
            else {}
        ),
    }
    return out


def register_quantization_measurements() -> None:
    """Add ``quantization`` (``measure_quantized_engines``) to ``autoglm bench gpu-suite``, once."""
    from openautoglm.ops import bench_gpu

    if "quantization" not in {m.name for m in bench_gpu.MEASUREMENTS}:
        bench_gpu.register_measurement(
            bench_gpu.Measurement("quantization", measure_quantized_engines), before="transformers_generate_batch"
        )


def _summary(result: dict[str, Any]) -> str:
    lines = [f"GPU {result['env']['gpu']} | torch {result['env']['torch']} | triton {result['env']['triton']}"]
    lines.append(f"copy {result['copy_GBps']:.0f} GB/s | kernels {result.get('kernels')}")
    for name, rows in result.get("linears", {}).items():
        if not isinstance(rows, list):
            lines.append(f"{name}: {rows}")
            continue
        for r in rows:
            lines.append(
                f"{name:13s} M={r['tokens']:5d} bf16 {r['bf16_ms'] * 1e3:7.1f}us int8 default "
                f"{r['int8_default_ms'] * 1e3:7.1f}us best {r['int8_best_ms'] * 1e3:7.1f}us {r['int8_best']} "
                f"fp8 {r['fp8_ms'] * 1e3:7.1f}us"
            )
    for fmt, r in result.get("model", {}).get("formats", {}).items():
        acc = r.get("vs_bf16", {})
        lines.append(
            f"{fmt:5s} decode b1 {r['decode_b1_ms']:.2f} ms ({r['decode_b1_tokens_per_s']:.1f} tok/s, "
            f"x{r.get('decode_b1_speedup', 1):.2f}) | b256 {r['decode_b256_ms']:.1f} ms "
            f"(x{r.get('decode_b256_speedup', 1):.2f}) "
            f"| prefill {r['prefill_tokens_per_s']:.0f} tok/s (x{r.get('prefill_speedup', 1):.2f}) | offline est "
            f"{r['offline_estimate_tokens_per_s']:.0f} tok/s (x{r.get('offline_speedup', 1):.2f}) | {acc} "
            f"{r.get('vs_fp32', r.get('bf16_vs_fp32', ''))}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument("--model", default="glm-4-9b-0414")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default="kernels,linears,model", help="comma-separated: kernels, linears, model")
    parser.add_argument("--formats", default="none,int8,fp8", help="comma-separated: none, int8, fp8")
    parser.add_argument("--attention", choices=("reference", "triton"), default="reference")
    args = parser.parse_args()
    ATTENTION["backend"] = args.attention
    parts, formats = tuple(args.parts.split(",")), tuple(args.formats.split(","))
    result = run_suite(torch.device(args.device), args.model, parts, formats)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(_summary(result), flush=True)


if __name__ == "__main__":
    main()
