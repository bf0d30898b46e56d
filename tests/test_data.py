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
    assert clips.shape == (1797, 1, 8, 24, 24) and paths.shape == (1797, 8, 2)
    assert paths.min() >= 0 and paths.max() <= 16
    steps = (paths[:, 1:] - paths[:, :-1]).abs()
    assert steps.max() <= 2 and steps.min() >= 0
    digits = load_dataset("digits").images
    for i in (0, 100, 1796):  # every frame shows the real digit where the trajectory says
        for t in range(8):
            r, c = paths[i, t].tolist()
            assert torch.equal(clips[i, 0, t, r : r + 8, c : c + 8], digits[i, 0])
    assert torch.equal(load_dataset("moving-digits").images, clips)  # deterministic


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
