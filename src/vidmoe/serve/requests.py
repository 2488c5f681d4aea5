"""Request bodies to `GenerateSettings`: JSON or multipart form, size-limited, with an optional
image (base64 field or file upload) decoded by Pillow only.

This module checks the shape of a request: the content type, strict JSON (no NaN or Infinity),
and the JSON type of each field, before a `GenerateSettings` is built. Every check on the
values themselves is `resolve_settings`'s (shared with the CLI), so a bad value gets the CLI's
message, within the limits the server was started with.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from vidmoe.sampling.settings import GenerateSettings

FIELDS = (
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "num_frames",
    "num_steps",
    "shift",
    "sampler",
    "guidance",
    "boundary",
    "steps_per_expert",
    "sigmas",
    "seed",
    "image",
    "area",
    "rewrite_prompt",
)
_INTS = ("width", "height", "num_frames", "num_steps", "seed", "area")
_STRINGS = ("prompt", "negative_prompt", "sampler")
_JSON_KINDS = ("", "application/json")
_FORM_KINDS = ("multipart/form-data", "application/x-www-form-urlencoded")
INT64 = 2**63
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF"]
MAX_IMAGE_PIXELS = 4096 * 4096


class PayloadTooLarge(ValueError):
    """The request body is over the server's limit."""


class UnsupportedMediaType(ValueError):
    """The request body is neither JSON nor a form."""


async def read_body(request: Request, limit: int) -> tuple[dict, bytes | None]:
    """The fields of a JSON or form body and the raw image bytes (or None).

    JSON is parsed in the thread pool: a large body never holds the event loop.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in _JSON_KINDS + _FORM_KINDS and not kind.endswith("+json"):
        raise UnsupportedMediaType(
            f"content type {kind!r} is not accepted: send the settings as application/json "
            "(or a multipart/form-data form)"
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    # `curl -d '{...}'` labels JSON as a urlencoded form: a body that opens with { is JSON
    if kind in _FORM_KINDS and not (kind == _FORM_KINDS[1] and body.lstrip()[:1] == b"{"):
        return await _read_form(request, body)
    return await run_in_threadpool(parse_json_body, body)


def strict_json(text: str | bytes):
    """`json.loads` that refuses NaN, Infinity and numbers too large for a float (1e400)."""

    def constant(name: str):
        raise ValueError(f"{name} is not a number JSON allows (RFC 8259); send a finite number")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"{text} is too large for a 64-bit float; send a finite number")
        return value

    return json.loads(text, parse_constant=constant, parse_float=finite)


def parse_json_body(body: bytes) -> tuple[dict, bytes | None]:
    """The fields of a JSON body and its decoded `image` (or None)."""
    try:
        fields = strict_json(body or b"{}")
    except (ValueError, RecursionError) as e:  # bad JSON, NaN, 1e400, an int of 4301 digits
        raise ValueError(f"request body must be a JSON object of settings: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(
            f"request body must be a JSON object of settings; got {type(fields).__name__}"
        )
    image = fields.pop("image", None)
    if image is None:
        return fields, None
    if not isinstance(image, str):
        raise ValueError("image must be a base64 string (optionally a data: URL)")
    return fields, _b64(image.split(",", 1)[1] if image.startswith("data:") else image)


async def _read_form(request: Request, body: bytes) -> tuple[dict, bytes | None]:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form()
    fields, image = {}, None
    for key, value in form.multi_items():
        if key == "image":
            image = await value.read() if hasattr(value, "read") else _b64(value.split(",")[-1])
        elif key in ("guidance", "steps_per_expert", "sigmas"):
            fields[key] = _form_json(key, value)
        elif key in _INTS:
            fields[key] = _form_number(value, int)
        elif key == "shift":
            fields[key] = _form_number(value, float)
        elif key == "rewrite_prompt":  # a checkbox or a select: true/false, on/off, 1/0
            flag = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
            fields[key] = (
                flag.get(value.strip().lower(), value) if isinstance(value, str) else value
            )
        else:
            fields[key] = value
    return fields, image


def _b64(text: str) -> bytes:
    """Base64 bytes; whitespace (line breaks every 76 columns, as MIME wraps it) is dropped."""
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image must be base64-encoded image bytes (PNG, JPEG, WebP)") from None


def _form_json(key: str, value: str):
    try:
        return strict_json(value)
    except ValueError:
        raise ValueError(
            f'{key} must be JSON (e.g. {{"high_noise": 4.0}}); got {value!r}'
        ) from None


def _form_number(value: str, kind):
    try:
        number = kind(value)
    except ValueError:
        return value  # to_settings says it is a string
    return number if math.isfinite(number) else value  # "nan", "inf": a string, refused


def _describe(value) -> str:
    """A JSON value's type and a short rendering: "a string ('64')"."""
    kinds = (
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "an object"),
    )
    kind = next((name for t, name in kinds if isinstance(value, t)), type(value).__name__)
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{kind} ({shown})"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_int(key: str, value) -> None:
    if not _is_int(value):
        raise ValueError(f"{key} must be an integer; got {_describe(value)}")
    if not -INT64 <= value < INT64:
        raise ValueError(f"{key} must fit a signed 64-bit integer (below 2**63); got {value}")


