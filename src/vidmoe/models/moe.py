"""The Mixture of Experts over noise levels: the router, and `Experts`, the one object that owns
the expert networks.

The router maps a noise level `sigma` to the expert(s) that own it (with blend weights inside an
optional transition band). `Experts` holds the networks by name (noisiest first), the router,
their parameter counts and their placement: the compute device and dtype, and the residency
policy that decides which experts stay on the device. No solver or guidance logic here: the
sampling loop asks the router, activates the experts and blends their velocities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vidmoe.config import SHARED_TRANSFORMER_FIELDS, MoEConfig
from vidmoe.models.residency import (  # noqa: F401 (the policies are part of this module's API)
    RESIDENCY,
    Blocks,
    Disk,
    ExpertSource,
    Residency,
    Resident,
    Swap,
    hollow,
    is_hollow,
)

_EPS = 1e-12  # touching bands (or a band ending at sigma 0 or 1) are allowed


def smoothstep(x):
    """C1 ramp from 0 (x <= 0) to 1 (x >= 1): 3x^2 - 2x^3, for a float or elementwise a tensor."""
    x = x.clamp(0.0, 1.0) if torch.is_tensor(x) else min(max(x, 0.0), 1.0)
    return x * x * (3.0 - 2.0 * x)


def validate_moe(moe: MoEConfig) -> None:
    """Check boundaries, band, names and guidance of a MoE config; ValueError on the first fault."""
    names, bounds, band = moe.expert_names, moe.boundaries, moe.band
    if not names:
        raise ValueError("a MoE needs at least one expert; got expert_names=()")
    if len(set(names)) != len(names):
        raise ValueError(f"expert names must be unique; got {list(names)}")
    for b in bounds:
        if not 0.0 < b < 1.0:
            raise ValueError(
                f"boundary {b} is outside (0, 1): boundaries are sigmas (timestep / 1000), "
                "e.g. 0.875 for t2v-A14B"
            )
    for hi, lo in zip(bounds, bounds[1:]):
        if not hi > lo:
            raise ValueError(
                f"boundaries must be strictly descending (noisiest expert first); got {list(bounds)}"
            )
    for name, g in zip(names, moe.guidance):
        if g < 0:
            raise ValueError(f"guidance scale of {name!r} must be >= 0; got {g}")
    if band < 0:
        raise ValueError(f"band (half-width in sigma) must be >= 0; got {band}")
    if band == 0 or not bounds:
        return
    if bounds[0] + band > 1.0 + _EPS or bounds[-1] - band < -_EPS:
        raise ValueError(
            f"band {band} around boundaries {list(bounds)} reaches past sigma 0 or 1: "
            f"use band <= {min(1.0 - bounds[0], bounds[-1]):.4g}"
        )
    for hi, lo in zip(bounds, bounds[1:]):
        if hi - band < lo + band - _EPS:
            raise ValueError(
                f"transition bands of half-width {band} around boundaries {hi} and {lo} overlap: "
                f"use band <= {(hi - lo) / 2:.4g}"
            )


class Router:
    """Maps a noise level sigma to (expert name, weight) pairs; weights sum to 1."""

    def __init__(self, moe: MoEConfig):
        validate_moe(moe)
        self.moe = moe
        self.expert_names = moe.expert_names
        self.boundaries = moe.boundaries
        self.band = moe.band

    def index(self, sigma: float) -> int:
        """Index of the expert that owns `sigma` under a hard switch (band ignored)."""
        # expert k owns boundaries[k] <= sigma < boundaries[k-1]; expert 0 owns sigma >= boundaries[0]
        return sum(1 for b in self.boundaries if sigma < b)

    def owner(self, sigma: float) -> str:
        """Name of the expert that owns `sigma` under a hard switch (band ignored)."""
        return self.expert_names[self.index(sigma)]

    def sigma_range(self, name: str) -> tuple[float, float]:
        """The [low, high) sigma interval `name` owns under a hard switch (the rule of `index`).

        The noisiest expert's interval ends just past 1, so sigma = 1 belongs to it.
        """
        if name not in self.expert_names:
            raise ValueError(f"unknown expert {name!r}; the model has {list(self.expert_names)}")
        k = self.expert_names.index(name)
        edges = (1.0 + 1e-6, *self.boundaries, 0.0)
        return edges[k + 1], edges[k]

    def assign(self, sigma: torch.Tensor) -> torch.Tensor:
        """Owner index per sample for training batches (hard switch).

        Args:
            sigma: (B,) noise levels in [0, 1].
        Returns:
            (B,) int64 expert indices into `expert_names`.
        """
        bounds = torch.tensor(self.boundaries, dtype=sigma.dtype, device=sigma.device)  # (K-1,)
        return (sigma.unsqueeze(-1) < bounds).sum(-1)  # (B,)

    def weights(self, sigma: torch.Tensor) -> torch.Tensor:
        """Blend weight of every expert per sample: `route` for a batch (band-aware training).

        Args:
            sigma: (B,) noise levels in [0, 1].
        Returns:
            (B, K) float64 weights, rows summing to 1; one-hot outside every transition band.
        """
        s = sigma.double()  # (B,) float64, as `route` computes in Python floats
        w = nn.functional.one_hot(self.assign(sigma), len(self.expert_names)).double()  # (B, K)
        if self.band <= 0:
            return w
        for k, b in enumerate(self.boundaries):
            inside = ((s > b - self.band) & (s < b + self.band)).unsqueeze(1)  # (B, 1)
            noisier = smoothstep((s - (b - self.band)) / (2.0 * self.band))  # (B,) as in `route`
            band_w = torch.zeros_like(w)  # (B, K)
            band_w[:, k], band_w[:, k + 1] = noisier, 1.0 - noisier
            w = torch.where(inside, band_w, w)  # (B, K)
        return w

    def route(self, sigma: float) -> tuple[tuple[str, float], ...]:
        """The experts that run at `sigma`, noisiest first, with blend weights summing to 1.

        Outside every transition band one expert runs with weight 1. Inside the band around a
        boundary b, the noisier neighbour gets smoothstep((sigma - (b - band)) / (2 band)) and the
        other neighbour the rest; a weight that rounds to exactly 0 is dropped.
        """
        sigma = float(sigma)
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"sigma must be in [0, 1]; got {sigma}")
        if self.band > 0:
            for k, b in enumerate(self.boundaries):
                if b - self.band < sigma < b + self.band:
                    w = smoothstep((sigma - (b - self.band)) / (2.0 * self.band))
                    pairs = ((self.expert_names[k], w), (self.expert_names[k + 1], 1.0 - w))
                    return tuple(p for p in pairs if p[1] > 0.0)
        return ((self.owner(sigma), 1.0),)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a MoE: all experts, and what one denoising step runs."""

    total: int
    """Unique parameters over all experts (shared tensors counted once)."""
    active: int
    """Parameters one step runs: one expert (the largest if they differ)."""
    per_expert: dict[str, int]
    """Parameters of each expert, by name."""


