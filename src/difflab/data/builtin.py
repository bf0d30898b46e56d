"""Built-in data sets that install with difflab's dependencies (no downloads), and a resumable batch loader."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageDataset:
    """Images in [-1, 1], channels first (N, C, H, W), with optional class labels (N,)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> ImageDataset:
        labels = None if self.labels is None else self.labels[indices]
        return ImageDataset(self.name, self.images[indices], labels, self.class_names)

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


DATASETS: dict[str, Callable[[], ImageDataset]] = {"digits": digits}


def load_dataset(name: str) -> ImageDataset:
    try:
        return DATASETS[name]()
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; built in: {', '.join(DATASETS)}") from None


class BatchLoader:
    """Endless shuffled batches of an in-memory data set, sharded by rank, resumable at any batch.

    Epoch ``e`` visits the data in the order ``randperm(N, seed + e)``; global batch ``i`` is positions
    ``[i B, (i + 1) B)`` of the concatenated epochs, and rank ``r`` of ``W`` takes its ``r``-th
    ``B / W`` slice. The state is just (epoch, position), so a resumed or re-sharded run sees the same
    global batches.
    """

    def __init__(self, dataset: ImageDataset, batch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if batch % world_size:
            raise ValueError(f"global batch {batch} is not divisible by {world_size} processes")
        self.dataset, self.batch, self.seed, self.rank, self.world_size = dataset, batch, seed, rank, world_size
        self.epoch, self.position = 0, 0
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.dataset), generator=generator)}
        return self._orders[epoch]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        chunks, needed = [], self.batch
        while needed:
            order = self._order(self.epoch)[self.position : self.position + needed]
            chunks.append(order)
            needed -= len(order)
            self.position += len(order)
            if self.position == len(self.dataset):
                self.epoch, self.position = self.epoch + 1, 0
        share = self.batch // self.world_size
        indices = torch.cat(chunks)[self.rank * share : (self.rank + 1) * share]
        labels = None if self.dataset.labels is None else self.dataset.labels[indices]
        return self.dataset.images[indices], labels

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
