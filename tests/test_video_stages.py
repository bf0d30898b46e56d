"""Video through the stages: moving digits -> a video U-Net trained briefly -> samples as PNG, GIF, MP4 and .npz
(read back), image-to-video and interpolation through the inpainting machinery in time, a video folder as a data
set, and a latent video run's masks."""

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.control.inputs import frame_mask, read_video
from difflab.data import load_dataset
from difflab.data.video import read_clip
from difflab.training import Trainer, resolve
from difflab.training.run import draw, load_run

FRAMES, SIZE = 4, 12
TINY_VIDEO = {
    "model": {"arch": "unet", "channels": 16, "channel_mult": [1], "blocks_per_level": 1,
              "attention_resolutions": [], "head_dim": 16, "temporal": "attention"},
    "data": {"dataset": f"moving-digits:frames={FRAMES},size={SIZE}"},
    "optim": {"lr": 0.002, "warmup_steps": 2},
    "train": {"steps": 4, "batch": 8, "log_every": 2, "checkpoint_every": 100, "threads": 1, "ema_decays": [0.9]},
    "sample": {"steps": 4, "n": 4, "solver": "euler"},
}


@pytest.fixture(scope="module")
def video_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("video") / "run"
    Trainer(resolve(TINY_VIDEO), run, progress=False).fit()
    return run


def test_a_video_run_trains_and_samples_clips_in_every_format(video_run, tmp_path):
    run = load_run(video_run)
    assert run.sample_shape == (1, FRAMES, SIZE, SIZE) and run.config.model["frames"] == FRAMES
    assert (video_run / "samples").is_dir() and any((video_run / "samples").glob("*.png"))
    for suffix in (".png", ".gif", ".mp4", ".npz"):
        out = tmp_path / f"clips{suffix}"
        assert main(["sample", str(video_run), "--n", "3", "--out", str(out), "--no-progress"]) == 0
    with np.load(tmp_path / "clips.npz") as archive:
        clips = archive["images"]
    assert clips.shape == (3, FRAMES, SIZE, SIZE, 1) and clips.dtype == np.uint8
    width, height = Image.open(tmp_path / "clips.png").size  # a clip per row, frames left to right
    assert width > height
    for suffix in (".gif", ".mp4"):  # an animation of the grid, frame by frame, that reads back
        decoded = read_clip(tmp_path / f"clips{suffix}", "L")
        assert len(decoded) == FRAMES and decoded[0].size[0] >= 3 * SIZE
    gif = [np.asarray(frame, dtype=np.int16) for frame in read_clip(tmp_path / "clips.gif", "L")]
    first = gif[0][1 : 1 + 2 * SIZE : 2, 1 : 1 + 2 * SIZE : 2]  # clip 0, frame 0 (grids upscale 12 px by 2)
    assert np.abs(first - clips[0, 0, :, :, 0]).max() <= 1  # GIF is lossless for grey


def test_image_to_video_and_interpolation_keep_the_given_frames_exactly(video_run, tmp_path):
    run = load_run(video_run)
    clip = load_dataset(f"moving-digits:frames={FRAMES},size={SIZE}").images[:1]  # (1, 1, T, H, W)
    still = clip[:, :, :1].expand(-1, -1, FRAMES, -1, -1)
    generated, _ = draw(run, 2, init=still, mask=frame_mask([0], FRAMES))
    assert torch.allclose(generated[:, :, 0], clip[:, :, 0].expand(2, -1, -1, -1), atol=1e-6)
    assert not torch.allclose(generated[:, :, 1], clip[:, :, 0].expand(2, -1, -1, -1))
    between, _ = draw(run, 2, init=clip, mask=frame_mask([0, -1], FRAMES))
    assert torch.allclose(between[:, :, [0, -1]], clip[:, :, [0, -1]].expand(2, -1, -1, -1, -1), atol=1e-6)
    # The same through the CLI: a PNG as the first frame, and a GIF clip whose ends are kept.
    frame = ((clip[0, 0, 0] + 1) * 127.5).round().byte().numpy()
    Image.fromarray(frame, "L").save(tmp_path / "first.png")
    out = tmp_path / "i2v.npz"
    assert main(["sample", str(video_run), "--init-image", str(tmp_path / "first.png"), "--keep-frames", "0",
                 "--n", "2", "--out", str(out), "--no-progress"]) == 0
    with np.load(out) as archive:
        assert np.abs(archive["images"][:, 0, :, :, 0].astype(int) - frame).max() <= 1
    frames = [Image.fromarray(((f + 1) * 127.5).round().byte().numpy(), "L") for f in clip[0, 0]]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    torch.testing.assert_close(read_video(tmp_path / "clip.gif", FRAMES, SIZE, 1), clip, atol=1 / 127.5, rtol=0)
    assert main(["sample", str(video_run), "--init-video", str(tmp_path / "clip.gif"), "--keep-frames", "0,-1",
                 "--n", "1", "--out", str(tmp_path / "between.gif"), "--no-progress"]) == 0


