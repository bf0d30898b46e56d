"""The sampling front door: noise in, samples out, through a named solver and schedule."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from tqdm.auto import tqdm

from difflab.sampling.optimize import optimized
from difflab.sampling.schedules import flow_shift, focused, karras, loglinear, vp_trailing, vp_uniform
from difflab.sampling.solvers import SOLVERS, Generator

SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "karras": karras,
    "loglinear": loglinear,
    "vp_uniform": vp_uniform,
    "vp_trailing": vp_trailing,
    "flow_shift": flow_shift,
    "focused": focused,
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
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    resample: tuple[int, int] | None = None,
    reconstruction: float = 0.0,
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

    Control (see :mod:`difflab.control`), with ``init`` an image batch-aligned with ``noise`` (or of batch 1):
    ``strength < 1`` is image-to-image (SDEdit): the last ``strength`` of the grid is solved from ``init`` noised to
    its first sigma. ``mask`` inpaints: where it is 1 the sample is generated, where 0 ``init`` is kept (by
    replacement), ``resample=(jump, count)`` adds RePaint's resampling and ``reconstruction=w`` reconstruction
    guidance.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    for name, value in cond.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != noise.shape[0]:
            raise ValueError(f"conditioning {name!r} has batch {value.shape[0]}, noise has {noise.shape[0]}")
    if (resample is not None or reconstruction) and mask is None:
        raise ValueError("RePaint resampling and reconstruction guidance need a mask")
    if reconstruction < 0:
        raise ValueError(f"reconstruction guidance must be >= 0, got {reconstruction}")
    if (mask is not None or strength != 1) != (init is not None):
        raise ValueError("an init image goes with image-to-image (strength < 1) or inpainting (a mask), and they "
                         "need one")
    if init is not None and (init.ndim != noise.ndim or init.shape[0] not in (1, noise.shape[0])
                             or init.shape[1:] != noise.shape[1:]):
        raise ValueError(f"init image of shape {tuple(init.shape)} does not fit samples of shape {tuple(noise.shape)}")
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
    if strength != 1:
        from difflab.control import strength_sigmas

        sigmas = strength_sigmas(sigmas, strength)
    solve, total = partial(SOLVERS[solver], **(solver_options or {})), len(sigmas) - 1
    if init is not None:
        from difflab.control import inpainted, repaint, repaint_segments

        if mask is not None:
            denoiser = inpainted(denoiser, init.to(noise), mask.to(noise.device), noise, reconstruction)
        if resample is not None:
            jump, count = resample
            solve = partial(repaint, jump=jump, resample=count, solver=solver, solver_options=solver_options)
            total = sum(end - start for start, end in repaint_segments(total, jump, count) if start < end)

    bar = tqdm(total=total, desc=f"sampling ({solver})", disable=not progress, leave=False)

    def on_step(info: dict) -> None:
        bar.update()
        if callback is not None:
            callback(info)

    with torch.no_grad():
        x = noise * sigmas[0].item()
        if strength != 1:
            x = x + init.to(x)
        x = solve(denoiser, x, sigmas, generator=generator, callback=on_step, **cond)
    bar.close()
    return x
