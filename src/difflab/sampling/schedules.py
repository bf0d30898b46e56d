"""Sigma schedules: ``schedule(steps, sigma_min=..., sigma_max=...) -> sigmas`` (steps + 1 values, last 0).

Each returns a float64 CPU tensor, decreasing from sigma_max to sigma_min, with a final 0 appended: a
solver takes ``steps`` steps through it. The VP schedules place steps on a discrete 1000-step VP table
(DDPM's linear betas unless told otherwise) restricted to [sigma_min, sigma_max].
"""

from __future__ import annotations

import math

import torch

from difflab.diffusion.noise import VPSchedule, flow_time_from_sigma, sigma_from_flow_time


def _check(steps: int, sigma_min: float, sigma_max: float) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (0 < sigma_min < sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def karras(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (EDM, Eq. 5)."""
    _check(steps, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def loglinear(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> torch.Tensor:
    """Uniform in log-sigma (equal steps in the DPM-Solver's lambda = -log sigma; Lu et al. 2022)."""
    _check(steps, sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def _vp_range(vp_schedule: VPSchedule | None, sigma_min: float, sigma_max: float):
    table = vp_schedule or VPSchedule.from_betas()
    t_hi = float(table.sigma_to_t(torch.tensor(sigma_max, dtype=torch.float64)))
    t_lo = float(table.sigma_to_t(torch.tensor(sigma_min, dtype=torch.float64)))
    return table, t_hi, t_lo


def vp_uniform(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, vp_schedule: VPSchedule | None = None
) -> torch.Tensor:
    """Timesteps uniform over a VP table between sigma_max and sigma_min (DDIM's uniform spacing)."""
    _check(steps, sigma_min, sigma_max)
    table, t_hi, t_lo = _vp_range(vp_schedule, sigma_min, sigma_max)
    return _append_zero(table.t_to_sigma(torch.linspace(t_hi, t_lo, steps, dtype=torch.float64)))


def vp_trailing(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, vp_schedule: VPSchedule | None = None
) -> torch.Tensor:
    """"Trailing" spacing (Lin et al. 2024, Table 2): equal intervals ending one interval before t_lo - 1.

    On the full table this gives diffusers' trailing timesteps ``T - 1, T - 1 - T/N, ..., T/N - 1``.
    """
    _check(steps, sigma_min, sigma_max)
    table, t_hi, t_lo = _vp_range(vp_schedule, sigma_min, sigma_max)
    t = torch.linspace(t_hi, t_lo - 1, steps + 1, dtype=torch.float64)[:-1]
    return _append_zero(table.t_to_sigma(t))


def flow_shift(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, shift: float = 3.0) -> torch.Tensor:
    """Uniform rectified-flow time, shifted t' = s t / (1 + (s - 1) t) as in SD3 (Esser et al. 2024, Eq. 23).

    The shift multiplies sigma by ``shift``; use :func:`difflab.diffusion.resolution_shift` for SD3's
    resolution-dependent value.
    """
    _check(steps, sigma_min, sigma_max)
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    u_hi = flow_time_from_sigma(torch.tensor(sigma_max / shift, dtype=torch.float64))
    u_lo = flow_time_from_sigma(torch.tensor(sigma_min / shift, dtype=torch.float64))
    u = torch.linspace(float(u_hi), float(u_lo), steps, dtype=torch.float64)
    sigmas = shift * sigma_from_flow_time(u)
    sigmas[-1] = sigma_min  # exact ends despite rounding
    sigmas[0] = sigma_max
    return _append_zero(sigmas)


def focused(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, center: float = 1.0, width: float = 0.8,
    uniform: float = 0.7,
) -> torch.Tensor:
    """Steps crowded where sigma passes ``center``, the sigma at which the data's modes are decided.

    The steps are the quantiles of a density over log-sigma that mixes a uniform one (weight ``uniform``)
    with a normal bump at log(center) of standard deviation ``width``, both restricted to
    [sigma_min, sigma_max].

    A data set with separated modes decides which mode a noise ends in over a short range of sigma
    (about 1-2 for data of unit scale); an error there sends a sample to another mode, and those few
    samples carry most of a sampler's endpoint error. Closed-form schedules spread their steps by a
    fixed rule; this one puts a share ``1 - uniform`` of them near the deciding sigma.
    ``uniform=1`` is :func:`loglinear`. :func:`difflab.sampling.bespoke.fit_bespoke` searches a grid of it.
    """
    _check(steps, sigma_min, sigma_max)
    if not (center > 0 and width > 0 and 0 <= uniform <= 1):
        raise ValueError(f"need center > 0, width > 0 and 0 <= uniform <= 1, got center={center}, width={width}, "
                         f"uniform={uniform}")
    if steps == 1:
        return _append_zero(torch.tensor([sigma_max], dtype=torch.float64))
    lo, hi, mid = math.log(sigma_min), math.log(sigma_max), math.log(center)

    def normal_cdf(u: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtr((u - mid) / width)

    bump_lo, bump_hi = (normal_cdf(torch.tensor(end, dtype=torch.float64)) for end in (lo, hi))

    def cdf(u: torch.Tensor) -> torch.Tensor:
        bump = (normal_cdf(u) - bump_lo) / (bump_hi - bump_lo) if bump_hi > bump_lo else (u - lo) / (hi - lo)
        return uniform * (u - lo) / (hi - lo) + (1 - uniform) * bump

    # The cdf is increasing, so bisection inverts it at every quantile at once, to float64 precision.
    quantiles = torch.linspace(1, 0, steps, dtype=torch.float64)
    below, above = torch.full_like(quantiles, lo), torch.full_like(quantiles, hi)
    for _ in range(64):
        middle = (below + above) / 2
        under = cdf(middle) < quantiles
        below, above = torch.where(under, middle, below), torch.where(under, above, middle)
    sigmas = ((below + above) / 2).exp()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact ends
    return _append_zero(sigmas)
