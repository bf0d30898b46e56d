"""Text-to-image on the emoji: prompt adherence against guidance, Fréchet distance, speed and a guidance grid.

The run is a text model trained by difflab's own recipe, e.g. (stage 1, then stage 2, about 30 + 60 CPU minutes)::

    difflab train configs/ae-emoji.yaml --run-dir runs/ae-emoji --set data.dataset=emoji-train
    difflab train configs/emoji-t2i.yaml --run-dir runs/emoji-t2i
    .venv/bin/python benchmarks/text_to_image.py runs/emoji-t2i --json out/bench/text_to_image.json

- **Prompt adherence without CLIP.** ``--prompts`` training items (fixed random choice, seed 0) are the candidates;
  each one's caption is the prompt of one sample (seed = its index). A sample is right at top-k when the candidate
  it prompted is among its k nearest candidates in the feature space of difflab's evaluation (the classifier of
  k-means clusters of the training images, ``difflab.evaluation.cluster_features``). Random choice gets k/200. The
  autoencoder's reconstructions of the candidates (a latent run) are the ceiling of the measure.
- **Fréchet distance** of ``--fd-samples`` samples (captions of random training items) to the training images, per
  guidance scale, beside the floor: the held-out images (the run's data set name with ``-heldout`` for ``-train``,
  when that set exists) against the same training images.
- **Speed**: images per second at 20 steps, unguided and guided (two branches per step), batch ``--batch``.
- **Grid**: the same 16 prompts (rows) at every guidance scale (columns), ``--figure``.

Guidance ``w`` follows difflab's convention: 0 is the unconditional model, 1 the conditional one unguided, above 1
classifier-free guidance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from difflab.data import DATASETS, load_dataset
from difflab.evaluation import cluster_features, frechet_distance
from difflab.evaluation.plots import save_image_grid
from difflab.training.run import Run, draw, load_run
from output import write_json

GRID_PROMPTS = ("red heart", "grinning face", "panda", "fire", "sun", "snowflake", "flag: Japan", "pizza",
                "thumbs up", "cat face", "rocket", "four leaf clover", "blue circle", "ghost", "rainbow", "crab")
SOLVER, STEPS = "dpmpp_2m", 20


def sample(run: Run, prompts: list[str], guidance: float, batch: int, seed: int = 0) -> torch.Tensor:
    """One image per prompt (prompt i with seed ``seed + i``) at ``guidance`` (1: unguided)."""
    images = []
    for start in range(0, len(prompts), batch):
        part = prompts[start : start + batch]
        options = {"guidance": guidance} if guidance != 1 else {}
        out, _ = draw(run, len(part), class_label=None, seed=seed + start, prompts=part, solver=SOLVER, steps=STEPS,
                      **options)
        images.append(out)
    return torch.cat(images)


def retrieval(generated: torch.Tensor, candidates: torch.Tensor) -> dict:
    """Top-1 and top-5 rates: sample i's own candidate among its nearest candidates (features, L2)."""
    distances = torch.cdist(generated.double(), candidates.double())
    rank = (distances < distances.diagonal()[:, None]).sum(1)  # candidates strictly nearer than the right one
    return {"top1": (rank < 1).double().mean().item(), "top5": (rank < 5).double().mean().item()}


