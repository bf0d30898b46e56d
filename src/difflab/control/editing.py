"""Editing a real image: image-to-image (SDEdit) and deterministic ODE inversion.

- SDEdit (Meng et al. 2022, "SDEdit: guided image synthesis and editing with stochastic differential equations"):
  noise the input to an intermediate sigma and solve down from there; ``strength`` is the fraction of the sampling
  grid that is solved (1: the input is forgotten, 0: it is returned).
- Inversion (Song et al. 2021, "DDIM", Sec. 5.4; EDM's probability-flow ODE): run the ODE *up* the sampling grid
  from the image to noise, with the sampling stage's own Euler or Heun step; sampling that noise on the same grid
  gives the image back. An explicit step run backwards is not the exact inverse of the step forwards (errors
  O(h^3) per Heun step); ``refine`` fixed-point iterations per step solve for the x whose sampling step lands on
  the previous point (the fixed-point inversion of e.g. Pan et al. 2023, "Effective real image editing with
  accelerated iterative diffusion inversion"), each costing one more step.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from difflab.sampling.solvers import denoise_at, euler_update, heun_update

Denoiser = Callable[..., torch.Tensor]
INVERSION_SOLVERS = ("euler", "heun")


def strength_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The last ``round(strength * steps)`` steps (at least one) of a sampling grid: where SDEdit starts."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    steps = len(sigmas) - 1
    return sigmas[steps - max(1, round(strength * steps)) :]


def invert(
    denoiser: Denoiser, image: torch.Tensor, sigmas: torch.Tensor, *, solver: str = "heun", refine: int = 0,
    callback=None, **cond,
) -> torch.Tensor:
    """The noise ``n`` that a deterministic ``solver`` on the sampling grid ``sigmas`` (decreasing, ending in 0)
    turns back into ``image``: ``sample(denoiser, n, solver=solver, sigmas=sigmas)``. The image stands for the
    sample at the smallest positive sigma; ``refine`` fixed-point iterations per step make each step exact."""
    if solver not in INVERSION_SOLVERS:
        raise ValueError(f"inversion runs the {' or '.join(INVERSION_SOLVERS)} step backwards, got solver {solver!r}")
    if refine < 0:
        raise ValueError(f"refine must be >= 0, got {refine}")
    grid = torch.as_tensor(sigmas, dtype=torch.float64).tolist()
    if len(grid) < 3 or grid[-1] != 0 or any(b >= a for a, b in pairwise(grid)):
        raise ValueError("inversion needs a sampling grid of at least 2 steps, decreasing to 0")
    up = grid[-2::-1]  # sigma_min ... sigma_max
    x = image
    for i, (low, high) in enumerate(pairwise(up)):
        start = x
        x = _step(denoiser, start, low, high, solver, cond)
        for _ in range(refine):  # x <- x - (step down from x - start): a fixed point lands exactly on start
            x = x - (_step(denoiser, x, high, low, solver, cond) - start)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": high})
    return x / grid[0]


def _step(denoiser: Denoiser, x: torch.Tensor, sigma: float, sigma_next: float, solver: str, cond: dict):
    denoised = denoise_at(denoiser, x, sigma, cond)
    if solver == "heun":
        return heun_update(denoiser, x, denoised, sigma, sigma_next, cond)
    return euler_update(x, denoised, sigma, sigma_next)
