"""Sources of images with labels and captions: a folder (any depth), a JSON Lines manifest, or an .npz archive.

A folder's labels are its first-level sub-folder names; captions come from a ``name.txt`` or ``name.json``
(``{"caption": ...}``) sidecar beside each image, or from ``metadata.jsonl`` at the root (one object per
line with ``file_name`` or ``path``, and ``caption``/``text`` and/or ``label``), which wins over sidecars.
Images are decoded with Pillow and normalised: EXIF orientation applied, palette/CMYK/16-bit/grey converted,
transparency composited on white.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
SIDECARS = (".txt", ".json")


@dataclass(frozen=True)
class Record:
    """One item of a source: where it is (relative to the source root), its label and its caption."""

    path: str
    label: str | None = None
    caption: str | None = None


def scan_folder(root: str | Path) -> list[Record]:
    """Every file under ``root`` (sorted, sidecars and ``metadata.jsonl`` excluded) with its label and caption.

    Non-image files are listed too, so that curation can report them rather than silently skip them.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"source {str(root)!r} is not a folder")
    metadata = _read_metadata(root / "metadata.jsonl")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_EXTENSIONS}
    records = []
    for file in files:
        relative = file.relative_to(root).as_posix()
        if relative == "metadata.jsonl" or (file.suffix.lower() in SIDECARS and file.with_suffix("") in stems):
            continue
        records.append(describe(root, file, metadata))
    if not records:
        raise ValueError(f"source {str(root)!r} holds no files")
    return records


def describe(root: Path, path: Path, metadata: dict[str, dict]) -> Record:
    """The record of ``path`` under ``root``: label from ``metadata.jsonl`` or the first sub-folder, caption
    from ``metadata.jsonl`` or a sidecar."""
    relative = path.relative_to(root)
    meta = metadata.get(relative.as_posix(), {})
    label = meta.get("label", relative.parts[0] if len(relative.parts) > 1 else None)
    caption = meta.get("caption", meta.get("text", _sidecar_caption(path)))
    return Record(relative.as_posix(), None if label is None else str(label), caption)


def read_manifest(path: str | Path) -> list[Record]:
    """Records from a manifest: JSON Lines, or Parquet (``.parquet``, needs pyarrow) with the same columns:
    ``path`` (or ``file_name``), optional ``caption`` (or ``text``) and ``label``."""
    path = Path(path)
    rows = _read_parquet(path) if path.suffix.lower() == ".parquet" else _read_jsonl(path)
    records = []
    for number, row in enumerate(rows, 1):
        if row.get("path") is None and row.get("file_name") is None:
            raise ValueError(f"{path}:{number}: a manifest row needs a path")
        label = row.get("label")
        records.append(Record(str(row.get("path", row.get("file_name"))), None if label is None else str(label),
                              row.get("caption", row.get("text"))))
    if not records:
        raise ValueError(f"manifest {str(path)!r} is empty")
    return records


def load_image(path: str | Path, mode: str = "RGB"):
    """A decoded Pillow image in ``mode`` ("RGB" or "L"): EXIF-rotated, alpha composited on white."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image.load()  # decode now: truncated files fail here, not later
        image = ImageOps.exif_transpose(image)
    return normalise(image, mode)


def normalise(image, mode: str = "RGB"):
    """A decoded Pillow image (or animation frame) in ``mode``: 16-bit grey scaled to 8 bits, palette and
    transparency composited on white."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array * (255.0 / max(array.max(), 1.0))).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert(mode)


def to_tensor(image) -> torch.Tensor:
    """A Pillow image as a float tensor (C, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    array = array[..., None] if array.ndim == 2 else array
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1)


def read_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """(images (N, C, H, W) or (N, C, T, H, W) in [-1, 1], labels, captions) from an .npz archive.

    ``images`` is uint8 channels-last (as ``difflab sample --out x.npz`` writes) or float channels-first in
    [-1, 1]; ``labels`` (int) and ``captions`` (str) are optional.
    """
    with np.load(path, allow_pickle=False) as archive:
        if "images" not in archive:
            raise ValueError(f"{path} has no 'images' array (found: {', '.join(archive.files) or 'nothing'})")
        images = archive["images"]
        labels = torch.from_numpy(archive["labels"].astype(np.int64)) if "labels" in archive else None
        captions = [str(c) for c in archive["captions"]] if "captions" in archive else None
    if images.dtype == np.uint8:
        tensor = torch.from_numpy(images).float().div(127.5).sub(1).movedim(-1, 1)
    else:
        tensor = torch.from_numpy(images.astype(np.float32))
    if tensor.ndim not in (4, 5):
        raise ValueError(f"{path}: images must be (N, H, W, C) uint8 or (N, C, H, W) float, got {images.shape}")
    for name, values in (("labels", labels), ("captions", captions)):
        if values is not None and len(values) != len(tensor):
            raise ValueError(f"{path}: {len(tensor)} images but {len(values)} {name}")
    return tensor, labels, captions


def _sidecar_caption(image: Path) -> str | None:
    text, meta = image.with_suffix(".txt"), image.with_suffix(".json")
    if text.is_file():
        return text.read_text(errors="replace").strip()
    if meta.is_file():
        try:
            value = json.loads(meta.read_text())
        except json.JSONDecodeError:
            return None
        return value.get("caption", value.get("text")) if isinstance(value, dict) else None
    return None


def _read_metadata(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = _read_jsonl(path)
    return {str(row.get("file_name", row.get("path"))): row for row in rows}


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f'reading the Parquet manifest {path} needs pyarrow: pip install "difflab[parquet]"') \
            from None
    if not path.is_file():
        raise ValueError(f"cannot read {str(path)!r}: no such file")
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # what pyarrow raises for truncated and foreign files
        raise ValueError(f"cannot read Parquet manifest {str(path)!r}: {str(exc).splitlines()[0]}") from None
    return table.to_pylist()


def _read_jsonl(path: Path) -> Iterable[dict]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            rows.append(row)
    return rows
