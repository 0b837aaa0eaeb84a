"""Networks (the reference repository's semanticKITTI/pc_processor/models, PMFNet and SalsaNext): CameraNet (ResNet
encoder with a stride-1 stem + RGB decoder), LidarNet (SalsaNext on the 5 LiDAR channels) and the fusion PMFNet.
Every network returns logits; softmax is taken by the caller (the reference's CameraNet returned a tensor in
trainer.py and a tuple in trainer_student.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from common.config import DataError

BACKBONES = ("resnet18", "resnet34", "resnet50")


# ----------------------------------------------------------------------------------------------------------------
# Camera stream

# torchvision's ImageNet weights expect RGB in [0, 1] normalised by these (their ImageClassification transform)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def uses_imagenet(weights: str) -> bool:
    """teacher.imagenet_weights other than "none": ImageNet weights, hence ImageNet normalisation of the RGB."""
    return str(weights).lower() != "none"


def imagenet_state(backbone: str, weights: str) -> dict | None:
    """The ImageNet state_dict named by teacher.imagenet_weights: "torchvision" (torchvision's IMAGENET1K_V1 through
    its `weights=` API, as PMF's `pretrained=True`; fetched once into the torch hub cache), a local .pth path, or
    "none" (None: random initialisation)."""
    if not uses_imagenet(weights):
        return None
    if weights == "torchvision":
        w = torchvision.models.get_model_weights(backbone).IMAGENET1K_V1
        try:
            return w.get_state_dict(progress=False)
        except (OSError, RuntimeError) as e:  # URLError is an OSError: offline, proxy, disk full
            reason = str(getattr(e, "reason", e)).splitlines()[0][:80]
            raise DataError(f"teacher.imagenet_weights: torchvision could not fetch the {backbone} ImageNet weights "
                            f"({reason}); offline, download {w.url} elsewhere and set teacher.imagenet_weights=PATH "
                            f"to that file, or set teacher.imagenet_weights=none and pass --allow-random-init") \
                from None
    path = Path(weights)
    if not path.is_file():
        raise DataError(f"{path}: teacher.imagenet_weights file not found (expected torchvision's {backbone} ImageNet "
                        f"state_dict, or 'torchvision', or 'none')")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise DataError(f"{path}: not a torchvision {backbone} state_dict ({str(e).splitlines()[0][:120]})") from None
    return state.get("state_dict", state) if isinstance(state, dict) else state


class ResNetEncoder(nn.Module):
    """torchvision ResNet with conv1 replaced by a 7×7 stride-1 conv: l1..l4 at H/2, H/4, H/8, H/16."""

    def __init__(self, backbone: str = "resnet34", in_channels: int = 3, weights: str = "none",
                 dropout: float = 0.2, log=print):
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"image_backbone must be one of {BACKBONES}, got {backbone!r}")
        net = getattr(torchvision.models, backbone)(weights=None)
        state = imagenet_state(backbone, weights)
        if state is not None:
            try:
                net.load_state_dict(state)
            except (RuntimeError, TypeError) as e:
                raise DataError(f"{weights}: not a torchvision {backbone} state_dict "
                                f"({str(e).splitlines()[0][:120]})") from None
            log(f"camera encoder: {backbone} ImageNet weights from {weights}; RGB ImageNet-normalised")
        else:
            log(f"camera encoder: teacher.imagenet_weights is none, {backbone} starts from random weights")
        old = net.conv1
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=1, padding=3, bias=False)
        if in_channels == 3:
            self.conv1.weight.data.copy_(old.weight.data)
        self.bn1, self.relu, self.maxpool = net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.drop3, self.drop4 = nn.Dropout(dropout), nn.Dropout(dropout)
        expansion = 4 if backbone == "resnet50" else 1
        self.channels = [64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion]

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        l1 = self.layer1(x)
        l2 = self.layer2(l1)
        l3 = self.drop3(self.layer3(l2))
        l4 = self.drop4(self.layer4(l3))
        return [l1, l2, l3, l4]


def _conv_block(i, o, k):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2), nn.LeakyReLU(inplace=True), nn.BatchNorm2d(o))


class RGBDecoder(nn.Module):
    """conv(l4)→up, cat l3 →conv→up, cat l2 →conv→up, cat l1 →conv1×1→up, conv3×3 → logits at full resolution."""

    def __init__(self, in_channels, nclasses: int, base: int = 16):
        super().__init__()
        c1, c2, c3, c4 = in_channels
        self.up4 = _conv_block(c4, base, 3)
        self.up3 = _conv_block(base + c3, base, 3)
        self.up2 = _conv_block(base + c2, base, 3)
        self.up1 = _conv_block(base + c1, base, 1)
        self.head = nn.Conv2d(base, nclasses, 3, padding=1)

    @staticmethod
    def _up(x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    def forward(self, feats):
        l1, l2, l3, l4 = feats
        x = self._up(self.up4(l4))
        x = self._up(self.up3(torch.cat([x, l3], 1)))
        x = self._up(self.up2(torch.cat([x, l2], 1)))
        x = self._up(self.up1(torch.cat([x, l1], 1)))
        return self.head(x)


class CameraNet(nn.Module):
    """The PMF camera stream alone: image (B, 3, H, W) → logits (B, C, H, W); H, W divisible by 16."""

    def __init__(self, img_channels: int = 3, nclasses: int = 20, image_backbone: str = "resnet34",
                 imagenet_weights: str = "none", decoder_base: int = 16, log=print):
        super().__init__()
        self.camera_stream_encoder = ResNetEncoder(image_backbone, img_channels, imagenet_weights, log=log)
        self.camera_stream_decoder = RGBDecoder(self.camera_stream_encoder.channels, nclasses, decoder_base)

    def forward(self, img):
        return self.camera_stream_decoder(self.camera_stream_encoder(img))


# ----------------------------------------------------------------------------------------------------------------
# SalsaNext

def _cbl(i, o, k, dilation=1, padding=None):
    """conv → LeakyReLU → BN, the SalsaNext unit."""
    padding = (k // 2) * dilation if padding is None else padding
    return nn.Sequential(nn.Conv2d(i, o, k, padding=padding, dilation=dilation), nn.LeakyReLU(), nn.BatchNorm2d(o))


class ResContextBlock(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1), nn.LeakyReLU())
        self.a1, self.a2 = _cbl(o, o, 3), _cbl(o, o, 3, dilation=2)

    def forward(self, x):
        s = self.shortcut(x)
        return s + self.a2(self.a1(s))


class ResBlock(nn.Module):
    def __init__(self, i, o, dropout: float = 0.2, pooling: bool = True, drop_out: bool = True):
        super().__init__()
        self.pooling, self.drop_out = pooling, drop_out
        self.shortcut = nn.Sequential(nn.Conv2d(i, o, 1), nn.LeakyReLU())
        self.a1, self.a2 = _cbl(i, o, 3), _cbl(o, o, 3, dilation=2)
        self.a3 = _cbl(o, o, 2, dilation=2, padding=1)
        self.fuse = _cbl(3 * o, o, 1)
        self.dropout = nn.Dropout2d(dropout)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)

    def forward(self, x):
        s = self.shortcut(x)
        a1 = self.a1(x)
        a2 = self.a2(a1)
        a3 = self.a3(a2)
        a = self.fuse(torch.cat([a1, a2, a3], 1)) + s
        b = self.dropout(a) if self.drop_out else a
        if self.pooling:
            return self.pool(b), a
        return b


class UpBlock(nn.Module):
    def __init__(self, i, o, dropout: float = 0.2, drop_out: bool = True):
        super().__init__()
        self.drop_out = drop_out
        self.shuffle = nn.PixelShuffle(2)
        self.drop = nn.Dropout2d(dropout)
        self.e1 = _cbl(i // 4 + 2 * o, o, 3)
        self.e2 = _cbl(o, o, 3, dilation=2)
        self.e3 = _cbl(o, o, 2, dilation=2, padding=1)
        self.fuse = _cbl(3 * o, o, 1)

    def forward(self, x, skip):
        up = self.shuffle(x)
        if self.drop_out:
            up = self.drop(up)
        b = torch.cat([up, skip], 1)
        if self.drop_out:
            b = self.drop(b)
        e1 = self.e1(b)
        e2 = self.e2(e1)
        e3 = self.e3(e2)
        out = self.fuse(torch.cat([e1, e2, e3], 1))
        return self.drop(out) if self.drop_out else out


class SalsaNext(nn.Module):
    """SalsaNext(in, nclasses, base b): logits (B, C, H, W); H, W divisible by 16."""

    def __init__(self, in_channels: int = 5, nclasses: int = 20, base_channels: int = 32, dropout: float = 0.2):
        super().__init__()
        b = base_channels
        self.downCntx = nn.Sequential(ResContextBlock(in_channels, b), ResContextBlock(b, b), ResContextBlock(b, b))
        self.resBlock1 = ResBlock(b, 2 * b, dropout, pooling=True, drop_out=False)
        self.resBlock2 = ResBlock(2 * b, 4 * b, dropout)
        self.resBlock3 = ResBlock(4 * b, 8 * b, dropout)
        self.resBlock4 = ResBlock(8 * b, 8 * b, dropout)
        self.resBlock5 = ResBlock(8 * b, 8 * b, dropout, pooling=False)
        self.upBlock1 = UpBlock(8 * b, 4 * b, dropout)
        self.upBlock2 = UpBlock(4 * b, 4 * b, dropout)
        self.upBlock3 = UpBlock(4 * b, 2 * b, dropout)
        self.upBlock4 = UpBlock(2 * b, b, dropout, drop_out=False)
        self.logits = nn.Conv2d(b, nclasses, 1)
        self.channels = [2 * b, 4 * b, 8 * b, 8 * b]

    def encode(self, x, fuse=None):
        """Encoder; `fuse(i, pooled)` (PMF) may transform the pooled output of resBlock i+1."""
        x = self.downCntx(x)
        skips = []
        for i, blk in enumerate([self.resBlock1, self.resBlock2, self.resBlock3, self.resBlock4]):
            x, skip = blk(x)
            if fuse is not None:
                x = fuse(i, x)
            skips.append(skip)
        return self.resBlock5(x), skips

    def decode(self, x, skips):
        x = self.upBlock1(x, skips[3])
        x = self.upBlock2(x, skips[2])
        x = self.upBlock3(x, skips[1])
        x = self.upBlock4(x, skips[0])
        return self.logits(x)

    def forward(self, x):
        return self.decode(*self.encode(x))


class LidarNet(nn.Module):
    """The LiDAR student: SalsaNext on the 5 normalised point channels (depth, x, y, z, intensity)."""

    def __init__(self, pcd_channels: int = 5, nclasses: int = 20, base_channels: int = 32, dropout: float = 0.2):
        super().__init__()
        self.lidar_stream = SalsaNext(pcd_channels, nclasses, base_channels, dropout)

    def forward(self, pcd):
        return self.lidar_stream(pcd)


# ----------------------------------------------------------------------------------------------------------------
# PMFNet (fusion)

class ResidualBasedFusionBlock(nn.Module):
    """f = BN(LReLU(conv3×3 cat(pcd, img))); att = σ(BN(conv3×3 ReLU(BN(conv3×3 f)))); out = f·att + pcd."""

    def __init__(self, pcd_c, img_c):
        super().__init__()
        self.fuse = nn.Sequential(nn.Conv2d(pcd_c + img_c, pcd_c, 3, padding=1), nn.LeakyReLU(), nn.BatchNorm2d(pcd_c))
        self.att = nn.Sequential(nn.Conv2d(pcd_c, pcd_c, 3, padding=1), nn.BatchNorm2d(pcd_c), nn.ReLU(),
                                 nn.Conv2d(pcd_c, pcd_c, 3, padding=1), nn.BatchNorm2d(pcd_c), nn.Sigmoid())

    def forward(self, pcd, img):
        f = self.fuse(torch.cat([pcd, img], 1))
        return f * self.att(f) + pcd


class ASPP(nn.Module):
    def __init__(self, c, rates=(1, 6, 12, 18)):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU())
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, c, 1 if r == 1 else 3, padding=0 if r == 1 else r, dilation=r),
                           nn.BatchNorm2d(c), nn.ReLU()) for r in rates])
        self.project = nn.Sequential(nn.Conv2d(c * (len(rates) + 1), c, 1), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([pooled] + [b(x) for b in self.branches], 1))


class PMFNet(nn.Module):
    """Perception-aware fusion: the camera stream, and a SalsaNext LiDAR stream with a residual fusion block after
    resBlock1..4 (fed the camera features at the same scale) and ASPP after resBlock5. Returns (lidar, camera) logits.
    """

    def __init__(self, pcd_channels=5, img_channels=3, nclasses=20, base_channels=32, image_backbone="resnet34",
                 imagenet_weights: str = "none", dropout: float = 0.2, log=print):
        super().__init__()
        self.camera_stream_encoder = ResNetEncoder(image_backbone, img_channels, imagenet_weights, log=log)
        self.camera_stream_decoder = RGBDecoder(self.camera_stream_encoder.channels, nclasses)
        self.lidar_stream = SalsaNext(pcd_channels, nclasses, base_channels, dropout)
        self.fusion = nn.ModuleList([ResidualBasedFusionBlock(p, i) for p, i in
                                     zip(self.lidar_stream.channels, self.camera_stream_encoder.channels)])
        self.aspp = ASPP(8 * base_channels)

    def forward(self, pcd, img):
        feats = self.camera_stream_encoder(img)
        x, skips = self.lidar_stream.encode(pcd, fuse=lambda i, p: self.fusion[i](p, feats[i]))
        lidar = self.lidar_stream.decode(self.aspp(x), skips)
        return lidar, self.camera_stream_decoder(feats)
