"""Algorithm-1 step 2 at a hidden place of an mnist-shaped MLP: the rank-1 path (common.saliency.rank1, chosen
automatically by saliency_vector) vs the direct copy path (rank1=False: every intervened copy of the activation goes
through the next linear layer), on the same batches and with the same random draws.

    python bench/saliency_rank1.py [--samples 2048] [--batch 256] [--place act1] [--op zero] [--distance ncjsd]
                                   [--rounds 2] [--threads N]

The model is mnist's MLP (NTDH MNIST/network/LR_3.py): 784 → 1024 → 256 → 10, LeakyReLU; place act1 is the
1024-channel output of the first LeakyReLU (mnist's place 1). Prints both times, the largest difference between the
two saliency vectors, and `ratio = direct / rank-1` (> 1: the rank-1 path is faster), each path timed `--rounds`
times, alternating, the fastest counting. Uses CUDA when present.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.saliency import DISTANCES, INTERVENTIONS, saliency_vector  # noqa: E402
from common.saliency.rank1 import find_site  # noqa: E402
from mnist.models import MLP  # noqa: E402


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return value, time.perf_counter() - started


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch", type=int, default=256, help="mnist's cal.batch_size")
    p.add_argument("--chunk", type=int, default=64, help="mnist's cal.chunk")
    p.add_argument("--place", default="act1", choices=["input", "act1", "act2"])
    p.add_argument("--op", default="zero", choices=INTERVENTIONS)
    p.add_argument("--distance", default="ncjsd", choices=DISTANCES)
    p.add_argument("--repeats", type=int, default=1, help="permutations per channel (op permute)")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each path, alternating; the fastest counts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    teacher, student = MLP(784).to(dev).eval(), MLP(784).to(dev).eval()
    g = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, args.samples, args.batch):
        n = min(args.batch, args.samples - start)
        batches.append((torch.randn(n, 784, generator=g).to(dev), torch.randn(n, 784, generator=g).to(dev),
                        torch.randint(0, 10, (n,), generator=g).to(dev)))
    site = find_site(teacher, args.place, batches[0][0], 0, None)
    print(f"{dev}, {torch.get_num_threads()} threads; {args.samples} samples in batches of {args.batch}, place "
          f"{args.place} (next linear layer: {site.layer if site else 'none: copy path only'}), op {args.op}, "
          f"distance {args.distance}, chunk {args.chunk}")
    kw = dict(op=args.op, distance=args.distance, repeats=args.repeats, chunk=args.chunk, normalize=False)
    run = lambda fast: saliency_vector(teacher, student, batches, args.place, generator=torch.Generator().manual_seed(2),
                                       rank1=fast, **kw)
    run(True)  # warm-up (allocator, kernels)
    t_fast, t_direct = [], []
    for _ in range(args.rounds):   # alternating, so that a busy spell of a shared machine hits both
        fast, seconds = timed(lambda: run(True))
        t_fast.append(seconds)
        direct, seconds = timed(lambda: run(False))
        t_direct.append(seconds)
    t_fast, t_direct = min(t_fast), min(t_direct)
    diff = (fast - direct).abs().max().item()
    scale = direct.abs().max().item()
    print(f"fastest of {args.rounds}: direct (copy path) {t_direct:.2f} s   rank-1 {t_fast:.2f} s   max |difference| {diff:.2e} "
          f"(largest saliency {scale:.3e})")
    print(f"ratio = {t_direct / t_fast:.1f}×")


if __name__ == "__main__":
    main()
