"""`autoglm bench …`: measurements, never assertions. Results go to docs/performance.md by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from openautoglm.cli.common import build_settings, handle_errors, setup_logging
from openautoglm.engine.core import resolve_device, resolve_dtype
from openautoglm.engine.loader import resolve_checkpoint
from openautoglm.ops.bench_offline import (
    Throughput,
    bench_engine,
    bench_transformers,
    parse_range,
    synthetic_prompts,
)

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
    as_json: Annotated[bool, typer.Option("--json")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Offline throughput of the engine (and transformers' generate_batch with --compare-transformers)."""
    setup_logging(verbose)
    settings = build_settings(config, {"model": model})
    lens = parse_range(input_len, "input_len")
    path = resolve_checkpoint(settings.engine.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = synthetic_prompts(num_requests, lens, vocab, seed)
    results = [bench_engine(settings.engine, prompts, output_len)]
    if compare_transformers:
        device = resolve_device(settings.engine.model.device)
        results.append(
            bench_transformers(str(path), prompts, output_len, resolve_dtype(settings.engine.model.dtype, device))
        )
    _report(results, as_json)


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


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
