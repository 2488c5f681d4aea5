"""The boundary between experts as a typed value, parsed once from what a user gives.

Forms: `Release()` (the checkpoint's boundaries), `Sigma(0.6)`, `SNR()`, `Steps(8)` (the first 8
steps to the noisiest expert), `Budgets({...})` (steps per expert, which fix every boundary) and
`Calibrated(losses)` (the crossover of measured per-expert losses, read from a loss-table JSON
file `{expert: {"sigmas": [...], "losses": [...]}}`). `plan.make_plan` places them on a grid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
    """The Wan2.2 SNR criterion for the run's grid (see `plan.snr_boundary`)."""

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


def _kind(value) -> str:
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
        raise ValueError(f"{accepted}; got {value!r} ({_kind(value)})")
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
            'file {expert: {"sigmas": [...], "losses": [...]}} (see write_loss_tables)'
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
            f'"losses": [...]}}}}; got {_kind(data)}'
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


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
