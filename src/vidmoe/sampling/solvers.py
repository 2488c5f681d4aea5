"""ODE solvers that move a latent along a sigma grid, given the model's velocity at each step.

One interface: `solver.step(velocity, x, i)` moves x from sigmas[i] to sigmas[i + 1]. Euler is
stateless; UniPC (bh2) and DPM-Solver++ (2M) are multistep and keep a short history of x0
predictions, cleared by `reset()`. Both reproduce the release's flow-matching schedulers with
the settings its pipelines use. Conventions of `vidmoe.sampling.schedules`.
"""

import math

import torch


def _lambda(sigma: float) -> float:
    """Half log-SNR of a noise level: log((1 - sigma) / sigma); -inf at pure noise, +inf at 0."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log(1.0 - sigma) - math.log(sigma)


class Solver:
    """Moves x down a sigma grid one step at a time; subclasses implement `_update`."""

    def __init__(self, sigmas: torch.Tensor):
        sigmas = torch.as_tensor(sigmas)
        if sigmas.ndim != 1 or len(sigmas) < 2:
            raise ValueError(
                f"sigmas must be a 1-D grid of num_steps + 1 values; got shape {tuple(sigmas.shape)}"
            )
        if not bool((sigmas[1:] < sigmas[:-1]).all()) or sigmas[0] > 1 or sigmas[-1] < 0:
            raise ValueError(f"sigmas must descend strictly within [0, 1]; got {sigmas.tolist()}")
        # parity: the release keeps its grid in float32; near sigma = 1 that rounding visibly
        # changes alpha = 1 - sigma, so the step coefficients are computed from the rounded values.
        self.sigmas = [float(s) for s in sigmas.to(torch.float32)]
        self.lambdas = [_lambda(s) for s in self.sigmas]
        self.num_steps = len(self.sigmas) - 1
        self.reset()

    def reset(self) -> None:
        """Forget the history so that the solver can start a new trajectory."""
        self._x0_preds: list[torch.Tensor] = []  # newest last
        self._next_index: int | None = None

    def get_state(self) -> dict:
        """The history the next step needs, to go on with this trajectory elsewhere (another
        process holds the next expert): tensors, ints and None, in a plain dict."""
        return {"x0_preds": list(self._x0_preds), "next_index": self._next_index}

    def set_state(self, state: dict) -> None:
        """Continue the trajectory `get_state` took (on a solver of the same grid)."""
        self._x0_preds, self._next_index = list(state["x0_preds"]), state["next_index"]

    def step(self, velocity: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """Move x from sigmas[i] to sigmas[i + 1].

        Args:
            velocity: the model's (guided) velocity at (x, sigmas[i]), same shape as x.
            x: the current latent [B, C, F, H, W] (any shape).
            i: the step index, 0 <= i < num_steps; consecutive after the first call.
        Returns:
            x at sigmas[i + 1], same shape and dtype as x.
        """
        if not 0 <= i < self.num_steps:
            raise ValueError(f"step index must be in [0, {self.num_steps}); got {i}")
        if self._next_index is not None and i != self._next_index:
            raise ValueError(
                f"step index must advance one at a time: expected {self._next_index}, got {i}; "
                "call reset() to start a new trajectory"
            )
        self._next_index = i + 1
        dtype = torch.promote_types(x.dtype, torch.float32)  # parity: the release steps in fp32
        x_next = self._update(velocity.to(dtype), x.to(dtype), i)
        return x_next.to(x.dtype)

    def _remember(self, x0: torch.Tensor) -> None:
        """Keep an x0 prediction; the last two suffice for order 2."""
        self._x0_preds = [*self._x0_preds[-1:], x0]

    def _update(self, velocity: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError


class EulerSolver(Solver):
    """First-order step along the velocity: x + (sigma_next - sigma) * v."""

    def _update(self, velocity, x, i):
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * velocity


class DPMSolverPlusPlus(Solver):
    """DPM-Solver++ 2M (midpoint) on x0 predictions, as the release's flow scheduler by default."""

    def _update(self, velocity, x, i):
        m0 = x - self.sigmas[i] * velocity  # the x0 prediction
        self._remember(m0)
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        h = self.lambdas[i + 1] - self.lambdas[i]
        # exp(-h) - 1 is the first-order (DDIM) weight; 0 - 1 when stepping from/to an endpoint.
        phi = math.expm1(-h)
        x_t = (sigma_t / sigma_s) * x - (1.0 - sigma_t) * phi * m0
        # parity: first order on the first step (no history) and on the last (final sigma 0).
        if len(self._x0_preds) < 2 or i == self.num_steps - 1:
            return x_t
        m1 = self._x0_preds[-2]
        r0 = (self.lambdas[i] - self.lambdas[i - 1]) / h
        return x_t - 0.5 * (1.0 - sigma_t) * phi * (m0 - m1) / r0


