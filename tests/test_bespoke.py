"""The bespoke solver: starts as a closed-form solver, learns to beat all of them, keeps the solver contract."""

import json
import math

import pytest
import torch

from difflab.diffusion import GaussianMixture
from difflab.evaluation import rmse
from difflab.sampling import SCHEDULES, SOLVERS, reference_solution, steps_for_nfe
from difflab.sampling.bespoke import LINEAR_SOLVERS, BespokeSolver, fit_bespoke, mine
from difflab.sampling.optimize import (
    Focus,
    _logits_from_sigmas,
    _sigmas_from_logits,
    candidate_schedules,
    focus_grid,
    refine_focus,
)

CLOSED_FORM_SOLVERS = ("euler", "heun", "dpm2", "lms", "deis", "ipndm", "dpmpp_2m", "dpmpp_3m", "unipc")
CLOSED_FORM_SCHEDULES = ("karras", "loglinear", "vp_uniform", "vp_trailing", "flow_shift")


def held_out(mixture, n=1000):
    noise = torch.randn(n, *mixture.sample_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(123))
    return noise, reference_solution(mixture, noise * 80.0, 0.002, 80.0)


def best_closed_form(mixture, nfe, noise, reference) -> float:
    errors = []
    for solver in CLOSED_FORM_SOLVERS:
        steps = steps_for_nfe(solver, nfe)
        for schedule in CLOSED_FORM_SCHEDULES:
            sigmas = SCHEDULES[schedule](steps, 0.002, 80.0)
            errors.append(rmse(SOLVERS[solver](mixture, noise * sigmas[0].item(), sigmas), reference))
    return min(errors)


@pytest.mark.parametrize("solver", LINEAR_SOLVERS)
@pytest.mark.parametrize("sigmas", [SCHEDULES["karras"](6), SCHEDULES["vp_trailing"](3), SCHEDULES["loglinear"](1)],
                         ids=["karras6", "vp_trailing3", "loglinear1"])
def test_read_off_solver_reproduces_the_closed_form_solver(solver, sigmas):
    mixture = GaussianMixture.ring()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigmas[0].item()
    name, options = LINEAR_SOLVERS[solver]
    torch.testing.assert_close(BespokeSolver.from_solver(solver, sigmas)(mixture, x),
                               SOLVERS[name](mixture, x, sigmas, **options), rtol=0, atol=1e-12)


def test_fit_starts_from_the_best_closed_form_solver_exactly():
    mixture = GaussianMixture.ring()
    solver = fit_bespoke(mixture, 5, shape=(64, 2), dtype=torch.float64, steps=0, reference_steps=50, cache=False)
    sigmas = torch.tensor(solver.sigmas, dtype=torch.float64)
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * sigmas[0].item()
    name, options = LINEAR_SOLVERS[solver.info["start"]]
    torch.testing.assert_close(solver(mixture, x), SOLVERS[name](mixture, x, sigmas, **options), rtol=0, atol=1e-12)
    assert solver.info["held_out_rmse"] == solver.info["initial_held_out_rmse"]
    with pytest.raises(ValueError, match="linear"):
        BespokeSolver.from_solver("heun", sigmas)


def test_restarts_fit_from_the_best_start_of_several_solvers_and_keep_the_best_held_out():
    mixture = GaussianMixture.random(8, 6, std=0.1)
    options = {"shape": (128, 8), "dtype": torch.float64, "steps": 2, "reference_steps": 30, "cache": False,
               "focused": False}
    single = fit_bespoke(mixture, 4, **options)
    solver = fit_bespoke(mixture, 4, restarts=3, **options)
    fits = solver.info["restarts"]
    assert len(fits) == 3 and single.info["start"] in fits  # the best start is among them, with its own fit
    assert fits[single.info["start"]] == pytest.approx(single.info["held_out_rmse"], rel=1e-12)
    assert solver.info["held_out_rmse"] == min(fits.values()) <= single.info["held_out_rmse"]
    with pytest.raises(ValueError, match="restarts"):
        fit_bespoke(mixture, 4, restarts=0, **options)


