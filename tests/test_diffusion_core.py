"""The math core checked against hand-derived closed forms (STYLE.md, 12).

Every identity here is written out independently of ``difflab.diffusion`` (no expected value is computed
with the function under test), in float64 wherever an identity is exact. Tests over a registry iterate its
keys, so a new parameterisation, loss weight or noise-level sampler is covered, or fails loudly for lack
of a hand derivation, without editing this file's parametrisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import pytest
import torch
from torch import nn

from difflab.diffusion import (
    LOSS_WEIGHTS,
    NOISE_LEVELS,
    PARAMETERIZATIONS,
    GaussianMixture,
    LogitNormal,
    LogNormal,
    Precond,
    UniformLogSNR,
    VPSchedule,
    VPUniform,
    alphabar_from_sigma,
    coefficients,
    denoising_loss,
    flow_scale,
    flow_time_from_sigma,
    loss_weight,
    network_target,
    resolution_shift,
    shift_flow_time,
    sigma_from_alphabar,
    sigma_from_flow_time,
    vp_scale,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sigma (B,) -> (B, 1, ..., 1) broadcasting against x."""
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


# ----------------------------------------------------------------------------------------------------
# Hand derivations of every parameterisation (EDM Table 1; Salimans & Ho 2022; Liu et al. 2022).
# With x = x0 + s n:  x_vp = x / sqrt(1 + s^2) = alpha x0 + s' n  (alpha = 1/sqrt(1+s^2), s' = s alpha),
# x_t = x / (1 + s) = (1 - t) x0 + t n  (t = s / (1 + s)).
#   eps : n            -> x0 = x - s n                               c_skip 1,          c_out -s
#   v   : alpha n - s' x0 -> x0 = alpha x_vp - s' v = x/(1+s^2) - s' v   c_skip 1/(1+s^2), c_out -s'
#   x0  : x0                                                         c_skip 0,          c_out 1
#   flow: n - x0       -> x0 = x_t - t u = x/(1+s) - s/(1+s) u       c_skip 1/(1+s),    c_out -s/(1+s)
#   edm : F = (x0 - c_skip x) / c_out, c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2)
# ----------------------------------------------------------------------------------------------------


class Hand(NamedTuple):
    c_skip: Callable  # (s, sd) -> tensor
    c_out: Callable  # (s, sd) -> tensor
    c_in: Callable  # (s, sd) -> tensor
    target: Callable  # (x0, n, s, sd) -> the raw network output that makes D exact
    net_input: Callable  # (x0, n, s, sd) -> what the network sees, written in its own process
    c_noise: Callable  # (s, t) -> c_noise, t = the integer timestep s came from in the default VP table


def _alpha(s):
    return 1 / torch.sqrt(1 + s**2)


def _vp_input(x0, n, s, sd):
    ab = 1 / (1 + s**2)
    return torch.sqrt(ab) * x0 + torch.sqrt(1 - ab) * n


def _vp_c_noise(s, t):
    return t.to(s.dtype)


HAND: dict[str, Hand] = {
    "edm": Hand(
        c_skip=lambda s, sd: sd**2 / (s**2 + sd**2),
        c_out=lambda s, sd: s * sd / torch.sqrt(s**2 + sd**2),
        c_in=lambda s, sd: 1 / torch.sqrt(s**2 + sd**2),
        target=lambda x0, n, s, sd: (
            (x0 - sd**2 / (s**2 + sd**2) * (x0 + s * n)) * torch.sqrt(s**2 + sd**2) / (s * sd)
        ),
        net_input=lambda x0, n, s, sd: (x0 + s * n) / torch.sqrt(s**2 + sd**2),
        c_noise=lambda s, t: torch.log(s) / 4,
    ),
    "eps": Hand(
        c_skip=lambda s, sd: torch.ones_like(s),
        c_out=lambda s, sd: -s,
        c_in=lambda s, sd: _alpha(s),
        target=lambda x0, n, s, sd: n,
        net_input=_vp_input,
        c_noise=_vp_c_noise,
    ),
    "v": Hand(
        c_skip=lambda s, sd: 1 / (1 + s**2),
        c_out=lambda s, sd: -s * _alpha(s),
        c_in=lambda s, sd: _alpha(s),
        target=lambda x0, n, s, sd: _alpha(s) * n - s * _alpha(s) * x0,
        net_input=_vp_input,
        c_noise=_vp_c_noise,
    ),
    "x0": Hand(
        c_skip=lambda s, sd: torch.zeros_like(s),
        c_out=lambda s, sd: torch.ones_like(s),
        c_in=lambda s, sd: _alpha(s),
        target=lambda x0, n, s, sd: x0,
        net_input=_vp_input,
        c_noise=_vp_c_noise,
    ),
    "flow": Hand(
        c_skip=lambda s, sd: 1 / (1 + s),
        c_out=lambda s, sd: -s / (1 + s),
        c_in=lambda s, sd: 1 / (1 + s),
        target=lambda x0, n, s, sd: n - x0,
        net_input=lambda x0, n, s, sd: (1 - s / (1 + s)) * x0 + s / (1 + s) * n,
        c_noise=lambda s, t: s / (1 + s),
    ),
    "consistency": Hand(  # Song et al. 2023, Eq. 7 and Appendix C, with epsilon = 0.002
        c_skip=lambda s, sd: sd**2 / ((s - 0.002) ** 2 + sd**2),
        c_out=lambda s, sd: (s - 0.002) * sd / torch.sqrt(s**2 + sd**2),
        c_in=lambda s, sd: 1 / torch.sqrt(s**2 + sd**2),
        target=lambda x0, n, s, sd: (
            (x0 - sd**2 / ((s - 0.002) ** 2 + sd**2) * (x0 + s * n)) * torch.sqrt(s**2 + sd**2) / ((s - 0.002) * sd)
        ),
        net_input=lambda x0, n, s, sd: (x0 + s * n) / torch.sqrt(s**2 + sd**2),
        c_noise=lambda s, t: torch.log(s) / 4,
    ),
}

