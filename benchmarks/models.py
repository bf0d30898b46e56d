"""Training-step throughput: difflab's U-Net and DiT against diffusers' UNet2DModel and DiTTransformer2DModel.

For each pair of networks at the same widths, depths and attention placement it reports parameters,
FLOPs per image of a training step (forward + backward, counted by FlopCounterMode), the step rate of
forward + backward + AdamW (fused) at a fixed batch, the achieved GFLOP/s and its fraction of this
machine's matmul peak, and the peak tensor memory of a training step. The machine is shared and noisy,
so the two networks alternate step by step with a matmul-peak probe after each pair (A B P A B P ...):
the speed ratio and each network's share of the peak are medians of per-pair ratios, so a slow spell
on the machine slows numerator and denominator alike.

    .venv/bin/python benchmarks/models.py --json out/bench/models.json                 # CPU, float32
    python benchmarks/models.py --device cuda --dtype bfloat16 --compile --batch 256   # a GPU
    .venv/bin/python benchmarks/models.py --quick                                      # a one-minute check
    python benchmarks/models.py --cases dit_b --device cuda --dtype bfloat16 --compile --batch 256   # GPU MFU
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.models import build_network
from difflab.models.factory import flop_counter_mode
from output import write_json

# The two cases of the issue: a pixel U-Net for 32x32x3 images and DiT-S/2 for 16x16x4 latents.
CASES = {
    "unet": dict(
        title="U-Net, 32x32x3 images",
        difflab=dict(arch="unet", resolution=32, channels=64, channel_mult=(1, 2, 2), blocks_per_level=2,
                     attention_resolutions=(16,), head_dim=64),
        diffusers=("UNet2DModel", dict(
            sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(64, 128, 128),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=64,
            norm_num_groups=32, resnet_time_scale_shift="scale_shift")),
        shape=(3, 32, 32), classes=0,
    ),
    "dit": dict(
        title="DiT-S/2, 16x16x4 latents, 1000 classes",
        difflab=dict(arch="dit", resolution=16, in_channels=4, patch_size=2, hidden=384, depth=12, heads=6,
                     num_classes=1000),
        diffusers=("DiTTransformer2DModel", dict(
            num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=12,
            sample_size=16, patch_size=2, num_embeds_ada_norm=1000)),
        shape=(4, 16, 16), classes=1000,
    ),
    # The scaling issue's GPU case: images/s and model FLOPs utilisation in bf16 with torch.compile.
    "dit_b": dict(
        title="DiT-B/2, 32x32x4 latents, 1000 classes",
        difflab=dict(arch="dit", resolution=32, in_channels=4, patch_size=2, hidden=768, depth=12, heads=12,
                     num_classes=1000),
        diffusers=("DiTTransformer2DModel", dict(
            num_attention_heads=12, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=12,
            sample_size=32, patch_size=2, num_embeds_ada_norm=1000)),
        shape=(4, 32, 32), classes=1000,
    ),
}
# --quick: the same architectures, small enough for a test.
QUICK = {
    "unet": dict(difflab=dict(channels=32, channel_mult=(1, 2), attention_resolutions=(8,)), diffusers=dict(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32), resolution=16),
    "dit": dict(difflab=dict(hidden=64, depth=2, heads=2), diffusers=dict(
        num_attention_heads=2, attention_head_dim=32, num_layers=2), resolution=8),
}
QUICK["dit_b"] = QUICK["dit"]


def case_config(name: str, quick: bool) -> dict:
    case = dict(CASES[name])
    if quick:
        tweak = QUICK[name]
        res = tweak["resolution"]
        case["difflab"] = {**case["difflab"], **tweak["difflab"], "resolution": res}
        case["diffusers"] = (case["diffusers"][0], {**case["diffusers"][1], **tweak["diffusers"], "sample_size": res})
        case["shape"] = (case["shape"][0], res, res)
        case["title"] = f"{case['title'].split(',')[0]}, quick {res}x{res}"
    return case


def build(case: dict, system: str, device: torch.device) -> torch.nn.Module:
    if system == "difflab":
        return build_network(case["difflab"]).to(device)
    import diffusers

    class_name, kwargs = case["diffusers"]
    return getattr(diffusers, class_name)(**kwargs).to(device)


def make_step(model, system: str, case: dict, args, device: torch.device):
    """A closure running one forward + backward + AdamW step on a fixed batch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *case["shape"], generator=gen).to(device)
    target = torch.randn(args.batch, *case["shape"], generator=gen).to(device)
    timesteps = (torch.rand(args.batch, generator=gen) * 999).to(device)
    labels = torch.randint(0, case["classes"], (args.batch,), generator=gen).to(device) if case["classes"] else None
    if args.channels_last and x.ndim == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    network = torch.compile(model) if args.compile else model
    if system == "difflab":
        forward = lambda: network(x, timesteps, **({"class_labels": labels} if labels is not None else {}))  # noqa: E731
    elif labels is not None:
        forward = lambda: network(x, timestep=timesteps, class_labels=labels).sample  # noqa: E731
    else:
        forward = lambda: network(x, timesteps).sample  # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = getattr(torch, args.dtype)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = F.mse_loss(forward().float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, forward


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    """The best GFLOP/s of a few square matmuls in the benchmark's dtype: the machine's practical peak now."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / min(timed(lambda: a @ b, device) for _ in range(repeats)) / 1e9


def training_flops(step_forward, batch: int) -> float:
    """FLOPs per image of forward + backward, counted on one step."""
    with flop_counter_mode() as counter:
        step_forward().float().square().mean().backward()
    return counter.get_total_flops() / batch


def peak_memory(model, step) -> float:
    """Peak bytes of live tensors in a training step (weights, gradients, AdamW state, activations).

    Counted by torch's ``MemTracker``, which follows every tensor allocation on any device, so the figure
    does not depend on the allocator, on imports, or on the other network in the process.
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        step()
    return float(sum(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values()))


