"""The two RAVDESS training loops, on the mechanics of `common.train`.

`joint_fit` — Algorithm 1, step 1 (MFH, Xue et al. ICLR 2023, Alg. 1; the reference's `train_network_for_overlap_tag`
in ravdess/main_overlap_tag.py): the audio net and the image net trained together by one SGD on
CE(audio) + CE(image) + d(audio logits, image logits), d = MSE (MFH) or the non-target JS (NTDH); without d
(`teacher: independent`) it is two independent CE-only trainings.

`fit` — step 3: one image student trained on its own (the no-KD baseline) or distilled from the frozen audio teacher
(the reference's `train_network_distill`), with its selection bug fixed: the student is selected on the validation
split and the test split is evaluated once, at the end, with the selected weights.

Each loop checkpoints its training state (models, optimiser, the objective's own parameters, selection, the
per-term log, the loader's shuffle generator and every RNG state) atomically every `checkpoint_every` epochs to
`checkpoint/<tag>.pth`; running it again in the same run directory (`--resume`) continues from there, and a finished
loop returns the result stored with its final checkpoint instead of training again. A non-finite loss stops the run
with a one-line error naming the epoch, step and term (`common.train.check_finite`); the last checkpoint stays.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common.run import RunDir
from common.saliency import agreement
from common.train import Checkpoint, EpochLog, Selector, check_finite, due, loader_generator
from ravdess import data as D


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict(model: nn.Module, loader, key: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), labels (N,)) of `model` on every batch of `loader`, on the CPU, in the loader's order."""
    model.eval()
    outs, labels = [], []
    for batch in loader:
        batch = _to(batch, device)
        outs.append(model(batch[key]).float().cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(outs), torch.cat(labels)


def evaluate(model: nn.Module, loader, key: str, device) -> tuple[float, float]:
    """(mean cross-entropy, accuracy as a fraction) of `model` on `loader`."""
    logits, y = predict(model, loader, key, device)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def step(student: nn.Module, teacher: nn.Module | None, objective, batch: dict):
    """One training step's loss: the objective on the student's image logits and, with a teacher, the frozen
    teacher's audio logits. Returns (total, {term: value})."""
    t_out = None
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher(batch["audio"])
    return objective(student(batch["image"]), t_out, batch["label"], index=batch["index"])


def fit(student: nn.Module, objective, train_set, loaders: dict, *, teacher: nn.Module | None, cfg: dict,
        names: tuple, device, rd: RunDir, tag: str, on_step: Callable[[int, int], None] | None = None) -> dict:
    """Train `student` for eval.epochs on `train_set` (shuffled by `loader_generator(seed, *names)`: give the
    baseline and the KD students of one run the same names, so they see the same batches in the same order),
    select on loaders["val"], test once on loaders["test"]. The teacher, if any, must be frozen already.
    `on_step(epoch, step)` is called after every optimiser step (the tests interrupt a run with it).
    Returns {val_acc, test_acc, best_epoch, history, omega}."""
    e, d = cfg["eval"], cfg["data"]
    generator = loader_generator(cfg["seed"], *names)
    train = D.make_loader(train_set, d["batch_size"], True, d["num_workers"], device, generator=generator)
    optimizer = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=e["lr"], momentum=e["momentum"])
    selector, log = Selector("max"), EpochLog(rd, tag)
    ckpt = Checkpoint(rd.checkpoint_dir / f"{tag}.pth", student=student, optimizer=optimizer, objective=objective,
                      selector=selector, log=log, generator=generator)
    start = 0
    if ckpt.exists():
        state = ckpt.load(device)
        if "result" in state:
            selector.restore(student)
            rd.log(f"{tag}: finished earlier, result taken from {ckpt.path.name}")
            return state["result"]
        start = state["epoch"]
        rd.log(f"{tag}: resuming after epoch {start} from {ckpt.path.name}")
    for epoch in range(start + 1, e["epochs"] + 1):
        student.train()
        objective.train()
        bar = tqdm(train, total=len(train), desc=f"{tag} epoch {epoch}/{e['epochs']}", leave=False,
                   disable=not cfg["progress"])
        for i, batch in enumerate(bar, 1):
            loss, parts = step(student, teacher, objective, _to(batch, device))
            check_finite(loss, parts, epoch=epoch, step=i, where=tag)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.add({**parts, "total": loss.detach()})
            log.add_omega(objective.last_omega)
            if on_step is not None:
                on_step(epoch, i)
        val_loss, val_acc = evaluate(student, loaders["val"], "image", device)
        record = log.end_epoch(epoch, val_loss=val_loss, val_acc=val_acc)
        selector.update(val_acc, epoch, student)
        terms = " ".join(f"{k[6:]} {v:.4f}" for k, v in record.items() if k.startswith("train_"))
        rd.log(f"{tag} epoch {epoch}/{e['epochs']}: {terms} | val loss {val_loss:.4f} acc {val_acc:.4f}")
        if due(epoch, cfg["checkpoint_every"]):
            ckpt.save(epoch=epoch)
    selector.restore(student)
    test_acc = evaluate(student, loaders["test"], "image", device)[1]
    rd.log(f"{tag}: best val acc {selector.best_score:.4f} (epoch {selector.best_epoch}), test acc {test_acc:.4f}")
    result = {"val_acc": selector.best_score, "test_acc": test_acc, "best_epoch": selector.best_epoch,
              "history": log.history, "omega": log.omega_summary()}
    ckpt.save(epoch=e["epochs"], result=result)
    return result


