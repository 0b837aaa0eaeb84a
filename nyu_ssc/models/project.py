"""2-D → 3-D feature projection with PyTorch's own scatter-reduce (no torch_scatter).

Each pixel's feature vector goes to the voxel of its `position` (flat C-order index over the (W, H, D) grid,
see nyu_ssc/geometry.py); several pixels on one voxel are combined by an element-wise max.

Fixed behaviour (default): the max is over the pixels that land on a voxel only (`include_self=False`), so negative
features survive; voxels no pixel reaches stay 0; pixels whose position is `invalid_position` (0 in the released
data: no depth / outside the volume) or negative are not projected at all (they are routed to a spare slot that
is dropped).
Reference behaviour (`parity=True`, torch_scatter.scatter_max into zeros): every invalid pixel is written into
voxel 0, and the max also runs against the zero initialisation, so negative features become 0.

The index is remapped from (x, y, z) to the network's (z, y, x) order before the scatter, so the output is a
contiguous (B, C, D, H, W) tensor with no permute copy.
"""
from __future__ import annotations

import torch
from torch import nn


class Project2Dto3D(nn.Module):
    def __init__(self, grid=(240, 144, 240), invalid_position: int = 0, parity: bool = False):
        super().__init__()
        self.w, self.h, self.d = (int(v) for v in grid)
        self.invalid_position, self.parity = int(invalid_position), parity

    def forward(self, feat: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        b, c = feat.shape[:2]
        n = self.w * self.h * self.d
        p = position.reshape(b, 1, -1).long()
        x, rem = p // (self.h * self.d), p % (self.h * self.d)
        y, z = rem // self.d, rem % self.d
        idx = (z * self.h + y) * self.w + x                     # (x, y, z) flat index → (z, y, x) flat index
        src = feat.reshape(b, c, -1)
        if self.parity:
            out = src.new_zeros(b, c, n)
            out.scatter_reduce_(2, idx.clamp(0, n - 1).expand(-1, c, -1), src, reduce="amax", include_self=True)
        else:
            valid = (p != self.invalid_position) & (p >= 0) & (p < n)
            idx = torch.where(valid, idx, torch.full_like(idx, n))
            out = src.new_zeros(b, c, n + 1)
            out.scatter_reduce_(2, idx.expand(-1, c, -1), src, reduce="amax", include_self=False)
            out = out[:, :, :n]
        return out.reshape(b, c, self.d, self.h, self.w)
