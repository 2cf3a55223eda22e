"""Open-AutoGLM media validation (base64, data: URIs, sniffing, limits, modalities) and /v1/infer envelope.

Images are real files written by Pillow; audio is a real WAV from the standard library plus the published
magic bytes of the other formats; decompression bombs are hand-built PNGs with valid chunk CRCs.
"""

from __future__ import annotations

import base64
import io
import struct
import urllib.parse
import wave
import zlib

import pytest
from PIL import Image
from pydantic import ValidationError

from openautoglm.config.media import MediaConfig
from openautoglm.protocol.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from openautoglm.protocol.multimodal import InferParameters, InferRequest
from openautoglm.server.http.infer import build_generation_request, validate_envelope_media
from openautoglm.server.http.media import (
    check_known_modalities,
    check_modalities,
    decode_base64,
    parse_data_uri,
    sniff_audio_format,
    sniff_image_format,
    validate_audio,
    validate_image,
    validate_image_data_uri,
    validate_media_input,
)

CFG = MediaConfig()
IMAGE_FORMATS = ["jpeg", "png", "webp", "gif"]


def image_bytes(fmt: str, size: tuple[int, int] = (12, 8), noise: bool = False) -> bytes:
    if noise:  # incompressible, so a truncated file is missing pixel data, not just its trailer
        im = Image.frombytes("RGB", size, bytes((i * 7919) % 251 for i in range(size[0] * size[1] * 3)))
    else:
        im = Image.new("RGB", size, (200, 30, 90))
    buf = io.BytesIO()
    im.save(buf, format=fmt.upper())
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG whose IHDR claims width x height (8-bit grayscale), with valid CRCs and the given IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def wav_bytes(frames: int = 800) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00\x01" * frames)
    return buf.getvalue()


MP3_FRAME = b"\xff\xfb\x90\x64" + b"\x00" * 60  # MPEG-1 layer III, 128 kbit/s, 44.1 kHz
FLAC = b"fLaC\x00\x00\x00\x22" + b"\x00" * 34
OGG = b"OggS\x00\x02" + b"\x00" * 40


def id3(rest: bytes, tag_size: int = 20) -> bytes:
    size = bytes([(tag_size >> s) & 0x7F for s in (21, 14, 7, 0)])
    return b"ID3\x04\x00\x00" + size + b"\x00" * tag_size + rest


# --- images -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_real_images_validate_with_and_without_declared_format(fmt: str) -> None:
    data = image_bytes(fmt, (12, 8))
    assert sniff_image_format(data) == fmt
    for declared in (None, fmt, fmt.upper(), f"image/{fmt}"):
        media = validate_image(data, declared, CFG, param="img")
        assert (media.modality, media.format, media.width, media.height) == ("image", fmt, 12, 8)
        assert media.data == data and media.mime == f"image/{fmt}"


def test_format_aliases() -> None:
    jpeg = image_bytes("jpeg")
    assert validate_image(jpeg, "jpg", CFG, param="img").format == "jpeg"
    assert validate_image(jpeg, "image/JPG", CFG, param="img").format == "jpeg"


def test_png_declared_as_jpeg_is_415_naming_both() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as err:
        validate_image(image_bytes("png"), "jpeg", CFG, param="img")
    assert err.value.http_status == 415 and err.value.code == "format_mismatch"
    assert "jpeg" in err.value.message and "png" in err.value.message


def test_declared_format_not_accepted_is_415_listing_accepted() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as err:
        validate_image(image_bytes("png"), "bmp", CFG, param="img")
    assert "bmp" in err.value.message and "jpeg, png, webp, gif" in err.value.message


def test_undeclared_bmp_is_415() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as err:
        validate_image(image_bytes("bmp"), None, CFG, param="img")
    assert err.value.code == "unsupported_format"


def test_config_restricts_image_formats() -> None:
    cfg = MediaConfig(image_formats=("png",))
    validate_image(image_bytes("png"), None, cfg, param="img")
    for declared in (None, "jpeg"):
        with pytest.raises(UnsupportedMediaTypeError):
            validate_image(image_bytes("jpeg"), declared, cfg, param="img")