def tag_variant(cfg: dict) -> str:
    """The JS variant of the tag distance (steps 1 and 2): the reference's reversed JS ½[KL(M‖P) + KL(M‖Q)] under
    parity (distances/jsd.py js_divergence), else tag.js_variant."""
    return "reference" if cfg["parity"] else cfg["tag"]["js_variant"]


def joint_step(teacher: nn.Module, student: nn.Module, batch: dict, distance: str | None, variant: str):
    """CE(audio) + CE(image) + d(audio logits, image logits) averaged over the batch; distance None: no d."""
    out_a, out_b, y = teacher(batch["audio"]), student(batch["image"]), batch["label"]
    parts = {"ce_audio": F.cross_entropy(out_a, y), "ce_image": F.cross_entropy(out_b, y)}
    if distance is not None:
        parts[distance] = agreement(out_a, out_b, y, distance, variant, class_dim=1)
    return sum(parts.values()), parts


def joint_fit(teacher: nn.Module, student: nn.Module, train_set, *, cfg: dict, device, rd: RunDir,
              tag: str = "joint", on_step: Callable[[int, int], None] | None = None) -> list[float]:
    """Alg. 1 step 1 over tag.epochs; returns the mean loss per epoch. `teacher: independent` drops d."""
    t, d = cfg["tag"], cfg["data"]
    distance = t["distance"] if cfg["teacher"] == "joint" else None
    generator = loader_generator(cfg["seed"], "joint")
    train = D.make_loader(train_set, d["batch_size"], True, d["num_workers"], device, generator=generator)
    teacher.to(device), student.to(device)
    optimizer = torch.optim.SGD([*teacher.parameters(), *student.parameters()], lr=t["lr"], momentum=t["momentum"])
    log = EpochLog(rd, tag)
    ckpt = Checkpoint(rd.checkpoint_dir / f"{tag}.pth", teacher=teacher, student=student, optimizer=optimizer,
                      log=log, generator=generator)
    start = ckpt.load(device)["epoch"] if ckpt.exists() else 0
    for epoch in range(start + 1, t["epochs"] + 1):
        teacher.train(), student.train()
        for i, batch in enumerate(train, 1):
            loss, parts = joint_step(teacher, student, _to(batch, device), distance, tag_variant(cfg))
            check_finite(loss, parts, epoch=epoch, step=i, where=tag)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.add({**parts, "total": loss.detach()})
            if on_step is not None:
                on_step(epoch, i)
        record = log.end_epoch(epoch)
        if cfg["progress"] or epoch == t["epochs"] or due(epoch, 10):
            rd.log(f"{tag} epoch {epoch}/{t['epochs']}: loss {record['train_total']:.4f}")
        if due(epoch, cfg["checkpoint_every"]) or epoch == t["epochs"]:
            ckpt.save(epoch=epoch)
    teacher.eval(), student.eval()
    return [r["train_total"] for r in log.history]


def mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std())
