"""Student training speed with distillation: bf16 autocast + channels_last vs fp32 eager, measured in one run.

    python bench/semantic_kitti_train_speed.py [--iters 20] [--cpu-size 64 256]

On a GPU: the real crop 256×1024, batch 4, LidarNet (SalsaNext b32) distilled from a frozen CameraNet (ResNet-34),
focal + Lovász + ω-masked KL per pixel; prints iterations/s of both, "ratio = ours / baseline" and peak memory.
Without a GPU it says so and measures the CPU (bf16 autocast on the CPU) at a reduced size.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from semantic_kitti import data as D  # noqa: E402
from semantic_kitti import main as sk  # noqa: E402
from semantic_kitti.models import CameraNet, LidarNet  # noqa: E402
from semantic_kitti.option import HERE  # noqa: E402
from semantic_kitti.losses import SegmentationLoss  # noqa: E402
from semantic_kitti.trainer_student import build_kd_objective, kd_loss  # noqa: E402


def measure(device, fast: bool, size, batch, base, backbone, iters, warmup=3):
    torch.manual_seed(0)
    cfg = sk.resolve_config(sk.parse_args([]))
    labels = D.load_label_config(HERE / "semantic-kitti.yaml")
    teacher = CameraNet(3, 20, backbone, "none", log=lambda *_: None).to(device).eval()
    student = LidarNet(5, 20, base).to(device)
    seg = SegmentationLoss(D.focal_alpha(labels), 2.0, 1.0).to(device)
    objective = build_kd_objective(cfg).to(device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.01)
    fmt = torch.channels_last if fast else torch.contiguous_format
    teacher, student = teacher.to(memory_format=fmt), student.to(memory_format=fmt)
    h, w = size
    feats = torch.randn(batch, 8, h, w, device=device).contiguous(memory_format=fmt)
    label = torch.randint(0, 20, (batch, h, w), device=device) * (torch.rand(batch, h, w, device=device) < 0.2)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if fast else contextlib.nullcontext()

    def step():
        with amp:
            with torch.no_grad():
                t = teacher(feats[:, 5:8])
            s = student(feats[:, 0:5])
            loss = seg(s, label)[0] + kd_loss(objective, s, t, label, True)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    rate = iters / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return rate, peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--cpu-size", type=int, nargs=2, default=[64, 256])
    args = p.parse_args()
    if torch.cuda.is_available():
        dev, size, batch, base, backbone = torch.device("cuda"), (256, 1024), 4, 32, "resnet34"
        iters = args.iters or 20
        torch.backends.cudnn.benchmark = True
        print(f"GPU {torch.cuda.get_device_name()}: crop {size[0]}×{size[1]}, batch {batch}, LidarNet b{base}, "
              f"CameraNet {backbone} teacher, {iters} timed iterations each")
    else:
        dev, size, batch, base, backbone = torch.device("cpu"), tuple(args.cpu_size), 1, 16, "resnet18"
        iters = args.iters or 3
        print(f"no GPU available: measuring the CPU at a reduced size (crop {size[0]}×{size[1]}, batch {batch}, "
              f"LidarNet b{base}, CameraNet {backbone}); bf16 here is CPU autocast, so the ratio says nothing about "
              f"the GPU target (≥ 2×)")
    base_rate, base_peak = measure(dev, False, size, batch, base, backbone, iters)
    fast_rate, fast_peak = measure(dev, True, size, batch, base, backbone, iters)
    print(f"fp32 eager:            {base_rate:.3f} it/s, peak memory {base_peak:.2f} GiB")
    print(f"bf16 + channels_last:  {fast_rate:.3f} it/s, peak memory {fast_peak:.2f} GiB")
    print(f"ratio = ours / baseline = {fast_rate / base_rate:.2f}")


if __name__ == "__main__":
    main()
