"""Preconditioning: a raw network becomes a denoiser ``D(x, sigma, **cond) -> x0_hat`` (EDM, Table 1).

``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))``. Choosing the four
coefficients expresses every common parameterisation in the one sigma convention:

============  ================  ===================  ==================  ============================
name          network predicts  c_skip               c_out               c_in
============  ================  ===================  ==================  ============================
``edm``       EDM's F           sd^2 / (s^2 + sd^2)  s sd / sqrt(s^2+sd^2)  1 / sqrt(s^2 + sd^2)
``eps``       noise n           1                    -s                  1 / sqrt(1 + s^2)  (x_vp)
``v``         alpha n - s' x0   1 / (1 + s^2)        -s / sqrt(1 + s^2)  1 / sqrt(1 + s^2)  (x_vp)
``x0``        x0                0                    1                   1 / sqrt(1 + s^2)  (x_vp)
``flow``      n - x0            1 / (1 + s)          -s / (1 + s)        1 / (1 + s)        (x_t)
============  ================  ===================  ==================  ============================

(s = sigma, sd = sigma_data, s' = s / sqrt(1 + s^2)). ``eps``/``v``/``x0`` networks see the VP sample
``x_vp = x / sqrt(1 + sigma^2)``; ``flow`` networks see ``x_t = x / (1 + sigma)`` (DESIGN.md).

``consistency`` is the boundary-condition parameterisation of consistency models (Song et al. 2023, Eq. 7 and
Appendix C): with e = CONSISTENCY_SIGMA_MIN, c_skip = sd^2 / ((s - e)^2 + sd^2), c_out = (s - e) sd /
sqrt(s^2 + sd^2), c_in as ``edm``. D(x; e) = x exactly, and for s >> e it is ``edm``, so a consistency student
starts from an EDM teacher's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from difflab.diffusion.noise import VPSchedule, flow_time_from_sigma


class Coefficients(NamedTuple):
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor


def _edm(sigma: torch.Tensor, sigma_data: float) -> Coefficients:
    norm = (sigma**2 + sigma_data**2).sqrt()
    return Coefficients(sigma_data**2 / norm**2, sigma * sigma_data / norm, 1 / norm)


def _eps(sigma: torch.Tensor, sigma_data: float) -> Coefficients:
    return Coefficients(torch.ones_like(sigma), -sigma, (1 + sigma**2).rsqrt())


def _v(sigma: torch.Tensor, sigma_data: float) -> Coefficients:
    # Salimans & Ho 2022: v = alpha n - s' x0, so x0 = alpha x_vp - s' v = x / (1 + s^2) - s' v.
    norm = (1 + sigma**2).sqrt()
    return Coefficients(1 / norm**2, -sigma / norm, 1 / norm)


def _x0(sigma: torch.Tensor, sigma_data: float) -> Coefficients:
    return Coefficients(torch.zeros_like(sigma), torch.ones_like(sigma), (1 + sigma**2).rsqrt())


def _flow(sigma: torch.Tensor, sigma_data: float) -> Coefficients:
    # Liu et al. 2022 / SD3: x_t = (1 - t) x0 + t n with velocity u = n - x0, so x0 = x_t - t u.
    return Coefficients(1 / (1 + sigma), -sigma / (1 + sigma), 1 / (1 + sigma))


CONSISTENCY_SIGMA_MIN = 0.002  # epsilon of consistency models: the smallest noise level, where D is the identity


def _consistency(sigma: torch.Tensor, sigma_data: float) -> Coefficients:
    shifted = sigma - CONSISTENCY_SIGMA_MIN
    return Coefficients(sigma_data**2 / (shifted**2 + sigma_data**2), shifted * sigma_data
                        / (sigma**2 + sigma_data**2).sqrt(), (sigma**2 + sigma_data**2).rsqrt())


PARAMETERIZATIONS: dict[str, Callable[[torch.Tensor, float], Coefficients]] = {
    "edm": _edm,
    "eps": _eps,
    "v": _v,
    "x0": _x0,
    "flow": _flow,
    "consistency": _consistency,
}


def coefficients(parameterization: str, sigma: torch.Tensor, sigma_data: float = 0.5) -> Coefficients:
    """c_skip, c_out and c_in of a parameterisation at noise level(s) sigma."""
    try:
        return PARAMETERIZATIONS[parameterization](sigma, sigma_data)
    except KeyError:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; choose one of {', '.join(PARAMETERIZATIONS)}"
        ) from None


def network_target(
    parameterization: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, sigma_data: float = 0.5
) -> torch.Tensor:
    """The raw network output that makes the denoiser exact: F* = (x0 - c_skip x) / c_out.

    For ``eps`` this is the noise, for ``v`` the velocity alpha n - s' x0, for ``flow`` n - x0.
    """
    sigma = _per_sample(sigma, x0)
    c = coefficients(parameterization, sigma, sigma_data)
    return (x0 - c.c_skip * (x0 + sigma * noise)) / c.c_out


def default_noise_input(parameterization: str, vp_schedule: VPSchedule | None = None) -> Callable:
    """How the network is told the noise level (c_noise): EDM's ln(sigma)/4, the VP timestep, or flow time."""
    if parameterization in ("edm", "consistency"):
        return lambda sigma: sigma.log() / 4
    if parameterization == "flow":
        return flow_time_from_sigma
    schedule = vp_schedule or VPSchedule.from_betas()
    return lambda sigma: schedule.sigma_to_t(sigma).to(sigma.dtype)


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape sigma of shape (B,) (or a scalar) to broadcast against x of shape (B, ...)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype, device=x.device)
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Precond(nn.Module):
    """Wrap ``network(x_in, c_noise, **cond)`` into a denoiser ``D(x, sigma, **cond)`` (EDM's ``EDMPrecond``).

    The coefficients are computed in float32 (or float64 for float64 inputs) whatever dtype the network
    runs in, so bfloat16 networks keep an exact skip connection.
    """

    def __init__(
        self,
        network: nn.Module,
        parameterization: str = "edm",
        sigma_data: float = 0.5,
        noise_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
        vp_schedule: VPSchedule | None = None,
    ):
        super().__init__()
        coefficients(parameterization, torch.ones(1), sigma_data)  # validate the name early
        self.network = network
        self.parameterization = parameterization
        self.sigma_data = sigma_data
        self.noise_input = noise_input or default_noise_input(parameterization, vp_schedule)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(compute_dtype)
        sigma = _per_sample(sigma, x).expand(x.shape[0], *([1] * (x.ndim - 1)))
        c = coefficients(self.parameterization, sigma, self.sigma_data)
        c_noise = self.noise_input(sigma.flatten())
        out = self.network(c.c_in * x, c_noise, **cond)
        return c.c_skip * x + c.c_out * out.to(compute_dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The raw network target for training; see :func:`network_target`."""
        return network_target(self.parameterization, x0, noise, sigma, self.sigma_data)
