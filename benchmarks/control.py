"""The control stage on held-out digits: inpainting (replacement vs RePaint), image-to-image, ODE inversion and a
ControlNet on Sobel edges, with a picture panel per method.

A digits model (``configs/digits.yaml`` on ``digits-train``, ``--base-steps`` steps, or ``--base DIR``) is the base;
every input comes from ``digits-heldout`` (180 images it never saw), unconditional (null class) unless noted, so
the class must come from the picture. Classes are read by difflab's digit classifier (trained on all digits).

- Inpainting: keep the top (or left) half, generate the rest, by replacement, RePaint, reconstruction guidance,
  both, and a mask-conditioned fine-tune of the base (``--inpaint-steps``); the error on the kept pixels, and how
  often the completed digit is classified as the original, over all digits and over those whose visible half
  determines the class (at least 8 of its 10 nearest training digits, by the visible half, share its class). The
  reference is that 10-NN vote itself.
- Image-to-image (SDEdit): PSNR to the input and how often the class is kept, against strength.
- Inversion: PSNR of the image sampled back from its inverted noise, Heun and Euler, with and without refinement.
- LoRA: a rank-4 adapter fine-tuned on eight training sevens (``--lora-steps``); how many unconditional samples
  are sevens at strengths 0, 0.5 and 1.
- ControlNet: ``difflab finetune --method controlnet`` (``--controlnet-steps``) on the base; edge F1 and IoU of
  samples against the held-out edges they were given, and Fréchet distance to ``digits-train``, against the
  unconditioned base (both unconditional, ``--fd-n`` samples, the held-out edges repeated).

    .venv/bin/python benchmarks/control.py --json out/bench/control.json
    .venv/bin/python benchmarks/control.py --quick
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from difflab.config import load_yaml
from difflab.control import merge_lora
from difflab.control.finetune import finetune
from difflab.control.pictures import edge_scores, sobel_edges
from difflab.data import load_dataset
from difflab.evaluation import frechet_distance, squared_errors
from difflab.evaluation.features import FeatureExtractor, feature_network
from difflab.evaluation.plots import save_image_grid
from difflab.sampling import SOLVERS
from difflab.training import Trainer, resolve
from difflab.training.run import draw, invert_images, load_run
from output import write_json

ROOT = Path(__file__).parents[1]
PANEL = 10  # examples per panel row


def half_mask(which: str, shape: tuple[int, ...]) -> torch.Tensor:
    """1 where the picture is generated: the bottom half ("top" kept) or the right half ("left" kept)."""
    mask = torch.zeros(1, 1, *shape[-2:])
    if which == "top":
        mask[..., shape[-2] // 2 :, :] = 1
    else:
        mask[..., shape[-1] // 2 :] = 1
    return mask


def per_image_psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(4 / squared_errors(x, y).clamp_min(1e-20))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("out/bench/control"), help="run directories (reused)")
    parser.add_argument("--base", type=Path, help="a digits run trained on digits-train (default: train one)")
    parser.add_argument("--base-steps", type=int, default=3000, help="training steps of the base")
    parser.add_argument("--controlnet-steps", type=int, default=1000, help="ControlNet fine-tuning steps")
    parser.add_argument("--inpaint-steps", type=int, default=1000,
                        help="fine-tuning steps of the mask-conditioned inpainting model")
    parser.add_argument("--resample", default="2,5", help="RePaint's JUMP,COUNT")
    parser.add_argument("--reconstruction", type=float, default=2.0, help="reconstruction guidance weight")
    parser.add_argument("--lora-steps", type=int, default=200, help="LoRA fine-tuning steps")
    parser.add_argument("--fd-n", type=int, default=1800, help="samples per Fréchet distance")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--figures", type=Path, default=Path("docs/figures"), help="folder for the panels")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps and samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    jump, count = (int(v) for v in args.resample.split(","))
    held = load_dataset("digits-heldout")
    images, labels = held.images, held.labels
    if args.quick:
        args.base_steps, args.controlnet_steps, args.inpaint_steps, args.lora_steps, args.fd_n = 4, 2, 2, 2, 40
        images, labels = images[:20], labels[:20]
    results: dict = {"device": f"CPU, {args.threads} threads", "n": len(images)}

    def save() -> None:
        write_json(args.json, results, quiet=True)

    base_dir = args.base
    if base_dir is None:
        base_dir = args.work / "base"
        if not (base_dir / "checkpoints" / f"step-{args.base_steps:07d}").is_dir():
            config = load_yaml(ROOT / "configs" / "digits.yaml")
            config["data"] = {"dataset": "digits-train"}
            config["train"] = {**config["train"], "steps": args.base_steps, "sample_every": 0, "log_every": 100,
                               "checkpoint_every": args.base_steps, "threads": args.threads}
            Trainer(resolve(config), base_dir, resume=base_dir.exists(), progress=False).fit()
    run = load_run(base_dir)
    s = run.config.sample
    sampling = {"solver": s.solver, "steps": 3 if args.quick else s.steps}
    nfe = SOLVERS[s.solver].nfe(sampling["steps"])
    results.update(base=str(base_dir), solver=s.solver, steps=sampling["steps"], nfe=nfe)
    digits = load_dataset("digits")
    extractor = FeatureExtractor.from_network(feature_network(digits.images, digits.labels))

    def accuracy(pictures: torch.Tensor) -> float:
        return (extractor.logits(pictures).argmax(1) == labels[: len(pictures)]).double().mean().item()

    def tuned(method: str, steps: int, *overrides: str, **options) -> tuple[Path, float]:
        """A fine-tune of the base (reused when it exists), and its training minutes."""
        out = args.work / method
        if not (out / "checkpoints" / f"step-{steps:07d}").is_dir():
            settings = ["train.log_every=100", f"train.checkpoint_every={steps}", f"train.threads={args.threads}",
                        *overrides]
            finetune(base_dir, method, out, train_steps=steps, resume=out.exists(), progress=False,
                     overrides=settings, **options)
        with open(out / "metrics.csv") as f:
            return out, float(list(csv.DictReader(f))[-1]["minutes"])

    # --- inpainting -------------------------------------------------------------------------------------------
    inpainter, results["inpaint_minutes"] = tuned("inpaint", args.inpaint_steps)
    inpainter = load_run(inpainter)
    w = args.reconstruction
    print(f"inpainting {len(images)} held-out digits, unconditional ({s.solver}, {sampling['steps']} steps; RePaint "
          f"{jump},{count}; reconstruction guidance w={w:g}; mask-conditioned fine-tune {args.inpaint_steps} steps)")
    methods = (("replacement", run, {}), ("RePaint", run, {"resample": (jump, count)}),
               ("reconstruction", run, {"reconstruction": w}),
               ("reconstruction + RePaint", run, {"reconstruction": w, "resample": (jump, count)}),
               ("mask-conditioned", inpainter, {}))
    results["inpainting"] = []
    train = load_dataset("digits-train")
    panel = [images[:PANEL]]
    print(f"{'kept':5s} {'method':26s} {'NFE':>4s} {'kept max error':>15s} {'accuracy':>9s} {'determinable':>13s}")
    for which in ("top", "left"):
        mask = half_mask(which, images.shape)
        keep = 1 - mask
        # How far the visible half determines the class: the labels of its 10 nearest training digits (by the
        # visible half). "Determinable" digits have at least 8 of 10 neighbours of their own class.
        neighbours = train.labels[torch.cdist((images * keep).flatten(1), (train.images * keep).flatten(1))
                                  .topk(10, largest=False).indices]
        determinable = (neighbours == labels[:, None]).double().mean(1) >= 0.8
        vote = neighbours.mode(1).values
        reference = {"kept": which, "method": "10-NN of the visible half (reference)", "nfe": 0,
                     "class_accuracy": (vote == labels).double().mean().item(),
                     "class_accuracy_determinable": (vote == labels)[determinable].double().mean().item(),
                     "determinable": int(determinable.sum())}
        results["inpainting"].append(reference)
        rows = [torch.lerp(images, torch.full_like(images, -1.0), mask)[:PANEL]]  # the visible half
        for method, model, options in methods:
            start = time.perf_counter()
            out, _ = draw(model, len(images), class_label=None, init=images, mask=mask, **sampling, **options)
            correct = extractor.logits(out).argmax(1) == labels
            row = {"kept": which, "method": method, "nfe": nfe * (count if "resample" in options else 1),
                   "backward_passes": bool(options.get("reconstruction")),
                   "kept_max_error": ((out - images) * keep).abs().max().item(),
                   "class_accuracy": correct.double().mean().item(),
                   "class_accuracy_determinable": correct[determinable].double().mean().item(),
                   "seconds": time.perf_counter() - start}
            results["inpainting"].append(row)
            rows.append(out[:PANEL])
            print(f"{which:5s} {method:26s} {row['nfe']:4d} {row['kept_max_error']:15.2e} {row['class_accuracy']:9.3f} "
                  f"{row['class_accuracy_determinable']:13.3f}", flush=True)
        print(f"{which:5s} {'10-NN of the visible half':26s} {'':4s} {'':15s} {reference['class_accuracy']:9.3f} "
              f"{reference['class_accuracy_determinable']:13.3f}  ({reference['determinable']} determinable)")
        panel += rows
    results["classifier_on_originals"] = accuracy(images)
    print(f"classifier accuracy on the original held-out digits: {results['classifier_on_originals']:.3f}")
    args.figures.mkdir(parents=True, exist_ok=True)
    save_image_grid(torch.cat(panel), args.figures / "control_inpainting.png", columns=PANEL)
    save()

    # --- image-to-image ----------------------------------------------------------------------------------------
    print("\nimage-to-image (SDEdit), unconditional")
    results["img2img"] = []
    panel = [images[:PANEL]]
    for strength in (0.2, 0.4, 0.6, 0.8, 1.0):
        options = {"init": images, "strength": strength} if strength < 1 else {}
        out, _ = draw(run, len(images), class_label=None, **sampling, **options)
        row = {"strength": strength, "psnr_to_input": per_image_psnr(out, images).mean().item(),
               "class_kept": accuracy(out)}
        results["img2img"].append(row)
        panel.append(out[:PANEL])
        print(f"strength {strength:.1f}: PSNR to input {row['psnr_to_input']:6.2f} dB, "
              f"class kept {row['class_kept']:.3f}")
    save_image_grid(torch.cat(panel), args.figures / "control_img2img.png", columns=PANEL)
    save()

    # --- inversion ---------------------------------------------------------------------------------------------
    print("\ninversion (50 steps, unconditional), image -> noise -> image")
    results["inversion"] = []
    panel = [images[:PANEL]]
    for solver in ("heun", "euler"):
        for refine in (0, 2):
            start = time.perf_counter()
            noise, back = invert_images(run, images, steps=50, solver=solver, refine=refine)
            quality = per_image_psnr(back, images)
            row = {"solver": solver, "steps": 50, "refine": refine, "psnr_mean": quality.mean().item(),
                   "psnr_min": quality.min().item(), "seconds": time.perf_counter() - start}
            results["inversion"].append(row)
            if solver == "heun" and refine == 0:
                panel += [(noise[:PANEL] / 3).clamp(-1, 1), back[:PANEL]]
            print(f"{solver:5s} refine {refine}: PSNR mean {row['psnr_mean']:6.2f} dB, min {row['psnr_min']:6.2f} dB",
                  flush=True)
    save_image_grid(torch.cat(panel), args.figures / "control_inversion.png", columns=PANEL)
    save()

    # --- LoRA ---------------------------------------------------------------------------------------------------
    sevens = args.work / "lora-images"  # a handful of training sevens: the "style" the adapter learns
    if not sevens.is_dir():
        sevens.mkdir(parents=True)
        train = load_dataset("digits-train")
        for i in (train.labels == 7).nonzero()[:8, 0].tolist():
            pixels = ((train.images[i, 0] + 1) * 127.5).round().byte().numpy()
            Image.fromarray(pixels, "L").save(sevens / f"{i}.png")
    adapter, results["lora_minutes"] = tuned("lora", args.lora_steps, "train.batch=8", data=sevens)
    print(f"\nLoRA (rank 4) on {len(list(sevens.iterdir()))} sevens, {args.lora_steps} steps: unconditional samples "
          "classified as 7")
    results["lora"] = []
    panel = []
    for strength in (0.0, 0.5, 1.0):
        model = load_run(base_dir)
        merge_lora(model.network, model.config.model, adapter / "lora.safetensors", strength)
        out, _ = draw(model, len(images), class_label=None, **sampling)
        row = {"strength": strength, "sevens": (extractor.logits(out).argmax(1) == 7).double().mean().item()}
        results["lora"].append(row)
        panel.append(out[:PANEL])
        print(f"strength {strength:.1f}: {row['sevens']:.3f} sevens", flush=True)
    results["lora_file_bytes"] = (adapter / "lora.safetensors").stat().st_size
    save_image_grid(torch.cat(panel), args.figures / "control_lora.png", columns=PANEL)
    save()

    # --- ControlNet ---------------------------------------------------------------------------------------------
    print(f"\nControlNet on Sobel edges ({args.controlnet_steps} steps)")
    controlled, results["controlnet_minutes"] = tuned("controlnet", args.controlnet_steps, kind="sobel")
    controlnet = load_run(controlled)
    repeats = -(-args.fd_n // len(images))
    edges = sobel_edges(images).repeat(repeats, 1, 1, 1)[: args.fd_n]
    reference = load_dataset("digits-train")
    real = extractor(reference.images)
    results["controlnet"] = []
    panel = [images[:PANEL], edges[:PANEL]]
    for name, model, options in (("base, unconditioned", run, {}),
                                 ("ControlNet, held-out edges", controlnet, {"control": edges})):
        out, _ = draw(model, args.fd_n, class_label=None, **sampling, **options)
        row = {"model": name, **edge_scores(out, edges), "frechet_distance": frechet_distance(extractor(out), real)}
        results["controlnet"].append(row)
        panel.append(out[:PANEL])
        print(f"{name:28s} edge F1 {row['edge_f1']:.3f}  IoU {row['edge_iou']:.3f}  FD {row['frechet_distance']:.3f}",
              flush=True)
    base_fd, control_fd = (r["frechet_distance"] for r in results["controlnet"])
    results["controlnet_fd_ratio"] = control_fd / base_fd
    print(f"FD ControlNet / unconditioned base: {results['controlnet_fd_ratio']:.2f} (target <= 1.2)")
    save_image_grid(torch.cat(panel), args.figures / "control_controlnet.png", columns=PANEL)
    save()
    if args.json:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
