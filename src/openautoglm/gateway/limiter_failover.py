"""Redis first, and what to do when it does not answer: fail open onto this process's own limiter, or fail
closed (503). Either way the switch is reported once (metric and audit event, through ``on_change``), Redis is
tried again every ``retry_s``, and the first success switches back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import redis

from openautoglm.gateway.gcra import Decision
from openautoglm.gateway.limiter import Charge, InProcessLimiter, Limiter
from openautoglm.protocol.errors import ServiceUnavailableError

log = logging.getLogger(__name__)
REDIS_ERRORS = (redis.RedisError, OSError, asyncio.TimeoutError)
OnChange = Callable[[bool, str], Awaitable[None]]  # (redis_up, detail)


class FailoverLimiter(Limiter):
    def __init__(
        self,
        primary: Limiter,
        fallback: InProcessLimiter,
        *,
        fail_open: bool = True,
        retry_s: float = 1.0,
        on_change: OnChange | None = None,
    ) -> None:
        self.primary = primary
        self.fallback = fallback
        self.fail_open = fail_open
        self.retry_s = retry_s
        self.on_change = on_change
        self.up = True
        self._retry_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.primary.name if self.up else f"{self.fallback.name} (redis down)"

    def _use_primary(self) -> bool:
        return self.up or time.monotonic() >= self._retry_at

    def _failed(self, exc: BaseException) -> Limiter:
        self._retry_at = time.monotonic() + self.retry_s
        if self.up:
            self.up = False
            detail = f"{type(exc).__name__}: {exc}"
            log.error("rate limits: Redis unreachable (%s); failing %s", detail, "open" if self.fail_open else "closed")
            self._notify(False, detail)
        if not self.fail_open:
            raise ServiceUnavailableError(
                "rate limiting is unavailable (its Redis does not answer); try again shortly",
                retry_after=self.retry_s, code="rate_limiter_unavailable",
            )  # fmt: skip
        return self.fallback

    def _succeeded(self) -> None:
        if not self.up:
            self.up = True
            log.warning("rate limits: Redis answers again; shared limits restored")
            self._notify(True, "recovered")

    def _notify(self, up: bool, detail: str) -> None:
        if self.on_change is not None:
            task = asyncio.create_task(self.on_change(up, detail))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def acquire(self, charges: Sequence[Charge], now_us: int | None = None) -> list[Decision]:
        if self._use_primary():
            try:
                out = await self.primary.acquire(charges, now_us)
            except REDIS_ERRORS as exc:
                return await self._failed(exc).acquire(charges, now_us)
            self._succeeded()
            return out
        return await self._failed_again().acquire(charges, now_us)

    def _failed_again(self) -> Limiter:
        if not self.fail_open:
            raise ServiceUnavailableError(
                "rate limiting is unavailable (its Redis does not answer); try again shortly",
                retry_after=max(0.0, self._retry_at - time.monotonic()), code="rate_limiter_unavailable",
            )  # fmt: skip
        return self.fallback

    async def refund(self, charges: Sequence[Charge], now_us: int | None = None) -> None:
        # Usage that already happened: charge wherever the limiter is now, never refuse.
        if self.up:
            try:
                await self.primary.refund(charges, now_us)
                return
            except REDIS_ERRORS as exc:
                self._retry_at = time.monotonic() + self.retry_s
                if self.up:
                    self.up = False
                    self._notify(False, f"{type(exc).__name__}: {exc}")
        await self.fallback.refund(charges, now_us)

    async def acquire_slot(self, key: str, limit: int, holder: str, lease_s: float) -> bool:
        if self._use_primary():
            try:
                ok = await self.primary.acquire_slot(key, limit, holder, lease_s)
            except REDIS_ERRORS as exc:
                return await self._failed(exc).acquire_slot(key, limit, holder, lease_s)
            self._succeeded()
            return ok
        return await self._failed_again().acquire_slot(key, limit, holder, lease_s)

    async def release_slot(self, key: str, holder: str) -> None:
        # A slot may have been taken on either side; releasing an absent holder is harmless on both.
        await self.fallback.release_slot(key, holder)
        if self.up:
            try:
                await self.primary.release_slot(key, holder)
            except REDIS_ERRORS:
                self._retry_at = time.monotonic() + self.retry_s  # the lease frees it in Redis eventually

    async def close(self) -> None:
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        await self.primary.close()
