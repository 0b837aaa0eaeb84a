"""The LiDAR student's step (the reference's semanticKITTI/trainer_student.py): LidarNet (SalsaNext on the 5 LiDAR
channels), focal + λ·Lovász, plus per-pixel distillation from the frozen camera teacher through common.kd, weighted
per pixel by the NTDH ω (NTDH paper, Sec. 4, the ω mask). The loop is trainer.Trainer's.

Fixed reference bugs (README "Reference bugs fixed"): the KD weight is a config value (> 0 by default; the reference
multiplied the term by 0); KD and ω cover only the pixels with a labelled LiDAR point; ω is detached; the teacher
stays frozen in eval mode (common.train.freeze; the reference's replaceBN put fresh BatchNorms in train mode) and is
never wrapped in DDP; its checkpoint path comes from the YAML. `parity: true` distils over every pixel with the
reference's mean over B·C·H·W and a non-detached ω.
"""
from __future__ import annotations

from pathlib import Path

import torch

from common.config import ConfigError, DataError
from common.kd import build_objective
from common.run import load_checkpoint
from common.train import freeze
from semantic_kitti import models
from semantic_kitti.data import focal_alpha
from semantic_kitti.losses import SegmentationLoss
from semantic_kitti.trainer import Trainer, build_teacher, teacher_logits


def build_kd_objective(cfg: dict):
    """The distillation objective: one term `kd.kd_loss` with weight kd.kd_weight and that term's own settings
    `kd.params.<kd_loss>`, mask none|omega (per pixel)."""
    kd, parity = cfg["kd"], cfg["parity"]
    params = dict(kd["params"][kd["kd_loss"]])
    if kd["kd_loss"] == "kl" and parity:
        params["reduction"] = "mean"  # the reference's .mean() over B·C·H·W
    terms = {kd["kd_loss"]: {"weight": kd["kd_weight"], **params}}
    omega = {**kd["omega"], "detach": not parity}
    try:
        return build_objective({"terms": terms, "mask": kd["mask"], "omega": omega},
                               context={"student_dim": cfg["nclasses"], "teacher_dim": cfg["nclasses"]})
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"kd.params.{kd['kd_loss']}: {e}") from None


def kd_loss(objective, student_logits, teacher_logits_, label, valid_only: bool):
    """(weighted KD, unweighted KD value): over the labelled pixels as (N, C) rows, or over every pixel (B, C, H, W)."""
    s, t = student_logits.float(), teacher_logits_.float()
    if valid_only:
        valid = label > 0
        if not valid.any():
            return s.sum() * 0.0, torch.zeros((), device=s.device)
        s, t, y = s.permute(0, 2, 3, 1)[valid], t.permute(0, 2, 3, 1)[valid], label[valid]
    else:
        y = label
    total, parts = objective(s, t, y)
    return total, next(iter(parts.values()))


def load_teacher(cfg: dict, device: torch.device) -> torch.nn.Module:
    """The trained camera teacher from teacher_checkpoint (best_IOU_model.pth), frozen (eval mode, no gradient)."""
    path = cfg["teacher_checkpoint"]
    if not path:
        raise ConfigError("teacher_checkpoint: the student stage needs the teacher's best_IOU_model.pth "
                          "(or run stage: both)")
    teacher = build_teacher(cfg, log=lambda *_: None, weights="none")  # its trained weights follow
    state = load_checkpoint(path, device)
    state = state.get("model", state) if isinstance(state, dict) and "model" in state else state
    try:
        teacher.load_state_dict(state)
    except RuntimeError as e:
        raise DataError(f"{path}: not a {cfg['teacher']['net']} checkpoint for this config "
                        f"({str(e).splitlines()[0][:150]})") from None
    teacher = teacher.to(device)
    if device.type == "cuda" and cfg["train"]["channels_last"]:
        teacher = teacher.to(memory_format=torch.channels_last)
    return freeze(teacher)


class StudentTrainer(Trainer):
    role = "student"

    @property
    def model_name(self):
        return self.cfg["student"]["net"]

    @property
    def ntd_role(self):
        """The no-KD student is the NTD advisor's probe (the student modality without distillation)."""
        return None if self.kd_on else "probe"

    def build_model(self):
        c = self.cfg
        self.seg = SegmentationLoss(focal_alpha(self.labels), c["train"]["focal_gamma"], c["train"]["lambda"]
                                    ).to(self.device)
        self.objective = build_kd_objective(c).to(self.device)
        self.kd_on = c["kd"]["kd_weight"] > 0
        self.teacher = load_teacher(c, self.device) if self.kd_on else None
        if self.kd_on:
            self.log(f"{self.prefix}teacher {c['teacher']['net']} loaded from {Path(c['teacher_checkpoint'])} "
                     f"(frozen, eval mode)")
        else:
            self.log(f"{self.prefix}kd.kd_weight = 0: the student trains without distillation (no-KD baseline)")
        s = c["student"]
        return models.LidarNet(5, c["nclasses"], s["base_channels"], s["dropout"])

    def parameters(self):
        return list(self.model.parameters()) + list(self.objective.parameters())

    def extra_state(self) -> dict:
        return {"objective": self.objective}

    def omega(self):
        return self.objective.last_omega if self.teacher is not None else None

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
