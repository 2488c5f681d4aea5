"""The boundary between experts as a typed value, parsed once from what a user gives.

Forms: `Release()` (the checkpoint's boundaries), `Sigma(0.6)`, `SNR()`, `Steps(8)` (the first 8
steps to the noisiest expert), `Budgets({...})` (steps per expert, which fix every boundary) and
`Calibrated(losses)` (the crossover of measured per-expert losses, read from a loss-table JSON
file `{expert: {"sigmas": [...], "losses": [...]}}`). `boundaries_for` places one on a sigma
grid: the SNR criterion, the step splits and the loss crossovers are here too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidmoe.config import EXPERT_NAMES_2, MoEConfig
from vidmoe.sampling.schedules import check_sigmas, grid_for, shift_sigmas

BOUNDARY_MODES = ("release", "snr", "steps:N", "calibrated:PATH", "a sigma in (0, 1)")
LossTable = tuple[Sequence[float], Sequence[float]]  # (sigmas, losses) measured for one expert


@dataclass(frozen=True)
class Release:
    """The checkpoint's boundaries (the model config's `moe.boundaries`)."""

    @property
    def spec(self) -> str:
        return "release"


@dataclass(frozen=True)
class Sigma:
    """One boundary at this sigma (two-expert models)."""

    value: float

    @property
    def spec(self) -> float:
        return self.value


@dataclass(frozen=True)
class SNR:
    """The Wan2.2 SNR criterion for the run's grid (see `snr_boundary`)."""

    @property
    def spec(self) -> str:
        return "snr"


@dataclass(frozen=True)
class Steps:
    """The first `n` steps go to the noisiest expert (two-expert models)."""

    n: int

    @property
    def spec(self) -> str:
        return f"steps:{self.n}"


@dataclass(frozen=True)
class Budgets:
    """Exactly this many steps per expert, every expert named; the steps add up to the run."""

    steps: Mapping[str, int]

    @property
    def spec(self) -> str:
        return "budgets"


@dataclass(frozen=True)
class Calibrated:
    """Boundaries at the crossovers of measured loss-vs-sigma tables of neighbouring experts."""

    losses: Mapping[str, LossTable] = field(compare=False)
    path: str | None = None
    """The loss-table file the tables were read from, if any."""

    @property
    def spec(self) -> str:
        return f"calibrated:{self.path}" if self.path else "calibrated"


Boundary = Release | Sigma | SNR | Steps | Budgets | Calibrated
BOUNDARY_TYPES = (Release, Sigma, SNR, Steps, Budgets, Calibrated)


def kind_of(value) -> str:
    """'a string', 'a list', ...: the type of a user's value, for error messages."""
    names = {str: "a string", bool: "a boolean", list: "a list", tuple: "a list", dict: "a dict"}
    return names.get(type(value), f"a {type(value).__name__}")


def parse_boundary(value, *, read_files: bool = True) -> Boundary:
    """A typed boundary from None, a number, a mode string or a typed value.

    Args:
        value: None (release), a sigma in (0, 1), 'release', 'snr', 'steps:N' (N >= 1),
            'calibrated:PATH', or one of the typed values.
        read_files: whether 'calibrated:PATH' may read a file (a server sets False).
    Raises:
        ValueError naming the value and the accepted forms.
    """
    if value is None:
        return Release()
    if isinstance(value, BOUNDARY_TYPES):
        return value
    accepted = f"boundary must be one of {', '.join(BOUNDARY_MODES)}"
    if isinstance(value, str):
        text = value.strip()
        if text in ("release", "snr"):
            return Release() if text == "release" else SNR()
        if text.startswith("steps:"):
            n = text.removeprefix("steps:")
            if not n.isdigit() or int(n) < 1:
                raise ValueError(
                    f"boundary {value!r}: N must be an integer >= 1 (the first N steps go to the "
                    f"noisiest expert); got {n or 'nothing'}: use e.g. steps:2"
                )
            return Steps(int(n))
        if text == "calibrated" or text.startswith("calibrated:"):
            return _calibrated(text.removeprefix("calibrated").removeprefix(":"), read_files)
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{accepted}; got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{accepted}; got {value!r} ({kind_of(value)})")
    value = float(value)
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise ValueError(
            f"boundary must lie in (0, 1) (a sigma; the noisiest expert runs every step with "
            f"sigma >= it); got {value!r}"
        )
    return Sigma(value)


