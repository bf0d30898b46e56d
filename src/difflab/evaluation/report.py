"""Score a set of samples against the real data set: one function for ``difflab eval``, the demo and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.data import ImageDataset
from difflab.evaluation.features import FeatureExtractor, feature_network
from difflab.evaluation.metrics import (
    classification_accuracy,
    frechet_distance,
    nearest_neighbour_distances,
    precision_recall,
)


def sample_metrics(images: torch.Tensor, labels: torch.Tensor | None, dataset: ImageDataset,
                   extractor: FeatureExtractor | None = None) -> dict:
    """Fréchet distance and precision/recall in the feature space of a network trained on ``dataset``, class
    accuracy of conditional samples, and how close samples sit to their nearest training image.

    ``memorisation_ratio`` is the median distance of a sample to its nearest training image divided by
    the median distance of a real image to its nearest *other* real image: near 1 means samples are as
    novel as real data, near 0 means copies.
    """
    extractor = extractor or FeatureExtractor.from_network(feature_network(dataset.images, dataset.labels))
    fake, real = extractor(images), extractor(dataset.images)
    precision, recall = precision_recall(real, fake)
    sample_nn = nearest_neighbour_distances(images, dataset.images).median().item()
    real_nn = nearest_neighbour_distances(dataset.images, dataset.images, exclude_self=True).median().item()
    metrics = dict(n=len(images), frechet_distance=frechet_distance(fake, real), precision=precision,
                   recall=recall, nearest_train_distance=sample_nn, real_nearest_distance=real_nn,
                   memorisation_ratio=sample_nn / real_nn)
    if labels is not None and extractor.has_logits and (labels >= 0).all():
        metrics["class_accuracy"] = classification_accuracy(extractor.logits(images), labels)
    return metrics


def noise_floor(dataset: ImageDataset, extractor: FeatureExtractor | None = None, seed: int = 0) -> float:
    """Fréchet distance between two random halves of the real data: the best a sample set of that size can do."""
    extractor = extractor or FeatureExtractor.from_network(feature_network(dataset.images, dataset.labels))
    first, second = dataset.split(0.5, seed=seed)
    return frechet_distance(extractor(first.images), extractor(second.images))


def save_nearest_pairs(images: torch.Tensor, dataset: ImageDataset, path: str | Path, count: int = 20) -> Path:
    """A picture: samples (top row) above their nearest training images (bottom row)."""
    from difflab.evaluation.plots import save_image_grid

    images = images[:count]
    distances = torch.cdist(images.flatten(1).double(), dataset.images.flatten(1).double())
    nearest = dataset.images[distances.argmin(dim=1)]
    return save_image_grid(torch.cat([images, nearest]), path, columns=len(images))
