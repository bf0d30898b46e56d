"""Schedules: the registry contract, each schedule's defining formula, and the optimised schedule."""

import json
import math

import pytest
import torch

from difflab.diffusion import GaussianMixture, VPSchedule, flow_time_from_sigma
from difflab.sampling import SCHEDULES, SOLVERS, reference_solution

CLOSED_FORM = sorted(set(SCHEDULES) - {"optimized"})


@pytest.mark.parametrize("name", CLOSED_FORM)
@pytest.mark.parametrize("steps", [1, 2, 10, 37])
def test_schedule_contract(name, steps):
    sigmas = SCHEDULES[name](steps, sigma_min=0.02, sigma_max=80.0)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float64
    assert sigmas[-1] == 0 and (sigmas[:-1] > 0).all() and (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[0].item() == pytest.approx(80.0, rel=1e-9)
    assert sigmas[-2] >= 0.02 * (1 - 1e-9)


@pytest.mark.parametrize("name", CLOSED_FORM)
@pytest.mark.parametrize("kwargs", [dict(steps=0), dict(steps=2.5), dict(sigma_min=0.0),
                                    dict(sigma_min=5, sigma_max=1)])
def test_schedules_reject_bad_input(name, kwargs):
    args = dict(steps=5, sigma_min=0.002, sigma_max=80.0) | kwargs
    with pytest.raises(ValueError):
        SCHEDULES[name](args.pop("steps"), **args)


def test_karras_formula():
    sigmas = SCHEDULES["karras"](5, 0.002, 80.0, rho=7.0)
    i = torch.arange(5, dtype=torch.float64)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas[:-1], expected)


def test_loglinear_has_equal_log_steps():
    log_steps = SCHEDULES["loglinear"](8, 0.01, 10.0)[:-1].log().diff()
    torch.testing.assert_close(log_steps, torch.full_like(log_steps, math.log(0.001) / 7))


def test_vp_schedules_on_the_full_table_match_diffusers_spacings():
    table = VPSchedule.from_betas()
    lo, hi = table.sigmas[0].item(), table.sigmas[-1].item()
    trailing = SCHEDULES["vp_trailing"](10, sigma_min=lo, sigma_max=hi)
    torch.testing.assert_close(trailing[:-1], table.sigmas[torch.arange(999, 0, -100)], rtol=1e-9, atol=0)
    uniform = SCHEDULES["vp_uniform"](4, sigma_min=lo, sigma_max=hi)
    torch.testing.assert_close(uniform[:-1], table.sigmas[torch.tensor([999, 666, 333, 0])], rtol=1e-9, atol=0)


def test_flow_shift_is_uniform_in_flow_time_before_the_shift():
    shift = 3.0
    sigmas = SCHEDULES["flow_shift"](6, 0.01, 50.0, shift=shift)[:-1]
    gaps = flow_time_from_sigma(sigmas / shift).diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, gaps.mean().item()))


def smooth_mixture():
    return GaussianMixture(torch.tensor([[0.0, 0.0], [1.0, 0.5], [-0.5, 1.0]]), torch.tensor([0.3, 0.45, 0.24]))


