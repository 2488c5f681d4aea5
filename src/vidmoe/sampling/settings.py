"""Generation settings: one validation shared by the Python API, the CLI and the HTTP server.

`GenerateSettings` is what a user asks for (any field may be left to the model's default);
`resolve_settings` checks it against a `ModelConfig` before any heavy work and returns a
complete, frozen `ResolvedSettings`, or raises ValueError saying what was wrong and what fits.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from vidmoe.config import ModelConfig

SAMPLERS = ("euler", "unipc", "dpm++")
BOUNDARY_MODES = ("release", "snr", "steps:N", "calibrated", "a number in (0, 1)")


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
    boundary: float | str | None = None
    """A sigma in (0, 1), or a mode: 'release', 'snr', 'steps:N'."""
    band: float | None = None
    """Half-width (sigma) of a transition band around each boundary; None keeps the model's (0: hard)."""
    steps_per_expert: dict[str, int] = field(default_factory=dict)
    """Step budget per expert (instead of a boundary): {'high_noise': 2, 'low_noise': 6}."""
    sigmas: tuple[float, ...] | None = None
    """An explicit descending sigma list (the final 0 is added); overrides steps and shift."""
    seed: int = 0
    image: str | None = None
    """Conditioning image path (i2v, ti2v)."""


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
    boundary: float | str
    band: float
    steps_per_expert: dict[str, int]
    sigmas: tuple[float, ...] | None
    seed: int
    image: str | None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def _check_boundary(boundary: float | str) -> None:
    if isinstance(boundary, str):
        if boundary in ("release", "snr", "calibrated"):
            return
        if boundary.startswith("steps:") and boundary[6:].isdigit() and int(boundary[6:]) >= 0:
            return
        try:
            boundary = float(boundary)
        except ValueError:
            raise ValueError(
                f"boundary must be one of {', '.join(BOUNDARY_MODES)}; got {boundary!r}"
            ) from None
    if not 0.0 < float(boundary) < 1.0:
        raise ValueError(f"boundary must lie in (0, 1) (a sigma); got {boundary}")


def _guidance_items(value, names: tuple[str, ...]):
    """(expert, scale) pairs from a dict, a per-expert sequence or one number."""
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [(name, value) for name in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise ValueError(
                f"guidance as a sequence needs one scale per expert ({', '.join(names)}): "
                f"{len(names)} numbers; got {len(value)}"
            )
        return list(zip(names, value))
    raise ValueError(
        "guidance must be a dict {expert: scale}, one scale per expert in order, or one number; "
        f"got {value!r}"
    )


def resolve_settings(s: GenerateSettings, model: ModelConfig) -> ResolvedSettings:
    """Validate `s` against `model` and fill in defaults; raise ValueError on bad input."""
    if not isinstance(s.prompt, str):
        raise ValueError(f"prompt must be a string; got {type(s.prompt).__name__}")
    width, height = s.width or model.default_size[0], s.height or model.default_size[1]
    check_size(width, height, model)
    num_frames = s.num_frames if s.num_frames is not None else model.default_num_frames
    check_num_frames(num_frames, model.vae.temporal_stride)
    num_steps = s.num_steps if s.num_steps is not None else model.scheduler.num_steps
    if s.steps_per_expert:
        unknown = set(s.steps_per_expert) - set(model.moe.expert_names)
        if unknown:
            raise ValueError(
                f"unknown expert {sorted(unknown)[0]!r} in steps per expert; "
                f"valid experts: {', '.join(model.moe.expert_names)}"
            )
        if any(int(n) < 0 for n in s.steps_per_expert.values()):
            raise ValueError(f"steps per expert must be >= 0; got {s.steps_per_expert}")
        num_steps = sum(s.steps_per_expert.values())
    if s.sigmas is not None:
        num_steps = len([x for x in s.sigmas if x > 0])
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps}")
    shift = float(s.shift if s.shift is not None else model.scheduler.shift)
    if shift <= 0:
        raise ValueError(f"shift must be > 0; got {shift}")
    sampler = s.sampler or model.scheduler.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    guidance = dict(zip(model.moe.expert_names, model.moe.guidance))
    for name, scale in _guidance_items(s.guidance, model.moe.expert_names):
        if name not in guidance:
            raise ValueError(
                f"unknown expert {name!r} in guidance; valid experts: {', '.join(guidance)}"
            )
        if not isinstance(scale, (int, float)) or scale < 0:
            raise ValueError(f"guidance for {name} must be a number >= 0; got {scale!r}")
        guidance[name] = float(scale)
    boundary = s.boundary if s.boundary is not None else "release"
    _check_boundary(boundary)
    if isinstance(boundary, str) and boundary not in ("release", "snr", "calibrated"):
        boundary = boundary if boundary.startswith("steps:") else float(boundary)
    band = float(s.band if s.band is not None else model.moe.band)
    if not 0.0 <= band < 0.5:
        raise ValueError(f"band must lie in [0, 0.5) (a sigma half-width; 0 switches hard); got {band}")
    needs_image = model.transformer.model_type == "i2v"
    if needs_image and not s.image:
        raise ValueError(f"{model.name} is an image-to-video model: give an image (--image PATH)")
    if s.image and model.transformer.model_type == "t2v":
        raise ValueError(f"{model.name} is a text-to-video model and takes no image")
    negative = (
        s.negative_prompt if s.negative_prompt is not None else default_negative_prompt(model)
    )
    return ResolvedSettings(
        prompt=s.prompt, negative_prompt=negative, width=width, height=height,
        num_frames=num_frames, num_steps=num_steps, shift=shift, sampler=sampler,
        guidance=guidance, boundary=boundary, band=band, steps_per_expert=dict(s.steps_per_expert),
        sigmas=tuple(s.sigmas) if s.sigmas is not None else None, seed=int(s.seed), image=s.image,
    )  # fmt: skip


def default_negative_prompt(model: ModelConfig) -> str:
    """The release's negative prompt for umT5 models; empty for the others."""
    if model.text_encoder != "umt5-xxl":
        return ""
    from vidmoe.models.text_encoder import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT
