"""An optimised sigma schedule: the steps that minimise a solver's error for a given denoiser and budget.

In the spirit of "Align Your Steps" (Sabour et al. 2024) and GITS (Chen et al. 2024): start from the
best closed-form schedule, then move the log-sigma steps to minimise the RMS distance between the
solver's result and a fine reference solution of the probability-flow ODE from the same noise.
The steps stay within [sigma_min, sigma_max], but the first may start below sigma_max and the last
stop above sigma_min when that is more accurate, as "leading" and "trailing" spacings do; samplers
scale the noise by the first sigma, so ``sample()`` needs nothing else. The error minimised is the
accumulated local truncation error of the whole trajectory, so multistep solvers are handled as
faithfully as single-step ones.
Derivative-free (Powell), so any denoiser and any solver works; results are cached to a small JSON
file per model.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from tqdm.auto import tqdm

from difflab import paths
from difflab.evaluation import rmse
from difflab.sampling.schedules import (
    _append_zero,
    _check,
    flow_shift,
    focused,
    karras,
    loglinear,
    vp_trailing,
    vp_uniform,
)
from difflab.sampling.solvers import SOLVERS, STOCHASTIC, in_chunks, rk4

log = logging.getLogger(__name__)


def _min_share(gaps: int) -> float:
    """The smallest share of the log-sigma range a gap may take, so that no step collapses."""
    return min(0.002, 0.1 / gaps)


_STARTING_POINTS = (
    *(partial(karras, rho=rho) for rho in (3.0, 5.0, 7.0, 10.0)), loglinear, vp_uniform, vp_trailing, flow_shift,
)


def candidate_schedules(steps: int, sigma_min: float, sigma_max: float) -> list[torch.Tensor]:
    """The closed-form starting points of a search: every closed-form schedule, and its grids one or two
    steps longer without their first or last nodes (which start late or end early)."""
    candidates = []
    for schedule in _STARTING_POINTS:
        for extra in (0, 1, 2):
            grid = schedule(steps + extra, sigma_min, sigma_max)
            candidates += [torch.cat([grid[k:steps + k], grid.new_zeros(1)]) for k in range(extra + 1)]
    return candidates


# The grid of focused schedules: where the steps crowd (sigma, for data of unit scale), how tightly (in log
# sigma), what share of them stays spread uniformly, and how many times sigma_min the last evaluation stops at.
# High-dimensional data tells its modes apart at larger sigmas (the distance between modes grows with the
# dimension): the search on the 256-D benchmark left a grid that stopped at 2.5, for 3.2 and 6.8.
FOCUS_CENTERS = (0.3, 0.6, 1.0, 1.5, 2.5, 4.0, 6.5)
FOCUS_WIDTHS = (0.4, 0.8, 1.4)
FOCUS_UNIFORM = (0.3, 0.5, 0.7)
FOCUS_LAST = (1, 5, 15, 50)
# The compass search's first steps in (log centre, log width, uniform share, log last sigma): about half the
# grid's spacing, so that it reaches every point between a grid point and its neighbours.
FOCUS_SEARCH_STEPS = (0.25, 0.3, 0.1, 0.6)


@dataclass(frozen=True)
class Focus:
    """The parameters of a :func:`~difflab.sampling.schedules.focused` schedule; ``last`` is the last sigma
    evaluated (its ``sigma_min``)."""

    center: float
    width: float
    uniform: float
    last: float

    def sigmas(self, steps: int, sigma_max: float) -> torch.Tensor:
        return focused(steps, self.last, sigma_max, center=self.center, width=self.width, uniform=self.uniform)

    def valid(self, sigma_min: float, sigma_max: float) -> bool:
        """Within the grid's bounds: a uniform share in [0, 1], the last sigma in [sigma_min, centre)."""
        return 0 <= self.uniform <= 1 and sigma_min <= self.last < min(self.center, sigma_max)


def focus_grid(steps: int, sigma_min: float, sigma_max: float) -> list[Focus]:
    """The grid of focused schedules (252 where sigma_min is 0.002): every centre, width and uniform share,
    ending at each multiple ``FOCUS_LAST`` of sigma_min below the centre. None for one step, where every one
    of them is (sigma_max, 0), a closed-form candidate already."""
    if steps == 1:
        return []
    grid = (Focus(center, width, share, last * sigma_min)
            for center, width, share, last in itertools.product(FOCUS_CENTERS, FOCUS_WIDTHS, FOCUS_UNIFORM, FOCUS_LAST))
    return [focus for focus in grid if focus.valid(sigma_min, sigma_max)]


