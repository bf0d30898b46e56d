"""The guidance stage: denoiser combinators (classifier-free guidance, autoguidance and their refinements)."""

from difflab.guidance.guidance import METHODS, GuidanceConfig, autoguided, guided

__all__ = ["METHODS", "GuidanceConfig", "autoguided", "guided"]