def check_field_types(kw: dict) -> None:
    """Refuse a field whose JSON type cannot be the setting (before any value is looked at)."""
    for key, value in kw.items():
        if key in _INTS:
            _check_int(key, value)
        elif key in _STRINGS and not isinstance(value, str):
            raise ValueError(f"{key} must be a string; got {_describe(value)}")
        elif key == "rewrite_prompt" and not isinstance(value, bool):
            raise ValueError(f"rewrite_prompt must be true or false; got {_describe(value)}")
        elif key == "shift" and not _is_number(value):
            raise ValueError(f"shift must be a number; got {_describe(value)}")
        elif key == "boundary" and not (_is_number(value) or isinstance(value, str)):
            raise ValueError(
                f"boundary must be a number (a sigma) or a mode string; got {_describe(value)}"
            )
        elif key in ("guidance", "steps_per_expert"):
            if not isinstance(value, dict):
                raise ValueError(
                    f"{key} must be an object of expert name -> value; got {_describe(value)}"
                )
            for name, v in value.items():
                if key == "guidance" and not _is_number(v):
                    raise ValueError(f"guidance for {name} must be a number; got {_describe(v)}")
                if key == "steps_per_expert":
                    _check_int(f"steps_per_expert for {name}", v)
        elif key == "sigmas" and not (
            isinstance(value, list) and all(_is_number(x) for x in value)
        ):
            raise ValueError(f"sigmas must be a list of numbers; got {_describe(value)}")


def to_settings(fields: dict, image_path: str | None = None) -> GenerateSettings:
    """Map request fields onto `GenerateSettings` (types as the CLI produces them)."""
    unknown = sorted(set(fields) - set(FIELDS) - {"image"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; accepted fields: {', '.join(FIELDS)}")
    kw = {k: v for k, v in fields.items() if v is not None and k != "image"}
    check_field_types(kw)
    if "guidance" in kw:  # as the CLI parses them: numbers are floats
        kw["guidance"] = {n: float(g) for n, g in kw["guidance"].items()}
    if _is_number(kw.get("boundary")):
        kw["boundary"] = float(kw["boundary"])
    if "shift" in kw:
        kw["shift"] = float(kw["shift"])
    if "sigmas" in kw:
        kw["sigmas"] = tuple(float(x) for x in kw["sigmas"])
    if image_path is not None:
        kw["image"] = image_path
    return GenerateSettings(**kw)


def decode_image(data: bytes, limit: int):
    """Decode uploaded bytes as an image with Pillow (RGB), or raise ValueError."""
    from PIL import Image

    if len(data) > limit:
        raise PayloadTooLarge(f"image is {len(data)} bytes; the limit is {limit}")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
            probe.verify()
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"image is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels"
            )
        return image.convert("RGB")
    except ValueError:
        raise
    except Exception as e:  # Pillow raises many kinds for hostile or truncated files
        raise ValueError(
            f"image could not be decoded as {', '.join(IMAGE_FORMATS)}: {type(e).__name__}"
        ) from None


def save_image(image, path: Path) -> Path:
    """Write a decoded upload as PNG, atomically (the name is the server's, never the client's)."""
    from vidmoe.io.atomic import atomic_write

    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
