"""The database: an SQLAlchemy engine for SQLite (embedded default) or PostgreSQL (psycopg 3), and migrations."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from openautoglm.config.store import StoreConfig
from openautoglm.protocol.errors import ConfigError

MIGRATIONS = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x41474C4D  # "AGLM": the advisory lock id serialising migrations on PostgreSQL


class Database:
    """One engine and session factory. Sessions from :meth:`session` commit on success and roll back on error."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        try:
            self.engine: Engine = create_engine(url, **_engine_args(self.is_sqlite))
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConfigError(f"store.url: cannot use database URL ({type(exc).__name__}: {exc})") from exc
        if self.is_sqlite:
            _serialise_sqlite_writers(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_config(cls, cfg: StoreConfig) -> Database:
        if cfg.url is None:
            path = cfg.data_path()
            try:
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise ConfigError(f"store.data_dir: cannot create {path}: {exc.strerror}") from exc
        return cls(cfg.database_url())

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def upgrade(self) -> str:
        """Apply every migration not yet applied; the revision the database is at afterwards."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Replicas starting together migrate one at a time (released at commit).
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_MIGRATION_LOCK})")
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            return self.revision() or ""
        except SQLAlchemyError as exc:
            raise ConfigError(f"store: cannot migrate the database ({type(exc).__name__}: {exc.args[0]})") from exc

    def revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        return ScriptDirectory.from_config(cfg).get_current_head()

    def dispose(self) -> None:
        self.engine.dispose()


def _engine_args(is_sqlite: bool) -> dict[str, Any]:
    if is_sqlite:
        # Requests run repository calls in worker threads (asyncio.to_thread).
        return {"connect_args": {"check_same_thread": False}}
    return {"pool_pre_ping": True, "pool_size": 5, "max_overflow": 5}


def _serialise_sqlite_writers(engine: Engine) -> None:
    """Every SQLite transaction takes the write lock at BEGIN (waiting up to 10 s), so two processes appending
    to the audit chain take turns instead of one failing with "database is locked" half-way through."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
