"""Distillation from the channel-removed saliency teacher (`--eval_tag`) and the CE-only baseline (`--base_line`):
the NTDH repository's MNIST/main.py eval_tag / base_line branches (helper.py train_network_distill and
train_network_baseline). Modes as MFH (Xue et al., ICLR 2023, Sec. 4.2): 0 removes random channels, 1 the least
salient (keeps the modality-general ones), 2 the most salient; -1 removes none.

Every student of run r starts from the same weights and sees the same batches and noise as the baseline of run r
(trainer names ("student", r)), so mode and baseline differ only by the teacher. The teacher's and the baseline's
logits on the validation split go to `ntd/` for the NTD advisor (common.ntd)."""
from __future__ import annotations

import copy

import numpy as np
import torch

from common import ntd
from common import saliency as alg1
from mnist.experiment import Setup, accuracies, fmt, load_saliency_teacher, read_tag, train_net
from mnist.trainer import FitResult, predict


def _mean_std(values) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std())  # population std, as the reference's np.std


def _report_runs(s: Setup, label: str, results: list[FitResult]) -> dict:
    vals, tests = [r.best_val_acc for r in results], [r.test_acc for r in results]
    (vm, vs), (tm, ts) = _mean_std(vals), _mean_std(tests)
    s.log(f"{label}: Finish {len(results)} runs")
    s.log(f"{label}: Student Val Acc {100 * vm:.2f} ± {100 * vs:.2f} | Test Acc {100 * tm:.2f} ± {100 * ts:.2f}")
    out = {"val_acc": vals, "test_acc": tests, "val_mean": vm, "val_std": vs, "test_mean": tm, "test_std": ts,
           "best_epochs": [r.best_epoch for r in results], "history": [r.history for r in results]}
    omega = [r.omega for r in results if r.omega]
    if omega:
        out["omega"] = omega
    return out


def _save_logits(s: Setup, rd, role: str, model, key: str, tag: str | None, source: str) -> None:
    logits, labels = predict(model, s.loaders["val"], key, s.prepare)
    ntd.save_logits(rd.path, role, logits.cpu().numpy(), labels.cpu().numpy(), tag=tag, split="val",
                    source=f"mnist {source}")


def base_line(s: Setup, rd) -> dict:
    """The CE-only student of each run (once per run directory; eval_tag and --base_line share it); run 0's
    validation logits are the NTD advisor's probe."""
    if "baseline" not in s.cache:
        results = []
        for r in range(s.cfg["train"]["num_runs"]):
            student, result = train_net(s, f"baseline/run{r}", ("student", r), init_seed=100 + r)
            if r == 0:
                _save_logits(s, rd, "probe", student, "student", None, "CE-only baseline, run 0")
            results.append(result)
        s.cache["baseline"] = _report_runs(s, "baseline (CE only)", results)
    return s.cache["baseline"]


def eval_tag(s: Setup, rd) -> dict:
    """Remove channels of the saliency teacher by each mode, then distil `num_runs` students from it."""
    cfg, ec = s.cfg, s.cfg["eval"]
    base_teacher, teacher_path, tag_path = load_saliency_teacher(s, rd)
    place = cfg["place"]
    place_name = base_teacher.place_name(place)
    channels = base_teacher.feature_dim(place)
    sal = read_tag(tag_path, base_teacher, place, s.log)
    s.log(f"{cfg['teacher']} saliency teacher {teacher_path}, saliency {tag_path}")
    acc = accuracies(s, base_teacher, "teacher")
    s.log(f"Teacher acc: {fmt(acc)}")
    _save_logits(s, rd, "teacher", base_teacher, "teacher", None, f"{cfg['teacher']} teacher, no removal")
    out = {"teacher_kind": cfg["teacher"], "teacher": str(teacher_path), "tag": str(tag_path), "teacher_acc": acc,
           "modes": {}}
    for mode in ec["modes"]:
        teacher = copy.deepcopy(base_teacher)
        removed = alg1.removal_indices(sal, mode, ec["ratio"], generator=torch.Generator().manual_seed(cfg["seed"] + 3))
        handle = alg1.remove_channels(teacher, place_name, removed, fill=ec["fill"])
        acc_mod = accuracies(s, teacher, "teacher")
        s.log(f"mode {mode}: removed {removed.numel()} of {channels} channels at place {place} ({place_name}, "
              f"{ec['fill']} fill); teacher acc after modification: {fmt(acc_mod)}")
        _save_logits(s, rd, "teacher", teacher, "teacher", f"mode{mode}", f"{cfg['teacher']} teacher, mode {mode}")
        results = [train_net(s, f"mode{mode}/run{r}", ("student", r), teacher=teacher, distill=True,
                             init_seed=100 + r)[1] for r in range(cfg["train"]["num_runs"])]
        handle.remove()
        summary = _report_runs(s, f"mode {mode} ({cfg['distill']['method']}, mask {cfg['distill']['mask']})",
                               results)
        summary.update({"removed": removed.tolist(), "teacher_acc": acc_mod})
        out["modes"][str(mode)] = summary
    if ec["baseline"]:
        out["baseline"] = base_line(s, rd)
    return out
