"""The frame size and length of a request: the model's grid (4k+1 frames, multiples of the VAE
stride x patch), the release's image-sized rules for i2v and ti2v (`area`), and the limits."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from vidmoe.config import ModelConfig
from vidmoe.sampling.boundary import kind_of
from vidmoe.sampling.values import integer

if TYPE_CHECKING:
    from vidmoe.sampling.settings import GenerateSettings, Limits


def _nearest_4k1(n: int) -> tuple[int, int]:
    lo = max(1, (n - 1) // 4 * 4 + 1)
    return lo, lo + 4


def check_num_frames(num_frames: int, temporal_stride: int = 4) -> None:
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % temporal_stride:
        lo, hi = (
            _nearest_4k1(int(num_frames))
            if isinstance(num_frames, int) and num_frames > 0
            else (1, 5)
        )
        raise ValueError(
            f"num_frames must be {temporal_stride}k+1 (the VAE's temporal stride is {temporal_stride}); "
            f"got {num_frames}: use {lo} or {hi}"
        )


def check_size(width: int, height: int, model: ModelConfig) -> None:
    stride = model.size_multiple
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < stride or value % stride:
            near = max(stride, round(value / stride) * stride) if isinstance(value, int) else stride
            raise ValueError(
                f"{name} must be a positive multiple of {stride} (VAE stride x the experts' patch); "
                f"got {value}: use {near}"
            )
    if model.sizes and (width, height) not in model.sizes:
        known = ", ".join(f"{w}x{h}" for w, h in model.sizes)
        raise ValueError(
            f"size {width}x{height} is not supported by {model.name}; supported: {known}"
        )


def sized_by_image(s: GenerateSettings, model: ModelConfig) -> bool:
    """Whether the model takes its frame size from the image: i2v always, ti2v given one."""
    model_type = model.transformer.model_type
    return model_type == "i2v" or (model_type == "ti2v" and bool(s.image))


def area_rule(s: GenerateSettings, model: ModelConfig) -> int | None:
    """The area of an image-sized model's size rule, or None where the size is explicit."""
    if s.area is None:
        explicit = s.width is not None or s.height is not None
        if explicit or not sized_by_image(s, model):
            return None
        return math.prod(model.default_size)  # the release's max_area: its --size's area
    area = integer("area", s.area, 1)
    model_type = model.transformer.model_type
    if model_type == "t2v":
        raise ValueError(
            f"area sets an image-to-video model's size from the image; {model.name} is a "
            f"{model_type} model: give width and height instead"
        )
    if not sized_by_image(s, model):
        raise ValueError(
            f"area sets the size from the image, and {model.name} was given none: give an "
            f"image, or width and height for text-to-video"
        )
    if s.width is not None or s.height is not None:
        raise ValueError(
            f"give area or width/height, not both: area {area} takes the size from the image's "
            f"aspect ratio, width and height set it exactly; got width {s.width}, height {s.height}"
        )
    areas = sorted({w * h for w, h in model.sizes}, reverse=True)
    if areas and area not in areas:
        raise ValueError(
            f"area {area} is not supported by {model.name}; supported: "
            + ", ".join(f"{a} ({_area_name(a, model)})" for a in areas)
        )
    return area


def _area_name(area: int, model: ModelConfig) -> str:
    return next(f"{w}*{h}" for w, h in model.sizes if w * h == area)


def _image_sized(
    s: GenerateSettings, model: ModelConfig, area: int, image_size: tuple[int, int] | None
) -> tuple[int, int]:
    """(width, height) of the release's size rule for the image (its header is read): i2v's
    (`release_i2v_size`) or ti2v's (`release_ti2v_size`)."""
    from vidmoe.sampling.conditioning import (
        image_header_size,
        release_i2v_size,
        release_ti2v_size,
    )

    image_size = image_header_size(s.image) if image_size is None else image_size
    stride = model.vae.spatial_stride
    if model.transformer.model_type == "ti2v":
        width, height = release_ti2v_size(image_size, area, model.size_multiple)
    else:
        width, height = release_i2v_size(image_size, area, stride, model.size_multiple // stride)
    if min(width, height) < model.size_multiple:
        iw, ih = image_size
        raise ValueError(
            f"an image of {iw}x{ih} at area {area} gives a {width}x{height} frame (the size "
            f"follows the image's aspect ratio): give a larger area, or width and height"
        )
    return width, height


def resolve_size(
    s: GenerateSettings, model: ModelConfig, limits: Limits, image_size: tuple[int, int] | None
) -> tuple[int, int, int, int | None]:
    """(width, height, num_frames, area), checked against the model and the limits; an i2v
    model, or a ti2v model given an image, without an explicit size takes it from the image
    (`area` is then not None)."""
    area = area_rule(s, model)
    if area is not None:
        width, height = _image_sized(s, model, area, image_size)
    else:
        width = model.default_size[0] if s.width is None else integer("width", s.width, None)
        height = model.default_size[1] if s.height is None else integer("height", s.height, None)
        check_size(width, height, model)
    if width * height > limits.max_pixels:
        raise ValueError(
            f"size {width}x{height} is {width * height} pixels per frame, over the limit of "
            f"{limits.max_pixels} (Limits.max_pixels, until a memory planner decides what fits): "
            "use a smaller width or height"
        )
    frames = model.default_num_frames if s.num_frames is None else s.num_frames
    if isinstance(frames, bool) or not isinstance(frames, int):
        raise ValueError(f"num_frames must be an integer; got {frames!r} ({kind_of(frames)})")
    check_num_frames(frames, model.vae.temporal_stride)
    integer(
        "num_frames",
        frames,
        1,
        limits.max_num_frames,
        " (Limits.max_num_frames, until a memory planner decides what fits)",
    )
    return width, height, frames, area
