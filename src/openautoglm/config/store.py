"""StoreConfig: where durable records (keys, audit) live and where shared state (Redis) is, if anywhere."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class StoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    data_dir: str = Field(
        "~/.local/share/openautoglm",
        description="Directory for the embedded SQLite database and the server secret file",
    )
    url: SecretStr | None = Field(
        None,
        description="SQLAlchemy URL of the database (postgresql://…); default: SQLite file in data_dir",
    )
    redis_url: SecretStr | None = Field(
        None, description="redis://… shared by every replica (limits, bans, invalidation); default: in-process"
    )
    redis_prefix: str = Field("autoglm:", min_length=1, description="Prefix of every Redis key and channel")
    migrate_on_start: bool = Field(True, description="Run Alembic migrations when the server starts")

    @field_validator("url", "redis_url")
    @classmethod
    def _not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value

    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    def database_url(self) -> str:
        """The SQLAlchemy URL: the configured one (``postgresql://`` uses psycopg 3) or the SQLite default."""
        if self.url is None:
            return f"sqlite:///{self.data_path() / 'openautoglm.db'}"
        url = self.url.get_secret_value()
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):
                return "postgresql+psycopg://" + url[len(plain) :]
        return url
