"""`make reproduce` section: the --demo run (teacher, distilled student, no-KD student) and its plots."""
from __future__ import annotations

import copy
import math
from pathlib import Path

from common import ntd, plots


def _fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def run_demo(out_root: Path, device: str = "auto") -> dict:
    """Demo data + CameraNet teacher + ω-masked KL student, then the same student with kd_weight = 0."""
    from semantic_kitti import main as sk
    out_root = Path(out_root)
    sets = [f"save_path={out_root}", f"data_root={out_root / 'data' / 'sequences'}", "experiment_id=report"]
    args = sk.parse_args(["--demo", *[f"--set={s}" for s in sets]])
    cfg = sk.resolve_config(args)
    dev = "cpu" if device == "auto" else device
    runs = sk.run(cfg, dev, write_demo=True)
    base = copy.deepcopy(cfg)
    base.update(stage="student", experiment_id="report_nokd", teacher_checkpoint=runs["teacher"]["best_checkpoint"])
    base["kd"]["kd_weight"] = 0.0
    runs["baseline"] = sk.run(base, dev)["student"]
    runs["config"] = cfg
    return runs


def plot(runs: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    names = {"teacher": "camera teacher", "student": "LiDAR student + KD (ω)", "baseline": "LiDAR student, no KD"}
    per_class = {k: runs[k]["best"]["per_class"] for k in names}
    present = [c for c in per_class["teacher"] if any(per_class[k][c]["IOU"] > 0 for k in names)]
    bars = {names[k]: ([per_class[k][c]["IOU"] for c in present],) for k in names}
    p1 = plots.grouped_bars(out_dir / "per_class_iou.png", present, bars, ylabel="val IoU",
                            title="Per-class IoU on the demo val sequence (selected epoch)")
    epochs = [r["epoch"] for r in runs["student"]["history"]]
    series = {f"{names[k]}: total": ([r["train_Loss"] for r in runs[k]["history"]],) for k in names}
    series["student + KD: KD term"] = ([r.get("train_LossKD", 0.0) for r in runs["student"]["history"]],)
    p2 = plots.line_plot(out_dir / "train_loss.png", epochs, series, xlabel="epoch", ylabel="mean training loss",
                         title="Training loss per epoch (demo)")
    return [p1, p2]


def _table(runs: dict) -> list[str]:
    names = {"teacher": "CameraNet teacher (RGB)", "student": "LidarNet student + ω-masked KL",
             "baseline": "LidarNet student, kd_weight = 0"}
    rows = ["| network | best epoch | val mIoU (best) | val mIoU (last epoch) | mean precision | mean recall | "
            "val pixels | train seconds |", "|---|---|---|---|---|---|---|---|"]
    for k, label in names.items():
        r, v = runs[k], runs[k]["best"]
        rows.append(f"| {label} | {r['best_epoch']} | {_fmt(v['IOU'])} | {_fmt(r['last']['IOU'])} | "
                    f"{_fmt(v['Precision'])} | {_fmt(v['Recall'])} | {v['pixels']} | {r['seconds']:.1f} |")
    return rows


def section(runs: dict, out_dir: Path, rel_to: Path) -> str:
    rel = lambda p: Path(p).relative_to(rel_to).as_posix()  # noqa: E731
    cfg = runs["config"]
    s, b, t = runs["student"], runs["baseline"], runs["teacher"]
    kd_first = s["history"][0].get("train_LossKD", 0.0)
    kd_last = s["history"][-1].get("train_LossKD", 0.0)
    iters = t["iters_per_epoch"]
    lines = ["## NTDH SemanticKITTI, camera teacher → LiDAR student (`semantic_kitti`)", "",
             f"The `--demo` run: a synthetic sequence written in the SemanticKITTI on-disk format "
             f"({cfg['demo']['frames']['train']} train and {cfg['demo']['frames']['val']} val frames, images "
             f"{cfg['demo']['image_size'][0]}×{cfg['demo']['image_size'][1]}), train crop "
             f"{cfg['data']['train_crop'][0]}×{cfg['data']['train_crop'][1]}, batch {cfg['batch_size'][0]}, "
             f"{cfg['n_epochs']} epochs of {iters} iterations per network ({cfg['n_epochs'] * iters} in all; teacher "
             f"SGD lr {cfg['teacher']['lr']}, students AdamW lr {cfg['student']['lr']}, "
             f"{cfg['train']['warmup_epochs']} warm-up epoch(s) then cosine), on the CPU, camera network from random "
             f"weights. The two students share the seed, initialisation and data order; they differ only in the "
             f"distillation term. Each network is selected on the val sequence (its best validated epoch); the table "
             f"gives that epoch's scores and the last epoch's mIoU beside them. These are short-run numbers on a toy "
             f"street scene with one seed and {cfg['demo']['frames']['val']} val frames, not SemanticKITTI results "
             f"(the dataset cannot be downloaded here), and one seed does not rank KD against no KD. mIoU, precision "
             f"and recall follow the semantic-kitti-api: means over all 19 classes (a class absent from labels and "
             f"predictions counts 0), on the projected labelled LiDAR points of the val sequence.", "",
             *_table(runs), "", f"![per-class IoU]({rel(out_dir / 'per_class_iou.png')})", "",
             f"**Per-class IoU.** Classes missing from the x-axis are scored 0 by every network (most never occur "
             f"in the demo scenes).", "",
             f"![training loss]({rel(out_dir / 'train_loss.png')})", "",
             f"**Training loss and ω.** The distilled student's total loss goes from {s['history'][0]['train_Loss']:.3f} "
             f"to {s['history'][-1]['train_Loss']:.3f} (the no-KD student: {b['history'][0]['train_Loss']:.3f} to "
             f"{b['history'][-1]['train_Loss']:.3f}); its ω-weighted KL term is {kd_first:.4f} in epoch 1 and "
             f"{kd_last:.4f} in the last epoch (the reference multiplied it by 0). Over the run the mean per-pixel ω "
             f"is {_fmt(s.get('omega_mean'))} and {_pct(s.get('omega_masked_share'))} of the distilled pixels have "
             f"ω < 1 (a teacher mistake whose prediction is not aligned with the student's).", ""]
    return "\n".join(lines)


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def advisor_records(runs: dict, out_dir: Path) -> list[dict]:
    """For the NTD advisor's check (`common.ntd.save_check_records`): where the teacher's and the no-KD student's
    (probe's) val logits are, and the Delta the distilled student measured (val mIoU, KD − no-KD, in points)."""
    rel = lambda run, role: (Path(run["experiment_dir"]) / "ntd" / f"{role}.npz").relative_to(out_dir)  # noqa: E731
    delta = 100 * (runs["student"]["best"]["IOU"] - runs["baseline"]["best"]["IOU"])
    return [{"label": "CameraNet (RGB) → LidarNet, ω-masked KL", "teacher": rel(runs["teacher"], "teacher"),
             "probe": rel(runs["baseline"], "probe"), "delta": delta}]


def reproduce(results_dir: Path, device: str = "auto") -> str:
    out_dir = Path(results_dir) / "semantic_kitti"
    runs = run_demo(out_dir, device)
    ntd.save_check_records(out_dir, advisor_records(runs, out_dir))
    plot(runs, out_dir)
    return section(runs, out_dir, Path(results_dir))
