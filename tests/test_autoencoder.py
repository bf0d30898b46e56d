"""The representation stage's autoencoder: shapes, the per-frame and causal video forms, the KL path, training."""

import math

import pytest
import torch

from difflab.representation.autoencoder import AttentionBlock, Autoencoder, AutoencoderConfig, ResBlock

SMALL = dict(channels=8, channel_mult=(1, 2, 2), groups=4)


def batch(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def autoencoder(seed: int = 0, **overrides) -> Autoencoder:
    torch.manual_seed(seed)
    return Autoencoder(AutoencoderConfig(**{**SMALL, **overrides}))


@pytest.mark.parametrize("channel_mult, factor", [((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
@pytest.mark.parametrize("attention", [False, True])
def test_image_shapes(channel_mult, factor, attention):
    ae = autoencoder(channel_mult=channel_mult, attention=attention, latent_channels=6)
    x = batch(2, 3, 16, 24)
    reconstruction, mean, logvar = ae(x)
    assert ae.config.factor == factor
    assert mean.shape == logvar.shape == (2, 6, 16 // factor, 24 // factor)
    assert ae.config.latent_shape((3, 16, 24)) == tuple(mean.shape[1:])
    assert reconstruction.shape == x.shape and reconstruction.isfinite().all()


def test_frames_form_is_the_image_network_frame_by_frame():
    image = autoencoder(attention=True)
    frames = autoencoder(attention=True, video="frames", seed=1)
    frames.load_state_dict(image.state_dict())
    clip = batch(2, 3, 3, 8, 8)  # (B, C, T, H, W)
    with torch.no_grad():
        mean, logvar = frames.encode(clip)
        decoded = frames.decode(mean)
        for t in range(clip.shape[2]):
            frame_mean, frame_logvar = image.encode(clip[:, :, t])
            assert torch.equal(mean[:, :, t], frame_mean) and torch.equal(logvar[:, :, t], frame_logvar)
            assert torch.equal(decoded[:, :, t], image.decode(frame_mean))
        assert torch.equal(frames.encode(clip[:, :, 0])[0], mean[:, :, 0])  # images still work
    assert frames.config.latent_shape((3, 3, 8, 8)) == (4, 3, 2, 2)


@pytest.mark.parametrize("time_factor", [1, 2, 4])
def test_causal_shapes(time_factor):
    ae = autoencoder(video="causal", time_factor=time_factor, attention=True)
    for latent_frames in (1, 3):
        frames = 1 + (latent_frames - 1) * time_factor
        clip = batch(1, 3, frames, 8, 8)
        reconstruction, mean, _ = ae(clip)
        assert mean.shape == (1, 4, latent_frames, 2, 2)
        assert ae.config.latent_shape((3, frames, 8, 8)) == (4, latent_frames, 2, 2)
        assert reconstruction.shape == clip.shape


@pytest.mark.parametrize(
    "overrides, shape, message",
    [
        (dict(), (1, 3, 10, 8), "divisible by the factor 4, got 10x8"),
        (dict(), (1, 1, 8, 8), "in_channels is 3"),
        (dict(), (1, 3, 2, 8, 8), r"video: none codes samples \(C, H, W\)"),
        (dict(video="causal", time_factor=2), (1, 3, 4, 8, 8), r"1 \+ k \* 2 frames \(k >= 0\), got T=4"),
        (dict(video="causal", time_factor=4), (1, 3, 7, 8, 8), "got T=7"),
        (dict(video="causal"), (1, 3, 8, 8), r"video: causal codes samples \(C, T, H, W\)"),
        (dict(video="causal"), (1, 3, 2, 8, 10), "divisible by the factor 4, got 8x10"),
    ],
)
def test_uncodable_samples_are_refused(overrides, shape, message):
    ae = autoencoder(**overrides)
    with pytest.raises(ValueError, match=message):
        ae.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match=message):
        ae.config.latent_shape(shape[1:])


def test_wrong_latents_are_refused():
    with pytest.raises(ValueError, match=r"decodes latents \(B, C, T, h, w\) with C = 4"):
        autoencoder(video="causal").decode(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="with C = 4"):
        autoencoder().decode(torch.zeros(1, 3, 2, 2))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(video="3d"), "video must be none, frames or causal, got '3d'"),
        (dict(time_factor=3, video="causal"), "time_factor must be 1, 2 or 4, got 3"),
        (dict(time_factor=2), "time_factor 2 needs video: causal, got video: none"),
        (dict(time_factor=2, video="frames"), "time_factor 2 needs video: causal"),
        (dict(time_factor=4, video="causal", channel_mult=(1, 2)), "time_factor 4 needs 2 downsampling levels"),
        (dict(channel_mult=()), "channel_mult must be a non-empty list"),
        (dict(latent_channels=0), "latent_channels must be at least 1"),
        (dict(blocks_per_level=0), "blocks_per_level must be at least 1"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderConfig(**overrides)


def test_groups_are_lowered_to_a_divisor_of_the_width():
    ae = Autoencoder(AutoencoderConfig(channels=12, channel_mult=(1, 2), groups=32))  # widths 12 and 24
    assert {m.num_groups for m in ae.modules() if isinstance(m, torch.nn.GroupNorm)} == {4, 8}
    assert ae(batch(1, 3, 4, 4))[0].shape == (1, 3, 4, 4)


@pytest.mark.parametrize("time_factor", [2, 4])
def test_causal_form_never_looks_at_later_frames(time_factor):
    """Latent frame j sees input frames <= j * time_factor (the last of its group); reconstructed frames of a
    group see only the latents up to their own, so perturbing frame t leaves every earlier group untouched."""
    ae = autoencoder(video="causal", time_factor=time_factor, attention=True)
    frames = 1 + 2 * time_factor
    clip = batch(1, 3, frames, 8, 8)
    with torch.no_grad():
        reconstruction, mean, logvar = ae(clip, sample=False)
        for t in range(frames):
            changed = clip.clone()
            changed[:, :, t] += 1.0
            new_reconstruction, new_mean, new_logvar = ae(changed, sample=False)
            group = math.ceil(t / time_factor)  # the first latent frame whose group holds frame t
            first_frame = 1 + (group - 1) * time_factor if group else 0  # the group's first input frame
            torch.testing.assert_close(new_mean[:, :, :group], mean[:, :, :group], rtol=0, atol=1e-6)
            torch.testing.assert_close(new_logvar[:, :, :group], logvar[:, :, :group], rtol=0, atol=1e-6)
            torch.testing.assert_close(new_reconstruction[:, :, :first_frame], reconstruction[:, :, :first_frame],
                                       rtol=0, atol=1e-6)
            assert (new_mean[:, :, group] - mean[:, :, group]).abs().max() > 1e-4
            assert (new_reconstruction[:, :, first_frame:] - reconstruction[:, :, first_frame:]).abs().amax(
                dim=(0, 1, 3, 4)).min() > 1e-4  # and every frame from t's group on does change


def test_an_image_is_a_one_frame_clip_of_the_causal_form():
    ae = autoencoder(video="causal", time_factor=2)
    image = batch(1, 3, 1, 8, 8)
    clip = torch.cat([image, batch(1, 3, 4, 8, 8, seed=1)], dim=2)
    with torch.no_grad():
        torch.testing.assert_close(ae.encode(clip)[0][:, :, :1], ae.encode(image)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(attention=True), dict(video="causal", time_factor=2, attention=True)])
def test_gradients_reach_every_parameter_and_the_input(overrides):
    ae = autoencoder(**overrides)
    x = batch(2, 3, *((3,) if ae.config.video == "causal" else ()), 8, 8).requires_grad_()
    reconstruction, mean, logvar = ae(x, generator=torch.Generator().manual_seed(0))
    kl = 0.5 * (mean.square() + logvar.exp() - 1 - logvar).mean()
    ((reconstruction - x.detach()).abs().mean() + kl).backward()
    for name, p in ae.named_parameters():
        assert p.grad is not None and p.grad.isfinite().all(), name
    assert x.grad.abs().sum() > 0
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0 and ae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_checkpointing_changes_nothing_but_memory():
    plain = autoencoder(attention=True)
    checkpointed = autoencoder(attention=True, checkpointing=True, seed=1)
    checkpointed.load_state_dict(plain.state_dict())
    x = batch(2, 3, 8, 8)
    for ae in (plain, checkpointed):
        ae(x, sample=False)[0].square().mean().backward()
    torch.testing.assert_close(checkpointed.encoder.conv_in.weight.grad, plain.encoder.conv_in.weight.grad)
    torch.testing.assert_close(checkpointed.decoder.conv_out.weight.grad, plain.decoder.conv_out.weight.grad)


def test_posterior_sample_is_reproducible_and_the_mean_path_is_deterministic():
    """A fixed generator, or the same noise handed in, gives the same sample; sample=False decodes the mean."""
    ae = autoencoder()
    x = batch(2, 3, 8, 8)
    with torch.no_grad():
        first, mean, logvar = ae(x, generator=torch.Generator().manual_seed(7))
        again, _, _ = ae(x, generator=torch.Generator().manual_seed(7))
        other, _, _ = ae(x, generator=torch.Generator().manual_seed(8))
        deterministic, _, _ = ae(x, sample=False)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
        expected = ae.decode(mean + (0.5 * logvar).exp() * noise)
        given, _, _ = ae(x, noise=noise)
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.testing.assert_close(first, expected)
    assert torch.equal(given, first)
    torch.testing.assert_close(deterministic, ae.decode(mean))
    assert not torch.allclose(first, deterministic)
    with pytest.raises(ValueError, match=r"noise must have the latent's shape \(2, 4, 2, 2\)"):
        ae(x, noise=noise[:1])


def test_logvar_is_clamped_as_ldm():
    ae = autoencoder()
    latent = ae.config.latent_channels
    with torch.no_grad():
        ae.encoder.conv_out.bias[latent:] = torch.tensor([1e3, -1e3, 1e3, -1e3])
        _, logvar = ae.encode(batch(1, 3, 8, 8))
    assert logvar[0, :, 0, 0].tolist() == [20.0, -30.0, 20.0, -30.0]


def test_default_parameter_counts_are_moderate():
    counts = {}
    for mult in ((1, 2, 2), (1, 2, 2, 4)):
        ae = Autoencoder(AutoencoderConfig(channel_mult=mult))
        counts[ae.config.factor] = sum(p.numel() for p in ae.parameters())
    print(f"default autoencoder parameters: {counts}")
    assert 1e6 < counts[4] < 5e6 and 5e6 < counts[8] < 15e6  # the SD VAE (f=8, channels 128) has 84M


def test_overfits_a_tiny_batch():
    gen = torch.Generator().manual_seed(0)
    # Smooth random patterns: 4x4 noise upsampled bilinearly, in [-1, 1].
    coarse = torch.rand(8, 3, 4, 4, generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=True)
    ae = autoencoder(channels=16, channel_mult=(1, 2), latent_channels=4, groups=8)
    optimizer = torch.optim.Adam(ae.parameters(), lr=1e-3)
    with torch.no_grad():
        initial = (ae(images, sample=False)[0] - images).abs().mean().item()
    for _ in range(60):
        reconstruction, _, _ = ae(images, sample=False)
        loss = (reconstruction - images).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.07 and initial > 0.3  # about 0.05 from 0.4


def test_parity_with_diffusers_autoencoder_kl():
    """Same weights, same inputs: the image network computes what diffusers' AutoencoderKL (LDM's VAE) computes."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers comes with the test extra: .[test]")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()
    ae = Autoencoder(AutoencoderConfig(channels=32, channel_mult=(1, 2), attention=True, groups=32))
    load_diffusers_weights(ae, vae)
    assert sum(p.numel() for p in ae.parameters()) == sum(p.numel() for p in vae.parameters())
    x = batch(2, 3, 16, 16)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        mean, logvar = ae.encode(x)
        torch.testing.assert_close(mean, posterior.mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logvar, posterior.logvar, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ae.decode(mean), vae.decode(posterior.mean).sample, rtol=1e-5, atol=1e-5)


def load_diffusers_weights(ae: Autoencoder, vae) -> None:
    """Copy an AutoencoderKL's weights into ``ae``, pairing the layers in the order both run them."""

    def peer_blocks(coder, decoder: bool) -> list:
        mid = coder.mid_block
        middle = [mid.resnets[0], *[a for a in mid.attentions if a is not None], mid.resnets[1]]
        levels = []
        for block in coder.up_blocks if decoder else coder.down_blocks:
            levels += [*block.resnets, *((block.upsamplers if decoder else block.downsamplers) or [])]
        return middle + levels if decoder else levels + middle

    with torch.no_grad():
        for coder, peer, decoder in ((ae.encoder, vae.encoder, False), (ae.decoder, vae.decoder, True)):
            pairs = [(coder.conv_in, peer.conv_in), (coder.norm_out, peer.conv_norm_out)]
            pairs.append((coder.conv_out, peer.conv_out))
            for block, theirs in zip(coder.blocks, peer_blocks(peer, decoder), strict=True):
                if isinstance(block, ResBlock):
                    pairs += [(block.norm1, theirs.norm1), (block.conv1, theirs.conv1), (block.norm2, theirs.norm2),
                              (block.conv2, theirs.conv2)]
                    if theirs.conv_shortcut is not None:
                        pairs.append((block.skip, theirs.conv_shortcut))
                elif isinstance(block, AttentionBlock):
                    pairs += [(block.norm, theirs.group_norm), (block.attn.out, theirs.to_out[0])]
                    for name in ("weight", "bias"):
                        qkv = [getattr(layer, name) for layer in (theirs.to_q, theirs.to_k, theirs.to_v)]
                        getattr(block.attn.qkv, name).copy_(torch.cat(qkv))
                else:  # Downsample, Upsample
                    pairs.append((block.conv, theirs.conv))
            for mine, theirs in pairs:
                mine.load_state_dict(theirs.state_dict())
