"""The append-only audit log: each record carries the hash of the one before it (a hash chain).

Editing, deleting or reordering any record breaks the chain at that record, and :meth:`AuditLog.verify` names
it. Pruning (retention) deletes the oldest records and writes an anchor (the last pruned record's sequence
number and hash) plus an ``audit.prune`` record into the chain, so what remains still verifies.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from openautoglm.store.db import Database
from openautoglm.store.models import AuditAnchorRow, AuditHeadRow, AuditRow, format_ts, now_ts

GENESIS = "0" * 64
PRUNE_ACTION = "audit.prune"


@dataclass(frozen=True)
class AuditEvent:
    actor: str
    action: str
    target: str
    outcome: str
    request_id: str | None = None
    client: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    ts: str
    actor: str
    action: str
    target: str
    outcome: str
    request_id: str | None
    client: str | None
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    reason: str | None = None


def _canonical(detail: dict[str, Any]) -> str:
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(row: AuditRow) -> str:
    """SHA-256 over every field of the record but its own hash, the previous record's hash included."""
    fields = [
        row.seq, row.ts, row.actor, row.action, row.target, row.outcome,
        row.request_id, row.client, row.detail, row.prev_hash,
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def _record(row: AuditRow) -> AuditRecord:
    return AuditRecord(
        seq=row.seq, ts=row.ts, actor=row.actor, action=row.action, target=row.target, outcome=row.outcome,
        request_id=row.request_id, client=row.client, detail=json.loads(row.detail), prev_hash=row.prev_hash,
        hash=row.hash,
    )  # fmt: skip


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def append(self, event: AuditEvent) -> AuditRecord:
        with self.db.session() as s:
            return _record(self._append(s, event))

    def _append(self, s: Session, event: AuditEvent) -> AuditRow:
        # The head row is locked (SELECT … FOR UPDATE on PostgreSQL; SQLite transactions hold the write lock from
        # BEGIN), so appenders on every replica take turns and the chain never forks.
        head = s.execute(select(AuditHeadRow).where(AuditHeadRow.id == 1).with_for_update()).scalar_one()
        row = AuditRow(
            seq=head.seq + 1, ts=now_ts(), actor=event.actor[:200], action=event.action[:100],
            target=event.target[:400], outcome=event.outcome[:50], request_id=event.request_id,
            client=event.client, detail=_canonical(event.detail), prev_hash=head.hash,
        )  # fmt: skip
        row.hash = record_hash(row)
        s.add(row)
        head.seq, head.hash = row.seq, row.hash
        return row

    def query(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        actor: str | None = None,
        action: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[AuditRecord]:
        """Records in chain order, filtered; ``after_seq`` pages on from the last one seen."""
        query = select(AuditRow).where(AuditRow.seq > after_seq).order_by(AuditRow.seq).limit(limit)
        if since is not None:
            query = query.where(AuditRow.ts >= format_ts(since))
        if until is not None:
            query = query.where(AuditRow.ts < format_ts(until))
        if actor is not None:
            query = query.where(AuditRow.actor == actor)
        if action is not None:
            query = query.where(AuditRow.action == action)
        with self.db.session() as s:
            return [_record(r) for r in s.scalars(query)]

    def iter_all(self, batch: int = 1000) -> Iterator[AuditRecord]:
        after = 0
        while True:
            page = self.query(after_seq=after, limit=batch)
            yield from page
            if len(page) < batch:
                return
            after = page[-1].seq

    def verify(self, batch: int = 1000) -> VerifyReport:
        """Walk the chain from its anchor (or the genesis) and name the first record that does not fit."""
        with self.db.session() as s:
            anchor = s.scalars(select(AuditAnchorRow).order_by(AuditAnchorRow.id.desc()).limit(1)).first()
            head = s.execute(select(AuditHeadRow).where(AuditHeadRow.id == 1)).scalar_one()
            head_seq, head_hash = head.seq, head.hash
            anchor_seq, anchor_hash = (anchor.through_seq, anchor.hash) if anchor else (0, GENESIS)
        expected_seq, expected_prev, checked = anchor_seq + 1, anchor_hash, 0
        last_prune: dict[str, Any] | None = None
        after = 0
        while True:
            with self.db.session() as s:
                rows = list(s.scalars(select(AuditRow).where(AuditRow.seq > after).order_by(AuditRow.seq).limit(batch)))
            for row in rows:
                bad = _check(row, expected_seq, expected_prev)
                if bad is not None:
                    return VerifyReport(False, checked, *bad)
                if row.action == PRUNE_ACTION:
                    last_prune = json.loads(row.detail)
                expected_seq, expected_prev, checked = row.seq + 1, row.hash, checked + 1
            if len(rows) < batch:
                break
            after = rows[-1].seq
        if (expected_seq - 1, expected_prev) != (head_seq, head_hash):
            return VerifyReport(
                False, checked, expected_seq, f"record {expected_seq} and later are missing (the chain head is at "
                f"record {head_seq})"
            )  # fmt: skip
        if anchor is not None and (
            last_prune is None or (last_prune.get("through_seq"), last_prune.get("hash")) != (anchor_seq, anchor_hash)
        ):
            reason = "the anchor does not match the chain's audit.prune record"
            return VerifyReport(False, checked, anchor_seq + 1, reason)
        return VerifyReport(True, checked)

    def prune(self, before: datetime, actor: str = "system") -> int:
        """Delete records older than ``before``, keeping the chain verifiable; how many were deleted."""
        with self.db.session() as s:
            s.execute(select(AuditHeadRow).where(AuditHeadRow.id == 1).with_for_update()).scalar_one()
            last = s.scalars(
                select(AuditRow).where(AuditRow.ts < format_ts(before)).order_by(AuditRow.seq.desc()).limit(1)
            ).first()
            if last is None:
                return 0
            through, through_hash = last.seq, last.hash
            count = s.scalar(select(func.count()).select_from(AuditRow).where(AuditRow.seq <= through)) or 0
            s.execute(delete(AuditRow).where(AuditRow.seq <= through))
            s.add(AuditAnchorRow(through_seq=through, hash=through_hash, created_at=now_ts()))
            detail = {"through_seq": through, "hash": through_hash, "deleted": count, "before": format_ts(before)}
            self._append(s, AuditEvent(actor, PRUNE_ACTION, "audit", "success", detail=detail))
            return int(count)


def _check(row: AuditRow, expected_seq: int, expected_prev: str) -> tuple[int, str] | None:
    """The first bad sequence number and why, or None when ``row`` continues the chain."""
    if row.seq != expected_seq:
        return expected_seq, f"record {expected_seq} is missing (the next record is {row.seq})"
    if row.prev_hash != expected_prev:
        return row.seq, f"record {row.seq} does not follow record {row.seq - 1} (prev_hash differs: moved or replaced)"
    if record_hash(row) != row.hash:
        return row.seq, f"record {row.seq} was altered (its content does not match its hash)"
    return None
