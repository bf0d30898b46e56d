"""The two-stage pipeline's middle step: encode a data set once into latent shards (``difflab encode``)."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.data import load_dataset
from difflab.data.loader import ShardReader
from difflab.data.shards import write_latent_shards
from difflab.representation.encoders import load_encoder


def _batches(dataset: str, batch: int):
    """(name, classes, count, iterator of (images, labels, captions)) of a built-in set or an image shard folder,
    in stored order."""
    if (Path(dataset) / "index.json").is_file():
        reader = ShardReader(dataset)
        if reader.latent:
            raise ValueError(f"{dataset} already holds latents")
        if len(reader.sizes) > 1:
            raise ValueError(f"{dataset} holds aspect-ratio buckets; encode a square-cropped shard folder")
        classes = reader.index["classes"]

        def shard_batches():
            for chunk in torch.arange(len(reader)).split(batch):
                captions = [reader.meta(k)["caption"] for k in chunk.tolist()]
                yield (reader.tensors(chunk), reader.labels[chunk] if classes else None,
                       captions if any(captions) else None)
            reader.close()

        return reader.index["name"], classes, len(reader), shard_batches()
    data = load_dataset(dataset)
    captions = data.extras.get("captions")

    def memory_batches():
        for chunk in torch.arange(len(data)).split(batch):
            yield (data.images[chunk], None if data.labels is None else data.labels[chunk],
                   None if captions is None else [captions[k] for k in chunk.tolist()])

    return data.name, list(data.class_names), len(data), memory_batches()


def encode_dataset(encoder: str | Path, dataset: str, out: str | Path, batch: int = 64, per_shard: int = 1000,
                   device="cpu", progress: bool = False) -> dict:
    """Encode every sample of ``dataset`` (a built-in name or an image shard folder) with ``encoder`` (an
    autoencoder run or a diffusers VAE folder) into latent shards under ``out``, labels and captions kept."""
    model = load_encoder(encoder, device)
    name, classes, count, batches = _batches(dataset, batch)
    bar = tqdm(total=count, disable=not progress, desc="encoding", unit="image")

    def latents():
        for images, labels, captions in batches:
            yield model.encode(images.to(device)).cpu(), labels, captions
            bar.update(len(images))

    try:
        return write_latent_shards(out, latents(), str(Path(encoder).resolve()), classes, name, per_shard)
    finally:
        bar.close()
