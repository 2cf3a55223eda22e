"""Validation of media sent to Open-AutoGLM: base64, ``data:`` URIs, format sniffing, size and pixel limits.

Pure functions, no HTTP: each raises an ``AutoGLMError`` subclass naming the offending parameter —
``InvalidRequestError`` (400) for bytes that are structurally broken (bad base64, a corrupt image),
``UnsupportedMediaTypeError`` (415) for a format or modality that is not accepted or does not match the bytes,
``PayloadTooLargeError`` (413) for media over the configured limits. Limits are checked as early as possible:
decoded size from the base64 length before decoding, image area from the header before decoding pixels.
Decoding images is CPU work: call these from a worker thread in request handlers.
"""

from __future__ import annotations

import base64
import io
import struct
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from openautoglm.config.media import MediaConfig
from openautoglm.protocol.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from openautoglm.protocol.multimodal import KNOWN_MODALITIES

IMAGE_MIME = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "gif": "image/gif"}
AUDIO_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg"}
_PIL_FORMAT = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF"}
_ALIASES = {
    "jpg": "jpeg",
    "pjpeg": "jpeg",
    "mpeg": "mp3",
    "mpga": "mp3",
    "mpeg3": "mp3",
    "x-mpeg-3": "mp3",
    "wave": "wav",
    "x-wav": "wav",
    "vnd.wave": "wav",
    "x-flac": "flac",
    "oga": "ogg",
}
# What Pillow may raise on a corrupt or truncated file, from its header parsers and decoders.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


