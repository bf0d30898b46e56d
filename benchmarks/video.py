"""Video on moving digits: temporal coherence of a space-time U-Net against frame-independent sampling.

Both models are ``configs/moving-digits.yaml``'s U-Net trained for the same number of steps (or, with
``--minutes``, for the same time) on the same frames (``moving-digits``: 1,797 real digits bouncing on a 16x16
canvas, 8 frames):

Both are unconditional (``model.num_classes: 0``): with a class label shared by a clip's frames, the baseline
would keep the identity too.

- **video**: the U-Net's video form (a zero-initialised temporal attention layer after each spatial block) on the
  clips (B, 1, 8, 16, 16);
- **frame-independent baseline**: the image U-Net (no temporal layers) on single frames, ``--batch`` x 8 frames a
  step so it sees as many frames; a clip is 8 of its samples with independent noise.

``--joint SHARE`` trains the video model on clips and single frames together (``data.images``), ``--from-image``
starts it from the trained baseline (``train.init``).

Measured on ``--samples`` clips of each (and on as many real clips, the reference):

- **identity kept**: each frame's digit is read by difflab's digit classifier on an 8x8 crop around the frame's
  centre of mass; the share of frames that agree with their clip's majority class;
- **trajectory smoothness**: the mean absolute second difference (pixels per frame squared) of the centre of
  mass along the clip: 0 for straight motion; real clips are not 0 only at bounces;
- **per-frame Fréchet distance** of the frames to real frames (features: the classifier of k-means clusters of
  real frames, ``difflab.evaluation.cluster_features``), and **clips per second** at 18 Heun steps;
- **denoising error** of both models on 128 real clips by noise level, beside the frame-independent model's at
  sigma / sqrt(8): how much of what 8 frames of one digit could tell the denoiser the video model uses.

    .venv/bin/python benchmarks/video.py --json out/bench/video.json --figure docs/figures/video_samples.png
    .venv/bin/python benchmarks/video.py --quick
    python benchmarks/video.py --temporal spacetime --device cuda --parallel --minutes 4 --batch 32  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from difflab.config import load_yaml
from difflab.data import load_dataset
from difflab.evaluation import FeatureExtractor, cluster_features, feature_network, frechet_distance
from difflab.evaluation.plots import save_image_grid, save_video
from difflab.models.unet import TEMPORAL_KINDS
from difflab.training import Trainer, resolve
from difflab.training import checkpoint as ckpt
from difflab.training.run import draw, load_run
from output import write_json

RECIPE = Path(__file__).parents[1] / "configs" / "moving-digits.yaml"  # the video model; its data fix FRAMES, SIZE
FRAMES, SIZE = 8, 16
DATA = f"moving-digits:frames={FRAMES},size={SIZE}"
FRAME_DATA = f"moving-digits:frames=1,size={SIZE}"  # the same digits' frames: the baseline's data
SIGMAS = (0.25, 0.5, 1.0, 2.0, 4.0)  # noise levels of the denoising-error table
PROBE_MINUTES = 0.5  # --minutes: the probe that measures a model's training speed


def train(run_dir: Path, recipe: dict, video: bool, batch: int, steps: int, threads: int, sample_steps: int,
          init: Path | None = None, minutes: float | None = None, image_share: float | None = None) -> dict:
    """Train the recipe (the baseline: without temporal layers, on single frames) or reuse a finished run in
    ``run_dir``; its steps and training minutes. ``init``: a run to start from (``train.init``). ``minutes``: train
    for about this long instead of ``steps``: a short probe measures the steps per minute, so the learning-rate
    schedule still runs to its end. ``image_share``: joint training, this share of the steps on single frames."""
    if (run_dir / "checkpoints").is_dir():
        return {"steps": trained_steps(run_dir), "train_minutes": float("nan")}
    # Unconditional (no class input), so a clip's identity can come only from the model's coherence: with labels,
    # the frame-independent baseline would keep the class of a label shared by its frames.
    image_layers = {"temporal": None, "spacetime_resolutions": []}
    model = {**recipe["model"], "num_classes": 0, **({} if video else image_layers)}

    def config(steps: int, max_minutes: float | None = None) -> dict:
        data = {"dataset": DATA if video else FRAME_DATA}
        if image_share:
            data.update(images=FRAME_DATA, image_share=image_share)
        return {**recipe, "model": model, "data": data,
                "train": {**recipe["train"], "steps": steps, "batch": batch, "checkpoint_every": steps,
                          "sample_every": 0, "threads": threads, "init": init and str(init),
                          "max_minutes": max_minutes},
                "sample": {**recipe["sample"], "steps": sample_steps}}

    if minutes is not None:
        probe_dir = run_dir.with_name(run_dir.name + "-probe")
        shutil.rmtree(probe_dir, ignore_errors=True)
        probe = Trainer(resolve(config(10**9, PROBE_MINUTES)), probe_dir).fit()
        shutil.rmtree(probe_dir)
        steps = max(1, int(probe["step"] / probe["minutes"] * minutes))
    start = time.perf_counter()
    Trainer(resolve(config(steps)), run_dir, progress=True).fit()
    return {"steps": steps, "train_minutes": (time.perf_counter() - start) / 60}


def trained_steps(run_dir: Path) -> int:
    return int(ckpt.latest_checkpoint(run_dir / "checkpoints").name.removeprefix("step-"))


def centres(clips: torch.Tensor) -> torch.Tensor:
    """Centre of mass (row, column) of each frame's ink, (N, T, 2); ink is the pixel value above black."""
    ink = (clips[:, 0] + 1).clamp(min=0)  # (N, T, H, W)
    grid = torch.arange(clips.shape[-1], dtype=clips.dtype)
    total = ink.sum((-2, -1)).clamp(min=1e-6)
    return torch.stack([(ink.sum(-1) * grid).sum(-1) / total, (ink.sum(-2) * grid).sum(-1) / total], -1)


