"""Draw many images from a denoiser in batches, each sample from its own seed, with chosen class labels."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from difflab.conditioning import NULL_CLASS
from difflab.sampling.sample import sample

# Per-sample inputs (batch 1 for all samples, or n): pictures that steer each sample (difflab.control) and prompts.
PER_SAMPLE = ("init", "mask", "control", "concat", "text", "text_mask")


def class_labels(n: int, class_label: int | str | None, num_classes: int) -> torch.Tensor | None:
    """Labels for n samples: one class, ``"balanced"`` (0, 1, ..., K-1, 0, ...), or the null class (None)."""
    if not num_classes:
        if class_label is not None:
            raise ValueError("this model is not class-conditional, so it takes no class label")
        return None
    if class_label is None:
        return torch.full((n,), NULL_CLASS, dtype=torch.long)
    if class_label == "balanced":
        return torch.arange(n) % num_classes
    if not isinstance(class_label, int) or not 0 <= class_label < num_classes:
        raise ValueError(f"class label must be 0..{num_classes - 1} or 'balanced', got {class_label!r}")
    return torch.full((n,), class_label, dtype=torch.long)


_SOLVER_SEED = 2**40  # offsets the seeds of a stochastic solver's noise from those of the starting noise


@torch.no_grad()
def generate(
    denoiser: Callable[..., torch.Tensor],
    shape: tuple[int, ...],
    n: int,
    *,
    num_classes: int = 0,
    class_label: int | str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    progress: bool = False,
    noise: torch.Tensor | None = None,
    indices: range | None = None,
    **sampling,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images clamped to [-1, 1] (n, *shape), labels or None). Sample i uses seed ``seed + i``, so the
    images do not depend on the batch size. ``sampling`` goes to :func:`difflab.sampling.sample`; its per-sample
    pictures (``init``, ``mask``, ``control``, ``concat``) are one for all samples (batch 1) or one per sample
    (batch n), as are prompts' ``text`` and ``text_mask``. ``noise`` (1 or n, *shape) replaces the seeds' starting
    noise, e.g. an inverted image's (:func:`difflab.control.invert`) to edit it with another label. A stochastic
    solver's noise also comes from the sample's seed, so sample i is the same alone or in any batch, and
    ``indices`` (a range within ``range(n)``, default all of it) makes only those samples and their labels: one
    process's share when several sample together."""
    labels = class_labels(n, class_label, num_classes)
    if noise is not None and (noise.shape[0] not in (1, n) or tuple(noise.shape[1:]) != tuple(shape)):
        raise ValueError(f"noise of shape {tuple(noise.shape)} does not fit {n} samples of shape {tuple(shape)}")
    per_sample = {key: sampling.pop(key) for key in PER_SAMPLE if sampling.get(key) is not None}
    for key, value in per_sample.items():
        if value.shape[0] not in (1, n):
            raise ValueError(f"{key} must hold 1 or {n} rows, got {value.shape[0]}")
    indices = range(n) if indices is None else indices
    if indices.step != 1 or not 0 <= indices.start <= indices.stop <= n:
        raise ValueError(f"indices must be a contiguous range within range({n}), got {indices}")
    out = []
    for start in tqdm(range(indices.start, indices.stop, batch_size), disable=not progress, desc="sampling",
                      unit="batch"):
        count = min(batch_size, indices.stop - start)
        for key, value in per_sample.items():
            part = value.expand(count, *value.shape[1:]) if value.shape[0] == 1 else value[start : start + count]
            sampling[key] = part.to(device)
        if noise is None:
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(count)]
            start_noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
        else:
            start_noise = noise.expand(count, *shape) if noise.shape[0] == 1 else noise[start : start + count]
        cond = {} if labels is None else {"class_labels": labels[start : start + count].to(device)}
        stochastic = [torch.Generator(device).manual_seed(_SOLVER_SEED + seed + start + i) for i in range(count)]
        out.append(sample(denoiser, start_noise.to(device), generator=stochastic, **sampling, **cond)
                   .clamp(-1, 1).cpu())
    images = torch.cat(out) if out else torch.empty(0, *shape)  # a process with no share
    return images, None if labels is None else labels[indices.start : indices.stop]
