"""Speed of the NTDH sklearn sweep (the experiment's own code: common.synthetic.native's C trainer, Alg. 1 through
common.saliency) vs a per-run Python loop.

Both sides produce the same results for each (γ, run): a teacher on x1, a KD student (CE + KL) and a no-KD baseline
on x2, Alg. 1 (joint CE + CE + ncjsd training with momentum, permutation saliency of the 50 x1 and the 50 x2
columns with `repeats` permutations each), a teacher retrained on the kept columns and a KD student from it — the
two-layer 50-16-16-4 MLP, 6000 samples, `--epochs` full-batch epochs per model, on the same data.
The loop side is the reference's way (one nn.Module per run, autograd + torch.optim.SGD, one column permuted per
forward, under no_grad) and is timed on `--loop-groups` (γ, run) pairs; the ratio is per (γ, run), measured in one
process run, both sides in one process (`workers: 1`). Then the real default as configured (10 runs × 5 γ, 1000
epochs, `workers: 2`) is timed end to end unless --skip-default, against the 120 s target.

    python bench/sklearn_exp_vectorized.py [--loop-groups 2] [--epochs 1000] [--runs 2] [--threads 1] [--skip-default]

Both sides run with the same torch thread count (default 1: on a loaded machine a second OpenMP thread spin-waits
against the other processes' load and is several times slower in wall and CPU time).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common.synthetic import native  # noqa: E402
from common.divergence import nontarget_js  # noqa: E402
from common.kd import build_objective  # noqa: E402
from sklearn_exp import experiment  # noqa: E402
from sklearn_exp import main as sk_main  # noqa: E402


def default_cfg(runs: int, epochs: int) -> dict:
    cfg = sk_main.resolve_config(sk_main.parse_args(["--runs", str(runs), "--set", f"train.epochs={epochs}",
                                                     "--set", f"alg1.epochs={epochs}"]))
    cfg["progress"] = False
    return cfg


def _mlp(d_in):
    return nn.Sequential(nn.Linear(d_in, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def per_run_loop(cfg: dict, groups: int) -> float:
    """One (γ, run) at a time, the reference's way, on the first `groups` groups of the sweep."""
    sweep = experiment.build_sweep(cfg)
    t, a = cfg["train"], cfg["alg1"]
    kl = cfg["kd"]["methods"]["kl"]
    started, cpu = time.perf_counter(), time.process_time()
    for g in range(groups):
        x1, x2, y = sweep.train.x1[g].t().contiguous(), sweep.train.x2[g].t().contiguous(), sweep.train.y[g]

        def train(x, loss_fn=None, epochs=t["epochs"], lr=t["lr"], momentum=t["momentum"]):
            model = _mlp(x.shape[1])
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            for _ in range(epochs):
                out = model(x)
                loss = F.cross_entropy(out, y) if loss_fn is None else loss_fn(out)
                opt.zero_grad()
                loss.backward()
                opt.step()
            return model.eval()

        def kd(teacher_out):
            objective = build_objective({"terms": {"ce": {"weight": 1.0}, **kl}, "mask": "none"})
            return train(x2, lambda out: objective(out, teacher_out, y)[0])

        teacher = train(x1)
        with torch.no_grad():
            t_out = teacher(x1)
        kd(t_out)
        train(x2)
        # Alg. 1 step 1: joint training, one optimiser over both nets
        ta, sb = _mlp(50), _mlp(50)
        opt = torch.optim.SGD([*ta.parameters(), *sb.parameters()], lr=a["lr"], momentum=a["momentum"])
        for _ in range(a["epochs"]):
            za, zb = ta(x1), sb(x2)
            loss = F.cross_entropy(za, y) + F.cross_entropy(zb, y) + nontarget_js(zb, za, y).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        # step 2: permutation saliency, one column per forward
        with torch.no_grad():
            sal = {}
            for name, (net, x, other) in {"x1": (ta, x1, sb(x2)), "x2": (sb, x2, ta(x1))}.items():
                s = torch.zeros(x.shape[1])
                for _ in range(a["repeats"]):
                    for c in range(x.shape[1]):
                        xp = x.clone()
                        xp[:, c] = x[torch.randperm(x.shape[0]), c]
                        s[c] += nontarget_js(other, net(xp), y).mean()
                sal[name] = s
        kept = torch.sort(sal["x1"], descending=True).indices[:a["mask_dim"]]
        masked = train(x1[:, kept].contiguous())
        with torch.no_grad():
            m_out = masked(x1[:, kept])
        kd(m_out)
    return time.perf_counter() - started, time.process_time() - cpu


