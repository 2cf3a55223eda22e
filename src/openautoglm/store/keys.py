"""API key records and their repository. Only hashes of secrets are stored; see gateway/keys.py."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from openautoglm.protocol.errors import InvalidRequestError, NotFoundError
from openautoglm.store.db import Database
from openautoglm.store.models import ApiKeyRow, format_ts, parse_ts


@dataclass(frozen=True)
class ApiKeyRecord:
    id: str
    name: str
    owner: str
    scopes: tuple[str, ...]
    secret_hash: str
    created_at: datetime
    models: tuple[str, ...] | None = None  # None: every model
    expires_at: datetime | None = None
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    previous_hash: str | None = None
    previous_valid_until: datetime | None = None
    last_used_at: datetime | None = None
    disabled: bool = False
    revoked_at: datetime | None = None

    def public(self) -> dict[str, Any]:
        """What admins may see: everything but the hashes."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name in ("secret_hash", "previous_hash"):
                continue
            value = getattr(self, f.name)
            out[f.name] = format_ts(value) if isinstance(value, datetime) else value
        out["scopes"] = list(self.scopes)
        out["models"] = None if self.models is None else list(self.models)
        return out


_TS_FIELDS = ("created_at", "expires_at", "previous_valid_until", "last_used_at", "revoked_at")


def _to_row(rec: ApiKeyRecord) -> dict[str, Any]:
    out = {f.name: getattr(rec, f.name) for f in fields(rec)}
    for name in _TS_FIELDS:
        out[name] = None if out[name] is None else format_ts(out[name])
    out["scopes"] = json.dumps(list(rec.scopes))
    out["models"] = None if rec.models is None else json.dumps(list(rec.models))
    return out


def _from_row(row: ApiKeyRow) -> ApiKeyRecord:
    values = {f.name: getattr(row, f.name) for f in fields(ApiKeyRecord)}
    for name in _TS_FIELDS:
        values[name] = None if values[name] is None else parse_ts(values[name])
    values["scopes"] = tuple(json.loads(row.scopes))
    values["models"] = None if row.models is None else tuple(json.loads(row.models))
    values["disabled"] = bool(row.disabled)
    return ApiKeyRecord(**values)


class ApiKeyRepository:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, record: ApiKeyRecord) -> ApiKeyRecord:
        try:
            with self.db.session() as s:
                s.add(ApiKeyRow(**_to_row(record)))
        except IntegrityError as exc:
            raise InvalidRequestError(f"an API key with id {record.id!r} exists already", param="id") from exc
        return record

    def get(self, key_id: str) -> ApiKeyRecord | None:
        with self.db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            return None if row is None else _from_row(row)

    def require(self, key_id: str) -> ApiKeyRecord:
        record = self.get(key_id)
        if record is None:
            raise NotFoundError(f"no API key with id {key_id!r}", param="key_id", code="key_not_found")
        return record

    def list(self, owner: str | None = None) -> Sequence[ApiKeyRecord]:
        with self.db.session() as s:
            query = select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
            if owner is not None:
                query = query.where(ApiKeyRow.owner == owner)
            return [_from_row(r) for r in s.scalars(query)]

    def update(self, key_id: str, **changes: Any) -> ApiKeyRecord:
        """Change fields of a key (names of ApiKeyRecord's fields); the updated record."""
        with self.db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFoundError(f"no API key with id {key_id!r}", param="key_id", code="key_not_found")
            updated = replace(_from_row(row), **changes)
            for name, value in _to_row(updated).items():
                setattr(row, name, value)
            return updated

    def touch(self, key_id: str, when: datetime) -> None:
        with self.db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is not None:
                row.last_used_at = format_ts(when)