def test_focused_steps_are_quantiles_of_its_density():
    # uniform share 1: uniform in log sigma; share 0: equally spaced in the normal cdf, truncated to the range
    torch.testing.assert_close(SCHEDULES["focused"](9, 0.002, 80.0, uniform=1.0),
                               SCHEDULES["loglinear"](9, 0.002, 80.0), rtol=1e-12, atol=0)
    sigmas = SCHEDULES["focused"](9, 0.002, 80.0, center=1.5, width=0.7, uniform=0.0)[:-1]
    cdf = 0.5 * (1 + torch.erf((sigmas.log() - math.log(1.5)) / (0.7 * math.sqrt(2))))
    torch.testing.assert_close(cdf.diff(), torch.full((8,), (cdf[-1] - cdf[0]).item() / 8, dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


def test_focused_crowds_the_steps_near_its_center():
    def near(sigmas):
        return ((sigmas > 0.5) & (sigmas < 2.0)).sum().item()

    assert near(SCHEDULES["focused"](20, 0.002, 80.0, center=1.0, width=0.4, uniform=0.3)) >= 3 * near(
        SCHEDULES["loglinear"](20, 0.002, 80.0))


@pytest.mark.parametrize("kwargs", [dict(center=0.0), dict(width=-1.0), dict(uniform=1.5), dict(uniform=-0.1)])
def test_focused_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError, match="center"):
        SCHEDULES["focused"](5, 0.002, 80.0, **kwargs)


def test_optimized_schedule_beats_karras_on_held_out_noise(tmp_path):
    mixture = smooth_mixture()
    sigmas = SCHEDULES["optimized"](5, sigma_min=0.002, sigma_max=80.0, denoiser=mixture, solver="dpmpp_2m",
                                    shape=(256, 2), dtype=torch.float64, cache=tmp_path / "cache.json")
    assert sigmas.shape == (6,) and sigmas[-1] == 0 and (sigmas[1:] < sigmas[:-1]).all()
    assert sigmas[0].item() <= 80.0 and sigmas[-2].item() >= 0.002
    x = torch.randn(512, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(99)) * 80.0
    reference = reference_solution(mixture, x, 0.002, 80.0)
    def error(s):  # samplers start from the noise scaled by the first sigma
        return (SOLVERS["dpmpp_2m"](mixture, x * s[0].item() / 80.0, s) - reference).square().mean().sqrt().item()

    assert error(sigmas) < 0.7 * error(SCHEDULES["karras"](5, 0.002, 80.0))


def test_optimized_schedule_is_cached_per_model(tmp_path):
    cache = tmp_path / "cache.json"
    mixture = smooth_mixture()
    options = dict(sigma_min=0.002, sigma_max=80.0, solver="euler", shape=(64, 2), cache=cache, max_evals=40)
    first = SCHEDULES["optimized"](4, denoiser=mixture, **options)
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["sigmas"] == first.tolist()

    def must_not_run(x, sigma):
        raise AssertionError("the cached schedule should have been used")

    must_not_run.fingerprint = mixture.fingerprint
    torch.testing.assert_close(SCHEDULES["optimized"](4, denoiser=must_not_run, **options), first)
    with pytest.raises(AssertionError):  # another step count is another entry
        SCHEDULES["optimized"](3, denoiser=must_not_run, **options)


def test_optimized_schedule_rejects_stochastic_solvers_and_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="stochastic"):
        SCHEDULES["optimized"](4, denoiser=smooth_mixture(), solver="euler_ancestral", shape=(8, 2), cache=False)
    with pytest.raises(ValueError, match="unknown solver"):
        SCHEDULES["optimized"](4, denoiser=smooth_mixture(), solver="nope", shape=(8, 2), cache=False)
    with pytest.raises(ValueError, match="shape"):
        SCHEDULES["optimized"](4, denoiser=smooth_mixture(), shape=(8,), cache=False)


def test_a_schedule_searched_on_a_fitted_proxy_transfers_to_the_model():
    """A few-component mixture fitted to the digits stands in for the data's own denoiser (one narrow
    component per image): the schedule searched on the cheap proxy also beats Karras on the model."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images[:400]).double() / 8 - 1  # (400, 8, 8) in [-1, 1]
    model = GaussianMixture(images.flatten(1), 0.1, sample_shape=(1, 8, 8))
    proxy = GaussianMixture.fit(images.unsqueeze(1), components=10)
    assert proxy.sample_shape == (1, 8, 8)
    sigmas = SCHEDULES["optimized"](6, sigma_min=0.002, sigma_max=80.0, denoiser=proxy, solver="dpmpp_2m",
                                    shape=(128, 1, 8, 8), dtype=torch.float64, cache=False)
    x = torch.randn(128, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80.0
    reference = reference_solution(model, x, 0.002, 80.0, steps=200)
    def error(s):
        return (SOLVERS["dpmpp_2m"](model, x * s[0].item() / 80.0, s) - reference).square().mean().sqrt().item()

    assert error(sigmas) < 0.8 * error(SCHEDULES["karras"](6, 0.002, 80.0))
