"""Generation settings: one validation shared by the Python API, the CLI and the HTTP server.

`GenerateSettings` is what a user asks for (None leaves a field to the model's default; 0 is a
value, never "default"); `resolve_settings` checks it against a `ModelConfig` and `Limits` before
any heavy work (types before conversion, finite numbers only, bounded work) and returns a
complete, frozen `ResolvedSettings` with the boundary typed, or raises a ValueError that names
the field, the value and what is accepted. docs/settings.md is the reference.
"""

from __future__ import annotations

import dataclasses
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
from vidmoe.sampling.frame_size import resolve_size
from vidmoe.sampling.schedules import sigmas_from_list
from vidmoe.sampling.values import integer, number, string

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
    rewrite_prompt: bool = True
    """Rewrite the prompt into the words of the model's captions with the lexicon its folder
    ships (`sampling.rewrite`), if it has one; False encodes the prompt as given."""
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
    rewrite_prompt: bool = True
    encoded_prompt: str | None = None
    """The text the text encoder reads: the prompt rewritten by the model's lexicon
    (`Pipeline.resolve` fills it in); None: the prompt as given."""

    def to_dict(self) -> dict:
        """JSON-ready; the boundary in its string (or number) form."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # budgets are written as steps_per_expert; their boundary field is the default's
        d["boundary"] = "release" if isinstance(self.boundary, Budgets) else self.boundary.spec
        d["guidance"], d["steps_per_expert"] = dict(self.guidance), dict(self.steps_per_expert)
        d["step_cache"] = dict(self.step_cache)
        return d


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
    for name, amount in _per_expert_items(what, value, tuple(defaults), unit):
        if name not in out:
            raise ValueError(f"unknown expert {name!r} in {what}; valid experts: {', '.join(out)}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not amount >= 0:
            raise ValueError(f"{what} for {name} must be a number >= 0; got {amount!r}")
        out[name] = number(f"{what} for {name}", amount)
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
    budgets = {n: integer(f"steps_per_expert[{n!r}]", value[n], 1) for n in names}
    integer(
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
    values = tuple(number(f"sigmas[{i}]", x) for i, x in enumerate(value))
    sigmas_from_list(values)  # descending, in (0, 1]: ValueError otherwise
    integer(
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
        integer("num_steps", s.num_steps, 1, limits.max_steps, " (Limits.max_steps)")
    if budgets:
        return sum(budgets.values()), budgets, None
    if sigmas is not None:
        return len([x for x in sigmas if x > 0]), {}, sigmas
    num_steps = s.num_steps if s.num_steps is not None else model.scheduler.num_steps
    return num_steps, {}, None


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
    prompt = string("prompt", s.prompt)
    negative = default_negative_prompt(model) if s.negative_prompt is None else s.negative_prompt
    negative = string("negative_prompt", negative)
    image = None if s.image is None else string("image", s.image)
    if model.transformer.model_type == "i2v" and not image:
        raise ValueError(f"{model.name} is an image-to-video model: give an image (--image PATH)")
    if image and model.transformer.model_type == "t2v":
        raise ValueError(f"{model.name} is a text-to-video model and takes no image")
    width, height, num_frames, area = resolve_size(s, model, limits, image_size)
    num_steps, budgets, sigmas = _steps(s, model, limits)
    shift = model.scheduler.shift if s.shift is None else number("shift", s.shift)
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
    band = model.moe.band if s.band is None else number("band", s.band)
    if not 0.0 <= band < 0.5:
        raise ValueError(
            f"band must lie in [0, 0.5) (a sigma half-width; 0 switches hard); got {band}"
        )
    boundary = _boundary(s, model, band, num_steps, budgets, limits)
    seed = integer("seed", s.seed, 0, MAX_SEED, " (2**63 - 1)")
    if not isinstance(s.rewrite_prompt, bool):
        raise ValueError(f"rewrite_prompt must be true or false; got {s.rewrite_prompt!r}")
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
        rewrite_prompt=s.rewrite_prompt,
    )


def default_negative_prompt(model: ModelConfig) -> str:
    """The release's negative prompt for umT5 models; empty for the others."""
    if model.text_encoder != "umt5-xxl":
        return ""
    from vidmoe.models.text_encoder import DEFAULT_NEGATIVE_PROMPT

    return DEFAULT_NEGATIVE_PROMPT
