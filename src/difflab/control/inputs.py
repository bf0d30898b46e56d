"""Pictures that steer sampling, read from files: init images, masks and control images."""

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
