"""`autoglm doctor`: check this machine and configuration before serving; exit 1 on any FAIL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from openautoglm.cli.common import build_settings, handle_errors
from openautoglm.ops.config_check import check_file
from openautoglm.ops.doctor import Check

STYLE = {"PASS": "green", "WARN": "yellow", "FAIL": "bold red"}


@handle_errors
def doctor(
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model to size against this machine (default: the config's)")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file to check")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report")] = False,
) -> None:
    """Check Python, packages, CUDA and GPUs, whether the model fits, ports, Redis, database and disk."""
    from openautoglm.ops.doctor import report_dict, run_doctor

    if config is not None and not check_file(config, semantic=False).ok:
        settings = build_settings(None, {"model": model})  # the config check below reports the file's errors
    else:
        settings = build_settings(config, {"model": model})
    checks = run_doctor(settings, model=model, config_file=config)
    report = report_dict(checks)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        table = Table(show_header=True, header_style="bold")
        for col in ("", "check", "detail", "fix"):
            table.add_column(col, overflow="fold")
        for c in checks:
            table.add_row(f"[{STYLE[c.status]}]{c.status}[/]", c.name, c.detail, c.fix or "")
        Console(highlight=False).print(table)
        _summary(checks)
    raise typer.Exit(0 if report["ok"] else 1)


def _summary(checks: list[Check]) -> None:
    counts = {s: sum(c.status == s for c in checks) for s in STYLE}
    Console(highlight=False).print(", ".join(f"[{STYLE[s]}]{n} {s}[/]" for s, n in counts.items()))


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
