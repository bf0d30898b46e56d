"""The training stage: one trainer for every network, EMAs, atomic checkpoints, torchrun data parallelism."""

from difflab.training.config import RunConfig, load_run_config, resolve
from difflab.training.ema import EMA, posthoc_ema
from difflab.training.trainer import Trainer, TrainingError, make_model

__all__ = ["EMA", "RunConfig", "Trainer", "TrainingError", "load_run_config", "make_model", "posthoc_ema",
           "resolve"]
