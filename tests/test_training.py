"""The training stage: config validation, the run directory, exact resume, atomic checkpoints, NaN stop, DDP."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from difflab.cli import main
from difflab.config import ConfigError
from difflab.training import Trainer, TrainingError, resolve
from difflab.training import checkpoint as ckpt
from difflab.training.trainer import lr_factor

TINY = {
    "model": {"arch": "unet", "channels": 16, "channel_mult": [1, 2], "blocks_per_level": 1,
              "attention_resolutions": [4], "head_dim": 16},
    "data": {"dataset": "digits"},
    "optim": {"lr": 0.002, "warmup_steps": 2},
    "train": {"steps": 8, "batch": 16, "log_every": 1, "checkpoint_every": 3, "keep": 2, "threads": 1,
              "ema_decays": [0.9, 0.99]},
    "sample": {"steps": 3, "n": 10},
}


def losses(run_dir: Path) -> list[str]:
    with open(run_dir / "metrics.csv") as f:
        return [row["loss"] for row in csv.DictReader(f)]


def train(run_dir: Path, *overrides: str, resume: bool = False) -> dict:
    return Trainer(resolve(TINY, list(overrides)), run_dir, resume=resume, progress=False).fit()


@pytest.mark.parametrize("overrides, message", [
    (["train.bogus=1"], "unknown key 'train.bogus'"),
    (["train.steps=many"], "train.steps must be int, got 'many'"),
    (["train.batch=0"], "batch must be positive"),
    (["train.keep=0"], "keep must be positive"),
    (["train.batch=12", "train.accumulation=5"], "batch 12 is not divisible by accumulation 5"),
    (["optim.decay=exponential"], "decay must be one of constant, cosine, linear, inverse_sqrt"),
    (["diffusion.parameterization=score"], "parameterization must be one of"),
    (["train.ema_decays=[1.5]"], r"ema_decays must be in \(0, 1\)"),
    (["train.distributed=zero3"], "distributed must be one of ddp, fsdp, hsdp"),
    (["train.compile=layers"], "compile must be one of False, True, blocks"),
    (["train.reduce_precision=fp8"], "reduce_precision must be one of float32, bfloat16"),
    (["train.bucket_mb=0"], "bucket_mb must be positive"),
    (["train.static_graph=true", "train.accumulation=2"], "static_graph cannot be combined with accumulation"),
    (["model.chanels=3"], "unknown key 'unet.chanels'"),
    (["data.dataset=imagenet"], "dataset must be one of digits"),
    (["sample.sigma_min=100"], "need 0 < sigma_min < sigma_max"),
    (["diffusion.noise_options={p_mu: 1}"], "noise_options do not fit lognormal"),
    (["train"], "expected key=value"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve(TINY, overrides)


def test_exponent_floats_read_as_numbers_in_overrides_and_files(tmp_path):
    """YAML 1.1 reads 1e-4 as a string; a learning rate written that way must still be a float."""
    from difflab.config import load_yaml

    assert resolve(TINY, ["optim.lr=1e-4"]).optim.lr == 1e-4
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 3E-3\n  eps: 1e-8\nname: 1e\n")
    assert load_yaml(tmp_path / "c.yaml") == {"optim": {"lr": 3e-3, "eps": 1e-8}, "name": "1e"}


def test_resolved_config_fills_the_model_from_the_data_set_and_round_trips():
    config = resolve(TINY)
    assert config.model["in_channels"] == 1 and config.model["resolution"] == 8
    assert config.model["num_classes"] == 10
    from difflab.config import to_dict

    assert resolve(yaml.safe_load(yaml.safe_dump(to_dict(config)))) == config


def test_learning_rate_schedules():
    config = resolve(TINY, ["optim.warmup_steps=10", "optim.decay=cosine", "train.steps=110"])
    assert lr_factor(0, config) == pytest.approx(0.1)
    assert lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(60, config) == pytest.approx(0.5)
    assert lr_factor(110, config) == pytest.approx(0.0)
    config = resolve(TINY, ["optim.decay=inverse_sqrt", "optim.decay_start=100"])
    assert lr_factor(50, config) == 1.0 and lr_factor(400, config) == pytest.approx(0.5)


def test_run_directory_layout_and_sampling(tmp_path, capsys):
    run = tmp_path / "run"
    summary = train(run)
    assert summary["step"] == 8 and summary["stopped_by"] == "steps"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["in_channels"] == 1 and saved["train"]["steps"] == 8  # fully resolved
    folders = [p.name for p in ckpt.complete_checkpoints(run / "checkpoints")]
    assert folders == ["step-0000006", "step-0000008"]  # keep: 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000008"
    files = {p.name for p in (run / "checkpoints" / "step-0000008").iterdir()}
    assert files == {"model.safetensors", "ema-0.9.safetensors", "ema-0.99.safetensors", "trainer.json",
                     "trainer.safetensors"}
    assert len(losses(run)) == 8 and (run / "samples" / "step-0000008.png").exists()

    assert main(["sample", str(run), "--n", "20", "--steps", "2", "--out", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0
    archive = np.load(tmp_path / "s.npz")
    assert archive["images"].shape == (20, 8, 8, 1) and archive["images"].dtype == np.uint8
    assert list(archive["labels"]) == [i % 10 for i in range(20)]  # balanced
    assert main(["sample", str(run), "--n", "4", "--class-label", "3", "--ema", "none", "--out",
                 str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert (tmp_path / "g.png").exists()
    assert main(["sample", str(run), "--ema", "0.5", "--out", str(tmp_path / "x.png")]) == 2
    assert "no EMA '0.5'" in capsys.readouterr().err
    assert main(["sample", str(run), "--out", str(tmp_path / "x.jpg"), "--no-progress"]) == 2

    # Guidance: classifier-free against the null class, and autoguidance against the raw (less averaged) weights.
    plain, guided = tmp_path / "plain.npz", tmp_path / "guided.npz"
    common = ["--n", "6", "--steps", "2", "--no-progress"]
    assert main(["sample", str(run), *common, "--out", str(plain)]) == 0
    assert main(["sample", str(run), *common, "--out", str(guided), "--guidance", "4",
                 "--guidance-interval", "0.1,50", "--guidance-rescale", "0.5"]) == 0
    assert np.load(guided)["images"].shape == np.load(plain)["images"].shape  # (this tiny model saturates both)
    assert main(["sample", str(run), *common, "--out", str(guided), "--guidance", "2", "--guide-with", str(run),
                 "--guide-with-ema", "none"]) == 0
    assert main(["sample", str(run), *common, "--out", str(guided), "--guidance-rescale", "0.5"]) == 2
    assert "need --guidance SCALE" in capsys.readouterr().err
    assert main(["sample", str(run), *common, "--out", str(guided), "--guidance", "2", "--guidance-rescale", "3"]) == 2
    assert "rescale" in capsys.readouterr().err


def test_resume_after_stop_continues_the_same_losses(tmp_path):
    train(tmp_path / "whole")
    train(tmp_path / "parts", "train.steps=4")  # stops at 4 (checkpoint at 3 and 4)
    train(tmp_path / "parts", resume=True)
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    train(tmp_path / "fresh", resume=True)  # nothing to resume yet: starts from step 0
    assert losses(tmp_path / "fresh") == losses(tmp_path / "whole")
    killed = tmp_path / "killed-before-its-first-log"
    killed.mkdir()
    (killed / "config.yaml").write_text(yaml.safe_dump(TINY))
    (killed / "metrics.csv").write_text("")  # created, no header yet
    train(killed, resume=True)
    assert losses(killed) == losses(tmp_path / "whole")


def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_losses(tmp_path):
    """Kill the training process at random moments (also mid-checkpoint), resume each time, compare."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "steps": 14, "checkpoint_every": 2}}))
    command = [sys.executable, "-m", "difflab", "train", str(config), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, "--run-dir", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    run = tmp_path / "killed"
    rng = np.random.default_rng(0)
    for attempt in range(4):
        process = subprocess.Popen([*command, "--run-dir", str(run), *(["--resume"] if attempt else [])], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while ckpt.latest_checkpoint(run / "checkpoints") is None and time.monotonic() < deadline:
            time.sleep(0.05)  # wait for a first checkpoint, then kill at a random moment
        time.sleep(rng.uniform(0, 0.8))
        process.send_signal(signal.SIGKILL)
        process.wait()
    subprocess.run([*command, "--run-dir", str(run), "--resume"], check=True, env=env, capture_output=True)
    assert losses(run) == losses(tmp_path / "whole")


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(run, "train.steps=3")
    real_save = ckpt.save_tensors
    calls = []

    def dying_save(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # die after the first file of the next checkpoint
            raise KeyboardInterrupt
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(run, resume=True)
    monkeypatch.setattr(ckpt, "save_tensors", real_save)
    assert ckpt.latest_checkpoint(run / "checkpoints").name == "step-0000003"
    assert any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    train(run, resume=True)
    assert not any(p.name.startswith(".tmp-") for p in (run / "checkpoints").iterdir())
    train(tmp_path / "whole")
    assert losses(run) == losses(tmp_path / "whole")


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    from difflab.models.unet import UNet

    forward = UNet.forward
    calls = []

    def exploding(self, *args, **kwargs):
        calls.append(1)
        out = forward(self, *args, **kwargs)
        return out * float("nan") if len(calls) >= 5 else out

    monkeypatch.setattr(UNet, "forward", exploding)
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 5 .*good checkpoint .*step-0000003"):
        train(tmp_path / "run")
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000003"


def test_max_minutes_stops_cleanly_with_a_checkpoint(tmp_path):
    summary = train(tmp_path / "run", "train.max_minutes=0.0001")
    assert summary["step"] == 1 and summary["stopped_by"] == "max_minutes=0.0001"
    assert ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000001"


def test_accumulation_matches_one_big_batch(tmp_path):
    train(tmp_path / "one", "train.steps=3")
    train(tmp_path / "two", "train.steps=3", "train.accumulation=2")
    np.testing.assert_allclose(np.array(losses(tmp_path / "two"), float), np.array(losses(tmp_path / "one"), float),
                               rtol=1e-5)


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    run = tmp_path / "run"
    assert main(["train", str(config), "--run-dir", str(run), "--set", "train.steps=1", "--no-progress"]) == 0
    before = (run / "config.yaml").read_text()
    assert main(["train", str(config), "--run-dir", str(run), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == before
    assert main(["train", str(config), "--set", "train.steps=x"]) == 2
    assert main(["train", str(config), "--dry-run"]) == 0 and "in_channels: 1" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP loading into one process
@pytest.mark.parametrize("strategy, options", [
    ("ddp", ["train.bucket_mb=0.01", "train.accumulation=2"]),  # several buckets, all-reduced in round 2 only
    ("ddp", ["train.static_graph=true"]),
    ("fsdp", []),
    # A 2x1 mesh, two replicas of a one-process shard group; across replicas only the last round all-reduces.
    ("hsdp", ["train.shard_size=1", "train.accumulation=2"]),
], ids=["ddp", "ddp-static-graph", "fsdp", "hsdp"])
def test_two_process_gloo_run_matches_one_process(tmp_path, strategy, options):
    """Same global batch and noise on 2 processes as on 1; a sharded checkpoint resumes on 1 process with the
    weights and optimizer state of one-process training, then continues with the same losses."""
    train(tmp_path / "single", "train.steps=8")
    single = [float(v) for v in losses(tmp_path / "single")]
    np.testing.assert_allclose(_torchrun(tmp_path, strategy, [f"train.distributed={strategy}", *options]),
                               single[:4], rtol=1e-4)  # accumulation rounds: the same global batch
    if strategy == "ddp":
        return
    assert (tmp_path / strategy / "checkpoints" / "step-0000004" / "optimizer").is_dir()  # sharded
    reference = Trainer(resolve(TINY, ["train.steps=4"]), tmp_path / "reference", progress=False)
    reference.fit()
    resumed = Trainer(resolve(TINY, [f"train.distributed={strategy}", *options]), tmp_path / strategy, resume=True,
                      progress=False)
    assert resumed.step == 4
    saved = ckpt.load_tensors(tmp_path / strategy / "checkpoints" / "step-0000004" / "model.safetensors")
    for key, value in resumed.network.state_dict().items():
        assert torch.equal(value, saved[key]), key  # exactly the weights the two processes saved

    def flat(trainer, key=None):  # all weights (or one AdamW moment) in one vector
        params = list(trainer.network.parameters())
        return torch.cat([(p if key is None else trainer.optimizer.state[p][key]).detach().flatten() for p in params])

    for key in (None, "exp_avg", "exp_avg_sq"):  # as one process would have them, up to the order of float sums
        assert (flat(resumed, key) - flat(reference, key)).norm() < 1e-3 * flat(reference, key).norm(), key
    resumed.fit()
    np.testing.assert_allclose([float(v) for v in losses(tmp_path / strategy)], single, rtol=1e-4)


def test_two_process_fsdp_in_bfloat16_trains(tmp_path):
    """FSDP's mixed-precision policy: bf16 gathered weights and reduction, fp32 master shards."""
    train(tmp_path / "single", "train.steps=4", "train.precision=bfloat16")
    single = [float(v) for v in losses(tmp_path / "single")]
    values = _torchrun(tmp_path, "bf16", ["train.distributed=fsdp", "train.precision=bfloat16",
                                          "train.reduce_precision=bfloat16"])
    np.testing.assert_allclose(values, single, rtol=0.05)
    weights = ckpt.load_tensors(tmp_path / "bf16" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())


def _torchrun(tmp_path: Path, run: str, settings: list[str], recipe: dict = TINY) -> list[float]:
    """The losses of a 4-step run of ``recipe`` trained by two gloo processes under torchrun."""
    config = tmp_path / f"{run}.yaml"
    config.write_text(yaml.safe_dump({**recipe, "train": {**recipe["train"], "steps": 4}}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "difflab", "train", str(config), "--run-dir", str(tmp_path / run), "--no-progress",
               *[arg for setting in settings for arg in ("--set", setting)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(v) for v in losses(tmp_path / run)]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside inductor
def test_compile_and_activation_checkpointing_are_config_flags(tmp_path):
    torch._dynamo.reset()
    train(tmp_path / "plain", "train.steps=2")
    train(tmp_path / "flags", "train.steps=2", "train.compile=true", "model.checkpointing=true")
    np.testing.assert_allclose(np.array(losses(tmp_path / "flags"), float),
                               np.array(losses(tmp_path / "plain"), float), rtol=1e-4)
    train(tmp_path / "blocks", "train.steps=2", "train.compile=blocks")  # each block compiled on its own
    np.testing.assert_allclose(np.array(losses(tmp_path / "blocks"), float),
                               np.array(losses(tmp_path / "plain"), float), rtol=1e-4)


@pytest.mark.parametrize("clean", [True, False])
def test_close_world_ends_with_a_barrier_only_when_clean(monkeypatch, tmp_path, clean):
    """A clean exit waits for the others (and gloo's workers); after an error another process may be inside a
    collective that a barrier would never match, so the group is left at once."""
    import torch.distributed as dist

    from difflab.training import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    calls = []
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: calls.append(seconds))
    distributed.close_world(distributed.World(0, 2, torch.device("cpu")), clean=clean)
    assert not dist.is_initialized()
    assert calls == (["barrier", distributed.GLOO_DRAIN_SECONDS] if clean else [])


def test_distributed_settings_that_cannot_work_are_one_line_errors():
    from difflab.training.distributed import World, shard_mesh, wrap

    two = World(0, 2, torch.device("cpu"))
    config = resolve(TINY, ["train.reduce_precision=bfloat16"]).train
    with pytest.raises(ValueError, match="needs NCCL"):
        wrap(torch.nn.Linear(2, 2), config, two)
    with pytest.raises(ValueError, match="shard_size 2 does not divide the 3 processes"):
        shard_mesh("hsdp", World(0, 3, torch.device("cpu")), shard_size=2)


def test_bfloat16_autocast_trains(tmp_path):
    train(tmp_path / "bf16", "train.steps=3", "train.precision=bfloat16")
    values = np.array(losses(tmp_path / "bf16"), float)
    assert np.isfinite(values).all()
    train(tmp_path / "fp32", "train.steps=3")
    np.testing.assert_allclose(values, np.array(losses(tmp_path / "fp32"), float), rtol=0.05)


def test_posthoc_ema_verb_reconstructs_a_sampleable_average(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, "train.steps=30", "train.ema_sigma_rels=[0.05, 0.1]", "train.ema_snapshot_every=4",
          "train.checkpoint_every=10")
    assert len(list((run / "ema-snapshots").glob("step-*.safetensors"))) == 8  # 4, 8, ..., 28 and 30
    assert main(["ema", str(run), "--sigma-rel", "0.05", "--sigma-rel", "0.07"]) == 0
    folder = run / "checkpoints" / "step-0000030"
    stored = ckpt.load_tensors(folder / "ema-phema-0.050.safetensors")
    rebuilt = ckpt.load_tensors(folder / "ema-posthoc-0.050.safetensors")
    for key, value in stored.items():  # a stored profile is reconstructed (almost) exactly
        torch.testing.assert_close(rebuilt[key], value, rtol=1e-3, atol=1e-5)
    assert main(["sample", str(run), "--ema", "posthoc-0.070", "--n", "4", "--steps", "2", "--out",
                 str(tmp_path / "p.png"), "--no-progress"]) == 0
    assert main(["ema", str(tmp_path), "--sigma-rel", "0.05"]) == 2
    assert "no EMA snapshots" in capsys.readouterr().err


def test_eval_verb_writes_metrics_and_a_picture(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train(run, "train.steps=2")
    assert main(["eval", str(run), "--n", "50", "--no-progress"]) == 0
    report = json.loads((run / "eval" / "step-0000002-ema-0.9.json").read_text())
    assert {"frechet_distance", "precision", "recall", "class_accuracy", "memorisation_ratio",
            "noise_floor_frechet_distance"} <= set(report)
    assert report["frechet_distance"] > report["noise_floor_frechet_distance"]  # 2 steps of training
    assert (run / "eval" / "step-0000002-ema-0.9.png").exists()

    class Pixels(torch.nn.Module):  # a user's own feature network, shipped as TorchScript
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)

    with pytest.warns(DeprecationWarning):
        torch.jit.save(torch.jit.script(Pixels()), str(tmp_path / "pixels.pt"))
    assert main(["eval", str(run), "--n", "30", "--no-progress", "--features", str(tmp_path / "pixels.pt"),
                 "--out", str(tmp_path / "pixels.json")]) == 0
    report = json.loads((tmp_path / "pixels.json").read_text())
    assert report["features"].endswith("pixels.pt") and "class_accuracy" not in report  # no logits
    (tmp_path / "pickle.pt").write_bytes(b"not torchscript")
    assert main(["eval", str(run), "--n", "10", "--features", str(tmp_path / "pickle.pt"), "--no-progress"]) == 2
    assert "TorchScript" in capsys.readouterr().err

    # The guidance trade-off: metrics against scale, as a table and a plot.
    assert main(["eval", str(run), "--n", "20", "--no-progress", "--sweep", "guidance=0,2",
                 "--guidance-interval", "0.2,20"]) == 0
    sweep = json.loads((run / "eval" / "step-0000002-ema-0.9-sweep-cfg+interval.json").read_text())
    assert [row["guidance"] for row in sweep["rows"]] == [0.0, 2.0] and sweep["settings"]["interval"] == [0.2, 20.0]
    assert all("frechet_distance" in row and row["method"] == "cfg+interval" for row in sweep["rows"])
    assert (run / "eval" / "step-0000002-ema-0.9-sweep-cfg+interval.png").exists()
    with pytest.raises(SystemExit):
        main(["eval", str(run), "--sweep", "steps=1,2"])
    assert "expected guidance=SCALE" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_a_valid_config(path):
    """Each recipe's keys and values pass validation (stage-2 recipes name an autoencoder run that is trained first,
    so the data set is not opened here)."""
    from difflab.config import build, load_yaml
    from difflab.models import network_config
    from difflab.training.config import RunConfig

    config = build(RunConfig, load_yaml(path))
    network_config(config.model)


def test_launch_runs_train_under_torchrun(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "steps": 2}}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["launch", "--nproc", "2", str(config), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "--nproc-per-node 2 --standalone -m -- difflab train" in capsys.readouterr().out
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").is_dir() and len(losses(tmp_path / "run")) == 2
    assert main(["launch", "--nproc", "4", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "node0:29500",
                 "--dry-run", str(config)]) == 0
    assert "--nnodes 2 --node-rank 1 --rdzv-backend c10d --rdzv-endpoint node0:29500" in capsys.readouterr().out
    assert main(["launch", "--nproc", "4", "--nnodes", "2", str(config)]) == 2
    assert "--rdzv-endpoint" in capsys.readouterr().err
    assert main(["launch", "--nproc", "4", "--nnodes", "2", "--node-rank", "2", str(config)]) == 2
