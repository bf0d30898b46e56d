"""Quality per minute of training on scikit-learn's digits: difflab's recipe against a diffusers recipe.

Both systems train class-conditional pixel-space models on the 1,797 8x8 digits on this CPU. Their
training clocks advance in alternating segments (difflab to 1 minute, the peer to 1 minute, difflab to
2.5 minutes, ...), so both see the same machine conditions; at each boundary the training pauses, the
EMA weights draw 1,797 class-balanced samples, and the samples are scored in the feature space of
difflab's digit network: Fréchet distance, precision/recall, class accuracy, and the distance to the
nearest training image (relative to that between real digits: ~1 means new digits, ~0 copies). The noise
floor is the Fréchet distance between two halves of the real digits.

The peer recipe (as the issue measured it): diffusers ``UNet2DModel`` (channels 64/128/128, attention at
the middle resolution, class embeddings, 6.5 M parameters), ``DDPMScheduler`` with cosine betas and an
epsilon target, AdamW lr 5e-4, batch 128, EMA 0.999 (diffusers' ``EMAModel``); sampled with
``DPMSolverMultistepScheduler`` (20 steps, ``thresholding=True``).

    .venv/bin/python benchmarks/digits_quality.py --json docs/results/digits_quality.json   # ~25 minutes
    .venv/bin/python benchmarks/digits_quality.py --quick                                    # a smoke test
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from difflab.data import load_dataset
from difflab.evaluation.features import FeatureExtractor, feature_network
from difflab.evaluation.plots import save_image_grid
from difflab.evaluation.report import noise_floor, sample_metrics
from difflab.sampling.generate import class_labels
from difflab.training import Trainer, load_run_config
from difflab.training.run import Run, draw
from difflab.training.trainer import make_model
from output import write_json

ROOT = Path(__file__).parents[1]


class DifflabSystem:
    """configs/digits.yaml, trained step by step by difflab's Trainer."""

    name = "difflab"

    def __init__(self, run_dir: Path, overrides: list[str]):
        self.trainer = Trainer(load_run_config(ROOT / "configs" / "digits.yaml", overrides), run_dir, progress=False)
        self.config = self.trainer.config

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.trainer.network.parameters())

    def train_step(self) -> int:
        self.trainer.train_step()
        return self.config.train.batch

    def sample(self, n: int, seed: int, steps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        name = self.trainer.ema.names[0]
        run = Run(self.config, make_model(self.config, self.trainer.ema.average(name)), None, name)
        return draw(run, n, seed=seed, **({"steps": steps} if steps else {}))


class PeerSystem:
    """The diffusers recipe: UNet2DModel + DDPM (cosine, epsilon) + AdamW + EMAModel; DPM-Solver++ sampling."""

    name = "diffusers"

    def __init__(self, dataset, batch: int = 128, seed: int = 0):
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        torch.manual_seed(seed)
        self.unet = UNet2DModel(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=2, block_out_channels=(64, 128, 128),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10,
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                       prediction_type="epsilon")
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=5e-4)
        self.ema = EMAModel(self.unet.parameters(), decay=0.999)
        self.dataset, self.batch = dataset, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(len(dataset), generator=self.generator), 0

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def train_step(self) -> int:
        if self.position + self.batch > len(self.dataset):
            self.order, self.position = torch.randperm(len(self.dataset), generator=self.generator), 0
        index = self.order[self.position : self.position + self.batch]
        self.position += self.batch
        x0, labels = self.dataset.images[index], self.dataset.labels[index]
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.randint(0, 1000, (len(x0),), generator=self.generator)
        prediction = self.unet(self.scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
        loss = F.mse_loss(prediction, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ema.step(self.unet.parameters())
        return len(x0)

    @torch.no_grad()
    def sample(self, n: int, seed: int, steps: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        import copy

        from diffusers import DPMSolverMultistepScheduler

        unet = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(unet.parameters())
        solver = DPMSolverMultistepScheduler.from_config(self.scheduler.config, thresholding=True)
        solver.set_timesteps(steps or 20)
        labels = class_labels(n, "balanced", 10)
        out = []
        for start in range(0, n, 256):
            count = min(256, n - start)
            x = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(seed + start + i))
                             for i in range(count)])
            for t in solver.timesteps:
                eps = unet(x, t, class_labels=labels[start : start + count]).sample
                x = solver.step(eps, t, x).prev_sample
            solver.set_timesteps(steps or 20)  # reset the multistep history for the next batch
            out.append(x.clamp(-1, 1))
        return torch.cat(out), labels


