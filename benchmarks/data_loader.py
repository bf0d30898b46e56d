"""Loader throughput: samples/s from a JPEG or PNG folder against shards, with 0, 1 and 2 worker processes,
and whether the loader holds back training on the digits recipe and a 32x32 colour (flagship-sized) model.

Sources are made from the built-in sets: the emoji (72x72 PNGs, written again as PNG and JPEG files, 32x32
after resize and crop) and the digits (8x8 grey PNGs). "folder" decodes, resizes and crops every file at
every visit through a ``torch.utils.data.DataLoader`` (what ImageFolder-style pipelines do); "shards" is
difflab's ``ShardLoader`` over ``difflab data shard`` output; "memory" the in-memory ``BatchLoader``.
Training rates come from difflab's Trainer itself over the same data, held in memory and streamed: if
streaming trains as fast as memory, the loader is not the bottleneck.

    .venv/bin/python benchmarks/data_loader.py --json out/bench/data_loader.json
    .venv/bin/python benchmarks/data_loader.py --quick
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from difflab.data import BatchLoader, ShardLoader, load_dataset
from difflab.data.emoji import emoji_records
from difflab.data.shards import preprocess, write_shards
from difflab.data.sources import load_image, scan_folder, to_tensor
from output import write_json

RECIPES = {  # the model each data set trains in a recipe: digits.yaml's, and the 32x32 U-Net of models.py
    "digits": {"arch": "unet", "channels": 32, "channel_mult": [1, 2], "blocks_per_level": 2,
               "attention_resolutions": [4], "head_dim": 32},
    "emoji": {"arch": "unet", "channels": 64, "channel_mult": [1, 2, 2], "blocks_per_level": 2,
              "attention_resolutions": [16], "head_dim": 64},
}


class FolderImages(torch.utils.data.Dataset):
    """Decode, resize and centre-crop one file per item: the folder baseline."""

    def __init__(self, root: Path, resolution: int, mode: str):
        self.root, self.records, self.resolution, self.mode = root, scan_folder(root), resolution, mode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, k: int) -> torch.Tensor:
        return to_tensor(preprocess(load_image(self.root / self.records[k].path, self.mode), self.resolution))


def make_sources(out: Path, count: int) -> dict:
    """PNG and JPEG folders of ``count`` emoji, a PNG folder of the digits, and shards of each."""
    root, records, _ = emoji_records()
    for record in records[:count]:
        image = load_image(root / record.path)
        for kind in ("png", "jpeg"):
            (out / f"emoji-{kind}").mkdir(parents=True, exist_ok=True)
            image.save(out / f"emoji-{kind}" / Path(record.path).with_suffix(f".{kind}").name, quality=90)
    digits = load_dataset("digits")
    for k, (image, label) in enumerate(zip(digits.images, digits.labels.tolist())):
        folder = out / "digits-png" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = ((image[0] + 1) * 127.5).round().byte().numpy()
        Image.fromarray(pixels, mode="L").save(folder / f"{k:04d}.png")
    sources = {"emoji": ("emoji-png", 32, "RGB"), "digits": ("digits-png", 8, "L")}
    for name, (folder, resolution, mode) in sources.items():
        write_shards(out / folder, scan_folder(out / folder), out / f"{name}-shards", resolution, mode=mode,
                     per_shard=500)
    return {"emoji": {"folders": ["emoji-png", "emoji-jpeg"], "resolution": 32, "mode": "RGB"},
            "digits": {"folders": ["digits-png"], "resolution": 8, "mode": "L"}}


def rate(batches, batch: int, seconds: float, warmup: int = 2) -> float:
    """Samples per second of an endless batch iterator over about ``seconds``, after ``warmup`` batches."""
    for _ in range(warmup):
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(batches)
        count += batch
    return count / (time.perf_counter() - start)


def endless(loader):
    while True:
        yield from loader


def loader_rates(out: Path, sources: dict, args) -> list[dict]:
    rows = []
    for name, source in sources.items():
        shards = out / f"{name}-shards"
        rows.append({"data": name, "source": "memory", "workers": 0,
                     "samples_per_s": rate(BatchLoader(load_dataset(str(shards)), args.batch), args.batch,
                                           args.seconds)})
        for workers in args.workers:
            for folder in source["folders"]:
                dataset = FolderImages(out / folder, source["resolution"], source["mode"])
                options = {"persistent_workers": True, "prefetch_factor": 4} if workers else {}
                loader = torch.utils.data.DataLoader(dataset, args.batch, shuffle=True, num_workers=workers,
                                                     drop_last=True, **options)
                rows.append({"data": name, "source": folder.split("-")[1] + " folder", "workers": workers,
                             "samples_per_s": rate(endless(loader), args.batch, args.seconds)})
            stream = ShardLoader(shards, args.batch, workers=workers, prefetch=4)
            rows.append({"data": name, "source": "shards", "workers": workers,
                         "samples_per_s": rate(stream, args.batch, args.seconds)})
            stream.close()
            print(f"  {name}: {workers} workers measured", flush=True)
    return rows


def training_rates(out: Path, args) -> list[dict]:
    """Trainer samples/s over each data set, in memory (built-in set) and streamed from its shards."""
    from difflab.training import Trainer, resolve

    rows = []
    for name, model in RECIPES.items():
        shards = str(out / f"{name}-shards")
        for source, data in [("memory", {"dataset": shards}), *[
                (f"shards, {w} workers", {"dataset": shards, "workers": w}) for w in args.workers]]:
            config = resolve({"model": model, "data": data,
                              "train": {"steps": args.train_steps, "batch": args.train_batch, "log_every": 10_000,
                                        "checkpoint_every": 10_000, "threads": args.threads}})
            trainer = Trainer(config, out / f"run-{name}-{len(rows)}", progress=False)
            if source == "memory":  # the same images, held in memory: the loader-free ceiling
                trainer.loader = BatchLoader(load_dataset(shards), args.train_batch, seed=0)
            trainer.train_step()  # warm-up
            start = time.perf_counter()
            for _ in range(args.train_steps):
                trainer.train_step()
            seconds = time.perf_counter() - start
            rows.append({"data": name, "source": source,
                         "samples_per_s": args.train_steps * args.train_batch / seconds})
            print(f"  trained {name} from {source}: {rows[-1]['samples_per_s']:.0f} samples/s", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000, help="emoji images in the folders")
    parser.add_argument("--batch", type=int, default=64, help="loader batch")
    parser.add_argument("--seconds", type=float, default=5.0, help="measuring time per loader")
    parser.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default="0,1,2")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--train-batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="a few seconds: 200 images, short measurements")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.seconds, args.workers, args.train_steps, args.train_batch = 200, 0.3, [0, 1], 1, 8
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="difflab-data-bench-") as tmp:
        out = Path(tmp)
        start = time.perf_counter()
        sources = make_sources(out, args.count)
        print(f"made the sources in {time.perf_counter() - start:.0f}s", flush=True)
        loaders = loader_rates(out, sources, args)
        training = training_rates(out, args)
    print(f"\nloader throughput (batch {args.batch}), samples/s")
    print(f"{'data':8s} {'source':14s} {'workers':>7s} {'samples/s':>10s}")
    for row in loaders:
        print(f"{row['data']:8s} {row['source']:14s} {row['workers']:7d} {row['samples_per_s']:10.0f}")
    print(f"\ntraining throughput (batch {args.train_batch}, {args.threads} threads), samples/s")
    for name in RECIPES:
        memory = next(r["samples_per_s"] for r in training if r["data"] == name and r["source"] == "memory")
        for row in (r for r in training if r["data"] == name):
            row["of_memory"] = row["samples_per_s"] / memory
            print(f"{name:8s} {row['source']:18s} {row['samples_per_s']:8.0f}  {row['of_memory']:5.2f}x of in-memory")
    write_json(args.json, {"loaders": loaders, "training": training,
                           "settings": {k: v for k, v in vars(args).items() if k != "json"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
