"""The trainer's view of distillation: a list of named, weighted terms from the config, summed and logged apart.

Config form (YAML)::

    loss:
      terms:                       # name: {weight, loss (defaults to the name), input, <loss kwargs>}
        ce:  {weight: 1.0}
        kl:  {weight: 1.0, temperature: 0.7}
        pkt: {weight: 1.0}
      mask: omega                  # none | omega: ω from common.mask, applied inside every distillation term
      omega: {threshold: 0.996, space: logits, detach: true}

``input`` picks which output a term reads when the models return a dict (e.g. ``logits`` or ``features``); ω is
always computed from the logits. The cross-entropy term ``ce`` reads the labels and is never masked.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable

import torch.nn.functional as F
from torch import nn

from common import mask as mask_lib
from common.kd.base import DistillLoss, build_loss, loss_class as _loss_class, register

MASKS = ("none", "omega")


@register("ce")
class CrossEntropy(DistillLoss):
    """Supervised cross-entropy on the student's logits (per sample / per position; ignore_index supported)."""

    uses_teacher = False

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, runs: int | None = None):
        super().__init__(runs)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing

    def forward(self, student_out, teacher_out=None, labels=None, omega=None, index=None):
        zs = self._rows(student_out, "student_out")
        y = self._per_row(labels, (zs.shape[0], zs.shape[2]), "labels").long()
        per = F.cross_entropy(zs, y, reduction="none", ignore_index=self.ignore_index,
                              label_smoothing=self.label_smoothing)
        valid = (y != self.ignore_index).to(per.dtype)
        if self.runs is not None:
            return ((per * valid).sum(1) / valid.sum(1).clamp_min(1)).sum()
        return (per * valid).sum() / valid.sum().clamp_min(1)


def _pick(out, key: str):
    if isinstance(out, dict):
        if key not in out:
            raise KeyError(f"model output has no {key!r}; it has {sorted(out)}")
        return out[key]
    return out


class Objective(nn.Module):
    """Weighted sum of named terms; ``forward`` returns ``(total, {name: value})`` (values detached, per run)."""

    def __init__(self, terms: dict, mask: str = "none", omega: dict | None = None, runs: int | None = None,
                 context: dict | None = None, build: Callable[..., DistillLoss] = build_loss):
        super().__init__()
        if mask not in MASKS:
            raise ValueError(f"loss.mask must be one of {MASKS}, got {mask!r}")
        if not terms:
            raise ValueError("loss.terms is empty: name at least one term (e.g. ce: {weight: 1.0})")
        self.mask, self.omega_cfg, self.runs = mask, dict(omega or {}), runs
        self.last_omega = None
        self.weights: dict[str, float] = {}
        self.inputs: dict[str, str] = {}
        self.terms = nn.ModuleDict()
        for name, cfg in terms.items():
            cfg = copy.deepcopy(dict(cfg or {}))
            self.weights[name] = float(cfg.pop("weight", 1.0))
            self.inputs[name] = cfg.pop("input", "logits")
            loss_name = cfg.pop("loss", name)
            # The experiment offers what only it knows (feature sizes, dataset size and labels); each term takes
            # the entries its constructor accepts and the config did not set.
            accepted = inspect.signature(_loss_class(loss_name).__init__).parameters
            for key, value in (context or {}).items():
                if key in accepted:
                    cfg.setdefault(key, value)
            self.terms[name] = build(loss_name, runs=runs, **cfg)

    def omega(self, student_logits, teacher_logits, labels):
        # the class axis is 1 both for (B, C, ...) and for runs (R, C, N)
        return mask_lib.omega(teacher_logits, labels, student_logits, class_dim=1, **self.omega_cfg)

    def forward(self, student_out, teacher_out, labels, index=None):
        w = None
        if self.mask == "omega":
            w = self.omega(_pick(student_out, "logits"), _pick(teacher_out, "logits"), labels)
        # the trainer's ω statistics (common.train.EpochLog.add_omega) read the last step's ω; None without a mask
        self.last_omega = None if w is None else w.detach()
        total, parts = 0.0, {}
        for name, term in self.terms.items():
            key = self.inputs[name]
            if getattr(term, "uses_teacher", True):
                value = term(_pick(student_out, key), _pick(teacher_out, key), labels, omega=w, index=index)
            else:
                value = term(_pick(student_out, key), None, labels)
            total = total + self.weights[name] * value
            parts[name] = value.detach() / (self.runs or 1)
        return total, parts


def build_objective(loss_cfg: dict, runs: int | None = None, context: dict | None = None,
                    build: Callable[..., DistillLoss] = build_loss) -> Objective:
    """Objective from the ``loss`` section of a config (keys: terms, mask, omega). ``build(name, **kwargs)`` makes
    each term (default: the registry's reference; the synthetic engine passes its fused terms)."""
    cfg = dict(loss_cfg)
    return Objective(cfg.get("terms", {}), cfg.get("mask", "none"), cfg.get("omega"), runs=runs, context=context,
                     build=build)


def method_objective(kd: dict, method: str, mask: str, *, detach_omega: bool = True, runs: int | None = None,
                     context: dict | None = None, build: Callable[..., DistillLoss] = build_loss) -> Objective:
    """The Objective of one KD method of an experiment's `kd` config section (the synthetic experiments' schema):
    `ce` with weight kd["ce_weight"] plus the terms of kd["methods"][method], mask none | omega with kd["omega"]'s
    settings; detach_omega=False is the reference's non-detached ω (parity)."""
    terms = {"ce": {"weight": kd["ce_weight"]}, **kd["methods"][method]}
    loss_cfg = {"terms": terms, "mask": mask, "omega": {**kd["omega"], "detach": detach_omega}}
    return build_objective(loss_cfg, runs=runs, context=context, build=build)
