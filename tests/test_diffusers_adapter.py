"""from_diffusers: tiny random diffusers models sampled by difflab's Euler match diffusers' own loops."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
)

from difflab.models.diffusers_adapter import from_diffusers  # noqa: E402
from difflab.sampling import SOLVERS  # noqa: E402

STEPS = 10
TOLERANCE = 1e-5  # relative to the output's largest magnitude; float32 throughout


def tiny_unet(**kwargs) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), **kwargs)


def tiny_text_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, norm_num_groups=8, attention_head_dim=8,
                                cross_attention_dim=16,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_dit() -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return model.eval()  # in training mode DiT drops class labels at random


def ddim(prediction_type: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(prediction_type=prediction_type, timestep_spacing="trailing", set_alpha_to_one=True,
                         clip_sample=False)


def save_pipeline(root, model, scheduler, model_folder: str = "unet"):
    """The standard pipeline layout: root/unet (or root/transformer) + root/scheduler."""
    model.save_pretrained(root / model_folder)
    scheduler.save_pretrained(root / "scheduler")
    return root


def noise(channels: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < TOLERANCE, f"relative error {error:.2e}"


def diffusers_ddim(model, scheduler, x_vp, **kwargs) -> torch.Tensor:
    """diffusers' DDIM loop (eta = 0) from x_T in VP space; learned variance dropped as in DiT's pipeline."""
    scheduler.set_timesteps(STEPS)
    x = x_vp
    for t in scheduler.timesteps:
        out = model(x, t.expand(x.shape[0]), **kwargs).sample[:, : x.shape[1]]  # DiT wants a (B,) timestep
        x = scheduler.step(out, t, x, eta=0.0).prev_sample
    return x


def difflab_ddim(denoiser, scheduler, x_vp, **cond) -> torch.Tensor:
    """The same sampler in difflab: Euler on sigma_t = sqrt((1 - alphabar_t) / alphabar_t), then 0."""
    scheduler.set_timesteps(STEPS)
    alphabar = scheduler.alphas_cumprod.double()[scheduler.timesteps]
    sigmas = torch.cat([((1 - alphabar) / alphabar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    x = x_vp * (1 + sigmas[0] ** 2).sqrt().item()  # x = x_vp / sqrt(alphabar): the sigma convention
    return SOLVERS["euler"](denoiser, x, sigmas, **cond)  # at sigma = 0 both spaces coincide


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unet_ddim_matches_diffusers(tmp_path, prediction_type):
    model, scheduler = tiny_unet(), ddim(prediction_type)
    denoiser = from_diffusers(save_pipeline(tmp_path, model, scheduler))
    expected_name = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[prediction_type]
    assert denoiser.parameterization == expected_name
    assert (denoiser.network.in_channels, denoiser.network.sample_size) == (3, 8)
    x_vp = noise(3)
    with torch.no_grad():
        assert_close(difflab_ddim(denoiser, scheduler, x_vp), diffusers_ddim(model, scheduler, x_vp))


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' Euler
def test_unet_euler_matches_diffusers(tmp_path):
    model, scheduler = tiny_unet(), EulerDiscreteScheduler()
    denoiser = from_diffusers(save_pipeline(tmp_path, model, scheduler))
    scheduler.set_timesteps(STEPS)  # linspace spacing: 10 steps land on integer timesteps 999, 888, ...
    x = noise(3) * scheduler.init_noise_sigma
    with torch.no_grad():
        expected = x
        for t in scheduler.timesteps:
            out = model(scheduler.scale_model_input(expected, t), t).sample
            expected = scheduler.step(out, t, expected).prev_sample
        assert_close(SOLVERS["euler"](denoiser, x, scheduler.sigmas), expected)


def test_flow_match_matches_diffusers(tmp_path):
    # FlowMatch timesteps are 1000 t; start below t = 1, where difflab's sigma = t / (1 - t) is infinite.
    model, scheduler = tiny_unet(), FlowMatchEulerDiscreteScheduler()
    model.save_pretrained(tmp_path)
    scheduler.save_pretrained(tmp_path)  # flat layout: scheduler_config.json beside config.json
    denoiser = from_diffusers(tmp_path)
    assert denoiser.parameterization == "flow"
    scheduler.set_timesteps(sigmas=torch.linspace(0.9, 0.05, STEPS).tolist())
    x_t = noise(3)
    with torch.no_grad():
        expected = x_t
        for t in scheduler.timesteps:
            expected = scheduler.step(model(expected, t).sample, t, expected).prev_sample
        t = scheduler.sigmas.double()
        sigmas = t / (1 - t)
        assert_close(SOLVERS["euler"](denoiser, x_t * (1 + sigmas[0].item()), sigmas), expected)


def test_text_unet_ddim_matches_diffusers(tmp_path):
    model, scheduler = tiny_text_unet(), ddim()
    denoiser = from_diffusers(save_pipeline(tmp_path, model, scheduler))
    text = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    x_vp = noise(4)
    with torch.no_grad():
        expected = diffusers_ddim(model, scheduler, x_vp, encoder_hidden_states=text,
                                  encoder_attention_mask=mask)
        assert_close(difflab_ddim(denoiser, scheduler, x_vp, text=text, text_mask=mask), expected)
        unmasked = difflab_ddim(denoiser, scheduler, x_vp, text=text)
    assert (unmasked[1] - expected[1]).abs().max() > 1e-3  # the mask reaches the model


def test_dit_ddim_matches_diffusers_and_null_class(tmp_path):
    model, scheduler = tiny_dit(), ddim()
    denoiser = from_diffusers(save_pipeline(tmp_path, model, scheduler, "transformer"))
    labels = torch.tensor([3, 7])
    x_vp = noise(4)
    with torch.no_grad():
        expected = diffusers_ddim(model, scheduler, x_vp, class_labels=labels)
        assert_close(difflab_ddim(denoiser, scheduler, x_vp, class_labels=labels), expected)
        # -1 is the null class: DiT's extra embedding row at index num_embeds_ada_norm.
        t = torch.tensor([500.0, 500.0])
        null = denoiser.network(x_vp, t, class_labels=torch.tensor([-1, 3]))
        reference = model(x_vp, t, class_labels=torch.tensor([10, 3])).sample[:, :4]
    assert null.shape == x_vp.shape
    assert torch.equal(null, reference)


def test_pixart_matches_diffusers(tmp_path):
    torch.manual_seed(0)
    # inner dim 24: PixArt's embeddings split it in thirds
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                     out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                     cross_attention_dim=24, caption_channels=16).eval()
    denoiser = from_diffusers(save_pipeline(tmp_path, model, ddim(), "transformer"))
    x, t = noise(4), torch.tensor([500.0, 250.0])
    text = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        actual = denoiser.network(x, t, text=text, text_mask=mask)
        expected = model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                         added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :4]
    assert torch.equal(actual, expected)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        from_diffusers(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        from_diffusers(tmp_path)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="unsupported diffusers model class 'AutoencoderKL'"):
        from_diffusers(tmp_path, subfolder="vae")

    root = tmp_path / "pipe"
    tiny_unet().save_pretrained(root / "unet")
    with pytest.raises(ValueError, match="no scheduler_config.json"):
        from_diffusers(root)
    ddim().save_pretrained(root / "scheduler")
    config_path = root / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "prediction_type": "score"}))
    with pytest.raises(ValueError, match="unsupported prediction_type 'score'"):
        from_diffusers(root)
    config_path.write_text(json.dumps({"_class_name": "EDMEulerScheduler"}))  # no alphabar table
    with pytest.raises(ValueError, match="unsupported scheduler 'EDMEulerScheduler'"):
        from_diffusers(root)
    config_path.write_text(json.dumps(config))

    denoiser = from_diffusers(root / "unet")  # a pipeline's model folder finds ../scheduler
    x, sigma = torch.zeros(1, 3, 8, 8), torch.ones(1)
    with pytest.raises(TypeError, match="unknown conditioning keyword 'class_labels'"):
        denoiser(x, sigma, class_labels=torch.zeros(1, dtype=torch.long))
    with pytest.raises(TypeError, match="unknown conditioning keyword 'prompt'"):
        denoiser(x, sigma, prompt="a cat")


def test_unet_without_null_class_rejects_minus_one(tmp_path):
    denoiser = from_diffusers(save_pipeline(tmp_path, tiny_unet(num_class_embeds=4), ddim()))
    x, sigma = torch.zeros(2, 3, 8, 8), torch.ones(2)
    with torch.no_grad():
        assert denoiser(x, sigma, class_labels=torch.tensor([0, 3])).shape == x.shape
        with pytest.raises(ValueError, match="no null class"):
            denoiser(x, sigma, class_labels=torch.tensor([0, -1]))
        with pytest.raises(TypeError, match="needs the conditioning keyword 'class_labels'"):
            denoiser(x, sigma)
