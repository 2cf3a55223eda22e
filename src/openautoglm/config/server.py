"""ServerConfig: where and how the HTTP and gRPC servers listen, and the limits they enforce per request."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from openautoglm.config.duration import Duration
from openautoglm.config.media import MediaConfig

MiB = 1 << 20
_HEADER_NAME = re.compile(r"^[A-Za-z0-9-]+$")


class CorsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    allow_origins: list[str] = Field(default_factory=list, description="Empty: CORS off")
    allow_credentials: bool = False


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0: any free port)")
    grpc_port: int = Field(8001, ge=0, le=65535, description="KServe v2 gRPC port; 0 turns gRPC off")
    max_body_bytes: int = Field(16 * MiB, ge=1024, description="Largest request body as sent on the wire")
    max_decompressed_bytes: int = Field(
        64 * MiB, ge=1024, description="Largest request body after gzip/deflate decoding (zip-bomb guard)"
    )
    gzip_min_bytes: int = Field(
        1024, ge=0, description="Non-streaming responses at least this large are gzipped when accepted"
    )
    drain_timeout: Duration = Field(
        30.0, ge=0.0, description="Seconds in-flight requests may run after SIGTERM before they are aborted"
    )
    retry_after: int = Field(5, ge=1, description="Retry-After seconds sent with 503 while loading or draining")
    log_prompts: bool = Field(False, description="Put prompt text into access logs (off: never logged)")
    request_id_header: str = "X-Request-ID"
    cors: CorsConfig = Field(default_factory=CorsConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)

    @field_validator("request_id_header")
    @classmethod
    def _header_name(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError(f"request_id_header must be letters, digits and '-', got {value!r}")
        return value
