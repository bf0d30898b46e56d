"""Curation over a planted folder: every planted problem is found (precision and recall >= 0.95 per reason)."""

import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image, ImageFilter

from difflab.cli import main
from difflab.data.curate import REASONS, CurationConfig, curate
from difflab.data.sources import scan_folder


def texture(rng, size=32) -> Image.Image:
    """Low-frequency colour structure (a robust perceptual hash) plus fine grain (sharp)."""
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    grain = rng.normal(0, 10, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8))


def plant(root):
    """A folder with clean images and every kind of problem; returns {path: set of planted reasons}."""
    rng = np.random.default_rng(0)
    planted = {}

    def save(relative, image, caption="a small picture of colourful shapes", reasons=(), **kwargs):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **kwargs)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
        planted[relative] = set(reasons)

    clean = []
    for k in range(60):
        relative = f"{'cats' if k % 3 else 'dogs'}/clean{k:02d}.png"
        save(relative, texture(rng), caption=f"a small picture of colourful shapes, number {k}")
        clean.append(relative)
    for k in range(6):  # byte-identical copies, named to sort after their originals (ties keep the first)
        copy = clean[k].replace(".png", "_copy.png")
        shutil.copy(root / clean[k], root / copy)
        shutil.copy((root / clean[k]).with_suffix(".txt"), (root / copy).with_suffix(".txt"))
        planted[copy] = {"exact_duplicate"}
    for k in range(6):  # resized and re-encoded
        image = Image.open(root / clean[10 + k]).resize((28, 28), Image.LANCZOS)
        save(f"dogs/near{k}.jpg", image, reasons={"near_duplicate"}, quality=85)
    png = (root / clean[0]).read_bytes()
    for k in range(3):
        (root / f"cats/truncated{k}.png").write_bytes(png[: len(png) // (k + 2)])
        planted[f"cats/truncated{k}.png"] = {"corrupt"}
    for k in range(2):
        (root / f"dogs/empty{k}.png").write_bytes(b"")
        planted[f"dogs/empty{k}.png"] = {"corrupt"}
    (root / "notes.md").write_text("# not an image")
    (root / "fake.png").write_text("this is text, not a PNG")
    planted.update({"notes.md": {"not_image"}, "fake.png": {"not_image"}})
    for k in range(3):
        save(f"cats/tiny{k}.png", texture(rng, 4), reasons={"too_small"})
        save(f"cats/blank{k}.png", Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 256, 3))),
             reasons={"low_information"})
        save(f"dogs/blurred{k}.png", texture(rng).filter(ImageFilter.GaussianBlur(2)), reasons={"blurry"})
        save(f"dogs/banner{k}.png", texture(rng, 32).resize((128, 24)), reasons={"bad_aspect"})
    for k, caption in enumerate(["", "IMG_1234", "!!! ??? ###", "ab"]):
        save(f"cats/caption{k}.png", texture(rng), caption=caption, reasons={"bad_caption"})
    return planted


def test_planted_problems_are_found_with_high_precision_and_recall(tmp_path):
    planted = plant(tmp_path)
    items = curate(tmp_path, scan_folder(tmp_path), CurationConfig())
    found = {i.record.path: set(i.reasons) for i in items}
    assert set(found) == set(planted)
    for reason in REASONS:
        truth = {p for p, r in planted.items() if reason in r}
        flagged = {p for p, r in found.items() if reason in r}
        assert truth, reason
        precision = len(truth & flagged) / max(len(flagged), 1)
        recall = len(truth & flagged) / len(truth)
        assert precision >= 0.95 and recall >= 0.95, (reason, sorted(flagged - truth), sorted(truth - flagged))
    by_path = {i.record.path: i for i in items}
    assert by_path["dogs/clean00_copy.png"].duplicate_of == "dogs/clean00.png"  # duplicates name what they copy
    assert by_path["dogs/near0.jpg"].duplicate_of == "cats/clean10.png"  # the larger original is kept


def test_curate_verb_writes_manifest_report_and_page(tmp_path, capsys):
    source, out = tmp_path / "src", tmp_path / "out"
    planted = plant(source)
    assert main(["data", "curate", str(source), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == sum(not r for r in planted.values()) and report["total"] == len(planted)
    reasons = defaultdict(set)
    for entry in report["removed"]:
        assert entry["reasons"] and set(entry["reasons"]) <= set(REASONS)  # every removed item says why
        for reason in entry["reasons"]:
            reasons[reason].add(entry["path"])
    assert reasons["corrupt"] == {"cats/truncated0.png", "cats/truncated1.png", "cats/truncated2.png",
                                  "dogs/empty0.png", "dogs/empty1.png"}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == report["kept"] and all((source / "x").parent.resolve().as_posix() in r["path"] for r in rows)
    weights = {r["label"]: r["weight"] for r in rows}
    assert weights["dogs"] > weights["cats"]  # the smaller class is sampled more
    page = (out / "report.html").read_text()
    assert "near_duplicate" in page and "data:image/png;base64," in page
    assert "kept" in capsys.readouterr().out
    assert main(["data", "stats", str(source), "--no-progress"]) == 0
    assert "exact_duplicate" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["data", "stats", "nowhere"], "does not exist"),
    (["data", "stats", "EMPTY"], "holds no files"),
    (["data", "stats", "SRC", "--set", "min_size=x"], "curate.min_size must be int"),
    (["data", "stats", "SRC", "--set", "min_sise=3"], "unknown key 'curate.min_sise'"),
])
def test_data_verbs_give_one_line_errors(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "SRC").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "SRC" / "a.png")
    args = [str(tmp_path / a) if a in ("nowhere", "EMPTY", "SRC") else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_shard_a_curated_manifest_and_train_on_it(tmp_path, capsys):
    from difflab.data import load_dataset
    from difflab.training import Trainer, resolve

    source, curated, shards = tmp_path / "src", tmp_path / "curated", tmp_path / "shards"
    planted = plant(source)
    assert main(["data", "curate", str(source), "--out", str(curated), "--no-progress"]) == 0
    assert main(["data", "shard", str(curated / "manifest.jsonl"), "--out", str(shards), "--resolution", "16",
                 "--per-shard", "25", "--no-progress"]) == 0
    assert "data.dataset=" in capsys.readouterr().out
    index = json.loads((shards / "index.json").read_text())
    kept = sum(not r for r in planted.values())
    assert index["count"] == kept and len(index["shards"]) == -(-kept // 25) and index["classes"] == ["cats", "dogs"]
    data = load_dataset(str(shards))
    assert data.images.shape == (kept, 3, 16, 16) and data.num_classes == 2
    assert len(data.extras["captions"]) == kept and data.extras["captions"][0].startswith("a small picture")
    run = Trainer(resolve({"model": {"preset": "unet_tiny", "attention_resolutions": []},
                           "data": {"dataset": str(shards)}, "train": {"steps": 2, "batch": 8, "log_every": 1}}),
                  tmp_path / "run", progress=False).fit()
    assert run["step"] == 2
    assert main(["data", "shard", str(source / "notes.md"), "--out", str(tmp_path / "x"), "--resolution", "8"]) == 2
