"""The camera teacher (spec §7.6): CameraNet on the RGB channels (or the PMFNet fusion), focal + λ·Lovász."""
from __future__ import annotations

import torch

from semantic_kitti import models
from semantic_kitti.data import focal_alpha
from semantic_kitti.engine import Trainer
from semantic_kitti.losses import FocalSoftmaxLoss, LovaszSoftmax, perception_aware_loss


def build_teacher(cfg: dict, log=print) -> torch.nn.Module:
    t = cfg["teacher"]
    if t["net"] == "PMFNet":
        return models.PMFNet(5, 3, cfg["nclasses"], t["base_channels"], t["image_backbone"], t["imagenet_pretrained"],
                             log=log)
    return models.CameraNet(3, cfg["nclasses"], t["image_backbone"], t["imagenet_pretrained"], log=log)


def teacher_logits(model, features, cfg: dict):
    """The teacher's logits used for metrics / distillation: CameraNet's map, or PMFNet's head named by
    kd.teacher_output. Returns (logits, all heads)."""
    if cfg["teacher"]["net"] == "PMFNet":
        lidar, camera = model(features[:, 0:5], features[:, 5:8])
        return (camera if cfg["kd"]["teacher_output"] == "camera" else lidar), (lidar, camera)
    out = model(features[:, 5:8])
    return out, (out,)


class SegmentationLoss(torch.nn.Module):
    """focal(logits, y, label > 0) + λ·Lovász(softmax(logits), y); returns (total, focal, lovasz)."""

    def __init__(self, labels, gamma: float, lam: float):
        super().__init__()
        self.focal = FocalSoftmaxLoss(focal_alpha(labels), gamma)
        self.lovasz = LovaszSoftmax(ignore=0)
        self.lam = lam

    def forward(self, logits, label):
        logits = logits.float()
        f = self.focal(logits, label, label > 0)
        lv = self.lovasz(logits.softmax(1), label)
        return f + self.lam * lv, f, lv


class TeacherTrainer(Trainer):
    role = "teacher"

    @property
    def model_name(self):
        return self.cfg["teacher"]["net"]

    def build_model(self):
        self.seg = SegmentationLoss(self.labels, self.cfg["train"]["focal_gamma"], self.cfg["train"]["lambda"]
                                    ).to(self.device)
        return build_teacher(self.cfg, self.log)

    def step(self, batch, train: bool):
        features, mask, label = batch
        t = self.cfg["teacher"]
        if t["net"] == "PMFNet":
            lidar, camera = self.net(features[:, 0:5], features[:, 5:8])
            loss_l, f_l, lv_l = self.seg(lidar, label)
            loss_c, f_c, lv_c = self.seg(camera, label)
            loss = loss_l + loss_c
            parts = {"LossFocal": f_l + f_c, "LossLovasz": lv_l + lv_c}
            if t["perception_loss"]:
                pa = perception_aware_loss(lidar, camera, label > 0, t["tau"])
                loss = loss + t["perception_weight"] * pa
                parts["LossPerception"] = pa
            return loss, {k: v.detach() for k, v in parts.items()}, lidar
        logits = self.net(features[:, 5:8])
        loss, f, lv = self.seg(logits, label)
        return loss, {"LossFocal": f.detach(), "LossLovasz": lv.detach()}, logits
