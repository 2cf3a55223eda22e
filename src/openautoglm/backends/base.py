"""The Backend interface: one model service the router can send requests to.

A backend streams ``RequestOutput`` chunks like the engine does. Failures before the first chunk are raised as
``UpstreamError`` carrying whether another backend may safely be tried; the router decides whether it does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from openautoglm.protocol.errors import ServiceUnavailableError
from openautoglm.protocol.outputs import RequestOutput
from openautoglm.protocol.request import GenerationRequest

# Request metadata key holding the request's absolute deadline (time.time() seconds); backends pass on the rest.
DEADLINE_KEY = "deadline"


@dataclass(frozen=True, slots=True)
class Capabilities:
    modalities: frozenset[str] = frozenset({"text"})
    max_context: int | None = None  # None: unknown, the backend itself will refuse what does not fit
    streaming: bool = True


@dataclass(frozen=True, slots=True)
class Health:
    healthy: bool
    detail: str = ""
    latency_s: float | None = None


@dataclass(frozen=True, slots=True)
class Load:
    in_flight: int = 0  # requests this process has outstanding on the backend
    queued: int | None = None  # waiting inside the backend, where it says
    running: int | None = None
    kv_usage: float | None = None  # fraction of KV cache in use, where known

    def score(self) -> float:
        """Lower is less loaded. What the backend reports (other clients' work included, but sampled) and what
        this process has in flight there (exact, but only ours): the larger of the two; queued work counts
        double, a fuller KV cache breaks ties."""
        reported = float((self.running or 0) + 2 * (self.queued or 0))
        return max(float(self.in_flight), reported) + (self.kv_usage or 0.0)


class UpstreamError(ServiceUnavailableError):
    """A backend failed. ``retryable``: nothing was produced and another backend may take the request."""

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        retryable: bool,
        status: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after, code=code or "upstream_error")
        self.backend = backend
        self.retryable = retryable
        self.status = status


class UpstreamTimeoutError(UpstreamError):
    """The backend did not answer within its timeout or the request's deadline."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"


class Backend(ABC):
    """A model service. Subclasses own their transport; ``in_flight`` is kept for them by ``generate``."""

    def __init__(self, name: str, version: str = "stable", weight: float = 1.0, max_priority: int | None = None):
        self.name = name
        self.version = version
        self.weight = weight
        self.max_priority = max_priority
        self._in_flight = 0  # requests this process has outstanding here

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abstractmethod
    def _generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    @abstractmethod
    async def health(self) -> Health: ...

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's chunks; the last one has ``finished`` set."""
        self._in_flight += 1
        try:
            async for chunk in self._generate(request):
                yield chunk
        finally:
            self._in_flight -= 1

    def load(self) -> Load:
        return Load(in_flight=self._in_flight)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def refresh(self) -> None:  # noqa: B027 — most backends have nothing to fetch
        """Fetch what the backend reports about itself (capabilities, load); nothing where nothing is remote."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, version={self.version!r}, weight={self.weight})"