def digit_classes(clips: torch.Tensor, classifier: FeatureExtractor) -> torch.Tensor:
    """Each frame's digit class (N, T): the classifier on the 8x8 crop around the frame's centre of mass."""
    n, _, t, size, _ = clips.shape
    corner = (centres(clips) - 3.5).round().long().clamp(0, size - 8)  # (N, T, 2)
    rows = corner[..., 0, None] + torch.arange(8)  # (N, T, 8)
    cols = corner[..., 1, None] + torch.arange(8)
    frames = clips[:, 0]  # (N, T, H, W)
    index_n, index_t = torch.arange(n)[:, None, None, None], torch.arange(t)[None, :, None, None]
    crops = frames[index_n, index_t, rows[..., :, None], cols[..., None, :]]  # (N, T, 8, 8)
    return classifier.logits(crops.reshape(n * t, 1, 8, 8)).argmax(1).view(n, t)


def coherence(clips: torch.Tensor, classifier: FeatureExtractor) -> dict:
    classes = digit_classes(clips, classifier)
    majority = classes.mode(1).values
    path = centres(clips)
    acceleration = (path[:, 2:] - 2 * path[:, 1:-1] + path[:, :-2]).norm(dim=-1)
    return {"identity_kept": (classes == majority[:, None]).double().mean().item(),
            "acceleration_px": acceleration.mean().item()}


def clips_of(run_dir: Path, n: int, video: bool, device: str, seed: int = 0) -> tuple[torch.Tensor, float]:
    """n clips (N, 1, T, H, W) and the clips per second: the video model's, or T independent frames each."""
    run = load_run(run_dir, device=device)
    start = time.perf_counter()
    if video:
        clips, _ = draw(run, n, seed=seed)
    else:
        frames, _ = draw(run, n * FRAMES, seed=seed)  # (n T, 1, 1, H, W): one-frame clips
        clips = frames.view(n, FRAMES, 1, SIZE, SIZE).transpose(1, 2)
    clips = clips.cpu()  # waits for the device
    return clips, n / (time.perf_counter() - start)


