"""What a fine-tune of a base run minimises, one trainer objective per method (``training/objectives.py`` has the
interface): the base run's denoising loss, with the base weights loaded and (but for the trained part) frozen.

- ControlNet (Zhang et al. 2023): the U-Net's ControlNet copy starts from the base encoder and learns from (image,
  control picture) pairs made from the training images on the fly (:mod:`difflab.control.pictures`); everything
  else stays frozen.
- LoRA (Hu et al. 2021): low-rank updates of the base's layers learn from a handful of images; the base is frozen.
"""

from __future__ import annotations

import torch
from torch import nn

from difflab.config import ConfigError
from difflab.control.lora import LORA_KEY, add_lora
from difflab.control.pictures import CONTROL_PICTURES
from difflab.training.objectives import DiffusionObjective, Share


def load_base(network: nn.Module, base: str, allowed_missing: tuple[str, ...]) -> None:
    """Load a base run's weights into ``network``; only parameters under ``allowed_missing`` may be new."""
    from difflab.training.run import load_run

    state = load_run(base, device=next(network.parameters()).device).network.state_dict()
    try:
        missing, unexpected = network.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a parameter of another shape
        raise ConfigError(f"the model differs from the base run {base}: {str(exc).splitlines()[1].strip()}") from None
    new = [k for k in missing if not k.startswith(allowed_missing)]
    if new or unexpected:
        raise ConfigError(f"the model differs from the base run {base}: {', '.join((new + unexpected)[:4])} ...")


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

    def prepare(self, images: torch.Tensor, labels, draws: dict, share: Share):
        x0, noise, sigma, cond = super().prepare(images, labels, draws, share)
        return x0, noise, sigma, {**cond, "control": self.picture(images)}


class LoRAObjective(DiffusionObjective):
    """Denoising on the fine-tune's images through the base with LoRA layers; only the adapters learn."""

    def __init__(self, config, network: nn.Module, generator: torch.Generator, num_classes: int, encoder=None):
        super().__init__(config, network, generator, num_classes, encoder)
        load_base(network, config.control.base, ())
        c = config.control
        add_lora(network, c.rank, c.alpha, c.targets)
        for name, parameter in network.named_parameters():
            parameter.requires_grad_(LORA_KEY in name)


OBJECTIVES = {"controlnet": ControlNetObjective, "lora": LoRAObjective}