def run_case(name: str, args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    case = case_config(name, args.quick)
    torch.manual_seed(0)
    rows = {}
    for system in ("difflab", "diffusers"):
        model = build(case, system, device)
        step, forward = make_step(model, system, case, args, device)
        rows[system] = dict(
            model=model, step=step, parameters=sum(p.numel() for p in model.parameters()),
            flops=training_flops(forward, args.batch) if not args.compile else None, times=[],
        )
        model.zero_grad(set_to_none=True)
    if args.compile:  # count on the eager modules; compiled graphs hide their operators
        for system in rows:
            _, forward = make_step(build(case, system, device), system, case, args, device)
            rows[system]["flops"] = training_flops(forward, args.batch)
    for _ in range(args.warmup):
        for row in rows.values():
            row["step"]()
    matmul_peak(device, dtype, args.peak_size)  # warm the matmul kernels
    peaks = []
    for _ in range(args.steps):  # A B P A B P ...: all three see the same machine state
        for row in rows.values():
            row["times"].append(timed(row["step"], device))
        peaks.append(matmul_peak(device, dtype, args.peak_size))
    ours, theirs = rows["difflab"]["times"], rows["diffusers"]["times"]
    result = dict(title=case["title"], speed_ratio=statistics.median(b / a for a, b in zip(ours, theirs, strict=True)),
                  matmul_peak_gflops=dict(median=statistics.median(peaks), best=max(peaks)), systems={})
    for system, row in rows.items():
        seconds = statistics.median(row["times"])
        flops = row["flops"] * args.batch
        result["systems"][system] = dict(
            parameters=row["parameters"], train_flops_per_image=row["flops"], images_per_second=args.batch / seconds,
            step_seconds=seconds, gflops=flops / seconds / 1e9,
            peak_fraction=statistics.median(flops / t / 1e9 / p for t, p in zip(row["times"], peaks, strict=True)),
            memory_bytes=peak_memory(row["model"], row["step"]) if args.memory else None,
        )
        del row["model"], row["step"]
    return result


def print_table(results: dict, args) -> None:
    print(f"\ntraining step: batch {args.batch}, {args.dtype}, {args.device}"
          f"{' + torch.compile' if args.compile else ''}, {args.threads} threads")
    header = (f"{'case':34s} {'system':10s} {'params':>9s} {'GFLOP/img':>10s} {'img/s':>8s} {'GFLOP/s':>8s}"
              f" {'of peak':>8s} {'memory':>10s}")
    print(header)
    print("-" * len(header))
    for result in results.values():
        for system, s in result["systems"].items():
            memory = f"{s['memory_bytes'] / 2**20:8.0f} MiB" if s["memory_bytes"] is not None else "-"
            print(f"{result['title'][:34]:34s} {system:10s} {s['parameters'] / 1e6:8.2f}M "
                  f"{s['train_flops_per_image'] / 1e9:10.3f} {s['images_per_second']:8.2f} {s['gflops']:8.1f} "
                  f"{s['peak_fraction']:7.1%} {memory:>10s}")
        print(f"{'':34s} difflab / diffusers images/s: {result['speed_ratio']:.3f} (median of {args.steps} A/B pairs);"
              f" matmul peak {result['matmul_peak_gflops']['median']:.0f} GFLOP/s (median)")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="unet,dit", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="measured A/B pairs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for both U-Nets")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory count")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix size of the matmul-peak probe")
    parser.add_argument("--quick", action="store_true", help="tiny networks and few steps (a smoke test)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    cases = args.cases.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    for name in ("batch", "steps", "threads", "peak_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer")
    args.cases = cases
    if args.quick:
        args.steps, args.warmup, args.peak_size = min(args.steps, 3), 1, 512
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {name: run_case(name, args) for name in args.cases}
    print_table(results, args)
    report = dict(
        settings=dict(batch=args.batch, dtype=args.dtype, device=args.device, compile=args.compile,
                      threads=args.threads, steps=args.steps, channels_last=args.channels_last,
                      torch=torch.__version__, diffusers=__import__("diffusers").__version__),
        cases=results,
    )
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