def test_random_bytes_declared_as_image_are_415() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as err:
        validate_image(b"hello, this is text", "png", CFG, param="img")
    assert err.value.code == "format_mismatch"


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_image_is_400(fmt: str) -> None:
    data = image_bytes(fmt, (64, 64), noise=True)
    with pytest.raises(InvalidRequestError) as err:
        validate_image(data[: len(data) // 2], fmt, CFG, param="img")
    assert err.value.http_status == 400 and err.value.param == "img"


def test_corrupt_png_header_is_400() -> None:
    with pytest.raises(InvalidRequestError):
        validate_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "png", CFG, param="img")


def test_image_over_byte_limit_is_413() -> None:
    data = image_bytes("png")
    with pytest.raises(PayloadTooLargeError) as err:
        validate_image(data, "png", MediaConfig(max_image_bytes=len(data) - 1), param="img")
    assert err.value.http_status == 413 and str(len(data) - 1) in err.value.message


def test_image_over_pixel_limit_with_tiny_byte_size_is_413() -> None:
    data = image_bytes("png", (300, 300))
    assert len(data) < 2000  # small on the wire, large once decoded
    with pytest.raises(PayloadTooLargeError) as err:
        validate_image(data, "png", MediaConfig(max_image_pixels=256 * 256), param="img")
    assert "300x300" in err.value.message
    validate_image(data, "png", MediaConfig(max_image_pixels=300 * 300), param="img")


def test_decompression_bomb_over_our_limit_is_refused_before_decoding() -> None:
    # 6000 x 6000 zero bytes deflate to ~35 KB; 36 M pixels: over the default 16.7 M, under Pillow's guard.
    rows = zlib.compress(b"\x00" * (6001 * 6000), 9)
    data = png_header(6000, 6000, rows)
    assert len(data) < 64 * 1024
    with pytest.raises(PayloadTooLargeError) as err:
        validate_image(data, "png", CFG, param="img")
    assert "6000x6000" in err.value.message


def test_header_claiming_ten_billion_pixels_is_413() -> None:
    # Past Pillow's own DecompressionBombError threshold: it must surface as 413 too, never as a crash.
    with pytest.raises(PayloadTooLargeError):
        validate_image(png_header(100_000, 100_000), "png", MediaConfig(max_image_pixels=10**12), param="img")


# --- base64 -------------------------------------------------------------------------------------------------


def test_base64_roundtrip_standard_urlsafe_and_wrapped() -> None:
    data = bytes(range(256)) * 3
    assert decode_base64(b64(data), max_bytes=10_000, param="p") == data
    assert decode_base64(base64.urlsafe_b64encode(data).decode(), max_bytes=10_000, param="p") == data
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    assert decode_base64(wrapped, max_bytes=10_000, param="p") == data


@pytest.mark.parametrize(
    "bad",
    [
        b64(b"some image bytes!")[:-3],  # truncated
        b64(b"abcdef")[:-4] + "ab=c",  # padding in the middle
        "SGVsbG8*V29ybGQ=",  # not in the alphabet
        "SGVsbG8gd29ybGQé",  # not ASCII
        "   ",  # empty
        "SGVs+G8-V29ybGQ=",  # mixed alphabets
    ],
)
def test_invalid_base64_is_400_naming_the_param(bad: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        decode_base64(bad, max_bytes=1000, param="inputs[3].data")
    assert err.value.http_status == 400 and err.value.param == "inputs[3].data"


def test_base64_size_is_checked_before_decoding() -> None:
    # Invalid characters, but too large: the size check must come first (413, not 400).
    with pytest.raises(PayloadTooLargeError):
        decode_base64("!!!!" * 100, max_bytes=299, param="p")
    assert len(decode_base64(b64(b"x" * 300), max_bytes=300, param="p")) == 300
    with pytest.raises(PayloadTooLargeError):
        decode_base64(b64(b"x" * 301), max_bytes=300, param="p")


# --- audio --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (wav_bytes(), "wav"),
        (MP3_FRAME, "mp3"),
        (id3(MP3_FRAME), "mp3"),
        (FLAC, "flac"),
        (id3(FLAC), "flac"),
        (OGG, "ogg"),
    ],
)
def test_audio_magic_bytes(data: bytes, fmt: str) -> None:
    assert sniff_audio_format(data) == fmt
    assert validate_audio(data, None, CFG, param="a").format == fmt
    assert validate_audio(data, fmt, CFG, param="a").mime.startswith("audio/")


def test_audio_mime_aliases() -> None:
    assert validate_audio(wav_bytes(), "audio/x-wav", CFG, param="a").format == "wav"
    assert validate_audio(MP3_FRAME, "audio/mpeg", CFG, param="a").format == "mp3"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff\xe0" + b"\x00" * 20,
        b"\xff\xfb\xf0\x64" + b"\x00" * 8,
        id3(b"junk"),
        b"RIFF\x00\x00\x00\x00WEBP",
    ],
)
def test_non_audio_bytes_are_415(data: bytes) -> None:
    assert sniff_audio_format(data) is None
    with pytest.raises(UnsupportedMediaTypeError):
        validate_audio(data, None, CFG, param="a")


def test_wav_declared_as_mp3_is_415() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as err:
        validate_audio(wav_bytes(), "mp3", CFG, param="a")
    assert err.value.code == "format_mismatch" and "wav" in err.value.message


