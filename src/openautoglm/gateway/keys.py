"""API keys: ``sk-agl-<id>-<secret>``, stored as HMAC-SHA-256(server secret, id:secret), managed with audit.

The id (12 characters) finds the record; the secret (32 base-62 characters, 190 bits) is shown once and never
stored. docs/security.md says why HMAC with a server secret rather than a plain hash.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from hashlib import sha256
from pathlib import Path

from openautoglm.config.gateway import AuthConfig
from openautoglm.config.store import StoreConfig
from openautoglm.gateway.scopes import ALL_SCOPES, parse_scopes
from openautoglm.protocol.errors import ConfigError, InvalidRequestError
from openautoglm.store.audit import AuditEvent, AuditLog
from openautoglm.store.keys import ApiKeyRecord, ApiKeyRepository

KEY_PREFIX = "sk-agl-"
_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH, SECRET_LENGTH = 12, 32  # 62^32 ≈ 2^190 secrets
_KEY = re.compile(rf"^{KEY_PREFIX}([a-z0-9]{{{ID_LENGTH}}})-([A-Za-z0-9]{{{SECRET_LENGTH}}})$")
MIN_SERVER_SECRET = 32


def new_key() -> tuple[str, str]:
    """A fresh (id, secret)."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))
    return key_id, new_secret()


def new_secret() -> str:
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))


def format_key(key_id: str, secret: str) -> str:
    return f"{KEY_PREFIX}{key_id}-{secret}"


def parse_key(text: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    match = _KEY.match(text)
    return None if match is None else (match.group(1), match.group(2))


def hash_secret(server_secret: bytes, key_id: str, secret: str) -> str:
    return hmac.new(server_secret, f"{key_id}:{secret}".encode(), sha256).hexdigest()


def secret_matches(server_secret: bytes, record: ApiKeyRecord, secret: str, now: datetime) -> str | None:
    """Which stored hash the secret matches ("current" or "previous", the latter only within its grace
    period), compared in constant time; None when it matches neither."""
    digest = hash_secret(server_secret, record.id, secret)
    if hmac.compare_digest(digest, record.secret_hash):
        return "current"
    if record.previous_hash is not None and hmac.compare_digest(digest, record.previous_hash):
        until = record.previous_valid_until
        if until is not None and now < until:
            return "previous"
    return None


def load_server_secret(auth: AuthConfig, store: StoreConfig) -> bytes:
    """The HMAC key: ``gateway.auth.secret``, else the secret file (created, mode 0600, only for the embedded
    SQLite store: replicas sharing a database must be given one secret explicitly)."""
    if auth.secret is not None:
        value = auth.secret.get_secret_value().strip()
        if len(value) < MIN_SERVER_SECRET:
            raise ConfigError(f"gateway.auth.secret must be at least {MIN_SERVER_SECRET} characters")
        return value.encode()
    path = Path(auth.secret_file).expanduser() if auth.secret_file else store.data_path() / "server.secret"
    if not path.exists():
        if auth.secret_file or store.url is not None:
            raise ConfigError(
                f"gateway.auth.secret_file: {path} does not exist; with a shared database every replica needs the "
                "same server secret (set gateway.auth.secret or create the file with 64 random hex characters)"
            )
        _create_secret_file(path)
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"gateway.auth.secret_file: cannot read {path}: {exc.strerror}") from exc
    if len(value) < MIN_SERVER_SECRET:
        raise ConfigError(f"gateway.auth.secret_file: {path} must hold at least {MIN_SERVER_SECRET} characters")
    return value.encode()


def _create_secret_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")


@dataclass(frozen=True)
class Actor:
    """Who does an admin action, for the audit log."""

    name: str
    request_id: str | None = None
    client: str | None = None


class KeyManager:
    """Create, rotate, revoke, disable and enable keys; every action is written to the audit log.

    ``notify(key_id)`` tells every replica to drop its cached copy of a changed key (Redis pub/sub)."""

    def __init__(
        self,
        repo: ApiKeyRepository,
        audit: AuditLog,
        server_secret: bytes,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.repo = repo
        self.audit = audit
        self.server_secret = server_secret
        self.notify = notify

    def _audit(self, actor: Actor, action: str, target: str, detail: dict[str, object] | None = None) -> None:
        event = AuditEvent(actor.name, action, target, "success", actor.request_id, actor.client, detail or {})
        self.audit.append(event)

    def create(
        self,
        actor: Actor,
        *,
        name: str,
        owner: str,
        scopes: Sequence[str],
        models: Sequence[str] | None = None,
        expires_at: datetime | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        """The new record and the full key (shown once)."""
        checked = parse_scopes(scopes)
        if not checked:
            raise InvalidRequestError(f"scopes: give at least one of {list(ALL_SCOPES)}", param="scopes")
        now = datetime.now(timezone.utc)
        if expires_at is not None and expires_at <= now:
            raise InvalidRequestError("expires_at: must lie in the future", param="expires_at")
        for param, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
            if value is not None and value < 1:
                raise InvalidRequestError(f"{param}: must be >= 1 (or unset for no limit), got {value}", param=param)
        key_id, secret = new_key()
        digest = hash_secret(self.server_secret, key_id, secret)
        record = ApiKeyRecord(
            id=key_id, name=name, owner=owner, scopes=checked, secret_hash=digest, created_at=now,
            models=None if models is None else tuple(models), expires_at=expires_at, rpm=rpm, tpm=tpm,
            max_concurrent=max_concurrent,
        )  # fmt: skip
        self.repo.add(record)
        self._audit(actor, "key.create", key_id, {"name": name, "owner": owner, "scopes": list(checked)})
        return record, format_key(key_id, secret)

    def rotate(self, actor: Actor, key_id: str, grace_s: float) -> tuple[ApiKeyRecord, str]:
        """A new secret for the same id; the old one stays valid for ``grace_s`` seconds."""
        if grace_s < 0:
            raise InvalidRequestError(f"grace_s: must be >= 0, got {grace_s}", param="grace_s")
        current = self.repo.require(key_id)
        if current.revoked_at is not None:
            raise InvalidRequestError(f"key {key_id} is revoked and cannot be rotated", param="key_id")
        secret = new_secret()
        until = datetime.now(timezone.utc) + timedelta(seconds=grace_s)
        record = self.repo.update(
            key_id,
            secret_hash=hash_secret(self.server_secret, key_id, secret),
            previous_hash=current.secret_hash,
            previous_valid_until=until,
        )
        self._audit(actor, "key.rotate", key_id, {"grace_s": grace_s})
        self._changed(key_id)
        return record, format_key(key_id, secret)

    def revoke(self, actor: Actor, key_id: str) -> ApiKeyRecord:
        record = self.repo.update(key_id, revoked_at=datetime.now(timezone.utc), previous_hash=None)
        self._audit(actor, "key.revoke", key_id)
        self._changed(key_id)
        return record

    def set_disabled(self, actor: Actor, key_id: str, disabled: bool) -> ApiKeyRecord:
        record = self.repo.update(key_id, disabled=disabled)
        self._audit(actor, "key.disable" if disabled else "key.enable", key_id)
        self._changed(key_id)
        return record

    def _changed(self, key_id: str) -> None:
        if self.notify is not None:
            self.notify(key_id)
