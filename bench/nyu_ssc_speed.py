"""DDRNet training speed: AMP + channels_last_3d vs fp32 eager, measured in one run; prints the ratio and peak memory.

On CUDA: the real sizes (240×144×240 → 60×36×60, 480×640 images), batch 4, fp16 autocast + GradScaler +
channels_last_3d (what `train.amp` / `train.channels_last_3d` switch on) vs fp32 contiguous. Target ≥ 2×.
Without a GPU it says so and measures the CPU at a reduced size (80×48×80 → 20×12×20, 120×160 images, batch 2),
where the "fast" variant is bfloat16 CPU autocast + channels_last_3d (the training switches themselves are CUDA-only).

    python bench/nyu_ssc_speed.py [--steps 5] [--warmup 2]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nyu_ssc.models import make_model, to_channels_last_3d  # noqa: E402


def make_batch(b, grid, image, device):
    g = torch.Generator().manual_seed(0)
    w, h, d = grid
    pos = torch.randint(1, w * h * d, (b, *image), generator=g)
    return {"depth": torch.rand(b, 1, *image, generator=g).to(device), "position": pos.to(device),
            "target": torch.randint(0, 12, (b, d // 4, h // 4, w // 4), generator=g).to(device)}


def measure(fast: bool, device, grid, image, batch, steps, warmup) -> tuple[float, float]:
    """(iterations / s, peak memory in GiB) of SGD train steps."""
    torch.manual_seed(0)
    model = make_model("ddrnet", grid=grid).to(device)
    cuda = device.type == "cuda"
    if fast:
        model = to_channels_last_3d(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=fast and cuda)
    weights = torch.tensor([0.05] + [1.0] * 11, device=device)
    data = make_batch(batch, grid, image, device)
    dtype = torch.float16 if cuda else torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=fast):
            logits = model(position=data["position"], depth=data["depth"])
        loss = F.cross_entropy(logits.float(), data["target"], weight=weights, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    rate = steps / (time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    return rate, peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the CPU run (0 = torch default); "
                                                          "1 is steadiest on a shared machine")
    args = p.parse_args(argv)
    if torch.cuda.is_available():
        device, grid, image, batch = torch.device("cuda"), (240, 144, 240), (480, 640), 4
        print(f"device: {torch.cuda.get_device_name()} — real sizes, batch {batch}")
        torch.backends.cudnn.benchmark = True
    else:
        device, grid, image, batch = torch.device("cpu"), (80, 48, 80), (120, 160), 2
        if args.threads:
            torch.set_num_threads(args.threads)
        print("no GPU available: measuring the CPU at a reduced size "
              f"(grid {grid} → {tuple(g // 4 for g in grid)}, images {image}, batch {batch}); "
              "fast = bf16 CPU autocast + channels_last_3d")
    base, base_mem = measure(False, device, grid, image, batch, args.steps, args.warmup)
    fast, fast_mem = measure(True, device, grid, image, batch, args.steps, args.warmup)
    mem = "GiB allocated (CUDA peak)" if device.type == "cuda" else "GiB process peak RSS (cumulative)"
    print(f"fp32 eager:          {base:.3f} it/s, peak {base_mem:.2f} {mem}")
    print(f"AMP + channels_last: {fast:.3f} it/s, peak {fast_mem:.2f} {mem}")
    print(f"ratio = ours / baseline = {fast / base:.2f}x (target ≥ 2x on GPU)")


if __name__ == "__main__":
    main()
