"""The autoencoder's losses against closed forms and hand-computed values: KL, reconstruction, hinge losses, the
adaptive weight on a toy linear decoder, the KL and GAN schedules, the patch discriminator's shapes, and which
network gets gradients before and after the discriminator switches on (LDM, VQGAN, pix2pix, pix2pixHD)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab.config import ConfigError, build
from difflab.representation.losses import (
    AutoencoderLoss,
    AutoencoderLossConfig,
    PatchDiscriminator,
    adaptive_weight,
    feature_matching_loss,
    gan_weight,
    generator_adversarial_loss,
    hinge_discriminator_loss,
    kl_divergence,
    kl_weight,
    reconstruction_loss,
)


# ---------------------------------------------------------------------------------------------------- config
def test_config_builds_from_a_mapping_and_rejects_impossible_values():
    config = build(AutoencoderLossConfig, {"gan": 0.5, "gan_start": 100, "disc_lr": 1e-4, "adaptive": False})
    assert (config.gan, config.gan_start, config.disc_lr, config.adaptive) == (0.5, 100, 1e-4, False)
    for mapping, message in [
        ({"kl": -1e-6}, "kl must be >= 0"),
        ({"gan_ramp": -1}, "gan_ramp must be >= 0"),
        ({"l1": 0.0}, "l1 and l2 are both 0"),
        ({"disc_layers": 0}, "disc_layers must be positive"),
        ({"disc_lr": 0.0}, "disc_lr must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message) as info:
            build(AutoencoderLossConfig, mapping, "loss")
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ loss terms
def test_kl_of_the_prior_is_zero_and_matches_the_closed_form():
    zeros = torch.zeros(3, 4, 8, 8)
    assert kl_divergence(zeros, zeros).item() == 0.0
    # Sample 0 is the prior; sample 1 has mean 1 and variance 2 everywhere: 0.5 (1 + 2 - 1 - ln 2) per element.
    mean = torch.stack([torch.zeros(4, 8, 8), torch.ones(4, 8, 8)])
    logvar = torch.stack([torch.zeros(4, 8, 8), torch.full((4, 8, 8), math.log(2.0))])
    expected = (4 * 8 * 8 * 0.5 * (2 - math.log(2.0))) / 2  # summed per sample, averaged over the batch
    assert kl_divergence(mean, logvar).item() == pytest.approx(expected, rel=1e-6)
    # A peer implementation, on random moments.
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(5, 4, 6, 6, generator=gen), torch.randn(5, 4, 6, 6, generator=gen)
    peer = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).flatten(1).sum(1).mean()
    torch.testing.assert_close(kl_divergence(mean, logvar), peer)


def test_reconstruction_loss_sums_over_elements_and_averages_over_the_batch():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.stack([torch.full((3, 4, 4), 2.0), torch.zeros(3, 4, 4)])  # error 2 on sample 0, none on sample 1
    assert reconstruction_loss(x, y, l1=1.0, l2=0.0).item() == pytest.approx(48 * 2 / 2)
    assert reconstruction_loss(x, y, l1=0.5, l2=0.25).item() == pytest.approx(48 * (0.5 * 2 + 0.25 * 4) / 2)


def test_hinge_losses_on_constructed_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2).
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 1.0))
    assert hinge_discriminator_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0])).item() == 0.0
    assert generator_adversarial_loss(fake).item() == pytest.approx(1 / 3)


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    # A linear "decoder" x_hat = W z and a fixed linear "discriminator" D(x_hat) = v . x_hat.
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=gen, requires_grad=True)
    z, x, v = torch.randn(3, generator=gen), torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    x_hat = weight @ z
    rec, adv = (x_hat - x).square().sum(), -(v @ x_hat)
    # d rec / dW = 2 (W z - x) z^T and d adv / dW = -v z^T; an outer product's norm is the product of norms.
    rec_norm = 2 * (x_hat - x).detach().norm() * z.norm()
    adv_norm = v.norm() * z.norm()
    lam = adaptive_weight(rec, adv, weight)
    assert lam.item() == pytest.approx((rec_norm / (adv_norm + 1e-4)).item(), rel=1e-5)
    assert not lam.requires_grad
    rec.backward()  # the graph was retained for the autoencoder's own backward
    # No adversarial gradient: the ratio is clamped at 1e4.
    x_hat = weight @ z
    assert adaptive_weight((x_hat - x).square().sum(), 0 * x_hat.sum(), weight).item() == 1e4


def test_feature_matching_is_zero_for_identical_inputs_and_positive_otherwise():
    discriminator = PatchDiscriminator(3, channels=8, layers=2)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    features = discriminator(x)[1]
    assert feature_matching_loss(features, features).item() == 0.0
    assert feature_matching_loss(features, discriminator(x + 0.1)[1]).item() > 0.0


# ------------------------------------------------------------------------------------------------- schedules
def test_kl_schedule_ramps_over_the_warmup():
    config = AutoencoderLossConfig(kl=1e-6, kl_warmup=100)
    assert [kl_weight(s, config) for s in (0, 50, 100, 5000)] == pytest.approx([0.0, 5e-7, 1e-6, 1e-6])
    assert kl_weight(0, AutoencoderLossConfig(kl=1e-6)) == 1e-6


def test_gan_schedule_is_off_before_the_start_then_ramps():
    config = AutoencoderLossConfig(gan=0.5, gan_start=1000, gan_ramp=200)
    steps = (0, 999, 1000, 1100, 1200, 5000)
    assert [gan_weight(s, config) for s in steps] == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.5, 0.5])
    sharp = AutoencoderLossConfig(gan=0.5, gan_start=1000)
    assert [gan_weight(s, sharp) for s in (999, 1000)] == [0.0, 0.5]
    loss = AutoencoderLoss(config)
    assert [loss.trains_discriminator(s) for s in (999, 1000)] == [False, True]
    assert AutoencoderLoss(AutoencoderLossConfig()).discriminator is None


# --------------------------------------------------------------------------------------------- discriminator
@pytest.mark.parametrize("size", [32, 64])
def test_patch_discriminator_shapes(size):
    discriminator = PatchDiscriminator(3)
    logits, features = discriminator(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 1, size // 8 - 2, size // 8 - 2)  # 70x70 PatchGAN: 256 -> 30x30
    assert [f.shape[1] for f in features] == [64, 128, 256, 512]


def test_patch_discriminator_judges_video_frame_by_frame_and_samples_alone():
    discriminator = PatchDiscriminator(3, channels=8, layers=2)
    clip = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    logits, features = discriminator(clip)
    assert logits.shape == (2, 1, 4, 2, 2) and features[0].shape == (2, 8, 4, 8, 8)
    frame = discriminator(clip[:, :, 2])[0]
    torch.testing.assert_close(logits[:, :, 2], frame)
    # GroupNorm, not BatchNorm: a sample's logits do not depend on the rest of its batch.
    torch.testing.assert_close(discriminator(clip[:1, :, 2])[0], frame[:1])
    with pytest.raises(ValueError, match="at least 12x12"):
        discriminator(torch.randn(1, 3, 8, 8))


# --------------------------------------------------------------------------------- the two losses together
class ToyAutoencoder(nn.Module):
    """A linear encoder to (mean, logvar) and a decoder ending in a convolution: enough for every term."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Conv2d(3, 8, 4, stride=4)
        self.decoder = nn.Sequential(nn.Upsample(scale_factor=4), nn.Conv2d(4, 3, 3, padding=1))

    def forward(self, x):
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return self.decoder(mean), mean, logvar


