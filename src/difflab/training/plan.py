"""A planner for distributed training: memory per device and communication per step of DDP, FSDP2 and HSDP.

``difflab plan CONFIG --gpus 64 --gpu-memory 80`` counts the network's parameters and measures the activations
one sample saves for the backward pass (``difflab.models.factory.saved_activation_bytes``, on the CPU), then
models each strategy:

- **memory per device**: fp32 master weights, gradients, AdamW's two moments and the EMAs (whole under DDP,
  divided by the shard group under FSDP and HSDP, which then also hold one unit's gathered weights, twice for
  prefetch), DDP's gradient buckets (unless the gradients are views into them), and the activations of the
  device's micro-batch (bf16 autocast saves about half), plus the runtime's own memory (CUDA context, NCCL,
  workspaces: 1 GiB unless told otherwise); ``benchmarks/scaling.py`` checks the sum against measured peaks;
- **communication per step per device**, as ring collectives send it: DDP all-reduces the gradients once per
  step (2 (N-1)/N of them); FSDP all-gathers the weights for the forward and again for the backward of every
  accumulation round and reduce-scatters the gradients after it ((N-1)/N each; the gradients stay sharded);
  HSDP does FSDP's inside a node and all-reduces the gradient shards across nodes once per step
  (:func:`difflab.training.distributed.gradient_sync`).

The recommendation follows the field's rule of thumb, minimise communication between devices: of the strategies
that fit in memory, the one with the least estimated communication time, where bytes between nodes cost
``intra_bandwidth / inter_bandwidth`` times more than bytes inside a node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from difflab.models.factory import blocks, build_network, example_inputs, network_config, saved_activation_bytes

STRATEGIES = ("ddp", "fsdp", "hsdp")
ADAMW_STATE = 2  # fp32 tensors per parameter: first and second moment
BF16_ACTIVATION_SHARE = 0.5  # what autocast keeps of the fp32 activations: the matmul inputs are saved in bf16
GIB = 2**30
RUNTIME_MEMORY = 1.0 * GIB  # per GPU: CUDA context, NCCL buffers, cuBLAS/cuDNN workspaces (a typical figure)


@dataclass(frozen=True)
class Estimate:
    strategy: str
    memory: dict  # bytes per device by kind, and "total"
    intra_node_bytes: float  # sent per device per step inside a node
    inter_node_bytes: float  # ... and between nodes
    communication_seconds: float
    fits: bool


def _ring(group: int) -> float:
    """The share of a tensor each device sends in a ring all-gather or reduce-scatter of ``group`` devices."""
    return (group - 1) / group if group > 1 else 0.0


def network_facts(model: dict, text_tokens: int = 77) -> dict:
    """Parameters, the largest FSDP unit's parameters (a U-Net unit or DiT block) and activation bytes per sample."""
    config = network_config(model)
    network = build_network(config)
    parameters = sum(p.numel() for p in network.parameters())
    largest = max((sum(p.numel() for p in unit.parameters()) for unit in blocks(network)), default=parameters)
    args, cond = example_inputs(config, 1, text_tokens)
    return {"parameters": parameters, "largest_unit": largest,
            "activation_bytes": saved_activation_bytes(network, args, cond)}


def estimate(facts: dict, strategy: str, *, gpus: int, gpus_per_node: int, gpu_memory: float, batch: int,
             accumulation: int = 1, precision: str = "float32", emas: int = 1, bucket_view: bool = True,
             runtime_memory: float = RUNTIME_MEMORY, intra_bandwidth: float = 450e9,
             inter_bandwidth: float = 50e9) -> Estimate:
    """One strategy's :class:`Estimate` (``gpu_memory``, ``runtime_memory`` and the bandwidths in bytes and bytes
    per second). ``bucket_view``: DDP's gradients are views into its buckets (``train.gradient_as_bucket_view``),
    not a copy. ``runtime_memory``: what the framework holds besides tensors (CUDA context, NCCL, workspaces)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if batch % (gpus * accumulation):
        raise ValueError(f"batch {batch} does not split over {gpus} devices x {accumulation} accumulation rounds")
    p, bf16 = facts["parameters"], precision == "bfloat16"
    nodes = math.ceil(gpus / gpus_per_node)
    local = min(gpus, gpus_per_node)
    shard = {"ddp": 1, "fsdp": gpus, "hsdp": local}[strategy]
    compute_bytes = 2 if bf16 else 4  # weights as the forward sees them, and gradients as they are reduced
    memory = {
        "weights": 4 * p / shard,
        "gradients": 4 * p / shard,
        "optimizer": 4 * ADAMW_STATE * p / shard,
        "ema": 4 * emas * p / shard,
        "activations": facts["activation_bytes"] * batch / (gpus * accumulation) * (BF16_ACTIVATION_SHARE if bf16
                                                                                    else 1.0),
    }
    if strategy == "ddp":
        memory["buckets"] = 4 * p if gpus > 1 and not bucket_view else 0.0  # DDP's flat buckets beside .grad
    else:
        memory["gathered"] = 2 * compute_bytes * facts["largest_unit"] if shard > 1 else 0.0  # current + prefetch
    memory["runtime"] = runtime_memory
    memory["total"] = sum(memory.values())

    weights, gradients = compute_bytes * p, compute_bytes * p
    if strategy == "ddp":
        volume = 2 * _ring(gpus) * gradients
        intra, inter = (volume, 0.0) if nodes == 1 else (0.0, volume)
    else:
        sharded = accumulation * (2 * _ring(shard) * weights + _ring(shard) * gradients)  # every round
        if strategy == "fsdp":
            intra, inter = (sharded, 0.0) if nodes == 1 else (0.0, sharded)
        else:
            intra, inter = sharded, 2 * _ring(nodes) * gradients / shard
    seconds = intra / intra_bandwidth + inter / inter_bandwidth
    return Estimate(strategy, memory, intra, inter, seconds, memory["total"] <= gpu_memory)


def recommend(estimates: list[Estimate]) -> Estimate | None:
    """The fitting estimate with the least communication time (ties: the least memory), or None if none fits."""
    fitting = [e for e in estimates if e.fits]
    return min(fitting, key=lambda e: (e.communication_seconds, e.memory["total"])) if fitting else None


def plan(model: dict, *, gpus: int, gpu_memory_gib: float, batch: int, gpus_per_node: int = 8,
         accumulation: int = 1, precision: str = "float32", emas: int = 1, bucket_view: bool = True,
         runtime_memory_gib: float = RUNTIME_MEMORY / GIB, text_tokens: int = 77,
         **bandwidths) -> tuple[dict, list[Estimate], Estimate | None]:
    """(network facts, an estimate per strategy, the recommended one) for training ``model`` on ``gpus`` devices."""
    if gpus < 1 or gpus_per_node < 1 or gpu_memory_gib <= 0:
        raise ValueError("gpus, gpus-per-node and gpu-memory must be positive")
    if runtime_memory_gib < 0:
        raise ValueError(f"runtime-memory must be >= 0, got {runtime_memory_gib:g}")
    facts = network_facts(model, text_tokens)
    strategies = ("ddp",) if gpus == 1 else ("ddp", "fsdp", "hsdp") if gpus > gpus_per_node else ("ddp", "fsdp")
    estimates = [estimate(facts, s, gpus=gpus, gpus_per_node=gpus_per_node, gpu_memory=gpu_memory_gib * GIB,
                          batch=batch, accumulation=accumulation, precision=precision, emas=emas,
                          bucket_view=bucket_view, runtime_memory=runtime_memory_gib * GIB, **bandwidths)
                 for s in strategies]
    return facts, estimates, recommend(estimates)
