"""What a fine-tune of a base run minimises, one trainer objective per method (``training/objectives.py`` has the
interface): the base run's denoising loss, with the base weights loaded and (but for the trained part) frozen.

- ControlNet (Zhang et al. 2023): the U-Net's ControlNet copy starts from the base encoder and learns from (image,
  control picture) pairs made from the training images on the fly (:mod:`difflab.control.pictures`); everything
  else stays frozen.
- LoRA (Hu et al. 2021): low-rank updates of the base's layers learn from a handful of images; the base is frozen.
- Mask-conditioned inpainting (as Stable Diffusion's inpainting model, Rombach et al. 2022): the network also sees
  the mask and the masked sample as extra input channels, zero-initialised, and learns on random boxes.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.config import ConfigError
from difflab.control.lora import LORA_KEY, add_lora
from difflab.control.pictures import CONTROL_PICTURES
from difflab.data import Batch
from difflab.training.objectives import DiffusionObjective, Share, start_from_run


def load_base(network: nn.Module, base: str, allowed_missing: tuple[str, ...], widen_inputs: bool = False) -> None:
    """Start ``network`` from a base run's sampling weights (see :func:`~difflab.training.objectives.start_from`)."""
    start_from_run(network, base, f"the model differs from the base run {base}", allowed_missing, widen_inputs)


class ControlNetObjective(DiffusionObjective):
    """Denoising with the control picture of each training image as ``control=``; only the ControlNet learns."""

    def __init__(self, config, network: nn.Module, generator: torch.Generator, num_classes: int, encoder=None):
        super().__init__(config, network, generator, num_classes, encoder)
        if len(getattr(network, "controlnets", ())) != 1:
            raise ConfigError("a ControlNet fine-tune needs a U-Net with one ControlNet (model.controls: [channels])")
        if config.data.encoder and encoder is None:
            raise ConfigError("a ControlNet learns from images: train on the images with data.encoder (encoded on "
                              "the fly), not on cached latents")
        load_base(network, config.control.base, ("controlnets.",))
        network.controlnets[0].copy_encoder(network)
        network.requires_grad_(False)
        network.controlnets.requires_grad_(True)
        self.picture = CONTROL_PICTURES[config.control.kind]

    def prepare(self, batch: Batch, draws: dict, share: Share):
        x0, noise, sigma, cond = super().prepare(batch, draws, share)
        return x0, noise, sigma, {**cond, "control": self.picture(batch.images)}


class LoRAObjective(DiffusionObjective):
    """Denoising on the fine-tune's images through the base with LoRA layers; only the adapters learn."""

    def __init__(self, config, network: nn.Module, generator: torch.Generator, num_classes: int, encoder=None):
        super().__init__(config, network, generator, num_classes, encoder)
        load_base(network, config.control.base, ())
        c = config.control
        add_lora(network, c.rank, c.alpha, c.targets)
        for name, parameter in network.named_parameters():
            parameter.requires_grad_(LORA_KEY in name)


class InpaintObjective(DiffusionObjective):
    """Denoising with ``concat=`` (mask, masked sample) for random boxes (1 = generated, 0 = kept); the whole
    network learns, from the base's weights with zero weights for the new input channels."""

    def __init__(self, config, network: nn.Module, generator: torch.Generator, num_classes: int, encoder=None):
        super().__init__(config, network, generator, num_classes, encoder)
        load_base(network, config.control.base, (), widen_inputs=True)

    def draw(self, batch: int, sample_shape, step: int) -> dict:
        if sample_shape is None:
            raise ConfigError("an inpainting fine-tune needs samples of one size (no aspect-ratio buckets)")
        return {**super().draw(batch, sample_shape, step), "masks": random_boxes(batch, sample_shape[-2:],
                                                                                  self.generator)}

    def prepare(self, batch: Batch, draws: dict, share: Share):
        x0, noise, sigma, cond = super().prepare(batch, draws, share)
        return x0, noise, sigma, {**cond, "concat": inpainting_input(x0, draws["masks"][share.whole].to(x0.device))}


def inpainting_input(known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What a mask-conditioned network sees besides x: the mask (1 = generate) and the known sample where it is
    kept (0 elsewhere), (B, 1 + C, H, W)."""
    mask = mask.to(known.dtype)
    return torch.cat([mask.expand(known.shape[0], 1, *known.shape[2:]), known * (1 - mask)], 1)


def random_boxes(batch: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(batch, 1, H, W) masks: one random box each, a quarter to all of each side (so some are everything)."""
    height, width = size
    extent = torch.rand(batch, 2, generator=generator) * 0.75 + 0.25
    corner = torch.rand(batch, 2, generator=generator)
    rows, cols = torch.arange(height)[None, :], torch.arange(width)[None, :]
    box_h, box_w = (extent[:, 0] * height).ceil()[:, None], (extent[:, 1] * width).ceil()[:, None]
    top, left = (corner[:, 0:1] * (height - box_h + 1)).floor(), (corner[:, 1:2] * (width - box_w + 1)).floor()
    inside_rows = (rows >= top) & (rows < top + box_h)
    inside_cols = (cols >= left) & (cols < left + box_w)
    return (inside_rows[:, :, None] & inside_cols[:, None, :]).float()[:, None]


OBJECTIVES = {"controlnet": ControlNetObjective, "lora": LoRAObjective, "inpaint": InpaintObjective}
