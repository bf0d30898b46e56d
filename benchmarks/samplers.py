"""Accuracy per network evaluation: difflab's solvers and schedules against diffusers and k-diffusion.

Every sampler is driven by the same exact Gaussian-mixture denoiser from the same noise over the same
sigma range. For each NFE budget it reports the endpoint RMSE against a fine RK4 solution of the
probability-flow ODE from that noise, and the MMD to exact samples of the mixture.

    .venv-bench/bin/python benchmarks/samplers.py --json out/samplers.json      # full run (peers need the
    .venv/bin/python benchmarks/samplers.py --quick                              # bench env: make bench-env)

The optimised schedule and the bespoke solver are fitted on other noise (seed 1) than the noise evaluated (seed 0).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from difflab.diffusion import GaussianMixture  # noqa: E402
from difflab.evaluation import mmd, rmse, squared_errors  # noqa: E402
from difflab.evaluation.plots import plot_error_vs_nfe  # noqa: E402
from difflab.paths import replacing  # noqa: E402
from difflab.sampling import SCHEDULES, SOLVERS, STOCHASTIC, reference_solution, steps_for_nfe  # noqa: E402
from difflab.sampling.bespoke import LINEAR_SOLVERS, fit_bespoke  # noqa: E402
from difflab.sampling.solvers import in_chunks  # noqa: E402
from output import write_json  # noqa: E402
from peers import PEERS, run_peer  # noqa: E402  (imports neither diffusers nor k-diffusion)

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
CLOSED_FORM = ("karras", "loglinear", "vp_uniform", "vp_trailing", "flow_shift")
OPTIMIZED_SOLVERS = ("euler", "dpmpp_2m", "dpmpp_3m", "unipc", "deis")
OPTIMIZED_MAX_NFE = 20  # also the largest budget the bespoke solver is fitted for
LEARNED = ("optimized", "bespoke")  # configurations fitted to the denoiser


def multiscale_mixture() -> GaussianMixture:
    """16-D, components whose scales span 50x (0.01 to 0.5): stiff where sigma passes each scale."""
    g = torch.Generator().manual_seed(3)
    means = 0.8 * torch.randn(12, 16, generator=g, dtype=torch.float64)
    stds = torch.logspace(math.log10(0.01), math.log10(0.5), 12, dtype=torch.float64)
    weights = torch.rand(12, generator=g, dtype=torch.float64) + 0.2
    return GaussianMixture(means, stds, weights)


CASES = {
    "ring": ("2-D ring, 8 components, std 0.05", lambda: GaussianMixture.ring(8, radius=1.0, std=0.05)),
    "gmm64": ("64-D, 16 random components, std 0.05-0.15", lambda: GaussianMixture.random(64, 16, std=0.1)),
    "multiscale": ("16-D, 12 components, stds 0.01-0.5", multiscale_mixture),
    "image": ("1x16x16 image-shaped, 10 components", lambda: GaussianMixture.random(
        256, 10, std=0.1, spread=0.5, seed=7, sample_shape=(1, 16, 16))),
}


def reference_solutions(mixture: GaussianMixture, noise: torch.Tensor, steps: int,
                        directory: Path | None) -> tuple[torch.Tensor, float, float, Path | None]:
    """The RK4 solution from ``noise`` (scaled to SIGMA_MAX) with ``steps`` steps, the RMSE by which half the steps
    move it (an upper bound on its own error), the seconds both took, and the file they were read from, if any.

    With a ``directory`` they are stored there, under a digest of the mixture, the noise and the steps, and read
    back by later runs: at 100,000 noises of the 256-D case they take about ten minutes.
    """
    digest = hashlib.sha256(f"{mixture.fingerprint()}|{SIGMA_MIN:g}|{SIGMA_MAX:g}|rk4|{steps}".encode())
    digest.update(noise.numpy().tobytes())
    path = None if directory is None else directory / f"reference-{digest.hexdigest()[:20]}.safetensors"
    if path is not None and path.exists():
        try:
            with safe_open(path, "pt") as stored:
                meta = stored.metadata()
                return stored.get_tensor("reference"), float(meta["half_steps_rmse"]), float(meta["seconds"]), path
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise SystemExit(f"unreadable reference file {path} ({exc}); delete it to recompute") from exc
    start = time.perf_counter()
    reference = reference_solution(mixture, noise * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX, steps=steps)
    coarse = reference_solution(mixture, noise * SIGMA_MAX, SIGMA_MIN, SIGMA_MAX, steps=steps // 2)
    error, seconds = rmse(coarse, reference), time.perf_counter() - start
    if path is not None:
        with replacing(path) as partial:
            save_file({"reference": reference.contiguous()}, partial,
                      metadata={"half_steps_rmse": repr(error), "seconds": repr(seconds), "steps": str(steps)})
    return reference, error, seconds, None


def run_case(name: str, args, peers: dict) -> dict:
    description, build = CASES[name]
    mixture = build()
    shape = mixture.sample_shape
    noise = torch.randn(args.samples, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = mixture.sample(args.mmd_samples, generator=torch.Generator().manual_seed(2))
    reference, reference_error, seconds, stored = reference_solutions(mixture, noise, args.reference_steps,
                                                                      args.references)
    bandwidth = torch.cdist(exact.flatten(1)[:500], exact.flatten(1)[:500]).median().item()
    bandwidths = (0.5 * bandwidth, bandwidth, 2 * bandwidth)
    floor = mmd(mixture.sample(args.mmd_samples, generator=torch.Generator().manual_seed(5)), exact, bandwidths)
    print(f"\n== {name}: {description}; reference in {seconds:.0f}s{f' (read from {stored})' if stored else ''}, "
          f"changes by {reference_error:.1e} at half the steps; MMD between two exact sample sets {floor:.1e}",
          flush=True)

    reference_component = mixture.component(reference)
    rows = []
    errors_by_config = {}  # (budget, config) -> each sample's mean squared error, for the ratio's interval

    def record(side: str, config: str, x0, nfe_used: int, budget: int, seconds: float, stochastic: bool,
               **details):
        squared = squared_errors(x0, reference)
        errors_by_config[budget, config] = squared
        rows.append({"side": side, "config": config, "nfe_budget": budget, "nfe": nfe_used,
                     "stochastic": stochastic, "rmse": rmse(x0, reference),
                     "median_error": squared.sqrt().median().item(),
                     "switchers": int((mixture.component(x0) != reference_component).sum()),
                     "mmd": mmd(x0[:len(exact)], exact, bandwidths) if torch.isfinite(x0).all() else math.inf,
                     "seconds": round(seconds, 3), **details})

    solvers = [s for s in SOLVERS if re.search(args.solvers, s) and not (args.deterministic and s in STOCHASTIC)]
    for budget in args.nfe:
        optimized = []  # (solver, sigmas) of the optimised schedules: starting points for the bespoke solver
        for solver in solvers:
            steps = steps_for_nfe(solver, budget)
            if SOLVERS[solver].nfe(steps) > budget:
                continue
            schedules = list(CLOSED_FORM)
            if solver in OPTIMIZED_SOLVERS and budget <= OPTIMIZED_MAX_NFE and not args.no_optimized:
                schedules.append("optimized")
            for schedule in schedules:
                t0 = time.perf_counter()
                options = {}
                if schedule == "optimized":
                    options = dict(denoiser=mixture, solver=solver, shape=(args.search_samples, *shape),
                                   dtype=torch.float64, seed=1, cache=args.cache, cache_key=f"bench-{name}")
                sigmas = SCHEDULES[schedule](steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **options)
                if schedule == "optimized":
                    optimized.append((solver, sigmas))
                generator = torch.Generator().manual_seed(0)
                x0 = in_chunks(lambda part: SOLVERS[solver](mixture, part * sigmas[0].item(), sigmas,
                                                            generator=generator), noise)
                record("difflab", f"{solver}+{schedule}", x0, SOLVERS[solver].nfe(steps), budget,
                       time.perf_counter() - t0, solver in STOCHASTIC)
        if budget <= OPTIMIZED_MAX_NFE and not args.no_bespoke:
            t0 = time.perf_counter()
            bespoke = fit_bespoke(mixture, budget, SIGMA_MIN, SIGMA_MAX, shape=(args.bespoke_samples, *shape),
                                  dtype=torch.float64, seed=1, cache=args.cache, cache_key=f"bench-{name}",
                                  restarts=args.restarts, held_out=args.bespoke_held_out, pool=args.bespoke_pool,
                                  steps=args.bespoke_steps, focus_search=args.focus_search,
                                  extra_starts=[(s, sigmas) for s, sigmas in optimized if s in LINEAR_SOLVERS])
            x0 = in_chunks(lambda part: bespoke(mixture, part * bespoke.sigmas[0]), noise)
            fit = {k: bespoke.info[k] for k in ("start", "held_out_rmse", "restarts", "focus", "focus_grid_point")
                   if k in bespoke.info}
            record("difflab", "bespoke", x0, bespoke.nfe, budget, time.perf_counter() - t0, False, fit=fit)
        for peer_name, runner in peers.items():
            result = run_peer(runner, mixture, noise, budget, SIGMA_MIN, SIGMA_MAX)
            if result.x0 is None:
                if budget == args.nfe[0]:
                    print(f"  peer failed: {peer_name}: {result.reason}", flush=True)
                continue
            if result.nfe > budget:
                continue
            record(runner.library, peer_name, result.x0, result.nfe, budget, result.seconds, runner.stochastic)
        print(f"  NFE {budget:3d}: {len([r for r in rows if r['nfe_budget'] == budget])} configurations run",
              flush=True)
    summary = summarise(rows, args.nfe, errors_by_config)
    print_table(name, summary)
    return {"description": description, "mmd_floor": floor, "reference_half_steps_rmse": reference_error,
            "summary": summary, "rows": rows}


def best(rows, budget, predicate):
    candidates = [r for r in rows if r["nfe_budget"] == budget and predicate(r)]
    return min(candidates, key=lambda r: r["rmse"]) if candidates else None


def ratio_interval(peer: torch.Tensor, ours: torch.Tensor, resamples: int = 2000) -> tuple[float, float]:
    """A 90% bootstrap interval of RMSE(peer) / RMSE(ours) over the noise samples (paired: both solved the same).

    A sample near a boundary between modes can end in another mode than the reference and carry much of a
    solver's squared error, so the ratio at one budget moves with a few samples; this says how much.
    """
    g = torch.Generator().manual_seed(0)
    index = torch.randint(len(ours), (resamples, len(ours)), generator=g)
    ratios = (peer[index].mean(1) / ours[index].mean(1)).sqrt()
    low, high = torch.quantile(ratios, torch.tensor([0.05, 0.95], dtype=ratios.dtype)).tolist()
    return low, high


def summarise(rows, budgets, errors_by_config: dict | None = None) -> list[dict]:
    summary = []
    for budget in budgets:
        ours = best(rows, budget, lambda r: r["side"] == "difflab")
        closed = best(rows, budget, lambda r: r["side"] == "difflab" and not r["config"].endswith(LEARNED))
        peer = best(rows, budget, lambda r: r["side"] != "difflab")
        by_library = {lib: best(rows, budget, lambda r, lib=lib: r["side"] == lib)
                      for lib in ("diffusers", "k-diffusion")}
        ratio = peer["rmse"] / ours["rmse"] if ours and peer else None
        interval = (ratio_interval(errors_by_config[budget, peer["config"]], errors_by_config[budget, ours["config"]])
                    if ratio and errors_by_config else None)
        summary.append({"nfe": budget, "difflab": ours, "difflab_closed_form": closed, "peer": peer,
                        **{f"best_{lib}": row for lib, row in by_library.items()},
                        "peer_over_difflab": ratio, "ratio_interval_90": interval,
                        "target_met": None if ratio is None or budget > 20 else ratio >= 2.0})
    return summary


def _cell(row) -> str:
    return f"{row['config'][:48]:48s} {row['rmse']:8.2e} {row['mmd']:8.1e}" if row else f"{'-':48s} {'':8s} {'':8s}"


def _ratio(s: dict) -> str:
    """The peer / difflab ratio with its 90% interval, e.g. "2.16x (1.60-2.90)"."""
    if not s["peer_over_difflab"]:
        return "-"
    interval = s.get("ratio_interval_90")
    return f"{s['peer_over_difflab']:.2f}x" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if interval else "")


def print_table(name: str, summary) -> None:
    print(f"\n{name}: best endpoint RMSE per NFE budget (MMD to exact samples beside it)")
    print(f"{'NFE':>4} | {'difflab best':48s} {'RMSE':>8s} {'MMD':>8s} | {'difflab closed-form':48s} "
          f"{'RMSE':>8s} {'MMD':>8s} | {'best peer':48s} {'RMSE':>8s} {'MMD':>8s} | peer/difflab (90% interval)")
    for s in summary:
        ratio = _ratio(s)
        mark = {True: " ok", False: " MISSED", None: ""}[s["target_met"]]
        print(f"{s['nfe']:4d} | {_cell(s['difflab'])} | {_cell(s['difflab_closed_form'])} | {_cell(s['peer'])} | "
              f"{ratio}{mark}")


def markdown(results: dict) -> str:
    """The summary tables as Markdown, for docs/benchmarks.md."""
    lines = []
    for name, result in results.items():
        lines += [f"**{name}** ({result['description']}; MMD between two exact sample sets: "
                  f"{result['mmd_floor']:.1e})", "",
                  "| NFE | difflab best | RMSE | median | MMD | difflab, closed-form schedule | RMSE "
                  "| best peer | RMSE | median | MMD | peer / difflab (90% interval) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in result["summary"]:
            ours, closed, peer = s["difflab"], s["difflab_closed_form"], s["peer"]
            peer_cells = (f"{peer['config']} | {peer['rmse']:.2e} | {peer['median_error']:.1e} | {peer['mmd']:.1e}"
                          if peer else "- | - | - | -")
            ratio = _ratio(s) + (" (missed)" if s["target_met"] is False else "")
            lines.append(f"| {s['nfe']} | {ours['config']} | {ours['rmse']:.2e} | {ours['median_error']:.1e} | "
                         f"{ours['mmd']:.1e} | {closed['config']} | {closed['rmse']:.2e} | {peer_cells} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def plot_case(name: str, result: dict, out_dir: Path) -> Path:
    series = {}
    for key, label in (("difflab", "difflab best"), ("difflab_closed_form", "difflab, closed-form schedules"),
                       ("best_diffusers", "peer: diffusers best"), ("best_k-diffusion", "peer: k-diffusion best")):
        points = [(s[key]["nfe"], s[key]["rmse"]) for s in result["summary"] if s.get(key)]
        if points:
            series[label] = points
    return plot_error_vs_nfe(series, out_dir / f"samplers_{name}.png",
                             title=f"{name}: {result['description']}")


def _budgets(text: str) -> list[int]:
    try:
        budgets = [int(n) for n in text.split(",")]
    except ValueError:
        budgets = []
    if not budgets or min(budgets) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return budgets


def _at_least(minimum: int):
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--nfe", type=_budgets, default="3,5,8,10,15,20,35,50", help="NFE budgets")
    parser.add_argument("--samples", type=_at_least(2), default=1000, help="noise samples evaluated")
    parser.add_argument("--mmd-samples", type=_at_least(2), default=1000,
                        help="exact samples, and the first results, that the MMD compares (it costs their square)")
    parser.add_argument("--search-samples", type=_at_least(1), default=512,
                        help="noise samples for the schedule search")
    parser.add_argument("--reference-steps", type=_at_least(2), default=1000,
                        help="RK4 steps of the reference solution")
    parser.add_argument("--solvers", default=".", help="regex selecting difflab solvers")
    parser.add_argument("--peers", default=".", help="regex selecting peers; 'none' for none")
    parser.add_argument("--deterministic", action="store_true",
                        help="skip the stochastic samplers: they do not solve the ODE whose endpoint the RMSE measures")
    parser.add_argument("--no-optimized", action="store_true", help="skip the optimised schedule")
    parser.add_argument("--no-bespoke", action="store_true", help="skip the learned bespoke solver")
    parser.add_argument("--bespoke-samples", type=_at_least(1), default=4096,
                        help="noise samples the bespoke solver is fitted on")
    parser.add_argument("--bespoke-held-out", type=_at_least(1), default=None,
                        help="held-out noise samples that judge the bespoke fits (default: --bespoke-samples)")
    parser.add_argument("--bespoke-pool", type=_at_least(1), default=None,
                        help="noises each bespoke fit mines its training batch from (default: none, a plain draw)")
    parser.add_argument("--bespoke-steps", type=_at_least(0), default=30,
                        help="L-BFGS iterations of each bespoke fit (each ends early after 5 without a new best)")
    parser.add_argument("--focus-search", type=_at_least(0), default=64,
                        help="forward passes of the held-out batch the search around the best focused start may use")
    parser.add_argument("--restarts", type=_at_least(1), default=4,
                        help="bespoke fits from the best start of this many solvers; the best held out is kept")
    parser.add_argument("--cache", type=Path, default=Path("out/bench-cache/optimized_schedules.json"))
    parser.add_argument("--references", type=Path, default=None,
                        help="folder that keeps the reference solutions for later runs (default: recompute them)")
    parser.add_argument("--plots", type=Path, default=Path("docs/figures"), help="folder for the figures")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--markdown", type=Path, help="write the summary tables here as Markdown")
    parser.add_argument("--quick", action="store_true", help="ring only, NFE 5 and 10, a few solvers")
    args = parser.parse_args(argv)
    if args.quick:
        args.cases, args.nfe, args.solvers = "ring", [5, 10], "^(euler|dpmpp_2m|unipc)$"
        args.bespoke_samples = min(args.bespoke_samples, 512)
    if args.bespoke_pool is not None and args.bespoke_pool < args.bespoke_samples:
        parser.error(f"--bespoke-pool {args.bespoke_pool} is smaller than --bespoke-samples {args.bespoke_samples}")
    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(CASES)}")
    # The folders written to, made now: a bad path found after hours of measuring would lose the figures.
    for flag, folder in (("--references", args.references), ("--plots", args.plots),
                         ("--json", args.json and args.json.parent),
                         ("--markdown", args.markdown and args.markdown.parent)):
        try:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"{flag}: cannot make the folder {folder}: {exc.strerror}")
    torch.set_num_threads(1)

    peers = {} if args.peers == "none" else {n: r for n, r in PEERS.items()
                                             if re.search(args.peers, n) and not (args.deterministic and r.stochastic)}
    results = {}
    for name in cases:
        results[name] = run_case(name, args, peers)
        print(f"figure: {plot_case(name, results[name], args.plots)}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(results))
    write_json(args.json, {"sigma_min": SIGMA_MIN, "sigma_max": SIGMA_MAX, "cases": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
