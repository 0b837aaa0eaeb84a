"""Speed of the NTDH Gaussian sweep: vectorised (all runs × γ as one batched computation) vs a per-run Python loop.

Both sides do the same work — for each (γ, run): a linear teacher on x1, a KD student on x2 (CE + KL, T = 0.7) and a
no-KD baseline, 1000 full-batch SGD epochs each — on the same data and initial weights, in this one process (the
vectorised side with `workers: 1`, so the ratio compares the engines, not process start-up). The loop side is timed
on `--loop-runs` runs per γ (a per-run loop over all 100 would take minutes) and the ratio is per trained model, so
it is measured in one process run. Then the real default (100 runs × 6 γ) is timed in one process and with the
config's worker processes, and, with --full-table, every method × mask.

    python bench/gauss_vectorized.py [--loop-runs 5] [--full-table]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.kd import build_objective  # noqa: E402
from gauss import experiment  # noqa: E402
from gauss import main as gauss_main  # noqa: E402


def default_cfg(runs: int, losses=None, masks=None, workers: int | None = None) -> dict:
    args = gauss_main.parse_args(["--runs", str(runs)] + (["--losses", losses] if losses else [])
                                 + (["--masks", masks] if masks else [])
                                 + (["--workers", str(workers)] if workers else []))
    cfg = gauss_main.resolve_config(args)
    cfg["progress"] = False
    return cfg


def per_run_loop(cfg: dict) -> float:
    """The reference's way: one small model at a time, torch.optim.SGD, the same objective (runs=None)."""
    sweep = experiment.build_sweep(cfg)
    t = cfg["train"]
    started = time.perf_counter()
    for g in range(sweep.groups):
        x1, x2, y = sweep.train.x1[g].t(), sweep.train.x2[g].t(), sweep.train.y[g]   # (N, D), (N,)

        def train(x, objective=None, teacher_out=None):
            model = nn.Linear(x.shape[1], 2)
            params = list(model.parameters()) + (list(objective.parameters()) if objective is not None else [])
            opt = torch.optim.SGD(params, lr=t["lr"], momentum=t["momentum"])
            for _ in range(t["epochs"]):
                out = model(x)
                loss = (nn.functional.cross_entropy(out, y) if objective is None
                        else objective(out, teacher_out, y)[0])
                opt.zero_grad()
                loss.backward()
                opt.step()
            return model

        teacher = train(x1)
        with torch.no_grad():
            t_out = teacher(x1)
        objective = build_objective({"terms": {"ce": {"weight": 1.0}, **cfg["kd"]["methods"]["kl"]}, "mask": "none"})
        train(x2, objective, t_out)
        train(x2)
    return time.perf_counter() - started


def vectorised(cfg: dict) -> float:
    started = time.perf_counter()
    experiment.run_sweep(cfg, torch.device("cpu"), log=lambda *_: None)
    return time.perf_counter() - started


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loop-runs", type=int, default=5, help="runs per γ timed with the per-run loop")
    p.add_argument("--full-table", action="store_true", help="also time --losses all --masks none,omega")
    args = p.parse_args()
    torch.set_num_threads(2)

    small = default_cfg(args.loop_runs, workers=1)
    n_models = 3 * small["runs"] * len(small["data"]["overlaps"])
    t_loop = per_run_loop(small)
    t_vec_small = vectorised(small)
    print(f"{n_models} models (3 roles × {small['runs']} runs × {len(small['data']['overlaps'])} γ), 1000 epochs each")
    print(f"  per-run loop : {t_loop:7.2f} s  ({1000 * t_loop / n_models:.1f} ms per model)")
    print(f"  vectorised   : {t_vec_small:7.2f} s  ({1000 * t_vec_small / n_models:.1f} ms per model)")
    print(f"  ratio (loop / vectorised, same work): {t_loop / t_vec_small:.1f}x")

    full = default_cfg(100, workers=1)
    t_full = vectorised(full)
    n_full = 3 * 100 * len(full["data"]["overlaps"])
    loop_estimate = t_loop / n_models * n_full
    print(f"default sweep (kl, 100 runs × 6 γ = {n_full} models): {t_full:.1f} s vectorised in one process "
          f"(target ≤ 10 s); the per-run loop would need ≈ {loop_estimate:.0f} s at its measured rate "
          f"(ratio {loop_estimate / t_full:.0f}x)")
    parallel = default_cfg(100)
    t_parallel = vectorised(parallel)
    print(f"the same with the config's workers: {parallel['workers']}: {t_parallel:.1f} s "
          f"(one process / workers = {t_full / t_parallel:.2f}x, process start-up included)")
    if args.full_table:
        table = default_cfg(100, "all", "none,omega")
        t_table = vectorised(table)
        print(f"full table (7 methods × 2 masks, 100 runs × 6 γ): {t_table:.1f} s (target ≤ 120 s)")


if __name__ == "__main__":
    main()
