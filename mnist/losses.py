"""The students' objective: CE weighted by distill.gt_weight plus the distillation terms of distill.method, each
weighted by distill.pl_weight (the NTDH repository's MNIST/main.py train_network_distill compositions), built by
common.kd.build_objective; or CE alone for the no-KD baseline and the independent teacher."""
from __future__ import annotations

import copy

import numpy as np
import torch

from common.config import ConfigError
from common.kd import available_losses, build_objective


def loss_config(cfg: dict) -> dict:
    """The `loss` section for common.kd.build_objective: ce (gt_weight) + the method's terms × pl_weight."""
    dc = cfg["distill"]
    method = dc["method"]
    if method in dc["methods"]:
        terms = copy.deepcopy(dc["methods"][method])
    elif method == "ce":  # the registry's supervised term: no distillation term beside distill.gt_weight·CE
        terms = {}
    elif method in available_losses():
        terms = {method: {"weight": 1.0}}
    else:
        raise ConfigError(f"distill.method: unknown {method!r}; expected one of "
                          f"{', '.join(sorted(set(dc['methods']) | set(available_losses())))}")
    out = {"ce": {"weight": dc["gt_weight"]}}
    if not isinstance(terms, dict):
        raise ConfigError(f"distill.methods.{method}: expected a mapping of KD terms, got {terms!r}")
    for name, term in terms.items():
        if term is not None and not isinstance(term, dict):
            raise ConfigError(f"distill.methods.{method}.{name}: expected a mapping of term options "
                              f"(weight, ...), got {term!r}")
        term = dict(term or {})
        term["weight"] = float(term.get("weight", 1.0)) * dc["pl_weight"]
        if name == "ce":
            raise ConfigError(f"distill.methods.{method}: 'ce' is added from distill.gt_weight; remove it")
        if term.get("loss", name) == "js" and cfg["parity"]:
            term["variant"] = "reference"
        out[name] = term
    return {"terms": out, "mask": dc["mask"], "omega": dc["omega"]}


def _context(cfg: dict, labels: np.ndarray) -> dict:
    return {"student_dim": 10, "teacher_dim": 10, "n_data": len(labels), "dataset_labels": torch.from_numpy(labels)}


def build_kd_objective(cfg: dict, labels: np.ndarray, distill: bool = True):
    """The student's Objective: CE only (no-KD baseline) or the configured distillation; a bad term option is a
    ConfigError naming the method."""
    loss_cfg = loss_config(cfg) if distill else {"terms": {"ce": {"weight": 1.0}}, "mask": "none"}
    try:
        return build_objective(loss_cfg, context=_context(cfg, labels))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"distill.methods.{cfg['distill']['method']}: {e}") from None


def check_objective(cfg: dict) -> None:
    """Build the distillation objective once at config time (unknown method, term or option: one-line error)."""
    build_kd_objective(cfg, np.arange(64) % 10)
