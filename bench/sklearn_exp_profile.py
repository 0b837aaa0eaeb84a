"""Per-stage profile of the sklearn_exp default sweep (10 runs × 5 γ, kl, no mask, Alg. 1) at reduced epochs,
extrapolated to the default 1000 epochs: wall-clock and CPU time of every stage (summed over the worker processes),
and the whole sweep's wall and CPU time (the workers' CPU included).

Training stages scale linearly with the epochs; data and saliency do not depend on them.
`--legacy` runs the settings of the first version (autograd for every loss on the torch engine,
common.saliency.saliency_vector copying the input per column, 10 runs per backward block, 5 columns per forward,
torch's default thread count); `--set train.engine=torch` the torch engine with the current other settings.

    python bench/sklearn_exp_profile.py [--epochs 20] [--legacy] [--threads N] [--set train.engine=torch]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sklearn_exp import experiment  # noqa: E402
from sklearn_exp import main as sk_main  # noqa: E402

LEGACY = ["train.closed_form=false", "train.engine=torch", "alg1.rank1=false", "train.chunk_runs=10",
          "alg1.chunk_channels=5", "threads=0"]
UNSCALED = ("data", "alg1_saliency")


def profile_cfg(epochs: int, legacy: bool = False, threads: int | None = None, extra=()) -> dict:
    sets = [f"train.epochs={epochs}", f"alg1.epochs={epochs}", "progress=false",
            *(LEGACY if legacy else []), *([f"threads={threads}"] if threads is not None else []), *extra]
    return sk_main.resolve_config(sk_main.parse_args([a for s in sets for a in ("--set", s)]))


def run(cfg: dict) -> dict:
    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    started = time.perf_counter()
    res = experiment.run_sweep(cfg, torch.device("cpu"), log=lambda *_: None)
    res["outer"] = (time.perf_counter() - started, res["cpu_seconds"])   # CPU: the worker processes' included
    return res


def table(res: dict, epochs: int) -> str:
    scale = 1000 / epochs
    lines = [f"{'stage':16s} {'wall':>8s} {'CPU':>8s}   {'→1000 ep wall':>14s} {'CPU':>8s}"]
    tot_w = tot_c = 0.0
    for name, wall in res["timings"].items():
        cpu = res["cpu_timings"][name]
        f = 1.0 if name in UNSCALED else scale
        tot_w, tot_c = tot_w + wall * f, tot_c + cpu * f
        lines.append(f"{name:16s} {wall:8.2f} {cpu:8.2f}   {wall * f:14.1f} {cpu * f:8.1f}")
    lines.append(f"{'total':16s} {res['outer'][0]:8.2f} {res['outer'][1]:8.2f}   {tot_w:14.1f} {tot_c:8.1f}"
                 f"   ({res['workers']} process(es), {res['threads']} torch thread(s) each; stage times summed "
                 f"over the processes)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--legacy", action="store_true", help="the first version's settings (see the docstring)")
    p.add_argument("--threads", type=int, default=None, help="override the config's torch threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other config override")
    args = p.parse_args()
    cfg = profile_cfg(args.epochs, args.legacy, args.threads, extra=args.set)
    print(f"{'legacy' if args.legacy else 'current'} settings, {args.epochs} epochs per model:")
    print(table(run(cfg), args.epochs))


if __name__ == "__main__":
    main()
