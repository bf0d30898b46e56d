"""The ``difflab`` command: one verb per lifecycle stage (later stages add theirs)."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from difflab.demo import run_demo, run_digits_demo

    print(f"difflab demo: sampling an exact Gaussian-mixture denoiser with several solvers -> {args.out}/")
    run_demo(args.out, samples=args.samples)
    print(f"wrote {args.out}/solvers.png and {args.out}/error_vs_nfe.png")
    if args.train_steps:
        print(f"difflab demo: training the digits recipe ({args.config}) for {args.train_steps} steps")
        try:
            metrics = run_digits_demo(args.out, args.config, steps=args.train_steps, eval_samples=args.eval_samples)
        except (ValueError, FileNotFoundError) as exc:
            print(f"difflab demo: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}/digits.png (column k: digit k) and the run in {args.out}/digits-run/")
        print(f"Fréchet distance {metrics['frechet_distance']:.2f} (real-data floor "
              f"{metrics['noise_floor_frechet_distance']:.2f}), class accuracy {metrics['class_accuracy']:.1%}, "
              f"precision {metrics['precision']:.2f}, recall {metrics['recall']:.2f}, "
              f"nearest-training-image distance {metrics['memorisation_ratio']:.2f}x that between real digits")
    return 0


def _solvers(args: argparse.Namespace) -> int:
    from difflab.sampling import SCHEDULES, SOLVERS, STOCHASTIC

    print("solvers (NFE for 10 steps; * = stochastic):")
    for name, fn in SOLVERS.items():
        doc = (fn.__doc__ or "").strip().splitlines()[0]
        print(f"  {name:16s}{'*' if name in STOCHASTIC else ' '} {fn.nfe(10):3d}  {doc}")
    print("schedules:")
    for name, fn in SCHEDULES.items():
        print(f"  {name:16s}  {(fn.__doc__ or '').strip().splitlines()[0]}")
    return 0


LAUNCHED_VERBS = ("train", "sample", "eval")  # what difflab launch runs under torchrun


def torchrun_command(nproc: int, verb_args: list[str], nnodes: int = 1, node_rank: int = 0,
                     endpoint: str | None = None, run_id: str = "difflab") -> list[str]:
    """The torchrun command that runs ``difflab VERB_ARGS`` (e.g. ``["train", "digits", "--set", ...]``) on ``nproc``
    processes per node: standalone on one node, or joining the c10d rendezvous at ``endpoint`` (HOST:PORT, the same
    on every node)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes == 1:
        command.append("--standalone")
    else:
        if endpoint is None:
            raise ValueError("several nodes need --rdzv-endpoint HOST:PORT (a node all of them reach)")
        command += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
    return [*command, "-m", "--", "difflab", *verb_args]  # "--": torchrun must not read sample's --n as its own


def _launch(args: argparse.Namespace) -> int:
    import shlex
    import subprocess

    if args.node_rank >= args.nnodes:
        print(f"difflab launch: error: --node-rank {args.node_rank} is not below --nnodes {args.nnodes}",
              file=sys.stderr)
        return 2
    try:
        verb = [args.target] if args.target in LAUNCHED_VERBS else ["train", args.target]  # a config: train it
        command = torchrun_command(args.nproc, [*verb, *args.verb_args], args.nnodes, args.node_rank,
                                   args.rdzv_endpoint, args.rdzv_id)
    except ValueError as exc:
        print(f"difflab launch: error: {exc}", file=sys.stderr)
        return 2
    print(shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(command).returncode


def _export(args: argparse.Namespace) -> int:
    from difflab.training.run import export_run

    try:
        out = export_run(args.run_dir, args.out, half=not args.full_precision)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"difflab export: error: {exc}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"difflab export: {args.run_dir} -> {out} ({size / 2**20:.1f} MB); difflab sample {out} ... uses it")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from difflab.config import ConfigError, apply_overrides, load_yaml
    from difflab.training.config import RunConfig, resolve
    from difflab.training.plan import GIB, plan

    try:
        if args.config.endswith((".yaml", ".yml")):
            mapping = apply_overrides(load_yaml(args.config), args.set)
            try:  # the model completed from its data (input size, classes, text width)
                config = resolve(mapping)
            except (ConfigError, ValueError, FileNotFoundError) as exc:
                from difflab.config import build

                print(f"difflab plan: note: the model is not completed from its data ({exc}); unset input sizes "
                      "take the network defaults (--set model.resolution=... to choose)", file=sys.stderr)
                config = build(RunConfig, mapping)
        else:
            config = RunConfig(model={"preset": args.config})
        t = config.train
        facts, estimates, best = plan(config.model, gpus=args.gpus, gpu_memory_gib=args.gpu_memory,
                                      batch=args.batch or t.batch, gpus_per_node=args.gpus_per_node,
                                      accumulation=t.accumulation, precision=t.precision,
                                      emas=len(t.ema_decays) + len(t.ema_sigma_rels),
                                      bucket_view=t.gradient_as_bucket_view,
                                      runtime_memory_gib=args.runtime_memory)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"difflab plan: error: {exc}", file=sys.stderr)
        return 2
    print(f"{facts['parameters'] / 1e6:,.1f} M parameters; activations {facts['activation_bytes'] / 2**20:,.1f} "
          f"MiB per sample (fp32); {args.gpus} GPUs of {args.gpu_memory:g} GiB, {args.gpus_per_node} per node")
    kinds = [k for k in ("weights", "gradients", "optimizer", "ema", "activations", "buckets", "gathered", "runtime")
             if any(k in e.memory for e in estimates)]
    print(f"{'strategy':8} " + " ".join(f"{k:>11}" for k in kinds) + f" {'total GiB':>9} {'fits':>4} "
          f"{'intra GB':>9} {'inter GB':>9} {'comm s':>7}")
    for e in estimates:
        cells = " ".join(f"{e.memory.get(k, 0) / GIB:11.2f}" for k in kinds)
        print(f"{e.strategy:8} {cells} {e.memory['total'] / GIB:9.2f} {'yes' if e.fits else 'no':>4} "
              f"{e.intra_node_bytes / 1e9:9.2f} {e.inter_node_bytes / 1e9:9.2f} {e.communication_seconds:7.3f}")
    if best is None:
        print("difflab plan: no strategy fits: lower train.batch per device (more accumulation), use bf16, "
              "activation checkpointing, or more GPUs")
        return 1
    print(f"recommended: {best.strategy} (least communication among the strategies that fit)")
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from difflab.config import apply_overrides
    from difflab.models.factory import load_config_file, model_info

    try:
        mapping = load_config_file(args.config) if args.config.endswith((".yaml", ".yml")) else {"preset": args.config}
        info = model_info(apply_overrides(mapping, args.set), text_tokens=args.text_tokens)
    except (ValueError, TypeError) as exc:
        print(f"difflab model-info: error: {exc}", file=sys.stderr)
        return 2
    rows = [
        ("network", info["arch"]),
        ("input (per sample)", " x ".join(map(str, info["input_shape"]))),
        ("parameters", f"{info['parameters'] / 1e6:,.2f} M"),
        ("forward FLOPs / sample", f"{info['forward_flops'] / 1e9:,.3f} GFLOP"),
        ("training step FLOPs / sample", f"{info['train_flops'] / 1e9:,.3f} GFLOP  (forward + backward)"),
        ("activation memory / sample", f"{info['activation_bytes'] / 2**20:,.1f} MiB  (saved for backward)"),
    ]
    for name, value in rows:
        print(f"{name:30s}{value}")
    return 0