def refine_focus(
    error: Callable[[torch.Tensor], float], start: Focus, start_error: float, steps: int, sigma_min: float,
    sigma_max: float, max_evals: int = 64, halvings: int = 3,
) -> tuple[Focus, float]:
    """A compass search from ``start`` for the focused schedule with the lowest ``error(sigmas)``.

    Each round tries one step up and one down in each of (log centre, log width, uniform share, log last
    sigma), from ``FOCUS_SEARCH_STEPS``, and moves to the best if it beats the current point; a round
    without a better point halves the steps, ``halvings`` times at most. Stops after ``max_evals`` errors.
    Returns the best schedule's parameters and error (``start`` and ``start_error`` if none beats them).
    """
    point = np.array([math.log(start.center), math.log(start.width), start.uniform, math.log(start.last)])
    step = np.array(FOCUS_SEARCH_STEPS)
    best, best_error, evals = start, start_error, 0
    seen = {tuple(point.round(9))}  # none of these beats the current point
    while evals < max_evals:
        trials = []
        for axis, sign in itertools.product(range(4), (1, -1)):
            moved = point.copy()
            moved[axis] += sign * step[axis]
            focus = Focus(math.exp(moved[0]), math.exp(moved[1]), float(moved[2]), math.exp(moved[3]))
            if tuple(moved.round(9)) in seen or not focus.valid(sigma_min, sigma_max) or evals == max_evals:
                continue
            seen.add(tuple(moved.round(9)))
            trials.append((error(focus.sigmas(steps, sigma_max)), axis, sign, focus, moved))
            evals += 1
        trial = min(trials, key=lambda trial: trial[:3], default=None)
        if trial is not None and trial[0] < best_error:
            best_error, _, _, best, point = trial
        elif halvings > 0:
            halvings -= 1
            step = step / 2
        else:
            break
    return best, best_error


def default_cache_path() -> Path:
    """``optimized_schedules.json`` in :func:`difflab.paths.cache_dir`."""
    return paths.cache_dir() / "optimized_schedules.json"


def reference_solution(
    denoiser: Callable, x: torch.Tensor, sigma_min: float, sigma_max: float, steps: int = 1000, **cond
) -> torch.Tensor:
    """A fine solution of the probability-flow ODE: RK4 in log-sigma from sigma_max to sigma_min, then
    the Tweedie step to 0 that every solver takes. ``x`` is already scaled by sigma_max; large batches are
    solved :func:`~difflab.sampling.solvers.in_chunks`."""
    sigmas = loglinear(steps, sigma_min, sigma_max)
    return in_chunks(lambda part, **c: rk4(denoiser, part, sigmas, **c), x, **cond)


