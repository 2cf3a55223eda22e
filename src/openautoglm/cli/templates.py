"""`autoglm templates create|list|show|render`: prompt templates directly on the store (no server needed);
creating one is audited like the admin API does."""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from openautoglm.cli.common import build_settings, handle_errors
from openautoglm.gateway.service import open_database
from openautoglm.protocol.errors import InvalidRequestError
from openautoglm.store.audit import AuditEvent, AuditLog
from openautoglm.store.db import Database
from openautoglm.store.templates import PromptTemplateRepository
from openautoglm.tasks.templating import compile_template, render_template, template_variables

templates_app = typer.Typer(help="Create, list, show and render prompt templates.", no_args_is_help=True)
out = Console(soft_wrap=True)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file")]
VersionOpt = Annotated[int | None, typer.Option("--version", "-v", min=1, help="Default: the latest")]


def _db(config: Path | None) -> Database:
    return open_database(build_settings(config, {}))


def _print(data: Any) -> None:
    out.print_json(json.dumps(data, ensure_ascii=False))


@templates_app.command("create")
@handle_errors
def create(
    name: Annotated[str, typer.Argument(help="Template name (a new version if it exists)")],
    file: Annotated[Path, typer.Option("--file", "-f", help="The Jinja2 template text")],
    description: Annotated[str | None, typer.Option("--description", "-d")] = None,
    config: ConfigOpt = None,
) -> None:
    """Save a template (or its next version)."""
    text = file.read_text(encoding="utf-8")
    compile_template(text)
    db = _db(config)
    actor = f"cli:{getpass.getuser()}"
    saved = PromptTemplateRepository(db).add_version(
        name, text, template_variables(text), description=description, created_by=actor
    )
    target = f"template:{saved.name}@{saved.version}"
    AuditLog(db).append(AuditEvent(actor, "template.create", target, "ok", detail={"version": saved.version}))
    _print(saved.public(with_text=False))


@templates_app.command("list")
@handle_errors
def list_(config: ConfigOpt = None) -> None:
    """The latest version of every template."""
    _print([t.public(with_text=False) for t in PromptTemplateRepository(_db(config)).list()])


@templates_app.command("show")
@handle_errors
def show(name: str, version: VersionOpt = None, config: ConfigOpt = None) -> None:
    """One version of a template, with its text."""
    _print(PromptTemplateRepository(_db(config)).get(name, version).public())


@templates_app.command("render")
@handle_errors
def render(
    name: str,
    var: Annotated[list[str] | None, typer.Option("--var", help="name=value (repeatable); value may be JSON")] = None,
    version: VersionOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Render a template with variables and print the text."""
    variables: dict[str, Any] = {}
    for item in var or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequestError(f"--var takes name=value, got {item!r}", param="var")
        try:
            variables[key] = json.loads(value)
        except json.JSONDecodeError:
            variables[key] = value
    tpl = PromptTemplateRepository(_db(config)).get(name, version)
    typer.echo(render_template(tpl.template, variables))


def register(app: typer.Typer) -> None:
    app.add_typer(templates_app, name="templates")
