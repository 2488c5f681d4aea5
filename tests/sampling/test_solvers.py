"""Sigma grids and solvers: exactness on straight lines, convergence, the shift, input checks."""

import pytest
import torch

from vidmoe.sampling.schedules import (
    GRIDS,
    make_sigmas,
    shift_sigmas,
    sigmas_from_list,
    sigmas_from_timesteps,
    timesteps_from_sigmas,
)
from vidmoe.sampling.solvers import SOLVERS, make_solver

SHAPE = (2, 4, 3, 4, 4)  # B, C, F, H, W


def _sample(name, sigmas, velocity_fn, noise):
    """Run a whole trajectory from pure noise (x at sigmas[0] is taken as on the path)."""
    solver = make_solver(name, sigmas)
    x = noise
    for i in range(len(sigmas) - 1):
        x = solver.step(velocity_fn(x, sigmas[i].item()), x, i)
    return x


@pytest.mark.parametrize("steps", [1, 2, 5, 20])
@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_straight_line_oracle_recovers_x0(name, steps):
    """With the exact velocity noise - x0 every solver lands on x0 (Euler exactly)."""
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    sigmas = make_sigmas(steps, 5.0, solver="euler" if name == "euler" else name)
    start = (1 - sigmas[0].item()) * x0 + sigmas[0].item() * noise  # on the line at sigmas[0]
    solver = make_solver(name, sigmas)
    x = start
    for i in range(steps):
        x = solver.step(noise - x0, x, i)
        s = sigmas[i + 1].item()
        torch.testing.assert_close(x, (1 - s) * x0 + s * noise, rtol=1e-5, atol=1e-5)
    if name == "euler":
        assert torch.allclose(x, x0, rtol=0, atol=1e-6)


def _gaussian_velocity(mean, std):
    """Exact velocity field for data x0 ~ N(mean, std^2); its ODE maps noise n to mean + std*n."""

    def velocity(x, sigma):
        var = (1 - sigma) ** 2 * std**2 + sigma**2
        centred = x - (1 - sigma) * mean
        e_noise = sigma / var * centred
        e_x0 = mean + (1 - sigma) * std**2 / var * centred
        return e_noise - e_x0

    return velocity


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_converge_on_gaussian_oracle(name):
    """Error to the exact ODE endpoint shrinks as steps grow; faster for the second-order ones."""
    torch.manual_seed(0)
    noise = torch.randn(SHAPE, dtype=torch.float64)
    mean, std = 0.7, 0.3
    exact = mean + std * noise
    errors = []
    for steps in (5, 10, 20, 40):
        sigmas = make_sigmas(steps, 3.0, solver="dpm++")  # starts at sigma 1: x = noise exactly
        out = _sample(name, sigmas, _gaussian_velocity(mean, std), noise)
        errors.append((out - exact).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    # 5 -> 40 steps: first order gains about 8x at best, second order about 60x.
    assert errors[-1] < errors[0] / (4 if name == "euler" else 30), errors


def test_multistep_solvers_beat_euler():
    """At equal steps the second-order solvers are far closer to the exact endpoint than Euler."""
    noise = torch.randn(SHAPE, dtype=torch.float64)
    exact = 0.7 + 0.3 * noise
    sigmas = make_sigmas(40, 3.0, solver="dpm++")
    err = {
        name: (_sample(name, sigmas, _gaussian_velocity(0.7, 0.3), noise) - exact).abs().max()
        for name in SOLVERS
    }
    assert err["unipc"] < 0.2 * err["euler"], err
    assert err["dpm++"] < 0.5 * err["euler"], err


def test_reset_gives_identical_rerun_and_steps_must_be_consecutive():
    sigmas = make_sigmas(6, 5.0)
    solver = make_solver("unipc", sigmas)
    velocity = _gaussian_velocity(0.2, 0.5)
    noise = torch.randn(SHAPE)

    def run():
        x = noise
        for i in range(6):
            x = solver.step(velocity(x, sigmas[i].item()), x, i)
        return x

    first = run()
    with pytest.raises(ValueError, match="one at a time"):
        solver.step(noise, noise, 2)
    solver.reset()
    assert torch.equal(run(), first)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        make_solver("dpm++", sigmas).step(noise, noise, 6)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_a_trajectory_continues_bit_identically_in_a_fresh_solver(name):
    """get_state/set_state hand a trajectory to another solver (an expert group's)."""
    sigmas = make_sigmas(6, 5.0)
    velocity = _gaussian_velocity(0.2, 0.5)
    noise = torch.randn(SHAPE)
    whole = _sample(name, sigmas, velocity, noise)

    def steps(solver, x, start, stop):
        for i in range(start, stop):
            x = solver.step(velocity(x, sigmas[i].item()), x, i)
        return x

    first = make_solver(name, sigmas)
    half = steps(first, noise, 0, 3)
    second = make_solver(name, sigmas)
    second.set_state(first.get_state())
    assert torch.equal(steps(second, half, 3, 6), whole)
    bare = steps(make_solver(name, sigmas), half, 3, 6)  # without the history
    assert torch.equal(bare, whole) == (name == "euler")  # only Euler keeps none


def test_solver_keeps_dtype():
    sigmas = make_sigmas(4, 5.0)
    x = torch.randn(SHAPE, dtype=torch.bfloat16)
    for name in SOLVERS:
        assert make_solver(name, sigmas).step(x, x, 0).dtype == torch.bfloat16


def test_shift_is_monotone_and_fixes_endpoints():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.3, 1.0, 3.0, 12.0):
        out = shift_sigmas(s, shift)
        assert out[0] == 0 and abs(out[-1].item() - 1) < 1e-12
        assert bool((out[1:] > out[:-1]).all())
    assert torch.equal(shift_sigmas(s, 1.0), s)
    assert bool((shift_sigmas(s, 5.0)[1:-1] > s[1:-1]).all())  # shift > 1 adds noise
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_sigmas(s, 0.0)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("steps", [1, 7, 40])
def test_make_sigmas_endpoints_and_length(grid, steps):
    sigmas = make_sigmas(steps, 5.0, solver=grid)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float64
    assert sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    if grid == "unipc":  # the release's UniPC grid starts one training step below pure noise
        assert timesteps_from_sigmas(sigmas[:1]).item() == 999 and sigmas[0] < 1
    else:
        assert sigmas[0] == 1 and timesteps_from_sigmas(sigmas[:1]).item() == 1000


