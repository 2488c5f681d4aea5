"""The flow-matching objective of a Mixture of Experts over noise levels, as pure functions.

Time convention (see DESIGN.md): sigma in [0, 1]; x_sigma = (1 - sigma) x0 + sigma noise; the
network predicts velocity = noise - x0. Each sample goes to the one expert that owns its sigma
(hard switch at the MoE config's boundaries), so an expert's gradient sees only its own samples.
Shape letters: B batch, C latent channels, F/H/W latent grid, S text tokens, D text width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vidmoe.config import MoEConfig
from vidmoe.models.moe import Router

SIGMA_SAMPLINGS = ("uniform", "logit_normal")


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """sigma' = shift sigma / (1 + (shift - 1) sigma): shift > 1 moves mass to high noise."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigma(
    n: int,
    *,
    kind: str = "uniform",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    ranges: Sequence[tuple[float, float]] | None = None,
) -> Tensor:
    """Draw training noise levels.

    Args:
        n: how many.
        kind: 'uniform' (U(0, 1)) or 'logit_normal' (sigmoid of N(logit_mean, logit_std)).
        shift: applied after drawing (1 leaves the draw as it is).
        generator: the torch RNG to draw from (None: the global one).
        ranges: keep only sigmas in one of these [low, high) intervals (the draw conditioned on
            them, by rejection): how a run that trains a subset of the experts samples.
    Returns:
        (n,) float32 sigmas in [0, 1].
    """
    if kind not in SIGMA_SAMPLINGS:
        raise ValueError(f"sigma sampling must be one of {SIGMA_SAMPLINGS}; got {kind!r}")
    if shift <= 0:
        raise ValueError(f"sigma shift must be > 0; got {shift}")
    if ranges is not None and not any(hi > lo for lo, hi in ranges):
        raise ValueError(f"sigma ranges must contain a non-empty [low, high); got {ranges}")
    kept: list[Tensor] = []
    total = 0
    for _ in range(10_000):
        if kind == "uniform":
            sigma = torch.rand(n, generator=generator)
        else:
            sigma = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
        sigma = shift_sigma(sigma, shift)  # (n,)
        if ranges is None:
            return sigma
        inside = torch.zeros(n, dtype=torch.bool)
        for lo, hi in ranges:
            inside |= (sigma >= lo) & (sigma < hi)
        kept.append(sigma[inside])
        total += int(inside.sum())
        if total >= n:
            return torch.cat(kept)[:n]
    raise ValueError(f"the sigma draw ({kind}, shift {shift}) almost never falls in {ranges}")


def noisy_sample(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """The point on the straight path at `sigma` and the velocity that moves along it.

    Args:
        x0: (B, C, F, H, W) clean latents; noise: same shape; sigma: (B,).
    Returns:
        x_sigma (B, C, F, H, W) and target velocity noise - x0 (B, C, F, H, W).
    """
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.dim() - 1)))  # (B, 1, 1, 1, 1)
    return (1.0 - s) * x0 + s * noise, noise - x0


def expert_ranges(moe: MoEConfig, names: Sequence[str]) -> list[tuple[float, float]]:
    """The [low, high) sigma interval each of `names` owns under a hard switch."""
    unknown = [n for n in names if n not in moe.expert_names]
    if unknown:
        raise ValueError(f"unknown experts {unknown}; the model has {list(moe.expert_names)}")
    edges = (1.0 + 1e-6, *moe.boundaries, 0.0)  # sigma = 1 belongs to the noisiest expert
    return [(edges[k + 1], edges[k]) for k, n in enumerate(moe.expert_names) if n in names]


def assign_experts(sigma: Tensor, moe: MoEConfig) -> Tensor:
    """(B,) index into `moe.expert_names` of the expert owning each sigma (hard switch)."""
    return Router(moe).assign(sigma)


