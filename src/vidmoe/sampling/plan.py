"""The phase plan of a MoE sampler: which expert(s) run at each step, with what blend weight and
guidance scale, and how the expert boundary is chosen.

The boundary comes typed (`sampling.boundary`): `Release`, `Sigma`, `SNR` (the Wan2.2 criterion
for the actual grid), `Steps` (the first N steps to the noisiest expert), `Budgets` (steps per
expert, which fix every boundary) or `Calibrated` (the crossover of measured per-expert losses).
`plan_for(settings, config)` is the plan of validated settings: built once, printed before
sampling, and written into the run's JSON trace.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vidmoe.config import EXPERT_NAMES_2, ModelConfig, MoEConfig
from vidmoe.models.moe import Router
from vidmoe.sampling.boundary import (
    SNR,
    Boundary,
    Budgets,
    Calibrated,
    LossTable,
    Release,
    Sigma,
    Steps,
    parse_boundary,
)
from vidmoe.sampling.schedules import make_sigmas, shift_sigmas, sigmas_from_list

if TYPE_CHECKING:
    from vidmoe.sampling.settings import ResolvedSettings


@dataclass(frozen=True)
class StepPlan:
    """One solver step: the sigma interval and the experts that run, with weights and guidance."""

    index: int
    sigma: float
    sigma_next: float
    timestep: float
    """Model input time, num_train_timesteps * sigma."""
    experts: tuple[str, ...]
    """Experts that run, noisiest first (two only inside a transition band)."""
    weights: tuple[float, ...]
    """Blend weight of each expert's guided velocity; they sum to 1."""
    guidance: tuple[float, ...]
    """Classifier-free guidance scale of each expert."""
    adapter_scales: dict[str, float] = dataclasses.field(default_factory=dict)
    """Adapter name -> strength at this step; `expert/name` where a blended step's experts
    hold the adapter at different strengths. Empty when no adapter is loaded."""


