"""The data stage: built-in data sets and loaders (curation, shards and streaming come later)."""

from difflab.data.builtin import DATASETS, BatchLoader, ImageDataset, digits, load_dataset

__all__ = ["DATASETS", "BatchLoader", "ImageDataset", "digits", "load_dataset"]
