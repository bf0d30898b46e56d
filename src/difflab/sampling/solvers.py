"""Solvers: pure functions ``solver(denoiser, x, sigmas, *, generator=None, callback=None, **cond) -> x0``.

``x`` is already scaled by ``sigmas[0]``; ``sigmas`` is 1-D and decreasing, usually ending in 0. A
solver calls ``denoiser(x, sigma (B,), **cond)`` once per function evaluation (NFE) with the whole batch,
never at sigma = 0: a step into sigma = 0 returns the denoiser's last estimate (the Tweedie step, as
EDM's and DPM-Solver's samplers do; k-diffusion's lms and the peers' ipndm instead extrapolate their
multistep formula into 0, the only place where difflab's results differ from theirs). Step
coefficients are computed in float64 Python floats; sigma reaches the denoiser in at least float32.

Notation: ``d = (x - D(x; sigma)) / sigma`` is the probability-flow ODE's slope dx/dsigma (EDM, Eq. 3),
``lambda = -log sigma`` the half log-SNR, and ``h = lambda_next - lambda`` a step in it.
``generator`` is a ``torch.Generator`` or a list with one per sample, so a sample's noise does not
depend on the batch it is drawn in. ``callback(info)`` receives a dict per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

Denoiser = Callable[..., torch.Tensor]
Generator = torch.Generator | Sequence[torch.Generator] | None


def _nfe(count: Callable[[int], int]):
    """Attach ``solver.nfe(steps)``: the number of denoiser calls for ``steps`` steps ending at sigma = 0."""

    def attach(fn):
        fn.nfe = count
        return fn

    return attach


def _sigmas(sigmas: torch.Tensor) -> list[float]:
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s[:-1] <= 0).any() or (s[-1] < 0):
        raise ValueError("sigmas must be finite and positive (only the last may be 0)")
    if (s[1:] >= s[:-1]).any():
        raise ValueError("sigmas must be strictly decreasing")
    return s.tolist()


def _check_order(order: int) -> None:
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")


def in_chunks(solve: Callable[..., torch.Tensor], x: torch.Tensor, elements: int = 2**17, **cond) -> torch.Tensor:
    """``solve(x, **cond)`` on consecutive chunks of about ``elements`` values of ``x``, concatenated, on a CPU.

    For a solve that treats each sample on its own (every deterministic solver), the result is the full-batch
    one, several times sooner for large batches (6x for an RK4 solve of 32,768 256-D samples), whose full-size
    temporaries do not fit the caches. Conditioning tensors with one row per sample are split with ``x``; other
    ``cond`` values pass as they are. On other devices, where large batches are what keeps them busy, it is
    ``solve(x, **cond)``.
    """
    rows = max(1, elements // max(1, x[0].numel())) if len(x) else 1
    if x.device.type != "cpu" or len(x) <= rows:
        return solve(x, **cond)
    parts = []
    for start in range(0, len(x), rows):
        part = {k: v[start:start + rows] if torch.is_tensor(v) and v.ndim and len(v) == len(x) else v
                for k, v in cond.items()}
        parts.append(solve(x[start:start + rows], **part))
    return torch.cat(parts)


def denoise_at(denoiser: Denoiser, x: torch.Tensor, sigma: float, cond: dict) -> torch.Tensor:
    """The denoiser's estimate for the whole batch at one noise level ``sigma`` (a float)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # a bfloat16 sigma would keep 3 digits
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device), **cond)


def noise_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like x, from one generator or one generator per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


