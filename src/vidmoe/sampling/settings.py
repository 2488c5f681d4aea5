"""Generation settings: one validation shared by the Python API, the CLI and the HTTP server.

`GenerateSettings` is what a user asks for (None leaves a field to the model's default; 0 is a
value, never "default"); `resolve_settings` checks it against a `ModelConfig` and `Limits` before
any heavy work (types before conversion, finite numbers only, bounded work) and returns a
complete, frozen `ResolvedSettings` with the boundary typed, or raises a ValueError that names
the field, the value and what is accepted. docs/settings.md is the reference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from vidmoe.config import ModelConfig
from vidmoe.models.moe import validate_moe
from vidmoe.sampling.boundary import (
    SNR,
    Boundary,
    Budgets,
    Calibrated,
    Release,
    Sigma,
    Steps,
    calibrated_boundaries,
    kind_of,
    parse_boundary,
)
from vidmoe.sampling.schedules import sigmas_from_list

SAMPLERS = ("euler", "unipc", "dpm++")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Upper bounds on the work one request may ask for, until a memory planner decides what
    fits the machine. `Limits.for_model(model)` gives the documented defaults."""

    max_steps: int = 1000
    """Denoising steps (num_steps, the sum of steps_per_expert, or the sigmas given)."""
    max_num_frames: int = 161
    """Frames per video."""
    max_pixels: int = 1280 * 720
    """width x height of one frame."""
    read_files: bool = True
    """Whether a setting may name a file to read (boundary 'calibrated:PATH'); a server that
    takes requests from others sets False."""

    @classmethod
    def for_model(cls, model: ModelConfig, **overrides) -> Limits:
        """Defaults scaled to the model: 4x its default clip length or 161 frames (10 s at
        16 fps), and 4x its default frame area or 1280x720, whichever is more; 1000 steps."""
        w, h = model.default_size
        limits = cls(
            max_num_frames=max(4 * (model.default_num_frames - 1) + 1, 161),
            max_pixels=max(4 * w * h, 1280 * 720),
        )
        return dataclasses.replace(limits, **overrides)


@dataclass(frozen=True, kw_only=True)
class GenerateSettings:
    """What a user asks for; None means the model's default."""

    prompt: str = ""
    """The prompt; an empty prompt asks for an unconditional sample."""
    negative_prompt: str | None = None
    """The negative prompt; None uses the model's default (the release's, for umT5 models)."""
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    """Frame count, 4k+1 (the VAE's temporal stride is 4)."""
    num_steps: int | None = None
    shift: float | None = None
    sampler: str | None = None
    guidance: dict[str, float] | tuple[float, ...] | float = field(default_factory=dict)
    """Classifier-free guidance: per expert name (missing experts keep the model's value), one
    number per expert in the model's order (noisiest first), or one number for every expert."""
    boundary: float | str | Boundary | None = None
    """A sigma in (0, 1), or 'release', 'snr', 'steps:N', 'calibrated:PATH' (or a typed value
    of `sampling.boundary`); None is 'release'."""
    band: float | None = None
    """Half-width (sigma) of a transition band around each boundary; None keeps the model's (0: hard)."""
    steps_per_expert: dict[str, int] = field(default_factory=dict)
    """Step budget per expert (instead of a boundary): {'high_noise': 2, 'low_noise': 6}."""
    sigmas: tuple[float, ...] | None = None
    """An explicit descending sigma list (the final 0 is added); overrides steps and shift."""
    seed: int = 0
    """Seed of the initial noise, in [0, 2**63 - 1]."""
    image: str | None = None
    """Conditioning image path (i2v, ti2v)."""
    step_cache: dict[str, float] | tuple[float, ...] | float | None = None
    """Step-cache threshold per expert (same forms as guidance; 0 or None: off): a step whose
    first block's residual moved less than this (relative L1) reuses the other blocks' residual
    of the last full step (`models.step_cache.StepCache`)."""
    area: int | None = None
    """Pixels per frame for the size rule of an i2v model, or a ti2v model given an image (the
    size then follows the image's aspect ratio, as the release's); None: the model's default
    width x height. Not with width/height."""


@dataclass(frozen=True, kw_only=True)
class ResolvedSettings:
    """Complete settings after validation against a model."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_frames: int
    num_steps: int
    shift: float
    sampler: str
    guidance: dict[str, float]
    boundary: Boundary
    """Typed; `Budgets` when steps per expert were given."""
    band: float
    steps_per_expert: dict[str, int]
    sigmas: tuple[float, ...] | None
    seed: int
    image: str | None
    step_cache: dict[str, float] = field(default_factory=dict)
    """Threshold per expert; 0: that expert runs every block at every step."""
    area: int | None = None
    """The area an i2v or ti2v size was derived from (with the image's aspect ratio); None when
    the size is explicit or the model has no size rule."""

    def to_dict(self) -> dict:
        """JSON-ready; the boundary in its string (or number) form."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # budgets are written as steps_per_expert; their boundary field is the default's
        d["boundary"] = "release" if isinstance(self.boundary, Budgets) else self.boundary.spec
        d["guidance"], d["steps_per_expert"] = dict(self.guidance), dict(self.steps_per_expert)
        d["step_cache"] = dict(self.step_cache)
        return d


def _integer(name: str, value, lo: int | None, hi: int | None = None, why: str = "") -> int:
    """`value` as an int in [lo, hi]: bools, floats and strings are refused, never converted."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r} ({kind_of(value)})")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}; got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be at most {hi}{why}; got {value}")
    return value


def _number(name: str, value) -> float:
    """`value` as a finite float: bools, strings, NaN and infinities are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {value!r} ({kind_of(value)})")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _string(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string; got {value!r} ({kind_of(value)})")
    return value


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


