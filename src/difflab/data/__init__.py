"""The data stage: sources, curation, shards, built-in data sets, 2-D toys and loaders."""

from difflab.data.builtin import DATASETS, ImageDataset, digits, fashion_mnist, load_dataset, moving_digits
from difflab.data.loader import Batch, BatchLoader, ShardLoader, open_loader
from difflab.data.toys import TOYS, checkerboard, ring, swiss_roll
from difflab.data.video import load_videos, read_clip, scan_videos

__all__ = ["DATASETS", "TOYS", "Batch", "BatchLoader", "ImageDataset", "ShardLoader", "checkerboard", "digits",
           "fashion_mnist", "load_dataset", "load_videos", "moving_digits", "open_loader", "read_clip", "ring",
           "scan_videos", "swiss_roll"]
