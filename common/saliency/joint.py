"""Algorithm 1, step 1 (MFH, Algorithm 1): joint unimodal training of a teacher-modality and a student-modality
network on CE + CE + agreement."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.divergence import full_js, nontarget_js
from common.train import Checkpoint, check_finite, due
from common.saliency.distances import Distance, _check_distance, _without


def agreement(out_a: torch.Tensor, out_b: torch.Tensor, y: torch.Tensor, distance: Distance, variant: str,
              class_dim: int = -1) -> torch.Tensor:
    """Step 1's agreement term d(out_a, out_b), averaged over samples (and classes for mse / l1); the class axis of
    the outputs is class_dim. A distance outside DISTANCES (and not a callable) is a ValueError."""
    if callable(distance):
        return distance(out_a, out_b, y).mean()
    _check_distance(distance)
    if distance == "mse":
        return F.mse_loss(out_a, out_b)
    if distance == "l1":
        return F.l1_loss(out_a, out_b)
    class_dim %= out_a.dim()
    if distance == "js":
        return full_js(out_b, out_a, variant, dim=class_dim).mean()
    labels = y.expand(_without(out_a.shape, class_dim))
    return nontarget_js(out_b, out_a, labels, variant, dim=class_dim).mean()


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, class_dim: int = -1) -> torch.Tensor:
    """Mean CE over every sample; the class axis is class_dim, every other axis a sample (common.divergence's
    convention), and y is broadcast to the logits' shape without the class axis."""
    class_dim %= logits.dim()
    labels = y.expand(_without(logits.shape, class_dim))
    if class_dim == logits.dim() - 1:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    # F.cross_entropy takes the classes on axis 1, e.g. (R, C, N) with labels (R, N), as they are.
    return F.cross_entropy(logits.movedim(class_dim, 1), labels)


def joint_train(model_a: nn.Module, model_b: nn.Module, batches_fn: Callable[[], Iterable], *, epochs: int, lr: float,
                momentum: float = 0.9, distance: Distance = "mse", variant: str = "textbook", device=None,
                progress: bool = False, loss_fn=None, class_dim: int = -1, checkpoint: str | Path | None = None,
                checkpoint_every: int = 1, state: dict | None = None, resume: bool = False,
                log: Callable[[str], None] | None = None) -> list[float]:
    """Alg. 1 step 1: one SGD over both nets on CE(a) + CE(b) + d(a, b); returns the mean loss of each epoch.

    batches_fn() gives one epoch of (x_a, x_b, y). d is MSE on logits (MFH) or the non-target JS "ncjsd" (NTDH).
    class_dim: the class axis of the model outputs (default last; 1 for the feature-major vectorised models'
    (R, C, N), with y (R, N)). Every other axis is a sample: the default CE and d average over all of them, runs
    included, so each run's gradient is its own loss's gradient divided by R.
    loss_fn(out_a, out_b, y), when given, replaces the whole default loss (e.g. run-summed losses of the vectorised
    synthetic models). Both models are moved to `device` when given, and left in eval mode afterwards.
    checkpoint: a training-state file (common.train.Checkpoint: both models, the optimiser, the RNGs, the objects
    in `state` such as the loader's shuffle and noise generators, and the loss history), written every
    `checkpoint_every` epochs (0: never); with `resume` and the file present, training continues after its epoch
    and gives what the uninterrupted run would have given (said through `log` when given).
    """
    if loss_fn is None:
        _check_distance(distance)
    if device is not None:
        model_a.to(device)
        model_b.to(device)
    # One optimiser over both parameter sets; a parameter shared by the two models is stepped once.
    params = list({id(p): p for p in itertools.chain(model_a.parameters(), model_b.parameters())}.values())
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum)
    history: list[float] = []
    ckpt = None if checkpoint is None else Checkpoint(checkpoint, model_a=model_a, model_b=model_b,
                                                      optimizer=optimizer, **(state or {}))
    if ckpt is not None and resume and ckpt.exists():
        history = list(ckpt.load()["history"])
        if log is not None:
            log(f"joint training: resuming after epoch {len(history)} of {epochs}")
    model_a.train()
    model_b.train()
    bar = tqdm(range(len(history), epochs), desc="joint training", disable=not progress, leave=False)
    for epoch in bar:
        losses = []
        for x_a, x_b, y in batches_fn():
            if device is not None:
                x_a, x_b, y = x_a.to(device), x_b.to(device), y.to(device)
            out_a, out_b = model_a(x_a), model_b(x_b)
            if loss_fn is not None:
                loss = loss_fn(out_a, out_b, y)
            else:
                loss = (_cross_entropy(out_a, y, class_dim) + _cross_entropy(out_b, y, class_dim)
                        + agreement(out_a, out_b, y, distance, variant, class_dim))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            check_finite(losses[-1], epoch=len(history), step=len(losses) - 1, where="joint training")
        if not losses:
            raise ValueError("batches_fn() yielded no batches")
        history.append(sum(losses) / len(losses))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        if ckpt is not None and (due(epoch + 1, checkpoint_every) or epoch + 1 == epochs):
            ckpt.save(epoch=epoch + 1, history=history)
    model_a.eval()
    model_b.eval()
    return history
