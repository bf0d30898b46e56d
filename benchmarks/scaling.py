"""Scaling on PyTorch's distributed engine, measured on this machine's CPU cores with gloo.

Every measurement runs the real trainer (``difflab.training.Trainer``: data, objective, EMA, fused AdamW, the
strategy's wrapper) in processes started by torchrun, each process in a fresh interpreter:

- **equality and throughput**: the digits recipe for a fixed number of steps at the same global batch on 1 process
  (1 and 2 threads) and on 2 processes of 1 thread (DDP, FSDP2, HSDP on a 2x1 mesh). Losses are compared step by
  step with the 1-process run; images/s is the global batch over the median step time after warm-up; scaling
  efficiency is the 2-process rate over twice the 1-process, 1-thread rate. Each run also times an all-reduce of a
  gradient-sized tensor, the communication a DDP step adds.
- **memory**: ``difflab plan``'s estimate per device (:func:`difflab.training.plan.estimate`) against the measured
  peak growth of the process's resident memory while the trainer is built and trains, for the U-Net recipe and a
  DiT-S-sized transformer, on 1 and 2 processes. glibc is told to serve every allocation above 64 KiB with its
  own mapping (``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and the peak is that
  of live memory (weights, gradients, optimizer state, EMAs, activations and temporaries).
- **sampling**: ``draw`` on 1 process (2 threads) and on 2 processes (1 thread each, each a share of the seeds),
  the same images either way.

    .venv/bin/python benchmarks/scaling.py --json out/bench/scaling.json      # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/scaling.py --quick                             # a one-minute check

Model FLOPs utilisation on a GPU (DiT-B/2, 32x32x4 latents, bf16, torch.compile) is ``benchmarks/models.py
--cases dit_b --device cuda --dtype bfloat16 --compile --batch 256``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from output import write_json

UNET = {"arch": "unet", "channels": 32, "channel_mult": [1, 2], "blocks_per_level": 2, "attention_resolutions": [4],
        "head_dim": 32}  # configs/digits.yaml
TINY = {"arch": "unet", "channels": 8, "channel_mult": [1], "blocks_per_level": 1, "attention_resolutions": [],
        "head_dim": 8}  # for the runtime's own memory
DIT_S = {"arch": "dit", "hidden": 384, "depth": 12, "heads": 6, "patch_size": 1}  # DiT-S widths, 8x8 tokens
STRATEGIES = {  # name: (processes, threads per process, train settings)
    "1 process, 1 thread": (1, 1, []),
    "1 process, 2 threads": (1, 2, []),
    "2 processes, DDP": (2, 1, ["train.distributed=ddp"]),
    "2 processes, FSDP2": (2, 1, ["train.distributed=fsdp"]),
    "2 processes, HSDP 2x1": (2, 1, ["train.distributed=hsdp", "train.shard_size=1"]),
}
HALF = "1 process, 1 thread, half batch"  # one of two processes' compute, alone
MEMORY_CASES = {  # name: (model, global batch, strategies)
    "U-Net (digits recipe)": (UNET, 128, ["1 process, 1 thread", "2 processes, DDP", "2 processes, FSDP2"]),
    "DiT-S widths, 64 tokens": (DIT_S, 16, ["1 process, 1 thread", "2 processes, DDP", "2 processes, FSDP2",
                                             "2 processes, HSDP 2x1"]),
}
MIB = 2**20


# ------------------------------------------------------------------------------------------ inside torchrun
def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(spec: dict, world) -> None:
    """One process of a run: build the trainer, take ``steps`` optimizer steps, write what it measured (or, for
    ``kind`` sample, time a shared draw)."""
    import torch.distributed as dist

    from difflab.data import load_dataset
    from difflab.training import Trainer, resolve
    from difflab.training.run import draw, load_run

    if spec["kind"] == "sample":
        torch.set_num_threads(spec["threads"])
        run = load_run(spec["run_dir"])
        draw(run, 8, steps=spec["sampling_steps"])  # warm-up
        start = time.perf_counter()
        images, _ = draw(run, spec["n"], steps=spec["sampling_steps"])
        seconds = time.perf_counter() - start
        if world.main:
            np.save(spec["out"] + ".npy", images.numpy())
        Path(f"{spec['out']}-rank{world.rank}.json").write_text(json.dumps({"seconds": seconds}))
        return
    config = resolve(spec["config"], spec["settings"])
    load_dataset(config.data.dataset)  # held before the baseline: the data is not the trainer's memory
    before = _resident()
    trainer = Trainer(config, spec["run_dir"], progress=False)
    losses, seconds = [], []
    for _ in range(spec["steps"]):
        start = time.perf_counter()
        loss, _ = trainer.train_step()
        seconds.append(time.perf_counter() - start)
        losses.append(loss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if spec["save"]:
        trainer.save_checkpoint()
    total = torch.tensor(losses, dtype=torch.float64)
    allreduce = None
    if world.size > 1:
        dist.all_reduce(total)
        total /= world.size
        gradients = torch.zeros(sum(p.numel() for p in trainer.network.parameters()))
        times = []
        for _ in range(6):
            start = time.perf_counter()
            dist.all_reduce(gradients)
            times.append(time.perf_counter() - start)
        allreduce = statistics.median(times[1:])
    result = dict(losses=total.tolist(), step_seconds=seconds, peak_bytes=peak, allreduce_seconds=allreduce)
    Path(f"{spec['out']}-rank{world.rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ the orchestrator
def launch(spec: dict, processes: int, threads: int, work: Path) -> list[dict]:
    """Run :func:`worker` on ``processes`` torchrun processes of ``threads`` threads; their results by rank. Training
    runs measure memory, so glibc maps every allocation above 64 KiB on its own (see the module docstring)."""
    spec_file = work / f"spec-{time.monotonic_ns()}.json"
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               __file__, "--worker", str(spec_file)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           **({"MALLOC_MMAP_THRESHOLD_": "65536"} if spec["kind"] == "train" else {})}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"worker failed ({spec.get('kind')}):\n{result.stderr[-3000:]}")
    return [json.loads(Path(f"{spec['out']}-rank{r}.json").read_text()) for r in range(processes)]


def train_spec(model: dict, batch: int, steps: int, strategy: str, work: Path, name: str, save: bool = False) -> dict:
    processes, threads, settings = STRATEGIES[strategy]
    config = {"model": model, "data": {"dataset": "digits"},
              "train": {"steps": steps, "batch": batch, "threads": threads, "ema_decays": [0.999]}}
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)
    return dict(kind="train", config=config, settings=settings, steps=steps, save=save, run_dir=str(run_dir),
                out=str(work / f"{name}-result"))


def throughput(args, work: Path) -> dict:
    """Each strategy at the global batch, and one process on half of it: what each of two processes computes, so
    that the 2-process step splits into its compute and the rest (communication, wrappers, shared memory bus)."""
    rows = {}
    runs = [(strategy, args.batch) for strategy in STRATEGIES] + [(HALF, args.batch // 2)]
    for strategy, batch in runs:
        processes, threads, _ = STRATEGIES["1 process, 1 thread" if strategy == HALF else strategy]
        name = f"throughput-{len(rows)}"
        spec = train_spec(UNET, batch, args.steps, "1 process, 1 thread" if strategy == HALF else strategy, work,
                          name, save=strategy == "1 process, 2 threads")
        ranks = launch(spec, processes, threads, work)
        seconds = statistics.median(max(r["step_seconds"][i] for r in ranks) for i in range(args.warmup, args.steps))
        rows[strategy] = dict(processes=processes, threads=threads, batch=batch, losses=ranks[0]["losses"],
                              step_seconds=seconds, images_per_second=batch / seconds,
                              allreduce_seconds=ranks[0]["allreduce_seconds"], run_dir=spec["run_dir"])
        print(f"  {strategy}: {batch / seconds:.1f} images/s", flush=True)
    base = rows["1 process, 1 thread"]
    for row in rows.values():
        same = row["batch"] == base["batch"]  # the same training: the losses must agree
        row["max_relative_loss_difference"] = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], base["losses"])
                                                  ) if same else None
        row["efficiency"] = row["images_per_second"] / (row["processes"] * row["threads"] * base["images_per_second"])
    return rows


def memory(args, work: Path) -> dict:
    """Planned against measured peaks. The planner's runtime term (on a GPU the CUDA context) is what a process
    holds besides tensors: measured here with a network of a few thousand parameters on a batch of 2."""
    from difflab.training import resolve
    from difflab.training.plan import GIB, estimate, network_facts

    runtime = {}
    for processes, strategy in ((1, "1 process, 1 thread"), (2, "2 processes, DDP")):
        ranks = launch(train_spec(TINY, 2 * processes, args.memory_steps, strategy, work, f"runtime-{processes}"),
                       processes, 1, work)
        runtime[processes] = max(r["peak_bytes"] for r in ranks)
        print(f"  runtime memory, {processes} process(es): {runtime[processes] / MIB:.0f} MiB", flush=True)
    rows = []
    for case, (model, batch, strategies) in MEMORY_CASES.items():
        facts = network_facts(resolve({"model": model, "data": {"dataset": "digits"}}).model)
        for strategy in strategies:
            processes, threads, settings = STRATEGIES[strategy]
            name = f"memory-{len(rows)}"
            ranks = launch(train_spec(model, batch, args.memory_steps, strategy, work, name), processes, threads, work)
            kind = "fsdp" if "FSDP2" in strategy else "hsdp" if "HSDP" in strategy else "ddp"
            planned = estimate(facts, kind, gpus=processes, gpus_per_node=1 if kind == "hsdp" else 8,
                               gpu_memory=GIB, batch=batch, runtime_memory=runtime[processes]).memory
            measured = max(r["peak_bytes"] for r in ranks)
            rows.append(dict(case=case, strategy=strategy, parameters=facts["parameters"], batch=batch,
                             planned_bytes=planned["total"], planned=planned, measured_bytes=measured,
                             ratio=measured / planned["total"]))
            print(f"  {case}, {strategy}: planned {planned['total'] / MIB:.0f} MiB, measured {measured / MIB:.0f} MiB",
                  flush=True)
    return {"runtime_bytes": runtime, "rows": rows}


def sampling(args, work: Path, run_dir: str) -> dict:
    rows = {}
    for label, processes, threads in (("1 process, 2 threads", 1, 2), ("2 processes, 1 thread", 2, 1)):
        out = str(work / f"sample-{processes}")
        spec = dict(kind="sample", run_dir=run_dir, n=args.samples, sampling_steps=18, threads=threads, out=out)
        seconds = launch(spec, processes, threads, work)[0]["seconds"]  # the first process's: it gathers them all
        rows[label] = dict(processes=processes, seconds=seconds, images_per_second=args.samples / seconds,
                           images=np.load(out + ".npy"))
        print(f"  sampling, {label}: {args.samples / seconds:.1f} images/s", flush=True)
    one, two = (row.pop("images") for row in rows.values())
    difference = float(np.abs(one - two).max())
    return {"rows": rows, "n": args.samples, "steps": 18, "max_abs_difference": difference}


def print_tables(report: dict) -> None:
    if "throughput" in report:
        print("\n1 vs 2 processes (gloo), digits recipe")
        print(f"{'run':34s} {'batch':>5s} {'images/s':>9s} {'efficiency':>10s} {'step s':>8s} {'all-reduce s':>12s} "
              f"{'max rel. loss diff':>18s}")
        for name, row in report["throughput"].items():
            allreduce = f"{row['allreduce_seconds']:.4f}" if row["allreduce_seconds"] is not None else "-"
            difference = row["max_relative_loss_difference"]
            difference = "-" if difference is None else f"{difference:.1e}"
            print(f"{name:34s} {row['batch']:5d} {row['images_per_second']:9.1f} {row['efficiency']:10.1%} "
                  f"{row['step_seconds']:8.3f} {allreduce:>12s} {difference:>18s}")
    if "memory" in report:
        runtime = ", ".join(f"{k} process(es) {v / MIB:.0f} MiB" for k, v in report["memory"]["runtime_bytes"].items())
        print(f"\nplanned vs measured peak memory per process (runtime term measured: {runtime})")
        print(f"{'case':26s} {'run':24s} {'planned MiB':>11s} {'measured MiB':>12s} {'measured/planned':>16s}")
        for row in report["memory"]["rows"]:
            print(f"{row['case']:26s} {row['strategy']:24s} {row['planned_bytes'] / MIB:11.0f} "
                  f"{row['measured_bytes'] / MIB:12.0f} {row['ratio']:16.2f}")
    if "sampling" in report:
        s = report["sampling"]
        print(f"\nsampling {s['n']} digits, heun {s['steps']} steps; max difference between the two: "
              f"{s['max_abs_difference']:.1e}")
        for name, row in s["rows"].items():
            print(f"{name:24s} {row['images_per_second']:9.1f} images/s")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sections", default="throughput,memory,sampling",
                        help="comma-separated: throughput, memory, sampling")
    parser.add_argument("--batch", type=int, default=128, help="global batch of the throughput runs")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps of each throughput run")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing")
    parser.add_argument("--memory-steps", type=int, default=3, help="optimizer steps of each memory run")
    parser.add_argument("--samples", type=int, default=400, help="images of the sampling runs")
    parser.add_argument("--quick", action="store_true", help="a short check of every section")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"throughput", "memory", "sampling"}
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}")
    if "sampling" in args.sections and "throughput" not in args.sections:
        parser.error("sampling draws from the throughput section's run: add throughput to --sections")
    if args.quick:
        args.batch, args.steps, args.warmup, args.memory_steps, args.samples = 32, 4, 1, 2, 16
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be below --steps")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        from difflab.training.distributed import close_world, init_world

        world = init_world()
        worker(json.loads(args.worker.read_text()), world)
        world.barrier()  # no process leaves (and tears down its side of the group) while another still works
        close_world(world)
        return {}
    report = {"settings": dict(batch=args.batch, steps=args.steps, warmup=args.warmup, torch=torch.__version__,
                               cpus=os.cpu_count())}
    with tempfile.TemporaryDirectory(prefix="difflab-scaling-") as tmp:
        work = Path(tmp)
        if "throughput" in args.sections:
            report["throughput"] = throughput(args, work)
        if "memory" in args.sections:
            report["memory"] = memory(args, work)
        if "sampling" in args.sections:
            report["sampling"] = sampling(args, work, report["throughput"]["1 process, 2 threads"]["run_dir"])
        for row in report.get("throughput", {}).values():
            row.pop("run_dir")
    print_tables(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
