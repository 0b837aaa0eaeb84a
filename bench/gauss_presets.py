"""Speed of the gauss presets (mfh_gamma, mfh_alpha, mfh_modify_gamma; ntdh with --ntdh): each preset's default as
one vectorised computation vs a per-run Python loop doing the same work, measured in one process run.

The loop trains one nn.Linear at a time with torch.optim.SGD and autograd — for the sweeps a teacher, a KD student
(the same common.kd objective, runs=None) and a no-KD baseline per (setting, run); for mfh_modify_gamma per (xs2, run)
a regular teacher, a baseline, a regular KD student, Algorithm 1 through common.saliency (joint_train, then
saliency_vector with 100 permutations on the inputs) and, per mode, a modality-general teacher on the chosen columns
and its KD student. The loop is timed on `--loop-runs` runs per setting (the whole default would take minutes), the
vectorised side on the preset's full default, and the ratio is per (setting, run) group:

    ratio = (loop seconds / loop groups) / (vectorised seconds / default groups)

Both sides use the preset's thread count (`threads: 1`).
    python bench/gauss_presets.py [--loop-runs 1] [--presets mfh_gamma,mfh_alpha,mfh_modify_gamma] [--ntdh]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from common import saliency  # noqa: E402
from common.kd import build_objective  # noqa: E402
from gauss import data, experiment, modify  # noqa: E402
from gauss import main as gauss_main  # noqa: E402


def preset_cfg(preset: str, runs: int | None = None) -> dict:
    cfg = gauss_main.resolve_config(gauss_main.parse_args(["--preset", preset]
                                                         + (["--runs", str(runs)] if runs else [])))
    cfg["progress"] = False
    return cfg


def train(x, y, cfg, objective=None, teacher_out=None, epochs=None, lr=None, momentum=None, extra=None):
    """One nn.Linear on (N, D) by full-batch SGD, the reference's way."""
    t = cfg["train"]
    model = nn.Linear(x.shape[1], 2)
    params = list(model.parameters()) + (list(objective.parameters()) if objective is not None else [])
    opt = torch.optim.SGD(params, lr=lr or t["lr"], momentum=t["momentum"] if momentum is None else momentum)
    for _ in range(epochs or t["epochs"]):
        out = model(x)
        loss = nn.functional.cross_entropy(out, y) if objective is None else objective(out, teacher_out, y)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def kd_objective(cfg):
    method = cfg["kd"]["losses"][0]
    return build_objective({"terms": {"ce": {"weight": cfg["kd"]["ce_weight"]}, **cfg["kd"]["methods"][method]},
                            "mask": "none"})


def loop_sweep(cfg) -> tuple[float, int]:
    sweep = experiment.build_sweep(cfg)
    started = time.perf_counter()
    for g in range(sweep.groups):
        x1, x2, y = sweep.train.x1[g].t(), sweep.train.x2[g].t(), sweep.train.y[g]
        teacher = train(x1, y, cfg)
        with torch.no_grad():
            t_out = teacher(x1)
        train(x2, y, cfg, kd_objective(cfg), t_out)
        train(x2, y, cfg)
    return time.perf_counter() - started, sweep.groups


def loop_modify(cfg) -> tuple[float, int]:
    d, a = cfg["data"], cfg["modify"]["alg1"]
    seeds = [cfg["seed"] + r for r in range(cfg["runs"])]
    trains, _, freshes = data.modify_gamma(seeds, d["xs2_dims"], n_train=d["n_train"], n_test=d["n_test"],
                                           x1_dim=d["x1_dim"], x2_dim=d["x2_dim"], xs1_dim=d["xs1_dim"],
                                           a_dim=d["a_dim"], decision=d["decision"])
    started, groups = time.perf_counter(), 0
    for s, xs2 in enumerate(d["xs2_dims"]):
        for r in range(cfg["runs"]):
            groups += 1
            x1, x2, y = trains[s].x1[r].t(), trains[s].x2[r].t(), trains[s].y[r]
            f1, f2, fy = freshes[s].x1[r].t(), freshes[s].x2[r].t(), freshes[s].y[r]
            teacher = train(x1, y, cfg)
            train(f2, fy, cfg)
            with torch.no_grad():
                t_out = teacher(f1)
            train(f2, fy, cfg, kd_objective(cfg), t_out)
            net_t, net_s = nn.Linear(x1.shape[1], 2), nn.Linear(x2.shape[1], 2)
            saliency.joint_train(net_t, net_s, lambda: [(x1, x2, y)], epochs=a["epochs"], lr=a["lr"],
                                 momentum=a["momentum"], distance=a["distance"])
            sal = saliency.saliency_vector(net_t, net_s, [(x1, x2, y)], "input", op=a["op"], distance=a["distance"],
                                           repeats=a["repeats"])
            if a["tag_student"]:
                saliency.saliency_vector(net_s, net_t, [(x2, x1, y)], "input", op=a["op"], distance=a["distance"],
                                         repeats=a["repeats"])
            for mode in cfg["modify"]["modes"]:
                cols = {"random": lambda: np.random.choice(d["x1_dim"], xs2, replace=False),
                        "gt": lambda: np.arange(xs2),
                        "alg1": lambda: torch.sort(sal, descending=True).indices[:xs2].numpy()}[mode]()
                mg = train(f1[:, cols], fy, cfg)
                with torch.no_grad():
                    mg_out = mg(f1[:, cols])
                train(f2, fy, cfg, kd_objective(cfg), mg_out)
    return time.perf_counter() - started, groups


def vectorised(cfg) -> tuple[float, int]:
    started = time.perf_counter()
    if cfg["data"]["generator"] == "modify_gamma":
        modify.run_table(cfg, torch.device("cpu"), log=lambda *_: None)
        groups = len(cfg["data"]["xs2_dims"]) * cfg["runs"]
    else:
        res = experiment.run_sweep(cfg, torch.device("cpu"), log=lambda *_: None)
        groups = len(res["settings"]) * cfg["runs"]
    return time.perf_counter() - started, groups


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loop-runs", type=int, default=1, help="runs per setting timed with the per-run loop")
    p.add_argument("--presets", default="mfh_gamma,mfh_alpha,mfh_modify_gamma")
    p.add_argument("--ntdh", action="store_true", help="also the ntdh preset (100 runs × 6 γ, slower)")
    args = p.parse_args()
    names = [s.strip() for s in args.presets.split(",") if s.strip()] + (["ntdh"] if args.ntdh else [])
    for name in names:
        full = preset_cfg(name)
        small = preset_cfg(name, args.loop_runs)
        if full["threads"]:
            torch.set_num_threads(full["threads"])
        loop = loop_modify if full["data"]["generator"] == "modify_gamma" else loop_sweep
        t_loop, n_loop = loop(small)
        t_vec, n_vec = vectorised(full)
        per_loop, per_vec = t_loop / n_loop, t_vec / n_vec
        print(f"{name:17s} default {n_vec} groups: vectorised {t_vec:6.1f} s (target ≤ 30 s) | per-run loop "
              f"{t_loop:6.1f} s on {n_loop} groups ({args.loop_runs} run(s) per setting) | per group "
              f"{1000 * per_loop:7.0f} ms vs {1000 * per_vec:5.0f} ms | ratio = loop / vectorised = "
              f"{per_loop / per_vec:5.1f}x (loop estimate for the whole default {per_loop * n_vec:5.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
