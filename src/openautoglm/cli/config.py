"""`autoglm config show|validate|schema|docs`: see, check and document Open-AutoGLM's settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console

from openautoglm.cli.common import build_settings, err_console, handle_errors
from openautoglm.config.settings import Settings
from openautoglm.ops.config_check import ConfigReport, Issue, check_effective, check_file

config_app = typer.Typer(help="Show, validate and document Open-AutoGLM's configuration.", no_args_is_help=True)
out = Console(highlight=False, soft_wrap=True)


@config_app.command("show")
@handle_errors
def show(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML")] = False,
) -> None:
    """Print the effective settings (file < AUTOGLM_* environment), secrets masked."""
    settings = build_settings(config, {})
    data = settings.model_dump(mode="json")  # SecretStr fields dump as '**********'
    text = json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False)
    typer.echo(text.rstrip("\n"))


def print_report(report: ConfigReport, console: Console) -> None:
    style = {"error": "bold red", "warning": "yellow"}
    for issue in sorted(report.issues, key=_order):
        console.print(issue.format(report.file), style=style[issue.severity], markup=False, soft_wrap=True)


def _order(issue: Issue) -> tuple[int, int]:
    return (issue.line or 0, issue.column or 0)


@config_app.command("validate")
def validate(
    file: Annotated[Path, typer.Argument(help="YAML settings file to check")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report on stdout")] = False,
) -> None:
    """Check a configuration file: YAML syntax, unknown keys, types and ranges, and rules across settings.

    Exits 0 when there is no error (warnings allowed), 1 otherwise.
    """
    report = check_file(file)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, out)
        errors, warnings = len(report.errors), len(report.issues) - len(report.errors)
        verdict = "[green]valid[/]" if report.ok else "[bold red]invalid[/]"
        out.print(f"{file}: {verdict} ({errors} error(s), {warnings} warning(s))")
    raise typer.Exit(0 if report.ok else 1)


@config_app.command("schema")
def schema() -> None:
    """Print the settings' JSON Schema (for editors: yaml-language-server, VS Code, JetBrains)."""
    from openautoglm.ops.config_docs import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@config_app.command("docs")
def docs(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of stdout")] = None,
) -> None:
    """Generate the configuration reference (docs/configuration.md) from the schema."""
    from openautoglm.ops.config_docs import render_markdown

    text = render_markdown()
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        err_console.print(f"wrote {output}")


def preflight_file(config: Path | None) -> ConfigReport | None:
    """``serve``'s check of its --config file before anything loads: syntax, keys, types (exit 1 on errors)."""
    if config is None:
        return None
    report = check_file(config, semantic=False)
    _gate(report)
    return report


def preflight_settings(settings: Settings, file_report: ConfigReport | None) -> None:
    """``serve``'s check of the final settings (rules across fields); warnings print, errors exit 2 like every
    other refusal of ``serve`` (``config validate`` itself exits 1)."""
    _gate(check_effective(settings, file_report))


def _gate(report: ConfigReport) -> None:
    print_report(report, err_console)
    if not report.ok:
        err_console.print("[bold red]error:[/] the configuration is invalid; `autoglm config validate` explains")
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
