"""A learned few-step solver: steps and multistep coefficients fitted by gradient descent to one denoiser.

In the spirit of Bespoke Non-Stationary solvers (Shaul et al. 2024, "BNS"): with n denoiser
evaluations, every deterministic solver's iterate is a linear combination of the starting point and the
denoiser outputs so far, with coefficients that depend only on the step. So the family

    x_{i+1} = a_i x_i + sum_{j <= i} b_ij D_j,   D_j = D(x_j; sigma_j),   x0 = sum_j b_{n-1,j} D_j

(a_i, b_ij free, one set per step: "non-stationary") holds every n-NFE multistep solver, and fitting
its coefficients and its sigmas to a fine reference solution from many noises gives the best one for
this denoiser. The steps are learned jointly, as LD3 (Tong et al. 2025) learns them by back-propagating
through the solver, and the coefficients are written relative to DPM-Solver++(2M) (Lu et al. 2022b,
Alg. 2) on the same steps, as DPM-Solver-v3 (Zheng et al. 2023) and AMED (Zhou et al. 2024) correct an
exponential integrator:

    a_i = (sigma_{i+1} / sigma_i) e^{alpha_i},   b_ij = (1 - sigma_{i+1} / sigma_i) (w_ij + omega_ij)

with w the 2M weights (1 + r/2 on D_i, -r/2 on D_{i-1}, r the ratio of log-sigma steps). At
alpha = omega = 0 the solver *is* ``dpmpp_2m`` on its steps, so training starts from the closed-form
solver and, by early stopping on held-out noise, can only improve on it there. The loss is the endpoint
RMSE against :func:`~difflab.sampling.optimize.reference_solution`, minimised with Adam in float64 through
the denoiser (autograd; exact for the Gaussian mixture, and it works as well for a network).

A fitted solver is a small JSON-serialisable object; it is not in ``SOLVERS``, since it needs its state.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.evaluation import rmse
from difflab.sampling.optimize import (
    _logits_from_sigmas, _read_cache, _sigmas_from_logits, _write_cache, candidate_schedules, default_cache_path,
    fingerprint, reference_solution,
)
from difflab.sampling.schedules import _check
from difflab.sampling.solvers import dpmpp_2m


def _integrate(denoiser, x: torch.Tensor, sigmas: Sequence, a: Sequence, b: Sequence, cond: dict, callback=None):
    """The non-stationary multistep update; coefficients are floats, or 0-d tensors when training."""
    n = len(sigmas) - 1
    dtype = torch.promote_types(x.dtype, torch.float32)
    denoised: list[torch.Tensor] = []
    for i in range(n):
        sigma = torch.as_tensor(sigmas[i], dtype=dtype, device=x.device).expand(x.shape[0])
        denoised.append(denoiser(x, sigma, **cond))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": float(sigmas[i]), "sigma_next": float(sigmas[i + 1]),
                      "denoised": denoised[-1]})
        update = sum(b_ij * d_j for b_ij, d_j in zip(b[i], denoised))
        x = update if i == n - 1 else a[i] * x + update  # the last step lands on sigma = 0
    return x


@dataclass
class BespokeSolver:
    """A fitted non-stationary multistep solver with ``nfe`` evaluations (see the module docstring).

    ``sigmas``: the nfe evaluation sigmas, then 0. ``a``: the nfe - 1 weights on x_i. ``b``: row i holds
    the weights of D_0..D_i; the last row is the returned estimate. ``info``: how it was fitted.
    """

    sigmas: list[float]
    a: list[float]
    b: list[list[float]]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.sigmas) - 1
        if n < 1 or self.sigmas[-1] != 0 or any(s <= 0 for s in self.sigmas[:-1]):
            raise ValueError("sigmas must be positive evaluation sigmas followed by a final 0")
        if len(self.a) != n - 1 or [len(row) for row in self.b] != list(range(1, n + 1)):
            raise ValueError(f"{n} evaluations need {n - 1} values in a and rows of 1..{n} values in b")

    @property
    def nfe(self) -> int:
        return len(self.sigmas) - 1

    def __call__(self, denoiser: Callable, x: torch.Tensor, sigmas=None, *, generator=None, callback=None, **cond):
        """Solve from ``x`` (already scaled by ``self.sigmas[0]``) to sigma = 0 with ``nfe`` denoiser calls.

        The solver contract's ``sigmas`` may be passed, but must be this solver's own: the coefficients
        belong to them. ``generator`` is ignored (the solver is deterministic).
        """
        if sigmas is not None:
            given = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
            if given.shape != (len(self.sigmas),) or not torch.allclose(given, torch.tensor(self.sigmas), rtol=1e-9):
                raise ValueError("a bespoke solver runs on the sigmas it was fitted to; pass sigmas=None")
        return _integrate(denoiser, x, self.sigmas, self.a, self.b, cond, callback)

    @classmethod
    def from_sigmas(cls, sigmas: torch.Tensor) -> BespokeSolver:
        """The untrained solver on ``sigmas`` (positive, decreasing, then 0): exactly ``dpmpp_2m`` on them."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        n = len(s) - 1
        a, b = _corrected_dpmpp_2m(s, torch.zeros(max(n - 1, 0), dtype=torch.float64), torch.zeros(n, n))
        return cls(s.tolist(), *_floats(a, b), {"initialisation": "dpmpp_2m"})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BespokeSolver:
        return cls(list(data["sigmas"]), list(data["a"]), [list(row) for row in data["b"]], dict(data.get("info", {})))