class UniPCSolver(Solver):
    """UniPC multistep (bh2, order 2, on x0 predictions): a UniC corrector, then a UniP step."""

    def reset(self) -> None:
        super().reset()
        self._last_x: torch.Tensor | None = None
        self._last_order = 0

    def get_state(self) -> dict:
        return {**super().get_state(), "last_x": self._last_x, "last_order": self._last_order}

    def set_state(self, state: dict) -> None:
        super().set_state(state)
        self._last_x, self._last_order = state["last_x"], state["last_order"]

    def _coefficients(self, s: int, t: int) -> tuple[float, float, float]:
        """For a step sigmas[s] -> sigmas[t]: h = lambda_t - lambda_s, e^-h - 1, and B(h)."""
        h = self.lambdas[t] - self.lambdas[s]
        phi_1 = math.expm1(-h)
        return h, phi_1, phi_1  # bh2: B(h) = e^-h - 1 too

    def _correct(self, m_t: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        """UniC: redo the step sigmas[i-1] -> sigmas[i] from the stored x with the new m_t."""
        m0 = self._x0_preds[-1]
        h, phi_1, b_h = self._coefficients(i - 1, i)
        sigma_t, sigma_s = self.sigmas[i], self.sigmas[i - 1]
        x_t = (sigma_t / sigma_s) * self._last_x - (1.0 - sigma_t) * phi_1 * m0
        if self._last_order == 1:
            rho_prev, rho_t = 0.0, 0.5
            d1 = 0.0
        else:
            hh = -h
            # b_k = k! * h_phi_k / B(h), the UniPC order conditions; solved for two unknowns.
            h_phi_1 = phi_1 / hh - 1.0
            h_phi_2 = h_phi_1 / hh - 0.5
            b1, b2 = h_phi_1 / b_h, 2.0 * h_phi_2 / b_h
            rk = (self.lambdas[i - 2] - self.lambdas[i - 1]) / h
            rho_prev = (b1 - b2) / (1.0 - rk)
            rho_t = b1 - rho_prev
            d1 = (self._x0_preds[-2] - m0) / rk
        return x_t - (1.0 - sigma_t) * b_h * (rho_prev * d1 + rho_t * (m_t - m0))

    def _update(self, velocity, x, i):
        m_t = x - self.sigmas[i] * velocity  # the x0 prediction, from the uncorrected x
        if self._last_x is not None:
            x = self._correct(m_t, x, i)
        self._remember(m_t)
        # parity: lower_order_final: order 1 on the last step; warm-up: order 1 on the first.
        order = min(2, self.num_steps - i, len(self._x0_preds))
        self._last_x, self._last_order = x, order
        sigma_t, sigma_s = self.sigmas[i + 1], self.sigmas[i]
        h, phi_1, b_h = self._coefficients(i, i + 1)
        x_t = (sigma_t / sigma_s) * x - (1.0 - sigma_t) * phi_1 * m_t
        if order == 1:
            return x_t
        rk = (self.lambdas[i - 1] - self.lambdas[i]) / h
        d1 = (self._x0_preds[-2] - m_t) / rk
        # parity: for order 2 the release fixes the predictor weight at 0.5.
        return x_t - (1.0 - sigma_t) * b_h * 0.5 * d1


SOLVERS = {"euler": EulerSolver, "unipc": UniPCSolver, "dpm++": DPMSolverPlusPlus}


def make_solver(name: str, sigmas: torch.Tensor) -> Solver:
    """A fresh solver by name ('euler', 'unipc' or 'dpm++') for a grid from `schedules`."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name](sigmas)