def losses_at(step: int, **options):
    torch.manual_seed(0)
    loss = AutoencoderLoss(AutoencoderLossConfig(gan_start=10, disc_channels=8, disc_layers=2, **options))
    autoencoder = ToyAutoencoder()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, mean, logvar = autoencoder(x)
    total, logs = loss.generator_loss(x, reconstruction, mean, logvar, step, autoencoder.decoder[1].weight)
    return loss, autoencoder, x, reconstruction, total, logs


def gradient(total: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(total, list(module.parameters()), retain_graph=True)])


def test_before_gan_start_no_adversarial_term_and_no_discriminator_gradient():
    loss, autoencoder, x, reconstruction, total, logs = losses_at(9, gan=0.5, feature_matching=1.0)
    assert logs["adversarial"] == logs["feature_matching"] == logs["gan_weight"] == logs["adaptive_weight"] == 0.0
    assert logs["loss"] == pytest.approx(logs["rec"] + 1e-6 * logs["kl"])
    total.backward()
    disc_loss, disc_logs = loss.discriminator_loss(x, reconstruction, 9)
    assert disc_loss.item() == 0.0 and not disc_loss.requires_grad and disc_logs["disc_loss"] == 0.0
    assert all(p.grad is None for p in loss.discriminator.parameters())


