"""The two-stage pipeline: an autoencoder trained by the trainer, its latent statistics, cached latents, stage-2
training on latents (cached or encoded on the fly), and a diffusers VAE behind the same Encoder interface."""

import csv
import json

import pytest
import torch

from difflab.cli import main
from difflab.config import ConfigError
from difflab.data.loader import ShardReader
from difflab.representation.encoders import LatentEncoder, PixelEncoder, load_encoder
from difflab.training import Trainer, resolve
from difflab.training.run import load_run

AE = {
    "model": {"arch": "autoencoder", "channels": 16, "channel_mult": [1, 2], "latent_channels": 2, "groups": 8},
    "data": {"dataset": "digits"},
    "optim": {"lr": 0.002, "grad_clip": None},
    "loss": {"kl": 1e-4, "gan": 0.5, "gan_start": 3, "feature_matching": 0.1, "disc_channels": 8, "disc_layers": 1},
    "train": {"steps": 6, "batch": 16, "log_every": 1, "checkpoint_every": 3, "threads": 1, "ema_decays": []},
    "sample": {"n": 8},
}
LATENT_UNET = {"arch": "unet", "channels": 16, "channel_mult": [1, 2], "blocks_per_level": 1,
               "attention_resolutions": [], "head_dim": 16}
STAGE2 = {"model": LATENT_UNET, "train": {"steps": 3, "batch": 16, "log_every": 1, "threads": 1},
          "sample": {"steps": 3, "n": 10}}


def metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def autoencoder_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ae") / "run"
    Trainer(resolve(AE), run_dir, progress=False).fit()
    return run_dir


def test_the_trainer_trains_an_autoencoder_with_its_gan_and_statistics(autoencoder_run):
    rows = metrics(autoencoder_run)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert all(float(r["rec"]) > 0 for r in rows) and float(rows[-1]["rec"]) < float(rows[0]["rec"])
    assert [float(r["disc_loss"]) != 0 for r in rows] == [False] * 3 + [True] * 3  # the GAN starts at step 3
    final = autoencoder_run / "checkpoints" / "step-0000006"
    stats = json.loads((final / "latent-stats.json").read_text())
    assert len(stats["shift"]) == len(stats["scale"]) == 2 and stats["images"] == 1024
    assert (autoencoder_run / "samples" / "step-0000006.png").is_file()  # originals over reconstructions
    encoder = load_encoder(autoencoder_run)
    assert isinstance(encoder, LatentEncoder) and encoder.latent_shape((1, 8, 8)) == (2, 4, 4)
    from difflab.data import load_dataset

    images = load_dataset("digits").images[:512]
    z = encoder.encode(images)
    assert z.shape == (512, 2, 4, 4)
    per_channel = z.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 0.2 and (per_channel.std(1) - 1).abs().max() < 0.2  # standardised
    assert encoder.decode(z).shape == images.shape


def test_an_autoencoder_run_resumes_with_its_discriminator(autoencoder_run, tmp_path):
    config = resolve(AE, ["train.steps=4"])
    Trainer(config, tmp_path / "parts", progress=False).fit()
    Trainer(resolve(AE), tmp_path / "parts", resume=True, progress=False).fit()
    assert [r["loss"] for r in metrics(tmp_path / "parts")] == [r["loss"] for r in metrics(autoencoder_run)]


def test_cached_latents_round_trip_and_train_a_latent_generator(autoencoder_run, tmp_path, capsys):
    latents = tmp_path / "latents"
    assert main(["encode", str(autoencoder_run), "digits", "--out", str(latents), "--per-shard", "500",
                 "--no-progress"]) == 0
    assert "1797 latents of 2x4x4 in 4 shards" in capsys.readouterr().out
    reader = ShardReader(latents)
    from difflab.data import load_dataset

    digits = load_dataset("digits")
    encoder = load_encoder(autoencoder_run)
    torch.testing.assert_close(reader.tensors(torch.arange(40, 60)), encoder.encode(digits.images[40:60]))
    assert reader.labels[:20].tolist() == digits.labels[:20].tolist() and reader.index["classes"] == list("0123456789")

    for name, data in (("cached", {"dataset": str(latents)}), ("on-the-fly", {"dataset": "digits",
                                                                              "encoder": str(autoencoder_run)})):
        config = resolve({**STAGE2, "data": data})
        assert (config.model["in_channels"], config.model["resolution"]) == (2, 4)
        assert config.data.encoder == str(autoencoder_run.resolve())  # recorded, so samples can be decoded
        Trainer(config, tmp_path / name, progress=False).fit()
        run = load_run(tmp_path / name)
        assert run.encoder is not None and run.sample_shape == (2, 4, 4)
        from difflab.training.run import draw

        images, _ = draw(run, 4)
        assert images.shape == (4, 1, 8, 8) and images.min() >= -1 and images.max() <= 1
        assert run.image_shape == (1, 8, 8)
        # Control in latent space: the kept pixels come back exactly (pasted after decoding); inversion round trips.
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., 5:, 5:] = 1
        inpainted, _ = draw(run, 4, init=digits.images[:4], mask=mask)
        torch.testing.assert_close(inpainted * (1 - mask), digits.images[:4] * (1 - mask))
        assert not torch.allclose(inpainted * mask, digits.images[:4] * mask)
        from difflab.training.run import invert_images

        noise, back = invert_images(run, digits.images[:2], steps=8)
        assert noise.shape == (2, 2, 4, 4) and back.shape == (2, 1, 8, 8)
        if name == "cached":
            from difflab.training.run import evaluate

            with pytest.raises(ValueError, match="holds latents; evaluate against the images"):
                evaluate(run, 4)


