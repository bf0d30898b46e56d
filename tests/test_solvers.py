"""Solvers against the analytic Gaussian mixture: convergence order, moments, and the registry contract."""

import math

import pytest
import torch

from difflab.diffusion import GaussianMixture
from difflab.sampling import SCHEDULES, SOLVERS, STOCHASTIC, reference_solution
from difflab.sampling.solvers import in_chunks

DETERMINISTIC = sorted(set(SOLVERS) - STOCHASTIC)

# Theoretical orders on a graded (Karras) grid. ipndm's fixed coefficients assume equal steps, so it
# is second order here and fourth order on an equal-step grid (tested separately below). unipc is
# order 2 plus its corrector; lms ramps up from an Euler first step, so its slope approaches 4 slowly.
ORDERS = {"euler": 1, "heun": 2, "dpm2": 2, "lms": 3.6, "ipndm": 2, "deis": 3, "dpmpp_2m": 2, "dpmpp_3m": 3,
          "unipc": 3, "rk4": 4}


def smooth_mixture() -> GaussianMixture:
    """Three overlapping components: smooth enough that every solver reaches its asymptotic regime."""
    means = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-0.5, 1.0]])
    return GaussianMixture(means, torch.tensor([0.3, 0.45, 0.24]), torch.tensor([1.0, 2.0, 1.5]))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).square().mean().sqrt().item()


@pytest.fixture(scope="module")
def ode_problem():
    mixture = smooth_mixture()
    noise = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = noise * 80.0
    return mixture, x, reference_solution(mixture, x, 0.002, 80.0, steps=3000)


def test_orders_table_covers_every_deterministic_solver():
    assert set(ORDERS) == set(DETERMINISTIC)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_convergence_order(name, ode_problem):
    """Error against the fine reference falls with the log-log slope of the solver's order."""
    mixture, x, reference = ode_problem
    steps = (64, 128, 256)
    errors = [rms(SOLVERS[name](mixture, x, SCHEDULES["karras"](n, 0.002, 80.0)), reference) for n in steps]
    slope = math.log2(errors[-2] / errors[-1])
    assert errors[0] > errors[1] > errors[2]
    assert slope == pytest.approx(ORDERS[name], abs=0.35), f"{name}: errors {errors}, slope {slope:.2f}"


