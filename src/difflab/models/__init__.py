"""Denoiser networks: the U-Net and the DiT (image and video forms), their factory and presets, diffusers models."""

from difflab.models.diffusers_adapter import from_diffusers
from difflab.models.dit import DiT, DiTConfig
from difflab.models.factory import PRESETS, build_network, model_info, network_config, network_mapping
from difflab.models.unet import UNet, UNetConfig

__all__ = [
    "DiT", "DiTConfig", "PRESETS", "UNet", "UNetConfig", "build_network", "from_diffusers", "model_info",
    "network_config", "network_mapping",
]