def test_stage_two_mistakes_get_one_line_errors(autoencoder_run, tmp_path, capsys):
    with pytest.raises(ConfigError, match="an autoencoder learns from data, not from latents"):
        resolve(AE, [f"data.encoder={autoencoder_run}"])
    latents = tmp_path / "latents"
    assert main(["encode", str(autoencoder_run), "digits", "--out", str(latents), "--no-progress"]) == 0
    with pytest.raises(ConfigError, match="holds latents of .* but data.encoder is"):
        resolve({**STAGE2, "data": {"dataset": str(latents), "encoder": str(tmp_path)}})
    assert main(["encode", str(autoencoder_run), str(latents), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 2
    assert "already holds latents" in capsys.readouterr().err
    assert main(["encode", str(tmp_path), "digits", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert "neither 'pixels', an autoencoder run directory nor a diffusers" in capsys.readouterr().err
    (tmp_path / "ae.yaml").write_text(json.dumps({"model": AE["model"]}))  # JSON is YAML
    assert main(["model-info", str(tmp_path / "ae.yaml")]) == 2
    assert "model-info measures denoisers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is a unet run, not an autoencoder run"):
        run_dir = tmp_path / "pixels"
        Trainer(resolve({**STAGE2, "model": {**LATENT_UNET, "attention_resolutions": [4]},
                         "data": {"dataset": "digits"}}), run_dir, progress=False).fit()
        load_encoder(run_dir)


def test_pixel_space_is_the_identity_with_a_scale():
    x = torch.randn(2, 3, 8, 8)
    encoder = PixelEncoder(0.5)
    torch.testing.assert_close(encoder.decode(encoder.encode(x)), x)
    assert encoder.latent_shape((3, 8, 8)) == (3, 8, 8) and load_encoder("pixels").describe() == "pixels"


def test_a_diffusers_vae_is_an_encoder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.3,
                                  shift_factor=0.1)
    vae.save_pretrained(tmp_path / "vae")
    encoder = load_encoder(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = encoder.encode(x)
    assert z.shape == (2, 4, 8, 8) == (2, *encoder.latent_shape((3, 16, 16)))
    with torch.no_grad():
        expected = (vae.encode(x).latent_dist.mean - 0.1) * 0.3
        torch.testing.assert_close(z, expected)
        torch.testing.assert_close(encoder.decode(z), vae.decode(z / 0.3 + 0.1).sample.clamp(-1, 1))
    with pytest.raises(ValueError, match="do not divide by this VAE's factor 2"):
        encoder.latent_shape((3, 15, 16))


@pytest.mark.parametrize("video", ["frames", "causal"])
def test_video_autoencoders_train_on_clips_and_show_them(video, tmp_path):
    config = {"model": {"arch": "autoencoder", "channels": 8, "channel_mult": [1, 2], "latent_channels": 2,
                        "groups": 4, "video": video},
              "data": {"dataset": "moving-digits"}, "optim": {"grad_clip": None},
              "loss": {"gan": 0.1, "gan_start": 1, "disc_channels": 8, "disc_layers": 1},
              "train": {"steps": 2, "batch": 4, "log_every": 1, "threads": 1, "ema_decays": []}, "sample": {"n": 3}}
    summary = Trainer(resolve(config), tmp_path / "run", progress=False).fit()
    from PIL import Image

    grid = Image.open(summary["samples"])  # a clip per row, then its reconstruction: 6 rows of 8 frames
    assert grid.size == (1 + 8 * 25, 1 + 6 * 25)  # 24-pixel frames, one pixel of padding
    assert float(metrics(tmp_path / "run")[-1]["disc_loss"]) != 0
    assert load_encoder(tmp_path / "run").latent_shape((1, 8, 24, 24)) == (2, 8, 12, 12)