def _report(callback, i: int, x: torch.Tensor, s: list[float], denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": s[i], "sigma_next": s[i + 1], "denoised": denoised})


# --- single-step ODE solvers -------------------------------------------------------------------------


@_nfe(lambda n: n)
def euler(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, **cond):
    """Euler's method on the probability-flow ODE; identical to DDIM (Song et al. 2021; EDM, Alg. 1)."""
    s = _sigmas(sigmas)
    for i in range(len(s) - 1):
        denoised = denoise_at(denoiser, x, s[i], cond)
        _report(callback, i, x, s, denoised)
        x = euler_update(x, denoised, s[i], s[i + 1])
    return x


def euler_update(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """x at ``sigma_next`` from x at ``sigma`` and its estimate: x + (sigma_next - sigma) d. The sigmas are floats
    or per-sample (B,) tensors (distillation steps every sample from its own noise level)."""
    ratio = sigma_next / sigma if isinstance(sigma, float) else rows(sigma_next / sigma, x)
    return denoised + ratio * (x - denoised)


def heun_update(denoiser: Denoiser, x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, cond: dict):
    """x at ``sigma_next`` by Heun's method from x at ``sigma`` and its estimate ``denoised`` (one more call; an
    Euler step into sigma = 0). The sigmas are floats, or per-sample (B,) tensors: the teacher step of
    distillation, where every sample has its own noise level."""
    per_sample = isinstance(sigma, torch.Tensor)
    d = (x - denoised) / (rows(sigma, x) if per_sample else sigma)
    step = rows(sigma_next - sigma, x) if per_sample else sigma_next - sigma
    x_next = x + step * d
    if not per_sample:
        if sigma_next == 0:
            return x_next
        d_next = (x_next - denoise_at(denoiser, x_next, sigma_next, cond)) / sigma_next
        return x + step * (d + d_next) / 2
    last = sigma_next == 0
    if bool(last.all()):
        return x_next
    safe = torch.where(last, sigma, sigma_next)  # never call the denoiser at sigma = 0
    d_next = (x_next - denoiser(x_next, safe, **cond)) / rows(safe, x)
    return torch.where(last.view(-1, *[1] * (x.ndim - 1)), x_next, x + step * (d + d_next) / 2)


def rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ...) broadcastable against ``like``."""
    return values.to(like.dtype).view(-1, *[1] * (like.ndim - 1))


@_nfe(lambda n: 2 * n - 1)
def heun(
    denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0, **cond,
):
    """Heun's 2nd-order method with EDM's optional churn (Karras et al. 2022, Alg. 2).

    With ``s_churn > 0`` each step first raises sigma to ``sigma (1 + gamma)`` by adding fresh noise,
    ``gamma = min(s_churn / steps, sqrt(2) - 1)`` for sigma in [s_tmin, s_tmax]. The step into
    sigma = 0 is an Euler step.
    """
    s = _sigmas(sigmas)
    n = len(s) - 1
    for i in range(n):
        sigma, sigma_next = s[i], s[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise_like(x, generator)
        denoised = denoise_at(denoiser, x, sigma_hat, cond)
        _report(callback, i, x, s, denoised)
        x = denoised if sigma_next == 0 else heun_update(denoiser, x, denoised, sigma_hat, sigma_next, cond)
    return x


@_nfe(lambda n: 2 * n - 1)
def heun_sde(
    denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
    s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.0, **cond,
):
    """EDM's stochastic sampler: :func:`heun` with churn (EDM Table 5's ImageNet-64 S_churn, S_tmin, S_tmax).

    S_noise defaults to 1, not the paper's 1.003, which compensates a network's loss of detail.
    """
    return heun(
        denoiser, x, sigmas, generator=generator, callback=callback,
        s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise, **cond,
    )


@_nfe(lambda n: 2 * n - 1)
def dpm2(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, **cond):
    """2nd-order midpoint method in log-sigma: DPM-Solver-2 (Lu et al. 2022, Alg. 1), k-diffusion's form."""
    s = _sigmas(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise_at(denoiser, x, sigma, cond)
        _report(callback, i, x, s, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_mid = math.sqrt(sigma * sigma_next)
        d = (x - denoised) / sigma
        x_mid = x + (sigma_mid - sigma) * d
        d_mid = (x_mid - denoise_at(denoiser, x_mid, sigma_mid, cond)) / sigma_mid
        x = x + (sigma_next - sigma) * d_mid
    return x


@_nfe(lambda n: 4 * n - 3)
def rk4(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, **cond):
    """Classical 4th-order Runge-Kutta in log-sigma, where the ODE reads dx/dlog(sigma) = x - D(x; sigma).

    Four evaluations a step: too costly for few-step sampling, but the reference-grade integrator
    that tests, benchmarks and the optimised schedule compare against.
    """
    s = _sigmas(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise_at(denoiser, x, sigma, cond)
        _report(callback, i, x, s, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma_next / sigma)
        sigma_mid = math.sqrt(sigma * sigma_next)
        k1 = x - denoised
        x2 = x + h / 2 * k1
        k2 = x2 - denoise_at(denoiser, x2, sigma_mid, cond)
        x3 = x + h / 2 * k2
        k3 = x3 - denoise_at(denoiser, x3, sigma_mid, cond)
        x4 = x + h * k3
        k4 = x4 - denoise_at(denoiser, x4, sigma_next, cond)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


# --- linear multistep solvers on the slope d ---------------------------------------------------------


def _integrate_lagrange(nodes: Sequence[float], j: int, a: float, b: float, log_variable: bool) -> float:
    """int_a^b L_j(v(sigma)) dsigma for the Lagrange basis polynomial L_j over ``nodes`` (in v).

    ``v = sigma`` (linear multistep) or ``v = log sigma`` (DEIS); the latter uses the exact antiderivative
    of P(u) e^u, which is e^u (P - P' + P'' - ...).
    """
    others = [v for k, v in enumerate(nodes) if k != j]
    poly = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
    poly = poly / np.prod([nodes[j] - v for v in others])
    if not log_variable:
        antiderivative = poly.integ()
        return float(antiderivative(b) - antiderivative(a))
    alternating, term = np.polynomial.Polynomial([0.0]), poly
    for k in range(poly.degree() + 1):
        alternating, term = alternating + (-1) ** k * term, term.deriv()
    return float(b * alternating(math.log(b)) - a * alternating(math.log(a)))


def _multistep(
    denoiser: Denoiser, x, sigmas, order: int, log_variable: bool, callback, cond
) -> torch.Tensor:
    """Adams-Bashforth on d with variable steps: extrapolate d by the polynomial through the last
    ``order`` slopes (in sigma or log-sigma) and integrate it exactly over the step."""
    _check_order(order)
    s = _sigmas(sigmas)
    slopes: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        denoised = denoise_at(denoiser, x, s[i], cond)
        _report(callback, i, x, s, denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        slopes = [(x - denoised) / s[i], *slopes][:order]
        nodes = [s[i - k] for k in range(len(slopes))]
        if log_variable:
            nodes = [math.log(v) for v in nodes]
        for j, d in enumerate(slopes):
            x = x + _integrate_lagrange(nodes, j, s[i], s[i + 1], log_variable) * d
    return x


@_nfe(lambda n: n)
def lms(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, order: int = 4, **cond):
    """Linear multistep (Adams-Bashforth, variable step) on d in sigma; k-diffusion's ``lms`` up to the
    last step, which here is the Tweedie step."""
    return _multistep(denoiser, x, sigmas, order, False, callback, cond)


@_nfe(lambda n: n)
def deis(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, order: int = 3, **cond):
    """DEIS with polynomial extrapolation in log-sigma (Zhang & Chen 2023, "log-rho AB-DEIS").

    In the sigma convention the exponential integrator of the noise prediction d is a plain integral
    over sigma, so DEIS differs from :func:`lms` only in the extrapolation variable.
    """
    return _multistep(denoiser, x, sigmas, order, True, callback, cond)


_IPNDM_COEFFICIENTS = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@_nfe(lambda n: n)
def ipndm(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, **cond):
    """Improved PNDM (Zhang & Chen 2023, "DEIS", Sec. 5): 4th-order Adams-Bashforth with fixed coefficients
    and lower-order warm-up, as diffusers' ``IPNDMScheduler`` and k-diffusion's ``ipndm`` (up to the
    last step, which here is the Tweedie step).

    The fixed coefficients assume equal steps in sigma; on such grids it has order 4, on graded grids
    (Karras, log-linear) they cost it accuracy: prefer :func:`lms` or :func:`deis` there.
    """
    s = _sigmas(sigmas)
    slopes: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        denoised = denoise_at(denoiser, x, s[i], cond)
        _report(callback, i, x, s, denoised)
        if s[i + 1] == 0:
            x = denoised
            continue
        slopes = [(x - denoised) / s[i], *slopes][:4]
        coefficients = _IPNDM_COEFFICIENTS[len(slopes) - 1]
        x = x + (s[i + 1] - s[i]) * sum(c * d for c, d in zip(coefficients, slopes))
    return x


# --- exponential integrators on the data prediction (DPM-Solver++, UniPC) ----------------------------


def _dpmpp(denoiser, x, sigmas, order, eta, s_noise, generator, callback, cond):
    """DPM-Solver++ multistep in lambda = -log sigma (Lu et al. 2022b), optionally the SDE form.

    Integrates ``x_next = e^-H x_scaled + int a e^{-a(h-u)} D(u) du`` (a = 1 + eta, H = a h) with D
    expanded to ``order - 1`` derivatives estimated from previous evaluations; eta = 1 adds the
    matching noise (k-diffusion's ``dpmpp_2m_sde``). The second-order term is the midpoint form
    diffusers and k-diffusion use. The third-order term is the exact Taylor coefficient
    (H^2 - 2H + 2 - 2e^-H) / H^2 on d2 = h^2 D'' / 2; diffusers, k-diffusion and the DPM-Solver
    reference code weigh it by half as much, which costs them the third order (see the tests).
    """
    s = _sigmas(sigmas)
    history: list[tuple[torch.Tensor, float]] = []  # (denoised, lambda) of earlier steps, newest first
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise_at(denoiser, x, sigma, cond)
        _report(callback, i, x, s, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        lam, h = -math.log(sigma), math.log(sigma / sigma_next)
        big_h = h * (1 + eta)
        phi_1 = -math.expm1(-big_h)  # 1 - e^-H
        x = (sigma_next / sigma) * math.exp(-eta * h) * x + phi_1 * denoised
        if order >= 2 and history:
            d1_0 = (denoised - history[0][0]) * (h / (lam - history[0][1]))  # h D'(lambda - h_1 / 2)
            if order == 2 or len(history) == 1:
                x = x + 0.5 * phi_1 * d1_0
            else:
                h_1, h_2 = lam - history[0][1], history[0][1] - history[1][1]
                r0, r1 = h_1 / h, h_2 / h
                d1_1 = (history[0][0] - history[1][0]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)  # h D'(lambda)
                d2 = (d1_0 - d1_1) / (r0 + r1)  # h^2 D''(lambda) / 2
                phi_2 = (big_h - phi_1) / big_h
                phi_3 = (big_h**2 - 2 * big_h + 2 * phi_1) / big_h**2
                x = x + phi_2 * d1 + phi_3 * d2
        if eta > 0:
            x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * noise_like(x, generator)
        history = [(denoised, lam), *history][: order - 1]
    return x


@_nfe(lambda n: n)
def dpmpp_2m(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, **cond):
    """DPM-Solver++(2M), 2nd-order multistep on the data prediction (Lu et al. 2022b, Alg. 2)."""
    return _dpmpp(denoiser, x, sigmas, 2, 0.0, 1.0, generator, callback, cond)


@_nfe(lambda n: n)
def dpmpp_3m(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, **cond):
    """DPM-Solver++(3M), 3rd-order multistep on the data prediction (Lu et al. 2022b, App. B)."""
    return _dpmpp(denoiser, x, sigmas, 3, 0.0, 1.0, generator, callback, cond)


@_nfe(lambda n: n)
def dpmpp_2m_sde(
    denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
    eta: float = 1.0, s_noise: float = 1.0, **cond,
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, Sec. 5; k-diffusion's midpoint form)."""
    return _dpmpp(denoiser, x, sigmas, 2, eta, s_noise, generator, callback, cond)


@_nfe(lambda n: n)
def dpmpp_3m_sde(
    denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
    eta: float = 1.0, s_noise: float = 1.0, **cond,
):
    """DPM-Solver++(3M) SDE, the 3rd-order multistep data-prediction SDE solver (Lu et al. 2022b), with
    the exact third-order coefficient (so it differs from k-diffusion's ``dpmpp_3m_sde``)."""
    return _dpmpp(denoiser, x, sigmas, 3, eta, s_noise, generator, callback, cond)


def _unipc_system(rks: list[float], h: float) -> tuple[list[list[float]], list[float], float]:
    """UniPC's linear system R rho = b with B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, Eq. 9).

    ``rks`` are the earlier nodes' lambda offsets divided by h, ending with 1. Returns R, b and B(h).
    """
    hh = -h
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    rows, b = [], []
    for k in range(1, len(rks) + 1):
        rows.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return rows, b, b_h


def _unipc_step(x, m0, earlier, lam0, lam_next, order, m_new=None):
    """One UniP predictor (``m_new`` None) or UniC corrector step from lambda0 to lambda_next.

    ``earlier`` holds (denoised, lambda) of steps before the one at lambda0, newest first.
    """
    h = lam_next - lam0
    rks = [(lam_k - lam0) / h for _, lam_k in earlier[: order - 1]] + [1.0]
    diffs = [(m_k - m0) / r for (m_k, _), r in zip(earlier[: order - 1], rks)]
    rows, b, b_h = _unipc_system(rks, h)
    x = math.exp(-h) * x + (-math.expm1(-h)) * m0
    if m_new is None:  # predictor: uses order - 1 earlier differences
        if not diffs:
            return x
        rhos = [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
        return x - b_h * sum(rho * d for rho, d in zip(rhos, diffs))
    rhos = [0.5] if order == 1 else _solve(rows, b)
    res = sum((rho * d for rho, d in zip(rhos[:-1], diffs)), start=rhos[-1] * (m_new - m0))
    return x - b_h * res


def _solve(rows: list[list[float]], b: list[float]) -> list[float]:
    return np.linalg.solve(np.array(rows, dtype=np.float64), np.array(b, dtype=np.float64)).tolist()


@_nfe(lambda n: n)
def unipc(
    denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
    order: int = 2, corrector: bool = True, **cond,
):
    """UniPC, unified predictor-corrector with B(h) = e^h - 1 ("bh2") (Zhao et al. 2023, Alg. 1-2).

    The corrector UniC reuses the evaluation at each new point, so it raises the order by one at no
    extra NFE. Orders ramp up over the first steps and down over the last, as diffusers does.
    """
    _check_order(order)
    s = _sigmas(sigmas)
    n = len(s) - 1
    history: list[tuple[torch.Tensor, float]] = []  # (denoised, lambda), newest first
    x_prev, order_prev = None, 1
    for i in range(n):
        lam = -math.log(s[i])
        denoised = denoise_at(denoiser, x, s[i], cond)
        _report(callback, i, x, s, denoised)
        if corrector and x_prev is not None:
            m0, lam0 = history[0]
            x = _unipc_step(x_prev, m0, history[1:], lam0, lam, order_prev, m_new=denoised)
        history = [(denoised, lam), *history][:order]
        if s[i + 1] == 0:
            x = denoised
            continue
        order_i = min(order, i + 1, n - i)
        x_prev, order_prev = x, order_i
        x = _unipc_step(x, denoised, history[1:], lam, -math.log(s[i + 1]), order_i)
    return x


# --- ancestral samplers ------------------------------------------------------------------------------


@_nfe(lambda n: n)
def euler_ancestral(
    denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None,
    eta: float = 1.0, s_noise: float = 1.0, **cond,
):
    """Ancestral Euler: a DDIM step down to sigma_down, then fresh noise up to sigma_next (k-diffusion).

    eta = 1 is the DDPM posterior; eta = 0 is :func:`euler` (Song et al. 2021, Eq. 16).
    """
    s = _sigmas(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise_at(denoiser, x, sigma, cond)
        _report(callback, i, x, s, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x = denoised + (sigma_down / sigma) * (x - denoised)
        x = x + sigma_up * s_noise * noise_like(x, generator)
    return x


@_nfe(lambda n: n)
def ddpm(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, **cond):
    """DDPM ancestral sampling from the posterior q(x_s | x_t, x0) (Ho et al. 2020, Eqs. 6-7), in VP form.

    Written in the paper's variables (alphabar, beta); it equals :func:`euler_ancestral` with eta = 1,
    which the tests check as an identity.
    """
    s = _sigmas(sigmas)
    for i in range(len(s) - 1):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = denoise_at(denoiser, x, sigma, cond)
        _report(callback, i, x, s, denoised)
        if sigma_next == 0:
            x = denoised
            continue
        abar_t, abar_s = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        beta = 1 - abar_t / abar_s
        mean = (math.sqrt(abar_s) * beta / (1 - abar_t)) * denoised + (
            math.sqrt(1 - beta) * (1 - abar_s) / (1 - abar_t)
        ) * (x * math.sqrt(abar_t))
        std = math.sqrt((1 - abar_s) / (1 - abar_t) * beta)
        x = (mean + std * noise_like(x, generator)) / math.sqrt(abar_s)
    return x


@_nfe(lambda n: n)
def consistency(denoiser: Denoiser, x, sigmas, *, generator: Generator = None, callback=None, **cond):
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): jump to the estimate of x0, then noise it afresh
    to the next sigma. With a consistency model one step is a sample; any denoiser runs (then it is a coarse
    sampler: each step forgets the last one's noise)."""
    s = _sigmas(sigmas)
    for i in range(len(s) - 1):
        x = denoise_at(denoiser, x, s[i], cond)
        _report(callback, i, x, s, x)
        if s[i + 1] > 0:
            x = x + s[i + 1] * noise_like(x, generator)
    return x


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler,
    "heun": heun,
    "dpm2": dpm2,
    "lms": lms,
    "ipndm": ipndm,
    "deis": deis,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "unipc": unipc,
    "rk4": rk4,
    "euler_ancestral": euler_ancestral,
    "ddpm": ddpm,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "heun_sde": heun_sde,
    "consistency": consistency,
}
STOCHASTIC = frozenset({"euler_ancestral", "ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde", "heun_sde", "consistency"})


def steps_for_nfe(solver: str, nfe: int) -> int:
    """The most steps whose NFE fits the budget (at least one step)."""
    count = SOLVERS[solver].nfe
    steps = 1
    while count(steps + 1) <= nfe:
        steps += 1
    return steps
