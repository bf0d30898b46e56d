"""Shards and the streaming loader: the in-memory loader's order, per rank, resumable, with workers, random
crops and aspect-ratio buckets."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import BatchLoader, ShardLoader, load_dataset
from difflab.data.loader import Order
from difflab.data.shards import aspect_buckets, write_shards
from difflab.data.sources import scan_folder


def _source(root, sizes):
    """A labelled folder of smooth random RGB images of the given (width, height) sizes."""
    rng = np.random.default_rng(0)
    for k, (width, height) in enumerate(sizes):
        folder = root / ("a" if k % 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(folder / f"{k:03d}.png")
        (folder / f"{k:03d}.txt").write_text(f"picture number {k}")
    return root


@pytest.fixture(scope="module")
def square_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    source = _source(root / "src", [(20 + k % 7, 16 + k % 5) for k in range(30)])
    write_shards(source, scan_folder(source), root / "shards", resolution=8, per_shard=7)
    return root / "shards"


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_shards_index_every_sample_and_read_back_whole(square_shards):
    index = json.loads((square_shards / "index.json").read_text())
    assert index["count"] == 30 and len(index["shards"]) == 5 and index["classes"] == ["a", "b"]
    data = load_dataset(str(square_shards))
    assert data.images.shape == (30, 3, 8, 8) and -1 <= data.images.min() and data.images.max() <= 1
    assert data.labels.tolist() == [0] * 20 + [1] * 10  # folder a (20 images) first, in name order
    assert data.extras["captions"][0] == "picture number 1"  # folder a first, in name order


def test_shard_captions_are_read_once_per_process(square_shards, monkeypatch):
    from difflab.data.loader import ShardReader, _shard_captions

    _shard_captions.cache_clear()
    reads = []
    meta = ShardReader.meta
    monkeypatch.setattr(ShardReader, "meta", lambda self, k: reads.append(k) or meta(self, k))
    first = ShardLoader(square_shards, 4).captions()
    assert first[0][0] == "picture number 1" and len(first[0]) == 30 and len(reads) == 30
    assert ShardLoader(square_shards, 8, rank=1, world_size=2).captions() == first and len(reads) == 30


def test_streaming_follows_the_in_memory_order_on_every_rank_and_worker_count(square_shards):
    memory = BatchLoader(load_dataset(str(square_shards)), 12, seed=4)
    expected = _take(memory, 6)  # 72 samples: crosses two epochs of 30
    streamed = _take(ShardLoader(square_shards, 12, seed=4), 6)
    for (images, labels, indices), (want_images, want_labels, want_indices) in zip(streamed, expected):
        torch.testing.assert_close(images, want_images)
        assert torch.equal(labels, want_labels) and torch.equal(indices, want_indices)
    workers = _take(ShardLoader(square_shards, 12, seed=4, workers=2), 6)
    ranks = [_take(ShardLoader(square_shards, 12, seed=4, rank=r, world_size=3, workers=1), 6) for r in range(3)]
    for step in range(6):
        torch.testing.assert_close(workers[step][0], expected[step][0])
        torch.testing.assert_close(torch.cat([ranks[r][step][0] for r in range(3)]), expected[step][0])


def test_streaming_resumes_at_the_saved_position(square_shards):
    loader = ShardLoader(square_shards, 8, seed=1, workers=2)
    first = _take(loader, 5)
    state = loader.state_dict()
    after = _take(loader, 4)
    resumed = ShardLoader(square_shards, 8, seed=1)
    resumed.load_state_dict(state)
    assert state == {"epoch": 1, "position": 10}
    for (images, *_), (want, *_) in zip(_take(resumed, 4), after):
        torch.testing.assert_close(images, want)
    loader.load_state_dict({"epoch": 0, "position": 0})  # rewinding restarts the workers' stream
    torch.testing.assert_close(next(loader)[0], first[0][0])
    loader.close()


def test_random_crops_change_per_visit_but_not_per_run_or_world_size(tmp_path):
    source = _source(tmp_path / "src", [(24, 12)] * 6)  # wide: a 12x12 window slides over 13 positions
    write_shards(source, scan_folder(source), tmp_path / "shards", resolution=12, crop="random")
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["crop"] == "random"
    stored = load_dataset(str(tmp_path / "shards"))  # whole: centre crops
    assert stored.images.shape == (6, 3, 12, 12)
    run = _take(ShardLoader(tmp_path / "shards", 6, seed=0), 4)  # every sample once per batch
    again = _take(ShardLoader(tmp_path / "shards", 6, seed=0, rank=1, world_size=2, workers=1), 4)
    for (images, *_), (half, *_) in zip(run, again):
        torch.testing.assert_close(images[3:], half)
    order = Order(6, 6, seed=0)
    crops = {}
    for step, (images, *_) in enumerate(run):
        for sample, image in zip(order.take((step, 0))[0].tolist(), images):
            crops.setdefault(sample, []).append(image)
    assert all(len(views) == 4 for views in crops.values())
    moved = sum(not torch.equal(views[0], views[k]) for views in crops.values() for k in range(1, 4))
    assert moved >= 12  # of 18 revisits; the same window comes back by chance 1 time in 13


def test_aspect_ratio_buckets_give_one_size_batches(tmp_path):
    assert (16, 16) in aspect_buckets(16) and all(h * w <= 256 for h, w in aspect_buckets(16))
    assert all(max(h, w) / min(h, w) <= 2 for h, w in aspect_buckets(16))
    sizes = [(32, 16)] * 9 + [(16, 16)] * 9 + [(16, 30)] * 9  # wide, square, tall
    source = _source(tmp_path / "src", sizes)
    write_shards(source, scan_folder(source), tmp_path / "shards", resolution=16, buckets=True)
    loader = ShardLoader(tmp_path / "shards", 4, seed=2)
    assert loader.bucketed and loader.sample_shape == (3, 16, 16)
    shapes = {tuple(next(loader)[0].shape) for _ in range(18)}
    assert shapes == {(4, 3, 12, 20), (4, 3, 16, 16), (4, 3, 20, 12)}  # wide, square and tall buckets
    with pytest.raises(ValueError, match="no aspect-ratio bucket holds a full batch of 10"):
        ShardLoader(tmp_path / "shards", 10)
    with pytest.raises(ValueError, match="aspect-ratio buckets of different sizes"):
        load_dataset(str(tmp_path / "shards"))


def test_loader_rejects_bad_arguments(square_shards, tmp_path):
    with pytest.raises(ValueError, match="not divisible by 5 processes"):
        ShardLoader(square_shards, 12, world_size=5)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        ShardLoader(square_shards, 12, workers=-1)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.json").write_text(json.dumps({"shards": []}))
    with pytest.raises(ValueError, match="unsupported shard format"):
        ShardLoader(tmp_path / "old", 4)
    (tmp_path / "old" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a shard folder"):
        ShardLoader(tmp_path / "old", 4)


def test_trainer_streams_bucketed_shards_with_workers_and_saves_the_position(tmp_path):
    from difflab.training import Trainer, resolve

    source = _source(tmp_path / "src", [(32, 16)] * 8 + [(16, 16)] * 8)
    write_shards(source, scan_folder(source), tmp_path / "shards", resolution=16, buckets=True)
    config = resolve({"model": {"preset": "unet_tiny", "attention_resolutions": []},
                      "data": {"dataset": str(tmp_path / "shards"), "workers": 1},
                      "train": {"steps": 3, "batch": 8, "accumulation": 2, "log_every": 1, "checkpoint_every": 3}})
    assert config.model["resolution"] == 16 and config.model["num_classes"] == 2
    assert Trainer(config, tmp_path / "run", progress=False).fit()["step"] == 3
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-0000003" / "trainer.json").read_text())
    assert meta["data"] == {"epoch": 1, "position": 8}  # 6 batches of 4 over epochs of 16 (4 batches)


def test_the_shard_verb_offers_random_crops_and_buckets(tmp_path, capsys):
    from difflab.cli import main

    source = _source(tmp_path / "src", [(32, 16)] * 4 + [(16, 16)] * 4)
    assert main(["data", "shard", str(source), "--out", str(tmp_path / "shards"), "--resolution", "16",
                 "--crop", "random", "--buckets", "--no-progress"]) == 0
    assert "8 images at 5 buckets of ~16px in 1 shards" in capsys.readouterr().out
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["crop"] == "random" and len(index["buckets"]) == 5
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shard", str(source), "--out", str(tmp_path / "x"), "--resolution", "16", "--crop", "diagonal"])
    assert exit_info.value.code == 2 and "invalid choice: 'diagonal'" in capsys.readouterr().err
