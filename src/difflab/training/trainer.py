"""The one trainer: config in, run directory out (DESIGN.md), for every network and parameterisation.

Each optimizer step draws a global batch, splits it over processes and accumulation rounds, and minimises
an objective (``objectives.py``): the denoising loss of ``Precond(network)`` with the math core's noise levels
and loss weights (EDM, Eq. 2), on pixels or latents, or an autoencoder's reconstruction, KL and GAN losses.
Everything random (data order, noise levels, noise, label dropout) is drawn for the *global* batch from one seeded
generator and sliced per process, so a run on N processes sees the same samples and noise as on one,
and a resumed run continues bit for bit: the generator state, the data position, the optimizer and the
EMAs are all in the checkpoint.
"""

from __future__ import annotations

import csv
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm.auto import tqdm

from difflab import __version__
from difflab.config import to_dict
from difflab.data import open_loader
from difflab.diffusion import Precond
from difflab.models import build_network
from difflab.models.factory import blocks
from difflab.paths import replacing, write_atomic
from difflab.representation.encoders import latent_statistics, load_encoder, write_statistics
from difflab.training import checkpoint as ckpt
from difflab.training.config import RunConfig
from difflab.training.distributed import World, close_world, gradient_sync, init_world, wrap
from difflab.training.ema import EMA, unwrapped_state_dict
from difflab.training.objectives import AutoencoderObjective, DiffusionObjective, Share, start_from_run

METRICS = ["step", "loss", "grad_norm", "lr", "images_per_second", "minutes"]
STATISTICS_BATCH, STATISTICS_BATCHES = 64, 16  # latent statistics from 1,024 training samples


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message says which checkpoint is intact."""


def ema_file(name: str) -> str:
    return f"ema-{name.removeprefix('ema-')}.safetensors"


def lr_factor(step: int, config: RunConfig) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warm-up, then the decay."""
    o, total = config.optim, config.train.steps
    warmup = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0
    progress = min(1.0, max(0.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps)))
    if o.decay == "cosine":
        decay = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    elif o.decay == "linear":
        decay = 1 - (1 - o.min_lr_ratio) * progress
    elif o.decay == "inverse_sqrt":  # EDM2, Eq. 67
        decay = 1 / math.sqrt(max(step / o.decay_start, 1)) if o.decay_start else 1 / math.sqrt(max(step, 1))
    else:
        decay = 1.0
    return warmup * decay


def is_autoencoder(config: RunConfig) -> bool:
    return config.model.get("arch") == "autoencoder"


def make_model(config: RunConfig, state: dict | None = None, device=None) -> nn.Module:
    """What a run config trains, with the given weights (a network state dict): the denoiser ``Precond(network)``
    of a generator, or the autoencoder itself."""
    network = build_network(config.model)
    if config.control.method == "lora":  # the adapter's layers, as its checkpoints hold them
        from difflab.control.lora import add_lora

        add_lora(network, config.control.rank, config.control.alpha, config.control.targets)
    if state is not None:
        network.load_state_dict(state)
    if is_autoencoder(config):
        return network.to(device).eval()
    d = config.diffusion
    return Precond(network, d.parameterization, sigma_data=d.sigma_data).to(device).eval()


def config_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


