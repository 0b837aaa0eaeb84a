"""Final evaluation, tables, plots (prediction-vs-ground-truth slices, training curves) and the REPORT.md section."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common import plots  # noqa: E402
from nyu_ssc import config as SC  # noqa: E402
from nyu_ssc.metrics import format_result  # noqa: E402

AGGS = ("dataset", "per_sample")


def top_view(vol: np.ndarray) -> np.ndarray:
    """(D, H, W) labels → (D, W): the label of the highest non-empty voxel of each column below the ceiling
    (ceiling voxels are skipped so that the room is visible; 0 if none; 255 where the whole column is ignored)."""
    occ = (vol > 1) & (vol != SC.IGNORE)
    h = vol.shape[1]
    top = h - 1 - np.argmax(occ[:, ::-1, :], axis=1)
    out = np.take_along_axis(vol, top[:, None, :], 1)[:, 0, :]
    out = np.where(occ.any(1), out, 0)
    return np.where((vol == SC.IGNORE).all(1), SC.IGNORE, out)


def slice_plot(path, kept, title: str, height_frac: float = 0.3) -> Path:
    """Per scene: ground truth and prediction on a horizontal slice and seen from above (seed colour map);
    predictions are shown wherever the ground truth is not ignored (grey)."""
    n = max(1, len(kept))
    fig, axes = plt.subplots(n, 4, figsize=(11, 2.9 * n), squeeze=False)
    for r, (pred, tgt, nonempty, name) in enumerate(kept):
        y = int(round(height_frac * (tgt.shape[1] - 1)))
        shown = np.where(tgt == SC.IGNORE, SC.IGNORE, pred)
        panels = [(tgt[:, y, :], f"{name}: truth, slice y={y}"), (shown[:, y, :], "prediction, same slice"),
                  (top_view(tgt), "truth, top view"), (top_view(shown), "prediction, top view")]
        for c, (img, label) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(SC.colorize(img), origin="lower", interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_xlabel("x (W)", fontsize=7)
            ax.set_ylabel("z (D, depth)", fontsize=7)
            ax.tick_params(labelsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=SC.COLOR_MAP[i] / 255) for i in range(SC.NUM_CLASSES + 1)]
    fig.legend(handles, SC.CLASS_NAMES + ["ignore"], loc="lower center", ncol=7, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def class_rows(results: dict) -> list[dict]:
    """One row per (model, aggregation, class) for results.csv."""
    rows = []
    for tag, r in results.items():
        for agg in AGGS:
            res = r[agg]
            for cls, v in res["iou"].items():
                rows.append({"model": tag, "aggregation": agg, "class": cls, "iou": v})
            for key in ("precision", "recall", "ssc_iou", "miou", "pixel_acc"):
                rows.append({"model": tag, "aggregation": agg, "class": f"[{key}]", "iou": res[key]})
    return rows


def markdown_table(results: dict, agg: str) -> str:
    names = SC.CLASS_NAMES[1:]
    head = ("| model | prec. | recall | SC IoU | " + " | ".join(names) + " | mIoU |\n|---|---|---|---|"
            + "---|" * len(names) + "---|")
    body = []
    for tag, r in results.items():
        res = r[agg]
        cells = [f"{(res['iou'][n] or 0) * 100:.1f}" if res["iou"][n] is not None else "–" for n in names]
        body.append(f"| {tag} | {res['precision'] * 100:.1f} | {res['recall'] * 100:.1f} | {res['ssc_iou'] * 100:.1f} | "
                    + " | ".join(cells) + f" | {res['miou'] * 100:.1f} |")
    return "\n".join([head, *body])


def finish(cfg: dict, rd, trained: dict) -> dict:
    """From each trained model's best validation (the epoch its cpBest checkpoint holds): results.csv,
    history_<tag>.csv, the slice plots, the mIoU curves and summary.json; log both aggregations."""
    results, plot_files = {}, []
    for tag, t in trained.items():
        res, kept = t["best"]["result"], t["best"]["kept"]
        results[tag] = {**res, "model": t["model"].__class__.__name__, "best_epoch": t["best"]["epoch"],
                        "checkpoint": t["best_path"].name}
        for agg in AGGS:
            rd.log(f"{tag} best (epoch {t['best']['epoch']}): " + format_result(res[agg], agg))
        if kept:
            plot_files.append(slice_plot(rd.file(f"slices_{tag}.png"), kept,
                                         f"{tag}: prediction vs ground truth (best epoch {t['best']['epoch']})"))
        rd.write_csv(f"history_{tag}.csv", t["history"])
    curves = {tag: ([h.get("val_miou", np.nan) for h in t["history"]],) for tag, t in trained.items()}
    epochs = list(range(1, 1 + max(len(t["history"]) for t in trained.values())))
    curves = {k: ([*v[0], *[np.nan] * (len(epochs) - len(v[0]))],) for k, v in curves.items()}
    plot_files.append(plots.line_plot(rd.file("val_miou.png"), epochs, curves, xlabel="epoch",
                                      ylabel=f"val mIoU ({'per-sample' if cfg['parity'] else 'dataset'})",
                                      title="Validation mIoU per epoch"))
    rd.write_csv("results.csv", class_rows(results), ["model", "aggregation", "class", "iou"])
    summary = {"experiment": "nyu_ssc", "headline": "per_sample" if cfg["parity"] else "dataset",
               "dataset": cfg["data"]["dataset"], "grid": cfg["grid"], "results": results,
               "history": {tag: t["history"] for tag, t in trained.items()},
               "plots": [p.name for p in plot_files], "config": cfg}
    rd.write_summary(summary)
    rd.log("per-class IoU (%), dataset-level:\n" + markdown_table(results, "dataset"))
    rd.log(f"summary.json, results.csv and plots in {rd.path}")
    return summary


def section(summary: dict, run_dir: Path, rel_to: Path) -> str:
    rel = lambda name: (Path(run_dir) / name).relative_to(rel_to).as_posix()
    res = summary["results"]
    g = summary["grid"]
    lines = ["## NYUDepthV2 semantic scene completion with cross-modal KD (`nyu_ssc`)", "",
             f"Demo run on synthetic indoor scenes in the real npz layout (grid {g['hr']} → {g['lr']}, images "
             f"{g['image']}); RGB-D DDRNet teacher, depth-only DDRNet baseline and ω-masked KL student. "
             f"Run directory: `{Path(run_dir).relative_to(rel_to.parent).as_posix()}`. These are tiny CPU runs "
             f"on synthetic data, not NYU numbers.", "",
             "Dataset-level IoU (default; %):", "", markdown_table(res, "dataset"), "",
             "Reference per-sample averaging (`--parity` headline; %):", "", markdown_table(res, "per_sample"), ""]
    for tag in res:
        name = f"slices_{tag}.png"
        if name in summary["plots"]:
            d = res[tag]["dataset"]
            ranked = sorted(((v, k) for k, v in d["iou"].items() if k != "empty" and v), reverse=True)
            best = ", ".join(f"{k} {v * 100:.1f}" for v, k in ranked[:3]) or "none"
            lines += [f"![{tag} slices]({rel(name)})", "",
                      f"**{tag} prediction vs truth.** Best epoch {res[tag]['best_epoch']}: completion IoU "
                      f"{d['ssc_iou'] * 100:.1f} % (precision {d['precision'] * 100:.1f}, recall "
                      f"{d['recall'] * 100:.1f}), mIoU {d['miou'] * 100:.1f} %; the best-recovered classes are {best}.",
                      ""]
    hist = summary["history"]
    lines += [f"![val mIoU]({rel('val_miou.png')})", ""]
    desc = []
    for tag, h in hist.items():
        vals = [r["val_miou"] for r in h if "val_miou" in r]
        if vals:
            desc.append(f"{tag} goes from {vals[0] * 100:.1f} % to {vals[-1] * 100:.1f} % (max {max(vals) * 100:.1f} %)")
    lines.append("**Validation mIoU per epoch.** " + "; ".join(desc) + ".")
    if "student" in res and "baseline" in res:
        ds, db = res["student"]["dataset"]["miou"], res["baseline"]["dataset"]["miou"]
        lines[-1] += (f" KD changes the depth student's dataset mIoU by {(ds - db) * 100:+.1f} points over the no-KD "
                     f"baseline trained with the same seed and schedule.")
    lines.append("")
    return "\n".join(lines)


def reproduce(results_dir: Path, device: str = "auto") -> str:
    """`make reproduce`: the demo with KD (teacher, baseline, student) into results/nyu_ssc."""
    from nyu_ssc import main as ssc_main
    args = ssc_main.parse_args(["--demo", "--kd", "--set", "progress=false"])
    cfg = ssc_main.resolve_config(args)
    rd, summary = ssc_main.run(cfg, Path(results_dir) / "nyu_ssc", device)
    return section(summary, rd.path, Path(results_dir))
