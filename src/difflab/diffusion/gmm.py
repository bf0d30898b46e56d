"""An exact denoiser: the posterior mean of an isotropic Gaussian mixture (ground truth for every solver).

For data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x = x0 + sigma n``, component k gives
``x ~ N(mu_k, (s_k^2 + sigma^2) I)`` and ``E[x0 | x, k] = (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2)``;
the denoiser averages these with the posterior responsibilities, computed by log-sum-exp in float64.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from difflab.conditioning.embedding import NULL_CLASS


class GaussianMixture:
    """Isotropic Gaussian mixture with an exact denoiser ``D(x, sigma, class_labels=None)``.

    ``sample_shape`` shapes samples (e.g. ``(1, 8, 8)`` for an image-like mixture); the denoiser accepts
    any batch ``(B, *sample_shape)``. ``labels`` assigns components to classes, so the same object is
    also an exact class-conditional denoiser; the label ``NULL_CLASS`` (-1) keeps every component, the
    unconditional denoiser classifier-free guidance pairs with it.
    """

    def __init__(
        self,
        means: torch.Tensor,
        stds: torch.Tensor | float,
        weights: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_shape: Sequence[int] | None = None,
    ):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(self.means.shape)}")
        k, d = self.means.shape
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        if (self.stds <= 0).any():
            raise ValueError("component standard deviations must be positive")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w <= 0).any():
            raise ValueError(f"weights must be {k} positive numbers")
        self.weights = w / w.sum()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (d,)
        if math.prod(self.sample_shape) != d:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {d} values")

    @classmethod
    def ring(cls, components: int = 8, radius: float = 1.0, std: float = 0.05) -> GaussianMixture:
        """2-D: equal components on a circle, a standard toy with well-separated modes."""
        angle = torch.arange(components, dtype=torch.float64) * 2 * math.pi / components
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
        return cls(means, std, labels=torch.arange(components))

    @classmethod
    def random(
        cls, dim: int, components: int = 16, std: float = 0.1, spread: float = 0.6, seed: int = 0,
        sample_shape: Sequence[int] | None = None,
    ) -> GaussianMixture:
        """Random means with coordinates ~ N(0, spread^2), random weights and stds, all from a seed."""
        g = torch.Generator().manual_seed(seed)
        means = spread * torch.randn(components, dim, generator=g, dtype=torch.float64)
        stds = std * (0.5 + torch.rand(components, generator=g, dtype=torch.float64))
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, stds, weights, labels=torch.arange(components) % 10, sample_shape=sample_shape)

    @classmethod
    def fit(cls, samples: torch.Tensor, components: int = 16, seed: int = 0, max_iter: int = 200) -> GaussianMixture:
        """Fit an isotropic mixture to data (B, ...) by EM (scikit-learn's ``spherical`` covariance).

        A cheap proxy of a data set's denoiser, e.g. to search an optimised schedule before a network
        exists or without calling it.
        """
        from sklearn.mixture import GaussianMixture as SklearnMixture

        if samples.shape[0] < components:
            raise ValueError(f"need at least {components} samples to fit {components} components")
        flat = samples.detach().reshape(samples.shape[0], -1).double().cpu().numpy()
        fitted = SklearnMixture(components, covariance_type="spherical", random_state=seed, max_iter=max_iter).fit(flat)
        return cls(torch.from_numpy(fitted.means_), torch.from_numpy(fitted.covariances_).sqrt(),
                   torch.from_numpy(fitted.weights_), sample_shape=samples.shape[1:])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"expected samples of shape {self.sample_shape}, got {tuple(x.shape[1:])}")
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def _log_joint(self, x: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; mu_k, var_k I) for x (B, D) and variances var (B, K)."""
        means = self.means.to(x.device)
        # ||x - mu||^2 expanded into a matrix product: exact enough in float64, far faster for large K, D.
        sq = (x.square().sum(-1, keepdim=True) - 2 * x @ means.T + means.square().sum(-1)).clamp(min=0)  # (B, K)
        return self.weights.to(x.device).log() - 0.5 * (sq / var + self.dim * (2 * math.pi * var).log())

    def _log_posterior(self, x: torch.Tensor, var: torch.Tensor, class_labels: torch.Tensor | None):
        """log p(k | x, class), restricted to the components of each sample's class unless it is NULL_CLASS."""
        logits = self._log_joint(x, var)
        if class_labels is not None and (class_labels != NULL_CLASS).any():
            if self.labels is None:
                raise ValueError("this mixture has no component labels; pass labels= to condition on classes")
            class_labels = class_labels.to(x.device)[:, None]
            keep = (self.labels.to(x.device)[None, :] == class_labels) | (class_labels == NULL_CLASS)
            if not keep.any(1).all():
                raise ValueError("a class label matches no mixture component")
            logits = logits.masked_fill(~keep, -math.inf)
        return logits.log_softmax(-1)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None):
        """The posterior mean E[x0 | x0 + sigma n = x]; computed in float64, returned in x's dtype."""
        flat = self._flat(x)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).expand(x.shape[0])
        s2 = self.stds.to(x.device).square()[None, :]  # (1, K)
        var = s2 + sigma[:, None] ** 2  # (B, K)
        r = self._log_posterior(flat, var, class_labels).exp()  # (B, K)
        a = (r * s2 / var).sum(-1, keepdim=True)  # weight on x
        denoised = a * flat + sigma[:, None] ** 2 * ((r / var) @ self.means.to(x.device))
        return denoised.reshape(x.shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """log p(x) of the mixture convolved with N(0, sigma^2 I), per sample."""
        return self._log_joint_at(x, sigma).logsumexp(-1)

    def component(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """Each sample's most probable component (B,) under the mixture convolved with N(0, sigma^2 I)."""
        return self._log_joint_at(x, sigma).argmax(-1)

    def _log_joint_at(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        flat = self._flat(x)
        var = (self.stds.to(x.device).square() + sigma**2)[None, :].expand(flat.shape[0], -1)
        return self._log_joint(flat, var)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples, float64, shape (n, *sample_shape)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.stds[k, None] * z).reshape(n, *self.sample_shape)

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact mean (D,) and covariance (D, D) of the mixture."""
        mean = self.weights @ self.means
        centred = self.means - mean
        cov = (self.weights[:, None] * centred).T @ centred
        cov += torch.diag(torch.full((self.dim,), float(self.weights @ self.stds.square()), dtype=torch.float64))
        return mean, cov

    def fingerprint(self) -> str:
        """A stable hash of the parameters, used as a cache key for optimised schedules."""
        h = hashlib.sha1()
        for t in (self.means, self.stds, self.weights):
            h.update(t.contiguous().numpy().tobytes())
        h.update(repr(self.sample_shape).encode())
        return h.hexdigest()[:16]
