"""Stage 1 and the two-stage pipeline on the emoji: reconstruction quality of a KL autoencoder (f=4, c=4) after a
CPU training budget, and a latent generator against a pixel one at equal wall-clock.

Held-out images (10% of the built-in emoji, seed 0) are never trained on. Reconstruction: PSNR, SSIM and the
Fréchet distance between reconstructions and originals, beside bicubic down- and up-sampling by the same factor
(a reference with no learning). The Fréchet distances use a small classifier trained on the emoji with k-means
cluster labels (no pretrained Inception network is available offline), cached like the digits' one.
Two-stage against pixel space: the same U-Net family trained for the same minutes on the pixels (32x32x3)
and on the cached latents (8x8x4); training images/s and the Fréchet distance of samples to the held-out set.

    .venv/bin/python benchmarks/autoencoder.py --json out/bench/autoencoder.json   # 30 + 2 x 15 minutes
    .venv/bin/python benchmarks/autoencoder.py --quick                              # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.config import load_yaml
from difflab.data import load_dataset
from difflab.data.shards import write_shards
from difflab.data.sources import scan_folder
from difflab.evaluation import cluster_features, frechet_distance, psnr, ssim
from difflab.representation import encode_dataset
from difflab.training import Trainer, resolve
from difflab.training.run import draw, load_run
from output import write_json

ROOT = Path(__file__).parents[1]
PIXEL_UNET = {"arch": "unet", "channels": 64, "channel_mult": [1, 2, 2], "blocks_per_level": 2,
              "attention_resolutions": [16], "head_dim": 64}
LATENT_UNET = {"arch": "unet", "channels": 64, "channel_mult": [1, 2], "blocks_per_level": 2,
               "attention_resolutions": [4], "head_dim": 64}


def write_split(images: torch.Tensor, folder: Path, out: Path) -> Path:
    """PNG files of ``images`` in ``folder``, sharded into ``out`` at their own size."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    for k, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"{k:05d}.png")
    write_shards(folder, scan_folder(folder), out, images.shape[-1], per_shard=1000)
    return out


def train(config: dict, run_dir: Path, minutes: float) -> dict:
    """Train ``config`` for ``minutes`` (its ``train.steps`` is only a ceiling); the trainer's summary."""
    config = {**config, "train": {**config.get("train", {}), "max_minutes": minutes}}
    return Trainer(resolve(config), run_dir, progress=False).fit()


def held_out_figure(images: torch.Tensor, reconstructions: torch.Tensor, path: Path, count: int = 32) -> Path:
    """Rows of 8 held-out images, each followed by its reconstruction."""
    from difflab.evaluation.plots import save_image_grid

    pairs = zip(images[:count].split(8), reconstructions[:count].split(8), strict=True)
    return save_image_grid(torch.cat([chunk for pair in pairs for chunk in pair]), path, columns=8)


