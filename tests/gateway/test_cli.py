"""`autoglm keys`, `autoglm audit` and `autoglm db` against a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from openautoglm.cli.main import app
from openautoglm.gateway.keys import parse_key
from openautoglm.gateway.scopes import ALL_SCOPES
from openautoglm.store.db import Database

from .conftest import SERVER_SECRET  # type: ignore[import-not-found]


@pytest.fixture
def cli(tmp_path: Path, db_url: str):  # type: ignore[no-untyped-def]
    env = {"AUTOGLM_STORE__DATA_DIR": str(tmp_path), "AUTOGLM_GATEWAY__AUTH__SECRET": SERVER_SECRET}
    if not db_url.startswith("sqlite"):
        env["AUTOGLM_STORE__URL"] = db_url
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, (args, result.output, result.exception)
        return result.output

    return run


def test_keys_lifecycle_and_audit(cli, db_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert "revision 0002" in cli("db", "upgrade")
    created = json.loads(cli("keys", "create", "--name", "boot", "--admin", "--json"))
    assert parse_key(created["key"]) is not None and created["scopes"] == list(ALL_SCOPES)
    key_id = created["id"]
    limited = json.loads(cli("keys", "create", "--name", "ci", "-s", "inference", "--rpm", "5", "--json"))
    assert limited["scopes"] == ["inference"] and limited["rpm"] == 5
    cli("keys", "create", "--name", "bad", "-s", "root", code=2)
    listed = json.loads(cli("keys", "list", "--json"))
    assert [k["id"] for k in listed] == [key_id, limited["id"]] and all("key" not in k for k in listed)
    rotated = json.loads(cli("keys", "rotate", key_id, "--grace", "60", "--json"))
    assert rotated["key"] != created["key"] and rotated["previous_valid_until"]
    assert json.loads(cli("keys", "disable", key_id, "--json"))["disabled"] is True
    assert json.loads(cli("keys", "enable", key_id, "--json"))["disabled"] is False
    assert json.loads(cli("keys", "revoke", key_id, "--json"))["revoked_at"]
    assert json.loads(cli("keys", "show", key_id, "--json"))["id"] == key_id
    cli("keys", "show", "nope", code=2)
    assert "6 records verified" in cli("audit", "verify")
    lines = cli("audit", "export", "--jsonl").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["action"] for r in records] == [
        "key.create", "key.create", "key.rotate", "key.disable", "key.enable", "key.revoke",
    ]  # fmt: skip
    assert all(r["actor"].startswith("cli:") and len(r["hash"]) == 64 for r in records)
    assert created["key"] not in "\n".join(lines) and rotated["key"] not in "\n".join(lines)
    assert len(cli("audit", "export", "--action", "key.create").splitlines()) == 2
    db = Database(f"sqlite:///{tmp_path / 'openautoglm.db'}" if db_url.startswith("sqlite") else db_url)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE audit_records SET actor = 'someone-else' WHERE seq = 3"))
    db.dispose()
    assert "first bad record 3" in cli("audit", "verify", code=1)
