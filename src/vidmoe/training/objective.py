"""The flow-matching objective of a Mixture of Experts over noise levels, as pure functions.

Time convention (see DESIGN.md): sigma in [0, 1]; x_sigma = (1 - sigma) x0 + sigma noise; the
network predicts velocity = noise - x0. Each sample goes to the one expert that owns its sigma
(hard switch at the MoE config's boundaries), so an expert's gradient sees only its own samples;
the optional terms of `objective_terms` (band blends, temporal, specialisation) change that.
Shape letters: B batch, C latent channels, F/H/W latent grid, S text tokens, D text width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vidmoe.config import MoEConfig
from vidmoe.models.moe import Router
from vidmoe.sampling.schedules import shift_sigmas
from vidmoe.training.objective_terms import (
    ObjectiveOptions,
    edge_map,
    edge_weighted_mse,
    per_sample_mse,
    predicted_x0,
    specialisation_penalty,
    temporal_error,
)

SIGMA_SAMPLINGS = ("uniform", "logit_normal")


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
        sigma = shift_sigmas(sigma, shift)  # (n,)
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
    router = Router(moe)
    return [router.sigma_range(n) for n in moe.expert_names if n in names]


def assign_experts(sigma: Tensor, moe: MoEConfig) -> Tensor:
    """(B,) index into `moe.expert_names` of the expert owning each sigma (hard switch)."""
    return Router(moe).assign(sigma)


@dataclass
class ObjectiveOutput:
    """What one evaluation of the objective gives the loop."""

    loss: Tensor
    """Scalar to backpropagate: the sum over experts of each expert's mean loss (velocity MSE
    plus any optional terms, each sample counted for the expert that owns its sigma)."""
    per_expert: dict[str, Tensor]
    """Mean velocity MSE of each expert that owns samples, over those samples (graph attached)."""
    counts: dict[str, int]
    """Samples each expert owns (hard switch; every given expert is a key; 0 when none)."""
    sigma: Tensor
    """(B,) the noise levels drawn."""
    sample_loss: Tensor
    """(B,) detached per-sample velocity MSE (of the blend inside a band), for loss-vs-sigma."""
    terms: dict[str, float] = field(default_factory=dict)
    """Batch mean of each optional term that is on ('temporal', 'edge', 'specialisation'),
    unweighted."""
    band_count: int = 0
    """Samples inside a transition band, scored on a blend (0 without band training)."""
    ran: tuple[str, ...] = ()
    """Experts that ran with gradients (their parameters may have .grad)."""


def flow_matching_loss(
    experts: Mapping[str, nn.Module],
    moe: MoEConfig,
    x0: Tensor,
    context: Tensor,
    sigma: Tensor,
    noise: Tensor,
    *,
    options: ObjectiveOptions | None = None,
    share: slice | None = None,
) -> ObjectiveOutput:
    """Mean squared velocity error, each sample scored by the expert that owns its sigma.

    Each expert's loss is the mean over its own samples, and the total is their sum, so an
    expert's update does not shrink when the batch happens to give it few samples. `options`
    adds the optional terms of `objective_terms` (all off by default).

    Args:
        experts: modules keyed by the names in `moe.expert_names`, called as
            expert(x (B, C, F, H, W), sigma (B,), context (B, S, D)) -> velocity.
        x0: (B, C, F, H, W) clean latents; noise: same shape.
        context: (B, S, D) text embeddings (zero-padded).
        sigma: (B,) noise levels in [0, 1]; with `share`, the whole global batch's (B_all,).
        options: the optional terms; None: none.
        share: data-parallel training: x0, context and noise are this rank's samples
            `sigma[share]` of a global batch. Each expert's loss is then this rank's sum over
            its samples divided by the expert's count in the global batch, so the ranks'
            gradients sum to the one-process gradient; an expert that runs on some rank but on
            none of this rank's samples runs on one of them with weight 0, so that every rank
            calls the same experts (DDP and FSDP2 gather and reduce inside those calls).
            `counts`, `band_count`, `ran` are the global batch's; the rest this rank's.
    Returns:
        an `ObjectiveOutput`.
    """
    opts = options or ObjectiveOptions()
    opts.check_run(moe, ())
    if opts.specialisation_weight and len(moe.expert_names) < 2:
        raise ValueError(
            "the specialisation term needs >= 2 experts; set specialisation_weight = 0"
        )
    router = Router(moe)
    owner_all = router.assign(sigma)  # (B_all,)
    num_experts = len(moe.expert_names)
    hard = nn.functional.one_hot(owner_all, num_experts).double()  # (B_all, K)
    weights_all = router.weights(sigma) if opts.band_training else hard  # (B_all, K)
    needed_all = weights_all > 0  # (B_all, K) which expert runs on which sample
    if opts.specialisation_weight:
        needed_all = torch.ones_like(needed_all)  # every sample through every expert
    _check_given(experts, moe, owner_all, needed_all)
    mine = slice(None) if share is None else share
    sigma, owner, weights, needed = (
        sigma[mine],
        owner_all[mine],
        weights_all[mine],
        needed_all[mine],
    )
    x_sigma, target = noisy_sample(x0, noise, sigma)  # (B, C, F, H, W) each
    pred = torch.zeros(target.shape, device=x0.device)  # (B, C, F, H, W) fp32
    full: dict[int, Tensor] = {}  # expert index -> (B, C, F, H, W), zero where it did not run
    idle: list[Tensor] = []  # weight-0 calls of experts that run only on other ranks
    for k, name in enumerate(moe.expert_names):
        idx = needed[:, k].nonzero(as_tuple=True)[0]  # (B_k,)
        if not idx.numel():
            if share is not None and needed_all[:, k].any():
                v = experts[name](x_sigma[:1], sigma[:1], context[:1])  # (1, C, F, H, W)
                idle.append(0.0 * v.float().sum())
            continue  # the expert is not run, so its gradients stay untouched
        v = experts[name](x_sigma[idx], sigma[idx], context[idx]).float()  # (B_k, C, F, H, W)
        full[k] = torch.zeros_like(pred).index_copy(0, idx, v)  # (B, C, F, H, W)
        w = weights[:, k].float().view(-1, *([1] * (pred.dim() - 1)))  # (B, 1, 1, 1, 1)
        pred = pred + w * full[k]  # the router's blend; exactly v outside a band
    mse = per_sample_mse(pred, target)  # (B,)
    total, terms = mse, {}
    if opts.temporal_weight:
        t = temporal_error(predicted_x0(x_sigma.float(), sigma, pred), x0.float())  # (B,)
        total = total + opts.temporal_weight * t
        terms["temporal"] = float(t.detach().mean())
    if opts.edge_weight:
        e = edge_weighted_mse(pred, target, edge_map(x0))  # (B,)
        total = total + opts.edge_weight * e
        terms["edge"] = float(e.detach().mean())
    in_band = weights.amax(1) < 1  # (B,) scored on a blend of two experts
    if opts.specialisation_weight:
        p = _specialisation(full, target, owner, opts.specialisation_margin) * ~in_band  # (B,)
        total = total + opts.specialisation_weight * p
        terms["specialisation"] = float(p.detach()[~in_band].mean()) if (~in_band).any() else 0.0
    per_expert: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    objective = []
    for k, name in enumerate(moe.expert_names):
        if name not in experts:
            continue  # trained in another run (its range got no samples, checked above)
        counts[name] = int((owner_all == k).sum())
        idx = (owner == k).nonzero(as_tuple=True)[0]  # (B_k,)
        if idx.numel():
            per_expert[name] = mse[idx].mean()
            mean = total[idx].mean() if share is None else total[idx].sum() / counts[name]
            objective.append(mean)
    return ObjectiveOutput(
        loss=torch.stack(objective + idle).sum(),
        per_expert=per_expert,
        counts=counts,
        sigma=sigma.detach(),
        sample_loss=mse.detach(),
        terms=terms,
        band_count=int((weights_all.amax(1) < 1).sum()) if opts.band_training else 0,
        ran=tuple(n for k, n in enumerate(moe.expert_names) if needed_all[:, k].any()),
    )


def _check_given(
    experts: Mapping[str, nn.Module], moe: MoEConfig, owner: Tensor, needed: Tensor
) -> None:
    """ValueError if a sample needs an expert that is not in `experts`."""
    names = moe.expert_names
    missing = sorted({names[k] for k in owner.tolist()} - set(experts))
    if missing:
        raise ValueError(
            f"samples fall in the sigma range of experts {missing} but only {sorted(experts)} "
            "are given: pass every expert, or draw sigmas with `sample_sigma(..., ranges=)`"
        )
    missing = sorted({names[k] for k in needed.any(0).nonzero().flatten().tolist()} - set(experts))
    if missing:
        raise ValueError(
            f"band training and the specialisation term run experts {missing} on samples they do "
            f"not own, but only {sorted(experts)} are given: pass every expert (these options "
            "cannot train a subset of the experts)"
        )


def _specialisation(
    full: dict[int, Tensor], target: Tensor, owner: Tensor, margin: float
) -> Tensor:
    """(B,) specialisation penalty from every expert's own (unblended) prediction."""
    losses = torch.stack([per_sample_mse(full[k], target) for k in sorted(full)], 1)  # (B, K)
    is_owner = nn.functional.one_hot(owner, losses.shape[1]).bool()  # (B, K)
    own = losses[is_owner]  # (B,)
    others = losses[~is_owner].view(losses.shape[0], -1)  # (B, K-1)
    return specialisation_penalty(own, others, margin)  # (B,)


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
