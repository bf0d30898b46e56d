"""The math core: noise processes in the sigma convention, preconditioning, noise levels, loss weights."""

from difflab.diffusion.gmm import GaussianMixture
from difflab.diffusion.loss import LOSS_WEIGHTS, denoising_loss, loss_weight, weighted_mse
from difflab.diffusion.noise import (
    VPSchedule,
    alphabar_from_sigma,
    flow_scale,
    flow_time_from_sigma,
    resolution_shift,
    shift_flow_time,
    sigma_from_alphabar,
    sigma_from_flow_time,
    vp_scale,
)
from difflab.diffusion.noise_levels import NOISE_LEVELS, LogitNormal, LogNormal, UniformLogSNR, VPUniform
from difflab.diffusion.precond import PARAMETERIZATIONS, Precond, coefficients, network_target

__all__ = [
    "GaussianMixture", "LOSS_WEIGHTS", "denoising_loss", "loss_weight", "weighted_mse", "VPSchedule",
    "alphabar_from_sigma",
    "flow_scale", "flow_time_from_sigma", "resolution_shift", "shift_flow_time", "sigma_from_alphabar",
    "sigma_from_flow_time", "vp_scale", "NOISE_LEVELS", "LogitNormal", "LogNormal", "UniformLogSNR",
    "VPUniform", "PARAMETERIZATIONS", "Precond", "coefficients", "network_target",
]