def _per_expert_items(what: str, value, names: tuple[str, ...], unit: str):
    """(expert, number) pairs from a dict, a per-expert sequence or one number."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(name, value) for name in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(
                f"{what} as a sequence needs one {unit} per expert ({', '.join(names)}): "
                f"{len(names)} numbers; got {len(value)}"
            )
        return list(zip(names, value))
    raise ValueError(
        f"{what} must be a dict {{expert: {unit}}}, one {unit} per expert in order, or one "
        f"number; got {value!r}"
    )


def _per_expert(what: str, value, defaults: dict[str, float], unit: str) -> dict[str, float]:
    """Per-expert numbers >= 0 over `defaults` (experts not named keep theirs)."""
    out = dict(defaults)
    for name, number in _per_expert_items(what, value, tuple(defaults), unit):
        if name not in out:
            raise ValueError(f"unknown expert {name!r} in {what}; valid experts: {', '.join(out)}")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not number >= 0:
            raise ValueError(f"{what} for {name} must be a number >= 0; got {number!r}")
        out[name] = _number(f"{what} for {name}", number)
    return out


def _budgets(value, model: ModelConfig, limits: Limits) -> dict[str, int]:
    names = model.moe.expert_names
    if not isinstance(value, dict):
        raise ValueError(
            f"steps_per_expert must be a dict {{expert: steps}}; got {value!r} ({kind_of(value)})"
        )
    unknown = [n for n in value if n not in names]
    if unknown:
        raise ValueError(
            f"unknown expert {unknown[0]!r} in steps per expert; valid experts: {', '.join(names)}"
        )
    if set(value) != set(names):
        raise ValueError(
            f"steps_per_expert needs a step count for every expert ({', '.join(names)}); "
            f"got {dict(value)}"
        )
    budgets = {n: _integer(f"steps_per_expert[{n!r}]", value[n], 1) for n in names}
    _integer(
        "the sum of steps_per_expert",
        sum(budgets.values()),
        1,
        limits.max_steps,
        " (Limits.max_steps)",
    )
    return budgets


def _sigmas(value, limits: Limits) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"sigmas must be a list of numbers; got {value!r} ({kind_of(value)})")
    values = tuple(_number(f"sigmas[{i}]", x) for i, x in enumerate(value))
    sigmas_from_list(values)  # descending, in (0, 1]: ValueError otherwise
    _integer(
        "the number of sigmas",
        len([x for x in values if x > 0]),
        1,
        limits.max_steps,
        " (Limits.max_steps)",
    )
    return values


def _steps(s: GenerateSettings, model: ModelConfig, limits: Limits):
    """(num_steps, steps_per_expert, sigmas): the run's length from whichever the user gave."""
    budgets = _budgets(s.steps_per_expert, model, limits) if s.steps_per_expert else {}
    sigmas = _sigmas(s.sigmas, limits) if s.sigmas is not None else None
    if budgets and sigmas is not None:
        raise ValueError("give steps_per_expert or sigmas, not both: each fixes the steps")
    if s.num_steps is not None:
        _integer("num_steps", s.num_steps, 1, limits.max_steps, " (Limits.max_steps)")
    if budgets:
        return sum(budgets.values()), budgets, None
    if sigmas is not None:
        return len([x for x in sigmas if x > 0]), {}, sigmas
    num_steps = s.num_steps if s.num_steps is not None else model.scheduler.num_steps
    return num_steps, {}, None


def _sized_by_image(s: GenerateSettings, model: ModelConfig) -> bool:
    """Whether the model takes its frame size from the image: i2v always, ti2v given one."""
    model_type = model.transformer.model_type
    return model_type == "i2v" or (model_type == "ti2v" and bool(s.image))


def _area(s: GenerateSettings, model: ModelConfig) -> int | None:
    """The area of an image-sized model's size rule, or None where the size is explicit."""
    if s.area is None:
        explicit = s.width is not None or s.height is not None
        if explicit or not _sized_by_image(s, model):
            return None
        return math.prod(model.default_size)  # the release's max_area: its --size's area
    area = _integer("area", s.area, 1)
    model_type = model.transformer.model_type
    if model_type == "t2v":
        raise ValueError(
            f"area sets an image-to-video model's size from the image; {model.name} is a "
            f"{model_type} model: give width and height instead"
        )
    if not _sized_by_image(s, model):
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


