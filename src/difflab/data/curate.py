"""Curation: find what is wrong with a source before training on it, keep what is good, say why for the rest.

Every item gets zero or more reasons from a fixed vocabulary (README): ``corrupt`` (zero bytes, truncated or
undecodable image), ``not_image`` (not an image at all), ``exact_duplicate`` (same decoded pixels as a kept
item), ``near_duplicate`` (perceptual-hash distance to a kept item within ``near_duplicate_bits``, confirmed
by the correlation of their 16x16 grey thumbnails, since a 64-bit hash alone collides on simple images),
``too_small``, ``bad_aspect``, ``low_information`` (near-uniform), ``blurry`` (little high-frequency energy
for its contrast) and ``bad_caption`` (empty, too short, boilerplate or not text, when the source has
captions). Duplicate groups keep their largest member. Class counts give inverse-frequency sampling
weights, written into the curated manifest.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from difflab.data.sources import IMAGE_EXTENSIONS, Record, load_image

REASONS = ("corrupt", "not_image", "exact_duplicate", "near_duplicate", "too_small", "bad_aspect",
           "low_information", "blurry", "bad_caption")
BOILERPLATE = re.compile(r"^(image|img|photo|picture|pic|untitled|stock photo|dsc|screenshot)[\s_\-]*\d*$|"
                         r"^(img|dsc|dscn|pxl)[_\-]?\d+$|lorem ipsum", re.IGNORECASE)


@dataclass(frozen=True)
class CurationConfig:
    """Thresholds of the curation rules (the config keys of ``difflab data curate --set``)."""

    min_size: int = 8  # shortest side, pixels
    max_aspect: float = 3.0  # long side / short side
    min_std: float = 0.02  # grey-level standard deviation (0-1 scale) below which an image is near-uniform
    min_sharpness: float = 0.05  # variance of the Laplacian over the grey-level variance
    near_duplicate_bits: int = 6  # of 64 in the difference hash
    near_duplicate_correlation: float = 0.9  # of the 16x16 grey thumbnails, to confirm a hash match
    min_caption_chars: int = 3
    min_letter_share: float = 0.5  # letters among a caption's non-space characters


@dataclass
class Item:
    record: Record
    reasons: list[str]
    width: int = 0
    height: int = 0
    pixel_hash: str | None = None
    dhash: int | None = None
    thumbnail: np.ndarray | None = None  # 16x16 grey, zero mean, unit norm
    std: float = 0.0
    sharpness: float = 0.0
    duplicate_of: str | None = None

    @property
    def kept(self) -> bool:
        return not self.reasons


def inspect(root: Path, record: Record, config: CurationConfig) -> Item:
    """Decode one item and apply every per-item rule (duplicates are found across items later)."""
    item, path = Item(record, []), root / record.path
    if path.stat().st_size == 0:
        item.reasons.append("corrupt")
        return item
    try:
        image = load_image(path)
    except Exception as exc:  # Pillow raises many types for bad data  # noqa: BLE001
        unidentified = type(exc).__name__ == "UnidentifiedImageError"
        not_image = unidentified and path.suffix.lower() not in IMAGE_EXTENSIONS
        item.reasons.append("not_image" if not_image or (unidentified and _looks_like_text(path)) else "corrupt")
        return item
    item.width, item.height = image.size
    grey = np.asarray(image.convert("L"), dtype=np.float64) / 255
    item.pixel_hash = hashlib.sha256(np.asarray(image).tobytes() + bytes(str(image.size), "ascii")).hexdigest()
    item.dhash = difference_hash(image)
    item.thumbnail = _normalised_thumbnail(image)
    item.std = float(grey.std())
    item.sharpness = sharpness(grey)
    if min(image.size) < config.min_size:
        item.reasons.append("too_small")
    if max(image.size) / max(min(image.size), 1) > config.max_aspect:
        item.reasons.append("bad_aspect")
    if item.std < config.min_std:
        item.reasons.append("low_information")
    elif min(image.size) >= 3 and item.sharpness < config.min_sharpness:
        item.reasons.append("blurry")
    return item


def difference_hash(image) -> int:
    """64-bit dHash (Krawetz 2013): signs of horizontal gradients of the 9x8 grey thumbnail."""
    from PIL import Image

    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def _normalised_thumbnail(image) -> np.ndarray:
    from PIL import Image

    thumb = np.asarray(image.convert("L").resize((16, 16), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    thumb = thumb - thumb.mean()
    norm = np.linalg.norm(thumb)
    return thumb / norm if norm > 0 else thumb


def sharpness(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the variance of the image: contrast-free blur measure."""
    if min(grey.shape) < 3 or grey.var() == 0:
        return 0.0
    laplacian = (grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1])
    return float(laplacian.var() / grey.var())