def test_fit_can_start_from_a_given_schedule():
    mixture = GaussianMixture.ring()
    inner = SCHEDULES["karras"](6, sigma_min=0.002, sigma_max=80.0, rho=3.0)[1:5]  # gaps at both ends, as the
    given = torch.cat([inner, inner.new_zeros(1)])  # step parametrisation keeps them
    solver = fit_bespoke(mixture, 4, shape=(32, 2), dtype=torch.float64, steps=0, reference_steps=20, cache=False,
                         start_solvers=(), extra_starts=[("deis", given)])
    torch.testing.assert_close(torch.tensor(solver.sigmas, dtype=torch.float64), given.double(), rtol=1e-9, atol=0)
    assert solver.info["start"] == "deis"


@pytest.mark.parametrize(("mixture", "factor"), [
    (GaussianMixture.ring(), 8.0),  # measured 15x (best closed form: deis+loglinear)
    (GaussianMixture.random(16, 8, std=0.1), 2.0),  # measured 2.4x (best closed form: ipndm+vp_trailing)
], ids=["ring", "random16"])
def test_fitted_solver_beats_every_closed_form_solver_on_held_out_noise(mixture, factor):
    solver = fit_bespoke(mixture, 4, shape=(512, mixture.dim), dtype=torch.float64, seed=1, steps=10,
                         reference_steps=100, cache=False)
    noise, reference = held_out(mixture)
    error = rmse(solver(mixture, noise * solver.sigmas[0]), reference)
    assert error * factor < best_closed_form(mixture, 4, noise, reference)
    assert solver.info["held_out_rmse"] < solver.info["initial_held_out_rmse"]


