"""Metrics and feature networks: closed forms, brute-force references, a peer formula, and the digits classifier."""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from difflab.evaluation import features as features_module
from difflab.evaluation import metrics as metrics_module
from difflab.evaluation.features import (
    DigitFeatureNet,
    FeatureExtractor,
    FeatureNetConfig,
    feature_network,
    feature_network_key,
    load_feature_extractor,
)
from difflab.evaluation.metrics import (
    classification_accuracy,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_moments,
    nearest_neighbour_distances,
    precision_recall,
)


def correlated(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + shift


# Fréchet distance ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, d", [(2000, 64), (40, 64)])  # the second has a singular covariance
def test_frechet_of_identical_sets_is_zero(n, d):
    x = correlated(n, d, seed=0, shift=3.0)
    mu, cov = feature_statistics(x)
    scale = np.trace(cov)
    assert frechet_distance(x, x) < 1e-6 * scale
    assert frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(x).float()) < 1e-6 * scale
    assert frechet_distance_from_moments(mu, cov, mu, cov) < 1e-6 * scale


def test_frechet_from_moments_matches_closed_form():
    d = 16
    mu1, mu2 = np.zeros(d), np.linspace(-1, 1, d)
    s1, s2 = np.linspace(0.5, 2.0, d), np.linspace(2.0, 0.0, d)  # the last variance is 0: singular
    exact = np.square(mu1 - mu2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance_from_moments(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(exact, rel=1e-10)
    # The distance is invariant under a common rotation, which makes both covariances non-diagonal. Rounding
    # moves the zero eigenvalue of the rotated s2 to ~1e-16, and its square root to ~1e-8: at a singular
    # covariance the distance itself is that sensitive, whatever the algorithm.
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((d, d)))
    rotated = frechet_distance_from_moments(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert rotated == pytest.approx(exact, rel=1e-7)


def test_sample_frechet_converges_to_closed_form():
    d, n = 16, 20000
    rng = np.random.default_rng(1)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = np.linspace(0.5, 2.0, d), np.linspace(2.0, 0.2, d)
    exact = np.square(mu1 - mu2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    a = mu1 + rng.standard_normal((n, d)) * np.sqrt(s1)
    b = mu2 + rng.standard_normal((n, d)) * np.sqrt(s2)
    assert frechet_distance(a, b) == pytest.approx(exact, rel=0.05)


def test_frechet_matches_the_sqrtm_formula_and_its_own_moments():
    a, b = correlated(3000, 32, seed=2, shift=1.0), correlated(2500, 32, seed=3)
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    # The formula of pytorch-fid and most FID code, on well-conditioned full-rank covariances.
    peer = np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(peer, rel=1e-9)
    assert frechet_distance_from_moments(mu1, s1, mu2, s2) == pytest.approx(peer, rel=1e-9)


def test_frechet_input_checks():
    assert frechet_distance(np.full((3, 2), np.nan), np.ones((3, 2))) == math.inf
    with pytest.raises(ValueError):
        frechet_distance(np.ones((5, 3)), np.ones((5, 4)))
    with pytest.raises(ValueError):
        frechet_distance(np.ones((1, 3)), np.ones((5, 3)))
    with pytest.raises(ValueError):
        frechet_distance_from_moments(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# Precision and recall -------------------------------------------------------------------------------------------


def brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        dist = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(dist, axis=1)[:, k]  # column 0 is the sample itself

    def coverage(queries, centres, r):
        return (np.linalg.norm(queries[:, None] - centres[None], axis=-1) <= r[None]).any(axis=1).mean()

    return coverage(fake, real, radii(real)), coverage(real, fake, radii(fake))


def test_precision_recall_matches_brute_force_in_blocks(monkeypatch):
    real, fake = correlated(300, 8, seed=4), correlated(250, 8, seed=5, shift=0.5)
    expected = brute_precision_recall(real, fake, k=3)
    assert precision_recall(real, fake, k=3) == pytest.approx(expected, abs=1e-12)
    monkeypatch.setattr(metrics_module, "_BLOCK_ENTRIES", 1000)  # several blocks of rows
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=3) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_extremes():
    x = torch.randn(2000, 64, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()) == (1.0, 1.0)
    assert precision_recall(x, x + 100.0) == (0.0, 0.0)


def test_precision_recall_of_mode_dropping():
    generator = torch.Generator().manual_seed(0)
    # Four far-apart modes in 2-d (in high dimensions k-NN balls cover a mode's tails poorly, which lowers
    # precision even for a perfect fake set); the fake set has only the first two, with the same total.
    modes = torch.tensor([[20.0, 0.0], [0.0, 20.0], [-20.0, 0.0], [0.0, -20.0]])
    real = modes.repeat_interleave(500, 0) + torch.randn(2000, 2, generator=generator)
    fake = modes[:2].repeat_interleave(1000, 0) + torch.randn(2000, 2, generator=generator)
    precision, recall = precision_recall(real, fake)
    assert precision > 0.95
    assert 0.45 < recall <= 0.5


def test_precision_recall_rejects_bad_k():
    with pytest.raises(ValueError):
        precision_recall(torch.randn(4, 2), torch.randn(4, 2), k=4)


# Accuracy and nearest neighbours ---------------------------------------------------------------------------------


def test_classification_accuracy():
    labels = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor([[2.0, 0, 0], [0, 1, 0], [0, 3, 1], [0, 5, 0]])
    assert classification_accuracy(logits, labels) == 0.75
    assert classification_accuracy(np.array([0, 1, 2, 1]), labels.numpy()) == 1.0
    with pytest.raises(ValueError):
        classification_accuracy(torch.tensor([0, 1]), labels)


@pytest.mark.parametrize("block_entries", [1 << 24, 50])
def test_nearest_neighbour_distances_match_brute_force(monkeypatch, block_entries):
    monkeypatch.setattr(metrics_module, "_BLOCK_ENTRIES", block_entries)
    generator = torch.Generator().manual_seed(0)
    queries, references = torch.randn(37, 1, 4, 4, generator=generator), torch.randn(23, 1, 4, 4, generator=generator)
    brute = (queries.flatten(1)[:, None].double() - references.flatten(1)[None].double()).norm(dim=-1)
    torch.testing.assert_close(nearest_neighbour_distances(queries, references), brute.min(dim=1).values)
    within = (references.flatten(1)[:, None].double() - references.flatten(1)[None].double()).norm(dim=-1)
    within.fill_diagonal_(math.inf)
    torch.testing.assert_close(nearest_neighbour_distances(references, references, exclude_self=True),
                               within.min(dim=1).values)
    assert nearest_neighbour_distances(references, references).max() < 1e-6  # a copy is found at distance ~0


# Feature networks ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8 - 1  # (1797, 1, 8, 8) in [-1, 1]
    labels = torch.tensor(data.target)
    train, held_out = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=data.target)
    return images[train], labels[train], images[held_out], labels[held_out]


def test_feature_network_trains_caches_and_reloads(digits, tmp_path, monkeypatch):
    train_x, train_y, test_x, test_y = digits
    rng_state = torch.get_rng_state()
    network = feature_network(train_x, train_y, cache_dir=tmp_path)
    extractor = FeatureExtractor.from_network(network)
    assert classification_accuracy(extractor.logits(test_x), test_y) >= 0.95
    features = extractor(test_x)
    assert features.shape == (len(test_x), FeatureNetConfig.feature_dim) and features.dtype == torch.float32
    assert len(list((tmp_path / "features").glob("digitfeaturenet-*.safetensors"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("trained although the network is cached")

    monkeypatch.setattr(features_module, "_train", no_training)
    cached = feature_network(train_x, train_y, cache_dir=tmp_path)
    assert all(torch.equal(v, cached.state_dict()[k]) for k, v in network.state_dict().items())
    assert not cached.training and not any(p.requires_grad for p in cached.parameters())
    assert torch.equal(torch.get_rng_state(), rng_state)  # training and loading leave the global RNG alone
    torch.testing.assert_close(FeatureExtractor.from_network(cached, batch_size=7)(test_x), features)
    # Other data misses the cache.
    with pytest.raises(AssertionError, match="trained although"):
        feature_network(train_x[:-1], train_y[:-1], cache_dir=tmp_path)


def test_unreadable_cache_file_is_retrained(digits, tmp_path, monkeypatch):
    images, labels = digits[0][:50], digits[1][:50]
    key = feature_network_key(images, labels, FeatureNetConfig())
    path = tmp_path / "features" / f"digitfeaturenet-{key}.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"truncated")
    monkeypatch.setattr(features_module, "_train", lambda config, *args: DigitFeatureNet(config))  # no real training
    with pytest.warns(UserWarning, match="retraining"):
        feature_network(images, labels, cache_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the replaced file loads without a warning
        feature_network(images, labels, cache_dir=tmp_path)


def test_cache_key_depends_on_data_and_settings(digits):
    images, labels = digits[0][:50], digits[1][:50]
    key = feature_network_key(images, labels, FeatureNetConfig())
    assert key == feature_network_key(images.clone(), labels.clone(), FeatureNetConfig())
    changed_pixel = images.clone()
    changed_pixel[3, 0, 4, 4] += 0.25
    assert feature_network_key(changed_pixel, labels, FeatureNetConfig()) != key
    assert feature_network_key(images, labels.roll(1), FeatureNetConfig()) != key
    assert feature_network_key(images, labels, FeatureNetConfig(seed=1)) != key
    assert feature_network_key(images, labels, FeatureNetConfig(width=16)) != key


def test_feature_net_accepts_other_image_sizes():
    network = DigitFeatureNet(FeatureNetConfig(in_channels=3, num_classes=5)).eval()
    for size in [(8, 8), (9, 13), (32, 32)]:
        x = torch.zeros(2, 3, *size)
        assert network(x).shape == (2, 5) and network.features(x).shape == (2, 128)


class TinyFeatures(torch.nn.Module):
    """A stand-in for a user's feature network: features and an exported classifier head."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x.flatten(1)))

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch >= 2.10 deprecates TorchScript
def test_torchscript_feature_extractor_round_trip(tmp_path):
    module = TinyFeatures().eval()
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    extractor = load_feature_extractor(path, batch_size=4)
    x = torch.rand(10, 1, 4, 4) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(extractor(x), module(x))
        torch.testing.assert_close(extractor.logits(x), module.logits(x))


def test_load_feature_extractor_rejects_other_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_feature_extractor(tmp_path / "missing.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not a network")
    pickle = tmp_path / "weights.pt"
    torch.save({"weight": torch.ones(2)}, pickle)  # a plain pickle checkpoint, never unpickled by the loader
    for path in (text, pickle):
        with pytest.raises(ValueError, match="not a TorchScript archive") as error:
            load_feature_extractor(path)
        assert "\n" not in str(error.value)


def test_psnr_and_ssim_match_closed_forms():
    from difflab.evaluation import psnr, ssim

    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert psnr(x, x + 0.1) == pytest.approx(10 * math.log10(4 / 0.01))  # range 2, MSE 0.01
    assert ssim(x, x) == pytest.approx(1.0) and ssim(x, -x) < -0.9
    a, b = torch.full((1, 1, 12, 12), 0.2), torch.full((1, 1, 12, 12), -0.4)  # constants: luminance term only
    ua, ub, c1 = 0.6, 0.3, 0.01**2
    assert ssim(a, b) == pytest.approx((2 * ua * ub + c1) / (ua**2 + ub**2 + c1))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])
