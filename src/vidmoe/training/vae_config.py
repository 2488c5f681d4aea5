"""What `vidmoe train-vae` trains and for how long: `VAETrainConfig` (every field checked when it
is built, with what is accepted) and `load_vae_train_config`, which reads one from a TOML/JSON
file strictly. The training itself is `vidmoe.training.vae_train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidmoe.config import VAEConfig
from vidmoe.training.tables import check_keys, convert, parse_table
from vidmoe.world.labels import MOTIONS, SHAPES, SIZES

__all__ = ["RUN_KEYS", "VAETrainConfig", "load_vae_train_config"]

RUN_KEYS = ("out_dir", "init")  # the top-level keys of a VAE train config beside its fields


@dataclass(frozen=True, kw_only=True)
class VAETrainConfig:
    """What `train_vae` trains and for how long."""

    vae: VAEConfig = VAEConfig(generation="2.1", dim=16, z_dim=16, num_res_blocks=1)
    """Architecture (latents_mean/std are measured after training)."""
    width: int = 64
    """Width of the rendered shapes clips."""
    height: int = 64
    """Height of the rendered shapes clips."""
    clip_frames: int = 17
    """Frames rendered per clip; training windows are cut from them."""
    window_frames: int = 9
    """Frames per training window (4k+1)."""
    crop: int = 32
    """Side of the square spatial crop (a multiple of 8), centred near the object; 0: whole frames."""
    grad_clip: float = 5.0
    """Max gradient norm (0: no clipping)."""
    batch_size: int = 8
    """Windows per step."""
    lr: float = 3e-4
    """AdamW learning rate (cosine-decayed to 10% over `max_steps`)."""
    latent_noise: float = 0.1
    """Noise added to the posterior mean during training, relative to its std."""
    object_weight: float = 20.0
    """Extra loss weight of pixels that differ from the clip's median (background) colour."""
    latent_weight: float = 1e-5
    """Weight of the mean squared latent (keeps the latent scale bounded)."""
    max_steps: int = 2000
    """Step limit."""
    stop_step: int = 0
    """End at this step (with a checkpoint) while the cosine still spans `max_steps`; 0: at
    `max_steps`. Repeats exactly a stage that a time limit once stopped."""
    max_minutes: float = 15.0
    """Wall-clock limit of one invocation; training stops at whichever limit comes first (a run
    stopped by it goes on from its checkpoint when started again)."""
    num_threads: int = 0
    """torch CPU threads for the run; 0 leaves torch's default (all cores)."""
    checkpoint_every: int = 100
    """Steps between writes of `out_dir/vae_checkpoint.pt` (weights, optimiser, step, RNG
    states), from which a killed or time-limited run resumes bit-exactly; 0: none."""
    seed: int = 0
    """Seed of the world and of the initialisation."""
    freeze_encoder: bool = False
    """Train the decoder only: the latent space (and so a latent cache built from it) stays valid."""
    freeze_decoder: bool = False
    """Train the encoder only: the decoder draws what it drew for the latents it knew, and the
    encoder learns to give the frames latents it draws well (issue 23's first frame, whose
    latent the decoder can draw right but the init encoder does not produce)."""
    num_stat_clips: int = 64
    """Whole clips encoded to measure the latent mean and std."""
    sizes: tuple[str, ...] = SIZES
    """Object sizes of the shapes world it trains on."""
    motions: tuple[str, ...] = MOTIONS
    """Motions of the shapes world it trains on."""
    shapes: tuple[str, ...] = SHAPES
    """Shapes of the shapes world it trains on, drawn uniformly: a shape named twice is drawn
    twice as often (("circle", "square", "triangle", "star", "star") gives stars 40%)."""
    edge_weight: float = 0.0
    """Extra loss weight of the pixels on an object's outline (inside or outside it by one pixel),
    on top of `object_weight`: corners and points are a few pixels each, and a VAE that rounds them
    off loses little loss but turns a star into a circle."""
    border_weight: float = 0.0
    """Extra loss weight of the pixels within `border_width` of the frame's border (all four
    sides, every frame), on top of the others: the decoder's zero padding draws the outermost
    pixels worst, and a colour error there is what the eye reads as a first-frame flash (issue
    23's measure is the top and bottom rows' colour) while it is a few % of the loss."""
    border_width: int = 1
    """Width in pixels of the band `border_weight` and `border_change_weight` read."""
    border_change_weight: float = 0.0
    """Weight of a term on the border band's mean colour change from each frame to the next,
    against the clip's (`vae_train.border_change_error`): it asks the frames to agree with each
    other rather than each with the clip, so a first-frame head learns to draw the first frames'
    border as the decoder draws the later ones' (no step at frame 1, none where the head stops,
    given `window_frames` past the head's frames). 0: none."""
    first_frame_weight: float = 1.0
    """Loss weight of each window's first frame relative to the others (1: the same). The causal
    VAE codes the first frame alone, through a path the other frames share little of; a window
    has one first frame in `window_frames`, so that path learns slowest (issue 23's flash)."""
    encoder_lr: float = 0.0
    """The encoder's (and posterior conv's) learning rate, cosine-decayed like `lr`; 0: `lr`. A
    first-frame stage moves the encoder's frame-0 path faster than a converged decoder can
    take (issue 23)."""
    anchor_weight: float = 0.0
    """Weight of a teacher term: the mean squared distance of each window's latent frames 1+
    (not frame 0) to those the `init` VAE's frozen encoder gives the same window, over the
    teacher latents' variance. With the encoder trained, it lets frame 0's latent change while
    the rest of the latent space (that latent caches and experts were made in) barely moves.
    0: none; > 0 needs `init`."""
    first_latent_weight: float = 0.0
    """Weight of a target for latent frame 0: the mean squared distance of the latent the
    encoder gives each first frame of `first_latent_bank` to the bank's latent for it, each
    channel over the bank latents' variance. The bank holds the latents from which the `init`
    decoder draws those frames right (`first_latents.invert_first_latents`): where the reconstruction loss's
    gradient at the encoder's frame-0 latent is too small to move it (issue 23), the target
    moves it straight. 0: none; > 0 needs `first_latent_bank`."""
    first_latent_bank: str = ""
    """A safetensors file of first frames and their target latents (`recipes/demo/first_latent_bank.py`;
    "frames" (N, 3, 1, H, W) in [-1, 1], "latents" (N, Z, 1, h, w) at the posterior's scale),
    read when `first_latent_weight` > 0; a relative path is from the working directory."""
    first_latent_batch: int = 16
    """First frames of the bank per step (each one frame: cheap beside the windows)."""
    reconstruction: bool = True
    """Train on the reconstruction loss. False (with `freeze_decoder`): no decoder pass, the
    encoder learns from its targets alone (`anchor_weight`, `first_latent_weight`). A frozen
    decoder draws the later frames with latent frame 0 in their causal history, and so pulls
    frame 0 back to the latent it was trained with; a stage that moves frame 0 needs it off, and a
    decoder stage after it (the encoder frozen) to draw the later frames from the new history."""

    def __post_init__(self) -> None:
        for name, allowed in (("sizes", SIZES), ("motions", MOTIONS), ("shapes", SHAPES)):
            values = tuple(getattr(self, name))
            object.__setattr__(self, name, values)
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(f"{name} must be non-empty names from {allowed}; got {values}")
        stride = self.vae.spatial_stride
        if self.crop % stride or self.crop < 0:
            raise ValueError(
                f"crop must be 0 or a multiple of {stride} (the VAE's spatial stride); "
                f"got {self.crop}"
            )
        if self.num_threads < 0:
            raise ValueError(
                f"num_threads must be >= 0 (0: torch's default); got {self.num_threads}"
            )
        if not 0 <= self.stop_step <= self.max_steps:
            raise ValueError(
                f"stop_step must be in [0, max_steps={self.max_steps}] (0: run to max_steps); "
                f"got {self.stop_step}"
            )
        if self.encoder_lr < 0 or (self.encoder_lr and self.freeze_encoder):
            raise ValueError(
                f"encoder_lr must be >= 0 (0: lr), and 0 with freeze_encoder; got {self.encoder_lr}"
            )
        if self.anchor_weight < 0:
            raise ValueError(f"anchor_weight must be >= 0 (0: no anchor); got {self.anchor_weight}")
        if self.freeze_encoder and self.freeze_decoder and not self.vae.first_frame_head:
            raise ValueError(
                "freeze_encoder and freeze_decoder together leave nothing to train (but a "
                "first-frame head, vae.first_frame_head > 0): set one false"
            )
        if self.first_latent_weight < 0:
            raise ValueError(
                f"first_latent_weight must be >= 0 (0: none); got {self.first_latent_weight}"
            )
        if bool(self.first_latent_weight) != bool(self.first_latent_bank):
            raise ValueError(
                "first_latent_weight and first_latent_bank go together (the weight of the target "
                "for latent frame 0, and the file of targets): set both or neither; got "
                f"{self.first_latent_weight} and {self.first_latent_bank!r}"
            )
        if (self.anchor_weight or self.first_latent_weight) and self.freeze_encoder:
            raise ValueError(
                "anchor_weight and first_latent_weight steer the encoder's latents, which a "
                "frozen encoder cannot follow: set them to 0 or freeze_encoder = false"
            )
        if self.border_weight < 0:
            raise ValueError(f"border_weight must be >= 0 (0: none); got {self.border_weight}")
        if self.border_change_weight < 0:
            raise ValueError(
                f"border_change_weight must be >= 0 (0: none); got {self.border_change_weight}"
            )
        if self.border_change_weight and not self.reconstruction:
            raise ValueError(
                "border_change_weight reads the decoded frames: it needs reconstruction = true"
            )
        if (self.border_weight or self.border_change_weight) and self.crop:
            raise ValueError(
                "border_weight and border_change_weight read the frame's border, which a crop "
                f"(crop = {self.crop}) does not show: set crop = 0 (whole frames) or both to 0"
            )
        if not 1 <= self.border_width <= min(self.width, self.height) // 2:
            raise ValueError(
                f"border_width must be in [1, {min(self.width, self.height) // 2}] (half the "
                f"frame's shorter side); got {self.border_width}"
            )
        if self.first_frame_weight <= 0:
            raise ValueError(
                f"first_frame_weight must be > 0 (1: as the other frames); got {self.first_frame_weight}"
            )
        if not self.reconstruction and not (
            self.freeze_decoder and (self.anchor_weight or self.first_latent_weight)
        ):
            raise ValueError(
                "reconstruction = false trains the encoder on its targets alone: it needs "
                "freeze_decoder = true and anchor_weight or first_latent_weight > 0"
            )
        if self.first_latent_batch < 1:
            raise ValueError(f"first_latent_batch must be >= 1; got {self.first_latent_batch}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0; got {self.checkpoint_every}")
        if (self.window_frames - 1) % 4 or self.window_frames > self.clip_frames:
            raise ValueError(
                f"window_frames must be 4k+1 and <= clip_frames ({self.clip_frames}); "
                f"got {self.window_frames}"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VAETrainConfig:
        """Build from a config dict, strictly (`vidmoe.training.tables`): every key must be a
        field, of its type; the `[vae]` table holds VAEConfig fields."""
        return parse_table(cls, d)


def load_vae_train_config(path: str | Path) -> tuple[VAETrainConfig, Path, Path | None]:
    """Read a VAE training config (.toml or .json; `base = "other.toml"` as for the experts'):
    VAETrainConfig fields, a `[vae]` table of VAEConfig fields, `out_dir` (required) and `init`
    (a vae.safetensors or a folder holding one; optional), each key strictly checked. Returns the
    config, out_dir and init (paths as written: relative ones are from the working directory)."""
    from vidmoe.training.config import read_config

    d = read_config(path, "VAE train config")
    try:
        check_keys(d, [*(f.name for f in dataclasses.fields(VAETrainConfig)), *RUN_KEYS], "")
        out_dir, init = (convert(d.pop(k, ""), str, k) for k in RUN_KEYS)
        if not out_dir:
            raise ValueError("needs out_dir (the folder vae.safetensors goes to)")
        return VAETrainConfig.from_dict(d), Path(out_dir), Path(init) if init else None
    except ValueError as e:
        raise ValueError(f"VAE train config {path}: {e}") from None
