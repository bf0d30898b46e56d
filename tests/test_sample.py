"""The sample() front door."""

import pytest
import torch

from difflab.diffusion import GaussianMixture
from difflab.sampling import SCHEDULES, SOLVERS, sample


def test_sample_scales_noise_and_runs_the_named_solver():
    mixture = GaussianMixture.ring(4, std=0.2)
    noise = torch.randn(16, 2)
    out = sample(mixture, noise, solver="heun", steps=6, schedule="karras")
    sigmas = SCHEDULES["karras"](6, 0.002, 80.0)
    torch.testing.assert_close(out, SOLVERS["heun"](mixture, noise * 80.0, sigmas))


def test_sample_passes_conditioning_and_calls_back_each_step():
    mixture = GaussianMixture.ring(4, radius=2.0, std=0.1)
    labels = torch.tensor([0, 1, 2, 3] * 4)
    steps = []
    out = sample(mixture, torch.randn(16, 2), solver="dpmpp_2m", steps=8, class_labels=labels,
                 callback=lambda info: steps.append(info["i"]))
    assert steps == list(range(8))
    nearest = torch.cdist(out.double(), mixture.means).argmin(1)
    assert torch.equal(nearest, labels)


def test_sample_forwards_solver_and_schedule_options():
    mixture = GaussianMixture.ring(4, std=0.2)
    noise = torch.randn(8, 2)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    out = sample(mixture, noise, solver="euler_ancestral", steps=5, schedule="karras", generator=gen(),
                 solver_options={"eta": 0.5}, schedule_options={"rho": 3.0})
    sigmas = SCHEDULES["karras"](5, 0.002, 80.0, rho=3.0)
    torch.testing.assert_close(out, SOLVERS["euler_ancestral"](mixture, noise * 80.0, sigmas, eta=0.5, generator=gen()))


def test_sample_with_optimized_schedule(tmp_path):
    mixture = GaussianMixture.ring(4, std=0.2)
    out = sample(mixture, torch.randn(32, 2, dtype=torch.float64), solver="dpmpp_2m", steps=4, schedule="optimized",
                 schedule_options={"cache": tmp_path / "s.json", "max_evals": 30})
    assert out.shape == (32, 2) and torch.isfinite(out).all()
    assert (tmp_path / "s.json").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(solver="nope"), "unknown solver 'nope'"),
        (dict(schedule="nope"), "unknown schedule 'nope'"),
        (dict(class_labels=torch.zeros(3, dtype=torch.long)), "batch 3"),
        (dict(steps=0), "steps"),
    ],
)
def test_sample_rejects_bad_input_with_a_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample(GaussianMixture.ring(4), torch.randn(4, 2), **kwargs)


def test_sample_shows_a_progress_bar(capsys):
    sample(GaussianMixture.ring(4), torch.randn(4, 2), steps=3, progress=True)
    assert "sampling (dpmpp_2m)" in capsys.readouterr().err


def test_sample_takes_guidance_options():
    from difflab.guidance import autoguided, guided

    means = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    mixture = GaussianMixture(means, torch.full((2,), 0.4, dtype=torch.float64), labels=torch.tensor([0, 1]))
    weak = GaussianMixture(means, torch.full((2,), 0.8, dtype=torch.float64), labels=torch.tensor([0, 1]))
    noise = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1] * 4)
    options = dict(solver="heun", steps=4)
    torch.testing.assert_close(sample(mixture, noise, guidance=3.0, class_labels=labels, **options),
                               sample(guided(mixture, 3.0), noise, class_labels=labels, **options))
    torch.testing.assert_close(sample(mixture, noise, guidance=2.0, guide_with=weak, class_labels=labels, **options),
                               sample(autoguided(mixture, weak, 2.0), noise, class_labels=labels, **options))
    with pytest.raises(ValueError, match="need a guidance scale"):
        sample(mixture, noise, guide_with=weak, class_labels=labels, **options)
