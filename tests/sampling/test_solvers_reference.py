"""Our grids and solvers against the release's flow-matching schedulers, run in this process.

The release's scheduler files import only numpy, torch and diffusers, so they are loaded one by
one from the installed `wan` package; the test skips when that is not possible.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from vidmoe.sampling.schedules import make_sigmas, timesteps_from_sigmas
from vidmoe.sampling.solvers import make_solver


def _load_reference(name: str):
    spec = importlib.util.find_spec("wan")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the reference package `wan` (wan22) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "utils" / f"{name}.py"
    try:
        module_spec = importlib.util.spec_from_file_location(f"_reference_{name}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure means the reference cannot run
        pytest.skip(f"cannot load reference {path}: {exc}")
    return module


def _reference(solver: str, steps: int, shift: float):
    """The release's scheduler set up exactly as its text2video pipeline does."""
    if solver == "unipc":
        ref = _load_reference("fm_solvers_unipc")
        sched = ref.FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1)
        sched.set_timesteps(steps, device="cpu", shift=shift)
        return sched, sched.timesteps
    ref = _load_reference("fm_solvers")
    sched = ref.FlowDPMSolverMultistepScheduler(num_train_timesteps=1000, shift=1)
    timesteps, _ = ref.retrieve_timesteps(
        sched, device="cpu", sigmas=ref.get_sampling_sigmas(steps, shift)
    )
    return sched, timesteps


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 14, 15, 40, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
def test_grid_and_timesteps_match_release_exactly(solver, steps, shift):
    sched, timesteps = _reference(solver, steps, shift)
    sigmas = make_sigmas(steps, shift, solver=solver)
    assert torch.equal(sigmas.float(), sched.sigmas)
    assert torch.equal(timesteps_from_sigmas(sigmas[:-1]), timesteps.float())


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize(("steps", "shift"), [(1, 5.0), (2, 5.0), (3, 12.0), (8, 3.0), (16, 8.0)])
def test_trajectory_matches_release(solver, steps, shift):
    """Same nonlinear stand-in network through both: every step within fp32 tolerance."""
    sched, timesteps = _reference(solver, steps, shift)
    sigmas = make_sigmas(steps, shift, solver=solver)
    ours = make_solver(solver, sigmas)
    w = torch.randn(4, 4) * 0.5
    x_ref = x = torch.randn(1, 4, 2, 3, 3)

    def net(x, t):
        return torch.tanh(torch.einsum("oc,bcfhw->bofhw", w, x)) + 0.5 * torch.sin(t / 1000)

    for i, t in enumerate(timesteps):
        x_ref = sched.step(net(x_ref, t), t, x_ref, return_dict=False)[0]
        x = ours.step(net(x, timesteps_from_sigmas(sigmas[i])), x, i)
        torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-5)
