"""Peer samplers (diffusers schedulers, k-diffusion samplers) driven by a difflab denoiser on equal terms.

A *runner* is a callable ``runner(denoiser, noise, nfe_budget, sigma_min, sigma_max, *, seed=0,
init="matched") -> (x0, nfe_used)`` with a ``name`` such as ``diffusers/DPMSolverMultistepScheduler[karras]``
or ``k-diffusion/sample_dpmpp_2m[karras]``; ``PEERS`` maps names to runners and :func:`run_peer` runs one,
catching its failure. Importing this module imports neither diffusers nor k-diffusion.

Equal terms:
- NFE: every runner wraps the denoiser in a counter and reports the calls it made. It takes the most
  steps whose NFE fits the budget: for diffusers, the largest ``num_inference_steps`` whose
  ``len(scheduler.timesteps)`` (one model call per timestep, so 2N - 1 for Heun/KDPM2/DPMSolverSDE)
  fits; for k-diffusion, a per-sampler NFE formula (table below).
- Noise: ``noise`` is unit Gaussian. With ``init="matched"`` (default) each peer starts from the same
  sigma-convention state ``x = noise * sigma_start`` as difflab's ``sample()`` (sigma_start = the first
  sigma the peer evaluates), mapped into the peer's own coordinates (VP: ``x_vp = x / sqrt(1 + sigma^2)``).
  With ``init="native"`` a diffusers scheduler starts the way its pipelines do: ``noise *
  init_noise_sigma``. VP schedulers start from x_T = noise, i.e. x = noise * sqrt(1 + sigma_start^2),
  a relative change of ~1/(2 sigma_start^2) (8e-5 at sigma 80); Karras-style ones from noise * sigma_max
  for linspace/trailing (the same as matched) but noise * sqrt(1 + sigma_max^2) for leading.
- Sigma range: each diffusers scheduler gets a 1000-step VP table whose sigmas span exactly
  [sigma_min, sigma_max] (linear betas, as DDPM, with beta_start and beta_end fitted to the ends: see
  :func:`vp_betas`). What each family then actually uses (measured at sigma_min=0.002, sigma_max=80,
  an NFE budget of 10; ``run_peer`` returns every evaluated sigma and the final one):
    * timestep spacings (every scheduler on the VP table): "linspace" and "trailing" start at t = 999,
      i.e. sigma_max; "leading" starts lower (t = 900, sigma 35.0, for 10 steps; t = 800, sigma 16.5, for
      the 5 steps of Heun/KDPM2/DPMSolverSDE). The lowest sigma evaluated: "trailing" stops at
      t = 1000/N - 1 (0.30 for N = 10); with "linspace"/"leading", DDIM, DDPM, PNDM and the Karras-style
      schedulers (Euler, EulerAncestral, Heun, KDPM2, KDPM2Ancestral, LMS, DPMSolverSDE) reach t = 0
      (sigma_min), while the multistep ones (DEIS, DPMSolverMultistep/Singlestep, UniPC, SASolver) space
      N + 1 points and drop the last, so they stop near t = 1000/(N + 1) (0.27-0.30 for N = 10) and
      jump from there to the end.
    * use_karras_sigmas / use_exponential_sigmas, IPNDM (its ``trained_betas`` are the VP sigma_t of our
      karras or exponential grid) and the EDM schedulers (sigma_min/sigma_max are config values):
      exactly [sigma_min, sigma_max].
    * the end: sigma = 0 for all but DEIS (no final_sigmas_type: it stops at the table's sigma_min, and
      with karras/exponential sigmas spends its last NFE on a zero-length step from sigma_min to
      sigma_min), SASolver (stops at sigma_min) and UniPC bh1 (set to stop at sigma_min, see the table):
      their outputs keep sigma_min of noise.
  k-diffusion gets get_sigmas_karras / get_sigmas_exponential over exactly [sigma_min, sigma_max];
  ``sample_dpm_fast`` builds its own grid, uniform in log sigma over the same range, and stops at
  sigma_min (no step to 0).
- Precision: float64 wherever the peer lets us. The VP table is built in float64 and installed over
  the float32 one diffusers builds (alphas_cumprod and everything derived from it) before
  ``set_timesteps``; after it every floating tensor of the scheduler (sigmas, ...) is promoted to
  float64. EulerDiscrete, EulerAncestral, EDMEuler and DPMSolverMultistep cast ``sample`` to float32
  inside ``step``; the state is handed to them as a tensor subclass on which that cast is a no-op
  (:class:`_Float64`). Left as the peers make them: the sigmas diffusers rounds to float32 inside
  ``set_timesteps`` (a ~6e-8 relative change of the grid, not of the arithmetic), and the float32
  noise that DPMSolverMultistep's SDE variant draws.
  k-diffusion runs with float64 as the default dtype, so its sigmas and dpm_fast's grid are float64.
- The model: with ``prediction_type="sample"`` the scheduler receives the denoiser's x0 directly.
  Where a scheduler lacks it, the x0 is converted exactly (in float64): PNDM, EulerAncestral, KDPM2,
  KDPM2Ancestral and DPMSolverSDE get epsilon ``(x - x0) / sigma``, IPNDM v-prediction, the EDM
  schedulers their epsilon preconditioning ``(x0 - c_skip x) / c_out``. The denoiser is called at the
  sigma the scheduler uses in its update (not at a rounded integer timestep a network would see).

Not covered: consistency/few-step schedulers (LCM, TCD, CM), the flow-matching ones (a different
process; their Euler is DDIM again), task-specific variants (CogVideoX, inverse, parallel, RePaint,
unCLIP, VQ, SDE-VE) and k-diffusion's sample_dpm_adaptive, whose NFE its error controller sets.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from difflab.sampling.solvers import in_chunks

TRAIN_TIMESTEPS = 1000


# --- shared pieces ---------------------------------------------------------------------------------


class _Counter:
    """Wraps a denoiser: counts calls (the NFE) and records the sigma of each."""

    def __init__(self, denoiser: Callable):
        self.denoiser, self.calls, self.sigmas = denoiser, 0, []

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        self.sigmas.append(float(torch.as_tensor(sigma).reshape(-1)[0]))
        return self.denoiser(x, sigma, **cond)


class _Trace(NamedTuple):
    x0: torch.Tensor
    counter: _Counter
    final_sigma: float  # the sigma of the returned state (0 unless the peer stops short)


def _largest_fitting(budget: int, nfe: Callable[[int], int]) -> int:
    """The most steps n in [1, budget] with nfe(n) <= budget (nfe increasing in n). A step count the
    peer rejects (PNDM's Runge-Kutta warm-up needs 4 steps and 13 NFE) counts as not fitting."""

    def fits(n: int) -> bool:
        try:
            return nfe(n) <= budget
        except Exception:  # noqa: BLE001
            return False

    lo, hi = 1, max(budget, 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    if not fits(lo):
        raise ValueError(f"an NFE budget of {budget} fits no step count of this peer")
    return lo


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device, dtype: torch.dtype | None = None):
    """Fork the global RNG (the peers draw from it) and seed it; optionally set the default dtype."""
    devices = [device.index or 0] if device.type == "cuda" else []
    old_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if dtype is not None:
            torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(old_dtype)


def vp_betas(sigma_min: float, sigma_max: float, steps: int = TRAIN_TIMESTEPS) -> np.ndarray:
    """Linear betas (DDPM's shape) whose VP table spans exactly [sigma_min, sigma_max], in float64.

    beta_start gives sigma(t=0) = sigma_min; beta_end is found by bisection so that
    alphabar(T-1) = 1 / (1 + sigma_max^2); the last beta is then nudged to hit it exactly.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    beta_start = sigma_min**2 / (1 + sigma_min**2)
    target = -math.log1p(sigma_max**2)  # log alphabar at the last timestep

    def log_alphabar_end(beta_end: float) -> float:
        return float(np.log1p(-np.linspace(beta_start, beta_end, steps)).sum())

    lo, hi = beta_start, 1.0 - 1e-12
    if log_alphabar_end(lo) < target:
        raise ValueError(f"[{sigma_min}, {sigma_max}] is too narrow a range for a {steps}-step linear table")
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if log_alphabar_end(mid) > target else (lo, mid)
    betas = np.linspace(beta_start, lo, steps)
    betas[-1] = -math.expm1(target - float(np.log1p(-betas[:-1]).sum()))
    return betas


def _karras(n: int, lo: float, hi: float, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _exponential(n: int, lo: float, hi: float) -> np.ndarray:
    return np.exp(np.linspace(math.log(hi), math.log(lo), n))


@dataclass(frozen=True)
class Runner:
    """A named peer: ``runner(denoiser, noise, nfe_budget, sigma_min, sigma_max, *, seed=0, init="matched")``
    returns ``(x0 (B, ...) float64, nfe_used)``."""

    name: str
    library: str
    stochastic: bool
    trace: Callable[..., _Trace] = field(repr=False)

    def __call__(self, denoiser, noise, nfe_budget, sigma_min, sigma_max, **options):
        result = self.trace(denoiser, noise, nfe_budget, sigma_min, sigma_max, **options)
        return result.x0, result.counter.calls


# --- diffusers -------------------------------------------------------------------------------------
# kind: how the scheduler's state and sigma are read.
#   "vp_t"   VP state x_vp, integer timesteps t, sigma from alphas_cumprod[t]      (DDIM, DDPM, PNDM)
#   "vp"     VP state, sigma = scheduler.sigmas[step_index]        (DEIS, DPM-Solver, UniPC, SA-Solver)
#   "ipndm"  VP state, sigma = betas[i] / alphas[i] (IPNDM's VP sigma_t and alpha_t per step)
#   "k"      sigma-convention state x; the model input is x / sqrt(sigma^2 + 1) (Euler, Heun, KDPM2,
#            LMS, DPMSolverSDE), so sigma is read from scale_model_input itself (covers the
#            second-stage sigmas of Heun/KDPM2/DPMSolverSDE)
#   "edm"    sigma-convention state, sigma = scheduler.sigmas[step_index]   (EDMEuler, EDMDPMSolver)
# output: what the model returns: "sample" (x0), "epsilon", "v" (VP v-prediction), "edm_epsilon".


@dataclass(frozen=True)
class _DiffusersSpec:
    cls: str
    kind: str
    output: str
    config: dict
    step_kwargs: dict = field(default_factory=dict)


_SPACINGS = {s: {"timestep_spacing": s} for s in ("linspace", "leading", "trailing")}
_KARRAS = {"karras": {"use_karras_sigmas": True}}
_EXPONENTIAL = {"exponential": {"use_exponential_sigmas": True}}
_SAMPLE = {"prediction_type": "sample"}

# (class, config label, kind, output, config, variants, step kwargs, stochastic)
_DIFFUSERS_TABLE = [
    ("DDIMScheduler", "", "vp_t", "sample", {**_SAMPLE, "clip_sample": False, "set_alpha_to_one": True},
     _SPACINGS, {}, False),
    ("DDIMScheduler", "eta=1", "vp_t", "sample", {**_SAMPLE, "clip_sample": False, "set_alpha_to_one": True},
     _SPACINGS, {"eta": 1.0}, True),
    ("DDPMScheduler", "", "vp_t", "sample", {**_SAMPLE, "clip_sample": False}, _SPACINGS, {}, True),
    # PNDM has no "sample" prediction: it gets epsilon. Default: Runge-Kutta (PRK) warm-up, then PLMS.
    ("PNDMScheduler", "", "vp_t", "epsilon", {"set_alpha_to_one": True}, _SPACINGS, {}, False),
    ("PNDMScheduler", "plms", "vp_t", "epsilon", {"set_alpha_to_one": True, "skip_prk_steps": True},
     _SPACINGS, {}, False),
    ("IPNDMScheduler", "", "ipndm", "v", {}, {"karras": {}, "exponential": {}}, {}, False),
    *[("DEISMultistepScheduler", label, "vp", "sample", {**_SAMPLE, "solver_order": order},
       {**_SPACINGS, **_KARRAS, **_EXPONENTIAL}, {}, False) for label, order in (("", 2), ("order=3", 3))],
    *[("DPMSolverMultistepScheduler", label, "vp", "sample",
       {**_SAMPLE, "algorithm_type": "dpmsolver++", "final_sigmas_type": "zero", **config},
       {**_SPACINGS, **_KARRAS, **_EXPONENTIAL}, {}, False)
      for label, config in (("", {"solver_order": 2, "solver_type": "midpoint"}),
                            ("heun", {"solver_order": 2, "solver_type": "heun"}),
                            ("order=3", {"solver_order": 3, "solver_type": "midpoint"}),
                            ("order=3,heun", {"solver_order": 3, "solver_type": "heun"}))],
    ("DPMSolverMultistepScheduler", "sde", "vp", "sample",
     {**_SAMPLE, "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
     {**_SPACINGS, **_KARRAS}, {}, True),
    # No timestep_spacing option: its timesteps are linspace.
    *[("DPMSolverSinglestepScheduler", label, "vp", "sample",
       {**_SAMPLE, "solver_order": order, "lower_order_final": True, "final_sigmas_type": "zero"},
       {"linspace": {}, **_KARRAS, **_EXPONENTIAL}, {}, False) for label, order in (("", 2), ("order=3", 3))],
    *[("UniPCMultistepScheduler", label, "vp", "sample", {**_SAMPLE, "final_sigmas_type": "zero", **config},
       {**_SPACINGS, **_KARRAS, **_EXPONENTIAL}, {}, False)
      for label, config in (("", {"solver_order": 2, "solver_type": "bh2"}),
                            ("order=3", {"solver_order": 3, "solver_type": "bh2"}),
                            # bh1 (B(h) = h) gives NaN on a step into sigma = 0 (inf * 0 in its last
                            # update), so it stops at sigma_min: its output keeps that much noise.
                            ("bh1", {"solver_order": 2, "solver_type": "bh1",
                                     "final_sigmas_type": "sigma_min"}))],
    ("SASolverScheduler", "", "vp", "sample", dict(_SAMPLE), {**_SPACINGS, **_KARRAS}, {}, True),
    ("EulerDiscreteScheduler", "", "k", "sample", dict(_SAMPLE), {**_SPACINGS, **_KARRAS, **_EXPONENTIAL}, {},
     False),
    # EulerAncestral, KDPM2, KDPM2Ancestral and DPMSolverSDE reject prediction_type="sample": epsilon.
    ("EulerAncestralDiscreteScheduler", "", "k", "epsilon", {}, _SPACINGS, {}, True),
    ("HeunDiscreteScheduler", "", "k", "sample", dict(_SAMPLE), {**_SPACINGS, **_KARRAS, **_EXPONENTIAL}, {},
     False),
    ("KDPM2DiscreteScheduler", "", "k", "epsilon", {}, {**_SPACINGS, **_KARRAS}, {}, False),
    ("KDPM2AncestralDiscreteScheduler", "", "k", "epsilon", {}, {**_SPACINGS, **_KARRAS}, {}, True),
    ("LMSDiscreteScheduler", "", "k", "sample", dict(_SAMPLE), {**_SPACINGS, **_KARRAS}, {}, False),
    ("DPMSolverSDEScheduler", "", "k", "epsilon", {}, {**_SPACINGS, **_KARRAS}, {}, True),  # needs torchsde
    ("EDMEulerScheduler", "", "edm", "edm_epsilon", {"prediction_type": "epsilon"},
     {s: {"sigma_schedule": s} for s in ("karras", "exponential")}, {}, False),
    *[("EDMDPMSolverMultistepScheduler", label, "edm", "edm_epsilon",
       {"prediction_type": "epsilon", "solver_order": order, "final_sigmas_type": "zero"},
       {s: {"sigma_schedule": s} for s in ("karras", "exponential")}, {}, False)
      for label, order in (("", 2), ("order=3", 3))],
]


class _Float64(torch.Tensor):
    """A float64 tensor whose casts to float32 are no-ops.

    EulerDiscrete, EulerAncestral, EDMEuler and DPMSolverMultistep ``step`` start with
    ``sample = sample.to(torch.float32)`` ("upcast to avoid precision issues") and cast back to the model
    output's dtype at the end, so a float64 state would be rounded to float32 every step. Handing them
    the state as this subclass keeps their arithmetic in float64; nothing else changes.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and isinstance(args[0], torch.Tensor) and args[0].dtype == torch.float64:
            wanted = kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            if wanted == torch.float32:
                args, kwargs = (args[0], *(a for a in args[1:] if not isinstance(a, torch.dtype))), {
                    k: v for k, v in kwargs.items() if k != "dtype"}
        return super().__torch_function__(func, types, args, kwargs)


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x


def _vp_scale(sigma: float) -> float:
    """alpha = 1 / sqrt(1 + sigma^2): x_vp = alpha * x."""
    return 1 / math.sqrt(1 + sigma**2)


def _install_table(sched, betas: np.ndarray) -> None:
    """Replace diffusers' float32 VP table with our float64 one, and what __init__ derived from it."""
    b = torch.from_numpy(betas)
    sched.betas, sched.alphas = b, 1 - b
    sched.alphas_cumprod = ab = torch.cumprod(1 - b, dim=0)
    if hasattr(sched, "alpha_t"):
        sched.alpha_t, sched.sigma_t = ab.sqrt(), (1 - ab).sqrt()
        sched.lambda_t = sched.alpha_t.log() - sched.sigma_t.log()
    if hasattr(sched, "final_alpha_cumprod"):
        set_to_one = sched.config.get("set_alpha_to_one", True)
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_to_one else ab[0]
    if isinstance(getattr(sched, "sigmas", None), torch.Tensor) and len(sched.sigmas) == len(ab):
        sched.sigmas = ((1 - ab) / ab).sqrt()  # VP multistep schedulers (set_timesteps recomputes it)


def _to_float64(sched) -> None:
    for name, value in list(vars(sched).items()):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64:
            setattr(sched, name, value.to(torch.float64))


def _scheduler_factory(spec: _DiffusersSpec, variant: str, sigma_min: float, sigma_max: float):
    """``make(steps)``: a scheduler with our table (or grid) and ``set_timesteps(steps)`` done, in float64.

    The constructor runs once: some (KDPM2, Heun) call ``set_timesteps(1000)`` in ``__init__``, which is
    slow, and the NFE search needs several step counts. Each ``make`` works on a fresh copy.
    """
    import diffusers

    cls = getattr(diffusers, spec.cls)  # a dummy that raises on use when a backend (torchsde) is missing
    config = dict(spec.config)
    if spec.kind == "edm":
        base = cls(**config, sigma_min=sigma_min, sigma_max=sigma_max)
    elif spec.kind != "ipndm":
        betas = vp_betas(sigma_min, sigma_max)
        base = cls(**config, num_train_timesteps=TRAIN_TIMESTEPS, trained_betas=betas.tolist())
        _install_table(base, betas)

    def make(steps: int):
        if spec.kind == "ipndm":  # trained_betas = the VP sigma_t at each of the steps + 1 sigmas
            grid = (_karras if variant == "karras" else _exponential)(steps, sigma_min, sigma_max)
            vp_sigma_t = np.append(grid / np.sqrt(1 + grid**2), 0.0)
            sched = cls(**config, trained_betas=vp_sigma_t.tolist())
            sched.set_timesteps(steps)
            sched.betas = torch.from_numpy(vp_sigma_t)
            sched.alphas = (1 - sched.betas**2).sqrt()
        else:
            sched = copy.deepcopy(base)
            sched.set_timesteps(steps)
        _to_float64(sched)
        if hasattr(sched, "set_begin_index"):  # step index by position, never by looking timesteps up
            sched.set_begin_index(0)
        return sched

    return make


def _sigma_now(sched, kind: str, t) -> float:
    if kind == "vp_t":
        ab = float(sched.alphas_cumprod[int(t)])
        return math.sqrt((1 - ab) / ab)
    index = sched.step_index if sched.step_index is not None else 0
    if kind == "ipndm":
        return float(sched.betas[index] / sched.alphas[index])
    if kind == "k":  # scale_model_input(1) = 1 / sqrt(sigma^2 + 1), exact enough in float64
        c = float(sched.scale_model_input(torch.ones(1, dtype=torch.float64), t).reshape(-1)[0])
        return math.sqrt(max(1 / c**2 - 1, 0.0))
    return float(sched.sigmas[index])


def _final_sigma(sched, kind: str) -> float:
    if kind == "vp_t":
        return 0.0  # set_alpha_to_one=True (DDIM, PNDM); DDPM's last step always ends at alphabar = 1
    if kind == "ipndm":
        return float(sched.betas[-1] / sched.alphas[-1])
    return float(sched.sigmas[-1])


def _model_output(output: str, x0: torch.Tensor, x: torch.Tensor, sigma: float, sched) -> torch.Tensor:
    """What the scheduler expects from its model, given the denoiser's x0 at sigma-convention x."""
    if output == "sample":
        return x0
    eps = (x - x0) / sigma
    if output == "epsilon":
        return eps
    if output == "v":  # v = alpha eps - sigma_t x0 in VP terms (alpha^2 + sigma_t^2 = 1)
        alpha = _vp_scale(sigma)
        return alpha * (eps - sigma * x0)
    if output == "edm_epsilon":  # x0 = c_skip x + c_out F
        sd = sched.config.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / math.sqrt(sigma**2 + sd**2)
        return (x0 - c_skip * x) / c_out
    raise ValueError(f"unknown output kind {output!r}")


def _trace_diffusers(spec: _DiffusersSpec, variant: str, denoiser, noise, nfe_budget, sigma_min, sigma_max,
                     *, seed: int = 0, init: str = "matched") -> _Trace:
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            _quiet_numpy_on_tensors()
            return _run_diffusers(spec, variant, denoiser, noise, nfe_budget, sigma_min, sigma_max, seed,
                                  init)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def _quiet_numpy_on_tensors() -> None:
    """diffusers applies numpy to torch tensors (np.array(t), np.log(t)); numpy 2 warns about torch's
    __array__/__array_wrap__ signatures each time."""
    warnings.filterwarnings("ignore", r"__array(_wrap)?__ ", DeprecationWarning)


def _run_diffusers(spec, variant, denoiser, noise, nfe_budget, sigma_min, sigma_max, seed, init) -> _Trace:
    make = _scheduler_factory(spec, variant, sigma_min, sigma_max)
    sched = make(_largest_fitting(nfe_budget, lambda n: len(make(n).timesteps)))
    if "noise_sampler_seed" in sched.config:  # DPMSolverSDE's Brownian tree
        sched.register_to_config(noise_sampler_seed=seed)
    counter = _Counter(denoiser)
    noise = noise.to(torch.float64)
    vp = spec.kind in ("vp_t", "vp", "ipndm")
    step_kwargs = dict(spec.step_kwargs)
    if "generator" in inspect.signature(sched.step).parameters:
        step_kwargs["generator"] = torch.Generator(noise.device).manual_seed(seed)
    x = None
    with _seeded(seed, noise.device), torch.no_grad():
        for t in sched.timesteps:
            sigma = _sigma_now(sched, spec.kind, t)
            if x is None:  # the starting state, at the first sigma the scheduler evaluates
                if init == "matched":
                    x = noise * sigma * (_vp_scale(sigma) if vp else 1.0)
                elif init == "native":
                    x = noise * float(sched.init_noise_sigma)
                else:
                    raise ValueError(f"init must be 'matched' or 'native', got {init!r}")
                x = x.as_subclass(_Float64)
            sched.scale_model_input(x, t)  # the input a network would get; it also advances state
            x_sigma = _plain(x / _vp_scale(sigma) if vp else x)
            x0 = counter(x_sigma, x_sigma.new_full((x.shape[0],), sigma))
            out = _model_output(spec.output, x0, x_sigma, sigma, sched)
            x = sched.step(out, t, x, **step_kwargs).prev_sample
    final_sigma = _final_sigma(sched, spec.kind)
    return _Trace(_plain(x / _vp_scale(final_sigma) if vp else x), counter, final_sigma)


# --- k-diffusion -----------------------------------------------------------------------------------
# sampler -> (NFE for n steps ending at sigma = 0, stochastic). heun/dpm_2 and the 2S/SDE samplers take
# two evaluations a step except the last (an Euler step into 0); dpm_fast spends exactly n.
# ipndm, ipndm_v and deis exist only in later k-diffusion releases: their runners report that.
_K_SAMPLERS = {
    "euler": (lambda n: n, False),
    "euler_ancestral": (lambda n: n, True),
    "heun": (lambda n: 2 * n - 1, False),
    "dpm_2": (lambda n: 2 * n - 1, False),
    "dpm_2_ancestral": (lambda n: 2 * n - 1, True),
    "lms": (lambda n: n, False),
    "dpmpp_2s_ancestral": (lambda n: 2 * n - 1, True),
    "dpmpp_sde": (lambda n: 2 * n - 1, True),
    "dpmpp_2m": (lambda n: n, False),
    "dpmpp_2m_sde": (lambda n: n, True),
    "dpmpp_3m_sde": (lambda n: n, True),
    "ipndm": (lambda n: n, False),
    "ipndm_v": (lambda n: n, False),
    "deis": (lambda n: n, False),
    # dpm_adaptive: NFE set by its error controller, not a budget; left out.
}
_K_SCHEDULES = {"karras": {}, "exponential": {}}


def _trace_k(sampler: str, schedule: str, denoiser, noise, nfe_budget, sigma_min, sigma_max,
             *, seed: int = 0, init: str = "matched") -> _Trace:
    from importlib.metadata import version

    from k_diffusion import sampling

    fn = getattr(sampling, f"sample_{sampler}", None)
    if fn is None:
        raise NotImplementedError(f"k-diffusion {version('k-diffusion')} has no sample_{sampler}")
    counter = _Counter(denoiser)
    noise = noise.to(torch.float64)
    # float64 default dtype: get_sigmas_* and dpm_fast build their grids with torch.linspace/tensor.
    with _seeded(seed, noise.device, torch.float64), torch.no_grad():
        if sampler == "dpm_fast":  # its own grid, uniform in lambda = -log sigma; ends at sigma_min
            x = fn(counter, noise * sigma_max, sigma_min, sigma_max, nfe_budget, disable=True)
            return _Trace(x, counter, sigma_min)
        nfe, _ = _K_SAMPLERS[sampler]
        steps = _largest_fitting(nfe_budget, nfe)
        get_sigmas = getattr(sampling, f"get_sigmas_{schedule}")
        sigmas = get_sigmas(steps, sigma_min, sigma_max, **_K_SCHEDULES[schedule])
        sigmas = sigmas.to(noise.device, torch.float64)
        x = fn(counter, noise * sigmas[0], sigmas, disable=True)
    return _Trace(x, counter, 0.0)


# --- registry --------------------------------------------------------------------------------------


def _build() -> dict[str, Runner]:
    peers: dict[str, Runner] = {}
    for cls, label, kind, output, config, variants, step_kwargs, stochastic in _DIFFUSERS_TABLE:
        for variant, extra in variants.items():
            spec = _DiffusersSpec(cls, kind, output, {**config, **extra}, step_kwargs)
            name = f"diffusers/{cls}{f'({label})' if label else ''}[{variant}]"

            def trace(*args, _spec=spec, _variant=variant, **kwargs):
                return _trace_diffusers(_spec, _variant, *args, **kwargs)

            peers[name] = Runner(name, "diffusers", stochastic, trace)
    for sampler, (_, stochastic) in _K_SAMPLERS.items():
        for schedule in _K_SCHEDULES:
            name = f"k-diffusion/sample_{sampler}[{schedule}]"

            def trace(*args, _sampler=sampler, _schedule=schedule, **kwargs):
                return _trace_k(_sampler, _schedule, *args, **kwargs)

            peers[name] = Runner(name, "k-diffusion", stochastic, trace)
    name = "k-diffusion/sample_dpm_fast[uniform-lambda]"
    peers[name] = Runner(name, "k-diffusion", False, lambda *a, **k: _trace_k("dpm_fast", "", *a, **k))
    return peers


PEERS: dict[str, Runner] = _build()


class PeerResult(NamedTuple):
    name: str
    x0: torch.Tensor | None  # None when the runner failed
    nfe: int | None
    reason: str | None  # why it failed, else None
    sigmas: list[float]  # the sigma of every denoiser call, in order
    final_sigma: float | None  # the sigma of the returned state (0 unless the peer stops short)
    seconds: float


def run_peer(runner: Runner | str, denoiser, noise, nfe_budget: int, sigma_min: float, sigma_max: float,
             **options) -> PeerResult:
    """Run one peer; a failure (missing package, unsupported config, ...) gives x0=None and a reason.

    Large batches run in chunks (:func:`~difflab.sampling.solvers.in_chunks`), as difflab's solvers do in the
    benchmark: the same results for the deterministic peers, several times sooner.
    """
    runner = PEERS[runner] if isinstance(runner, str) else runner
    start = time.perf_counter()
    traces = []

    def trace(part: torch.Tensor) -> torch.Tensor:
        traces.append(runner.trace(denoiser, part, nfe_budget, sigma_min, sigma_max, **options))
        return traces[-1].x0

    try:
        x0 = in_chunks(trace, noise)
    except Exception as exc:  # noqa: BLE001 - a peer's failure is a result, not an error
        return PeerResult(runner.name, None, None, f"{type(exc).__name__}: {exc}".strip(), [], None,
                          time.perf_counter() - start)
    c = traces[0].counter  # every chunk runs the same steps
    finite = bool(torch.isfinite(x0).all())
    return PeerResult(runner.name, x0 if finite else None, c.calls, None if finite else "non-finite output",
                      c.sigmas, traces[0].final_sigma, time.perf_counter() - start)
