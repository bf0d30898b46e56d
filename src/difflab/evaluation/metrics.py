"""Sample-quality metrics on feature vectors: Fréchet distance, precision and recall, accuracy, memorisation.

- Fréchet distance between Gaussians fitted to two feature sets, the quantity behind FID (Heusel et al.
  2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", Eq. 6);
  Dowson & Landau (1982) give the closed form.
- Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models", Eq. 1-2): each set's manifold is the union of k-NN balls around its
  samples.
- Classification accuracy of a classifier on (conditionally generated) samples, and nearest-neighbour
  distances to a reference set, to check that samples are not copies of training images.

Features are (N, D) tensors or arrays; anything with more dimensions is flattened to (N, -1), so the
distance functions also work on images directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from difflab.evaluation.distances import squared_errors

# Pairwise distances are computed in blocks of at most this many entries (float64: 128 MiB).
_BLOCK_ENTRIES = 1 << 24


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of a feature set, in float64 (the moments FID compares)."""
    x = _as_matrix(features)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, Eq. 6); inf if not finite.

    Equal to ``frechet_distance_from_moments(*feature_statistics(a), *feature_statistics(b))``, but the
    trace of the matrix square root comes from the centred data themselves (see ``_trace_sqrt_product``),
    so no square root of a rounding-error eigenvalue enters and identical sets give 0 to machine precision.
    """
    a, b = _as_matrix(features_a), _as_matrix(features_b)
    if a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need two sets of >= 2 feature vectors of equal dimension, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    # Thin QR of the centred data: R^T R / (n - 1) is the covariance, so R^T / sqrt(n - 1) is a factor L.
    factor_a = np.linalg.qr(a - mu_a, mode="r").T / math.sqrt(a.shape[0] - 1)
    factor_b = np.linalg.qr(b - mu_b, mode="r").T / math.sqrt(b.shape[0] - 1)
    return _frechet(mu_a, factor_a, mu_b, factor_b)


def frechet_distance_from_moments(
    mu1: torch.Tensor | np.ndarray, s1: torch.Tensor | np.ndarray, mu2: torch.Tensor | np.ndarray,
    s2: torch.Tensor | np.ndarray,
) -> float:
    """Fréchet distance between N(mu1, s1) and N(mu2, s2): |mu1 - mu2|^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2))."""
    mu1, mu2 = (np.asarray(_to_numpy(m), dtype=np.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (np.asarray(_to_numpy(s), dtype=np.float64) for s in (s1, s2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"moments do not match: mu {mu1.shape}, {mu2.shape}; covariances {s1.shape}, {s2.shape}")
    if not all(np.isfinite(m).all() for m in (mu1, s1, mu2, s2)):
        return math.inf
    return _frechet(mu1, _psd_factor(s1), mu2, _psd_factor(s2))


def _frechet(mu1: np.ndarray, factor1: np.ndarray, mu2: np.ndarray, factor2: np.ndarray) -> float:
    """The Fréchet distance from means and covariance factors L (covariance = L L^T)."""
    trace1, trace2 = np.square(factor1).sum(), np.square(factor2).sum()
    value = np.square(mu1 - mu2).sum() + trace1 + trace2 - 2 * _trace_sqrt_product(factor1, factor2)
    # The exact distance is >= 0; rounding can leave a tiny negative number for equal distributions.
    return max(float(value), 0.0) if math.isfinite(value) else math.inf


def _trace_sqrt_product(factor1: np.ndarray, factor2: np.ndarray) -> float:
    """Tr (s1 s2)^(1/2) for s = L L^T: the nuclear norm of L2^T L1.

    (L2^T L1)^T (L2^T L1) = L1^T s2 L1 has the nonzero eigenvalues of s1 s2, so its singular values are
    the square roots of those eigenvalues; an SVD computes them to absolute accuracy eps |L2| |L1|
    without forming s1 s2 (which squares the condition number) and without taking the square root of
    eigenvalues that are zero up to rounding (which is where ``scipy.linalg.sqrtm`` gains imaginary
    parts and needs an offset on singular covariances).
    """
    return float(np.linalg.svd(factor2.T @ factor1, compute_uv=False).sum())


def _psd_factor(cov: np.ndarray) -> np.ndarray:
    """A factor L with L L^T = cov for a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((cov + cov.T) / 2)
    return eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, averaged over images: 10 log10(range^2 / MSE) per image ([-1, 1]: range 2)."""
    mse = squared_errors(x, y).clamp_min(1e-20)
    return float((10 * torch.log10(data_range**2 / mse)).mean())


def ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004) of (B, C, H, W) images in [-1, 1]: an 11x11 Gaussian window (sigma
    1.5), K1 = 0.01, K2 = 0.03, per channel, averaged over the valid positions, channels and images. Computed on
    intensities in [0, 1]: its luminance term assumes non-negative signals (on zero-mean data an image and its
    negative would score as alike)."""
    x, y, data_range = (x.double() + 1) / 2, (y.double() + 1) / 2, 1.0
    channels = x.shape[1]
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(channels, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, window, groups=channels)

    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM's 11x11 window needs images of at least 11x11, got {tuple(x.shape[-2:])}")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(index.mean())


