"""Sampling at scale: each process draws its share of the seeds and one output holds them all."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from difflab.cli import main
from difflab.diffusion import GaussianMixture
from difflab.sampling.generate import generate
from difflab.training import Trainer, resolve

TINY = {
    "model": {"arch": "unet", "channels": 16, "channel_mult": [1, 2], "blocks_per_level": 1,
              "attention_resolutions": [4], "head_dim": 16},
    "data": {"dataset": "digits"},
    "optim": {"lr": 0.002, "warmup_steps": 2},
    "train": {"steps": 4, "batch": 16, "log_every": 2, "checkpoint_every": 100, "threads": 1},
    "sample": {"steps": 3, "n": 10, "solver": "euler_ancestral"},  # stochastic: its noise must follow the seeds
}


def test_a_share_of_the_indices_is_that_slice_of_all_samples():
    mixture = GaussianMixture(torch.tensor([[0.0, 1.0], [1.0, -1.0]]), 0.3, labels=torch.tensor([0, 1]))
    options = dict(num_classes=2, class_label="balanced", seed=5, batch_size=3, solver="dpmpp_2m_sde", steps=4)
    everything, labels = generate(mixture, (2,), 10, **options)
    part, part_labels = generate(mixture, (2,), 10, indices=range(4, 9), **options)
    torch.testing.assert_close(part, everything[4:9], rtol=0, atol=1e-12)
    assert part_labels.tolist() == labels[4:9].tolist()
    empty, no_labels = generate(mixture, (2,), 10, indices=range(10, 10), **options)
    assert empty.shape == (0, 2) and no_labels.numel() == 0
    with pytest.raises(ValueError, match="contiguous range within range"):
        generate(mixture, (2,), 10, indices=range(0, 12), **options)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("scaling") / "run"
    Trainer(resolve(TINY), run, progress=False).fit()
    return run


def test_sample_and_eval_under_two_processes_match_one(tiny_run, tmp_path, monkeypatch, capfd):
    """`difflab launch --nproc 2 sample`: the same 7 samples and labels as one process, written once; eval too."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    assert main(["sample", str(tiny_run), "--n", "7", "--out", str(tmp_path / "one.npz"), "--no-progress"]) == 0
    capfd.readouterr()
    assert main(["launch", "--nproc", "2", "sample", str(tiny_run), "--n", "7", "--out", str(tmp_path / "two.npz"),
                 "--no-progress"]) == 0
    assert capfd.readouterr().out.count("difflab sample: 7 samples") == 1  # only the first process speaks
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert two["images"].shape == one["images"].shape == (7, 8, 8, 1)
    assert two["labels"].tolist() == one["labels"].tolist() == [0, 1, 2, 3, 4, 5, 6]
    # Batches of 4 and 3 instead of 7: float sums in another order, so a byte may round the other way.
    assert np.abs(two["images"].astype(int) - one["images"].astype(int)).max() <= 1

    assert main(["eval", str(tiny_run), "--n", "20", "--out", str(tmp_path / "one.json"), "--no-progress"]) == 0
    command = [sys.executable, "-m", "difflab", "launch", "--nproc", "2", "eval", str(tiny_run), "--n", "20",
               "--out", str(tmp_path / "two.json"), "--no-progress"]
    result = subprocess.run(command, env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert two["frechet_distance"] == pytest.approx(one["frechet_distance"], rel=1e-3)
    assert two["class_accuracy"] == one["class_accuracy"]


def test_launch_names_the_verb_it_runs(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["launch", "--nproc", "2", "--dry-run", str(config), "--set", "train.steps=1"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"-m -- difflab train {config} --set train.steps=1")
    assert main(["launch", "--nproc", "8", "--dry-run", "eval", "runs/x", "--n", "50000"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("-m -- difflab eval runs/x --n 50000")
