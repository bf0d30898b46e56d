"""``difflab distill``: a teacher run in, student run directories out, trained by the one trainer.

A student's config is its teacher's (model, data, encoder, conditioning, optimizer at a quarter of the learning
rate) with a ``distill:`` section for its objective and a ``sample:`` section for how it is sampled, so
``difflab sample`` and ``difflab eval`` use a student like any run:

- ``progressive``: stages that halve the steps, from the teacher's grid of ``from_steps`` steps (its own schedule,
  solved with its solver if that is euler or heun, else euler = DDIM) down to ``steps``; stage k's student is stage
  k+1's teacher. Each stage is a run directory ``OUT/steps-N`` sampled with euler on every other point of its
  teacher's grid.
- ``consistency`` / ``consistency_training``: ``OUT`` holds a consistency model sampled by multistep consistency
  sampling on ``steps`` noise levels (karras on ``steps + 1`` points without the last, then 0).
- ``multistep_consistency``: ``OUT`` holds a multistep consistency model (Heek et al. 2024) whose ``steps``
  segments are cut at its ``sample.sigmas`` (by default the consistency sampling levels; ``--set sample.sigmas=``
  moves them), sampled deterministically with one euler (DDIM) step per segment.
- ``guidance``: ``OUT`` holds a student with a guidance-scale input, sampled with the teacher's solver; its
  ``--guidance W`` costs one forward pass per step.
"""

from __future__ import annotations

from pathlib import Path

from difflab.sampling import SCHEDULES
from difflab.training.config import DISTILLATION_METHODS
from difflab.training.derive import base_mapping, train_derived

STUDENT_LR_FACTOR = 0.25  # students fine-tune a trained network: a quarter of the teacher's learning rate


def consistency_sigmas(steps: int, sigma_min: float, sigma_max: float) -> list[float]:
    """Multistep consistency sampling's noise levels: sigma_max, then karras points down to 0 (not sigma_min,
    where a consistency model is the identity)."""
    grid = SCHEDULES["karras"](steps + 1, sigma_min=sigma_min, sigma_max=sigma_max)[:steps].tolist()
    return [*grid, 0.0]


def student_mapping(teacher: Path, method: str, *, train_steps: int, steps: int = 1,
                    teacher_sigmas: list[float] | None = None, teacher_solver: str = "euler",
                    lr: float | None = None) -> dict:
    """The config of a student of ``teacher`` (before ``--set`` overrides); ``lr`` defaults to a quarter of the
    teacher's."""
    mapping = base_mapping(teacher)
    sample = mapping["sample"]
    distill = {"method": method, "teacher": str(teacher.resolve())}
    mapping["train"].update(steps=train_steps, sample_every=0, max_minutes=None)
    mapping["optim"]["lr"] = lr or mapping["optim"]["lr"] * STUDENT_LR_FACTOR
    if method == "progressive":
        distill.update(teacher_sigmas=teacher_sigmas, teacher_solver=teacher_solver)
        sample.update(solver="euler", sigmas=teacher_sigmas[::2])
    elif method in ("consistency", "consistency_training"):
        mapping["diffusion"]["parameterization"] = "consistency"
        sample.update(solver="consistency", sigmas=consistency_sigmas(steps, sample["sigma_min"], sample["sigma_max"]))
    elif method == "multistep_consistency":  # the sampling grid is the segments' edges
        mapping["diffusion"]["parameterization"] = "consistency"
        sample.update(solver="euler", sigmas=consistency_sigmas(steps, sample["sigma_min"], sample["sigma_max"]))
    elif method == "guidance":
        mapping["model"]["guidance_embed"] = True
    mapping["distill"] = distill
    return mapping


def distill(teacher: str | Path, method: str, out: str | Path, *, steps: int = 1, from_steps: int = 16,
            train_steps: int = 1000, overrides: list[str] = (), resume: bool = False,
            progress: bool = True) -> list[Path]:
    """Distil ``teacher`` into student run directories under ``out`` (see the module docstring); returns them."""
    if method not in DISTILLATION_METHODS:
        raise ValueError(f"unknown distillation method {method!r}; choose one of {', '.join(DISTILLATION_METHODS)}")
    if steps < 1 or train_steps < 1:
        raise ValueError(f"steps and train_steps must be positive, got {steps} and {train_steps}")
    teacher, out = Path(teacher), Path(out)
    if method != "progressive":
        mapping = student_mapping(teacher, method, steps=steps, train_steps=train_steps)
        train_derived(mapping, overrides, out, resume, progress)
        return [out]
    if from_steps <= steps or from_steps % steps or (from_steps // steps) & (from_steps // steps - 1):
        raise ValueError(f"progressive distillation halves from --from-steps to --steps: {from_steps} must be "
                         f"{steps} times a power of two")
    first = base_mapping(teacher)
    sample, lr = first["sample"], first["optim"]["lr"] * STUDENT_LR_FACTOR  # every stage: the first teacher's
    grid = SCHEDULES[sample["schedule"]](from_steps, sigma_min=sample["sigma_min"],
                                         sigma_max=sample["sigma_max"]).tolist()
    solver = sample["solver"] if sample["solver"] in ("euler", "heun") else "euler"
    students = []
    n = from_steps // 2
    while n >= steps:
        print(f"difflab distill: progressive stage {len(students) + 1}, {2 * n} -> {n} steps "
              f"(teacher {teacher}, {solver})", flush=True)
        run_dir = out / f"steps-{n}"
        mapping = student_mapping(teacher, method, steps=n, train_steps=train_steps, teacher_sigmas=grid,
                                  teacher_solver=solver, lr=lr)
        train_derived(mapping, overrides, run_dir, resume, progress)
        students.append(run_dir)
        teacher, grid, solver, n = run_dir, grid[::2], "euler", n // 2
    return students
