"""``difflab finetune``: a trained base run in, a fine-tuned run directory out, trained by the one trainer.

The fine-tune's config is its base's (model, data, encoder, conditioning, optimizer) with a ``control:`` section
naming the method and the base, so ``difflab sample`` uses it like any run:

- ``controlnet``: the base U-Net plus one ControlNet (``model.controls``) for control pictures of ``kind`` (sobel
  edges, silhouette masks, low-resolution images), trained on pictures made from the base's training images.
  Sample it with ``--control PICTURE``; several ControlNets of one base combine with ``--control-run``.
"""

from __future__ import annotations

from pathlib import Path

from difflab.control.pictures import control_channels
from difflab.training.config import CONTROL_METHODS
from difflab.training.derive import base_mapping, train_derived


def finetune_mapping(base: Path, method: str, *, kind: str = "sobel", train_steps: int = 1000) -> dict:
    """The config of a fine-tune of ``base`` (before ``--set`` overrides)."""
    from difflab.training.run import load_run

    mapping = base_mapping(base)
    mapping["train"].update(steps=train_steps, sample_every=0, max_minutes=None)
    mapping["control"] = {"method": method, "base": str(base.resolve()), "kind": kind}
    if method == "controlnet":
        if mapping["model"].get("arch") != "unet":
            raise ValueError("ControlNet needs a U-Net base run")
        run = load_run(base)
        channels, *_, size = run.image_shape
        mapping["model"].update(controls=[control_channels(kind, channels)],
                                control_downsample=size // run.sample_shape[-1])
    return mapping


def finetune(base: str | Path, method: str, out: str | Path, *, kind: str = "sobel", train_steps: int = 1000,
             overrides: list[str] = (), resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune ``base`` into the run directory ``out`` (see the module docstring); returns it."""
    if method not in CONTROL_METHODS:
        raise ValueError(f"unknown fine-tune method {method!r}; choose one of {', '.join(CONTROL_METHODS)}")
    if train_steps < 1:
        raise ValueError(f"train_steps must be positive, got {train_steps}")
    base, out = Path(base), Path(out)
    train_derived(finetune_mapping(base, method, kind=kind, train_steps=train_steps), list(overrides), out, resume,
                  progress)
    return out