SIGMAS = torch.tensor([0.003, 0.02, 0.3, 1.0, 4.0, 80.0], dtype=F64)


def _x0_noise(shape=(6, 2, 3, 3), seed=0):
    g = gen(seed)
    return torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64)


class RecordingNetwork(nn.Module):
    """A fake network ``fn(x_in, c_noise)`` that remembers what Precond fed it."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, x_in, c_noise, **cond):
        self.x_in, self.c_noise, self.cond = x_in, c_noise, cond
        return self.fn(x_in, c_noise)


# ----------------------------------------------------------------------------------------------------
# 1. Conversions between the sigma convention, VP and flow
# ----------------------------------------------------------------------------------------------------

SIGMA_GRID = torch.logspace(-3, 3, 61, dtype=F64)


def test_sigma_alphabar_round_trip():
    """sigma -> alphabar = 1/(1+s^2) -> sigma, and alphabar -> sigma -> alphabar."""
    ab = alphabar_from_sigma(SIGMA_GRID)
    torch.testing.assert_close(ab, 1 / (1 + SIGMA_GRID**2), rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma_from_alphabar(ab), SIGMA_GRID, rtol=1e-9, atol=0)
    table = VPSchedule.from_betas().alphabar
    torch.testing.assert_close(alphabar_from_sigma(sigma_from_alphabar(table)), table, rtol=1e-12, atol=0)


def test_sigma_flow_time_round_trip():
    """sigma -> t = s/(1+s) -> sigma, and t -> sigma = t/(1-t) -> t."""
    t = flow_time_from_sigma(SIGMA_GRID)
    torch.testing.assert_close(t, SIGMA_GRID / (1 + SIGMA_GRID), rtol=1e-14, atol=0)
    torch.testing.assert_close(sigma_from_flow_time(t), SIGMA_GRID, rtol=1e-9, atol=0)
    ts = torch.linspace(0.001, 0.999, 101, dtype=F64)
    torch.testing.assert_close(flow_time_from_sigma(sigma_from_flow_time(ts)), ts, rtol=1e-12, atol=0)


def test_vp_scale_squared_is_alphabar():
    """vp_scale(sigma)^2 = alphabar(sigma) = 1/(1+s^2)."""
    torch.testing.assert_close(vp_scale(SIGMA_GRID) ** 2, 1 / (1 + SIGMA_GRID**2), rtol=1e-13, atol=0)


def test_vp_sample_is_scaled_sigma_sample():
    """sqrt(ab) x0 + sqrt(1-ab) n == vp_scale(sigma) (x0 + sigma n), sigma = sqrt((1-ab)/ab)."""
    ab = VPSchedule.from_betas().alphabar[::37]
    x0, n = _x0_noise((ab.shape[0], 3, 4))
    a = ab.reshape(-1, 1, 1)
    x_vp = a.sqrt() * x0 + (1 - a).sqrt() * n
    s = sigma_from_alphabar(ab).reshape(-1, 1, 1)
    torch.testing.assert_close(vp_scale(s) * (x0 + s * n), x_vp, rtol=1e-10, atol=1e-12)


def test_flow_sample_is_scaled_sigma_sample():
    """(1-t) x0 + t n == flow_scale(sigma) (x0 + sigma n), sigma = t/(1-t)."""
    t = torch.linspace(0.01, 0.99, 25, dtype=F64)
    x0, n = _x0_noise((25, 3, 4))
    tt = t.reshape(-1, 1, 1)
    x_t = (1 - tt) * x0 + tt * n
    s = sigma_from_flow_time(t).reshape(-1, 1, 1)
    torch.testing.assert_close(flow_scale(s) * (x0 + s * n), x_t, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 4.0])
def test_shift_flow_time_scales_sigma(shift):
    """shift_flow_time(t, s) == flow time of s * sigma(t) (SD3 Eq. 23); shift 1 is the identity."""
    t = torch.linspace(0.0, 0.999, 200, dtype=F64)
    sigma = t / (1 - t)
    expected = (shift * sigma) / (1 + shift * sigma)
    torch.testing.assert_close(shift_flow_time(t, shift), expected, rtol=1e-12, atol=1e-15)
    if shift == 1.0:
        torch.testing.assert_close(shift_flow_time(t, shift), t, rtol=0, atol=1e-15)


def test_resolution_shift_values_and_errors():
    """sqrt(m/n): 1024^2 over 256^2 is 4, same size is 1, 128^2 is 0.5; nonpositive counts raise."""
    assert resolution_shift(1024 * 1024) == pytest.approx(4.0, rel=1e-15)
    assert resolution_shift(256 * 256) == pytest.approx(1.0, rel=1e-15)
    assert resolution_shift(128 * 128) == pytest.approx(0.5, rel=1e-15)
    assert resolution_shift(512 * 512, base_pixels=512 * 512) == pytest.approx(1.0, rel=1e-15)
    assert resolution_shift(3 * 5, base_pixels=5) == pytest.approx(math.sqrt(3), rel=1e-15)
    for bad in [dict(num_pixels=0), dict(num_pixels=-4), dict(num_pixels=16, base_pixels=0)]:
        with pytest.raises(ValueError, match="positive"):
            resolution_shift(**bad)


# ----------------------------------------------------------------------------------------------------
# 2. VPSchedule
# ----------------------------------------------------------------------------------------------------


def test_vp_linear_matches_ddpm():
    """'linear': alphabar = cumprod(1 - linspace(1e-4, 0.02, 1000)) (Ho et al. 2020)."""
    s = VPSchedule.from_betas("linear")
    expected = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)
    assert s.alphabar.dtype == F64 and s.num_timesteps == 1000
    torch.testing.assert_close(s.alphabar, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(s.sigmas, ((1 - expected) / expected).sqrt(), rtol=1e-12, atol=0)


def test_vp_scaled_linear_matches_stable_diffusion():
    """'scaled_linear' with SD's betas: betas = linspace(sqrt b0, sqrt b1)^2; sigma range 0.0292..14.6146."""
    s = VPSchedule.from_betas("scaled_linear", beta_start=0.00085, beta_end=0.012)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    torch.testing.assert_close(s.alphabar, torch.cumprod(1 - betas, 0), rtol=1e-14, atol=0)
    assert (s.alphabar.diff() < 0).all() and (s.sigmas.diff() > 0).all()
    # The well-known k-diffusion values for Stable Diffusion v1/v2.
    assert s.sigmas[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert s.sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4)


