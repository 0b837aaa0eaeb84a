"""DDR building blocks (dimensional decomposition residual units; Li et al., "RGBD Based Dimensional Decomposition
Residual Network for 3D Semantic Scene Completion", CVPR 2019, Sec. 3) shared by DDRNet, AICNet and GRFNet, laid out as
the reference repository waterljwant/SSC, `models/DDR.py`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BottleneckDDR2d(nn.Module):
    """1×1 in, (1×k) then (k×1), 1×1 out, ReLUs, residual add before the final ReLU."""

    def __init__(self, c_in, c, c_out, k=3, dilation=1, residual=True):
        super().__init__()
        p = k // 2 * dilation
        self.conv_in = nn.Conv2d(c_in, c, 1, bias=False)
        self.conv1x3 = nn.Conv2d(c, c, (1, k), padding=(0, p), dilation=(1, dilation))
        self.conv3x1 = nn.Conv2d(c, c, (k, 1), padding=(p, 0), dilation=(dilation, 1))
        self.conv_out = nn.Conv2d(c, c_out, 1, bias=False)
        self.residual = residual and c_in == c_out

    def forward(self, x):
        y = F.relu(self.conv_in(x))
        y = F.relu(self.conv1x3(y))
        y = F.relu(self.conv3x1(y))
        y = self.conv_out(y)
        return F.relu(y + x if self.residual else y)


class BottleneckDDR3d(nn.Module):
    """1×1×1 in; y1 = ReLU(conv1×1×k); y2 = ReLU(conv1×k×1(y1) + y1); y3 = ReLU(convk×1×1(y2) + y2 + y1);
    1×1×1 out; residual before the final ReLU. Dilation on the long axis."""

    def __init__(self, c_in, c, c_out, k=3, dilation=1, residual=True):
        super().__init__()
        p = k // 2 * dilation
        self.conv_in = nn.Conv3d(c_in, c, 1, bias=False)
        self.conv1x1x3 = nn.Conv3d(c, c, (1, 1, k), padding=(0, 0, p), dilation=(1, 1, dilation))
        self.conv1x3x1 = nn.Conv3d(c, c, (1, k, 1), padding=(0, p, 0), dilation=(1, dilation, 1))
        self.conv3x1x1 = nn.Conv3d(c, c, (k, 1, 1), padding=(p, 0, 0), dilation=(dilation, 1, 1))
        self.conv_out = nn.Conv3d(c, c_out, 1, bias=False)
        self.residual = residual and c_in == c_out

    def forward(self, x):
        y0 = F.relu(self.conv_in(x))
        y1 = F.relu(self.conv1x1x3(y0))
        y2 = F.relu(self.conv1x3x1(y1) + y1)
        y3 = F.relu(self.conv3x1x1(y2) + y2 + y1)
        y = self.conv_out(y3)
        return F.relu(y + x if self.residual else y)


class DownsampleBlock3d(nn.Module):
    """cat[Conv3d(ci, co − ci, 3, stride 2, no bias), MaxPool3d(2)] → ReLU: halves every axis (sizes must be even);
    `DDR.py` `DownsampleBlock3d`."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.conv = nn.Conv3d(c_in, c_out - c_in, 3, stride=2, padding=1, bias=False)
        self.pool = nn.MaxPool3d(2, stride=2)

    def forward(self, x):
        return F.relu(torch.cat([self.conv(x), self.pool(x)], 1))


class DDRASPP3d(nn.Module):
    """ASPP of DDR units, `DDR.py` `DDR_ASPP3d`: cat[1×1×1 conv; DDR d=6; d=12; d=18; global average pool + 1×1×1
    conv, upsampled] → 5·c_out channels. As upstream, the 1×1×1 branch and the pooled branch are plain linear convs
    (no bias, no ReLU), so their outputs may be negative; only the DDR branches end in a ReLU."""

    def __init__(self, c_in, c, c_out):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 1, bias=False)
        self.aspp = nn.ModuleList([BottleneckDDR3d(c_in, c, c_out, dilation=d, residual=False) for d in (6, 12, 18)])
        self.pool_conv = nn.Conv3d(c_in, c_out, 1, bias=False)

    def forward(self, x):
        g = self.pool_conv(F.adaptive_avg_pool3d(x, 1))
        g = F.interpolate(g, size=x.shape[2:], mode="trilinear", align_corners=True)
        return torch.cat([self.conv1(x), *[m(x) for m in self.aspp], g], 1)


class Stem(nn.Module):
    """One modality's stream up to 64 channels at 1/4 resolution: 2-D DDR features (bottleneck width `c_mid2d`),
    projection, two downsamples (the first 3-D bottleneck of width `c_mid3d`). DDRNet uses 4 / 4
    (`DDRNet.py` `SSC_RGBD_DDRNet`), AICNet 4 / 8 (`AICNet.py` `SSC_RGBD_AICNet`)."""

    def __init__(self, c_in, project: nn.Module, c2d: int = 8, c_mid2d: int = 4, c_mid3d: int = 4):
        super().__init__()
        self.feature2d = nn.Sequential(nn.Conv2d(c_in, c2d, 1), BottleneckDDR2d(c2d, c_mid2d, c2d),
                                       BottleneckDDR2d(c2d, c_mid2d, c2d))
        self.project = project
        self.feature3d = nn.Sequential(DownsampleBlock3d(c2d, 16), BottleneckDDR3d(16, c_mid3d, 16),
                                       DownsampleBlock3d(16, 64), BottleneckDDR3d(64, 16, 64))

    def forward(self, x, position):
        return self.feature3d(self.project(self.feature2d(x), position))


def head(c_in, c_mid, n_classes, layers=2):
    mods, c = [], c_in
    for _ in range(layers):
        mods += [nn.Conv3d(c, c_mid, 1), nn.ReLU(inplace=True)]
        c = c_mid
    return nn.Sequential(*mods, nn.Conv3d(c, n_classes, 1))


def init_ddr(module: nn.Module) -> None:
    """The reference's init: Conv3d xavier-uniform (bias 0), Conv2d N(0, 0.1)."""
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
