"""PALNet (Li et al. 2019): a 2-D depth branch projected to 3-D plus a TSDF branch, fused with residual blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nyu_ssc.models.ddr import head
from nyu_ssc.models.project import Project2Dto3D


class Res3d(nn.Module):
    """1×1×1 → 3×3×3 (stride, dilation) → 1×1×1 with a (projected if needed) shortcut."""

    def __init__(self, c_in, c_out, stride=1, dilation=1):
        super().__init__()
        c = max(c_out // 2, 4)
        self.a = nn.Conv3d(c_in, c, 1)
        self.b = nn.Conv3d(c, c, 3, stride=stride, padding=dilation, dilation=dilation)
        self.c = nn.Conv3d(c, c_out, 1)
        self.short = nn.Conv3d(c_in, c_out, 1, stride=stride) if (stride != 1 or c_in != c_out) else nn.Identity()

    def forward(self, x):
        y = self.c(F.relu(self.b(F.relu(self.a(x)))))
        return F.relu(y + self.short(x))


class SSCPALNet(nn.Module):
    inputs = ("depth", "tsdf")

    def __init__(self, num_classes: int = 12, project: Project2Dto3D | None = None):
        super().__init__()
        self.project = project or Project2Dto3D()
        self.depth2d = nn.Conv2d(1, 6, 3, padding=1)
        self.depth2d_res = nn.Sequential(nn.Conv2d(6, 3, 1), nn.ReLU(inplace=True), nn.Conv2d(3, 3, 3, padding=1),
                                         nn.ReLU(inplace=True), nn.Conv2d(3, 6, 1))
        self.depth_in = nn.Conv3d(6, 8, 7, stride=2, padding=3)
        self.tsdf_in = nn.Conv3d(1, 8, 7, stride=2, padding=3)
        self.depth_res = nn.Sequential(Res3d(8, 16), Res3d(16, 32, stride=2))
        self.tsdf_res = nn.Sequential(Res3d(8, 16), Res3d(16, 32, stride=2))
        self.fuse = nn.ModuleList([Res3d(64, 64, dilation=d) for d in (1, 2, 2)])
        self.conv_out = head(256, 128, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, position, depth=None, rgb=None, tsdf=None):
        if depth is None or tsdf is None:
            raise ValueError("PALNet needs the 'depth' and the 'tsdf' inputs")
        d = F.relu(self.depth2d(depth))
        d = F.relu(d + self.depth2d_res(d))
        d = self.depth_res(F.relu(self.depth_in(self.project(d, position))))
        t = self.tsdf_res(F.relu(self.tsdf_in(tsdf)))
        x = torch.cat([d, t], 1)
        fs = [x]
        for blk in self.fuse:
            x = blk(x)
            fs.append(x)
        return self.conv_out(torch.cat(fs, 1))
