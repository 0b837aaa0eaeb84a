"""DDRNet for SSC (Li et al. 2019): depth-only, RGB-only and RGB-D (streams summed at each of f0..f3)."""
from __future__ import annotations

import torch
from torch import nn

from nyu_ssc.models.ddr import BottleneckDDR3d, DDRASPP3d, Stem, head, init_ddr
from nyu_ssc.models.project import Project2Dto3D

STREAMS = {"depth": ("depth",), "rgb": ("rgb",), "rgbd": ("depth", "rgb")}
CHANNELS = {"depth": 1, "rgb": 3}


class SSCDDRNet(nn.Module):
    def __init__(self, modality: str = "depth", num_classes: int = 12, project: Project2Dto3D | None = None):
        super().__init__()
        if modality not in STREAMS:
            raise ValueError(f"DDRNet modality must be one of {list(STREAMS)}, got {modality!r}")
        self.inputs = STREAMS[modality]
        project = project or Project2Dto3D()
        self.stems = nn.ModuleDict({s: Stem(CHANNELS[s], project) for s in self.inputs})
        self.res = nn.ModuleDict({s: nn.ModuleList([BottleneckDDR3d(64, 16, 64, dilation=d) for d in (2, 3, 5)])
                                  for s in self.inputs})
        self.aspp = DDRASPP3d(256, 16, 64)
        self.conv_out = head(320, 128, num_classes)
        init_ddr(self)

    def forward(self, position, depth=None, rgb=None, tsdf=None):
        given = {"depth": depth, "rgb": rgb}
        feats = []
        for s in self.inputs:
            if given[s] is None:
                raise ValueError(f"this DDRNet needs the {s!r} input")
            x = self.stems[s](given[s], position)
            fs = [x]
            for block in self.res[s]:
                x = block(x)
                fs.append(x)
            feats.append(fs)
        f = [sum(level) for level in zip(*feats)]          # sum the modalities at each of f0..f3
        return self.conv_out(self.aspp(torch.cat(f, 1)))