def test_audio_over_limit_is_413() -> None:
    data = wav_bytes(1000)
    with pytest.raises(PayloadTooLargeError):
        validate_audio(data, "wav", MediaConfig(max_audio_bytes=len(data) - 1), param="a")
    with pytest.raises(PayloadTooLargeError):
        validate_media_input("audio", b64(data), "wav", MediaConfig(max_audio_bytes=1000), param="inputs[0]")


def test_media_input_errors_name_data_or_format() -> None:
    with pytest.raises(InvalidRequestError) as err:
        validate_media_input("image", "abc", "png", CFG, param="inputs[2]")
    assert err.value.param == "inputs[2].data"
    with pytest.raises(UnsupportedMediaTypeError) as err415:
        validate_media_input("image", b64(image_bytes("png")), "gif", CFG, param="inputs[2]")
    assert err415.value.param == "inputs[2].metadata.format"
    with pytest.raises(UnsupportedMediaTypeError):
        validate_media_input("video", "AAAA", None, CFG, param="inputs[2]")


# --- data: URIs ---------------------------------------------------------------------------------------------


def test_parse_data_uri() -> None:
    png = image_bytes("png")
    assert parse_data_uri(f"data:image/png;base64,{b64(png)}") == ("image/png", png)
    assert parse_data_uri(f"DATA:Image/PNG;name=x.png;base64,{b64(png)}") == ("image/png", png)
    percent = "data:image/png," + urllib.parse.quote_from_bytes(png)
    assert parse_data_uri(percent) == ("image/png", png)
    assert parse_data_uri("data:,hello") == ("text/plain", b"hello")
    with pytest.raises(PayloadTooLargeError):
        parse_data_uri(percent, max_bytes=len(png) - 1)
    with pytest.raises(PayloadTooLargeError):
        parse_data_uri("data:image/png," + "%00" * 10, max_bytes=9)
    assert parse_data_uri("data:image/png," + "%00" * 10, max_bytes=10)[1] == bytes(10)


