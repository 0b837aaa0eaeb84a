"""Algorithm-1 step 2 on the RAVDESS nets: common.saliency.saliency_vector (chunked hooks: everything before the place
runs once per chunk of channels) vs the reference's loop (one full teacher forward per channel and repeat).

    python bench/ravdess_saliency.py [--batch 32] [--repeats 1] [--place 5] [--full]

Prints both times, checks the two saliency vectors agree, and the speed-up `ratio = baseline / ours` (> 1: ours is
faster), e.g. `ratio = 12.3×`.
Uses CUDA when present; without a GPU it says so and measures on CPU at a reduced input size (--full: 40×256 audio).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import saliency as S  # noqa: E402
from ravdess import models as M  # noqa: E402


def baseline(teacher, student, x_t, x_s, place, repeats, gen):
    """The reference's loop: per channel and repeat, permute that channel across the batch, full forward, MSE."""
    with torch.no_grad():
        h_s = student(x_s)
        n = S.channel_count(teacher, place, x_t)
        out = torch.zeros(n, dtype=torch.float64)
        for c in range(n):
            for _ in range(repeats):
                with S.Intervention(teacher, place, [c], "permute", generator=gen):
                    out[c] += F.mse_loss(teacher(x_t), h_s).double()
        return out / repeats


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--place", type=int, default=5)
    p.add_argument("--full", action="store_true", help="full-size inputs on CPU too")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    full = cuda or args.full
    if not cuda:
        print("no GPU here: measuring on CPU" + ("" if full else " at a reduced size (audio 40×64, fc 256)"))
    frames, fc = (256, (1024, 128)) if full else (64, (256, 128))
    torch.manual_seed(0)
    teacher = M.AudioNet(fc=fc).to(dev).eval()
    student = M.ImageNet(fc=fc).to(dev).eval()
    x_t = torch.randn(args.batch, 1, 40, frames, device=dev)
    h, w = (256, 512) if full else (64, 128)
    x_s = torch.randn(args.batch, 3, h, w, device=dev)
    y = torch.randint(0, 8, (args.batch,), device=dev)
    place = M.place_name(args.place)

    def timed(fn):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = fn()
        if cuda:
            torch.cuda.synchronize()
        return r, time.perf_counter() - t

    ours, t_ours = timed(lambda: S.saliency_vector(teacher, student, [(x_t, x_s, y)], place, repeats=args.repeats,
                                                   generator=torch.Generator().manual_seed(1), normalize=False,
                                                   chunk=64))
    base, t_base = timed(lambda: baseline(teacher, student, x_t, x_s, place, args.repeats,
                                          torch.Generator().manual_seed(1)))
    agree = torch.allclose(ours.double().cpu(), base, rtol=1e-4, atol=1e-6)
    print(f"device {dev}, batch {args.batch}, place {args.place} ({place}), {ours.numel()} channels × "
          f"{args.repeats} repeats")
    print(f"ours (chunked hooks) {t_ours:.3f} s | baseline (forward per channel) {t_base:.3f} s | same values: {agree}")
    print(f"ratio = {t_base / t_ours:.1f}× (baseline / ours; > 1: ours is faster)")


if __name__ == "__main__":
    main()
