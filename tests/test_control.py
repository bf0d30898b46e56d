"""The control stage on an exact Gaussian-mixture denoiser: inpainting, RePaint, SDEdit and inversion."""

import pytest
import torch

from difflab.control import invert, repaint_segments, strength_sigmas
from difflab.diffusion import GaussianMixture
from difflab.sampling import SCHEDULES, sample

torch.set_num_threads(2)


def two_modes() -> GaussianMixture:
    """Two well-separated modes of 1x4x4 images: all +0.8 or all -0.8, std 0.1."""
    means = torch.stack([torch.full((16,), 0.8), torch.full((16,), -0.8)]).double()
    return GaussianMixture(means, 0.1, sample_shape=(1, 4, 4))


def top_half_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    return mask


def agreement(out: torch.Tensor, known: torch.Tensor) -> float:
    """How often the generated bottom half follows the mode that the known top half shows (exact posterior: 1)."""
    return (out[..., 2:, :].mean((1, 2, 3)).sign() == known[..., :2, :].mean((1, 2, 3)).sign()).double().mean().item()


@pytest.mark.parametrize("solver", ["euler", "heun", "dpmpp_2m", "unipc", "euler_ancestral", "dpmpp_2m_sde"])
def test_inpainting_keeps_the_known_pixels_exactly_and_resampling_harmonises(solver):
    gmm = two_modes()
    known = gmm.sample(64, torch.Generator().manual_seed(0))
    noise = torch.randn(known.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scores = []
    for resample in (None, (2, 10)):
        out = sample(gmm, noise, solver=solver, steps=12, init=known, mask=top_half_mask(), resample=resample,
                     generator=torch.Generator().manual_seed(2))
        assert (out - known)[..., :2, :].abs().max() < 1e-12  # the known region, to float64 precision
        scores.append(agreement(out, known))
    # Replacement alone decides the mode while the known half is still drowned in noise; RePaint fixes that.
    assert 0.7 < scores[0] < scores[1] and scores[1] >= 0.95, scores


def test_soft_masks_blend_and_bad_masks_fail_clearly():
    gmm = two_modes()
    known, noise = torch.zeros(2, 1, 4, 4, dtype=torch.float64), torch.randn(2, 1, 4, 4, dtype=torch.float64)
    half = torch.full((1, 1, 4, 4), 0.5)
    out = sample(gmm, noise, solver="euler", steps=4, init=known, mask=half)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="does not fit"):
        sample(gmm, noise, steps=4, init=known, mask=torch.ones(1, 1, 3, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sample(gmm, noise, steps=4, init=known, mask=3 * half)
    with pytest.raises(ValueError, match="need one"):
        sample(gmm, noise, steps=4, mask=half)
    with pytest.raises(ValueError, match="need one"):
        sample(gmm, noise, steps=4, init=known)  # an init image that would do nothing
    with pytest.raises(ValueError, match="does not fit"):
        sample(gmm, noise, steps=4, init=torch.zeros(2, 1, 4, 5), strength=0.5)
    with pytest.raises(ValueError, match="needs a mask"):
        sample(gmm, noise, steps=4, init=known, strength=0.5, resample=(2, 2))


def test_repaint_walk_solves_every_block_resample_times_and_jumps_back_up():
    assert repaint_segments(4, 2, 2) == [(0, 2), (2, 0), (0, 2), (2, 4), (4, 2), (2, 4)]
    assert repaint_segments(3, 2, 1) == [(0, 2), (2, 3)]
    with pytest.raises(ValueError, match="jump"):
        repaint_segments(4, 0, 2)
    gmm = two_modes()
    calls = []

    def counted(x, sigma, **cond):
        calls.append(sigma[0].item())
        return gmm(x, sigma, **cond)

    known = gmm.sample(8, torch.Generator().manual_seed(0))
    noise = torch.randn(known.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    steps = []
    out = sample(counted, noise, solver="euler", steps=6, init=known, mask=top_half_mask(), resample=(3, 4),
                 generator=torch.Generator().manual_seed(2), callback=steps.append)
    assert len(calls) == len(steps) == 4 * 6  # every step solved four times; jumps up cost nothing
    assert (out - known)[..., :2, :].abs().max() < 1e-12


def test_strength_keeps_the_last_part_of_the_grid_and_sdedit_stays_near_its_input():
    grid = SCHEDULES["karras"](10)
    assert torch.equal(strength_sigmas(grid, 1.0), grid)
    assert torch.equal(strength_sigmas(grid, 0.3), grid[7:])
    assert len(strength_sigmas(grid, 0.01)) == 2  # at least one step
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="strength"):
            strength_sigmas(grid, bad)
    gmm = two_modes()
    init = gmm.sample(32, torch.Generator().manual_seed(0))
    noise = torch.randn(init.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    light = sample(gmm, noise, solver="heun", steps=20, init=init, strength=0.3)
    full = sample(gmm, noise, solver="heun", steps=20, init=init, strength=1.0 - 1e-9)
    assert (light - init).abs().mean() < 0.1  # low strength: the same picture, re-detailed
    assert torch.equal(light.mean((1, 2, 3)).sign(), init.mean((1, 2, 3)).sign())
    flipped = (full.mean((1, 2, 3)).sign() != init.mean((1, 2, 3)).sign()).float().mean()
    assert 0.2 < flipped < 0.8  # full strength forgets the input: the mode is a coin toss


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_inversion_round_trips_and_refinement_makes_it_exact(solver):
    gmm = GaussianMixture.random(16, components=6, std=0.3, seed=0, sample_shape=(1, 4, 4))
    image = gmm.sample(8, torch.Generator().manual_seed(0))
    grid = SCHEDULES["karras"](50, sigma_min=0.002, sigma_max=80.0)
    errors = []
    for refine in (0, 5):
        noise = invert(gmm, image, grid, solver=solver, refine=refine)
        assert noise.shape == image.shape and 0.5 < noise.std() < 2  # about unit variance
        back = sample(gmm, noise, solver=solver, sigmas=grid)
        errors.append((back - image).abs().max().item())
    assert errors[0] < (0.01 if solver == "heun" else 2.0)  # an explicit step run backwards is not its inverse
    assert errors[1] < errors[0] / 10 and errors[1] < 1e-3  # the fixed point is
    with pytest.raises(ValueError, match="backwards"):
        invert(gmm, image, grid, solver="dpmpp_2m")
    with pytest.raises(ValueError, match="decreasing to 0"):
        invert(gmm, image, grid.flip(0))
