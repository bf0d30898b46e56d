"""What the trainer minimises: denoising for generators, reconstruction (+ KL, GAN) for autoencoders.

The trainer owns the loop, the data, the optimizer, EMAs, checkpoints and distribution; an objective says
what the network is wrapped in (``module``), which randomness each global batch draws, and the loss of one
process's share of one accumulation round. Everything random is drawn for the *global* batch from the
trainer's generator and sliced, so the run is the same on any number of processes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from difflab.conditioning import drop_condition
from difflab.conditioning.text import CaptionBank, caption_bank, caption_variants
from difflab.config import ConfigError
from difflab.data import Batch, open_loader
from difflab.diffusion import NOISE_LEVELS, Precond, denoising_loss, loss_weight


class Share:
    """Where one process's samples sit: ``whole`` in the global batch, ``part`` in the round's micro-batch."""

    def __init__(self, round_: int, micro: int, rank: int, world_size: int):
        size = micro // world_size
        self.micro = micro
        self.whole = slice(round_ * micro + rank * size, round_ * micro + (rank + 1) * size)
        self.part = slice(rank * size, (rank + 1) * size)


def start_from(network: nn.Module, state: dict, mismatch: str, allowed_missing: tuple[str, ...] = (),
               widen_inputs: bool = False) -> None:
    """Load a trained run's network weights ``state`` into ``network`` (a student's or a fine-tune's), or fail with
    one line beginning ``mismatch``. Only parameters under ``allowed_missing`` may be new (they keep their own,
    usually zero, start). With ``widen_inputs``, a layer that takes more input channels (dim 1) than the trained one
    keeps its weights for the leading channels and zeros for the new ones, so the new inputs start ignored."""
    if widen_inputs:
        own, state = network.state_dict(), dict(state)
        for key, value in state.items():
            mine = own.get(key)
            if mine is not None and value.ndim >= 2 and mine.shape[1] > value.shape[1] and \
                    (mine.shape[0], *mine.shape[2:]) == (value.shape[0], *value.shape[2:]):
                widened = torch.zeros_like(mine)
                widened[:, : value.shape[1]] = value
                state[key] = widened
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a parameter of another shape
        raise ConfigError(f"{mismatch}: {str(exc).splitlines()[1].strip()}") from None
    new = [k for k in missing if not k.startswith(allowed_missing)]
    if new or unexpected:
        raise ConfigError(f"{mismatch}: {', '.join((new + unexpected)[:4])} ...")


def start_from_run(network: nn.Module, run_dir: str | Path, mismatch: str, allowed_missing: tuple[str, ...],
                   widen_inputs: bool = False) -> None:
    """Start ``network`` from the sampling weights of the run in ``run_dir`` (see :func:`start_from`)."""
    from difflab.training.run import load_run

    state = load_run(run_dir, device=next(network.parameters()).device).network.state_dict()
    start_from(network, state, mismatch, allowed_missing, widen_inputs)


def training_captions(config, progress: bool = False) -> CaptionBank:
    """The caption bank of a text-conditioned run: every caption variant of ``data.dataset`` under
    ``data.text_encoder`` (encoded once, then read from the cache)."""
    captions = open_loader(config.data.dataset, batch=1).captions()
    if captions is None:
        raise ConfigError(f"data set {config.data.dataset!r} has no captions to condition on (data.text_encoder)")
    return caption_bank(caption_variants(*captions), config.data.text_encoder, progress=progress)


class DiffusionObjective:
    """Denoising score matching of ``Precond(network)`` (EDM, Eq. 2) with the math core's noise levels and loss
    weights, on the loader's samples or, with an ``encoder``, on their latents; conditioned on class labels and
    (a text model) on a random caption variant of each sample, each dropped to the null condition at its own rate
    for classifier-free guidance."""

    columns: tuple[str, ...] = ()

    def __init__(self, config, network: nn.Module, generator: torch.Generator, num_classes: int, encoder=None):
        d = config.diffusion
        self.config, self.generator, self.num_classes, self.encoder = config, generator, num_classes, encoder
        self.module = Precond(network, d.parameterization, sigma_data=d.sigma_data)
        self.noise_levels = NOISE_LEVELS[d.noise_levels](**d.noise_options)
        self.captions = training_captions(config, progress=True) if config.model.get("text_dim") else None

    def draw(self, batch: int, sample_shape: tuple[int, ...] | None, step: int) -> dict:
        """Noise levels, condition dropout, caption variants and (for a fixed sample shape) the noise of the global
        batch."""
        d = self.config.diffusion
        draws = {"sigmas": self.noise_levels(batch, generator=self.generator),
                 "drops": torch.rand(batch, generator=self.generator) < d.label_dropout}
        if self.captions is not None:
            draws["text_drops"] = torch.rand(batch, generator=self.generator) < d.text_dropout
            draws["variants"] = torch.rand(batch, generator=self.generator)
        if sample_shape is not None:
            draws["noises"] = torch.randn((batch, *sample_shape), generator=self.generator)
        return draws

    def prepare(self, batch: Batch, draws: dict, share: Share):
        """(x0: the samples or their latents, noise, sigma, conditioning with dropped conditions) of this share."""
        images, labels = batch.images, batch.labels
        device = images.device
        x0 = images if self.encoder is None else self.encoder.encode(images)
        if "noises" in draws:
            noise = draws["noises"][share.whole]
        else:  # aspect-ratio buckets: the round's size is known only now; drawn for its global micro-batch
            noise = torch.randn((share.micro, *x0.shape[1:]), generator=self.generator)[share.part]
        cond = {}
        if labels is not None and self.num_classes:
            cond = drop_condition({"class_labels": labels.to(device)}, draws["drops"][share.whole].to(device))
        if self.captions is not None:
            text, mask = self.captions.lookup(batch.indices, draws["variants"][share.whole])
            cond.update(drop_condition({"text": text.to(device), "text_mask": mask.to(device)},
                                       draws["text_drops"][share.whole].to(device)))
        return x0, noise.to(device), draws["sigmas"][share.whole].to(device), cond

    def loss(self, model: nn.Module, batch: Batch, draws: dict, share: Share, step: int) -> tuple[torch.Tensor, dict]:
        d = self.config.diffusion
        x0, noise, sigma, cond = self.prepare(batch, draws, share)
        weight = loss_weight(d.loss_weight, sigma, d.sigma_data, d.min_snr_gamma)
        return denoising_loss(model, x0, sigma, weight, noise=noise, **cond).mean(), {}

    def after_step(self, step: int) -> dict:
        return {}

    def state_tensors(self) -> tuple[dict, dict]:
        return {}, {}

    def load_state_tensors(self, tensors: dict, settings: dict) -> None:
        pass


class AutoencoderObjective:
    """The KL autoencoder of latent diffusion (Rombach et al. 2022): reconstruction + KL through a posterior sample
    and, from ``loss.gan_start`` on, a PatchGAN discriminator with its own AdamW (betas 0.5, 0.9, as LDM), stepped
    after every autoencoder step on that step's reconstructions."""

    columns = ("rec", "kl", "adversarial", "disc_loss")

    def __init__(self, config, network: nn.Module, generator: torch.Generator, wrap, device):
        from difflab.representation.losses import AutoencoderLoss

        self.config, self.network, self.generator = config, network, generator
        self.module = network
        self.losses = AutoencoderLoss(config.loss, network.config.in_channels).to(device)
        self.discriminator = self.optimizer = None
        if self.losses.discriminator is not None:
            self.discriminator = wrap(self.losses.discriminator)
            self.optimizer = torch.optim.AdamW(self.losses.discriminator.parameters(),
                                               lr=config.loss.disc_lr or config.optim.lr, betas=(0.5, 0.9))
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def draw(self, batch: int, sample_shape, step: int) -> dict:
        return {}

    def loss(self, model: nn.Module, batch: Batch, draws: dict, share: Share, step: int) -> tuple[torch.Tensor, dict]:
        images = batch.images
        # The posterior sample's noise, drawn for the round's global micro-batch and sliced.
        latent = self.network.config.latent_shape(tuple(images.shape[1:]))
        noise = torch.randn((share.micro, *latent), generator=self.generator)[share.part].to(images.device)
        reconstruction, mean, logvar = model(images, noise=noise)
        loss, logs = self.losses.generator_loss(images, reconstruction, mean, logvar, step,
                                                self.network.decoder.conv_out.weight)
        if self.optimizer is not None and self.losses.trains_discriminator(step):
            self.pending.append((images, reconstruction.detach()))
        return loss, logs

    def after_step(self, step: int) -> dict:
        """One discriminator step on the rounds of the autoencoder step ``step`` just taken."""
        if not self.pending:
            return {"disc_loss": 0.0}
        logs = {}
        for images, reconstruction in self.pending:
            loss, logs = self.losses.discriminator_loss(images, reconstruction, step, self.discriminator)
            (loss / len(self.pending)).backward()
        self.pending.clear()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logs

    def state_tensors(self) -> tuple[dict, dict]:
        """The discriminator's weights and optimizer state, for the checkpoint."""
        if self.optimizer is None:
            return {}, {}
        from difflab.training.checkpoint import optimizer_to_tensors

        optimizer, settings = optimizer_to_tensors(self.optimizer.state_dict())
        tensors = {f"discriminator.{k}": v for k, v in self.losses.discriminator.state_dict().items()}
        return {**tensors, **{f"discriminator_optimizer.{k}": v for k, v in optimizer.items()}}, settings

    def load_state_tensors(self, tensors: dict, settings: dict) -> None:
        if self.optimizer is None:
            return
        from difflab.training.checkpoint import optimizer_from_tensors

        self.losses.discriminator.load_state_dict(
            {k.removeprefix("discriminator."): v for k, v in tensors.items() if k.startswith("discriminator.")})
        optimizer = {k.removeprefix("discriminator_optimizer."): v for k, v in tensors.items()
                     if k.startswith("discriminator_optimizer.")}
        self.optimizer.load_state_dict(optimizer_from_tensors(optimizer, settings))