def count_params(experts: Mapping[str, nn.Module]) -> ParamCounts:
    """The one parameter count of a set of experts (real, or built on the meta device)."""
    per_expert = {n: sum(p.numel() for p in e.parameters()) for n, e in experts.items()}
    unique = {id(p): p.numel() for e in experts.values() for p in e.parameters()}
    return ParamCounts(
        total=sum(unique.values()), active=max(per_expert.values()), per_expert=per_expert
    )


@dataclass(frozen=True, kw_only=True)
class Placement:
    """Where the experts live and run."""

    device: torch.device = torch.device("cpu")
    """The compute device every expert runs on."""
    dtype: torch.dtype = torch.float32
    """The dtype expert inputs run in (the loader builds the weights in it)."""
    residency: str = "resident"
    """A key of RESIDENCY: 'resident' (all on the device), 'swap' (idle experts in host RAM),
    'disk' (idle experts only in their files) or 'blocks' (blocks streamed to the device)."""
    text_encoder_device: torch.device | None = None
    """Where the text encoder runs; None: the compute device (umT5-XXL runs on the CPU too)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", torch.device(self.device))
        if self.text_encoder_device is not None:
            object.__setattr__(self, "text_encoder_device", torch.device(self.text_encoder_device))
        if self.residency not in RESIDENCY:
            raise ValueError(
                f"residency must be one of {', '.join(RESIDENCY)}; got {self.residency!r}"
            )


class Experts(nn.Module):
    """The expert networks by name (noisiest first), their router, counts and placement.

    Reads like a mapping of name -> module (`experts["high_noise"]`, `.items()`, `in`);
    `activate(name)` returns an expert ready on the compute device under the residency policy.
    """

    def __init__(
        self,
        experts: Mapping[str, nn.Module],
        moe: MoEConfig,
        *,
        placement: Placement | None = None,
        require_all: bool = True,
        sources: Mapping[str, ExpertSource] | None = None,
    ):
        """Args:
        sources: per expert, a function that reads it anew from its file (the loader gives
            them; residency 'disk' needs one per expert).
        """
        super().__init__()
        names = moe.expert_names
        # a training run of some experts (`TrainConfig.experts`) holds only those: require_all=False
        missing = [n for n in names if n not in experts] if require_all else []
        unknown = [n for n in experts if n not in names]
        if missing or unknown:
            raise ValueError(
                f"the MoE needs experts {list(names)}; got {sorted(experts)} (missing {missing}, "
                f"unknown {unknown}): pass exactly one module per configured name"
            )
        self.moe = moe
        self.router = Router(moe)
        self.placement = placement or Placement()
        self.sources = dict(sources or {})
        self.policy = RESIDENCY[self.placement.residency](sources=self.sources)
        self.by_name = nn.ModuleDict({name: experts[name] for name in names if name in experts})
        self.policy.place(self.by_name, self.placement.device)

    @property
    def expert_names(self) -> tuple[str, ...]:
        return self.moe.expert_names

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    def __getitem__(self, name: str) -> nn.Module:
        """The expert module where it lies now (see `activate` to run it)."""
        if name not in self.by_name:
            raise ValueError(f"unknown expert {name!r}; experts: {', '.join(self.expert_names)}")
        return self.by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_name)  # the experts held, noisiest first

    def __len__(self) -> int:
        return len(self.by_name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def keys(self):
        return self.by_name.keys()

    def values(self):
        return self.by_name.values()

    def items(self):
        return self.by_name.items()

    def activate(self, name: str) -> nn.Module:
        """Expert `name` ready on the compute device (the residency policy moves what it must)."""
        self.__getitem__(name)  # an unknown name is a ValueError
        return self.policy.activate(self.by_name, name, self.placement.device)

    def prefetch(self, name: str) -> None:
        """Start bringing expert `name` to the device ahead of its first step (a hint: the
        sampling loop calls it one step before a switch; `swap` copies on a side stream)."""
        self.__getitem__(name)
        self.policy.prefetch(self.by_name, name, self.placement.device)

    def idle(self) -> None:
        """The denoising is over: the policy frees what the decode does not need (`swap` and
        `blocks` move the active expert to host RAM, `disk` releases it)."""
        self.policy.idle(self.by_name)

    def on_device(self) -> tuple[str, ...]:
        """The experts whose weights are on the compute device now (all or in part)."""
        return self.policy.on_device()

    @property
    def rest_device(self) -> torch.device:
        """Where the text encoder and the VAE wait between uses: the compute device under
        `resident`, the CPU under the other policies."""
        return self.placement.device if not self.policy.offloads else torch.device("cpu")

    @contextmanager
    def lend(self, module: nn.Module | None, device: torch.device | None = None):
        """Run `module` (the text encoder's network, the VAE) on `device` (default: the compute
        device) inside the block; under a non-resident policy it goes back to the CPU after."""
        if module is None:
            yield
            return
        module.to(device or self.placement.device)
        try:
            yield
        finally:
            if self.policy.offloads:
                module.to("cpu")

    def param_counts(self) -> ParamCounts:
        """Total (unique) parameters, and the active count per step (one expert)."""
        return count_params(self.by_name)

    def check_compatible(self, strict: bool = False) -> None:
        """Raise ValueError if the experts' configs differ where they must agree.

        Args:
            strict: compare every config field (released experts are identical); otherwise only
                the input/output interface (`SHARED_TRANSFORMER_FIELDS`) that lets one loop swap
                experts. Released experts share every field.
        """
        configs = {}
        for name, expert in self.items():
            if not hasattr(expert, "config"):
                raise ValueError(
                    f"expert {name!r} ({type(expert).__name__}) has no `.config` to compare"
                )
            cfg = expert.config
            configs[name] = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else vars(cfg)
        first, *rest = configs
        fields = list(configs[first]) if strict else list(SHARED_TRANSFORMER_FIELDS)
        diffs = [
            f"{f}: " + ", ".join(f"{n}={configs[n].get(f)!r}" for n in configs)
            for f in fields
            if any(configs[n].get(f) != configs[first].get(f) for n in rest)
        ]
        if diffs:
            kind = "all fields" if strict else "the input/output interface"
            raise ValueError(f"expert configs differ ({kind} must match): " + "; ".join(diffs))
