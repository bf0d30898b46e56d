"""Control pictures made from images, for training a ControlNet on (image, control) pairs and for sampling with it.

Each maps images (B, C, H, W) in [-1, 1] to a control picture of the same height and width:

- ``sobel``: binary edges, where the Sobel gradient magnitude of the grey image exceeds ``EDGE_THRESHOLD`` of its
  largest possible value (Sobel 1968; the classic edge detector, cheap and differentiable-free);
- ``mask``: the binary silhouette of the foreground (grey level above the middle of the range);
- ``lowres``: the image average-pooled by ``LOWRES_FACTOR`` and upsampled back (super-resolution control).

Control pictures are images like any other, in [-1, 1] (binary ones in {-1, 1}: white is an edge or the
foreground), so a picture file read with :func:`difflab.control.inputs.read_image` is one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EDGE_THRESHOLD = 0.4
LOWRES_FACTOR = 4
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_edges(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in {-1, 1}: the Sobel edges (1) of the grey image."""
    grey = (images.float().mean(1, keepdim=True) + 1) / 2  # [0, 1]
    kernels = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(grey.device)  # (2, 1, 3, 3): d/dx, d/dy
    gradient = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = gradient.square().sum(1, keepdim=True).sqrt() / (4 * 2**0.5)  # at most 1
    return (magnitude > EDGE_THRESHOLD).float() * 2 - 1


def silhouette(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in {-1, 1}: where the grey image is brighter than mid-grey (1)."""
    return (images.float().mean(1, keepdim=True) > 0).float() * 2 - 1


def low_resolution(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W): the image at 1/LOWRES_FACTOR resolution, upsampled (nearest) back to its size."""
    small = F.avg_pool2d(images.float(), LOWRES_FACTOR, ceil_mode=True)
    return F.interpolate(small, size=images.shape[-2:], mode="nearest")


CONTROL_PICTURES = {"sobel": sobel_edges, "mask": silhouette, "lowres": low_resolution}


def control_channels(kind: str, image_channels: int) -> int:
    """How many channels the control picture of ``kind`` has for images of ``image_channels``."""
    return image_channels if kind == "lowres" else 1


def edge_scores(images: torch.Tensor, control_edges: torch.Tensor) -> dict[str, float]:
    """How well the Sobel edges of ``images`` follow the edge picture ``control_edges``: F1 and IoU over all
    pixels."""
    edges = sobel_edges(images) > 0
    target = control_edges > 0
    overlap = (edges & target).sum().item()
    precision = overlap / max(edges.sum().item(), 1)
    recall = overlap / max(target.sum().item(), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {"edge_f1": f1, "edge_iou": overlap / max((edges | target).sum().item(), 1),
            "edge_precision": precision, "edge_recall": recall}
