"""The LiDAR student (spec §7.7): LidarNet (SalsaNext on the 5 LiDAR channels), focal + λ·Lovász, plus per-pixel
distillation from the frozen camera teacher through common.kd, weighted per pixel by the NTDH ω.

Fixed reference bugs (spec §12): the KD weight is a config value (> 0 by default, the reference multiplied the term
by 0); KD and ω cover only the pixels with a labelled LiDAR point; ω is detached; the teacher stays in eval mode
(no fresh train-mode BatchNorm) and is never wrapped in DDP; its checkpoint path comes from the YAML.
`parity: true` distils over every pixel with the reference's mean over B·C·H·W and a non-detached ω.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.config import ConfigError
from common.kd import build_objective
from common.run import load_checkpoint
from semantic_kitti import models
from semantic_kitti.engine import Trainer
from semantic_kitti.trainer import SegmentationLoss, build_teacher, teacher_logits
from common.config import DataError


def build_kd_objective(cfg: dict):
    """The distillation objective: one term `kd.kd_loss` with weight kd.kd_weight, mask none|omega (per pixel)."""
    kd, parity = cfg["kd"], cfg["parity"]
    params = dict(kd["params"])
    if kd["kd_loss"] != "kl":
        params = {k: v for k, v in params.items() if k not in ("omega_mode", "reduction")}
    elif parity:
        params["reduction"] = "mean"  # the reference's .mean() over B·C·H·W
    terms = {kd["kd_loss"]: {"weight": kd["kd_weight"], **params}}
    omega = {**kd["omega"], "detach": not parity}
    try:
        return build_objective({"terms": terms, "mask": kd["mask"], "omega": omega},
                               context={"student_dim": cfg["nclasses"], "teacher_dim": cfg["nclasses"]})
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"kd: {e}") from None


def kd_loss(objective, student_logits, teacher_logits_, label, valid_only: bool):
    """(weighted KD, unweighted KD value): over the labelled pixels as (N, C) rows, or over every pixel (B, C, H, W)."""
    s, t = student_logits.float(), teacher_logits_.float()
    if valid_only:
        valid = label > 0
        if not valid.any():
            return s.sum() * 0.0, torch.zeros(())
        s, t, y = s.permute(0, 2, 3, 1)[valid], t.permute(0, 2, 3, 1)[valid], label[valid]
    else:
        y = label
    total, parts = objective(s, t, y)
    return total, next(iter(parts.values()))


class StudentTrainer(Trainer):
    role = "student"

    @property
    def model_name(self):
        return self.cfg["student"]["net"]

    def build_model(self):
        c = self.cfg
        self.seg = SegmentationLoss(self.labels, c["train"]["focal_gamma"], c["train"]["lambda"]).to(self.device)
        self.objective = build_kd_objective(c).to(self.device)
        self.kd_on = c["kd"]["kd_weight"] > 0
        if self.kd_on:
            path = c["teacher_checkpoint"]
            if not path:
                raise ConfigError("teacher_checkpoint: the student stage needs the teacher's best_IOU_model.pth "
                                  "(or run stage: both)")
            self.teacher = build_teacher(c, log=lambda *_: None)
            state = load_checkpoint(path, self.device)
            state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
            try:
                self.teacher.load_state_dict(state)
            except RuntimeError as e:
                raise DataError(f"{path}: not a {c['teacher']['net']} checkpoint for this config "
                                f"({str(e).splitlines()[0][:150]})") from None
            self.teacher = self.teacher.to(self.device).eval()
            if self.device.type == "cuda" and c["train"]["channels_last"]:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            self.log(f"{self.prefix}teacher {c['teacher']['net']} loaded from {Path(path)} (frozen, eval mode)")
        else:
            self.teacher = None
            self.log(f"{self.prefix}kd.kd_weight = 0: the student trains without distillation (no-KD baseline)")
        s = c["student"]
        return models.LidarNet(5, c["nclasses"], s["base_channels"], s["dropout"])

    def parameters(self):
        return list(self.model.parameters()) + list(self.objective.parameters())

    def step(self, batch, train: bool):
        features, mask, label = batch
        logits = self.net(features[:, 0:5])
        loss, f, lv = self.seg(logits, label)
        parts = {"LossFocal": f.detach(), "LossLovasz": lv.detach()}
        if self.teacher is not None:
            with torch.no_grad():
                t_logits, _ = teacher_logits(self.teacher, features, self.cfg)
            valid_only = self.cfg["kd"]["valid_only"] and not self.cfg["parity"]
            kd, kd_value = kd_loss(self.objective, logits, t_logits, label, valid_only)
            loss = loss + kd
            parts["LossKD"] = kd_value
        return loss, parts, logits