def images_per_second(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv") as f:
        rates = [float(row["images_per_second"]) for row in csv.DictReader(f)]
    return float(np.median(rates[1:] or rates))  # the first interval holds start-up work


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench/autoencoder"), help="run directories here")
    parser.add_argument("--ae-minutes", type=float, default=30.0, help="autoencoder training budget")
    parser.add_argument("--generator-minutes", type=float, default=15.0, help="budget of each generator")
    parser.add_argument("--samples", type=int, default=1000, help="generator samples scored")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/autoencoder_emoji.png"),
                        help="held-out images over their reconstructions")
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: a smoke run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ae_config = load_yaml(ROOT / "configs" / "ae-emoji.yaml")
    pixel_model, latent_model, clusters, epochs = PIXEL_UNET, LATENT_UNET, 32, 15
    generator_train = {"steps": 1_000_000, "batch": 64, "log_every": 20, "checkpoint_every": 1_000_000,
                       "threads": args.threads, "ema_decays": [0.999]}
    if args.quick:
        args.ae_minutes, args.generator_minutes, args.samples, clusters, epochs = 0.05, 0.03, 40, 4, 1
        ae_config["model"] = {**ae_config["model"], "channels": 16}
        ae_config["train"] = {**ae_config["train"], "batch": 8, "log_every": 1}
        pixel_model = latent_model = {"arch": "unet", "channels": 16, "channel_mult": [1, 2],
                                      "attention_resolutions": [], "head_dim": 16}
        generator_train = {**generator_train, "batch": 8, "log_every": 1}
    work = args.work
    if work.exists() and any(work.iterdir()):
        parser.error(f"--work {work} is not empty; choose a fresh folder")

    emoji = load_dataset("emoji")
    train_set, held_out = emoji.split(0.1, seed=0)
    if args.quick:
        train_set, held_out = train_set.subset(torch.arange(64)), held_out.subset(torch.arange(40))
    shards = write_split(train_set.images, work / "train-png", work / "train-shards")
    extractor = cluster_features(train_set.images, clusters, epochs)
    reference = extractor(held_out.images)

    # Stage 1: the autoencoder, then reconstructions of the held-out images.
    ae_config["data"] = {"dataset": str(shards)}
    start = time.perf_counter()
    summary = train(ae_config, work / "ae", args.ae_minutes)
    ae_seconds = time.perf_counter() - start
    autoencoder = load_run(work / "ae").model
    with torch.no_grad():
        reconstructions = torch.cat([autoencoder(x, sample=False)[0].clamp(-1, 1) for x in held_out.images.split(64)])
    factor = autoencoder.config.factor
    size = held_out.images.shape[-1]
    bicubic = F.interpolate(F.interpolate(held_out.images, size=size // factor, mode="bicubic", antialias=True),
                            size=size, mode="bicubic").clamp(-1, 1)
    stage1 = {"steps": summary["step"], "minutes": summary["minutes"], "wall_minutes": ae_seconds / 60,
              "images_per_second": images_per_second(work / "ae"), "factor": factor,
              "latent_channels": autoencoder.config.latent_channels}
    for name, images in (("autoencoder", reconstructions), ("bicubic", bicubic)):
        stage1[name] = {"psnr": psnr(images, held_out.images), "ssim": ssim(images, held_out.images),
                        "frechet_distance": frechet_distance(extractor(images), reference)}
    picture = held_out_figure(held_out.images, reconstructions, args.figure)
    print(f"autoencoder f={factor} c={stage1['latent_channels']}: {summary['step']} steps in "
          f"{summary['minutes']:.1f} min; held-out PSNR {stage1['autoencoder']['psnr']:.2f} dB, SSIM "
          f"{stage1['autoencoder']['ssim']:.3f}, FD {stage1['autoencoder']['frechet_distance']:.2f} (bicubic "
          f"x{factor}: {stage1['bicubic']['psnr']:.2f} dB, {stage1['bicubic']['ssim']:.3f}, "
          f"{stage1['bicubic']['frechet_distance']:.2f}); figure {picture}", flush=True)

    # Stage 2 against pixel space, at equal training minutes.
    start = time.perf_counter()
    encode_dataset(work / "ae", str(shards), work / "latents")
    encode_seconds = time.perf_counter() - start
    generators = {}
    for name, model, data in (("pixel", pixel_model, {"dataset": str(shards)}),
                              ("latent", latent_model, {"dataset": str(work / "latents")})):
        config = {"model": model, "data": data, "train": generator_train, "sample": {"steps": 32, "n": 16},
                  "diffusion": {"sigma_data": 1.0 if name == "latent" else 0.5}}  # latents are standardised
        summary = train(config, work / name, args.generator_minutes)
        samples, _ = draw(load_run(work / name), args.samples)
        generators[name] = {"steps": summary["step"], "minutes": summary["minutes"],
                            "images_per_second": images_per_second(work / name),
                            "frechet_distance": frechet_distance(extractor(samples), reference)}
        print(f"{name} generator: {summary['step']} steps, {generators[name]['images_per_second']:.0f} images/s, "
              f"FD {generators[name]['frechet_distance']:.2f}", flush=True)
    ratio = generators["latent"]["images_per_second"] / generators["pixel"]["images_per_second"]
    floor = frechet_distance(extractor(train_set.images[: len(held_out)]), reference)

    print(f"\n{'':24s} {'PSNR dB':>8s} {'SSIM':>6s} {'FD':>7s}")
    for name in ("autoencoder", "bicubic"):
        row = stage1[name]
        print(f"{name:24s} {row['psnr']:8.2f} {row['ssim']:6.3f} {row['frechet_distance']:7.2f}")
    print(f"\n{'generator':10s} {'steps':>7s} {'images/s':>9s} {'FD':>7s}   (train vs held-out FD: {floor:.2f})")
    for name, row in generators.items():
        print(f"{name:10s} {row['steps']:7d} {row['images_per_second']:9.0f} {row['frechet_distance']:7.2f}")
    print(f"latent training is {ratio:.1f}x cheaper per image; encoding the training set once took "
          f"{encode_seconds:.0f} s")
    write_json(args.json, {
        "held_out": len(held_out), "train": len(train_set), "stage1": stage1, "generators": generators,
        "latent_over_pixel_images_per_second": ratio, "encode_seconds": encode_seconds, "frechet_floor": floor})
    return 0


if __name__ == "__main__":
    sys.exit(main())