def test_one_evaluation_solves_a_gaussian_through_the_last_steps_weight_on_x():
    """For N(mu, s^2) the exact endpoint from x_T = sigma_max z is (1 - k) mu + s' z, with k = s / sqrt(s^2 +
    sigma_max^2) and s' = sigma_max k. From where the solver starts, x = sigma z, and D(x; sigma) = mu + s^2 /
    (s^2 + sigma^2) (x - mu), it is a x + b D with b = (1 - k) (s^2 + sigma^2) / sigma^2 and a = s' / sigma -
    b s^2 / (s^2 + sigma^2): weight on x, which closed-form solvers do not have in their last step, so they miss
    it by far at one evaluation and the fitted solver learns it."""
    mu, s = torch.tensor([[1.0, -0.5]], dtype=torch.float64), 0.3
    gaussian = GaussianMixture(mu, torch.tensor([s], dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    solver = fit_bespoke(gaussian, 1, shape=(256, 2), dtype=torch.float64, steps=10, reference_steps=50, cache=False)
    noise, reference = held_out(gaussian)
    assert rmse(solver(gaussian, noise * solver.sigmas[0]), reference) < 1e-3  # measured 2.7e-5
    assert best_closed_form(gaussian, 1, noise, reference) > 0.1  # measured 0.30
    sigma, k = solver.sigmas[0], s / (s**2 + 80.0**2) ** 0.5
    b = (1 - k) * (s**2 + sigma**2) / sigma**2
    assert solver.b[-1][0] == pytest.approx(b, abs=1e-3)
    assert solver.a[-1] == pytest.approx(80.0 * k / sigma - b * s**2 / (s**2 + sigma**2), abs=1e-3)


def test_contract_one_call_per_nfe_never_at_sigma_zero():
    mixture = GaussianMixture.ring()
    solver = fit_bespoke(mixture, 4, shape=(64, 2), dtype=torch.float64, steps=2, reference_steps=20,
                         start_solvers=("dpmpp_2m",), cache=False)
    calls, steps = [], []

    def denoiser(x, sigma, class_labels=None):
        assert sigma.shape == (x.shape[0],) and (sigma > 0).all()
        calls.append(class_labels)
        return mixture(x, sigma, class_labels=class_labels)

    x = torch.randn(16, 2, dtype=torch.float64) * solver.sigmas[0]
    labels = torch.arange(16) % 8
    out = solver(denoiser, x, torch.tensor(solver.sigmas, dtype=torch.float32), generator=torch.Generator(),
                 callback=steps.append, class_labels=labels)
    assert solver.nfe == len(calls) == len(steps) == 4 and all(c is labels for c in calls)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert [s["sigma"] for s in steps] == solver.sigmas[:-1]
    with pytest.raises(ValueError, match="sigmas"):
        solver(denoiser, x, SCHEDULES["karras"](4))


def test_json_round_trip_and_cache_hit(tmp_path):
    mixture = GaussianMixture.ring()
    options = {"shape": (64, 2), "dtype": torch.float64, "steps": 3, "reference_steps": 20,
               "cache": tmp_path / "c.json"}
    solver = fit_bespoke(mixture, 3, **options)
    again = BespokeSolver.from_dict(json.loads(json.dumps(solver.to_dict())))
    x = torch.randn(32, 2, dtype=torch.float64) * solver.sigmas[0]
    torch.testing.assert_close(again(mixture, x), solver(mixture, x), rtol=0, atol=0)

    class MustNotRun:
        def fingerprint(self):
            return mixture.fingerprint()

        def __call__(self, x, sigma):
            raise AssertionError("a cached solver must not call the denoiser")

    assert fit_bespoke(MustNotRun(), 3, **options) == solver
    with pytest.raises(AssertionError, match="cached"):
        fit_bespoke(MustNotRun(), 4, **options)


def test_held_out_batch_may_be_larger_than_the_training_batch():
    mixture = GaussianMixture.ring()
    options = {"shape": (64, 2), "dtype": torch.float64, "steps": 0, "reference_steps": 20, "cache": False,
               "focused": False}
    default = fit_bespoke(mixture, 4, **options)
    assert fit_bespoke(mixture, 4, held_out=64, **options) == default  # the default is the batch's size
    solver = fit_bespoke(mixture, 4, held_out=1000, **options)
    g = torch.Generator().manual_seed(0)
    torch.randn(64, 2, generator=g, dtype=torch.float64)  # the training noise, then the held-out noise
    noise = torch.randn(1000, 2, generator=g, dtype=torch.float64)
    reference = reference_solution(mixture, noise * 80.0, 0.002, 80.0, 20)
    assert solver.info["held_out_rmse"] == pytest.approx(rmse(solver(mixture, noise * solver.sigmas[0]), reference),
                                                         rel=1e-12)
    with pytest.raises(ValueError, match="held_out must be at least 1"):
        fit_bespoke(mixture, 4, held_out=0, **options)
    with pytest.raises(ValueError, match="batch-aligned"):
        fit_bespoke(mixture, 4, held_out=100, cond={"class_labels": torch.zeros(64, dtype=torch.long)}, **options)


def test_held_out_batch_picks_the_start_among_each_solvers_best_on_the_training_batch():
    mixture = GaussianMixture.random(8, 6, std=0.1)
    options = {"shape": (8, 8), "dtype": torch.float64, "steps": 0, "reference_steps": 20, "cache": False,
               "start_solvers": ("euler",)}
    solver = fit_bespoke(mixture, 4, held_out=512, focus_search=0, **options)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (8, 512)]
    references = [reference_solution(mixture, z * 80.0, 0.002, 80.0, 20) for z in batches]
    starts = []
    grid = [focus.sigmas(4, 80.0) for focus in focus_grid(4, 0.002, 80.0)]
    for sigmas in [*candidate_schedules(4, 0.002, 80.0), *grid]:
        logits = torch.as_tensor(_logits_from_sigmas(sigmas.double(), 0.002, 80.0))
        start = BespokeSolver.from_solver("euler", _sigmas_from_logits(logits, 0.002, 80.0))
        starts.append([rmse(start(mixture, z * start.sigmas[0]), ref) for z, ref in zip(batches, references)])
    shortlist = sorted(starts)[:3]  # the three best on the training batch
    assert solver.info["initial_held_out_rmse"] == pytest.approx(min(held for _, held in shortlist), rel=1e-12)
    assert shortlist[0][1] > min(held for _, held in shortlist)  # not the best start on the training batch


def test_focus_grid_covers_the_grid_within_the_range():
    grid = focus_grid(6, 0.002, 80.0)
    assert len(grid) == 252 and all(len(f.sigmas(6, 80.0)) == 7 and f.sigmas(6, 80.0)[0] == 80.0 for f in grid)
    assert sorted({round(focus.sigmas(6, 80.0)[-2].item(), 9) for focus in grid}) == [0.002, 0.01, 0.03, 0.1]
    # the last evaluation stays below the centre: with sigma_min = 0.02, 1 and 0.75 (50x, 15x) drop out for some
    assert all(focus.last < focus.center for focus in focus_grid(6, 0.02, 80.0))
    assert len(focus_grid(6, 0.02, 80.0)) < 252
    assert focus_grid(1, 0.002, 80.0) == []  # one step: all would be (sigma_max, 0), as karras(1) is


def test_focused_schedules_are_starts_unless_turned_off():
    mixture = GaussianMixture.ring()
    options = {"shape": (64, 2), "dtype": torch.float64, "steps": 0, "reference_steps": 20, "cache": False,
               "start_solvers": ("unipc3",)}

    def represented(candidates):  # as the step logits hold them (the first sigma just below sigma_max)
        return [_sigmas_from_logits(torch.as_tensor(_logits_from_sigmas(sigmas, 0.002, 80.0)), 0.002, 80.0)
                for sigmas in candidates]

    def among(solver, candidates) -> bool:
        sigmas = torch.tensor(solver.sigmas, dtype=torch.float64)
        return any(torch.allclose(sigmas, c, rtol=1e-9, atol=0) for c in represented(candidates))

    grid, unfocused = (fit_bespoke(mixture, 6, focus_search=0, **options),
                       fit_bespoke(mixture, 6, focused=False, **options))
    assert among(grid, [focus.sigmas(6, 80.0) for focus in focus_grid(6, 0.002, 80.0)])  # a focused start is best
    assert among(unfocused, candidate_schedules(6, 0.002, 80.0))
    assert unfocused.info["initial_held_out_rmse"] > grid.info["initial_held_out_rmse"]

    # The search around the best grid point finds a better schedule on the held-out batch, and says where from.
    refined = fit_bespoke(mixture, 6, **options)
    focus = Focus(**refined.info["focus"])
    assert Focus(**refined.info["focus_grid_point"]) in focus_grid(6, 0.002, 80.0) and focus not in focus_grid(
        6, 0.002, 80.0)
    assert among(refined, [focus.sigmas(6, 80.0)])
    assert refined.info["initial_held_out_rmse"] < grid.info["initial_held_out_rmse"]
    g = torch.Generator().manual_seed(0)  # the held-out batch is the second draw of the fit's seed
    noise = torch.randn(2, 64, 2, generator=g, dtype=torch.float64)[1]
    reference = reference_solution(mixture, noise * 80.0, 0.002, 80.0, 20)
    error = rmse(refined(mixture, noise * refined.sigmas[0]), reference)
    assert error == pytest.approx(refined.info["initial_held_out_rmse"], rel=1e-9)  # what the search measured


def test_refine_focus_finds_a_schedule_near_the_best_within_its_budget():
    target = Focus(center=0.8, width=1.0, uniform=0.4, last=0.01)
    calls = []

    def error(sigmas):  # the mean squared log-distance of the steps from the target's
        calls.append(sigmas)
        return (sigmas[:-1].log() - target.sigmas(10, 80.0)[:-1].log()).square().mean().item()

    start = Focus(center=1.0, width=0.8, uniform=0.5, last=0.01)
    start_error = error(start.sigmas(10, 80.0))
    focus, best = refine_focus(error, start, start_error, 10, 0.002, 80.0, max_evals=200)
    assert best < start_error / 1000 and best == pytest.approx(error(focus.sigmas(10, 80.0)), rel=1e-12)
    assert abs(math.log(focus.center / target.center)) < 0.01 and abs(math.log(focus.width / target.width)) < 0.01
    assert abs(focus.uniform - target.uniform) < 0.01 and abs(math.log(focus.last / target.last)) < 0.01
    assert focus.valid(0.002, 80.0)

    calls.clear()
    assert refine_focus(error, start, start_error, 10, 0.002, 80.0, max_evals=5)[1] < start_error
    assert len(calls) == 5  # the budget holds mid-round
    assert refine_focus(lambda sigmas: 1.0, start, 1.0, 10, 0.002, 80.0) == (start, 1.0)  # nothing better: the start


def test_focus_search_must_not_be_negative():
    with pytest.raises(ValueError, match="focus_search must be at least 0, got -1"):
        fit_bespoke(GaussianMixture.ring(), 4, shape=(8, 2), focus_search=-1, cache=False)


def test_the_refined_focused_start_is_one_more_fit():
    mixture = GaussianMixture.ring()
    options = {"shape": (64, 2), "dtype": torch.float64, "steps": 0, "reference_steps": 20, "cache": False,
               "start_solvers": ("unipc3", "euler")}
    grid, refined = fit_bespoke(mixture, 6, focus_search=0, **options), fit_bespoke(mixture, 6, **options)
    (best,) = grid.info["restarts"]
    first, extra = refined.info["restarts"]
    assert first == best and refined.info["restarts"][best] == grid.info["restarts"][best]  # that fit is kept
    assert extra in ("unipc3 (refined focus)", "euler (refined focus)")
    assert refined.info["held_out_rmse"] <= grid.info["held_out_rmse"]


def test_mine_keeps_the_worst_half_and_weights_the_rest_to_an_unbiased_estimate():
    g = torch.Generator().manual_seed(0)
    errors = torch.rand(100, generator=g, dtype=torch.float64) ** 4
    other = torch.randn(100, generator=g, dtype=torch.float64)  # any per-noise quantity
    index, weights = mine(errors, 10, g)
    assert len(index) == len(set(index.tolist())) == 10
    assert set(index[:5].tolist()) == set(errors.topk(5).indices.tolist())
    assert weights.sum().item() == pytest.approx(1.0, rel=1e-12)
    assert weights[:5].tolist() == [1 / 100] * 5 and weights[5:].tolist() == pytest.approx([95 / 5 / 100] * 5)
    estimates = torch.stack([weights @ other[mine(errors, 10, g)[0]] for _ in range(4000)])
    standard_error = estimates.std() / 4000 ** 0.5
    assert abs(estimates.mean() - other.mean()) < 4 * standard_error  # unbiased
    assert (mine(errors, 10, torch.Generator().manual_seed(1))[0]
            == mine(errors, 10, torch.Generator().manual_seed(1))[0]).all()
    assert mine(errors, 100)[1].tolist() == pytest.approx([1 / 100] * 100)  # the whole pool: plain mean
    for batch in (0, 101):
        with pytest.raises(ValueError, match=f"a batch of {batch} cannot be mined from a pool of 100"):
            mine(errors, batch)


def test_with_a_pool_each_fit_trains_on_the_batch_mined_with_its_starts_errors():
    mixture = GaussianMixture.random(8, 6, std=0.1)
    trained_on = []

    def recording(x, sigma, **cond):  # the first call with gradients: the training batch at the first sigma
        if torch.is_grad_enabled() and not trained_on:
            trained_on.append(x.detach() / sigma[0])
        return mixture(x, sigma, **cond)

    solver = fit_bespoke(recording, 4, shape=(64, 8), pool=1024, held_out=256, dtype=torch.float64, steps=1,
                         reference_steps=20, cache=False, focus_search=0)
    g = torch.Generator().manual_seed(0)
    first, held, more = (torch.randn(n, 8, generator=g, dtype=torch.float64) for n in (64, 256, 960))
    pool = torch.cat([first, more])  # the training batch's draw and one after the held-out batch
    start = BespokeSolver.from_solver(solver.info["start"], solver.info["start_sigmas"])
    errors = (start(mixture, pool * start.sigmas[0]) - reference_solution(mixture, pool * 80.0, 0.002, 80.0, 20))
    worst = errors.square().mean(1).argsort(descending=True)
    (batch,) = trained_on
    torch.testing.assert_close(batch[:32], pool[worst[:32]])  # the start's 32 worst noises of the pool
    distances = torch.cdist(batch[32:], pool[worst[32:]])  # the others: a draw from the rest of the pool
    assert (distances.min(1).values < 1e-6).all() and len(set(distances.argmin(1).tolist())) == 32
    held_reference = reference_solution(mixture, held * 80.0, 0.002, 80.0, 20)
    assert solver.info["initial_held_out_rmse"] == pytest.approx(rmse(start(mixture, held * start.sigmas[0]),
                                                                      held_reference), rel=1e-12)


def test_pool_must_hold_the_batch_and_needs_no_cond():
    options = {"shape": (64, 2), "dtype": torch.float64, "steps": 0, "reference_steps": 20, "cache": False}
    with pytest.raises(ValueError, match="pool must hold at least the batch of 64 noises, got 32"):
        fit_bespoke(GaussianMixture.ring(), 4, pool=32, **options)
    with pytest.raises(ValueError, match="cannot be mined from a pool"):
        fit_bespoke(GaussianMixture.ring(), 4, pool=128, cond={"class_labels": torch.zeros(64, dtype=torch.long)},
                    **options)