def test_video_control_errors_are_one_line(video_run, tmp_path, capsys):
    base = ["sample", str(video_run), "--out", str(tmp_path / "x.gif"), "--no-progress"]
    for args, message in (
        (["--keep-frames", "0"], "keeps frames of --init-video"),
        (["--init-video", str(tmp_path / "missing.gif"), "--keep-frames", "0"], "no clip at"),
        (["--init-image", "a.png", "--init-video", "b.gif"], "not both"),
    ):
        assert main(base + args) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="outside a clip of 4 frames"):
        frame_mask([4], FRAMES)
    with pytest.raises(ValueError, match="nothing is left to generate"):
        frame_mask([0, 1, 2, 3], FRAMES)
    (tmp_path / "short.gif").write_bytes(b"GIF89a")  # not decodable
    with pytest.raises(ValueError, match="not a readable clip"):
        read_video(tmp_path / "short.gif", FRAMES, SIZE, 1)


def test_image_runs_refuse_video_outputs_and_controls(tmp_path, capsys):
    config = {**TINY_VIDEO, "model": {**TINY_VIDEO["model"], "temporal": None}, "data": {"dataset": "digits"},
              "train": {**TINY_VIDEO["train"], "steps": 1}}
    Trainer(resolve(config), tmp_path / "run", progress=False).fit()
    assert main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "x.gif")]) == 2
    assert ".gif is for video runs" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "run"), "--keep-frames", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "for video runs" in capsys.readouterr().err