def run(args) -> dict:
    dataset = load_dataset("digits")
    extractor = FeatureExtractor.from_network(feature_network(dataset.images, dataset.labels))
    floor = noise_floor(dataset, extractor)
    overrides = [f"train.threads={args.threads}"] if args.threads else []
    systems = [DifflabSystem(args.run_dir / "difflab", overrides), PeerSystem(dataset)]
    torch.set_num_threads(args.threads or torch.get_num_threads())
    clocks = {s.name: 0.0 for s in systems}
    images = {s.name: 0 for s in systems}
    results = {s.name: [] for s in systems}
    for minutes in args.minutes:
        for system in systems:  # alternate: both systems see the same stretch of machine time
            start = time.perf_counter() - clocks[system.name]
            while time.perf_counter() - start < 60 * minutes:
                images[system.name] += system.train_step()
            clocks[system.name] = time.perf_counter() - start
            samples, labels = system.sample(args.n, seed=0, steps=args.sample_steps)
            row = dict(minutes=minutes, train_seconds=clocks[system.name], images_seen=images[system.name],
                       images_per_second=images[system.name] / clocks[system.name],
                       **sample_metrics(samples, labels, dataset, extractor))
            results[system.name].append(row)
            print(f"{system.name:10s} {minutes:5.2f} min  FD {row['frechet_distance']:8.2f}  "
                  f"acc {row.get('class_accuracy', float('nan')):.3f}  P {row['precision']:.3f} R {row['recall']:.3f}  "
                  f"NN ratio {row['memorisation_ratio']:.2f}  {row['images_per_second']:.0f} img/s", flush=True)
            if minutes == args.minutes[-1] and args.plots:
                save_image_grid(samples[:100], args.plots / f"digits_samples_{system.name}.png", columns=10)
    report = dict(noise_floor_frechet_distance=floor, n=args.n,
                  parameters={s.name: s.parameters for s in systems}, curves=results)
    report["summary"] = [
        dict(minutes=a["minutes"], difflab_fd=a["frechet_distance"], peer_fd=b["frechet_distance"],
             fd_ratio=b["frechet_distance"] / a["frechet_distance"])
        for a, b in zip(results["difflab"], results["diffusers"], strict=True)
    ]
    return report


def print_table(report: dict) -> None:
    print(f"\nFréchet distance (difflab digit features, n = {report['n']}, class-balanced); "
          f"noise floor {report['noise_floor_frechet_distance']:.2f}")
    print(f"{'minutes':>8s} {'difflab':>10s} {'diffusers':>10s} {'peer / difflab':>15s} {'difflab acc':>12s} "
          f"{'peer acc':>9s}")
    for row, ours, theirs in zip(report["summary"], report["curves"]["difflab"], report["curves"]["diffusers"],
                                 strict=True):
        print(f"{row['minutes']:8.2f} {row['difflab_fd']:10.2f} {row['peer_fd']:10.2f} {row['fd_ratio']:15.2f} "
              f"{ours.get('class_accuracy', float('nan')):12.3f} {theirs.get('class_accuracy', float('nan')):9.3f}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, style in (("difflab", "o-"), ("diffusers", "s--")):
        rows = report["curves"][name]
        ax.plot([r["minutes"] for r in rows], [r["frechet_distance"] for r in rows], style, label=name)
    ax.axhline(report["noise_floor_frechet_distance"], color="grey", linestyle=":",
               label="noise floor: two halves of the real digits (n = 898)")
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel("Fréchet distance (digit features)")
    ax.set_yscale("log")
    ax.set_title("Digits: sample quality against training time")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", default="1,2.5,5,10", help="comma-separated training-time checkpoints")
    parser.add_argument("--n", type=int, default=1797, help="samples scored at each checkpoint")
    parser.add_argument("--sample-steps", type=int, help="override both systems' sampling steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run-dir", type=Path, default=Path("out/bench/digits"), help="difflab's run directory")
    parser.add_argument("--plots", type=Path, default=ROOT / "docs" / "figures", help="folder for the figures")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--quick", action="store_true", help="seconds of training, few samples: a smoke test")
    args = parser.parse_args(argv)
    try:
        args.minutes = [float(m) for m in args.minutes.split(",")]
    except ValueError:
        parser.error(f"--minutes: expected comma-separated numbers, got {args.minutes!r}")
    if any(m <= 0 for m in args.minutes) or args.minutes != sorted(args.minutes):
        parser.error("--minutes must be positive and increasing")
    if args.n < 10:
        parser.error("--n must be at least 10")
    if args.quick:
        args.minutes, args.n, args.sample_steps = [0.02, 0.04], 50, 3
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.run_dir.exists():
        import shutil

        shutil.rmtree(args.run_dir / "difflab", ignore_errors=True)
    report = run(args)
    print_table(report)
    if args.plots:
        plot(report, args.plots / "digits_quality.png")
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
