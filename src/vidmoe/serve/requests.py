"""Request bodies to `GenerateSettings`: JSON or multipart form, size-limited, with an optional
image (base64 field or file upload) decoded by Pillow only.

Every value check on the settings themselves is `resolve_settings`'s (shared with the CLI);
this module only maps fields and types, so a bad request gets the CLI's message.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path

from starlette.requests import Request

from vidmoe.sampling.settings import GenerateSettings

FIELDS = ("prompt", "negative_prompt", "width", "height", "num_frames", "num_steps", "shift",
          "sampler", "guidance", "boundary", "steps_per_expert", "sigmas", "seed", "image")  # fmt: skip
_INTS = ("width", "height", "num_frames", "num_steps", "seed")
_FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF"]
MAX_IMAGE_PIXELS = 4096 * 4096


class PayloadTooLarge(ValueError):
    """The request body is over the server's limit."""


async def read_body(request: Request, limit: int) -> tuple[dict, bytes | None]:
    """The fields of a JSON or form body and the raw image bytes (or None)."""
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
    kind = request.headers.get("content-type", "")
    # `curl -d '{...}'` labels JSON as a urlencoded form: a body that opens with { is JSON
    if kind.startswith(_FORMS) and not (kind.startswith(_FORMS[1]) and body.lstrip()[:1] == b"{"):
        return await _read_form(request, body)
    try:
        fields = json.loads(body or b"{}")
    except json.JSONDecodeError as e:
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
    data = image.split(",", 1)[1] if image.startswith("data:") else image
    try:
        return fields, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image must be base64-encoded image bytes (PNG, JPEG, WebP)") from None


async def _read_form(request: Request, body: bytes) -> tuple[dict, bytes | None]:
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, receive).form()
    fields, image = {}, None
    for key, value in form.multi_items():
        if key == "image":
            image = await value.read() if hasattr(value, "read") else _b64(value)
        elif key in ("guidance", "steps_per_expert", "sigmas"):
            fields[key] = _form_json(key, value)
        elif key in _INTS:
            fields[key] = _form_number(key, value, int)
        elif key == "shift":
            fields[key] = _form_number(key, value, float)
        else:
            fields[key] = value
    return fields, image


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image must be a file upload or base64 image bytes") from None


def _form_json(key: str, value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ValueError(
            f'{key} must be JSON (e.g. {{"high_noise": 4.0}}); got {value!r}'
        ) from None


def _form_number(key: str, value: str, kind):
    try:
        return kind(value)
    except ValueError:
        return value  # resolve_settings says what is wrong with it


def to_settings(fields: dict, image_path: str | None = None) -> GenerateSettings:
    """Map request fields onto `GenerateSettings` (types as the CLI produces them)."""
    unknown = sorted(set(fields) - set(FIELDS) - {"image"})
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}; accepted fields: {', '.join(FIELDS)}")
    kw = {k: v for k, v in fields.items() if v is not None and k != "image"}
    if "seed" in kw and (not isinstance(kw["seed"], int) or isinstance(kw["seed"], bool)):
        raise ValueError(f"seed must be an integer; got {kw['seed']!r}")
    for key in ("guidance", "steps_per_expert"):
        if key in kw and not isinstance(kw[key], dict):
            raise ValueError(f"{key} must be an object of expert name -> value; got {kw[key]!r}")
    if "guidance" in kw:  # as the CLI parses them: numbers are floats
        kw["guidance"] = {n: float(g) if _is_number(g) else g for n, g in kw["guidance"].items()}
    if _is_number(kw.get("boundary")):
        kw["boundary"] = float(kw["boundary"])
    if "sigmas" in kw:
        if not isinstance(kw["sigmas"], list) or not all(_is_number(x) for x in kw["sigmas"]):
            raise ValueError(f"sigmas must be a list of numbers; got {kw['sigmas']!r}")
        kw["sigmas"] = tuple(float(x) for x in kw["sigmas"])
    if image_path is not None:
        kw["image"] = image_path
    return GenerateSettings(**kw)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


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
    from vidmoe.io.video import atomic_write

    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
