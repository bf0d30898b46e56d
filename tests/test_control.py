"""The control stage on an exact Gaussian-mixture denoiser: inpainting, RePaint, SDEdit and inversion."""

from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.control import invert, repaint_segments, strength_sigmas
from difflab.diffusion import GaussianMixture
from difflab.sampling import SCHEDULES, sample

torch.set_num_threads(2)


def two_modes() -> GaussianMixture:
    """Two well-separated modes of 1x4x4 images: all +0.8 or all -0.8, std 0.1."""
    means = torch.stack([torch.full((16,), 0.8), torch.full((16,), -0.8)]).double()
    return GaussianMixture(means, 0.1, sample_shape=(1, 4, 4))


def bottom_half_mask() -> torch.Tensor:
    """Generate the bottom half, keep the top one."""
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 2:, :] = 1
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
    for options in ({}, {"resample": (2, 10)}, {"reconstruction": 0.25}):
        out = sample(gmm, noise, solver=solver, steps=12, init=known, mask=bottom_half_mask(),
                     generator=torch.Generator().manual_seed(2), **options)
        assert (out - known)[..., :2, :].abs().max() < 1e-12  # the known region, to float64 precision
        scores.append(agreement(out, known))
    # Replacement alone decides the mode while the known half is still drowned in noise; RePaint's resampling and
    # reconstruction guidance fix that.
    assert 0.7 < scores[0] < min(scores[1:]) and min(scores[1:]) >= 0.95, scores


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
    with pytest.raises(ValueError, match="need a mask"):
        sample(gmm, noise, steps=4, init=known, strength=0.5, resample=(2, 2))
    with pytest.raises(ValueError, match="need a mask"):
        sample(gmm, noise, steps=4, init=known, strength=0.5, reconstruction=1.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        sample(gmm, noise, steps=4, init=known, mask=half, reconstruction=-1.0)


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
    out = sample(counted, noise, solver="euler", steps=6, init=known, mask=bottom_half_mask(), resample=(3, 4),
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


# ------------------------------------------------------------------------------------------------ a trained run
TINY = {
    "model": {"arch": "unet", "channels": 16, "channel_mult": [1, 2], "blocks_per_level": 1,
              "attention_resolutions": [], "head_dim": 16},
    "data": {"dataset": "digits"},
    "optim": {"lr": 0.002, "warmup_steps": 2},
    "train": {"steps": 20, "batch": 32, "log_every": 5, "checkpoint_every": 100, "threads": 1, "ema_decays": [0.9]},
    "sample": {"steps": 6, "n": 10},
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    from difflab.training import Trainer, resolve

    run = tmp_path_factory.mktemp("control") / "run"
    Trainer(resolve(TINY), run, progress=False).fit()
    return run


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict:
    """A digit, a mask that regenerates its bottom-right quarter, and a file that is not an image."""
    from PIL import Image

    from difflab.data import load_dataset

    folder = tmp_path_factory.mktemp("pictures")
    digit = ((load_dataset("digits").images[3, 0] + 1) * 127.5).round().byte().numpy()
    Image.fromarray(digit, "L").save(folder / "digit.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[4:, 4:] = 255
    Image.fromarray(mask, "L").save(folder / "mask.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {"digit": folder / "digit.png", "mask": folder / "mask.png", "broken": folder / "broken.png",
            "pixels": digit, "keep": mask == 0}


def test_sample_cli_inpaints_and_edits_a_picture(digits_run, pictures, tmp_path, capsys):
    out = tmp_path / "inpainted.npz"
    assert main(["sample", str(digits_run), "--init-image", str(pictures["digit"]), "--mask", str(pictures["mask"]),
                 "--n", "4", "--out", str(out), "--no-progress"]) == 0
    images = np.load(out)["images"][..., 0]  # (4, 8, 8) uint8
    keep = pictures["keep"]
    assert (images[:, keep] == pictures["pixels"][keep]).all()  # the kept pixels, exactly
    assert (images[:, ~keep] != pictures["pixels"][~keep]).any()
    assert main(["sample", str(digits_run), "--init-image", str(pictures["digit"]), "--mask", str(pictures["mask"]),
                 "--resample", "2,3", "--n", "2", "--out", str(tmp_path / "repaint.png"), "--no-progress"]) == 0
    assert main(["sample", str(digits_run), "--init-image", str(pictures["digit"]), "--mask", str(pictures["mask"]),
                 "--reconstruction-guidance", "2", "--n", "2", "--out", str(tmp_path / "guided.png"),
                 "--no-progress"]) == 0
    assert main(["sample", str(digits_run), "--init-image", str(pictures["digit"]), "--strength", "0.4", "--n", "2",
                 "--out", str(tmp_path / "edited.png"), "--no-progress"]) == 0
    assert (tmp_path / "repaint.png").is_file() and (tmp_path / "edited.png").is_file()


def test_sample_cli_rejects_bad_control_input_in_one_line(digits_run, pictures, tmp_path, capsys):
    base = ["sample", str(digits_run), "--out", str(tmp_path / "x.png"), "--no-progress"]
    cases = [
        (["--mask", str(pictures["mask"])], "need one"),
        (["--init-image", str(pictures["broken"]), "--strength", "0.5"], "not a readable image"),
        (["--init-image", str(tmp_path / "missing.png"), "--strength", "0.5"], "no image at"),
        (["--init-image", str(pictures["digit"]), "--resample", "2,2"], "need a mask"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    for flags in (["--strength", "1.5"], ["--strength", "x"], ["--resample", "2"], ["--resample", "0,3"]):
        with pytest.raises(SystemExit):
            main(base + flags)
    assert not (tmp_path / "x.png").exists()


def test_invert_cli_round_trips_a_picture(digits_run, pictures, tmp_path, capsys):
    out = tmp_path / "inversion.npz"
    assert main(["invert", str(digits_run), str(pictures["digit"]), "--steps", "50", "--out", str(out)]) == 0
    result = np.load(out)
    assert result["noise"].shape == (1, 1, 8, 8) and result["reconstruction"].shape == (1, 1, 8, 8)
    assert float(result["psnr"]) > 30 and "PSNR" in capsys.readouterr().out
    assert out.with_suffix(".png").is_file()
    assert main(["invert", str(digits_run), str(pictures["broken"]), "--out", str(out)]) == 2
    assert main(["invert", str(digits_run), str(pictures["digit"]), "--out", str(tmp_path / "x.png")]) == 2
    # Sampling the inverted noise on the same grid gives the picture back; another label would edit it.
    again = tmp_path / "again.npz"
    assert main(["sample", str(digits_run), "--noise", str(out), "--n", "1", "--class-label", "none", "--solver",
                 "heun", "--steps", "50", "--out", str(again), "--no-progress"]) == 0
    expected = ((result["reconstruction"][0, 0] + 1) * 127.5).round().clip(0, 255)
    assert np.abs(np.load(again)["images"][0, ..., 0].astype(float) - expected).max() <= 1
    capsys.readouterr()
    for noise, message in ((tmp_path / "none.npz", "no noise file"), (pictures["broken"], "not a noise archive")):
        assert main(["sample", str(digits_run), "--noise", str(noise), "--out", str(tmp_path / "y.png"),
                     "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    assert main(["sample", str(digits_run), "--noise", str(out), "--n", "2", "--out", str(tmp_path / "y.png"),
                 "--no-progress"]) == 0  # one noise for every sample
    np.savez(tmp_path / "three.npz", noise=np.zeros((3, 1, 8, 8), np.float32))
    capsys.readouterr()
    assert main(["sample", str(digits_run), "--noise", str(tmp_path / "three.npz"), "--n", "2", "--out",
                 str(tmp_path / "y.png"), "--no-progress"]) == 2
    assert "does not fit 2 samples" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ ControlNet
def test_a_new_controlnet_leaves_the_model_unchanged_and_scales_combine_linearly():
    from difflab.control.pictures import CONTROL_PICTURES
    from difflab.models import build_network

    torch.manual_seed(0)
    config = {"arch": "unet", "resolution": 8, "in_channels": 1, "channels": 16, "channel_mult": [1, 2],
              "blocks_per_level": 1, "attention_resolutions": [4], "head_dim": 16, "num_classes": 10}
    plain, controlled = build_network(config), build_network({**config, "controls": [1, 1]})
    for p in plain.parameters():  # a "trained" base: no zero-initialised layers left
        p.data.normal_(0, 0.05)
    controlled.load_state_dict(plain.state_dict(), strict=False)
    for net in controlled.controlnets:
        net.copy_encoder(controlled)
    x, c_noise, labels = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    control = torch.cat([CONTROL_PICTURES["sobel"](x), CONTROL_PICTURES["mask"](x)], 1)
    with torch.no_grad():
        reference = plain(x, c_noise, class_labels=labels)
        torch.testing.assert_close(controlled(x, c_noise, class_labels=labels, control=control), reference)
        torch.testing.assert_close(controlled(x, c_noise, class_labels=labels), reference)  # no picture: the base
        for p in controlled.controlnets.parameters():
            p.add_(0.05 * torch.randn_like(p))
        one = controlled(x, c_noise, class_labels=labels, control=control, control_scale=(1.0, 0.0)) - reference
        two = controlled(x, c_noise, class_labels=labels, control=control, control_scale=(0.0, 1.0)) - reference
        assert one.abs().max() > 1e-3 and two.abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 channels in all at 8x8"):
        controlled(x, c_noise, class_labels=labels, control=control[:, :1])
    with pytest.raises(ValueError, match="got 3 control scales for 2"):
        controlled(x, c_noise, class_labels=labels, control=control, control_scale=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="no ControlNet"):
        plain(x, c_noise, class_labels=labels, control=control)


def test_control_pictures_are_images_in_the_unit_range_and_edge_scores_are_one_on_themselves():
    from difflab.control.pictures import CONTROL_PICTURES, edge_scores
    from difflab.data import load_dataset

    images = load_dataset("digits").images[:50]
    for kind, make in CONTROL_PICTURES.items():
        picture = make(images)
        assert picture.shape[-2:] == images.shape[-2:] and picture.min() >= -1 and picture.max() <= 1, kind
    edges = CONTROL_PICTURES["sobel"](images)
    assert set(edges.unique().tolist()) == {-1.0, 1.0} and 0.2 < (edges > 0).float().mean() < 0.6
    assert edge_scores(images, edges)["edge_f1"] == 1.0
    assert edge_scores(images, -torch.ones_like(edges))["edge_f1"] == 0.0


def test_finetune_trains_only_the_controlnet_and_samples_through_the_cli(digits_run, tmp_path, capsys):
    from PIL import Image

    from difflab.control.pictures import sobel_edges
    from difflab.data import load_dataset
    from difflab.training.run import load_run

    out = tmp_path / "edges"
    assert main(["finetune", str(digits_run), "--method", "controlnet", "--out", str(out), "--train-steps", "6",
                 "--set", "train.log_every=1", "--set", "optim.warmup_steps=0", "--no-progress"]) == 0
    base, tuned = load_run(digits_run), load_run(out, ema="none")  # it starts from the base's sampling weights
    assert tuned.config.control.method == "controlnet" and tuned.config.model["controls"] == [1]
    theirs = tuned.network.state_dict()
    changed = [k for k, v in base.network.state_dict().items() if not torch.equal(v, theirs[k])]
    assert changed == []  # the base is frozen
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in theirs.items() if "zero_" in k)  # it learned

    edges = sobel_edges(load_dataset("digits").images[5:6])[0, 0]
    Image.fromarray(((edges + 1) * 127.5).byte().numpy(), "L").save(tmp_path / "edges.png")
    npz = tmp_path / "a.npz"
    assert main(["sample", str(out), "--control", str(tmp_path / "edges.png"), "--n", "3", "--out", str(npz),
                 "--no-progress"]) == 0
    # The same ControlNet attached to its base run gives the same samples.
    attached = tmp_path / "b.npz"
    assert main(["sample", str(digits_run), "--control", str(tmp_path / "edges.png"), "--control-run", f"{out}:1",
                 "--ema", "0.9", "--n", "3", "--out", str(attached), "--no-progress"]) == 0
    own = main(["sample", str(out), "--control", str(tmp_path / "edges.png"), "--ema", "0.9", "--n", "3",
                "--out", str(tmp_path / "c.npz"), "--no-progress"])
    assert own == 0 and np.array_equal(np.load(attached)["images"], np.load(tmp_path / "c.npz")["images"])
    capsys.readouterr()
    assert main(["sample", str(out), "--n", "2", "--out", str(tmp_path / "d.png"), "--no-progress"]) == 2
    assert "one --control picture per ControlNet: 1 ControlNet(s), 0 picture(s)" in capsys.readouterr().err
    assert main(["sample", str(digits_run), "--control-run", str(digits_run), "--control", str(tmp_path / "edges.png"),
                 "--out", str(tmp_path / "e.png"), "--no-progress"]) == 2
    assert "is not a ControlNet run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------ LoRA
def test_lora_starts_as_the_identity_and_merges_exactly(tmp_path):
    from difflab.control.lora import add_lora, lora_state_dict, merge_lora, save_lora
    from difflab.models import build_network

    torch.manual_seed(0)
    config = {"arch": "unet", "resolution": 8, "in_channels": 1, "channels": 16, "channel_mult": [1, 2],
              "blocks_per_level": 1, "attention_resolutions": [4], "head_dim": 16, "num_classes": 10}
    plain, adapted = build_network(config), build_network(config)
    for p in plain.parameters():
        p.data.normal_(0, 0.05)
    adapted.load_state_dict(plain.state_dict())
    names = add_lora(adapted, rank=2, alpha=4.0)
    assert any("attn" in n for n in names) and any("conv" in n for n in names)
    assert not any(n.startswith(("embed", "conv_in", "conv_out")) for n in names)  # the default targets
    x, c_noise, labels = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, c_noise, class_labels=labels), plain(x, c_noise, class_labels=labels))
        state = lora_state_dict(adapted)
        assert state and all(".lora_" in k for k in state)
        for value in state.values():
            value.normal_(0, 0.1)
        adapted.load_state_dict(state, strict=False)
        wrapped = adapted(x, c_noise, class_labels=labels)
    path = save_lora(tmp_path / "a.safetensors", state, 2, 4.0, config)
    merge_lora(plain, config, path, strength=1.0)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, c_noise, class_labels=labels), wrapped, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="another model architecture"):
        merge_lora(build_network({**config, "channels": 32}), {**config, "channels": 32}, path)
    with pytest.raises(ValueError, match="no Linear or Conv2d"):
        add_lora(build_network(config), 2, 2.0, targets=("nothing.*",))


def test_finetune_lora_learns_a_handful_of_images_into_a_small_file(digits_run, tmp_path, capsys):
    from PIL import Image

    from difflab.data import load_dataset
    from difflab.training.run import draw, load_run

    folder = tmp_path / "sevens"
    folder.mkdir()
    digits = load_dataset("digits")
    for i in (digits.labels == 7).nonzero()[:6, 0].tolist():
        Image.fromarray(((digits.images[i, 0] + 1) * 127.5).round().byte().numpy(), "L").save(folder / f"{i}.png")
    out = tmp_path / "lora"
    assert main(["finetune", str(digits_run), "--method", "lora", "--data", str(folder), "--out", str(out),
                 "--train-steps", "8", "--rank", "2", "--set", "train.batch=6", "--set", "optim.warmup_steps=0",
                 "--no-progress"]) == 0
    adapter = out / "lora.safetensors"
    model_file = next((out / "checkpoints").glob("step-*/model.safetensors"))
    assert adapter.stat().st_size < model_file.stat().st_size / 4 and (out / "data" / "index.json").is_file()

    # Strength 0 is the base, strength 1 the fine-tuned run; in between differs from both.
    def pictures(run):
        return draw(run, 4, class_label=None)[0]

    base_images, tuned_images = pictures(load_run(digits_run)), pictures(load_run(out))
    from difflab.control.lora import merge_lora

    for strength, expected in ((0.0, base_images), (1.0, tuned_images)):
        run = load_run(digits_run)
        merge_lora(run.network, run.config.model, adapter, strength)
        torch.testing.assert_close(pictures(run), expected, atol=1e-4, rtol=0)
    assert not torch.allclose(base_images, tuned_images, atol=1e-3)
    assert main(["sample", str(digits_run), "--lora", f"{adapter}:0.7", "--n", "2", "--out",
                 str(tmp_path / "s.png"), "--no-progress"]) == 0
    capsys.readouterr()
    for lora, message in ((tmp_path / "missing.safetensors", "no LoRA file"), (model_file, "not a difflab LoRA")):
        assert main(["sample", str(digits_run), "--lora", str(lora), "--out", str(tmp_path / "x.png"),
                     "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", str(digits_run), "--lora", f"{adapter}:strong"])


def test_a_corrupt_lora_file_fails_in_one_line(tmp_path):
    from difflab.control.lora import merge_lora
    from difflab.models import build_network

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage, not a header")
    config = {"arch": "unet", "resolution": 8, "in_channels": 1, "channels": 16, "channel_mult": [1, 2],
              "blocks_per_level": 1, "attention_resolutions": [], "head_dim": 16}
    with pytest.raises(ValueError, match="not a safetensors file"):
        merge_lora(build_network(config), config, bad)


# -------------------------------------------------------------------------------------- mask-conditioned inpainting
def test_random_boxes_cover_a_quarter_to_all_of_each_side():
    from difflab.control.objectives import random_boxes

    masks = random_boxes(500, (8, 8), torch.Generator().manual_seed(0))
    assert masks.shape == (500, 1, 8, 8) and set(masks.unique().tolist()) == {0.0, 1.0}
    rows, cols = masks.amax(3).sum((1, 2)), masks.amax(2).sum((1, 2))
    assert rows.min() >= 2 and cols.min() >= 2 and (masks.sum((1, 2, 3)) == 64).any()
    assert masks.sum((1, 2, 3)).tolist() == (rows * cols).tolist()  # one box each


def test_finetune_inpaint_starts_as_the_base_and_samples_with_a_mask(digits_run, pictures, tmp_path, capsys):
    from difflab.control.objectives import inpainting_input
    from difflab.training.run import load_run

    out = tmp_path / "inpaint"
    assert main(["finetune", str(digits_run), "--method", "inpaint", "--out", str(out), "--train-steps", "1",
                 "--set", "optim.lr=1e-12", "--no-progress"]) == 0
    base, tuned = load_run(digits_run), load_run(out, ema="none")
    assert tuned.config.model["concat_channels"] == 2
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 1.5)
    known, mask = torch.randn(4, 1, 8, 8), torch.ones(4, 1, 8, 8)
    with torch.no_grad():  # the new input channels start at zero: the base's denoiser, whatever they hold
        torch.testing.assert_close(tuned.model(x, sigma, concat=inpainting_input(known, mask)), base.model(x, sigma),
                                   atol=1e-5, rtol=1e-4)
    npz = tmp_path / "filled.npz"
    assert main(["sample", str(out), "--init-image", str(pictures["digit"]), "--mask", str(pictures["mask"]),
                 "--n", "3", "--out", str(npz), "--no-progress"]) == 0
    images = np.load(npz)["images"][..., 0]
    assert (images[:, pictures["keep"]] == pictures["pixels"][pictures["keep"]]).all()
    capsys.readouterr()
    assert main(["sample", str(out), "--n", "2", "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    assert "an inpainting run samples with an init image and a mask" in capsys.readouterr().err
