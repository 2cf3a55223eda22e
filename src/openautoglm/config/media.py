"""Limits and accepted formats for media (images, audio) sent to Open-AutoGLM's HTTP API.

Nested under the server settings (``server.media``); the same limits apply to the native ``/v1/infer``
envelope and to OpenAI ``image_url`` parts carrying ``data:`` URIs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MiB = 1 << 20

ImageFormat = Literal["jpeg", "png", "webp", "gif"]
AudioFormat = Literal["wav", "mp3", "flac", "ogg"]


class MediaConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_image_bytes: int = Field(20 * MiB, ge=1, description="Largest decoded image, in bytes")
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Largest image area (width x height), checked from the header before decoding",
    )
    max_audio_bytes: int = Field(25 * MiB, ge=1, description="Largest decoded audio clip, in bytes")
    image_formats: tuple[ImageFormat, ...] = Field(
        ("jpeg", "png", "webp", "gif"), description="Image formats accepted (sniffed from the bytes)"
    )
    audio_formats: tuple[AudioFormat, ...] = Field(
        ("wav", "mp3", "flac", "ogg"), description="Audio formats accepted (sniffed from the bytes)"
    )

    @field_validator("image_formats", "audio_formats")
    @classmethod
    def _unique_non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("must list at least one format")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a format twice: {list(value)}")
        return value
