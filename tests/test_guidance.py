"""Guidance combinators: CFG, negative conditions, interval, rescale, autoguidance and APG on exact denoisers."""

import pytest
import torch

from difflab.conditioning import NULL_CLASS
from difflab.diffusion import GaussianMixture
from difflab.guidance import GuidanceConfig, autoguided, guided
from difflab.sampling import sample

F64 = torch.float64
B = 8


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def mixture():
    """A 4-D mixture of 16 components in 10 classes (component k has class k % 10)."""
    return GaussianMixture.random(dim=4, components=16, seed=1)


@pytest.fixture
def inputs():
    """Random x, per-sample sigmas from 0.05 to 5 and class labels, float64."""
    sigma = torch.logspace(-1.3, 0.7, B, dtype=F64)
    x = torch.randn(B, 4, generator=gen(0), dtype=F64) * (1 + sigma[:, None])
    return x, sigma, torch.arange(B) % 10


def null(labels):
    return torch.full_like(labels, NULL_CLASS)


def recording(denoiser):
    """The denoiser, recording each call's batch size and class labels in ``.calls``."""

    def record(x, sigma, **cond):
        record.calls.append((x.shape[0], cond.get("class_labels")))
        return denoiser(x, sigma, **cond)

    record.calls = []
    return record


class LatentToy:
    """A random linear 4-channel denoiser whose class (row -1: null) shifts every channel; adds ``concat``."""

    def __init__(self, classes=3, channels=4, size=4):
        self.mixing = torch.randn(channels, channels, generator=gen(2), dtype=F64)
        self.bias = torch.randn(classes + 1, channels, size, size, generator=gen(3), dtype=F64)

    def __call__(self, x, sigma, class_labels, concat=None):
        out = torch.einsum("dc,bchw->bdhw", self.mixing, x) / (1 + sigma[:, None, None, None] ** 2)
        return out + self.bias[class_labels] + (0 if concat is None else concat)


def test_gmm_null_class_is_the_unconditional_denoiser(mixture, inputs):
    x, sigma, labels = inputs
    labels = torch.where(torch.arange(B) % 2 == 0, NULL_CLASS, labels)
    out = mixture(x, sigma, class_labels=labels)
    torch.testing.assert_close(out[::2], mixture(x, sigma)[::2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1::2], mixture(x[1::2], sigma[1::2], class_labels=labels[1::2]),
                               rtol=1e-12, atol=1e-12)
    unlabelled = GaussianMixture(mixture.means, mixture.stds, mixture.weights)
    torch.testing.assert_close(unlabelled(x, sigma, class_labels=null(labels)), unlabelled(x, sigma))


