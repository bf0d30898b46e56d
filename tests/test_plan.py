"""The distributed-training planner: its memory and communication model by hand, and its recommendation."""

from pathlib import Path

import pytest

from difflab.cli import main
from difflab.models import build_network
from difflab.training.plan import GIB, estimate, network_facts, plan, recommend

TINY = {"arch": "unet", "channels": 16, "channel_mult": [1, 2], "blocks_per_level": 1, "attention_resolutions": [],
        "head_dim": 16, "in_channels": 1, "resolution": 8}
DIGITS = str(Path(__file__).parents[1] / "configs" / "digits.yaml")
FACTS = {"parameters": 1_000_000, "largest_unit": 100_000, "activation_bytes": 1_000}


def test_network_facts_count_parameters_and_the_largest_unit():
    facts = network_facts(TINY)
    network = build_network(TINY)
    assert facts["parameters"] == sum(p.numel() for p in network.parameters())
    assert 0 < facts["largest_unit"] < facts["parameters"] and facts["activation_bytes"] > 0


def test_memory_is_whole_under_ddp_and_divided_by_the_shard_group_under_fsdp_and_hsdp():
    p = FACTS["parameters"]
    one = estimate(FACTS, "ddp", gpus=1, gpus_per_node=8, gpu_memory=GIB, batch=64, emas=2, runtime_memory=1000)
    assert one.memory == {"weights": 4 * p, "gradients": 4 * p, "optimizer": 8 * p, "ema": 8 * p,
                          "activations": 64_000, "buckets": 0.0, "runtime": 1000, "total": 24 * p + 65_000}
    ddp = estimate(FACTS, "ddp", gpus=16, gpus_per_node=8, gpu_memory=GIB, batch=64)
    assert ddp.memory["buckets"] == 0 and ddp.memory["activations"] == 4_000  # gradients are views into buckets
    copies = estimate(FACTS, "ddp", gpus=16, gpus_per_node=8, gpu_memory=GIB, batch=64, bucket_view=False)
    assert copies.memory["buckets"] == 4 * p
    fsdp = estimate(FACTS, "fsdp", gpus=16, gpus_per_node=8, gpu_memory=GIB, batch=64)
    hsdp = estimate(FACTS, "hsdp", gpus=16, gpus_per_node=8, gpu_memory=GIB, batch=64)
    assert fsdp.memory["optimizer"] == 8 * p / 16 and hsdp.memory["optimizer"] == 8 * p / 8
    assert fsdp.memory["gathered"] == 2 * 4 * FACTS["largest_unit"]
    bf16 = estimate(FACTS, "fsdp", gpus=16, gpus_per_node=8, gpu_memory=GIB, batch=64, precision="bfloat16")
    assert bf16.memory["activations"] == fsdp.memory["activations"] / 2
    assert bf16.memory["gathered"] == fsdp.memory["gathered"] / 2  # weights gathered in bf16


def test_communication_follows_the_ring_collectives():
    p, n = FACTS["parameters"], 16
    ddp = estimate(FACTS, "ddp", gpus=n, gpus_per_node=8, gpu_memory=GIB, batch=64)
    assert (ddp.intra_node_bytes, ddp.inter_node_bytes) == (0.0, pytest.approx(2 * (n - 1) / n * 4 * p))
    fsdp = estimate(FACTS, "fsdp", gpus=n, gpus_per_node=8, gpu_memory=GIB, batch=64, accumulation=2)
    assert fsdp.inter_node_bytes == pytest.approx(2 * (2 + 1) * (n - 1) / n * 4 * p)  # gathers, scatter per round
    hsdp = estimate(FACTS, "hsdp", gpus=n, gpus_per_node=8, gpu_memory=GIB, batch=64)
    assert hsdp.intra_node_bytes == pytest.approx(3 * 7 / 8 * 4 * p)
    assert hsdp.inter_node_bytes == pytest.approx(2 * 1 / 2 * 4 * p / 8)  # all-reduce of the shards over 2 nodes
    single = estimate(FACTS, "ddp", gpus=8, gpus_per_node=8, gpu_memory=GIB, batch=64)
    assert single.inter_node_bytes == 0 and single.intra_node_bytes == pytest.approx(2 * 7 / 8 * 4 * p)


def test_known_models_take_their_published_sizes():
    """DiT-S/2 and DiT-B/2 of the DiT paper (33 M and 130 M parameters); per device under DDP, fp32 weights,
    gradients, AdamW and one EMA take 20 bytes a parameter."""
    for preset, millions in (("dit_s_2", 33), ("dit_b_2", 130)):
        facts, (ddp,), _ = plan({"preset": preset}, gpus=1, gpu_memory_gib=80, batch=8)
        assert facts["parameters"] / 1e6 == pytest.approx(millions, rel=0.02)
        persistent = sum(ddp.memory[k] for k in ("weights", "gradients", "optimizer", "ema"))
        assert persistent == 20 * facts["parameters"]


def test_the_recommendation_minimises_communication_among_strategies_that_fit():
    _, estimates, best = plan(TINY, gpus=8, gpu_memory_gib=80, batch=64)
    assert [e.strategy for e in estimates] == ["ddp", "fsdp"] and best.strategy == "ddp"  # 2 vs 3 passes
    _, estimates, best = plan(TINY, gpus=32, gpu_memory_gib=80, batch=64)
    assert best.strategy == "hsdp"  # between nodes only the gradient shards travel
    ddp = next(e for e in estimates if e.strategy == "ddp")
    tight = (ddp.memory["total"] - 1) / GIB  # DDP no longer fits, the sharded ones do
    _, _, best = plan(TINY, gpus=8, gpu_memory_gib=tight, batch=64)
    assert best.strategy == "fsdp"
    assert recommend([estimate(FACTS, "ddp", gpus=2, gpus_per_node=8, gpu_memory=1, batch=2)]) is None


def test_plan_errors_and_the_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not split"):
        estimate(FACTS, "ddp", gpus=3, gpus_per_node=8, gpu_memory=GIB, batch=64)
    with pytest.raises(ValueError, match="strategy must be"):
        estimate(FACTS, "zero3", gpus=2, gpus_per_node=8, gpu_memory=GIB, batch=64)
    assert main(["plan", DIGITS, "--gpus", "16", "--gpu-memory", "80"]) == 0
    out = capsys.readouterr().out
    assert "recommended: hsdp" in out and "ddp" in out and "fsdp" in out
    assert main(["plan", "dit_s_2", "--gpus", "2", "--gpu-memory", "0.001", "--batch", "4"]) == 1
    assert "no strategy fits" in capsys.readouterr().out
    assert main(["plan", DIGITS, "--gpus", "3", "--gpu-memory", "80"]) == 2
    assert "does not split over 3 devices" in capsys.readouterr().err
