"""PyTorch's own distributed engine, as torchrun sets it up: process group, device, DDP or FSDP2 wrapping."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a Python number over all processes."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.size

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any."""
        if self.size == 1:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())


def init_world() -> World:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPUs), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank() if size > 1 else 0, size, device)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(network: nn.Module, strategy: str, world: World) -> nn.Module:
    """Data-parallel (DDP) or fully sharded (FSDP2 ``fully_shard`` per block, then the root) training."""
    if world.size == 1:
        return network
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for param in network.parameters():  # FSDP2 shards contiguous parameters only (not channels-last ones)
        param.data = param.data.contiguous()
    for module in network.modules():
        if type(module).__name__ in ("DiTBlock", "Unit"):  # one shard group per transformer block / U-Net unit
            fully_shard(module)
    return fully_shard(network)
