"""Read a run directory back: its config, a checkpoint's weights (an EMA by default) as a denoiser, samples."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from torch import nn

from difflab.config import load_yaml
from difflab.control import check_mask
from difflab.diffusion import Precond
from difflab.paths import replacing
from difflab.representation.encoders import Encoder, load_encoder
from difflab.training import checkpoint as ckpt
from difflab.training.config import RunConfig, resolve
from difflab.training.distributed import gather_shares, is_main, share
from difflab.training.trainer import ema_file, is_autoencoder, make_model


@dataclass
class Run:
    config: RunConfig
    model: nn.Module  # the denoiser Precond(network) of a generator, or an autoencoder
    checkpoint: Path | None  # None for weights still in memory (the trainer's own sample grids)
    weights: str  # "model" or the EMA's name
    encoder: Encoder | None = None  # a latent generator's (stage 2): its samples are decoded through it

    @property
    def network(self) -> nn.Module:
        return self.model.network if isinstance(self.model, Precond) else self.model

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape the network generates (a latent's for stage-2 runs)."""
        m = self.config.model
        frames = (m["frames"],) if m.get("frames") else ()
        return (m["in_channels"], *frames, m["resolution"], m["resolution"])

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of the pictures it makes (a latent run's: what its decoder returns)."""
        if self.encoder is None:
            return self.sample_shape
        device = next(self.network.parameters()).device
        with torch.no_grad():
            return tuple(self.encoder.decode(torch.zeros(1, *self.sample_shape, device=device)).shape[1:])

    @property
    def num_classes(self) -> int:
        return self.config.model.get("num_classes", 0)

    def prompt_condition(self, prompts: str | Sequence[str] | None, negative_prompt: str | None = None
                         ) -> tuple[dict, dict | None]:
        """(``text``/``text_mask`` of the prompts (batch 1 for one prompt or None, else one row per prompt), the
        negative prompt's for guidance or None). None is the null prompt, what unguided text models sample."""
        if not self.config.model.get("text_dim"):
            if prompts is not None or negative_prompt is not None:
                raise ValueError("this run is not text-conditional (trained without data.text_encoder): it takes no "
                                 "prompt")
            return {}, None
        from difflab.conditioning.text import load_text_encoder

        prompts = [prompts] if isinstance(prompts, str) else prompts
        if prompts is not None and (not prompts or any(not p.strip() for p in prompts)):
            raise ValueError("a prompt must not be empty (pass no prompt to sample unconditionally)")
        device = next(self.network.parameters()).device
        texts = list(prompts or [""]) + ([negative_prompt] if negative_prompt is not None else [])
        # One call pads the prompts and the negative prompt to the same length, as guidance's batch needs.
        text, mask = load_text_encoder(self.config.data.text_encoder, str(device))(texts)
        count = len(texts) - (negative_prompt is not None)
        if prompts is None:
            mask[:count] = False  # the null prompt
        condition = {"text": text[:count], "text_mask": mask[:count]}
        negative = {"text": text[count:], "text_mask": mask[count:]} if negative_prompt is not None else None
        return condition, negative


def load_run(run_dir: str | Path, ema: str | None = None, checkpoint: int | None = None, device="cpu") -> Run:
    """The denoiser of a run's checkpoint (latest by default) with EMA weights (``ema='none'``: raw weights).

    The trainer writes ``data.encoder`` as an absolute path; a relative one is relative to the run directory, so a
    latent run can travel with its autoencoder in a sub-folder."""
    run_dir = Path(run_dir)
    mapping = _run_mapping(run_dir)
    config = resolve(mapping)
    path, weights = _weights_file(run_dir, config.sample.ema, ema, checkpoint)
    encoder = load_encoder(config.data.encoder, device) if config.data.encoder else None
    return Run(config, make_model(config, ckpt.load_tensors(path), device), path.parent, weights, encoder)


def _run_mapping(run_dir: Path) -> dict:
    """A run's config.yaml, with a relative ``data.encoder`` made absolute against the run directory."""
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    mapping = load_yaml(run_dir / "config.yaml")
    encoder = (mapping.get("data") or {}).get("encoder")
    if encoder and not Path(encoder).is_absolute():  # a run shipped with its autoencoder inside (difflab export)
        mapping["data"]["encoder"] = str((run_dir / encoder).resolve())
    return mapping


def _weights_file(run_dir: Path, default: str | None, ema: str | None = None,
                  checkpoint: int | None = None) -> tuple[Path, str]:
    """(the weights file, "model" or the EMA's name) a run samples with: ``ema`` or the config's ``sample.ema``
    (``default``), else its first EMA, else the raw weights; of checkpoint ``checkpoint`` or the latest."""
    checkpoints = run_dir / "checkpoints"
    folder = checkpoints / ckpt.step_name(checkpoint) if checkpoint else ckpt.latest_checkpoint(checkpoints)
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint {'at step ' + str(checkpoint) if checkpoint else ''} in {checkpoints}")
    available = sorted(p.name[len("ema-") : -len(".safetensors")] for p in folder.glob("ema-*.safetensors"))
    name = ema or default or (available[0] if available else "none")
    if name == "none":
        return folder / "model.safetensors", "model"
    path = folder / ema_file(name)
    if not path.is_file():
        raise FileNotFoundError(f"no EMA {name!r} in {folder}; available: {', '.join(available) or 'none'}")
    return path, f"ema-{name.removeprefix('ema-')}"


def export_run(run_dir: str | Path, out: str | Path, half: bool = True) -> Path:
    """A slim copy of a run to share: its config, the weights it samples with from its latest checkpoint (fp16 with
    ``half``), its metrics, and a latent run's autoencoder exported the same way into ``OUT/autoencoder`` (named
    relatively, so the folder can move). No optimizer state, raw weights or other EMAs: it samples, it does not
    resume."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: choose a new folder")
    mapping = _run_mapping(run_dir)
    path, weights = _weights_file(run_dir, (mapping.get("sample") or {}).get("ema"))
    tensors = ckpt.load_tensors(path)
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    folder = out / "checkpoints" / path.parent.name
    folder.mkdir(parents=True)
    ckpt.save_tensors(folder / path.name, tensors)
    for extra in path.parent.glob("*.json"):  # an autoencoder's latent statistics
        if extra.name != "trainer.json":
            shutil.copy2(extra, folder / extra.name)
    (out / "checkpoints" / "latest").write_text(path.parent.name)
    if weights != "model":
        mapping.setdefault("sample", {})["ema"] = weights.removeprefix("ema-")
    encoder = (mapping.get("data") or {}).get("encoder")
    if encoder:
        export_run(encoder, out / "autoencoder", half)
        mapping["data"]["encoder"] = "autoencoder"
    (out / "config.yaml").write_text(yaml.safe_dump(mapping, sort_keys=False))
    if (run_dir / "metrics.csv").is_file():
        shutil.copy2(run_dir / "metrics.csv", out / "metrics.csv")
    return out


def draw(run: Run, n: int, class_label="balanced", seed: int = 0, progress: bool = False,
         prompts: str | Sequence[str] | None = None, negative_prompt: str | None = None, **options):
    """(images, labels) from a run with its ``sample:`` settings (``options`` override them); sample i uses
    seed ``seed + i``. ``class_label="balanced"`` falls back to unconditional for unconditional models.

    A text model takes ``prompts`` (one for all samples, or one per sample) and, with a guidance scale, a
    ``negative_prompt`` that replaces the null prompt as the negative branch; without a prompt it samples
    unconditionally.

    Control options are pictures (batch 1 or n) at the run's image resolution: ``init`` with ``strength`` <
    1 (image-to-image) or a ``mask`` (inpainting, 1 = generate; ``resample=(jump, count)`` for RePaint). A latent
    run encodes them, generates wherever a latent pixel touches the mask, and pastes the kept pixels back after
    decoding, so they come out exactly.

    Under torchrun (a process group is initialised) each process draws its share of the ``n`` samples and every
    process returns all of them: the same images as one process draws, as sample i depends only on its seed."""
    from difflab.sampling.generate import generate

    if is_autoencoder(run.config):
        raise ValueError("an autoencoder run reconstructs, it does not sample: use reconstruct()")
    if not run.num_classes and class_label == "balanced":
        class_label = None
    s = run.config.sample
    defaults = dict(solver=s.solver, steps=s.steps, schedule=s.schedule, sigma_min=s.sigma_min, sigma_max=s.sigma_max)
    if s.sigmas and not {"steps", "schedule", "sigma_min", "sigma_max"} & options.keys():
        defaults["sigmas"] = s.sigmas  # a student's own grid, unless the caller asks for another
    if run.config.model.get("guidance_embed"):
        options = _guidance_input(options)
    device = next(run.network.parameters()).device
    condition, negative = run.prompt_condition(prompts, negative_prompt)
    if condition and condition["text"].shape[0] not in (1, n):
        raise ValueError(f"got {condition['text'].shape[0]} prompts for {n} samples: pass one, or one per sample")
    options.update(condition)
    if negative is not None:
        options["negative"] = negative
    init, mask = options.get("init"), options.get("mask")
    if init is not None and mask is not None:
        options["mask"] = mask = check_mask(mask, init)  # the pixels' mask, checked once
    if run.encoder is not None and init is not None:
        options["init"] = torch.cat([run.encoder.encode(chunk.to(device)).cpu() for chunk in init.split(64)])
        if mask is not None:  # a latent pixel is generated where any of its pixels (or frames) is
            pool = F.adaptive_max_pool3d if mask.ndim == 5 else F.adaptive_max_pool2d
            options["mask"] = pool(mask, run.sample_shape[1:])
    if run.config.control.method == "inpaint":  # a mask-conditioned network: it also sees mask and known sample
        from difflab.control.objectives import inpainting_input

        if init is None or mask is None:
            raise ValueError("an inpainting run samples with an init image and a mask")
        known = options["init"]
        batch = max(options["mask"].shape[0], known.shape[0])
        options["concat"] = inpainting_input(known.expand(batch, *known.shape[1:]), options["mask"])
    part = share(n)  # under torchrun, each process draws its share of the samples
    images, labels = generate(run.model, run.sample_shape, n, num_classes=run.num_classes, class_label=class_label,
                              seed=seed, device=device, progress=progress, indices=part, **{**defaults, **options})
    if run.encoder is not None:
        images = torch.cat([run.encoder.decode(chunk.to(device)).cpu() for chunk in images.split(64)])
        if mask is not None:
            rows = slice(part.start, part.stop)
            init, mask = (t if t.shape[0] == 1 else t[rows] for t in (init, mask))
            images = torch.lerp(images, init.to(images), 1 - mask.to(images))
    return gather_shares(images, n), None if labels is None else gather_shares(labels, n)


@torch.no_grad()
def invert_images(run: Run, images: torch.Tensor, steps: int = 50, solver: str = "heun", refine: int = 0,
                  class_label: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, reconstructions) of ``images`` (B, C, H, W) in [-1, 1]: deterministic ODE inversion on the run's
    sampling schedule with ``steps`` steps (karras where the run's is ``optimized``), then sampling that noise back
    (:func:`difflab.control.invert`); a latent run inverts the images' latents and decodes. ``class_label``
    conditions both ways (default: the null class of a class-conditional model)."""
    from difflab.control import invert
    from difflab.sampling import SCHEDULES, sample
    from difflab.sampling.generate import class_labels

    if is_autoencoder(run.config):
        raise ValueError("an autoencoder run reconstructs, it does not sample: use reconstruct()")
    s = run.config.sample
    schedule = "karras" if s.schedule == "optimized" else s.schedule
    sigmas = SCHEDULES[schedule](steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max)
    device = next(run.network.parameters()).device
    x = images.to(device)
    x = run.encoder.encode(x) if run.encoder is not None else x
    if tuple(x.shape[1:]) != run.sample_shape:
        raise ValueError(f"images of shape {tuple(images.shape[1:])} do not fit this run's samples {run.sample_shape}")
    labels = class_labels(x.shape[0], class_label, run.num_classes)
    cond = {} if labels is None else {"class_labels": labels.to(device)}
    noise = invert(run.model, x, sigmas, solver=solver, refine=refine, **cond)
    back = sample(run.model, noise, solver=solver, sigmas=sigmas, **cond)
    back = run.encoder.decode(back) if run.encoder is not None else back
    return noise.cpu(), back.clamp(-1, 1).cpu()


def _guidance_input(options: dict) -> dict:
    """A guidance-distilled student takes its scale as an input (one forward pass), not through a guided denoiser."""
    from difflab.guidance import GuidanceConfig

    options = dict(options)
    guidance = options.pop("guidance", None)
    config = guidance if isinstance(guidance, GuidanceConfig) else GuidanceConfig(scale=1.0 if guidance is None
                                                                                  else guidance)
    if config != GuidanceConfig(scale=config.scale) or options.get("guide_with") is not None:
        raise ValueError("a guidance-distilled student takes only a guidance scale (no interval, rescale, APG or "
                         "autoguidance)")
    if isinstance(config.scale, tuple):
        raise ValueError("a guidance-distilled student samples with one guidance scale")
    return {**options, "guidance_scale": config.scale}


@torch.no_grad()
def reconstruct(run: Run, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` samples of an autoencoder run's data (drawn with ``seed``) and their reconstructions through the
    posterior mean, interleaved row by row: a row of originals, then the same row reconstructed (clips: a clip,
    then its reconstruction)."""
    from difflab.data import open_loader

    images = next(open_loader(run.config.data.dataset, n, seed=seed)).images
    device = next(run.model.parameters()).device
    reconstruction = run.model(images.to(device), sample=False)[0].clamp(-1, 1).cpu()
    columns = 1 if images.ndim == 5 else min(n, 8)
    rows = [chunk for pair in zip(images.split(columns), reconstruction.split(columns)) for chunk in pair]
    return torch.cat(rows)


def evaluate(run: Run, n: int, seed: int = 0, extractor=None, progress: bool = False,
             **options) -> tuple[dict, torch.Tensor]:
    """Score ``n`` class-balanced samples of a run against its data set (metrics and the noise floor);
    ``options`` go to :func:`draw` (e.g. ``guidance=``)."""
    from difflab.data import load_dataset
    from difflab.evaluation.features import FeatureExtractor, feature_network
    from difflab.evaluation.report import noise_floor, sample_metrics

    dataset = load_dataset(run.config.data.dataset)
    if run.encoder is not None and tuple(dataset.images.shape[1:]) == run.sample_shape:  # cached latents
        raise ValueError(f"{run.config.data.dataset} holds latents; evaluate against the images they came from")
    extractor = extractor or FeatureExtractor.from_network(feature_network(dataset.images, dataset.labels))
    images, labels = draw(run, n, seed=seed, progress=progress, **options)
    metrics = sample_metrics(images, labels, dataset, extractor)
    metrics["noise_floor_frechet_distance"] = noise_floor(dataset, extractor)
    return metrics, images


def write_samples(run: Run, out: str | Path, n: int, class_label="balanced", seed: int = 0, progress: bool = False,
                  columns: int | None = None, **options) -> Path:
    """Sample a run into a PNG grid (``columns`` wide; by default a column per class of a balanced
    class-conditional run; a video run's clips a row each, frames left to right), a ``.gif`` or ``.mp4``
    animation of a video run's grid, or an ``.npz`` archive (``images`` uint8 NHWC or NTHWC, ``labels`` int64,
    and the ``prompts`` of a text model). Under torchrun the processes share the samples and the first writes them."""
    from difflab.evaluation.plots import VIDEO_FORMATS, save_image_grid, save_video, to_uint8

    out = Path(out)
    if out.suffix not in (".png", ".npz", *VIDEO_FORMATS):
        raise ValueError(f"--out must end in .png, .npz, .gif or .mp4, got {out.name!r}")
    if out.suffix in VIDEO_FORMATS and not run.config.model.get("frames"):
        raise ValueError(f"{out.suffix} is for video runs; this run makes images: write a .png or .npz")
    if is_autoencoder(run.config):  # pictures of what it does: data over reconstruction
        if out.suffix != ".png":
            raise ValueError("an autoencoder run writes its reconstructions as a .png grid")
        return save_image_grid(reconstruct(run, n, seed), out, columns=min(n, 8)) if is_main() else out
    images, labels = draw(run, n, class_label, seed, progress, **options)
    if not is_main():  # under torchrun the first process writes what all of them drew
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = options.get("prompts")
    prompts = None if prompts is None else [prompts] * n if isinstance(prompts, str) else list(prompts)
    if columns is None and class_label == "balanced" and run.num_classes and images.ndim == 4:
        columns = run.num_classes
    if out.suffix == ".png":
        return save_image_grid(images, out, columns=columns)
    if out.suffix in VIDEO_FORMATS:
        return save_video(images, out, columns=columns)
    arrays = {"images": to_uint8(images)}  # (N, H, W, C) or (N, T, H, W, C)
    if labels is not None:
        arrays["labels"] = labels.numpy().astype(np.int64)
    if prompts is not None:
        arrays["prompts"] = np.array(prompts, dtype=str)
    with replacing(out) as tmp:
        np.savez(tmp, **arrays)
    return out


def posthoc_ema_into_checkpoint(run_dir: str | Path, sigma_rel: float) -> Path:
    """Reconstruct the power EMA of width ``sigma_rel`` at the last snapshot (EDM2 post-hoc EMA) and store it
    beside that step's checkpoint as ``ema-posthoc-<sigma_rel>.safetensors`` (``--ema posthoc-0.050``)."""
    from difflab.training.ema import posthoc_ema

    run_dir = Path(run_dir)
    files = sorted((run_dir / "ema-snapshots").glob("step-*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no EMA snapshots in {run_dir / 'ema-snapshots'}; train with "
                                "train.ema_sigma_rels and train.ema_snapshot_every")
    snapshots = []
    for file in files:
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        tensors = ckpt.load_tensors(file)
        step = int(meta["step"])
        for name, gamma in meta.items():
            if name.startswith("phema-"):
                state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
                snapshots.append((step, float(gamma), state))
    last = max(step for step, _, _ in snapshots)
    folder = run_dir / "checkpoints" / ckpt.step_name(last)
    if not folder.is_dir():
        raise FileNotFoundError(f"the last snapshot is at step {last} but {folder} does not exist")
    path = folder / f"ema-posthoc-{sigma_rel:.3f}.safetensors"
    with replacing(path) as tmp:
        metadata = {"ema": f"posthoc-{sigma_rel:.3f}", "step": str(last)}
        ckpt.save_tensors(tmp, posthoc_ema(snapshots, sigma_rel), metadata)
    return path