def test_ipndm_is_fourth_order_on_equal_steps():
    mixture = smooth_mixture()
    x = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3.0
    reference = reference_solution(mixture, x, 0.1, 3.0, steps=2000)
    errors = []
    for n in (32, 64, 128):
        sigmas = torch.cat([torch.linspace(3.0, 0.1, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        errors.append(rms(SOLVERS["ipndm"](mixture, x, sigmas), reference))
    assert math.log2(errors[1] / errors[2]) == pytest.approx(4.0, abs=0.4)


def test_reference_solution_is_converged(ode_problem):
    mixture, x, reference = ode_problem
    coarser = reference_solution(mixture, x, 0.002, 80.0, steps=1500)
    assert rms(coarser, reference) < 1e-7


@pytest.mark.parametrize("name", sorted(set(SOLVERS) - {"consistency"}))
def test_samples_match_mixture_moments(name):
    """Every solver, stochastic ones included, turns noise into samples with the mixture's moments (but
    ``consistency``, which samples a consistency model: with a denoiser each jump lands on a posterior mean)."""
    mixture = smooth_mixture()
    mean, cov = mixture.moments()
    noise = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    steps = 200 if name in {"euler_ancestral", "ddpm", "euler"} else 60
    out = SOLVERS[name](mixture, noise * 80.0, SCHEDULES["karras"](steps, 0.002, 80.0),
                        generator=torch.Generator().manual_seed(3))
    assert (out.mean(0) - mean).abs().max() < 0.02
    assert (torch.cov(out.T) - cov).abs().max() < 0.045


def test_ddpm_equals_euler_ancestral():
    """Ho et al.'s posterior step, written in VP variables, is the eta = 1 ancestral Euler step."""
    mixture = smooth_mixture()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 80.0
    sigmas = SCHEDULES["karras"](12, 0.002, 80.0)
    a = SOLVERS["ddpm"](mixture, x, sigmas, generator=torch.Generator().manual_seed(5))
    b = SOLVERS["euler_ancestral"](mixture, x, sigmas, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_eta_zero_sde_solvers_are_their_ode_solvers():
    mixture = smooth_mixture()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 80.0
    sigmas = SCHEDULES["karras"](10, 0.002, 80.0)
    for sde, ode in (("dpmpp_2m_sde", "dpmpp_2m"), ("dpmpp_3m_sde", "dpmpp_3m"), ("euler_ancestral", "euler")):
        torch.testing.assert_close(SOLVERS[sde](mixture, x, sigmas, eta=0.0), SOLVERS[ode](mixture, x, sigmas))


class Recorder:
    """A mixture denoiser that records every call, for the contract tests."""

    def __init__(self):
        self.mixture = GaussianMixture.ring(4, std=0.2)
        self.calls: list[tuple[int, torch.Tensor, dict]] = []

    def __call__(self, x, sigma, **cond):
        self.calls.append((x.shape[0], sigma.clone(), cond))
        return self.mixture(x, sigma, **cond)


@pytest.mark.parametrize("name", sorted(SOLVERS))
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_solver_contract(name, steps):
    """NFE as declared, whole batch per call, sigma of shape (B,) never 0, conditioning passed through."""
    denoiser = Recorder()
    x = torch.randn(6, 2) * 80.0
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    out = SOLVERS[name](denoiser, x, SCHEDULES["karras"](steps, 0.002, 80.0),
                        generator=torch.Generator().manual_seed(0), class_labels=labels)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert len(denoiser.calls) == SOLVERS[name].nfe(steps)
    for batch, sigma, cond in denoiser.calls:
        assert batch == 6 and sigma.shape == (6,) and (sigma > 0).all()
        assert cond.keys() == {"class_labels"} and cond["class_labels"] is labels


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_generator_reproducibility(name):
    mixture = GaussianMixture.ring(4, std=0.2)
    x = torch.randn(8, 2) * 80.0
    sigmas = SCHEDULES["karras"](6, 0.002, 80.0)
    run = lambda seed: SOLVERS[name](mixture, x, sigmas, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    if name in STOCHASTIC:
        assert not torch.allclose(run(0), run(1))
    else:
        torch.testing.assert_close(run(0), run(1), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_per_sample_generators_make_samples_independent_of_the_batch(name):
    mixture = GaussianMixture.ring(4, std=0.2)
    x = torch.randn(5, 2, dtype=torch.float64) * 80.0
    sigmas = SCHEDULES["karras"](6, 0.002, 80.0)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(5)]  # noqa: E731
    batch = SOLVERS[name](mixture, x, sigmas, generator=gens())
    alone = SOLVERS[name](mixture, x[3:4], sigmas, generator=gens()[3:4])
    torch.testing.assert_close(batch[3:4], alone)
    with pytest.raises(ValueError, match="generators for a batch"):
        SOLVERS[name](mixture, x, sigmas, generator=gens()[:2])


@pytest.mark.parametrize(
    "sigmas, message",
    [
        (torch.tensor([1.0, 2.0, 0.0]), "decreasing"),
        (torch.tensor([1.0]), "at least 2"),
        (torch.tensor([[1.0, 0.0]]), "1-D"),
        (torch.tensor([1.0, 0.0, 0.0]), "positive"),
        (torch.tensor([float("nan"), 0.0]), "finite"),
    ],
)
def test_bad_sigmas_are_rejected(sigmas, message):
    with pytest.raises(ValueError, match=message):
        SOLVERS["euler"](GaussianMixture.ring(), torch.zeros(2, 2), sigmas)


def test_solvers_stop_at_a_positive_final_sigma():
    """Without a final 0, solvers integrate to the last sigma (as inversion and SDEdit need)."""
    mixture = smooth_mixture()
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 80.0
    sigmas = SCHEDULES["karras"](200, 0.5, 80.0)[:-1]
    exact = SOLVERS["rk4"](mixture, x, SCHEDULES["loglinear"](1000, 0.5, 80.0)[:-1])
    for name in ("heun", "dpmpp_2m", "unipc", "deis", "lms"):
        assert rms(SOLVERS[name](mixture, x, sigmas), exact) < 1e-3, name


def test_low_precision_samples_get_full_precision_sigmas():
    seen = []

    def denoiser(x, sigma):
        seen.append(sigma.dtype)
        return torch.zeros_like(x)

    out = SOLVERS["dpmpp_2m"](denoiser, torch.randn(2, 3, dtype=torch.bfloat16), SCHEDULES["karras"](3, 0.002, 80.0))
    assert out.dtype == torch.bfloat16 and set(seen) == {torch.float32}


@pytest.mark.parametrize("name", ["lms", "deis", "unipc"])
def test_bad_orders_are_rejected(name):
    with pytest.raises(ValueError, match="order must be a positive integer"):
        SOLVERS[name](GaussianMixture.ring(), torch.zeros(2, 2), SCHEDULES["karras"](3, 0.002, 80.0), order=0)


def test_in_chunks_is_the_full_batch_solve():
    mixture = GaussianMixture.ring(4, radius=1.0, std=0.1)
    mixture.labels = torch.tensor([0, 0, 1, 1])
    x = torch.randn(37, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 80
    labels = torch.arange(37) % 2
    sigmas = SCHEDULES["karras"](6, sigma_min=0.002, sigma_max=80.0)
    calls = []

    def solve(part, class_labels):
        calls.append(len(part))
        return SOLVERS["dpmpp_2m"](mixture, part, sigmas, class_labels=class_labels)

    full = solve(x, labels)
    chunked = in_chunks(solve, x, elements=20, class_labels=labels)  # 10 rows a chunk; labels split with x
    assert calls == [37, 10, 10, 10, 7]
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    assert in_chunks(solve, x[:5], elements=20, class_labels=labels[:5]).shape == (5, 2) and calls[-1] == 5
    assert in_chunks(lambda part, scale: part * scale, x, elements=20, scale=2.0).equal(2 * x)  # not a tensor