class Trainer:
    """Trains the model a :class:`RunConfig` describes into ``run_dir``; ``resume`` continues the newest checkpoint."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, resume: bool = False, progress: bool = True):
        self.config, self.run_dir, self.progress = config, Path(run_dir), progress
        self.world: World = init_world()
        t = config.train
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.batch % (t.accumulation * self.world.size):
            raise ValueError(f"train.batch {t.batch} is not divisible by accumulation x processes "
                             f"({t.accumulation} x {self.world.size})")
        self.checkpoints = self.run_dir / "checkpoints"
        if not resume and (self.run_dir / "config.yaml").exists():
            raise FileExistsError(f"run directory {self.run_dir} already holds a run; pass --resume to continue it "
                                  "or choose another --run-dir")

        self.loader = open_loader(config.data.dataset, t.batch // t.accumulation, seed=t.seed, rank=self.world.rank,
                                  world_size=self.world.size, workers=config.data.workers)
        self.sample_shape = self.loader.sample_shape  # what the network sees
        self.image_loader = None  # joint image-video training: one-frame clips, train.batch x frames a step
        if config.data.images:
            self.image_loader = open_loader(config.data.images, t.batch * self.sample_shape[1] // t.accumulation,
                                            seed=t.seed + 3, rank=self.world.rank, world_size=self.world.size,
                                            workers=config.data.workers)
        self.encoder = None  # stage 2: the frozen encoder of data.encoder, for images and for sample grids
        if config.data.encoder:
            self.encoder = load_encoder(config.data.encoder, self.world.device)
            if not self.loader.encoder:  # images: encoded on the fly
                self.sample_shape = self.encoder.latent_shape(self.sample_shape)
        torch.manual_seed(t.seed)  # the same initial weights on every process
        self.network = build_network(config.model).to(self.world.device)
        if t.init and not resume:  # a resumed run's checkpoint holds its weights
            start_from_run(self.network, t.init, f"train.init: the model differs from the run {t.init}", ("",))
        self.generator = torch.Generator().manual_seed(t.seed + 1)  # randomness of the global batch
        if is_autoencoder(config):
            if self.world.size > 1 and t.distributed != "ddp":
                raise ValueError("autoencoder runs use train.distributed=ddp (the discriminator is not sharded)")
            self.objective = AutoencoderObjective(config, self.network, self.generator,
                                                  lambda m: wrap(m, t, self.world), self.world.device)
        else:
            on_the_fly = self.encoder if self.encoder is not None and not self.loader.encoder else None
            objective = DiffusionObjective
            if (config.distill.method or config.control.method) and self.world.size > 1 and t.distributed != "ddp":
                raise ValueError("students and fine-tunes use train.distributed=ddp (the teacher or base run they "
                                 "load is not sharded)")
            if config.distill.method:  # a student: its objective loads the teacher and starts from its weights
                from difflab.distillation import OBJECTIVES

                objective = OBJECTIVES[config.distill.method]
            elif config.control.method:  # a fine-tune: its objective loads the base run and freezes it
                from difflab.control.objectives import OBJECTIVES

                objective = OBJECTIVES[config.control.method]
            self.objective = objective(config, self.network, self.generator, config.model.get("num_classes", 0),
                                       on_the_fly)
        if t.compile == "blocks":  # each block compiled in place, before FSDP wraps it
            for block in blocks(self.objective.module):
                block.compile()
        # Wrap first: FSDP replaces the parameters by shards, which the EMA and the optimizer must hold.
        self.parallel = wrap(self.objective.module, t, self.world, unused_parameters=self.image_loader is not None)
        self.model = self.parallel
        self.sharded = self.world.size > 1 and t.distributed != "ddp"
        self.ema = EMA(self.network, decays=t.ema_decays, sigma_rels=t.ema_sigma_rels)
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps,
            weight_decay=config.optim.weight_decay, **_fused(self.world.device),
        )
        self.step, self.elapsed, self.images, self.logs = 0, 0.0, 0, {}
        # Written only now: a run that fails to set up (a bad teacher, a model that does not fit) leaves nothing.
        if self.world.main:
            self._prepare_run_dir()
        self.world.barrier()
        if resume:
            self._load(ckpt.latest_checkpoint(self.checkpoints))
        if t.compile is True:
            self.model = torch.compile(self.model)

    # ----------------------------------------------------------------------------------------------- set-up
    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial(self.checkpoints)
        write_atomic(self.run_dir / "config.yaml", config_yaml(self.config))
        (self.run_dir / "samples").mkdir(exist_ok=True)

    def _load(self, folder: Path | None) -> None:
        if folder is None:  # killed before its first checkpoint: nothing to resume, start afresh
            if self.world.main:
                print(f"difflab train: no complete checkpoint in {self.checkpoints}; starting from step 0")
                _truncate_metrics(self.run_dir / "metrics.csv", 0)
            return
        set_model_state_dict(self.network, ckpt.load_tensors(folder / "model.safetensors"),
                             options=StateDictOptions(full_state_dict=True))
        current = self.ema.state_dict()
        ema_state = {}
        for name in self.ema.names:
            for key, value in ckpt.load_tensors(folder / ema_file(name)).items():
                ema_state[f"{name}/{key}"] = _shard_like(value, current[f"{name}/{key}"])
        self.ema.load_state_dict(ema_state)
        meta = ckpt.read_json(folder / "trainer.json")
        tensors = ckpt.load_tensors(folder / "trainer.safetensors")
        if (folder / "optimizer").is_dir():  # written sharded: DCP reads (and reshards) for any world size
            state = get_optimizer_state_dict(self.network, self.optimizer)
            dcp.load({"optimizer": state}, checkpoint_id=str(folder / "optimizer"))
            set_optimizer_state_dict(self.network, self.optimizer, state)
        else:
            optimizer = {k.removeprefix("optimizer."): v for k, v in tensors.items() if k.startswith("optimizer.")}
            self.optimizer.load_state_dict(ckpt.optimizer_from_tensors(optimizer, meta["optimizer"]))
            for param, state in self.optimizer.state.items():
                for key, value in state.items():  # moments in the parameter's layout (channels-last
                    if value.shape == param.shape:  # convolutions): the fused kernel assumes it
                        state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
        self.objective.load_state_tensors(
            {k.removeprefix("objective."): v for k, v in tensors.items() if k.startswith("objective.")},
            meta.get("objective") or {})
        torch.set_rng_state(tensors["rng.torch"])
        self.generator.set_state(tensors["rng.noise"])
        self.loader.load_state_dict(meta["data"])
        if self.image_loader:
            self.image_loader.load_state_dict(meta["image_data"])
        self.step, self.elapsed, self.images = meta["step"], meta["elapsed_seconds"], meta["images"]
        if self.world.main:
            _truncate_metrics(self.run_dir / "metrics.csv", self.step)

    # --------------------------------------------------------------------------------------------- training
    def image_step(self, step: int) -> bool:
        """Whether step ``step`` (from 0) of a joint image-video run trains on images: data.image_share of the
        steps, spread evenly (with a share of 0.5, every second step)."""
        share = self.config.data.image_share
        return self.image_loader is not None and math.floor((step + 1) * share) > math.floor(step * share)

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over the global batch; returns (mean loss on this process, gradient norm)."""
        t, world = self.config.train, self.world
        loader, size, shape = self.loader, t.batch, self.sample_shape
        if self.image_step(self.step):  # one-frame clips, as many frames as a step of clips
            loader, size, shape = self.image_loader, t.batch * shape[1], (shape[0], 1, *shape[2:])
        micro = size // t.accumulation
        bf16 = t.precision == "bfloat16"
        autocast = torch.autocast(world.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        # Drawn for the whole global batch, then sliced: the same samples see the same randomness whatever the
        # number of processes or accumulation rounds (aspect-ratio buckets: per round, see the objective).
        draws = self.objective.draw(size, None if loader.bucketed else shape, self.step)
        total = torch.zeros((), dtype=torch.float64, device=world.device)  # sums as Python floats would
        for round_ in range(t.accumulation):
            batch = next(loader)
            images = batch.images.to(world.device)
            if loader is self.image_loader:  # (B, C, H, W) images as (B, C, 1, H, W) clips
                images = images.view(-1, *shape)
            share = Share(round_, micro, world.rank, world.size)
            with gradient_sync(self.parallel, round_ == t.accumulation - 1), autocast:
                loss, logs = self.objective.loss(self.model, batch._replace(images=images), draws, share, self.step)
                loss = loss / t.accumulation
            loss.backward()
            total += loss.detach()
        total = total.item()  # one synchronisation per step, not one per accumulation round
        max_norm = self.config.optim.grad_clip or float("inf")
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(self.network.parameters(), max_norm)).item()
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            latest = ckpt.latest_checkpoint(self.checkpoints)
            kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
            raise TrainingError(f"non-finite loss or gradient at step {self.step + 1} (loss {total}); "
                                f"stopped, {kept}")
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.optim.lr * lr_factor(self.step, self.config)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.logs = {**logs, **self.objective.after_step(self.step)}  # the last round's terms
        self.step += 1
        self.images += size
        self.ema.update(self.network, self.step)
        return total, grad_norm

    def fit(self) -> dict:
        """Train until ``train.steps`` or ``train.max_minutes``; checkpoint, sample and log on the way."""
        t, world = self.config.train, self.world
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.progress and world.main), unit="step",
                   dynamic_ncols=True)
        columns = METRICS + list(self.objective.columns)
        metrics = _MetricsWriter(self.run_dir / "metrics.csv", columns) if world.main else None
        interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
        interval_images = self.images
        segment_start, start_elapsed = time.perf_counter(), self.elapsed
        stop_reason = "steps"
        try:
            while self.step < t.steps:
                loss, grad_norm = self.train_step()
                interval_loss, interval_steps = interval_loss + loss, interval_steps + 1
                self.elapsed = start_elapsed + time.perf_counter() - segment_start
                out_of_time = t.max_minutes is not None and world.any(self.elapsed >= 60 * t.max_minutes)
                if self.step % t.log_every == 0 or self.step == t.steps or out_of_time:
                    seconds = time.perf_counter() - interval_start
                    row = dict(step=self.step, loss=world.mean(interval_loss / interval_steps), grad_norm=grad_norm,
                               lr=self.optimizer.param_groups[0]["lr"],
                               images_per_second=(self.images - interval_images) / seconds, minutes=self.elapsed / 60,
                               **{c: self.logs[c] for c in self.objective.columns if c in self.logs})
                    if metrics:
                        metrics.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_second']:.0f}")
                    interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
                    interval_images = self.images
                bar.update(1)
                if t.ema_snapshot_every and self.step % t.ema_snapshot_every == 0:
                    self.save_ema_snapshot()
                if t.sample_every and self.step % t.sample_every == 0 and self.step != t.steps:
                    self.save_samples()
                if self.step % t.checkpoint_every == 0 and self.step != t.steps and not out_of_time:
                    self.save_checkpoint()
                if out_of_time:
                    stop_reason = f"max_minutes={t.max_minutes:g}"
                    break
            if t.ema_snapshot_every and self.step % t.ema_snapshot_every:
                self.save_ema_snapshot()  # post-hoc EMA can then be reconstructed at the final step
            self.save_checkpoint()
            grid = self.save_samples()
        finally:
            bar.close()
            if metrics:
                metrics.close()
        summary = dict(step=self.step, stopped_by=stop_reason, minutes=self.elapsed / 60, images=self.images,
                       run_dir=str(self.run_dir), samples=str(grid) if grid else None)
        if world.main:
            print(f"difflab train: {self.step} steps ({stop_reason}) in {self.elapsed / 60:.1f} min, "
                  f"{self.images} images; checkpoint {ckpt.latest_checkpoint(self.checkpoints)}; samples {grid}")
        close_world(world)
        return summary

    # ------------------------------------------------------------------------------------------ artefacts
    def save_checkpoint(self) -> None:
        """Weights, EMAs and trainer state, written atomically by the main process; under FSDP every process
        helps gather full weights and writes its optimizer shards (``torch.distributed.checkpoint``)."""
        model = {k: _full(v) for k, v in unwrapped_state_dict(self.network).items()}
        averages = {name: {k: _full(v) for k, v in avg.items()} for name, avg in self.ema.averages().items()}
        tmp = ckpt.begin(self.checkpoints, self.step) if self.world.main else None
        self.world.barrier()
        tmp = tmp or self.checkpoints / f".tmp-{ckpt.step_name(self.step)}"
        if self.sharded:
            dcp.save({"optimizer": get_optimizer_state_dict(self.network, self.optimizer)},
                     checkpoint_id=str(tmp / "optimizer"))
        if self.world.main:
            metadata = {"config": config_yaml(self.config), "step": str(self.step), "difflab": __version__}
            ckpt.save_tensors(tmp / "model.safetensors", model, metadata)
            for name, average in averages.items():
                ckpt.save_tensors(tmp / ema_file(name), average, {**metadata, "ema": name})
            tensors = {"rng.torch": torch.get_rng_state(), "rng.noise": self.generator.get_state()}
            objective, objective_settings = self.objective.state_tensors()
            tensors.update({f"objective.{k}": v for k, v in objective.items()})
            settings = None
            if not self.sharded:
                optimizer, settings = ckpt.optimizer_to_tensors(self.optimizer.state_dict())
                tensors.update({f"optimizer.{k}": v for k, v in optimizer.items()})
            ckpt.save_tensors(tmp / "trainer.safetensors", tensors)
            ckpt.write_json(tmp / "trainer.json", dict(
                step=self.step, elapsed_seconds=self.elapsed, images=self.images, data=self.loader.state_dict(),
                **({"image_data": self.image_loader.state_dict()} if self.image_loader else {}),
                optimizer=settings, objective=objective_settings, world_size=self.world.size, difflab=__version__,
            ))
            if is_autoencoder(self.config):
                name = self._sampling_name()
                self._write_latent_statistics(tmp, averages[name] if name else model)
            ckpt.commit(self.checkpoints, tmp, self.step, self.config.train.keep)
        self.world.barrier()

    def save_ema_snapshot(self) -> None:
        """The power-function EMAs at this step, kept for post-hoc EMA (``difflab ema``)."""
        tensors = {f"{name}/{k}": _full(v) for name, avg in self.ema.averages().items() if name.startswith("phema")
                   for k, v in avg.items()}
        if self.world.main:
            gammas = {name: repr(gamma) for name, gamma in self.ema.gammas.items()}
            with replacing(self.run_dir / "ema-snapshots" / f"{ckpt.step_name(self.step)}.safetensors") as tmp:
                ckpt.save_tensors(tmp, tensors, {"step": str(self.step), **gammas})
        self.world.barrier()

    def _sampling_name(self) -> str | None:
        """The average samples (and latent statistics) use: ``sample.ema``, the first EMA, or None (raw weights)."""
        return self.config.sample.ema or (self.ema.names[0] if self.ema.names else None)

    def _sampling_weights(self) -> tuple[dict, str | None]:
        """The weights of :meth:`_sampling_name`, whole; a collective."""
        name = self._sampling_name()
        weights = self.ema.average(name) if name else unwrapped_state_dict(self.network)
        return {k: _full(v) for k, v in weights.items()}, name  # every process takes part in gathering shards

    def save_samples(self) -> Path | None:
        """A grid in ``samples/`` from the first EMA: samples (balanced over classes, a row per training caption
        for a text model, decoded from latents in stage 2), or an autoencoder's reconstructions under the
        originals. None for an inpainting fine-tune, which samples only with a picture and a mask."""
        if self.config.control.method == "inpaint":
            return None
        from difflab.training.run import Run, write_samples  # run.py builds on this module

        state, name = self._sampling_weights()
        model = make_model(self.config, state, self.world.device)
        run = Run(self.config, model, None, name or "model", self.encoder)
        n, options = self.config.sample.n, {}
        if self.config.model.get("text_dim"):  # a row for each of up to 8 training captions, unguided
            captions, _ = self.loader.captions()
            rows = min(8, n)
            chosen = [captions[k * len(captions) // rows] for k in range(rows)]
            options["prompts"] = [caption for caption in chosen for _ in range(n // rows)]
            n, options["columns"] = len(options["prompts"]), n // rows
        # Every process draws a share of the grid (draw() under torchrun); the first writes it.
        path = write_samples(run, self.run_dir / "samples" / f"{ckpt.step_name(self.step)}.png", n=n, **options)
        self.world.barrier()
        return path

    def _write_latent_statistics(self, folder: Path, state: dict) -> None:
        """Per-channel statistics of the autoencoder's latents over training data, beside its weights."""
        autoencoder = make_model(self.config, state, self.world.device)
        data = open_loader(self.config.data.dataset, STATISTICS_BATCH, seed=self.config.train.seed + 2)
        batches = [next(data)[0] for _ in range(STATISTICS_BATCHES)]
        shift, scale = latent_statistics(autoencoder, (x.to(self.world.device) for x in batches))
        write_statistics(folder, shift, scale, images=STATISTICS_BATCH * STATISTICS_BATCHES)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every process must call it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A full tensor cut into the shards of ``like`` (an FSDP DTensor), or the tensor itself."""
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements)
    return full


def _fused(device: torch.device) -> dict:
    """Fused AdamW where this torch build has it for the device (one kernel for all parameters)."""
    return {"fused": True} if device.type in ("cpu", "cuda") else {}


class _MetricsWriter:
    """Appends rows to metrics.csv (and to TensorBoard when it is installed)."""

    def __init__(self, path: Path, columns: list[str]):
        new = not path.exists() or path.stat().st_size == 0
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=columns)
        if new:
            self.writer.writeheader()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            self.board = None

    def write(self, row: dict) -> None:
        self.writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()
        if self.board:
            for key, value in row.items():
                if key != "step":
                    self.board.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.board:
            self.board.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` by a run that was killed before its next checkpoint."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if int(row["step"]) <= step]
        fields = reader.fieldnames or METRICS  # read here: an empty file (killed before its header) has none
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