def fingerprint(denoiser: Callable) -> str | None:
    """A stable identity for caching: ``denoiser.fingerprint()``, or a hash of a module's weights."""
    if hasattr(denoiser, "fingerprint"):
        return str(denoiser.fingerprint())
    if isinstance(denoiser, torch.nn.Module):
        h = hashlib.sha1(type(denoiser).__qualname__.encode())
        for name, tensor in sorted(denoiser.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
    return None


def _sigmas_from_logits(logits: np.ndarray | torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Nodes within [sigma_min, sigma_max]: the log-sigma range is split into len(logits) + 1 gaps by
    softmax(logits, 0). The first gap lies above the first node and the last below the last node; both
    are left untraversed, as "leading" and "trailing" spacings do. Differentiable in torch ``logits``
    (the bespoke solver learns its steps through it)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    z = torch.cat([logits, logits.new_zeros(1)])
    floor = _min_share(z.numel())
    shares = floor + (1 - floor * z.numel()) * torch.softmax(z, 0)
    gaps = (math.log(sigma_max) - math.log(sigma_min)) * shares
    log_sigmas = math.log(sigma_max) - torch.cumsum(gaps[:-1], 0)
    return _append_zero(log_sigmas.exp().clamp(sigma_min, sigma_max))


def _logits_from_sigmas(sigmas: torch.Tensor, sigma_min: float, sigma_max: float) -> np.ndarray:
    log_nodes = np.log(sigmas[:-1].numpy())
    gaps = np.concatenate([[math.log(sigma_max) - log_nodes[0]], -np.diff(log_nodes),
                           [log_nodes[-1] - math.log(sigma_min)]])
    floor = _min_share(gaps.size)
    shares = np.maximum(gaps / gaps.sum() - floor, 1e-3 * floor)
    return np.log(shares[:-1]) - np.log(shares[-1])


def optimized(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    *,
    denoiser: Callable,
    shape: tuple[int, ...],
    solver: str = "dpmpp_2m",
    cond: dict | None = None,
    reference_steps: int = 200,
    max_evals: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    cache: str | Path | bool = True,
    cache_key: str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Sigmas (steps + 1, last 0) that minimise ``solver``'s error on ``denoiser`` from noise of ``shape``.

    ``shape`` is (batch, *sample_shape) of the noise used for the search. The schedule is fitted to that
    batch, so larger batches generalise better: a thousand or two for a cheap proxy (a fitted mixture),
    as many as affordable for a network. ``cache`` is True (default file), a path,
    or False; the key combines ``cache_key`` (else the denoiser's fingerprint) with every setting.
    """
    _check(steps, sigma_min, sigma_max)
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if solver in STOCHASTIC:
        raise ValueError(f"optimized schedules are fitted to the ODE; {solver!r} is stochastic")
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, *sample_shape) with positive sizes, got {shape}")
    cond = cond or {}
    key_id, path = cache_location(denoiser, cache, cache_key, "optimized schedule")
    key = f"{key_id}|{solver}|{steps}|{sigma_min:g}|{sigma_max:g}|{tuple(shape)}|{reference_steps}|{seed}"
    stored = cached(path, key)
    if stored is not None:
        return torch.tensor(stored["sigmas"], dtype=torch.float64)

    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=g, dtype=dtype, device=device)
    run = SOLVERS[solver]
    with torch.no_grad():
        reference = reference_solution(denoiser, noise * sigma_max, sigma_min, sigma_max, reference_steps, **cond)

        def error(sigmas: torch.Tensor) -> float:
            x = noise * sigmas[0].item()
            return rmse(run(denoiser, x, sigmas, generator=torch.Generator(x.device).manual_seed(seed), **cond),
                        reference)

        candidates = candidate_schedules(steps, sigma_min, sigma_max)
        best_error, best = min(((error(c), c) for c in candidates), key=lambda pair: pair[0])
        best, best_error = _powell(error, best, best_error, sigma_min, sigma_max, max_evals or 60 * steps, progress)

    if path is not None:
        _write_cache(path, key, {"sigmas": best.tolist(), "rms_error": best_error})
    return best


def _powell(error, start: torch.Tensor, start_error: float, sigma_min, sigma_max, max_evals: int,
            progress: bool) -> tuple[torch.Tensor, float]:
    """Powell's search from ``start``; returns the better of the two schedules and its error."""
    bar = tqdm(total=max_evals, desc="optimising schedule", disable=not progress, leave=False)

    def objective(logits: np.ndarray) -> float:
        bar.update()
        return error(_sigmas_from_logits(np.clip(logits, -30, 30), sigma_min, sigma_max))

    start_logits = _logits_from_sigmas(start, sigma_min, sigma_max)
    result = minimize(objective, start_logits, method="Powell", options={"maxfev": max_evals, "xtol": 1e-3})
    bar.close()
    if result.fun < start_error:  # result.fun is the error at result.x
        return _sigmas_from_logits(np.clip(result.x, -30, 30), sigma_min, sigma_max), float(result.fun)
    return start, start_error


def cache_location(denoiser: Callable, cache, cache_key: str | None, what: str) -> tuple[str | None, Path | None]:
    """(the denoiser's identity in cache keys, the JSON file to use or None) for ``cache=True|False|path``."""
    key_id = cache_key or fingerprint(denoiser)
    if cache is False:
        return key_id, None
    if key_id is None:
        warnings.warn(f"{what} not cached: the denoiser has no fingerprint; pass cache_key=")
        return key_id, None
    return key_id, default_cache_path() if cache is True else Path(cache)


def cached(path: Path | None, key: str) -> dict | None:
    """The entry stored under ``key``, if there is a cache file and it has one."""
    return _read_cache(path).get(key) if path is not None and path.exists() else None


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable schedule cache %s: %s", path, exc)
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Merge one entry into the JSON cache, atomically (temporary file, then rename)."""
    data = _read_cache(path) if path.exists() else {}
    data[key] = entry
    paths.write_atomic(path, json.dumps(data, indent=1))
