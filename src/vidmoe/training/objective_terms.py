"""Optional terms of the MoE flow-matching objective, as pure functions, and their options.

`ObjectiveOptions` switches them on (all off by default, which leaves the plain objective):
transition-band training (a band sample is scored on the router's blend of its two neighbouring
experts), a temporal-consistency term on the predicted clean latent, an edge-weighted velocity
error (the clean latent's outlines count more), and a specialisation margin between the expert
that owns a sample's sigma and the others. `flow_matching_loss` in
`objective.py` combines them. Shape letters: B batch, K experts, C channels, F/H/W latent grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vidmoe.config import MoEConfig


@dataclass(frozen=True, kw_only=True)
class ObjectiveOptions:
    """Which optional terms `flow_matching_loss` adds, and their weights."""

    band_training: bool = False
    """Score each sample inside a transition band (half-width `MoEConfig.band`) on the
    router-weighted blend of its two neighbouring experts, so both learn from it."""
    temporal_weight: float = 0.0
    """Weight of the MSE between the frame differences of the predicted and the true clean
    latent; 0: off."""
    edge_weight: float = 0.0
    """Weight of the velocity MSE weighted by the clean latent's edge map (`edge_map`: large on
    an object's outline, mean 1 per sample), so thin detail such as a star's points counts more
    than flat background; 0: off."""
    specialisation_weight: float = 0.0
    """Weight of relu(margin - (non-owner loss - owner loss)); 0: off. Runs every sample through
    every expert."""
    specialisation_margin: float = 0.05
    """How much lower (in velocity MSE) the owner's loss must be than each other expert's on the
    owner's own samples before the term stops pushing."""

    def __post_init__(self) -> None:
        for name in (
            "temporal_weight",
            "edge_weight",
            "specialisation_weight",
            "specialisation_margin",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")

    def check_run(self, moe: MoEConfig, experts: tuple[str, ...]) -> None:
        """ValueError if a training run with `moe`, training only `experts` (empty: all),
        cannot use these options."""
        if self.band_training and moe.band <= 0:
            raise ValueError(
                "band_training needs a transition band; got moe.band = 0: set [moe] band "
                "(e.g. 0.05) or band_training = false"
            )
        subset = experts and set(experts) != set(moe.expert_names)
        for name, on in (
            ("band_training", self.band_training),
            ("specialisation_weight", self.specialisation_weight),
        ):
            if on and subset:
                raise ValueError(
                    f"{name} runs experts on samples they do not own, so it needs every expert "
                    f"in one run; got experts = {list(experts)}: train all experts together "
                    f"(experts = []) or turn {name} off"
                )

    @property
    def is_plain(self) -> bool:
        """True when every option is off (the objective is the plain hard-switch MSE)."""
        return not (
            self.band_training
            or self.temporal_weight
            or self.edge_weight
            or self.specialisation_weight
        )


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """(B,) mean squared error of each sample (computed in fp32).

    Args:
        pred, target: (B, C, F, H, W).
    """
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)


def predicted_x0(x_sigma: Tensor, sigma: Tensor, velocity: Tensor) -> Tensor:
    """The clean latent a velocity predicts: x0_hat = x_sigma - sigma v (the path's start).

    Args:
        x_sigma: (B, C, F, H, W); sigma: (B,); velocity: (B, C, F, H, W).
    Returns:
        (B, C, F, H, W).
    """
    s = sigma.to(velocity.dtype).view(-1, *([1] * (velocity.dim() - 1)))  # (B, 1, 1, 1, 1)
    return x_sigma.to(velocity.dtype) - s * velocity


def temporal_error(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """(B,) MSE between the frame-to-frame differences of x0_hat and of x0.

    An error that is the same in every frame costs nothing: the term scores motion, not
    appearance (the plain MSE scores that).

    Args:
        x0_hat, x0: (B, C, F, H, W) with F >= 2 latent frames.
    """
    if x0.shape[2] < 2:
        raise ValueError(
            f"the temporal term needs >= 2 latent frames; got latents of shape {tuple(x0.shape)}: "
            "set temporal_weight = 0 for single-frame (image) data"
        )
    d_hat = x0_hat[:, :, 1:] - x0_hat[:, :, :-1]  # (B, C, F-1, H, W)
    d_true = x0[:, :, 1:] - x0[:, :, :-1]  # (B, C, F-1, H, W)
    return per_sample_mse(d_hat, d_true)  # (B,)


def edge_map(x0: Tensor) -> Tensor:
    """(B, 1, F, H, W) where the clean latent changes across space, scaled to mean 1 per sample.

    The channel-mean absolute difference to the right and to the lower neighbour (each spread
    over both pixels it joins): zero on flat background, largest on an object's outline. A
    sample with no edge at all (a flat latent) gets weight 1 everywhere.

    Args:
        x0: (B, C, F, H, W) clean latents.
    """
    x = x0.float()
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(1, keepdim=True)  # (B, 1, F, H, W-1)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(1, keepdim=True)  # (B, 1, F, H-1, W)
    pad = torch.nn.functional.pad
    edge = pad(dx, (0, 1)) + pad(dx, (1, 0)) + pad(dy, (0, 0, 0, 1)) + pad(dy, (0, 0, 1, 0))
    mean = edge.flatten(1).mean(1).view(-1, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
    flat = mean <= 0
    return torch.where(flat, torch.ones_like(edge), edge / mean.clamp_min(1e-12))


def edge_weighted_mse(pred: Tensor, target: Tensor, edge: Tensor) -> Tensor:
    """(B,) the squared error's mean over channels, weighted by `edge` (B, 1, F, H, W) at each
    position and averaged (fp32). With edge = 1 everywhere it is `per_sample_mse`.

    Args:
        pred, target: (B, C, F, H, W).
    """
    err = (pred.float() - target.float()).pow(2).mean(1, keepdim=True)  # (B, 1, F, H, W)
    return (err * edge).flatten(1).mean(1)  # (B,)


def specialisation_penalty(owner_loss: Tensor, other_loss: Tensor, margin: float) -> Tensor:
    """(B,) mean over the other experts of relu(margin - (other - owner)).

    Zero once the owner beats every other expert by `margin` on the sample; below that its
    gradient lowers the owner's loss and raises the others' (on the owner's samples only).

    Args:
        owner_loss: (B,) loss of the expert that owns each sample.
        other_loss: (B, K-1) loss of each other expert on the same noisy input.
    """
    return torch.relu(margin - (other_loss - owner_loss.unsqueeze(1))).mean(1)  # (B,)
