"""The gateway's audit writer: async, never holds prompts or credentials, and never loses a failure silently."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from openautoglm.store.audit import AuditEvent, AuditLog

log = logging.getLogger(__name__)

# Actions written by the gateway (admin actions are written by gateway/keys.py: key.create, key.rotate…).
AUTH_FAILURE = "auth.failure"
AUTH_DENIED = "auth.denied"
AUTH_BLOCK = "auth.block"


class Auditor:
    def __init__(self, log_: AuditLog | None) -> None:
        self.log = log_

    async def record(
        self,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        *,
        request_id: str | None = None,
        client: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        if self.log is None:
            return
        event = AuditEvent(actor, action, target, outcome, request_id, client, detail or {})
        try:
            await asyncio.to_thread(self.log.append, event)
        except SQLAlchemyError as exc:
            # The request is refused either way; the operator must learn the audit log is failing.
            log.error("audit log write failed for %s on %s: %s", action, target, type(exc).__name__)