def test_scale_one_is_the_conditional_and_zero_the_unconditional_denoiser(mixture, inputs):
    x, sigma, labels = inputs
    torch.testing.assert_close(guided(mixture, 1.0)(x, sigma, class_labels=labels),
                               mixture(x, sigma, class_labels=labels), rtol=0, atol=0)
    torch.testing.assert_close(guided(mixture, 0.0)(x, sigma, class_labels=labels),
                               mixture(x, sigma, class_labels=null(labels)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [-0.5, 2.0, 7.5])
def test_guided_is_the_lerp_of_the_two_branches(mixture, inputs, scale):
    x, sigma, labels = inputs
    cond, uncond = mixture(x, sigma, class_labels=labels), mixture(x, sigma, class_labels=null(labels))
    torch.testing.assert_close(guided(mixture, scale)(x, sigma, class_labels=labels),
                               uncond + scale * (cond - uncond), rtol=1e-10, atol=1e-12)


def test_per_sample_scales(mixture, inputs):
    x, sigma, labels = inputs
    scales = torch.linspace(0.0, 5.0, B, dtype=F64)
    out = guided(mixture, scales)(x, sigma, class_labels=labels)
    for i, scale in enumerate(scales.tolist()):
        row = guided(mixture, scale)(x[i : i + 1], sigma[i : i + 1], class_labels=labels[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], row, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(guided(mixture, scales.tolist())(x, sigma, class_labels=labels), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="8 guidance scales for a batch of 4"):
        guided(mixture, scales)(x[:4], sigma[:4], class_labels=labels[:4])


def test_one_batched_call_and_one_plain_call_without_guidance(mixture, inputs):
    x, sigma, labels = inputs
    denoiser = recording(mixture)
    guided(denoiser, 3.0)(x, sigma, class_labels=labels)
    assert len(denoiser.calls) == 1
    size, called_labels = denoiser.calls[0]
    assert size == 2 * B and torch.equal(called_labels, torch.cat([labels, null(labels)]))
    denoiser.calls.clear()
    guided(denoiser, 1.0)(x, sigma, class_labels=labels)
    assert [size for size, _ in denoiser.calls] == [B]


def test_negative_condition_replaces_the_null_one(mixture, inputs):
    x, sigma, labels = inputs
    negative = (labels + 1) % 10
    cond, neg = mixture(x, sigma, class_labels=labels), mixture(x, sigma, class_labels=negative)
    expected = neg + 4.0 * (cond - neg)
    out = guided(mixture, 4.0, negative={"class_labels": negative})(x, sigma, class_labels=labels)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    # One negative for the whole batch: batch 1 broadcasts.
    one = guided(mixture, 4.0, negative={"class_labels": torch.tensor([3])})(x, sigma, class_labels=labels)
    neg3 = mixture(x, sigma, class_labels=torch.full_like(labels, 3))
    torch.testing.assert_close(one, neg3 + 4.0 * (cond - neg3), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="negative 'class_labels' must have shape"):
        guided(mixture, 4.0, negative={"class_labels": negative[:3]})(x, sigma, class_labels=labels)


def test_text_condition_and_negative_prompt_fill_their_masks():
    """A missing text_mask means all tokens; the null branch masks them all, a negative prompt keeps its own."""
    seen = []

    def denoiser(x, sigma, text, text_mask):
        seen.append(text_mask)
        return x * text_mask.double().mean(1)[:, None]

    x, sigma, text = torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=F64), torch.zeros(2, 5, 7)
    guided(denoiser, 2.0)(x, sigma, text=text)
    assert seen[-1].tolist() == [[True] * 5] * 2 + [[False] * 5] * 2
    guided(denoiser, 2.0, negative={"text": torch.zeros(1, 5, 7)})(x, sigma, text=text)
    assert seen[-1].all()


def test_interval_guides_only_inside(mixture, inputs):
    x, sigma, labels = inputs
    cond, uncond = mixture(x, sigma, class_labels=labels), mixture(x, sigma, class_labels=null(labels))
    config = GuidanceConfig(scale=3.0, interval=(0.3, 2.0))
    denoiser = recording(mixture)
    outside = sigma.clamp(max=0.2)
    torch.testing.assert_close(guided(denoiser, config)(x, outside, class_labels=labels),
                               mixture(x, outside, class_labels=labels), rtol=0, atol=0)
    assert [size for size, _ in denoiser.calls] == [B]
    inside = (sigma >= 0.3) & (sigma <= 2.0)
    assert 0 < inside.sum() < B
    expected = torch.where(inside[:, None], uncond + 3.0 * (cond - uncond), cond)
    torch.testing.assert_close(guided(mixture, config)(x, sigma, class_labels=labels), expected,
                               rtol=1e-10, atol=1e-12)


def paper_rescale(x, sigma, cond, uncond, scale, phi):
    """Lin et al. 2024, Alg. 2, on v predictions of the VP process x_vp = alpha x0 + s n, mapped back to x0."""
    alpha, s = (1 / (1 + sigma**2).sqrt())[:, None], (sigma / (1 + sigma**2).sqrt())[:, None]
    x_vp = alpha * x

    def v(x0):
        return alpha * (x - x0) / sigma[:, None] - s * x0

    v_pos, v_neg = v(cond), v(uncond)
    v_cfg = v_neg + scale * (v_pos - v_neg)
    v_rescaled = v_cfg * v_pos.std(1, keepdim=True) / v_cfg.std(1, keepdim=True)
    v_final = phi * v_rescaled + (1 - phi) * v_cfg
    return alpha * x_vp - s * v_final


def test_rescale_zero_is_cfg_and_otherwise_the_papers_v_rescale(mixture, inputs):
    x, sigma, labels = inputs
    cond, uncond = mixture(x, sigma, class_labels=labels), mixture(x, sigma, class_labels=null(labels))
    plain = guided(mixture, 5.0)(x, sigma, class_labels=labels)
    torch.testing.assert_close(guided(mixture, GuidanceConfig(scale=5.0, rescale=0.0))(x, sigma, class_labels=labels),
                               plain, rtol=0, atol=0)
    for phi in (0.7, 1.0):
        out = guided(mixture, GuidanceConfig(scale=5.0, rescale=phi))(x, sigma, class_labels=labels)
        torch.testing.assert_close(out, paper_rescale(x, sigma, cond, uncond, 5.0, phi), rtol=1e-9, atol=1e-10)
    assert not torch.allclose(out, plain)


def test_autoguidance(mixture, inputs):
    x, sigma, labels = inputs
    strong = mixture(x, sigma, class_labels=labels)
    torch.testing.assert_close(autoguided(mixture, mixture, 3.0)(x, sigma, class_labels=labels), strong,
                               rtol=0, atol=0)
    weak_mixture = GaussianMixture(mixture.means, mixture.stds * 3, mixture.weights, mixture.labels)
    weak = recording(weak_mixture)
    out = autoguided(mixture, weak, 2.5)(x, sigma, class_labels=labels)
    expected = weak_mixture(x, sigma, class_labels=labels)
    torch.testing.assert_close(out, expected + 2.5 * (strong - expected), rtol=1e-10, atol=1e-12)
    assert torch.equal(weak.calls[0][1], labels)  # the weak model gets the same conditioning
    autoguided(mixture, weak, 1.0)(x, sigma, class_labels=labels)
    assert len(weak.calls) == 1


@pytest.mark.parametrize("config", [
    GuidanceConfig(scale=3.0),
    GuidanceConfig(scale=3.0, rescale=0.7),
    GuidanceConfig(scale=3.0, method="apg", apg_threshold=2.0),
], ids=["cfg", "rescale", "apg"])
def test_guidance_acts_on_every_channel_and_passes_other_conditioning(config):
    toy = LatentToy()
    x = torch.randn(2, 4, 4, 4, generator=gen(4), dtype=F64)
    sigma, labels = torch.tensor([0.5, 2.0], dtype=F64), torch.tensor([0, 2])
    concat = torch.randn(2, 4, 4, 4, generator=gen(5), dtype=F64)
    seen = []

    def denoiser(x, sigma, class_labels, concat):
        seen.append(concat)
        return toy(x, sigma, class_labels, concat)

    out = guided(denoiser, config)(x, sigma, class_labels=labels, concat=concat)
    assert torch.equal(seen[0], torch.cat([concat, concat]))
    change = (out - toy(x, sigma, labels, concat)).abs().amax(dim=(2, 3))  # (B, C)
    assert (change > 1e-3).all()


def test_apg_with_eta_one_and_no_threshold_is_cfg(mixture, inputs):
    x, sigma, labels = inputs
    apg = guided(mixture, GuidanceConfig(scale=4.0, method="apg", apg_eta=1.0))(x, sigma, class_labels=labels)
    torch.testing.assert_close(apg, guided(mixture, 4.0)(x, sigma, class_labels=labels), rtol=1e-10, atol=1e-12)


def test_apg_drops_the_parallel_part_and_caps_the_update(mixture, inputs):
    x, sigma, labels = inputs
    cond = mixture(x, sigma, class_labels=labels)
    out = guided(mixture, GuidanceConfig(scale=4.0, method="apg"))(x, sigma, class_labels=labels)
    torch.testing.assert_close(((out - cond) * cond).sum(1), torch.zeros(B, dtype=F64), rtol=0, atol=1e-10)
    capped = guided(mixture, GuidanceConfig(scale=4.0, method="apg", apg_eta=1.0, apg_threshold=0.1))
    assert ((capped(x, sigma, class_labels=labels) - cond).norm(dim=1) <= 3 * 0.1 + 1e-12).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"scale": float("nan")}, "finite"),
    ({"scale": torch.ones(2, 2)}, "1-D"),
    ({"scale": []}, "empty"),
    ({"interval": (2.0, 1.0)}, "interval"),
    ({"interval": (-1.0, 1.0)}, "interval"),
    ({"rescale": 1.5}, "rescale"),
    ({"method": "pag"}, "unknown guidance method"),
    ({"method": "apg", "apg_eta": 2.0}, "apg_eta"),
    ({"method": "apg", "apg_threshold": 0.0}, "apg_threshold"),
    ({"apg_threshold": 1.0}, "need method='apg'"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GuidanceConfig(**kwargs)


def test_config_normalises_scales_and_interval():
    config = GuidanceConfig(scale=torch.tensor([1, 2]), interval=[0, float("inf")])
    assert config.scale == (1.0, 2.0) and config.interval == (0.0, float("inf"))
    assert GuidanceConfig(scale=torch.tensor(3)).scale == 3.0


def test_guided_sampling_concentrates_on_the_prompted_class():
    """Two overlapping classes: the share of samples nearest the prompted class's component grows with the scale."""
    mixture = GaussianMixture(torch.tensor([[0.0, 0.0], [1.5, 0.0]]), torch.tensor([1.0, 0.5]), labels=[0, 1])
    labels = torch.arange(512) % 2
    noise = torch.randn(512, 2, generator=gen(0), dtype=F64)
    shares = []
    for scale in (0.0, 1.0, 2.0, 4.0):
        out = sample(guided(mixture, scale), noise, solver="heun", steps=12, class_labels=labels)
        nearest = mixture.labels[torch.cdist(out, mixture.means).argmin(1)]
        shares.append((nearest == labels).double().mean().item())
    assert shares == sorted(shares) and shares[0] < 0.6 and shares[-1] > 0.95
