"""The pieces both trainers set up the same way (the reference's `Experiment` in semanticKITTI/trainer.py and
trainer_student.py): the experiment directory, data loaders with DDP samplers, optimiser, AMP / channels_last,
SemanticKITTI's IoU convention and the TensorBoard images. The loops themselves live in trainer.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from common import ddp
from common.config import DataError
from common.metrics import ConfusionMatrix
from common.run import RunDir
from common.train import loader_generator, seed_worker
from semantic_kitti import data as D
from semantic_kitti.models import IMAGENET_MEAN, IMAGENET_STD, uses_imagenet


class ShardSampler(Sampler):
    """Rank r takes items r, r + W, r + 2W, ...: every val frame counted exactly once (the reference's val
    DistributedSampler pads the last round with duplicates)."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def open_run_dir(path: Path, resume: bool, main: bool) -> RunDir:
    """Rank 0 creates `path` (`_1`, `_2`, ... if taken) or reopens it to resume, and locks it; the other ranks get a
    disabled RunDir on the same path."""
    if main and not resume:
        base, i = path, 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            while True:
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    i += 1
                    path = base.with_name(f"{base.name}_{i}")
        except OSError as e:
            raise DataError(f"{path}: cannot create the experiment directory ({e.strerror or e}); choose another "
                            f"save_path / --out") from None
    path = Path(ddp.broadcast_object(str(path)))
    if not main:
        return RunDir(path, enabled=False)
    return (RunDir.open(path) if resume else RunDir(path)).lock()


def rgb_normalisation(cfg: dict):
    """(mean, std) for the RGB channels when the camera network starts from ImageNet weights, else None (RGB stays
    in [0, 1], as the reference)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if uses_imagenet(cfg["teacher"]["imagenet_weights"]) else None


@dataclass
class Loaders:
    train_set: D.PerspectiveViewDataset
    val_set: D.PerspectiveViewDataset
    train: DataLoader
    val: DataLoader
    train_sampler: object
    val_indices: list[int]       # this rank's val frames, in loader order
    generator: torch.Generator   # the train loader's shuffle state (saved in the training checkpoint)
    iters: int                   # training iterations per epoch


def build_loaders(cfg: dict, labels: D.LabelConfig, world: int, cuda: bool, parity: bool) -> Loaders:
    """Train loader (DistributedSampler under DDP, else shuffled by a per-fit generator: the KD student and its no-KD
    baseline see the same batches in the same order) and a non-padding val shard per rank."""
    zbuf = cfg["data"]["zbuffer"] and not parity
    norm = rgb_normalisation(cfg)
    train_set = D.PerspectiveViewDataset(cfg["data_root"], cfg["train_sequences"], labels, cfg["data"], True,
                                         seed=cfg["seed"], zbuffer=zbuf, has_label=cfg["has_label"], rgb_norm=norm)
    val_set = D.PerspectiveViewDataset(cfg["data_root"], cfg["val_sequences"], labels, cfg["data"], False,
                                       seed=cfg["seed"], zbuffer=zbuf, has_label=cfg["has_label"], rgb_norm=norm)
    bs_train, bs_val = cfg["batch_size"]
    train_sampler = ddp.make_sampler(train_set, shuffle=True, drop_last=True, seed=cfg["seed"])
    val_sampler = ShardSampler(len(val_set), ddp.rank(), world)
    workers = cfg["n_threads"]
    common = dict(num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0, worker_init_fn=seed_worker)
    gen = loader_generator(cfg["seed"], "segmentation")  # the same for teacher, KD student and no-KD student
    train = DataLoader(train_set, bs_train, shuffle=train_sampler is None, sampler=train_sampler, drop_last=True,
                       generator=gen, **common)
    val = DataLoader(val_set, bs_val, shuffle=False, sampler=val_sampler, **common)
    if len(train) == 0:
        raise DataError(f"{cfg['data_root']}: {len(train_set)} training frames give no full batch of {bs_train} "
                        f"per process ({world} process(es))")
    iters = min(len(train), cfg["iters_per_epoch"]) if cfg["iters_per_epoch"] else len(train)
    return Loaders(train_set, val_set, train, val, train_sampler, val_sampler.indices, gen, iters)


def make_optimizer(role_cfg: dict, params) -> torch.optim.Optimizer:
    r = role_cfg
    if r["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=r["lr"], momentum=r["momentum"], nesterov=r["nesterov"],
                               weight_decay=r["weight_decay"])
    return torch.optim.AdamW(params, lr=r["lr"], weight_decay=r["weight_decay"])


def autocast(cuda: bool, amp: bool):
    """bf16 autocast on CUDA when train.amp; nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda and amp else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Scores: the official semantic-kitti-api convention (auxiliary/np_ioueval.py, iouEval.getIoU)

