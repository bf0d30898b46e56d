"""Guidance as denoiser combinators (STYLE.md, principle 3): they take denoisers and return a denoiser.

Each method evaluates a *positive* estimate and a *negative* one and returns ``lerp(negative, positive, w)``,
so ``w = 1`` is the positive estimate and ``w = 0`` the negative one:

- classifier-free guidance (Ho & Salimans 2022): positive ``D(x | c)``, negative ``D(x | null)`` or
  ``D(x | negative condition)``, both from one forward pass on the doubled batch;
- autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"): positive ``D``,
  negative ``D_weak``, a weaker model of the same task and conditioning.

Refinements, all acting on the x0 estimate of every channel at once (norms and stds span all non-batch dims):

- guidance interval (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
  distribution quality"): guide only where ``lo <= sigma <= hi``, elsewhere return the positive estimate.
- CFG rescale (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Alg. 2): match
  the guided prediction's std to the positive one's and mix by ``phi``. The paper rescales its network's *v
  prediction*. Guiding x0, epsilon or v gives the same guided denoiser (a lerp is affine), but matching a std
  does not commute with the x-dependent offsets between them, so we rescale exactly the paper's v: with
  ``x_vp = x / sqrt(1 + sigma^2)``, ``v = sqrt(1 + sigma^2) / sigma * u`` where ``u = x / (1 + sigma^2) - D``, and
  the per-sample factor cancels in the std ratio, so ``D <- D + phi * (1 - std(u_pos) / std(u)) * u``. At large
  sigma ``u ~ -D`` (an x0 rescale); at small sigma ``u ~ sigma * epsilon`` (a noise rescale).
- adaptive projected guidance (Sadat et al. 2024, "Eliminating oversaturation and artifacts of high guidance
  scales", APG), on the x0 estimate as in the paper: the update ``positive - negative`` is capped to norm ``r``,
  split into parts parallel and orthogonal to ``positive``, and the parallel part weighted by ``eta``; the result is
  ``positive + (w - 1) * update``, which for ``eta = 1`` and no cap is CFG. APG's momentum is left out: it is a
  running sum over denoiser *calls*, hidden state that would make the guided denoiser impure (STYLE.md,
  principle 2), mix the two evaluations of a Heun step at different sigmas, and leak from one sampling run,
  schedule search or batch to the next.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from difflab.conditioning import null_condition
from difflab.sampling.solvers import rows

Denoiser = Callable[..., torch.Tensor]
METHODS = ("cfg", "apg")


@dataclass(frozen=True)
class GuidanceConfig:
    """Guidance settings; the defaults return the positive (conditional) estimate unchanged.

    ``scale`` w: a float, or one per sample (a sequence or a (B,) tensor, stored as a tuple of floats).
    ``interval`` (lo, hi): guide only for lo <= sigma <= hi. ``rescale`` phi in [0, 1]: CFG rescale of the
    guided estimate (after either method).
    ``method``: ``cfg`` (the lerp) or ``apg``, with ``apg_eta`` the weight of the update's part parallel to the
    positive estimate and ``apg_threshold`` r the largest norm of the update (None: no cap).
    """

    scale: float | tuple[float, ...] = 1.0
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    method: str = "cfg"
    apg_eta: float = 0.0
    apg_threshold: float | None = None

    def __post_init__(self):
        scale = self.scale
        if isinstance(scale, torch.Tensor):
            if scale.ndim > 1:
                raise ValueError(f"per-sample guidance scales must be 1-D, got shape {tuple(scale.shape)}")
            scale = scale.tolist()
        scale = tuple(float(s) for s in scale) if isinstance(scale, Sequence) else float(scale)
        object.__setattr__(self, "scale", scale)
        if scale == ():
            raise ValueError("per-sample guidance scales must not be empty")
        if not all(math.isfinite(s) for s in (scale if isinstance(scale, tuple) else (scale,))):
            raise ValueError(f"guidance scales must be finite, got {scale}")
        if self.interval is not None:
            interval = tuple(float(s) for s in self.interval)
            if len(interval) != 2 or not 0 <= interval[0] < interval[1]:
                raise ValueError(f"guidance interval must be (lo, hi) with 0 <= lo < hi, got {self.interval}")
            object.__setattr__(self, "interval", interval)
        if not 0 <= self.rescale <= 1:
            raise ValueError(f"guidance rescale must be in [0, 1], got {self.rescale}")
        if self.method not in METHODS:
            raise ValueError(f"unknown guidance method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not 0 <= self.apg_eta <= 1:
            raise ValueError(f"apg_eta must be in [0, 1], got {self.apg_eta}")
        if self.apg_threshold is not None and not self.apg_threshold > 0:
            raise ValueError(f"apg_threshold must be positive or None, got {self.apg_threshold}")
        if self.method != "apg" and (self.apg_eta != 0 or self.apg_threshold is not None):
            raise ValueError("apg_eta and apg_threshold need method='apg'")


def guided(
    denoiser: Denoiser,
    config: GuidanceConfig | float | Sequence[float] | torch.Tensor,
    *,
    negative: dict | None = None,
) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans 2022): ``lerp(D(x | negative), D(x | cond), w)``, one batched pass.

    The negative branch is :func:`~difflab.conditioning.null_condition` of the call's conditioning, with the
    entries of ``negative`` (e.g. a negative prompt's ``text``/``text_mask``; tensors of batch 1 broadcast)
    replacing its own. Other entries (concatenated channels, masks) reach both branches unchanged. Where no
    sample needs guidance (w = 1, or sigma outside the interval) the denoiser is called once on the plain batch.
    """
    config = _config(config)

    def guided_denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        weight = _weight(config, sigma, x.dtype)
        if bool((weight == 1).all()):
            return denoiser(x, sigma, **cond)
        cond, uncond = _branches(cond, negative, x.shape[0])
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **_stack(cond, uncond, x.shape[0]))
        positive, negative_estimate = both.chunk(2)
        return _combine(x, sigma, positive, negative_estimate, weight, config)

    return guided_denoiser


