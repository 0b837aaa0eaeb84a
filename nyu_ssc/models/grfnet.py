"""GRFNet (Liu et al. 2020): DDR depth and RGB streams fused step by step by a shared 3-D convolutional GRU."""
from __future__ import annotations

import torch
from torch import nn

from nyu_ssc.models.ddr import BottleneckDDR3d, DDRASPP3d, Stem, head, init_ddr
from nyu_ssc.models.project import Project2Dto3D


class Conv3dGRUCell(nn.Module):
    """r, z = σ(conv(cat(x, h))); h̃ = tanh(conv(cat(x, r·h))); h' = z·h + (1 − z)·h̃."""

    def __init__(self, c_in, c_hidden, k=3):
        super().__init__()
        self.gates = nn.Conv3d(c_in + c_hidden, 2 * c_hidden, k, padding=k // 2)
        self.cand = nn.Conv3d(c_in + c_hidden, c_hidden, k, padding=k // 2)

    def forward(self, x, h):
        r, z = torch.sigmoid(self.gates(torch.cat([x, h], 1))).chunk(2, 1)
        h_tilde = torch.tanh(self.cand(torch.cat([x, r * h], 1)))
        return z * h + (1 - z) * h_tilde


class SSCRGBDGRFNet(nn.Module):
    inputs = ("depth", "rgb")

    def __init__(self, num_classes: int = 12, project: Project2Dto3D | None = None, parity: bool = False):
        super().__init__()
        project = project or Project2Dto3D()
        self.parity = parity
        self.stems = nn.ModuleDict({"depth": Stem(1, project), "rgb": Stem(3, project)})
        self.res = nn.ModuleDict({s: nn.ModuleList([BottleneckDDR3d(64, 16, 64, dilation=d) for d in (2, 3, 5)])
                                  for s in self.inputs})
        self.gru = Conv3dGRUCell(64, 64, 3)
        self.aspp = DDRASPP3d(64, 16, 64)
        self.conv_out = head(320, 160, num_classes, layers=1)
        init_ddr(self)

    def forward(self, position, depth=None, rgb=None, tsdf=None):
        if depth is None or rgb is None:
            raise ValueError("GRFNet needs both the 'depth' and the 'rgb' inputs")
        xd, xr = self.stems["depth"](depth, position), self.stems["rgb"](rgb, position)
        seq = [xd, xr]
        for bd, br in zip(self.res["depth"], self.res["rgb"]):
            xd, xr = bd(xd), br(xr)
            seq += [xd, xr]
        # `GRFNet.py` `SSC_RGBD_GRFNet.forward` starts from depth + depth (a slip); fixed: depth + rgb
        h = seq[0] + (seq[0] if self.parity else seq[1])
        for x in seq:                                    # depth, rgb, depth, rgb, ... (8 steps)
            h = self.gru(x, h)
        return self.conv_out(self.aspp(h))
