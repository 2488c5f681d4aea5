"""Sigma grids for sampling: the shift, the release's grids, user-given grids, model timesteps.

Time convention (the one place it is stated): sigma in [0, 1]; x_sigma = (1 - sigma) * x0 +
sigma * noise; the model predicts the velocity v = noise - x0; timestep = 1000 * sigma exists
only at the model input; sampling runs sigma from 1 down to 0. A grid is a float64 tensor of
num_steps + 1 strictly descending sigmas that ends at 0; step i moves sigma[i] -> sigma[i + 1].
"""

from collections.abc import Sequence

import torch

GRIDS = ("unipc", "dpm++", "euler")


def shift_sigmas(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Warp sigmas towards 1 (shift > 1) or 0 (shift < 1); 0 and 1 stay fixed.

    Args:
        sigma: sigmas in [0, 1], any shape (or a float).
        shift: positive shift factor; 1 is the identity.
    Returns:
        shift * sigma / (1 + (shift - 1) * sigma), same shape and dtype as `sigma`.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (1 leaves sigmas unchanged); got {shift}")
    # parity: this exact operation order is the release's, so float64 grids match bit for bit.
    return shift * sigma / (1 + (shift - 1) * sigma)


def _linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """numpy.linspace in float64, computed the way numpy does (start + i * step, exact stop)."""
    # parity: the release builds its grids with numpy; torch.linspace rounds differently, and a
    # one-ulp difference can flip the truncated integer timestep.
    step = (stop - start) / (num - 1)
    grid = torch.arange(num, dtype=torch.float64) * step + start  # [num]
    grid[-1] = stop
    return grid


def make_sigmas(
    num_steps: int,
    shift: float,
    *,
    num_train_timesteps: int = 1000,
    solver: str = "unipc",
    sigmas: Sequence[float] | None = None,
) -> torch.Tensor:
    """The release's sampling grid for `num_steps` steps, shifted, ending at sigma 0.

    The release uses two slightly different grids, and we reproduce each:
    - 'unipc': linspace(1 - 1/num_train_timesteps, 0, num_steps + 1)[:-1], then shifted.
    - 'dpm++' (and 'euler', which the release does not have): linspace(1, 0, num_steps + 1)[:-1],
      then shifted; its first step starts exactly at pure noise.

    Args:
        num_steps: number of denoising steps, >= 1.
        shift: sigma shift (see `shift_sigmas`), > 0.
        num_train_timesteps: timestep scale of the model (1000 for the released models).
        solver: which release grid: one of GRIDS.
        sigmas: an explicit user grid instead (see `sigmas_from_list`); `shift` is then not
            applied, and `num_steps` must equal its number of steps.
    Returns:
        float64 tensor [num_steps + 1], strictly descending, sigmas[-1] == 0.
    """
    if sigmas is not None:
        grid = sigmas_from_list(sigmas)
        if num_steps != len(grid) - 1:
            raise ValueError(
                f"num_steps={num_steps} but the sigma list has {len(grid) - 1} steps: "
                f"pass num_steps={len(grid) - 1} or leave the list out"
            )
        return grid
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(
            f"num_train_timesteps must be an integer >= 2; got {num_train_timesteps!r}"
        )
    if solver not in GRIDS:
        raise ValueError(f"unknown solver grid {solver!r}; choose one of {list(GRIDS)}")
    if solver == "unipc":
        # parity: the release's UniPC scheduler takes its top sigma from a 1000-entry training
        # table built as 1 - linspace(1, 1/1000, 1000)[::-1], stored in float32: the grid starts
        # at float32(0.999), not 1, so the first timestep is 999.
        sigma_max = float(torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32))
    else:
        sigma_max = 1.0
    sigmas = _linspace(sigma_max, 0.0, num_steps + 1)[:-1]  # [num_steps]
    sigmas = shift_sigmas(sigmas, shift)  # [num_steps]
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # [num_steps + 1]


def sigmas_from_list(sigmas: Sequence[float]) -> torch.Tensor:
    """A user-given grid: strictly descending sigmas in (0, 1]; the final 0 is appended.

    Args:
        sigmas: one sigma per step, e.g. [1.0, 0.9, 0.6, 0.3]; the whole grid with its final 0
            ([1.0, 0.9, 0.6, 0.3, 0.0]) means the same and is accepted too.
    Returns:
        float64 tensor [num_steps + 1] ending at 0.
    """
    values = [float(s) for s in sigmas]
    if values and values[-1] == 0.0:
        values = values[:-1]  # the terminal 0, written out
    if not values:
        raise ValueError(
            f"the sigma list {list(sigmas)} has no steps; give sigmas in (0, 1], e.g. [1.0, 0.5]"
        )
    bad = [s for s in values if not 0.0 < s <= 1.0]
    if bad:
        raise ValueError(f"sigmas must lie in (0, 1]; got {bad} in {values}")
    for a, b in zip(values, values[1:], strict=False):
        if not b < a:
            raise ValueError(
                f"sigmas must be strictly descending (sampling runs from 1 to 0); got {a} then {b} in {values}"
            )
    return torch.tensor([*values, 0.0], dtype=torch.float64)  # [n + 1]


def sigmas_from_timesteps(
    timesteps: Sequence[float], *, num_train_timesteps: int = 1000
) -> torch.Tensor:
    """A user-given grid as model timesteps: strictly descending values in (0, num_train_timesteps].

    Args:
        timesteps: one timestep per step, e.g. [999, 900, 500, 100].
        num_train_timesteps: timestep scale of the model.
    Returns:
        float64 tensor [len(timesteps) + 1] of sigmas = timestep / num_train_timesteps, ending at 0.
    """
    values = [float(t) for t in timesteps]
    if values and values[-1] == 0.0:
        values = values[:-1]  # the terminal 0, written out
    bad = [t for t in values if not 0.0 < t <= num_train_timesteps]
    if bad:
        raise ValueError(f"timesteps must lie in (0, {num_train_timesteps}]; got {bad} in {values}")
    return sigmas_from_list([t / num_train_timesteps for t in values])


def timesteps_from_sigmas(sigmas: torch.Tensor, *, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The model-input timestep of each sigma: num_train_timesteps * sigma, truncated.

    Args:
        sigmas: sigmas, any shape; pass the float64 grid from `make_sigmas` for exact parity.
    Returns:
        float32 tensor of whole numbers, same shape as `sigmas`.
    """
    # parity: the release casts 1000 * sigma (float64) to int64, which truncates (873.9 -> 873).
    scaled = sigmas.to(torch.float64) * num_train_timesteps
    return scaled.to(torch.int64).to(torch.float32)


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


def grid_for(
    num_steps: int, shift: float, sigmas=None, num_train_timesteps: int = 1000
) -> list[float]:
    """The given grid (checked against num_steps), or the default one for shift and num_steps."""
    if sigmas is None:
        sigmas = make_sigmas(num_steps, shift, num_train_timesteps=num_train_timesteps)
    grid = check_sigmas(sigmas)
    if len(grid) != num_steps + 1:
        raise ValueError(
            f"sigmas has {len(grid) - 1} steps; num_steps={num_steps} needs {num_steps + 1} values"
        )
    return grid
