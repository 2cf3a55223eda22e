"""Real services for store and gateway tests: SQLite files, PostgreSQL (own schema), Redis (own key prefix).

A missing PostgreSQL or Redis skips its tests with the reason, except in CI (``CI=true``) where it fails them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

POSTGRES_URL = os.environ.get("AUTOGLM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AUTOGLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def service_missing(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable ({type(exc).__name__}: {exc})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI needs it")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    import psycopg

    try:
        psycopg.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg.Error as exc:
        service_missing(f"PostgreSQL at {POSTGRES_URL}", exc)
    return POSTGRES_URL


@pytest.fixture
def postgres_schema_url(postgres_url: str) -> Iterator[str]:
    """A SQLAlchemy URL whose connections use a fresh schema, dropped afterwards."""
    with postgres_schema(postgres_url) as url:
        yield url


@contextmanager
def postgres_schema(postgres_url: str) -> Iterator[str]:
    import psycopg

    schema = f"autoglm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    base = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("postgres_schema_url")


@pytest.fixture
def db(db_url: str) -> Iterator[object]:
    from openautoglm.store.db import Database

    database = Database(db_url)
    database.upgrade()
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except (redis.RedisError, OSError) as exc:
        service_missing(f"Redis at {REDIS_URL}", exc)
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    with redis_namespace(redis_url) as prefix:
        yield prefix


@contextmanager
def redis_namespace(redis_url: str) -> Iterator[str]:
    import redis

    prefix = f"autoglm-test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()