def precision_recall(
    real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1-2) with k-NN balls, k = 3 as in the paper.

    Precision is the share of fake samples inside the real manifold (the union of balls around each real
    sample reaching its k-th nearest real neighbour); recall is the share of real samples inside the fake
    manifold. Both sets should be the same size, since the radii shrink as a set grows.
    """
    real, fake = _as_tensor(real_features), _as_tensor(fake_features)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: {tuple(real.shape)} and {tuple(fake.shape)}")
    if not 1 <= k < min(real.shape[0], fake.shape[0]):
        raise ValueError(f"k must be in [1, {min(real.shape[0], fake.shape[0]) - 1}] for these sets, got {k}")
    real_radii, fake_radii = _knn_radii(real, k), _knn_radii(fake, k)
    precision = _inside_any_ball(fake, real, real_radii).double().mean().item()
    recall = _inside_any_ball(real, fake, fake_radii).double().mean().item()
    return precision, recall


def _knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest neighbour in its own set (itself excluded)."""
    radii = []
    for start, block in _row_blocks(x, x.shape[0]):
        distances = _cdist(block, x)
        # Mask the sample itself by index, so that duplicates of it still count as neighbours.
        rows = torch.arange(block.shape[0], device=x.device)
        distances[rows, rows + start] = math.inf
        radii.append(distances.kthvalue(k, dim=1).values)
    return torch.cat(radii)


def _inside_any_ball(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Whether each query lies within distance radii[j] of some centre j, as a boolean (N,)."""
    return torch.cat([(_cdist(block, centres) <= radii).any(dim=1) for _, block in _row_blocks(queries, len(centres))])


def nearest_neighbour_distances(
    queries: torch.Tensor | np.ndarray, references: torch.Tensor | np.ndarray, exclude_self: bool = False
) -> torch.Tensor:
    """Euclidean distance from each query to its nearest reference, float64 (N,); computed in blocks.

    To check that samples are not copies of training images, compare the distances of samples to the
    training set with those of held-out real images to it (e.g. their medians): copies sit far closer.
    ``exclude_self`` treats queries and references as the same set and skips each query's own index.
    """
    queries, references = _as_tensor(queries), _as_tensor(references)
    if queries.shape[1] != references.shape[1]:
        raise ValueError(f"dimensions differ: {tuple(queries.shape)} and {tuple(references.shape)}")
    if exclude_self and queries.shape[0] != references.shape[0]:
        raise ValueError(f"exclude_self needs one set, got {len(queries)} queries and {len(references)} references")
    if references.shape[0] - exclude_self < 1:
        raise ValueError("need at least one reference besides the query itself")
    nearest = []
    for start, block in _row_blocks(queries, references.shape[0]):
        distances = _cdist(block, references)
        if exclude_self:
            rows = torch.arange(block.shape[0], device=queries.device)
            distances[rows, rows + start] = math.inf
        nearest.append(distances.min(dim=1).values)
    return torch.cat(nearest)


def classification_accuracy(
    logits_or_predictions: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray
) -> float:
    """Share of correct predictions, from logits (N, num_classes) or predicted labels (N,)."""
    scores, labels = torch.as_tensor(logits_or_predictions), torch.as_tensor(labels)
    predictions = scores.argmax(dim=1) if scores.ndim == 2 else scores
    if predictions.ndim != 1 or predictions.shape != labels.shape or len(labels) == 0:
        raise ValueError(f"need logits (N, K) or predictions (N,) and labels (N,), "
                         f"got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if predictions.is_floating_point():
        raise ValueError("predictions must be integer labels; pass logits as (N, num_classes)")
    return (predictions.cpu() == labels.cpu().to(predictions.dtype)).double().mean().item()


def _cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # The matrix-product form (|a|^2 + |b|^2 - 2 a.b) is the fast one; float64 keeps its cancellation at
    # 1e-8 relative, so a copy of a sample sits at distance ~0, well inside any k-NN ball.
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist")


def _row_blocks(x: torch.Tensor, columns: int):
    """(start, rows) blocks of x small enough that a block of distances to ``columns`` points fits the budget."""
    step = max(1, _BLOCK_ENTRIES // max(columns, 1))
    for start in range(0, x.shape[0], step):
        yield start, x[start:start + step]


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_matrix(features) -> np.ndarray:
    """Features as a float64 numpy matrix (N, D), flattening trailing dimensions."""
    x = np.asarray(_to_numpy(features), dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    return x.reshape(x.shape[0], -1)


def _as_tensor(features) -> torch.Tensor:
    """Features as a float64 torch matrix (N, D) on their device, flattening trailing dimensions."""
    x = features.detach() if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, D), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).double()