@dataclass
class ObjectiveOutput:
    """What one evaluation of the objective gives the loop."""

    loss: Tensor
    """Scalar to backpropagate: the sum over experts of each expert's mean loss."""
    per_expert: dict[str, Tensor]
    """Mean loss of each expert that got samples (graph attached)."""
    counts: dict[str, int]
    """Samples each expert got (every expert is a key; 0 when it got none)."""
    sigma: Tensor
    """(B,) the noise levels drawn."""
    sample_loss: Tensor
    """(B,) detached per-sample loss, for loss-vs-sigma curves."""


def flow_matching_loss(
    experts: Mapping[str, nn.Module],
    moe: MoEConfig,
    x0: Tensor,
    context: Tensor,
    sigma: Tensor,
    noise: Tensor,
) -> ObjectiveOutput:
    """Mean squared velocity error, each sample scored by the expert that owns its sigma.

    Each expert's loss is the mean over its own samples, and the total is their sum, so an
    expert's update does not shrink when the batch happens to give it few samples.

    Args:
        experts: modules keyed by the names in `moe.expert_names`, called as
            expert(x (B, C, F, H, W), sigma (B,), context (B, S, D)) -> velocity.
        x0: (B, C, F, H, W) clean latents; noise: same shape.
        context: (B, S, D) text embeddings (zero-padded).
        sigma: (B,) noise levels in [0, 1].
    Returns:
        an `ObjectiveOutput`.
    """
    x_sigma, target = noisy_sample(x0, noise, sigma)  # (B, C, F, H, W) each
    owner = assign_experts(sigma, moe)  # (B,)
    missing = sorted({moe.expert_names[k] for k in owner.tolist()} - set(experts))
    if missing:
        raise ValueError(
            f"samples fall in the sigma range of experts {missing} but only {sorted(experts)} "
            "are given: pass every expert, or draw sigmas with `sample_sigma(..., ranges=)`"
        )
    sample_loss = torch.zeros(x0.shape[0], device=x0.device)  # (B,)
    per_expert: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for k, name in enumerate(moe.expert_names):
        if name not in experts:
            continue  # trained in another run (its range got no samples, checked above)
        idx = (owner == k).nonzero(as_tuple=True)[0]  # (B_k,)
        counts[name] = int(idx.numel())
        if not counts[name]:
            continue  # the expert is not run, so its gradients stay untouched
        v = experts[name](x_sigma[idx], sigma[idx], context[idx])  # (B_k, C, F, H, W)
        err = (v.float() - target[idx].float()).pow(2).flatten(1).mean(1)  # (B_k,)
        per_expert[name] = err.mean()
        sample_loss[idx] = err.detach()
    loss = torch.stack(list(per_expert.values())).sum()
    return ObjectiveOutput(loss, per_expert, counts, sigma.detach(), sample_loss)


@torch.no_grad()
def loss_table(
    expert: nn.Module,
    x0: Tensor,
    context: Tensor,
    sigmas: list[float],
    *,
    generator: torch.Generator | None = None,
) -> tuple[list[float], list[float]]:
    """One expert's mean velocity MSE at each of `sigmas`, whether it owns them or not.

    The result is a `LossTable` for `vidmoe.sampling.plan.calibrated_boundaries`, which puts a
    boundary where the noisier expert's loss stops being the lower one.

    Args:
        expert: called as expert(x (B, C, F, H, W), sigma (B,), context (B, S, D)).
        x0: (B, C, F, H, W) held-out clean latents; context: (B, S, D).
        sigmas: the noise levels to measure at.
    Returns:
        (sigmas, losses).
    """
    losses = []
    for s in sigmas:
        noise = torch.randn(x0.shape, generator=generator)  # (B, C, F, H, W)
        sigma = torch.full((x0.shape[0],), float(s))  # (B,)
        x_sigma, target = noisy_sample(x0, noise, sigma)
        losses.append(float((expert(x_sigma, sigma, context).float() - target).pow(2).mean()))
    return list(sigmas), losses
