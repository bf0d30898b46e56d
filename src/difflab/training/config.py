"""The run config: one typed object per YAML section (``model``, ``data``, ``diffusion``, ``optim``,
``train``, ``sample``), validated on load and written, fully resolved, to the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from difflab.config import ConfigError, apply_overrides, build, load_yaml
from difflab.control.lora import DEFAULT_TARGETS
from difflab.diffusion import LOSS_WEIGHTS, NOISE_LEVELS, PARAMETERIZATIONS
from difflab.representation.losses import AutoencoderLossConfig
from difflab.sampling import SCHEDULES, SOLVERS


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    # A built-in name (held in memory), a shard folder (streamed; difflab data shard) or a folder of video clips,
    # with options after a colon: "moving-digits:frames=16,digits=2", "clips/:frames=8,size=32".
    dataset: str = "digits"
    workers: int = 0  # processes decoding a streamed shard folder; 0 decodes in the training process
    # Stage 2 of latent diffusion: an autoencoder run directory or a diffusers AutoencoderKL folder. The generator
    # learns its latents: encoded on the fly from images, or read from latent shards (difflab encode).
    encoder: str | None = None
    # A text-to-image run: the frozen encoder of the captions and prompts, "minilm" or a Hugging Face model folder
    # (difflab.conditioning.text). It sets model.text_dim.
    text_encoder: str | None = None
    # Joint image-video training (video runs): image_share of the steps train on this image data set instead, each
    # image a one-frame clip and train.batch x frames of them a step, so the spatial layers learn from images too.
    images: str | None = None
    image_share: float = 0.5

    def __post_init__(self):
        from difflab.conditioning.text import encoder_folder
        from difflab.data import DATASETS
        from difflab.data.builtin import dataset_exists

        for name, value in (("dataset", self.dataset), ("images", self.images)):
            if value is not None and not dataset_exists(value):
                raise ValueError(f"{name} must be one of {', '.join(DATASETS)}, a shard folder or a folder of videos, "
                                 f"got {value!r}")
        if not 0 < self.image_share < 1:
            raise ValueError(f"image_share must be in (0, 1), got {self.image_share}")
        _positive("workers", self.workers, allow_zero=True)
        if self.text_encoder is not None:
            encoder_folder(self.text_encoder)


@dataclass(frozen=True)
class DiffusionConfig:
    parameterization: str = "edm"
    sigma_data: float = 0.5
    noise_levels: str = "lognormal"
    noise_options: dict = field(default_factory=dict)  # e.g. {p_mean: -1.2, p_std: 1.2}
    loss_weight: str = "edm"
    min_snr_gamma: float = 5.0
    # Shares of samples trained without their class label / caption (the null condition), for classifier-free
    # guidance; drawn independently, so a model with both learns each condition alone too.
    label_dropout: float = 0.1
    text_dropout: float = 0.1

    def __post_init__(self):
        _choice("parameterization", self.parameterization, PARAMETERIZATIONS)
        _choice("noise_levels", self.noise_levels, NOISE_LEVELS)
        _choice("loss_weight", self.loss_weight, LOSS_WEIGHTS)
        _positive("sigma_data", self.sigma_data)
        for name in ("label_dropout", "text_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        try:
            NOISE_LEVELS[self.noise_levels](**self.noise_options)
        except TypeError as exc:
            raise ValueError(f"noise_options do not fit {self.noise_levels}: {exc}") from None


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0
    decay: str = "constant"  # constant, cosine, linear or inverse_sqrt (EDM2) after warm-up
    decay_start: int = 0  # inverse_sqrt: steps before the decay starts (EDM2's t_ref)
    min_lr_ratio: float = 0.0  # cosine and linear end at lr * min_lr_ratio
    grad_clip: float | None = 1.0

    def __post_init__(self):
        _positive("lr", self.lr)
        _positive("warmup_steps", self.warmup_steps, allow_zero=True)
        _positive("grad_clip", self.grad_clip)
        _choice("decay", self.decay, ("constant", "cosine", "linear", "inverse_sqrt"))
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    max_minutes: float | None = None  # stop cleanly (with a checkpoint) after this much training time
    batch: int = 128  # global batch, split over processes and accumulation rounds
    accumulation: int = 1
    seed: int = 0
    # Start from this run's sampling weights; layers it lacks (a video model's temporal layers on an image run) keep
    # their own start, which is zero for temporal layers, so the new model begins as the run's model.
    init: str | None = None
    # bfloat16: autocast, and under fsdp/hsdp the weights are gathered in bf16 (the fp32 master copy stays sharded)
    precision: str = "float32"
    ema_decays: tuple[float, ...] = (0.999,)
    ema_sigma_rels: tuple[float, ...] = ()  # EDM2 power-function EMAs, e.g. [0.05, 0.1]
    ema_snapshot_every: int = 0  # store power-EMA snapshots for post-hoc EMA (0: off)
    log_every: int = 50
    sample_every: int = 0  # 0: only at the end
    checkpoint_every: int = 500
    keep: int = 2
    # Under torchrun: ddp, fsdp (FSDP2, every process holds a shard) or hsdp (shard inside a group of shard_size
    # processes, replicate across groups), see difflab.training.distributed.
    distributed: str = "ddp"
    shard_size: int = 0  # hsdp: processes per shard group (0: one node's processes, torchrun's LOCAL_WORLD_SIZE)
    bucket_mb: float = 25.0  # ddp: gradients are all-reduced in buckets of this size while the backward pass runs
    gradient_as_bucket_view: bool = True  # ddp: gradients are views into the buckets (one copy less in memory)
    static_graph: bool = False  # ddp: the same parameters are used every step (lets DDP plan its reduction once)
    reduce_precision: str = "float32"  # gradient reduction: float32 or bfloat16 (ddp: NCCL's bf16 compression hook)
    compile: bool | str = False  # torch.compile: false, true (the whole model) or "blocks" (each block on its own)
    threads: int | None = None  # CPU threads per process (default: PyTorch's)

    def __post_init__(self):
        for name in ("steps", "batch", "accumulation", "log_every", "checkpoint_every", "keep"):
            _positive(name, getattr(self, name))
        for name in ("sample_every", "ema_snapshot_every"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive("max_minutes", self.max_minutes)
        _choice("precision", self.precision, ("float32", "bfloat16"))
        _choice("distributed", self.distributed, ("ddp", "fsdp", "hsdp"))
        _choice("reduce_precision", self.reduce_precision, ("float32", "bfloat16"))
        _choice("compile", self.compile, (False, True, "blocks"))
        _positive("shard_size", self.shard_size, allow_zero=True)
        _positive("bucket_mb", self.bucket_mb)
        if self.static_graph and self.accumulation > 1:  # DDP's no_sync rounds break its static-graph reducer
            raise ValueError("static_graph cannot be combined with accumulation > 1 (DDP skips the all-reduce in "
                             "the first rounds, so the graph is not the same every backward pass)")
        if self.batch % self.accumulation:
            raise ValueError(f"batch {self.batch} is not divisible by accumulation {self.accumulation}")
        if not all(0 < d < 1 for d in self.ema_decays):
            raise ValueError(f"ema_decays must be in (0, 1), got {list(self.ema_decays)}")
        if not all(0 < s < 0.3 for s in self.ema_sigma_rels):
            raise ValueError(f"ema_sigma_rels must be in (0, 0.3), got {list(self.ema_sigma_rels)}")
        if self.ema_snapshot_every and not self.ema_sigma_rels:
            raise ValueError("ema_snapshot_every needs ema_sigma_rels (the power EMAs to snapshot)")


@dataclass(frozen=True)
class SampleConfig:
    """How sample grids (and ``difflab sample`` by default) are drawn."""

    solver: str = "heun"
    steps: int = 18
    schedule: str = "karras"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    n: int = 64
    ema: str | None = None  # which average (default: the first); null: the raw weights
    # An explicit grid (decreasing, ending in 0) that replaces schedule and sets steps: a distilled student's own.
    sigmas: tuple[float, ...] = ()

    def __post_init__(self):
        _choice("solver", self.solver, SOLVERS)
        if self.sigmas:
            s = [float(v) for v in self.sigmas]
            if len(s) < 2 or s[-1] != 0 or any(b >= a for a, b in zip(s, s[1:])) or s[-2] <= 0:
                raise ValueError(f"sample.sigmas must decrease from a positive value to 0, got {list(self.sigmas)}")
            object.__setattr__(self, "steps", len(s) - 1)
        _choice("schedule", self.schedule, [k for k in SCHEDULES if k != "optimized"])
        _positive("steps", self.steps)
        _positive("n", self.n)
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}")


DISTILLATION_METHODS = ("progressive", "consistency", "multistep_consistency", "consistency_training", "guidance")


@dataclass(frozen=True)
class DistillConfig:
    """A student's distillation (``difflab distill`` writes it; see :mod:`difflab.distillation`). No method: the run
    is ordinary training."""

    method: str | None = None  # one of DISTILLATION_METHODS
    teacher: str | None = None  # the teacher's run directory (consistency_training: optional, for initial weights)
    teacher_ema: str | None = None  # which of its averages (default: the teacher's sampling one)
    teacher_solver: str = "euler"  # progressive: the teacher's two steps per student step (euler = DDIM, or heun)
    teacher_sigmas: tuple[float, ...] = ()  # progressive: the teacher's grid; the student takes every other point
    intervals: int = 18  # consistency: N noise levels (karras, rho 7); consistency_training: the curriculum doubles
    # from 10 up to at most this many (iCT uses 1280 for long runs)
    target_decay: float = 0.95  # consistency: EMA decay of the target network (consistency_training: 0, as iCT)
    metric: str = "pseudo_huber"  # consistency: distance between student and target, pseudo_huber (iCT) or l2
    guidance_range: tuple[float, float] = (1.0, 4.0)  # guidance: the scales the student learns, drawn uniformly

    def __post_init__(self):
        if self.method is None:
            return
        _choice("distill.method", self.method, DISTILLATION_METHODS)
        if self.teacher is None and self.method != "consistency_training":
            raise ValueError(f"distill.method {self.method} needs distill.teacher (a run directory)")
        _choice("distill.teacher_solver", self.teacher_solver, ("euler", "heun"))
        _choice("distill.metric", self.metric, ("pseudo_huber", "l2"))
        if self.method == "progressive":
            s = list(self.teacher_sigmas)
            if len(s) < 3 or (len(s) - 1) % 2 or s[-1] != 0 or any(b >= a for a, b in zip(s, s[1:])):
                raise ValueError("distill.teacher_sigmas must be an even number of steps decreasing to 0, "
                                 f"got {s}")
        if self.intervals < 2:
            raise ValueError(f"distill.intervals must be at least 2, got {self.intervals}")
        if not 0 <= self.target_decay < 1:
            raise ValueError(f"distill.target_decay must be in [0, 1), got {self.target_decay}")
        lo, hi = self.guidance_range
        if not 0 <= lo <= hi:
            raise ValueError(f"distill.guidance_range must be (low, high) with 0 <= low <= high, got {lo}, {hi}")


CONTROL_METHODS = ("controlnet", "lora", "inpaint")
CONTROL_KINDS = ("sobel", "mask", "lowres")  # the control pictures a ControlNet learns (difflab.control.pictures)


@dataclass(frozen=True)
class ControlConfig:
    """A fine-tune of a trained base run (``difflab finetune`` writes it; see :mod:`difflab.control`). No method:
    none."""

    method: str | None = None  # controlnet, lora (both on the frozen base) or inpaint (mask-conditioned, all trained)
    base: str | None = None  # the base run directory whose weights the fine-tune starts from
    kind: str = "sobel"  # controlnet: the control picture made from each training image (CONTROL_KINDS)
    rank: int = 4  # lora: the rank of each layer's update
    alpha: float = 4.0  # lora: the update is scaled by alpha / rank
    targets: tuple[str, ...] = DEFAULT_TARGETS  # lora: fnmatch patterns of the layers that get an update

    def __post_init__(self):
        if self.method is None:
            return
        _choice("control.method", self.method, CONTROL_METHODS)
        if self.base is None:
            raise ValueError(f"control.method {self.method} needs control.base (a run directory)")
        _choice("control.kind", self.kind, CONTROL_KINDS)
        _positive("control.rank", self.rank)
        _positive("control.alpha", self.alpha)
        if not self.targets:
            raise ValueError("control.targets must list at least one layer pattern")


@dataclass(frozen=True)
class RunConfig:
    model: dict = field(default_factory=dict)  # a network mapping (arch or preset plus keys), see models
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)  # autoencoder runs only
    distill: DistillConfig = field(default_factory=DistillConfig)  # students only
    control: ControlConfig = field(default_factory=ControlConfig)  # fine-tunes of a base run only


def encoder_source(config: RunConfig, data) -> str | None:
    """The encoder a run's generator learns the latents of: ``data.encoder``, or the one latent shards were
    written with. Latent shards written with another encoder than ``data.encoder`` are an error."""
    stored = getattr(data, "encoder", None)
    given = config.data.encoder and str(Path(config.data.encoder).resolve())
    if stored and given and stored != given:
        raise ConfigError(f"data.dataset holds latents of {stored}, but data.encoder is {given}")
    return given or stored


def resolve(mapping: dict, overrides: list[str] = ()) -> RunConfig:
    """A validated :class:`RunConfig` with every default filled in, the model completed from the data set."""
    from difflab.data import open_loader
    from difflab.models import network_config, network_mapping

    config = build(RunConfig, apply_overrides(mapping, overrides))
    if not config.model:
        raise ConfigError("the config needs a model: section (arch or preset plus keys)")
    if config.train.init and (config.distill.method or config.control.method):
        raise ConfigError("train.init cannot be combined with distill or control: a student or fine-tune starts from "
                          "its teacher or base run")
    data = open_loader(config.data.dataset, batch=1)
    shape, num_classes = data.sample_shape, data.num_classes
    model = dict(config.model)
    if model.get("arch") == "autoencoder":  # any image size the downsampling factor divides
        if config.data.encoder:
            raise ConfigError("an autoencoder learns from data, not from latents: remove data.encoder")
        model.setdefault("in_channels", shape[0])
        network = network_config(model)
        try:
            network.latent_shape(shape)
        except ValueError as exc:
            raise ConfigError(f"data set {config.data.dataset!r}: {exc}") from None
        return replace(config, model=network_mapping(network))
    source = encoder_source(config, data)
    if source and not getattr(data, "encoder", None):  # images, encoded on the fly
        from difflab.representation.encoders import load_encoder

        shape = load_encoder(source).latent_shape(shape)
    # The data set (or its latents) fixes the input; a config may leave these keys out.
    model.setdefault("in_channels", shape[0])
    model.setdefault("resolution", shape[-1])
    model.setdefault("num_classes", num_classes)
    if config.data.text_encoder:
        from difflab.conditioning.text import encoder_dim

        if data.captions() is None:
            raise ConfigError(f"data.text_encoder is set, but data set {config.data.dataset!r} has no captions")
        dim = encoder_dim(config.data.text_encoder)
        if model.setdefault("text_dim", dim) != dim:
            raise ConfigError(f"model.text_dim is {model['text_dim']}, but text encoder {config.data.text_encoder!r} "
                              f"gives {dim}-d token states")
    elif model.get("text_dim"):
        raise ConfigError("model.text_dim is set but data.text_encoder is not: name the encoder of the prompts "
                          "(e.g. data.text_encoder=minilm)")
    if len(shape) == 4:  # video (C, T, H, W)
        model.setdefault("frames", shape[1])
    network = network_config(model)  # validates the model section
    if network.in_channels != shape[0] or network.resolution != shape[-1]:
        raise ConfigError(
            f"model expects {network.in_channels}x{network.resolution}x{network.resolution} inputs but data set "
            f"{config.data.dataset!r} has {'x'.join(map(str, shape))}"
        )
    if config.data.images:
        _check_joint_images(config, shape, network, source)
    return replace(config, model=network_mapping(network), data=replace(config.data, encoder=source))


def _check_joint_images(config: RunConfig, shape: tuple[int, ...], network, encoder: str | None) -> None:
    """data.images: a video generator on pixels (``encoder``: the run's, if it learns latents), and images of its
    frames' shape."""
    from difflab.data import open_loader

    if len(shape) != 4:
        raise ConfigError(f"data.images trains a video model on images too, but data set {config.data.dataset!r} "
                          "holds images")
    if source := encoder or config.data.text_encoder:
        raise ConfigError(f"data.images is not supported with an encoder ({source}): joint training is on pixels "
                          "with class labels or none")
    if config.distill.method or config.control.method:
        raise ConfigError("data.images is not supported for students and fine-tunes")
    if config.train.static_graph:
        raise ConfigError("data.images: image steps skip the temporal layers, so the parameters a step uses change; "
                          "set train.static_graph=false")
    if getattr(network, "frame_patch", 1) != 1:
        raise ConfigError(f"data.images needs one-frame clips, which model.frame_patch {network.frame_patch} "
                          "cannot patch: use frame_patch 1")
    images = open_loader(config.data.images, batch=1)
    frame = (shape[0], *shape[2:])
    if images.bucketed or images.encoder or tuple(images.sample_shape) not in (frame, (shape[0], 1, *shape[2:])):
        found = "latents" if images.encoder else "x".join(map(str, images.sample_shape))
        raise ConfigError(f"data.images {config.data.images!r} holds {found}, not images of the video's "
                          f"{'x'.join(map(str, frame))} frames")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    return resolve(load_yaml(path), overrides)
