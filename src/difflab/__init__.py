"""difflab: diffusion models for images and video, across the whole engineering lifecycle."""

__version__ = "0.1.0"
