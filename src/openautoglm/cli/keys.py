"""`autoglm keys …`: manage API keys directly on the store (no server needed). Running servers see changes
within gateway.auth.key_cache_ttl_s, at once when Redis is configured."""

from __future__ import annotations

import getpass
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from openautoglm.cli.common import build_settings, handle_errors
from openautoglm.config.settings import Settings
from openautoglm.gateway.keys import Actor, KeyManager
from openautoglm.gateway.scopes import ALL_SCOPES
from openautoglm.gateway.service import cli_key_manager, open_database
from openautoglm.store.keys import ApiKeyRecord

keys_app = typer.Typer(help="Create, list and change API keys (directly on the store).", no_args_is_help=True)
out = Console(soft_wrap=True)
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON")]


def _manager(config: Path | None) -> tuple[Settings, KeyManager]:
    settings = build_settings(config, {})
    return settings, cli_key_manager(settings, open_database(settings))


def _actor() -> Actor:
    return Actor(f"cli:{getpass.getuser()}")


def _show(record: ApiKeyRecord, as_json: bool, key: str | None = None) -> None:
    data: dict[str, Any] = record.public()
    if key is not None:
        data = {"key": key, **data}
    if as_json:
        out.print_json(json.dumps(data))
        return
    for name, value in data.items():
        out.print(f"{name:>22}: {value}", highlight=False)


@keys_app.command("create")
@handle_errors
def create(
    name: Annotated[str, typer.Option("--name", help="What the key is for")],
    owner: Annotated[str, typer.Option("--owner", help="Who owns it (the tenant)")] = "admin",
    scope: Annotated[list[str] | None, typer.Option("--scope", "-s", help=f"Repeatable; one of {ALL_SCOPES}")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="Every scope (bootstrap the first admin key)")] = False,
    model: Annotated[list[str] | None, typer.Option("--model", help="Allowed model (repeatable; default all)")] = None,
    expires_in_days: Annotated[float | None, typer.Option("--expires-in-days", min=0.0)] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute")] = None,
    max_concurrent: Annotated[int | None, typer.Option("--max-concurrent", min=1)] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it: the secret is shown this once and never stored."""
    _, manager = _manager(config)
    expires = None if expires_in_days is None else datetime.now(timezone.utc) + timedelta(days=expires_in_days)
    scopes = list(ALL_SCOPES) if admin else (scope or [])
    record, key = manager.create(
        _actor(), name=name, owner=owner, scopes=scopes, models=model, expires_at=expires, rpm=rpm, tpm=tpm,
        max_concurrent=max_concurrent,
    )  # fmt: skip
    _show(record, as_json, key)
    if not as_json:
        out.print("[yellow]Store the key now: it is not shown again.[/yellow]")


@keys_app.command("list")
@handle_errors
def list_keys(
    owner: Annotated[str | None, typer.Option("--owner")] = None, config: ConfigOpt = None, as_json: JsonOpt = False
) -> None:
    """List keys (never their secrets)."""
    _, manager = _manager(config)
    records = manager.repo.list(owner)
    if as_json:
        out.print_json(json.dumps([r.public() for r in records]))
        return
    for r in records:
        state = "revoked" if r.revoked_at else "disabled" if r.disabled else "active"
        out.print(f"{r.id}  {state:<8}  {r.owner:<16}  {r.name:<20}  {','.join(r.scopes)}", highlight=False)


@keys_app.command("show")
@handle_errors
def show(key_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    _, manager = _manager(config)
    _show(manager.repo.require(key_id), as_json)


@keys_app.command("revoke")
@handle_errors
def revoke(key_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Revoke a key for good."""
    _, manager = _manager(config)
    _show(manager.revoke(_actor(), key_id), as_json)


@keys_app.command("rotate")
@handle_errors
def rotate(
    key_id: str,
    grace: Annotated[float | None, typer.Option("--grace", min=0.0, help="Seconds the old secret stays valid")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give a key a new secret (printed once); the old one works until the grace period ends."""
    settings, manager = _manager(config)
    record, key = manager.rotate(_actor(), key_id, settings.gateway.auth.rotation_grace_s if grace is None else grace)
    _show(record, as_json, key)


@keys_app.command("disable")
@handle_errors
def disable(key_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    _, manager = _manager(config)
    _show(manager.set_disabled(_actor(), key_id, True), as_json)


@keys_app.command("enable")
@handle_errors
def enable(key_id: str, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    _, manager = _manager(config)
    _show(manager.set_disabled(_actor(), key_id, False), as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")
