"""Inpainting on any trained denoiser, without retraining: replacement as a denoiser combinator, and RePaint.

- Replacement (Song et al. 2021, "Score-based generative modeling through SDEs", App. I.2; the known-region half of
  Lugmayr et al. 2022, "RePaint", Eq. 8): the denoiser sees the known region as the known image noised to the
  current sigma with a fixed noise, and its estimate of that region is the known image itself. Every solver then
  keeps the known region on the path ``known + sigma * noise`` and ends on the known pixels exactly: a solver's
  final sample is an affine combination of denoiser estimates.
- Reconstruction guidance (Ho et al. 2022, "Video diffusion models", Eq. 7), optional: the generated region is
  also steered by the gradient of the estimate's error on the known region, which replacement alone never feeds
  back (see :func:`inpainted`).
- RePaint's resampling (Lugmayr et al. 2022, Alg. 1 and Sec. 4.2): after every ``jump`` steps down the sampling grid,
  the sample is re-noised back up ``jump`` steps and the segment solved again, ``resample`` times in all, so the
  generated region harmonises with the known one. Each segment down is one call of a registered solver; each jump
  up adds fresh noise of variance ``sigma_high^2 - sigma_low^2`` (the forward process).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from difflab.sampling.solvers import SOLVERS, Generator, noise_like, rows

Denoiser = Callable[..., torch.Tensor]


def inpainted(denoiser: Denoiser, known: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
              reconstruction: float = 0.0, sigma_data: float = 0.5) -> Denoiser:
    """The denoiser that generates where ``mask`` is 1 and keeps ``known`` where it is 0 (the convention of
    diffusers and most tools: white is repainted; soft masks blend). ``known`` and ``noise`` are batch-aligned with
    the samples or of batch 1; ``mask`` broadcasts against them (e.g. (B or 1, 1, H, W)).

    ``reconstruction`` w > 0 adds reconstruction guidance (Ho et al. 2022, "Video diffusion models", Eq. 7): the
    generated region's estimate moves along ``-grad_x |known - D(x)|^2`` over the kept region, so it agrees with
    what the model would have predicted there. With p(x0 | x) ~ N(D(x), r^2), r^2 = sigma^2 sigma_data^2 /
    (sigma^2 + sigma_data^2), the likelihood's score gives the weight ``w (sigma^2 + sigma_data^2) /
    (2 sigma_data^2)`` (w = 1: the Gaussian approximation; larger w follows the kept region harder). It costs one
    backward pass through the network per evaluation. The correction grows with sigma^2: multistep solvers with
    few large steps (dpmpp_2m_sde at 12 steps and w >= 0.5 on a test mixture) can turn unstable; more steps or a
    smaller w fix it."""
    keep = 1 - check_mask(mask, known)

    def inpainting_denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        noised = known + rows(sigma, x) * noise
        x = torch.lerp(x, noised.to(x.dtype), keep.to(x.dtype))
        if not reconstruction:
            estimate = denoiser(x, sigma, **cond)
        else:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                estimate = denoiser(x, sigma, **cond)
                error = (keep * (estimate - known)).square().sum()
                (gradient,) = torch.autograd.grad(error, x)
            weight = reconstruction * (sigma.square() + sigma_data**2) / (2 * sigma_data**2)
            estimate = estimate.detach() - rows(weight, x) * (1 - keep) * gradient
        return torch.lerp(estimate, known.to(estimate.dtype), keep.to(estimate.dtype))

    return inpainting_denoiser


def check_mask(mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """A mask in [0, 1] that broadcasts against ``image`` (B, C, ...) without changing its shape."""
    if mask.ndim != image.ndim:
        raise ValueError(f"mask must have {image.ndim} dims like the image (B, C, ...), got shape {tuple(mask.shape)}")
    try:
        shape = torch.broadcast_shapes(mask.shape, image.shape)
    except RuntimeError:
        shape = None
    if shape is None or (shape[1:] != image.shape[1:]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit an image of shape {tuple(image.shape)}")
    mask = mask.float()
    if mask.min() < 0 or mask.max() > 1:
        raise ValueError("mask values must lie in [0, 1] (1 = generate, 0 = keep the known image)")
    return mask


def repaint_segments(steps: int, jump: int, resample: int) -> list[tuple[int, int]]:
    """RePaint's walk over a grid of ``steps`` steps as (start, end) grid indices: start < end is a segment solved
    down the grid, start > end a jump back up. Every block of ``jump`` steps is solved ``resample`` times."""
    if jump < 1 or resample < 1:
        raise ValueError(f"RePaint needs jump >= 1 and resample >= 1, got {jump} and {resample}")
    walk = []
    for start in range(0, steps, jump):
        end = min(start + jump, steps)
        for r in range(resample):
            walk.append((start, end))  # down
            if r < resample - 1:
                walk.append((end, start))  # back up
    return walk


def repaint(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, jump: int = 10, resample: int = 10,
    solver: str = "euler", generator: Generator = None, callback=None, solver_options: dict | None = None, **cond,
) -> torch.Tensor:
    """RePaint's resampling schedule (Lugmayr et al. 2022, Alg. 1) around any solver; ``denoiser`` is usually
    :func:`inpainted`. NFE: ``resample`` times the solver's on every block of ``jump`` steps."""
    grid = torch.as_tensor(sigmas, dtype=torch.float64)
    for start, end in repaint_segments(len(grid) - 1, jump, resample):
        if start < end:
            x = SOLVERS[solver](denoiser, x, grid[start : end + 1], generator=generator, callback=callback,
                                **(solver_options or {}), **cond)
        else:  # re-noise from sigma_start up to sigma_end (the forward process)
            x = x + math.sqrt(grid[end].item() ** 2 - grid[start].item() ** 2) * noise_like(x, generator)
    return x
