"""AudioNet (teacher) and ImageNet (student) of the reference's ravdess/utils/model.py (identical in MFH and NTDH),
with the intervention places as named submodules.

Place → submodule whose output is intervened on (common.saliency hooks, channel axis 1):
    0 "input" (the model's input), 1 "stage1", 2 "stage2", 3 "stage3" (after each conv + ReLU + pool),
    4 "fc1" (after ReLU, 1024), 5 "fc2" (after ReLU, 128), 6 "fc3" (logits, 8).
At conv places the channels are the feature maps' channels (32 / 64 / 128) — the real sizes, read from a forward pass
(the reference's `get_feature_dim` lists flattened sizes, one of them wrong, and applied them to channels).
"""
from __future__ import annotations

import torch
from torch import nn

from common import saliency as S

PLACES = {0: "input", 1: "stage1", 2: "stage2", 3: "stage3", 4: "fc1", 5: "fc2", 6: "fc3"}


class _Net(nn.Module):
    def __init__(self, in_ch: int, kernels, paddings, channels, pool, fc, n_classes):
        super().__init__()
        c1, c2, c3 = channels
        self.stage1 = nn.Sequential(nn.Conv2d(in_ch, c1, kernels[0], padding=paddings[0]), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(c1, c2, kernels[1], padding=paddings[1]), nn.ReLU(), nn.MaxPool2d(2))
        self.stage3 = nn.Sequential(nn.Conv2d(c2, c3, kernels[2], padding=paddings[2]), nn.ReLU(),
                                    nn.AdaptiveMaxPool2d(tuple(pool)))
        self.fc1 = nn.Sequential(nn.Linear(c3 * pool[0] * pool[1], fc[0]), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(fc[0], fc[1]), nn.ReLU())
        self.fc3 = nn.Linear(fc[1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.fc3(self.fc2(self.fc1(x.flatten(1))))


class ImageNet(_Net):
    """Student on the 3×H×W face-tile image: conv 3→32→64→128 (k3 p1), pools, fc 12544→1024→128→8."""

    def __init__(self, channels=(32, 64, 128), pool=(7, 14), fc=(1024, 128), n_classes: int = 8):
        super().__init__(3, (3, 3, 3), (1, 1, 1), channels, pool, fc, n_classes)


class AudioNet(_Net):
    """Teacher on the 1×40×T audio feature: conv 1→32 (k7 p1) →64 (k5 p1) →128 (k5 p1), pools, fc as ImageNet."""

    def __init__(self, channels=(32, 64, 128), pool=(7, 14), fc=(1024, 128), n_classes: int = 8):
        super().__init__(1, (7, 5, 5), (1, 1, 1), channels, pool, fc, n_classes)


def build(cfg: dict) -> tuple[AudioNet, ImageNet]:
    m = cfg["model"]
    kw = dict(channels=tuple(m["conv_channels"]), pool=tuple(m["pool"]), fc=tuple(m["fc"]), n_classes=m["classes"])
    return AudioNet(**kw), ImageNet(**kw)


def place_name(place: int) -> str:
    if place not in PLACES:
        raise ValueError(f"place must be one of {sorted(PLACES)} ({', '.join(f'{k}={v}' for k, v in PLACES.items())}),"
                         f" got {place!r}")
    return PLACES[place]


def place_channels(model: nn.Module, place: int, example: torch.Tensor, min_channels: int = 2) -> int:
    """The channel count at `place` read from a forward pass; a place with fewer than `min_channels` channels (the
    audio input has 1) cannot be ranked or partly removed and is refused."""
    n = S.channel_count(model, place_name(place), example)
    if n < min_channels:
        raise ValueError(f"place {place} ({place_name(place)}) of {type(model).__name__} has {n} channel(s); "
                         f"Algorithm 1 needs at least {min_channels} — choose another place")
    return n
