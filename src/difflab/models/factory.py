"""Build any network from a config mapping, named presets, and a network's cost (parameters, FLOPs, memory)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.utils import flop_counter

from difflab.config import ConfigError, build, load_yaml, to_dict
from difflab.models.dit import DIT_SIZES, DiT, DiTConfig
from difflab.models.unet import UNet, UNetConfig


def architectures() -> dict[str, tuple[type[nn.Module], type]]:
    """Every network family by its ``arch`` name: (network, config). The autoencoder's module builds on this
    package's layers, so it is imported here, at the first call, rather than at import time."""
    from difflab.representation.autoencoder import Autoencoder, AutoencoderConfig

    return {"unet": (UNet, UNetConfig), "dit": (DiT, DiTConfig), "autoencoder": (Autoencoder, AutoencoderConfig)}


PRESETS: dict[str, dict] = {
    # Small enough for CPU tests and the demo.
    "unet_tiny": dict(arch="unet", resolution=16, channels=32, channel_mult=(1, 2), attention_resolutions=(8,)),
    "dit_tiny": dict(arch="dit", resolution=16, hidden=64, depth=2, heads=4),
    # ADM's 32x32 U-Net family (Dhariwal & Nichol 2021), pixel space.
    "unet_32": dict(arch="unet", resolution=32, channels=128, channel_mult=(1, 2, 2, 2), attention_resolutions=(16,)),
    "unet_64": dict(arch="unet", resolution=64, channels=128, channel_mult=(1, 2, 3, 4), blocks_per_level=3,
                    attention_resolutions=(32, 16, 8)),
    # DiT-S/2 ... DiT-XL/8 on 32x32x4 latents (256x256 images through an 8x autoencoder).
    **{f"dit_{size}_{patch}": dict(arch="dit", resolution=32, in_channels=4, patch_size=patch, hidden=hidden,
                                   depth=depth, heads=heads)
       for size, (hidden, depth, heads) in DIT_SIZES.items() for patch in (2, 4, 8)},
}


def network_config(mapping: Mapping | str) -> UNetConfig | DiTConfig:
    """Resolve a preset name or a mapping (``arch`` or ``preset`` plus overrides) into a validated config."""
    mapping = {"preset": mapping} if isinstance(mapping, str) else dict(mapping)
    if "preset" in mapping:
        name = mapping.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        mapping = {**PRESETS[name], **mapping}
    arch = mapping.pop("arch", None)
    families = architectures()
    if arch not in families:
        raise ConfigError(f"model config needs arch: one of {', '.join(families)} (or a preset), got {arch!r}")
    return build(families[arch][1], mapping, prefix=arch)


def network_mapping(config: UNetConfig | DiTConfig) -> dict:
    """The complete mapping (``arch`` plus every field) that :func:`network_config` turns back into ``config``."""
    arch = next(name for name, (_, cfg) in architectures().items() if isinstance(config, cfg))
    return {"arch": arch, **to_dict(config)}


def build_network(mapping: Mapping | str | UNetConfig | DiTConfig) -> nn.Module:
    """The network a config describes: ``build_network("dit_s_2")`` or ``build_network({"arch": "unet", ...})``."""
    config = mapping if dataclasses.is_dataclass(mapping) else network_config(mapping)
    network_type = next(net for net, cfg in architectures().values() if isinstance(config, cfg))
    return network_type(config)


def blocks(network: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a network (DiT blocks, U-Net units): what FSDP shards, ``compile="blocks"`` compiles
    and activation checkpointing recomputes one at a time."""
    return [m for m in network.modules() if type(m).__name__ in ("DiTBlock", "Unit")]


def load_config_file(path: str | Path) -> dict:
    """A model mapping from a YAML file: its ``model:`` section, or the whole file."""
    data = load_yaml(path)
    model = data.get("model", data)
    if not isinstance(model, dict):
        raise ConfigError(f"config {str(path)!r}: model must be a mapping")
    return model


def example_inputs(config: UNetConfig | DiTConfig, batch: int = 1, text_tokens: int = 77) -> tuple[tuple, dict]:
    """Random inputs of the right shapes for a network: ((x, c_noise), conditioning)."""
    frames = (config.frames,) if config.frames else ()
    spatial = (*frames, config.resolution, config.resolution)
    x = torch.randn(batch, config.in_channels, *spatial)
    cond = {}
    if config.num_classes:
        cond["class_labels"] = torch.zeros(batch, dtype=torch.long)
    if config.text_dim:
        cond["text"] = torch.randn(batch, text_tokens, config.text_dim)
    if config.concat_channels:
        cond["concat"] = torch.randn(batch, config.concat_channels, *spatial)
    return (x, torch.zeros(batch)), cond


# FlopCounterMode knows the GPU attention kernels but not PyTorch's CPU flash attention; count it the same way.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(grad, q, k, v),
}


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts attention on the CPU (use for every FLOP figure)."""
    return flop_counter.FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)


def model_info(mapping, batch: int = 1, text_tokens: int = 77) -> dict:
    """Parameters, FLOPs per sample (forward; forward + backward) and activation memory per sample.

    FLOPs are counted by :func:`flop_counter_mode` (matmuls, convolutions, attention);
    activation memory is the size of the tensors autograd saves for the backward pass, parameters excluded.
    """
    config = mapping if dataclasses.is_dataclass(mapping) else network_config(mapping)
    if not hasattr(config, "resolution"):
        raise ValueError(f"model-info measures denoisers (unet, dit); {type(config).__name__} has no fixed input size")
    network = build_network(config)
    args, cond = example_inputs(config, batch, text_tokens)
    with torch.no_grad(), flop_counter_mode() as counter:
        network(*args, **cond)
    forward_flops = counter.get_total_flops()
    with flop_counter_mode() as counter:
        network(*args, **cond).square().mean().backward()
    train_flops = counter.get_total_flops()
    network.zero_grad(set_to_none=True)
    return {
        "arch": type(network).__name__,
        "input_shape": list(args[0].shape[1:]),
        "parameters": sum(p.numel() for p in network.parameters()),
        "forward_flops": forward_flops / batch,
        "train_flops": train_flops / batch,
        "activation_bytes": saved_activation_bytes(network, args, cond) / batch,
    }


def saved_activation_bytes(network: nn.Module, args: tuple, cond: dict) -> int:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in network.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = network(*args, **cond)
    del out
    return sum(storages.values())
