"""The response cache: exact matches of deterministic requests (temperature 0 or an explicit seed).

The key hashes the tenant's namespace, the model *version* and the normalised request (prompt or messages,
every sampling parameter; never the request id, priority or metadata), so no tenant receives another's answer
unless ``shared_namespace`` says so. Two tiers: L1, an LRU in this process bounded in entries and bytes with a
TTL; L2, Redis with a TTL, shared by every replica (a hit there fills L1). What is cached is the finished
engine output (text, tokens, finish reasons, usage), so the response — whole or as a stream — is rebuilt by the
same code as a fresh one. A failing cache never fails a request: a read error is a miss, a write error a metric.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import orjson
import redis.asyncio as aioredis
from cachetools import TTLCache

from openautoglm.config.traffic import ResponseCacheConfig
from openautoglm.gateway.limiter_failover import REDIS_ERRORS
from openautoglm.gateway.limiter_redis import tagged
from openautoglm.gateway.traffic_metrics import TrafficMetrics
from openautoglm.protocol.outputs import CompletionOutput, FinishReason, RequestOutput, TokenLogprob, Usage
from openautoglm.protocol.request import GenerationRequest

log = logging.getLogger(__name__)
# Everything of a request shapes its answer except these (a new field is part of the key unless listed here).
_NOT_KEYED = frozenset({"request_id", "priority", "metadata"})


def cacheable(req: GenerationRequest) -> bool:
    return req.sampling.temperature == 0 or req.sampling.seed is not None


def cache_key(namespace: str, model_version: str, req: GenerationRequest) -> str:
    body = {f.name: getattr(req, f.name) for f in dataclasses.fields(req) if f.name not in _NOT_KEYED}
    blob = orjson.dumps([namespace, model_version, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


def encode(out: RequestOutput) -> bytes:
    return orjson.dumps(dataclasses.asdict(out))


def _completion(o: dict[str, Any]) -> CompletionOutput:
    logprobs = o["logprobs_delta"]
    if logprobs is not None:
        logprobs = [TokenLogprob(x["token_id"], x["token"], x["logprob"], list(map(tuple, x["top"]))) for x in logprobs]
    return CompletionOutput(
        index=o["index"], text_delta=o["text_delta"], token_ids_delta=o["token_ids_delta"], logprobs_delta=logprobs,
        finish_reason=FinishReason(o["finish_reason"]), stop_reason=o["stop_reason"], num_tokens=o["num_tokens"],
    )  # fmt: skip


def decode(blob: bytes, request_id: str) -> RequestOutput:
    """The cached answer as one finished chunk of request ``request_id``."""
    d: dict[str, Any] = orjson.loads(blob)
    return RequestOutput(
        request_id=request_id, outputs=[_completion(o) for o in d["outputs"]], prompt_token_ids=d["prompt_token_ids"],
        finished=True, usage=Usage(**d["usage"]), error=None, queue_time=0.0,
    )  # fmt: skip


def complete(out: RequestOutput | None) -> bool:
    """Only whole, successful answers are cached (never an abort, an error or a truncated stream)."""
    return (
        out is not None
        and out.finished
        and out.error is None
        and out.usage is not None
        and all(o.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) for o in out.outputs)
    )


class _L1(TTLCache):  # type: ignore[type-arg]
    """TTLCache bounded in bytes (its size), and in entries by ``max_entries``; counts evictions."""

    def __init__(self, cfg: ResponseCacheConfig, metrics: TrafficMetrics) -> None:
        super().__init__(maxsize=cfg.l1_max_bytes, ttl=cfg.l1_ttl_s, getsizeof=len)
        self.max_entries = cfg.l1_max_entries
        self.metrics = metrics

    def popitem(self) -> tuple[str, bytes]:
        item = super().popitem()
        self.metrics.cache_evictions.inc()
        return item

    def expire(self, time: float | None = None) -> list[tuple[str, bytes]]:
        expired = super().expire(time)
        if expired:
            self.metrics.cache_evictions.inc(len(expired))
        return expired

    def put(self, key: str, value: bytes) -> None:
        if key not in self and len(self) >= self.max_entries:
            self.expire()
            while len(self) >= self.max_entries:
                self.popitem()
        self[key] = value


class ResponseCache:
    def __init__(
        self, cfg: ResponseCacheConfig, metrics: TrafficMetrics, redis: aioredis.Redis | None, prefix: str
    ) -> None:
        """``redis``: a client without response decoding (values are bytes), or None for L1 only."""
        self.cfg = cfg
        self.metrics = metrics
        self.l1 = _L1(cfg, metrics)
        self.redis = redis
        self.prefix = prefix + "cache:"
        metrics.gauge("autoglm_cache_bytes", "Bytes held by the in-process cache tier", self._bytes)
        metrics.gauge("autoglm_cache_entries", "Entries in the in-process cache tier", self._entries)

    def _bytes(self) -> dict[str, float]:
        return {"": float(self.l1.currsize)}

    def _entries(self) -> dict[str, float]:
        return {"": float(len(self.l1))}

    def namespace(self, tenant: str | None) -> str:
        return "shared" if self.cfg.shared_namespace else f"tenant:{tenant or 'anonymous'}"

    async def get(self, key: str) -> tuple[bytes, str] | None:
        """The cached blob and its tier ('l1' or 'l2'), or None."""
        blob = self.l1.get(key)
        if blob is not None:
            self.metrics.cache_hits.labels("l1").inc()
            return blob, "l1"
        if self.redis is not None:
            try:
                raw = await self.redis.get(tagged(self.prefix, key))
            except REDIS_ERRORS as exc:
                log.warning("response cache: L2 read failed (%s); treated as a miss", type(exc).__name__)
                raw = None
            if raw is not None:
                blob = bytes(raw)
                self.l1.put(key, blob)
                self.metrics.cache_hits.labels("l2").inc()
                return blob, "l2"
        self.metrics.cache_misses.inc()
        return None

    async def put(self, key: str, blob: bytes) -> None:
        if len(blob) > min(self.cfg.max_entry_bytes, self.cfg.l1_max_bytes):
            return
        self.l1.put(key, blob)
        if self.redis is None:
            return
        try:
            await self.redis.set(tagged(self.prefix, key), blob, px=int(self.cfg.l2_ttl_s * 1000))
        except REDIS_ERRORS as exc:
            self.metrics.cache_write_errors.labels("l2").inc()
            log.warning("response cache: L2 write failed (%s); the response was served", type(exc).__name__)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
