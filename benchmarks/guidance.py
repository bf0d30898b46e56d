"""The guidance trade-off on the digits recipe: Fréchet distance, precision, recall and class accuracy against
guidance scale for plain classifier-free guidance, CFG limited to a sigma interval, and autoguidance.

One digits run (``configs/digits.yaml``, ``--steps`` steps) is the guided model; its weaker twin for autoguidance
is the same recipe stopped after ``--weak-steps`` (same seed: it is the run's own early checkpoint, as Karras et
al. 2024 suggest, "a less-trained version of the model"). Every setting is scored on the same seeds.

    .venv/bin/python benchmarks/guidance.py --json out/bench/guidance.json
    .venv/bin/python benchmarks/guidance.py --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from difflab.config import load_yaml
from difflab.evaluation.plots import plot_sweep
from difflab.guidance import GuidanceConfig
from difflab.training import Trainer, resolve
from difflab.training.run import evaluate, load_run
from output import write_json

ROOT = Path(__file__).parents[1]
METRICS = ("frechet_distance", "precision", "recall", "class_accuracy")


def trained(config: dict, run_dir: Path, steps: int) -> Path:
    """``run_dir`` trained for ``steps`` (reused when it already holds that run)."""
    if not (run_dir / "checkpoints" / f"step-{steps:07d}").is_dir():
        settings = {**config["train"], "steps": steps, "checkpoint_every": steps, "sample_every": 0}
        Trainer(resolve({**config, "train": settings}), run_dir, resume=run_dir.exists(), progress=False).fit()
    return run_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench/guidance"), help="run directories (reused)")
    parser.add_argument("--steps", type=int, default=4000, help="training steps of the guided model")
    parser.add_argument("--weak-steps", type=int, default=500, help="training steps of the autoguidance model")
    parser.add_argument("--scales", default="0,1,1.5,2,3,5", help="guidance scales")
    parser.add_argument("--interval", default="0.3,5", help="sigma interval of CFG with an interval")
    parser.add_argument("--n", type=int, default=2000, help="samples scored per setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=Path("docs/figures/guidance_digits.png"))
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps and samples")
    args = parser.parse_args(argv)
    scales = [float(v) for v in args.scales.split(",")]
    low, high = (float(v) for v in args.interval.split(","))
    torch.set_num_threads(args.threads)
    config = load_yaml(ROOT / "configs" / "digits.yaml")
    config["train"] = {**config["train"], "threads": args.threads, "log_every": 100}
    if args.quick:
        args.steps, args.weak_steps, args.n, scales = 4, 2, 40, [0.0, 2.0]
        config["sample"] = {**config["sample"], "steps": 3}
    strong = load_run(trained(config, args.work / "strong", args.steps))
    weak = load_run(trained(config, args.work / "weak", args.weak_steps))
    methods = {"cfg": ({}, None), "cfg+interval": ({"interval": (low, high)}, None), "autoguidance": ({}, weak.model)}
    rows = []
    for method, (options, guide_with) in methods.items():
        for scale in scales:
            metrics, _ = evaluate(strong, args.n, seed=0, guidance=GuidanceConfig(scale=scale, **options),
                                  guide_with=guide_with)
            rows.append({"method": method, "guidance": scale, **{k: metrics[k] for k in METRICS if k in metrics}})
            print(f"{method:13s} w={scale:<4g} " + "  ".join(f"{k} {rows[-1][k]:.3f}" for k in METRICS
                                                             if k in rows[-1]), flush=True)
    floor = metrics["noise_floor_frechet_distance"]
    best = {method: min((r for r in rows if r["method"] == method), key=lambda r: r["frechet_distance"])
            for method in methods}
    print(f"\nbest Fréchet distance per method (noise floor {floor:.2f}):")
    for method, row in best.items():
        print(f"  {method:13s} {row['frechet_distance']:.3f} at w = {row['guidance']:g} "
              f"(precision {row['precision']:.3f}, recall {row['recall']:.3f})")
    order = sorted(best, key=lambda m: best[m]["frechet_distance"])
    fd = {m: best[m]["frechet_distance"] for m in order}
    signs = ["=" if fd[a] == fd[b] else "<" for a, b in zip(order, order[1:])]
    ordering = order[0] + "".join(f" {sign} {m}" for sign, m in zip(signs, order[1:]))
    print(f"ordering by best FD: {ordering} (papers: autoguidance <= cfg+interval <= cfg)")
    picture = plot_sweep(rows, "guidance", [m for m in METRICS if m in rows[0]], args.plot,
                         title=f"digits, {args.steps} steps; autoguidance from step {args.weak_steps}")
    print(f"figure: {picture}")
    write_json(args.json, {"steps": args.steps, "weak_steps": args.weak_steps, "interval": [low, high], "n": args.n,
                           "noise_floor_frechet_distance": floor, "rows": rows, "best": best, "ordering": ordering})
    return 0


if __name__ == "__main__":
    sys.exit(main())
