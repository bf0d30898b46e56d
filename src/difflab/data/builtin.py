"""Built-in data sets that install with difflab's dependencies (no downloads)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class ImageDataset:
    """Images in [-1, 1], channels first (N, C, H, W), with optional class labels (N,)."""

    name: str
    images: torch.Tensor  # (N, C, H, W), or (N, C, T, H, W) for video
    labels: torch.Tensor | None = None
    class_names: tuple[str, ...] = ()
    extras: dict = field(default_factory=dict)  # per-sample tensors or lists: trajectories, captions...

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        labels = None if self.labels is None else self.labels[indices]
        extras = {key: [value[i] for i in indices.tolist()] if isinstance(value, list) else value[indices]
                  for key, value in self.extras.items()}
        return ImageDataset(self.name, self.images[indices], labels, self.class_names, extras)

    def split(self, held_out: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """(train, held-out) with a fixed random permutation, e.g. for a metric's noise floor."""
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        cut = len(self) - round(held_out * len(self))
        return self.subset(order[:cut]), self.subset(order[cut:])


def digits() -> ImageDataset:
    """scikit-learn's 1,797 handwritten digits, 8x8 grey levels 0-16 (UCI optdigits), 10 classes."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images).float().div(8).sub(1)[:, None]  # (1797, 1, 8, 8) in [-1, 1]
    labels = torch.from_numpy(data.target).long()
    return ImageDataset("digits", images, labels, tuple(str(c) for c in data.target_names))


HELD_OUT = 0.1  # digits-heldout, emoji-heldout: a fixed 10% (seed 0), never in digits-train, emoji-train


def _part(full: ImageDataset, name: str, held_out: bool) -> ImageDataset:
    """The training or held-out part of a built-in set (a fixed 10%, seed 0), renamed."""
    train, rest = full.split(HELD_OUT)
    return replace(rest if held_out else train, name=name)


def digits_train() -> ImageDataset:
    """The digits without digits-heldout: train on it to evaluate on images the model never saw."""
    return _part(digits(), "digits-train", held_out=False)


def digits_heldout() -> ImageDataset:
    """A fixed 10% of the digits (180 images), held out of digits-train."""
    return _part(digits(), "digits-heldout", held_out=True)


FASHION_MNIST = Path(os.environ.get("DIFFLAB_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (LeCun's MNIST format, optionally gzipped): magic 0x08 0xND, N big-endian sizes, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != math.prod(shape):
        raise ValueError(f"{path} is truncated: expected {math.prod(shape)} values, found {array.size}")
    return array.reshape(shape)


def fashion_mnist() -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 70,000 28x28 grey images of 10 clothing classes (60k train + 10k test),
    read from Debian's ``dataset-fashion-mnist`` package (or ``$DIFFLAB_FASHION_MNIST``)."""
    files = [FASHION_MNIST / f"{split}-{kind}-idx{dims}-ubyte.gz" for split in ("train", "t10k")
             for kind, dims in (("images", 3), ("labels", 1))]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"fashion-mnist is not installed ({missing[0]} is missing): run `sudo apt-get update && sudo apt-get "
            "install dataset-fashion-mnist`, or set DIFFLAB_FASHION_MNIST to a folder with its four IDX files"
        )
    images = np.concatenate([read_idx(files[0]), read_idx(files[2])])
    labels = np.concatenate([read_idx(files[1]), read_idx(files[3])])
    if len(images) != len(labels):
        raise ValueError(f"fashion-mnist: {len(images)} images but {len(labels)} labels")
    tensor = torch.from_numpy(images.copy()).float().div(127.5).sub(1)[:, None]  # (N, 1, 28, 28) in [-1, 1]
    return ImageDataset("fashion-mnist", tensor, torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES)