def images_per_second(run: Run, prompts: list[str], guidance: float, batch: int) -> float:
    sample(run, prompts[:batch], guidance, batch)  # warm-up
    start = time.perf_counter()
    sample(run, prompts[:batch], guidance, batch)
    return batch / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a text-to-image run directory")
    parser.add_argument("--guidance", default="0,1,2,4,7", help="guidance scales, comma-separated")
    parser.add_argument("--prompts", type=int, default=200, help="training captions for prompt adherence")
    parser.add_argument("--fd-samples", type=int, default=400, help="samples per guidance scale for the FD")
    parser.add_argument("--batch", type=int, default=100, help="sampling batch")
    parser.add_argument("--clusters", type=int, default=32, help="k-means clusters of the feature classifier")
    parser.add_argument("--feature-epochs", type=int, default=15, help="epochs of the feature classifier")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--figure", type=Path, help="the grid of 16 prompts x guidance scales (PNG)")
    args = parser.parse_args(argv)
    scales = [float(w) for w in args.guidance.split(",")]
    torch.manual_seed(0)

    run = load_run(args.run_dir)
    data = load_dataset(run.config.data.dataset)
    captions = data.extras.get("captions")
    if not run.config.model.get("text_dim") or captions is None:
        print(f"{args.run_dir} is not a text-to-image run on a captioned data set", file=sys.stderr)
        return 2
    count = min(args.prompts, len(data))
    chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:count]
    prompts = [captions[i] for i in chosen.tolist()]
    extractor = cluster_features(data.images, min(args.clusters, len(data)), args.feature_epochs)
    candidates = extractor(data.images[chosen])
    train_features = extractor(data.images)
    fd_items = torch.randint(len(data), (args.fd_samples,), generator=torch.Generator().manual_seed(1))
    fd_prompts = [captions[i] for i in fd_items.tolist()]

    results = {"run": str(args.run_dir), "checkpoint": str(run.checkpoint), "solver": SOLVER, "steps": STEPS,
               "prompts": count, "random_top1": 1 / count, "random_top5": min(5, count) / count, "rows": []}
    if run.encoder is not None:
        with torch.no_grad():
            reconstructions = run.encoder.decode(run.encoder.encode(data.images[chosen])).clamp(-1, 1)
        results["autoencoder_ceiling"] = retrieval(extractor(reconstructions), candidates)
    held_out = run.config.data.dataset.replace("-train", "-heldout")
    if held_out != run.config.data.dataset and held_out in DATASETS:
        results["fd_floor"] = frechet_distance(extractor(load_dataset(held_out).images), train_features)
    for w in scales:
        start = time.perf_counter()
        generated = sample(run, prompts, w, args.batch)
        row = {"guidance": w, **retrieval(extractor(generated), candidates)}
        row["fd"] = frechet_distance(extractor(sample(run, fd_prompts, w, args.batch, seed=10_000)), train_features)
        row["seconds"] = time.perf_counter() - start
        results["rows"].append(row)
        print(f"w = {w:g}: top-1 {row['top1']:.1%}, top-5 {row['top5']:.1%}, FD {row['fd']:.2f} "
              f"({row['seconds']:.0f} s)", flush=True)
    results["images_per_second"] = {"unguided": images_per_second(run, prompts, 1.0, args.batch),
                                    "guided": images_per_second(run, prompts, 4.0, args.batch)}

    print(f"\nprompt adherence of {count} training captions ({SOLVER}, {STEPS} steps); random: top-1 "
          f"{results['random_top1']:.1%}, top-5 {results['random_top5']:.1%}")
    if "autoencoder_ceiling" in results:
        ceiling = results["autoencoder_ceiling"]
        print(f"ceiling (autoencoder reconstructions of the candidates): top-1 {ceiling['top1']:.1%}, "
              f"top-5 {ceiling['top5']:.1%}")
    print(f"{'guidance':>8} | {'top-1':>6} | {'top-5':>6} | {'FD':>7}")
    for row in results["rows"]:
        print(f"{row['guidance']:>8g} | {row['top1']:>6.1%} | {row['top5']:>6.1%} | {row['fd']:>7.2f}")
    if "fd_floor" in results:
        print(f"FD floor (held-out vs training images): {results['fd_floor']:.2f}")
    speed = results["images_per_second"]
    print(f"images/s at {STEPS} steps, batch {args.batch}: {speed['unguided']:.1f} unguided, "
          f"{speed['guided']:.1f} guided")

    if args.figure:
        # Prompt k with seed k at every scale: along a row only the guidance scale changes.
        columns = torch.stack([sample(run, list(GRID_PROMPTS), w, args.batch) for w in scales], 1)
        save_image_grid(columns.flatten(0, 1), args.figure, columns=len(scales))
        results["figure"] = str(args.figure)
        print(f"grid: {args.figure} (rows: {', '.join(GRID_PROMPTS)}; columns: guidance {args.guidance})")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
