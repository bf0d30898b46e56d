"""Batches for training: from an in-memory data set, or streamed from shards by worker processes.

Both loaders share one order. Epoch ``e`` visits the samples in the order ``randperm(N, seed + e)``; global
batch ``i`` is positions ``[i B, (i + 1) B)`` of the concatenated epochs, and rank ``r`` of ``W`` takes its
``r``-th ``B / W`` slice. With aspect-ratio buckets an epoch is instead a shuffled list of one-bucket
batches (each bucket's samples shuffled and cut into batches of ``B``; the few that do not fill a batch
wait for another epoch's shuffle), so a batch never mixes sizes. The state is just (epoch, position): a resumed run, or
one on another number of processes, sees the same global batches.
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from difflab.data.builtin import ImageDataset, load_dataset


class Batch(NamedTuple):
    """One process's share of a global batch: samples, class labels (or None) and the samples' data set indices
    (which find their captions)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    indices: torch.Tensor


class Order:
    """Which samples each global batch holds (see the module docstring); ``buckets`` (N,) groups samples."""

    def __init__(self, count: int, batch: int, seed: int = 0, buckets: torch.Tensor | None = None):
        if count < 1 or batch < 1:
            raise ValueError(f"need at least one sample and a positive batch, got {count} samples, batch {batch}")
        self.count, self.batch, self.seed, self.buckets = count, batch, seed, buckets
        if buckets is not None and torch.bincount(buckets).max() < batch:
            raise ValueError(f"no aspect-ratio bucket holds a full batch of {batch} (largest: "
                             f"{int(torch.bincount(buckets).max())}); use a smaller batch or fewer buckets")
        self._cached: tuple[int, torch.Tensor] | None = None

    def epoch(self, epoch: int) -> torch.Tensor:
        """The sample indices of ``epoch`` in visiting order."""
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.count, generator=generator)
            if self.buckets is not None:
                batches = []
                for bucket in self.buckets.unique().tolist():
                    members = order[self.buckets[order] == bucket]
                    full = len(members) - len(members) % self.batch
                    batches += list(members[:full].split(self.batch))
                shuffled = torch.randperm(len(batches), generator=generator).tolist()
                order = torch.cat([batches[i] for i in shuffled])
            self._cached = (epoch, order)
        return self._cached[1]

    def take(self, state: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """The global batch at ``state`` = (epoch, position), and the state after it."""
        epoch, position = state
        chunks, needed = [], self.batch
        while needed:
            order = self.epoch(epoch)
            chunk = order[position : position + needed]
            chunks.append(chunk)
            needed -= len(chunk)
            position += len(chunk)
            if position == len(order):
                epoch, position = epoch + 1, 0
        return torch.cat(chunks), (epoch, position)


def _rank_slice(batch: int, rank: int, world_size: int) -> slice:
    share = batch // world_size
    return slice(rank * share, (rank + 1) * share)


class _Resumable:
    """The (epoch, position) state and the rank's slice of a global batch, shared by both loaders."""

    def __init__(self, order: Order, rank: int, world_size: int):
        if order.batch % world_size:
            raise ValueError(f"global batch {order.batch} is not divisible by {world_size} processes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.order, self.rank, self.world_size = order, rank, world_size
        self.epoch, self.position = 0, 0

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BatchLoader(_Resumable):
    """Endless shuffled :class:`Batch` es of an in-memory data set, sharded by rank, resumable."""

    def __init__(self, dataset: ImageDataset, batch: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__(Order(len(dataset), batch, seed), rank, world_size)
        self.dataset = dataset
        self.sample_shape = tuple(dataset.images.shape[1:])
        self.num_classes = dataset.num_classes
        self.bucketed, self.encoder = False, None

    def __next__(self) -> Batch:
        indices, (self.epoch, self.position) = self.order.take((self.epoch, self.position))
        indices = indices[_rank_slice(len(indices), self.rank, self.world_size)]
        labels = None if self.dataset.labels is None else self.dataset.labels[indices]
        return Batch(self.dataset.images[indices], labels, indices)

    def captions(self) -> tuple[list[str], list[list[str]] | None] | None:
        """(caption, aliases or None) of every item, or None for a data set without captions."""
        captions = self.dataset.extras.get("captions")
        return None if captions is None else (_complete(captions), self.dataset.extras.get("aliases"))


class ShardReader:
    """Random access to the samples of a shard folder (``difflab data shard``), through its index."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{self.folder} is not a shard folder (index.json: {exc})") from None
        if self.index.get("format") != "difflab.shards.v2":
            raise ValueError(f"{self.folder}: unsupported shard format {self.index.get('format')!r}; "
                             "write it again with difflab data shard")
        samples = torch.tensor(self.index["samples"], dtype=torch.long).reshape(-1, 7)
        # Per sample: shard, PNG offset and size, JSON offset and size, label (-1: none), bucket.
        (self.shard, self.offset, self.size, self.meta_offset, self.meta_size, self.labels,
         self.bucket) = samples.unbind(1)
        self.sizes = [tuple(size) for size in self.index["buckets"]]  # (height, width) per bucket
        self.latent = self.index.get("kind") == "latent"  # latents of data.encoder (difflab encode)
        self._files: dict[int, io.BufferedReader] = {}

    def __len__(self) -> int:
        return len(self.shard)

    def __getstate__(self) -> dict:  # open files stay behind when a worker process receives the reader
        return {**self.__dict__, "_files": {}}

    def _read(self, k: int, offset: torch.Tensor, size: torch.Tensor) -> bytes:
        shard = int(self.shard[k])
        if shard not in self._files:
            self._files[shard] = open(self.folder / self.index["shards"][shard], "rb")  # noqa: SIM115
        file = self._files[shard]
        file.seek(int(offset[k]))
        return file.read(int(size[k]))

    def image(self, k: int):
        """Sample ``k`` as stored: a Pillow image that covers its bucket's size (cropped or not)."""
        from PIL import Image

        return Image.open(io.BytesIO(self._read(k, self.offset, self.size))).convert(self.index["mode"])

    def meta(self, k: int) -> dict:
        """Sample ``k``'s JSON member: label, caption and source path."""
        return json.loads(self._read(k, self.meta_offset, self.meta_size))

    def tensors(self, indices: torch.Tensor, offsets: np.ndarray | None = None) -> torch.Tensor:
        """Samples ``indices`` cropped to their bucket's size, stacked (B, C, H, W) in [-1, 1]; or, for latent
        shards, the latents as written.

        ``offsets`` (B, 2) in [0, 1) place random crops; None crops the centre.
        """
        from difflab.data.sources import to_tensor

        if self.latent:
            return torch.stack([load_safetensors(self._read(k, self.offset, self.size))["latent"]
                                for k in indices.tolist()])
        images = []
        for j, k in enumerate(indices.tolist()):
            image = self.image(k)
            height, width = self.sizes[int(self.bucket[k])]
            fraction = (0.5, 0.5) if offsets is None else offsets[j]
            top = int(fraction[0] * (image.height - height + 1))
            left = int(fraction[1] * (image.width - width + 1))
            images.append(to_tensor(image.crop((left, top, left + width, top + height))))
        return torch.stack(images)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


class _Stream(torch.utils.data.IterableDataset):
    """The rank's batches from ``state`` on; worker w of k decodes global batches w, w + k, w + 2k..."""

    def __init__(self, reader: ShardReader, order: Order, state: tuple[int, int], rank: int, world_size: int,
                 random_crop: bool):
        self.reader, self.order, self.state, self.random_crop = reader, order, state, random_crop
        self.mine = _rank_slice(order.batch, rank, world_size)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        state, number = self.state, 0
        while True:
            start = state
            indices, state = self.order.take(state)
            if number % workers == worker:
                offsets = None
                if self.random_crop:  # drawn for the global batch: a sample's crop ignores the world size
                    offsets = np.random.default_rng([self.order.seed, *start]).random((len(indices), 2))
                    offsets = offsets[self.mine]
                mine = indices[self.mine]
                labels = self.reader.labels[mine]
                yield Batch(self.reader.tensors(mine, offsets), labels if self.reader.index["classes"] else None, mine)
            number += 1


@functools.lru_cache(maxsize=4)
def _shard_captions(index: str, stamp: int) -> tuple[str | None, ...]:
    """Every item's caption of the shard folder whose ``index.json`` is ``index`` (as modified at ``stamp``)."""
    reader = ShardReader(Path(index).parent)
    try:
        return tuple(reader.meta(k).get("caption") for k in range(len(reader)))
    finally:
        reader.close()


class ShardLoader(_Resumable):
    """Endless :class:`Batch` es streamed from a shard folder, decoded by ``workers`` processes.

    Samples are read by offset from the tar shards (no archive is held in memory); random-crop shards are
    cropped afresh at every visit, deterministically from the seed and the batch's place in the order;
    bucketed shards give one-size batches. Order, rank slicing and state are those of :class:`BatchLoader`.
    """

    def __init__(self, folder: str | Path, batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int = 0, prefetch: int = 2):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.reader = ShardReader(folder)
        index = self.reader.index
        buckets = self.reader.bucket if len(self.reader.sizes) > 1 else None
        super().__init__(Order(len(self.reader), batch, seed, buckets), rank, world_size)
        self.workers, self.prefetch, self.random_crop = workers, prefetch, index["crop"] == "random"
        self.bucketed = len(self.reader.sizes) > 1  # then batches differ in size from sample_shape's square
        if self.reader.latent:
            self.sample_shape = tuple(index["shape"])
        else:
            channels = 3 if index["mode"] == "RGB" else 1
            self.sample_shape = (channels, index["resolution"], index["resolution"])
        self.encoder = index.get("encoder")  # what made latent shards
        self.num_classes = len(index["classes"])
        self._batches = None

    def __next__(self) -> Batch:
        if self._batches is None:
            stream = _Stream(self.reader, self.order, (self.epoch, self.position), self.rank, self.world_size,
                             self.random_crop)
            options = {"prefetch_factor": self.prefetch} if self.workers else {}
            self._batches = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers,
                                                             **options))
        batch = next(self._batches)
        _, (self.epoch, self.position) = self.order.take((self.epoch, self.position))
        return Batch(*batch)

    def captions(self) -> tuple[list[str], None] | None:
        """(caption of every item, None: shards keep no aliases), or None when no item has a caption. Read once
        per process and shard folder (its set-up check, the caption bank and every sample grid ask)."""
        index = self.reader.folder / "index.json"
        captions = list(_shard_captions(str(index.resolve()), index.stat().st_mtime_ns))
        return (_complete(captions), None) if any(captions) else None

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.close()  # the next batch starts a stream at the new state

    def close(self) -> None:
        """Stop the worker processes (a later batch starts them again)."""
        self._batches = None
        self.reader.close()


def _complete(captions: list) -> list[str]:
    """The captions, if every item has one; a data set where some lack one cannot condition on text."""
    missing = [k for k, caption in enumerate(captions) if not caption]
    if missing:
        raise ValueError(f"{len(missing)} of {len(captions)} items have no caption (first: item {missing[0]}); "
                         "a text-conditioned run needs one for every item")
    return list(captions)


def open_loader(name: str, batch: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                workers: int = 0) -> BatchLoader | ShardLoader:
    """The loader for a data set name: a shard folder streams, a built-in set is held in memory."""
    if (Path(name) / "index.json").is_file():
        return ShardLoader(name, batch, seed, rank, world_size, workers)
    return BatchLoader(load_dataset(name), batch, seed, rank, world_size)