def moving_digits(frames: int = 8, size: int = 24, digits: int = 1, seed: int = 0) -> ImageDataset:
    """Video of the 1,797 real digits moving on a dark canvas, bouncing off the walls (N, 1, T, size, size).

    Clip i shows digit i and, with ``digits`` > 1, digits i + 1, ... (mod N) too, each on its own path; where
    they overlap the brighter pixel wins. Start positions and integer velocities (1-2 pixels a frame per axis)
    come from ``seed``, so the set is the same everywhere. ``trajectories`` (N, digits, T, 2) holds every digit's
    top-left (row, column) in every frame; ``labels`` are the first digit's class. Options through the data set
    name, e.g. ``moving-digits:frames=16,size=32,digits=2``.
    """
    if frames < 1 or digits < 1 or size < 8:
        raise ValueError(f"moving-digits needs frames >= 1, digits >= 1 and size >= 8, got {frames}, {digits}, {size}")
    still = DATASETS["digits"]()  # the function; the parameter ``digits`` shadows its name here
    generator = torch.Generator().manual_seed(seed)
    count, room = len(still), size - 8
    position = torch.randint(0, room + 1, (count, digits, 2), generator=generator)
    speed = torch.randint(1, 3, (count, digits, 2), generator=generator)
    velocity = speed * (torch.randint(0, 2, (count, digits, 2), generator=generator) * 2 - 1)
    clips = torch.full((count, 1, frames, size, size), -1.0)
    trajectories = torch.empty(count, digits, frames, 2, dtype=torch.long)
    for t in range(frames):
        trajectories[:, :, t] = position
        for i in range(count):
            for d in range(digits):
                r, c = position[i, d].tolist()
                window = clips[i, 0, t, r : r + 8, c : c + 8]
                torch.maximum(window, still.images[(i + d) % count, 0], out=window)
        position = position + velocity  # reflect off the walls
        low, high = position < 0, position > room
        position = torch.where(low, -position, torch.where(high, 2 * room - position, position))
        velocity = torch.where(low | high, -velocity, velocity)
    return ImageDataset("moving-digits", clips, still.labels, still.class_names, {"trajectories": trajectories})


def emoji() -> ImageDataset:
    """Twemoji's captioned colour emoji (CC-BY 4.0) at 32x32, curated and cached at first use (see ``data.emoji``)."""
    from difflab.data.emoji import emoji as build  # lazy: that module imports curation and shards, which import this

    return build()


def emoji_train() -> ImageDataset:
    """The emoji without emoji-heldout (the split the autoencoder benchmark trains on)."""
    return _part(emoji(), "emoji-train", held_out=False)


def emoji_heldout() -> ImageDataset:
    """A fixed 10% of the emoji (391 images), held out of emoji-train."""
    return _part(emoji(), "emoji-heldout", held_out=True)


DATASETS: dict[str, Callable[[], ImageDataset]] = {
    "digits": digits, "digits-train": digits_train, "digits-heldout": digits_heldout, "moving-digits": moving_digits,
    "fashion-mnist": fashion_mnist, "emoji": emoji, "emoji-train": emoji_train, "emoji-heldout": emoji_heldout,
}


def dataset_spec(spec: str) -> tuple[str, dict]:
    """(name, options) of a data set spec ``NAME[:key=value,...]``: ``moving-digits:frames=16,digits=2`` or
    ``clips/:frames=8,size=32`` (integers become ints)."""
    name, colon, rest = spec.rpartition(":")
    if not colon or "=" not in rest:
        return spec, {}
    options = {}
    for item in rest.split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key.isidentifier() or not value:
            raise ValueError(f"data set {spec!r}: options are key=value pairs separated by commas, got {item!r}")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, options


def dataset_exists(spec: str) -> bool:
    """Whether ``spec`` names a built-in set, a shard folder or a folder of videos (options not checked)."""
    name, _ = dataset_spec(spec)
    return name in DATASETS or Path(name).is_dir()


def load_dataset(spec: str) -> ImageDataset:
    """A built-in data set by name, a shard folder written by ``difflab data shard``, or a folder of video clips
    (read whole into memory, see ``difflab.data.load_videos``); options after a colon (:func:`dataset_spec`)."""
    name, options = dataset_spec(spec)
    if name in DATASETS:
        try:
            return DATASETS[name](**options)
        except TypeError:
            raise ValueError(f"data set {name!r} takes no options {sorted(options)}") from None
    if (Path(name) / "index.json").is_file():
        from difflab.data.shards import read_shards

        if options:
            raise ValueError(f"a shard folder takes no options (they were fixed when it was written): {spec!r}")
        return read_shards(name)
    if Path(name).is_dir():
        from difflab.data.video import load_videos

        try:
            dataset, skipped = load_videos(name, **options)
        except TypeError:
            raise ValueError(f"a video folder takes the options frames, size, stride and mode, got {sorted(options)}"
                             ) from None
        if skipped:
            warnings.warn(f"{name}: {len(skipped)} clips skipped, e.g. {skipped[0]['path']}: {skipped[0]['error']}",
                          stacklevel=2)
        return dataset
    raise ValueError(f"unknown data set {spec!r}: not a shard or video folder, nor one of {', '.join(DATASETS)}")
