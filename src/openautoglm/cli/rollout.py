"""`autoglm rollout start|status|promote|rollback`: canary rollouts of a running server, through its admin API
(``/admin/rollouts/{model}``, scope admin). The server audits every step with this key as the actor."""

from __future__ import annotations

import json
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from openautoglm.cli.common import handle_errors
from openautoglm.protocol.errors import (
    AuthenticationError,
    AutoGLMError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServiceUnavailableError,
)

rollout_app = typer.Typer(help="Canary rollouts of a running server (admin API).", no_args_is_help=True)
out = Console(soft_wrap=True)
UrlOpt = Annotated[str, typer.Option("--url", help="The server's base URL")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="AUTOGLM_API_KEY", show_envvar=True, help="An API key with the admin scope"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the server's JSON")]
ModelArg = Annotated[str, typer.Argument(help="The routed model (deployment) name")]
ReasonOpt = Annotated[str | None, typer.Option("--reason", help="Why (written to the audit log)")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _call(method: str, url: str, path: str, api_key: str | None, body: dict[str, Any] | None = None) -> Any:
    """One admin request; the server's error (or an unreachable server) becomes an AutoGLMError saying why."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise ServiceUnavailableError(f"cannot reach the Open-AutoGLM server at {url}: {exc}") from exc
    if r.status_code < 400:
        return r.json()
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:500]
    if r.status_code == 401:
        raise AuthenticationError(f"{message} (give --api-key or set AUTOGLM_API_KEY)")
    kind: type[AutoGLMError] = {403: PermissionDeniedError, 404: NotFoundError}.get(r.status_code, InvalidRequestError)
    if r.status_code >= 500:
        kind = ServiceUnavailableError
    raise kind(f"the server answered {r.status_code}: {message}")


def _show(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(data))
        return
    canary = data.get("canary_version") or "-"
    out.print(f"{data['deployment']}: {data['status']}", highlight=False)
    out.print(f"  stable {data['stable_version']}   canary {canary} at {data['weight']:g}%", highlight=False)
    steps = ", ".join(f"{s:g}%" for s in data["steps"]) or "-"
    out.print(f"  steps {steps}   automatic analysis {'on' if data['auto'] else 'off'}", highlight=False)
    for version, w in data.get("windows", {}).items():
        p95 = f"{w['p95_s'] * 1000:.0f} ms" if w.get("p95_s") is not None else "-"
        out.print(f"  {version}: {w['requests']} requests, {w['errors']} errors, p95 {p95}", highlight=False)
    for e in data.get("history", [])[-5:]:
        out.print(
            f"  {e['action']:>8} {e['version']} {e['weight_from']:g}% → {e['weight_to']:g}% by {e['actor']}: "
            f"{e['reason']}",
            highlight=False,
        )


def _path(model: str, action: str | None = None) -> str:
    return f"/admin/rollouts/{model}" + (f"/{action}" if action else "")


@rollout_app.command("start")
@handle_errors
def start(
    model: ModelArg,
    version: Annotated[str, typer.Option("--version", help="The canary version (a backend's version label)")],
    step: Annotated[
        list[float] | None, typer.Option("--step", help="Canary weight in percent, repeatable (default 5 50 100)")
    ] = None,
    manual: Annotated[bool, typer.Option("--manual", help="No automatic promotion or rollback")] = False,
    url: UrlOpt = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Start rolling ``version`` out to the model's users, at the first step's share."""
    body: dict[str, Any] = {"version": version, "auto": not manual}
    if step:
        body["steps"] = step
    _show(_call("POST", url, _path(model, "start"), api_key, body), as_json)


@rollout_app.command("status")
@handle_errors
def status(model: ModelArg, url: UrlOpt = DEFAULT_URL, api_key: ApiKeyOpt = None, as_json: JsonOpt = False) -> None:
    """The rollout's state, its analysis windows and its last steps."""
    _show(_call("GET", url, _path(model), api_key), as_json)


@rollout_app.command("promote")
@handle_errors
def promote(
    model: ModelArg, reason: ReasonOpt = None, url: UrlOpt = DEFAULT_URL, api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Move the canary to its next step (past the last one, it becomes stable)."""
    body = {"reason": reason} if reason else None
    _show(_call("POST", url, _path(model, "promote"), api_key, body), as_json)


@rollout_app.command("rollback")
@handle_errors
def rollback(
    model: ModelArg, reason: ReasonOpt = None, url: UrlOpt = DEFAULT_URL, api_key: ApiKeyOpt = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Send every user back to the stable version at once."""
    body = {"reason": reason} if reason else None
    _show(_call("POST", url, _path(model, "rollback"), api_key, body), as_json)


def register(app: typer.Typer) -> None:
    app.add_typer(rollout_app, name="rollout")
