"""Runs derived from a trained run (students, fine-tunes): its config as the starting mapping, and training one."""

from __future__ import annotations

from pathlib import Path

from difflab.config import ConfigError, apply_overrides, load_yaml, to_dict
from difflab.training.config import resolve
from difflab.training.trainer import Trainer


def base_mapping(base: Path) -> dict:
    """The resolved config of a trained generator run, as a mapping to derive a new run's config from."""
    if not (base / "config.yaml").is_file():
        raise FileNotFoundError(f"{base} is not a run directory (no config.yaml)")
    config = resolve(load_yaml(base / "config.yaml"))
    if config.model.get("arch") == "autoencoder":
        raise ConfigError(f"{base} is an autoencoder run; derive from a generator")
    return to_dict(config)


def train_derived(mapping: dict, overrides: list[str], run_dir: Path, resume: bool, progress: bool) -> None:
    """Train one derived run; with ``resume``, a finished one is kept and an unfinished one continued."""
    config = resolve(apply_overrides(mapping, overrides))
    finished = resume and _last_step(run_dir) >= config.train.steps
    if not finished:
        Trainer(config, run_dir, resume=resume and (run_dir / "config.yaml").exists(), progress=progress).fit()


def _last_step(run_dir: Path) -> int:
    from difflab.training import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    return ckpt.read_json(latest / "trainer.json")["step"] if latest else -1