def denoising_errors(denoiser, clips: torch.Tensor, video: bool, scale: float = 1.0) -> dict[str, float]:
    """A run's denoiser's mean squared error on real ``clips`` with noise of each of SIGMAS x ``scale`` (the
    frame-independent model: frame by frame)."""
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(3))
    device = next(denoiser.parameters()).device
    clips, noise = clips.to(device), noise.to(device)
    errors = {}
    with torch.no_grad():
        for sigma in SIGMAS:
            noisy = clips + sigma * scale * noise
            if not video:  # one-frame clips
                noisy = noisy.transpose(1, 2).reshape(-1, clips.shape[1], 1, *clips.shape[-2:])
            out = denoiser(noisy, torch.full((len(noisy),), sigma * scale, device=device))
            if not video:
                out = out.view(len(clips), -1, *out.shape[1:2], *out.shape[-2:]).transpose(1, 2)
            errors[f"{sigma:g}"] = (out - clips).square().mean().item()
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench/video"), help="run directories here")
    parser.add_argument("--steps", type=int, default=1500, help="training steps of each model (the recipe's: 1500)")
    parser.add_argument("--minutes", type=float,
                        help="instead of --steps: train each model for about this long (its steps from a probe)")
    parser.add_argument("--batch", type=int, default=8, help="clips per video step (the baseline: x 8 frames)")
    parser.add_argument("--samples", type=int, default=200, help="clips sampled from each model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="sample and evaluate here, e.g. cuda (training takes the "
                        "GPU whenever there is one)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--figure", type=Path, help="frames of 6 clips of each model (PNG; a GIF beside it)")
    parser.add_argument("--temporal", choices=[kind for kind in TEMPORAL_KINDS if kind],
                        help="the video model's temporal layers (default: the recipe's)")
    parser.add_argument("--spacetime-resolutions", type=lambda t: [int(v) for v in t.split(",")],
                        help="also space-time attention at these feature-map sizes, e.g. 8 (default: the recipe's)")
    parser.add_argument("--from-image", action="store_true",
                        help="start the video model from the trained frame-independent model (train.init)")
    parser.add_argument("--joint", type=float, metavar="SHARE",
                        help="joint image-video training: this share of the video model's steps on single frames")
    parser.add_argument("--parallel", action="store_true",
                        help="train both models at once (a GPU that one small model leaves mostly idle)")
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes: a smoke run")
    args = parser.parse_args(argv)
    if args.parallel and args.from_image:
        parser.error("--from-image trains the video model after the baseline; it cannot be --parallel")
    for name in ("steps", "batch", "samples", "threads", "minutes"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.joint is not None and not 0 < args.joint < 1:
        parser.error(f"--joint must be in (0, 1), got {args.joint}")
    torch.set_num_threads(args.threads)
    recipe = load_yaml(RECIPE)
    if args.temporal:
        recipe["model"] = {**recipe["model"], "temporal": args.temporal}
    if args.spacetime_resolutions:
        recipe["model"] = {**recipe["model"], "spacetime_resolutions": args.spacetime_resolutions}
    if recipe["data"]["dataset"] != DATA:
        raise SystemExit(f"{RECIPE} trains on {recipe['data']['dataset']}; this benchmark measures {DATA}")
    clusters, epochs, sample_steps = 32, 15, recipe["sample"]["steps"]
    if args.quick:
        args.steps, args.batch, args.samples, clusters, epochs, sample_steps = 3, 2, 6, 4, 1, 2
        recipe["model"] = {**recipe["model"], "channels": 16, "channel_mult": [1]}

    real = load_dataset(DATA).images
    digits = load_dataset("digits")
    classifier = FeatureExtractor.from_network(feature_network(digits.images, digits.labels))
    real_frames = real.transpose(1, 2).flatten(0, 1)  # (N T, 1, H, W)
    pick = torch.randperm(len(real_frames), generator=torch.Generator().manual_seed(0))[:5000]
    frame_features = cluster_features(real_frames[pick], clusters, epochs)
    real_features = frame_features(real_frames[pick])

    results = {"data": DATA, "batch_clips": args.batch, "samples": args.samples, "device": args.device,
               "temporal": recipe["model"]["temporal"],
               "spacetime_resolutions": recipe["model"].get("spacetime_resolutions", []),
               "video_from_image": args.from_image, "joint_image_share": args.joint, "models": {}}
    reference = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(1))[: args.samples]]
    results["real"] = coherence(reference, classifier)
    shown, baseline = {}, args.work / "frame-independent"
    jobs = {"frame-independent": (baseline, recipe, False, args.batch * FRAMES, args.steps, args.threads, sample_steps,
                                  None, args.minutes),
            "video": (args.work / "video", recipe, True, args.batch, args.steps, args.threads, sample_steps,
                      baseline if args.from_image else None, args.minutes, args.joint)}
    if args.parallel:
        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(train, *job) for name, job in jobs.items()}
            training = {name: future.result() for name, future in futures.items()}
    else:  # the baseline first: --from-image starts the video model from it
        training = {name: train(*job) for name, job in jobs.items()}
    for name, video in (("video", True), ("frame-independent", False)):
        run_dir = args.work / name
        clips, speed = clips_of(run_dir, args.samples, video, args.device)
        frames = clips.transpose(1, 2).flatten(0, 1)
        row = {**coherence(clips, classifier), "frame_fd": frechet_distance(frame_features(frames), real_features),
               "clips_per_second": speed, **training[name]}
        results["models"][name] = row
        shown[name] = clips[:6]
        print(f"{name}: {json.dumps(row)}", flush=True)
    floor = real.transpose(1, 2).flatten(0, 1)
    other = torch.randperm(len(floor), generator=torch.Generator().manual_seed(2))[: args.samples * FRAMES]
    results["frame_fd_floor"] = frechet_distance(frame_features(floor[other]), real_features)
    probe = real[:128]  # at which noise levels the other frames of a clip help the denoiser
    image_denoiser = load_run(baseline, device=args.device).model
    results["denoising_error"] = {
        "video": denoising_errors(load_run(args.work / "video", device=args.device).model, probe, True),
        "frame-independent": denoising_errors(image_denoiser, probe, False),
        # A frame seen T times with independent noise carries the noise of one frame at sigma / sqrt(T): about what
        # a denoiser that pooled a clip's T frames, perfectly aligned, could reach.
        "frame-independent at sigma/sqrt(T)": denoising_errors(image_denoiser, probe, False, FRAMES ** -0.5),
    }

    print(f"\n{'':>18} | identity kept | acceleration (px/frame^2) | frame FD | clips/s")
    for name, row in [("real clips", results["real"]), *results["models"].items()]:
        fd = f"{row['frame_fd']:8.2f}" if "frame_fd" in row else f"{results['frame_fd_floor']:8.2f}"
        speed = f"{row['clips_per_second']:7.1f}" if "clips_per_second" in row else " " * 7
        print(f"{name:>18} | {row['identity_kept']:13.1%} | {row['acceleration_px']:25.2f} | {fd} | {speed}")
    print(f"\ndenoising error (MSE) on {len(probe)} real clips at sigma =")
    print(f"{'':>34} | " + " | ".join(f"{sigma:>7g}" for sigma in SIGMAS))
    for name, errors in results["denoising_error"].items():
        print(f"{name:>34} | " + " | ".join(f"{error:7.4f}" for error in errors.values()))
    if args.figure:
        panel = torch.cat([reference[:6], shown["video"], shown["frame-independent"]])
        save_image_grid(panel, args.figure)
        save_video(panel, args.figure.with_suffix(".gif"), columns=6, fps=4)
        results["figure"] = str(args.figure)
        print(f"figure: {args.figure} and {args.figure.with_suffix('.gif')} (rows: 6 real clips, 6 of the video "
              "model, 6 frame-independent)")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