def _size(
    s: GenerateSettings, model: ModelConfig, limits: Limits, image_size: tuple[int, int] | None
) -> tuple[int, int, int, int | None]:
    """(width, height, num_frames, area), checked against the model and the limits; an i2v
    model, or a ti2v model given an image, without an explicit size takes it from the image
    (`area` is then not None)."""
    area = _area(s, model)
    if area is not None:
        width, height = _image_sized(s, model, area, image_size)
    else:
        width = model.default_size[0] if s.width is None else _integer("width", s.width, None)
        height = model.default_size[1] if s.height is None else _integer("height", s.height, None)
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
    _integer(
        "num_frames",
        frames,
        1,
        limits.max_num_frames,
        " (Limits.max_num_frames, until a memory planner decides what fits)",
    )
    return width, height, frames, area


def _boundary(
    s: GenerateSettings,
    model: ModelConfig,
    band: float,
    num_steps: int,
    budgets: dict[str, int],
    limits: Limits,
) -> Boundary:
    """The typed boundary; checked against the model wherever the grid does not matter."""
    moe = model.moe
    if budgets:
        if s.boundary is not None:
            raise ValueError(
                f"give a boundary or steps_per_expert, not both: the budgets fix every "
                f"boundary; got boundary {s.boundary!r} and steps_per_expert {budgets}"
            )
        return Budgets(budgets)
    boundary = parse_boundary(s.boundary, read_files=limits.read_files)
    if isinstance(boundary, Sigma | Steps | SNR) and len(moe.expert_names) != 2:
        raise ValueError(
            f"boundary {boundary.spec!r} places one boundary; {model.name} has "
            f"{len(moe.expert_names)} experts: use release or steps_per_expert"
        )
    if isinstance(boundary, Steps) and boundary.n > num_steps:
        raise ValueError(
            f"boundary {boundary.spec!r}: N must be in [1, {num_steps}] (the run's steps); "
            f"got {boundary.n}"
        )
    if isinstance(boundary, Calibrated):
        bounds = calibrated_boundaries(boundary.losses, moe.expert_names)
        validate_moe(dataclasses.replace(moe, boundaries=bounds, band=band))
    if isinstance(boundary, Release | Sigma):
        bounds = (boundary.value,) if isinstance(boundary, Sigma) else moe.boundaries
        validate_moe(dataclasses.replace(moe, boundaries=bounds, band=band))
    return boundary


def resolve_settings(
    s: GenerateSettings,
    model: ModelConfig,
    limits: Limits | None = None,
    *,
    image_size: tuple[int, int] | None = None,
) -> ResolvedSettings:
    """Validate `s` against `model` and `limits` (default `Limits.for_model(model)`) and fill in
    defaults; raise ValueError naming the field, the value and what is accepted.

    An i2v model (or a ti2v model given an image) without an explicit width and height takes
    its size from the image: from
    `image_size` (width, height) when the caller has it (an upload not yet saved, a plan
    without an image), else from the header of the file `s.image`.
    """
    limits = Limits.for_model(model) if limits is None else limits
    prompt = _string("prompt", s.prompt)
    negative = default_negative_prompt(model) if s.negative_prompt is None else s.negative_prompt
    negative = _string("negative_prompt", negative)
    image = None if s.image is None else _string("image", s.image)
    if model.transformer.model_type == "i2v" and not image:
        raise ValueError(f"{model.name} is an image-to-video model: give an image (--image PATH)")
    if image and model.transformer.model_type == "t2v":
        raise ValueError(f"{model.name} is a text-to-video model and takes no image")
    width, height, num_frames, area = _size(s, model, limits, image_size)
    num_steps, budgets, sigmas = _steps(s, model, limits)
    shift = model.scheduler.shift if s.shift is None else _number("shift", s.shift)
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1 leaves the sigmas unchanged); got {shift}")
    sampler = model.scheduler.sampler if s.sampler is None else s.sampler
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    guidance = _per_expert(
        "guidance", s.guidance, dict(zip(model.moe.expert_names, model.moe.guidance)), "scale"
    )
    step_cache = _per_expert(
        "step_cache", s.step_cache or {}, dict.fromkeys(model.moe.expert_names, 0.0), "threshold"
    )
    band = model.moe.band if s.band is None else _number("band", s.band)
    if not 0.0 <= band < 0.5:
        raise ValueError(
            f"band must lie in [0, 0.5) (a sigma half-width; 0 switches hard); got {band}"
        )
    boundary = _boundary(s, model, band, num_steps, budgets, limits)
    seed = _integer("seed", s.seed, 0, MAX_SEED, " (2**63 - 1)")
    return ResolvedSettings(
        prompt=prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        num_frames=num_frames,
        num_steps=num_steps,
        shift=float(shift),
        sampler=sampler,
        guidance=guidance,
        boundary=boundary,
        band=float(band),
        steps_per_expert=budgets,
        sigmas=sigmas,
        seed=seed,
        image=image,
        step_cache=step_cache,
        area=area,
    )


def default_negative_prompt(model: ModelConfig) -> str:
    """The release's negative prompt for umT5 models; empty for the others."""
    if model.text_encoder != "umt5-xxl":
        return ""
    from vidmoe.models.text_encoder import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT
