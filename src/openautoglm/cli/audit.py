"""`autoglm audit verify|export|prune` and `autoglm db upgrade`: the audit log and the store's schema."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from openautoglm.cli.common import build_settings, handle_errors
from openautoglm.gateway.service import open_database
from openautoglm.store.audit import AuditLog
from openautoglm.store.db import Database

audit_app = typer.Typer(help="Verify and export the tamper-evident audit log.", no_args_is_help=True)
db_app = typer.Typer(help="The store's database schema.", no_args_is_help=True)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file")]


def _log(config: Path | None) -> AuditLog:
    return AuditLog(open_database(build_settings(config, {})))


@audit_app.command("verify")
@handle_errors
def verify(config: ConfigOpt = None) -> None:
    """Walk the hash chain; exit 1 naming the first record that was edited, deleted or moved."""
    report = _log(config).verify()
    if report.ok:
        out.print(f"audit log OK: {report.checked} records verified")
        return
    err.print(f"[bold red]audit log TAMPERED[/]: first bad record {report.first_bad_seq}: {report.reason}")
    raise typer.Exit(1)


@audit_app.command("export")
@handle_errors
def export(
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON object per line (the only format)")] = True,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File (default: stdout)")] = None,
    since: Annotated[datetime | None, typer.Option("--since")] = None,
    until: Annotated[datetime | None, typer.Option("--until")] = None,
    actor: Annotated[str | None, typer.Option("--actor")] = None,
    action: Annotated[str | None, typer.Option("--action")] = None,
    config: ConfigOpt = None,
) -> None:
    """Export records (with their hashes, so the export can be verified elsewhere)."""
    log = _log(config)
    stream = output.open("w") if output else sys.stdout
    try:
        after = 0
        while True:
            page = log.query(since=since, until=until, actor=actor, action=action, after_seq=after, limit=1000)
            for record in page:
                stream.write(json.dumps(record.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")
            if len(page) < 1000:
                break
            after = page[-1].seq
    finally:
        if output:
            stream.close()


@audit_app.command("prune")
@handle_errors
def prune(
    older_than_days: Annotated[float, typer.Option("--older-than-days", min=0.0)],
    config: ConfigOpt = None,
) -> None:
    """Delete old records; an anchor keeps the rest verifiable."""
    before = datetime.now(timezone.utc) - timedelta(days=older_than_days)
    out.print(f"pruned {_log(config).prune(before, actor='cli')} records")


@db_app.command("upgrade")
@handle_errors
def upgrade(config: ConfigOpt = None) -> None:
    """Apply the store's migrations (servers also do this at start-up)."""
    settings = build_settings(config, {})
    revision = Database.from_config(settings.store).upgrade()
    out.print(f"store at revision {revision}")


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    app.add_typer(db_app, name="db")
