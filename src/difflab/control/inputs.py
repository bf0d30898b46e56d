"""Pictures that steer sampling, read from files: init images and clips, masks, kept frames, control images."""

from __future__ import annotations

from pathlib import Path

import torch

MODES = {1: "L", 3: "RGB"}


def read_image(path: str | Path, resolution: int, channels: int) -> torch.Tensor:
    """(1, channels, resolution, resolution) in [-1, 1]: resized (shortest side) and centre-cropped."""
    from difflab.data.shards import preprocess
    from difflab.data.sources import load_image, to_tensor

    if channels not in MODES:
        raise ValueError(f"images have 1 or 3 channels; this model has {channels}")
    try:
        image = load_image(path, MODES[channels])
    except FileNotFoundError:
        raise FileNotFoundError(f"no image at {path}") from None
    except OSError as exc:
        raise ValueError(f"{path}: not a readable image ({exc})") from None
    return to_tensor(preprocess(image, resolution))[None]


def read_mask(path: str | Path, resolution: int) -> torch.Tensor:
    """(1, 1, resolution, resolution) in [0, 1] from a grey-scale picture: white (1) is generated, black kept."""
    return read_image(path, resolution, 1).add(1).div(2)


def read_video(path: str | Path, frames: int, resolution: int, channels: int) -> torch.Tensor:
    """(1, channels, frames, resolution, resolution) in [-1, 1]: the first ``frames`` frames of a clip (MP4, GIF,
    a folder of frames...), each resized and centre-cropped like the training clips."""
    from difflab.data.shards import preprocess
    from difflab.data.sources import to_tensor
    from difflab.data.video import read_clip

    if channels not in MODES:
        raise ValueError(f"clips have 1 or 3 channels; this model has {channels}")
    if not Path(path).exists():
        raise FileNotFoundError(f"no clip at {path}")
    try:
        decoded = read_clip(path, MODES[channels], max_frames=frames)
    except ImportError:
        raise
    except Exception as exc:  # noqa: BLE001  (any decoder error: the file is not a readable clip)
        raise ValueError(f"{path}: not a readable clip ({type(exc).__name__}: {exc})") from None
    if len(decoded) < frames:
        raise ValueError(f"{path} has {len(decoded)} frames; this run makes clips of {frames}")
    return torch.stack([to_tensor(preprocess(frame, resolution)) for frame in decoded], dim=1)[None]


def frame_mask(kept: list[int], frames: int) -> torch.Tensor:
    """(1, 1, frames, 1, 1): 0 on the ``kept`` frames of the init clip, 1 (generated) on the others. Keeping frame 0
    of a still image is image-to-video; the first and last, interpolation; the first k, extension."""
    bad = [k for k in kept if not -frames <= k < frames]
    if bad:
        raise ValueError(f"frame {bad[0]} is outside a clip of {frames} frames (0..{frames - 1}, or negative from "
                         "the end)")
    mask = torch.ones(1, 1, frames, 1, 1)
    mask[:, :, kept] = 0
    if not mask.any():
        raise ValueError("every frame is kept: nothing is left to generate")
    return mask
