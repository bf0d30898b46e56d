"""The demo: sample an exact Gaussian-mixture denoiser with several solvers and compare them in pictures."""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.diffusion import GaussianMixture
from difflab.evaluation import mmd, rmse
from difflab.evaluation.plots import plot_error_vs_nfe, plot_sample_panels
from difflab.sampling import SCHEDULES, SOLVERS, reference_solution, steps_for_nfe

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
DEMO_SOLVERS = ("euler", "heun", "dpmpp_2m", "unipc")


def run_demo(out: str | Path, samples: int = 2000, nfe_grid=(3, 5, 8, 10, 15, 20), panel_nfe: int = 5,
             progress: bool = True) -> dict:
    """Write ``solvers.png`` (samples at ``panel_nfe``) and ``error_vs_nfe.png`` to ``out``; return the figures."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mixture = GaussianMixture.ring(8, radius=1.0, std=0.05)
    exact = mixture.sample(samples, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(samples, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = reference_solution(mixture, noise * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX)

    def schedule(name: str, solver: str, steps: int) -> torch.Tensor:
        if name == "optimized":
            return SCHEDULES["optimized"](steps, SIGMA_MIN, SIGMA_MAX, denoiser=mixture, solver=solver,
                                          shape=(512, 2), dtype=torch.float64, cache=out / "schedules.json")
        return SCHEDULES[name](steps, SIGMA_MIN, SIGMA_MAX)

    runs = [(solver, "karras") for solver in DEMO_SOLVERS] + [("dpmpp_2m", "optimized")]
    errors: dict[str, list[tuple[int, float]]] = {}
    panels = {"exact samples": exact}
    for solver, schedule_name in runs:
        label = f"{solver} + {schedule_name}"
        for nfe in nfe_grid:
            steps = steps_for_nfe(solver, nfe)
            sigmas = schedule(schedule_name, solver, steps)
            result = SOLVERS[solver](mixture, noise * sigmas[0].item(), sigmas)
            error = rmse(result, reference)
            errors.setdefault(label, []).append((SOLVERS[solver].nfe(steps), error))
            if nfe == panel_nfe:
                panels[f"{label}, NFE {SOLVERS[solver].nfe(steps)}\nMMD {mmd(result, exact):.4f}"] = result
            if progress:
                print(f"  {label:24s} NFE {SOLVERS[solver].nfe(steps):3d}  endpoint RMSE {error:.2e}")
    plot_sample_panels(panels, out / "solvers.png")
    plot_error_vs_nfe(errors, out / "error_vs_nfe.png", title="8-mode ring: error against a fine ODE solution")
    return errors


def run_digits_demo(out: str | Path, config: str | Path = "configs/digits.yaml", steps: int = 600,
                    eval_samples: int = 1000, progress: bool = True) -> dict:
    """Train the digits recipe for ``steps`` steps into ``out/digits-run``, write a labelled sample grid and
    score the samples; return the metrics."""
    from difflab.training import Trainer, load_run_config
    from difflab.training.run import evaluate, load_run, write_samples

    out = Path(out)
    run_dir = out / "digits-run"
    if run_dir.exists():  # the demo's own scratch run: start afresh each time
        import shutil

        shutil.rmtree(run_dir)
    overrides = [f"train.steps={steps}", "train.sample_every=0", f"train.checkpoint_every={max(steps // 2, 1)}"]
    Trainer(load_run_config(config, overrides), run_dir, progress=progress).fit()
    run = load_run(run_dir)
    write_samples(run, out / "digits.png", n=100, class_label="balanced")
    return evaluate(run, eval_samples, progress=progress)[0]
