"""``difflab finetune``: a trained base run in, a fine-tuned run directory out, trained by the one trainer.

The fine-tune's config is its base's (model, data, encoder, conditioning, optimizer) with a ``control:`` section
naming the method and the base, so ``difflab sample`` uses it like any run:

- ``controlnet``: the base U-Net plus one ControlNet (``model.controls``) for control pictures of ``kind`` (sobel
  edges, silhouette masks, low-resolution images), trained on pictures made from the base's training images.
  Sample it with ``--control PICTURE``; several ControlNets of one base combine with ``--control-run``.
- ``lora``: low-rank adapters on the frozen base, trained on ``data`` (a handful of images: an image folder,
  sharded into ``OUT/data`` at the base's size, unlabelled, so the adapter learns the model's unconditional
  mode; or a shard folder or built-in set). The adapter alone is written to ``OUT/lora.safetensors`` (from the
  sampling EMA) for ``difflab sample BASE --lora OUT/lora.safetensors:STRENGTH``; ``OUT`` itself samples the
  base with the adapter at strength 1.
- ``inpaint``: the whole network learns to inpaint from random boxes, with the mask and the masked sample as extra
  input channels (zero-initialised, so it starts as the base); sample it with ``--init-image`` and ``--mask``.
"""

from __future__ import annotations

from pathlib import Path

from difflab.control.pictures import control_channels
from difflab.training.config import CONTROL_METHODS
from difflab.training.derive import base_mapping, train_derived


def finetune_mapping(base: Path, method: str, *, kind: str = "sobel", train_steps: int = 1000,
                     data: str | None = None) -> dict:
    """The config of a fine-tune of ``base`` (before ``--set`` overrides), trained on ``data`` (default: the base's
    data set)."""
    from difflab.training.run import load_run

    mapping = base_mapping(base)
    mapping["train"].update(steps=train_steps, sample_every=0, max_minutes=None)
    mapping["control"] = {"method": method, "base": str(base.resolve()), "kind": kind}
    if data is not None:
        mapping["data"]["dataset"] = data
    if method == "controlnet":
        if mapping["model"].get("arch") != "unet":
            raise ValueError("ControlNet needs a U-Net base run")
        run = load_run(base)
        channels, *_, size = run.image_shape
        mapping["model"].update(controls=[control_channels(kind, channels)],
                                control_downsample=size // run.sample_shape[-1])
    elif method == "inpaint":
        if mapping["model"].get("concat_channels"):
            raise ValueError("the base run already takes concatenated input channels")
        mapping["model"]["concat_channels"] = mapping["model"]["in_channels"] + 1  # the mask and the masked sample
    return mapping


def finetune(base: str | Path, method: str, out: str | Path, *, kind: str = "sobel", data: str | Path | None = None,
             train_steps: int = 1000, overrides: list[str] = (), resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune ``base`` into the run directory ``out`` (see the module docstring); returns it."""
    if method not in CONTROL_METHODS:
        raise ValueError(f"unknown fine-tune method {method!r}; choose one of {', '.join(CONTROL_METHODS)}")
    if train_steps < 1:
        raise ValueError(f"train_steps must be positive, got {train_steps}")
    base, out = Path(base), Path(out)
    if data is not None and Path(data).is_dir() and not (Path(data) / "index.json").is_file():
        data = _shard_folder(base, Path(data), out / "data")
    mapping = finetune_mapping(base, method, kind=kind, train_steps=train_steps,
                               data=None if data is None else str(data))
    train_derived(mapping, list(overrides), out, resume, progress)
    if method == "lora":
        _export_lora(out)
    return out


def _shard_folder(base: Path, folder: Path, shards: Path) -> Path:
    """An image folder as unlabelled shards at the base run's image size (kept when already written)."""
    from dataclasses import replace

    from difflab.data.shards import write_shards
    from difflab.data.sources import scan_folder
    from difflab.training.run import load_run

    if not (shards / "index.json").is_file():
        channels, *_, size = load_run(base).image_shape
        records = [replace(record, label=None) for record in scan_folder(folder)]
        write_shards(folder, records, shards, resolution=size, mode="L" if channels == 1 else "RGB")
    return shards


def _export_lora(out: Path) -> Path:
    """``OUT/lora.safetensors``: the adapter of the run's sampling weights."""
    from difflab.control.lora import lora_state_dict, save_lora
    from difflab.training.run import load_run

    run = load_run(out)
    c = run.config.control
    return save_lora(out / "lora.safetensors", lora_state_dict(run.network), c.rank, c.alpha, run.config.model)
