"""SSC networks by name: `make_model(name, grid=..., parity=...)`. Every model is called as
`model(position=..., depth=..., rgb=..., tsdf=...)` with the inputs listed in `model.inputs` and returns
(B, 12, D/4, H/4, W/4) logits."""
from __future__ import annotations

import torch
from torch import nn

from nyu_ssc.models.aicnet import SSCRGBDAICNet
from nyu_ssc.models.ddrnet import SSCDDRNet
from nyu_ssc.models.grfnet import SSCRGBDGRFNet
from nyu_ssc.models.palnet import SSCPALNet
from nyu_ssc.models.project import Project2Dto3D

MODELS = ("ddrnet", "ddrnet_rgb", "ddrnet_rgbd", "aicnet", "grfnet", "palnet")


def to_channels_last_3d(model: nn.Module) -> nn.Module:
    """channels_last_3d for every 5-D parameter (the Conv3d weights), in place. `Module.to(memory_format=...)` fails
    on these mixed 2-D / 3-D networks because it also converts the rank-4 Conv2d weights."""
    for p in model.parameters():
        if p.dim() == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return model


def make_model(name: str, grid=(240, 144, 240), num_classes: int = 12, parity: bool = False,
               invalid_position: int = 0):
    project = Project2Dto3D(grid, invalid_position=invalid_position, parity=parity)
    if name == "ddrnet":
        return SSCDDRNet("depth", num_classes, project)
    if name == "ddrnet_rgb":
        return SSCDDRNet("rgb", num_classes, project)
    if name == "ddrnet_rgbd":
        return SSCDDRNet("rgbd", num_classes, project)
    if name == "aicnet":
        return SSCRGBDAICNet(num_classes, project)
    if name == "grfnet":
        return SSCRGBDGRFNet(num_classes, project, parity=parity)
    if name == "palnet":
        return SSCPALNet(num_classes, project)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


__all__ = ["MODELS", "make_model", "Project2Dto3D", "to_channels_last_3d"]
