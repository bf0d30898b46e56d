"""Training losses of the autoencoder: LDM's KL-regularised objective (Rombach et al. 2022, App. G) with
VQGAN's patch discriminator and adaptive weight (Esser et al. 2021, Eq. 7).

    loss = l1 |x - x_hat| + l2 (x - x_hat)^2 + feature_matching FM + kl_weight(step) KL + gan_weight(step) lambda L_adv

Reduction, as LDM's ``LPIPSWithDiscriminator``: the reconstruction and the KL are summed over each sample's
elements and averaged over the batch. ``kl = 1e-6`` therefore weighs the KL exactly as LDM's ``kl_weight``;
with a per-element mean reconstruction the same number would be C*H*W times stronger (~2e5 at 256x256x3).
The adaptive weight lambda makes the adversarial term's scale relative, so it is unaffected by the sum.

Perceptual loss: LDM uses LPIPS (Zhang et al. 2018), a VGG trained on ImageNet; no pretrained LPIPS or VGG
weights can be downloaded here. The discriminator is the one network here trained on these images, so its
features stand in: pix2pixHD's feature matching (Wang et al. 2018, Eq. 4), an L1 distance between the
discriminator's intermediate features of real and reconstructed images. It needs a trained discriminator,
so it follows the adversarial schedule, and it is counted at every image element as LDM counts LPIPS, so
``feature_matching`` sits on the per-element scale of ``l1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.models.layers import group_norm


@dataclass(frozen=True)
class AutoencoderLossConfig:
    """The ``loss:`` section of an autoencoder run; by default LDM's L1 and KL weight, without a discriminator."""

    l1: float = 1.0  # weight of |x - x_hat|
    l2: float = 0.0  # weight of (x - x_hat)^2
    kl: float = 1e-6  # weight of the KL term (LDM's kl_weight, on the summed reconstruction)
    kl_warmup: int = 0  # steps over which the KL weight ramps linearly from 0
    gan: float = 0.0  # weight of the adversarial term; 0 and feature_matching 0: no discriminator
    gan_start: int = 2000  # step at which the discriminator trains and the adversarial term switches on
    gan_ramp: int = 0  # steps over which the adversarial (and feature-matching) weight ramps from 0 after gan_start
    adaptive: bool = True  # scale the adversarial term by VQGAN's adaptive weight lambda (else lambda = 1)
    feature_matching: float = 0.0  # weight of pix2pixHD's discriminator feature matching, our perceptual loss
    disc_channels: int = 64  # width of the discriminator's first layer, doubled per layer up to 8x
    disc_layers: int = 3  # stride-2 layers of the discriminator (3: pix2pix's 70x70 PatchGAN)
    disc_lr: float | None = None  # the discriminator's learning rate; null: the autoencoder's

    def __post_init__(self):
        for name in ("l1", "l2", "kl", "kl_warmup", "gan", "gan_start", "gan_ramp", "feature_matching"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.l1 == 0 and self.l2 == 0:
            raise ValueError("l1 and l2 are both 0: the autoencoder needs a reconstruction loss")
        for name in ("disc_channels", "disc_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.disc_lr is not None and self.disc_lr <= 0:
            raise ValueError(f"disc_lr must be positive or null, got {self.disc_lr!r}")


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017), VQGAN's and LDM's ``NLayerDiscriminator``: one logit per patch.

    4x4 convolutions, ``layers`` of stride 2 then two of stride 1, LeakyReLU(0.2); a (H, W) input gives an
    (H / 2^layers - 2, W / 2^layers - 2) logits map. GroupNorm replaces BatchNorm: batch statistics are noisy
    with the small per-rank batches of autoencoder training, differ between ranks, and couple the real and
    fake halves of a batch; GroupNorm treats every sample alone. Video (B, C, T, H, W) is judged frame by
    frame, time folded into the batch (no temporal consistency is judged).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        self.layers = layers
        widths = [channels * min(2**i, 8) for i in range(layers + 1)]  # 64, 128, 256, 512
        blocks = [nn.Sequential(nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2))]
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            # No bias: GroupNorm's shift follows.
            conv = nn.Conv2d(widths[i - 1], widths[i], 4, stride, 1, bias=False)
            blocks.append(nn.Sequential(conv, group_norm(widths[i], 32), nn.LeakyReLU(0.2)))
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Conv2d(widths[-1], 1, 4, 1, 1)
        for module in self.modules():  # pix2pix's initialisation, N(0, 0.02)
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits map (B, 1, h, w), the ``layers + 1`` intermediate activations); video keeps its T axis."""
        smallest = 3 * 2**self.layers
        if min(x.shape[-2:]) < smallest:
            raise ValueError(f"a {self.layers}-layer patch discriminator needs inputs of at least "
                             f"{smallest}x{smallest}, got {x.shape[-2]}x{x.shape[-1]}")
        video = x.ndim == 5
        frames = x.shape[2] if video else 1
        h = x.transpose(1, 2).flatten(0, 1) if video else x  # (B, C, T, H, W) -> (B*T, C, H, W)
        features = []
        for block in self.blocks:
            h = block(h)
            features.append(h)
        logits = self.out(h)
        if video:  # (B*T, C, h, w) -> (B, C, T, h, w)
            logits, *features = (t.unflatten(0, (-1, frames)).transpose(1, 2) for t in (logits, *features))
        return logits, features


def reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """``l1 |x - x_hat| + l2 (x - x_hat)^2``, summed over each sample's elements and averaged over the batch (LDM)."""
    dtype = torch.promote_types(reconstruction.dtype, torch.float32)  # bfloat16 networks: sums in float32
    error = (reconstruction.to(dtype) - x.to(dtype)).flatten(1)
    return (l1 * error.abs() + l2 * error.square()).sum(1).mean()


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over each sample's latent elements and averaged over the batch.

    LDM's ``DiagonalGaussianDistribution.kl`` reduced as its loss does: summed, so that ``kl`` weighs it
    against the summed reconstruction as LDM's ``kl_weight`` does, whatever the latent's size.
    """
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss, ``(E relu(1 - D(x)) + E relu(1 + D(x_hat))) / 2`` (VQGAN's ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The autoencoder's adversarial loss, ``-E D(x_hat)`` (VQGAN, LDM)."""
    return -fake_logits.mean()


