"""The phase plan of a MoE sampler: which expert(s) run at each step, with what blend weight and
guidance scale, built from a sigma grid and a typed boundary.

The boundary comes typed (`sampling.boundary`): `Release`, `Sigma`, `SNR` (the Wan2.2 criterion
for the actual grid), `Steps` (the first N steps to the noisiest expert), `Budgets` (steps per
expert, which fix every boundary) or `Calibrated` (the crossover of measured per-expert losses).
`plan_for(settings, config)` is the plan of validated settings: built once, printed before
sampling, and written into the run's JSON trace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from vidmoe.config import ModelConfig, MoEConfig
from vidmoe.models.moe import Router
from vidmoe.sampling.boundary import (
    Boundary,
    Budgets,
    Release,
    Sigma,
    boundaries_for,
    check_expert_names,
    parse_boundary,
)
from vidmoe.sampling.schedules import (
    check_sigmas,
    grid_for,
    make_sigmas,
    sigmas_from_list,
    timesteps_from_sigmas,
)
from vidmoe.sampling.solvers import Solver, make_solver

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
            rows.append(
                (
                    str(i + 1),
                    f"{first.index}-{last.index} ({len(ph)})",
                    f"{first.sigma:.4f} -> {last.sigma_next:.4f}",
                    "+".join(first.experts) + blend,
                    "/".join(f"{g:g}" for g in first.guidance),
                    " ".join(f"{n}={v:g}" for n, v in first.adapter_scales.items()),
                )
            )
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


def merge_guidance(moe: MoEConfig, guidance: Mapping[str, float] | None) -> MoEConfig:
    """Return `moe` with per-expert guidance overrides merged over its scales."""
    if not guidance:
        return moe
    check_expert_names(guidance, moe.expert_names, "guidance")
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
        steps.append(
            StepPlan(
                index=i,
                sigma=sigma,
                sigma_next=sigma_next,
                timestep=num_train_timesteps * sigma,
                experts=names,
                weights=weights,
                guidance=tuple(scale[n] for n in names),
            )
        )
    return Plan(steps=tuple(steps), expert_names=moe.expert_names)


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
    grid = grid_for(num_steps, shift, sigmas, num_train_timesteps)
    bounds = boundaries_for(
        boundary, moe, grid, shift=shift, num_train_timesteps=num_train_timesteps
    )
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


def solver_for(plan: Plan, sampler: str) -> Solver:
    """A fresh solver of `sampler` on the plan's sigma grid."""
    sigmas = torch.tensor(
        [st.sigma for st in plan.steps] + [plan.steps[-1].sigma_next], dtype=torch.float64
    )
    return make_solver(sampler, sigmas)


def model_sigma(sigma: float, sampler: str) -> float:
    """The noise level the expert is told at a step."""
    if sampler in ("unipc", "dpm++"):
        # parity: the release's solvers hand the model int(1000 * sigma) (truncated)
        return float(timesteps_from_sigmas(torch.tensor([sigma], dtype=torch.float64))[0]) / 1000
    return sigma  # euler, as diffusers: timestep = 1000 * sigma exactly


def trace_row(st: StepPlan, seconds: float, cached: list[str], changes: dict) -> dict:
    """The trace's row of a step that ran: what the plan said, and how long it took."""
    row = dict(
        index=st.index,
        sigma=st.sigma,
        experts=list(st.experts),
        weights=list(st.weights),
        guidance=list(st.guidance),
        seconds=round(seconds, 4),
    )
    if st.adapter_scales:
        row["adapters"] = dict(st.adapter_scales)
    if changes:  # the step cache's measure per expert, for calibrating its threshold
        row["cache_change"] = changes
    if cached:
        row["cached"] = cached  # experts whose blocks after the first came from the step cache
    return row