@pytest.mark.parametrize(
    "uri",
    [
        "https://example.com/cat.png",
        "data:image/png;base64",
        "data:image;base64,AAAA",
        "data:image/png;base64,A*==",
    ],
)
def test_bad_data_uri_is_400(uri: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_data_uri(uri, param="messages[0].content[1].image_url")
    assert err.value.http_status == 400 and err.value.param == "messages[0].content[1].image_url"


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_image_data_uri_validates_like_the_envelope(fmt: str) -> None:
    data = image_bytes(fmt, (5, 7))
    media = validate_image_data_uri(f"data:image/{fmt};base64,{b64(data)}", CFG)
    assert (media.format, media.width, media.height, media.data) == (fmt, 5, 7, data)
    assert validate_image_data_uri(media.data_uri(), CFG).data == data


def test_image_data_uri_failures() -> None:
    png = b64(image_bytes("png"))
    with pytest.raises(UnsupportedMediaTypeError):  # declared jpeg, bytes png
        validate_image_data_uri(f"data:image/jpeg;base64,{png}", CFG)
    with pytest.raises(UnsupportedMediaTypeError) as err:  # not an image media type
        validate_image_data_uri(f"data:text/plain;base64,{png}", CFG)
    assert "image/png" in err.value.message
    with pytest.raises(PayloadTooLargeError):
        validate_image_data_uri(f"data:image/png;base64,{png}", MediaConfig(max_image_bytes=10))
    with pytest.raises(InvalidRequestError):
        validate_image_data_uri(f"data:image/png;base64,{png[:-2]}", CFG)


# --- modalities ---------------------------------------------------------------------------------------------


def test_check_modalities() -> None:
    check_modalities({"text"}, frozenset({"text"}))
    check_modalities({"text", "image"}, frozenset({"text", "image", "audio"}))
    with pytest.raises(UnsupportedMediaTypeError) as err:
        check_modalities({"text", "image"}, frozenset({"text"}))
    assert err.value.http_status == 415 and "'text'" in err.value.message and "'image'" in err.value.message
    with pytest.raises(UnsupportedMediaTypeError) as unknown:
        check_modalities({"video"}, frozenset({"text"}))
    assert "'video'" in unknown.value.message
    with pytest.raises(UnsupportedMediaTypeError):
        check_known_modalities(["text", "smell"], param="inputs[1].modality")
    check_known_modalities(["text", "image", "audio"])


# --- config -------------------------------------------------------------------------------------------------


def test_media_config_validation() -> None:
    for bad in (
        {"max_image_bytes": 0},
        {"image_formats": ()},
        {"image_formats": ("png", "png")},
        {"image_formats": ("bmp",)},
        {"audio_formats": ("aac",)},
        {"max_video_bytes": 1},
    ):
        with pytest.raises(ValidationError):
            MediaConfig(**bad)


# --- the envelope -------------------------------------------------------------------------------------------


def envelope(*inputs: dict, **extra: object) -> InferRequest:
    return InferRequest.model_validate({"inputs": list(inputs), **extra})


def test_parameters_map_onto_sampling_params() -> None:
    params = InferParameters.model_validate(
        {"max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 11, "stop": "\n", "n": 2}
    ).to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (7, 0.0, 0.5, 3)
    assert (params.seed, params.stop, params.n, params.greedy) == (11, ["\n"], 2, True)
    defaults = InferParameters().to_sampling_params()
    assert defaults.max_tokens == 16 and defaults.temperature == 1.0
    assert InferParameters.model_validate({"max_tokens": None}).to_sampling_params().max_tokens is None
    with pytest.raises(InvalidRequestError) as err:
        InferParameters.model_validate({"top_p": 0}).to_sampling_params()
    assert err.value.param == "top_p"


@pytest.mark.parametrize(
    "body",
    [
        {"inputs": []},
        {"inputs": [{"modality": "text"}]},
        {"inputs": [{"modality": "text", "data": 3}]},
        {"inputs": [{"modality": "text", "data": "x"}], "parameters": {"temperature": "hot"}},
        {"inputs": [{"modality": "text", "data": "x"}], "parameters": {"beam_width": 4}},
        {"inputs": [{"modality": "text", "data": "x", "metadata": {"role": "robot"}}]},
    ],
)
def test_malformed_envelopes_fail_schema_validation(body: dict) -> None:
    with pytest.raises(ValidationError):
        InferRequest.model_validate(body)


def test_text_inputs_become_one_prompt() -> None:
    env = envelope(
        {"modality": "text", "data": "Hello"},
        {"modality": "text", "data": "world"},
        parameters={"max_tokens": 5, "temperature": 0},
    )
    req = build_generation_request(env, {}, request_id="r1", model="demo")
    assert (req.prompt, req.messages, req.request_id, req.model) == ("Hello\nworld", None, "r1", "demo")
    assert req.sampling.max_tokens == 5 and req.sampling.greedy
    req.validate_prompt()


def test_roles_make_chat_messages_merging_neighbours() -> None:
    env = envelope(
        {"modality": "text", "data": "Be brief.", "metadata": {"role": "system"}},
        {"modality": "text", "data": "Hi", "metadata": {"role": "user"}},
        {"modality": "text", "data": "there"},  # no role: user, merged with the previous input
        {"modality": "text", "data": "Hello!", "metadata": {"role": "assistant"}},
        {"modality": "text", "data": "Bye", "metadata": {"role": "user", "lang": "en"}},
    )
    req = build_generation_request(env, {}, request_id="r2", model=None)
    assert req.prompt is None
    assert req.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi\nthere"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]


def test_media_become_content_parts_for_models_that_accept_them() -> None:
    png, wav = image_bytes("png"), wav_bytes()
    env = envelope(
        {"modality": "text", "data": "What is this?"},
        {"modality": "image", "data": b64(png), "metadata": {"format": "png"}},
        {"modality": "audio", "data": b64(wav)},
    )
    media = validate_envelope_media(env, CFG)
    assert sorted(media) == [1, 2] and media[1].format == "png" and media[2].format == "wav"
    req = build_generation_request(env, media, request_id="r3", model=None)
    assert req.messages is not None and len(req.messages) == 1
    parts = req.messages[0]["content"]
    assert parts[0] == {"type": "text", "text": "What is this?"}
    assert parse_data_uri(parts[1]["image_url"]["url"]) == ("image/png", png)
    assert base64.b64decode(parts[2]["input_audio"]["data"]) == wav and parts[2]["input_audio"]["format"] == "wav"


def test_envelope_errors_name_inputs_and_parameters() -> None:
    with pytest.raises(InvalidRequestError) as err:
        build_generation_request(envelope({"modality": "text", "data": ""}), {}, request_id="r", model=None)
    assert err.value.param == "inputs[0].data"
    bad = envelope({"modality": "text", "data": "x"}, parameters={"temperature": -1})
    with pytest.raises(InvalidRequestError) as perr:
        build_generation_request(bad, {}, request_id="r", model=None)
    assert perr.value.param == "parameters.temperature"
    bomb = envelope({"modality": "text", "data": "x"}, {"modality": "image", "data": b64(png_header(9000, 9000))})
    with pytest.raises(PayloadTooLargeError) as big:
        validate_envelope_media(bomb, CFG)
    assert big.value.param == "inputs[1].data"
