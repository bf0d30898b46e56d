"""LoRA (Hu et al. 2021, "LoRA: low-rank adaptation of large language models"; for diffusion, Ryu 2023):
personalisation and style fine-tunes as a low-rank update ``W + (alpha / rank) B A`` of chosen layers.

``B`` starts at zero, so a new adapter leaves the model unchanged. Training wraps the layers
(:func:`add_lora`) and learns only ``A`` and ``B``; the adapter is saved alone, a small safetensors file with its
rank, alpha and the architecture it belongs to (:func:`save_lora`), and at sampling time merged into a base
model's weights with a strength (:func:`merge_lora`), so it costs nothing per step. Convolutions get a
convolutional ``A`` (the layer's kernel, stride and padding) and a 1x1 ``B``, so merging is exact.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

import torch
from torch import nn

DEFAULT_TARGETS = ("down.*", "mid.*", "up.*", "blocks.*")  # U-Net units, DiT blocks: not embeddings or input/output
LORA_KEY = ".lora_"


class LoRA(nn.Module):
    """A frozen linear or 2-D convolution layer plus ``(alpha / rank) * B(A(x))``."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       base.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.to(base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * self.lora_up(self.lora_down(x))


def add_lora(network: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every Linear and Conv2d whose qualified name matches a ``targets`` pattern (fnmatch) in :class:`LoRA`;
    ControlNets are left alone. Returns the wrapped names."""
    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, got rank {rank} and alpha {alpha}")
    names = [name for name, module in network.named_modules()
             if isinstance(module, nn.Linear | nn.Conv2d) and not name.startswith("controlnets.")
             and any(fnmatch.fnmatchcase(name, pattern) for pattern in targets)]
    if not names:
        raise ValueError(f"no Linear or Conv2d layer matches the LoRA targets {list(targets)}")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = network.get_submodule(parent) if parent else network
        setattr(owner, child, LoRA(getattr(owner, child), rank, alpha))
    return names


def lora_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter's tensors, under their names in the wrapped network."""
    return {k: v for k, v in network.state_dict().items() if LORA_KEY in k}


def save_lora(path: str | Path, state: dict[str, torch.Tensor], rank: int, alpha: float, model: dict) -> Path:
    """Write an adapter (``state`` from :func:`lora_state_dict`) with what it needs to be merged later."""
    from difflab.paths import replacing
    from difflab.training.checkpoint import save_tensors

    path = Path(path)
    adapter = {k: v for k, v in state.items() if LORA_KEY in k}
    metadata = {"format": "difflab-lora", "rank": str(rank), "alpha": str(alpha),
                "model": json.dumps(_architecture(model), sort_keys=True)}
    with replacing(path) as tmp:
        save_tensors(tmp, adapter, metadata)
    return path


def merge_lora(network: nn.Module, model: dict, path: str | Path, strength: float = 1.0) -> None:
    """Add ``strength`` times the adapter at ``path`` into ``network``'s weights (a plain network of the config
    mapping ``model``); one line of error if the file is not an adapter for this architecture."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as exc:
        raise ValueError(f"{path}: not a safetensors file ({exc})") from None
    if metadata.get("format") != "difflab-lora":
        raise ValueError(f"{path} is not a difflab LoRA file (no difflab-lora metadata)")
    if json.loads(metadata["model"]) != _architecture(model):
        raise ValueError(f"the LoRA {path} was trained for another model architecture")
    scale = float(metadata["alpha"]) / float(metadata["rank"])
    layers = {k.rsplit(LORA_KEY, 1)[0] for k in tensors}
    with torch.no_grad():
        for name in sorted(layers):
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            layer = network.get_submodule(name)
            layer = layer.base if isinstance(layer, LoRA) else layer  # a LoRA run's own adapter stays separate
            if isinstance(layer, nn.Linear):
                delta = up @ down
            else:
                delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
            layer.weight.add_((strength * scale * delta).to(layer.weight))


def _architecture(model: dict) -> dict:
    """The keys of a model mapping that fix the weights' shapes and meaning (not ControlNets or checkpointing)."""
    return {k: v for k, v in model.items() if k not in ("controls", "control_downsample", "checkpointing")}
