"""WebDataset-style tar shards: ``shard-NNNNN.tar`` files of ``KEY.png`` + ``KEY.json`` pairs and an ``index.json``.

Plain ``tarfile`` rather than the ``webdataset`` package: the format is a few lines to write and read, and
the files stay readable by ``webdataset`` (same member naming), without another dependency. Images are
preprocessed once when sharding (shortest side resized to the resolution, centre crop), so training
reads pixels, not JPEG decoding work. Shards and the index are written under temporary names and renamed.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.data.builtin import ImageDataset
from difflab.data.sources import Record, load_image, to_tensor


def preprocess(image, resolution: int):
    """Resize the shortest side to ``resolution`` (Lanczos) and crop the centre square."""
    from PIL import Image

    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.LANCZOS)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def write_shards(root: str | Path, records: list[Record], out: str | Path, resolution: int, mode: str = "RGB",
                 per_shard: int = 1000, name: str | None = None, progress: bool = False) -> dict:
    """Preprocess ``records`` into shards under ``out``; returns the index (also written as index.json)."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be RGB or L, got {mode!r}")
    if resolution < 1 or per_shard < 1:
        raise ValueError("resolution and per_shard must be positive")
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted({r.label for r in records if r.label is not None})
    shards, skipped, writer, count = [], [], None, 0
    for record in tqdm(records, disable=not progress, desc="sharding", unit="image"):
        try:
            image = preprocess(load_image(root / record.path, mode), resolution)
        except Exception as exc:  # noqa: BLE001  (curation reports these; sharding only skips them)
            skipped.append({"path": record.path, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if writer is None or count % per_shard == 0:
            writer = _close(writer, out, shards)
            writer = (tarfile.open(out / f".shard-{len(shards):05d}.tar.tmp", "w"), f"shard-{len(shards):05d}.tar")
        key = f"{count:08d}"
        png = io.BytesIO()
        image.save(png, format="PNG")
        meta = {"label": classes.index(record.label) if record.label is not None else None,
                "caption": record.caption, "source": record.path}
        _add(writer[0], f"{key}.png", png.getvalue())
        _add(writer[0], f"{key}.json", json.dumps(meta).encode())
        count += 1
    _close(writer, out, shards)
    if not count:
        raise ValueError(f"no readable images among {len(records)} records")
    index = {"name": name or Path(root).name, "resolution": resolution, "mode": mode, "count": count,
             "shards": shards, "classes": classes, "skipped": skipped}
    tmp = out / ".index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    tmp.replace(out / "index.json")
    return index


def read_shards(folder: str | Path) -> ImageDataset:
    """All samples of a shard folder in memory, in key order (small and medium data sets)."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "index.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{folder} is not a shard folder (index.json: {exc})") from None
    from PIL import Image

    images, labels, captions = [], [], []
    for shard in index["shards"]:
        with tarfile.open(folder / shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for key in sorted({name.rsplit(".", 1)[0] for name in members}):
                image = Image.open(io.BytesIO(tar.extractfile(members[f"{key}.png"]).read()))
                meta = json.loads(tar.extractfile(members[f"{key}.json"]).read())
                images.append(to_tensor(image.convert(index["mode"])))
                labels.append(-1 if meta["label"] is None else meta["label"])
                captions.append(meta["caption"])
    if len(images) != index["count"]:
        raise ValueError(f"{folder}: index.json promises {index['count']} samples, shards hold {len(images)}")
    has_labels = bool(index["classes"])
    return ImageDataset(index["name"], torch.stack(images), torch.tensor(labels) if has_labels else None,
                        tuple(index["classes"]), {"captions": captions} if any(captions) else {})


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _close(writer, out: Path, shards: list[str]):
    """Finish the open shard and move it into place; returns None."""
    if writer is not None:
        tar, final = writer
        tmp = Path(tar.name)
        tar.close()
        tmp.replace(out / final)
        shards.append(final)
    return None