def _corrected_dpmpp_2m(sigmas: torch.Tensor, alpha, omega) -> tuple[list, list]:
    """a_i, b_ij: DPM-Solver++(2M) on ``sigmas`` (last 0) with the corrections alpha (n - 1), omega (n, n)."""
    n = len(sigmas) - 1
    a, b = [], []
    for i in range(n - 1):
        ratio = sigmas[i + 1] / sigmas[i]
        w = [0.0] * i + [1.0]
        if i > 0:  # 2M: D extrapolated to the middle of the step from D_{i-1}, D_i (Lu et al. 2022b, Alg. 2)
            r = torch.log(sigmas[i] / sigmas[i + 1]) / torch.log(sigmas[i - 1] / sigmas[i])
            w[i], w[i - 1] = 1 + r / 2, -r / 2
        a.append(ratio * torch.exp(alpha[i]))
        b.append([(1 - ratio) * (w[j] + omega[i, j]) for j in range(i + 1)])
    # the step into 0 returns D_{n-1} (the Tweedie step, as every difflab solver), plus a learned correction
    b.append([float(j == n - 1) + omega[n - 1, j] for j in range(n)])
    return a, b


def _floats(a: list, b: list) -> tuple[list[float], list[list[float]]]:
    return [float(v) for v in a], [[float(v) for v in row] for row in b]


class _Parameters(torch.nn.Module):
    """The trainable form: step logits (as :func:`~difflab.sampling.optimize.optimized` uses) and the
    corrections alpha, omega to DPM-Solver++(2M) on those steps; zero corrections are ``dpmpp_2m``."""

    def __init__(self, sigmas: torch.Tensor, sigma_min: float, sigma_max: float):
        super().__init__()
        n = len(sigmas) - 1
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        start = torch.as_tensor(_logits_from_sigmas(sigmas, sigma_min, sigma_max), dtype=torch.float64)
        self.logits = torch.nn.Parameter(start)
        self.alpha = torch.nn.Parameter(torch.zeros(n - 1, dtype=torch.float64))
        self.omega = torch.nn.Parameter(torch.zeros(n, n, dtype=torch.float64))  # lower triangle used

    def coefficients(self) -> tuple[torch.Tensor, list, list]:
        sigmas = _sigmas_from_logits(self.logits, self.sigma_min, self.sigma_max)  # (n + 1,), last 0
        return (sigmas, *_corrected_dpmpp_2m(sigmas, self.alpha, self.omega))

    def solver(self, info: dict) -> BespokeSolver:
        with torch.no_grad():
            sigmas, a, b = self.coefficients()
            return BespokeSolver(sigmas.tolist(), *_floats(a, b), info)


def _lbfgs(params: torch.nn.Module) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(params.parameters(), lr=1, max_iter=20, history_size=50, line_search_fn="strong_wolfe")


