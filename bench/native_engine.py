"""Speed of common.synthetic.fastfit's native engine (common/synthetic/native.py, the C kernel) against its torch engine, on the trainings
the synthetic experiments run, measured in one process run with one torch thread: the same models, data, loss and
epochs on both sides (and the same trained weights, up to float rounding: the largest difference is printed).

    python bench/native_engine.py [--runs 4] [--epochs 100]

Cases: sklearn_exp's 50-16-16-4 MLP on 6000 samples (teacher CE, KD student CE + KL, Alg. 1 joint CE + CE + ncjsd
with momentum 0.9, the masked teacher's 2-16-16-4), torch engine one run per block as sklearn_exp's config; gauss's
linear models (25 → 2, 200 samples, CE + KL), torch engine all runs in one block as gauss runs them.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.synthetic import fastfit, native  # noqa: E402
from common.synthetic.vectorized import BatchedLinear, batched_mlp  # noqa: E402


def cases(runs: int):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(runs, 50, 6000, generator=g), torch.randn(runs, 50, 6000, generator=g)
    y = torch.randint(0, 4, (runs, 6000), generator=g)
    teacher = torch.randn(runs, 4, 6000, generator=g)
    mlp = lambda d_in, seed: batched_mlp([d_in, 16, 16, 4], runs, seeds=[seed + r for r in range(runs)])
    xg = torch.randn(runs * 25, 25, 200, generator=g)
    yg = torch.randint(0, 2, (runs * 25, 200), generator=g)
    tg = torch.randn(runs * 25, 2, 200, generator=g)
    return {
        "sklearn teacher (CE)": ([mlp(50, 0)], [x1], fastfit.ce_grad(y, 4), 0.0, 1),
        "sklearn KD student (CE + KL)": ([mlp(50, 0)], [x2], fastfit.kd_kl_grad(y, teacher), 0.0, 1),
        "sklearn Alg. 1 joint (CE + CE + ncjsd)": ([mlp(50, 0), mlp(50, 99)], [x1, x2],
                                                  fastfit.joint_ncjsd_grad(y, 4), 0.9, 1),
        "sklearn masked teacher (2 inputs)": ([mlp(2, 0)], [x1[:, :2].contiguous()], fastfit.ce_grad(y, 4), 0.0, 1),
        f"gauss linear KD ({runs * 25} runs)": ([BatchedLinear(25, 2, runs=runs * 25, seeds=range(runs * 25))], [xg],
                                                fastfit.kd_kl_grad(yg, tg, temperature=0.7), 0.0, None),
    }


def timed(models, inputs, grad, momentum, chunk, epochs, engine):
    models = copy.deepcopy(models)
    started = time.perf_counter()
    fastfit.fit(models, inputs, grad_fn=grad, epochs=epochs, lr=0.01, momentum=momentum, chunk=chunk, engine=engine)
    return time.perf_counter() - started, [p for m in models for p in m.parameters()]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--epochs", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    if native.unavailable():
        print(f"native engine unavailable here ({native.unavailable()}): nothing to compare")
        return
    print(f"{args.runs} runs, {args.epochs} epochs, 1 thread; {native.describe('native')}")
    print(f"{'training':42s} {'torch ms/run-epoch':>19s} {'native':>8s} {'ratio':>7s} {'max |Δw|':>9s}")
    for name, (models, inputs, grad, momentum, chunk) in cases(args.runs).items():
        runs = inputs[0].shape[0]
        t_torch, w_torch = timed(models, inputs, grad, momentum, chunk, args.epochs, "torch")
        t_native, w_native = timed(models, inputs, grad, momentum, chunk, args.epochs, "native")
        diff = max((a - b).abs().max().item() for a, b in zip(w_torch, w_native))
        scale = 1e3 / (runs * args.epochs)
        print(f"{name:42s} {t_torch * scale:19.3f} {t_native * scale:8.3f} {t_torch / t_native:6.2f}x {diff:9.1e}")


if __name__ == "__main__":
    main()