def _config_path(text: str) -> Path:
    """A YAML file, or the name of a preset in ./configs (``digits`` -> configs/digits.yaml)."""
    path = Path(text)
    if not path.exists() and not path.suffix and Path("configs", f"{text}.yaml").exists():
        path = Path("configs", f"{text}.yaml")
    return path


def _training(verb: str, work) -> int:
    """Run ``work()`` (training of some kind); bad input exits 2 with one line, a stopped run 1."""
    import yaml

    from difflab.training import TrainingError

    try:
        work()
    except (ValueError, FileExistsError, FileNotFoundError, yaml.YAMLError) as exc:
        print(f"difflab {verb}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"difflab {verb}: stopped: {exc}", file=sys.stderr)
        return 1
    return 0


def _train(args: argparse.Namespace) -> int:
    from difflab.config import load_yaml
    from difflab.training import Trainer, resolve
    from difflab.training.trainer import config_yaml

    if args.config is None and not args.resume:
        print("difflab train: error: give a CONFIG (a YAML file or a preset in configs/)", file=sys.stderr)
        return 2
    run_dir = args.run_dir or Path("runs", _config_path(args.config).stem)

    def work() -> None:
        saved = run_dir / "config.yaml"
        if args.resume and saved.exists():
            if args.config is not None:
                print(f"difflab train: resuming {run_dir} with its own config.yaml ({args.config} is not re-read)")
            mapping = load_yaml(saved)
        else:
            mapping = load_yaml(_config_path(args.config))
        config = resolve(mapping, args.set)
        if args.dry_run:
            print(config_yaml(config), end="")
            return
        if os.environ.get("RANK", "0") == "0":
            print(f"difflab train: {run_dir}")
        Trainer(config, run_dir, resume=args.resume, progress=not args.no_progress).fit()

    return _training("train", work)


def _distill(args: argparse.Namespace) -> int:
    from difflab.distillation import distill

    def work() -> None:
        students = distill(args.teacher, args.method, args.out, steps=args.steps, from_steps=args.from_steps,
                           train_steps=args.train_steps, overrides=args.set, resume=args.resume,
                           progress=not args.no_progress)
        print("difflab distill: students (sample them with difflab sample DIR): " + ", ".join(map(str, students)))

    return _training("distill", work)


def _finetune(args: argparse.Namespace) -> int:
    from difflab.control.finetune import finetune

    def work() -> None:
        overrides = [*args.set, f"control.rank={args.rank}", f"control.alpha={args.alpha or args.rank}"]
        out = finetune(args.base, args.method, args.out, kind=args.control, data=args.data,
                       train_steps=args.train_steps, overrides=overrides, resume=args.resume,
                       progress=not args.no_progress)
        if args.method == "lora":
            print(f"difflab finetune: wrote {out / 'lora.safetensors'} (difflab sample {args.base} --lora "
                  f"{out / 'lora.safetensors'}:STRENGTH)")
        else:
            print(f"difflab finetune: wrote {out} (sample it with difflab sample {out} --control PICTURE)")

    return _training("finetune", work)


def _class_label(text: str) -> int | str | None:
    if text in ("balanced", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class index, 'balanced' or 'none', got {text!r}") from None


def _interval(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH sigmas (e.g. 0.3,5), got {text!r}") from None
    return low, high


def _guidance_options(args: argparse.Namespace) -> dict:
    """``guidance=`` and ``guide_with=`` for sampling, from the guidance flags (none when they are absent)."""
    from difflab.guidance import GuidanceConfig
    from difflab.training.run import load_run

    if args.guidance is None:
        if args.guide_with or args.guidance_interval or args.guidance_rescale or args.guidance_method != "cfg":
            raise ValueError("the guidance options need --guidance SCALE")
        return {}
    config = GuidanceConfig(scale=args.guidance, interval=args.guidance_interval, rescale=args.guidance_rescale,
                            method=args.guidance_method, apg_eta=args.apg_eta, apg_threshold=args.apg_threshold)
    options = {"guidance": config}
    if args.guide_with:
        options["guide_with"] = load_run(args.guide_with, ema=args.guide_with_ema).model
    return options


def _add_guidance_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("guidance")
    group.add_argument("--guidance", type=float, help="guidance scale w (1: none); classifier-free unless --guide-with")
    group.add_argument("--guidance-interval", type=_interval, metavar="LOW,HIGH",
                       help="guide only for sigmas in [LOW, HIGH] (Kynkäänniemi et al. 2024)")
    group.add_argument("--guidance-rescale", type=float, default=0.0,
                       help="CFG rescale phi in [0, 1] (Lin et al. 2024)")
    group.add_argument("--guidance-method", choices=["cfg", "apg"], default="cfg",
                       help="cfg, or adaptive projected guidance (Sadat et al. 2024)")
    group.add_argument("--apg-eta", type=float, default=0.0, help="APG: weight of the parallel component")
    group.add_argument("--apg-threshold", type=float, help="APG: largest norm of the guidance update")
    group.add_argument("--guide-with", type=Path, metavar="RUN_DIR",
                       help="autoguidance: guide with this weaker run of the same task (Karras et al. 2024)")
    group.add_argument("--guide-with-ema", help="which EMA of the weaker run (default: its first) or 'none'")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _resample(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected JUMP,COUNT (two positive integers), got {text!r}")
    return int(parts[0]), int(parts[1])


def _add_control_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("control (image-to-image, inpainting)")
    group.add_argument("--init-image", type=Path, metavar="PNG",
                       help="start from this picture (resized, centre-cropped)")
    group.add_argument("--strength", type=_fraction, default=1.0,
                       help="image-to-image: how much of the sampling runs from the noised init image, in (0, 1]")
    group.add_argument("--mask", type=Path, metavar="PNG",
                       help="inpaint: white is generated, black keeps the init image (a video run: in every frame)")
    group.add_argument("--init-video", type=Path, metavar="CLIP",
                       help="video runs: start from this clip (MP4, GIF, a folder of frames), e.g. with --keep-frames")
    group.add_argument("--keep-frames", type=_frames, metavar="I,J,...",
                       help="video runs: keep these frames of the init clip (or of --init-image, repeated) and "
                            "generate the rest: 0 is image-to-video, 0,-1 interpolation, 0,1,2,3 extension")
    group.add_argument("--resample", type=_resample, metavar="JUMP,COUNT",
                       help="inpaint with RePaint: solve every JUMP steps COUNT times (e.g. 2,10)")
    group.add_argument("--noise", type=Path, metavar="NPZ",
                       help="start from this noise (difflab invert's .npz) instead of the seeds': edit an image")
    group.add_argument("--reconstruction-guidance", type=float, default=0.0, metavar="W",
                       help="inpaint: steer the generated region by its agreement with the kept one (e.g. 2)")
    group.add_argument("--control", type=Path, action="append", default=[], metavar="PNG",
                       help="a control picture per ControlNet: the run's own first, then each --control-run's")
    group.add_argument("--control-run", type=_weighted_path, action="append", default=[], metavar="DIR[:WEIGHT]",
                       help="attach the ControlNet of this fine-tuned run (difflab finetune), weighted (default 1)")
    group.add_argument("--lora", type=_weighted_path, action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="merge this LoRA adapter (difflab finetune --method lora) at a strength (default 1)")


def _frames(text: str) -> list[int]:
    try:
        frames = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected frame indices I,J,... (e.g. 0 or 0,-1), got {text!r}") from None
    return frames


def _weighted_path(text: str) -> tuple[Path, float]:
    path, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        return Path(path), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PATH or PATH:WEIGHT, got {text!r}") from None


def _control_options(args: argparse.Namespace, run) -> tuple[object, dict]:
    """The run with any ControlNets attached, and the control flags as draw() options (pictures at its size)."""
    import torch

    from difflab.control.controlnet import attach_controlnets
    from difflab.control.inputs import frame_mask, read_image, read_mask, read_video
    from difflab.control.lora import merge_lora

    channels, *_, resolution = run.image_shape
    own = len(run.config.model.get("controls", ()))
    if args.control_run:
        run = attach_controlnets(run, [path for path, _ in args.control_run])
    for path, strength in args.lora:
        merge_lora(run.network, run.config.model, path, strength)
    controls = run.config.model.get("controls", ())
    options = {}
    if args.control or controls:
        if len(args.control) != len(controls):
            raise ValueError(f"give one --control picture per ControlNet: {len(controls)} ControlNet(s), "
                             f"{len(args.control)} picture(s)")
        options["control"] = torch.cat([read_image(path, resolution, c) for path, c in zip(args.control, controls)], 1)
        options["control_scale"] = (1.0,) * own + tuple(weight for _, weight in args.control_run)
    frames = run.image_shape[1] if len(run.image_shape) == 4 else None  # a video run's clip length
    if frames is None and (args.init_video is not None or args.keep_frames is not None):
        raise ValueError("--init-video and --keep-frames are for video runs; this run makes images")
    if args.init_video is not None and args.init_image is not None:
        raise ValueError("give --init-image or --init-video, not both")
    if args.keep_frames is not None and args.init_video is None and args.init_image is None:
        raise ValueError("--keep-frames keeps frames of --init-video (or of --init-image, repeated): give one")
    if args.init_video is not None:
        options["init"] = read_video(args.init_video, frames, resolution, channels)
    if args.init_image is not None:
        options["init"] = read_image(args.init_image, resolution, channels)
        if frames is not None:  # a still as every frame: with --keep-frames 0, image-to-video
            options["init"] = options["init"][:, :, None].expand(-1, -1, frames, -1, -1).contiguous()
    if args.mask is not None:
        options["mask"] = read_mask(args.mask, resolution)
        if frames is not None:
            options["mask"] = options["mask"][:, :, None]
    if args.keep_frames is not None:
        kept = frame_mask(args.keep_frames, frames)
        options["mask"] = kept if args.mask is None else options["mask"] * kept
    if args.strength != 1:
        options["strength"] = args.strength
    if args.resample is not None:
        options["resample"] = args.resample
    if args.reconstruction_guidance:
        options["reconstruction"] = args.reconstruction_guidance
    if args.noise is not None:
        options["noise"] = _read_noise(args.noise)
    return run, options


def _read_noise(path: Path):
    import numpy as np
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"no noise file at {path}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return torch.from_numpy(archive["noise"]).float()
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a noise archive from difflab invert ({exc})") from None


def _prompts(args: argparse.Namespace) -> list[str] | None:
    """The prompts of --prompt or --prompts FILE (one a line; blank lines and lines starting with # skipped)."""
    if args.prompts is None:
        return None if args.prompt is None else [args.prompt]
    try:
        lines = args.prompts.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read prompts from {args.prompts}: {exc}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{args.prompts} holds no prompt (one a line)")
    return prompts


def _sampling_world(work):
    """A sampling verb run in this process's world (:func:`difflab.training.distributed.init_world`): under torchrun
    the processes share the samples and only the first prints, shows progress and writes files; alone, it samples
    on the GPU when there is one."""

    def run(args: argparse.Namespace) -> int:
        import contextlib
        import io

        from difflab.training.distributed import close_world, init_world

        world = init_world()
        args.no_progress = args.no_progress or not world.main
        try:
            with contextlib.nullcontext() if world.main else contextlib.redirect_stdout(io.StringIO()):
                code = work(args, world)
        except BaseException:
            close_world(world, clean=False)
            raise
        close_world(world)
        return code

    return run


def _sample(args: argparse.Namespace, world) -> int:
    from difflab.training.run import load_run, write_samples

    try:
        if args.negative_prompt is not None and args.guidance is None:
            raise ValueError("--negative-prompt steers classifier-free guidance: give --guidance W too (e.g. 4)")
        prompts = _prompts(args)
        n = args.n or (8 if prompts else 64)  # with prompts: per prompt, one grid row each
        run = load_run(args.run_dir, ema=args.ema, checkpoint=args.checkpoint, device=world.device)
        options = {k: getattr(args, k) for k in ("solver", "steps", "schedule") if getattr(args, k) is not None}
        options.update(_guidance_options(args))
        run, control = _control_options(args, run)
        options.update(control)
        if prompts is not None:
            options["prompts"] = [prompt for prompt in prompts for _ in range(n)]
        if args.negative_prompt is not None:
            options["negative_prompt"] = args.negative_prompt
        total = n * len(prompts or [None])
        path = write_samples(run, args.out, n=total, class_label=args.class_label, seed=args.seed,
                             progress=not args.no_progress, columns=n if prompts else None, **options)
    except (ValueError, FileNotFoundError) as exc:
        print(f"difflab sample: error: {exc}", file=sys.stderr)
        return 2
    print(f"difflab sample: {total} samples from {run.checkpoint} ({run.weights}) -> {path}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from difflab.serve import run_server
    from difflab.serve.backend import RunBackend

    try:
        backend = RunBackend.load(args.run_dir, ema=args.ema, device=args.device)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        print(f"difflab serve: error: {exc}", file=sys.stderr)
        return 2
    run_server(backend, host=args.host, port=args.port, queue_size=args.queue_size, max_n=args.max_n)
    return 0


def _invert(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from difflab.control.inputs import read_image
    from difflab.evaluation.metrics import psnr
    from difflab.evaluation.plots import save_image_grid
    from difflab.paths import replacing
    from difflab.training.run import invert_images, load_run

    try:
        if args.out.suffix != ".npz":
            raise ValueError(f"--out must end in .npz, got {args.out.name!r}")
        run = load_run(args.run_dir, ema=args.ema, checkpoint=args.checkpoint)
        channels, *_, resolution = run.image_shape
        image = read_image(args.image, resolution, channels)
        noise, back = invert_images(run, image, steps=args.steps, solver=args.solver, refine=args.refine,
                                    class_label=args.class_label)
    except (ValueError, FileNotFoundError) as exc:
        print(f"difflab invert: error: {exc}", file=sys.stderr)
        return 2
    quality = psnr(back, image)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(args.out) as tmp:
        np.savez(tmp, noise=noise.numpy(), reconstruction=back.numpy(), psnr=quality)
    picture = save_image_grid(torch.cat([image, back]), args.out.with_suffix(".png"), columns=2)
    print(f"difflab invert: {args.image} -> noise and back through {args.steps} {args.solver} steps "
          f"(refine {args.refine}): PSNR {quality:.2f} dB; wrote {args.out} and {picture} (image | reconstruction)")
    return 0


def _eval(args: argparse.Namespace, world) -> int:
    import json

    from difflab.data import load_dataset
    from difflab.evaluation.features import load_feature_extractor
    from difflab.evaluation.report import save_nearest_pairs
    from difflab.training.run import evaluate, load_run

    try:
        run = load_run(args.run_dir, ema=args.ema, checkpoint=args.checkpoint, device=world.device)
        # The user's own feature network (e.g. an Inception) as TorchScript, or difflab's digit classifier.
        extractor = load_feature_extractor(args.features) if args.features else None
        if args.sweep:
            return _eval_sweep(args, run, extractor, world)
        metrics, images = evaluate(run, args.n, seed=args.seed, extractor=extractor, progress=not args.no_progress,
                                   **_guidance_options(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"difflab eval: error: {exc}", file=sys.stderr)
        return 2
    metrics.update(checkpoint=str(run.checkpoint), weights=run.weights, solver=run.config.sample.solver,
                   steps=run.config.sample.steps,
                   features=str(args.features) if args.features else "difflab digit classifier")
    if not world.main:
        return 0
    dataset = load_dataset(run.config.data.dataset)
    out = args.out or args.run_dir / "eval" / f"{run.checkpoint.name}-{run.weights}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    picture = save_nearest_pairs(images, dataset, out.with_suffix(".png"))
    for key, value in metrics.items():
        print(f"{key:32s}{value:.4g}" if isinstance(value, float) else f"{key:32s}{value}")
    print(f"difflab eval: wrote {out} and {picture} (samples above their nearest training images)")
    return 0


def _sweep(text: str) -> list[float]:
    name, _, values = text.partition("=")
    try:
        scales = [float(v) for v in values.split(",")]
    except ValueError:
        scales = []
    if name != "guidance" or not scales:
        raise argparse.ArgumentTypeError(f"expected guidance=SCALE,SCALE,... (e.g. guidance=0,1,2,3,5), got {text!r}")
    return scales


def _eval_sweep(args: argparse.Namespace, run, extractor, world) -> int:
    """Metrics against guidance scale (the other guidance flags hold for every scale): a JSON table and a plot."""
    import json

    from difflab.evaluation.plots import plot_sweep
    from difflab.training.run import evaluate

    method = "autoguidance" if args.guide_with else "cfg" if not args.guidance_interval else "cfg+interval"
    rows = []
    for scale in args.sweep:
        args.guidance = scale
        metrics, _ = evaluate(run, args.n, seed=args.seed, extractor=extractor, progress=not args.no_progress,
                              **_guidance_options(args))
        rows.append({"method": method, "guidance": scale, **metrics})
        print(f"guidance {scale:g}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                   if isinstance(v, float)), flush=True)
    if not world.main:
        return 0
    out = args.out or args.run_dir / "eval" / f"{run.checkpoint.name}-{run.weights}-sweep-{method}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"interval": args.guidance_interval, "rescale": args.guidance_rescale, "n": args.n,
                "guide_with": str(args.guide_with) if args.guide_with else None, "checkpoint": str(run.checkpoint)}
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    metrics = [m for m in ("frechet_distance", "precision", "recall", "class_accuracy") if m in rows[0]]
    picture = plot_sweep(rows, "guidance", metrics, out.with_suffix(".png"), title=f"{args.run_dir.name}: {method}")
    print(f"difflab eval: wrote {out} and {picture}")
    return 0


def _ema(args: argparse.Namespace) -> int:
    from difflab.training.run import posthoc_ema_into_checkpoint

    try:
        paths = [posthoc_ema_into_checkpoint(args.run_dir, sigma_rel) for sigma_rel in args.sigma_rel]
    except (ValueError, FileNotFoundError) as exc:
        print(f"difflab ema: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        name = path.name.removeprefix("ema-").removesuffix(".safetensors")
        print(f"difflab ema: wrote {path}; sample it with --ema {name}")
    return 0


def _sigma_rel(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 0.3:
        raise argparse.ArgumentTypeError(f"expected a relative EMA width in (0, 0.3), got {text!r}")
    return value


def _curation_input(args: argparse.Namespace):
    """(root, records, config) of a ``data`` verb: a folder or a manifest (.jsonl, .parquet), and --set thresholds."""
    from difflab.config import apply_overrides, build
    from difflab.data.curate import CurationConfig
    from difflab.data.sources import read_manifest, scan_folder

    source = Path(args.source)
    if source.is_file():
        root, records = source.parent, read_manifest(source)
    elif source.is_dir():
        root, records = source, scan_folder(source)
    else:
        raise ValueError(f"source {str(source)!r} does not exist")
    config = build(CurationConfig, apply_overrides({}, args.set), prefix="curate")
    return root, records, config


def _curated(args: argparse.Namespace):
    """(root, curated items) of a ``data curate`` or ``data stats`` source."""
    from difflab.data.curate import curate

    root, records, config = _curation_input(args)
    return root, curate(root, records, config, progress=not args.no_progress)


def _data_curate(args: argparse.Namespace) -> int:
    from difflab.data.curation_report import write_curation

    try:
        root, items = _curated(args)
    except (ValueError, ImportError) as exc:
        print(f"difflab data curate: error: {exc}", file=sys.stderr)
        return 2
    result = write_curation(args.out, root, items)
    removed = ", ".join(f"{n} {reason}" for reason, n in result["counts"].items() if n) or "nothing"
    print(f"difflab data curate: kept {result['kept']} of {result['total']} ({removed}); "
          f"wrote {args.out}/manifest.jsonl, report.json and report.html")
    return 0


def _data_stats(args: argparse.Namespace) -> int:
    import json

    from difflab.data.curate import report, statistics

    try:
        _, items = _curated(args)
    except (ValueError, ImportError) as exc:
        print(f"difflab data stats: error: {exc}", file=sys.stderr)
        return 2
    result = report(items)
    print(f"{result['total']} items, {result['kept']} would be kept")
    for reason, n in result["counts"].items():
        print(f"  {reason:18s}{n}")
    print(f"classes: {json.dumps(result['classes'])} (imbalance {result['class_imbalance']:.2f})")
    for name, summary in statistics(items).items():
        if summary:
            print(f"  {name:18s}min {summary['min']:.4g}  median {summary['median']:.4g}  max {summary['max']:.4g}")
    return 0


def _data_shard(args: argparse.Namespace) -> int:
    from difflab.data.shards import write_shards

    try:
        root, records, _ = _curation_input(args)
        index = write_shards(root, records, args.out, args.resolution, mode=args.mode, per_shard=args.per_shard,
                             crop=args.crop, buckets=args.buckets, progress=not args.no_progress)
    except (ValueError, ImportError) as exc:
        print(f"difflab data shard: error: {exc}", file=sys.stderr)
        return 2
    skipped = f", skipped {len(index['skipped'])} unreadable (see index.json)" if index["skipped"] else ""
    sizes = f"{len(index['buckets'])} buckets of ~{args.resolution}px" if args.buckets else f"{args.resolution}px"
    print(f"difflab data shard: {index['count']} images at {sizes} in {len(index['shards'])} shards"
          f"{skipped} -> {args.out}; train on it with --set data.dataset={args.out}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from difflab.representation.pipeline import encode_dataset

    try:
        index = encode_dataset(args.encoder, args.data, args.out, batch=args.batch, per_shard=args.per_shard,
                               progress=not args.no_progress)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"difflab encode: error: {exc}", file=sys.stderr)
        return 2
    shape = "x".join(map(str, index["shape"]))
    print(f"difflab encode: {index['count']} latents of {shape} in {len(index['shards'])} shards -> {args.out}; "
          f"train a generator on them with --set data.dataset={args.out} --set data.encoder={args.encoder}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _output_dir(text: str) -> Path:
    """A folder to write into, created if missing; checked before any work starts."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create output folder {text!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"output folder {text!r} is not writable")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difflab", description="Diffusion models for images and video.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    demo = verbs.add_parser("demo", help="compare solvers on an exact denoiser, train a digits model, write pictures")
    demo.add_argument("--out", type=_output_dir, default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--samples", type=_positive_int, default=2000, help="samples per solver (default: 2000)")
    demo.add_argument("--train-steps", type=int, default=600,
                      help="steps of digits training after the solver comparison (0: skip; default: 600)")
    demo.add_argument("--eval-samples", type=_positive_int, default=1000, help="samples scored after training")
    demo.add_argument("--config", default="configs/digits.yaml", help="the recipe to train")
    demo.set_defaults(run=_demo)
    listing = verbs.add_parser("solvers", help="list the solvers and sigma schedules")
    listing.set_defaults(run=_solvers)
    train = verbs.add_parser("train", help="train the model a config describes into a run directory")
    train.add_argument("config", nargs="?", help="a YAML file, or a preset name in configs/ (e.g. digits)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.steps=500 (repeatable)")
    train.add_argument("--run-dir", type=Path, help="run directory (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(run=_train)
    launch = verbs.add_parser("launch", help="train, sample or eval on several processes or nodes: a thin torchrun "
                                             "wrapper", allow_abbrev=False)  # --n is sample's, not --nproc
    launch.add_argument("--nproc", type=_positive_int, required=True, help="processes (GPUs) per node")
    launch.add_argument("--nnodes", type=_positive_int, default=1, help="nodes (default: 1, standalone)")
    launch.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1")
    launch.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="several nodes: where they meet (c10d)")
    launch.add_argument("--rdzv-id", default="difflab", help="several nodes: the same job id on each")
    launch.add_argument("--dry-run", action="store_true", help="print the torchrun command and stop")
    launch.add_argument("target", metavar="CONFIG|VERB",
                        help="a config to train (as for difflab train), or sample / eval followed by their arguments")
    launch.add_argument("verb_args", nargs=argparse.REMAINDER,
                        help="the verb's arguments (train: --set, --run-dir...; sample: RUN --n 50000 --out x.npz)")
    launch.set_defaults(run=_launch)
    student = verbs.add_parser("distill", help="distil a trained run into a few-step student (its own run directory)")
    student.add_argument("teacher", type=Path, help="the teacher's run directory")
    student.add_argument("--method", required=True,
                         choices=["progressive", "consistency", "multistep_consistency", "consistency_training",
                                  "guidance"],
                         help="progressive halving, consistency distillation (multistep: one consistent segment per "
                              "sampling step) or training, or guidance distillation")
    student.add_argument("--out", type=Path, required=True,
                         help="the student's run directory (progressive: a folder of steps-N stages)")
    student.add_argument("--steps", type=_positive_int, default=1,
                         help="sampling steps of the (last) student (default: 1)")
    student.add_argument("--from-steps", type=_positive_int, default=16,
                         help="progressive: the teacher's steps the first stage halves (default: 16)")
    student.add_argument("--train-steps", type=_positive_int, default=1000,
                         help="optimizer steps per student (per stage for progressive; default: 1000)")
    student.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a key of the student's config, e.g. --set optim.lr=1e-4 (repeatable)")
    student.add_argument("--resume", action="store_true", help="keep finished students, continue unfinished ones")
    student.add_argument("--no-progress", action="store_true", help="no progress bar")
    student.set_defaults(run=_distill)
    tune = verbs.add_parser("finetune", help="fine-tune a trained run: ControlNet, LoRA or mask-conditioned inpainting")
    tune.add_argument("base", type=Path, help="the base run directory")
    tune.add_argument("--method", required=True, choices=["controlnet", "lora", "inpaint"],
                      help="what to train: a ControlNet, a LoRA adapter or a mask-conditioned inpainting model")
    tune.add_argument("--control", choices=["sobel", "mask", "lowres"], default="sobel",
                      help="controlnet: the control pictures made from the training images (default: sobel edges)")
    tune.add_argument("--data", help="the images to learn: a folder of pictures (lora: a handful), a shard folder "
                                     "or a built-in set (default: the base's data)")
    tune.add_argument("--rank", type=_positive_int, default=4, help="lora: rank of the updates (default: 4)")
    tune.add_argument("--alpha", type=float, help="lora: updates are scaled by alpha / rank (default: the rank)")
    tune.add_argument("--out", type=Path, required=True, help="the fine-tune's run directory")
    tune.add_argument("--train-steps", type=_positive_int, default=1000, help="optimizer steps (default: 1000)")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a key of the fine-tune's config, e.g. --set optim.lr=1e-4")
    tune.add_argument("--resume", action="store_true", help="continue an unfinished fine-tune")
    tune.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune.set_defaults(run=_finetune)

    sampler = verbs.add_parser("sample", help="draw samples from a run directory (EMA weights by default)")
    sampler.add_argument("run_dir", type=Path, help="a run directory written by difflab train")
    sampler.add_argument("--n", type=_positive_int,
                         help="number of samples (default: 64), or per prompt with --prompt/--prompts (default: 8)")
    sampler.add_argument("--class-label", type=_class_label, default="balanced",
                         help="a class index, 'balanced' (spread over all classes) or 'none' (unconditional)")
    sampler.add_argument("--solver", help="solver (default: the run's sample.solver)")
    sampler.add_argument("--steps", type=_positive_int, help="solver steps (default: the run's sample.steps)")
    sampler.add_argument("--schedule", help="sigma schedule (default: the run's sample.schedule)")
    sampler.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    sampler.add_argument("--ema", help="which EMA (e.g. 0.999, phema-0.050) or 'none' for the raw weights")
    sampler.add_argument("--checkpoint", type=_positive_int, help="the step to load (default: latest)")
    sampler.add_argument("--out", type=Path, default=Path("samples.png"),
                         help=".png grid, .npz archive, or for video runs a .gif or .mp4 of the grid")
    sampler.add_argument("--no-progress", action="store_true", help="no progress bar")
    texts = sampler.add_argument_group("text (text-to-image runs)")
    one_or_many = texts.add_mutually_exclusive_group()
    one_or_many.add_argument("--prompt", help="what to draw, e.g. 'a panda face' (default: unconditional)")
    one_or_many.add_argument("--prompts", type=Path, metavar="FILE",
                             help="a text file of prompts, one a line: a grid row (or --n samples) each")
    texts.add_argument("--negative-prompt", help="what to steer away from (with --guidance): replaces the null "
                                                 "prompt in classifier-free guidance")
    _add_guidance_flags(sampler)
    _add_control_flags(sampler)
    sampler.set_defaults(run=_sampling_world(_sample))

    server = verbs.add_parser("serve", help="serve a text-to-image run: an HTTP API and a web page")
    server.add_argument("run_dir", type=Path, help="a text-to-image run directory")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it: the API has "
                             "no authentication)")
    server.add_argument("--port", type=_positive_int, default=8000, help="port (default: 8000)")
    server.add_argument("--device", default="cpu", help="torch device of the model, e.g. cuda (default: cpu)")
    server.add_argument("--ema", help="which EMA (default: the run's first) or 'none'")
    server.add_argument("--queue-size", type=_positive_int, default=4,
                        help="requests that may wait while one generates; more get 503 (default: 4)")
    server.add_argument("--max-n", type=_positive_int, default=16, help="most images per request (default: 16)")
    server.set_defaults(run=_serve)
    inversion = verbs.add_parser("invert", help="invert a picture to noise through the ODE and back (for editing)")
    inversion.add_argument("run_dir", type=Path, help="a run directory written by difflab train")
    inversion.add_argument("image", type=Path, help="the picture (resized and centre-cropped to the run's size)")
    inversion.add_argument("--steps", type=_positive_int, default=50, help="solver steps (default: 50)")
    inversion.add_argument("--solver", choices=["euler", "heun"], default="heun", help="the step run backwards")
    inversion.add_argument("--refine", type=int, choices=range(0, 21), default=0, metavar="0..20",
                           help="fixed-point iterations per step: an exact inverse of the sampling step")
    inversion.add_argument("--class-label", type=_class_label, default=None,
                           help="condition on this class (default: unconditional)")
    inversion.add_argument("--ema", help="which EMA (default: the run's first) or 'none'")
    inversion.add_argument("--checkpoint", type=_positive_int, help="the step to load (default: latest)")
    inversion.add_argument("--out", type=Path, default=Path("inversion.npz"),
                           help=".npz with noise, reconstruction and psnr; a .png beside it shows both pictures")
    inversion.set_defaults(run=_invert)

    export = verbs.add_parser("export", help="a slim copy of a run to share: config, sampling weights, autoencoder")
    export.add_argument("run_dir", type=Path, help="a run directory")
    export.add_argument("--out", type=Path, required=True, help="a new folder")
    export.add_argument("--full-precision", action="store_true", help="keep fp32 weights (default: fp16, half size)")
    export.set_defaults(run=_export)

    evaluate = verbs.add_parser("eval", help="sample a run and score it: Fréchet distance, precision/recall, ...")
    evaluate.add_argument("run_dir", type=Path, help="a run directory written by difflab train")
    evaluate.add_argument("--n", type=_positive_int, default=2000, help="samples to score (default: 2000)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--ema", help="which EMA (default: the run's first) or 'none'")
    evaluate.add_argument("--checkpoint", type=_positive_int, help="the step to load (default: latest)")
    evaluate.add_argument("--out", type=Path, help="metrics JSON (default: RUN/eval/<checkpoint>-<weights>.json)")
    evaluate.add_argument("--features", type=Path,
                          help="a TorchScript feature network (images in [-1, 1] -> features) instead of the "
                               "digit classifier difflab trains and caches")
    evaluate.add_argument("--sweep", type=_sweep, metavar="guidance=S1,S2,...",
                          help="score every guidance scale (with the other guidance flags): a JSON table and a plot")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_guidance_flags(evaluate)
    evaluate.set_defaults(run=_sampling_world(_eval))
    ema = verbs.add_parser("ema", help="post-hoc EMA: reconstruct any EMA length from a run's snapshots (EDM2)")
    ema.add_argument("run_dir", type=Path, help="a run trained with train.ema_sigma_rels and ema_snapshot_every")
    ema.add_argument("--sigma-rel", type=_sigma_rel, action="append", required=True,
                     help="relative EMA width, e.g. 0.05 (repeatable)")
    ema.set_defaults(run=_ema)
    data = verbs.add_parser("data", help="curate a source of images (folder or manifest), or print its statistics")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    for name, run, text in (("curate", _data_curate, "find and remove bad items; write a manifest and a report"),
                            ("stats", _data_stats, "print the curation statistics without writing anything")):
        action = data_verbs.add_parser(name, help=text)
        action.add_argument("source", help="an image folder or a manifest (.jsonl or .parquet)")
        if name == "curate":
            action.add_argument("--out", type=_output_dir, required=True, help="folder for manifest and report")
        action.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                            help="a curation threshold, e.g. --set min_size=32 (repeatable)")
        action.add_argument("--no-progress", action="store_true", help="no progress bar")
        action.set_defaults(run=run)
    shard = data_verbs.add_parser("shard", help="preprocess a source into tar shards with an index, for training")
    shard.add_argument("source", help="an image folder or a manifest (.jsonl, .parquet), e.g. a curated manifest.jsonl")
    shard.add_argument("--out", type=_output_dir, required=True, help="folder for the shards and index.json")
    shard.add_argument("--resolution", type=_positive_int, required=True, help="square size after resize + crop")
    shard.add_argument("--crop", choices=["center", "random"], default="center",
                       help="crop the centre now, or store uncropped for a random crop at every visit")
    shard.add_argument("--buckets", action="store_true",
                       help="aspect-ratio buckets of about resolution^2 pixels instead of square crops")
    shard.add_argument("--mode", choices=["RGB", "L"], default="RGB", help="colour (RGB) or grey (L)")
    shard.add_argument("--per-shard", type=_positive_int, default=1000, help="images per shard")
    shard.add_argument("--no-progress", action="store_true", help="no progress bar")
    shard.set_defaults(run=_data_shard, set=[])
    encode = verbs.add_parser("encode", help="encode a data set once into latent shards, for stage-2 training")
    encode.add_argument("encoder", help="an autoencoder run directory or a diffusers AutoencoderKL folder")
    encode.add_argument("data", help="a built-in data set or an image shard folder (difflab data shard)")
    encode.add_argument("--out", type=_output_dir, required=True, help="folder for the latent shards")
    encode.add_argument("--batch", type=_positive_int, default=64, help="images encoded at once")
    encode.add_argument("--per-shard", type=_positive_int, default=1000, help="latents per shard")
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")
    encode.set_defaults(run=_encode)
    planner = verbs.add_parser("plan", help="memory and communication of DDP, FSDP2 and HSDP for a config on N GPUs")
    planner.add_argument("config", help="a run config (YAML) or a model preset name (e.g. dit_xl_2)")
    planner.add_argument("--gpus", type=_positive_int, required=True, help="number of devices")
    planner.add_argument("--gpu-memory", type=float, required=True, help="memory per device in GiB (e.g. 80)")
    planner.add_argument("--gpus-per-node", type=_positive_int, default=8, help="devices per node (default: 8)")
    planner.add_argument("--runtime-memory", type=float, default=1.0, metavar="GIB",
                         help="memory per device besides tensors: CUDA context, NCCL, workspaces (default: 1)")
    planner.add_argument("--batch", type=_positive_int, help="global batch (default: the config's train.batch)")
    planner.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    planner.set_defaults(run=_plan)

    info = verbs.add_parser("model-info", help="parameters, FLOPs and activation memory of a network config")
    info.add_argument("config", help="a preset name (e.g. dit_s_2, unet_32) or a YAML file with a model: section")
    info.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a model key, e.g. --set resolution=64 (repeatable)")
    info.add_argument("--text-tokens", type=_positive_int, default=77, help="prompt length for text models")
    info.set_defaults(run=_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