def fit_bespoke(
    denoiser: Callable,
    nfe: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    *,
    shape: tuple[int, ...],
    cond: dict | None = None,
    seed: int = 0,
    steps: int = 30,
    patience: int = 5,
    reference_steps: int = 200,
    init_sigmas: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    cache: str | Path | bool = True,
    cache_key: str | None = None,
    progress: bool = False,
) -> BespokeSolver:
    """Fit a :class:`BespokeSolver` with ``nfe`` evaluations to ``denoiser`` from noise of ``shape``.

    ``shape`` is (batch, *sample_shape): training noises are its first draw from ``seed`` (the noise
    :func:`~difflab.sampling.optimize.optimized` searches on), held-out noises its second draw. Adam runs
    ``steps`` full-batch steps; every ``eval_every`` the held-out error is measured and the best solver so
    far is kept; it stops after ``patience`` steps without improvement. The start is ``dpmpp_2m`` on
    ``init_sigmas``, else on the best closed-form schedule for the training batch. ``cond`` is
    batch-aligned with ``shape`` and used for both batches. ``cache``/``cache_key`` as for ``optimized``.
    """
    _check(nfe, sigma_min, sigma_max)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, *sample_shape) with positive sizes, got {shape}")
    cond = cond or {}
    key_id = cache_key or fingerprint(denoiser)
    path = None
    if cache is not False:
        if key_id is None:
            warnings.warn("bespoke solver not cached: the denoiser has no fingerprint; pass cache_key=")
        else:
            path = default_cache_path() if cache is True else Path(cache)
    init_key = "auto" if init_sigmas is None else ",".join(f"{v:.6g}" for v in torch.as_tensor(init_sigmas).tolist())
    key = (f"{key_id}|bespoke|{nfe}|{sigma_min:g}|{sigma_max:g}|{tuple(shape)}|{reference_steps}|{seed}|{steps}|"
           f"{patience}|{init_key}")
    if path is not None and path.exists():
        stored = _read_cache(path).get(key)
        if stored is not None:
            return BespokeSolver.from_dict(stored)

    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=g, dtype=dtype, device=device)
    held_out = torch.randn(shape, generator=g, dtype=dtype, device=device)
    with torch.no_grad():
        target, held_out_target = (reference_solution(denoiser, z * sigma_max, sigma_min, sigma_max, reference_steps,
                                                      **cond) for z in (noise, held_out))
        if init_sigmas is None:
            def error(sigmas):
                return rmse(dpmpp_2m(denoiser, noise * sigmas[0].item(), sigmas, **cond), target)
            init_sigmas = min(candidate_schedules(nfe, sigma_min, sigma_max), key=error)
    params = _Parameters(torch.as_tensor(init_sigmas, dtype=torch.float64), sigma_min, sigma_max)

    def loss(z: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        sigmas, a, b = params.coefficients()
        x0 = _integrate(denoiser, z * sigmas[0].to(z.dtype), sigmas, a, b, cond)
        return (x0.double() - reference.double()).square().mean().sqrt()

    def held_out_error() -> float:
        with torch.no_grad():
            return loss(held_out, held_out_target).item()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        error = loss(noise, target)
        error.backward()
        return error

    best_error, best_state, best_step = held_out_error(), copy.deepcopy(params.state_dict()), 0
    start_error, previous, step = best_error, math.inf, 0
    optimizer = _lbfgs(params)
    bar = tqdm(total=steps, desc=f"fitting bespoke solver ({nfe} NFE)", disable=not progress, leave=False)
    for step in range(1, steps + 1):
        train_error = optimizer.step(closure).item()  # the training error before this iteration
        error = held_out_error()
        bar.update()
        bar.set_postfix(train=f"{train_error:.2e}", held_out=f"{error:.2e}")
        if math.isfinite(error) and error < best_error:
            best_error, best_state, best_step = error, copy.deepcopy(params.state_dict()), step
        if not math.isfinite(error):  # a diverged line search: back to the best point, fresh curvature
            params.load_state_dict(best_state)
        if step - best_step >= patience:
            break
        if not math.isfinite(error) or train_error >= previous * (1 - 1e-9):
            optimizer = _lbfgs(params)  # L-BFGS stalls on this rugged loss; a restart usually moves on
        previous = train_error
    bar.close()
    params.load_state_dict(best_state)
    solver = params.solver({"held_out_rmse": best_error, "initial_held_out_rmse": start_error, "best_step": best_step,
                            "steps_run": step})
    if path is not None:
        _write_cache(path, key, solver.to_dict())
    return solver
