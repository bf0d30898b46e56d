"""What ``difflab data curate`` writes: the curated manifest, ``report.json`` and a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import torch

from difflab.data.curate import REASONS, Item, report, sampling_weights, statistics
from difflab.data.sources import load_image, to_tensor
from difflab.paths import write_atomic


def write_curation(out: str | Path, root: str | Path, items: list[Item]) -> dict:
    """Write ``manifest.jsonl`` (kept items: absolute path, label, caption, sampling weight, size),
    ``report.json`` (paths relative to the source) and ``report.html``; return the report."""
    out, root = Path(out), Path(root).resolve()
    out.mkdir(parents=True, exist_ok=True)
    weights = sampling_weights(items)
    rows = [dict(path=str(root / i.record.path), label=i.record.label, caption=i.record.caption,
                 weight=weights.get(i.record.label, 1.0), width=i.width, height=i.height)
            for i in items if i.kept]
    write_atomic(out / "manifest.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    result = {**report(items), "source": str(root), "statistics": statistics(items)}
    write_atomic(out / "report.json", json.dumps(result, indent=2))
    write_atomic(out / "report.html", _page(root, items, result))
    return result


def _png(figure_or_image) -> str:
    buffer = io.BytesIO()
    if hasattr(figure_or_image, "savefig"):
        figure_or_image.savefig(buffer, format="png", dpi=90)
    else:
        figure_or_image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(path: Path, size: int = 48) -> torch.Tensor:
    from PIL import Image

    try:
        image = load_image(path)
    except Exception:  # noqa: BLE001  (corrupt files get a grey tile)
        return torch.zeros(3, size, size)
    image.thumbnail((size, size))
    tile = Image.new("RGB", (size, size), (255, 255, 255))
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return to_tensor(tile)


def _grid(paths: list[Path], columns: int = 12) -> str:
    from difflab.evaluation.plots import image_grid

    return _png(image_grid(torch.stack([_thumbnail(p) for p in paths]), columns=columns, scale=1))


def _histograms(items: list[Item]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decoded = [i for i in items if i.pixel_hash]
    series = {
        "shortest side (px)": [min(i.width, i.height) for i in decoded],
        "aspect (long / short)": [max(i.width, i.height) / max(min(i.width, i.height), 1) for i in decoded],
        "sharpness (Laplacian var / var)": [i.sharpness for i in decoded],
        "caption length (chars)": [len(i.record.caption) for i in decoded if i.record.caption],
    }
    fig, axes = plt.subplots(1, 4, figsize=(14, 2.8))
    for ax, (title, values) in zip(axes, series.items(), strict=True):
        ax.hist(values or [0], bins=30, color="#4477aa")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    encoded = _png(fig)
    plt.close(fig)
    return encoded


def _page(root: Path, items: list[Item], result: dict) -> str:
    rows = "".join(f"<tr><td>{r}</td><td>{result['counts'][r]}</td></tr>" for r in REASONS)
    sections = []
    for reason in REASONS:
        removed = [i for i in items if reason in i.reasons][:48]
        if removed:
            names = ", ".join(html.escape(i.record.path) for i in removed[:12])
            grid = _grid([root / i.record.path for i in removed])
            sections.append(f"<h3>{reason} ({result['counts'][reason]})</h3><img src='{grid}'>"
                            f"<p class='names'>{names}{' ...' if len(removed) > 12 else ''}</p>")
    groups = [i for i in items if i.duplicate_of][:24]
    if groups:  # each removed duplicate beside the item it duplicates
        pairs = [p for i in groups for p in (root / i.duplicate_of, root / i.record.path)]
        sections.append(f"<h3>duplicate pairs (kept, removed)</h3><img src='{_grid(pairs, columns=12)}'>")
    classes = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{v}</td></tr>" for k, v in result["classes"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>difflab curation report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}td{{padding:2px 12px}}
.names{{color:#555;font-size:12px}}img{{image-rendering:pixelated;border:1px solid #ddd}}</style></head><body>
<h1>Curation of {html.escape(str(root))}</h1>
<p><b>{result['kept']}</b> of {result['total']} items kept. Class imbalance (largest / smallest class):
{result['class_imbalance']:.2f}.</p>
<table><tr><th>reason</th><th>items</th></tr>{rows}</table>
<h2>Distributions</h2><img src='{_histograms(items)}'>
<h2>Classes kept</h2><table>{classes}</table>
<h2>What each rule removed</h2>{''.join(sections) or '<p>nothing</p>'}
</body></html>"""
