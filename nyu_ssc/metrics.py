"""SSC evaluation: scene completion (precision / recall / IoU of occupancy) and semantic per-class IoU + mIoU,
on the evaluation region (nonempty: occluded + surface voxels), never mutating the inputs.

Two aggregations, both always computed and labelled:
Keys: `precision`, `recall` and `sc_iou` are scene completion (occupied vs empty: the SSC papers' "completion IoU"),
`miou` the semantic mean IoU over classes 1..11, `iou` per class, `pixel_acc` the semantic voxel accuracy.

  dataset    (default) counts tp / fp / fn over every region voxel of the dataset (common.metrics.ConfusionMatrix),
             ignored voxels (255) left out; mIoU over the 11 classes 1..11 present in ground truth or predictions.
  per_sample (the reference, `--parity`): on a copy of the target with 255 → 0 (the reference mutates its target
             this way before scoring the semantics), per scene sklearn-style binary precision / recall and
             IoU = 1 / (1/p + 1/r − 1) (0 when p = 0), averaged over the batch and then over batches; per class the
             IoU of each scene where the class is present in the ground truth, averaged over those scenes;
             mIoU = Σ_{j=1..11} IoU_j / #{j ≥ 1 seen}.
"""
from __future__ import annotations

import numpy as np
import torch

from common import ddp
from common.metrics import ConfusionMatrix
from nyu_ssc.config import CLASS_NAMES, IGNORE, NUM_CLASSES


class SSCMetrics:
    def __init__(self, num_classes: int = NUM_CLASSES):
        self.c = num_classes
        self.semantic = ConfusionMatrix(num_classes, ignore_index=IGNORE)
        self.completion = ConfusionMatrix(2)
        self._ps_comp: list[np.ndarray] = []      # per batch: mean (p, r, iou) over its scenes
        self._ps_acc: list[float] = []
        self._ps_iou_sum = np.zeros(num_classes)
        self._ps_cnt = np.zeros(num_classes)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, nonempty: torch.Tensor) -> "SSCMetrics":
        """pred: class ids (B, ...); target: (B, ...) with 255 = ignore; nonempty: (B, ...) evaluation region."""
        pred, target, region = pred.detach().cpu().long(), target.detach().cpu().long(), nonempty.detach().cpu() > 0
        keep = region & (target != IGNORE)
        self.semantic.update(pred[keep], target[keep])
        self.completion.update((pred[keep] > 0).long(), (target[keep] > 0).long())
        # the reference's per-sample scores, on copies
        t_ref = torch.where(target == IGNORE, torch.zeros_like(target), target)
        p_ref = torch.where(region, pred, torch.zeros_like(pred))
        comp, accs = [], []
        for b in range(pred.shape[0]):
            r = region[b]
            p, t = p_ref[b][r], t_ref[b][r]
            po, to = p > 0, t > 0
            tp = (po & to).sum().item()
            prec = tp / po.sum().item() if po.any() else 0.0
            rec = tp / to.sum().item() if to.any() else 0.0
            iou = 1.0 / (1.0 / prec + 1.0 / rec - 1.0) if prec > 0 and rec > 0 else 0.0
            comp.append((prec, rec, iou))
            accs.append((p == t).double().mean().item() if p.numel() else 0.0)
            for j in torch.unique(t).tolist():
                tp_j = ((p == j) & (t == j)).sum().item()
                denom = ((p == j) | (t == j)).sum().item()
                self._ps_iou_sum[j] += tp_j / denom
                self._ps_cnt[j] += 1
        self._ps_comp.append(np.mean(comp, 0))
        self._ps_acc.append(float(np.mean(accs)))
        return self

    def all_reduce(self) -> "SSCMetrics":
        """Combine the ranks of a torchrun job (each evaluated its shard of the scenes); a no-op in one process."""
        if ddp.world_size() == 1:
            return self
        self.semantic.all_reduce()
        self.completion.all_reduce()
        sums = ddp.all_reduce_sum(torch.from_numpy(np.stack([self._ps_iou_sum, self._ps_cnt])))
        self._ps_iou_sum, self._ps_cnt = sums[0].numpy(), sums[1].numpy()
        gathered = ddp.all_gather_object((self._ps_comp, self._ps_acc))
        self._ps_comp = [c for part in gathered for c in part[0]]
        self._ps_acc = [a for part in gathered for a in part[1]]
        return self

    def dataset(self) -> dict:
        m = self.completion.mat.double()
        tp, fp, fn = m[1, 1].item(), m[0, 1].item(), m[1, 0].item()
        iou = self.semantic.iou().numpy()
        return {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
                "sc_iou": tp / (tp + fp + fn) if tp + fp + fn else 0.0,
                "pixel_acc": self.semantic.pixel_accuracy(),
                "miou": float(np.nanmean(iou[1:])) if np.isfinite(iou[1:]).any() else 0.0,
                "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(CLASS_NAMES, iou)}}

    def per_sample(self) -> dict:
        comp = np.mean(self._ps_comp, 0) if self._ps_comp else np.zeros(3)
        iou = np.where(self._ps_cnt > 0, self._ps_iou_sum / np.maximum(self._ps_cnt, 1), 0.0)
        seen = int((self._ps_cnt[1:] > 0).sum())
        return {"precision": float(comp[0]), "recall": float(comp[1]), "sc_iou": float(comp[2]),
                "pixel_acc": float(np.mean(self._ps_acc)) if self._ps_acc else 0.0,
                "miou": float(iou[1:].sum() / seen) if seen else 0.0,
                "iou": {n: float(v) for n, v in zip(CLASS_NAMES, iou)}}

    def result(self) -> dict:
        return {"dataset": self.dataset(), "per_sample": self.per_sample()}


def format_result(res: dict, label: str) -> str:
    ious = " ".join(f"{(v if v is not None else float('nan')) * 100:.1f}" for v in res["iou"].values())
    return (f"[{label}] completion p {res['precision'] * 100:.2f}%, r {res['recall'] * 100:.2f}%, "
            f"IoU {res['sc_iou'] * 100:.2f}% | pixel-acc {res['pixel_acc'] * 100:.2f}%, mean IoU "
            f"{res['miou'] * 100:.2f}%, per-class IoU: [{ious}]")