def autoguided(
    denoiser: Denoiser, weak_denoiser: Denoiser, config: GuidanceConfig | float | Sequence[float] | torch.Tensor
) -> Denoiser:
    """Autoguidance (Karras et al. 2024): ``lerp(D_weak(x), D(x), w)``, both given the call's conditioning."""
    config = _config(config)

    def autoguided_denoiser(x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        weight = _weight(config, sigma, x.dtype)
        positive = denoiser(x, sigma, **cond)
        if bool((weight == 1).all()):
            return positive
        return _combine(x, sigma, positive, weak_denoiser(x, sigma, **cond), weight, config)

    return autoguided_denoiser


def _config(config: GuidanceConfig | float | Sequence[float] | torch.Tensor) -> GuidanceConfig:
    return config if isinstance(config, GuidanceConfig) else GuidanceConfig(scale=config)


def _weight(config: GuidanceConfig, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-sample guidance weight (B,): the scale inside the guidance interval, 1 (no guidance) outside it."""
    batch = sigma.shape[0]
    if isinstance(config.scale, tuple) and len(config.scale) != batch:
        raise ValueError(f"got {len(config.scale)} guidance scales for a batch of {batch}")
    dtype = torch.promote_types(dtype, torch.float32)
    weight = torch.as_tensor(config.scale, dtype=dtype, device=sigma.device).expand(batch)
    if config.interval is not None:
        lo, hi = config.interval
        weight = torch.where((sigma >= lo) & (sigma <= hi), weight, 1.0)
    return weight


def _branches(cond: dict, negative: dict | None, batch: int) -> tuple[dict, dict]:
    """The conditional and the negative conditioning dicts, with the same keys."""
    cond = _with_text_mask(cond)
    uncond = null_condition(cond)
    for key, value in _with_text_mask(negative or {}).items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == 1:
            value = value.expand(batch, *value.shape[1:])
        uncond[key] = value
    return cond, uncond


def _with_text_mask(cond: dict) -> dict:
    """Make a missing ``text_mask`` explicit: every token is real (ConditionEmbedding's default).

    The null condition sets a mask, so without this the branches would differ in keys, and a negative prompt
    given without its mask would keep the null (all False) one.
    """
    if cond.get("text") is None or cond.get("text_mask") is not None:
        return cond
    text = cond["text"]
    return {**cond, "text_mask": torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)}


def _stack(cond: dict, uncond: dict, batch: int) -> dict:
    """One conditioning dict for the batch ``[cond; uncond]``: batch-aligned tensors are concatenated."""
    if cond.keys() != uncond.keys():
        raise ValueError(f"the negative condition has keys {sorted(uncond)}, the condition {sorted(cond)}")
    stacked = {}
    for key, value in cond.items():
        other = uncond[key]
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            if not isinstance(other, torch.Tensor) or other.shape != value.shape:
                raise ValueError(f"negative {key!r} must have shape {tuple(value.shape)} (or batch 1)")
            stacked[key] = torch.cat([value, other])
        elif other is value:
            stacked[key] = value
        else:
            raise ValueError(f"conditioning {key!r} is not batch-aligned, so both branches must share it")
    return stacked


def _combine(
    x: torch.Tensor,
    sigma: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    weight: torch.Tensor,
    config: GuidanceConfig,
) -> torch.Tensor:
    """The guided x0 estimate, computed in at least float32 and returned in the denoiser's dtype."""
    dtype = torch.promote_types(positive.dtype, torch.float32)
    pos, neg = positive.to(dtype), negative.to(dtype)
    w = rows(weight, pos)
    if config.method == "apg":
        out = pos + (w - 1) * _apg_update(pos - neg, pos, config)
    else:
        out = torch.lerp(neg, pos, w)
    if config.rescale:
        # CFG rescale on u = x / (1 + sigma^2) - D, proportional to v (module docstring).
        x = x.to(dtype)
        anchor = x / (1 + rows(sigma, x).square())
        u_pos, u = anchor - pos, anchor - out
        ratio = rows(u_pos.flatten(1).std(1) / u.flatten(1).std(1), x)
        out = out + config.rescale * (1 - ratio) * u
    return out.to(positive.dtype)


def _apg_update(update: torch.Tensor, positive: torch.Tensor, config: GuidanceConfig) -> torch.Tensor:
    """APG's update (Sadat et al. 2024): norm capped at r, then the part parallel to ``positive`` times eta."""
    if config.apg_threshold is not None:
        norm = rows(update.flatten(1).norm(dim=1), update)
        update = update * (config.apg_threshold / norm).clamp(max=1)
    direction = torch.nn.functional.normalize(positive.flatten(1), dim=1).view_as(positive)
    parallel = rows((update * direction).flatten(1).sum(1), update) * direction
    return update - parallel + config.apg_eta * parallel