def vectorised(cfg: dict) -> tuple[float, float, dict]:
    """The experiment's own sweep: wall seconds, CPU seconds (the workers' included) and its results."""
    started = time.perf_counter()
    res = experiment.run_sweep(cfg, torch.device("cpu"), log=lambda *_: None)
    return time.perf_counter() - started, res["cpu_seconds"], res


def stages(res: dict) -> str:
    return ", ".join(f"{k} {v:.1f}/{res['cpu_timings'][k]:.1f}" for k, v in res["timings"].items())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loop-groups", type=int, default=2, help="(γ, run) pairs timed with the per-run loop")
    p.add_argument("--epochs", type=int, default=1000, help="epochs per model for the ratio measurement")
    p.add_argument("--runs", type=int, default=2, help="runs per γ of our side of the ratio (same work per run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides (0: torch's default)")
    p.add_argument("--skip-default", action="store_true", help="do not time the default 10 runs × 5 γ sweep")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # the ratio: both sides in one process with the same threads, the same work per (γ, run)
    cfg = default_cfg(args.runs, args.epochs)
    cfg["workers"] = 1
    groups = args.runs * len(cfg["data"]["overlaps"])
    (t_loop, c_loop), (t_vec, c_vec, res) = per_run_loop(cfg, args.loop_groups), vectorised(cfg)
    per_loop, per_vec = t_loop / args.loop_groups, t_vec / groups
    print(f"per (γ, run), {args.epochs} epochs per model, one process, {torch.get_num_threads()} thread(s), "
          f"trainer {native.describe(cfg['train']['engine'])}:")
    print(f"  per-run loop : {per_loop:7.2f} s wall, {c_loop / args.loop_groups:7.2f} s CPU "
          f"(timed on {args.loop_groups} of them)")
    print(f"  ours         : {per_vec:7.2f} s wall, {c_vec / groups:7.2f} s CPU ({args.runs} runs × 5 γ in "
          f"{t_vec:.1f} s wall, {c_vec:.1f} s CPU; per stage wall/CPU s: {stages(res)})")
    print(f"  ratio = loop / ours (same work, one process each): {per_loop / per_vec:.1f}x wall, "
          f"{(c_loop / args.loop_groups) / (c_vec / groups):.1f}x CPU time")
    if not args.skip_default:
        full = default_cfg(10, 1000)
        t_full, c_full, res = vectorised(full)
        groups = 10 * len(full["data"]["overlaps"])
        loop_full = per_loop * groups * 1000 / args.epochs
        print(f"default sweep as configured (kl, Alg. 1, 10 runs × 5 γ, 1000 epochs, {res['workers']} worker "
              f"process(es)): {t_full:.1f} s wall, {c_full:.1f} s CPU (target ≤ 120 s); per stage wall/CPU s: "
              f"{stages(res)}")
        scaled = "" if args.epochs == 1000 else (" (its time scaled by 1000 / epochs, saliency included: an upper "
                                                 "estimate)")
        print(f"  the per-run loop would need ≈ {loop_full:.0f} s wall at its measured rate{scaled}: ratio "
              f"{loop_full / t_full:.1f}x; "
              f"the reference needed ≈ 37 s per (γ, run), ≈ {37 * groups:.0f} s: ratio {37 * groups / t_full:.1f}x")


if __name__ == "__main__":
    main()
