"""Exponential moving averages of model weights: classic EMA, power-function EMA and post-hoc EMA.

Classic EMA uses the warm-up of TensorFlow's ``tf.train.ExponentialMovingAverage(decay, num_updates)``:
``beta_t = min(decay, (1 + t) / (10 + t))``, so early averages are not dominated by the initialisation.

Power-function EMA and its post-hoc reconstruction follow Karras et al. 2024, "Analyzing and Improving the
Training Dynamics of Diffusion Models" (EDM2), Sec. 3 and App. C; the model is NVlabs/edm2 ``training/phema.py``.
A power EMA with exponent gamma averages theta over [0, t] with the profile p_t(s) = (gamma + 1) s^gamma / t^(gamma+1),
whose relative width is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (Eq. 123). Tracked per optimizer
step with beta_t = (1 - 1/t)^(gamma + 1) (Eq. 127), theta_tau ends up weighted by
(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1): exactly p_t integrated over (tau - 1, tau], so the closed-form
inner products used by post-hoc EMA carry no discretisation error when t counts optimizer steps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "EMA", "gamma_to_sigma_rel", "posthoc_coefficients", "posthoc_ema", "sigma_rel_to_gamma", "unwrapped_state_dict",
]

_GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0  # d sigma_rel / d gamma = 0  <=>  gamma^2 + 3 gamma + 1 = 0
SIGMA_REL_MAX = math.sqrt((_GAMMA_PEAK + 1) / ((_GAMMA_PEAK + 2) ** 2 * (_GAMMA_PEAK + 3)))  # ~0.3003


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power-function EMA profile with exponent gamma (EDM2 Eq. 123)."""
    if gamma <= -1:
        raise ValueError(f"gamma must be > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent gamma of the power-function EMA with relative width sigma_rel (EDM2 Eq. 126, bisection)."""
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must lie in (0, {SIGMA_REL_MAX:.4f}), got {sigma_rel}")
    # sigma_rel(gamma) rises on (-1, gamma_peak) and falls on (gamma_peak, inf); EDM2 takes the larger root
    # of the cubic gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0, i.e. the falling branch.
    lo, hi = _GAMMA_PEAK, 1.0
    while gamma_to_sigma_rel(hi) > sigma_rel:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if gamma_to_sigma_rel(mid) > sigma_rel else (lo, mid)
    return 0.5 * (lo + hi)


def unwrapped_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` keyed as the bare model: drops torch.compile's "_orig_mod" and DDP's leading "module"."""
    items = [(".".join(p for p in k.split(".") if p != "_orig_mod"), v) for k, v in model.state_dict().items()]
    if items and all(k.startswith("module.") for k, _ in items):  # DistributedDataParallel / DataParallel
        items = [(k[len("module."):], v) for k, v in items]
    return dict(items)


class EMA:
    """Several weight averages of one model behind update / state_dict / load_state_dict (EDM2 ``phema.py``).

    ``decays`` are classic EMAs with TensorFlow's warm-up; ``sigma_rels`` are EDM2 power-function EMAs.
    Averages are float32 copies of the floating-point parameters and buffers; other buffers are copied as-is.
    """

    def __init__(self, model: nn.Module, decays: Sequence[float] = (), sigma_rels: Sequence[float] = ()) -> None:
        self.decays = {f"ema-{float(d)!r}": float(d) for d in decays}
        self.gammas = {f"phema-{float(s):.3f}": sigma_rel_to_gamma(float(s)) for s in sigma_rels}
        if len(self.decays) + len(self.gammas) != len(decays) + len(sigma_rels):
            raise ValueError(f"EMA names collide: decays={list(decays)}, sigma_rels={list(sigma_rels)}")
        if any(not 0 <= d <= 1 for d in self.decays.values()):
            raise ValueError(f"decays must lie in [0, 1], got {list(decays)}")
        source = unwrapped_state_dict(model)
        self._float_keys = [k for k, v in source.items() if v.is_floating_point()]
        self._other_keys = [k for k, v in source.items() if not v.is_floating_point()]
        self._keys = set(source)
        self._averages = {name: _copy_state(source) for name in self.names}

    @property
    def names(self) -> list[str]:
        """Names of the averages, e.g. ["ema-0.999", "phema-0.050"]."""
        return [*self.decays, *self.gammas]

    def betas(self, step: int) -> dict[str, float]:
        """Decay beta_t each average applies at optimizer step ``step`` (counted from 1)."""
        if step < 1:
            raise ValueError(f"step counts optimizer steps done and starts at 1, got {step}")
        warmup = (1 + step) / (10 + step)
        classic = {name: min(decay, warmup) for name, decay in self.decays.items()}
        power = {name: (1 - 1 / step) ** (gamma + 1) for name, gamma in self.gammas.items()}  # EDM2 Eq. 127
        return classic | power

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the model's current weights into every average; call after optimizer step number ``step``."""
        source = unwrapped_state_dict(model)
        if source.keys() != self._keys:
            raise KeyError(f"model keys differ from the EMA's: {sorted(source.keys() ^ self._keys)[:5]}")
        current = [source[k] if source[k].dtype == torch.float32 else source[k].float() for k in self._float_keys]
        for name, beta in self.betas(step).items():
            average = self._averages[name]
            if current:
                torch._foreach_lerp_([average[k] for k in self._float_keys], current, 1.0 - beta)
            for k in self._other_keys:
                average[k].copy_(source[k])

    def average(self, name: str) -> dict[str, Tensor]:
        """State dict of one average, loadable with ``model.load_state_dict`` (tensors are shared, not copied)."""
        return dict(self._averages[name])

    def averages(self) -> dict[str, dict[str, Tensor]]:
        """All averages by name."""
        return {name: self.average(name) for name in self.names}

    def state_dict(self) -> dict[str, Tensor]:
        """Flat ``{"<name>/<key>": tensor}`` for safetensors; the step is not stored (``update`` receives it)."""
        return {f"{name}/{k}": v for name, average in self._averages.items() for k, v in average.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy a flat dict from :meth:`state_dict` into the averages; keys and shapes must match exactly."""
        own = self.state_dict()
        missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
        with torch.no_grad():
            for key, target in own.items():
                if state[key].shape != target.shape:  # copy_ would broadcast silently
                    raise ValueError(f"{key}: shape {tuple(state[key].shape)} != {tuple(target.shape)}")
                target.copy_(state[key])


def _copy_state(source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous float32 copies of floating tensors (safetensors needs contiguous, unshared tensors), others cloned."""
    return {
        k: v.detach().to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        if v.is_floating_point() else v.detach().clone(memory_format=torch.contiguous_format)
        for k, v in source.items()
    }


def _profile_inner_product(t_a: Tensor, gamma_a: Tensor, t_b: Tensor, gamma_b: Tensor) -> Tensor:
    """<p_a, p_b> of two power-function profiles ending at t_a, t_b (EDM2 Eq. 151, Algorithm 3).

    For t_a <= t_b: integral_0^t_a (g_a+1) s^g_a / t_a^(g_a+1) * (g_b+1) s^g_b / t_b^(g_b+1) ds
    = (g_a+1)(g_b+1) / (g_a+g_b+1) * (t_a/t_b)^g_b / t_b.
    """
    early, late = torch.minimum(t_a, t_b), torch.maximum(t_a, t_b)
    gamma_late = torch.where(t_a <= t_b, gamma_b, gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1) * (early / late) ** gamma_late / late


def posthoc_coefficients(snapshots_meta: Sequence[tuple[int, float]], sigma_rel: float,
                         step: int | None = None) -> list[float]:
    """Weights x_i with sum_i x_i p_(t_i, gamma_i) ~ p_(step, gamma(sigma_rel)) in L2 (EDM2 App. C.3, Algorithm 3).

    ``snapshots_meta`` holds (step t_i >= 1, gamma_i) per snapshot; ``step`` defaults to the last snapshot's.
    Least squares in float64 (SVD-based, robust when profiles are nearly collinear), then normalised to sum 1.
    """
    t = torch.tensor([float(s) for s, _ in snapshots_meta], dtype=torch.float64)
    gamma = torch.tensor([float(g) for _, g in snapshots_meta], dtype=torch.float64)
    if len(t) == 0 or bool((t < 1).any()) or bool((gamma <= -1).any()):
        raise ValueError("snapshots need steps >= 1 and gamma > -1")
    step = float(t.max()) if step is None else float(step)
    if not 1 <= step <= float(t.max()):
        raise ValueError(f"step {step} outside [1, {float(t.max())}]: snapshots cannot reach later weights")
    target_t = torch.tensor([step], dtype=torch.float64)
    target_gamma = torch.tensor([sigma_rel_to_gamma(sigma_rel)], dtype=torch.float64)
    gram = _profile_inner_product(t[:, None], gamma[:, None], t[None, :], gamma[None, :])  # (N, N)
    rhs = _profile_inner_product(t[:, None], gamma[:, None], target_t[None, :], target_gamma[None, :])  # (N, 1)
    x = torch.linalg.lstsq(gram, rhs, driver="gelsd").solution[:, 0]
    return (x / x.sum()).tolist()


def posthoc_ema(snapshots: Sequence[tuple[int, float, Mapping[str, Tensor]]], sigma_rel: float,
                step: int | None = None) -> dict[str, Tensor]:
    """Weights of a power-function EMA with ``sigma_rel`` at ``step``, from stored (t, gamma, state_dict) snapshots.

    Floating tensors are combined in float64 and returned in the snapshots' dtype; other tensors come from the
    latest snapshot.
    """
    coefficients = posthoc_coefficients([(t, g) for t, g, _ in snapshots], sigma_rel, step)
    latest = max(snapshots, key=lambda s: s[0])[2]
    if any(sd.keys() != latest.keys() for _, _, sd in snapshots):
        raise KeyError("snapshots hold different keys")
    out = {}
    for key, ref in latest.items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for c, (_, _, sd) in zip(coefficients, snapshots, strict=True):
            acc.add_(sd[key].to(acc), alpha=c)
        out[key] = acc.to(ref.dtype)
    return out
