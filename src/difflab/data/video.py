"""Video sources: clip files (MP4/WebM/MKV/MOV/AVI through PyAV; GIF and animated WebP/PNG through Pillow) and
frame folders (a folder of still images, read in natural name order: 2.png before 10.png).

A folder of clips is laid out like a folder of images (see :mod:`difflab.data.sources`): labels are first-level
sub-folder names, captions come from a ``name.txt``/``name.json`` sidecar beside a clip or frame folder, or from
``metadata.jsonl`` at the root. Frames are normalised like still images (palette and transparency composited on
white) and cropped like shards (:func:`difflab.data.shards.preprocess`). PyAV is the optional extra
``difflab[video]``, imported only when a video file is read; PyAV itself rather than imageio's ``pyav`` plugin,
which reports every unreadable file as "can not handle the given uri", where a skipped clip should say why.
"""

from __future__ import annotations

import os
import re
from itertools import islice
from pathlib import Path

import torch

from difflab.data.builtin import ImageDataset
from difflab.data.shards import preprocess
from difflab.data.sources import (
    IMAGE_EXTENSIONS,
    SIDECARS,
    Record,
    _read_metadata,
    describe,
    load_image,
    normalise,
    to_tensor,
)

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".webm", ".mkv", ".mov", ".avi", ".mpg", ".mpeg"})
ANIMATED_EXTENSIONS = frozenset({".gif", ".png", ".webp"})  # image formats Pillow reads several frames from


def read_clip(path: str | Path, mode: str = "RGB", max_frames: int | None = None) -> list:
    """The frames of a video file, animated image or frame folder as Pillow images in ``mode`` ("RGB" or "L").

    ``max_frames`` stops decoding early, so a long clip costs only the frames a loader keeps.
    """
    from PIL import Image, ImageSequence

    path = Path(path)
    if path.is_dir():
        files = _frame_files(path)
        if not files:
            raise ValueError(f"{path} holds no images")
        return [load_image(file, mode) for file in files[:max_frames]]
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return _decode_video(path, mode, max_frames)
    if suffix not in IMAGE_EXTENSIONS:
        raise ValueError(f"{path} is not a video, an image or a frame folder")
    with Image.open(path) as image:
        if getattr(image, "is_animated", False):
            return [normalise(frame, mode) for frame in islice(ImageSequence.Iterator(image), max_frames)]
    return [load_image(path, mode)]  # a still is a one-frame clip, EXIF-rotated like any image


def scan_videos(root: str | Path) -> list[Record]:
    """Every clip under ``root`` (sorted; sidecars and ``metadata.jsonl`` excluded) with its label and caption.

    A clip is a file or a frame folder: a folder below the root with no sub-folders that holds only still images.
    Other files are listed too, as :func:`~difflab.data.sources.scan_folder` does, so that loading reports them.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"source {str(root)!r} is not a folder")
    clips = []
    for folder, subfolders, names in os.walk(root):
        folder = Path(folder)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files = [folder / name for name in names if not name.startswith(".")]
        if folder != root and not subfolders and files and all(map(_is_still, files)):
            clips.append(folder)
        else:
            clips.extend(files)
    stems = {clip.with_suffix("") for clip in clips
             if clip.is_dir() or clip.suffix.lower() in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS}
    metadata = _read_metadata(root / "metadata.jsonl")
    records = []
    for clip in sorted(clips):
        relative = clip.relative_to(root)
        sidecar = clip.suffix.lower() in SIDECARS and clip.with_suffix("") in stems
        if sidecar or relative.as_posix() == "metadata.jsonl":
            continue
        records.append(describe(root, clip, metadata))
    if not records:
        raise ValueError(f"source {str(root)!r} holds no clips")
    return records


def load_videos(root: str | Path, frames: int = 8, size: int = 32, stride: int = 1,
                mode: str = "RGB") -> tuple[ImageDataset, list[dict]]:
    """Every clip under ``root`` as ``frames`` frames taken every ``stride`` from its start, resized and
    centre-cropped to ``size``: images (N, C, frames, size, size), class labels, ``extras["captions"]``.

    Also returns the clips left out, ``{"path", "error"}`` as in a shard index: unreadable, corrupt, or too short
    (short clips are not looped or padded). They come beside the data set rather than in ``extras``, whose entries
    are per clip (``subset`` and ``split`` index them). Class indices follow all scanned labels, sorted, so a
    corrupt clip does not renumber the classes; an unlabelled clip among labelled ones gets -1.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be RGB or L, got {mode!r}")
    if min(frames, size, stride) < 1:
        raise ValueError("frames, size and stride must be positive")
    records = scan_videos(root)
    classes = sorted({r.label for r in records if r.label is not None})
    needed = (frames - 1) * stride + 1
    clips, kept, skipped = [], [], []
    for record in records:
        try:
            decoded = read_clip(Path(root) / record.path, mode, max_frames=needed)
        except ImportError:
            raise  # a missing extra is the user's to fix, not a property of one clip
        except Exception as exc:  # noqa: BLE001  (any decoder error means this clip is unreadable)
            skipped.append({"path": record.path, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"})
            continue
        if len(decoded) < needed:
            skipped.append({"path": record.path, "error": f"too short: {len(decoded)} frames, needs {needed}"})
            continue
        clips.append(torch.stack([to_tensor(preprocess(f, size)) for f in decoded[::stride]], dim=1))  # (C, T, H, W)
        kept.append(record)
    if not clips:
        first = skipped[0]
        raise ValueError(f"no readable clip of {needed} frames under {str(root)!r} "
                         f"({len(skipped)} skipped, e.g. {first['path']}: {first['error']})")
    labels = torch.tensor([classes.index(r.label) if r.label is not None else -1 for r in kept]) if classes else None
    captions = [r.caption for r in kept]
    dataset = ImageDataset(Path(root).resolve().name, torch.stack(clips), labels, tuple(classes),
                           {"captions": captions} if any(captions) else {})
    return dataset, skipped


def _decode_video(path: Path, mode: str, max_frames: int | None) -> list:
    try:
        import av
    except ImportError:
        raise ImportError(f'reading {path.suffix} clips needs PyAV: pip install "difflab[video]"') from None
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        return [frame.to_image().convert(mode) for frame in islice(container.decode(video=0), max_frames)]


def _is_still(path: Path) -> bool:
    """Whether ``path`` can be a frame of a frame folder: an image, and not an animated one."""
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return False
    if path.suffix.lower() not in ANIMATED_EXTENSIONS:
        return True
    from PIL import Image

    try:
        with Image.open(path) as image:
            return not getattr(image, "is_animated", False)
    except OSError:  # a broken frame: reported when its folder is read
        return True


def _frame_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", p.name)])
