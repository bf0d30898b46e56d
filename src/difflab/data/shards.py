"""WebDataset-style tar shards: ``shard-NNNNN.tar`` files of ``KEY.png`` + ``KEY.json`` pairs and an ``index.json``.

Plain ``tarfile`` rather than the ``webdataset`` package: the format is a few lines to write and read, and
the files stay readable by ``webdataset`` (same member naming), without another dependency. Images are
preprocessed once when sharding, so training reads pixels, not JPEG decoding work: resized to cover
``resolution`` squared (or, with aspect-ratio buckets, the bucket nearest the image's aspect), then
centre-cropped, or left uncropped for the loader to crop at random at every visit. The index records
every sample's byte offset in its shard, so :class:`~difflab.data.loader.ShardLoader` reads any sample
without scanning an archive. Shards and the index are written under temporary names and renamed.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from tqdm.auto import tqdm

from difflab.data.builtin import ImageDataset
from difflab.data.sources import Record, load_image
from difflab.paths import replacing, write_atomic

FORMAT = "difflab.shards.v2"
CROPS = ("center", "random")


def cover(image, height: int, width: int):
    """Resize (Lanczos) to the smallest size that covers ``height`` x ``width``, keeping the aspect."""
    from PIL import Image

    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def centre_crop(image, height: int, width: int):
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def preprocess(image, resolution: int):
    """Resize the shortest side to ``resolution`` (Lanczos) and crop the centre square."""
    return centre_crop(cover(image, resolution, resolution), resolution, resolution)


def aspect_buckets(resolution: int, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) sizes of at most ``resolution`` squared pixels, sides multiples of ``resolution // 8``
    (at least 1), aspect up to ``max_aspect``; tallest first. The square is always one of them."""
    step = max(resolution // 8, 1)
    sizes = set()
    for width in range(step, int(resolution * max_aspect) + 1, step):
        height = resolution * resolution // width // step * step
        if height and max(height, width) / min(height, width) <= max_aspect:
            sizes.add((height, width))
    return sorted(sizes, key=lambda size: size[1] / size[0])


def write_shards(root: str | Path, records: list[Record], out: str | Path, resolution: int, mode: str = "RGB",
                 per_shard: int = 1000, name: str | None = None, crop: str = "center", buckets: bool = False,
                 progress: bool = False) -> dict:
    """Preprocess ``records`` into shards under ``out``; returns the index (also written as index.json).

    ``crop="random"`` stores images uncropped (covering their size) for the loader's random crops;
    ``buckets`` sorts images into :func:`aspect_buckets` instead of cropping them all square.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be RGB or L, got {mode!r}")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if resolution < 1 or per_shard < 1:
        raise ValueError("resolution and per_shard must be positive")
    root, out = Path(root), Path(out)
    sizes = aspect_buckets(resolution) if buckets else [(resolution, resolution)]
    classes = sorted({r.label for r in records if r.label is not None})
    skipped = []
    encoded = _encode(root, records, mode, sizes, crop, classes, skipped, progress)
    index = {"format": FORMAT, "kind": "image", "name": name or Path(root).name, "resolution": resolution,
             "mode": mode, "crop": crop, "buckets": [list(size) for size in sizes], "classes": classes,
             "skipped": skipped}
    return _write(out, encoded, "png", per_shard, index, f"no readable images among {len(records)} records")


def write_latent_shards(out: str | Path, batches, encoder: str, classes: list[str], name: str,
                        per_shard: int = 1000) -> dict:
    """Shards of latents: ``batches`` yields (latents (B, C, ...), labels (B,) or None, captions or None);
    ``encoder`` is what made them (a run directory or a VAE folder), recorded so samples can be decoded."""

    def encoded():
        for latents, labels, captions in batches:
            for k, latent in enumerate(latents):
                label = None if labels is None or labels[k] < 0 else int(labels[k])
                meta = json.dumps({"label": label, "caption": None if captions is None else captions[k]}).encode()
                yield save_safetensors({"latent": latent.contiguous().cpu()}), meta, -1 if label is None else label, 0

    items = encoded()
    first = next(items, None)
    if first is None:
        raise ValueError("no samples to encode")
    shape = list(load_safetensors(first[0])["latent"].shape)
    index = {"format": FORMAT, "kind": "latent", "name": name, "encoder": encoder, "shape": shape,
             "resolution": shape[-1], "mode": "latent", "crop": "center", "buckets": [shape[-2:]],
             "classes": classes, "skipped": []}
    return _write(Path(out), itertools.chain([first], items), "safetensors", per_shard, index, "no samples")


def _write(out: Path, encoded, extension: str, per_shard: int, index: dict, empty: str) -> dict:
    """Write (payload, meta, label, bucket) items into shards of ``per_shard``, then ``index.json``."""
    out.mkdir(parents=True, exist_ok=True)
    shards, samples = [], []
    while chunk := list(itertools.islice(encoded, per_shard)):
        shard = f"shard-{len(shards):05d}.tar"
        with replacing(out / shard) as tmp, tarfile.open(tmp, "w") as tar:
            for payload, meta, label, bucket in chunk:
                key = f"{len(samples):08d}"
                payload_at, meta_at = _add(tar, f"{key}.{extension}", payload), _add(tar, f"{key}.json", meta)
                samples.append([len(shards), payload_at, len(payload), meta_at, len(meta), label, bucket])
        shards.append(shard)
    if not samples:
        raise ValueError(empty)
    index = {**index, "count": len(samples), "shards": shards, "samples": samples}
    write_atomic(out / "index.json", json.dumps(index, separators=(",", ":")))
    return index


def read_shards(folder: str | Path) -> ImageDataset:
    """All samples of a shard folder in memory, in key order, centre-cropped (small and medium data sets)."""
    from difflab.data.loader import ShardReader

    reader = ShardReader(folder)
    if len(reader.sizes) > 1:
        raise ValueError(f"{folder} holds aspect-ratio buckets of different sizes, which only the streaming loader "
                         "serves (ShardLoader, or training on the folder), not an in-memory data set")
    images = reader.tensors(torch.arange(len(reader)))
    captions = [reader.meta(k)["caption"] for k in range(len(reader))]
    reader.close()
    index = reader.index
    labels = reader.labels if index["classes"] else None
    return ImageDataset(index["name"], images, labels, tuple(index["classes"]),
                        {"captions": captions} if any(captions) else {})


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a member; returns the byte offset of its data in the archive."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # data is padded to whole blocks


def _encode(root: Path, records: list[Record], mode: str, sizes: list[tuple[int, int]], crop: str,
            classes: list[str], skipped: list[dict], progress: bool):
    """(PNG bytes, JSON bytes, label or -1, bucket) per readable record; the unreadable go to ``skipped``."""
    for record in tqdm(records, disable=not progress, desc="sharding", unit="image"):
        try:
            image = load_image(root / record.path, mode)
        except Exception as exc:  # noqa: BLE001  (curation reports these; sharding only skips them)
            skipped.append({"path": record.path, "error": f"{type(exc).__name__}: {exc}"})
            continue
        aspect = math.log(image.width / image.height)
        bucket = min(range(len(sizes)), key=lambda b: abs(math.log(sizes[b][1] / sizes[b][0]) - aspect))
        image = cover(image, *sizes[bucket])
        if crop == "center":
            image = centre_crop(image, *sizes[bucket])
        png = io.BytesIO()
        image.save(png, format="PNG")
        label = classes.index(record.label) if record.label is not None else None
        meta = json.dumps({"label": label, "caption": record.caption, "source": record.path}).encode()
        yield png.getvalue(), meta, -1 if label is None else label, bucket
