"""Typed configuration for every vidmoe model, and the named presets.

Frozen, keyword-only dataclasses; a field docstring says what it means. Presets reproduce the
released Wan2.2 configurations (t2v-A14B, i2v-A14B, ti2v-5B) and tiny ones for tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

EXPERT_NAMES_2 = ("high_noise", "low_noise")
# TransformerConfig fields every expert shares: the experts exchange latents (channels) and take
# the same text embeddings and timestep embedding width; the rest may differ per expert. The
# patch size may too: each expert cuts the latent into its own tokens and puts it back together,
# so a coarse-patched expert for layout can hand over to a fine-patched one for detail.
SHARED_TRANSFORMER_FIELDS = (
    "model_type",
    "text_len",
    "in_dim",
    "out_dim",
    "text_dim",
    "freq_dim",
)
# Sanity bounds on an architecture's sizes: far above any released model (A14B: dim 5120, 40
# layers, ffn 13824), low enough that a typo in a model file (dim 10**9) is a clear error and
# not an allocation that never ends. (A table: several pairs a line, hence fmt: skip.)
SIZE_BOUNDS = {
    "dim": 65536, "ffn_dim": 262144, "num_heads": 1024, "num_layers": 1024, "text_len": 65536,
    "in_dim": 4096, "out_dim": 4096, "text_dim": 65536, "freq_dim": 65536, "z_dim": 4096,
    "num_res_blocks": 64, "first_frame_head": 4096,
}  # fmt: skip
OPTIONAL_SIZES = {"first_frame_head"}  # sizes whose 0 means "none" (the rest are >= 1)


def check_sizes(config: Any) -> None:
    """ValueError unless every bounded size field of `config` is an int in [1, bound] (in
    [0, bound] for the OPTIONAL_SIZES)."""
    for name, bound in SIZE_BOUNDS.items():
        if not hasattr(config, name):
            continue
        value, low = getattr(config, name), 0 if name in OPTIONAL_SIZES else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= bound:
            raise ValueError(
                f"{type(config).__name__}.{name} must be an integer in [{low}, {bound}] (far "
                f"above any released model); got {value!r}: check the model file"
            )


ExpertOverrides = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]
"""Per-expert TransformerConfig overrides, normalised: ((expert, ((field, value), ...)), ...)."""


@dataclass(frozen=True, kw_only=True)
class TransformerConfig:
    """One expert diffusion transformer (the release's `WanModel` hyper-parameters)."""

    model_type: str = "t2v"
    """'t2v', 'i2v' (extra conditioning channels) or 'ti2v' (per-token timesteps)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size over (F, H, W) latent axes."""
    text_len: int = 512
    """Text tokens the context is zero-padded to."""
    in_dim: int = 16
    """Input channels (latent channels, plus mask and image-latent channels for i2v)."""
    dim: int = 5120
    """Hidden width D."""
    ffn_dim: int = 13824
    """Feed-forward hidden width."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    text_dim: int = 4096
    """Width of the text encoder's output."""
    out_dim: int = 16
    """Output (velocity) channels."""
    num_heads: int = 40
    """Attention heads N."""
    num_layers: int = 40
    """Transformer blocks."""
    window_size: tuple[int, int] = (-1, -1)
    """Local self-attention window (left, right) in tokens; (-1, -1) is global."""
    qk_norm: bool = True
    """RMSNorm on queries and keys."""
    cross_attn_norm: bool = True
    """LayerNorm (with affine) before cross-attention (`norm3` in the checkpoints)."""
    pooled_text: bool = False
    """Also condition every block's modulation on the prompt's mean token embedding (an MLP of it
    added to the time embedding, as SD3 and PixArt do with a pooled text vector). Not in the Wan
    release (False there); small models trained from scratch follow prompts much sooner with it."""
    eps: float = 1e-6
    """Epsilon of every norm."""

    def __post_init__(self) -> None:
        check_sizes(self)
        if self.model_type not in ("t2v", "i2v", "ti2v"):
            raise ValueError(f"model_type must be 't2v', 'i2v' or 'ti2v'; got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.num_heads} must be even for RoPE")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "window_size", tuple(self.window_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        """Build from the release's / golden files' config dict (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        d["window_size"] = list(self.window_size)
        return d


def normalize_expert_overrides(
    overrides: Mapping[str, Mapping[str, Any]] | ExpertOverrides,
    transformer: TransformerConfig,
    expert_names: tuple[str, ...],
) -> ExpertOverrides:
    """Check per-expert overrides of `transformer`; return them hashable, in expert order.

    Args:
        overrides: {expert: {TransformerConfig field: value}} (or the normalised pairs).
        transformer: the shared expert architecture the overrides change.
        expert_names: the model's experts.
    Returns:
        ((expert, ((field, value), ...)), ...): experts in `expert_names` order, fields sorted,
        values as the TransformerConfig stores them (tuples, not lists); empty entries dropped.
    """
    given = dict(overrides)
    unknown = [n for n in given if n not in expert_names]
    if unknown:
        raise ValueError(
            f"expert_overrides names unknown experts {unknown}; the experts are {list(expert_names)}"
        )
    known = [f.name for f in dataclasses.fields(TransformerConfig)]
    free = [f for f in known if f not in SHARED_TRANSFORMER_FIELDS]
    normalised = []
    for name in expert_names:
        changes = dict(given.get(name, {}))
        bad = sorted(set(changes) - set(known))
        if bad:
            raise ValueError(
                f"expert_overrides[{name!r}] has unknown TransformerConfig fields {bad}; "
                f"fields an expert may change: {free}"
            )
        shared = [f for f in SHARED_TRANSFORMER_FIELDS if f in changes]
        if shared:
            raise ValueError(
                f"expert_overrides[{name!r}] sets {shared}, which every expert must share (the "
                f"experts exchange latents and take the same text): set them on the shared "
                f"transformer config instead; fields an expert may change: {free}"
            )
        if not changes:
            continue
        try:
            resolved = dataclasses.replace(transformer, **changes)
        except (TypeError, ValueError) as e:
            raise ValueError(f"expert_overrides[{name!r}] = {changes} is invalid: {e}") from None
        normalised.append((name, tuple((f, getattr(resolved, f)) for f in sorted(changes))))
    return tuple(normalised)


def expert_transformer(
    transformer: TransformerConfig,
    overrides: ExpertOverrides,
    expert_names: tuple[str, ...],
    name: str,
) -> TransformerConfig:
    """The architecture of expert `name`: `transformer` with that expert's overrides applied."""
    if name not in expert_names:
        raise ValueError(f"unknown expert {name!r}; the experts are {list(expert_names)}")
    return dataclasses.replace(transformer, **dict(dict(overrides).get(name, ())))


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """The causal 3D VAE; `generation` 2.1 (16 ch, 4x8x8) or 2.2 (48 ch, 4x16x16)."""

    generation: str = "2.1"
    """'2.1' (Wan2.1 VAE) or '2.2' (Wan2.2 VAE, with 2x2 pixel patchify)."""
    dim: int = 96
    """Base channel width of the encoder."""
    dec_dim: int | None = None
    """Base width of the decoder (2.2 only; None means `dim`)."""
    z_dim: int = 16
    """Latent channels."""
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    """Channel multipliers per resolution level."""
    num_res_blocks: int = 2
    """Residual blocks per level."""
    attn_scales: tuple[float, ...] = ()
    """Scales with attention (empty in the release)."""
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    """Which downsampling levels also halve time (the release's spelling)."""
    latents_mean: tuple[float, ...] = ()
    """Per-channel latent mean used for normalisation (empty: zeros)."""
    latents_std: tuple[float, ...] = ()
    """Per-channel latent std used for normalisation (empty: ones)."""
    first_frame_head: int = 0
    """Width of the `FirstFrameHead` that redraws frame 0 with latent frame 1 in view (0: none,
    as in the release; the demo VAE has one, issue 23)."""
    first_frame_head_frames: int = 1
    """How many leading frames the head redraws, together: 1 (frame 0, the demo v17's head) up
    to 1 + temporal_stride (frame 0 and the frames of latent frame 1, which the causal decoder
    draws with no earlier latent frame than 0 in its temporal padding). Frame 0's correction is
    full resolution, the later frames' smooth at the latent grid's scale (a colour shift)."""
    first_frame_head_edge: int = 0
    """Pixels along the frame's border where the later frames' correction stays per pixel
    (0: smooth everywhere, the demo v19's head): the decoder's zero padding draws the outermost
    rows and columns of those frames worst, finer than the smooth shift reaches."""

    def __post_init__(self) -> None:
        check_sizes(self)
        if self.generation not in ("2.1", "2.2"):
            raise ValueError(f"VAE generation must be '2.1' or '2.2'; got {self.generation!r}")
        frames = self.first_frame_head_frames
        if not isinstance(frames, int) or not 1 <= frames <= 1 + self.temporal_stride:
            raise ValueError(
                f"first_frame_head_frames must be an integer in [1, {1 + self.temporal_stride}] "
                f"(frame 0 and the frames of latent frame 1); got {frames!r}"
            )
        edge = self.first_frame_head_edge
        if isinstance(edge, bool) or not isinstance(edge, int) or not 0 <= edge <= 64:
            raise ValueError(
                f"first_frame_head_edge must be an integer in [0, 64] (pixels along the frame's "
                f"border); got {edge!r}"
            )
        for name in (
            "dim_mult",
            "attn_scales",
            "temperal_downsample",
            "latents_mean",
            "latents_std",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def temporal_stride(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def patch_size(self) -> int:
        """Pixel patch folded into channels before the encoder (2x2 for 2.2, none for 2.1)."""
        return 2 if self.generation == "2.2" else 1

    @property
    def spatial_stride(self) -> int:
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Sampling defaults of a model: solver, steps, sigma shift."""

    sampler: str = "unipc"
    """'euler', 'unipc' or 'dpm++'."""
    num_steps: int = 40
    """Denoising steps."""
    shift: float = 12.0
    """Sigma shift: sigma' = shift*sigma / (1 + (shift-1)*sigma)."""
    num_train_timesteps: int = 1000
    """Timestep scale of the model input (timestep = 1000 * sigma)."""


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """K experts ordered from highest to lowest noise, their boundaries and guidance."""

    expert_names: tuple[str, ...] = EXPERT_NAMES_2
    """Expert names, noisiest first."""
    boundaries: tuple[float, ...] = (0.875,)
    """K-1 sigma boundaries, descending; expert k runs for boundaries[k] <= sigma < boundaries[k-1]."""
    guidance: tuple[float, ...] = (4.0, 3.0)
    """Classifier-free guidance scale per expert."""
    band: float = 0.0
    """Half-width (in sigma) of a transition band around each boundary; 0 switches hard."""

    def __post_init__(self) -> None:
        for name in ("expert_names", "boundaries", "guidance"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        k = len(self.expert_names)
        if len(self.boundaries) != k - 1:
            raise ValueError(f"{k} experts need {k - 1} boundaries; got {list(self.boundaries)}")
        if len(self.guidance) != k:
            raise ValueError(f"{k} experts need {k} guidance scales; got {list(self.guidance)}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A whole MoE video model: experts, VAE, text encoder and sampling defaults."""

    name: str
    """Preset or folder name."""
    transformer: TransformerConfig
    """Architecture of each expert (the released experts share it)."""
    vae: VAEConfig
    """The VAE."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Experts, boundaries, guidance."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Sampling defaults."""
    text_encoder: str = "umt5-xxl"
    """'umt5-xxl', 'minilm' or 'umt5-tiny' (tests)."""
    sizes: tuple[tuple[int, int], ...] = ()
    """Accepted (width, height) pairs; empty accepts any size divisible by the stride."""
    default_size: tuple[int, int] = (1280, 720)
    """Default (width, height)."""
    default_num_frames: int = 81
    """Default frame count (4k+1)."""
    fps: int = 16
    """Frames per second of written videos."""
    expert_overrides: ExpertOverrides = ()
    """Per-expert changes to `transformer`, e.g. {"low_noise": {"ffn_dim": 512, "window_size":
    (-1, 64)}} (a dict is accepted and stored normalised); fields in SHARED_TRANSFORMER_FIELDS
    cannot differ. Empty: every expert is `transformer` (as released)."""

    def __post_init__(self) -> None:
        overrides = normalize_expert_overrides(
            self.expert_overrides, self.transformer, self.moe.expert_names
        )
        object.__setattr__(self, "expert_overrides", overrides)

    def transformer_for(self, name: str) -> TransformerConfig:
        """The architecture of expert `name` (the shared `transformer` plus its overrides)."""
        return expert_transformer(
            self.transformer, self.expert_overrides, self.moe.expert_names, name
        )

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's stride times the least common
        multiple of every expert's spatial patch."""
        patches = [self.transformer_for(n).patch_size[1:] for n in self.moe.expert_names]
        return self.vae.spatial_stride * math.lcm(*(p for patch in patches for p in patch))

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["expert_overrides"] = {name: dict(changes) for name, changes in self.expert_overrides}
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        return cls(
            name=d["name"],
            transformer=TransformerConfig.from_dict(d["transformer"]),
            vae=VAEConfig(**d["vae"]),
            moe=MoEConfig(**d["moe"]),
            scheduler=SchedulerConfig(**d["scheduler"]),
            text_encoder=d["text_encoder"],
            sizes=tuple(tuple(s) for s in d.get("sizes", ())),
            default_size=tuple(d["default_size"]),
            default_num_frames=d["default_num_frames"],
            fps=d["fps"],
            expert_overrides=d.get("expert_overrides", {}),
        )
