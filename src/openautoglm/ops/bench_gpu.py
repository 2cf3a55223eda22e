"""``autoglm bench gpu-suite``: the GPU benchmark set of one model's shapes in one process, written as JSON.

Each figure sits beside its reference, measured in the same run:

- ``copy_bandwidth``: a device-to-device copy (bytes read + written); with the model's weight bytes it gives
  the single-stream bound, tokens/s <= bandwidth / weight bytes.
- ``single_stream_decode``: one request (128-token prompt, 256 new tokens), decode tokens/s against that bound,
  with CUDA graphs and again eagerly.
- ``offline_throughput``: 512 requests, prompts uniform in 128..1024 tokens, 128 output tokens, EOS ignored.
- ``serve_latency``: ``bench serve`` (TTFT, TPOT, ITL) against ``autoglm serve`` with the same engine settings
  (a subprocess), at concurrency 1, 16 and 64 with 512-token prompts and 128 output tokens.
- ``transformers_generate_batch``: transformers' continuous batching on the same 512 requests and a model of
  the same shapes (random weights), after the engine has been released, in a child process of its own.

The measurements are a list (``MEASUREMENTS``) of named functions over one ``SuiteContext``; others (the
quantized variants, say) join with ``register_measurement`` and read earlier results from ``ctx.results``.
Results are written after every measurement, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from openautoglm.config.settings import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from openautoglm.engine.llm import LLM
from openautoglm.engine.runner import ModelRunner
from openautoglm.ops.bench_offline import synthetic_prompts, timed_engine_run
from openautoglm.ops.bench_reference import ReferenceJob, measure_reference
from openautoglm.protocol.errors import ConfigError
from openautoglm.protocol.request import GenerationRequest
from openautoglm.protocol.sampling import SamplingParams

logger = logging.getLogger(__name__)

GB = 1e9


@dataclass(slots=True)
class SuiteOptions:
    model: str = "glm-4-9b-0414"
    load_format: str = "dummy"
    dtype: str = "bfloat16"
    max_model_len: int = 4096
    block_size: int = 16
    gpu_memory_utilization: float = 0.8
    max_num_seqs: int = 512
    cuda_graph_max_batch: int = 512
    max_num_batched_tokens: int = 8192
    model_overrides: dict[str, Any] = field(default_factory=dict)  # extra ModelConfig fields (quantization…)
    tensor_parallel_size: int = 1
    programmatic_launch: bool | None = None  # engine.programmatic_launch (None: the engine's default)
    decode_prompt_len: int = 128
    decode_new_tokens: int = 256
    offline_requests: int = 512
    offline_input_len: tuple[int, int] = (128, 1024)
    offline_output_len: int = 128
    hf_requests: int | None = None  # default: offline_requests
    serve_concurrency: tuple[int, ...] = (1, 16, 64)
    serve_input_len: int = 512
    serve_output_len: int = 128
    seed: int = 0
    only: tuple[str, ...] = ()  # measurement names to run (empty: all)


@dataclass
class SuiteContext:
    options: SuiteOptions
    output: Path | None
    results: dict[str, Any] = field(default_factory=dict)
    _llm: LLM | None = None

    def engine_config(self, **model_overrides: Any) -> EngineConfig:
        o = self.options
        fields = {"model": o.model, "load_format": o.load_format, "dtype": o.dtype, "device": "cuda"}
        fields |= {"max_model_len": o.max_model_len, "seed": o.seed} | o.model_overrides | model_overrides
        return EngineConfig(
            model=ModelConfig(**fields),
            cache=CacheConfig(block_size=o.block_size, gpu_memory_utilization=o.gpu_memory_utilization),
            scheduler=SchedulerConfig(max_num_seqs=o.max_num_seqs, max_num_batched_tokens=o.max_num_batched_tokens),
            cuda_graph_max_batch=o.cuda_graph_max_batch,
            tensor_parallel_size=o.tensor_parallel_size,
            programmatic_launch=o.programmatic_launch,
        )

    def llm(self) -> LLM:
        """The suite's engine, built once and shared by the measurements that need it."""
        if self._llm is None:
            start = time.perf_counter()
            self._llm = LLM(self.engine_config())
            self.results.setdefault("engine", {})["load_s"] = time.perf_counter() - start
        return self._llm

    def release_engine(self) -> None:
        self._llm = None
        gc.collect()
        torch.cuda.empty_cache()

    def save(self) -> None:
        if self.output is not None:
            self.output.write_text(json.dumps(self.results, indent=2, default=str))


