"""The ``difflab`` command: one verb per lifecycle stage (later stages add theirs)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from difflab.demo import run_demo

    print(f"difflab demo: sampling an exact Gaussian-mixture denoiser with several solvers -> {args.out}/")
    run_demo(args.out, samples=args.samples)
    print(f"wrote {args.out}/solvers.png and {args.out}/error_vs_nfe.png")
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


def _model_info(args: argparse.Namespace) -> int:
    from difflab.models.factory import load_config_file, model_info

    try:
        mapping = load_config_file(args.config) if args.config.endswith((".yaml", ".yml")) else {"preset": args.config}
        mapping.update(args.set)
        info = model_info(mapping, text_tokens=args.text_tokens)
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


def _key_value(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot parse the value of {text!r}") from None


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
    demo = verbs.add_parser("demo", help="compare solvers on an exact Gaussian-mixture denoiser, write pictures")
    demo.add_argument("--out", type=_output_dir, default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--samples", type=_positive_int, default=2000, help="samples per solver (default: 2000)")
    demo.set_defaults(run=_demo)
    listing = verbs.add_parser("solvers", help="list the solvers and sigma schedules")
    listing.set_defaults(run=_solvers)
    info = verbs.add_parser("model-info", help="parameters, FLOPs and activation memory of a network config")
    info.add_argument("config", help="a preset name (e.g. dit_s_2, unet_32) or a YAML file with a model: section")
    info.add_argument("--set", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                      help="override a model key, e.g. --set resolution=64 (repeatable)")
    info.add_argument("--text-tokens", type=_positive_int, default=77, help="prompt length for text models")
    info.set_defaults(run=_model_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
