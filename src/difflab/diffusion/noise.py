"""Noise processes in the sigma convention and their conversions (Karras et al. 2022, "EDM", Sec. 2).

difflab writes every process as ``x = x0 + sigma * n``. A variance-preserving (VP) process
``x_vp = sqrt(alphabar) * x0 + sqrt(1 - alphabar) * n`` is the same process scaled by
``1 / sqrt(1 + sigma^2)`` with ``sigma = sqrt((1 - alphabar) / alphabar)``; a rectified-flow process
``x_t = (1 - t) * x0 + t * n`` is the same process scaled by ``1 / (1 + sigma)`` with ``sigma = t / (1 - t)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def sigma_from_alphabar(alphabar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - alphabar) / alphabar) (DESIGN.md)."""
    return ((1 - alphabar) / alphabar).sqrt()


def alphabar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """alphabar = 1 / (1 + sigma^2), the inverse of :func:`sigma_from_alphabar`."""
    return 1 / (1 + sigma**2)


def sigma_from_flow_time(t: torch.Tensor) -> torch.Tensor:
    """sigma = t / (1 - t) for rectified flow ``x_t = (1 - t) x0 + t n`` (DESIGN.md)."""
    return t / (1 - t)


def flow_time_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """t = sigma / (1 + sigma), the inverse of :func:`sigma_from_flow_time`."""
    return sigma / (1 + sigma)


def vp_scale(sigma: torch.Tensor) -> torch.Tensor:
    """sqrt(alphabar) = 1 / sqrt(1 + sigma^2): multiply a sigma-convention sample by it to get ``x_vp``."""
    return (1 + sigma**2).rsqrt()


def flow_scale(sigma: torch.Tensor) -> torch.Tensor:
    """1 - t = 1 / (1 + sigma): multiply a sigma-convention sample by it to get the flow sample ``x_t``."""
    return 1 / (1 + sigma)


def resolution_shift(num_pixels: int, base_pixels: int = 256 * 256) -> float:
    """SD3's timestep shift for a resolution: sqrt(m / n) (Esser et al. 2024, Sec. 5.3.2)."""
    if num_pixels <= 0 or base_pixels <= 0:
        raise ValueError(f"pixel counts must be positive, got {num_pixels} and {base_pixels}")
    return math.sqrt(num_pixels / base_pixels)


def shift_flow_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t' = shift * t / (1 + (shift - 1) t) (SD3, Eq. 23); equivalent to sigma' = shift * sigma."""
    return shift * t / (1 + (shift - 1) * t)


BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """A discrete variance-preserving schedule: alphabar for each of T training timesteps (Ho et al. 2020).

    Fractional timesteps interpolate log-sigma linearly between neighbours, so the table also defines
    a continuous time for solvers and networks trained on integer timesteps.
    """

    alphabar: torch.Tensor  # (T,), float64, decreasing in t

    @classmethod
    def from_betas(
        cls,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> VPSchedule:
        """DDPM's ``linear`` betas, Stable Diffusion's ``scaled_linear`` or Nichol & Dhariwal's ``cosine``."""
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        elif kind == "cosine":
            # Improved DDPM, Eq. 17, with betas capped at 0.999 as in the paper.
            s = 0.008
            steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")
        return cls(torch.cumprod(1 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return self.alphabar.shape[0]

    @property
    def sigmas(self) -> torch.Tensor:
        """sigma at each integer timestep, increasing."""
        return sigma_from_alphabar(self.alphabar)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma at (fractional) timesteps t in [0, T - 1]."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        log_sigmas = self.sigmas.log().to(t.device)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep of each sigma, clamped to the table's range."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.log().clamp(log_sigmas[0], log_sigmas[-1])
        high = torch.searchsorted(log_sigmas, log_sigma.contiguous()).clamp(1, self.num_timesteps - 1)
        low = high - 1
        w = (log_sigma - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])
        return low + w