def caption_problem(caption: str | None, config: CurationConfig) -> bool:
    text = (caption or "").strip()
    visible = [c for c in text if not c.isspace()]
    if len(text) < config.min_caption_chars or BOILERPLATE.search(text):
        return True
    return sum(c.isalpha() for c in visible) < config.min_letter_share * len(visible)


def curate(root: str | Path, records: list[Record], config: CurationConfig = CurationConfig(),
           progress: bool = False) -> list[Item]:
    """Apply every rule to every record; duplicates keep the largest member of their group."""
    root = Path(root)
    items = [inspect(root, r, config) for r in tqdm(records, disable=not progress, desc="inspecting", unit="file")]
    has_captions = any(r.caption for r in records)
    for item in items:
        if has_captions and item.pixel_hash and caption_problem(item.record.caption, config):
            item.reasons.append("bad_caption")
    decoded = [i for i in items if i.pixel_hash and "too_small" not in i.reasons]
    decoded.sort(key=lambda i: (-i.width * i.height, -i.sharpness, i.record.path))  # best first
    representatives: dict[str, Item] = {}
    hashes: list[tuple[int, Item]] = []
    for item in decoded:
        if item.pixel_hash in representatives:
            item.reasons.append("exact_duplicate")
            item.duplicate_of = representatives[item.pixel_hash].record.path
            continue
        representatives[item.pixel_hash] = item
        near = next((rep for h, rep in hashes if (h ^ item.dhash).bit_count() <= config.near_duplicate_bits
                     and float(rep.thumbnail @ item.thumbnail) >= config.near_duplicate_correlation), None)
        if near is not None and "low_information" not in item.reasons:
            item.reasons.append("near_duplicate")
            item.duplicate_of = near.record.path
        elif "low_information" not in item.reasons:
            hashes.append((item.dhash, item))
    for item in items:
        item.reasons = [r for r in REASONS if r in item.reasons]  # vocabulary order
    return items


def sampling_weights(items: list[Item]) -> dict[str, float]:
    """Inverse-frequency weights per label of the kept items, normalised to mean 1 over items."""
    counts = Counter(i.record.label for i in items if i.kept and i.record.label is not None)
    if not counts:
        return {}
    total, classes = sum(counts.values()), len(counts)
    return {label: total / (classes * count) for label, count in counts.items()}


def report(items: list[Item]) -> dict:
    """The machine-readable report: counts per reason, every removed item with its reasons, kept count."""
    counts = Counter(reason for i in items for reason in i.reasons)
    removed = [dict(path=i.record.path, reasons=i.reasons, **({"duplicate_of": i.duplicate_of} if i.duplicate_of
                                                              else {}))
               for i in items if not i.kept]
    labels = Counter(i.record.label for i in items if i.kept and i.record.label is not None)
    imbalance = max(labels.values()) / min(labels.values()) if labels else 1.0
    return {"counts": {r: counts.get(r, 0) for r in REASONS}, "removed": removed,
            "kept": sum(i.kept for i in items), "total": len(items), "classes": dict(sorted(labels.items())),
            "class_imbalance": imbalance}


def statistics(items: list[Item]) -> dict:
    """Size, aspect, sharpness and caption-length figures of the decodable items."""
    decoded = [i for i in items if i.pixel_hash]

    def summary(values):
        if not values:
            return {}
        array = np.asarray(values, dtype=np.float64)
        return {"min": float(array.min()), "median": float(np.median(array)), "max": float(array.max())}

    return {
        "width": summary([i.width for i in decoded]), "height": summary([i.height for i in decoded]),
        "aspect": summary([max(i.width, i.height) / max(min(i.width, i.height), 1) for i in decoded]),
        "sharpness": summary([i.sharpness for i in decoded if math.isfinite(i.sharpness)]),
        "caption_chars": summary([len(i.record.caption) for i in decoded if i.record.caption]),
    }


def _looks_like_text(path: Path) -> bool:
    head = path.read_bytes()[:512]
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
