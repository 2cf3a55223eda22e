"""`autoglm estimate`: GPU memory a model needs for a context length and concurrency, and which GPUs fit it."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from openautoglm.cli.common import handle_errors
from openautoglm.ops.estimate import COMMON_GPUS, Estimate, GiB, arch_for, estimate
from openautoglm.protocol.errors import ConfigError

out = Console(highlight=False)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def render(e: Estimate, utilization: float, console: Console) -> None:
    tp = f" (per GPU of {e.tensor_parallel_size})" if e.tensor_parallel_size > 1 else ""
    console.print(f"[bold]{e.model}[/]: {e.num_parameters:,} parameters, {e.dtype}, quantization {e.quantization}")
    rows = [
        (f"weights{tp}", _gib(e.weight_bytes)),
        ("KV cache per token", f"{e.kv_bytes_per_token / 1024:.1f} KiB"),
        (f"KV cache, {e.max_num_seqs} x {e.max_model_len} tokens", _gib(e.kv_bytes)),
        (f"activation peak ({e.max_num_batched_tokens} tokens/step)", _gib(e.activation_bytes)),
        ("runtime overhead (CUDA context)", _gib(e.overhead_bytes)),
        ("total per GPU", _gib(e.total_bytes)),
    ]
    width = max(len(label) for label, _ in rows) + 2
    for label, value in rows:
        console.print(f"  {label + ':':<{width}} {value}")
    table = Table(title=f"Common GPUs at gpu_memory_utilization {utilization}")
    for col in ("GPU", "memory", "fits", f"max seqs x {e.max_model_len}", "note"):
        table.add_column(col)
    for gpu in COMMON_GPUS:
        note = e.supported_on(gpu) or ""
        fits = "[green]yes[/]" if e.fits(gpu, utilization) else "[red]no[/]"
        seqs = str(e.max_seqs_on(gpu, utilization)) if not note else "-"
        table.add_row(gpu.name, _gib(gpu.memory_bytes), fits, seqs, note)
    console.print(table)


@handle_errors
def estimate_cmd(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Checkpoint directory or hub id (reads config.json only)")
    ] = None,
    config_name: Annotated[
        str | None, typer.Option("--config-name", help="A built-in named config, e.g. glm-4-9b-0414")
    ] = None,
    dtype: Annotated[Literal["bfloat16", "float16", "float32"], typer.Option(help="Weights' dtype")] = "bfloat16",
    quantization: Annotated[Literal["none", "int8", "fp8"], typer.Option(help="Load-time quantization")] = "none",
    max_model_len: Annotated[int | None, typer.Option(help="Context length (default: the model's)")] = None,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Sequences at once, each at max_model_len")] = 256,
    max_num_batched_tokens: Annotated[int, typer.Option(min=1, help="Tokens per engine step")] = 2048,
    block_size: Annotated[int, typer.Option(min=1, help="KV cache block size")] = 16,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", "--tp", min=1)] = 1,
    gpu_memory_utilization: Annotated[float, typer.Option(min=0.05, max=1.0)] = 0.9,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
) -> None:
    """Estimate GPU memory: weights, KV cache per token and for the concurrency, activations, total per GPU."""
    name = config_name or model
    if name is None or (config_name and model):
        raise ConfigError("give exactly one of --model and --config-name")
    e = estimate(
        arch_for(name),
        model=name,
        dtype=dtype,
        quantization=quantization,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        block_size=block_size,
        tensor_parallel_size=tensor_parallel_size,
    )
    if as_json:
        gpus = [
            {"gpu": g.name, "memory_bytes": g.memory_bytes, "fits": e.fits(g, gpu_memory_utilization),
             "max_num_seqs": e.max_seqs_on(g, gpu_memory_utilization), "note": e.supported_on(g)}
            for g in COMMON_GPUS
        ]  # fmt: skip
        typer.echo(json.dumps({**e.to_dict(), "gpus": gpus}, indent=2))
    else:
        render(e, gpu_memory_utilization, out)


def register(app: typer.Typer) -> None:
    app.command("estimate")(estimate_cmd)