def test_timesteps_truncate_like_the_release():
    t = timesteps_from_sigmas(torch.tensor([0.8739, 0.5, 0.0019], dtype=torch.float64))
    assert t.tolist() == [873.0, 500.0, 1.0] and t.dtype == torch.float32


def test_user_grids():
    sigmas = sigmas_from_list([1.0, 0.75, 0.25])
    assert sigmas.tolist() == [1.0, 0.75, 0.25, 0.0]
    assert torch.equal(sigmas_from_timesteps([1000, 750, 250]), sigmas)
    assert torch.equal(sigmas_from_list([1.0, 0.75, 0.25, 0.0]), sigmas)  # final 0 written out
    assert torch.equal(make_sigmas(3, 5.0, sigmas=[1.0, 0.75, 0.25]), sigmas)  # shift not applied
    with pytest.raises(ValueError, match="num_steps=4"):
        make_sigmas(4, 5.0, sigmas=[1.0, 0.75, 0.25])


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([], "no steps"),
        ([1.0, 0.5, 0.5], "strictly descending"),
        ([0.5, 0.9], "strictly descending"),
        ([1.2, 0.5], r"\(0, 1\]"),
        ([0.9, -0.1], r"\(0, 1\]"),
        ([0.0], "no steps"),
        ([0.9, 0.0, 0.0], r"\(0, 1\]"),
    ],
)
def test_user_sigmas_invalid(values, match):
    with pytest.raises(ValueError, match=match):
        sigmas_from_list(values)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match=r"\(0, 1000\]"):
        sigmas_from_timesteps([1200, 500])
    with pytest.raises(ValueError, match="num_steps"):
        make_sigmas(0, 5.0)
    with pytest.raises(ValueError, match="shift"):
        make_sigmas(10, -1.0)
    with pytest.raises(ValueError, match="unknown solver grid"):
        make_sigmas(10, 5.0, solver="ddim")
    with pytest.raises(ValueError, match=r"'dpm\+\+', 'euler', 'unipc'"):
        make_solver("heun", make_sigmas(10, 5.0))
    with pytest.raises(ValueError, match="descend"):
        make_solver("euler", torch.tensor([0.5, 0.9, 0.0]))
    with pytest.raises(ValueError, match="1-D"):
        make_solver("euler", torch.tensor([1.0]))
