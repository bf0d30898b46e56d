"""One interface for the space a generator learns in: pixels, a difflab autoencoder's latents, or a diffusers VAE's.

An :class:`Encoder` maps data ``x`` (B, C, [T,] H, W) in [-1, 1] to ``z`` and back; every recipe trains the same
way on either. Latents are the posterior mean, shifted and scaled per channel to zero mean and unit standard
deviation with statistics measured on the training data and stored with the autoencoder (never a hard-coded
0.18215): EDM's preconditioning assumes data of a known scale (``sigma_data``), and a latent space's scale is a
property of one trained autoencoder. Encoders are frozen: they run without gradients.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

STATS_FILE = "latent-stats.json"


class Encoder(nn.Module):
    """The interface: ``encode``, ``decode``, ``latent_shape`` and ``describe`` (what recreates it)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class PixelEncoder(Encoder):
    """Pixel space: the identity, with an optional scale."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.scale

    def latent_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sample_shape)

    def describe(self) -> str:
        return "pixels"


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like).view(1, -1, *([1] * (like.ndim - 2)))


class _Standardised(Encoder):
    """Shared by latent encoders: ``z = (mean(x) - shift) * scale`` per channel, and its inverse."""

    def __init__(self, shift: torch.Tensor, scale: torch.Tensor, source: str):
        super().__init__()
        self.register_buffer("shift", torch.as_tensor(shift, dtype=torch.float32).flatten())
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).flatten())
        self.source = source

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.posterior_mean(x)
        return (mean - _per_channel(self.shift, mean)) * _per_channel(self.scale, mean)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(z / _per_channel(self.scale, z) + _per_channel(self.shift, z)).clamp(-1, 1)

    def describe(self) -> str:
        return self.source


class LatentEncoder(_Standardised):
    """A difflab :class:`~difflab.representation.autoencoder.Autoencoder`'s posterior mean, standardised."""

    def __init__(self, autoencoder: nn.Module, shift: torch.Tensor, scale: torch.Tensor, source: str = ""):
        super().__init__(shift, scale, source)
        self.autoencoder = autoencoder.eval().requires_grad_(False)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x)[0]

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)

    def latent_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.autoencoder.config.latent_shape(tuple(sample_shape))


class DiffusersEncoder(_Standardised):
    """A diffusers ``AutoencoderKL`` (e.g. Stable Diffusion's VAE) saved with ``save_pretrained``; its config's
    ``shift_factor`` and ``scaling_factor`` (stored with it) standardise the latents."""

    def __init__(self, folder: str | Path):
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError("loading a diffusers VAE needs diffusers: pip install diffusers") from None
        vae = AutoencoderKL.from_pretrained(str(folder)).eval().requires_grad_(False)
        scale = torch.full((vae.config.latent_channels,), float(vae.config.scaling_factor))
        shift = torch.full((vae.config.latent_channels,), float(vae.config.get("shift_factor") or 0.0))
        super().__init__(shift, scale, str(Path(folder).resolve()))
        self.vae = vae
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x.to(self.vae.dtype)).latent_dist.mean.float()

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype)).sample.float()

    def latent_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
        channels, height, width = sample_shape
        if height % self.factor or width % self.factor:
            raise ValueError(f"{height}x{width} images do not divide by this VAE's factor {self.factor}")
        return (self.vae.config.latent_channels, height // self.factor, width // self.factor)


@torch.no_grad()
def latent_statistics(autoencoder: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, 1 / std) of an autoencoder's posterior means over ``batches`` of data."""
    total, squares, count = 0.0, 0.0, 0
    for x in batches:
        mean = autoencoder.encode(x)[0].double().transpose(0, 1).flatten(1)  # (C, everything else)
        total, squares, count = total + mean.sum(1), squares + mean.square().sum(1), count + mean.shape[1]
    if not count:
        raise ValueError("latent statistics need at least one batch")
    shift = total / count
    std = (squares / count - shift.square()).clamp_min(0).sqrt()
    return shift.float(), 1 / std.clamp_min(1e-6).float()


def write_statistics(folder: Path, shift: torch.Tensor, scale: torch.Tensor, images: int) -> None:
    from difflab.paths import write_atomic

    write_atomic(folder / STATS_FILE, json.dumps({"shift": shift.tolist(), "scale": scale.tolist(),
                                                  "images": images}, indent=1))


def load_encoder(source: str | Path | None, device="cpu") -> Encoder:
    """``None`` or "pixels": pixel space; an autoencoder run directory (its latest checkpoint, the weights
    ``load_run`` would pick, and the statistics stored beside them); a diffusers ``AutoencoderKL`` folder."""
    if source is None or str(source) == "pixels":
        return PixelEncoder()
    folder = Path(source)
    if not folder.exists():
        raise ValueError(f"encoder {str(source)!r} does not exist: train the autoencoder first (or fix the path)")
    config_json = folder / "config.json"
    if config_json.is_file() and json.loads(config_json.read_text()).get("_class_name") == "AutoencoderKL":
        return DiffusersEncoder(folder).to(device)
    if not (folder / "config.yaml").is_file():
        raise ValueError(f"encoder {str(source)!r} is neither 'pixels', an autoencoder run directory nor a "
                         "diffusers AutoencoderKL folder")
    from difflab.training.run import load_run

    run = load_run(folder, device=device)
    if run.config.model.get("arch") != "autoencoder":
        raise ValueError(f"{folder} is a {run.config.model.get('arch')} run, not an autoencoder run")
    stats_path = run.checkpoint / STATS_FILE
    if not stats_path.is_file():
        raise FileNotFoundError(f"{stats_path} is missing: the autoencoder run did not finish a checkpoint")
    stats = json.loads(stats_path.read_text())
    return LatentEncoder(run.network, torch.tensor(stats["shift"]), torch.tensor(stats["scale"]),
                         str(folder.resolve())).to(device)
