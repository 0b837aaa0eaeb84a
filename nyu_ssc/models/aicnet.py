"""AICNet (Li et al., "Anisotropic Convolutional Networks for 3D Semantic Scene Completion", CVPR 2020;
reference repository waterljwant/SSC, `models/AICNet.py`):
anisotropic convolutions with a per-voxel softmax over kernel sizes, RGB-D."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nyu_ssc.models.ddr import Stem, head, init_ddr
from nyu_ssc.models.project import Project2Dto3D


class BasicAIC3d(nn.Module):
    """Along x, then y, then z: Σ_k softmax-weight_k · ReLU(conv along the axis with kernel k); the weights over
    the kernel choices are predicted per voxel and per axis by a 1×1×1 conv."""

    def __init__(self, channels, kernels=(3, 5, 7), dilations=(1, 1, 1), residual=True):
        super().__init__()
        self.n, self.residual = len(kernels), residual
        self.conv_mx = nn.Conv3d(channels, 3 * self.n, 1, bias=False)

        def axis_convs(axis):
            convs = nn.ModuleList()
            for k, d in zip(kernels, dilations):
                ks, pad, dil = [1, 1, 1], [0, 0, 0], [1, 1, 1]
                ks[axis], pad[axis], dil[axis] = k, k // 2 * d, d
                convs.append(nn.Conv3d(channels, channels, tuple(ks), padding=tuple(pad), dilation=tuple(dil)))
            return convs

        # tensors are (B, C, D=z, H=y, W=x): x is axis 2 of the kernel, y axis 1, z axis 0
        self.conv_x, self.conv_y, self.conv_z = axis_convs(2), axis_convs(1), axis_convs(0)

    def forward(self, x):
        b, _, d, h, w = x.shape
        mx = self.conv_mx(x).view(b, 3, self.n, 1, d, h, w).softmax(2)   # (B, axis, kernel, 1, D, H, W)
        y = x
        # the kernel weights come in (z, y, x) order, as `AICNet.py` `BasicAIC3d` splits them (checkpoint-compatible)
        for axis, convs in ((2, self.conv_x), (1, self.conv_y), (0, self.conv_z)):
            y = sum(mx[:, axis, k] * F.relu(conv(y)) for k, conv in enumerate(convs))
        return F.relu(y + x if self.residual else y)


class BottleneckAIC3d(nn.Module):
    def __init__(self, c_in, c, c_out, kernels=(3, 5, 7), dilations=(1, 1, 1), residual=True):
        super().__init__()
        self.conv_in = nn.Conv3d(c_in, c, 1, bias=False)
        self.aic = BasicAIC3d(c, kernels, dilations)
        self.conv_out = nn.Conv3d(c, c_out, 1, bias=False)
        self.residual = residual and c_in == c_out

    def forward(self, x):
        y = self.conv_out(self.aic(F.relu(self.conv_in(x))))
        return F.relu(y + x if self.residual else y)


class SSCRGBDAICNet(nn.Module):
    inputs = ("depth", "rgb")

    def __init__(self, num_classes: int = 12, project: Project2Dto3D | None = None, kernels=(3, 5, 7)):
        super().__init__()
        project = project or Project2Dto3D()
        self.stems = nn.ModuleDict({"depth": Stem(1, project, c_mid3d=8), "rgb": Stem(3, project, c_mid3d=8)})
        self.blocks = nn.ModuleDict({s: nn.ModuleList([BottleneckAIC3d(64, 32, 64, kernels) for _ in range(3)])
                                     for s in self.inputs})
        self.fuse = nn.Sequential(BottleneckAIC3d(256, 64, 256, kernels), BottleneckAIC3d(256, 64, 256, kernels))
        self.conv_out = head(256, 128, num_classes)
        init_ddr(self)

    def forward(self, position, depth=None, rgb=None, tsdf=None):
        if depth is None or rgb is None:
            raise ValueError("AICNet needs both the 'depth' and the 'rgb' inputs")
        levels = []
        for s, x in (("depth", depth), ("rgb", rgb)):
            x = self.stems[s](x, position)
            fs = [x]
            for blk in self.blocks[s]:
                x = blk(x)
                fs.append(x)
            levels.append(fs)
        f = torch.cat([a + b for a, b in zip(*levels)], 1)
        return self.conv_out(self.fuse(f))