def feature_matching_loss(real_features: list[torch.Tensor], fake_features: list[torch.Tensor]) -> torch.Tensor:
    """pix2pixHD's feature matching (Wang et al. 2018, Eq. 4): mean L1 between the discriminator's features of
    real and reconstructed images, averaged over layers; the real features are targets (detached)."""
    return torch.stack([
        F.l1_loss(fake.float(), real.detach().float()) for real, fake in zip(real_features, fake_features, strict=True)
    ]).mean()


def adaptive_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer_weight: torch.Tensor) -> torch.Tensor:
    """VQGAN's adaptive weight (Esser et al. 2021, Eq. 7, with their code's 1e-4 and clamp), detached:
    ``||grad rec|| / (||grad adv|| + 1e-4)`` at the decoder's last layer, clamped to [0, 1e4].

    It scales the adversarial gradient to the reconstruction's size where both enter the decoder.
    """
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)
    (adv_grad,) = torch.autograd.grad(adv_loss, last_layer_weight, retain_graph=True)
    return (rec_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def kl_weight(step: int, config: AutoencoderLossConfig) -> float:
    """The KL weight at ``step``: ``config.kl``, ramped linearly from 0 over the first ``kl_warmup`` steps."""
    return config.kl * min(1.0, step / config.kl_warmup) if config.kl_warmup else config.kl


def gan_weight(step: int, config: AutoencoderLossConfig) -> float:
    """The adversarial weight at ``step``: 0 before ``gan_start``, then ``config.gan`` reached linearly over
    ``gan_ramp`` steps (0 at ``gan_start`` itself when there is a ramp)."""
    return config.gan * _gan_ramp(step, config)


def _gan_ramp(step: int, config: AutoencoderLossConfig) -> float:
    if step < config.gan_start:
        return 0.0
    return min(1.0, (step - config.gan_start) / config.gan_ramp) if config.gan_ramp else 1.0


class AutoencoderLoss(nn.Module):
    """The autoencoder's two losses: :meth:`generator_loss` for the autoencoder, :meth:`discriminator_loss` for
    ``.discriminator`` (None when ``gan`` and ``feature_matching`` are 0), which has its own optimizer.

    ``step`` counts the optimizer steps already taken (0 at the first).
    """

    def __init__(self, config: AutoencoderLossConfig, in_channels: int = 3):
        super().__init__()
        self.config = config
        uses_discriminator = config.gan > 0 or config.feature_matching > 0
        self.discriminator = (
            PatchDiscriminator(in_channels, config.disc_channels, config.disc_layers) if uses_discriminator else None
        )

    def trains_discriminator(self, step: int) -> bool:
        """Whether the discriminator learns at ``step``; before, the trainer skips its backward and step."""
        return self.discriminator is not None and step >= self.config.gan_start

    def generator_loss(
        self,
        x: torch.Tensor,
        reconstruction: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        step: int,
        last_layer_weight: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The autoencoder's loss at ``step`` and its terms for logging.

        ``mean`` and ``logvar`` are the encoder's posterior; ``last_layer_weight`` is the weight of the decoder's
        output layer, where the adaptive weight compares gradients. Under ``torch.no_grad`` (validation) there
        are no gradients to compare: the adversarial term is logged but left out, as VQGAN does in evaluation.
        """
        c = self.config
        rec = reconstruction_loss(x, reconstruction, c.l1, c.l2)
        kl = kl_divergence(mean, logvar)
        ramp = _gan_ramp(step, c) if self.discriminator is not None else 0.0
        matching = adversarial = lam = rec.new_zeros(())
        if ramp > 0:
            fake_logits, fake_features = _constant_parameters(self.discriminator, reconstruction)
            if c.feature_matching:
                with torch.no_grad():
                    _, real_features = self.discriminator(x)
                # Counted at every image element, as LDM adds its LPIPS distance to every pixel's L1.
                matching = x[0].numel() * feature_matching_loss(real_features, fake_features)
            adversarial = generator_adversarial_loss(fake_logits)
        nll = rec + c.feature_matching * ramp * matching
        if c.gan and ramp > 0:
            if not c.adaptive:
                lam = rec.new_ones(())
            elif torch.is_grad_enabled():
                lam = adaptive_weight(nll, adversarial, last_layer_weight)
        weights = {"kl_weight": kl_weight(step, c), "gan_weight": gan_weight(step, c)}
        loss = nll + weights["kl_weight"] * kl + weights["gan_weight"] * lam * adversarial
        logs = _floats(loss=loss, rec=rec, kl=kl, feature_matching=matching, adversarial=adversarial,
                       adaptive_weight=lam)
        return loss, {**logs, **weights}

    def discriminator_loss(
        self, x: torch.Tensor, reconstruction: torch.Tensor, step: int, discriminator: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The discriminator's hinge loss on real ``x`` against the (detached) ``reconstruction`` and its logs; a
        constant zero, with no graph, before ``gan_start`` (see :meth:`trains_discriminator`). ``discriminator``
        is ``.discriminator`` as the trainer wraps it (DDP), if it does."""
        if not self.trains_discriminator(step):
            zero = x.new_zeros((), dtype=torch.float32)
            return zero, {"disc_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0}
        # One forward over both halves: GroupNorm keeps samples independent, and a DDP-wrapped
        # discriminator sees one forward per backward.
        logits, _ = (discriminator or self.discriminator)(torch.cat([x.detach(), reconstruction.detach()]))
        real_logits, fake_logits = logits.chunk(2)
        loss = hinge_discriminator_loss(real_logits, fake_logits)
        return loss, _floats(disc_loss=loss, logits_real=real_logits.mean(), logits_fake=fake_logits.mean())


def _constant_parameters(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``module(x)`` with its parameters as constants: gradients reach ``x`` but never the module's weights, so
    the autoencoder's backward leaves the discriminator's gradients alone (LDM's optimizer toggling)."""
    parameters = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, parameters, (x,))


def _floats(**values: torch.Tensor) -> dict[str, float]:
    """Scalars as floats, read from the device in one synchronisation."""
    return dict(zip(values, torch.stack([v.detach().float() for v in values.values()]).tolist(), strict=True))
