"""The data stage: built-in data sets, 2-D toys and loaders (curation, shards and streaming come later)."""

from difflab.data.builtin import DATASETS, BatchLoader, ImageDataset, digits, fashion_mnist, load_dataset, moving_digits
from difflab.data.toys import TOYS, checkerboard, ring, swiss_roll

__all__ = ["DATASETS", "TOYS", "BatchLoader", "ImageDataset", "checkerboard", "digits", "fashion_mnist",
           "load_dataset", "moving_digits", "ring", "swiss_roll"]
