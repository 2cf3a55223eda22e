"""The admin API: keys under ``/admin/keys`` (scope keys:manage) and the audit log under ``/admin/audit``
(audit:read; pruning needs admin). Every change goes through gateway/keys.py, which audits it."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from openautoglm.gateway.keys import Actor
from openautoglm.gateway.service import Gateway
from openautoglm.protocol.openai import ErrorResponse
from openautoglm.server.http.auth import identity_of
from openautoglm.server.http.responses import OrjsonResponse

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in (
        (400, "Invalid parameters"),
        (401, "Missing or invalid credentials"),
        (403, "The caller lacks the route's scope"),
        (404, "No such key"),
        (429, "Address blocked after repeated authentication failures; see Retry-After"),
    )
}
router = APIRouter(tags=["Admin"], responses=_ERRORS)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    owner: str | None = Field(None, max_length=200, description="Default: the caller's tenant")
    scopes: list[str] = Field(min_length=1)
    models: list[str] | None = None
    expires_at: datetime | None = None
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrent: int | None = Field(None, ge=1)


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grace_s: float | None = Field(None, ge=0, description="Old secret stays valid this long (default from config)")


class AuditPrune(BaseModel):
    model_config = ConfigDict(extra="forbid")

    before: datetime


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def _actor(request: Request) -> Actor:
    identity = identity_of(request.scope)
    client = request.client.host if request.client else None
    return Actor(identity.subject if identity else "anonymous", request.state.request_id, client)


@router.get("/admin/keys")
async def list_keys(request: Request, owner: str | None = None) -> Response:
    records = await asyncio.to_thread(_gateway(request).keys.repo.list, owner)
    return OrjsonResponse({"object": "list", "data": [r.public() for r in records]})


@router.post("/admin/keys", status_code=201)
async def create_key(body: KeyCreate, request: Request) -> Response:
    gw, actor = _gateway(request), _actor(request)
    identity = identity_of(request.scope)
    owner = body.owner or (identity.tenant if identity and identity.tenant else actor.name)
    fields: dict[str, Any] = body.model_dump(exclude={"owner"})
    record, key = await asyncio.to_thread(lambda: gw.keys.create(actor, owner=owner, **fields))
    return OrjsonResponse({"key": key, **record.public()}, status_code=201)


@router.get("/admin/keys/{key_id}")
async def show_key(key_id: str, request: Request) -> Response:
    record = await asyncio.to_thread(_gateway(request).keys.repo.require, key_id)
    return OrjsonResponse(record.public())


@router.delete("/admin/keys/{key_id}")
async def revoke_key(key_id: str, request: Request) -> Response:
    gw = _gateway(request)
    record = await asyncio.to_thread(gw.keys.revoke, _actor(request), key_id)
    await gw.invalidate(key_id)
    return OrjsonResponse(record.public())


@router.post("/admin/keys/{key_id}/rotate")
async def rotate_key(key_id: str, request: Request, body: KeyRotate | None = None) -> Response:
    gw = _gateway(request)
    grace = body.grace_s if body and body.grace_s is not None else gw.settings.gateway.auth.rotation_grace_s
    record, key = await asyncio.to_thread(gw.keys.rotate, _actor(request), key_id, grace)
    await gw.invalidate(key_id)
    return OrjsonResponse({"key": key, **record.public()})


async def _set_disabled(request: Request, key_id: str, disabled: bool) -> Response:
    gw = _gateway(request)
    record = await asyncio.to_thread(gw.keys.set_disabled, _actor(request), key_id, disabled)
    await gw.invalidate(key_id)
    return OrjsonResponse(record.public())


@router.post("/admin/keys/{key_id}/disable")
async def disable_key(key_id: str, request: Request) -> Response:
    return await _set_disabled(request, key_id, True)


@router.post("/admin/keys/{key_id}/enable")
async def enable_key(key_id: str, request: Request) -> Response:
    return await _set_disabled(request, key_id, False)


@router.get("/admin/audit")
async def query_audit(
    request: Request,
    since: datetime | None = None,
    until: datetime | None = None,
    actor: str | None = None,
    action: str | None = None,
    after_seq: int = Query(0, ge=0),
    limit: int = Query(100, ge=1, le=1000),
) -> Response:
    records = await asyncio.to_thread(
        _gateway(request).audit.query,
        since=since, until=until, actor=actor, action=action, after_seq=after_seq, limit=limit,
    )  # fmt: skip
    data = [r.to_dict() for r in records]
    return OrjsonResponse({"object": "list", "data": data, "next_after_seq": data[-1]["seq"] if data else None})


@router.get("/admin/audit/verify")
async def verify_audit(request: Request) -> Response:
    report = await asyncio.to_thread(_gateway(request).audit.verify)
    return OrjsonResponse(report.__dict__)


@router.post("/admin/audit/prune")
async def prune_audit(body: AuditPrune, request: Request) -> Response:
    deleted = await asyncio.to_thread(_gateway(request).audit.prune, body.before, _actor(request).name)
    return OrjsonResponse({"deleted": deleted})
