"""The training of one sklearn_exp sweep block (NTDH sklearn/main.py, `train` and `train_kd`): teachers, the no-KD
baseline and KD students, every (γ, run) a group of one batched two-layer MLP (sklearn_exp/models.py), trained full
batch through common.synthetic.dispatch (closed-form gradients where the objective has one, autograd otherwise).
Algorithm 1's joint training and saliency stay with the sweep (sklearn_exp/experiment.py, `algorithm1`).
"""
from __future__ import annotations

import torch

from common.run import derived_seed
from common.synthetic import dispatch
from common.synthetic import sweep as sweep_protocol
from sklearn_exp.models import two_layer_nn


def init_seeds(cfg: dict, sweep, offset: int = 0, groups: int | None = None) -> list[int]:
    """Model-init seed per group: run r uses seed + r for every role and γ (the reference builds teacher, students
    and masked teacher all from the run's seed_j)."""
    per_run = [cfg["seed"] + offset + sweep.first_run + r for r in range(sweep.runs)]
    n = (groups or sweep.groups) // sweep.runs
    return per_run * n


def fit_settings(cfg: dict) -> dict:
    """The full-batch SGD settings of every model of the sweep (dispatch.train's keywords)."""
    t = cfg["train"]
    return {"epochs": t["epochs"], "lr": t["lr"], "momentum": t["momentum"], "chunk": t["chunk_runs"],
            "progress": cfg["progress"], "engine": t["engine"]}


def train_ce(cfg: dict, x: torch.Tensor, y: torch.Tensor, seeds, desc: str):
    """A two-layer MLP per group on the cross-entropy alone: teacher (x1), masked teacher, no-KD baseline (x2)."""
    m = two_layer_nn(x.shape[1], cfg["model"]["hidden"], int(cfg["data"]["n_classes"]), x.shape[0], seeds)
    return dispatch.train(m.to(x.device), x, y, desc=desc, **fit_settings(cfg))


def train_kd(cfg: dict, sweep, method: str, mask: str, teacher_train: torch.Tensor, seeds, desc: str):
    """The KD student of one (method, mask) on x2 against the teacher's training logits: ce + the method's terms
    (common.synthetic.sweep.objective_for); CE + KL without a mask (the reference default) by its closed-form
    gradient, everything else by autograd."""
    tr = sweep.train
    n_classes = int(cfg["data"]["n_classes"])
    student = two_layer_nn(tr.x2.shape[1], cfg["model"]["hidden"], n_classes, sweep.groups, seeds).to(tr.x2.device)
    objective = sweep_protocol.objective_for(cfg, method, mask, tr.y, n_classes).to(tr.x2.device)
    return dispatch.train(student, tr.x2, tr.y, objective=objective, teacher_out=teacher_train,
                          closed_form=cfg["train"]["closed_form"], desc=desc, **fit_settings(cfg))


def train_students(cfg: dict, sweep, method: str, mask: str, teacher_train, masked_teacher_train, seeds):
    """The KD student from the teacher and the one from the masked teacher (Algorithm 1's columns), one (method,
    mask); each configuration (and each block of runs) draws from its own torch stream, whatever ran before it."""
    key = f"{method}/{mask}"
    torch.manual_seed(derived_seed(cfg["seed"], method, mask, sweep.first_run))
    student = sweep.timed("kd", lambda: train_kd(cfg, sweep, method, mask, teacher_train, seeds, key))
    masked = sweep.timed("masked_kd", lambda: train_kd(cfg, sweep, method, mask, masked_teacher_train, seeds,
                                                       f"{key} from masked teacher"))
    return student, masked
