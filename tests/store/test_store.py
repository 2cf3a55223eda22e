"""Store repositories and migrations, each test on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from openautoglm.protocol.errors import InvalidRequestError, NotFoundError
from openautoglm.store.audit import GENESIS, AuditEvent, AuditLog
from openautoglm.store.db import Database
from openautoglm.store.keys import ApiKeyRecord, ApiKeyRepository

NOW = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)


def _key(key_id: str = "abc123def456", **extra: object) -> ApiKeyRecord:
    fields: dict[str, object] = dict(
        id=key_id, name="ci", owner="alice", scopes=("inference", "models:read"), secret_hash="ab" * 32,
        created_at=NOW,
    )  # fmt: skip
    fields.update(extra)
    return ApiKeyRecord(**fields)  # type: ignore[arg-type]


def test_migrations_reach_head_and_are_idempotent(db: Database) -> None:
    assert db.revision() == db.head_revision() == "0002"
    assert db.upgrade() == "0002"


def test_key_round_trip(db: Database) -> None:
    repo = ApiKeyRepository(db)
    rec = _key(models=("demo",), expires_at=NOW + timedelta(days=1), rpm=60, tpm=1000, max_concurrent=2)
    repo.add(rec)
    assert repo.get(rec.id) == rec
    assert repo.get("nope") is None
    with pytest.raises(InvalidRequestError, match="exists already"):
        repo.add(rec)
    repo.add(_key("zzz999zzz999", owner="bob"))
    assert [k.id for k in repo.list()] == [rec.id, "zzz999zzz999"]
    assert [k.id for k in repo.list(owner="bob")] == ["zzz999zzz999"]
    updated = repo.update(rec.id, disabled=True, scopes=("admin",))
    assert repo.get(rec.id) == updated and updated.disabled and updated.scopes == ("admin",)
    repo.touch(rec.id, NOW + timedelta(seconds=1))
    assert repo.require(rec.id).last_used_at == NOW + timedelta(seconds=1)
    with pytest.raises(NotFoundError, match="nope"):
        repo.update("nope", disabled=True)
    public = updated.public()
    assert "secret_hash" not in public and "previous_hash" not in public
    assert public["created_at"] == "2030-01-02T03:04:05.678901Z"


def _fill(log: AuditLog, count: int) -> None:
    for i in range(count):
        log.append(AuditEvent(f"user{i % 2}", "key.create", f"key-{i}", "success", request_id=f"r{i}", client="::1"))


def test_audit_chain_links_and_verifies(db: Database) -> None:
    log = AuditLog(db)
    _fill(log, 5)
    records = list(log.iter_all(batch=2))
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(records))
    report = log.verify(batch=2)
    assert report.ok and report.checked == 5


def _sql(db: Database, statement: str, **params: object) -> None:
    with db.engine.begin() as conn:
        conn.execute(text(statement), params)


def test_verify_names_an_edited_row(db: Database) -> None:
    log = AuditLog(db)
    _fill(log, 6)
    _sql(db, "UPDATE audit_records SET outcome = 'failure' WHERE seq = 4")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 4 and "altered" in (report.reason or "")


def test_verify_names_a_deleted_row(db: Database) -> None:
    log = AuditLog(db)
    _fill(log, 6)
    _sql(db, "DELETE FROM audit_records WHERE seq = 3")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 3 and "missing" in (report.reason or "")


def test_verify_names_a_deleted_tail(db: Database) -> None:
    log = AuditLog(db)
    _fill(log, 6)
    _sql(db, "DELETE FROM audit_records WHERE seq >= 5")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 5


def test_verify_names_swapped_rows(db: Database) -> None:
    log = AuditLog(db)
    _fill(log, 6)
    # Swap records 3 and 4 entirely (content, links and hashes), so each row is self-consistent.
    cols = ["ts", "actor", "action", "target", "outcome", "request_id", "client", "detail", "prev_hash", "hash"]
    _sql(db, "CREATE TABLE swap_tmp AS SELECT * FROM audit_records WHERE seq IN (3, 4)")
    sets = ", ".join(f"{c} = (SELECT {c} FROM swap_tmp WHERE swap_tmp.seq = 7 - audit_records.seq)" for c in cols)
    _sql(db, f"UPDATE audit_records SET {sets} WHERE seq IN (3, 4)")
    _sql(db, "DROP TABLE swap_tmp")
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 3 and "does not follow" in (report.reason or "")


def test_prune_keeps_the_chain_verifiable(db: Database) -> None:
    log = AuditLog(db)
    _fill(log, 4)
    cutoff = datetime.now(timezone.utc) + timedelta(seconds=1)
    assert log.prune(cutoff, actor="retention") == 4
    _fill(log, 2)
    remaining = list(log.iter_all())
    assert [r.seq for r in remaining] == [5, 6, 7]
    assert remaining[0].action == "audit.prune" and remaining[0].detail["through_seq"] == 4
    assert log.verify().ok
    assert log.prune(datetime(2000, 1, 1, tzinfo=timezone.utc)) == 0
    # A forged anchor (claiming more was pruned) is caught against the chain's own audit.prune record.
    _sql(db, "DELETE FROM audit_records WHERE seq = 5")
    _sql(db, "UPDATE audit_anchors SET through_seq = 5, hash = :h", h=remaining[0].hash)
    report = log.verify()
    assert not report.ok and report.first_bad_seq == 6


def test_query_filters_and_pages(db: Database) -> None:
    log = AuditLog(db)
    _fill(log, 6)
    log.append(AuditEvent("root", "auth.failure", "/v1/models", "denied", detail={"reason": "unknown key"}))
    assert [r.seq for r in log.query(actor="user0")] == [1, 3, 5]
    assert [r.seq for r in log.query(action="auth.failure")] == [7]
    assert [r.seq for r in log.query(after_seq=2, limit=2)] == [3, 4]
    assert log.query(since=datetime.now(timezone.utc) + timedelta(hours=1)) == []
    assert len(log.query(until=datetime.now(timezone.utc) + timedelta(hours=1))) == 7
    assert log.query(action="auth.failure")[0].detail == {"reason": "unknown key"}


def test_concurrent_appends_keep_one_chain(db: Database) -> None:
    log = AuditLog(db)

    def work(n: int) -> None:
        for i in range(8):
            log.append(AuditEvent(f"t{n}", "x", str(i), "success"))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = log.verify()
    assert report.ok and report.checked == 32
