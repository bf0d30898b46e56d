"""Few-step students of the digits recipe: Fréchet distance and class accuracy against NFE for the teacher and
its progressive, consistency and guidance-distilled students, with each student's distillation wall time.

The teacher is ``configs/digits.yaml`` (``--teacher-steps``), or ``--teacher DIR``. Rows:

- the teacher with its own solver at 35 NFE (heun, 18 steps), and at each student's NFE with the best of euler,
  heun, dpmpp_2m and unipc (best by Fréchet distance);
- progressive students halving from the teacher's 16-step grid (heun) to 8, 4, 2 and 1 steps;
- a consistency-distilled student at 1 and 2 steps, and a 2-step multistep consistency student (Heek et al. 2024);
- the guidance-distilled student at guidance scales ``--scales`` against the classifier-free guided teacher at
  equal NFE (the teacher's two branches count as two evaluations) and at equal steps.

Every setting is scored on the same seeds against the digits with difflab's digit features. Runs on the CPU or,
when one is visible, a GPU (the trainer's device).

    .venv/bin/python benchmarks/distillation.py --json out/bench/distillation.json
    .venv/bin/python benchmarks/distillation.py --quick
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import torch

from difflab.config import load_yaml
from difflab.distillation import consistency_sigmas, distill
from difflab.evaluation import frechet_distance
from difflab.sampling import SOLVERS
from difflab.sampling.solvers import steps_for_nfe
from difflab.training import Trainer, resolve
from difflab.training.run import evaluate, load_run
from output import write_json

ROOT = Path(__file__).parents[1]
TEACHER_SOLVERS = ("euler", "heun", "dpmpp_2m", "unipc")


def score(run_dir: Path, n: int, extractor, **options) -> tuple[dict, torch.Tensor]:
    """Metrics of ``n`` samples (seeds 0..n-1, class-balanced) against the digits, and the samples."""
    run = load_run(run_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    metrics, images = evaluate(run, n, seed=0, extractor=extractor, **options)
    return {"frechet_distance": metrics["frechet_distance"], "class_accuracy": metrics["class_accuracy"],
            "noise_floor": metrics["noise_floor_frechet_distance"]}, images


def training_minutes(run_dir: Path) -> float:
    """The trainer's own clock: minutes of optimizer steps (no start-up, no evaluation)."""
    with open(run_dir / "metrics.csv") as f:
        return float(list(csv.DictReader(f))[-1]["minutes"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench/distillation"), help="run directories")
    parser.add_argument("--teacher", type=Path, help="a trained digits run (default: train one into --work)")
    parser.add_argument("--teacher-steps", type=int, default=4000, help="training steps of the teacher")
    parser.add_argument("--stage-steps", type=int, default=1000, help="optimizer steps per progressive stage")
    parser.add_argument("--consistency-steps", type=int, default=3000,
                        help="consistency distillation steps (also multistep consistency's)")
    parser.add_argument("--middle-sigmas", type=lambda t: [float(v) for v in t.split(",")], default=[0.4, 0.8, 1.5],
                        help="2-step consistency sampling also tries sigmas (max, m, 0) for each m")
    parser.add_argument("--guidance-steps", type=int, default=1500, help="guidance distillation steps")
    parser.add_argument("--scales", default="1.5,2,3", help="guidance scales of the guidance comparison")
    parser.add_argument("--methods", default="progressive,consistency,multistep_consistency,guidance",
                        help="which students to distil")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every student's config, e.g. --set distill.intervals=10")
    parser.add_argument("--n", type=int, default=2000, help="samples scored per setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps and samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scales = [float(v) for v in args.scales.split(",")]
    from_steps, student_nfes = 16, (8, 4, 2, 1)
    if args.quick:
        args.teacher_steps, args.stage_steps, args.consistency_steps, args.guidance_steps = 4, 2, 2, 2
        args.n, scales, from_steps, student_nfes = 40, [2.0], 4, (2, 1)
    common = [f"train.threads={args.threads}", "train.log_every=50", "train.checkpoint_every=100000"]
    overrides = [*common, *args.set]  # students: the teacher's optimizer at a quarter of its learning rate
    methods = args.methods.split(",")

    teacher = args.teacher
    start = time.perf_counter()
    if teacher is None:
        teacher = args.work / "teacher"
        config = load_yaml(ROOT / "configs" / "digits.yaml")
        config["train"] = {**config["train"], "steps": args.teacher_steps, "sample_every": 0}
        Trainer(resolve(config, common), teacher, progress=False).fit()
    teacher_minutes = (time.perf_counter() - start) / 60
    from difflab.data import load_dataset
    from difflab.evaluation.features import FeatureExtractor, feature_network

    digits = load_dataset("digits")
    extractor = FeatureExtractor.from_network(feature_network(digits.images, digits.labels))
    rows = []
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} threads"

    def save(targets: dict) -> None:
        write_json(args.json, {
            "device": device, "n": args.n, "teacher_minutes": teacher_minutes,
            "teacher_steps": args.teacher_steps if args.teacher is None else None, "stage_steps": args.stage_steps,
            "consistency_steps": args.consistency_steps, "guidance_steps": args.guidance_steps, "rows": rows,
            "targets": targets}, quiet=True)

    samples = {}

    def row(model: str, run_dir: Path, nfe: int, minutes: float | None = None, note: str = "", **options) -> dict:
        metrics, samples[model, nfe, json.dumps(options)] = score(run_dir, args.n, extractor, **options)
        result = {"model": model, "nfe": nfe, "distill_minutes": minutes, **metrics,
                  "settings": note or json.dumps(options)}
        rows.append(result)
        save({})  # rewritten after every row: a run stopped early keeps what it measured
        print(f"{model:24s} NFE {nfe:3d}  FD {result['frechet_distance']:7.3f}  acc {result['class_accuracy']:.3f}"
              f"  {result['settings']}", flush=True)
        return result

    row("teacher", teacher, SOLVERS["heun"].nfe(18), solver="heun", steps=18)
    for nfe in student_nfes:  # the teacher's best ODE solver at each student budget
        candidates = [row(f"teacher/{solver}", teacher, nfe, solver=solver, steps=steps_for_nfe(solver, nfe))
                      for solver in TEACHER_SOLVERS if SOLVERS[solver].nfe(steps_for_nfe(solver, nfe)) == nfe]
        best = min(candidates, key=lambda r: r["frechet_distance"])
        rows.append({**best, "model": "teacher (best solver)"})

    if "progressive" in methods:
        distill(teacher, "progressive", args.work / "progressive", steps=min(student_nfes), from_steps=from_steps,
                train_steps=args.stage_steps, overrides=overrides, progress=False)
        minutes = 0.0
        for stage in sorted((args.work / "progressive").iterdir(), key=lambda p: -int(p.name.removeprefix("steps-"))):
            minutes += training_minutes(stage)  # a stage needs every stage before it
            row(f"progressive/{stage.name}", stage, int(stage.name.removeprefix("steps-")), minutes)

    if "consistency" in methods:
        consistency = distill(teacher, "consistency", args.work / "consistency", steps=1,
                              train_steps=args.consistency_steps, overrides=overrides, progress=False)[0]
        minutes = training_minutes(consistency)
        row("consistency", consistency, 1, minutes)
        sample = load_run(consistency).config.sample
        middles = [[sample.sigma_max, m, 0.0] for m in args.middle_sigmas]
        for sigmas in (consistency_sigmas(2, sample.sigma_min, sample.sigma_max), *middles):
            row("consistency", consistency, 2, minutes, note=f"sigmas {[round(s, 3) for s in sigmas]}", sigmas=sigmas)

    if "multistep_consistency" in methods:  # Heek et al. 2024: consistent within each of 2 segments
        student = distill(teacher, "multistep_consistency", args.work / "multistep-consistency", steps=2,
                          train_steps=args.consistency_steps, overrides=overrides, progress=False)[0]
        sigmas = list(load_run(student).config.sample.sigmas)
        row("multistep consistency", student, 2, training_minutes(student),
            note=f"sigmas {[round(s, 3) for s in sigmas]}")

    if "guidance" in methods:
        student = distill(teacher, "guidance", args.work / "guidance", train_steps=args.guidance_steps,
                          overrides=overrides, progress=False)[0]
        minutes = training_minutes(student)
        for scale in scales:
            options = {"solver": "heun", "steps": 18, "guidance": scale}
            one = row("guidance student", student, SOLVERS["heun"].nfe(18), minutes, **options)
            row("teacher/guided", teacher, 2 * SOLVERS["heun"].nfe(18), **options)
            row("teacher/guided", teacher, 2 * SOLVERS["heun"].nfe(9), solver="heun", steps=9, guidance=scale)
            # How well the student reproduces the guided teacher: the same seeds, sample by sample.
            mine = samples["guidance student", one["nfe"], json.dumps(options)]
            theirs = samples["teacher/guided", 2 * one["nfe"], json.dumps(options)]
            unguided = samples["teacher", SOLVERS["heun"].nfe(18), json.dumps({"solver": "heun", "steps": 18})]
            one["rmse_to_guided_teacher"] = (mine - theirs).square().mean().sqrt().item()
            one["rmse_unguided_teacher_to_guided"] = (unguided - theirs).square().mean().sqrt().item()  # the start
            one["frechet_distance_to_guided_teacher"] = frechet_distance(extractor(mine), extractor(theirs))
            print(f"{'':24s} to the guided teacher at w={scale:g}: RMSE {one['rmse_to_guided_teacher']:.4f} (unguided "
                  f"teacher {one['rmse_unguided_teacher_to_guided']:.4f}), FD "
                  f"{one['frechet_distance_to_guided_teacher']:.3f}", flush=True)
            save({})

    floor = rows[0]["noise_floor"]
    reference = rows[0]["frechet_distance"]
    print(f"\nFréchet distance vs NFE (digits, {args.n} samples; noise floor {floor:.2f}; teacher "
          f"{teacher_minutes:.1f} min)\n{'model':28s} {'NFE':>4s} {'FD':>8s} {'/ teacher35':>12s} {'acc':>6s} "
          f"{'distill min':>12s}")
    for r in rows:
        minutes = f"{r['distill_minutes']:.1f}" if r["distill_minutes"] is not None else ""
        print(f"{r['model']:28s} {r['nfe']:4d} {r['frechet_distance']:8.3f} {r['frechet_distance'] / reference:12.2f} "
              f"{r['class_accuracy']:6.3f} {minutes:>12s}")
    four = next((r for r in rows if r["model"] == "progressive/steps-4"), None)
    teacher_four = next((r for r in rows if r["model"] == "teacher (best solver)" and r["nfe"] == 4), None)
    two = min((r for r in rows if r["model"] == "consistency" and r["nfe"] == 2),
              key=lambda r: r["frechet_distance"], default=None)
    multistep = next((r for r in rows if r["model"] == "multistep consistency"), None)
    targets = {}
    if four and teacher_four:
        targets["progressive_4_over_teacher_35"] = four["frechet_distance"] / reference
        targets["progressive_4_over_teacher_4"] = four["frechet_distance"] / teacher_four["frechet_distance"]
        print(f"\ntarget: 4-step progressive / teacher@35 = {targets['progressive_4_over_teacher_35']:.2f} "
              f"(<= 1.5); / teacher@4 = {targets['progressive_4_over_teacher_4']:.2f} (well below 1)")
    if two:
        targets["consistency_2_over_teacher_35"] = two["frechet_distance"] / reference
        print(f"target: 2-step consistency / teacher@35 = {targets['consistency_2_over_teacher_35']:.2f} (<= 2)")
    if multistep:
        targets["multistep_consistency_2_over_teacher_35"] = multistep["frechet_distance"] / reference
        print(f"target: 2-step multistep consistency / teacher@35 = "
              f"{targets['multistep_consistency_2_over_teacher_35']:.2f} (<= 2)")
    save(targets)
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
