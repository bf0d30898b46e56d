"""Figures: error against NFE, and scatter panels of 2-D samples."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def plot_error_vs_nfe(
    series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str = "", ylabel: str = "endpoint RMSE"
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