def test_a_folder_of_clips_is_a_data_set_with_options(tmp_path):
    folder = tmp_path / "clips"
    folder.mkdir()
    digits = load_dataset(f"moving-digits:frames=6,size={SIZE}").images[:3]
    for k, clip in enumerate(digits):
        frames = [Image.fromarray(((f + 1) * 127.5).round().byte().numpy(), "L") for f in clip[0]]
        frames[0].save(folder / f"{k}.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = load_dataset(f"{folder}:frames=5,size=8,mode=L")
    assert data.images.shape == (3, 1, 5, 8, 8)
    config = resolve({**TINY_VIDEO, "data": {"dataset": f"{folder}:frames=5,size=8,mode=L"}})
    assert config.model["frames"] == 5 and config.model["resolution"] == 8
    with pytest.raises(ValueError, match="takes the options frames, size"):
        load_dataset(f"{folder}:colour=red")


def test_latent_video_through_every_stage(tmp_path):
    """Clips -> a causal 3-D autoencoder -> a video U-Net on its latents -> decoded clips, and image-to-video whose
    kept frame comes back exactly (pasted back after decoding)."""
    data = f"moving-digits:frames=5,size={SIZE}"  # causal: the first frame alone, then pairs -> 3 latent frames
    autoencoder = {"model": {"arch": "autoencoder", "channels": 8, "channel_mult": [1, 2], "latent_channels": 2,
                             "groups": 4, "video": "causal", "time_factor": 2},
                   "data": {"dataset": data}, "optim": {"grad_clip": None},
                   "train": {"steps": 1, "batch": 4, "log_every": 1, "threads": 1, "ema_decays": []},
                   "sample": {"n": 2}}
    Trainer(resolve(autoencoder), tmp_path / "ae", progress=False).fit()
    generator = {**TINY_VIDEO, "data": {"dataset": data, "encoder": str(tmp_path / "ae")},
                 "diffusion": {"sigma_data": 1.0}, "train": {**TINY_VIDEO["train"], "steps": 1}}
    Trainer(resolve(generator), tmp_path / "gen", progress=False).fit()
    run = load_run(tmp_path / "gen")
    assert run.sample_shape == (2, 3, SIZE // 2, SIZE // 2) and run.image_shape == (1, 5, SIZE, SIZE)
    assert main(["sample", str(tmp_path / "gen"), "--n", "2", "--out", str(tmp_path / "clips.gif"),
                 "--no-progress"]) == 0
    assert len(read_clip(tmp_path / "clips.gif", "L")) == 5
    clip = load_dataset(data).images[:1]
    still = clip[:, :, :1].expand(-1, -1, 5, -1, -1)
    generated, _ = draw(run, 2, init=still, mask=frame_mask([0], 5))
    assert generated.shape == (2, 1, 5, SIZE, SIZE)
    torch.testing.assert_close(generated[:, :, 0], clip[:, :, 0].expand(2, -1, -1, -1))
    # Exported with its autoencoder inside and moved, the run samples the same clips (fp16 weights: nearly).
    assert main(["export", str(tmp_path / "gen"), "--out", str(tmp_path / "shared")]) == 0
    (tmp_path / "shared").rename(tmp_path / "moved")
    shared = load_run(tmp_path / "moved")
    assert shared.weights == run.weights and not list((tmp_path / "moved").rglob("trainer*"))  # no optimizer
    torch.testing.assert_close(draw(shared, 2)[0], draw(run, 2)[0], atol=0.05, rtol=0)
    exact = tmp_path / "exact"
    assert main(["export", str(tmp_path / "gen"), "--out", str(exact), "--full-precision"]) == 0
    torch.testing.assert_close(draw(load_run(exact), 2)[0], draw(run, 2)[0])
    assert main(["export", str(tmp_path / "gen"), "--out", str(exact)]) == 2  # not over an existing export


def test_a_video_run_starts_from_an_image_run(tmp_path):
    """train.init: the image run's weights, the temporal layers new (zero), so the video model starts as the image
    model on every frame; a model of other shapes, or a student or fine-tune, is refused with one line."""
    from difflab.config import ConfigError

    image = {**TINY_VIDEO, "model": {**TINY_VIDEO["model"], "temporal": None},
             "data": {"dataset": f"moving-digits:frames=1,size={SIZE}"}, "train": {**TINY_VIDEO["train"], "steps": 2}}
    Trainer(resolve(image), tmp_path / "image", progress=False).fit()
    base = load_run(tmp_path / "image").network
    video = Trainer(resolve(TINY_VIDEO, [f"train.init={tmp_path / 'image'}"]), tmp_path / "video", progress=False)
    clips, c_noise = torch.randn(2, 1, FRAMES, SIZE, SIZE), torch.tensor([0.1, 0.7])
    with torch.no_grad():
        out = video.network(clips, c_noise)
        assert out.abs().max() > 0  # the trained image weights, not a fresh zero-output start
        for t in range(FRAMES):
            torch.testing.assert_close(out[:, :, t], base(clips[:, :, t], c_noise))
    with pytest.raises(ConfigError, match="train.init: the model differs from the run"):
        Trainer(resolve(TINY_VIDEO, [f"train.init={tmp_path / 'image'}", "model.channels=8", "model.head_dim=8"]),
                tmp_path / "other", progress=False)
    assert not (tmp_path / "other").exists()  # nothing written for a run that fails to set up
    with pytest.raises(ConfigError, match="train.init cannot be combined with distill or control"):
        Trainer(resolve(TINY_VIDEO, [f"train.init={tmp_path / 'image'}", "control.method=lora",
                                     f"control.base={tmp_path / 'image'}"]), tmp_path / "lora", progress=False)


def test_joint_image_video_training_takes_every_other_step_on_images(tmp_path):
    """data.images: image_share of the steps train on train.batch x frames images as one-frame clips (the temporal
    layers skip them), the rest on clips; a resumed run continues both loaders exactly."""
    joint = [f"data.images=moving-digits:frames=1,size={SIZE}", "data.image_share=0.5", "train.checkpoint_every=2"]
    trainer = Trainer(resolve(TINY_VIDEO, joint), tmp_path / "joint", progress=False)
    shapes = []
    trainer.network.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    assert trainer.fit()["images"] == 2 * 8 + 2 * 8 * FRAMES  # clips and images, each counted once
    clips, images = (8, 1, FRAMES, SIZE, SIZE), (8 * FRAMES, 1, 1, SIZE, SIZE)
    assert shapes[:4] == [clips, images, clips, images]  # then the sample grid's clips
    Trainer(resolve(TINY_VIDEO, [*joint, "train.steps=2"]), tmp_path / "resumed", progress=False).fit()
    Trainer(resolve(TINY_VIDEO, joint), tmp_path / "resumed", resume=True, progress=False).fit()
    whole, resumed = (load_run(tmp_path / name).network.state_dict() for name in ("joint", "resumed"))
    for key, value in whole.items():
        torch.testing.assert_close(resumed[key], value, msg=key)


@pytest.mark.parametrize("overrides, message", [
    (["data.dataset=digits", "model.temporal=null"], "holds images"),
    (["data.images=moving-digits:frames=1,size=16"], r"holds 1x1x16x16, not images of the video's 1x12x12 frames"),
    (["data.images=no-such-set"], "images must be one of"),
    (["data.images=digits", "data.image_share=1"], r"image_share must be in \(0, 1\)"),
    (["train.static_graph=true"], "set train.static_graph=false"),
])
def test_joint_training_refuses_what_it_cannot_train(overrides, message):
    with pytest.raises(Exception, match=message):
        resolve(TINY_VIDEO, [f"data.images=moving-digits:frames=1,size={SIZE}", *overrides])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_joint_training_on_two_processes_matches_one(tmp_path, strategy):
    """Image steps leave the temporal layers out of the loss: DDP is told to look for unused parameters."""
    from test_training import _torchrun, losses

    joint = {**TINY_VIDEO, "data": {**TINY_VIDEO["data"], "images": f"moving-digits:frames=1,size={SIZE}"}}
    Trainer(resolve(joint), tmp_path / "one", progress=False).fit()
    np.testing.assert_allclose(_torchrun(tmp_path, strategy, [f"train.distributed={strategy}"], joint),
                               [float(v) for v in losses(tmp_path / "one")], rtol=1e-4)
