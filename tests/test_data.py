"""Built-in data sets and the resumable loader."""

import gzip
import struct

import numpy as np
import pytest
import torch

from difflab.data import BatchLoader, builtin, load_dataset


def write_idx(path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_are_in_range_with_labels():
    data = load_dataset("digits")
    assert data.images.shape == (1797, 1, 8, 8) and data.images.min() == -1 and data.images.max() == 1
    assert data.num_classes == 10 and sorted(set(data.labels.tolist())) == list(range(10))


def test_moving_digits_follow_their_trajectories():
    data = load_dataset("moving-digits")
    clips, paths = data.images, data.extras["trajectories"]
    assert clips.shape == (1797, 1, 8, 24, 24) and paths.shape == (1797, 1, 8, 2)
    assert paths.min() >= 0 and paths.max() <= 16
    steps = (paths[:, :, 1:] - paths[:, :, :-1]).abs()
    assert steps.max() <= 2 and steps.min() >= 0
    digits = load_dataset("digits").images
    for i in (0, 100, 1796):  # every frame shows the real digit where the trajectory says
        for t in range(8):
            r, c = paths[i, 0, t].tolist()
            assert torch.equal(clips[i, 0, t, r : r + 8, c : c + 8], digits[i, 0])
    assert torch.equal(load_dataset("moving-digits").images, clips)  # deterministic


def test_moving_digits_options_set_length_size_and_digit_count():
    data = load_dataset("moving-digits:frames=5,size=16,digits=2,seed=3")
    assert data.images.shape == (1797, 1, 5, 16, 16) and data.extras["trajectories"].shape == (1797, 2, 5, 2)
    digits = load_dataset("digits").images
    r, c = data.extras["trajectories"][7, 1, 4].tolist()  # the second digit of clip 7 is digit 8, on top
    assert torch.equal(torch.maximum(data.images[7, 0, 4, r : r + 8, c : c + 8], digits[8, 0]),
                       data.images[7, 0, 4, r : r + 8, c : c + 8])
    with pytest.raises(ValueError, match="takes no options"):
        load_dataset("digits:frames=5")
    with pytest.raises(ValueError, match="takes no options"):
        load_dataset("moving-digits:colour=red")
    with pytest.raises(ValueError, match="key=value pairs"):
        load_dataset("moving-digits:frames=5,oops")
    with pytest.raises(ValueError, match="size >= 8"):
        load_dataset("moving-digits:size=4")


def test_fashion_mnist_reads_debians_idx_files_or_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "FASHION_MNIST", tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    data = load_dataset("fashion-mnist")
    assert data.images.shape == (10, 1, 28, 28) and data.labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert -1 <= data.images.min() and data.images.max() <= 1 and data.class_names[9] == "Ankle boot"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x09abc"))
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion-mnist")


def test_loader_shards_by_rank_and_resumes_at_any_batch():
    data = load_dataset("digits")
    whole = BatchLoader(data, 64, seed=3)
    batches = [next(whole)[0] for _ in range(60)]  # crosses two epoch boundaries
    ranks = [BatchLoader(data, 64, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in range(5):
        torch.testing.assert_close(torch.cat([next(r)[0] for r in ranks]), batches[step])
    probe = BatchLoader(data, 64, seed=3)
    for _ in range(40):
        next(probe)
    resumed = BatchLoader(data, 64, seed=3)
    resumed.load_state_dict(probe.state_dict())  # (epoch 1, position 763)
    for step in range(40, 60):
        torch.testing.assert_close(next(resumed)[0], batches[step])
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        BatchLoader(data, 64, world_size=3)


@pytest.mark.parametrize("name", ["ring", "swiss_roll", "checkerboard"])
def test_toys_are_seeded_point_sets_in_the_unit_box(name):
    from difflab.data import TOYS

    points = TOYS[name](5000, seed=1)
    assert points.shape == (5000, 2) and points.abs().max() < 1.3
    assert torch.equal(points, TOYS[name](5000, seed=1)) and not torch.equal(points, TOYS[name](5000, seed=2))


def test_toy_shapes():
    from difflab.data import checkerboard, ring

    board = checkerboard(20000)
    cells = ((board + 1) * 2).floor().long().clamp(0, 3)
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()  # only dark squares
    radii = ring(20000, std=0.01).norm(dim=1)
    assert (radii - 1).abs().max() < 0.06


def _png(path, mode="RGB", size=(6, 4), color=(200, 10, 10)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def test_folder_source_reads_labels_captions_and_metadata(tmp_path):
    import json as json_

    from difflab.data.sources import scan_folder

    _png(tmp_path / "cats" / "a.png")
    (tmp_path / "cats" / "a.txt").write_text("  a red cat \n")
    _png(tmp_path / "dogs" / "deep" / "b.png")
    (tmp_path / "dogs" / "deep" / "b.json").write_text(json_.dumps({"caption": "a dog"}))
    _png(tmp_path / "c.png")
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "metadata.jsonl").write_text(json_.dumps({"file_name": "c.png", "caption": "top", "label": 7}) + "\n")
    records = {r.path: r for r in scan_folder(tmp_path)}
    assert set(records) == {"cats/a.png", "dogs/deep/b.png", "c.png", "notes.md"}
    assert (records["cats/a.png"].label, records["cats/a.png"].caption) == ("cats", "a red cat")
    assert (records["dogs/deep/b.png"].label, records["dogs/deep/b.png"].caption) == ("dogs", "a dog")
    assert (records["c.png"].label, records["c.png"].caption) == ("7", "top")
    with pytest.raises(ValueError, match="is not a folder"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        scan_folder(tmp_path / "empty")


def test_images_are_normalised_whatever_their_mode(tmp_path):
    from PIL import Image

    from difflab.data.sources import load_image, to_tensor

    _png(tmp_path / "cmyk.jpg", "CMYK", color=(0, 255, 255, 0))
    _png(tmp_path / "palette.png", "P", color=3)
    _png(tmp_path / "grey16.png", "I;16", color=4000)
    _png(tmp_path / "clear.png", "RGBA", color=(0, 0, 0, 0))
    rotated = Image.new("RGB", (6, 4), (0, 0, 255))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    for name in ("cmyk.jpg", "palette.png", "grey16.png", "clear.png"):
        image = load_image(tmp_path / name)
        assert image.mode == "RGB" and image.size == (6, 4), name
    assert to_tensor(load_image(tmp_path / "clear.png")).min() == 1  # transparent -> white
    assert to_tensor(load_image(tmp_path / "grey16.png")).max() == 1  # 16-bit scaled, not clipped to black
    assert load_image(tmp_path / "rotated.jpg").size == (4, 6)
    tensor = to_tensor(load_image(tmp_path / "cmyk.jpg", mode="L"))
    assert tensor.shape == (1, 4, 6) and -1 <= tensor.min() and tensor.max() <= 1
    data = (tmp_path / "palette.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):
        load_image(tmp_path / "truncated.png")


def test_parquet_manifests_read_like_json_lines(tmp_path):
    from difflab.data.sources import read_manifest

    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"file_name": ["x.png", "y.png"], "text": ["hi", None], "label": [2, None]}),
                   tmp_path / "m.parquet")
    assert [(r.path, r.label, r.caption) for r in read_manifest(tmp_path / "m.parquet")] == [
        ("x.png", "2", "hi"), ("y.png", None, None)]
    pq.write_table(pa.table({"caption": ["no path"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet:1: a manifest row needs a path"):
        read_manifest(tmp_path / "bad.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 and then nothing")
    with pytest.raises(ValueError, match=r"^cannot read Parquet manifest .*broken.parquet"):
        read_manifest(tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match="no such file"):
        read_manifest(tmp_path / "missing.parquet")


def test_manifest_and_npz_sources(tmp_path):
    from difflab.data.sources import read_manifest, read_npz

    (tmp_path / "m.jsonl").write_text('{"path": "x.png", "caption": "hi", "label": 2}\n\n{"path": "y.png"}\n')
    assert [(r.path, r.label, r.caption) for r in read_manifest(tmp_path / "m.jsonl")] == [
        ("x.png", "2", "hi"), ("y.png", None, None)]
    (tmp_path / "bad.jsonl").write_text('{"caption": "no path"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a manifest row needs a path"):
        read_manifest(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: not JSON"):
        read_manifest(tmp_path / "broken.jsonl")

    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)  # as `difflab sample` writes
    np.savez(tmp_path / "s.npz", images=pixels, labels=np.arange(5))
    images, labels, captions = read_npz(tmp_path / "s.npz")
    assert images.shape == (5, 1, 8, 8) and labels.tolist() == [0, 1, 2, 3, 4] and captions is None
    np.testing.assert_allclose(((images + 1) * 127.5).round().movedim(1, -1).numpy(), pixels)
    np.savez(tmp_path / "wrong.npz", pictures=pixels)
    with pytest.raises(ValueError, match="has no 'images' array"):
        read_npz(tmp_path / "wrong.npz")
    np.savez(tmp_path / "short.npz", images=pixels, labels=np.arange(3))
    with pytest.raises(ValueError, match="5 images but 3 labels"):
        read_npz(tmp_path / "short.npz")