@dataclass(frozen=True, slots=True)
class ValidatedMedia:
    modality: str  # "image" | "audio"
    format: str  # normalized: jpeg, png, webp, gif; wav, mp3, flac, ogg
    data: bytes
    width: int | None = None
    height: int | None = None

    @property
    def mime(self) -> str:
        return (IMAGE_MIME if self.modality == "image" else AUDIO_MIME)[self.format]

    def data_uri(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


# --- modalities ---------------------------------------------------------------------------------------------


def check_known_modalities(requested: Iterable[str], *, param: str = "inputs") -> None:
    """Unknown modality → 415 naming the ones Open-AutoGLM knows."""
    unknown = sorted(set(requested) - KNOWN_MODALITIES)
    if unknown:
        raise UnsupportedMediaTypeError(
            f"unknown modality {_names(unknown)}; Open-AutoGLM knows {_names(sorted(KNOWN_MODALITIES))}",
            param=param,
            code="unsupported_modality",
        )


def check_modalities(requested: set[str], accepted: frozenset[str], *, param: str = "inputs") -> None:
    """A modality unknown, or not accepted by the target model → 415 naming the modalities it accepts."""
    check_known_modalities(requested, param=param)
    refused = sorted(set(requested) - accepted)
    if refused:
        raise UnsupportedMediaTypeError(
            f"this model accepts only {_names(sorted(accepted))} input; it refuses {_names(refused)} input",
            param=param,
            code="unsupported_modality",
        )


def _names(items: Iterable[str]) -> str:
    return ", ".join(repr(x) for x in items)


# --- base64 and data: URIs ----------------------------------------------------------------------------------


def decode_base64(data: str, *, max_bytes: int, param: str) -> bytes:
    """Strict (padded) base64, standard or URL-safe alphabet, ASCII whitespace ignored. Size checked first."""
    text = "".join(data.split())
    if not text:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    if len(text) % 4:
        raise InvalidRequestError(
            f"{param} is not valid base64: its length ({len(text)}) must be a multiple of 4 ('=' padded)",
            param=param,
        )
    size = len(text) // 4 * 3 - (len(text) - len(text.rstrip("=")))
    if size > max_bytes:
        raise PayloadTooLargeError(f"{param} is {size} bytes; the limit is {max_bytes} bytes", param=param)
    urlsafe = "-" in text or "_" in text
    if urlsafe and ("+" in text or "/" in text):
        raise InvalidRequestError(
            f"{param} is not valid base64: it mixes the standard and URL-safe alphabets", param=param
        )
    altchars = b"-_" if urlsafe else None
    try:
        return base64.b64decode(text, altchars=altchars, validate=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII character
        raise InvalidRequestError(f"{param} is not valid base64: {exc}", param=param) from exc


def parse_data_uri(uri: str, *, max_bytes: int | None = None, param: str = "image_url") -> tuple[str, bytes]:
    """``data:[<media type>][;base64],<data>`` (RFC 2397) → (media type in lower case, bytes)."""
    if uri[:5].lower() != "data:":
        raise InvalidRequestError(
            f"{param} must be a data: URI (data:<media type>;base64,<data>); remote URLs are not fetched",
            param=param,
        )
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise InvalidRequestError(f"{param} is not a valid data: URI: no ',' before the data", param=param)
    fields = [f.strip() for f in header.split(";")]
    mime = fields[0].lower() or "text/plain"
    if mime.count("/") != 1 or not all(mime.split("/")):
        raise InvalidRequestError(f"{param} has an invalid media type {fields[0]!r}", param=param)
    limit = max_bytes if max_bytes is not None else len(uri)
    if len(fields) > 1 and fields[-1].lower() == "base64":
        return mime, decode_base64(payload, max_bytes=limit, param=param)
    # Percent-encoding is at most 3 characters per byte: a payload over 3x the limit is refused undecoded.
    data = b"" if len(payload) > 3 * limit else urllib.parse.unquote_to_bytes(payload)
    if len(payload) > 3 * limit or len(data) > limit:
        raise PayloadTooLargeError(f"{param} is over the limit of {limit} bytes", param=param)
    return mime, data


# --- format sniffing ----------------------------------------------------------------------------------------


def normalize_format(declared: str) -> str:
    """``"JPG"``, ``"image/jpeg"``, ``"audio/x-wav"`` → ``"jpeg"``, ``"jpeg"``, ``"wav"``."""
    name = declared.strip().lower()
    for prefix in ("image/", "audio/"):
        name = name.removeprefix(prefix)
    return _ALIASES.get(name, name)


def sniff_image_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def sniff_audio_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data.startswith(b"fLaC"):
        return "flac"
    if data.startswith(b"OggS"):
        return "ogg"
    if data.startswith(b"ID3") and len(data) >= 10:
        # An ID3v2 tag (10-byte header, synchsafe size) may precede MP3 frames or, rarely, FLAC.
        size = (data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F)
        rest = data[10 + size :]
        return "flac" if rest.startswith(b"fLaC") else ("mp3" if _is_mp3_frame(rest) else None)
    return "mp3" if _is_mp3_frame(data) else None


def _is_mp3_frame(data: bytes) -> bool:
    """An MPEG audio layer III frame header: sync bits, valid version, bitrate and sample-rate indexes."""
    if len(data) < 4 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return False
    version, layer = (data[1] >> 3) & 3, (data[1] >> 1) & 3
    bitrate, rate = data[2] >> 4, (data[2] >> 2) & 3
    return version != 1 and layer == 1 and bitrate != 15 and rate != 3


def _resolve_format(
    sniffed: str | None, declared: str | None, allowed: tuple[str, ...], modality: str, param: str
) -> str:
    accepted = ", ".join(allowed)
    if declared is not None:
        fmt = normalize_format(declared)
        if fmt not in allowed:
            raise UnsupportedMediaTypeError(
                f"{modality} format {declared!r} is not accepted; accepted {modality} formats: {accepted}",
                param=param,
                code="unsupported_format",
            )
        if sniffed != fmt:
            found = f"are {sniffed}" if sniffed else f"are not a {accepted} {modality}"
            raise UnsupportedMediaTypeError(
                f"{modality} declared as {fmt} but its bytes {found}", param=param, code="format_mismatch"
            )
    if sniffed is None or sniffed not in allowed:
        what = f"{sniffed} is not accepted" if sniffed else "the bytes match no accepted format"
        raise UnsupportedMediaTypeError(
            f"{modality}: {what}; accepted {modality} formats: {accepted}",
            param=param,
            code="unsupported_format",
        )
    return sniffed


# --- images and audio ---------------------------------------------------------------------------------------


def validate_image(
    data: bytes, declared: str | None, cfg: MediaConfig, *, param: str, format_param: str | None = None
) -> ValidatedMedia:
    """Check size, format (declared vs. sniffed), area from the header, then decode to prove it is whole."""
    if len(data) > cfg.max_image_bytes:
        raise PayloadTooLargeError(
            f"{param} is {len(data)} bytes; the limit is {cfg.max_image_bytes} bytes", param=param
        )
    fmt = _resolve_format(sniff_image_format(data), declared, cfg.image_formats, "image", format_param or param)
    try:
        # Only the sniffed format's plugin may parse the bytes: no other decoder ever sees user data.
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMAT[fmt]]) as im:
            width, height = im.size
            if width * height > cfg.max_image_pixels:
                raise PayloadTooLargeError(
                    f"{param} is {width}x{height} = {width * height} pixels; the limit is "
                    f"{cfg.max_image_pixels} pixels",
                    param=param,
                )
            im.load()  # the first frame only; the area check above bounds its memory
    except Image.DecompressionBombError as exc:  # Pillow's own guard, past 2x Image.MAX_IMAGE_PIXELS
        raise PayloadTooLargeError(
            f"{param} declares too many pixels ({exc}); the limit is {cfg.max_image_pixels} pixels",
            param=param,
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidRequestError(f"{param} is not a valid {fmt} image: its header is corrupt", param=param) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidRequestError(f"{param} is not a valid {fmt} image: {exc}", param=param) from exc
    return ValidatedMedia("image", fmt, data, width, height)


def validate_audio(
    data: bytes, declared: str | None, cfg: MediaConfig, *, param: str, format_param: str | None = None
) -> ValidatedMedia:
    """Check size and format (declared vs. sniffed from magic bytes); audio is not decoded here."""
    if len(data) > cfg.max_audio_bytes:
        raise PayloadTooLargeError(
            f"{param} is {len(data)} bytes; the limit is {cfg.max_audio_bytes} bytes", param=param
        )
    fmt = _resolve_format(sniff_audio_format(data), declared, cfg.audio_formats, "audio", format_param or param)
    return ValidatedMedia("audio", fmt, data)


def validate_media_input(
    modality: str, data_b64: str, declared: str | None, cfg: MediaConfig, *, param: str
) -> ValidatedMedia:
    """One base64 input of the native envelope (``param`` names it, e.g. ``inputs[1]``)."""
    data_param, format_param = f"{param}.data", f"{param}.metadata.format"
    if modality == "image":
        data = decode_base64(data_b64, max_bytes=cfg.max_image_bytes, param=data_param)
        return validate_image(data, declared, cfg, param=data_param, format_param=format_param)
    if modality == "audio":
        data = decode_base64(data_b64, max_bytes=cfg.max_audio_bytes, param=data_param)
        return validate_audio(data, declared, cfg, param=data_param, format_param=format_param)
    check_known_modalities([modality], param=f"{param}.modality")
    raise InvalidRequestError(f"{param} is {modality!r} input, not base64 media", param=f"{param}.modality")


def validate_image_data_uri(uri: str, cfg: MediaConfig, *, param: str = "image_url") -> ValidatedMedia:
    """An OpenAI ``image_url`` part: a ``data:image/...;base64,...`` URI, validated like an envelope image."""
    mime, data = parse_data_uri(uri, max_bytes=cfg.max_image_bytes, param=param)
    if not mime.startswith("image/"):
        accepted = ", ".join(IMAGE_MIME[f] for f in cfg.image_formats)
        raise UnsupportedMediaTypeError(
            f"{param} has media type {mime!r}, not an image; accepted: {accepted}",
            param=param,
            code="unsupported_format",
        )
    return validate_image(data, mime, cfg, param=param)
