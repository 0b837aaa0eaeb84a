"""Exact RKD (all N² pairs and N³ triplets) on full-batch synthetic runs: the blocked angle term of
common.synthetic.fused_relational.FusedRKD vs the reference common.kd.relational.RKDistill (autograd through one
(G, N, N, N) tensor), forward and backward, on the same inputs.

    python bench/rkd_exact.py [--groups 12] [--samples 200] [--dim 2] [--rounds 3] [--threads 1] [--block 262144]

The default shape is one gauss sweep block's (binary logits, 200 training samples per run). Prints both times per
group and step, the size of the reference's (G, N, N, N) angle tensor (the blocked term holds `--block` elements of
it at a time: fused_relational.ANGLE_BLOCK, default the CPU's), the largest difference of the student gradients, and `ratio = reference / blocked` (> 1: the blocked term is faster). Each path is timed
`--rounds` times, alternating, the fastest counting.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.kd.relational import RKDistill  # noqa: E402
from common.synthetic import fused_relational  # noqa: E402
from common.synthetic.fused_relational import FusedRKD  # noqa: E402


def step(loss, s, t):
    s = s.detach().requires_grad_(True)
    started = time.perf_counter()
    value = loss(s, t)
    grad, = torch.autograd.grad(value, s)
    return grad, time.perf_counter() - started


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=12, help="runs trained side by side (G)")
    p.add_argument("--samples", type=int, default=200, help="training samples per run (N)")
    p.add_argument("--dim", type=int, default=2, help="logits per sample (D)")
    p.add_argument("--rounds", type=int, default=3, help="timed steps of each path, alternating; the fastest counts")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block", type=int, default=fused_relational.ANGLE_BLOCK["cpu"],
                   help="elements per block of the blocked angle term (default: the CPU's, 262144)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fused_relational.ANGLE_BLOCK["cpu"] = args.block
    g = torch.Generator().manual_seed(0)
    s = torch.randn(args.groups, args.dim, args.samples, generator=g)
    t = torch.randn(args.groups, args.dim, args.samples, generator=g)
    blocked, reference = FusedRKD(runs=args.groups), RKDistill(runs=args.groups)
    step(blocked, s, t)   # warm-up
    times = {"blocked": [], "reference": []}
    for _ in range(args.rounds):
        fast, seconds = step(blocked, s, t)
        times["blocked"].append(seconds)
        plain, seconds = step(reference, s, t)
        times["reference"].append(seconds)
    per = {k: min(v) / args.groups * 1e3 for k, v in times.items()}
    n3 = args.groups * args.samples ** 3 * 4 / 2 ** 20
    print(f"{args.groups} groups × {args.samples} samples × {args.dim} logits, {torch.get_num_threads()} thread(s); "
          f"the reference's (G, N, N, N) angle tensor alone: {n3:.0f} MiB; blocks of {args.block} elements")
    print(f"fastest of {args.rounds}: reference {per['reference']:.1f} ms, blocked {per['blocked']:.1f} ms per group "
          f"and step; max |gradient difference| {(fast - plain).abs().max().item():.2e} "
          f"(gradient scale {plain.abs().max().item():.2e})")
    print(f"ratio = {per['reference'] / per['blocked']:.2f}")


if __name__ == "__main__":
    main()
