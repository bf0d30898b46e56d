"""Shared pytest setup: keep CPU tests small and predictable, and every cache out of the user's home."""

import atexit
import os
import shutil
import tempfile

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning slows every test many times.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ["HF_HUB_OFFLINE"] = "1"  # the text encoder loads from an installed folder; tests never touch the network

import torch  # noqa: E402  (after the OpenMP setting, which is read when torch loads)

torch.set_num_threads(2)
# Tests that look at a cache point DIFFLAB_CACHE at their own folder; the rest share this one for the session.
os.environ["DIFFLAB_CACHE"] = tempfile.mkdtemp(prefix="difflab-test-cache-")
atexit.register(shutil.rmtree, os.environ["DIFFLAB_CACHE"], ignore_errors=True)

# The serving tests' fake model and live server (tests/test_serve.py, tests/test_serve_e2e.py).
import hashlib  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402


class FakeBackend:
    """A stand-in model for the serving tests: images made from the seed, a gate and a per-step sleep to hold it busy,
    and a record of every call and of how many ran at once."""

    def __init__(self, *, step_seconds: float = 0.0, gate: threading.Event | None = None):
        self.info = {"run": "fake-run", "resolution": 8, "solvers": ["euler", "heun"],
                     "defaults": {"guidance": 2.0, "steps": 4, "solver": "euler"}, "max_steps": 10, "text": True}
        self.step_seconds, self.gate = step_seconds, gate
        self.error: Exception | None = None  # raised by the next calls, until reset
        self.calls: list[dict] = []
        self.running = self.max_running = 0
        self._lock = threading.Lock()

    def generate(self, *, prompt, negative_prompt, guidance, steps, solver, seed, n, progress):
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.calls.append(dict(prompt=prompt, negative_prompt=negative_prompt, guidance=guidance, steps=steps,
                                   solver=solver, seed=seed, n=n))
        try:
            if self.error is not None:
                raise self.error
            for step in range(steps):
                time.sleep(self.step_seconds)
                progress(step + 1, steps)
                if self.gate is not None:  # held after the first step, so a test can read the progress
                    assert self.gate.wait(timeout=20), "the test never opened the gate"
            return [self._image(prompt, seed + i) for i in range(n)]
        finally:
            with self._lock:
                self.running -= 1

    def _image(self, prompt: str, seed: int):
        """A two-colour checkerboard from (prompt, seed): reproducible, and blurred by any upscaling but nearest."""
        digest = hashlib.sha256(f"{prompt}|{seed}".encode()).digest()
        size = self.info["resolution"]
        image = Image.new("RGB", (size, size), tuple(digest[:3]))
        for y in range(size):
            for x in range(y % 2, size, 2):
                image.putpixel((x, y), tuple(digest[3:6]))
        return image


@pytest.fixture
def fake_backend():
    """The FakeBackend class, for tests that build an app around it."""
    return FakeBackend


@pytest.fixture
def live_server():
    """Serves an ASGI app with uvicorn on a free localhost port in a background thread: `live_server(app) -> URL`."""
    started = []

    def start(app) -> str:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                               timeout_graceful_shutdown=2))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        deadline = time.monotonic() + 20
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread in started:
        server.should_exit = True
        thread.join(timeout=10)


# A tiny text-to-image run (tests/test_text.py, tests/test_serve_e2e.py): 8x8 pictures of coloured shapes with
# captions, MiniLM prompts, a few training steps. Built once per test session.
SHAPES = {"square": lambda y, x: (abs(y) < 3) & (abs(x) < 3), "ring": lambda y, x: abs(y * y + x * x - 9) < 4}
COLOURS = {"red": (230, 30, 30), "blue": (30, 60, 230), "green": (30, 200, 60)}


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    import numpy as np

    from difflab.data.shards import write_shards
    from difflab.data.sources import scan_folder
    from difflab.training import Trainer, resolve

    root = tmp_path_factory.mktemp("text-run")
    source = root / "pictures"
    source.mkdir()
    y, x = np.mgrid[-4:4, -4:4] + 0.5
    for k in range(24):
        (shape, inside), (colour, rgb) = list(SHAPES.items())[k % 2], list(COLOURS.items())[k % 3]
        pixels = np.full((8, 8, 3), 255, np.uint8)
        pixels[inside(y, x)] = rgb
        Image.fromarray(pixels).save(source / f"{k:02d}.png")
        (source / f"{k:02d}.txt").write_text(f"a {colour} {shape}")
    write_shards(source, scan_folder(source), root / "shards", resolution=8)
    config = {
        "model": {"arch": "unet", "channels": 16, "channel_mult": [1], "blocks_per_level": 1,
                  "attention_resolutions": [8], "head_dim": 16},
        "data": {"dataset": str(root / "shards"), "text_encoder": "minilm"},
        "optim": {"lr": 0.002, "warmup_steps": 2},
        "train": {"steps": 8, "batch": 12, "log_every": 4, "checkpoint_every": 100, "threads": 1,
                  "ema_decays": [0.9]},
        "sample": {"steps": 4, "n": 4, "solver": "euler"},
    }
    run = root / "run"
    Trainer(resolve(config), run, progress=False).fit()
    return run