def _calibrated(path: str, read_files: bool) -> Calibrated:
    if not path:
        raise ValueError(
            "boundary 'calibrated' needs the loss tables it reads: give calibrated:PATH, a JSON "
            'file {expert: {"sigmas": [...], "losses": [...]}} (docs/settings.md says how to '
            "make one)"
        )
    if not read_files:
        raise ValueError(
            f"boundary {'calibrated:' + path!r} reads a file, which this server does not allow: "
            "use release, snr, steps:N or a sigma"
        )
    return Calibrated(losses=read_loss_tables(path), path=path)


def read_loss_tables(path: str | Path) -> dict[str, LossTable]:
    """Read `{expert: {"sigmas": [...], "losses": [...]}}`; ValueError saying what is wrong."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"loss-table file {str(path)!r} cannot be read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"loss-table file {str(path)!r} is not JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f'loss-table file {str(path)!r} must hold {{expert: {{"sigmas": [...], '
            f'"losses": [...]}}}}; got {kind_of(data)}'
        )
    tables = {}
    for name, table in data.items():
        where = f"loss-table file {str(path)!r}, expert {name!r}"
        if not isinstance(table, dict) or set(table) != {"sigmas", "losses"}:
            raise ValueError(f'{where}: needs exactly the keys "sigmas" and "losses"')
        columns = []
        for key in ("sigmas", "losses"):
            xs = table[key]
            if not isinstance(xs, list) or not all(_finite(x) for x in xs):
                raise ValueError(f"{where}: {key} must be a list of finite numbers")
            columns.append([float(x) for x in xs])
        sigmas, losses = columns
        if len(sigmas) != len(losses) or len(sigmas) < 2:
            raise ValueError(f"{where}: needs equal-length sigmas and losses, at least 2 points")
        if not all(0.0 <= s <= 1.0 for s in sigmas):
            raise ValueError(f"{where}: sigmas must lie in [0, 1]")
        tables[name] = (sigmas, losses)
    return tables


def write_loss_tables(tables: Mapping[str, LossTable], path: str | Path) -> Path:
    """Write loss tables (e.g. from `training.objective.loss_table`) for `calibrated:PATH`."""
    data = {
        name: {"sigmas": [float(s) for s in xs], "losses": [float(v) for v in ys]}
        for name, (xs, ys) in tables.items()
    }
    path = Path(path)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


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
    check_expert_names(losses, names, "loss tables")
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
    grid = grid_for(num_steps, shift, sigmas, num_train_timesteps)
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
    check_expert_names(budgets, names, "step budgets")
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


def boundaries_for(
    boundary: Boundary,
    moe: MoEConfig,
    grid: Sequence[float],
    *,
    shift: float,
    num_train_timesteps: int = 1000,
) -> tuple[float, ...]:
    """Every boundary of `moe` for this typed boundary on this grid, noisiest first."""
    if isinstance(boundary, Budgets):
        return boundaries_from_budgets(boundary.steps, grid, moe.expert_names)
    if isinstance(boundary, Release):
        return tuple(moe.boundaries)
    if isinstance(boundary, Calibrated):
        return calibrated_boundaries(boundary.losses, moe.expert_names)
    if len(moe.expert_names) != 2:
        raise ValueError(
            f"boundary {boundary.spec!r} places one boundary; this model has "
            f"{len(moe.expert_names)} experts: use 'release', 'calibrated' or step budgets"
        )
    return (
        resolve_boundary(
            boundary,
            release=moe.boundaries[0],
            shift=shift,
            num_steps=len(grid) - 1,
            sigmas=grid,
            expert_names=moe.expert_names,
            num_train_timesteps=num_train_timesteps,
        ),
    )


def check_expert_names(d: Mapping[str, Any], names: Sequence[str], what: str) -> None:
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ValueError(f"{what}: unknown expert {unknown[0]!r}; valid names: {', '.join(names)}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
