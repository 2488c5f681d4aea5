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
    "num_res_blocks": 64,
}  # fmt: skip


def check_sizes(config: Any) -> None:
    """ValueError unless every bounded size field of `config` is an int in [1, bound]."""
    for name, bound in SIZE_BOUNDS.items():
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= bound:
            raise ValueError(
                f"{type(config).__name__}.{name} must be an integer in [1, {bound}] (far above "
                f"any released model); got {value!r}: check the model file"
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

    def __post_init__(self) -> None:
        check_sizes(self)
        if self.generation not in ("2.1", "2.2"):
            raise ValueError(f"VAE generation must be '2.1' or '2.2'; got {self.generation!r}")
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


# parity: the release's latent normalisation constants (Wan2.1 VAE, 16 channels).
WAN21_LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)
# parity: the release's latent normalisation constants (Wan2.2 VAE, 48 channels).
WAN22_LATENTS_MEAN = (
    -0.2289,
    -0.0052,
    -0.1323,
    -0.2339,
    -0.2799,
    0.0174,
    0.1838,
    0.1557,
    -0.1382,
    0.0542,
    0.2813,
    0.0891,
    0.1570,
    -0.0098,
    0.0375,
    -0.1825,
    -0.2246,
    -0.1207,
    -0.0698,
    0.5109,
    0.2665,
    -0.2108,
    -0.2158,
    0.2502,
    -0.2055,
    -0.0322,
    0.1109,
    0.1567,
    -0.0729,
    0.0899,
    -0.2799,
    -0.1230,
    -0.0313,
    -0.1649,
    0.0117,
    0.0723,
    -0.2839,
    -0.2083,
    -0.0520,
    0.3748,
    0.0152,
    0.1957,
    0.1433,
    -0.2944,
    0.3573,
    -0.0548,
    -0.1681,
    -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765,
    1.0364,
    0.4514,
    1.1677,
    0.5313,
    0.4990,
    0.4818,
    0.5013,
    0.8158,
    1.0344,
    0.5894,
    1.0901,
    0.6885,
    0.6165,
    0.8454,
    0.4978,
    0.5759,
    0.3523,
    0.7135,
    0.6804,
    0.5833,
    1.4146,
    0.8986,
    0.5659,
    0.7069,
    0.5338,
    0.4889,
    0.4917,
    0.4069,
    0.4999,
    0.6866,
    0.4093,
    0.5709,
    0.6065,
    0.6415,
    0.4944,
    0.5726,
    1.2042,
    0.5458,
    1.6887,
    0.3971,
    1.0600,
    0.3943,
    0.5537,
    0.5444,
    0.4089,
    0.7468,
    0.7744,
)

VAE_2_1 = VAEConfig(
    generation="2.1",
    dim=96,
    z_dim=16,
    num_res_blocks=2,
    latents_mean=WAN21_LATENTS_MEAN,
    latents_std=WAN21_LATENTS_STD,
)
VAE_2_2 = VAEConfig(
    generation="2.2",
    dim=160,
    dec_dim=256,
    z_dim=48,
    num_res_blocks=2,
    latents_mean=WAN22_LATENTS_MEAN,
    latents_std=WAN22_LATENTS_STD,
)

_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_SIZES_A14B = ((1280, 720), (720, 1280), (832, 480), (480, 832))

PRESETS: dict[str, ModelConfig] = {
    "t2v-A14B": ModelConfig(
        name="t2v-A14B",
        transformer=TransformerConfig(model_type="t2v", in_dim=16, out_dim=16, **_A14B),
        vae=VAE_2_1,
        moe=MoEConfig(boundaries=(0.875,), guidance=(4.0, 3.0)),
        scheduler=SchedulerConfig(sampler="unipc", num_steps=40, shift=12.0),
        sizes=_SIZES_A14B,
    ),
    "i2v-A14B": ModelConfig(
        name="i2v-A14B",
        transformer=TransformerConfig(model_type="i2v", in_dim=36, out_dim=16, **_A14B),
        vae=VAE_2_1,
        moe=MoEConfig(boundaries=(0.900,), guidance=(3.5, 3.5)),
        scheduler=SchedulerConfig(sampler="unipc", num_steps=40, shift=5.0),
        sizes=_SIZES_A14B,
    ),
    "ti2v-5B": ModelConfig(
        name="ti2v-5B",
        transformer=TransformerConfig(
            model_type="ti2v",
            in_dim=48,
            out_dim=48,
            dim=3072,
            ffn_dim=14336,
            num_heads=24,
            num_layers=30,
        ),
        vae=VAE_2_2,
        # The 5B model is dense: one expert that owns every sigma.
        moe=MoEConfig(expert_names=("dense",), boundaries=(), guidance=(5.0,)),
        scheduler=SchedulerConfig(sampler="unipc", num_steps=50, shift=5.0),
        sizes=((1280, 704), (704, 1280)),
        default_size=(1280, 704),
        default_num_frames=121,
        fps=24,
    ),
}

TINY_TRANSFORMER = TransformerConfig(
    model_type="t2v",
    text_len=32,
    in_dim=16,
    dim=96,
    ffn_dim=192,
    freq_dim=256,
    text_dim=48,
    out_dim=16,
    num_heads=4,
    num_layers=2,
)
TINY_VAE = VAEConfig(generation="2.1", dim=16, z_dim=16, num_res_blocks=1)
PRESETS["tiny-t2v"] = ModelConfig(
    name="tiny-t2v",
    transformer=TINY_TRANSFORMER,
    vae=TINY_VAE,
    moe=MoEConfig(boundaries=(0.875,), guidance=(4.0, 3.0)),
    scheduler=SchedulerConfig(sampler="unipc", num_steps=4, shift=12.0),
    text_encoder="umt5-tiny",
    default_size=(64, 64),
    default_num_frames=9,
)


def get_preset(name: str) -> ModelConfig:
    """Look up a named preset; the error lists the known names."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]


PRESETS["tiny-i2v"] = dataclasses.replace(
    PRESETS["tiny-t2v"],
    name="tiny-i2v",
    transformer=dataclasses.replace(TINY_TRANSFORMER, model_type="i2v", in_dim=36),
    moe=MoEConfig(boundaries=(0.9,), guidance=(3.5, 3.5)),
    scheduler=SchedulerConfig(sampler="unipc", num_steps=4, shift=5.0),
)
PRESETS["tiny-ti2v"] = dataclasses.replace(
    PRESETS["tiny-t2v"],
    name="tiny-ti2v",
    transformer=dataclasses.replace(TINY_TRANSFORMER, model_type="ti2v", in_dim=48, out_dim=48),
    vae=VAEConfig(generation="2.2", dim=16, dec_dim=16, z_dim=48, num_res_blocks=1),
    moe=MoEConfig(expert_names=("dense",), boundaries=(), guidance=(5.0,)),
    scheduler=SchedulerConfig(sampler="unipc", num_steps=4, shift=5.0),
)
