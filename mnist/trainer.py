"""mnist's trainer: the student loop of the NTDH repository's MNIST/main.py (`train_network_distill`, and
`train_network_baseline` with CE only), built on the shared mechanics of common.train.

One `fit` trains one network on one modality, optionally distilled from a frozen teacher on the other:
  * batches: a fresh loader generator and noise generator per fit, named by `names` (a no-KD baseline and a KD
    student with the same names see the same batches, in the same order, with the same noise);
  * every step: `step` (forward, the objective's weighted terms, SGD), then the non-finite guard naming the epoch,
    step and term; per-term means and ω statistics go to TensorBoard and `<tag>_log.csv`;
  * every epoch: accuracy on the held-out validation split, the best weights kept (`Selector`), and every
    `checkpoint_every` epochs the training state (`Checkpoint`: weights, optimiser, objective, generators, RNGs);
  * at the end: the test split evaluated once with the selected weights (also in `checkpoint/best_<tag>.pth`); the
    result goes to `fits/<tag>.json`, so a resumed run skips the fits it finished and continues the one it was in.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.config import atomic_write
from common.run import derived_seed, load_checkpoint
from common.train import Checkpoint, EpochLog, Selector, check_finite, due, freeze, loader_generator


@dataclass
class FitContext:
    """What every fit of one run shares."""
    loaders: dict                     # train / val / test BatchLoaders (mnist.data)
    prepare: Callable                 # mnist.data.Prepare: noisy, normalised inputs on the device
    rd: object                        # common.run.RunDir
    device: torch.device
    seed: int
    checkpoint_every: int = 1         # epochs; 0 = never
    resume: bool = False
    progress: bool = False
    log: Callable[[str], None] = print


@dataclass
class FitResult:
    best_val_acc: float
    test_acc: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    omega: dict = field(default_factory=dict)


def _file_tag(tag: str) -> str:
    return tag.replace("/", "_")


@torch.no_grad()
def predict(model: nn.Module, loader, key: str, prepare: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of `model` on every batch of `loader`, in the loader's order."""
    was = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        b = prepare(batch)
        logits.append(model(b[key]))
        labels.append(b["label"])
    model.train(was)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: nn.Module, loader, key: str, prepare: Callable) -> tuple[float, float]:
    """(mean cross-entropy, accuracy as a fraction)."""
    logits, labels = predict(model, loader, key, prepare)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def step(student: nn.Module, teacher: nn.Module | None, objective, optimizer, batch: dict, key: str,
         teacher_key: str) -> tuple[torch.Tensor, dict]:
    """One SGD step on the objective's weighted terms: CE, plus the distillation terms when there is a teacher."""
    out = student(batch[key])
    t_out = None
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher(batch[teacher_key])
    loss, parts = objective(out, t_out, batch["label"], index=batch["index"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), parts


def _done_path(ctx: FitContext, tag: str) -> Path:
    return ctx.rd.path / "fits" / f"{_file_tag(tag)}.json"


def fit(ctx: FitContext, student: nn.Module, objective, optimizer, *, epochs: int, tag: str, names: tuple,
        key: str = "student", teacher: nn.Module | None = None, teacher_key: str = "teacher") -> FitResult:
    """Train `student` on ctx.loaders["train"] for `epochs`, select on "val", test once on "test" (module doc).
    `student` must be freshly built the same way on a resume (its weights then come from the checkpoint)."""
    done = _done_path(ctx, tag)
    best_path = ctx.rd.checkpoint_dir / f"best_{_file_tag(tag)}.pth"
    if ctx.resume and done.is_file():
        student.load_state_dict(load_checkpoint(best_path, ctx.device)["model"])
        result = FitResult(**json.loads(done.read_text()))
        ctx.log(f"{tag}: finished before the resume (best val acc {result.best_val_acc:.4f}, test acc "
                f"{result.test_acc:.4f})")
        return result
    if teacher is not None:
        freeze(teacher)
    gen = loader_generator(ctx.seed, *names)
    noise = torch.Generator(device=ctx.device).manual_seed(derived_seed(ctx.seed, "noise", *names))
    selector, elog = Selector("max", path=best_path), EpochLog(ctx.rd, _file_tag(tag))
    ckpt = Checkpoint(ctx.rd.checkpoint_dir / f"train_{_file_tag(tag)}.pth", model=student, optimizer=optimizer,
                      objective=objective, loader=gen, noise=noise, selector=selector, log=elog)
    start, global_step = 0, 0
    if ctx.resume and ckpt.exists():
        state = ckpt.load(ctx.device)
        start, global_step = state["epoch"], state["step"]
        ctx.log(f"{tag}: resumed from {ckpt.path} after epoch {start}")
    for epoch in range(start + 1, epochs + 1):
        student.train()
        batches = tqdm(ctx.loaders["train"].iterate(gen), total=len(ctx.loaders["train"]), leave=False,
                       desc=f"{tag} epoch {epoch}/{epochs}", disable=not ctx.progress)
        for i, batch in enumerate(batches, 1):
            b = ctx.prepare(batch, generator=noise)
            loss, parts = step(student, teacher, objective, optimizer, b, key, teacher_key)
            check_finite(loss, parts, epoch=epoch, step=i, where=tag)
            elog.add({**parts, "total": loss})
            elog.add_omega(getattr(objective, "last_omega", None))
            global_step += 1
        val_loss, val_acc = evaluate(student, ctx.loaders["val"], key, ctx.prepare)
        record = elog.end_epoch(epoch, val_loss=val_loss, val_acc=val_acc)
        selector.update(val_acc, epoch, student)
        terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in record.items() if k.startswith("train_"))
        ctx.log(f"{tag} epoch {epoch}/{epochs}: {terms} | val loss {val_loss:.4f} acc {val_acc:.4f}")
        if due(epoch, ctx.checkpoint_every) or epoch == epochs:
            ckpt.save(epoch=epoch, step=global_step)
    selector.restore(student)
    test_acc = evaluate(student, ctx.loaders["test"], key, ctx.prepare)[1]
    ctx.log(f"{tag}: best val acc {selector.best_score:.4f} (epoch {selector.best_epoch}), test acc {test_acc:.4f}")
    result = FitResult(selector.best_score, test_acc, selector.best_epoch, elog.history, elog.omega_summary())
    atomic_write(done, lambda f: json.dump(asdict(result), f))
    return result
