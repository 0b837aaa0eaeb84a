"""Speed of `--workers N` (common.synthetic.parallel: a sweep's runs split over N CPU processes, one torch thread each) against
one process, for the gauss full table and the sklearn_exp default, measured in one run at reduced epochs (both
sides the same work; the per-run numbers are equal, checked here too).

    python bench/synthetic_workers.py [--workers 2] [--epochs 100]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gauss import experiment as gauss_exp  # noqa: E402
from gauss import main as gauss_main  # noqa: E402
from sklearn_exp import experiment as sk_exp  # noqa: E402
from sklearn_exp import main as sk_main  # noqa: E402


def timed(run, cfg):
    started = time.perf_counter()
    res = run(cfg, torch.device("cpu"), log=lambda *_: None)
    return time.perf_counter() - started, res


def compare(name, run, make_cfg, workers, check):
    t1, one = timed(run, make_cfg(1))
    tn, many = timed(run, make_cfg(workers))
    same = check(one, many)
    print(f"{name:34s} 1 process {t1:7.1f} s | {workers} workers {tn:7.1f} s | ratio = {t1 / tn:4.2f}x "
          f"| per-run numbers equal: {same}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=100, help="epochs per model (the defaults use 1000)")
    args = p.parse_args()
    torch.set_num_threads(1)
    e = args.epochs

    def gauss_cfg(w):
        cfg = gauss_main.resolve_config(gauss_main.parse_args(
            ["--losses", "all", "--masks", "none,omega", "--workers", str(w), "--set", f"train.epochs={e}",
             "--set", "progress=false"]))
        return cfg

    def sk_cfg(w):
        return sk_main.resolve_config(sk_main.parse_args(
            ["--workers", str(w), "--set", f"train.epochs={e}", "--set", f"alg1.epochs={e}", "--set",
             "progress=false"]))

    def deterministic_rows_equal(a, b):   # kl and dkd draw nothing at random
        return all(abs(x["kd_acc"] - y["kd_acc"]) < 1e-5 for x, y in zip(a["rows"], b["rows"])
                   if x["loss"] in ("kl", "dkd"))

    def sk_equal(a, b):
        return bool(np.allclose(a["per_run"]["kl/none"]["kd_acc"], b["per_run"]["kl/none"]["kd_acc"], atol=1e-5))

    print(f"{e} epochs per model (the defaults use 1000), one torch thread per process", flush=True)
    compare("gauss full table (14 configs)", gauss_exp.run_sweep, gauss_cfg, args.workers, deterministic_rows_equal)
    compare("sklearn_exp default (kl + Alg. 1)", sk_exp.run_sweep, sk_cfg, args.workers, sk_equal)


if __name__ == "__main__":
    main()
