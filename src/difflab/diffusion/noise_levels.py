"""Training-time noise-level distributions p(sigma): each draws a batch of sigmas from a generator.

Each is a small frozen dataclass with ``__call__(batch, generator=None, device=None) -> sigma (B,)``, so
a training recipe swaps them independently of the parameterisation and the loss weight (STYLE.md, 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from difflab.diffusion.noise import VPSchedule


@dataclass(frozen=True)
class LogNormal:
    """ln(sigma) ~ N(p_mean, p_std^2) (EDM, Sec. 5: P_mean = -1.2, P_std = 1.2)."""

    p_mean: float = -1.2
    p_std: float = 1.2

    def __call__(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        z = torch.randn(batch, generator=generator, device=device)
        return (self.p_mean + self.p_std * z).exp()


@dataclass(frozen=True)
class LogitNormal:
    """Flow time t = sigmoid(N(mean, std^2)), sigma = t / (1 - t) (SD3, Esser et al. 2024, Eq. 19)."""

    mean: float = 0.0
    std: float = 1.0

    def __call__(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        z = torch.randn(batch, generator=generator, device=device)
        # sigma = t / (1 - t) = exp(logit(t)): exact and free of 1 - t cancellation.
        return (self.mean + self.std * z).exp()


@dataclass(frozen=True)
class VPUniform:
    """Integer timesteps uniform over a discrete VP schedule, as DDPM trains (Ho et al. 2020, Alg. 1)."""

    schedule: VPSchedule = field(default_factory=VPSchedule.from_betas)

    def __call__(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        t = torch.randint(0, self.schedule.num_timesteps, (batch,), generator=generator, device=device)
        return self.schedule.sigmas.to(device)[t].float()


@dataclass(frozen=True)
class UniformLogSNR:
    """log-SNR = -2 ln(sigma) uniform on [-2 ln(sigma_max), -2 ln(sigma_min)] (Kingma et al. 2021, VDM)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")

    def __call__(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        u = torch.rand(batch, generator=generator, device=device)
        log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
        return (log_min + (log_max - log_min) * u).exp()


NOISE_LEVELS = {
    "lognormal": LogNormal,
    "logit_normal": LogitNormal,
    "vp_uniform": VPUniform,
    "uniform_logsnr": UniformLogSNR,
}

