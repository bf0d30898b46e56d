"""An optimised sigma schedule: the steps that minimise a solver's error for a given denoiser and budget.

In the spirit of "Align Your Steps" (Sabour et al. 2024) and GITS (Chen et al. 2024): start from the
best closed-form schedule, then move the log-sigma steps to minimise the RMS distance between the
solver's result and a fine reference solution of the probability-flow ODE from the same noise.
sigma_max is kept; the last step before 0 may stay above sigma_min when that is more accurate (as
"trailing" spacing does), never below. The error minimised is the accumulated local truncation error
of the whole trajectory, so multistep solvers are handled as faithfully as single-step ones.
Derivative-free (Powell), so any denoiser and any solver works; results are cached to a small JSON
file per model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize
from tqdm.auto import tqdm

from difflab.sampling.schedules import _append_zero, _check, karras, loglinear
from difflab.sampling.solvers import SOLVERS, STOCHASTIC, rk4

log = logging.getLogger(__name__)


def default_cache_path() -> Path:
    """``$DIFFLAB_CACHE/optimized_schedules.json``, else under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    root = os.environ.get("DIFFLAB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difflab"
    return Path(root) / "optimized_schedules.json"


def reference_solution(
    denoiser: Callable, x: torch.Tensor, sigma_min: float, sigma_max: float, steps: int = 1000, **cond
) -> torch.Tensor:
    """A fine solution of the probability-flow ODE: RK4 in log-sigma from sigma_max to sigma_min, then
    the Tweedie step to 0 that every solver takes. ``x`` is already scaled by sigma_max."""
    return rk4(denoiser, x, loglinear(steps, sigma_min, sigma_max), **cond)


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


def _sigmas_from_logits(logits: np.ndarray, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Nodes from sigma_max down towards sigma_min: the log-sigma range is split into len(logits) + 1 gaps
    by softmax(logits, 0); the last gap is the part of the range below the last node (left untraversed,
    as "trailing" spacing does)."""
    z = np.append(logits, 0.0)
    gaps = np.exp(z - z.max())
    gaps *= (math.log(sigma_max) - math.log(sigma_min)) / gaps.sum()
    log_sigmas = math.log(sigma_max) - np.concatenate([[0.0], np.cumsum(gaps[:-1])])
    sigmas = torch.from_numpy(np.exp(log_sigmas))
    sigmas[0] = sigma_max
    return _append_zero(sigmas.clamp(min=sigma_min))


def _logits_from_sigmas(sigmas: torch.Tensor, sigma_min: float) -> np.ndarray:
    log_nodes = np.log(sigmas[:-1].numpy())
    gaps = np.append(-np.diff(log_nodes), log_nodes[-1] - math.log(sigma_min))
    gaps = np.maximum(gaps, 1e-3 * gaps.sum())
    return np.log(gaps[:-1]) - np.log(gaps[-1])


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
    key_id = cache_key or fingerprint(denoiser)
    path = None
    if cache is not False:
        if key_id is None:
            warnings.warn("optimized schedule not cached: the denoiser has no fingerprint; pass cache_key=")
        else:
            path = default_cache_path() if cache is True else Path(cache)
    key = f"{key_id}|{solver}|{steps}|{sigma_min:g}|{sigma_max:g}|{tuple(shape)}|{reference_steps}|{seed}"
    if path is not None and path.exists():
        stored = _read_cache(path).get(key)
        if stored is not None:
            return torch.tensor(stored["sigmas"], dtype=torch.float64)

    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype, device=device) * sigma_max
    run = SOLVERS[solver]
    with torch.no_grad():
        reference = reference_solution(denoiser, x, sigma_min, sigma_max, reference_steps, **cond)

        def error(sigmas: torch.Tensor) -> float:
            result = run(denoiser, x, sigmas, generator=torch.Generator(x.device).manual_seed(seed), **cond)
            value = (result - reference).double().square().mean().sqrt().item()
            return value if math.isfinite(value) else math.inf

        candidates = [karras(n, sigma_min, sigma_max, rho) for rho in (3.0, 5.0, 7.0, 10.0) for n in (steps, steps + 1)]
        candidates += [loglinear(steps, sigma_min, sigma_max), loglinear(steps + 1, sigma_min, sigma_max)]
        # Candidates with one step more end early: the last node before 0 stays above sigma_min.
        candidates = [torch.cat([c[:steps], c.new_zeros(1)]) for c in candidates]
        best = min(candidates, key=error)
        if steps > 1:
            best = _powell(error, best, sigma_min, sigma_max, max_evals or 60 * steps, progress)
        best_error = error(best)

    if path is not None:
        _write_cache(path, key, {"sigmas": best.tolist(), "rms_error": best_error})
    return best


def _powell(error, start: torch.Tensor, sigma_min, sigma_max, max_evals: int, progress: bool) -> torch.Tensor:
    bar = tqdm(total=max_evals, desc="optimising schedule", disable=not progress, leave=False)

    def objective(logits: np.ndarray) -> float:
        bar.update()
        return error(_sigmas_from_logits(np.clip(logits, -30, 30), sigma_min, sigma_max))

    start_logits = _logits_from_sigmas(start, sigma_min)
    result = minimize(objective, start_logits, method="Powell", options={"maxfev": max_evals, "xtol": 1e-3})
    bar.close()
    found = _sigmas_from_logits(np.clip(result.x, -30, 30), sigma_min, sigma_max)
    return found if error(found) < error(start) else start


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("ignoring unreadable schedule cache %s: %s", path, exc)
        return {}


def _write_cache(path: Path, key: str, entry: dict) -> None:
    """Merge one entry into the JSON cache, atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path) if path.exists() else {}
    data[key] = entry
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
