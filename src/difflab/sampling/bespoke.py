"""A learned few-step solver: steps and multistep coefficients fitted by gradient descent to one denoiser.

In the spirit of Bespoke Non-Stationary solvers (Shaul et al. 2024, "BNS"): with n denoiser
evaluations, every deterministic solver's iterate is a linear combination of the starting point and the
denoiser outputs so far, with coefficients that depend only on the step. So the family

    x_{i+1} = a_i x_i + sum_{j <= i} b_ij D_j,   D_j = D(x_j; sigma_j),   x_n = x0 at sigma = 0

(a_i, b_ij free, one set per step: "non-stationary") holds every n-NFE multistep solver, and fitting
its coefficients and its sigmas to a fine reference solution from many noises gives the best one for
this denoiser. The last step's weight on x, a_{n-1}, is 0 in every closed-form solver (their last step
returns a combination of the D_j), but it is free here: from a last sigma that is not small against the
data's fine scale, the exact endpoint keeps part of x (for a Gaussian of std s, x0 = D + c (x - D), with
c = (s / sqrt(s^2 + sigma^2) - s^2 / (s^2 + sigma^2)) (s^2 + sigma^2) / sigma^2, about 0.3 at sigma = 2 s),
which a sum of posterior means alone cannot give back at few evaluations. The steps are learned jointly,
as LD3 (Tong et al. 2025) learns them by back-propagating through the solver. The coefficients of the
steps before the last are written relative to an exponential integrator on the data prediction
(DPM-Solver++, Lu et al. 2022b), whose learned corrections DPM-Solver-v3 (Zheng et al. 2023) and AMED
(Zhou et al. 2024) also fit:

    a_i = (sigma_{i+1} / sigma_i) e^{alpha_i},   b_ij = (1 - sigma_{i+1} / sigma_i) w_ij

so the decay of x and the step's weight follow the sigmas while they are learned. The start is a
closed-form solver: any deterministic one-evaluation-per-step solver in ``SOLVERS`` is linear in the
starting point and the D_j, so running it on basis vectors reads off its a_i and b_ij exactly
(:meth:`BespokeSolver.from_solver`). The schedules tried are the closed-form ones and a grid of
:func:`~difflab.sampling.schedules.focused` ones, which crowd the steps where the modes are decided; the
fit starts from the pair that does best on held-out noise among each solver's best on the training
batch, and keeps a result only where it is better on held-out noise.
The loss is the endpoint RMSE against :func:`~difflab.sampling.optimize.reference_solution`,
minimised in float64 through the denoiser (autograd; exact for the Gaussian mixture, and it works as
well for a network) by L-BFGS: the loss is deterministic, the parameters few (about n^2 / 2) and their
scales very unequal (a change of alpha acts on every later step), where Adam's equal per-parameter
steps diverge. The RMSE of a mixture with well-separated modes is dominated by the few samples that end
in another mode than the reference, which differ from batch to batch, so the fit over-fits them: it
keeps the solver with the lowest error on a second, held-out batch (early stopping). That batch may be
much larger than the training batch, since it costs forward passes only: a held-out batch with enough
mode switches to count them tells a start that keeps its samples in their modes from one that only fits
the training batch's few switchers.
Those few switchers are also why a training batch of random noises learns little about keeping samples in
their modes: a batch of 4,096 holds about a dozen. With a ``pool``, the training batch is mined from many
more noises (importance sampling): half are the pool's noises with the largest error of the fit's start,
the others a random draw of the rest, each weighted by how many of the rest it stands for. The loss stays
an unbiased estimate of the pool's mean squared error, but the batch holds the pool's noises near the
boundaries between modes, where the gradient shows how to keep them (on the 16-D multiscale mixture at 10
evaluations it halves the error on the benchmark's noise, 3.7e-2 to 1.8e-2).

A fitted solver is a small JSON-serialisable object; it is not in ``SOLVERS``, since it needs its state.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.evaluation import rmse, squared_errors
from difflab.sampling.optimize import (
    Focus,
    _logits_from_sigmas,
    _sigmas_from_logits,
    _write_cache,
    cache_location,
    cached,
    candidate_schedules,
    focus_grid,
    reference_solution,
    refine_focus,
)
from difflab.sampling.schedules import _check
from difflab.sampling.solvers import SOLVERS, in_chunks

# Deterministic solvers with one evaluation a step, by start name: (solver, options). Each is linear in the start
# and the D_j, so an exact starting point. UniPC at order 3 ("unipc3") is also a start: on 64-D mixtures with a
# uniform VP schedule it leaves the fewest noises in another mode than the reference.
LINEAR_SOLVERS: dict[str, tuple[str, dict]] = {
    **{name: (name, {}) for name in ("euler", "lms", "deis", "ipndm", "dpmpp_2m", "dpmpp_3m", "unipc")},
    "unipc3": ("unipc", {"order": 3}),
}


def _integrate(denoiser, x: torch.Tensor, sigmas: Sequence, a: Sequence, b: Sequence, cond: dict, callback=None):
    """The non-stationary multistep update; coefficients are floats, or 0-d tensors when training."""
    n = len(sigmas) - 1
    dtype = torch.promote_types(x.dtype, torch.float32)
    denoised: list[torch.Tensor] = []
    for i in range(n):
        sigma = torch.as_tensor(sigmas[i], dtype=dtype, device=x.device).expand(x.shape[0])
        denoised.append(denoiser(x, sigma, **cond))
        if callback is not None:
            callback({"i": i, "x": x, "sigma": float(sigmas[i]), "sigma_next": float(sigmas[i + 1]),
                      "denoised": denoised[-1]})
        update = sum(b_ij * d_j for b_ij, d_j in zip(b[i], denoised))
        x = a[i] * x + update  # the last step lands on sigma = 0
    return x


@dataclass
class BespokeSolver:
    """A fitted non-stationary multistep solver with ``nfe`` evaluations (see the module docstring).

    ``sigmas``: the nfe evaluation sigmas, then 0. ``a``: the nfe weights on x_i (the last on the final step's
    x). ``b``: row i holds the weights of D_0..D_i; the last row's are the returned estimate's. ``info``: how it
    was fitted.
    """

    sigmas: list[float]
    a: list[float]
    b: list[list[float]]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n = len(self.sigmas) - 1
        if n < 1 or self.sigmas[-1] != 0 or any(s <= 0 for s in self.sigmas[:-1]):
            raise ValueError("sigmas must be positive evaluation sigmas followed by a final 0")
        if len(self.a) != n or [len(row) for row in self.b] != list(range(1, n + 1)):
            raise ValueError(f"{n} evaluations need {n} values in a and rows of 1..{n} values in b")

    @property
    def nfe(self) -> int:
        return len(self.sigmas) - 1

    def __call__(self, denoiser: Callable, x: torch.Tensor, sigmas=None, *, generator=None, callback=None, **cond):
        """Solve from ``x`` (already scaled by ``self.sigmas[0]``) to sigma = 0 with ``nfe`` denoiser calls.

        The solver contract's ``sigmas`` may be passed, but must be this solver's own: the coefficients
        belong to them. ``generator`` is ignored (the solver is deterministic).
        """
        if sigmas is not None:
            given = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
            own = torch.tensor(self.sigmas, dtype=torch.float64)
            if given.shape != own.shape or not torch.allclose(given, own, rtol=1e-6):  # float32 sigmas too
                raise ValueError("a bespoke solver runs on the sigmas it was fitted to; pass sigmas=None")
        return _integrate(denoiser, x, self.sigmas, self.a, self.b, cond, callback)

    @classmethod
    def from_solver(cls, solver: str, sigmas: torch.Tensor) -> BespokeSolver:
        """The closed-form solver ``LINEAR_SOLVERS[solver]`` on ``sigmas`` (positive, decreasing, then 0), exactly.

        Read off by running the solver on coefficient vectors: x is the basis vector of the starting point
        and the k-th denoiser call returns that of D_k. Each iterate is linear in these, so what the k-th
        call receives is x_k's coefficients, and the returned vector the result's.
        """
        if solver not in LINEAR_SOLVERS:
            raise ValueError(f"{solver!r} is not one of the linear one-evaluation solvers {', '.join(LINEAR_SOLVERS)}")
        name, options = LINEAR_SOLVERS[solver]
        s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        basis = torch.eye(len(s), dtype=torch.float64)
        points = []

        def unit(x, sigma):
            points.append(x[0])
            return basis[len(points)][None]

        points.append(SOLVERS[name](unit, basis[:1], s, **options)[0])
        n = len(points) - 1
        if n != len(s) - 1:
            raise ValueError(f"{solver!r} does not take one evaluation a step")
        a = [(points[i + 1][0] / points[i][0]).item() for i in range(n)]
        b = [(points[i + 1][1:i + 2] - a[i] * points[i][1:i + 2]).tolist() for i in range(n)]
        return cls(s.tolist(), a, b, {"start": solver})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BespokeSolver:
        return cls(list(data["sigmas"]), list(data["a"]), [list(row) for row in data["b"]], dict(data.get("info", {})))


class _Parameters(torch.nn.Module):
    """The trainable form of a solver: step logits (as :func:`~difflab.sampling.optimize.optimized` uses),
    alpha_i = log(a_i / decay_i) and the weights w_ij = b_ij / (1 - decay_i), decay_i = sigma_{i+1} / sigma_i;
    the last step (decay 0) has its a and b as they are: ``final`` and the last row of w."""

    def __init__(self, start: BespokeSolver, logits: torch.Tensor, sigma_min: float, sigma_max: float):
        super().__init__()
        n, sigmas = start.nfe, torch.tensor(start.sigmas, dtype=torch.float64)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        decay = sigmas[1:-1] / sigmas[:-2]  # (n - 1,)
        w = torch.zeros(n, n, dtype=torch.float64)  # lower triangle used
        for i, row in enumerate(start.b):
            w[i, :i + 1] = torch.tensor(row, dtype=torch.float64) / (1 - decay[i] if i < n - 1 else 1)
        self.logits = torch.nn.Parameter(logits.clone())  # those of start.sigmas
        self.alpha = torch.nn.Parameter((torch.tensor(start.a[:-1], dtype=torch.float64) / decay).log())
        self.final = torch.nn.Parameter(torch.tensor(start.a[-1], dtype=torch.float64))
        self.w = torch.nn.Parameter(w)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        sigmas = _sigmas_from_logits(self.logits, self.sigma_min, self.sigma_max)  # (n + 1,), last 0
        n = len(sigmas) - 1
        decay = sigmas[1:-1] / sigmas[:-2]
        b = [(1 - decay[i]) * self.w[i, :i + 1] for i in range(n - 1)] + [self.w[n - 1]]
        return sigmas, torch.cat([decay * self.alpha.exp(), self.final[None]]), b

    def solver(self, info: dict) -> BespokeSolver:
        with torch.no_grad():
            sigmas, a, b = self.coefficients()
            return BespokeSolver(sigmas.tolist(), a.tolist(), [row.tolist() for row in b], info)


SHORTLIST = 3  # starts of each solver, chosen on the training batch, that the held-out batch compares


def _lbfgs(params: torch.nn.Module) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(params.parameters(), lr=1, max_iter=20, history_size=50, line_search_fn="strong_wolfe")


def mine(errors: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """A training batch of ``batch`` indices into a pool with per-noise ``errors``, and their weights.

    The first half are the pool's largest errors, the rest a uniform draw without replacement from the others,
    each weighted by how many of the others it stands for; the weights sum to 1, so that ``weights @ e`` is an
    unbiased estimate of the pool's mean of any per-noise ``e`` (exact for the hard half, which all draws share).
    """
    if not 1 <= batch <= len(errors):
        raise ValueError(f"a batch of {batch} cannot be mined from a pool of {len(errors)}")
    order = errors.argsort(descending=True)
    hard, rest = order[:batch // 2], order[batch // 2:]
    easy = rest[torch.randperm(len(rest), generator=generator, device=errors.device)[:batch - len(hard)]]
    weights = torch.cat([torch.ones(len(hard), dtype=torch.float64, device=errors.device),
                         torch.full((len(easy),), len(rest) / len(easy), dtype=torch.float64, device=errors.device)])
    return torch.cat([hard, easy]), weights / len(errors)


def fit_bespoke(
    denoiser: Callable,
    nfe: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    *,
    shape: tuple[int, ...],
    cond: dict | None = None,
    seed: int = 0,
    steps: int = 30,
    patience: int = 5,
    reference_steps: int = 200,
    start_solvers: Sequence[str] = tuple(LINEAR_SOLVERS),
    extra_starts: Sequence[tuple[str, torch.Tensor]] = (),
    focused: bool = True,
    focus_search: int = 64,
    restarts: int = 1,
    held_out: int | None = None,
    pool: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    cache: str | Path | bool = True,
    cache_key: str | None = None,
    progress: bool = False,
) -> BespokeSolver:
    """Fit a :class:`BespokeSolver` with ``nfe`` evaluations to ``denoiser`` from noise of ``shape``.

    ``shape`` is (batch, *sample_shape): the training noises are its first draw from ``seed`` (the noise
    :func:`~difflab.sampling.optimize.optimized` searches on), the ``held_out`` noises (default: batch) its
    second. A held-out batch many times the training batch pays: it costs forward passes only, and the few
    noises that end in another mode, which dominate the error, are too few in a training-sized batch to tell
    fits apart. A start is the pair of a solver from ``start_solvers`` (names of ``LINEAR_SOLVERS``) and a
    schedule (every candidate of the optimised schedule's search and, with ``focused``, the 252 schedules of
    :func:`~difflab.sampling.optimize.focus_grid`, which crowd their steps where the modes are
    decided: six times the starts, each one forward pass of the training batch per evaluation), or one of
    the (solver, sigmas) ``extra_starts`` (e.g. optimised schedules). Each solver's ``SHORTLIST`` best starts
    on the training batch are compared on the held-out batch; the fit starts from the best of all, and with
    ``restarts`` > 1 also from the best start of each of the next-best solvers. With ``focused`` and
    ``focus_search`` > 0, one more fit starts from the best focused start on the held-out batch (of each
    solver's ``SHORTLIST`` best focused ones on the training batch), refined there by
    :func:`~difflab.sampling.optimize.refine_focus` with at most ``focus_search`` forward passes of the
    held-out batch; its ``info`` holds the ``focus`` and the ``focus_grid_point`` it came from.
    Each of up to ``steps`` L-BFGS iterations (20 evaluations of the full-batch loss and its gradient) is
    followed by the held-out error; the solver with the lowest held-out error over all fits is returned,
    and a fit stops after ``patience`` iterations without a new lowest of its own. Restarts pay because the
    loss is dominated by the few noises that end in another mode, so fits from different starts end in quite
    different places. With a ``pool`` of noises (default: none; 16 times the batch did best on the 16-D
    multiscale mixture), each fit trains on a batch of shape[0] mined from it by :func:`mine` with its start's
    errors, in place of the first draw. The pool is the first draw
    and a third one, after the held-out batch, so that the starts and the held-out batch are the same with
    and without a pool, and the fits compare. ``cond`` is batch-aligned with ``shape`` and used for both
    batches, so it allows neither a larger held-out batch nor a pool. ``cache`` and ``cache_key`` work as
    for ``optimized``.
    """
    _check(nfe, sigma_min, sigma_max)
    if restarts < 1:
        raise ValueError(f"restarts must be at least 1, got {restarts}")
    if focus_search < 0:
        raise ValueError(f"focus_search must be at least 0, got {focus_search}")
    if held_out is not None and held_out < 1:
        raise ValueError(f"held_out must be at least 1, got {held_out}")
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, *sample_shape) with positive sizes, got {shape}")
    if pool is not None and pool < shape[0]:
        raise ValueError(f"pool must hold at least the batch of {shape[0]} noises, got {pool}")
    if cond and held_out not in (None, shape[0]):
        raise ValueError(f"cond is batch-aligned with shape, so held_out must be {shape[0]}, not {held_out}")
    if cond and pool is not None:
        raise ValueError("cond is batch-aligned with shape, so it cannot be mined from a pool; pass pool=None")
    cond = cond or {}
    key_id, path = cache_location(denoiser, cache, cache_key, "bespoke solver")
    start_key = ",".join(start_solvers) + (f"|search{focus_search}" if focused else "|unfocused") + "".join(
        f"|{name}:" + ",".join(f"{v:.6g}" for v in torch.as_tensor(sigmas).tolist()) for name, sigmas in extra_starts)
    # "bespoke-v9": the focused grid's centres reach 6.5; "v8": v7 without stale held-out errors in the search;
    # "v7": one more fit, from the best focused start refined ("v5", "v6": the refined starts replaced their
    # solvers'); "v4": focused schedules among the starts; "v3": starts picked on the held-out batch; "v2": the
    # last step's weight on x
    key = (f"{key_id}|bespoke-v9|{nfe}|{sigma_min:g}|{sigma_max:g}|{tuple(shape)}|{reference_steps}|{seed}|{steps}|"
           f"{patience}|{start_key}" + (f"|restarts{restarts}" if restarts > 1 else "")
           + (f"|held{held_out}" if held_out is not None else "") + (f"|pool{pool}" if pool is not None else ""))
    stored = cached(path, key)
    if stored is not None:
        return BespokeSolver.from_dict(stored)

    g = torch.Generator(device=device or "cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=g, dtype=dtype, device=device)
    held_out_noise = torch.randn((held_out or shape[0], *shape[1:]), generator=g, dtype=dtype, device=device)
    more_noise = torch.randn(((pool or shape[0]) - shape[0], *shape[1:]), generator=g, dtype=dtype, device=device)

    def run(solver: BespokeSolver, z: torch.Tensor) -> torch.Tensor:
        """``solver`` from the noises ``z``, without gradients, in chunks: the held-out batch and the pool are
        large."""
        with torch.no_grad():
            return in_chunks(lambda part, **c: solver(denoiser, part * solver.sigmas[0], **c), z, **cond)

    with torch.no_grad():
        target, held_out_target, more_target = (
            reference_solution(denoiser, z * sigma_max, sigma_min, sigma_max, reference_steps, **cond) if len(z) else z
            for z in (noise, held_out_noise, more_noise))
        pool_noise, pool_target = torch.cat([noise, more_noise]), torch.cat([target, more_target])

        def start_from(name: str, sigmas, focus: Focus | None = None) -> tuple[BespokeSolver, torch.Tensor]:
            """The solver on ``sigmas`` as the step logits represent them, so that the start is exactly it."""
            z = torch.as_tensor(_logits_from_sigmas(torch.as_tensor(sigmas, dtype=torch.float64).cpu(), sigma_min,
                                                    sigma_max))
            start = BespokeSolver.from_solver(name, _sigmas_from_logits(z, sigma_min, sigma_max))
            if focus is not None:
                start.info["focus"] = asdict(focus)
            return start, z

        def error(start: BespokeSolver, z: torch.Tensor, reference: torch.Tensor) -> float:
            if min(start.a[:-1], default=1.0) <= 0:  # alpha = log(a / decay) needs a > 0
                return math.inf
            return rmse(run(start, z), reference)

        # By id(start), the start kept alive beside its error so that its id is not reused: the shortlists share
        # some starts.
        held_out_errors: dict[int, tuple[BespokeSolver, float]] = {}

        def held_out_error(start: BespokeSolver) -> float:
            if id(start) not in held_out_errors:
                held_out_errors[id(start)] = start, error(start, held_out_noise, held_out_target)
            return held_out_errors[id(start)][1]

        schedules = [(None, sigmas) for sigmas in candidate_schedules(nfe, sigma_min, sigma_max)]
        if focused:
            schedules += [(focus, focus.sigmas(nfe, sigma_max)) for focus in focus_grid(nfe, sigma_min, sigma_max)]
        starts = [start_from(name, sigmas, focus) for name in start_solvers for focus, sigmas in schedules]
        starts += [start_from(name, sigmas) for name, sigmas in extra_starts]

        # Each solver's SHORTLIST best starts on the training batch; the held-out batch picks among them.
        shortlists: dict[str, list] = {}
        for pair in sorted(starts, key=lambda pair: error(pair[0], noise, target)):
            shortlists.setdefault(pair[0].info["start"], []).append(pair)
        best_of = {name: min((held_out_error(pair[0]), k, pair) for k, pair in enumerate(shortlist[:SHORTLIST]))
                   for name, shortlist in shortlists.items()}
        chosen = [(*pair, held) for held, _, pair in sorted(best_of.values(), key=lambda item: item[:2])[:restarts]]
        # The focused grid is coarse: search around the best focused start on the held-out batch (of each solver's
        # SHORTLIST best focused ones on the training batch), where the few noises that end in another mode are
        # enough to tell neighbouring schedules apart, and fit from the refined start too. As an extra fit, not
        # in place of its solver's start: a start's error is not where its fit ends, and fits from closed-form
        # starts often end lower than any focused start.
        tops = [pair for shortlist in shortlists.values() for pair in
                [pair for pair in shortlist if "focus" in pair[0].info][:SHORTLIST]] if focus_search > 0 else []
        if tops:
            top_error, _, (top, _) = min((held_out_error(pair[0]), k, pair) for k, pair in enumerate(tops))
            name = top.info["start"]
            focus, focus_error = refine_focus(lambda sigmas: error(start_from(name, sigmas)[0], held_out_noise,
                                                                   held_out_target),
                                              Focus(**top.info["focus"]), top_error, nfe, sigma_min, sigma_max,
                                              max_evals=focus_search)
            if focus_error < top_error or all(start is not top for start, *_ in chosen):  # not a fit already
                refined, z = start_from(name, focus.sigmas(nfe, sigma_max), focus)
                refined.info["focus_grid_point"] = top.info["focus"]
                chosen.append((refined, z, focus_error))

    def loss(params: _Parameters, z: torch.Tensor, reference: torch.Tensor, weights: torch.Tensor | None = None):
        sigmas, a, b = params.coefficients()
        x0 = _integrate(denoiser, z * sigmas[0].to(z.dtype), sigmas, a, b, cond)
        squared = squared_errors(x0, reference)
        return (squared.mean() if weights is None else squared @ weights).sqrt()

    def training_batch(start: BespokeSolver) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The first draw, or with a pool, the batch :func:`mine` draws from it with ``start``'s errors."""
        if pool is None:
            return noise, target, None
        errors = squared_errors(run(start, pool_noise), pool_target)
        index, weights = mine(errors, shape[0], g)
        return pool_noise[index], pool_target[index], weights

    bar = tqdm(total=steps * len(chosen), desc=f"fitting bespoke solver ({nfe} NFE)", disable=not progress,
               leave=False)

    def fit(start: BespokeSolver, start_logits: torch.Tensor, start_error: float) -> BespokeSolver:
        params = _Parameters(start, start_logits, sigma_min, sigma_max)
        train_noise, train_target, weights = training_batch(start)

        def fit_held_out_error() -> float:
            return rmse(run(params.solver({}), held_out_noise), held_out_target)

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            error = loss(params, train_noise, train_target, weights)
            error.backward()
            return error

        best_error, best_state, best_step = start_error, copy.deepcopy(params.state_dict()), 0  # held out
        step = 0
        optimizer = _lbfgs(params)
        for step in range(1, steps + 1):
            train_error = optimizer.step(closure).item()  # the training error before this iteration
            error = fit_held_out_error()
            bar.update()
            bar.set_postfix(start=start.info["start"], train=f"{train_error:.2e}", held_out=f"{error:.2e}")
            if math.isfinite(error) and error < best_error:
                best_error, best_state, best_step = error, copy.deepcopy(params.state_dict()), step
            if step - best_step >= patience:
                break
            if not math.isfinite(error):  # a diverged line search: back to the best point, fresh curvature
                params.load_state_dict(best_state)
                optimizer = _lbfgs(params)
        params.load_state_dict(best_state)
        return params.solver({**start.info, "start_sigmas": start.sigmas, "held_out_rmse": best_error,
                              "initial_held_out_rmse": start_error, "best_step": best_step, "steps_run": step})

    fits = [fit(*start) for start in chosen]
    bar.close()
    solver = min(fits, key=lambda fitted: fitted.info["held_out_rmse"])
    solver.info["restarts"] = {fitted.info["start"] + (" (refined focus)" if "focus_grid_point" in fitted.info else ""):
                               fitted.info["held_out_rmse"] for fitted in fits}
    if path is not None:
        _write_cache(path, key, solver.to_dict())
    return solver
