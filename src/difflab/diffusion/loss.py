"""Loss weights lambda(sigma) in denoiser space and the denoising loss (EDM, Eq. 2 and Table 1).

Every weight here multiplies ``||D(x; sigma) - x0||^2``. A weight is what makes a denoiser-space loss
equal to a familiar network-space loss, because ``D - x0 = c_out (F - F*)``:

=================  =====================================  =============================================
name               lambda(sigma)                          equals
=================  =====================================  =============================================
``edm``            (s^2 + sd^2) / (s sd)^2 = 1 / c_out^2  unit-weight MSE on EDM's F
``eps``            1 / s^2 = SNR                          ``||eps_hat - n||^2`` (DDPM's simple loss)
``v``              (1 + s^2) / s^2 = SNR + 1              ``||v_hat - v||^2``
``x0``             1                                      ``||x0_hat - x0||^2``
``flow``           ((1 + s) / s)^2 = 1 / t^2              ``||u_hat - (n - x0)||^2`` (rectified flow)
``min_snr``        min(SNR, gamma)                        Min-SNR-gamma (Hang et al. 2023), any target
``truncated_snr``  max(SNR, 1)                            progressive distillation (Salimans & Ho 2022, Sec. 4)
=================  =====================================  =============================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _edm(sigma: torch.Tensor, sigma_data: float, gamma: float) -> torch.Tensor:
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def _eps(sigma: torch.Tensor, sigma_data: float, gamma: float) -> torch.Tensor:
    return sigma**-2


def _v(sigma: torch.Tensor, sigma_data: float, gamma: float) -> torch.Tensor:
    return sigma**-2 + 1


def _x0(sigma: torch.Tensor, sigma_data: float, gamma: float) -> torch.Tensor:
    return torch.ones_like(sigma)


def _flow(sigma: torch.Tensor, sigma_data: float, gamma: float) -> torch.Tensor:
    return ((1 + sigma) / sigma) ** 2


def _min_snr(sigma: torch.Tensor, sigma_data: float, gamma: float) -> torch.Tensor:
    # Hang et al. 2023, Eq. 9: the x0-space weight min(SNR, gamma); for eps or v targets it is the
    # paper's min(SNR, gamma) / SNR or min(SNR, gamma) / (SNR + 1) times those networks' MSE.
    return (sigma**-2).clamp(max=gamma)


def _truncated_snr(sigma: torch.Tensor, sigma_data: float, gamma: float) -> torch.Tensor:
    return (sigma**-2).clamp(min=1)


LOSS_WEIGHTS: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "edm": _edm,
    "eps": _eps,
    "v": _v,
    "x0": _x0,
    "flow": _flow,
    "min_snr": _min_snr,
    "truncated_snr": _truncated_snr,
}


def loss_weight(name: str, sigma: torch.Tensor, sigma_data: float = 0.5, gamma: float = 5.0) -> torch.Tensor:
    """lambda(sigma) of a named weighting; see the module table."""
    try:
        return LOSS_WEIGHTS[name](sigma, sigma_data, gamma)
    except KeyError:
        raise ValueError(f"unknown loss weight {name!r}; choose one of {', '.join(LOSS_WEIGHTS)}") from None


def denoising_loss(
    denoiser: Callable[..., torch.Tensor],
    x0: torch.Tensor,
    sigma: torch.Tensor,
    weight: torch.Tensor,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    **cond,
) -> torch.Tensor:
    """Per-sample weighted loss ``lambda(sigma) * mean ||D(x0 + sigma n; sigma) - x0||^2`` (EDM, Eq. 2)."""
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    return weighted_mse(denoiser(x0 + s * noise, sigma, **cond), x0, weight)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample ``weight * mean (prediction - target)^2``, in float32 whatever the network's dtype."""
    dtype = torch.promote_types(target.dtype, torch.float32)
    return weight * (prediction.to(dtype) - target.to(dtype)).square().flatten(1).mean(1)
