"""Evaluation: distances between sample sets, Fréchet distance, precision/recall, feature networks, plots."""

from difflab.evaluation.distances import mmd, rmse, squared_errors
from difflab.evaluation.features import (
    DigitFeatureNet,
    FeatureExtractor,
    cluster_features,
    feature_network,
    load_feature_extractor,
)
from difflab.evaluation.metrics import (
    classification_accuracy,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_moments,
    nearest_neighbour_distances,
    precision_recall,
    psnr,
    ssim,
)

__all__ = [
    "DigitFeatureNet", "FeatureExtractor", "classification_accuracy", "cluster_features", "feature_network",
    "feature_statistics",
    "frechet_distance", "frechet_distance_from_moments", "load_feature_extractor", "mmd",
    "nearest_neighbour_distances", "precision_recall", "psnr", "rmse", "squared_errors", "ssim",
]
