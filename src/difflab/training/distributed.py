"""PyTorch's own distributed engine, as torchrun sets it up: process group, device, and the strategies of
``train.distributed``:

- ``ddp``: :class:`~torch.nn.parallel.DistributedDataParallel`. Every process holds the whole model; gradients are
  all-reduced in buckets of ``train.bucket_mb`` while the backward pass still runs (communication overlaps
  computation), as views into the buckets (``train.gradient_as_bucket_view``), with ``train.static_graph`` where
  the graph never changes, and compressed to bf16 by PyTorch's hook with ``train.reduce_precision=bfloat16``.
- ``fsdp``: FSDP2's ``fully_shard`` on every block (:func:`difflab.models.factory.blocks`) and then the root.
  Weights, gradients, optimizer state and EMAs are sharded over all processes; a block's weights are gathered just
  before it runs (the next block's are prefetched) and freed after.
- ``hsdp``: the same on a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh` (replicas x shard group): sharded
  inside groups of ``train.shard_size`` processes (one node by default), replicated across groups, so the weights'
  all-gathers stay on a node's fast links and only the gradient shards cross nodes.

FSDP's mixed-precision policy follows ``train.precision`` (bf16 gathered weights, fp32 master shards) and
``train.reduce_precision`` (the dtype gradients are reduced in).
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from difflab.models.factory import blocks

GLOO_DRAIN_SECONDS = 0.2  # see close_world


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


def close_world(world: World, clean: bool = True) -> None:
    """Leave the process group. Under gloo, a worker thread frees a finished collective's tensors after its
    ``wait()`` returns, and that needs the GIL; were the group destroyed in that moment (its destructor joins
    the workers while holding the GIL), the process would hang at exit. So a ``clean`` exit ends with a barrier
    and a pause with the GIL released, which lets the workers finish first. After an error (``clean=False``)
    another process may be inside a collective that will never match a barrier: leave at once."""
    if world.size > 1 and dist.is_initialized():
        if clean:
            dist.barrier()
            if dist.get_backend() == "gloo":
                time.sleep(GLOO_DRAIN_SECONDS)
        dist.destroy_process_group()


def shard_mesh(strategy: str, world: World, shard_size: int = 0):
    """The device mesh FSDP shards over: 1-D over all processes (fsdp), or (replicas, shard group) (hsdp)."""
    from torch.distributed.device_mesh import init_device_mesh

    if strategy == "fsdp":
        return init_device_mesh(world.device.type, (world.size,))
    shard = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    if world.size % shard:
        raise ValueError(f"train.shard_size {shard} does not divide the {world.size} processes (hsdp shards inside "
                         "groups of that many and replicates across them)")
    return init_device_mesh(world.device.type, (world.size // shard, shard), mesh_dim_names=("replicate", "shard"))


def wrap(network: nn.Module, train, world: World, unused_parameters: bool = False) -> nn.Module:
    """``network`` prepared for ``train.distributed`` (a :class:`~difflab.training.config.TrainConfig`) on this
    world; itself in a world of one. ``unused_parameters``: some steps leave parameters out (DDP must look for
    them; joint image-video training's image steps skip the temporal layers)."""
    if world.size == 1:
        return network
    if train.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if train.reduce_precision == "bfloat16" and world.device.type != "cuda":
            raise ValueError("train.reduce_precision=bfloat16 under ddp uses PyTorch's bf16 compression hook, which "
                             "needs NCCL (GPUs); use float32 here, or train.distributed=fsdp")
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        ddp = DistributedDataParallel(network, device_ids=device_ids, bucket_cap_mb=train.bucket_mb,
                                      gradient_as_bucket_view=train.gradient_as_bucket_view,
                                      static_graph=train.static_graph, find_unused_parameters=unused_parameters)
        if train.reduce_precision == "bfloat16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return ddp
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = torch.bfloat16
    policy = MixedPrecisionPolicy(param_dtype=bf16 if train.precision == "bfloat16" else None,
                                  reduce_dtype=bf16 if train.reduce_precision == "bfloat16" else torch.float32)
    mesh = shard_mesh(train.distributed, world, train.shard_size)
    for param in network.parameters():  # FSDP2 shards contiguous parameters only (not channels-last ones)
        param.data = param.data.contiguous()
    for block in blocks(network):  # one shard group per transformer block / U-Net unit
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(network, mesh=mesh, mp_policy=policy)


def gradient_sync(model: nn.Module, last_round: bool):
    """The context of one accumulation round's backward pass. DDP all-reduces only in the last round. FSDP
    reduce-scatters in every round (so the gradients stay sharded); HSDP also, but all-reduces the shards across
    replicas only in the last round. Anything else: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule) and next(model.parameters()).device_mesh.ndim == 2:
        model.set_requires_all_reduce(last_round)
    elif hasattr(model, "no_sync") and not last_round:
        return model.no_sync()
    return nullcontext()


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Whether this is the first (or only) process: the one that writes shared results."""
    return not _joined() or dist.get_rank() == 0


def share(n: int) -> range:
    """This process's contiguous share of ``n`` items when processes work together (a process group is initialised,
    e.g. ``difflab sample`` under torchrun), else all of them."""
    if not _joined():
        return range(n)
    rank, size = dist.get_rank(), dist.get_world_size()
    return range(n * rank // size, n * (rank + 1) // size)


def gather_shares(part: torch.Tensor, n: int) -> torch.Tensor:
    """Every process's :func:`share` of ``n`` rows (``part`` is this process's), in order, on every process (on
    the CPU); ``part`` itself in a world of one."""
    if not _joined():
        return part
    size = dist.get_world_size()
    lengths = [n * (r + 1) // size - n * r // size for r in range(size)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else part.device
    padded = torch.zeros(max(lengths), *part.shape[1:], dtype=part.dtype, device=device)
    padded[: part.shape[0]] = part
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(pieces, padded)
    return torch.cat([piece[:length] for piece, length in zip(pieces, lengths)]).cpu()