@dataclass(frozen=True, slots=True)
class Measurement:
    name: str
    run: Callable[[SuiteContext], dict[str, Any]]


# ---- measurements -----------------------------------------------------------------------------------------


def measure_environment(ctx: SuiteContext) -> dict[str, Any]:
    import transformers
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / (1 << 30), 1),
        "driver": _driver_version(),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "options": asdict(ctx.options),
    }


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0]


def measure_copy_bandwidth(ctx: SuiteContext) -> dict[str, Any]:
    """Median of 20 copies of 2 GiB (bytes read + written), timed with CUDA events after 3 warm-ups."""
    n = 1 << 30  # bf16 elements: 2 GiB
    pair = [torch.randn(n, device="cuda", dtype=torch.float32).to(torch.bfloat16)]
    pair.append(torch.empty_like(pair[0]))
    times = _event_times(lambda: pair[1].copy_(pair[0]), repeats=20, warmup=3)
    seconds = sorted(times)[len(times) // 2]
    pair.clear()
    torch.cuda.empty_cache()
    return {"bytes_moved": 2 * 2 * n, "median_ms": seconds * 1e3, "gb_per_s": 4 * n / seconds / GB}


def _event_times(fn: Callable[[], Any], repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def measure_single_stream(ctx: SuiteContext) -> dict[str, Any]:
    llm = ctx.llm()
    o = ctx.options
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.core.runner.model.parameters())  # type: ignore[attr-defined]
    bandwidth = ctx.results.get("copy_bandwidth", {}).get("gb_per_s")
    prompt = synthetic_prompts(1, (o.decode_prompt_len, o.decode_prompt_len), llm.core.arch.vocab_size, o.seed + 1)[0]
    runner = llm.core.runner
    out: dict[str, Any] = {"weight_gb": weight_bytes / GB, "prompt_len": len(prompt), "new_tokens": o.decode_new_tokens}
    from openautoglm.engine import pdl

    out["programmatic_launch"] = pdl.enabled()
    # graphs: the engine as it serves (CUDA graphs, async scheduling); graphs_sync: each step's tokens read
    # before the next step is launched; eager: no graphs.
    for mode in ("graphs", "graphs_sync", "eager"):
        runner.use_graphs = mode != "eager"
        llm.core.async_scheduling = mode == "graphs"
        stream_one(llm, prompt, 8, "warm")
        runs = [stream_one(llm, prompt, o.decode_new_tokens, f"{mode}-{i}") for i in range(2)]
        best = max(runs, key=lambda r: r["decode_tokens_per_s"])
        out[mode] = best
    runner.use_graphs = llm.core.async_scheduling = True
    out["graph_replay_ms"] = graph_replay_ms(runner, (1, 64, 256))
    if bandwidth:
        bound = bandwidth * GB / weight_bytes
        out["bound_tokens_per_s"] = bound
        out["fraction_of_bound"] = out["graphs"]["decode_tokens_per_s"] / bound
    out["graphs_over_eager"] = out["graphs"]["decode_tokens_per_s"] / out["eager"]["decode_tokens_per_s"]
    out["async_over_sync"] = out["graphs"]["decode_tokens_per_s"] / out["graphs_sync"]["decode_tokens_per_s"]
    return out


def graph_replay_ms(runner: ModelRunner, sizes: tuple[int, ...]) -> dict[str, float]:
    """GPU time of one captured decode step (median of 20 back-to-back replays) per batch size: the step's
    device time without the host's share. The inputs are dummy decodes against the null block."""
    out: dict[str, float] = {}
    for bs in sizes:
        graph = runner.dummy_decode_graph(bs)
        if graph is not None:
            times = _event_times(graph.replay, repeats=20, warmup=3)
            out[str(bs)] = sorted(times)[len(times) // 2] * 1e3
    return out


def stream_one(llm: LLM, prompt: list[int], new_tokens: int, tag: str) -> dict[str, float]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    request = GenerationRequest(f"single-{tag}-{time.monotonic_ns()}", prompt_token_ids=prompt, sampling=params)
    start = time.perf_counter()
    stamps: list[float] = []
    count = 0
    for chunk in llm.stream(request):
        for seq in chunk.outputs:
            if seq.token_ids_delta:
                count += len(seq.token_ids_delta)
                stamps.append(time.perf_counter())
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_ms": (stamps[0] - start) * 1e3,
        "tokens": count,
        "decode_tokens_per_s": (count - 1) / decode_s if decode_s > 0 else 0.0,
        "tpot_ms": decode_s / max(1, count - 1) * 1e3,
    }


def _offline_prompts(ctx: SuiteContext, vocab: int) -> list[list[int]]:
    o = ctx.options
    return synthetic_prompts(o.offline_requests, o.offline_input_len, vocab, o.seed)


def measure_offline(ctx: SuiteContext) -> dict[str, Any]:
    llm = ctx.llm()
    return offline_figures(llm, _offline_prompts(ctx, llm.core.arch.vocab_size), ctx.options.offline_output_len)


OFFLINE_WARMUP_REQUESTS = 32


def offline_figures(llm: LLM, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    """The offline workload through ``llm``: requests, tokens, seconds and throughputs. The warm-up runs the
    workload's first requests together, so the batched prefill and decode kernels the timed run launches are
    compiled before it (the first engine of a process otherwise pays seconds of compilation in its timing)."""
    out_tokens, elapsed = timed_engine_run(llm, prompts, output_len, prompts[:OFFLINE_WARMUP_REQUESTS])
    return _throughput(prompts, out_tokens, elapsed)


def _throughput(prompts: list[list[int]], out_tokens: int, elapsed: float) -> dict[str, Any]:
    in_tokens = sum(map(len, prompts))
    return {
        "requests": len(prompts),
        "input_tokens": in_tokens,
        "output_tokens": out_tokens,
        "elapsed_s": elapsed,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (in_tokens + out_tokens) / elapsed,
    }


def measure_serve(ctx: SuiteContext) -> dict[str, Any]:
    """bench serve against ``autoglm serve`` of the suite's engine settings, started as a subprocess (in one
    process, the client, the server and the step loop would share one interpreter lock and skew latencies)."""
    import yaml

    from openautoglm.ops.bench_serve import run_bench_serve

    ctx.release_engine()  # the server loads its own copy
    o = ctx.options
    port = _free_port()
    settings = {"engine": ctx.engine_config().model_dump(mode="json"), "server": {"port": port, "grpc_port": 0}}
    config = Path(tempfile.mkdtemp(prefix="autoglm-bench-")) / "serve.yaml"
    config.write_text(yaml.safe_dump(settings))
    log = config.with_name("serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "openautoglm.cli.main", "serve", "--config", str(config), "--no-auth"],
        stdout=log,
        stderr=log,
    )
    out: dict[str, Any] = {}
    try:
        _wait_listening(port, server, timeout=600.0)
        for i, conc in enumerate(o.serve_concurrency):
            res = asyncio.run(
                run_bench_serve(
                    f"http://127.0.0.1:{port}", num_prompts=max(16, 4 * conc), max_concurrency=conc,
                    input_len=o.serve_input_len, output_len=o.serve_output_len, seed=o.seed + 100 + i,
                )
            )  # fmt: skip
            out[f"concurrency_{conc}"] = json.loads(res.to_json())
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, server: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ConfigError(f"the benchmark server exited with status {server.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise ConfigError(f"the benchmark server did not listen on port {port} within {timeout:.0f} s")


def measure_transformers(ctx: SuiteContext) -> dict[str, Any]:
    """transformers' generate_batch (continuous batching, sdpa) on the same requests, in a child process of its
    own after the engine has been released (ops/bench_reference.py says why); random weights of the same shapes
    with ``--load-format dummy``, else the checkpoint's."""
    from openautoglm.engine.loader import read_arch_config, resolve_checkpoint

    config = ctx.engine_config()
    path = resolve_checkpoint(config.model)
    ctx.release_engine()
    o = ctx.options
    prompts = _offline_prompts(ctx, read_arch_config(path).vocab_size)[: o.hf_requests or o.offline_requests]
    job = ReferenceJob(
        str(path), prompts, o.offline_output_len, dtype=o.dtype, device="cuda",
        random_weights=o.load_format == "dummy", seed=o.seed, warmup=[prompts[0][:64]],
    )  # fmt: skip
    reference = measure_reference(job)
    res = _throughput(prompts, reference.output_tokens, reference.elapsed_s)
    engine = ctx.results.get("offline_throughput")
    if engine and len(prompts) == engine["requests"]:
        res["engine_over_transformers"] = engine["total_tokens_per_s"] / res["total_tokens_per_s"]
    return res


MEASUREMENTS: list[Measurement] = [
    Measurement("environment", measure_environment),
    Measurement("copy_bandwidth", measure_copy_bandwidth),
    Measurement("single_stream_decode", measure_single_stream),
    Measurement("offline_throughput", measure_offline),
    Measurement("serve_latency", measure_serve),
    Measurement("transformers_generate_batch", measure_transformers),
]


def register_measurement(measurement: Measurement, *, before: str | None = None) -> None:
    """Add a measurement to the suite (before the named one, else at the end)."""
    names = [m.name for m in MEASUREMENTS]
    if measurement.name in names:
        raise ConfigError(f"a GPU suite measurement named {measurement.name!r} is already registered")
    MEASUREMENTS.insert(names.index(before) if before in names else len(MEASUREMENTS), measurement)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets next to what this run measured."""
    out: dict[str, Any] = {}
    single = results.get("single_stream_decode", {})
    if "fraction_of_bound" in single:
        out["single_stream_fraction_of_bound"] = {"measured": single["fraction_of_bound"], "target": 0.85}
    hf = results.get("transformers_generate_batch", {})
    if "engine_over_transformers" in hf:
        out["offline_over_transformers"] = {"measured": hf["engine_over_transformers"], "target": 15.0}
    tp = results.get("tensor_parallel", {})
    if "speedup" in tp:
        out["tensor_parallel_decode_speedup"] = {"measured": tp["speedup"], "target": tp["target"]}
    serve = results.get("serve_latency", {}).get("concurrency_1")
    if serve:
        out["ttft_p50_ms_concurrency_1"] = {"measured": serve["ttft_ms"]["median"], "target_max": 40.0}
    return out


def run_suite(options: SuiteOptions, output: Path | None) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise ConfigError("autoglm bench gpu-suite needs a CUDA GPU; this PyTorch build sees none")
    ctx = SuiteContext(options, output)
    known = {m.name for m in MEASUREMENTS}
    unknown = set(options.only) - known
    if unknown:
        raise ConfigError(f"unknown GPU suite measurements {sorted(unknown)}; known: {sorted(known)}", param="only")
    for m in MEASUREMENTS:
        if options.only and m.name not in options.only and m.name != "environment":
            continue
        logger.warning("Open-AutoGLM gpu-suite: %s …", m.name)
        start = time.perf_counter()
        try:
            ctx.results[m.name] = m.run(ctx) | {"wall_s": time.perf_counter() - start}
        except Exception as exc:  # one failed measurement is reported; the others still run
            logger.exception("Open-AutoGLM gpu-suite: %s failed", m.name)
            ctx.results[m.name] = {"error": f"{type(exc).__name__}: {exc}"}
        ctx.results["summary"] = summarize(ctx.results)
        ctx.save()
    ctx.release_engine()
    return ctx.results


def format_summary(results: dict[str, Any]) -> str:
    lines = []
    for name, value in results.get("summary", {}).items():
        target = value.get("target", value.get("target_max"))
        lines.append(f"{name}: {value['measured']:.3f} (target {target})")
    for name, value in results.items():
        if isinstance(value, dict) and "error" in value:
            lines.append(f"{name}: FAILED {value['error']}")
    return "\n".join(lines) if lines else "no results"


# int8 / fp8 engines against bf16 on the same requests (ops/bench_quant.py): the "quantization" measurement.
from openautoglm.ops.bench_quant import register_quantization_measurements  # noqa: E402
from openautoglm.ops.bench_tp import register_tensor_parallel_measurement  # noqa: E402

register_quantization_measurements()
register_tensor_parallel_measurement()  # tensor_parallel: N GPUs against one (ops/bench_tp.py)
