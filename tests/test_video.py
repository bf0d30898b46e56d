"""Video sources: clips generated here (MP4, palette GIF, frame folders), decoded content, layout, skips, errors."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data.shards import preprocess
from difflab.data.sources import to_tensor
from difflab.data.video import load_videos, read_clip, scan_videos

PALETTE = [(0, 0, 0), (200, 30, 40), (20, 180, 60), (30, 60, 210), (240, 200, 20)]  # 0: transparent


def square_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
    """A white 8x8 square on black moving 2 pixels right per frame: (T, H, W, 3) uint8, left edge at 4 + 2t."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    for t in range(count):
        frames[t, 12:20, 4 + 2 * t : 12 + 2 * t] = 255
    return frames


def write_mp4(path, frames: np.ndarray) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames


def write_gif(path, count: int, size: tuple[int, int] = (20, 16)) -> None:
    """Palette frames on a transparent background; frame t holds a square of colour 1 + t % 4 at column 2t."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = []
    for t in range(count):
        frame = Image.new("P", size, 0)
        frame.putpalette([c for colour in PALETTE for c in colour])
        frame.paste(1 + t % 4, (2 * t, 4, 2 * t + 6, 10))
        frames.append(frame)
    frames[0].save(path, save_all=True, append_images=frames[1:], transparency=0, disposal=2, duration=50, loop=0)


def write_frames(folder, values, names=None, size=(12, 10)) -> None:
    """A frame folder of flat grey frames, ``values[i]`` saved as ``names[i]`` (default 0001.png, 0002.png...)."""
    folder.mkdir(parents=True)
    for i, value in enumerate(values):
        Image.new("L", size, value).save(folder / (names[i] if names else f"{i + 1:04d}.png"))


def test_mp4_decodes_the_moving_square(tmp_path):
    write_mp4(tmp_path / "square.mp4", square_frames(12))
    frames = read_clip(tmp_path / "square.mp4")
    assert len(frames) == 12 and frames[0].size == (48, 32) and frames[0].mode == "RGB"
    for t, frame in enumerate(frames):
        columns = np.nonzero(np.asarray(frame)[..., 0].max(0) > 127)[0]
        rows = np.nonzero(np.asarray(frame)[..., 0].max(1) > 127)[0]
        assert abs(columns.min() - (4 + 2 * t)) <= 1 and abs(columns.max() - (11 + 2 * t)) <= 1
        assert abs(rows.min() - 12) <= 1 and abs(rows.max() - 19) <= 1
    assert len(read_clip(tmp_path / "square.mp4", mode="L", max_frames=5)) == 5


def test_palette_gif_is_composited_on_white_with_its_colours(tmp_path):
    write_gif(tmp_path / "a.gif", 6)
    frames = read_clip(tmp_path / "a.gif")
    assert len(frames) == 6 and all(f.mode == "RGB" and f.size == (20, 16) for f in frames)
    for t, frame in enumerate(frames):
        pixels = np.asarray(frame).astype(int)
        assert np.abs(pixels[6, 2 * t + 2] - PALETTE[1 + t % 4]).max() <= 2  # inside the square
        assert (pixels[14, :] == 255).all()  # transparent background: white, previous frames disposed
    assert len(read_clip(tmp_path / "a.gif", max_frames=2)) == 2


def test_frame_folder_reads_frames_in_natural_name_order(tmp_path):
    names = [f"frame_{i}.png" for i in range(1, 13)]  # frame_10 sorts before frame_2 as plain text
    write_frames(tmp_path / "clip", [10 * i for i in range(12)], names)
    frames = read_clip(tmp_path / "clip", mode="L")
    assert [np.asarray(f)[0, 0] for f in frames] == [10 * i for i in range(12)]


def test_clips_are_strided_resized_and_cropped_like_shards(tmp_path):
    write_frames(tmp_path / "clip", [0, 40, 80, 120, 160, 200], size=(30, 20))
    gradient = Image.fromarray(np.tile(np.arange(0, 240, 8, dtype=np.uint8), (20, 1)))  # checks the crop
    gradient.save(tmp_path / "clip" / "0007.png")
    data, skipped = load_videos(tmp_path, frames=4, size=8, stride=2, mode="L")
    assert skipped == [] and data.images.shape == (1, 1, 4, 8, 8) and data.labels is None
    assert data.images[0, 0, :3].flatten(1).std(1).max() == 0  # frames 0, 2, 4 are flat: 0, 80, 160
    assert data.images[0, 0, :3, 0, 0].tolist() == pytest.approx([0 / 127.5 - 1, 80 / 127.5 - 1, 160 / 127.5 - 1])
    assert torch.equal(data.images[0, :, 3], to_tensor(preprocess(gradient, 8)))  # frame 6
    with pytest.raises(ValueError, match="too short: 7 frames, needs 10"):
        load_videos(tmp_path, frames=4, size=8, stride=3)


def test_folder_layout_gives_labels_and_captions(tmp_path):
    write_gif(tmp_path / "cats" / "a.gif", 5)
    write_gif(tmp_path / "cats" / "b.gif", 5)
    (tmp_path / "cats" / "b.txt").write_text("a red square\n")
    write_frames(tmp_path / "dogs" / "run", range(0, 250, 50))
    (tmp_path / "dogs" / "run.json").write_text(json.dumps({"caption": "grey fades"}))
    write_frames(tmp_path / "loose", range(5))  # a frame folder at the root: no label
    write_gif(tmp_path / "top.gif", 5)
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "top.gif", "text": "from metadata"}) + "\n")
    records = scan_videos(tmp_path)
    assert [(r.path, r.label, r.caption) for r in records] == [
        ("cats/a.gif", "cats", None), ("cats/b.gif", "cats", "a red square"), ("dogs/run", "dogs", "grey fades"),
        ("loose", None, None), ("top.gif", None, "from metadata")]
    data, skipped = load_videos(tmp_path, frames=4, size=16)
    assert skipped == [] and data.images.shape == (5, 3, 4, 16, 16) and data.name == tmp_path.name
    assert data.images.min() >= -1 and data.images.max() <= 1
    assert data.class_names == ("cats", "dogs") and data.labels.tolist() == [0, 0, 1, -1, -1]
    assert data.extras["captions"] == [None, "a red square", "grey fades", None, "from metadata"]
    assert len(data.subset(torch.tensor([1, 2])).extras["captions"]) == 2


def test_corrupt_short_and_foreign_files_are_skipped_with_a_reason(tmp_path):
    write_mp4(tmp_path / "good.mp4", square_frames(12))
    whole = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
    write_gif(tmp_path / "short.gif", 3)
    (tmp_path / "notes.md").write_text("not a clip")
    data, skipped = load_videos(tmp_path, frames=8, size=8)
    assert data.images.shape == (1, 3, 8, 8, 8)
    reasons = {s["path"]: s["error"] for s in skipped}
    assert sorted(reasons) == ["cut.mp4", "noise.mp4", "notes.md", "short.gif"]
    assert reasons["short.gif"] == "too short: 3 frames, needs 8" and "not a video" in reasons["notes.md"]
    assert all("\n" not in reason for reason in reasons.values())


def test_missing_empty_or_unreadable_roots_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="nowhere.*is not a folder"):
        load_videos(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no clips"):
        load_videos(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.gif").write_bytes(b"GIF89a broken")
    with pytest.raises(ValueError, match=r"no readable clip of 8 frames under .*bad.*x\.gif"):
        load_videos(tmp_path / "bad")
    with pytest.raises(ValueError, match="mode"):
        load_videos(tmp_path / "bad", mode="CMYK")


def test_video_files_without_pyav_say_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` fail
    with pytest.raises(ImportError, match=r'pip install "difflab\[video\]"'):
        read_clip(tmp_path / "clip.mp4")
    with pytest.raises(ImportError, match="difflab"):  # fatal for the whole load, not a skipped clip
        load_videos(tmp_path)
