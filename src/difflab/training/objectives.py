"""What the trainer minimises: denoising for generators, reconstruction (+ KL, GAN) for autoencoders.

The trainer owns the loop, the data, the optimizer, EMAs, checkpoints and distribution; an objective says
what the network is wrapped in (``module``), which randomness each global batch draws, and the loss of one
process's share of one accumulation round. Everything random is drawn for the *global* batch from the
trainer's generator and sliced, so the run is the same on any number of processes.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.conditioning import drop_condition
from difflab.diffusion import NOISE_LEVELS, Precond, denoising_loss, loss_weight


class Share:
    """Where one process's samples sit: ``whole`` in the global batch, ``part`` in the round's micro-batch."""

    def __init__(self, round_: int, micro: int, rank: int, world_size: int):
        size = micro // world_size
        self.micro = micro
        self.whole = slice(round_ * micro + rank * size, round_ * micro + (rank + 1) * size)
        self.part = slice(rank * size, (rank + 1) * size)


class DiffusionObjective:
    """Denoising score matching of ``Precond(network)`` (EDM, Eq. 2) with the math core's noise levels and loss
    weights, on the loader's samples or, with an ``encoder``, on their latents."""

    columns: tuple[str, ...] = ()

    def __init__(self, config, network: nn.Module, generator: torch.Generator, encoder=None):
        d = config.diffusion
        self.config, self.generator, self.encoder = config, generator, encoder
        self.module = Precond(network, d.parameterization, sigma_data=d.sigma_data)
        self.noise_levels = NOISE_LEVELS[d.noise_levels](**d.noise_options)

    def draw(self, batch: int, sample_shape: tuple[int, ...] | None) -> dict:
        """Noise levels, label dropout and (for a fixed sample shape) the noise of the global batch."""
        draws = {"sigmas": self.noise_levels(batch, generator=self.generator),
                 "drops": torch.rand(batch, generator=self.generator) < self.config.diffusion.label_dropout}
        if sample_shape is not None:
            draws["noises"] = torch.randn((batch, *sample_shape), generator=self.generator)
        return draws

    def loss(self, model: nn.Module, images: torch.Tensor, labels, draws: dict, share: Share,
             num_classes: int) -> tuple[torch.Tensor, dict]:
        d, device = self.config.diffusion, images.device
        x0 = images if self.encoder is None else self.encoder.encode(images)
        if "noises" in draws:
            noise = draws["noises"][share.whole]
        else:  # aspect-ratio buckets: the round's size is known only now; drawn for its global micro-batch
            noise = torch.randn((share.micro, *x0.shape[1:]), generator=self.generator)[share.part]
        sigma, noise = draws["sigmas"][share.whole].to(device), noise.to(device)
        cond = {}
        if labels is not None and num_classes:
            cond = drop_condition({"class_labels": labels.to(device)}, draws["drops"][share.whole].to(device))
        weight = loss_weight(d.loss_weight, sigma, d.sigma_data, d.min_snr_gamma)
        return denoising_loss(model, x0, sigma, weight, noise=noise, **cond).mean(), {}

    def after_step(self, step: int) -> dict:
        return {}