def test_vp_cosine_matches_improved_ddpm():
    """'cosine': alphabar_t = f(t+1)/f(0), f(u) = cos((u/T + s)/(1 + s) pi/2)^2, betas capped at 0.999."""
    T, s_off = 1000, 0.008
    sched = VPSchedule.from_betas("cosine")
    ab = sched.alphabar
    assert (ab.diff() < 0).all() and (ab > 0).all() and (ab < 1).all()
    betas = torch.cat([1 - ab[:1], 1 - ab[1:] / ab[:-1]])
    assert betas.max().item() <= 0.999 + 1e-12
    assert betas[-1].item() == pytest.approx(0.999, abs=1e-12)  # the cap is what keeps alphabar_T > 0
    u = torch.arange(T + 1, dtype=F64)
    f = torch.cos((u / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
    torch.testing.assert_close(ab[:-1], (f[1:] / f[0])[:-1], rtol=1e-10, atol=0)  # before the cap bites


def test_vp_t_to_sigma_at_integers_is_the_table():
    """t_to_sigma(k) == sigmas[k] at every integer timestep k."""
    s = VPSchedule.from_betas()
    t = torch.arange(1000, dtype=F64)
    torch.testing.assert_close(s.t_to_sigma(t), s.sigmas, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.sigma_to_t(s.sigmas), t, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_vp_fractional_time_round_trip(kind):
    """sigma_to_t(t_to_sigma(t)) == t for fractional t; midpoints are geometric means of neighbours."""
    s = VPSchedule.from_betas(kind)
    t = torch.rand(2000, generator=gen(1), dtype=F64) * 999
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    k = torch.arange(999)
    mid = s.t_to_sigma(k.to(F64) + 0.5)
    torch.testing.assert_close(mid, (s.sigmas[k] * s.sigmas[k + 1]).sqrt(), rtol=1e-12, atol=0)


def test_vp_clamps_outside_the_table():
    """Times below 0 / above T-1 and sigmas outside [sigma_0, sigma_{T-1}] clamp to the ends."""
    s = VPSchedule.from_betas()
    out = s.t_to_sigma(torch.tensor([-5.0, 0.0, 999.0, 2000.0], dtype=F64))
    torch.testing.assert_close(out, s.sigmas[[0, 0, -1, -1]], rtol=1e-12, atol=0)
    t = s.sigma_to_t(torch.tensor([1e-6, s.sigmas[0].item() / 2, s.sigmas[-1].item() * 2, 1e6], dtype=F64))
    torch.testing.assert_close(t, torch.tensor([0.0, 0.0, 999.0, 999.0], dtype=F64), rtol=0, atol=1e-9)


def test_vp_schedule_errors():
    """Unknown beta schedule names itself and the choices; fewer than 2 timesteps raises."""
    with pytest.raises(ValueError, match="'quadratic'") as info:
        VPSchedule.from_betas("quadratic")
    for name in ("linear", "scaled_linear", "cosine"):
        assert name in str(info.value)
    with pytest.raises(ValueError):
        VPSchedule.from_betas(num_timesteps=1)


def test_vp_small_table():
    """A 50-step table still round-trips and has the DDPM alphabar."""
    s = VPSchedule.from_betas(num_timesteps=50)
    torch.testing.assert_close(s.alphabar, torch.cumprod(1 - torch.linspace(1e-4, 0.02, 50, dtype=F64), 0))
    t = torch.linspace(0, 49, 97, dtype=F64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------------------------------
# 3. Preconditioning
# ----------------------------------------------------------------------------------------------------


def test_every_parameterization_has_a_hand_derivation():
    """A new PARAMETERIZATIONS entry must come with its hand-derived coefficients and target here."""
    missing = set(PARAMETERIZATIONS) - set(HAND)
    assert not missing, f"add hand derivations for {missing}"


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
def test_coefficients_match_hand_table(name, sigma_data):
    """c_skip, c_out, c_in equal the hand-derived table (module docstring / EDM Table 1)."""
    c = coefficients(name, SIGMAS, sigma_data)
    h = HAND[name]
    torch.testing.assert_close(c.c_skip, h.c_skip(SIGMAS, sigma_data), rtol=1e-12, atol=0)
    torch.testing.assert_close(c.c_out, h.c_out(SIGMAS, sigma_data), rtol=1e-12, atol=0)
    torch.testing.assert_close(c.c_in, h.c_in(SIGMAS, sigma_data), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_network_target_matches_hand_derivation(name):
    """network_target: eps -> n, v -> alpha n - s' x0, x0 -> x0, flow -> n - x0, edm -> (x0-c_skip x)/c_out"""
    x0, n = _x0_noise()
    s = per_sample(SIGMAS, x0)
    expected = HAND[name].target(x0, n, s, 0.5)
    torch.testing.assert_close(network_target(name, x0, n, SIGMAS), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_network_target_reconstructs_any_denoiser(name):
    """c_skip x + c_out F* == D for F* = network_target(D, (x - D)/sigma): the target makes D exact."""
    d, n = _x0_noise(seed=3)
    x = d + per_sample(SIGMAS, d) * n
    f_star = network_target(name, d, (x - d) / per_sample(SIGMAS, d), SIGMAS, 0.5)
    c = coefficients(name, per_sample(SIGMAS, d), 0.5)
    torch.testing.assert_close(c.c_skip * x + c.c_out * f_star, d, rtol=1e-10, atol=1e-10)


def _mixture_setup(seed=0):
    mix = GaussianMixture.random(dim=4, components=5, std=0.2, seed=seed, sample_shape=(1, 2, 2))
    sigma = torch.tensor([0.01, 0.2, 1.0, 3.0, 40.0], dtype=F64)
    x0 = mix.sample(5, generator=gen(seed))
    x = x0 + per_sample(sigma, x0) * torch.randn(x0.shape, generator=gen(seed + 1), dtype=F64)
    return mix, sigma, x


def _optimal_network(name, mix, sigma, sigma_data, target):
    """The network whose output makes Precond exact: undo c_in (sigma is known here), denoise, encode."""

    def fn(x_in, c_noise):
        s = per_sample(sigma, x_in)
        x = x_in / HAND[name].c_in(s, sigma_data)
        d = mix(x, sigma)
        return target(d, (x - d) / s, s)

    return RecordingNetwork(fn)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_precond_with_optimal_network_is_the_exact_denoiser(name):
    """Precond(F*) == D_true for the GMM posterior mean, F* = network_target of D_true; input = c_in x."""
    sigma_data = 0.7
    mix, sigma, x = _mixture_setup()
    target = lambda d, n, s: network_target(name, d, n, sigma, sigma_data)  # noqa: E731
    net = _optimal_network(name, mix, sigma, sigma_data, target)
    out = Precond(net, name, sigma_data=sigma_data)(x, sigma)
    torch.testing.assert_close(out, mix(x, sigma), rtol=0, atol=1e-6)
    c_in = HAND[name].c_in(per_sample(sigma, x), sigma_data)
    torch.testing.assert_close(net.x_in, c_in * x, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_precond_with_hand_derived_optimal_network(name):
    """A network outputting the textbook target (n, v, x0, n - x0, EDM F) of D_true gives D_true back."""
    sigma_data = 0.5
    mix, sigma, x = _mixture_setup(seed=2)
    target = lambda d, n, s: HAND[name].target(d, n, s, sigma_data)  # noqa: E731
    net = _optimal_network(name, mix, sigma, sigma_data, target)
    out = Precond(net, name, sigma_data=sigma_data)(x, sigma)
    torch.testing.assert_close(out, mix(x, sigma), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_network_sees_its_own_process(name):
    """eps/v/x0 nets see x_vp = sqrt(ab) x0 + sqrt(1-ab) n = x/sqrt(1+s^2); flow nets x_t = (1-t) x0 + t n."""
    x0, n = _x0_noise(seed=4)
    s = per_sample(SIGMAS, x0)
    net = RecordingNetwork(lambda x_in, c_noise: torch.zeros_like(x_in))
    Precond(net, name)(x0 + s * n, SIGMAS)
    torch.testing.assert_close(net.x_in, HAND[name].net_input(x0, n, s, 0.5), rtol=1e-10, atol=1e-12)
    if name in ("eps", "v", "x0"):
        torch.testing.assert_close(net.x_in, (x0 + s * n) / torch.sqrt(1 + s**2), rtol=1e-12, atol=0)
    if name == "flow":
        torch.testing.assert_close(net.x_in, (x0 + s * n) / (1 + s), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_precond_default_c_noise(name, dtype):
    """edm: ln(sigma)/4; flow: t = s/(1+s); eps/v/x0: the default linear table's timestep."""
    table = VPSchedule.from_betas()
    t = torch.tensor([0, 10, 250, 500, 999])
    sigma = table.sigmas[t].to(dtype)
    net = RecordingNetwork(lambda x_in, c_noise: torch.zeros_like(x_in))
    Precond(net, name)(torch.zeros(5, 1, 2, 2, dtype=dtype), sigma)
    expected = HAND[name].c_noise(sigma.to(F64), t).to(F64)
    assert net.c_noise.shape == (5,)
    tol = 1e-9 if dtype == F64 else 1e-4
    torch.testing.assert_close(net.c_noise.to(F64), expected, rtol=tol, atol=tol)


def test_precond_eps_timestep_500():
    """The default eps c_noise maps sigma of the linear table at t=500 (~3.443) to ~500."""
    sigma = VPSchedule.from_betas().sigmas[500]
    assert sigma.item() == pytest.approx(3.443, abs=1e-3)
    net = RecordingNetwork(lambda x_in, c_noise: torch.zeros_like(x_in))
    Precond(net, "eps")(torch.zeros(1, 1, 2, 2), sigma.float().reshape(1))
    assert net.c_noise.item() == pytest.approx(500.0, abs=1e-3)


def test_precond_noise_input_overrides():
    """vp_schedule= changes the table c_noise is read from; noise_input= replaces c_noise entirely."""
    cosine = VPSchedule.from_betas("cosine")
    net = RecordingNetwork(lambda x_in, c_noise: torch.zeros_like(x_in))
    Precond(net, "v", vp_schedule=cosine)(torch.zeros(1, 1, 2, 2, dtype=F64), cosine.sigmas[300].reshape(1))
    assert net.c_noise.item() == pytest.approx(300.0, abs=1e-9)
    sigma = torch.tensor([0.5, 2.0], dtype=F64)
    Precond(net, "edm", noise_input=lambda s: 1000 * s)(torch.zeros(2, 3, dtype=F64), sigma)
    torch.testing.assert_close(net.c_noise, torch.tensor([500.0, 2000.0], dtype=F64))


def test_precond_forwards_conditioning():
    """Keyword conditioning reaches the network untouched."""
    labels = torch.tensor([3, 1])
    net = RecordingNetwork(lambda x_in, c_noise: torch.zeros_like(x_in))
    Precond(net, "edm")(torch.zeros(2, 1, 2, 2), torch.ones(2), class_labels=labels)
    assert net.cond.keys() == {"class_labels"} and net.cond["class_labels"] is labels


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_precond_bfloat16_network_keeps_float32_skip(name):
    """A bfloat16 network output goes through c_skip x + c_out F in float32 (x not rounded to bf16)."""
    g = gen(5)
    x = torch.randn(4, 2, 4, 4, generator=g) * 2
    sigma = torch.tensor([1e-3, 0.05, 1.0, 10.0])
    f = torch.randn(4, 2, 4, 4, generator=g).to(torch.bfloat16)
    net = RecordingNetwork(lambda x_in, c_noise: f)
    out = Precond(net, name)(x, sigma)
    assert out.dtype == torch.float32 and net.x_in.dtype == torch.float32
    s64 = per_sample(sigma.to(F64), x)
    h = HAND[name]
    c_out = h.c_out(s64, 0.5)
    if name == "v":  # compare to what difflab computes for v (its c_out sign is tested above, as a known bug)
        c_out = coefficients("v", s64, 0.5).c_out
    ref = h.c_skip(s64, 0.5) * x.to(F64) + c_out * f.to(F64)
    # bf16 arithmetic on the skip path would err by ~|x| * 2^-8 ~ 1e-2; float32 errs by ~1e-6.
    torch.testing.assert_close(out.to(F64), ref, rtol=0, atol=1e-5)


def test_unknown_parameterization_lists_choices():
    """An unknown name raises ValueError naming it and every registered choice, from each entry point."""
    x = torch.zeros(1, 1, 2, 2)
    calls = [
        lambda: Precond(nn.Identity(), "bogus"),
        lambda: coefficients("bogus", torch.ones(1)),
        lambda: network_target("bogus", x, x, torch.ones(1)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="'bogus'") as info:
            call()
        for name in PARAMETERIZATIONS:
            assert name in str(info.value)


# ----------------------------------------------------------------------------------------------------
# 4. Loss weights and the denoising loss
# ----------------------------------------------------------------------------------------------------

GENERIC_WEIGHTS = {"min_snr", "truncated_snr"}  # weights that belong to no single parameterisation


def test_every_loss_weight_is_covered():
    """Each LOSS_WEIGHTS entry is a parameterisation's weight (tested below) or a known generic one."""
    assert set(LOSS_WEIGHTS) <= set(PARAMETERIZATIONS) | GENERIC_WEIGHTS


PARAM_WEIGHTS = [n for n in LOSS_WEIGHTS if n in PARAMETERIZATIONS]


@pytest.mark.parametrize("name", PARAM_WEIGHTS)
def test_loss_weight_is_network_space_mse(name):
    """lambda(s) (D - x0)^2 == (F - F*)^2 for D = c_skip x + c_out F, F* = network_target (sd = 0.5)."""
    x0, n = _x0_noise(seed=6)
    f = torch.randn(x0.shape, generator=gen(7), dtype=F64)
    s = per_sample(SIGMAS, x0)
    c = coefficients(name, s, 0.5)
    d = c.c_skip * (x0 + s * n) + c.c_out * f
    lhs = per_sample(loss_weight(name, SIGMAS, sigma_data=0.5), x0) * (d - x0) ** 2
    rhs = (f - network_target(name, x0, n, SIGMAS, 0.5)) ** 2
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", PARAM_WEIGHTS)
def test_loss_weight_matches_hand_derivation(name):
    """With hand c_skip, c_out, targets: lambda(s) ||D - x0||^2 == ||F - F*||^2, i.e. lambda = 1/c_out^2."""
    x0, n = _x0_noise(seed=8)
    f = torch.randn(x0.shape, generator=gen(9), dtype=F64)
    s = per_sample(SIGMAS, x0)
    h = HAND[name]
    d = h.c_skip(s, 0.5) * (x0 + s * n) + h.c_out(s, 0.5) * f
    lhs = per_sample(loss_weight(name, SIGMAS, sigma_data=0.5), x0) * (d - x0) ** 2
    torch.testing.assert_close(lhs, (f - h.target(x0, n, s, 0.5)) ** 2, rtol=1e-9, atol=1e-12)
    weight = loss_weight(name, SIGMAS, sigma_data=0.5)
    torch.testing.assert_close(weight, h.c_out(SIGMAS, 0.5) ** -2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", PARAM_WEIGHTS)
def test_denoising_loss_through_precond_is_network_mse(name):
    """denoising_loss(Precond(F), weight=lambda) == per-sample mean (F - F*)^2, shape (B,)."""
    x0, n = _x0_noise(seed=10)
    sigma = torch.tensor([0.05, 0.2, 0.7, 1.5, 6.0, 20.0], dtype=F64)
    f = torch.randn(x0.shape, generator=gen(11), dtype=F64)
    denoiser = Precond(RecordingNetwork(lambda x_in, c_noise: f), name)
    loss = denoising_loss(denoiser, x0, sigma, loss_weight(name, sigma), noise=n)
    assert loss.shape == (6,)
    expected = (f - network_target(name, x0, n, sigma)).square().flatten(1).mean(1)
    torch.testing.assert_close(loss.to(F64), expected, rtol=1e-4, atol=1e-6)  # the loss is taken in float32


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight(gamma):
    """min_snr = min(1/sigma^2, gamma) (Hang et al. 2023)."""
    expected = torch.minimum(1 / SIGMA_GRID**2, torch.full_like(SIGMA_GRID, gamma))
    torch.testing.assert_close(loss_weight("min_snr", SIGMA_GRID, gamma=gamma), expected, rtol=1e-14, atol=0)


def test_truncated_snr_weight():
    """truncated_snr = max(SNR, 1) with SNR = 1/sigma^2 (Salimans & Ho 2022, Sec. 4): 1 above sigma = 1."""
    expected = torch.maximum(1 / SIGMA_GRID**2, torch.ones_like(SIGMA_GRID))
    torch.testing.assert_close(loss_weight("truncated_snr", SIGMA_GRID), expected, rtol=1e-14, atol=0)


def test_denoising_loss_zero_for_exact_denoiser():
    """The denoiser that returns the clean batch has zero loss, per sample, with conditioning passed on."""
    x0 = torch.randn(4, 3, 5, 5, generator=gen(12))
    sigma = torch.tensor([0.1, 1.0, 5.0, 50.0])
    seen = {}

    def exact(x, s, **cond):
        seen.update(cond)
        return x0

    weight = loss_weight("edm", sigma)
    loss = denoising_loss(exact, x0, sigma, weight, generator=gen(0), class_labels=torch.arange(4))
    assert loss.shape == (4,)
    assert torch.equal(loss, torch.zeros(4))
    assert "class_labels" in seen


def test_denoising_loss_values_and_noise():
    """lambda * mean (D - x0)^2 per sample; the noise fed in is x - x0 over sigma; generators reproduce it."""
    x0 = torch.randn(3, 2, 4, dtype=F64, generator=gen(13))
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    weight = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    noises = []

    def identity(x, s):
        noises.append((x - x0) / s.reshape(-1, 1, 1))
        return x

    a = denoising_loss(identity, x0, sigma, weight, generator=gen(1))
    b = denoising_loss(identity, x0, sigma, weight, generator=gen(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    n = noises[0]
    expected = weight * (sigma.reshape(-1, 1, 1) * n).square().flatten(1).mean(1)
    torch.testing.assert_close(a.to(F64), expected, rtol=1e-6, atol=0)


def test_unknown_loss_weight():
    """An unknown weight raises ValueError naming it and listing the choices."""
    with pytest.raises(ValueError, match="'bogus'") as info:
        loss_weight("bogus", torch.ones(2))
    for name in LOSS_WEIGHTS:
        assert name in str(info.value)


# ----------------------------------------------------------------------------------------------------
# 5. Training noise levels
# ----------------------------------------------------------------------------------------------------

N_DRAWS = 200_000


@pytest.mark.parametrize("p_mean,p_std", [(-1.2, 1.2), (0.4, 0.7)])
def test_lognormal(p_mean, p_std):
    """ln(sigma) ~ N(p_mean, p_std^2)."""
    log_s = LogNormal(p_mean, p_std)(N_DRAWS, generator=gen(0)).to(F64).log()
    assert abs(log_s.mean().item() - p_mean) < 0.02
    assert abs(log_s.std().item() - p_std) < 0.02


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.8)])
def test_logit_normal(mean, std):
    """logit(t) ~ N(mean, std^2) with t = sigma / (1 + sigma)."""
    t = flow_time_from_sigma(LogitNormal(mean, std)(N_DRAWS, generator=gen(1)).to(F64))
    logit = t.log() - (-t).log1p()
    assert abs(logit.mean().item() - mean) < 0.02
    assert abs(logit.std().item() - std) < 0.02
    assert ((t > 0) & (t < 1)).all()


def test_vp_uniform_draws_table_values_uniformly():
    """Every sigma is a table value and each timestep is drawn ~1/T of the time."""
    sched = VPSchedule.from_betas(num_timesteps=50)
    sigma = VPUniform(sched)(N_DRAWS, generator=gen(2))
    table = sched.sigmas.float()
    match = sigma[:, None] == table[None, :]
    assert match.any(1).all()
    counts = match.sum(0).to(F64)
    expected = N_DRAWS / 50  # 4000, binomial std ~62
    assert (counts - expected).abs().max().item() < 0.08 * expected
    full = VPUniform()(10_000, generator=gen(3))
    assert torch.isin(full, VPSchedule.from_betas().sigmas.float()).all()


def test_uniform_logsnr():
    """ln(sigma) ~ U[ln sigma_min, ln sigma_max]: bounds respected and reached, mean and std of a uniform."""
    lo, hi = 0.01, 50.0
    log_s = UniformLogSNR(lo, hi)(N_DRAWS, generator=gen(4)).to(F64).log()
    a, b = math.log(lo), math.log(hi)
    assert log_s.min().item() >= a - 1e-6 and log_s.max().item() <= b + 1e-6
    assert log_s.min().item() < a + 0.01 and log_s.max().item() > b - 0.01
    assert abs(log_s.mean().item() - (a + b) / 2) < 0.02
    assert abs(log_s.std().item() - (b - a) / math.sqrt(12)) < 0.02


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0), (1.0, 1.0)])
def test_uniform_logsnr_bad_bounds(lo, hi):
    """Bounds must satisfy 0 < sigma_min < sigma_max."""
    with pytest.raises(ValueError):
        UniformLogSNR(lo, hi)


@pytest.mark.parametrize("name", list(NOISE_LEVELS))
def test_noise_levels_reproducible(name):
    """Same generator seed -> same draws; another seed -> other draws; shape (B,), positive and finite."""
    sampler = NOISE_LEVELS[name]()
    a = sampler(64, generator=gen(7))
    b = sampler(64, generator=gen(7))
    c = sampler(64, generator=gen(8))
    assert a.shape == (64,) and torch.isfinite(a).all() and (a > 0).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------
# 6. GaussianMixture, the exact denoiser
# ----------------------------------------------------------------------------------------------------


def _two_component_1d():
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731 (float64 literals: 0.3 in float32 is not 0.3)
    return GaussianMixture(t([[-1.0], [0.8]]), t([0.3, 0.5]), t([0.3, 0.7]))


@pytest.mark.parametrize("sigma", [0.05, 0.4, 1.5, 6.0])
def test_gmm_denoiser_matches_numerical_posterior_mean(sigma):
    """D(x) = int x0 p(x0) N(x; x0, s^2) dx0 / int p(x0) N(x; x0, s^2) dx0, integrated on a fine grid."""
    mix = _two_component_1d()
    x = torch.linspace(-3, 3, 13, dtype=F64)
    grid = torch.linspace(-12, 12, 120_001, dtype=F64)  # spacing 2e-4
    h = grid[1] - grid[0]
    mu, sd = torch.tensor([[-1.0], [0.8]], dtype=F64), torch.tensor([[0.3], [0.5]], dtype=F64)  # (K, 1)
    w = torch.tensor([[0.3], [0.7]], dtype=F64)

    def normal_pdf(u, m, s):
        return torch.exp(-0.5 * ((u - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    prior = (w * normal_pdf(grid[None], mu, sd)).sum(0)  # (G,)
    lik = normal_pdf(x[:, None], grid[None], sigma)  # (13, G)
    joint = prior[None] * lik
    evidence = joint.sum(1) * h
    posterior_mean = (joint * grid[None]).sum(1) * h / evidence
    out = mix(x[:, None], torch.full((13,), sigma, dtype=F64))[:, 0]
    torch.testing.assert_close(out, posterior_mean, rtol=0, atol=1e-8)
    torch.testing.assert_close(mix.log_prob(x[:, None], sigma), evidence.log(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_gmm_tweedie(sigma):
    """Tweedie: D(x, s) = x + s^2 grad_x log p_s(x), gradient by autograd on log_prob."""
    mix = GaussianMixture.random(dim=3, components=6, seed=1)
    x = (torch.randn(16, 3, generator=gen(5), dtype=F64) * (0.6 + sigma)).requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x, sigma).sum(), x)
    expected = x.detach() + sigma**2 * grad
    out = mix(x.detach(), torch.full((16,), sigma, dtype=F64))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-8)


def test_gmm_samples_match_moments():
    """100k exact samples have the mean and covariance of moments(); sampling is reproducible."""
    mix = GaussianMixture(
        torch.tensor([[-1.0, 0.5], [1.0, 1.0], [0.0, -1.0]], dtype=F64),
        torch.tensor([0.2, 0.4, 0.3], dtype=F64),
        torch.tensor([1.0, 2.0, 3.0], dtype=F64),
    )
    mean, cov = mix.moments()
    # hand moments: sum w mu, sum w (mu - m)(mu - m)^T + sum w s^2 I
    w = torch.tensor([1.0, 2.0, 3.0], dtype=F64) / 6
    mu = mix.means
    m = (w[:, None] * mu).sum(0)
    hand_cov = sum(w[k] * torch.outer(mu[k] - m, mu[k] - m) for k in range(3)) + torch.eye(2, dtype=F64) * (
        w * torch.tensor([0.04, 0.16, 0.09], dtype=F64)
    ).sum()
    torch.testing.assert_close(mean, m, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(cov, hand_cov, rtol=1e-14, atol=1e-15)
    x = mix.sample(100_000, generator=gen(6))
    assert x.shape == (100_000, 2) and x.dtype == F64
    assert torch.equal(x[:10], mix.sample(100_000, generator=gen(6))[:10])
    torch.testing.assert_close(x.mean(0), mean, rtol=0, atol=0.015)  # ~5 standard errors
    torch.testing.assert_close(torch.cov(x.T), cov, rtol=0, atol=0.02)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 1e4])
def test_gmm_ring_class_conditional(sigma):
    """Ring (labels = arange(K)): class k's denoiser is (s^2 x + sigma^2 mu_k)/(s^2 + sigma^2)."""
    mix = GaussianMixture.ring(8, radius=1.0, std=0.05)
    k = torch.arange(8)
    x = torch.randn(8, 2, generator=gen(7), dtype=F64) * (1 + sigma)
    s = torch.full((8,), sigma, dtype=F64)
    out = mix(x, s, class_labels=k)
    angle = k.to(F64) * 2 * math.pi / 8
    mu = torch.stack([angle.cos(), angle.sin()], 1)
    expected = (0.05**2 * x + sigma**2 * mu) / (0.05**2 + sigma**2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    if sigma == 1e4:
        torch.testing.assert_close(out, mu, rtol=0, atol=1e-5)


def test_gmm_component():
    """A point near component k's mean belongs to k; at a large sigma the heaviest component wins."""
    mix = GaussianMixture.ring(8, radius=1.0, std=0.05)
    x = mix.means + 0.1 * torch.randn(8, 2, generator=gen(9), dtype=F64)
    assert torch.equal(mix.component(x), torch.arange(8))
    heavy = GaussianMixture(mix.means, 0.05, weights=torch.arange(1.0, 9.0))
    assert torch.equal(heavy.component(x, sigma=1e3), torch.full((8,), 7))
    assert torch.equal(heavy.component(x), torch.arange(8))
    assert mix.component(torch.zeros(0, 2, dtype=F64)).shape == (0,)  # an empty batch


def test_gmm_class_conditional_is_the_sub_mixture():
    """Conditioning on class c equals the denoiser of the mixture of class c's components alone."""
    mix = GaussianMixture.random(dim=4, components=16, seed=3)
    labels = torch.arange(16) % 10
    x = torch.randn(10, 4, generator=gen(8), dtype=F64)
    sigma = torch.linspace(0.05, 2.0, 10, dtype=F64)
    out = mix(x, sigma, class_labels=torch.arange(10))
    for c in range(10):
        keep = labels == c
        sub = GaussianMixture(mix.means[keep], mix.stds[keep], mix.weights[keep])
        ref = sub(x[c : c + 1], sigma[c : c + 1])
        torch.testing.assert_close(out[c : c + 1], ref, rtol=1e-12, atol=1e-12)


def test_gmm_errors():
    """Bad means shape, nonpositive std, bad weights/sample_shape, wrong input shape, bad labels raise."""
    means = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3), 1.0)
    for bad_std in (0.0, -0.1, torch.tensor([0.1, 0.0, 0.2])):
        with pytest.raises(ValueError, match="positive"):
            GaussianMixture(means, bad_std)
    for bad_w in (torch.ones(2), torch.tensor([1.0, -1.0, 1.0])):
        with pytest.raises(ValueError, match="weights"):
            GaussianMixture(means, 0.1, bad_w)
    with pytest.raises(ValueError, match="sample_shape"):
        GaussianMixture(means, 0.1, sample_shape=(1, 3))
    ring = GaussianMixture.ring(4)
    for bad_x in (torch.zeros(2, 3), torch.zeros(2, 1, 2), torch.zeros(2)):
        with pytest.raises(ValueError, match="shape"):
            ring(bad_x, torch.ones(bad_x.shape[0]))
    with pytest.raises(ValueError, match="labels"):
        unlabelled = GaussianMixture(means, 0.1)
        unlabelled(torch.zeros(1, 2), torch.ones(1), class_labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="class label"):
        ring(torch.zeros(1, 2), torch.ones(1), class_labels=torch.tensor([7]))


def test_gmm_image_shaped():
    """sample_shape (1, 8, 8): (B, 1, 8, 8) float32 in -> same shape float32 out, equals the flat mixture."""
    mix = GaussianMixture.random(dim=64, components=4, seed=4, sample_shape=(1, 8, 8))
    flat = GaussianMixture(mix.means, mix.stds, mix.weights)
    x = torch.randn(3, 1, 8, 8, generator=gen(9))
    sigma = torch.tensor([0.1, 1.0, 10.0])
    out = mix(x, sigma)
    assert out.shape == x.shape and out.dtype == torch.float32
    ref = flat(x.to(F64).reshape(3, 64), sigma.to(F64)).reshape(3, 1, 8, 8)
    torch.testing.assert_close(out.to(F64), ref, rtol=1e-6, atol=1e-6)
    assert mix.sample(5, generator=gen(0)).shape == (5, 1, 8, 8)


def test_gmm_fingerprint():
    """Identical constructions share a fingerprint; changing one mean changes it."""
    a = GaussianMixture.random(dim=4, components=5, seed=0)
    b = GaussianMixture.random(dim=4, components=5, seed=0)
    assert a.fingerprint() == b.fingerprint()
    means = a.means.clone()
    means[2, 1] += 1e-3
    c = GaussianMixture(means, a.stds, a.weights, labels=a.labels)
    assert c.fingerprint() != a.fingerprint()
    assert GaussianMixture(a.means.clone(), a.stds, a.weights).fingerprint() == a.fingerprint()


def test_fit_recovers_a_well_separated_mixture():
    truth = GaussianMixture(torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]]), torch.tensor([0.2, 0.3, 0.4]),
                            torch.tensor([1.0, 2.0, 1.0]))
    fitted = GaussianMixture.fit(truth.sample(6000, generator=torch.Generator().manual_seed(0)), components=3)
    order = torch.cdist(truth.means, fitted.means).argmin(1)
    torch.testing.assert_close(fitted.means[order], truth.means, atol=0.05, rtol=0)
    torch.testing.assert_close(fitted.stds[order], truth.stds, atol=0.03, rtol=0)
    torch.testing.assert_close(fitted.weights[order], truth.weights, atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="at least 3 samples"):
        GaussianMixture.fit(torch.zeros(2, 2), components=3)
