"""The served model: a text-conditional run directory behind :class:`difflab.serve.app.Backend`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from difflab.evaluation.plots import to_uint8
from difflab.sampling import SOLVERS
from difflab.training.run import Run, draw, load_run

DEFAULT_GUIDANCE = 4.0
MAX_STEPS = 200


class RunBackend:
    """A text-to-image run loaded once (EMA weights, on ``device``); every request goes through :func:`draw`, so
    the server makes exactly what ``difflab sample --prompt`` makes for the same settings and seed."""

    def __init__(self, run: Run, name: str):
        if not run.config.model.get("text_dim"):
            raise ValueError(f"{name} is not a text-to-image run (trained without data.text_encoder): "
                             "difflab serve needs prompts to mean something")
        self.run = run
        s = run.config.sample
        self.info = {"run": name, "resolution": run.image_shape[-1], "solvers": sorted(SOLVERS),
                     "defaults": {"guidance": DEFAULT_GUIDANCE, "steps": s.steps, "solver": s.solver},
                     "max_steps": MAX_STEPS, "text": True}
        run.prompt_condition("warm up")  # loads the text encoder now, not during the first request

    @classmethod
    def load(cls, run_dir: str | Path, ema: str | None = None, device: str = "cpu") -> RunBackend:
        return cls(load_run(run_dir, ema=ema, device=device), Path(run_dir).name)

    def generate(self, *, prompt: str, negative_prompt: str, guidance: float, steps: int, solver: str, seed: int,
                 n: int, progress: Callable[[int, int], None]) -> list[Image.Image]:
        done = 0

        def on_step(info: dict) -> None:
            nonlocal done
            done += 1
            progress(min(done, steps), steps)

        # Unguided (w = 1) is the conditional model alone: one forward pass instead of two.
        guided = guidance != 1 or negative_prompt
        images, _ = draw(self.run, n, class_label=None, seed=seed, prompts=prompt,
                         negative_prompt=negative_prompt or None, guidance=guidance if guided else None,
                         steps=steps, solver=solver, callback=on_step)
        return [Image.fromarray(p.squeeze(-1) if p.shape[-1] == 1 else p).convert("RGB") for p in to_uint8(images)]
