"""Figures: error against NFE, metrics against a swept setting, scatter panels of 2-D samples, image grids."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from difflab.paths import replacing


def plot_error_vs_nfe(
    series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str = "",
    ylabel: str = "endpoint RMSE",
) -> Path:
    """Log-log lines of error against NFE, one per label; dashed lines for labels starting with 'peer'."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        points = sorted((n, e) for n, e in points if e is not None and math.isfinite(e) and e > 0)
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label=label,
                    linestyle="--" if label.startswith("peer") else "-")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations (NFE)", ylabel=ylabel, title=title)
    ticks = sorted({n for points in series.values() for n, _ in points})
    ax.set_xticks(ticks, [f"{n:g}" for n in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_sweep(
    rows: Sequence[Mapping], x: str, metrics: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """One panel per metric against the swept setting ``x``; a line per ``method`` (rows without one: one line)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.2), squeeze=False)
    methods = list(dict.fromkeys(row.get("method", "") for row in rows))
    for ax, metric in zip(axes.flat, metrics):
        for method in methods:
            points = sorted((row[x], row[metric]) for row in rows if row.get("method", "") == method)
            ax.plot(*zip(*points), marker="o", markersize=3, label=method or None)
        ax.set(xlabel=x, title=metric.replace("_", " "))
        ax.grid(True, alpha=0.3)
    if any(methods):
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_sample_panels(
    panels: Mapping[str, torch.Tensor], path: str | Path, columns: int = 3, limit: float = 1.6
) -> Path:
    """A grid of 2-D scatter plots, one panel per titled sample set (N, 2)."""
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (title, points) in zip(axes.flat, panels.items()):
        points = points.detach().reshape(points.shape[0], -1).cpu().double()
        ax.set_axis_on()
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
        ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", title=title, xticks=[], yticks=[])
        ax.title.set_fontsize(9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def to_uint8(images: torch.Tensor):
    """Images (N, C, ...) in [-1, 1] as a uint8 array with channels last, (N, ..., C): what files store."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).movedim(1, -1).numpy()


def image_grid(images: torch.Tensor, columns: int | None = None, scale: int | None = None, pad: int = 1):
    """A PIL image of (N, C, H, W) images in [-1, 1] on a grid; small images are enlarged ``scale`` times.
    Clips (N, C, T, H, W) take a row each, their frames left to right."""
    from PIL import Image

    if images.ndim == 5:
        columns = images.shape[2]
        images = images.transpose(1, 2).flatten(0, 1)
    n, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    scale = scale or max(1, 32 // max(height, width))
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    h, w = height * scale + pad, width * scale + pad
    canvas = torch.full((channels, rows * h + pad, columns * w + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, pad + r * h : pad + r * h + height * scale, pad + c * w : pad + c * w + width * scale] = pixels[i]
    array = canvas.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if channels == 1 else array)


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Write :func:`image_grid` as a PNG (written to a temporary name, then renamed)."""
    with replacing(path) as tmp:
        image_grid(images, columns).save(tmp, format="PNG")
    return Path(path)


VIDEO_FORMATS = (".gif", ".mp4")


def save_video(clips: torch.Tensor, path: str | Path, columns: int | None = None, fps: float = 8.0) -> Path:
    """Clips (N, C, T, H, W) in [-1, 1] as one animation of their grid, frame by frame: ``.gif`` (Pillow, looping)
    or ``.mp4`` (H.264 through PyAV, the ``video`` extra; the grid is padded to even sides, as yuv420p needs)."""
    path = Path(path)
    if clips.ndim != 5:
        raise ValueError(f"a video needs clips (N, C, T, H, W), got shape {tuple(clips.shape)}")
    if path.suffix not in VIDEO_FORMATS:
        raise ValueError(f"a video is written as {' or '.join(VIDEO_FORMATS)}, got {path.name!r}")
    frames = [image_grid(clips[:, :, t], columns).convert("RGB") for t in range(clips.shape[2])]
    with replacing(path) as tmp:
        if path.suffix == ".gif":
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                           loop=0)
        else:
            _write_mp4(frames, tmp, fps)
    return path


def _write_mp4(frames: list, path: Path, fps: float) -> None:
    from fractions import Fraction

    import numpy as np

    try:
        import av
    except ImportError:
        raise ModuleNotFoundError("writing MP4 needs PyAV: pip install 'difflab[video]' (or write a .gif)") from None
    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = *even, "yuv420p"
        for frame in frames:
            canvas = np.full((even[1], even[0], 3), 255, np.uint8)
            canvas[:height, :width] = np.asarray(frame)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