def kitti_scores(cm: ConfusionMatrix, include: list[int], names: list[str]) -> dict:
    """mIoU, mean precision and mean recall as the semantic-kitti-api computes them: tp / (tp + fp + fn + 1e-15) per
    class, averaged over ALL included classes (19 on SemanticKITTI; a class absent from both labels and predictions
    counts as 0, where ConfusionMatrix.mean_iou would skip it). Points whose label is ignored are not counted;
    predicting an ignored class is a false negative of the true class. Same for the reference's IOUEval."""
    mat = cm.mat.double().cpu().clone()  # rows: truth, columns: prediction
    ignored = [c for c in range(mat.shape[0]) if c not in include]
    mat[ignored, :] = 0
    tp = mat.diag()
    fp = mat.sum(0) - tp
    fn = mat.sum(1) - tp
    iou, prec, rec = tp / (tp + fp + fn + 1e-15), tp / (tp + fp + 1e-15), tp / (tp + fn + 1e-15)
    idx = torch.tensor(include)
    return {"IOU": float(iou[idx].mean()), "Precision": float(prec[idx].mean()), "Recall": float(rec[idx].mean()),
            "PixelAcc": float(tp.sum() / mat.sum().clamp_min(1)),
            "per_class": {names[c]: {"IOU": float(iou[c]), "Precision": float(prec[c]), "Recall": float(rec[c])}
                          for c in include}}


def per_class_table(r: dict) -> str:
    lines = [f"{'class':<14} {'IoU':>7} {'Precision':>10} {'Recall':>7}"]
    for name, v in r["per_class"].items():
        lines.append(f"{name:<14} {v['IOU']:7.4f} {v['Precision']:10.4f} {v['Recall']:7.4f}")
    lines.append(f"{'mean':<14} {r['IOU']:7.4f} {r['Precision']:10.4f} {r['Recall']:7.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# TensorBoard images

def colorize(labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    return colors[np.clip(labels, 0, len(colors) - 1)]


def write_images(rd: RunDir, tag: str, epoch: int, features, pred, label, colors, rgb_norm) -> None:
    """RGB, LiDAR depth, prediction (on the labelled pixels) and label of one val frame."""
    if not rd.enabled:
        return
    rgb = features[5:8]
    if rgb_norm is not None:
        rgb = rgb * torch.tensor(rgb_norm[1]).view(3, 1, 1) + torch.tensor(rgb_norm[0]).view(3, 1, 1)
    depth = features[0:1]
    w = rd.writer
    w.add_image(f"{tag}/rgb", rgb.clamp(0, 1), epoch)
    w.add_image(f"{tag}/pcd_depth", (depth - depth.min()) / (depth.max() - depth.min() + 1e-6), epoch)
    w.add_image(f"{tag}/prediction",
                torch.from_numpy(colorize(pred.numpy() * (label.numpy() > 0), colors)).permute(2, 0, 1), epoch)
    w.add_image(f"{tag}/label", torch.from_numpy(colorize(label.numpy(), colors)).permute(2, 0, 1), epoch)
