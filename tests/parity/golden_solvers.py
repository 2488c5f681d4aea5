"""Golden checks for the UniPC and DPM++ solvers driven by a fixed stand-in network.

The golden run: v = einsum('oc,bcfhw->bofhw', W, x) + 0.5 * sin(t / 1000), t the release's
integer timestep, on the release's grid for `steps` and `shift`; every step is compared.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file

from vidmoe.sampling.schedules import make_sigmas, timesteps_from_sigmas
from vidmoe.sampling.solvers import make_solver

RTOL = 1e-4


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def _check(path: Path, meta: dict, solver: str) -> None:
    golden = load_file(str(path))
    steps, shift = int(meta["steps"]), float(meta["shift"])
    sigmas = make_sigmas(steps, shift, solver=solver)
    timesteps = timesteps_from_sigmas(sigmas[:-1])  # [steps]
    assert torch.equal(timesteps, golden["timesteps"].float()), (
        f"{path.name}: timesteps {timesteps.tolist()} != {golden['timesteps'].tolist()}"
    )
    w, trajectory = golden["W"], golden["trajectory"]
    sampler = make_solver(solver, sigmas)
    x = trajectory[0]  # [B, C, F, H, W]
    for i, t in enumerate(timesteps):
        v = torch.einsum("oc,bcfhw->bofhw", w, x) + 0.5 * torch.sin(t / 1000)
        err_v = _rel_err(v, golden["model_outputs"][i])
        assert err_v <= RTOL, f"{path.name}: model output {i} rel err {err_v:.2e}"
        x = sampler.step(v, x, i)
        err = _rel_err(x, trajectory[i + 1])
        assert err <= RTOL, f"{path.name}: trajectory step {i} rel err {err:.2e} > {RTOL}"


CHECKS = {
    "solver_unipc": lambda path, meta: _check(path, meta, "unipc"),
    "solver_dpmpp": lambda path, meta: _check(path, meta, "dpm++"),
}
