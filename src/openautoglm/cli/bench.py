"""`autoglm bench …`: measurements, never assertions. Results go to docs/performance.md by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from openautoglm.cli.common import TensorParallelOpt, build_settings, handle_errors, setup_logging
from openautoglm.engine.core import resolve_device, resolve_dtype
from openautoglm.engine.loader import resolve_checkpoint
from openautoglm.engine.platform import dtype_name
from openautoglm.ops.bench_offline import Throughput, bench_engine, parse_range, synthetic_prompts
from openautoglm.ops.bench_reference import ReferenceJob, measure_reference

bench_app = typer.Typer(help="Benchmarks: throughput and latency, measured against a reference in the same run.")


@bench_app.command("offline")
@handle_errors
def offline(
    model: Annotated[str | None, typer.Option("--model", "-m")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
    num_requests: Annotated[int, typer.Option("--num-requests")] = 64,
    input_len: Annotated[str, typer.Option("--input-len", help="N or A:B (uniform)")] = "16:128",
    output_len: Annotated[int, typer.Option("--output-len")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    compare_transformers: Annotated[bool, typer.Option("--compare-transformers")] = False,
    tensor_parallel_size: TensorParallelOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Offline throughput of the engine (and transformers' generate_batch with --compare-transformers)."""
    setup_logging(verbose)
    settings = build_settings(config, {"model": model}, engine={"tensor_parallel_size": tensor_parallel_size})
    lens = parse_range(input_len, "input_len")
    path = resolve_checkpoint(settings.engine.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = synthetic_prompts(num_requests, lens, vocab, seed)
    results = [bench_engine(settings.engine, prompts, output_len)]
    if compare_transformers:
        device = resolve_device(settings.engine.model.device)
        dtype = dtype_name(resolve_dtype(settings.engine.model.dtype, device))
        job = ReferenceJob(str(path), prompts, output_len, dtype=dtype, device=str(device), warmup=prompts[:8])
        results.append(measure_reference(job))
    _report(results, as_json)


@bench_app.command("serve")
@handle_errors
def serve(
    url: Annotated[str, typer.Option("--url", help="Base URL of a running server")] = "http://127.0.0.1:8000",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model name; default: the server's first")] = None,
    num_prompts: Annotated[int, typer.Option("--num-prompts")] = 100,
    request_rate: Annotated[str, typer.Option("--request-rate", help="Requests/s (Poisson) or inf")] = "inf",
    max_concurrency: Annotated[int | None, typer.Option("--max-concurrency")] = None,
    input_len: Annotated[int, typer.Option("--input-len")] = 128,
    output_len: Annotated[int, typer.Option("--output-len")] = 128,
    endpoint: Annotated[str, typer.Option("--endpoint")] = "/v1/completions",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Load a running server with streaming requests; report throughput and latency percentiles."""
    import asyncio
    import math

    from openautoglm.ops.bench_serve import format_result, run_bench_serve
    from openautoglm.protocol.errors import ConfigError

    try:
        rate = math.inf if request_rate.lower() == "inf" else float(request_rate)
    except ValueError as exc:
        raise ConfigError(f"--request-rate must be a number of requests/s or inf, got {request_rate!r}") from exc
    result = asyncio.run(
        run_bench_serve(url, model, num_prompts, rate, max_concurrency, input_len, output_len, endpoint, seed)
    )
    typer.echo(result.to_json() if as_json else format_result(result))


def _report(results: list[Throughput], as_json: bool) -> None:
    ratio = results[0].output_tokens_per_s / results[1].output_tokens_per_s if len(results) > 1 else None
    if as_json:
        typer.echo(json.dumps({"results": [r.to_dict() for r in results], "output_tokens_per_s_ratio": ratio}))
        return
    table = Table(title="autoglm bench offline")
    for col in ("engine", "requests", "in tok", "out tok", "seconds", "req/s", "out tok/s", "total tok/s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            r.name, str(r.num_requests), str(r.input_tokens), str(r.output_tokens), f"{r.elapsed_s:.2f}",
            f"{r.requests_per_s:.2f}", f"{r.output_tokens_per_s:.1f}", f"{r.total_tokens_per_s:.1f}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    if ratio is not None:
        console.print(f"output tokens/s ratio (Open-AutoGLM / transformers): {ratio:.2f}x")


@bench_app.command("gpu-suite")
@handle_errors
def gpu_suite(
    model: Annotated[str, typer.Option("--model", "-m", help="Named config or checkpoint")] = "glm-4-9b-0414",
    load_format: Annotated[str, typer.Option("--load-format")] = "dummy",
    output: Annotated[Path, typer.Option("--output", "-o", help="JSON results file")] = Path("gpu-suite.json"),
    only: Annotated[list[str] | None, typer.Option("--only", help="Run only these measurements")] = None,
    offline_requests: Annotated[int, typer.Option("--offline-requests")] = 512,
    hf_requests: Annotated[int | None, typer.Option("--hf-requests", help="Default: --offline-requests")] = None,
    gpu_memory_utilization: Annotated[float, typer.Option("--gpu-memory-utilization")] = 0.8,
    tensor_parallel_size: Annotated[
        int,
        typer.Option(
            "--tensor-parallel-size",
            help="GPUs the suite's engine splits the model over; the "
            "tensor_parallel measurement compares this many (at least 2) with one",
        ),
    ] = 1,
    programmatic_launch: Annotated[
        bool | None,
        typer.Option(
            "--programmatic-launch/--no-programmatic-launch",
            help="engine.programmatic_launch for every engine of the suite (default: the engine's default)",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The GPU benchmark set (bandwidth bound, single-stream decode, offline vs transformers, serve latency,
    tensor-parallel decode)."""
    from openautoglm.ops.bench_gpu import SuiteOptions, format_summary, run_suite

    setup_logging(verbose)
    options = SuiteOptions(
        model=model, load_format=load_format, offline_requests=offline_requests, hf_requests=hf_requests,
        gpu_memory_utilization=gpu_memory_utilization, only=tuple(only or ()),
        tensor_parallel_size=tensor_parallel_size, programmatic_launch=programmatic_launch,
    )  # fmt: skip
    results = run_suite(options, output)
    typer.echo(format_summary(results))
    typer.echo(f"results: {output}")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