def test_after_gan_start_both_networks_get_gradients():
    loss, autoencoder, x, reconstruction, total, logs = losses_at(10, gan=0.5, feature_matching=1.0)
    assert logs["adaptive_weight"] > 0 and logs["gan_weight"] == 0.5 and logs["feature_matching"] > 0
    rec_only = reconstruction_loss(x, reconstruction, 1.0, 0.0)
    assert not torch.allclose(gradient(total, autoencoder.decoder), gradient(rec_only, autoencoder.decoder))
    total.backward()
    assert all(p.grad is None for p in loss.discriminator.parameters())  # the autoencoder's loss leaves D alone
    disc_loss, disc_logs = loss.discriminator_loss(x, reconstruction, 10)
    assert set(disc_logs) == {"disc_loss", "logits_real", "logits_fake"}
    disc_loss.backward()
    # Every weight learns (the output bias's gradient cancels while all logits lie inside the hinge's margin).
    assert all(p.grad is not None for p in loss.discriminator.parameters())
    assert all(p.grad.abs().sum() > 0 for name, p in loss.discriminator.named_parameters() if name.endswith("weight"))


def test_generator_loss_weighs_the_adversarial_term_by_the_adaptive_weight():
    _, _, _, _, _, logs = losses_at(10, gan=0.5)
    expected = logs["rec"] + 1e-6 * logs["kl"] + 0.5 * logs["adaptive_weight"] * logs["adversarial"]
    assert logs["loss"] == pytest.approx(expected, rel=1e-5)
    _, _, _, _, _, fixed = losses_at(10, gan=0.5, adaptive=False)
    assert fixed["adaptive_weight"] == 1.0
    with torch.no_grad():  # validation: no gradients to compare, the adversarial term is left out
        _, _, _, _, total, logs = losses_at(10, gan=0.5)
    assert logs["adaptive_weight"] == 0.0 and logs["adversarial"] != 0.0 and math.isfinite(total.item())


def test_a_short_adversarial_run_tells_sharp_images_from_blurred_ones():
    torch.manual_seed(0)
    loss = AutoencoderLoss(AutoencoderLossConfig(gan=0.5, gan_start=0, disc_channels=16, disc_layers=2))
    optimizer = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-3, betas=(0.5, 0.9))

    def batch():
        x = torch.rand(8, 3, 24, 24) * 2 - 1
        return x, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # real, slightly blurred

    for step in range(30):
        disc_loss, _ = loss.discriminator_loss(*batch(), step)
        optimizer.zero_grad()
        disc_loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, logs = loss.discriminator_loss(*batch(), 30)
    assert logs["logits_real"] > logs["logits_fake"] + 1.0  # seeds 0-9: margins of 4.7 to 5.4
    assert logs["disc_loss"] < 0.5  # 1 for a discriminator that cannot tell them apart
