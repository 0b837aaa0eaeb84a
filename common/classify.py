"""Minibatch classification training shared by the image / audio experiments (mnist, ravdess, ...).

`fit` trains a student on one modality, optionally distilled from a frozen teacher that sees another, with the
terms of a ``common.kd.Objective``; the model is selected on the validation split and the test split is evaluated
**once**, with the selected weights (the reference selected on its test split).

Batches are dicts; ``student_key`` / ``teacher_key`` / ``label_key`` name their entries, and ``prepare(batch)`` (on
the device) may transform them first — e.g. add noise to the images on the GPU.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class FitResult:
    best_val_acc: float
    test_acc: float | None
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    state: dict | None = None  # the selected student weights


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader, key: str, device, label_key: str = "label",
             prepare: Callable[[dict], dict] | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy as a fraction) of `model` on `loader`."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in loader:
        batch = _to(batch, device)
        if prepare is not None:
            batch = prepare(batch)
        logits, y = model(batch[key]), batch[label_key]
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += y.numel()
    return loss_sum / max(count, 1), correct / max(count, 1)


def fit(student: nn.Module, loaders: dict, objective, optimizer: torch.optim.Optimizer, *, epochs: int, device,
        student_key: str, teacher: nn.Module | None = None, teacher_key: str | None = None,
        label_key: str = "label", prepare: Callable[[dict], dict] | None = None, scheduler=None,
        log: Callable[[str], None] = print, writer=None, tag: str = "student", progress: bool = True) -> FitResult:
    """Train `student` for `epochs` on loaders["train"], select on loaders["val"], test once on loaders["test"].

    The teacher (if any) is frozen: eval mode and no gradient. The objective's own parameters (FitNet regressor,
    CRD embeddings) must already be in `optimizer`. Each term of the objective is logged separately.
    """
    if teacher is not None:
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    best = FitResult(best_val_acc=-1.0, test_acc=None, best_epoch=-1)
    for epoch in range(epochs):
        student.train()
        sums: dict[str, float] = {}
        batches = tqdm(loaders["train"], desc=f"{tag} epoch {epoch + 1}/{epochs}", leave=False, disable=not progress)
        for batch in batches:
            batch = _to(batch, device)
            if prepare is not None:
                batch = prepare(batch)
            out = student(batch[student_key])
            t_out = None
            if teacher is not None:
                with torch.no_grad():
                    t_out = teacher(batch[teacher_key])
            loss, parts = objective(out, t_out, batch[label_key], index=batch.get("index"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            sums["total"] = sums.get("total", 0.0) + float(loss.detach())
        n = max(len(loaders["train"]), 1)
        train_terms = {k: v / n for k, v in sums.items()}
        val_loss, val_acc = evaluate(student, loaders["val"], student_key, device, label_key, prepare)
        record = {"epoch": epoch + 1, "val_loss": val_loss, "val_acc": val_acc,
                  **{f"train_{k}": v for k, v in train_terms.items()}}
        best.history.append(record)
        if writer is not None:
            for k, v in record.items():
                if k != "epoch":
                    writer.add_scalar(f"{tag}/{k}", v, epoch + 1)
        terms = " ".join(f"{k} {v:.4f}" for k, v in train_terms.items())
        log(f"{tag} epoch {epoch + 1}/{epochs}: {terms} | val loss {val_loss:.4f} acc {val_acc:.4f}")
        if val_acc > best.best_val_acc:
            best.best_val_acc, best.best_epoch = val_acc, epoch + 1
            best.state = copy.deepcopy(student.state_dict())
    if best.state is not None:
        student.load_state_dict(best.state)
    if "test" in loaders:
        best.test_acc = evaluate(student, loaders["test"], student_key, device, label_key, prepare)[1]
        log(f"{tag}: best val acc {best.best_val_acc:.4f} (epoch {best.best_epoch}), test acc {best.test_acc:.4f}")
    return best
