"""AsyncEngine: the asyncio facade over EngineCore.

The step loop runs in one daemon thread; only thread-safe queues cross between it and event loops. Each request's
chunks go back to the event loop that asked for them through ``call_soon_threadsafe`` (one call per loop per step).
Closing a request's async generator early (the client went away) aborts it at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from openautoglm.config.settings import EngineConfig
from openautoglm.engine.core import EngineCore
from openautoglm.engine.input_processor import ProcessedRequest
from openautoglm.engine.stats import EngineStats
from openautoglm.engine.tokenizer import Tokenizer
from openautoglm.protocol.errors import EngineError, InvalidRequestError, ServiceUnavailableError
from openautoglm.protocol.outputs import RequestOutput
from openautoglm.protocol.request import GenerationRequest

logger = logging.getLogger(__name__)

_Route = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[RequestOutput | BaseException]"]


@dataclass(slots=True)
class _Add:
    processed: ProcessedRequest
    route: _Route


@dataclass(slots=True)
class _Abort:
    request_id: str


_STOP = object()


class AsyncEngine:
    modalities: frozenset[str] = frozenset({"text"})

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self._inbox: queue.SimpleQueue[_Add | _Abort | object] = queue.SimpleQueue()
        self._routes: dict[str, _Route] = {}  # owned by the step-loop thread
        self._in_flight: set[str] = set()  # owned by the event loop side
        self._fatal: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="autoglm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(EngineCore(config))

    @property
    def config(self) -> EngineConfig:
        return self.core.config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.core.tokenizer

    @property
    def model_name(self) -> str:
        return self.core.model_name

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    def is_healthy(self) -> bool:
        return self._fatal is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.core.stats(step_loop_alive=self.is_healthy())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's chunks. Bad input raises a typed error before anything is scheduled."""
        if not self.is_healthy():
            raise ServiceUnavailableError(f"the Open-AutoGLM engine has stopped: {self._fatal or 'shut down'}")
        processed = self.core.input_processor.process(request)
        rid = processed.request_id
        if rid in self._in_flight:
            raise InvalidRequestError(f"request id {rid!r} is already in flight", param="request_id")
        chunks: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._in_flight.add(rid)
        self._inbox.put(_Add(processed, (asyncio.get_running_loop(), chunks)))
        finished = False
        pending: BaseException | None = None
        try:
            while True:
                item = await chunks.get()
                if isinstance(item, BaseException):
                    raise item
                # A consumer that fell behind gets what piled up as one chunk: fewer, larger deltas under load
                # instead of a backlog that costs per-chunk overhead in every transport.
                while not item.finished and not chunks.empty():
                    more = chunks.get_nowait()
                    if isinstance(more, BaseException):
                        pending = more
                        break
                    item.merge(more)
                finished = item.finished
                yield item
                if finished:
                    return
                if pending is not None:
                    raise pending
        finally:
            self._in_flight.discard(rid)
            if not finished:
                self._inbox.put(_Abort(rid))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    async def shutdown(self) -> None:
        self._inbox.put(_STOP)
        await asyncio.to_thread(self._thread.join, 30.0)

    # ---- the step-loop thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                if not self._drain_inbox(block=not self.core.has_unfinished()):
                    return
                if self.core.has_unfinished():
                    self._deliver(self.core.step())
        except BaseException as exc:
            logger.exception("Open-AutoGLM engine: the step loop died")
            self._fatal = exc
            err = EngineError(f"the Open-AutoGLM engine step loop failed: {type(exc).__name__}: {exc}")
            for loop, chunks in self._routes.values():
                _post(loop, [(chunks, err)])
            self._routes.clear()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts; wait for one when idle. False once asked to stop."""
        while True:
            try:
                item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                if block:
                    continue
                return True
            block = False
            if item is _STOP:
                return False
            if isinstance(item, _Add):
                self._add(item)
            elif isinstance(item, _Abort) and item.request_id in self._routes:
                self._deliver(self.core.abort([item.request_id]))

    def _add(self, item: _Add) -> None:
        rid = item.processed.request_id
        try:
            self.core.add_request(item.processed)
        except Exception as exc:  # noqa: BLE001 — refuse this request; the loop goes on
            _post(item.route[0], [(item.route[1], exc)])
            return
        self._routes[rid] = item.route

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            route = self._routes.pop(out.request_id) if out.finished else self._routes.get(out.request_id)
            if route is not None:
                by_loop.setdefault(route[0], []).append((route[1], out))
        for loop, items in by_loop.items():
            _post(loop, items)


def _post(loop: asyncio.AbstractEventLoop, items: list) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # that event loop is closed: its consumers are gone
        logger.debug("Open-AutoGLM engine: dropped %d chunks for a closed event loop", len(items))


def _put_all(items: list) -> None:
    for chunks, item in items:
        chunks.put_nowait(item)
