"""The sampling front door: noise in, samples out, through a named solver and schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from difflab.sampling.optimize import optimized
from difflab.sampling.schedules import flow_shift, karras, loglinear, vp_trailing, vp_uniform
from difflab.sampling.solvers import SOLVERS, Generator

SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "karras": karras,
    "loglinear": loglinear,
    "vp_uniform": vp_uniform,
    "vp_trailing": vp_trailing,
    "flow_shift": flow_shift,
    "optimized": optimized,
}


def sample(
    denoiser: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    solver: str = "dpmpp_2m",
    steps: int = 10,
    schedule: str = "karras",
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    generator: Generator = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    solver_options: dict | None = None,
    schedule_options: dict | None = None,
    guidance=None,
    guide_with: Callable[..., torch.Tensor] | None = None,
    negative: dict | None = None,
    sigmas: torch.Tensor | list[float] | None = None,
    **cond,
) -> torch.Tensor:
    """Draw samples: scale ``noise ~ N(0, I)`` to sigma_max and solve down to 0 (DESIGN.md contract).

    ``cond`` (``class_labels=``, ``text=``, ...) reaches the denoiser unchanged, batch-aligned with
    ``noise``. ``solver_options`` go to the solver (``eta=``, ``s_churn=``, ``order=``...),
    ``schedule_options`` to the schedule (``rho=``, ``shift=``...). The ``optimized`` schedule is
    searched for this denoiser, solver and noise shape unless ``schedule_options`` say otherwise. Explicit
    ``sigmas`` (decreasing, ending in 0; a distilled student's own grid) replace the schedule and ``steps``.
    Runs without autograd; ``callback(info)`` is called once per step.

    ``guidance`` (a scale or a :class:`~difflab.guidance.GuidanceConfig`) guides the denoiser: classifier-free
    against the null condition (or the ``negative`` one), or, with ``guide_with``, autoguidance against that
    weaker denoiser (see :mod:`difflab.guidance`).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    for name, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != noise.shape[0]:
            raise ValueError(f"conditioning {name!r} has batch {value.shape[0]}, noise has {noise.shape[0]}")
    if guidance is not None:
        from difflab.guidance import autoguided, guided

        denoiser = autoguided(denoiser, guide_with, guidance) if guide_with is not None else \
            guided(denoiser, guidance, negative=negative)
    elif guide_with is not None or negative is not None:
        raise ValueError("guide_with and negative need a guidance scale")
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    else:
        schedule_options = dict(schedule_options or {})
        if schedule == "optimized":
            schedule_options = {"denoiser": denoiser, "solver": solver, "shape": tuple(noise.shape),
                                "dtype": noise.dtype, "device": noise.device, **schedule_options}
        sigmas = SCHEDULES[schedule](steps, sigma_min=sigma_min, sigma_max=sigma_max, **schedule_options)

    bar = tqdm(total=len(sigmas) - 1, desc=f"sampling ({solver})", disable=not progress, leave=False)

    def on_step(info: dict) -> None:
        bar.update()
        if callback is not None:
            callback(info)

    with torch.no_grad():
        x = noise * sigmas[0].item()
        x = SOLVERS[solver](
            denoiser, x, sigmas, generator=generator, callback=on_step, **(solver_options or {}), **cond
        )
    bar.close()
    return x