@dataclass(frozen=True)
class Plan:
    """The per-step expert plan of one sampling run."""

    steps: tuple[StepPlan, ...]
    expert_names: tuple[str, ...]

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def counts(self) -> dict[str, int]:
        """Number of steps each expert runs in (a blended step counts for both)."""
        return {n: sum(n in s.experts for s in self.steps) for n in self.expert_names}

    def phases(self) -> list[tuple[StepPlan, ...]]:
        """Maximal runs of consecutive steps with the same experts and guidance."""
        runs: list[list[StepPlan]] = []
        for s in self.steps:
            if runs and _phase_key(runs[-1][-1]) == _phase_key(s):
                runs[-1].append(s)
            else:
                runs.append([s])
        return [tuple(r) for r in runs]

    def summary(self) -> str:
        """A readable table: per phase the steps, sigma range, expert(s) and guidance."""
        rows = [("phase", "steps", "sigma", "expert(s)", "guidance", "adapters")]
        for i, ph in enumerate(self.phases()):
            first, last = ph[0], ph[-1]
            blend = " (blend)" if len(first.experts) > 1 else ""
            rows.append((
                str(i + 1),
                f"{first.index}-{last.index} ({len(ph)})",
                f"{first.sigma:.4f} -> {last.sigma_next:.4f}",
                "+".join(first.experts) + blend,
                "/".join(f"{g:g}" for g in first.guidance),
                " ".join(f"{n}={v:g}" for n, v in first.adapter_scales.items()),
            ))  # fmt: skip
        if not any(s.adapter_scales for s in self.steps):
            rows = [r[:-1] for r in rows]
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        counts = ", ".join(f"{n} {c}" for n, c in self.counts().items())
        lines.append(f"steps per expert: {counts} (total {self.num_steps})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the run's trace."""
        return {
            "expert_names": list(self.expert_names),
            "counts": self.counts(),
            "steps": [
                {
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in dataclasses.asdict(s).items()
                }
                for s in self.steps
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        steps = tuple(
            StepPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
            for s in d["steps"]
        )
        return cls(steps=steps, expert_names=tuple(d["expert_names"]))


def _phase_key(s: StepPlan) -> tuple:
    return s.experts, s.guidance, s.adapter_scales


def with_adapter_scales(plan: Plan, strengths: Mapping[str, Mapping[str, float]]) -> Plan:
    """`plan` with each step's adapter strengths filled in.

    Args:
        strengths: adapter name -> expert name -> strength (experts without it: not attached).
    """
    steps = []
    for st in plan.steps:
        scales: dict[str, float] = {}
        for name, per_expert in strengths.items():
            values = {e: float(per_expert[e]) for e in st.experts if e in per_expert}
            if len(set(values.values())) == 1:
                scales[name] = next(iter(values.values()))
            else:  # a blended step whose experts differ: one entry per expert
                scales.update({f"{e}/{name}": v for e, v in values.items()})
        steps.append(dataclasses.replace(st, adapter_scales=scales))
    return Plan(steps=tuple(steps), expert_names=plan.expert_names)


def check_sigmas(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    """Validate a sigma grid (num_steps + 1 values, strictly descending, in [0, 1], last 0)."""
    values = [float(s) for s in (sigmas.flatten().tolist() if torch.is_tensor(sigmas) else sigmas)]
    if len(values) < 2:
        raise ValueError(f"a sigma grid needs num_steps + 1 >= 2 values; got {values}")
    if values[0] > 1.0 or values[-1] != 0.0:
        raise ValueError(
            f"sigmas must run from at most 1 down to exactly 0; got first {values[0]}, last {values[-1]}"
        )
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly descending; got {values}")
    return values


def merge_guidance(moe: MoEConfig, guidance: Mapping[str, float] | None) -> MoEConfig:
    """Return `moe` with per-expert guidance overrides merged over its scales."""
    if not guidance:
        return moe
    _check_names(guidance, moe.expert_names, "guidance")
    for name, g in guidance.items():
        if g < 0:
            raise ValueError(f"guidance scale for {name!r} must be >= 0; got {g}")
    merged = tuple(float(guidance.get(n, g)) for n, g in zip(moe.expert_names, moe.guidance))
    return dataclasses.replace(moe, guidance=merged)


def build_plan(
    sigmas: torch.Tensor | Sequence[float],
    moe: MoEConfig,
    *,
    guidance: Mapping[str, float] | None = None,
    num_train_timesteps: int = 1000,
) -> Plan:
    """The plan for a sigma grid: the router is evaluated at each step's starting sigma.

    Args:
        sigmas: (num_steps + 1,) descending grid ending at 0.
        moe: experts, boundaries, guidance and band.
        guidance: per-expert overrides of `moe.guidance`, e.g. {"high_noise": 4.0}.
    """
    values = check_sigmas(sigmas)
    moe = merge_guidance(moe, guidance)
    router = Router(moe)
    scale = dict(zip(moe.expert_names, moe.guidance))
    steps = []
    for i, (sigma, sigma_next) in enumerate(zip(values, values[1:])):
        names, weights = zip(*router.route(sigma))
        steps.append(StepPlan(
            index=i, sigma=sigma, sigma_next=sigma_next, timestep=num_train_timesteps * sigma,
            experts=names, weights=weights, guidance=tuple(scale[n] for n in names),
        ))  # fmt: skip
    return Plan(steps=tuple(steps), expert_names=moe.expert_names)


def snr(sigma: float) -> float:
    """Signal-to-noise ratio of x_sigma = (1 - sigma) x0 + sigma noise: ((1 - sigma) / sigma)^2."""
    return math.inf if sigma == 0 else ((1.0 - sigma) / sigma) ** 2


def boundary_between_steps(sigmas: Sequence[float], num_high: int) -> float:
    """A boundary that gives the first `num_high` steps to the noisier expert (the midpoint)."""
    num_steps = len(sigmas) - 1
    if not 1 <= num_high <= num_steps:
        raise ValueError(
            f"steps for the noisier expert must be in [1, {num_steps}]; got {num_high}"
        )
    # Any value in (sigmas[n], sigmas[n-1]] splits the same way; the midpoint is robust to rounding.
    return 0.5 * (sigmas[num_high - 1] + sigmas[num_high])


def snr_boundary(
    sigmas: Sequence[float], *, shift: float, num_train_timesteps: int = 1000
) -> float:
    """The Wan2.2 SNR criterion, placed between the steps of this grid.

    Wan2.2 (README, "Mixture-of-Experts architecture"; github.com/Wan-Video/Wan2.2): the SNR is
    at its minimum SNR_min at the start of denoising, the high-noise expert runs there, and "a
    threshold step t_moe corresponding to half of the SNR_min" switches to the low-noise expert
    when t < t_moe. Read literally (SNR = SNR_min / 2) the threshold lies below the minimum, so
    we read "half" on a logarithmic (dB) scale, the usual one for SNR: log SNR(t_moe) =
    log(SNR_min) / 2, i.e. SNR = sqrt(SNR_min), half-way in dB from SNR_min to SNR = 1.
    SNR_min is the SNR at the run's first sigma, capped at the noisiest training sigma
    shift(1 - 1/num_train_timesteps) (where SNR is finite; the release's grid starts there).
    The threshold is then snapped between the grid's steps so the split is exact.
    Note: this reading does not reproduce the release's 0.875 (shift 12) or 0.900 (shift 5);
    it switches earlier (about 0.991 at shift 12).
    """
    values = check_sigmas(sigmas)
    sigma_start = min(values[0], shift_sigmas(1.0 - 1.0 / num_train_timesteps, shift))
    r_min = (1.0 - sigma_start) / sigma_start  # sqrt(SNR_min)
    # SNR(sigma*) = sqrt(SNR_min)  <=>  (1 - sigma*) / sigma* = sqrt(r_min)
    sigma_star = 1.0 / (1.0 + math.sqrt(r_min))
    num_high = sum(1 for x in values[:-1] if x >= sigma_star)
    return boundary_between_steps(values, min(max(num_high, 1), len(values) - 1))


def _crossover(high: LossTable, low: LossTable, names: tuple[str, str]) -> float:
    """Sigma where the noisier expert's loss stops being the lower one (linear interpolation)."""
    grids = []
    for name, (xs, ys) in zip(names, (high, low)):
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if xs.ndim != 1 or xs.shape != ys.shape or xs.size < 2:
            raise ValueError(
                f"loss table of {name!r} needs equal-length 1-D sigmas and losses (>= 2 points)"
            )
        order = np.argsort(xs)
        grids.append((xs[order], ys[order]))
    lo_end, hi_end = max(g[0][0] for g in grids), min(g[0][-1] for g in grids)
    x = np.union1d(grids[0][0], grids[1][0])
    x = x[(x >= lo_end) & (x <= hi_end)]  # ascending sigmas both tables cover
    lh, ll = (np.interp(x, gx, gy) for gx, gy in grids)
    d = lh - ll  # < 0 where the noisier expert is better
    candidates = []
    for i in range(len(x) - 1):  # low better below, noisier better above
        if (d[i] >= 0 > d[i + 1]) or (d[i] > 0 >= d[i + 1]):
            candidates.append(x[i] + (x[i + 1] - x[i]) * d[i] / (d[i] - d[i + 1]))
    if not candidates:
        raise ValueError(
            f"no loss crossover between {names[0]!r} and {names[1]!r} in the measured sigma "
            f"range [{lo_end:.4g}, {hi_end:.4g}]: measure a wider sigma range, or use another mode"
        )
    # Several crossings (noisy measurements): keep the split with the lowest total loss.
    cost = [np.where(x >= b, lh, ll).sum() for b in candidates]
    return float(candidates[int(np.argmin(cost))])


def calibrated_boundaries(
    losses: Mapping[str, LossTable], expert_names: Sequence[str] = EXPERT_NAMES_2
) -> tuple[float, ...]:
    """Boundaries at the crossovers of measured loss-vs-sigma tables of neighbouring experts.

    Args:
        losses: expert name -> (sigmas, losses), e.g. each expert's denoising loss measured on a
            held-out set at a few sigmas.
    """
    names = tuple(expert_names)
    _check_names(losses, names, "loss tables")
    missing = [n for n in names if n not in losses]
    if missing:
        raise ValueError(f"calibrated mode needs a loss table for every expert; missing {missing}")
    bounds = tuple(_crossover(losses[a], losses[b], (a, b)) for a, b in zip(names, names[1:]))
    if any(a <= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"calibrated boundaries are not descending: {list(bounds)}")
    return bounds


def resolve_boundary(
    boundary: Boundary | str,
    *,
    release: float,
    shift: float,
    num_steps: int,
    sigmas: torch.Tensor | Sequence[float] | None = None,
    expert_names: Sequence[str] = EXPERT_NAMES_2,
    num_train_timesteps: int = 1000,
) -> float:
    """The boundary sigma between two experts.

    Args:
        boundary: a `Release`, `Sigma`, `SNR`, `Steps` or `Calibrated` value (or its string).
        release: the checkpoint's boundary (`Release`).
        shift, num_steps: the sampler's grid (`SNR` and `Steps`).
        sigmas: the sampler's actual grid; default `make_sigmas(num_steps, shift)` (UniPC's).
    Returns:
        A sigma in (0, 1); the noisier expert runs every step with sigma >= it.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    boundary = parse_boundary(boundary)
    grid = _grid(num_steps, shift, sigmas, num_train_timesteps)
    if isinstance(boundary, Release):
        b = float(release)
    elif isinstance(boundary, Sigma):
        b = boundary.value
    elif isinstance(boundary, SNR):
        b = snr_boundary(grid, shift=shift, num_train_timesteps=num_train_timesteps)
    elif isinstance(boundary, Steps):
        if not 1 <= boundary.n <= num_steps:
            raise ValueError(
                f"boundary {boundary.spec!r}: N must be in [1, {num_steps}]; got {boundary.n}"
            )
        b = boundary_between_steps(grid, boundary.n)
    elif isinstance(boundary, Calibrated):
        (b,) = calibrated_boundaries(boundary.losses, tuple(expert_names)[:2])
    else:
        raise ValueError(f"{boundary} places every boundary: use make_plan")
    if not 0.0 < b < 1.0:
        raise ValueError(f"boundary {b} ({boundary.spec!r}) is outside (0, 1)")
    return b


def boundaries_from_budgets(
    budgets: Mapping[str, int], sigmas: Sequence[float], expert_names: Sequence[str]
) -> tuple[float, ...]:
    """Boundaries giving each expert exactly its budget of steps, noisiest expert first."""
    names = tuple(expert_names)
    _check_names(budgets, names, "step budgets")
    if set(budgets) != set(names):
        raise ValueError(f"step budgets need every expert {list(names)}; got {sorted(budgets)}")
    for name, n in budgets.items():
        if int(n) != n or n < 1:
            raise ValueError(f"step budget for {name!r} must be an integer >= 1; got {n}")
    total = sum(int(budgets[n]) for n in names)
    if total != len(sigmas) - 1:
        raise ValueError(f"step budgets sum to {total}, but the grid has {len(sigmas) - 1} steps")
    ends = np.cumsum([int(budgets[n]) for n in names])[:-1]
    return tuple(boundary_between_steps(sigmas, int(e)) for e in ends)


def make_plan(
    moe: MoEConfig,
    *,
    shift: float,
    num_steps: int | None = None,
    sigmas: torch.Tensor | Sequence[float] | None = None,
    boundary: Boundary | str = "release",
    guidance: Mapping[str, float] | None = None,
    num_train_timesteps: int = 1000,
) -> Plan:
    """The plan for a request: place the boundaries on the grid, then build it.

    Args:
        moe: the model's MoE config (its boundaries are the `Release` ones).
        shift, num_steps: the grid; num_steps defaults to the budgets' sum for `Budgets`.
        sigmas: the sampler's actual grid; default `make_sigmas(num_steps, shift)` (UniPC's).
        boundary: a typed boundary (`sampling.boundary`) or its string form.
        guidance: per-expert guidance overrides.
    """
    boundary = parse_boundary(boundary)
    if isinstance(boundary, Budgets):
        total = sum(boundary.steps.values())
        if num_steps is not None and num_steps != total:
            raise ValueError(
                f"step budgets {dict(boundary.steps)} sum to {total}, not num_steps={num_steps}"
            )
        num_steps = total
    if num_steps is None:
        num_steps = len(sigmas) - 1 if sigmas is not None else 0
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    grid = _grid(num_steps, shift, sigmas, num_train_timesteps)
    if isinstance(boundary, Budgets):
        bounds = boundaries_from_budgets(boundary.steps, grid, moe.expert_names)
    elif isinstance(boundary, Release):
        bounds = moe.boundaries
    elif isinstance(boundary, Calibrated):
        bounds = calibrated_boundaries(boundary.losses, moe.expert_names)
    else:
        if len(moe.expert_names) != 2:
            raise ValueError(
                f"boundary {boundary.spec!r} places one boundary; this model has "
                f"{len(moe.expert_names)} experts: use 'release', 'calibrated' or step budgets"
            )
        bounds = (resolve_boundary(
            boundary, release=moe.boundaries[0], shift=shift, num_steps=num_steps, sigmas=grid,
            expert_names=moe.expert_names, num_train_timesteps=num_train_timesteps,
        ),)  # fmt: skip
    moe = dataclasses.replace(moe, boundaries=tuple(bounds))
    return build_plan(grid, moe, guidance=guidance, num_train_timesteps=num_train_timesteps)


def plan_for(rs: ResolvedSettings, config: ModelConfig) -> Plan:
    """The plan of validated settings on `config`'s model: grid, boundary, band and guidance."""
    if rs.sigmas is not None:
        sigmas = sigmas_from_list(rs.sigmas)
    else:
        sigmas = make_sigmas(rs.num_steps, rs.shift, solver=rs.sampler)
    moe = dataclasses.replace(config.moe, band=rs.band)
    boundary = rs.boundary
    if len(moe.expert_names) == 1:
        boundary = Release()
    elif isinstance(boundary, Sigma):  # one fixed boundary: the plan is the release's rule
        moe, boundary = dataclasses.replace(moe, boundaries=(boundary.value,)), Release()
    return make_plan(moe, shift=rs.shift, sigmas=sigmas, boundary=boundary, guidance=rs.guidance)


def _grid(num_steps: int, shift: float, sigmas, num_train_timesteps: int) -> list[float]:
    """The given grid (checked against num_steps), or the default one for shift and num_steps."""
    if sigmas is None:
        sigmas = make_sigmas(num_steps, shift, num_train_timesteps=num_train_timesteps)
    grid = check_sigmas(sigmas)
    if len(grid) != num_steps + 1:
        raise ValueError(
            f"sigmas has {len(grid) - 1} steps; num_steps={num_steps} needs {num_steps + 1} values"
        )
    return grid


def _check_names(d: Mapping[str, Any], names: Sequence[str], what: str) -> None:
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ValueError(f"{what}: unknown expert {unknown[0]!r}; valid names: {', '.join(names)}")
